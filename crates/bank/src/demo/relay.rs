//! The relay: reads the producer's feed over HTTP (a long poll), passes every event through the
//! lossy [`Link`] and delivers what comes out to the consumer — the transport of `statements` in
//! the demo (`Transport::External`).
//!
//! Deliveries go through [`LANES`] lanes by account, as a broker transport's lanes do: an
//! account's copies arrive in the order the link let them out, accounts go in parallel, and the
//! reader never waits for the consumer (up to [`LANE_QUEUE_EVENTS`] copies per lane).
//!
//! The relay can also be **cut**: the events it reads while cut are never delivered (the demo's
//! lost last events, which only reconstitution finds).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use headwater::consume::{Consumer, Delivery, FeedClient, IntegrationEvent, Upstream, ViewStore};
use headwater::feed::FeedId;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::link::{Link, LinkConfig, LinkStats};
use super::progress::Gauges;
use crate::model::v1;

/// Events asked per page of the feed.
const PAGE_EVENTS: u64 = 500;
/// How long a long poll of the feed waits for an event. When it ends with none, the feed is idle
/// and the link lets out what it held back.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// The wait before asking again a producer that did not answer.
const UNAVAILABLE_BACKOFF: Duration = Duration::from_millis(200);
/// The longest latency recorded, in microseconds (longer ones count as this).
const LATENCY_US_MAX: u64 = 600_000_000;
/// Delivery lanes: accounts spread over this many sequential deliverers.
pub(super) const LANES: usize = 8;
/// Copies waiting in one lane at most; the reader waits when a lane is full.
pub(super) const LANE_QUEUE_EVENTS: usize = 1_024;
/// How often [`Relay::settled`] looks whether the deliveries are done.
const SETTLED_POLL: Duration = Duration::from_millis(5);

/// What the relay reads, from where.
#[derive(Clone, Debug)]
pub(super) struct Route {
    /// The producer's feed API (`http://127.0.0.1:8080`).
    pub(super) upstream: String,
    pub(super) token: Option<String>,
    pub(super) feed: FeedId,
    /// The feed position to read after.
    pub(super) after: u64,
    /// Add a cent to every deposit of the first account with a deposit (a broken link, for the
    /// verdict to catch).
    pub(super) corrupt: bool,
}

/// Where the reader is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ReadProgress {
    /// The feed position read up to (positions are 1, 2, 3 … without gaps: the events read so
    /// far, counting those before the relay started).
    position: u64,
    /// Copies the link holds back.
    held: usize,
}

/// What the relay did, when it stopped.
#[derive(Debug)]
pub(super) struct RelayOutcome {
    /// The feed position read up to.
    pub(super) position: u64,
    pub(super) link: LinkStats,
    /// Events read while cut.
    pub(super) lost: u64,
    /// From an event's time to its apply by its delivery, in microseconds.
    pub(super) latency: Histogram<u64>,
    /// Deliveries the consumer failed (left to a later delivery or the reconstitution).
    pub(super) failed: u64,
    /// The account whose corrupted deposit the consumer applied ([`Route::corrupt`]).
    pub(super) corrupted: Option<String>,
}

/// What the lanes share.
#[derive(Debug)]
struct Delivered {
    /// Copies sent to a lane and not delivered yet.
    pending: AtomicU64,
    failed: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    corrupted: Mutex<Option<String>>,
}

/// A running relay.
#[derive(Debug)]
pub(super) struct Relay {
    cut: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
    progress: watch::Receiver<ReadProgress>,
    delivered: Arc<Delivered>,
    reader: JoinHandle<anyhow::Result<(u64, LinkStats, u64)>>,
    lanes: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts relaying `route` to `consumer` through a link with `config`.
    ///
    /// # Errors
    /// When the link's configuration is out of range or the upstream URL is not usable.
    pub(super) fn start<V: ViewStore, U: Upstream>(
        route: Route,
        consumer: Arc<Consumer<V, U>>,
        config: LinkConfig,
        gauges: Arc<Gauges>,
    ) -> anyhow::Result<Relay> {
        let link = Link::new(config)?;
        let client =
            FeedClient::new(&route.upstream, route.token).context("the producer's feed API")?;
        let cut = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = watch::channel(false);
        let (progress_tx, progress) = watch::channel(ReadProgress {
            position: route.after,
            held: 0,
        });
        let delivered = Arc::new(Delivered {
            pending: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            latency: Mutex::new(
                Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)
                    .context("the latency histogram")?,
            ),
            corrupted: Mutex::new(None),
        });
        let mut senders = Vec::with_capacity(LANES);
        let mut lanes = Vec::with_capacity(LANES);
        for _ in 0..LANES {
            let (send, receive) = mpsc::channel(LANE_QUEUE_EVENTS);
            senders.push(send);
            lanes.push(tokio::spawn(lane(
                receive,
                Arc::clone(&consumer),
                Arc::clone(&gauges),
                Arc::clone(&delivered),
            )));
        }
        let reader = tokio::spawn(read(Reader {
            client,
            feed: route.feed,
            after: route.after,
            corrupt: route.corrupt,
            link,
            lanes: senders,
            delivered: Arc::clone(&delivered),
            gauges,
            cut: Arc::clone(&cut),
            stopped,
            progress: progress_tx,
        }));
        Ok(Relay {
            cut,
            stop,
            progress,
            delivered,
            reader,
            lanes,
        })
    }

    /// From now on, what the relay reads is lost (`true`), or delivered again (`false`).
    pub(super) fn cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }

    /// Waits until the relay has read the feed up to position `events`, the link holds nothing
    /// back and every copy let out was delivered, for at most `deadline`.
    ///
    /// # Errors
    /// When the deadline passes first, or the reader ended.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub(super) async fn settled(&mut self, events: u64, deadline: Duration) -> anyhow::Result<()> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let at = *self.progress.borrow();
            let pending = self.delivered.pending.load(Ordering::SeqCst);
            if at.position >= events && at.held == 0 && pending == 0 {
                return Ok(());
            }
            anyhow::ensure!(
                !self.reader.is_finished(),
                "the relay ended before reading {events} events"
            );
            anyhow::ensure!(
                tokio::time::Instant::now() < until,
                "the feed did not reach {events} events within {deadline:?}: the relay read {} ({} held back, {pending} being delivered)",
                at.position,
                at.held
            );
            tokio::time::sleep(SETTLED_POLL).await;
        }
    }

    /// Stops the relay (the copies in the lanes are delivered first) and returns what it did.
    ///
    /// # Errors
    /// What ended the relay early: the producer refusing its feed, a task failure.
    ///
    /// # Cancel safety
    /// Not cancel safe: the outcome is lost when cancelled.
    pub(super) async fn stop(self) -> anyhow::Result<RelayOutcome> {
        let _ = self.stop.send(true);
        let read = self.reader.await.context("the relay's reader failed");
        // The reader dropped the lanes' senders: each lane ends once it delivered its queue.
        for lane in self.lanes {
            lane.await.context("a delivery lane failed")?;
        }
        let (position, link, lost) = read??;
        let delivered = Arc::try_unwrap(self.delivered)
            .map_err(|_| anyhow::anyhow!("a delivery lane outlived the relay"))?;
        Ok(RelayOutcome {
            position,
            link,
            lost,
            latency: delivered
                .latency
                .into_inner()
                .unwrap_or_else(|e| e.into_inner()),
            failed: delivered.failed.into_inner(),
            corrupted: delivered
                .corrupted
                .into_inner()
                .unwrap_or_else(|e| e.into_inner()),
        })
    }
}

/// The reader task's state.
struct Reader {
    client: FeedClient,
    feed: FeedId,
    after: u64,
    corrupt: bool,
    link: Link<IntegrationEvent>,
    lanes: Vec<mpsc::Sender<Parcel>>,
    delivered: Arc<Delivered>,
    gauges: Arc<Gauges>,
    cut: Arc<AtomicBool>,
    stopped: watch::Receiver<bool>,
    progress: watch::Sender<ReadProgress>,
}

/// A copy for a lane.
#[derive(Debug)]
struct Parcel {
    event: IntegrationEvent,
    /// Corrupted on purpose ([`Route::corrupt`]).
    corrupted: bool,
}

/// Reads the feed, passes it through the link and hands the copies to the lanes, until stopped.
/// Returns the position read up to, the link's counters and the events lost while cut.
async fn read(mut r: Reader) -> anyhow::Result<(u64, LinkStats, u64)> {
    let mut after = r.after;
    let mut lost = 0;
    // Route::corrupt: the account whose deposits the link corrupts.
    let mut victim: Option<String> = None;
    loop {
        let page = tokio::select! {
            _ = r.stopped.wait_for(|stop| *stop) => break,
            page = r.client.read_feed(&r.feed, after, PAGE_EVENTS, IDLE_WAIT) => page,
        };
        let page = match page {
            Ok(page) => page,
            Err(error) if error.is_transient() => {
                tracing::warn!(%error, "the producer's feed did not answer; asking again");
                tokio::time::sleep(UNAVAILABLE_BACKOFF).await;
                continue;
            }
            Err(error) => {
                return Err(anyhow::Error::new(error).context("the producer refused its feed"));
            }
        };
        let mut copies = Vec::new();
        if page.is_empty() {
            // The feed is idle: nothing stays held back.
            copies.extend(r.link.flush());
        }
        for event in page {
            after = event.position;
            r.gauges.feed_events.fetch_add(1, Ordering::Relaxed);
            if r.cut.load(Ordering::SeqCst) {
                lost += 1;
                continue;
            }
            copies.extend(r.link.pass(event));
        }
        let stats = r.link.stats();
        r.gauges.dropped.store(stats.dropped, Ordering::Relaxed);
        r.gauges
            .duplicated
            .store(stats.duplicated, Ordering::Relaxed);
        for mut event in copies {
            let corrupted = r.corrupt
                && event.event_type == v1::DEPOSITED
                && *victim.get_or_insert_with(|| event.subject.to_string())
                    == event.subject.as_str()
                && corrupt(&mut event);
            let lane = &r.lanes[lane_of(event.subject.as_str())];
            r.delivered.pending.fetch_add(1, Ordering::SeqCst);
            if lane.send(Parcel { event, corrupted }).await.is_err() {
                anyhow::bail!("a delivery lane ended");
            }
        }
        r.progress.send_replace(ReadProgress {
            position: after,
            held: r.link.held(),
        });
    }
    Ok((after, r.link.stats(), lost))
}

/// The lane of an account (FNV-1a of its id).
fn lane_of(subject: &str) -> usize {
    let hash = subject.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    usize::try_from(hash % LANES as u64).unwrap_or(0)
}

/// One lane: delivers its copies one at a time, in order, until the reader is gone.
async fn lane<V: ViewStore, U: Upstream>(
    mut copies: mpsc::Receiver<Parcel>,
    consumer: Arc<Consumer<V, U>>,
    gauges: Arc<Gauges>,
    delivered: Arc<Delivered>,
) {
    while let Some(Parcel { event, corrupted }) = copies.recv().await {
        let time = humantime::parse_rfc3339(&event.time).ok();
        let subject = event.subject.clone();
        let result = consumer.deliver(event).await;
        gauges.delivered.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(Delivery::Applied { healed }) => {
                gauges.healed.fetch_add(healed, Ordering::Relaxed);
                if corrupted {
                    tracing::warn!(%subject, "the link corrupted a deposit the consumer applied (a fault put in on purpose)");
                    *delivered
                        .corrupted
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(subject.to_string());
                }
                if let Some(time) = time {
                    let late = SystemTime::now()
                        .duration_since(time)
                        .unwrap_or(Duration::ZERO);
                    let us = u64::try_from(late.as_micros())
                        .unwrap_or(u64::MAX)
                        .clamp(1, LATENCY_US_MAX);
                    let _ = delivered
                        .latency
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record(us);
                }
            }
            Ok(_) => {}
            Err(error) => {
                // Not applied; the account's next delivery or the reconstitution brings it.
                tracing::warn!(%subject, %error, "a delivery failed");
                delivered.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        delivered.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Adds a cent to a v1 deposit; `true` when it did.
fn corrupt(event: &mut IntegrationEvent) -> bool {
    let Ok(moved) = event.data_as::<v1::Moved>() else {
        return false;
    };
    match serde_json::to_string(&v1::Moved {
        amount: moved.amount + 1,
    }) {
        Ok(data) => {
            event.data = data;
            true
        }
        Err(_) => false,
    }
}
