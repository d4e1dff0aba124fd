//! The integration tests of `headwater-publish`, in one binary:
//!
//! - `publisher`: the follower against a scripted broker (faults per message) and the memory feed
//!   store, checking the cursor at every move; a property test.
//! - `brokers`: the broker side against the real RabbitMQ and NATS started by `scripts/test`.
//! - `follow`, `drops`: the follower against the real brokers; connections cut by a TCP proxy.
//! - `postgres`: two replicas on PostgreSQL, one publishing at a time.
//! - `processes`: real producer processes killed with SIGKILL, brokers stopped, killed and
//!   started again, no broker at start.
//!
//! The tests that need a server fail, never skip, without it.

mod brokers;
mod drops;
mod follow;
mod postgres;
mod processes;
mod publisher;
mod support;
