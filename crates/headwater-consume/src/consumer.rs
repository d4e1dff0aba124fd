//! The consumer's rules (G7, G8, G9): skip duplicates, heal gaps from upstream before applying,
//! bootstrap a subject on demand once, reconstitute what no delivery brought.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use headwater_core::{FeedId, Sequence, Subject};
use tokio::sync::watch;

use crate::IntegrationEvent;
use crate::metrics::{Counters, OpenGap};
use crate::upstream::{Upstream, UpstreamError};
use crate::view::{ViewError, ViewStore};

/// How many times a heal asks upstream before it gives up, by default.
pub const HEAL_ATTEMPTS_DEFAULT: u32 = 5;
/// The outcome of a bootstrap in progress, for the callers that wait for it.
type EnsureWatch = watch::Receiver<Option<Result<Sequence, String>>>;

/// Per-subject lock stripes.
const LOCK_STRIPES: usize = 256;
/// Events asked of upstream per page, by default.
pub const PAGE_EVENTS_DEFAULT: u64 = 1_000;

/// How a consumer behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerOptions {
    /// Times a heal or bootstrap asks a producer that is unavailable before it gives up (the
    /// subject is then left with an open gap; a later delivery or reconstitution heals it).
    pub heal_attempts: u32,
    /// The first wait between two attempts; doubled each time, capped at `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Events asked of upstream per page (1 ..= 10,000).
    pub page_events: u64,
}

impl Default for ConsumerOptions {
    fn default() -> ConsumerOptions {
        ConsumerOptions {
            heal_attempts: HEAL_ATTEMPTS_DEFAULT,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            page_events: PAGE_EVENTS_DEFAULT,
        }
    }
}

impl ConsumerOptions {
    #[must_use]
    pub fn with_heal_attempts(mut self, attempts: u32) -> ConsumerOptions {
        self.heal_attempts = attempts.max(1);
        self
    }

    #[must_use]
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> ConsumerOptions {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }

    #[must_use]
    pub fn with_page_events(mut self, events: u64) -> ConsumerOptions {
        self.page_events = events.clamp(1, 10_000);
        self
    }
}

/// What became of one delivered event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivery {
    /// Applied; `healed` events before it were fetched from upstream and applied first.
    Applied { healed: u64 },
    /// At or below the subject's cursor: already applied, skipped.
    Duplicate,
}

/// What one reconstitution walk found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reconstitution {
    /// Subjects listed by upstream.
    pub subjects: u64,
    /// Subjects whose head was ahead of the local cursor.
    pub behind: u64,
    /// Events fetched and applied.
    pub applied: u64,
    /// Subjects whose catch-up failed (the walk went on past them).
    pub failed: u64,
}

/// What a consumer did since it started (counters; `Consumer::stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ConsumerStats {
    /// Events applied to the view (delivered, healed, bootstrapped or reconstituted).
    pub applied: u64,
    /// Deliveries skipped as duplicates.
    pub duplicates: u64,
    /// Gaps seen (a delivery ahead of its subject's next sequence).
    pub gaps: u64,
    /// Events fetched from upstream to heal gaps.
    pub healed: u64,
    /// Bootstraps (`ensure`) that fetched.
    pub bootstraps: u64,
    /// Reconstitution walks completed, and events they applied.
    pub reconstitutions: u64,
    pub reconstituted: u64,
}

/// Open gaps listed one by one in [`Consumer::status`].
pub const STATUS_GAPS_MAX: usize = 100;

/// What [`Consumer::status`] shows.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ConsumerStatus {
    /// The feed consumed (`accounts.v1`).
    pub feed: String,
    pub stats: ConsumerStats,
    /// Subjects with a gap seen and not healed yet.
    pub open_gaps: u64,
    /// Gaps seen since the start while [`crate::OPEN_GAPS_TRACKED_MAX`] were open, so not
    /// tracked one by one (a reconstitution walk heals them like any other).
    pub untracked_gaps: u64,
    /// The oldest of them (at most [`STATUS_GAPS_MAX`]): each one's lag is `seen − cursor`.
    pub gaps: Vec<OpenGap>,
    /// Dead letters: parked subjects, letters without a subject, recorded and resolved
    /// (`Consumer::dead_letters` lists them).
    pub dead_letters: crate::DeadLetterStatus,
}

/// How long one long poll of the producer's feed waits for a first event.
pub const FEED_WAIT_DEFAULT: Duration = Duration::from_secs(20);

/// Why a delivery, a bootstrap or a walk did not complete. What was applied before stays
/// applied (each apply is its own transaction); nothing after it was.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumeError {
    /// The event is of another feed than this consumer's.
    #[error("an event of {got}, not of {expected}")]
    WrongFeed { expected: FeedId, got: FeedId },
    /// Upstream did not answer (after the configured attempts) or refused.
    #[error("healing from upstream: {0}")]
    Upstream(#[from] UpstreamError),
    /// Upstream answered events that do not continue the subject (a hole, another subject).
    #[error("upstream answered {subject} out of order: {detail}")]
    Inconsistent { subject: Subject, detail: String },
    /// The view store refused or failed.
    #[error(transparent)]
    View(#[from] ViewError),
}

/// A consumer of one feed: a view store it keeps, an upstream it heals from.
///
/// Deliveries of one subject are applied one at a time (a lock per subject); different subjects
/// go in parallel.
pub struct Consumer<V, U> {
    feed: FeedId,
    view: Arc<V>,
    upstream: Arc<U>,
    options: ConsumerOptions,
    /// Striped per-subject locks: a subject always takes the same stripe; memory stays bounded
    /// whatever the number of subjects.
    locks: Box<[tokio::sync::Mutex<()>]>,
    /// Bootstraps in progress: later callers for the same subject wait for the first one's.
    ensuring: Mutex<HashMap<Subject, EnsureWatch>>,
    counters: Counters,
    /// Dead letters: the parked subjects and counters (src/dead.rs).
    pub(crate) dead: crate::dead::DeadLetters,
}

impl<V, U> std::fmt::Debug for Consumer<V, U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("feed", &self.feed)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<V: ViewStore, U: Upstream> Consumer<V, U> {
    pub fn new(feed: FeedId, view: Arc<V>, upstream: Arc<U>, options: ConsumerOptions) -> Self {
        let counters = Counters::new(&feed);
        Consumer {
            feed,
            view,
            upstream,
            options,
            locks: (0..LOCK_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            ensuring: Mutex::new(HashMap::new()),
            counters,
            dead: crate::dead::DeadLetters::default(),
        }
    }

    pub fn feed(&self) -> &FeedId {
        &self.feed
    }

    pub fn view(&self) -> &Arc<V> {
        &self.view
    }

    /// Takes one event from any transport: skipped if the view has it, applied if it is next,
    /// and if it is further ahead, the events between are fetched from upstream and applied
    /// first, in order (G7).
    ///
    /// # Errors
    /// [`ConsumeError`]; on an error the event is not applied (a later delivery or a
    /// reconstitution brings it again).
    ///
    /// # Cancel safety
    /// Cancel safe in effect: each apply is one transaction of the view store; a cancelled
    /// delivery leaves the subject at some cursor, and delivering again continues from there.
    pub async fn deliver(&self, event: IntegrationEvent) -> Result<Delivery, ConsumeError> {
        if event.feed != self.feed {
            return Err(ConsumeError::WrongFeed {
                expected: self.feed.clone(),
                got: event.feed,
            });
        }
        let lock = self.lock_of(&event.subject);
        let _held = lock.lock().await;
        let subject = event.subject.clone();
        let cursor = self.view.cursor(&self.feed, &subject).await?;
        if event.sequence <= cursor {
            Counters::add(&self.counters.duplicates, 1);
            return Ok(Delivery::Duplicate);
        }
        let gap = (event.sequence.get() > cursor.get() + 1).then(|| {
            Counters::add(&self.counters.gaps, 1);
            self.counters.open.opened(&subject, cursor, event.sequence)
        });
        match self.deliver_after(event, subject.clone(), cursor).await {
            Ok(delivery) => {
                if let Some(detected) = gap {
                    crate::metrics::observe(&self.counters.heal_seconds, detected.elapsed());
                }
                Ok(delivery)
            }
            Err(e) => {
                if gap.is_some() {
                    Counters::add(&self.counters.heal_failures, 1);
                    let cursor = self
                        .view
                        .cursor(&self.feed, &subject)
                        .await
                        .unwrap_or(cursor);
                    self.counters.open.failed(&subject, cursor, &e);
                }
                Err(e)
            }
        }
    }

    /// Heals the gap before `event` (if any) and applies it; the subject's lock is held.
    async fn deliver_after(
        &self,
        event: IntegrationEvent,
        subject: Subject,
        cursor: Sequence,
    ) -> Result<Delivery, ConsumeError> {
        let mut healed = 0;
        let mut cursor = cursor;
        // Heal the gap, a page at a time.
        while cursor.get() + 1 < event.sequence.get() {
            let missing = event.sequence.get() - 1 - cursor.get();
            let page = self
                .fetch(&subject, cursor, missing.min(self.options.page_events))
                .await?;
            let Some(last) = page.last() else {
                return Err(ConsumeError::Inconsistent {
                    subject,
                    detail: format!(
                        "#{} was delivered but upstream has nothing after #{cursor:?}",
                        event.sequence.get()
                    ),
                });
            };
            let last = last.sequence;
            let page: Vec<_> = page
                .into_iter()
                .filter(|e| e.sequence < event.sequence)
                .collect();
            let applied = self.view.apply(&self.feed, &subject, &page).await?;
            if applied.cursor <= cursor && !page.is_empty() {
                return Err(stuck(&subject, cursor));
            }
            healed += applied.applied;
            Counters::add(&self.counters.healed, applied.applied);
            Counters::add(&self.counters.applied, applied.applied);
            cursor = applied.cursor;
            if last >= event.sequence {
                break;
            }
        }
        let applied = self
            .view
            .apply(&self.feed, &subject, std::slice::from_ref(&event))
            .await?;
        if applied.applied == 0 {
            Counters::add(&self.counters.duplicates, 1);
            return Ok(Delivery::Duplicate);
        }
        Counters::add(&self.counters.applied, 1);
        self.counters.open.reached(&subject, applied.cursor);
        if healed > 0 {
            tracing::debug!(feed = %self.feed, %subject, healed, "healed a gap");
        }
        Ok(Delivery::Applied { healed })
    }

    /// Makes sure the view has `subject` up to upstream's head: fetches and applies everything
    /// after the local cursor (G9: a subject the consumer never saw is bootstrapped whole).
    /// Concurrent calls for one subject share one fetch. Returns the subject's cursor.
    ///
    /// # Errors
    /// [`ConsumeError`] when upstream cannot be read or the view refuses.
    ///
    /// # Cancel safety
    /// Cancel safe: a caller that stops waiting does not stop the fetch of the others; if the
    /// first caller is cancelled, a later call starts over from the cursor.
    pub async fn ensure(&self, subject: &Subject) -> Result<Sequence, ConsumeError> {
        let (mine, mut waiting) = {
            let mut ensuring = self.ensuring.lock().unwrap_or_else(|e| e.into_inner());
            match ensuring.get(subject) {
                Some(running) => (None, running.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    ensuring.insert(subject.clone(), rx.clone());
                    (Some(tx), rx)
                }
            }
        };
        let Some(tx) = mine else {
            // Someone else fetches: wait for their answer.
            let answer = waiting
                .wait_for(Option::is_some)
                .await
                .map(|a| a.clone())
                .ok()
                .flatten();
            return match answer {
                Some(Ok(cursor)) => Ok(cursor),
                Some(Err(reason)) => {
                    Err(ConsumeError::Upstream(UpstreamError::Unavailable(reason)))
                }
                // The first caller was cancelled: do it ourselves.
                None => Box::pin(self.ensure(subject)).await,
            };
        };
        let _cleanup = Ensuring {
            map: &self.ensuring,
            subject,
        };
        let mut result = self.catch_up(subject).await;
        if let Ok((_, applied)) = &result {
            Counters::add(&self.counters.bootstraps, 1);
            Counters::add(&self.counters.applied, *applied);
        }
        // Dead letters: a success resolves the subject's, a failure retrying does not fix parks it.
        result = match result {
            Ok(done) => self.resolve_parked(subject).await.map(|()| done),
            Err(e) => match self.dead_letter_catch_up(subject, &e, "ensure").await {
                Ok(()) => Err(e),
                Err(view) => Err(view.into()),
            },
        };
        tx.send_replace(Some(
            result
                .as_ref()
                .map(|(cursor, _)| *cursor)
                .map_err(ToString::to_string),
        ));
        result.map(|(cursor, _)| cursor)
    }

    /// Walks every subject upstream lists (not only the known ones), compares each head with the
    /// local cursor and fetches what is behind (G8: the lost last event of a subject is found).
    /// One unpaced walk from the first subject, through [`crate::Walker`]'s code: a subject whose
    /// catch-up fails does not stop it. For a paced, resumable walk with progress and metrics,
    /// use a [`crate::Walker`].
    ///
    /// # Errors
    /// [`ConsumeError`] when upstream cannot be listed or read, or the view store fails; and,
    /// after the walk went through every other subject, the first subject that failed (upstream
    /// inconsistent, the handler refused). The subjects walked stay caught up.
    ///
    /// # Cancel safety
    /// Cancel safe: a later walk starts over and skips what is caught up.
    pub async fn reconstitute(&self) -> Result<Reconstitution, ConsumeError> {
        crate::walker::reconstitute(self).await
    }

    /// What this consumer did since it started.
    pub fn stats(&self) -> ConsumerStats {
        let c = &self.counters;
        let get = |a: &prometheus_client::metrics::counter::Counter| a.get();
        ConsumerStats {
            applied: get(&c.applied),
            duplicates: get(&c.duplicates),
            gaps: get(&c.gaps),
            healed: get(&c.healed),
            bootstraps: get(&c.bootstraps),
            reconstitutions: get(&c.reconstitutions),
            reconstituted: get(&c.reconstituted),
        }
    }

    /// Registers the consumer's metrics into `registry` (names prefixed `headwater_consumer_`,
    /// labelled with the feed): events applied, duplicates skipped, gaps detected, events healed,
    /// heals given up, heal latency (a histogram), open gaps and the events missing behind them,
    /// bootstraps, reconstitutions; dead letters recorded (by kind) and resolved, parked subjects.
    /// Register each consumer once.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.counters.register(registry);
        // Dead letters (src/dead.rs): recorded by kind, resolved, parked subjects.
        self.dead.register(&self.feed, registry);
    }

    /// A snapshot for an operator: the counters and the gaps seen and not healed yet (per
    /// subject: its cursor, the sequence seen beyond the gap, since when, failed heals), oldest
    /// first, at most [`STATUS_GAPS_MAX`].
    pub fn status(&self) -> ConsumerStatus {
        let (gaps, open_gaps, untracked_gaps) = self.counters.open.snapshot(STATUS_GAPS_MAX);
        ConsumerStatus {
            feed: self.feed.to_string(),
            stats: self.stats(),
            open_gaps,
            untracked_gaps,
            gaps,
            dead_letters: self.dead_letter_status(),
        }
    }

    /// The HTTP feed transport: long-polls the producer's feed from the saved feed position and
    /// delivers every event, until `stop` resolves. A producer that is down is waited for
    /// (capped backoff, for as long as it takes: the view keeps serving what it has); a delivery
    /// that cannot heal its gap yet (or that the view store failed to commit) is tried again, so
    /// nothing is skipped. An event that fails for a reason retrying does not fix (the handler
    /// refuses it, the producer's heal is refused or inconsistent) is dead-lettered and its
    /// subject parked ([`Consumer::handle_event`]); the other subjects go on. The feed position
    /// is saved after each page (a restart re-reads at most one page: duplicates, skipped).
    ///
    /// # Errors
    /// [`ConsumeError`] for what waiting cannot fix: the producer refuses to serve the feed (a
    /// bad token, an unknown or retired feed) or its page is not understood.
    ///
    /// # Cancel safety
    /// Cancel safe in effect (as [`Consumer::deliver`]); prefer `stop`, which saves the position.
    pub async fn follow_feed(
        &self,
        wait: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), ConsumeError> {
        tokio::pin!(stop);
        let mut after = self.view.feed_position(&self.feed).await?;
        let mut delay = self.options.backoff_min;
        loop {
            let page = tokio::select! {
                () = &mut stop => return Ok(()),
                page = self.upstream.read_feed(&self.feed, after, self.options.page_events, wait) => page,
            };
            let page = match page {
                Ok(page) => {
                    delay = self.options.backoff_min;
                    page
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(feed = %self.feed, error = %e, "the producer's feed is unavailable; waiting");
                    tokio::select! {
                        () = &mut stop => return Ok(()),
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(self.options.backoff_max);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let Some(last) = page.last().map(|e| e.position) else {
                continue;
            };
            // What simply continues its subject is applied in one transaction; the rest one by
            // one below (duplicates, gaps to heal, parked subjects).
            let page = self.apply_page(page).await;
            for event in page {
                loop {
                    // An event that fails for a reason retrying does not fix is dead-lettered
                    // (its subject parked), and the others go on.
                    match self.handle_event(event.clone(), None, "http").await {
                        Ok(_) => break,
                        Err(e) if crate::dead::is_transient(&e) => {
                            tracing::warn!(feed = %self.feed, subject = %event.subject, error = %e, "a gap cannot be healed yet or the view store failed; trying again");
                            tokio::select! {
                                () = &mut stop => return Ok(()),
                                () = tokio::time::sleep(self.options.backoff_max) => {}
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            after = last;
            self.view.save_feed_position(&self.feed, after).await?;
        }
    }

    /// Applies, in one `ViewStore::apply_many`, the events of `page` that continue their
    /// subject's cursor exactly (after any leading duplicates): one transaction — one commit —
    /// for a whole page where the view store can. Returns the events it left, in page order, for
    /// the one-by-one path: those of subjects with a gap, a parked subject, another feed, or all
    /// of them when the batch fails (they are then applied or dead-lettered one by one;
    /// duplicates of what the batch applied are skipped there).
    async fn apply_page(&self, page: Vec<IntegrationEvent>) -> Vec<IntegrationEvent> {
        if page.len() < 2 {
            return page;
        }
        let mut by_subject: std::collections::BTreeMap<Subject, Vec<IntegrationEvent>> =
            std::collections::BTreeMap::new();
        let mut rest = Vec::new();
        for event in page {
            if event.feed == self.feed {
                by_subject
                    .entry(event.subject.clone())
                    .or_default()
                    .push(event);
            } else {
                rest.push(event);
            }
        }
        // Hold every subject's lock stripe, taken in stripe order (no deadlock with another
        // page applying at once).
        let held = self.lock_subjects(by_subject.keys()).await;
        let mut batch = Vec::with_capacity(by_subject.len());
        for (subject, events) in by_subject {
            // A store that fails here fails again below, where the one-by-one path waits.
            let continues = match self.view.cursor(&self.feed, &subject).await {
                Ok(cursor) => {
                    crate::view::check_contiguous(&subject, cursor, &events).is_ok()
                        && matches!(self.parked_at(&subject).await, Ok(None))
                }
                Err(_) => false,
            };
            if continues {
                batch.push((subject, events));
            } else {
                rest.extend(events);
            }
        }
        if !batch.is_empty() {
            match self.view.apply_many(&self.feed, &batch).await {
                Ok(applied) => {
                    for ((subject, _), applied) in batch.iter().zip(&applied) {
                        Counters::add(&self.counters.applied, applied.applied);
                        Counters::add(&self.counters.duplicates, applied.duplicates);
                        self.counters.open.reached(subject, applied.cursor);
                    }
                }
                Err(error) => {
                    tracing::debug!(feed = %self.feed, %error, "a page could not be applied at once; applying its events one by one");
                    rest.extend(batch.into_iter().flat_map(|(_, events)| events));
                }
            }
        }
        drop(held);
        rest.sort_by_key(|e| e.position);
        rest
    }

    /// Fetches and applies everything of `subject` after its cursor, holding its lock.
    async fn catch_up(&self, subject: &Subject) -> Result<(Sequence, u64), ConsumeError> {
        let lock = self.lock_of(subject);
        let _held = lock.lock().await;
        self.catch_up_locked(subject).await
    }

    async fn catch_up_locked(&self, subject: &Subject) -> Result<(Sequence, u64), ConsumeError> {
        let mut cursor = self.view.cursor(&self.feed, subject).await?;
        let mut applied = 0;
        loop {
            let page = self
                .fetch(subject, cursor, self.options.page_events)
                .await?;
            if page.is_empty() {
                return Ok((cursor, applied));
            }
            let done = self.view.apply(&self.feed, subject, &page).await?;
            if done.cursor <= cursor {
                return Err(stuck(subject, cursor));
            }
            applied += done.applied;
            cursor = done.cursor;
            self.counters.open.reached(subject, cursor);
        }
    }

    /// One page of `subject` after `after` from upstream, retried while it is unavailable.
    async fn fetch(
        &self,
        subject: &Subject,
        after: Sequence,
        limit: u64,
    ) -> Result<Vec<IntegrationEvent>, ConsumeError> {
        let page = self
            .retrying(|| {
                self.upstream
                    .read_subject(&self.feed, subject, after, limit)
            })
            .await?;
        self.check_page(subject, after, &page)?;
        Ok(page)
    }

    /// Checks that a page upstream answered for `subject` after `after` continues it exactly.
    pub(crate) fn check_page(
        &self,
        subject: &Subject,
        after: Sequence,
        page: &[IntegrationEvent],
    ) -> Result<(), ConsumeError> {
        for (expected, event) in (after.get() + 1..).zip(page.iter()) {
            if &event.subject != subject
                || event.sequence.get() != expected
                || event.feed != self.feed
            {
                return Err(ConsumeError::Inconsistent {
                    subject: subject.clone(),
                    detail: format!(
                        "asked for what follows #{}, got {} #{} of {}",
                        after.get(),
                        event.subject,
                        event.sequence.get(),
                        event.feed
                    ),
                });
            }
        }
        Ok(())
    }

    /// Runs `call` until it succeeds, fails for good, or the attempts are spent.
    pub(crate) async fn retrying<T, F, Fut>(&self, call: F) -> Result<T, UpstreamError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, UpstreamError>>,
    {
        let mut delay = self.options.backoff_min;
        let mut attempt = 1;
        loop {
            match call().await {
                Ok(answer) => return Ok(answer),
                Err(e) if e.is_transient() && attempt < self.options.heal_attempts => {
                    tracing::debug!(feed = %self.feed, attempt, error = %e, "upstream unavailable; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.options.backoff_max);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn lock_of(&self, subject: &Subject) -> &tokio::sync::Mutex<()> {
        &self.locks[self.stripe_of(subject)]
    }

    fn stripe_of(&self, subject: &Subject) -> usize {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        subject.hash(&mut hasher);
        usize::try_from(hasher.finish() % LOCK_STRIPES as u64).unwrap_or(0)
    }
}

/// A view store that applied events without moving the cursor past them: asking again would
/// loop forever.
fn stuck(subject: &Subject, cursor: Sequence) -> ConsumeError {
    ConsumeError::View(ViewError::NotContiguous {
        subject: subject.clone(),
        cursor,
        detail: "the view store applied events but its cursor did not move".into(),
    })
}

/// Removes a finished (or cancelled) bootstrap from the map.
struct Ensuring<'a> {
    map: &'a Mutex<HashMap<Subject, EnsureWatch>>,
    subject: &'a Subject,
}

impl Drop for Ensuring<'_> {
    fn drop(&mut self) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(self.subject);
    }
}

// ---- For the reconstitution walker (src/walker.rs) ----

impl<V: ViewStore, U: Upstream> Consumer<V, U> {
    pub(crate) fn upstream(&self) -> &U {
        &self.upstream
    }

    pub(crate) fn options(&self) -> &ConsumerOptions {
        &self.options
    }

    /// Counts events a walk applied to `subject`, which is now at `cursor`.
    pub(crate) fn count_walked(&self, subject: &Subject, cursor: Sequence, applied: u64) {
        Counters::add(&self.counters.applied, applied);
        Counters::add(&self.counters.reconstituted, applied);
        self.counters.open.reached(subject, cursor);
    }

    /// Counts a walk that went through every subject.
    pub(crate) fn count_walk(&self) {
        Counters::add(&self.counters.reconstitutions, 1);
    }

    /// Takes the lock stripes of `subjects`, in stripe order (as `apply_page` does: no
    /// deadlock with it or with another taker).
    pub(crate) async fn lock_subjects<'a>(
        &self,
        subjects: impl Iterator<Item = &'a Subject>,
    ) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = subjects.map(|s| self.stripe_of(s)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut held = Vec::with_capacity(stripes.len());
        for stripe in stripes {
            held.push(self.locks[stripe].lock().await);
        }
        held
    }
}
