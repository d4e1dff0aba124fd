//! The integration tests of `headwater`: one binary, one module per subject.

mod account;
mod aggregate;
mod handler;
mod model;
