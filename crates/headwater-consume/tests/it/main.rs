//! The integration tests of `headwater-consume`, in one binary.

mod amqp;
mod broker_kit;
mod client;
mod consumer;
mod dead;
mod embedded;
mod nats;
mod postgres;
mod processes;
mod status;
mod switch;
mod walker;
