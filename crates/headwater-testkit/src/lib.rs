//! Test support shared by Headwater's crates (a dev-dependency only).
//!
//! [`process`]: crash tests on real processes. A test binary re-executes itself to run one child
//! test function in a new process, reads what the child acknowledges on stdout, and kills it with
//! SIGKILL at a moment of its choosing.
//!
//! [`broker`]: private RabbitMQ and NATS processes a test stops, kills and starts again.
//!
//! [`http`]: a plain GET to a feed API, independent of the client under test.
//!
//! [`postgres`]: the test server's URL and schemas of a test's own, dropped at its end.
//!
//! Architecture invariant: nothing here is linked into a library or a binary users run.

pub mod broker;
pub mod http;
pub mod postgres;
pub mod process;
