//! Headwater's reference system, written as a user of the framework writes a service: only the
//! `headwater` crate's public API.
//!
//! - [`model`]: the public model — the `accounts` feeds v1 and v2, the contract both services
//!   share;
//! - [`accounts`]: the producer service (aggregate `Account`, commands over HTTP, projections,
//!   the feed API, publishing);
//! - [`statements`]: the consumer service (balances per account from the feed);
//! - [`demo`]: both in one process through a lossy link, and the verdict;
//! - [`bench`]: the bank's benchmark;
//! - [`client`]: the HTTP client of the command API (and of `statements`' balances).

pub mod accounts;
pub mod bench;
pub mod client;
pub mod demo;
pub mod model;
pub mod shutdown;
pub mod statements;
