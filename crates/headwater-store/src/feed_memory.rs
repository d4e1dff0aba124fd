//! The in-memory reference [`FeedStore`]: the simplest correct one, for tests and examples.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use headwater_core::limits::READ_PAGE_BYTES_MAX;
use headwater_core::{FeedId, FeedPosition, FeedStatus, Position, Sequence, Subject};
use tokio::sync::watch;

use crate::feed::{
    FeedCommit, FeedError, FeedEvent, FeedReader, FeedState, FeedStore, ProjectorBatch,
    PublisherCursor, ReaderSeen, SubjectHead, validate_batch, validate_feed_limit,
    validate_publisher_advance, validate_subject_limit,
};
use crate::memory::now;

/// A [`FeedStore`] in memory. Clones share the same feeds.
///
/// # Durability
/// None: the feeds live as long as the last clone.
#[derive(Clone, Debug, Default)]
pub struct MemoryFeedStore {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    feeds: BTreeMap<FeedId, Feed>,
    watches: HashMap<FeedId, watch::Sender<FeedPosition>>,
}

#[derive(Debug)]
struct Feed {
    state: FeedState,
    /// The event at index `i` has feed position `i + 1`.
    events: Vec<FeedEvent>,
    /// Per subject, the indexes of its events; index `s - 1` has sequence `s`.
    subjects: BTreeMap<Subject, Vec<usize>>,
    readers: BTreeMap<String, FeedReader>,
    publishers: BTreeMap<String, PublisherCursor>,
}

impl MemoryFeedStore {
    pub fn new() -> MemoryFeedStore {
        MemoryFeedStore::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every mutation below happens after all its checks, with infallible pushes: a panic
        // cannot leave the state half-updated.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn feed(&self, feed: &FeedId) -> Result<&Feed, FeedError> {
        self.feeds
            .get(feed)
            .ok_or_else(|| FeedError::UnknownFeed(feed.clone()))
    }

    fn watch(&mut self, feed: &FeedId) -> &watch::Sender<FeedPosition> {
        self.watches
            .entry(feed.clone())
            .or_insert_with(|| watch::channel(FeedPosition::START).0)
    }
}

/// Takes events for one page: at most `limit`, stopping once the data reaches
/// `READ_PAGE_BYTES_MAX` (always at least one event).
fn page<'a>(events: impl Iterator<Item = &'a FeedEvent>, limit: u64) -> Vec<FeedEvent> {
    let mut bytes = 0usize;
    let mut out = Vec::new();
    for event in events.take(usize::try_from(limit).unwrap_or(usize::MAX)) {
        if !out.is_empty() && bytes + event.data.len() > READ_PAGE_BYTES_MAX {
            break;
        }
        bytes += event.data.len();
        out.push(event.clone());
    }
    out
}

fn index_after(after: u64) -> usize {
    usize::try_from(after).unwrap_or(usize::MAX)
}

#[async_trait]
impl FeedStore for MemoryFeedStore {
    async fn register(&self, feed: &FeedId) -> Result<FeedState, FeedError> {
        let mut state = self.state();
        let entry = state.feeds.entry(feed.clone()).or_insert_with(|| Feed {
            state: FeedState {
                feed: feed.clone(),
                status: FeedStatus::Backfilling,
                head: FeedPosition::START,
                cursor: Position::START,
                registered_at: now(),
                live_at: None,
            },
            events: Vec::new(),
            subjects: BTreeMap::new(),
            readers: BTreeMap::new(),
            publishers: BTreeMap::new(),
        });
        let registered = entry.state.clone();
        state.watch(feed);
        Ok(registered)
    }

    async fn feeds(&self) -> Result<Vec<FeedState>, FeedError> {
        Ok(self
            .state()
            .feeds
            .values()
            .map(|f| f.state.clone())
            .collect())
    }

    async fn feed(&self, feed: &FeedId) -> Result<Option<FeedState>, FeedError> {
        Ok(self.state().feeds.get(feed).map(|f| f.state.clone()))
    }

    async fn set_status(&self, feed: &FeedId, status: FeedStatus) -> Result<FeedState, FeedError> {
        let mut state = self.state();
        let entry = state
            .feeds
            .get_mut(feed)
            .ok_or_else(|| FeedError::UnknownFeed(feed.clone()))?;
        entry.state.status = status;
        if status == FeedStatus::Live && entry.state.live_at.is_none() {
            entry.state.live_at = Some(now());
        }
        Ok(entry.state.clone())
    }

    async fn commit(&self, feed: &FeedId, batch: ProjectorBatch) -> Result<FeedCommit, FeedError> {
        validate_batch(&batch)?;
        let mut state = self.state();
        let entry = state
            .feeds
            .get_mut(feed)
            .ok_or_else(|| FeedError::UnknownFeed(feed.clone()))?;
        if entry.state.cursor != batch.from {
            return Err(FeedError::CursorMoved {
                feed: feed.clone(),
                expected: batch.from,
                actual: entry.state.cursor,
            });
        }
        for projected in batch.events {
            let index = entry.events.len();
            let indexes = entry.subjects.entry(projected.subject.clone()).or_default();
            indexes.push(index);
            entry.events.push(FeedEvent {
                position: FeedPosition(index as u64 + 1),
                sequence: Sequence(indexes.len() as u64),
                id: projected.id,
                event_type: projected.event_type,
                subject: projected.subject,
                time: projected.time,
                data: projected.data,
                source_position: projected.source_position,
            });
        }
        entry.state.cursor = batch.to;
        entry.state.head = FeedPosition(entry.events.len() as u64);
        let commit = FeedCommit {
            head: entry.state.head,
            cursor: entry.state.cursor,
        };
        state.watch(feed).send_replace(commit.head);
        Ok(commit)
    }

    async fn read_feed(
        &self,
        feed: &FeedId,
        after: FeedPosition,
        limit: u64,
    ) -> Result<Vec<FeedEvent>, FeedError> {
        let limit = validate_feed_limit(limit)?;
        let state = self.state();
        let entry = state.feed(feed)?;
        let start = index_after(after.get()).min(entry.events.len());
        Ok(page(entry.events[start..].iter(), limit))
    }

    async fn subjects(
        &self,
        feed: &FeedId,
        after: Option<&Subject>,
        limit: u64,
    ) -> Result<Vec<SubjectHead>, FeedError> {
        let limit = validate_subject_limit(limit)?;
        let state = self.state();
        let entry = state.feed(feed)?;
        let lower = match after {
            Some(subject) => Bound::Excluded(subject.clone()),
            None => Bound::Unbounded,
        };
        Ok(entry
            .subjects
            .range((lower, Bound::Unbounded))
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .map(|(subject, indexes)| SubjectHead {
                subject: subject.clone(),
                sequence: Sequence(indexes.len() as u64),
            })
            .collect())
    }

    async fn read_subject(
        &self,
        feed: &FeedId,
        subject: &Subject,
        after: Sequence,
        limit: u64,
    ) -> Result<Vec<FeedEvent>, FeedError> {
        let limit = validate_feed_limit(limit)?;
        let state = self.state();
        let entry = state.feed(feed)?;
        let Some(indexes) = entry.subjects.get(subject) else {
            return Ok(Vec::new());
        };
        let start = index_after(after.get()).min(indexes.len());
        Ok(page(
            indexes[start..].iter().map(|&i| &entry.events[i]),
            limit,
        ))
    }

    fn watch_head(&self, feed: &FeedId) -> watch::Receiver<FeedPosition> {
        self.state().watch(feed).subscribe()
    }

    async fn record_readers(&self, seen: Vec<ReaderSeen>) -> Result<(), FeedError> {
        let mut state = self.state();
        for seen in seen {
            let Some(entry) = state.feeds.get_mut(&seen.feed) else {
                continue;
            };
            let reader = entry
                .readers
                .entry(seen.reader.clone())
                .or_insert_with(|| FeedReader {
                    reader: seen.reader,
                    first_read_at: seen.at,
                    last_read_at: seen.at,
                    reads: 0,
                });
            reader.last_read_at = reader.last_read_at.max(seen.at);
            reader.first_read_at = reader.first_read_at.min(seen.at);
            reader.reads = reader.reads.saturating_add(seen.reads);
        }
        Ok(())
    }

    async fn readers(&self, feed: &FeedId) -> Result<Vec<FeedReader>, FeedError> {
        let state = self.state();
        Ok(state.feed(feed)?.readers.values().cloned().collect())
    }

    async fn advance_publisher(
        &self,
        feed: &FeedId,
        publisher: &str,
        from: FeedPosition,
        to: FeedPosition,
    ) -> Result<PublisherCursor, FeedError> {
        let mut state = self.state();
        let entry = state
            .feeds
            .get_mut(feed)
            .ok_or_else(|| FeedError::UnknownFeed(feed.clone()))?;
        validate_publisher_advance(feed, publisher, from, to, entry.state.head)?;
        let actual = entry
            .publishers
            .get(publisher)
            .map_or(FeedPosition::START, |p| p.position);
        if actual != from {
            return Err(FeedError::PublisherMoved {
                feed: feed.clone(),
                publisher: publisher.to_owned(),
                expected: from,
                actual,
            });
        }
        let cursor = PublisherCursor {
            publisher: publisher.to_owned(),
            position: to,
            updated_at: now(),
        };
        entry
            .publishers
            .insert(publisher.to_owned(), cursor.clone());
        Ok(cursor)
    }

    async fn publishers(&self, feed: &FeedId) -> Result<Vec<PublisherCursor>, FeedError> {
        let state = self.state();
        Ok(state.feed(feed)?.publishers.values().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::MemoryFeedStore;
    use crate::conformance::FeedHarness;

    /// The memory feed store's "storage" is the shared state: reopening hands out another clone.
    struct Memory(MemoryFeedStore);

    impl FeedHarness for Memory {
        type Store = MemoryFeedStore;

        async fn open(&self) -> MemoryFeedStore {
            self.0.clone()
        }
    }

    crate::feed_conformance_suite!(Memory(MemoryFeedStore::new()));
}
