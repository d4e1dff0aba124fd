//! The reconstitution walker (G8): pages through the producer's subject listing — every subject,
//! not only the ones this consumer knows — compares each head with the local cursor and fetches
//! what is behind. It finds the lost *last* event of a subject, which no later delivery reveals.
//!
//! - **Paced**: a rate limit on the requests a walk makes of the producer (listing pages and
//!   subject pages, retries included), `requests_per_second` with a small burst; off with
//!   [`WalkerOptions::unpaced`].
//! - **Resumable**: after each listing page the last subject walked is saved in the view store
//!   (`ViewStore::set_mark("walk/{feed}")`); a walk that was interrupted — the process killed or
//!   cancelled, the producer down for longer than the retries — resumes after it; a walk that
//!   went through every subject clears it.
//! - **Failure-tolerant**: a subject whose catch-up fails (upstream answers out of order, the
//!   handler refuses an event) is counted and logged, and the walk goes on.
//! - **One at a time**: walks never overlap. The periodic runner ([`Walker::run`]) walks at
//!   start and every `every`; an on-demand request ([`Walker::request`], `POST /reconstitute`)
//!   is served by the next walk that *starts* after it — at once when none runs, right after the
//!   running one otherwise; all requests made during one walk share that one next walk.
//! - **Observable**: a watch of [`WalkerStatus`] (the running walk's [`WalkProgress`], the last
//!   one's result), Prometheus metrics ([`Walker::register_metrics`]), admin routes
//!   ([`walker_router`]).

mod admin;
mod pace;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use headwater_core::{Sequence, Subject};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

pub use admin::{RECONSTITUTE_ROUTE, WalkControl, WalkerNotRunning, walker_router};
use pace::Pace;

use crate::IntegrationEvent;
use crate::consumer::{ConsumeError, Consumer, Reconstitution};
use crate::upstream::{SubjectHead, Upstream, UpstreamError};
use crate::view::{ViewError, ViewStore};

/// Upstream requests per second a walker makes by default: listing pages and subject pages.
pub const WALK_REQUESTS_PER_SECOND_DEFAULT: u32 = 100;
/// Requests a walker may make at once after a pause, by default.
pub const WALK_BURST_REQUESTS_DEFAULT: u32 = 10;
/// Subjects asked of upstream per listing page, by default.
pub const WALK_PAGE_SUBJECTS_DEFAULT: u64 = 1_000;
/// The largest listing page a walker asks for.
pub const WALK_PAGE_SUBJECTS_MAX: u64 = 10_000;
/// How soon the runner tries again after a walk was interrupted (capped by its period).
pub const WALK_RETRY_AFTER_INTERRUPTION: Duration = Duration::from_secs(30);
/// Events a walk applies in one batch (one `apply_many`, one transaction where the view store
/// can): bounds the memory a batch holds.
pub const WALK_BATCH_EVENTS_MAX: usize = 10_000;
/// Subjects behind whose first page a walk asks for at once, by default.
pub const WALK_FETCHES_AT_ONCE_DEFAULT: usize = 8;
/// The most subjects' first pages a walk asks for at once.
pub const WALK_FETCHES_AT_ONCE_MAX: usize = 64;
/// How long fetched pages wait to be applied in one batch at most.
pub const WALK_BATCH_LINGER: Duration = Duration::from_millis(100);
/// Failing subjects a walk logs one by one; past it, only the walk's summary counts them.
const FAILURES_LOGGED_MAX: u64 = 10;

/// The key of a feed's walk mark in the view store: the last subject walked.
fn mark_key(feed: &headwater_core::FeedId) -> String {
    format!("walk/{feed}")
}

/// How a walker walks.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WalkerOptions {
    /// Requests to the producer per second (listing pages and subject pages, retries
    /// included); `None`: as fast as the producer answers.
    pub requests_per_second: Option<NonZeroU32>,
    /// Requests allowed at once after a pause (at least 1).
    pub burst: u32,
    /// Subjects per listing page (1 ..= [`WALK_PAGE_SUBJECTS_MAX`]); the resume point is saved
    /// after each page.
    pub page_subjects: u64,
    /// Subjects behind whose first page is asked for at once (1 ..=
    /// [`WALK_FETCHES_AT_ONCE_MAX`]); each request still waits for the pace.
    pub fetches_at_once: usize,
}

impl Default for WalkerOptions {
    fn default() -> WalkerOptions {
        WalkerOptions {
            requests_per_second: NonZeroU32::new(WALK_REQUESTS_PER_SECOND_DEFAULT),
            burst: WALK_BURST_REQUESTS_DEFAULT,
            page_subjects: WALK_PAGE_SUBJECTS_DEFAULT,
            fetches_at_once: WALK_FETCHES_AT_ONCE_DEFAULT,
        }
    }
}

impl WalkerOptions {
    /// Paced at `requests_per_second`, `burst` at once after a pause.
    #[must_use]
    pub fn with_pace(mut self, requests_per_second: NonZeroU32, burst: u32) -> WalkerOptions {
        self.requests_per_second = Some(requests_per_second);
        self.burst = burst.max(1);
        self
    }

    /// Not paced: as fast as the producer answers (benchmarks, a producer of one's own).
    #[must_use]
    pub fn unpaced(mut self) -> WalkerOptions {
        self.requests_per_second = None;
        self
    }

    #[must_use]
    pub fn with_page_subjects(mut self, subjects: u64) -> WalkerOptions {
        self.page_subjects = subjects.clamp(1, WALK_PAGE_SUBJECTS_MAX);
        self
    }

    #[must_use]
    pub fn with_fetches_at_once(mut self, fetches: usize) -> WalkerOptions {
        self.fetches_at_once = fetches.clamp(1, WALK_FETCHES_AT_ONCE_MAX);
        self
    }
}

/// What started a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WalkTrigger {
    /// The periodic runner's schedule (and its first walk, at start).
    Periodic,
    /// An on-demand request ([`Walker::request`], `POST /reconstitute`).
    Requested,
    /// A direct call of [`Walker::walk`].
    Direct,
}

/// Where a walk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WalkState {
    Running,
    /// Went through every subject (some may have failed: `failed`).
    Finished,
    /// Stopped by an error (the producer down past the retries, refusing, the view store
    /// failing); the next walk resumes after the last page walked.
    Interrupted,
    /// Stopped by its caller or the runner's stop; the next walk resumes after the last page.
    Cancelled,
}

/// One walk, as it goes and as it ended. Serialized as the admin routes and `/status` show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct WalkProgress {
    /// 1, 2, 3 … in the order walks started since the walker was made.
    pub id: u64,
    pub trigger: WalkTrigger,
    pub state: WalkState,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub finished_at: Option<String>,
    /// The subject an interrupted walk had reached: this walk lists the subjects after it.
    pub resumed_after: Option<String>,
    /// Subjects listed so far.
    pub listed: u64,
    /// Subjects whose head was ahead of the local cursor.
    pub behind: u64,
    /// Events fetched and applied.
    pub applied: u64,
    /// Subjects whose catch-up failed (logged; the walk went on).
    pub failed: u64,
    /// Requests made of the producer.
    pub requests: u64,
    /// The subject being caught up, or the last one listed.
    pub current: Option<String>,
    pub elapsed_seconds: f64,
    /// Subjects listed per second of this walk.
    pub subjects_per_second: f64,
    /// Why the walk was interrupted.
    pub error: Option<String>,
    #[serde(skip)]
    started: Instant,
    /// The resume point saved in the view store as of now.
    #[serde(skip)]
    mark: Option<String>,
}

impl WalkProgress {
    fn new(id: u64, trigger: WalkTrigger) -> WalkProgress {
        WalkProgress {
            id,
            trigger,
            state: WalkState::Running,
            started_at: crate::metrics::rfc3339_text(SystemTime::now()),
            finished_at: None,
            resumed_after: None,
            listed: 0,
            behind: 0,
            applied: 0,
            failed: 0,
            requests: 0,
            current: None,
            elapsed_seconds: 0.0,
            subjects_per_second: 0.0,
            error: None,
            started: Instant::now(),
            mark: None,
        }
    }

    fn tick(&mut self) {
        self.elapsed_seconds = self.started.elapsed().as_secs_f64();
        #[allow(clippy::cast_precision_loss)]
        let listed = self.listed as f64;
        self.subjects_per_second = if self.elapsed_seconds > 0.0 {
            listed / self.elapsed_seconds
        } else {
            0.0
        };
    }

    fn end(&mut self, state: WalkState, error: Option<String>) {
        self.tick();
        self.state = state;
        self.error = error;
        self.finished_at = Some(crate::metrics::rfc3339_text(SystemTime::now()));
    }
}

/// A walker's state: what the watch of [`Walker::watch`] holds, `GET /reconstitute` answers and
/// `/status` shows.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct WalkerStatus {
    /// The feed walked (`accounts.v1`).
    pub feed: String,
    /// The walk in progress.
    pub running: Option<WalkProgress>,
    /// The last walk that ended (finished, interrupted or cancelled).
    pub last: Option<WalkProgress>,
    /// An on-demand walk is asked for and starts when the running one ends.
    pub requested: bool,
    /// Walks started since the walker was made (the id of the latest).
    pub walks: u64,
    /// Whether the runner ([`Walker::run`]) runs: on-demand requests need it.
    pub runner: bool,
    /// The runner's period, when it walks periodically.
    pub every_seconds: Option<f64>,
    /// The pace; `None`: unpaced.
    pub requests_per_second: Option<u32>,
    /// Where the next walk resumes (an interrupted walk's last subject), as of the last walk's
    /// end.
    pub resume_after: Option<String>,
}

/// What one walk went through, step by step (metrics and progress follow it).
enum Step<'a> {
    Resumed(&'a Subject),
    Request,
    Listed {
        subjects: u64,
        last: &'a Subject,
    },
    Behind(&'a Subject),
    Applied(u64),
    Failed(&'a Subject),
    /// The resume point was saved: the last subject of the page walked.
    Saved(&'a Subject),
}

/// What a walk found; the caller turns it into a report.
#[derive(Default)]
struct Tally {
    listed: u64,
    behind: u64,
    applied: u64,
    failed: u64,
    first_failure: Option<ConsumeError>,
}

/// How a walk goes.
struct Plan<'a> {
    pace: Option<&'a Pace>,
    page_subjects: u64,
    /// Subjects' first pages asked for at once (at least 1).
    fetches_at_once: usize,
    /// Start after the saved mark and keep it up to date.
    resumable: bool,
}

/// One walk over `consumer`'s feed.
///
/// # Cancel safety
/// Cancel safe in effect: each apply is a transaction of the view store, and the mark is only
/// saved after the page it names; a cancelled walk resumes after the last saved page.
async fn walk<V: ViewStore, U: Upstream>(
    consumer: &Consumer<V, U>,
    plan: &Plan<'_>,
    on: &mut (dyn FnMut(Step<'_>) + Send),
) -> Result<Tally, ConsumeError> {
    let feed = consumer.feed();
    let view = consumer.view();
    let key = mark_key(feed);
    let mut after: Option<Subject> = None;
    let mark = if plan.resumable {
        view.mark(&key).await?
    } else {
        None
    };
    if let Some(mark) = mark {
        match Subject::new(mark) {
            Ok(subject) => {
                on(Step::Resumed(&subject));
                after = Some(subject);
            }
            Err(error) => {
                tracing::warn!(%feed, %error, "the walk's resume mark is not a subject; walking from the first subject");
            }
        }
    }
    let mut tally = Tally::default();
    let requests = AtomicU64::new(0);
    loop {
        let heads = consumer
            .retrying(|| async {
                if let Some(pace) = plan.pace {
                    pace.ready().await;
                }
                requests.fetch_add(1, Ordering::Relaxed);
                consumer
                    .upstream()
                    .subjects(feed, after.as_ref(), plan.page_subjects)
                    .await
            })
            .await;
        for _ in 0..requests.swap(0, Ordering::Relaxed) {
            on(Step::Request);
        }
        let heads = heads?;
        let Some(last) = heads.last().map(|h| h.subject.clone()) else {
            break;
        };
        // A listing that does not move forward would loop for ever.
        let mut previous = after.as_ref();
        for head in &heads {
            if previous.is_some_and(|p| &head.subject <= p) {
                return Err(ConsumeError::Inconsistent {
                    subject: head.subject.clone(),
                    detail: format!(
                        "the subject listing is not in increasing order (after {})",
                        previous.map_or("", Subject::as_str)
                    ),
                });
            }
            previous = Some(&head.subject);
        }
        let cursors = local_cursors(consumer, after.as_ref(), &last, plan.page_subjects).await?;
        on(Step::Listed {
            subjects: heads.len() as u64,
            last: &last,
        });
        tally.listed += heads.len() as u64;
        let behind: Vec<(&SubjectHead, Sequence)> = heads
            .iter()
            .map(|head| {
                let cursor = cursors
                    .get(&head.subject)
                    .copied()
                    .unwrap_or(Sequence::START);
                (head, cursor)
            })
            .filter(|(head, cursor)| head.sequence > *cursor)
            .collect();
        walk_behind(consumer, plan, &behind, &requests, &mut tally, on).await?;
        if plan.resumable {
            view.set_mark(&key, Some(last.as_str())).await?;
            on(Step::Saved(&last));
        }
        after = Some(last);
    }
    if plan.resumable {
        view.set_mark(&key, None).await?;
    }
    consumer.count_walk();
    if tally.behind > 0 || tally.failed > 0 {
        tracing::info!(%feed, subjects = tally.listed, behind = tally.behind, applied = tally.applied, failed = tally.failed, "reconstitution found events no delivery brought");
    }
    Ok(tally)
}

/// Catches up the subjects of `behind` (each with its cursor as of the listing), in batches:
/// fetches the first page of each (paced) and applies a batch of them in one
/// [`ViewStore::apply_many`] — one transaction where the view store can — under their locks,
/// then goes on with the subjects that page did not bring to their listed head. A batch is
/// applied when it holds [`WALK_BATCH_EVENTS_MAX`] events, when it is [`WALK_BATCH_LINGER`] old
/// (also while a slow fetch is under way: what was fetched does not wait for the producer), and
/// at the end of the listing page. A batch the view store refuses as a whole is applied subject
/// by subject, to find the one that fails.
async fn walk_behind<'h, V: ViewStore, U: Upstream>(
    consumer: &Consumer<V, U>,
    plan: &Plan<'_>,
    behind: &'h [(&'h SubjectHead, Sequence)],
    requests: &AtomicU64,
    tally: &mut Tally,
    on: &mut (dyn FnMut(Step<'_>) + Send),
) -> Result<(), ConsumeError> {
    use futures_util::StreamExt;
    let mut batch = Batch::default();
    // The first pages, fetched several at once (each request paced), answered in walk order.
    // Boxed: the futures' type then names no closure (rustc cannot prove a closure's future
    // `Send` for every lifetime here).
    let mut waiting = behind.iter();
    let mut fetches: futures_util::stream::FuturesOrdered<Fetch<'_>> =
        futures_util::stream::FuturesOrdered::new();
    loop {
        if batch.events >= WALK_BATCH_EVENTS_MAX
            || batch.due.is_some_and(|due| due <= Instant::now())
        {
            batch.flush(consumer, plan, requests, tally, on).await?;
        }
        while fetches.len() < plan.fetches_at_once {
            let Some(&(head, cursor)) = waiting.next() else {
                break;
            };
            let pace = plan.pace;
            fetches.push_back(Box::pin(async move {
                let page = first_page(consumer, head, cursor, pace, requests).await;
                (head, cursor, page)
            }));
        }
        let next = match batch.due {
            None => fetches.next().await,
            Some(due) => {
                tokio::select! {
                    biased;
                    next = fetches.next() => next,
                    () = tokio::time::sleep_until(due) => {
                        batch.flush(consumer, plan, requests, tally, on).await?;
                        fetches.next().await
                    }
                }
            }
        };
        let Some((head, cursor, page)) = next else {
            break;
        };
        tally.behind += 1;
        on(Step::Behind(&head.subject));
        for _ in 0..requests.swap(0, Ordering::Relaxed) {
            on(Step::Request);
        }
        match page {
            Ok(page) => batch.push(head, cursor, page),
            Err(error) if fails_one_subject(&error) => batch.fetched.push((head, Err(error))),
            Err(error) => return Err(error),
        }
    }
    batch.flush(consumer, plan, requests, tally, on).await
}

/// A subject's first page being fetched, with its head and cursor as of the listing.
type Fetch<'a> = std::pin::Pin<
    Box<
        dyn Future<
                Output = (
                    &'a SubjectHead,
                    Sequence,
                    Result<Vec<IntegrationEvent>, ConsumeError>,
                ),
            > + Send
            + 'a,
    >,
>;

/// Subjects' first pages fetched by a walk and not applied yet.
#[derive(Default)]
struct Batch<'h> {
    pages: Vec<(Subject, Vec<IntegrationEvent>)>,
    /// Per page: its subject's head and cursor as of the listing.
    heads: Vec<(&'h SubjectHead, Sequence)>,
    /// Per subject, in walk order: its place in `pages`, or why its page could not be had.
    fetched: Vec<(&'h SubjectHead, Result<usize, ConsumeError>)>,
    events: usize,
    /// When the batch is to be applied however small: [`WALK_BATCH_LINGER`] after its first page.
    due: Option<Instant>,
}

impl<'h> Batch<'h> {
    fn push(&mut self, head: &'h SubjectHead, cursor: Sequence, page: Vec<IntegrationEvent>) {
        self.events += page.len();
        self.fetched.push((head, Ok(self.pages.len())));
        self.pages.push((head.subject.clone(), page));
        self.heads.push((head, cursor));
        self.due
            .get_or_insert_with(|| Instant::now() + WALK_BATCH_LINGER);
    }

    /// Applies the batch and settles each of its subjects, in walk order; empties it.
    async fn flush<V: ViewStore, U: Upstream>(
        &mut self,
        consumer: &Consumer<V, U>,
        plan: &Plan<'_>,
        requests: &AtomicU64,
        tally: &mut Tally,
        on: &mut (dyn FnMut(Step<'_>) + Send),
    ) -> Result<(), ConsumeError> {
        let Batch {
            pages,
            heads,
            fetched,
            ..
        } = std::mem::take(self);
        let mut results: Vec<Option<Result<crate::view::Applied, ConsumeError>>> =
            apply_batch(consumer, &pages, &heads)
                .await
                .into_iter()
                .map(Some)
                .collect();
        for (head, slot) in fetched {
            let outcome = match slot {
                Err(error) => Err(error),
                Ok(index) => {
                    let page = &pages[index].1;
                    match results[index].take() {
                        None => continue,
                        Some(Err(error)) => Err(error),
                        Some(Ok(done)) if page.last().is_some_and(|e| done.cursor < e.sequence) => {
                            Err(ConsumeError::View(ViewError::NotContiguous {
                                subject: head.subject.clone(),
                                cursor: done.cursor,
                                detail: "the view store applied events but its cursor did not \
                                         move past them"
                                    .into(),
                            }))
                        }
                        Some(Ok(done)) => {
                            consumer.count_walked(&head.subject, done.cursor, done.applied);
                            on(Step::Applied(done.applied));
                            if done.cursor < head.sequence {
                                // Behind by more than a page: the rest, a page at a time.
                                let more = catch_up(consumer, head, plan.pace, requests, on).await;
                                for _ in 0..requests.swap(0, Ordering::Relaxed) {
                                    on(Step::Request);
                                }
                                more.map(|more| done.applied + more)
                            } else {
                                Ok(done.applied)
                            }
                        }
                    }
                }
            };
            settle(consumer, head, outcome, tally, on).await?;
        }
        Ok(())
    }
}

/// The first page of what follows `cursor` in `head`'s subject, checked to continue it; an
/// empty one while the cursor is below the listed head is upstream inconsistent.
async fn first_page<V: ViewStore, U: Upstream>(
    consumer: &Consumer<V, U>,
    head: &SubjectHead,
    cursor: Sequence,
    pace: Option<&Pace>,
    requests: &AtomicU64,
) -> Result<Vec<IntegrationEvent>, ConsumeError> {
    let subject = &head.subject;
    let feed = consumer.feed();
    let limit = consumer.options().page_events;
    let page = consumer
        .retrying(|| async {
            if let Some(pace) = pace {
                pace.ready().await;
            }
            requests.fetch_add(1, Ordering::Relaxed);
            consumer
                .upstream()
                .read_subject(feed, subject, cursor, limit)
                .await
        })
        .await?;
    consumer.check_page(subject, cursor, &page)?;
    if page.is_empty() {
        return Err(listed_beyond(head, cursor));
    }
    Ok(page)
}

/// Applies a batch of subjects' pages in one `apply_many` under their locks; when the view
/// store refuses it, subject by subject. One answer per subject, in order.
async fn apply_batch<V: ViewStore, U: Upstream>(
    consumer: &Consumer<V, U>,
    batch: &[(Subject, Vec<IntegrationEvent>)],
    batched: &[(&SubjectHead, Sequence)],
) -> Vec<Result<crate::view::Applied, ConsumeError>> {
    if batch.is_empty() {
        return Vec::new();
    }
    let feed = consumer.feed();
    let together = {
        let _held = consumer.lock_subjects(batch.iter().map(|(s, _)| s)).await;
        consumer.view().apply_many(feed, batch).await
    };
    match together {
        Ok(applied) if applied.len() == batch.len() => applied.into_iter().map(Ok).collect(),
        together => {
            if let Err(error) = together {
                tracing::debug!(%feed, %error, "a walk's batch could not be applied at once; applying it subject by subject");
            }
            let mut results = Vec::with_capacity(batch.len());
            for ((subject, page), (_, listed_cursor)) in batch.iter().zip(batched) {
                let one = {
                    let _held = consumer.lock_of(subject).lock().await;
                    consumer.view().apply(feed, subject, page).await
                };
                // A view store whose `apply_many` is not one transaction may have applied some
                // subjects before it failed: count what the page moved past the listing's
                // cursor, not only what this apply did.
                results.push(one.map_err(ConsumeError::from).map(|mut done| {
                    done.applied = page
                        .iter()
                        .filter(|e| e.sequence > *listed_cursor && e.sequence <= done.cursor)
                        .count() as u64;
                    done
                }));
            }
            results
        }
    }
}

/// Records how one subject's catch-up ended: caught up (its dead letters resolved), failed on
/// its own (counted, logged, dead-lettered: the walk goes on), or failed in a way that stops the
/// walk (returned).
async fn settle<V: ViewStore, U: Upstream>(
    consumer: &Consumer<V, U>,
    head: &SubjectHead,
    outcome: Result<u64, ConsumeError>,
    tally: &mut Tally,
    on: &mut (dyn FnMut(Step<'_>) + Send),
) -> Result<(), ConsumeError> {
    match outcome {
        Ok(applied) => {
            tally.applied += applied;
            // Dead letters (src/dead.rs): a parked subject caught up is resolved.
            consumer.resolve_parked(&head.subject).await?;
            Ok(())
        }
        Err(error) if fails_one_subject(&error) => {
            // Dead letters: the subject is parked with the reason, for the operator.
            consumer
                .dead_letter_catch_up(&head.subject, &error, "walk")
                .await?;
            tally.failed += 1;
            on(Step::Failed(&head.subject));
            if tally.failed <= FAILURES_LOGGED_MAX {
                tracing::warn!(feed = %consumer.feed(), subject = %head.subject, %error, "reconstitution could not catch up a subject; walking on");
            }
            tally.first_failure.get_or_insert(error);
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// A subject listed with a head beyond what its events hold.
fn listed_beyond(head: &SubjectHead, cursor: Sequence) -> ConsumeError {
    ConsumeError::Inconsistent {
        subject: head.subject.clone(),
        detail: format!(
            "listed with its head at #{}, but its events end at #{}",
            head.sequence.get(),
            cursor.get()
        ),
    }
}

/// Whether an error stops only the subject's catch-up (the walk goes on), not the walk: the
/// producer answered that subject out of order or unreadably, or the view refused its events.
/// The producer unavailable or refusing, and the view store failing, stop the walk.
fn fails_one_subject(error: &ConsumeError) -> bool {
    matches!(
        error,
        ConsumeError::Inconsistent { .. }
            | ConsumeError::Upstream(UpstreamError::Malformed(_))
            | ConsumeError::View(ViewError::Handler { .. } | ViewError::NotContiguous { .. })
    )
}

/// The local cursors of the subjects after `after` up to `last`, read in pages of `limit`.
async fn local_cursors<V: ViewStore, U: Upstream>(
    consumer: &Consumer<V, U>,
    after: Option<&Subject>,
    last: &Subject,
    limit: u64,
) -> Result<HashMap<Subject, Sequence>, ConsumeError> {
    let mut cursors = HashMap::new();
    let mut from = after.cloned();
    loop {
        let page = consumer
            .view()
            .cursors(consumer.feed(), from.as_ref(), limit)
            .await?;
        let full = page.len() as u64 >= limit;
        for (subject, cursor) in page {
            if &subject > last {
                return Ok(cursors);
            }
            from = Some(subject.clone());
            cursors.insert(subject, cursor);
        }
        if !full {
            return Ok(cursors);
        }
    }
}

/// Fetches and applies what follows `subject`'s cursor up to its listed head, a paced page at a
/// time. The
/// subject's lock is held only around each apply, not while waiting for the pace or upstream:
/// deliveries of the subject go on meanwhile (the view store skips what they applied first).
async fn catch_up<V: ViewStore, U: Upstream>(
    consumer: &Consumer<V, U>,
    head: &SubjectHead,
    pace: Option<&Pace>,
    requests: &AtomicU64,
    on: &mut (dyn FnMut(Step<'_>) + Send),
) -> Result<u64, ConsumeError> {
    let feed = consumer.feed();
    let subject = &head.subject;
    let limit = consumer.options().page_events;
    let mut cursor = consumer.view().cursor(feed, subject).await?;
    let mut applied = 0;
    loop {
        let page = consumer
            .retrying(|| async {
                if let Some(pace) = pace {
                    pace.ready().await;
                }
                requests.fetch_add(1, Ordering::Relaxed);
                consumer
                    .upstream()
                    .read_subject(feed, subject, cursor, limit)
                    .await
            })
            .await?;
        consumer.check_page(subject, cursor, &page)?;
        let Some(last) = page.last().map(|e| e.sequence) else {
            if cursor < head.sequence {
                // The listing said more than the subject's events hold.
                return Err(listed_beyond(head, cursor));
            }
            return Ok(applied);
        };
        let done = {
            let _held = consumer.lock_of(subject).lock().await;
            consumer.view().apply(feed, subject, &page).await?
        };
        if done.cursor < last {
            return Err(ConsumeError::View(ViewError::NotContiguous {
                subject: subject.clone(),
                cursor: done.cursor,
                detail: "the view store applied events but its cursor did not move past them"
                    .into(),
            }));
        }
        consumer.count_walked(subject, done.cursor, done.applied);
        on(Step::Applied(done.applied));
        applied += done.applied;
        cursor = done.cursor;
        if cursor >= head.sequence {
            // Up to the head listed: done, without asking for the (empty) page after it. Events
            // appended since the listing come by delivery or the next walk.
            return Ok(applied);
        }
    }
}

/// `Consumer::reconstitute`: one unpaced walk from the first subject, no mark.
pub(crate) async fn reconstitute<V: ViewStore, U: Upstream>(
    consumer: &Consumer<V, U>,
) -> Result<Reconstitution, ConsumeError> {
    let plan = Plan {
        pace: None,
        page_subjects: consumer.options().page_events,
        fetches_at_once: WALK_FETCHES_AT_ONCE_DEFAULT,
        resumable: false,
    };
    let tally = walk(consumer, &plan, &mut |_| {}).await?;
    if let Some(failure) = tally.first_failure {
        return Err(failure);
    }
    Ok(Reconstitution {
        subjects: tally.listed,
        behind: tally.behind,
        applied: tally.applied,
        failed: tally.failed,
    })
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndLabels {
    /// `finished`, `interrupted` or `cancelled`.
    result: &'static str,
}

/// The walker's metrics (`headwater_consumer_walk…`).
#[derive(Clone, Debug)]
struct WalkMetrics {
    walks: Family<EndLabels, Counter>,
    subjects: Counter,
    behind: Counter,
    applied: Counter,
    failed: Counter,
    requests: Counter,
    duration: Histogram,
    last_end: Gauge<f64, AtomicU64>,
    running: Gauge,
}

impl Default for WalkMetrics {
    fn default() -> WalkMetrics {
        WalkMetrics {
            walks: Family::default(),
            subjects: Counter::default(),
            behind: Counter::default(),
            applied: Counter::default(),
            failed: Counter::default(),
            requests: Counter::default(),
            // 10 ms to ~23 h.
            duration: Histogram::new(exponential_buckets(0.01, 3.0, 16)),
            last_end: Gauge::default(),
            running: Gauge::default(),
        }
    }
}

/// The periodic runner's registration; gone when it stops.
#[derive(Debug, Default)]
struct Control {
    walks: u64,
    requested: bool,
    runners: u32,
    every: Option<Duration>,
}

/// The paced, resumable reconstitution walker of one [`Consumer`]. See the module docs.
///
/// ```no_run
/// # async fn example(consumer: std::sync::Arc<headwater_consume::Consumer<headwater_consume::MemoryView<u64>, headwater_consume::FeedClient>>) {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use headwater_consume::{Walker, WalkerOptions, walker_router};
/// let walker = Arc::new(Walker::new(consumer, WalkerOptions::default()));
/// let mut registry = prometheus_client::registry::Registry::default();
/// walker.register_metrics(&mut registry);
/// let routes: axum::Router = walker_router(walker.clone(), None); // merge into the service's router
/// tokio::spawn(walker.run(Some(Duration::from_secs(300)), std::future::pending()));
/// # }
/// ```
pub struct Walker<V, U> {
    consumer: Arc<Consumer<V, U>>,
    options: WalkerOptions,
    pace: Option<Pace>,
    /// Held by the walk in progress: walks never overlap.
    walking: tokio::sync::Mutex<()>,
    control: Mutex<Control>,
    /// Wakes the runner for a request.
    wake: Notify,
    status: watch::Sender<WalkerStatus>,
    metrics: WalkMetrics,
}

impl<V, U> std::fmt::Debug for Walker<V, U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Walker")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<V: ViewStore, U: Upstream> Walker<V, U> {
    pub fn new(consumer: Arc<Consumer<V, U>>, options: WalkerOptions) -> Walker<V, U> {
        let options = WalkerOptions {
            burst: options.burst.max(1),
            page_subjects: options.page_subjects.clamp(1, WALK_PAGE_SUBJECTS_MAX),
            fetches_at_once: options.fetches_at_once.clamp(1, WALK_FETCHES_AT_ONCE_MAX),
            ..options
        };
        let status = WalkerStatus {
            feed: consumer.feed().to_string(),
            running: None,
            last: None,
            requested: false,
            walks: 0,
            runner: false,
            every_seconds: None,
            requests_per_second: options.requests_per_second.map(NonZeroU32::get),
            resume_after: None,
        };
        Walker {
            pace: options
                .requests_per_second
                .map(|rate| Pace::new(rate, options.burst)),
            consumer,
            options,
            walking: tokio::sync::Mutex::new(()),
            control: Mutex::new(Control::default()),
            wake: Notify::new(),
            status: watch::Sender::new(status),
            metrics: WalkMetrics::default(),
        }
    }

    pub fn consumer(&self) -> &Arc<Consumer<V, U>> {
        &self.consumer
    }

    pub fn options(&self) -> &WalkerOptions {
        &self.options
    }

    /// The walker's state now (the running walk's elapsed time and rate brought up to date).
    pub fn status(&self) -> WalkerStatus {
        let mut status = self.status.borrow().clone();
        if let Some(running) = &mut status.running {
            running.tick();
        }
        status
    }

    /// A watch of the walker's state: changes as walks start, list pages, catch subjects up and
    /// end.
    pub fn watch(&self) -> watch::Receiver<WalkerStatus> {
        self.status.subscribe()
    }

    /// Registers the walker's metrics, labelled with its feed: walks ended by result, subjects
    /// listed, found behind and failed, events applied, requests made, walk duration, the last
    /// walk's end time and whether one runs.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let m = &self.metrics;
        let registry = registry
            .sub_registry_with_label(("feed".into(), self.consumer.feed().to_string().into()));
        registry.register(
            "headwater_consumer_walks",
            "Reconstitution walks ended, by result (finished, interrupted, cancelled)",
            m.walks.clone(),
        );
        registry.register(
            "headwater_consumer_walk_subjects",
            "Subjects listed by reconstitution walks",
            m.subjects.clone(),
        );
        registry.register(
            "headwater_consumer_walk_subjects_behind",
            "Subjects a reconstitution walk found behind the producer",
            m.behind.clone(),
        );
        registry.register(
            "headwater_consumer_walk_events_applied",
            "Events fetched and applied by reconstitution walks",
            m.applied.clone(),
        );
        registry.register(
            "headwater_consumer_walk_subject_failures",
            "Subjects a reconstitution walk could not catch up (walked past)",
            m.failed.clone(),
        );
        registry.register(
            "headwater_consumer_walk_requests",
            "Requests reconstitution walks made of the producer",
            m.requests.clone(),
        );
        registry.register(
            "headwater_consumer_walk_duration_seconds",
            "How long reconstitution walks took, start to end",
            m.duration.clone(),
        );
        registry.register(
            "headwater_consumer_walk_last_end_timestamp_seconds",
            "When the last reconstitution walk ended (Unix time)",
            m.last_end.clone(),
        );
        registry.register(
            "headwater_consumer_walk_running",
            "1 while a reconstitution walk runs",
            m.running.clone(),
        );
    }

    /// Walks now: waits for a running walk to end first (walks never overlap), then lists every
    /// subject after the saved mark — from the first one when there is none — and catches up
    /// each one that is behind. Returns the walk's report.
    ///
    /// # Errors
    /// [`ConsumeError`] when the walk was interrupted: the producer unavailable past the
    /// consumer's retries or refusing, its listing out of order, the view store failing. The
    /// subjects walked stay caught up and the next walk resumes after the last page walked.
    /// Subjects that failed on their own do not make an error: see `failed`.
    ///
    /// # Cancel safety
    /// Cancel safe: the walk is recorded as cancelled and the next one resumes after the last
    /// page walked.
    pub async fn walk(&self) -> Result<WalkProgress, ConsumeError> {
        self.walk_as(WalkTrigger::Direct).await
    }

    async fn walk_as(&self, trigger: WalkTrigger) -> Result<WalkProgress, ConsumeError> {
        let _one = self.walking.lock().await;
        let id = {
            let mut control = self.control();
            control.walks += 1;
            // This walk starts after every request made so far: it serves them.
            control.requested = false;
            control.walks
        };
        let mut progress = WalkProgress::new(id, trigger);
        self.status.send_modify(|s| {
            s.walks = id;
            s.requested = false;
            s.running = Some(progress.clone());
        });
        self.metrics.running.set(1);
        let mut ending = Ending {
            walker: self,
            armed: true,
        };
        let plan = Plan {
            pace: self.pace.as_ref(),
            page_subjects: self.options.page_subjects,
            fetches_at_once: self.options.fetches_at_once,
            resumable: true,
        };
        let metrics = &self.metrics;
        let status = &self.status;
        let mut on = |step: Step<'_>| {
            match step {
                Step::Resumed(subject) => {
                    progress.resumed_after = Some(subject.to_string());
                    progress.mark = progress.resumed_after.clone();
                }
                Step::Saved(subject) => progress.mark = Some(subject.to_string()),
                Step::Request => {
                    progress.requests += 1;
                    metrics.requests.inc();
                    return;
                }
                Step::Listed { subjects, last } => {
                    progress.listed += subjects;
                    progress.current = Some(last.to_string());
                    metrics.subjects.inc_by(subjects);
                }
                Step::Behind(subject) => {
                    progress.behind += 1;
                    progress.current = Some(subject.to_string());
                    metrics.behind.inc();
                }
                Step::Applied(events) => {
                    progress.applied += events;
                    metrics.applied.inc_by(events);
                }
                Step::Failed(subject) => {
                    progress.failed += 1;
                    progress.current = Some(subject.to_string());
                    metrics.failed.inc();
                }
            }
            progress.tick();
            let now = progress.clone();
            status.send_modify(|s| s.running = Some(now));
        };
        let result = walk(&self.consumer, &plan, &mut on).await;
        let (state, error) = match &result {
            Ok(_) => (WalkState::Finished, None),
            Err(error) => (WalkState::Interrupted, Some(error.to_string())),
        };
        if result.is_ok() {
            progress.mark = None;
        }
        progress.end(state, error);
        ending.armed = false;
        self.record_end(progress.clone());
        result.map(|_| progress)
    }

    /// Records a walk's end: status, metrics, the resume point.
    fn record_end(&self, progress: WalkProgress) {
        let result = match progress.state {
            WalkState::Finished => "finished",
            WalkState::Cancelled => "cancelled",
            _ => "interrupted",
        };
        let m = &self.metrics;
        m.walks.get_or_create(&EndLabels { result }).inc();
        m.duration.observe(progress.elapsed_seconds);
        m.last_end.set(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        m.running.set(0);
        if let Some(error) = &progress.error {
            tracing::warn!(feed = %self.consumer.feed(), walk = progress.id, %error, "a reconstitution walk was interrupted; the next one resumes where it stopped");
        }
        self.status.send_modify(|s| {
            s.running = None;
            s.resume_after.clone_from(&progress.mark);
            s.last = Some(progress);
        });
    }

    /// Asks for a walk now: served by the next walk that starts — at once when none runs, right
    /// after the running one otherwise (requests made during one walk share one next walk).
    /// Returns that walk's id. Needs the runner ([`Walker::run`]) to run.
    ///
    /// # Errors
    /// [`WalkerNotRunning`] when no runner runs.
    pub fn request(&self) -> Result<u64, WalkerNotRunning> {
        let id = {
            let mut control = self.control();
            if control.runners == 0 {
                return Err(WalkerNotRunning);
            }
            control.requested = true;
            control.walks + 1
        };
        self.status.send_modify(|s| s.requested = true);
        self.wake.notify_one();
        Ok(id)
    }

    /// The runner: walks at start and then every `every` (start to start; a walk longer than
    /// that is followed by the next at once), and whenever [`Walker::request`] asks, until
    /// `stop` resolves. `every = None`: only on request. A walk that was interrupted is tried
    /// again after [`WALK_RETRY_AFTER_INTERRUPTION`] (or `every`, if shorter). Walks never
    /// overlap, also with [`Walker::walk`] called beside it.
    ///
    /// # Cancel safety
    /// Cancel safe (prefer `stop`): a walk in progress is recorded as cancelled and the next
    /// one resumes after its last page.
    pub async fn run(self: Arc<Self>, every: Option<Duration>, stop: impl Future<Output = ()>) {
        let _runner = Runner::new(&self, every);
        tokio::pin!(stop);
        // Where the first walk resumes, when an earlier process left a walk unfinished.
        let key = mark_key(self.consumer.feed());
        if let Ok(Some(mark)) = self.consumer.view().mark(&key).await {
            self.status.send_modify(|s| {
                if s.running.is_none() {
                    s.resume_after = Some(mark);
                }
            });
        }
        let mut due = every.map(|_| Instant::now());
        loop {
            let requested = self.control().requested;
            let periodic = due.is_some_and(|due| due <= Instant::now());
            if !requested && !periodic {
                tokio::select! {
                    () = &mut stop => return,
                    () = sleep_until(due) => {}
                    () = self.wake.notified() => {}
                }
                continue;
            }
            let trigger = if requested {
                WalkTrigger::Requested
            } else {
                WalkTrigger::Periodic
            };
            let started = Instant::now();
            let result = tokio::select! {
                () = &mut stop => return,
                result = self.walk_as(trigger) => result,
            };
            if let Some(every) = every {
                due = Some(match result {
                    Ok(_) => started + every,
                    Err(_) => Instant::now() + every.min(WALK_RETRY_AFTER_INTERRUPTION),
                });
            }
        }
    }

    fn control(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Sleeps until `due`, or for ever without one.
async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// Records a walk that was dropped before it ended as cancelled.
struct Ending<'a, V: ViewStore, U: Upstream> {
    walker: &'a Walker<V, U>,
    armed: bool,
}

impl<V: ViewStore, U: Upstream> Drop for Ending<'_, V, U> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let running = self.walker.status.borrow().running.clone();
        if let Some(mut progress) = running {
            progress.end(WalkState::Cancelled, None);
            self.walker.record_end(progress);
        }
    }
}

/// The runner's registration in the walker's control: requests are refused without one.
struct Runner<'a, V, U> {
    walker: &'a Walker<V, U>,
}

impl<'a, V: ViewStore, U: Upstream> Runner<'a, V, U> {
    fn new(walker: &'a Walker<V, U>, every: Option<Duration>) -> Runner<'a, V, U> {
        {
            let mut control = walker.control();
            control.runners += 1;
            control.every = every;
        }
        walker.status.send_modify(|s| {
            s.runner = true;
            s.every_seconds = every.map(|e| e.as_secs_f64());
        });
        Runner { walker }
    }
}

impl<V, U> Drop for Runner<'_, V, U> {
    fn drop(&mut self) {
        let mut control = self
            .walker
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        control.runners = control.runners.saturating_sub(1);
        let running = control.runners > 0;
        drop(control);
        self.walker.status.send_modify(|s| s.runner = running);
    }
}
