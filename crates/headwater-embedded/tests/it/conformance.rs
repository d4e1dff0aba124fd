//! The backend conformance suite, on a fresh directory that later opens reopen.

use headwater_embedded::EmbeddedStore;
use headwater_store::conformance::Harness;
use tempfile::TempDir;

struct Embedded {
    dir: TempDir,
}

impl Embedded {
    fn new() -> Embedded {
        Embedded {
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

impl Harness for Embedded {
    type Store = EmbeddedStore;

    async fn open(&self) -> EmbeddedStore {
        crate::support::open(&self.dir.path().join("store"))
    }
}

headwater_store::conformance_suite!(Embedded::new());
