//! The NATS JetStream transport (`async-nats`): a durable pull consumer per consumer service on
//! the feed's stream; each message acked explicitly after its commit.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull, stream};
use async_trait::async_trait;
use futures_util::StreamExt;
use headwater_core::FeedId;

use crate::consumer::Consumer;
use crate::transport::{
    CONNECT_TIMEOUT, Incoming, SessionEnd, TransportCounters, TransportError, TransportOptions,
    TransportStats, check_name, dispatch,
};
use crate::upstream::Upstream;
use crate::view::ViewStore;

/// How long JetStream waits for an ack before it delivers a message again, by default: a message
/// whose consumer died (or lost its connection) is delivered again after this.
pub const ACK_WAIT_DEFAULT: Duration = Duration::from_secs(30);
/// How often the server sends a heartbeat on an idle pull: a pull that went silent — seen after a
/// dropped connection, when the client reconnects but the pull request was lost with it — is
/// found within two of them and the session starts over (with 5 s, a dropped connection sometimes
/// stalled the consumer 10 s).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// The feed's stream: `HEADWATER_{NAME}_V{version}` (as the publisher declares it).
pub fn nats_stream(feed: &FeedId) -> String {
    format!(
        "HEADWATER_{}_V{}",
        feed.name.as_str().to_ascii_uppercase(),
        feed.version.get()
    )
}

/// The subjects of the feed's stream: `headwater.{name}.v{version}.>`.
pub fn nats_stream_subjects(feed: &FeedId) -> String {
    format!("headwater.{}.v{}.>", feed.name.as_str(), feed.version.get())
}

/// A feed on NATS JetStream, as one consumer service reads it: a durable pull consumer named
/// after the service on the feed's stream (filter `headwater.{name}.v{n}.>`, explicit acks, at
/// most `prefetch` unacked), created at each connection if missing — and the stream too, as the
/// publisher declares it, so a consumer may start before the producer.
///
/// [`NatsSource::run`] hands each message to [`Consumer::handle_event`] — different subjects in
/// parallel lanes, one subject in order — and acks it only once it is committed to the view,
/// skipped as a duplicate, or recorded as a dead letter. While a delivery waits for what may
/// pass (the producer down for a heal, the view store failing) the message is kept alive with
/// progress acks; a message not acked within the ack wait (a consumer that died) is delivered
/// again by JetStream. A lost connection or subscription ends the session; the source connects
/// again with capped exponential backoff.
pub struct NatsSource {
    url: String,
    feed: FeedId,
    stream: String,
    durable: String,
    ack_wait: Duration,
    options: TransportOptions,
    counters: TransportCounters,
}

impl std::fmt::Debug for NatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold credentials.
        f.debug_struct("NatsSource")
            .field("stream", &self.stream)
            .field("durable", &self.durable)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl NatsSource {
    /// The durable consumer of service `name` (e.g. `statements`) on `feed`'s stream at the
    /// server `url` (`nats://host:port`). Nothing is connected yet.
    ///
    /// # Errors
    /// [`TransportError::Url`] for a URL that is not a valid `nats://` URL,
    /// [`TransportError::Name`] for a name outside `[a-z0-9_-]{1,64}`.
    pub fn new(url: &str, feed: &FeedId, name: &str) -> Result<NatsSource, TransportError> {
        if !url.starts_with("nats://") {
            return Err(TransportError::Url(
                "a NATS URL starts with nats:// (TLS is not built in)".into(),
            ));
        }
        url.parse::<async_nats::ServerAddr>()
            .map_err(|e| TransportError::Url(format!("not a valid NATS URL: {e}")))?;
        check_name(name)?;
        Ok(NatsSource {
            url: url.to_owned(),
            feed: feed.clone(),
            stream: nats_stream(feed),
            durable: name.to_owned(),
            ack_wait: ACK_WAIT_DEFAULT,
            options: TransportOptions::default(),
            counters: TransportCounters::default(),
        })
    }

    #[must_use]
    pub fn with_options(mut self, options: TransportOptions) -> NatsSource {
        self.options = options;
        self
    }

    /// The ack wait of the durable consumer when this source creates it (an existing consumer
    /// keeps its own).
    #[must_use]
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> NatsSource {
        self.ack_wait = ack_wait;
        self
    }

    /// The stream's and the durable consumer's names.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    pub fn durable(&self) -> &str {
        &self.durable
    }

    /// What this source did since it was made.
    pub fn stats(&self) -> TransportStats {
        self.counters.stats()
    }

    /// Registers this source's counters into `registry` (names prefixed
    /// `headwater_consumer_broker_`, labelled with the feed and `transport="nats"`): messages
    /// received, redelivered, acked, dead-lettered, retries, sessions, session errors. Register
    /// each source once.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.counters.register(&self.feed, "nats", registry);
    }

    /// Creates the stream and the durable consumer if missing, then disconnects. `run` does it
    /// at each connection; this is for a deployment step, or a test that publishes before the
    /// consumer first runs.
    ///
    /// # Errors
    /// The server's refusal or a connection failure, as text.
    ///
    /// # Cancel safety
    /// Cancel safe (both are created only if missing).
    pub async fn declare(&self) -> Result<(), String> {
        let client = self.connect().await?;
        self.declare_on(&jetstream::new(client)).await.map(|_| ())
    }

    /// Consumes the durable consumer into `consumer` until `stop` resolves, connecting again
    /// after any failure (capped exponential backoff, for as long as it takes: the view keeps
    /// serving what it has).
    ///
    /// # Errors
    /// [`TransportError::WrongFeed`] when `consumer` keeps another feed than this source reads.
    ///
    /// # Cancel safety
    /// Cancel safe in effect: a message is acked only after its commit, so a message whose
    /// handling is dropped is delivered again after the ack wait and skipped if it was
    /// committed. Prefer `stop`, which lets the lanes finish the message in hand and gives the
    /// others back at once.
    pub async fn run<V: ViewStore, U: Upstream>(
        &self,
        consumer: &Consumer<V, U>,
        stop: impl Future<Output = ()>,
    ) -> Result<(), TransportError> {
        if consumer.feed() != &self.feed {
            return Err(TransportError::WrongFeed {
                source_feed: self.feed.to_string(),
                consumer_feed: consumer.feed().to_string(),
            });
        }
        let stop = std::pin::pin!(stop);
        let mut stop = stop;
        let mut delay = self.options.backoff_min;
        loop {
            TransportCounters::add(&self.counters.sessions);
            let received = self.counters.stats().received;
            match self.session(consumer, &mut stop).await {
                SessionEnd::Stopped => return Ok(()),
                SessionEnd::Lost(reason) => {
                    TransportCounters::add(&self.counters.session_errors);
                    if self.counters.stats().received > received {
                        delay = self.options.backoff_min;
                    }
                    tracing::warn!(stream = %self.stream, durable = %self.durable, error = %reason, retry_in = ?delay, "the NATS session ended; connecting again");
                }
            }
            tokio::select! {
                () = stop.as_mut() => return Ok(()),
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(self.options.backoff_max);
        }
    }

    async fn session<V: ViewStore, U: Upstream, F: Future<Output = ()>>(
        &self,
        consumer: &Consumer<V, U>,
        stop: &mut Pin<&mut F>,
    ) -> SessionEnd {
        let opened = tokio::select! {
            () = stop.as_mut() => return SessionEnd::Stopped,
            opened = tokio::time::timeout(CONNECT_TIMEOUT, self.open()) => opened,
        };
        let messages = match opened {
            Ok(Ok(messages)) => messages,
            Ok(Err(e)) => return SessionEnd::Lost(e),
            Err(_) => {
                return SessionEnd::Lost(format!("NATS did not answer within {CONNECT_TIMEOUT:?}"));
            }
        };
        tracing::info!(stream = %self.stream, durable = %self.durable, prefetch = self.options.prefetch, "consuming from NATS JetStream");
        let incoming = messages.map(|message| {
            message
                .map(|message| NatsMessage { message })
                .map_err(|e| e.to_string())
        });
        dispatch(
            consumer,
            incoming,
            &self.options,
            "nats",
            &self.counters,
            stop,
        )
        .await
    }

    async fn connect(&self) -> Result<async_nats::Client, String> {
        let address: async_nats::ServerAddr = self
            .url
            .parse()
            .map_err(|e| format!("not a valid NATS URL: {e}"))?;
        async_nats::ConnectOptions::new()
            .connection_timeout(CONNECT_TIMEOUT)
            .connect(address)
            .await
            .map_err(|e| format!("connecting to NATS: {e}"))
    }

    /// A new client's pull stream of the durable consumer.
    async fn open(&self) -> Result<pull::Stream, String> {
        let client = self.connect().await?;
        let consumer = self.declare_on(&jetstream::new(client)).await?;
        consumer
            .stream()
            .max_messages_per_batch(usize::from(self.options.prefetch))
            .heartbeat(HEARTBEAT)
            .messages()
            .await
            .map_err(|e| format!("pulling from {}/{}: {e}", self.stream, self.durable))
    }

    async fn declare_on(
        &self,
        jetstream: &jetstream::Context,
    ) -> Result<jetstream::consumer::PullConsumer, String> {
        let subjects = nats_stream_subjects(&self.feed);
        let stream = jetstream
            .get_or_create_stream(stream::Config {
                name: self.stream.clone(),
                subjects: vec![subjects.clone()],
                storage: stream::StorageType::File,
                ..stream::Config::default()
            })
            .await
            .map_err(|e| format!("the JetStream stream {}: {e}", self.stream))?;
        stream
            .get_or_create_consumer(
                &self.durable,
                pull::Config {
                    durable_name: Some(self.durable.clone()),
                    filter_subject: subjects,
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: self.ack_wait,
                    max_ack_pending: i64::from(self.options.prefetch),
                    ..pull::Config::default()
                },
            )
            .await
            .map_err(|e| {
                format!(
                    "the durable consumer {} on {}: {e}",
                    self.durable, self.stream
                )
            })
    }
}

struct NatsMessage {
    message: jetstream::Message,
}

#[async_trait]
impl Incoming for NatsMessage {
    fn body(&self) -> &[u8] {
        &self.message.payload
    }

    fn redelivered(&self) -> bool {
        self.message.info().is_ok_and(|info| info.delivered > 1)
    }

    async fn ack(&self) -> Result<(), String> {
        self.message.ack().await.map_err(|e| e.to_string())
    }

    async fn in_progress(&self) {
        // Best effort: a lost progress ack only means the message is delivered again.
        let _ = self.message.ack_with(AckKind::Progress).await;
    }

    async fn release(&self) {
        // Best effort: without it, the message comes again after the ack wait.
        let _ = self.message.ack_with(AckKind::Nak(None)).await;
    }
}

/// A source's `run` is `Send`: a service spawns it on its runtime (`tokio::spawn`).
#[cfg(test)]
#[allow(dead_code)]
fn run_is_send(
    source: &'static NatsSource,
    consumer: &'static Consumer<crate::EmbeddedView, crate::MemoryUpstream>,
) {
    fn send<T: Send>(_: T) {}
    send(source.run(consumer, std::future::pending::<()>()));
}
