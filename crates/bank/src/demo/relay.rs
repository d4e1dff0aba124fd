//! The relay: reads the producer's feed over HTTP (a long poll from position 0), passes every
//! event through the lossy [`Link`] and delivers what comes out to the consumer — the transport
//! of `statements` in the demo (`Transport::External`).
//!
//! It can also be **cut**: the events it reads while cut are never delivered (the demo's lost
//! last events, which only reconstitution finds).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use headwater::consume::{Consumer, Delivery, FeedClient, IntegrationEvent, Upstream, ViewStore};
use headwater::feed::FeedId;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::link::{Link, LinkConfig, LinkStats};
use super::progress::Gauges;

/// Events asked per page of the feed.
const PAGE_EVENTS: u64 = 500;
/// How long a long poll of the feed waits for an event. When it ends with none, the feed is idle
/// and the link lets out what it held back.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// The wait before asking again a producer that did not answer.
const UNAVAILABLE_BACKOFF: Duration = Duration::from_millis(200);
/// The longest latency recorded, in microseconds (longer ones count as this).
const LATENCY_US_MAX: u64 = 600_000_000;

/// Where the relay is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayProgress {
    /// Events read from the feed.
    pub received: u64,
    /// Copies the link holds back.
    pub held: usize,
}

/// What the relay did, when it stopped.
#[derive(Debug)]
pub struct RelayOutcome {
    pub link: LinkStats,
    /// Events read while cut.
    pub lost: u64,
    /// From an event's time to its apply by its delivery, in microseconds.
    pub latency: Histogram<u64>,
    /// Deliveries the consumer failed (left to a later delivery or the reconstitution).
    pub failed: u64,
}

/// A running relay.
#[derive(Debug)]
pub struct Relay {
    cut: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
    progress: watch::Receiver<RelayProgress>,
    task: JoinHandle<anyhow::Result<RelayOutcome>>,
}

impl Relay {
    /// Starts relaying `feed` from the producer at `upstream` to `consumer` through a link with
    /// `config`.
    ///
    /// # Errors
    /// When the link's configuration is out of range or the upstream URL is not usable.
    pub fn start<V: ViewStore, U: Upstream>(
        upstream: &str,
        token: Option<String>,
        feed: FeedId,
        consumer: Arc<Consumer<V, U>>,
        config: LinkConfig,
        gauges: Arc<Gauges>,
    ) -> anyhow::Result<Relay> {
        let link = Link::new(config)?;
        let client = FeedClient::new(upstream, token).context("the producer's feed API")?;
        let cut = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = watch::channel(false);
        let (progress_tx, progress) = watch::channel(RelayProgress::default());
        let task = tokio::spawn(relay(Relaying {
            client,
            feed,
            consumer,
            link,
            gauges,
            cut: cut.clone(),
            stopped,
            progress: progress_tx,
        }));
        Ok(Relay {
            cut,
            stop,
            progress,
            task,
        })
    }

    /// From now on, what the relay reads is lost (`true`), or delivered again (`false`).
    pub fn cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }

    /// Waits until the relay has read at least `events` events of the feed and the link holds
    /// nothing back (everything read was delivered, dropped or lost), for at most `deadline`.
    ///
    /// # Errors
    /// When the deadline passes first, or the relay ended.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn settled(&mut self, events: u64, deadline: Duration) -> anyhow::Result<()> {
        let wait = self
            .progress
            .wait_for(|p| p.received >= events && p.held == 0);
        let waited = tokio::time::timeout(deadline, wait)
            .await
            .map(|r| r.map(|_| ()));
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => anyhow::bail!("the relay ended before reading {events} events"),
            Err(_) => {
                let at = *self.progress.borrow();
                anyhow::bail!(
                    "the feed did not reach {events} events within {deadline:?}: the relay read {} ({} held back)",
                    at.received,
                    at.held
                )
            }
        }
    }

    /// Stops the relay and returns what it did.
    ///
    /// # Errors
    /// What ended the relay early: the producer refusing its feed, a task failure.
    ///
    /// # Cancel safety
    /// Not cancel safe: the outcome is lost when cancelled.
    pub async fn stop(self) -> anyhow::Result<RelayOutcome> {
        let _ = self.stop.send(true);
        self.task.await.context("the relay task failed")?
    }
}

/// The relay task's state.
struct Relaying<V, U> {
    client: FeedClient,
    feed: FeedId,
    consumer: Arc<Consumer<V, U>>,
    link: Link<IntegrationEvent>,
    gauges: Arc<Gauges>,
    cut: Arc<AtomicBool>,
    stopped: watch::Receiver<bool>,
    progress: watch::Sender<RelayProgress>,
}

async fn relay<V: ViewStore, U: Upstream>(
    mut r: Relaying<V, U>,
) -> anyhow::Result<RelayOutcome> {
    let mut outcome = RelayOutcome {
        link: LinkStats::default(),
        lost: 0,
        latency: Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)
            .context("the latency histogram")?,
        failed: 0,
    };
    let mut after = 0;
    let mut received = 0;
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
        if page.is_empty() {
            // The feed is idle: nothing stays held back.
            for event in r.link.flush() {
                deliver(&r, event, &mut outcome).await;
            }
        }
        for event in page {
            after = event.position;
            received += 1;
            r.gauges.feed_events.fetch_add(1, Ordering::Relaxed);
            if r.cut.load(Ordering::SeqCst) {
                outcome.lost += 1;
                continue;
            }
            for copy in r.link.pass(event) {
                deliver(&r, copy, &mut outcome).await;
            }
            let stats = r.link.stats();
            r.gauges.dropped.store(stats.dropped, Ordering::Relaxed);
            r.gauges.duplicated.store(stats.duplicated, Ordering::Relaxed);
        }
        r.progress.send_replace(RelayProgress {
            received,
            held: r.link.held(),
        });
    }
    outcome.link = r.link.stats();
    Ok(outcome)
}

/// Delivers one copy to the consumer and records its latency when it was applied.
async fn deliver<V: ViewStore, U: Upstream>(
    r: &Relaying<V, U>,
    event: IntegrationEvent,
    outcome: &mut RelayOutcome,
) {
    let time = humantime::parse_rfc3339(&event.time).ok();
    let subject = event.subject.clone();
    let result = r.consumer.deliver(event).await;
    r.gauges.delivered.fetch_add(1, Ordering::Relaxed);
    match result {
        Ok(Delivery::Applied { healed }) => {
            r.gauges.healed.fetch_add(healed, Ordering::Relaxed);
            if let Some(time) = time {
                let late = SystemTime::now()
                    .duration_since(time)
                    .unwrap_or(Duration::ZERO);
                let us = u64::try_from(late.as_micros())
                    .unwrap_or(u64::MAX)
                    .clamp(1, LATENCY_US_MAX);
                let _ = outcome.latency.record(us);
            }
        }
        Ok(_) => {}
        Err(error) => {
            // Not applied; the account's next delivery or the reconstitution brings it.
            tracing::warn!(%subject, %error, "a delivery failed");
            outcome.failed += 1;
        }
    }
}
