//! Who read which feed: counted in memory per request, written to the feed store in one
//! `record_readers` call every [`READERS_FLUSH_INTERVAL`](crate::READERS_FLUSH_INTERVAL) and on
//! shutdown, never one write per request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use headwater_core::{FeedId, Timestamp};
use headwater_store::{FeedError, FeedStore, ReaderSeen};

/// The reads not yet recorded. Bounded by (configured tokens × feeds): a reader is a configured
/// token's name and a feed is one that exists.
#[derive(Debug, Default)]
pub(crate) struct ReaderLog {
    seen: Mutex<HashMap<(FeedId, String), (Timestamp, u64)>>,
}

pub(crate) fn now() -> Timestamp {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    Timestamp::from_unix_micros(micros)
}

impl ReaderLog {
    pub(crate) fn seen(&self, feed: &FeedId, reader: &str) {
        let at = now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match seen.get_mut(&(feed.clone(), reader.to_owned())) {
            Some(entry) => {
                entry.0 = entry.0.max(at);
                entry.1 += 1;
            }
            None => {
                seen.insert((feed.clone(), reader.to_owned()), (at, 1));
            }
        }
    }

    /// Writes what was counted since the last flush. On failure the counts are put back, to be
    /// written by the next flush.
    pub(crate) async fn flush(&self, store: &dyn FeedStore) -> Result<(), FeedError> {
        let taken = std::mem::take(&mut *self.seen.lock().unwrap_or_else(|e| e.into_inner()));
        if taken.is_empty() {
            return Ok(());
        }
        let batch: Vec<ReaderSeen> = taken
            .iter()
            .map(|((feed, reader), (at, reads))| ReaderSeen {
                feed: feed.clone(),
                reader: reader.clone(),
                at: *at,
                reads: *reads,
            })
            .collect();
        if let Err(error) = store.record_readers(batch).await {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            for (key, (at, reads)) in taken {
                let entry = seen.entry(key).or_insert((at, 0));
                entry.0 = entry.0.max(at);
                entry.1 += reads;
            }
            return Err(error);
        }
        Ok(())
    }
}
