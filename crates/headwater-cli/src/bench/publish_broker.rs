//! The brokers of the publish suite, as the benchmark itself drives them with their own client
//! libraries (lapin, async-nats): the raw publish-with-confirm rate, the consumer that
//! timestamps arrivals, the queue a RabbitMQ feed needs before anything is published to it
//! (messages are `mandatory`), and the cleanup.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use headwater_core::FeedId;
use headwater_publish::{AmqpBroker, Broker, NatsBroker, exchange_name, stream_name};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::mpsc;

use super::feeds::FILL_BATCH_EVENTS;
use crate::text::group;

/// AMQP `delivery_mode` of a persistent message (what the publisher sends).
const DELIVERY_MODE_PERSISTENT: u8 = 2;
/// Arrivals the consumer may hold before the benchmark reads them.
const ARRIVALS_QUEUED_MAX: usize = 65_536;
/// The feed of the raw figures' exchange and stream: the topology of a feed, but published to
/// by the client library alone.
const RAW_FEED_NAME: &str = "headwater_bench_raw";

/// One broker under measurement.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    Amqp(String),
    Nats(String),
}

/// A message that reached the benchmark's consumer, and when.
#[derive(Debug)]
pub(crate) struct Arrival {
    pub(crate) at: Instant,
    pub(crate) body: Vec<u8>,
}

/// What a raw run did.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Raw {
    pub(crate) messages: u64,
    pub(crate) elapsed: Duration,
}

impl Raw {
    pub(crate) fn per_second(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

impl Target {
    /// `rabbitmq` or `nats`: the figures' key.
    pub(crate) fn key(&self) -> &'static str {
        match self {
            Target::Amqp(_) => "rabbitmq",
            Target::Nats(_) => "nats",
        }
    }

    /// The broker's name in the report.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Target::Amqp(_) => "RabbitMQ",
            Target::Nats(_) => "NATS JetStream",
        }
    }

    /// The client library the publisher (and the raw figure) uses.
    pub(crate) fn client(&self) -> &'static str {
        match self {
            Target::Amqp(_) => "lapin, publisher confirms, persistent, mandatory",
            Target::Nats(_) => "async-nats, JetStream publish with ack, Nats-Msg-Id",
        }
    }

    /// The publisher's broker.
    pub(crate) async fn broker(&self) -> anyhow::Result<Arc<dyn Broker>> {
        Ok(match self {
            Target::Amqp(url) => Arc::new(
                AmqpBroker::connect(url)
                    .await
                    .context("cannot connect to RabbitMQ (--amqp)")?,
            ),
            Target::Nats(url) => Arc::new(
                NatsBroker::connect(url)
                    .await
                    .context("cannot connect to NATS (--nats)")?,
            ),
        })
    }

    /// The server's name and version, as far as the client learns it.
    pub(crate) async fn server(&self) -> String {
        match self {
            // lapin does not expose the server's properties: the script that starts the broker
            // prints its version.
            Target::Amqp(_) => "RabbitMQ".to_owned(),
            Target::Nats(url) => match async_nats::connect(url).await {
                Ok(client) => {
                    let version = client.server_info().version;
                    let _ = client.drain().await;
                    format!("NATS {version}")
                }
                Err(_) => "NATS".to_owned(),
            },
        }
    }

    /// The broker's own rate: `messages` copies of `body`, each with a message id of its own, to
    /// the topology of a feed (RabbitMQ: a durable topic exchange and a durable queue bound with
    /// `#`; NATS: a file-backed stream), pipelined as the publisher does (batches of `batch`,
    /// at most `window` unconfirmed, see [`pipelined`]); the time from the first send to the last
    /// confirmation. Removes what it declared.
    pub(crate) async fn raw(
        &self,
        messages: u64,
        (window, batch): (usize, usize),
        body: &[u8],
        subjects: u64,
    ) -> anyhow::Result<Raw> {
        let feed = FeedId::parse(&format!("{RAW_FEED_NAME}_{:08x}.v1", rand::random::<u32>()))
            .context("the raw figure's feed name")?;
        let bar = super::progress_bar(
            &format!("publish: {} raw client", self.key()),
            messages,
            "messages",
        );
        let raw = match self {
            Target::Amqp(url) => {
                raw_amqp(url, &feed, messages, (window, batch), body, subjects, &bar).await
            }
            Target::Nats(url) => {
                raw_nats(url, &feed, messages, (window, batch), body, subjects, &bar).await
            }
        };
        bar.finish_and_clear();
        let raw = raw?;
        tracing::info!(
            broker = self.key(),
            messages_per_sec = format_args!("{}", group(raw.per_second())),
            "raw publish with confirms"
        );
        Ok(raw)
    }

    /// What a feed needs on the broker before the publisher starts, for the benchmark to count
    /// what arrives: RabbitMQ: the exchange (as the publisher declares it) and a durable queue
    /// bound with `#` (a message no queue takes is returned, and not confirmed); NATS: the
    /// stream (declared by the publisher's broker, as the publisher would).
    pub(crate) async fn prepare(&self, feed: &FeedId) -> anyhow::Result<()> {
        match self {
            Target::Amqp(url) => {
                let connection = amqp_connect(url).await?;
                let channel = connection.create_channel().await?;
                declare_amqp(&channel, &exchange_name(feed), &queue_name(feed)).await?;
                connection.close(200, "declared".into()).await?;
            }
            Target::Nats(_) => {
                self.broker().await?.declare(feed).await?;
            }
        }
        Ok(())
    }

    /// A consumer of everything published to `feed` from now on; arrivals are timestamped as
    /// the client hands them over. Ends when the receiver is dropped.
    pub(crate) async fn consume(&self, feed: &FeedId) -> anyhow::Result<mpsc::Receiver<Arrival>> {
        let (sender, receiver) = mpsc::channel(ARRIVALS_QUEUED_MAX);
        match self {
            Target::Amqp(url) => {
                let connection = amqp_connect(url).await?;
                let channel = connection.create_channel().await?;
                let mut consumer = channel
                    .basic_consume(
                        queue_name(feed).as_str().into(),
                        "headwater-bench".into(),
                        BasicConsumeOptions {
                            no_ack: true,
                            ..BasicConsumeOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .context("cannot consume the benchmark's queue")?;
                tokio::spawn(async move {
                    while let Some(Ok(delivery)) = consumer.next().await {
                        let arrival = Arrival {
                            at: Instant::now(),
                            body: delivery.data,
                        };
                        if sender.send(arrival).await.is_err() {
                            break;
                        }
                    }
                    let _ = connection.close(200, "done".into()).await;
                });
            }
            Target::Nats(url) => {
                let client = async_nats::connect(url)
                    .await
                    .context("cannot connect to NATS (--nats)")?;
                let js = jetstream::new(client);
                let stream = js
                    .get_stream(stream_name(feed))
                    .await
                    .context("the feed's stream")?;
                let consumer = stream
                    .create_consumer(consumer::pull::Config {
                        ack_policy: consumer::AckPolicy::None,
                        deliver_policy: consumer::DeliverPolicy::All,
                        ..consumer::pull::Config::default()
                    })
                    .await
                    .context("cannot create a JetStream consumer")?;
                let mut messages = consumer
                    .messages()
                    .await
                    .context("cannot consume the feed's stream")?;
                tokio::spawn(async move {
                    while let Some(Ok(message)) = messages.next().await {
                        let arrival = Arrival {
                            at: Instant::now(),
                            body: message.payload.to_vec(),
                        };
                        if sender.send(arrival).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
        Ok(receiver)
    }

    /// Removes what the benchmark and the publisher declared for `feed`; returns the messages
    /// the feed's queue or stream held.
    pub(crate) async fn remove(&self, feed: &FeedId) -> anyhow::Result<u64> {
        match self {
            Target::Amqp(url) => {
                let connection = amqp_connect(url).await?;
                let channel = connection.create_channel().await?;
                let held = remove_amqp(&channel, &exchange_name(feed), &queue_name(feed)).await?;
                connection.close(200, "removed".into()).await?;
                Ok(u64::from(held))
            }
            Target::Nats(url) => {
                let client = async_nats::connect(url)
                    .await
                    .context("cannot connect to NATS (--nats)")?;
                let js = jetstream::new(client);
                let mut stream = js
                    .get_stream(stream_name(feed))
                    .await
                    .context("the feed's stream")?;
                let held = stream
                    .info()
                    .await
                    .context("the feed's stream")?
                    .state
                    .messages;
                js.delete_stream(stream_name(feed))
                    .await
                    .context("cannot delete the feed's stream")?;
                Ok(held)
            }
        }
    }
}

/// The benchmark's queue of a feed.
fn queue_name(feed: &FeedId) -> String {
    format!("{}.bench", exchange_name(feed))
}

async fn amqp_connect(url: &str) -> anyhow::Result<Connection> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .context("cannot connect to RabbitMQ (--amqp)")
}

/// The exchange as the publisher declares it, and a durable queue bound to it with `#`.
async fn declare_amqp(channel: &lapin::Channel, exchange: &str, queue: &str) -> anyhow::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("cannot declare the exchange {exchange}"))?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("cannot declare the queue {queue}"))?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("cannot bind the queue {queue}"))?;
    Ok(())
}

async fn remove_amqp(channel: &lapin::Channel, exchange: &str, queue: &str) -> anyhow::Result<u32> {
    let held = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .with_context(|| format!("cannot delete the queue {queue}"))?;
    channel
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await
        .with_context(|| format!("cannot delete the exchange {exchange}"))?;
    Ok(held)
}

/// The subject of the raw figure's `i`-th message: in the order of the feed the publisher
/// publishes, runs of [`FILL_BATCH_EVENTS`] messages per subject (the log is filled one stream per
/// append of that many events). The order matters: JetStream took 87,000 messages/s cycling
/// through 10,000 subjects one message each, 126,000/s in runs of 100.
fn subject_index(i: u64, subjects: u64) -> usize {
    usize::try_from(i / FILL_BATCH_EVENTS % subjects.max(1)).unwrap_or(0)
}

/// Sends `messages` with `send(i)`, which returns the future of the message's confirmation,
/// pipelined as the publisher does: batches of `batch` sent in a row, then their confirmations
/// awaited, with `window / batch` batches in flight (the confirmations of earlier batches are
/// awaited while later ones are sent).
async fn pipelined<S, SF, CF>(
    messages: u64,
    window: usize,
    batch: usize,
    bar: &indicatif::ProgressBar,
    send: S,
) -> anyhow::Result<()>
where
    S: Fn(u64) -> SF,
    SF: Future<Output = anyhow::Result<CF>>,
    CF: Future<Output = anyhow::Result<()>>,
{
    let batch = u64::try_from(batch.max(1)).unwrap_or(1);
    let in_flight = usize::try_from(u64::try_from(window).unwrap_or(u64::MAX) / batch)
        .unwrap_or(1)
        .max(1);
    let send = &send;
    let batches = (0..messages)
        .step_by(usize::try_from(batch).unwrap_or(1))
        .map(|first| first..(first + batch).min(messages));
    let mut confirmed = futures_util::stream::iter(batches)
        .map(|range| async move {
            let mut confirmations = Vec::new();
            for i in range {
                confirmations.push(send(i).await?);
            }
            let count = confirmations.len() as u64;
            for confirmation in confirmations {
                confirmation.await?;
            }
            anyhow::Ok(count)
        })
        .buffered(in_flight);
    while let Some(count) = confirmed.next().await {
        bar.inc(count?);
    }
    Ok(())
}

async fn raw_amqp(
    url: &str,
    feed: &FeedId,
    messages: u64,
    (window, batch): (usize, usize),
    body: &[u8],
    subjects: u64,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Raw> {
    let connection = amqp_connect(url).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("confirm mode")?;
    let (exchange, queue) = (exchange_name(feed), queue_name(feed));
    declare_amqp(&channel, &exchange, &queue).await?;
    let routing_keys: Vec<String> = (0..subjects).map(|s| format!("account-{s}")).collect();
    let (channel_ref, exchange_ref, keys) = (&channel, exchange.as_str(), &routing_keys);
    let started = Instant::now();
    pipelined(messages, window, batch, bar, |i| async move {
        let properties = BasicProperties::default()
            .with_message_id(headwater_core::EventId::new_random().to_string().into())
            .with_delivery_mode(DELIVERY_MODE_PERSISTENT)
            .with_content_type("application/cloudevents+json".into());
        let key = &keys[subject_index(i, subjects)];
        let sent = channel_ref
            .basic_publish(
                exchange_ref.into(),
                key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .context("basic.publish")?;
        Ok(async move {
            match sent.await {
                Ok(Confirmation::Ack(None)) => Ok(()),
                other => bail!("RabbitMQ did not confirm a message: {other:?}"),
            }
        })
    })
    .await?;
    let elapsed = started.elapsed();
    let held = remove_amqp(&channel, &exchange, &queue).await?;
    connection.close(200, "done".into()).await?;
    if u64::from(held) < messages {
        bail!("RabbitMQ confirmed {messages} messages, the queue held {held}");
    }
    Ok(Raw { messages, elapsed })
}

async fn raw_nats(
    url: &str,
    feed: &FeedId,
    messages: u64,
    (window, batch): (usize, usize),
    body: &[u8],
    subjects: u64,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Raw> {
    let client = async_nats::connect(url)
        .await
        .context("cannot connect to NATS (--nats)")?;
    // The client holds at most 5,000 unacked publishes by default (then a publish waits for a
    // permit, which only awaiting an older ack gives back): room for the whole window.
    let js = jetstream::context::ContextBuilder::new()
        .max_ack_inflight(window.max(1))
        .build(client);
    let name = stream_name(feed);
    // As the publisher declares a feed's stream.
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![headwater_publish::stream_subjects(feed)],
        storage: stream::StorageType::File,
        ..stream::Config::default()
    })
    .await
    .with_context(|| format!("cannot create the stream {name}"))?;
    let nats_subjects: Vec<String> = (0..subjects)
        .map(|s| headwater_publish::nats_subject(feed, &format!("account-{s}")))
        .collect();
    let (js_ref, subjects_ref) = (&js, &nats_subjects);
    let started = Instant::now();
    pipelined(messages, window, batch, bar, |i| async move {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            headwater_publish::NATS_MSG_ID_HEADER,
            headwater_core::EventId::new_random().to_string().as_str(),
        );
        let subject = subjects_ref[subject_index(i, subjects)].clone();
        let sent = js_ref
            .publish_with_headers(subject, headers, body.to_vec().into())
            .await
            .context("JetStream publish")?;
        Ok(async move {
            sent.await.context("JetStream did not ack a message")?;
            Ok(())
        })
    })
    .await?;
    let elapsed = started.elapsed();
    let mut stream = js.get_stream(&name).await.context("the raw stream")?;
    let held = stream
        .info()
        .await
        .context("the raw stream")?
        .state
        .messages;
    js.delete_stream(&name)
        .await
        .with_context(|| format!("cannot delete the stream {name}"))?;
    if held < messages {
        bail!("JetStream acked {messages} messages, the stream held {held}");
    }
    Ok(Raw { messages, elapsed })
}
