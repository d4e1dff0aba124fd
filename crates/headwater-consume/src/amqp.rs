//! The RabbitMQ transport (`lapin`): a durable queue per consumer service, bound with `#` to the
//! feed's durable topic exchange; each message acked after its commit.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use headwater_core::FeedId;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::consumer::Consumer;
use crate::transport::{
    CONNECT_TIMEOUT, Incoming, SessionEnd, TransportCounters, TransportError, TransportOptions,
    TransportStats, check_name, dispatch,
};
use crate::upstream::Upstream;
use crate::view::ViewStore;

/// The feed's exchange: `headwater.{name}.v{version}` (as the publisher declares it).
pub fn amqp_exchange(feed: &FeedId) -> String {
    format!("headwater.{}.v{}", feed.name.as_str(), feed.version.get())
}

/// A consumer service's queue of a feed: `headwater.{name}.v{version}.{consumer}`.
pub fn amqp_queue(feed: &FeedId, consumer: &str) -> String {
    format!("{}.{consumer}", amqp_exchange(feed))
}

/// A feed on RabbitMQ, as one consumer service reads it: its durable queue, bound with `#` to
/// the feed's exchange, declared (with the exchange, so a consumer may start before the
/// producer) idempotently at each connection.
///
/// [`AmqpSource::run`] consumes the queue with at most `prefetch` unacked messages, hands each
/// to [`Consumer::handle_event`] — different subjects in parallel lanes, one subject in order —
/// and acks it (a single `basic.ack` of its own delivery tag, never `multiple`) only once it is
/// committed to the view, skipped as a duplicate, or recorded as a dead letter. A lost
/// connection, a closed channel or a broker restart ends the session; the source connects again
/// with capped exponential backoff, and RabbitMQ delivers the unacked messages again (skipped
/// as duplicates when they were committed).
pub struct AmqpSource {
    url: String,
    feed: FeedId,
    exchange: String,
    queue: String,
    options: TransportOptions,
    counters: TransportCounters,
}

impl std::fmt::Debug for AmqpSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        f.debug_struct("AmqpSource")
            .field("queue", &self.queue)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl AmqpSource {
    /// The queue of consumer service `name` (e.g. `statements`) on `feed`, at the broker `url`
    /// (`amqp://user:password@host:port/vhost`). Nothing is connected yet.
    ///
    /// # Errors
    /// [`TransportError::Url`] for a URL that is not a valid `amqp://` URL,
    /// [`TransportError::Name`] for a name outside `[a-z0-9_-]{1,64}`.
    pub fn new(url: &str, feed: &FeedId, name: &str) -> Result<AmqpSource, TransportError> {
        if !url.starts_with("amqp://") {
            return Err(TransportError::Url(
                "an AMQP URL starts with amqp:// (TLS is not built in)".into(),
            ));
        }
        url.parse::<lapin::uri::AMQPUri>()
            .map_err(|e| TransportError::Url(format!("not a valid AMQP URL: {e}")))?;
        check_name(name)?;
        Ok(AmqpSource {
            url: url.to_owned(),
            feed: feed.clone(),
            exchange: amqp_exchange(feed),
            queue: amqp_queue(feed, name),
            options: TransportOptions::default(),
            counters: TransportCounters::default(),
        })
    }

    #[must_use]
    pub fn with_options(mut self, options: TransportOptions) -> AmqpSource {
        self.options = options;
        self
    }

    /// The queue's name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// What this source did since it was made.
    pub fn stats(&self) -> TransportStats {
        self.counters.stats()
    }

    /// Registers this source's counters into `registry` (names prefixed
    /// `headwater_consumer_broker_`, labelled with the feed and `transport="rabbitmq"`): messages
    /// received, redelivered, acked, dead-lettered, retries, sessions, session errors. Register
    /// each source once.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.counters.register(&self.feed, "rabbitmq", registry);
    }

    /// Declares the exchange, the queue and the binding (idempotent), then disconnects. `run`
    /// does it at each connection; this is for a deployment step, or a test that publishes
    /// before the consumer first runs.
    ///
    /// # Errors
    /// The broker's refusal or a connection failure, as text.
    ///
    /// # Cancel safety
    /// Cancel safe (declarations are idempotent).
    pub async fn declare(&self) -> Result<(), String> {
        let connection = self.connect().await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        let declared = self.declare_on(&connection, channel).await.map(|_| ());
        // Best effort: the declarations are done or failed already.
        let _ = connection.close(200, "declared".into()).await;
        declared
    }

    /// Consumes the queue into `consumer` until `stop` resolves, reconnecting after any failure
    /// (capped exponential backoff, for as long as it takes: the view keeps serving what it
    /// has).
    ///
    /// # Errors
    /// [`TransportError::WrongFeed`] when `consumer` keeps another feed than this source reads.
    ///
    /// # Cancel safety
    /// Cancel safe in effect: a message is acked only after its commit, so a message whose
    /// handling is dropped is delivered again (when the connection closes) and skipped if it
    /// was committed. Prefer `stop`, which lets the lanes finish the message in hand.
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
                    tracing::warn!(queue = %self.queue, error = %reason, retry_in = ?delay, "the RabbitMQ session ended; connecting again");
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
            opened = self.open() => opened,
        };
        let (connection, channel) = match opened {
            Ok(opened) => opened,
            Err(e) => return SessionEnd::Lost(e),
        };
        let deliveries = match channel
            .basic_consume(
                self.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(deliveries) => deliveries,
            Err(e) => return SessionEnd::Lost(format!("basic.consume: {e}")),
        };
        tracing::info!(queue = %self.queue, prefetch = self.options.prefetch, "consuming from RabbitMQ");
        let incoming = deliveries.map(|delivery| {
            delivery
                .map(|delivery| AmqpMessage { delivery })
                .map_err(|e| e.to_string())
        });
        let end = dispatch(
            consumer,
            incoming,
            &self.options,
            "rabbitmq",
            &self.counters,
            stop,
        )
        .await;
        // Unacked messages go back to the queue with the connection. Best effort, bounded.
        let _ = tokio::time::timeout(
            CLOSE_TIMEOUT,
            connection.close(200, "the consumer stops".into()),
        )
        .await;
        end
    }

    async fn connect(&self) -> Result<Connection, String> {
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect(&self.url, ConnectionProperties::default()),
        )
        .await
        .map_err(|_| format!("no connection to RabbitMQ within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("connecting to RabbitMQ: {e}"))
    }

    /// A connection and a channel with the topology declared and the prefetch set.
    async fn open(&self) -> Result<(Connection, Channel), String> {
        let connection = self.connect().await?;
        let ready = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| e.to_string())?;
            let channel = self.declare_on(&connection, channel).await?;
            channel
                .basic_qos(self.options.prefetch, BasicQosOptions::default())
                .await
                .map_err(|e| format!("basic.qos: {e}"))?;
            Ok::<_, String>(channel)
        })
        .await
        .map_err(|_| format!("RabbitMQ did not answer within {CONNECT_TIMEOUT:?}"))
        .and_then(|ready| ready);
        match ready {
            Ok(channel) => Ok((connection, channel)),
            Err(e) => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "".into())).await;
                Err(e)
            }
        }
    }

    /// Declares the exchange, the queue and the binding on `channel`; returns the channel to go
    /// on with (another one when the queue exists with other arguments — an operator's quorum
    /// queue, say: RabbitMQ refuses the declaration and closes the channel; the queue is then
    /// taken as it is, checked to exist by a passive declaration).
    async fn declare_on(
        &self,
        connection: &Connection,
        channel: Channel,
    ) -> Result<Channel, String> {
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                format!(
                    "declaring the durable topic exchange {}: {e}",
                    self.exchange
                )
            })?;
        let declared = channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let channel = match declared {
            Ok(_) => channel,
            Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == REPLY_PRECONDITION_FAILED) =>
            {
                tracing::info!(queue = %self.queue, "the queue exists with other arguments; using it as it is");
                let channel = connection
                    .create_channel()
                    .await
                    .map_err(|e| e.to_string())?;
                channel
                    .queue_declare(
                        self.queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| format!("the queue {}: {e}", self.queue))?;
                channel
            }
            Err(e) => return Err(format!("declaring the durable queue {}: {e}", self.queue)),
        };
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("binding {} to {}: {e}", self.queue, self.exchange))?;
        Ok(channel)
    }
}

/// AMQP reply code of a declaration that does not match what exists.
const REPLY_PRECONDITION_FAILED: u16 = 406;

/// How long closing a connection may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

struct AmqpMessage {
    delivery: lapin::message::Delivery,
}

#[async_trait]
impl Incoming for AmqpMessage {
    fn body(&self) -> &[u8] {
        &self.delivery.data
    }

    fn redelivered(&self) -> bool {
        self.delivery.redelivered
    }

    async fn ack(&self) -> Result<(), String> {
        match self.delivery.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Ok(()),
            Ok(false) => Err("the channel closed before the ack".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn in_progress(&self) {}

    /// Closing the channel gives it back.
    async fn release(&self) {}
}

/// A source's `run` is `Send`: a service spawns it on its runtime (`tokio::spawn`).
#[cfg(test)]
#[allow(dead_code)]
fn run_is_send(
    source: &'static AmqpSource,
    consumer: &'static Consumer<crate::EmbeddedView, crate::MemoryUpstream>,
) {
    fn send<T: Send>(_: T) {}
    send(source.run(consumer, std::future::pending::<()>()));
}
