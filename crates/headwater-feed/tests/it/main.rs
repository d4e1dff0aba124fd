//! headwater-feed's integration tests: one binary, one module per subject.

mod determinism;
mod support;
