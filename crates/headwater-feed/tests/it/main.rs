//! headwater-feed's integration tests: one binary, one module per subject.

mod api;
mod backfill;
mod crash;
mod determinism;
mod errors;
mod postgres;
mod runtime;
mod support;
