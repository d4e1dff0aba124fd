//! The move of a consumer from one feed version to another without downtime (G10;
//! docs/design/consumer.md, "The switch").
//!
//! A [`VersionedConsumer`] is the consumer of one projection across its versions. One version is
//! **active**: its transport runs and readers read its view. When the service asks for another
//! version (the *target*, e.g. it was restarted with `--feed accounts.v2`), the target's view is
//! built **beside** the active one, in the same view store, while the active one keeps applying
//! and serving reads:
//!
//! 1. wait until the producer lists the target `live` (a backfilling version does not yet hold
//!    the whole history);
//! 2. start the target's live transport (the HTTP feed) at the head the producer listed, so that
//!    everything appended from then on arrives live;
//! 3. walk every subject the producer lists for the target and fetch what its cursor lacks (the
//!    bootstrap of the whole view; [`Consumer::reconstitute`]);
//! 4. wait until the target's transport reached the head the producer lists after the walk;
//! 5. **flip**: the mark `active/{consumer}` is set to the target in one durable write of the
//!    view store, then the in-memory active version is swapped in one step — a reader holds one
//!    version or the other, never a mix;
//! 6. stop the old version's transport: the consumer reads only the target from then on, so the
//!    producer's `readers` of the old version stop moving and its token name shows on the new
//!    one.
//!
//! **One view store, both versions.** Cursors and feed positions are keyed by feed id, so one
//! store holds both versions' cursors; the user's handler writes each version's rows to its own
//! tables (it sees `event.feed`), and the mark lives in the same store. One store keeps the flip
//! one write, with no transaction across stores, and lets a reader of an embedded or PostgreSQL
//! view read the mark and the rows in one transaction if it wants.
//!
//! **Restart-safe at every step.** Before the flip the mark names the old version: a restart
//! serves the old view and resumes the build (the target's cursors and feed position are
//! durable; the walk skips what is caught up). After the flip it names the target: a restart
//! follows the target alone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use headwater_core::{FeedId, FeedStatus, FeedVersion};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::consumer::{ConsumeError, Consumer, ConsumerOptions, FEED_WAIT_DEFAULT};
use crate::upstream::{Upstream, UpstreamError};
use crate::view::{ViewError, ViewStore};

/// The prefix of the mark that holds a consumer's active feed: `active/{consumer}` →
/// `accounts.v2`.
pub const ACTIVE_MARK_PREFIX: &str = "active/";
/// The longest consumer name, in bytes.
pub const CONSUMER_NAME_BYTES_MAX: usize = 128;
/// How often a move asks the producer again, by default, while the target is backfilling or the
/// producer is unavailable.
pub const SWITCH_POLL_INTERVAL_DEFAULT: Duration = Duration::from_millis(500);
/// How long a move that failed waits before it tries again, by default (the active version
/// serves meanwhile).
pub const SWITCH_RETRY_INTERVAL_DEFAULT: Duration = Duration::from_secs(30);
/// How often a move looks whether the target's transport reached the head.
const CATCH_UP_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// With no mark yet, this many versions below the target are looked at for cursors (a view
/// made before the switch existed: the version it holds stays active until the move is done).
const EARLIER_VERSIONS_CHECKED_MAX: u32 = 16;

/// How a [`VersionedConsumer`] behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SwitchOptions {
    /// The options of each version's [`Consumer`].
    pub consumer: ConsumerOptions,
    /// How long one long poll of a feed waits ([`FEED_WAIT_DEFAULT`]).
    pub feed_wait: Duration,
    /// How often a move asks again while the target is backfilling or the producer is
    /// unavailable ([`SWITCH_POLL_INTERVAL_DEFAULT`]).
    pub poll_interval: Duration,
    /// How long a move that failed (the target retired or refused, an event of it refused by the
    /// view) waits before it tries again ([`SWITCH_RETRY_INTERVAL_DEFAULT`]).
    pub retry_interval: Duration,
    /// When the active feed is retired by the producer (410) with a successor of the same
    /// projection, move to the successor (default `true`); otherwise [`VersionedConsumer::run`]
    /// ends with the refusal, whose [`crate::Refusal::successor`] names it.
    pub follow_successor: bool,
}

impl Default for SwitchOptions {
    fn default() -> SwitchOptions {
        SwitchOptions {
            consumer: ConsumerOptions::default(),
            feed_wait: FEED_WAIT_DEFAULT,
            poll_interval: SWITCH_POLL_INTERVAL_DEFAULT,
            retry_interval: SWITCH_RETRY_INTERVAL_DEFAULT,
            follow_successor: true,
        }
    }
}

impl SwitchOptions {
    #[must_use]
    pub fn with_consumer(mut self, options: ConsumerOptions) -> SwitchOptions {
        self.consumer = options;
        self
    }

    #[must_use]
    pub fn with_feed_wait(mut self, wait: Duration) -> SwitchOptions {
        self.feed_wait = wait;
        self
    }

    #[must_use]
    pub fn with_poll_interval(mut self, interval: Duration) -> SwitchOptions {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    #[must_use]
    pub fn with_retry_interval(mut self, interval: Duration) -> SwitchOptions {
        self.retry_interval = interval.max(Duration::from_millis(1));
        self
    }

    #[must_use]
    pub fn with_follow_successor(mut self, follow: bool) -> SwitchOptions {
        self.follow_successor = follow;
        self
    }
}

/// Where a [`VersionedConsumer`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SwitchPhase {
    /// Not running.
    Idle,
    /// The active version is the target; its transport runs.
    Following,
    /// Moving: the producer still backfills the target; the active version is followed.
    WaitingForLive,
    /// Moving: every subject of the target is being fetched, its live transport runs.
    Walking,
    /// Moving: the walk is done; waiting for the target's transport to reach the head.
    CatchingUp,
}

/// What a [`VersionedConsumer`] is doing (for `/status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SwitchStatus {
    /// The consumer's name (its mark is `active/{consumer}`).
    pub consumer: String,
    /// The version readers read (`accounts.v1`).
    pub active: String,
    /// The version asked for; equal to `active` when no move is under way.
    pub target: String,
    pub phase: SwitchPhase,
    /// Subjects listed and events applied by the last walk of a move.
    pub walked_subjects: u64,
    pub walk_applied: u64,
    /// Flips done since this process started.
    pub switches: u64,
    /// The last error seen by a move or a transport (the move goes on where it can).
    pub last_error: Option<String>,
}

/// Why a [`VersionedConsumer`] could not open or move.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SwitchError {
    /// The consumer's name is empty, longer than [`CONSUMER_NAME_BYTES_MAX`] or holds a control
    /// character or `/`.
    #[error(
        "a consumer name is 1 to {CONSUMER_NAME_BYTES_MAX} bytes without control characters or `/`"
    )]
    Name,
    /// The active mark holds something that is not a feed id.
    #[error("the mark {key} holds {value:?}, which is not a feed id")]
    Mark { key: String, value: String },
    /// The producer lists the target as retired: moving to it would end on a frozen view.
    #[error("{feed} is retired at the producer{}", successor.as_ref().map(|s| format!(" (its successor is {s})")).unwrap_or_default())]
    TargetRetired {
        feed: FeedId,
        successor: Option<FeedId>,
    },
    /// A transport task ended abnormally (a panic in the handler or the view store).
    #[error("the transport of {feed} ended abnormally: {reason}")]
    Transport { feed: FeedId, reason: String },
    /// A consumer's rule failed for good (the producer refuses, the view refuses an event).
    #[error(transparent)]
    Consume(#[from] ConsumeError),
    /// The view store failed.
    #[error(transparent)]
    View(#[from] ViewError),
}

impl SwitchError {
    /// The feed that replaces a retired one, when the error is a producer's refusal of a retired
    /// feed that names its successor.
    pub fn successor(&self) -> Option<&FeedId> {
        match self {
            SwitchError::Consume(ConsumeError::Upstream(e)) => e.successor(),
            SwitchError::TargetRetired { successor, .. } => successor.as_ref(),
            _ => None,
        }
    }
}

/// The readers' handle: which version is active, and its [`Consumer`] (to read its feed id, or
/// to bootstrap a subject on demand with [`Consumer::ensure`]). Cheap to clone.
///
/// A read takes **one** snapshot with [`ActiveFeed::consumer`] and reads only that version's
/// tables: the flip swaps the whole `Arc` in one step, so a reader holds either the old version
/// or the new one, never a mix. A snapshot of the old version taken just before the flip stays
/// valid (its view is complete and consistent; it just stops moving).
pub struct ActiveFeed<V, U> {
    active: watch::Receiver<Arc<Consumer<V, U>>>,
}

impl<V, U> Clone for ActiveFeed<V, U> {
    fn clone(&self) -> Self {
        ActiveFeed {
            active: self.active.clone(),
        }
    }
}

impl<V, U> std::fmt::Debug for ActiveFeed<V, U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveFeed")
            .field("consumer", &*self.active.borrow())
            .finish()
    }
}

impl<V: ViewStore, U: Upstream> ActiveFeed<V, U> {
    /// The active version's consumer, as one snapshot.
    pub fn consumer(&self) -> Arc<Consumer<V, U>> {
        Arc::clone(&self.active.borrow())
    }

    /// The active feed.
    pub fn feed(&self) -> FeedId {
        self.active.borrow().feed().clone()
    }

    /// Waits until the active version changes (a flip since this handle last looked) and returns
    /// the new one; `None` when the [`VersionedConsumer`] is gone. For what is bound to one
    /// version's consumer — a `Walker`, a metrics view — and must follow the flip.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn changed(&mut self) -> Option<FeedId> {
        self.active.changed().await.ok()?;
        Some(self.active.borrow_and_update().feed().clone())
    }

    /// Waits until the active version is `feed` (returns at once if it is).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn wait_for(&mut self, feed: &FeedId) {
        // The sender lives as long as the VersionedConsumer; if it is gone, nothing will flip.
        let _ = self.active.wait_for(|c| c.feed() == feed).await;
    }
}

/// The consumer of one projection across its versions: follows the active version, builds
/// another beside it on request and flips to it atomically. See the module documentation.
pub struct VersionedConsumer<V, U> {
    name: String,
    mark: String,
    view: Arc<V>,
    upstream: Arc<U>,
    options: SwitchOptions,
    active: watch::Sender<Arc<Consumer<V, U>>>,
    target: watch::Sender<FeedId>,
    /// The consumer of the version being (or last) moved to: made once per version, so its
    /// counters and registered metrics carry over a stopped and resumed move.
    prepared: std::sync::Mutex<Option<Arc<Consumer<V, U>>>>,
    status: watch::Sender<SwitchStatus>,
    metrics: SwitchMetrics,
}

/// The switch's metrics (`headwater_consumer_…`, labelled with the consumer's name).
#[derive(Debug, Default)]
struct SwitchMetrics {
    switches: Counter,
    active_version: Gauge,
    moving: Gauge,
}

impl<V, U> std::fmt::Debug for VersionedConsumer<V, U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VersionedConsumer")
            .field("name", &self.name)
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl<V: ViewStore, U: Upstream> VersionedConsumer<V, U> {
    /// Opens the consumer `name` of `feed` on `view`: the active version is the one the mark
    /// `active/{name}` names; without a mark, the highest version below `feed` (at most 16 below)
    /// of which the view holds cursors, else `feed` itself — and the mark is then written. When
    /// the active version is not `feed`, [`VersionedConsumer::run`] moves to `feed`.
    ///
    /// # Errors
    /// [`SwitchError::Name`] for a bad name, [`SwitchError::Mark`] for a mark that is not a feed
    /// id, [`SwitchError::View`] when the view store fails.
    ///
    /// # Durability
    /// A mark written here is durable on `Ok` (`ViewStore::set_mark`).
    ///
    /// # Cancel safety
    /// Cancel safe: the only write is the mark, which a later open writes the same.
    pub async fn open(
        name: &str,
        feed: FeedId,
        view: Arc<V>,
        upstream: Arc<U>,
        options: SwitchOptions,
    ) -> Result<VersionedConsumer<V, U>, SwitchError> {
        if name.is_empty()
            || name.len() > CONSUMER_NAME_BYTES_MAX
            || name.chars().any(|c| c.is_control() || c == '/')
        {
            return Err(SwitchError::Name);
        }
        let mark = format!("{ACTIVE_MARK_PREFIX}{name}");
        let active = match view.mark(&mark).await? {
            Some(value) => FeedId::parse(&value).map_err(|_| SwitchError::Mark {
                key: mark.clone(),
                value,
            })?,
            None => {
                let active = earlier_version_held(&*view, &feed)
                    .await?
                    .unwrap_or_else(|| feed.clone());
                view.set_mark(&mark, Some(&active.to_string())).await?;
                active
            }
        };
        let make = |feed: &FeedId| {
            Arc::new(Consumer::new(
                feed.clone(),
                Arc::clone(&view),
                Arc::clone(&upstream),
                options.consumer.clone(),
            ))
        };
        let consumer = make(&active);
        let prepared = (active != feed).then(|| make(&feed));
        let metrics = SwitchMetrics::default();
        metrics.active_version.set(i64::from(active.version.get()));
        let status = SwitchStatus {
            consumer: name.to_owned(),
            active: active.to_string(),
            target: feed.to_string(),
            phase: SwitchPhase::Idle,
            walked_subjects: 0,
            walk_applied: 0,
            switches: 0,
            last_error: None,
        };
        Ok(VersionedConsumer {
            name: name.to_owned(),
            mark,
            view,
            upstream,
            options,
            active: watch::channel(consumer).0,
            target: watch::channel(feed).0,
            prepared: std::sync::Mutex::new(prepared),
            status: watch::channel(status).0,
            metrics,
        })
    }

    /// The consumer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The readers' handle.
    pub fn active(&self) -> ActiveFeed<V, U> {
        ActiveFeed {
            active: self.active.subscribe(),
        }
    }

    /// The version asked for.
    pub fn target(&self) -> FeedId {
        self.target.borrow().clone()
    }

    /// Asks for another version while running (an operator's command, a demo): a running
    /// [`VersionedConsumer::run`] stops following the active version's transport only once the
    /// new one is built and flipped to. Asking for the active version abandons a move in progress
    /// (what it built stays, for a later move to resume). Not durable: a restart moves to the
    /// version given to [`VersionedConsumer::open`].
    pub fn switch_to(&self, feed: FeedId) {
        self.set_target(feed);
    }

    /// What it is doing.
    pub fn status(&self) -> SwitchStatus {
        self.status.borrow().clone()
    }

    /// Registers the metrics into `registry`: the switch's own, labelled with the consumer's
    /// name — `headwater_consumer_switches_total` (flips), `headwater_consumer_active_version`,
    /// `headwater_consumer_switch_moving` (1 while a move is under way) — and those of the
    /// active version's [`Consumer`] and, when a move is asked for at open, of the target's
    /// (labelled by feed: [`Consumer::register_metrics`]). A consumer made later (a move to a
    /// successor asked for while running) is not registered. Register once.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let r = registry
            .sub_registry_with_prefix("headwater_consumer")
            .sub_registry_with_label(("consumer".into(), self.name.clone().into()));
        r.register(
            "switches",
            "Flips of the active feed version",
            self.metrics.switches.clone(),
        );
        r.register(
            "active_version",
            "The feed version readers read",
            self.metrics.active_version.clone(),
        );
        r.register(
            "switch_moving",
            "1 while a new feed version is built beside the active one",
            self.metrics.moving.clone(),
        );
        let active = Arc::clone(&self.active.borrow());
        active.register_metrics(registry);
        let prepared = self
            .prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(prepared) = prepared.filter(|p| p.feed() != active.feed()) {
            prepared.register_metrics(registry);
        }
    }

    /// The consumer of `feed` for a move: the one made before for it, or a new one.
    fn consumer_for(&self, feed: &FeedId) -> Arc<Consumer<V, U>> {
        let mut prepared = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        match &*prepared {
            Some(consumer) if consumer.feed() == feed => Arc::clone(consumer),
            _ => {
                let consumer = Arc::new(Consumer::new(
                    feed.clone(),
                    Arc::clone(&self.view),
                    Arc::clone(&self.upstream),
                    self.options.consumer.clone(),
                ));
                *prepared = Some(Arc::clone(&consumer));
                consumer
            }
        }
    }

    /// What it is doing, as it changes.
    pub fn watch_status(&self) -> watch::Receiver<SwitchStatus> {
        self.status.subscribe()
    }

    /// Follows the active version until `stop` resolves; when the target is another version,
    /// moves to it first (builds it beside the active one, flips, stops the old transport) and
    /// then follows it. When the active feed is retired with a successor of the same projection
    /// and [`SwitchOptions::follow_successor`] is set, moves to the successor.
    ///
    /// A move never takes the active version down: a target that cannot be built yet (retired,
    /// refused, one of its events refused by the view) is tried again every
    /// [`SwitchOptions::retry_interval`] while the active version keeps serving, the reason in
    /// [`SwitchStatus::last_error`].
    ///
    /// # Errors
    /// [`SwitchError`] for what ends the active version's transport and waiting cannot fix: the
    /// producer refuses it (a bad token, an unknown feed, a retired feed without a successor to
    /// move to), a transport panicked, the view store fails. A producer that is unavailable is
    /// waited for.
    ///
    /// # Cancel safety
    /// Cancel safe in effect: every step is durable where it must be (cursors, feed positions,
    /// the mark), and the transport tasks it started are stopped when it is dropped; prefer
    /// `stop`. Running it twice at once for one consumer is not supported.
    pub async fn run(
        &self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), SwitchError> {
        tokio::pin!(stop);
        let result = self.run_until(stop.as_mut()).await;
        self.status.send_modify(|s| {
            s.phase = SwitchPhase::Idle;
            if let Err(e) = &result {
                s.last_error = Some(e.to_string());
            }
        });
        result
    }

    async fn run_until(
        &self,
        mut stop: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<(), SwitchError> {
        loop {
            let active = Arc::clone(&self.active.borrow());
            let target = self.target();
            // What ends this round: the caller's stop, or another target asked for.
            let stopped = AtomicBool::new(false);
            let mut targets = self.target.subscribe();
            let interrupt = async {
                tokio::select! {
                    () = stop.as_mut() => stopped.store(true, Ordering::Relaxed),
                    _ = targets.wait_for(|t| *t != target) => {}
                }
            };
            tokio::pin!(interrupt);
            if *active.feed() != target {
                self.move_to(&active, &target, interrupt.as_mut()).await?;
                if stopped.load(Ordering::Relaxed) {
                    return Ok(());
                }
                continue;
            }
            self.status
                .send_modify(|s| s.phase = SwitchPhase::Following);
            match active
                .follow_feed(self.options.feed_wait, interrupt.as_mut())
                .await
            {
                Ok(()) if stopped.load(Ordering::Relaxed) => return Ok(()),
                Ok(()) => {}
                Err(ConsumeError::Upstream(e)) => match self.successor_to_follow(&target, &e) {
                    Some(successor) => {
                        tracing::warn!(consumer = %self.name, retired = %target, %successor, "the active feed is retired; moving to its successor");
                        self.set_target(successor);
                    }
                    None => return Err(ConsumeError::Upstream(e).into()),
                },
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The successor to move to when `error` says that `retired` is retired.
    fn successor_to_follow(&self, retired: &FeedId, error: &UpstreamError) -> Option<FeedId> {
        let refusal = error.refusal()?;
        let successor = refusal.successor.as_ref()?;
        (self.options.follow_successor
            && refusal.is_retired()
            && successor.name == retired.name
            && successor != retired)
            .then(|| successor.clone())
    }

    fn set_target(&self, feed: FeedId) {
        let text = feed.to_string();
        self.target.send_replace(feed);
        self.status.send_modify(|s| s.target = text);
    }

    fn note_error(&self, error: &dyn std::fmt::Display) {
        let text = error.to_string();
        self.status.send_modify(|s| s.last_error = Some(text));
    }

    /// Builds `target` beside `active` (whose transport keeps running), flips, stops the old
    /// transport; or returns early, before the flip, when `stop` resolves. A build that fails
    /// (the target retired or refused, an event of it refused by the view, its transport ended)
    /// is tried again after [`SwitchOptions::retry_interval`] while the active version keeps
    /// serving: a move never takes the active version down.
    ///
    /// # Errors
    /// Only what ends the active version's transport (other than its feed being retired).
    async fn move_to(
        &self,
        active: &Arc<Consumer<V, U>>,
        target: &FeedId,
        mut stop: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<(), SwitchError> {
        tracing::info!(consumer = %self.name, from = %active.feed(), to = %target, "moving to another feed version; the active one keeps serving");
        self.metrics.moving.set(1);
        let _moving = Moving(&self.metrics.moving);
        let mut old = Some(Transport::spawn(Arc::clone(active), self.options.feed_wait));
        let new_consumer = self.consumer_for(target);
        let new = loop {
            match self.build(target, &new_consumer, stop.as_mut()).await {
                Ok(Some(new)) => break new,
                Ok(None) => {
                    if let Some(old) = old {
                        old.stop().await.ok();
                    }
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(consumer = %self.name, feed = %target, error = %e, retry_in = ?self.options.retry_interval, "the new version cannot be built yet; the active one keeps serving");
                    self.note_error(&e);
                }
            }
            // The active version's transport must go on while the move waits; if its feed was
            // retired, its view just stays as it is.
            if let Some(ended) = old.take_if(|t| t.finished()) {
                match ended.stop().await {
                    Err(e) if !is_retired(&e) => return Err(e),
                    _ => {}
                }
            }
            if !pause(self.options.retry_interval, stop.as_mut()).await {
                if let Some(old) = old {
                    old.stop().await.ok();
                }
                return Ok(());
            }
        };

        // 5. The flip: durable first, then readers see the new version in one step.
        self.view
            .set_mark(&self.mark, Some(&target.to_string()))
            .await?;
        self.metrics.switches.inc();
        self.metrics
            .active_version
            .set(i64::from(target.version.get()));
        self.status.send_modify(|s| {
            s.active = target.to_string();
            s.phase = SwitchPhase::Following;
            s.switches += 1;
            s.last_error = None;
        });
        self.metrics.moving.set(0);
        self.active.send_replace(new_consumer);
        tracing::info!(consumer = %self.name, from = %active.feed(), to = %target, "switched: readers read the new version");

        // 6. The old version is no longer read; the new one's transport is restarted by `run`.
        if let Some(old) = old
            && let Err(e) = old.stop().await
        {
            tracing::warn!(consumer = %self.name, feed = %active.feed(), error = %e, "the old version's transport had failed");
        }
        new.stop().await?;
        Ok(())
    }

    /// Steps 1 to 4 of a move: `target`'s view built beside the active one, its transport
    /// running at the head. `Some(that transport)` when it is ready to flip to; `None` when
    /// stopped first.
    async fn build(
        &self,
        target: &FeedId,
        consumer: &Arc<Consumer<V, U>>,
        mut stop: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<Option<Transport>, SwitchError> {
        // 1. The target must be live: a backfilling version does not hold the whole history yet.
        self.status
            .send_modify(|s| s.phase = SwitchPhase::WaitingForLive);
        let Some(head) = self.listed_head(target, stop.as_mut()).await? else {
            return Ok(None);
        };

        // 2. The live transport starts at the head listed now; the walk brings what is before.
        if let Some(head) = head
            && self.view.feed_position(target).await? == 0
        {
            self.view.save_feed_position(target, head).await?;
        }
        let new = Transport::spawn(Arc::clone(consumer), self.options.feed_wait);

        // 3. The walk: every subject the producer lists, caught up to at least its listed head.
        self.status.send_modify(|s| s.phase = SwitchPhase::Walking);
        let report = loop {
            let walk = tokio::select! {
                () = stop.as_mut() => {
                    new.stop().await.ok();
                    return Ok(None);
                }
                walk = consumer.reconstitute() => walk,
            };
            match walk {
                Ok(report) => break report,
                Err(ConsumeError::Upstream(e)) if e.is_transient() => {
                    tracing::warn!(consumer = %self.name, feed = %target, error = %e, "the walk of the new version waits for the producer");
                    self.note_error(&e);
                    if !pause(self.options.poll_interval, stop.as_mut()).await {
                        new.stop().await.ok();
                        return Ok(None);
                    }
                }
                Err(e) => {
                    new.stop().await.ok();
                    return Err(e.into());
                }
            }
        };
        self.status.send_modify(|s| {
            s.walked_subjects = report.subjects;
            s.walk_applied = report.applied;
        });
        tracing::info!(consumer = %self.name, feed = %target, subjects = report.subjects, applied = report.applied, "the new version's view is built");

        // 4. The live transport has reached the head listed after the walk.
        self.status
            .send_modify(|s| s.phase = SwitchPhase::CatchingUp);
        let Some(head) = self.listed_head(target, stop.as_mut()).await? else {
            new.stop().await.ok();
            return Ok(None);
        };
        if let Some(head) = head {
            loop {
                if new.finished() {
                    return Err(new.stop().await.err().unwrap_or(SwitchError::Transport {
                        feed: target.clone(),
                        reason: "it stopped before the flip".into(),
                    }));
                }
                if self.view.feed_position(target).await? >= head {
                    break;
                }
                tokio::select! {
                    () = stop.as_mut() => {
                        new.stop().await.ok();
                        return Ok(None);
                    }
                    () = tokio::time::sleep(CATCH_UP_POLL_INTERVAL) => {}
                }
            }
        }
        Ok(Some(new))
    }

    /// The target's head as the producer lists it once it is live (`Some(None)` when the
    /// producer does not list it); `None` when stopped first.
    async fn listed_head(
        &self,
        target: &FeedId,
        mut stop: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<Option<Option<u64>>, SwitchError> {
        loop {
            let listing = tokio::select! {
                () = stop.as_mut() => return Ok(None),
                listing = self.upstream.feed_listing(target) => listing,
            };
            match listing {
                Ok(None) => return Ok(Some(None)),
                Ok(Some(listing)) => match listing.status {
                    FeedStatus::Live => return Ok(Some(Some(listing.head))),
                    FeedStatus::Retired => {
                        return Err(SwitchError::TargetRetired {
                            feed: target.clone(),
                            successor: None,
                        });
                    }
                    _ => {}
                },
                Err(e) if e.is_transient() => self.note_error(&e),
                Err(e) => {
                    return Err(SwitchError::Consume(ConsumeError::Upstream(e)));
                }
            }
            if !pause(self.options.poll_interval, stop.as_mut()).await {
                return Ok(None);
            }
        }
    }
}

/// Waits `interval`; `false` when `stop` resolved first.
async fn pause(
    interval: Duration,
    stop: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> bool {
    tokio::select! {
        () = stop => false,
        () = tokio::time::sleep(interval) => true,
    }
}

/// Whether `error` is the producer's refusal of a retired feed.
fn is_retired(error: &SwitchError) -> bool {
    match error {
        SwitchError::Consume(ConsumeError::Upstream(e)) => e
            .refusal()
            .is_some_and(crate::upstream::Refusal::is_retired),
        _ => false,
    }
}

/// The highest version of `feed`'s projection below it, at most
/// [`EARLIER_VERSIONS_CHECKED_MAX`] below, of which `view` holds cursors or a feed position.
async fn earlier_version_held<V: ViewStore + ?Sized>(
    view: &V,
    feed: &FeedId,
) -> Result<Option<FeedId>, ViewError> {
    let top = feed.version.get();
    for version in (top.saturating_sub(EARLIER_VERSIONS_CHECKED_MAX).max(1)..top).rev() {
        let Some(version) = FeedVersion::new(version) else {
            continue;
        };
        let earlier = FeedId::new(feed.name.clone(), version);
        if !view.cursors(&earlier, None, 1).await?.is_empty()
            || view.feed_position(&earlier).await? > 0
        {
            return Ok(Some(earlier));
        }
    }
    Ok(None)
}

/// Sets the `moving` gauge back to 0 however a move ends.
struct Moving<'a>(&'a Gauge);

impl Drop for Moving<'_> {
    fn drop(&mut self) {
        self.0.set(0);
    }
}

/// A version's HTTP feed transport on a task of its own, stopped when asked or dropped.
struct Transport {
    feed: FeedId,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), ConsumeError>>>,
}

impl Transport {
    fn spawn<V: ViewStore, U: Upstream>(
        consumer: Arc<Consumer<V, U>>,
        wait: Duration,
    ) -> Transport {
        let (stop, mut stopped) = watch::channel(false);
        let feed = consumer.feed().clone();
        let task = tokio::spawn(async move {
            consumer
                .follow_feed(wait, async move {
                    // Ends on `true`, and when the sender is dropped.
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        });
        Transport {
            feed,
            stop,
            task: Some(task),
        }
    }

    /// Whether the transport ended by itself (it only ends when stopped, or on an error).
    fn finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops it (it finishes the page it is delivering) and says how it ended.
    async fn stop(mut self) -> Result<(), SwitchError> {
        self.stop.send_replace(true);
        // Awaited in place: if this future is dropped, `Drop` still aborts the task.
        let Some(task) = self.task.as_mut() else {
            return Ok(());
        };
        let ended = task.await;
        self.task = None;
        match ended {
            Ok(result) => result.map_err(SwitchError::from),
            Err(e) => Err(SwitchError::Transport {
                feed: self.feed.clone(),
                reason: e.to_string(),
            }),
        }
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
