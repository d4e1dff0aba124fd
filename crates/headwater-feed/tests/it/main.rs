//! headwater-feed's integration tests: one binary, one module per subject.

mod backfill;
mod determinism;
mod errors;
mod runtime;
mod support;
