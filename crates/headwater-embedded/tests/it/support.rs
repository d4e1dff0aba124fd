//! Helpers shared by the test modules.

use std::path::Path;

use headwater_core::limits::READ_PAGE_EVENTS_MAX;
use headwater_core::{Position, RecordedEvent};
use headwater_embedded::{EmbeddedStore, Options};
use headwater_store::{EventStore, read_all_pages};

/// Opens the store in `dir` with default options, panicking with the error.
pub(crate) fn open(dir: &Path) -> EmbeddedStore {
    EmbeddedStore::open(dir).unwrap_or_else(|e| panic!("opening {}: {e}", dir.display()))
}

/// Opens the store in `dir` with `options`.
pub(crate) fn open_with(dir: &Path, options: Options) -> EmbeddedStore {
    EmbeddedStore::open_with(dir, options)
        .unwrap_or_else(|e| panic!("opening {}: {e}", dir.display()))
}

/// Every event of the store, in position order.
pub(crate) async fn whole_log(store: &EmbeddedStore) -> Vec<RecordedEvent> {
    let mut log = Vec::new();
    read_all_pages(store, Position::START, READ_PAGE_EVENTS_MAX, |page| {
        log.extend_from_slice(page)
    })
    .await
    .unwrap();
    log
}

/// The whole error chain of `error`, for assertions on messages.
pub(crate) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Asserts the head the store reports.
pub(crate) fn assert_head(store: &EmbeddedStore, head: u64) {
    assert_eq!(store.head_position(), Position(head));
}
