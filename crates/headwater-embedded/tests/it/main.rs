//! The embedded store's integration tests (one test binary).

mod conformance;
mod support;
