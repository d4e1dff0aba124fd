//! In memory: a view for tests and examples, and a producer to heal from.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use headwater_core::{FeedId, Sequence, Subject};

use crate::IntegrationEvent;
use crate::upstream::{SubjectHead, Upstream, UpstreamError};
use crate::view::{Applied, ViewError, ViewStore, check_contiguous, check_mark};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
type Handler<S> = dyn Fn(&mut S, &IntegrationEvent) -> Result<(), BoxError> + Send + Sync;

/// A view of state `S` in memory, changed by `handler` one event at a time. An apply works on a
/// copy of the state and swaps it in with the cursor, so a handler that fails halfway leaves
/// nothing behind.
pub struct MemoryView<S> {
    inner: Mutex<Inner<S>>,
    handler: Box<Handler<S>>,
}

struct Inner<S> {
    state: S,
    cursors: BTreeMap<(FeedId, Subject), Sequence>,
    positions: BTreeMap<FeedId, u64>,
    marks: BTreeMap<String, String>,
    dead: crate::dead::DeadLetterBook,
}

impl<S> std::fmt::Debug for MemoryView<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryView").finish_non_exhaustive()
    }
}

impl<S: Clone + Send + 'static> MemoryView<S> {
    pub fn new(
        initial: S,
        handler: impl Fn(&mut S, &IntegrationEvent) -> Result<(), BoxError> + Send + Sync + 'static,
    ) -> MemoryView<S> {
        MemoryView {
            inner: Mutex::new(Inner {
                state: initial,
                cursors: BTreeMap::new(),
                positions: BTreeMap::new(),
                marks: BTreeMap::new(),
                dead: crate::dead::DeadLetterBook::default(),
            }),
            handler: Box::new(handler),
        }
    }

    /// Reads the view.
    pub fn read<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        f(&self.lock().state)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<S>> {
        // Every mutation happens after the handler succeeded on a copy: a panic cannot leave the
        // state half-updated.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl<S: Clone + Send + Sync + 'static> ViewStore for MemoryView<S> {
    async fn cursor(&self, feed: &FeedId, subject: &Subject) -> Result<Sequence, ViewError> {
        Ok(self
            .lock()
            .cursors
            .get(&(feed.clone(), subject.clone()))
            .copied()
            .unwrap_or(Sequence::START))
    }

    async fn apply(
        &self,
        feed: &FeedId,
        subject: &Subject,
        events: &[IntegrationEvent],
    ) -> Result<Applied, ViewError> {
        let mut inner = self.lock();
        let key = (feed.clone(), subject.clone());
        let cursor = inner.cursors.get(&key).copied().unwrap_or(Sequence::START);
        let duplicates = check_contiguous(subject, cursor, events)?;
        let new = &events[duplicates..];
        let Some(last) = new.last() else {
            return Ok(Applied {
                cursor,
                applied: 0,
                duplicates: duplicates as u64,
            });
        };
        let mut state = inner.state.clone();
        for event in new {
            (self.handler)(&mut state, event).map_err(|e| ViewError::Handler {
                subject: subject.clone(),
                sequence: event.sequence,
                reason: e.to_string(),
            })?;
        }
        inner.state = state;
        inner.cursors.insert(key, last.sequence);
        Ok(Applied {
            cursor: last.sequence,
            applied: new.len() as u64,
            duplicates: duplicates as u64,
        })
    }

    async fn apply_many(
        &self,
        feed: &FeedId,
        batches: &[(Subject, Vec<IntegrationEvent>)],
    ) -> Result<Vec<Applied>, ViewError> {
        crate::view::apply_each(self, feed, batches).await
    }

    async fn cursors(
        &self,
        feed: &FeedId,
        after: Option<&Subject>,
        limit: u64,
    ) -> Result<Vec<(Subject, Sequence)>, ViewError> {
        let inner = self.lock();
        Ok(inner
            .cursors
            .iter()
            .filter(|((f, s), _)| f == feed && after.is_none_or(|a| s > a))
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .map(|((_, s), c)| (s.clone(), *c))
            .collect())
    }

    async fn feed_position(&self, feed: &FeedId) -> Result<u64, ViewError> {
        Ok(self.lock().positions.get(feed).copied().unwrap_or(0))
    }

    async fn save_feed_position(&self, feed: &FeedId, position: u64) -> Result<(), ViewError> {
        let mut inner = self.lock();
        let saved = inner.positions.entry(feed.clone()).or_default();
        *saved = (*saved).max(position);
        Ok(())
    }

    // --- Marks ---

    async fn mark(&self, key: &str) -> Result<Option<String>, ViewError> {
        check_mark(key, None)?;
        Ok(self.lock().marks.get(key).cloned())
    }

    async fn set_mark(&self, key: &str, value: Option<&str>) -> Result<(), ViewError> {
        check_mark(key, value)?;
        let mut inner = self.lock();
        match value {
            Some(value) => inner.marks.insert(key.to_owned(), value.to_owned()),
            None => inner.marks.remove(key),
        };
        Ok(())
    }

    // --- Dead letters ---

    async fn record_dead_letter(
        &self,
        letter: &crate::dead::NewDeadLetter,
    ) -> Result<u64, ViewError> {
        Ok(self.lock().dead.record(letter))
    }

    async fn dead_letters(
        &self,
        feed: &FeedId,
        after: u64,
        limit: u64,
    ) -> Result<Vec<crate::dead::DeadLetter>, ViewError> {
        Ok(self.lock().dead.list(feed, after, limit))
    }

    async fn resolve_dead_letters(
        &self,
        feed: &FeedId,
        subject: &Subject,
        through: Sequence,
    ) -> Result<u64, ViewError> {
        Ok(self.lock().dead.resolve(feed, subject, through))
    }

    async fn discard_dead_letter(&self, feed: &FeedId, id: u64) -> Result<bool, ViewError> {
        Ok(self.lock().dead.discard(feed, id))
    }
}

/// A producer in memory: its feed's events, answered as the feed API would. It can be taken
/// down (every call is `Unavailable`) and counts the calls, for tests.
#[derive(Debug, Default)]
pub struct MemoryUpstream {
    events: Mutex<BTreeMap<FeedId, Vec<IntegrationEvent>>>,
    down: AtomicBool,
    calls: AtomicU64,
    /// How long each answer takes (tests of concurrent callers).
    delay: Mutex<Duration>,
    /// Wakes long polls when an event is pushed.
    pushed: tokio::sync::Notify,
}

impl MemoryUpstream {
    pub fn new() -> MemoryUpstream {
        MemoryUpstream::default()
    }

    /// Adds the next event of its feed (its `position` and `sequence` as given).
    pub fn push(&self, event: IntegrationEvent) {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.entry(event.feed.clone()).or_default().push(event);
        drop(events);
        self.pushed.notify_waiters();
    }

    /// Takes the producer down (`true`) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Makes each answer take `delay`.
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap_or_else(|e| e.into_inner()) = delay;
    }

    async fn wait(&self) {
        let delay = *self.delay.lock().unwrap_or_else(|e| e.into_inner());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    /// Calls answered or refused so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    fn answer<T>(
        &self,
        feed: &FeedId,
        f: impl FnOnce(&[IntegrationEvent]) -> T,
    ) -> Result<T, UpstreamError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(UpstreamError::Unavailable("the producer is down".into()));
        }
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        Ok(f(events.get(feed).map_or(&[][..], Vec::as_slice)))
    }
}

fn take(limit: u64) -> usize {
    usize::try_from(limit).unwrap_or(usize::MAX)
}

#[async_trait]
impl Upstream for MemoryUpstream {
    async fn read_subject(
        &self,
        feed: &FeedId,
        subject: &Subject,
        after: Sequence,
        limit: u64,
    ) -> Result<Vec<IntegrationEvent>, UpstreamError> {
        self.wait().await;
        self.answer(feed, |events| {
            events
                .iter()
                .filter(|e| &e.subject == subject && e.sequence > after)
                .take(take(limit))
                .cloned()
                .collect()
        })
    }

    async fn subjects(
        &self,
        feed: &FeedId,
        after: Option<&Subject>,
        limit: u64,
    ) -> Result<Vec<SubjectHead>, UpstreamError> {
        self.wait().await;
        self.answer(feed, |events| {
            let mut heads: BTreeMap<&Subject, Sequence> = BTreeMap::new();
            for event in events {
                let head = heads.entry(&event.subject).or_default();
                *head = (*head).max(event.sequence);
            }
            heads
                .into_iter()
                .filter(|(s, _)| after.is_none_or(|a| *s > a))
                .take(take(limit))
                .map(|(subject, sequence)| SubjectHead {
                    subject: subject.clone(),
                    sequence,
                })
                .collect()
        })
    }

    async fn read_feed(
        &self,
        feed: &FeedId,
        after: u64,
        limit: u64,
        wait: Duration,
    ) -> Result<Vec<IntegrationEvent>, UpstreamError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so that a push in between is not missed.
            let pushed = self.pushed.notified();
            tokio::pin!(pushed);
            pushed.as_mut().enable();
            let page = self.answer(feed, |events| {
                events
                    .iter()
                    .filter(|e| e.position > after)
                    .take(take(limit))
                    .cloned()
                    .collect::<Vec<_>>()
            })?;
            if !page.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(page);
            }
            if tokio::time::timeout_at(deadline, pushed).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    // --- The producer's feed listing (the v1 → v2 switch) ---

    /// `live` with its last position when the feed holds events; `None` otherwise.
    async fn feed_listing(
        &self,
        feed: &FeedId,
    ) -> Result<Option<crate::upstream::FeedListing>, UpstreamError> {
        self.answer(feed, |events| {
            events.last().map(|last| crate::upstream::FeedListing {
                feed: feed.clone(),
                status: headwater_core::FeedStatus::Live,
                head: last.position,
                readers: Vec::new(),
            })
        })
    }
}
