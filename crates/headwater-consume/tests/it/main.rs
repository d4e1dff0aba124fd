//! The integration tests of `headwater-consume`, in one binary.

mod consumer;
mod embedded;
