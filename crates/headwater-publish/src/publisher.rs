//! The publisher follower: reads a feed in order, publishes it to a broker pipelined, and moves a
//! durable cursor over the prefix the broker confirmed (G6).
//!
//! One task per feed. Its life is a loop: wait for leadership → declare the topology → load the
//! cursor → follow (send batches while the in-flight window has room, fold each confirmed batch
//! into the cursor, wait on the feed's head watch when caught up). Any failure — the broker
//! unreachable, a refused message, a store error, a cursor moved by another replica — ends the
//! follow: what is in flight is forgotten (it will be sent again: at least once), the task waits a
//! bounded, jittered, growing delay and starts over from the durable cursor. Nothing is skipped:
//! the cursor only moves over confirmed events, and only forward.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt;
use headwater_core::{FeedId, FeedPosition, Timestamp};
use headwater_store::{AlwaysLead, FeedError, FeedEvent, FeedStore, Leadership, Lease};
use prometheus_client::registry::Registry;
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, PublisherLabel, RefusalLabel};
use crate::{Broker, Outcome, PUBLISH_BATCH_EVENTS_MAX, Pending, Refusal};

/// Events per [`Broker::send`], by default.
pub const BATCH_EVENTS_DEFAULT: usize = 512;
/// Events sent and not yet confirmed, at most, by default.
pub const IN_FLIGHT_EVENTS_DEFAULT: usize = 8192;
/// The largest in-flight window a publisher accepts.
pub const IN_FLIGHT_EVENTS_MAX: usize = 262_144;
/// Bytes of event data sent and not yet confirmed, at most, by default.
pub const IN_FLIGHT_BYTES_DEFAULT: usize = 64 * 1024 * 1024;
/// The first delay after a failure, by default.
pub const BACKOFF_MIN_DEFAULT: Duration = Duration::from_millis(100);
/// The longest delay after failures in a row, by default.
pub const BACKOFF_MAX_DEFAULT: Duration = Duration::from_secs(10);
/// How long a shutdown waits for the confirmations of what is in flight, by default.
pub const SHUTDOWN_GRACE_DEFAULT: Duration = Duration::from_secs(5);
/// How often an idle publisher refreshes its lag figures.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// How a publisher runs.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublisherOptions {
    /// The name of the publisher's cursor in the feed store (`None`: the broker's kind,
    /// `rabbitmq` or `nats`). Two publishers of one feed to two brokers need two names.
    pub name: Option<String>,
    /// Events per send (1 ..= [`PUBLISH_BATCH_EVENTS_MAX`]).
    pub batch_events_max: usize,
    /// Events sent and not yet confirmed, at most (≥ `batch_events_max`, ≤
    /// [`IN_FLIGHT_EVENTS_MAX`]).
    pub in_flight_events_max: usize,
    /// Bytes of event data sent and not yet confirmed, at most (one batch may pass it).
    pub in_flight_bytes_max: usize,
    /// The first delay after a failure.
    pub backoff_min: Duration,
    /// The longest delay after failures in a row.
    pub backoff_max: Duration,
    /// How long a shutdown waits for the confirmations of what is in flight.
    pub shutdown_grace: Duration,
}

impl Default for PublisherOptions {
    fn default() -> PublisherOptions {
        PublisherOptions {
            name: None,
            batch_events_max: BATCH_EVENTS_DEFAULT,
            in_flight_events_max: IN_FLIGHT_EVENTS_DEFAULT,
            in_flight_bytes_max: IN_FLIGHT_BYTES_DEFAULT,
            backoff_min: BACKOFF_MIN_DEFAULT,
            backoff_max: BACKOFF_MAX_DEFAULT,
            shutdown_grace: SHUTDOWN_GRACE_DEFAULT,
        }
    }
}

impl PublisherOptions {
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> PublisherOptions {
        self.name = Some(name.into());
        self
    }

    #[must_use]
    pub fn with_batch_events_max(mut self, events: usize) -> PublisherOptions {
        self.batch_events_max = events;
        self
    }

    #[must_use]
    pub fn with_in_flight_events_max(mut self, events: usize) -> PublisherOptions {
        self.in_flight_events_max = events;
        self
    }

    #[must_use]
    pub fn with_in_flight_bytes_max(mut self, bytes: usize) -> PublisherOptions {
        self.in_flight_bytes_max = bytes;
        self
    }

    #[must_use]
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> PublisherOptions {
        self.backoff_min = min;
        self.backoff_max = max;
        self
    }

    #[must_use]
    pub fn with_shutdown_grace(mut self, grace: Duration) -> PublisherOptions {
        self.shutdown_grace = grace;
        self
    }

    fn validate(&self) -> Result<(), StartError> {
        let invalid = |reason: String| Err(StartError::Options(reason));
        if !(1..=PUBLISH_BATCH_EVENTS_MAX).contains(&self.batch_events_max) {
            return invalid(format!(
                "batch_events_max is 1 to {PUBLISH_BATCH_EVENTS_MAX}, not {}",
                self.batch_events_max
            ));
        }
        if !(self.batch_events_max..=IN_FLIGHT_EVENTS_MAX).contains(&self.in_flight_events_max) {
            return invalid(format!(
                "in_flight_events_max is batch_events_max ({}) to {IN_FLIGHT_EVENTS_MAX}, not {}",
                self.batch_events_max, self.in_flight_events_max
            ));
        }
        if self.in_flight_bytes_max == 0 {
            return invalid("in_flight_bytes_max is at least 1".into());
        }
        if self.backoff_min.is_zero() || self.backoff_min > self.backoff_max {
            return invalid(format!(
                "backoff_min ({:?}) is above zero and at most backoff_max ({:?})",
                self.backoff_min, self.backoff_max
            ));
        }
        Ok(())
    }
}

/// Why the publishers could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The options break a rule.
    #[error("invalid publisher options: {0}")]
    Options(String),
    /// The publisher's name is not a valid cursor name.
    #[error("invalid publisher name: {0}")]
    Name(#[source] FeedError),
    /// One feed was given twice.
    #[error("the feed {0} is published twice")]
    DuplicateFeed(FeedId),
}

/// What a publisher is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublisherState {
    /// Another replica publishes this feed; this one waits to take over.
    WaitingForLeadership,
    /// Declaring the feed's exchange or stream on the broker.
    Declaring,
    /// Sending and confirming.
    Publishing,
    /// Every event of the feed is confirmed; waiting for more.
    CaughtUp,
    /// The feed is not registered yet (no projection made it).
    WaitingForFeed,
    /// After a failure: waiting a moment before starting over from the cursor.
    Backoff,
    /// Shut down.
    Stopped,
}

impl PublisherState {
    pub fn as_str(self) -> &'static str {
        match self {
            PublisherState::WaitingForLeadership => "waiting-for-leadership",
            PublisherState::Declaring => "declaring",
            PublisherState::Publishing => "publishing",
            PublisherState::CaughtUp => "caught-up",
            PublisherState::WaitingForFeed => "waiting-for-feed",
            PublisherState::Backoff => "backoff",
            PublisherState::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for PublisherState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A publisher's state as it last reported it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct PublisherStatus {
    pub feed: FeedId,
    /// The name of its cursor.
    pub publisher: String,
    pub state: PublisherState,
    /// The last feed position the broker confirmed with every one before it (durable).
    pub cursor: FeedPosition,
    /// The feed's head as last seen.
    pub head: FeedPosition,
    /// Events sent and not yet confirmed.
    pub in_flight: u64,
    /// Events confirmed by this process.
    pub confirmed: u64,
    /// Times this process started over after a failure.
    pub reconnects: u64,
    /// Age of the oldest event not yet confirmed, by its `time` (zero when caught up).
    pub lag: Duration,
    /// The last failure, until the next confirmed batch.
    pub last_error: Option<String>,
}

/// How to start a service's publishers: `Publishers::builder(broker, source).feed(v1).feed(v2)
/// .start(feeds)`.
pub struct PublishersBuilder {
    broker: Arc<dyn Broker>,
    source: Arc<str>,
    feeds: Vec<FeedId>,
    options: PublisherOptions,
    leadership: Arc<dyn Leadership>,
    metrics: Metrics,
}

impl std::fmt::Debug for PublishersBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishersBuilder")
            .field("broker", &self.broker.kind())
            .field("source", &self.source)
            .field("feeds", &self.feeds)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl PublishersBuilder {
    /// Publishes this feed version (each gets its own follower and cursor).
    #[must_use]
    pub fn feed(mut self, feed: FeedId) -> PublishersBuilder {
        self.feeds.push(feed);
        self
    }

    #[must_use]
    pub fn options(mut self, options: PublisherOptions) -> PublishersBuilder {
        self.options = options;
        self
    }

    /// Who publishes when several replicas share a store (default: [`AlwaysLead`], right for the
    /// embedded store). The follower's name is `publisher/{name}/{feed}`.
    #[must_use]
    pub fn leadership(mut self, leadership: impl Leadership) -> PublishersBuilder {
        self.leadership = Arc::new(leadership);
        self
    }

    /// Registers the publishers' metrics (`headwater_publisher_*`, labelled by feed and
    /// publisher) into `registry`.
    #[must_use]
    pub fn metrics(self, registry: &mut Registry) -> PublishersBuilder {
        self.metrics.register(registry);
        self
    }

    /// Starts one publisher task per feed, on the current tokio runtime. They connect, declare
    /// and publish in the background: a broker that is down delays publishing, never the start.
    ///
    /// # Errors
    /// [`StartError`] for invalid options, an invalid name, a feed given twice.
    pub fn start<F>(self, feeds: Arc<F>) -> Result<Publishers, StartError>
    where
        F: FeedStore + ?Sized,
    {
        self.options.validate()?;
        let name = self
            .options
            .name
            .clone()
            .unwrap_or_else(|| self.broker.kind().to_owned());
        headwater_store::validate_publisher_name(&name).map_err(StartError::Name)?;
        let mut seen = std::collections::BTreeSet::new();
        for feed in &self.feeds {
            if !seen.insert(feed.clone()) {
                return Err(StartError::DuplicateFeed(feed.clone()));
            }
        }
        let shutdown = CancellationToken::new();
        let mut running = Vec::with_capacity(self.feeds.len());
        for feed in self.feeds {
            let label = PublisherLabel {
                feed: feed.to_string(),
                publisher: name.clone(),
            };
            let (status, status_rx) = watch::channel(PublisherStatus {
                feed: feed.clone(),
                publisher: name.clone(),
                state: PublisherState::WaitingForLeadership,
                cursor: FeedPosition::START,
                head: FeedPosition::START,
                in_flight: 0,
                confirmed: 0,
                reconnects: 0,
                lag: Duration::ZERO,
                last_error: None,
            });
            let follower = Follower {
                feeds: Arc::clone(&feeds),
                broker: Arc::clone(&self.broker),
                source: Arc::clone(&self.source),
                feed: feed.clone(),
                name: name.clone(),
                options: self.options.clone(),
                leadership: Arc::clone(&self.leadership),
                metrics: self.metrics.clone(),
                label,
                status,
                shutdown: shutdown.clone(),
                failures: 0,
            };
            let task = tokio::spawn(follower.run());
            running.push(Running {
                feed,
                status: status_rx,
                task,
            });
        }
        Ok(Publishers { running, shutdown })
    }
}

/// A service's publishers: one task per feed. Dropping it stops them (without waiting for what is
/// in flight); [`Publishers::shutdown`] stops them gracefully.
#[derive(Debug)]
pub struct Publishers {
    running: Vec<Running>,
    shutdown: CancellationToken,
}

#[derive(Debug)]
struct Running {
    feed: FeedId,
    status: watch::Receiver<PublisherStatus>,
    task: JoinHandle<()>,
}

impl Publishers {
    /// How to start publishers of a service whose CloudEvents have this `source` (the service's
    /// name, as in the feed API).
    pub fn builder(broker: Arc<dyn Broker>, source: impl Into<String>) -> PublishersBuilder {
        PublishersBuilder {
            broker,
            source: source.into().into(),
            feeds: Vec::new(),
            options: PublisherOptions::default(),
            leadership: Arc::new(AlwaysLead),
            metrics: Metrics::default(),
        }
    }

    /// Each publisher's status, in the order the feeds were given.
    pub fn statuses(&self) -> Vec<PublisherStatus> {
        self.running
            .iter()
            .map(|r| r.status.borrow().clone())
            .collect()
    }

    /// A watch of one feed's publisher status.
    pub fn watch(&self, feed: &FeedId) -> Option<watch::Receiver<PublisherStatus>> {
        self.running
            .iter()
            .find(|r| &r.feed == feed)
            .map(|r| r.status.clone())
    }

    /// Stops sending, waits (at most the shutdown grace) for the confirmations of what is in
    /// flight and saves the cursor over them, then stops every task.
    ///
    /// # Cancel safety
    /// Cancel safe: the tasks are told to stop at the first poll and stop on their own.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        for running in self.running.drain(..) {
            if let Err(e) = running.task.await
                && e.is_panic()
            {
                tracing::error!(feed = %running.feed, "a publisher task panicked");
            }
        }
    }
}

impl Drop for Publishers {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// How one leadership term of a follower ended.
enum Ended {
    Shutdown,
    LeaseLost,
    /// Something failed; start over after a backoff.
    Failed,
}

/// A batch sent and not yet confirmed: feed positions `first ..= last`.
struct InFlight {
    first: FeedPosition,
    last: FeedPosition,
    /// The `time` of its first event.
    time: Timestamp,
    bytes: usize,
    pending: Pending,
}

impl InFlight {
    fn events(&self) -> u64 {
        self.last.get() - self.first.get() + 1
    }
}

struct Follower<F: ?Sized> {
    feeds: Arc<F>,
    broker: Arc<dyn Broker>,
    source: Arc<str>,
    feed: FeedId,
    name: String,
    options: PublisherOptions,
    leadership: Arc<dyn Leadership>,
    metrics: Metrics,
    label: PublisherLabel,
    status: watch::Sender<PublisherStatus>,
    shutdown: CancellationToken,
    /// Failures in a row (the backoff's exponent).
    failures: u32,
}

/// The window of one leadership term.
#[derive(Default)]
struct Window {
    batches: VecDeque<InFlight>,
    events: u64,
    bytes: usize,
}

impl<F: FeedStore + ?Sized> Follower<F> {
    async fn run(mut self) {
        let follower = format!("publisher/{}/{}", self.name, self.feed);
        tracing::info!(feed = %self.feed, publisher = %self.name, "publisher started");
        while !self.shutdown.is_cancelled() {
            self.set_state(PublisherState::WaitingForLeadership);
            let lease = tokio::select! {
                () = self.shutdown.cancelled() => break,
                lease = self.leadership.lead(&follower) => lease,
            };
            let lease = match lease {
                Ok(lease) => lease,
                Err(e) => {
                    self.fail(format!("cannot take the leadership: {e}"));
                    self.backoff().await;
                    continue;
                }
            };
            self.metrics.leading.get_or_create(&self.label).set(1);
            let ended = self.lead(&lease).await;
            self.metrics.leading.get_or_create(&self.label).set(0);
            self.metrics.in_flight.get_or_create(&self.label).set(0);
            self.status.send_modify(|s| s.in_flight = 0);
            drop(lease);
            match ended {
                Ended::Shutdown => break,
                Ended::LeaseLost => {
                    tracing::warn!(feed = %self.feed, publisher = %self.name, "publisher lost its leadership");
                }
                Ended::Failed => {
                    self.backoff().await;
                    self.metrics.reconnects.get_or_create(&self.label).inc();
                    self.status.send_modify(|s| s.reconnects += 1);
                }
            }
        }
        self.set_state(PublisherState::Stopped);
        tracing::info!(feed = %self.feed, publisher = %self.name, "publisher stopped");
    }

    /// One leadership term: declare, load the cursor, follow the feed.
    async fn lead(&mut self, lease: &Lease) -> Ended {
        let lost = lease.lost();
        tokio::pin!(lost);
        self.set_state(PublisherState::Declaring);
        let declared = tokio::select! {
            () = self.shutdown.cancelled() => return Ended::Shutdown,
            () = &mut lost => return Ended::LeaseLost,
            declared = self.broker.declare(&self.feed) => declared,
        };
        if let Err(e) = declared {
            self.fail(format!("cannot declare the feed on the broker: {e}"));
            return Ended::Failed;
        }
        let mut cursor = match self.load_cursor().await {
            Ok(cursor) => cursor,
            Err(e) => {
                self.store_failed("reading the publisher's cursor", &e);
                return Ended::Failed;
            }
        };
        self.publish_cursor(cursor);
        let mut head = self.feeds.watch_head(&self.feed);
        let mut window = Window::default();
        // The last position sent.
        let mut sent = cursor;
        let mut draining: Option<Instant> = None;
        // False once the store dropped the head's sender (it is closing): tick instead.
        let mut head_open = true;
        // Slow start: one event in flight, doubled by each batch confirmed whole, up to the
        // configured window. After a refusal (a message returned because no queue was bound
        // yet, a broker just back) the first message is alone in flight, so nothing sent after
        // it can be delivered before it.
        let mut window_max = 1u64;
        loop {
            // Fill the window.
            let mut unknown_feed = false;
            while draining.is_none()
                && window.events < window_max
                && window.bytes < self.options.in_flight_bytes_max
            {
                let room = window_max - window.events;
                let limit = room.min(self.options.batch_events_max as u64);
                let events = match self.feeds.read_feed(&self.feed, sent, limit).await {
                    Ok(events) => events,
                    Err(FeedError::UnknownFeed(_)) => {
                        unknown_feed = true;
                        break;
                    }
                    Err(e) => {
                        self.store_failed("reading the feed", &e);
                        return Ended::Failed;
                    }
                };
                let (Some(first), Some(last)) = (events.first(), events.last()) else {
                    break;
                };
                let batch = InFlight {
                    first: first.position,
                    last: last.position,
                    time: first.time,
                    bytes: events.iter().map(|e| e.data.len()).sum(),
                    pending: match self.send(&events).await {
                        Ok(pending) => pending,
                        Err(e) => {
                            self.fail(e);
                            return Ended::Failed;
                        }
                    },
                };
                sent = batch.last;
                window.events += batch.events();
                window.bytes += batch.bytes;
                window.batches.push_back(batch);
                self.set_in_flight(window.events);
                self.set_state(PublisherState::Publishing);
            }
            self.update_head(*head.borrow_and_update());
            let Some(front) = window.batches.front_mut() else {
                if draining.is_some() || self.shutdown.is_cancelled() {
                    return Ended::Shutdown;
                }
                if unknown_feed {
                    self.set_state(PublisherState::WaitingForFeed);
                } else {
                    self.caught_up(cursor, sent).await;
                }
                tokio::select! {
                    () = self.shutdown.cancelled() => return Ended::Shutdown,
                    () = &mut lost => return Ended::LeaseLost,
                    changed = head.changed(), if head_open => head_open = changed.is_ok(),
                    () = sleep(IDLE_TICK) => {}
                }
                continue;
            };
            let room = draining.is_none()
                && window.events < window_max
                && window.bytes < self.options.in_flight_bytes_max;
            let drain_deadline = draining.unwrap_or_else(Instant::now);
            let outcomes = tokio::select! {
                biased;
                outcomes = &mut front.pending => outcomes,
                () = &mut lost => return Ended::LeaseLost,
                () = self.shutdown.cancelled(), if draining.is_none() => {
                    draining = Some(Instant::now() + self.options.shutdown_grace);
                    continue;
                }
                () = sleep_until(drain_deadline), if draining.is_some() => {
                    tracing::warn!(
                        feed = %self.feed, publisher = %self.name, in_flight = window.events,
                        "publisher shut down before the broker confirmed everything in flight: \
                         those events are published again at the next start"
                    );
                    return Ended::Shutdown;
                }
                changed = head.changed(), if room && head_open => {
                    head_open = changed.is_ok();
                    continue;
                }
            };
            let mut confirmed_to = cursor;
            let mut refused = self.settle(&mut window, outcomes, &mut confirmed_to);
            // Fold in the batches already answered, for one cursor write.
            while refused.is_none() {
                let Some(next) = window.batches.front_mut() else {
                    break;
                };
                let Some(outcomes) = (&mut next.pending).now_or_never() else {
                    break;
                };
                refused = self.settle(&mut window, outcomes, &mut confirmed_to);
            }
            self.set_in_flight(window.events);
            if refused.is_none() {
                window_max = (window_max * 2).min(self.options.in_flight_events_max as u64);
            }
            if confirmed_to > cursor {
                match self
                    .feeds
                    .advance_publisher(&self.feed, &self.name, cursor, confirmed_to)
                    .await
                {
                    Ok(moved) => {
                        cursor = moved.position;
                        self.publish_cursor(cursor);
                        if refused.is_none() {
                            self.failures = 0;
                            self.status.send_modify(|s| s.last_error = None);
                        }
                    }
                    Err(FeedError::PublisherMoved { actual, .. }) => {
                        self.fail(format!(
                            "the cursor was moved to {actual} by another publisher named {}",
                            self.name
                        ));
                        return Ended::Failed;
                    }
                    Err(e) => {
                        self.store_failed("saving the publisher's cursor", &e);
                        return Ended::Failed;
                    }
                }
            }
            self.update_lag(&window, cursor);
            if let Some(refusal) = refused {
                self.refused(&refusal);
                return Ended::Failed;
            }
        }
    }

    /// Takes the front batch's outcomes: moves `confirmed_to` over its confirmed prefix and
    /// returns the first refusal, if any.
    fn settle(
        &self,
        window: &mut Window,
        outcomes: Vec<Outcome>,
        confirmed_to: &mut FeedPosition,
    ) -> Option<Refusal> {
        let batch = window
            .batches
            .pop_front()
            .expect("settle is called with a front batch");
        window.events -= batch.events();
        window.bytes -= batch.bytes;
        let expected = usize::try_from(batch.events()).unwrap_or(usize::MAX);
        let mut confirmed = 0u64;
        let mut duplicates = 0u64;
        let mut refusal = None;
        for outcome in outcomes.iter().take(expected) {
            match outcome {
                Outcome::Confirmed { duplicate } => {
                    confirmed += 1;
                    if *duplicate {
                        duplicates += 1;
                    }
                }
                Outcome::Refused(reason) => {
                    refusal = Some(reason.clone());
                    break;
                }
            }
        }
        if refusal.is_none() && outcomes.len() < expected {
            refusal = Some(Refusal::Failed(format!(
                "the broker answered {} of {expected} events",
                outcomes.len()
            )));
        }
        if confirmed > 0 {
            *confirmed_to = FeedPosition(batch.first.get() + confirmed - 1);
        }
        self.metrics
            .confirmed
            .get_or_create(&self.label)
            .inc_by(confirmed);
        self.metrics
            .duplicates
            .get_or_create(&self.label)
            .inc_by(duplicates);
        self.status.send_modify(|s| s.confirmed += confirmed);
        refusal
    }

    /// A send is bounded by the broker's confirm timeout; shutdown does not cut it short, so
    /// that what went out is known.
    async fn send(&self, events: &[FeedEvent]) -> Result<Pending, crate::BrokerError> {
        self.broker.send(&self.feed, &self.source, events).await
    }

    async fn load_cursor(&self) -> Result<FeedPosition, FeedError> {
        match self.feeds.publishers(&self.feed).await {
            Ok(cursors) => Ok(cursors
                .into_iter()
                .find(|c| c.publisher == self.name)
                .map_or(FeedPosition::START, |c| c.position)),
            // Not registered yet: nothing published.
            Err(FeedError::UnknownFeed(_)) => Ok(FeedPosition::START),
            Err(e) => Err(e),
        }
    }

    /// Caught up with what was read: zero lag if the cursor is at the head.
    async fn caught_up(&self, cursor: FeedPosition, sent: FeedPosition) {
        let head = self.status.borrow().head;
        if cursor >= head && sent >= head {
            self.set_state(PublisherState::CaughtUp);
            self.metrics.lag_seconds.get_or_create(&self.label).set(0.0);
            self.status.send_modify(|s| s.lag = Duration::ZERO);
        } else {
            self.refresh_lag(cursor).await;
        }
    }

    /// The lag from the window: its oldest event, else nothing (caught up with what was read).
    fn update_lag(&self, window: &Window, cursor: FeedPosition) {
        let lag = match window.batches.front() {
            Some(batch) => age(batch.time),
            None if cursor >= self.status.borrow().head => Duration::ZERO,
            None => return,
        };
        self.set_lag(lag);
    }

    /// The lag from the store: the event after the cursor.
    async fn refresh_lag(&self, cursor: FeedPosition) {
        if let Ok(events) = self.feeds.read_feed(&self.feed, cursor, 1).await {
            self.set_lag(events.first().map_or(Duration::ZERO, |e| age(e.time)));
        }
    }

    fn set_lag(&self, lag: Duration) {
        self.metrics
            .lag_seconds
            .get_or_create(&self.label)
            .set(lag.as_secs_f64());
        self.status.send_modify(|s| s.lag = lag);
    }

    fn update_head(&self, head: FeedPosition) {
        let head = head.max(self.status.borrow().head);
        self.metrics
            .head
            .get_or_create(&self.label)
            .set(gauge(head.get()));
        self.status.send_modify(|s| s.head = head);
        self.update_lag_positions();
    }

    fn publish_cursor(&self, cursor: FeedPosition) {
        self.metrics
            .cursor
            .get_or_create(&self.label)
            .set(gauge(cursor.get()));
        self.status.send_modify(|s| s.cursor = cursor);
        self.update_lag_positions();
    }

    fn update_lag_positions(&self) {
        let (head, cursor) = {
            let s = self.status.borrow();
            (s.head, s.cursor)
        };
        self.metrics
            .lag_positions
            .get_or_create(&self.label)
            .set(gauge(head.get().saturating_sub(cursor.get())));
    }

    fn set_in_flight(&self, events: u64) {
        self.metrics
            .in_flight
            .get_or_create(&self.label)
            .set(gauge(events));
        self.status.send_modify(|s| s.in_flight = events);
    }

    fn set_state(&self, state: PublisherState) {
        self.status.send_if_modified(|s| {
            let changed = s.state != state;
            s.state = state;
            changed
        });
    }

    fn refused(&self, refusal: &Refusal) {
        let reason = match refusal {
            Refusal::NotDeclared => "not_declared",
            Refusal::Nacked => "nacked",
            Refusal::Returned { .. } => "returned",
            Refusal::TimedOut(_) => "timed_out",
            Refusal::NotJson => "not_json",
            Refusal::NotSent => "not_sent",
            Refusal::Failed(_) => "failed",
        };
        self.metrics
            .refused
            .get_or_create(&RefusalLabel {
                feed: self.label.feed.clone(),
                publisher: self.label.publisher.clone(),
                reason,
            })
            .inc();
        match refusal {
            Refusal::Returned { .. } => tracing::error!(
                feed = %self.feed, publisher = %self.name, %refusal,
                "the broker returned a message: no queue is bound to the feed's exchange for its \
                 subject. Publishing waits (nothing is skipped) until a queue is bound: declare \
                 your consumers' queues first (docs/design/publishing.md)"
            ),
            Refusal::NotJson => tracing::error!(
                feed = %self.feed, publisher = %self.name, %refusal,
                "an event of the feed cannot be published; publishing waits (nothing is skipped)"
            ),
            _ => {}
        }
        self.fail(format!("the broker did not confirm an event: {refusal}"));
    }

    fn store_failed(&self, what: &str, error: &FeedError) {
        self.metrics.errors.get_or_create(&self.label).inc();
        self.fail(format!("{what}: {error}"));
    }

    fn fail(&self, error: impl std::fmt::Display) {
        let error = error.to_string();
        tracing::warn!(feed = %self.feed, publisher = %self.name, %error, "publisher failed; it starts over from its cursor after a backoff");
        self.status.send_modify(|s| s.last_error = Some(error));
    }

    /// Waits the backoff of the current run of failures: exponential, capped, half of it jittered
    /// (never zero: a failing broker is never hammered). Shutdown cuts it short.
    async fn backoff(&mut self) {
        self.set_state(PublisherState::Backoff);
        let cursor = self.status.borrow().cursor;
        self.refresh_lag(cursor).await;
        let delay = backoff_delay(
            self.options.backoff_min,
            self.options.backoff_max,
            self.failures,
        );
        self.failures = self.failures.saturating_add(1);
        tokio::select! {
            () = self.shutdown.cancelled() => {}
            () = sleep(delay) => {}
        }
    }
}

/// The delay after `failures` failures in a row: `min · 2^failures` capped at `max`, of which
/// the upper half is random (equal jitter).
pub(crate) fn backoff_delay(min: Duration, max: Duration, failures: u32) -> Duration {
    let cap = min
        .checked_mul(1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    let half = cap / 2;
    half + rand::rng().random_range(Duration::ZERO..=half)
}

fn age(time: Timestamp) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    Duration::from_micros(now.saturating_sub(time.0))
}

fn gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_never_zero() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        for failures in 0..100 {
            let delay = backoff_delay(min, max, failures);
            let cap = (min * 2u32.saturating_pow(failures.min(20))).min(max);
            assert!(
                delay >= cap / 2,
                "{failures}: {delay:?} below half of {cap:?}"
            );
            assert!(delay <= cap, "{failures}: {delay:?} above {cap:?}");
        }
        assert!(backoff_delay(min, max, 0) >= Duration::from_millis(50));
        assert!(backoff_delay(min, max, 60) >= Duration::from_secs(5));
    }
}
