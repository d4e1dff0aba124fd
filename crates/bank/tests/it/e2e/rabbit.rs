//! The lossy RabbitMQ path: a competing consumer on `statements`' own queue (RabbitMQ hands the
//! queue's messages to its consumers in turn: it gets a share of them) that drops some of the
//! messages it gets (ack, nothing else), publishes some twice again to the feed's exchange and
//! the others once again — `statements` gets those later, after their successors, out of order:
//! gaps to heal, duplicates to skip, and lost last events that only reconstitution finds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The exchange `accounts` publishes feed v1 to (SPEC: `headwater.{name}.v{version}`).
pub(crate) const EXCHANGE: &str = "headwater.accounts.v1";
/// `statements`' queue on it (the consumer library's `{exchange}.{consumer}`).
pub(crate) const QUEUE: &str = "headwater.accounts.v1.statements";
/// Of the messages the competing consumer gets, it drops this share and publishes this share
/// twice again (the others once again).
pub(crate) const DROP_SHARE: f64 = 0.25;
pub(crate) const DUPLICATE_SHARE: f64 = 0.25;

/// What the competing consumer did.
#[derive(Debug, Default)]
pub(crate) struct ChaosStats {
    pub(crate) taken: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) duplicated: AtomicU64,
    pub(crate) delayed: AtomicU64,
    pub(crate) errors: AtomicU64,
}

impl std::fmt::Display for ChaosStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        write!(
            f,
            "rabbitmq chaos: {} messages taken off statements' queue, {} dropped, {} published \
             twice again, {} once again, {} errors",
            get(&self.taken),
            get(&self.dropped),
            get(&self.duplicated),
            get(&self.delayed),
            get(&self.errors),
        )
    }
}

/// Declares the feed's exchange and `statements`' queue bound to it, as a deployment does before
/// the services start (the services declare the same, idempotently).
pub(crate) async fn declare(url: &str) {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("connecting to RabbitMQ at {url}: {e}"));
    let channel = connection.create_channel().await.unwrap();
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_declare(
            QUEUE.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            QUEUE.into(),
            EXCHANGE.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "declared".into()).await;
}

/// Runs the competing consumer until `stop`.
pub(crate) async fn compete(url: String, seed: u64, stop: Arc<AtomicBool>, stats: Arc<ChaosStats>) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.load(Ordering::SeqCst) {
        let session = async {
            let connection = Connection::connect(&url, ConnectionProperties::default())
                .await
                .map_err(|e| e.to_string())?;
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| e.to_string())?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| e.to_string())?;
            channel
                .basic_qos(1, BasicQosOptions::default())
                .await
                .map_err(|e| e.to_string())?;
            let mut deliveries = channel
                .basic_consume(
                    QUEUE.into(),
                    "e2e-chaos".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| e.to_string())?;
            while !stop.load(Ordering::SeqCst) {
                let next = tokio::time::timeout(STOP_POLL, deliveries.next()).await;
                match next {
                    Err(_) => continue,
                    Ok(None) => return Err("the consumer ended".to_owned()),
                    Ok(Some(delivery)) => {
                        let delivery = delivery.map_err(|e| e.to_string())?;
                        garble(&channel, delivery, &mut rng, &stats).await?;
                    }
                }
            }
            let _ = connection.close(200, "done".into()).await;
            Ok::<(), String>(())
        };
        if let Err(error) = session.await {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("rabbitmq chaos: {error}; again");
            tokio::time::sleep(STOP_POLL).await;
        }
    }
}

/// How often the competing consumer checks whether to stop.
const STOP_POLL: Duration = Duration::from_millis(100);

async fn garble(
    channel: &Channel,
    delivery: Delivery,
    rng: &mut StdRng,
    stats: &ChaosStats,
) -> Result<(), String> {
    stats.taken.fetch_add(1, Ordering::Relaxed);
    let roll: f64 = rng.random();
    let copies = if roll < DROP_SHARE {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
        0
    } else if roll < DROP_SHARE + DUPLICATE_SHARE {
        stats.duplicated.fetch_add(1, Ordering::Relaxed);
        2
    } else {
        stats.delayed.fetch_add(1, Ordering::Relaxed);
        1
    };
    for _ in 0..copies {
        let confirm = channel
            .basic_publish(
                EXCHANGE.into(),
                delivery.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &delivery.data,
                BasicProperties::default()
                    .with_message_id(delivery.properties.message_id().clone().unwrap_or_default())
                    .with_delivery_mode(2),
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        if !confirm.is_ack() {
            return Err(format!(
                "a republished message was not confirmed: {confirm:?}"
            ));
        }
    }
    delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The queue that takes the feed's messages instead of `statements`' while they are diverted.
const SINK_QUEUE: &str = "e2e.sink";
/// The longest the diverted messages may take to arrive in the sink, in seconds.
const DIVERT_SECS_MAX: u64 = 30;

/// Messages go to a sink queue instead of `statements`' from now on (until
/// [`divert_back`]): what `accounts` publishes meanwhile is lost to `statements`.
pub(crate) async fn divert(url: &str) -> Result<(), String> {
    let (connection, channel) = open(url).await?;
    declare_queue(&channel, SINK_QUEUE).await?;
    bind(&channel, SINK_QUEUE, true).await?;
    bind(&channel, QUEUE, false).await?;
    let _ = connection.close(200, "diverted".into()).await;
    Ok(())
}

/// Waits (bounded) until every event of `events` (subject, sequence) reached the sink, then
/// sends the messages to `statements`' queue again and deletes the sink.
pub(crate) async fn divert_back(url: &str, events: &[(String, u64)]) -> Result<(), String> {
    let (connection, channel) = open(url).await?;
    let mut missing: std::collections::BTreeSet<(String, u64)> = events.iter().cloned().collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(DIVERT_SECS_MAX);
    while !missing.is_empty() {
        let message = channel
            .basic_get(SINK_QUEUE.into(), BasicGetOptions { no_ack: true })
            .await
            .map_err(|e| e.to_string())?;
        match message {
            Some(message) => {
                let event: serde_json::Value =
                    serde_json::from_slice(&message.delivery.data).unwrap_or_default();
                if let (Some(subject), Some(sequence)) =
                    (event["subject"].as_str(), event["sequence"].as_u64())
                {
                    missing.remove(&(subject.to_owned(), sequence));
                }
            }
            None if std::time::Instant::now() > deadline => {
                return Err(format!(
                    "events {missing:?} did not reach the sink within {DIVERT_SECS_MAX} s"
                ));
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    bind(&channel, QUEUE, true).await?;
    bind(&channel, SINK_QUEUE, false).await?;
    channel
        .queue_delete(SINK_QUEUE.into(), QueueDeleteOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let _ = connection.close(200, "diverted back".into()).await;
    Ok(())
}

async fn open(url: &str) -> Result<(Connection, Channel), String> {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| e.to_string())?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    Ok((connection, channel))
}

/// Declares a durable queue (idempotently): its ready messages.
async fn declare_queue(channel: &Channel, queue: &str) -> Result<u32, String> {
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
        .map(|q| q.message_count())
        .map_err(|e| format!("declaring {queue}: {e}"))
}

/// Binds `queue` to the feed's exchange with `#`, or unbinds it.
async fn bind(channel: &Channel, queue: &str, bound: bool) -> Result<(), String> {
    let outcome = if bound {
        channel
            .queue_bind(
                queue.into(),
                EXCHANGE.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    } else {
        channel
            .queue_unbind(
                queue.into(),
                EXCHANGE.into(),
                "#".into(),
                FieldTable::default(),
            )
            .await
    };
    outcome.map_err(|e| format!("(un)binding {queue}: {e}"))
}
