//! The integration tests of `bank`, in one binary: each service in-process, the demo, and the
//! end-to-end bank test over the real `bank` binary.

mod accounts;
mod demo;
mod e2e;
mod statements;
