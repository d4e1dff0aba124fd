//! The backend conformance suites, unchanged, each test in a schema of its own.

use crate::support::Fresh;

headwater_store::conformance_suite!(Fresh::new());

/// The feed store's suite, on `PgFeedStore`.
mod feed {
    use crate::support::Fresh;

    headwater_store::feed_conformance_suite!(Fresh::new());
}
