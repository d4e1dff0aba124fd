//! The projector: the follower that fills one feed from the internal log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use headwater_core::limits::READ_PAGE_EVENTS_MAX;
use headwater_core::{FeedId, FeedPosition, FeedStatus, Position, RecordedEvent};
use headwater_store::{
    COMMIT_EVENTS_MAX, EventStore, FeedError, FeedStore, ProjectedEvent, ProjectorBatch, ReadError,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::{FeedLabel, Metrics, gauge_value};
use crate::projection::{Emit, ProjectFailure, Projection, project_one};
use headwater_store::{Leadership, Lease};

/// The largest batch the projector commits, summing its events' data, in bytes.
pub const COMMIT_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Pages of at least this many events are projected on a blocking thread, so that a backfill
/// does not hold up the service's other tasks.
const BLOCKING_PAGE_EVENTS_MIN: usize = 64;

/// How a projector works. The defaults suit production; tests shrink them.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ProjectorOptions {
    /// Internal events per read of the log (1 ..= `READ_PAGE_EVENTS_MAX`).
    pub read_page_events: u64,
    /// The most integration events in one commit (1 ..= [`COMMIT_EVENTS_MAX`]).
    pub commit_events_max: usize,
    /// The most data bytes in one commit (a commit holds at least one internal event's output).
    pub commit_bytes_max: usize,
    /// How often a backfill logs its progress.
    pub progress_log_interval: Duration,
    /// How often a caught-up projector checks whether its feed was retired.
    pub status_check_interval: Duration,
    /// The first wait after a transient error; it doubles up to `retry_backoff_max`.
    pub retry_backoff_min: Duration,
    pub retry_backoff_max: Duration,
}

impl Default for ProjectorOptions {
    fn default() -> ProjectorOptions {
        ProjectorOptions {
            read_page_events: READ_PAGE_EVENTS_MAX,
            commit_events_max: COMMIT_EVENTS_MAX,
            commit_bytes_max: COMMIT_BYTES_MAX,
            progress_log_interval: Duration::from_secs(5),
            status_check_interval: Duration::from_secs(5),
            retry_backoff_min: Duration::from_millis(50),
            retry_backoff_max: Duration::from_secs(5),
        }
    }
}

impl ProjectorOptions {
    fn checked(mut self) -> ProjectorOptions {
        self.read_page_events = self.read_page_events.clamp(1, READ_PAGE_EVENTS_MAX);
        self.commit_events_max = self.commit_events_max.clamp(1, COMMIT_EVENTS_MAX);
        self.commit_bytes_max = self.commit_bytes_max.max(1);
        self.retry_backoff_min = self.retry_backoff_min.max(Duration::from_millis(1));
        self.retry_backoff_max = self.retry_backoff_max.max(self.retry_backoff_min);
        self
    }
}

/// What a projector is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProjectorState {
    /// Not started yet.
    Starting,
    /// Waiting to lead: another replica runs this feed's projector.
    Standby,
    /// Projecting, or caught up and waiting for new internal events.
    Running,
    /// Backing off after a transient error (see `last_error`); it will retry.
    Retrying,
    /// Stopped by an error it cannot get past (see `last_error`): a projection error, corrupt
    /// data. The other feeds go on.
    Failed,
    /// Stopped: shut down, or the feed is retired.
    Stopped,
}

impl ProjectorState {
    pub const fn as_str(self) -> &'static str {
        match self {
            ProjectorState::Starting => "starting",
            ProjectorState::Standby => "standby",
            ProjectorState::Running => "running",
            ProjectorState::Retrying => "retrying",
            ProjectorState::Failed => "failed",
            ProjectorState::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for ProjectorState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A backfill's progress: internal positions projected of the log head's, and the rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackfillProgress {
    /// Internal positions the feed includes (its cursor).
    pub done: u64,
    /// The internal log head last seen.
    pub total: u64,
    /// Internal events per second since this process started the backfill.
    pub events_per_second: f64,
}

/// What one projector reports, for the CLI, the feed API's `/metrics` and logs.
#[derive(Clone, Debug, PartialEq)]
pub struct ProjectorStatus {
    pub feed: FeedId,
    pub state: ProjectorState,
    /// The feed's status in the feed store (`backfilling` → `live`; `retired`).
    pub feed_status: FeedStatus,
    /// The last internal position the feed includes.
    pub cursor: Position,
    /// The internal log head last seen.
    pub log_head: Position,
    /// The feed's last position.
    pub feed_head: FeedPosition,
    /// While the feed is backfilling.
    pub backfill: Option<BackfillProgress>,
    /// The last error met (retried, or what stopped the projector when `state` is `Failed`).
    pub last_error: Option<String>,
}

impl ProjectorStatus {
    fn new(feed: FeedId) -> ProjectorStatus {
        ProjectorStatus {
            feed,
            state: ProjectorState::Starting,
            feed_status: FeedStatus::Backfilling,
            cursor: Position::START,
            log_head: Position::START,
            feed_head: FeedPosition::START,
            backfill: None,
            last_error: None,
        }
    }

    /// Internal positions the feed is behind the log head.
    pub fn lag(&self) -> u64 {
        self.log_head.0.saturating_sub(self.cursor.0)
    }
}

/// Why a projector stopped for good.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectorError {
    /// The projection refused an event (or panicked on it).
    #[error(transparent)]
    Projection(#[from] Box<ProjectFailure>),
    /// The internal log cannot be read past the cursor (corrupt, or refused).
    #[error("projector {feed}: reading the internal log failed: {error}")]
    Read {
        feed: FeedId,
        #[source]
        error: ReadError,
    },
    /// The feed store refuses the feed (corrupt, a refused batch, closed).
    #[error("projector {feed}: the feed store failed: {error}")]
    Feed {
        feed: FeedId,
        #[source]
        error: FeedError,
    },
    /// The projector's task ended abnormally.
    #[error("projector {feed}: {detail}")]
    Task { feed: FeedId, detail: String },
}

/// How a projector's run ended without error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stopped {
    /// Shut down.
    Shutdown,
    /// The feed is retired: it is not projected any more.
    Retired,
}

/// The follower that fills one feed: it reads the internal log after the feed's cursor, projects
/// each event, and commits the results in batches that move the cursor (compare-and-set). See
/// `docs/design/feeds.md`.
pub struct Projector<E: ?Sized, F: ?Sized> {
    events: Arc<E>,
    feeds: Arc<F>,
    projection: Arc<dyn Projection>,
    feed: FeedId,
    options: ProjectorOptions,
    status: watch::Sender<ProjectorStatus>,
    metrics: Metrics,
    label: FeedLabel,
}

impl<E: ?Sized, F: ?Sized> std::fmt::Debug for Projector<E, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector")
            .field("feed", &self.feed)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// A step that failed: retry it (after a backoff, from a reloaded cursor) or stop.
enum StepError {
    Transient(String),
    Fatal(ProjectorError),
}

/// How one leadership ended.
enum End {
    Stopped(Stopped),
    LostLease,
}

impl<E, F> Projector<E, F>
where
    E: EventStore + ?Sized,
    F: FeedStore + ?Sized,
{
    pub fn new(
        events: Arc<E>,
        feeds: Arc<F>,
        projection: Arc<dyn Projection>,
        options: ProjectorOptions,
    ) -> Projector<E, F> {
        Projector::with_metrics(events, feeds, projection, options, Metrics::default())
    }

    pub(crate) fn with_metrics(
        events: Arc<E>,
        feeds: Arc<F>,
        projection: Arc<dyn Projection>,
        options: ProjectorOptions,
        metrics: Metrics,
    ) -> Projector<E, F> {
        let feed = projection.feed();
        let (status, _) = watch::channel(ProjectorStatus::new(feed.clone()));
        let label = FeedLabel {
            feed: feed.to_string(),
        };
        Projector {
            events,
            feeds,
            projection,
            feed,
            options: options.checked(),
            status,
            metrics,
            label,
        }
    }

    pub fn feed(&self) -> &FeedId {
        &self.feed
    }

    /// A watch of this projector's status.
    pub fn status(&self) -> watch::Receiver<ProjectorStatus> {
        self.status.subscribe()
    }

    /// Runs the projector until `shutdown` is cancelled, the feed is retired, or an error it
    /// cannot get past. While another replica leads (`leadership`), it waits. Transient errors
    /// (a backend failure, [`FeedError::CursorMoved`]) are retried after a bounded exponential
    /// backoff, from the cursor reloaded from the feed store: nothing is ever skipped.
    ///
    /// # Cancel safety
    /// Use `shutdown` to stop it: that lets an in-flight commit finish. Dropping the future
    /// instead is safe too (a dropped commit either happened or not; the next run reloads the
    /// cursor), but the status is then left as it was.
    pub async fn run(
        &self,
        leadership: &dyn Leadership,
        shutdown: &CancellationToken,
    ) -> Result<Stopped, ProjectorError> {
        let follower = format!("projector/{}", self.feed);
        let mut backoff = self.options.retry_backoff_min;
        loop {
            if shutdown.is_cancelled() {
                return Ok(self.stopped(Stopped::Shutdown));
            }
            // What the store says, for the status of a replica that waits to lead.
            if let Ok(Some(state)) = self.feeds.feed(&self.feed).await {
                self.status.send_modify(|s| {
                    s.feed_status = state.status;
                    s.cursor = state.cursor;
                    s.feed_head = state.head;
                    s.log_head = s.log_head.max(self.events.head_position());
                });
            }
            self.set_state(ProjectorState::Standby);
            let lease = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(self.stopped(Stopped::Shutdown)),
                lease = leadership.lead(&follower) => lease,
            };
            let lease = match lease {
                Ok(lease) => lease,
                Err(error) => {
                    let error = format!("cannot try to lead: {error}");
                    self.retrying(&error);
                    if !sleep_or_cancel(backoff, shutdown).await {
                        return Ok(self.stopped(Stopped::Shutdown));
                    }
                    backoff = (backoff * 2).min(self.options.retry_backoff_max);
                    continue;
                }
            };
            tracing::info!(feed = %self.feed, "projector leading");
            match self.lead(&lease, shutdown).await {
                Ok(End::Stopped(stopped)) => return Ok(self.stopped(stopped)),
                Ok(End::LostLease) => {
                    tracing::warn!(feed = %self.feed, "projector lost its leadership; waiting to lead again");
                    backoff = self.options.retry_backoff_min;
                }
                Err(error) => {
                    let message = error.to_string();
                    tracing::error!(feed = %self.feed, error = %message, "projector stopped");
                    self.metrics.errors.get_or_create(&self.label).inc();
                    self.status.send_modify(|s| {
                        s.state = ProjectorState::Failed;
                        s.last_error = Some(message);
                    });
                    return Err(error);
                }
            }
        }
    }

    /// Projects while the lease holds, retrying transient errors.
    async fn lead(
        &self,
        lease: &Lease,
        shutdown: &CancellationToken,
    ) -> Result<End, ProjectorError> {
        let mut backoff = self.options.retry_backoff_min;
        loop {
            match self.follow(lease, shutdown).await {
                Ok(end) => return Ok(end),
                Err(StepError::Fatal(error)) => return Err(error),
                Err(StepError::Transient(error)) => {
                    self.retrying(&error);
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => return Ok(End::Stopped(Stopped::Shutdown)),
                        () = lease.lost() => return Ok(End::LostLease),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.options.retry_backoff_max);
                }
            }
        }
    }

    fn retrying(&self, error: &str) {
        tracing::warn!(feed = %self.feed, %error, "projector retrying");
        self.metrics.errors.get_or_create(&self.label).inc();
        self.status.send_modify(|s| {
            s.state = ProjectorState::Retrying;
            s.last_error = Some(error.to_owned());
        });
    }

    fn set_state(&self, state: ProjectorState) {
        self.status.send_if_modified(|s| {
            let changed = s.state != state;
            s.state = state;
            changed
        });
    }

    fn stopped(&self, stopped: Stopped) -> Stopped {
        self.status.send_modify(|s| {
            s.state = ProjectorState::Stopped;
            if stopped == Stopped::Retired {
                s.feed_status = FeedStatus::Retired;
                s.backfill = None;
            }
        });
        tracing::info!(feed = %self.feed, ?stopped, "projector stopped");
        stopped
    }

    fn feed_error(&self, error: FeedError) -> StepError {
        match error {
            FeedError::CursorMoved { .. } | FeedError::Backend(_) => {
                StepError::Transient(error.to_string())
            }
            error => StepError::Fatal(ProjectorError::Feed {
                feed: self.feed.clone(),
                error,
            }),
        }
    }

    fn read_error(&self, error: ReadError) -> StepError {
        match error {
            ReadError::Backend(_) => StepError::Transient(error.to_string()),
            error => StepError::Fatal(ProjectorError::Read {
                feed: self.feed.clone(),
                error,
            }),
        }
    }

    /// One stretch of projecting: loads the cursor, then reads, projects and commits until
    /// stopped or an error. While the batches of one full page commit, the next page is read and
    /// projected (it starts where the page ends, whatever the commits do); it is used only if
    /// every commit succeeded.
    async fn follow(&self, lease: &Lease, shutdown: &CancellationToken) -> Result<End, StepError> {
        let state = self
            .feeds
            .register(&self.feed)
            .await
            .map_err(|e| self.feed_error(e))?;
        if state.status == FeedStatus::Retired {
            return Ok(End::Stopped(Stopped::Retired));
        }
        let mut head_watch = self.events.watch_head();
        let mut at = Progress {
            cursor: state.cursor,
            log_head: self.events.head_position(),
            feed_status: state.status,
            backfill: Backfill::new(state.cursor),
        };
        self.status.send_modify(|s| {
            s.state = ProjectorState::Running;
            s.feed_status = at.feed_status;
            s.cursor = at.cursor;
            s.feed_head = state.head;
            s.log_head = at.log_head;
        });
        self.update_metrics(at.cursor, at.log_head, state.head, at.feed_status);
        let mut last_status_check = Instant::now();
        let mut ahead: Option<Page> = None;
        loop {
            if shutdown.is_cancelled() {
                return Ok(End::Stopped(Stopped::Shutdown));
            }
            if lease.is_lost() {
                return Ok(End::LostLease);
            }
            if last_status_check.elapsed() >= self.options.status_check_interval {
                last_status_check = Instant::now();
                match self.feeds.feed(&self.feed).await {
                    Ok(Some(state)) if state.status == FeedStatus::Retired => {
                        return Ok(End::Stopped(Stopped::Retired));
                    }
                    Ok(_) => {}
                    Err(error) => return Err(self.feed_error(error)),
                }
            }
            let page = match ahead.take() {
                Some(page) => page,
                None => {
                    at.log_head = at.log_head.max(self.events.head_position());
                    if at.cursor >= at.log_head {
                        if at.feed_status == FeedStatus::Backfilling
                            && self.go_live(&mut at).await?
                        {
                            return Ok(End::Stopped(Stopped::Retired));
                        }
                        tokio::select! {
                            biased;
                            () = shutdown.cancelled() => return Ok(End::Stopped(Stopped::Shutdown)),
                            () = lease.lost() => return Ok(End::LostLease),
                            changed = head_watch.wait_for(|head| *head > at.cursor) => {
                                match changed {
                                    Ok(head) => at.log_head = at.log_head.max(*head),
                                    Err(_) => return Err(StepError::Transient(
                                        "the event store's head watch ended".to_owned())),
                                }
                            }
                            () = tokio::time::sleep(self.options.status_check_interval) => {}
                        }
                        continue;
                    }
                    match self.read_and_project(at.cursor).await? {
                        Some(page) => page,
                        None => {
                            // The head said there is more, the read found nothing: wait a
                            // little rather than spin.
                            tokio::select! {
                                () = shutdown.cancelled() => return Ok(End::Stopped(Stopped::Shutdown)),
                                () = tokio::time::sleep(self.options.retry_backoff_min) => {}
                            }
                            continue;
                        }
                    }
                }
            };
            let full = page.read >= self.options.read_page_events;
            let batches = split(
                at.cursor,
                page.end,
                page.events,
                self.options.commit_events_max,
                self.options.commit_bytes_max,
            );
            let next = async {
                if full {
                    self.read_and_project(page.end).await
                } else {
                    Ok(None)
                }
            };
            let (committed, next) = tokio::join!(
                self.commit_batches(batches, page.read, &mut at, shutdown),
                next
            );
            if !committed? {
                return Ok(End::Stopped(Stopped::Shutdown));
            }
            ahead = next?;
        }
    }

    /// Sets a backfilling feed live (its cursor reached the log head seen at this moment).
    /// `true` if the feed turned out to be retired.
    async fn go_live(&self, at: &mut Progress) -> Result<bool, StepError> {
        let state = self
            .feeds
            .set_status(&self.feed, FeedStatus::Live)
            .await
            .map_err(|e| self.feed_error(e))?;
        at.feed_status = state.status;
        tracing::info!(
            feed = %self.feed,
            cursor = at.cursor.0,
            feed_head = state.head.0,
            rate = at.backfill.rate(at.cursor),
            "backfill done: the feed is live"
        );
        // Metrics first: whoever sees the status sees metrics at least as new.
        self.update_metrics(at.cursor, at.log_head, state.head, at.feed_status);
        self.status.send_modify(|s| {
            s.feed_status = at.feed_status;
            s.backfill = None;
            s.state = ProjectorState::Running;
        });
        Ok(at.feed_status == FeedStatus::Retired)
    }

    /// Commits the batches of one page (of `read` internal events) in order. `false` if stopped
    /// by `shutdown` (between commits only: an in-flight commit always finishes).
    async fn commit_batches(
        &self,
        batches: Vec<ProjectorBatch>,
        read: u64,
        at: &mut Progress,
        shutdown: &CancellationToken,
    ) -> Result<bool, StepError> {
        let count = batches.len();
        for (i, batch) in batches.into_iter().enumerate() {
            if shutdown.is_cancelled() {
                return Ok(false);
            }
            let events = batch.events.len() as u64;
            let commit = self
                .feeds
                .commit(&self.feed, batch)
                .await
                .map_err(|e| self.feed_error(e))?;
            at.cursor = commit.cursor;
            at.log_head = at.log_head.max(self.events.head_position());
            self.metrics.commits.get_or_create(&self.label).inc();
            self.metrics
                .projected_events
                .get_or_create(&self.label)
                .inc_by(events);
            if i + 1 == count {
                self.metrics
                    .source_events
                    .get_or_create(&self.label)
                    .inc_by(read);
            }
            // Metrics first: whoever sees the status sees metrics at least as new.
            self.update_metrics(at.cursor, at.log_head, commit.head, at.feed_status);
            let progress = (at.feed_status == FeedStatus::Backfilling).then(|| BackfillProgress {
                done: at.cursor.0,
                total: at.log_head.0.max(at.cursor.0),
                events_per_second: at.backfill.rate(at.cursor),
            });
            if let Some(progress) = progress {
                self.metrics
                    .backfill_rate
                    .get_or_create(&self.label)
                    .set(progress.events_per_second);
            }
            self.status.send_modify(|s| {
                s.state = ProjectorState::Running;
                s.cursor = at.cursor;
                s.feed_head = commit.head;
                s.log_head = at.log_head;
                s.backfill = progress;
            });
            if let Some(progress) = progress
                && at.backfill.log_due(self.options.progress_log_interval)
            {
                tracing::info!(
                    feed = %self.feed,
                    done = progress.done,
                    total = progress.total,
                    rate = progress.events_per_second,
                    "backfilling"
                );
            }
        }
        Ok(true)
    }

    /// Reads the page after `after` and projects it; `None` when there is nothing after it.
    async fn read_and_project(&self, after: Position) -> Result<Option<Page>, StepError> {
        let page = self
            .events
            .read_all(after, self.options.read_page_events)
            .await
            .map_err(|e| self.read_error(e))?;
        let Some(last) = page.last() else {
            return Ok(None);
        };
        let end = last.position;
        let read = page.len() as u64;
        let events = self.project_page(page).await?;
        Ok(Some(Page { end, read, events }))
    }
    /// Projects a page (on a blocking thread when it is large).
    async fn project_page(
        &self,
        page: Vec<RecordedEvent>,
    ) -> Result<Vec<ProjectedEvent>, StepError> {
        if page.len() < BLOCKING_PAGE_EVENTS_MIN {
            return project_all(&*self.projection, &self.feed, &page)
                .map_err(|e| StepError::Fatal(e.into()));
        }
        let projection = Arc::clone(&self.projection);
        let feed = self.feed.clone();
        match tokio::task::spawn_blocking(move || project_all(&*projection, &feed, &page)).await {
            Ok(result) => result.map_err(|e| StepError::Fatal(e.into())),
            // project_one catches panics; this is the runtime shutting down.
            Err(error) => Err(StepError::Transient(format!("projecting a page: {error}"))),
        }
    }

    fn update_metrics(
        &self,
        cursor: Position,
        log_head: Position,
        feed_head: FeedPosition,
        feed_status: FeedStatus,
    ) {
        let m = &self.metrics;
        let l = &self.label;
        m.cursor.get_or_create(l).set(gauge_value(cursor.0));
        m.log_head.get_or_create(l).set(gauge_value(log_head.0));
        m.lag
            .get_or_create(l)
            .set(gauge_value(log_head.0.saturating_sub(cursor.0)));
        m.feed_head.get_or_create(l).set(gauge_value(feed_head.0));
        m.live
            .get_or_create(l)
            .set(i64::from(feed_status == FeedStatus::Live));
        let backfilling = feed_status == FeedStatus::Backfilling;
        m.backfill_done.get_or_create(l).set(if backfilling {
            gauge_value(cursor.0)
        } else {
            0
        });
        m.backfill_total.get_or_create(l).set(if backfilling {
            gauge_value(log_head.0)
        } else {
            0
        });
    }
}

/// Projects every event of a page, in order.
pub(crate) fn project_all<P: Projection + ?Sized>(
    projection: &P,
    feed: &FeedId,
    page: &[RecordedEvent],
) -> Result<Vec<ProjectedEvent>, Box<ProjectFailure>> {
    let mut emit = Emit::new(feed.clone());
    let mut out = Vec::new();
    for event in page {
        project_one(projection, feed, event, &mut emit, &mut out)?;
    }
    Ok(out)
}

/// Cuts the projection of the internal events `from + 1 ..= to` into batches of at most
/// `events_max` events and `bytes_max` data bytes, never between two events made of one internal
/// event (a batch holds at least one internal event's output, which is at most
/// `PROJECTED_EVENTS_PER_EVENT_MAX` events). Always at least one batch, so the cursor moves even
/// when nothing was made.
pub(crate) fn split(
    from: Position,
    to: Position,
    events: Vec<ProjectedEvent>,
    events_max: usize,
    bytes_max: usize,
) -> Vec<ProjectorBatch> {
    let mut batches = Vec::new();
    let mut current = ProjectorBatch {
        from,
        to,
        events: Vec::new(),
    };
    let mut bytes = 0usize;
    let mut events = events.into_iter().peekable();
    while let Some(event) = events.next() {
        let source = event.source_position;
        // The events made of this one internal event, together.
        let mut group = vec![event];
        while let Some(next) = events.next_if(|e| e.source_position == source) {
            group.push(next);
        }
        let group_bytes: usize = group.iter().map(|e| e.data.len()).sum();
        let full = current.events.len() + group.len() > events_max
            || bytes.saturating_add(group_bytes) > bytes_max;
        if full && !current.events.is_empty() {
            let last = current.events.last().map_or(from, |e| e.source_position);
            current.to = last;
            let next_from = last;
            batches.push(std::mem::replace(
                &mut current,
                ProjectorBatch {
                    from: next_from,
                    to,
                    events: Vec::new(),
                },
            ));
            bytes = 0;
        }
        bytes = bytes.saturating_add(group_bytes);
        current.events.extend(group);
    }
    batches.push(current);
    batches
}

async fn sleep_or_cancel(wait: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(wait) => true,
    }
}

/// Where a projector is.
struct Progress {
    cursor: Position,
    log_head: Position,
    feed_status: FeedStatus,
    backfill: Backfill,
}

/// A page of the log, projected.
struct Page {
    /// Its last internal position.
    end: Position,
    /// How many internal events it held.
    read: u64,
    events: Vec<ProjectedEvent>,
}

/// A backfill's clock, in this process.
struct Backfill {
    started: Instant,
    start_cursor: Position,
    last_log: Instant,
}

impl Backfill {
    fn new(cursor: Position) -> Backfill {
        let now = Instant::now();
        Backfill {
            started: now,
            start_cursor: cursor,
            last_log: now,
        }
    }

    fn rate(&self, cursor: Position) -> f64 {
        let seconds = self.started.elapsed().as_secs_f64();
        if seconds <= 0.0 {
            return 0.0;
        }
        cursor.0.saturating_sub(self.start_cursor.0) as f64 / seconds
    }

    fn log_due(&mut self, interval: Duration) -> bool {
        if self.last_log.elapsed() >= interval {
            self.last_log = Instant::now();
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use headwater_core::{EventId, EventType, Subject, Timestamp};

    fn event(source: u64, bytes: usize) -> ProjectedEvent {
        ProjectedEvent {
            id: EventId::new_random(),
            event_type: EventType::new("t.e").unwrap(),
            subject: Subject::new("s").unwrap(),
            time: Timestamp(0),
            data: vec![b'1'; bytes],
            source_position: Position(source),
        }
    }

    #[test]
    fn split_keeps_an_internal_events_output_together_and_covers_the_range() {
        // Sources: 2, 2, 2, 5, 7, 7 in (1, 9].
        let events: Vec<_> = [2, 2, 2, 5, 7, 7].iter().map(|&s| event(s, 10)).collect();
        // (events_max, bytes_max, [(from, to, events)])
        type Case = (usize, usize, &'static [(u64, u64, usize)]);
        let cases: &[Case] = &[
            (100, 1000, &[(1, 9, 6)]),
            (3, 1000, &[(1, 2, 3), (2, 9, 3)]),
            (2, 1000, &[(1, 2, 3), (2, 5, 1), (5, 9, 2)]),
            (1, 1000, &[(1, 2, 3), (2, 5, 1), (5, 9, 2)]),
            (100, 45, &[(1, 5, 4), (5, 9, 2)]),
            (100, 35, &[(1, 2, 3), (2, 9, 3)]),
        ];
        for &(events_max, bytes_max, expected) in cases {
            let batches = split(
                Position(1),
                Position(9),
                events.clone(),
                events_max,
                bytes_max,
            );
            let got: Vec<_> = batches
                .iter()
                .map(|b| (b.from.0, b.to.0, b.events.len()))
                .collect();
            assert_eq!(
                got, expected,
                "events_max {events_max}, bytes_max {bytes_max}"
            );
            for batch in &batches {
                headwater_store::validate_batch(batch).unwrap();
            }
        }
        let empty = split(Position(3), Position(4), Vec::new(), 10, 10);
        assert_eq!(empty.len(), 1);
        assert_eq!((empty[0].from, empty[0].to), (Position(3), Position(4)));
    }
}

#[cfg(test)]
mod split_properties {
    use super::*;
    use headwater_core::{EventId, EventType, Subject, Timestamp};
    use proptest::prelude::*;

    proptest! {
        /// Whatever the output and limits: the batches chain from `from` to `to`, hold every
        /// event once in order, keep each internal event's output whole, pass `validate_batch`,
        /// and respect the limits unless one internal event's output alone exceeds them.
        #[test]
        fn batches_chain_and_hold_everything(
            groups in proptest::collection::vec((1u64..4, 1usize..5, 0usize..50), 0..40),
            events_max in 1usize..20,
            bytes_max in 1usize..300,
        ) {
            let from = Position(10);
            let mut source = from.0;
            let mut events = Vec::new();
            for (gap, count, bytes) in &groups {
                source += gap;
                for _ in 0..*count {
                    events.push(ProjectedEvent {
                        id: EventId::new_random(),
                        event_type: EventType::new("t.e").unwrap(),
                        subject: Subject::new("s").unwrap(),
                        time: Timestamp(0),
                        data: vec![b'1'; *bytes],
                        source_position: Position(source),
                    });
                }
            }
            let to = Position(source + 2);
            let batches = split(from, to, events.clone(), events_max, bytes_max);
            prop_assert!(!batches.is_empty());
            prop_assert_eq!(batches[0].from, from);
            prop_assert_eq!(batches.last().unwrap().to, to);
            for pair in batches.windows(2) {
                prop_assert_eq!(pair[0].to, pair[1].from);
            }
            let mut all = Vec::new();
            for batch in &batches {
                prop_assert!(headwater_store::validate_batch(batch).is_ok());
                let sources: std::collections::BTreeSet<_> =
                    batch.events.iter().map(|e| e.source_position).collect();
                let bytes: usize = batch.events.iter().map(|e| e.data.len()).sum();
                if sources.len() > 1 {
                    prop_assert!(batch.events.len() <= events_max && bytes <= bytes_max);
                }
                all.extend(batch.events.iter().map(|e| e.id));
            }
            let expected: Vec<_> = events.iter().map(|e| e.id).collect();
            prop_assert_eq!(all, expected);
        }
    }
}
