//! The embedded store's integration tests (one test binary).

mod conformance;
mod corruption;
mod faults;
mod format;
mod integrity;
mod support;
