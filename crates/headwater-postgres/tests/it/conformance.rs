//! The backend conformance suite, unchanged, each test in a schema of its own.

use crate::support::Fresh;

headwater_store::conformance_suite!(Fresh::new());
