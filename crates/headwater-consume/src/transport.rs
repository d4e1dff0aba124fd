//! What the broker transports share: options, counters, and the lanes that hand a broker's
//! messages to the consumer — different subjects in parallel, one subject in order — and ack
//! each message only after its commit (or its dead letter).

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::{Stream, StreamExt};
use headwater_core::FeedId;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::IntegrationEvent;
use crate::consumer::{ConsumeError, Consumer};
use crate::dead::Handled;
use crate::upstream::Upstream;
use crate::view::ViewStore;

/// Messages a broker hands to a consumer before it acks any (RabbitMQ `basic.qos` prefetch,
/// JetStream `max_ack_pending`), by default.
pub const PREFETCH_DEFAULT: u16 = 256;
/// Lanes (deliveries in parallel, each lane one subject at a time), by default.
pub const LANES_DEFAULT: usize = 16;
/// The most lanes.
pub const LANES_MAX: usize = 256;
/// How long an ack (or a nak, a progress ack) may take to be sent.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting to a broker and declaring the topology may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How a broker transport behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransportOptions {
    /// Messages in flight (received, not yet acked), at most (1 ..= 65,535).
    pub prefetch: u16,
    /// Deliveries in parallel (1 ..= [`LANES_MAX`]): a message goes to the lane of its
    /// subject's hash, so one subject's messages are handled in order, one at a time.
    pub lanes: usize,
    /// The first wait before reconnecting, or before trying a message again whose delivery
    /// failed for a reason that may pass (the producer down for a heal, the view store failing);
    /// doubled each time, capped at `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for TransportOptions {
    fn default() -> TransportOptions {
        TransportOptions {
            prefetch: PREFETCH_DEFAULT,
            lanes: LANES_DEFAULT,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

impl TransportOptions {
    #[must_use]
    pub fn with_prefetch(mut self, prefetch: u16) -> TransportOptions {
        self.prefetch = prefetch.max(1);
        self
    }

    #[must_use]
    pub fn with_lanes(mut self, lanes: usize) -> TransportOptions {
        self.lanes = lanes.clamp(1, LANES_MAX);
        self
    }

    #[must_use]
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> TransportOptions {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }
}

/// What a broker transport did since it was made (`AmqpSource::stats`, `NatsSource::stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TransportStats {
    /// Messages received from the broker (redeliveries included).
    pub received: u64,
    /// Messages the broker marked as delivered before (to this or an earlier session).
    pub redelivered: u64,
    /// Messages acked: applied, skipped as duplicates, or dead-lettered.
    pub acked: u64,
    /// Of them, dead-lettered.
    pub dead_lettered: u64,
    /// Times a message was tried again after a failure that may pass.
    pub retries: u64,
    /// Sessions (connections) opened, and sessions that ended in an error.
    pub sessions: u64,
    pub session_errors: u64,
}

/// A transport's counters, also its Prometheus metrics (`register_metrics`).
#[derive(Debug, Default)]
pub(crate) struct TransportCounters {
    pub(crate) received: Counter,
    pub(crate) redelivered: Counter,
    pub(crate) acked: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) retries: Counter,
    pub(crate) sessions: Counter,
    pub(crate) session_errors: Counter,
}

impl TransportCounters {
    pub(crate) fn add(counter: &Counter) {
        counter.inc();
    }

    pub(crate) fn stats(&self) -> TransportStats {
        TransportStats {
            received: self.received.get(),
            redelivered: self.redelivered.get(),
            acked: self.acked.get(),
            dead_lettered: self.dead_lettered.get(),
            retries: self.retries.get(),
            sessions: self.sessions.get(),
            session_errors: self.session_errors.get(),
        }
    }

    /// Registers the counters, names prefixed `headwater_consumer_broker_`, labelled with the
    /// feed and the transport (`rabbitmq`, `nats`).
    pub(crate) fn register(&self, feed: &FeedId, transport: &'static str, registry: &mut Registry) {
        let r = registry
            .sub_registry_with_prefix("headwater_consumer_broker")
            .sub_registry_with_label(("feed".into(), feed.to_string().into()))
            .sub_registry_with_label(("transport".into(), transport.into()));
        for (name, help, counter) in [
            (
                "messages_received",
                "Messages received from the broker (redeliveries included)",
                &self.received,
            ),
            (
                "messages_redelivered",
                "Messages the broker had delivered before",
                &self.redelivered,
            ),
            (
                "messages_acked",
                "Messages acked after their commit, as duplicates, or as dead letters",
                &self.acked,
            ),
            (
                "messages_dead_lettered",
                "Messages recorded as dead letters (and acked)",
                &self.dead_lettered,
            ),
            (
                "retries",
                "Messages tried again after a failure that may pass (held unacked meanwhile)",
                &self.retries,
            ),
            ("sessions", "Sessions (connections) opened", &self.sessions),
            (
                "session_errors",
                "Sessions that ended in an error (a lost connection, channel or subscription)",
                &self.session_errors,
            ),
        ] {
            r.register(name, help, counter.clone());
        }
    }
}

/// Why a broker transport cannot run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The URL is not one of this transport's (the message never repeats it: it may hold a
    /// password).
    #[error("bad broker URL: {0}")]
    Url(String),
    /// The consumer's name cannot name a queue or a durable consumer.
    #[error("bad consumer name {0:?}: 1 to 64 of [a-z0-9_-]")]
    Name(String),
    /// The source was made for another feed than the consumer's.
    #[error("the source reads {source_feed}, the consumer keeps {consumer_feed}")]
    WrongFeed {
        source_feed: String,
        consumer_feed: String,
    },
}

/// The longest name of a consumer service on a broker (it names a queue, a durable consumer).
pub const SOURCE_NAME_BYTES_MAX: usize = 64;

/// Checks a consumer's name: `[a-z0-9_-]{1,64}` (it names a RabbitMQ queue and a JetStream
/// durable consumer, where neither dots nor wildcards may appear).
pub(crate) fn check_name(name: &str) -> Result<(), TransportError> {
    let valid = !name.is_empty()
        && name.len() <= SOURCE_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(TransportError::Name(name.to_owned()))
    }
}

/// One message as a broker handed it: its body, and how to settle it.
#[async_trait]
pub(crate) trait Incoming: Send + Sync + 'static {
    fn body(&self) -> &[u8];
    /// Whether the broker delivered it before.
    fn redelivered(&self) -> bool;
    /// Done with it (applied, duplicate or dead-lettered): the broker forgets it.
    async fn ack(&self) -> Result<(), String>;
    /// Still working on it (a retry after a failure that may pass): the broker keeps waiting.
    async fn in_progress(&self);
    /// Not handled (the session ends): the broker may deliver it again at once.
    async fn release(&self);
}

/// How a session ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// `stop` resolved.
    Stopped,
    /// The connection, the channel or the subscription was lost.
    Lost(String),
}

/// A lane's work: a message, decoded when it could be.
struct Work<M> {
    message: M,
    event: Option<IntegrationEvent>,
}

/// Hands `incoming` to `consumer` on `options.lanes` lanes until the stream ends, fails, or
/// `stop` resolves; then lets each lane finish the message in hand and returns. Messages still
/// queued in a lane are not handled and not acked: the broker delivers them again.
pub(crate) async fn dispatch<M, V, U, S, F>(
    consumer: &Consumer<V, U>,
    mut incoming: S,
    options: &TransportOptions,
    transport: &str,
    counters: &TransportCounters,
    stop: &mut Pin<&mut F>,
) -> SessionEnd
where
    M: Incoming,
    V: ViewStore,
    U: Upstream,
    S: Stream<Item = Result<M, String>> + Unpin,
    F: Future<Output = ()>,
{
    let lanes = options.lanes.clamp(1, LANES_MAX);
    let (ended_tx, ended) = watch::channel(false);
    let mut senders = Vec::with_capacity(lanes);
    let mut receivers = Vec::with_capacity(lanes);
    for _ in 0..lanes {
        let (tx, rx) = mpsc::channel::<Work<M>>(usize::from(options.prefetch));
        senders.push(tx);
        receivers.push(rx);
    }
    let workers = futures_util::future::join_all(
        receivers
            .into_iter()
            .map(|rx| lane(consumer, rx, ended.clone(), options, transport, counters)),
    );
    let feeder = async {
        let end = loop {
            let next = tokio::select! {
                () = stop.as_mut() => break SessionEnd::Stopped,
                next = incoming.next() => next,
            };
            let message = match next {
                None => break SessionEnd::Lost("the broker ended the subscription".into()),
                Some(Err(e)) => break SessionEnd::Lost(e),
                Some(Ok(message)) => message,
            };
            TransportCounters::add(&counters.received);
            if message.redelivered() {
                TransportCounters::add(&counters.redelivered);
            }
            let event = IntegrationEvent::from_cloud_event(message.body()).ok();
            let lane = event
                .as_ref()
                .map_or(0, |e| lane_of(e.subject.as_str(), lanes));
            let work = Work { message, event };
            tokio::select! {
                () = stop.as_mut() => break SessionEnd::Stopped,
                sent = senders[lane].send(work) => if sent.is_err() {
                    break SessionEnd::Lost("a lane ended".into());
                },
            }
        };
        ended_tx.send_replace(true);
        drop(senders);
        end
    };
    let (end, _) = futures_util::future::join(feeder, workers).await;
    end
}

fn lane_of(subject: &str, lanes: usize) -> usize {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    subject.hash(&mut hasher);
    usize::try_from(hasher.finish() % lanes as u64).unwrap_or(0)
}

/// One lane: each message handled, then acked; a failure that may pass is retried in place
/// with backoff (the broker told it is still in progress) until it passes or the session ends.
async fn lane<M: Incoming, V: ViewStore, U: Upstream>(
    consumer: &Consumer<V, U>,
    mut rx: mpsc::Receiver<Work<M>>,
    mut ended: watch::Receiver<bool>,
    options: &TransportOptions,
    transport: &str,
    counters: &TransportCounters,
) {
    while let Some(work) = rx.recv().await {
        if *ended.borrow() {
            // Not handled, not acked: delivered again to the next session.
            let _ = tokio::time::timeout(SETTLE_TIMEOUT, work.message.release()).await;
            continue;
        }
        let mut delay = options.backoff_min;
        loop {
            let handled: Result<Handled, ConsumeError> = match &work.event {
                Some(event) => {
                    consumer
                        .handle_event(event.clone(), Some(work.message.body()), transport)
                        .await
                }
                None => consumer.handle(work.message.body(), transport).await,
            };
            match handled {
                Ok(handled) => {
                    if matches!(handled, Handled::DeadLettered { .. }) {
                        TransportCounters::add(&counters.dead_lettered);
                    }
                    // Bounded: an ack sent on a connection that just died may never be
                    // answered, and a lane that hangs would hold the session open for ever.
                    match tokio::time::timeout(SETTLE_TIMEOUT, work.message.ack()).await {
                        Ok(Ok(())) => TransportCounters::add(&counters.acked),
                        // Delivered again later and skipped as a duplicate.
                        Ok(Err(e)) => tracing::debug!(transport, error = %e, "an ack was lost"),
                        Err(_) => tracing::debug!(transport, "an ack was not sent in time"),
                    }
                    break;
                }
                Err(e) => {
                    TransportCounters::add(&counters.retries);
                    tracing::warn!(transport, feed = %consumer.feed(), error = %e, "a delivery failed for a reason that may pass; trying it again");
                    let _ = tokio::time::timeout(SETTLE_TIMEOUT, work.message.in_progress()).await;
                    tokio::select! {
                        // The Ref `wait_for` answers is dropped here, not held across the
                        // release below: it would make the future not `Send`.
                        () = async { let _ = ended.wait_for(|ended| *ended).await; } => {
                            let _ = tokio::time::timeout(SETTLE_TIMEOUT, work.message.release()).await;
                            break;
                        }
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(options.backoff_max);
                }
            }
        }
    }
}
