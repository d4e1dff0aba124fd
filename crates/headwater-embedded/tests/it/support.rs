//! Helpers shared by the test modules.

use std::path::Path;

use headwater_embedded::EmbeddedStore;

/// Opens the store in `dir` with default options, panicking with the error.
pub(crate) fn open(dir: &Path) -> EmbeddedStore {
    EmbeddedStore::open(dir).unwrap_or_else(|e| panic!("opening {}: {e}", dir.display()))
}
