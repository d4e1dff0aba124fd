//! The feed conformance suite on the embedded feed store, on a fresh directory that later opens
//! reopen. The log is given `SOURCE_POSITIONS_MAX` events first: the feed store refuses cursors
//! past the log's head.

use headwater_core::ExpectedVersion;
use headwater_embedded::EmbeddedFeedStore;
use headwater_store::EventStore;
use headwater_store::conformance::feed::SOURCE_POSITIONS_MAX;
use headwater_store::conformance::{FeedHarness, events, stream};
use tempfile::TempDir;

pub(crate) struct EmbeddedFeeds {
    dir: TempDir,
}

impl EmbeddedFeeds {
    pub(crate) fn new() -> EmbeddedFeeds {
        EmbeddedFeeds {
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

/// Opens the store in `dir` and its feeds, with at least `SOURCE_POSITIONS_MAX` events in the
/// log.
pub(crate) async fn open_feeds(dir: &std::path::Path) -> EmbeddedFeedStore {
    let store = crate::support::open(dir);
    while store.head_position().0 < SOURCE_POSITIONS_MAX {
        store
            .append(&stream("source"), ExpectedVersion::Any, events(1_000))
            .await
            .unwrap();
    }
    store.feeds().unwrap()
}

impl FeedHarness for EmbeddedFeeds {
    type Store = EmbeddedFeedStore;

    async fn open(&self) -> EmbeddedFeedStore {
        open_feeds(&self.dir.path().join("store")).await
    }
}

headwater_store::feed_conformance_suite!(EmbeddedFeeds::new());
