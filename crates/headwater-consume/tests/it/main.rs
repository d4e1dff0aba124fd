//! The integration tests of `headwater-consume`, in one binary.

mod client;
mod consumer;
mod embedded;
mod postgres;
mod processes;
mod status;
mod switch;
mod walker;
