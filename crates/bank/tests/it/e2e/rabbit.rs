//! The lossy RabbitMQ path: a competing consumer on `statements`' own queue that takes some of
//! its messages (`basic.get`, at a pace of its own) and either drops them (ack, nothing else) or
//! publishes them twice again to the feed's exchange (so `statements` gets them later, out of
//! order, twice — after their successors: gaps to heal, then duplicates to skip).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The exchange `accounts` publishes feed v1 to (SPEC: `headwater.{name}.v{version}`).
pub(crate) const EXCHANGE: &str = "headwater.accounts.v1";
/// `statements`' queue on it (the consumer library's `{exchange}.{consumer}`).
pub(crate) const QUEUE: &str = "headwater.accounts.v1.statements";
/// How often the competing consumer takes a message, in milliseconds.
const TAKE_EVERY_MILLIS: u64 = 40;

/// What the competing consumer did.
#[derive(Debug, Default)]
pub(crate) struct ChaosStats {
    pub(crate) taken: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) duplicated: AtomicU64,
    pub(crate) errors: AtomicU64,
}

impl std::fmt::Display for ChaosStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        write!(
            f,
            "rabbitmq chaos: {} messages taken off statements' queue, {} dropped, {} published \
             twice again, {} errors",
            get(&self.taken),
            get(&self.dropped),
            get(&self.duplicated),
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

/// Runs the competing consumer until `stop`: each take drops the message with probability
/// `drop`, publishes it twice again otherwise.
pub(crate) async fn compete(
    url: String,
    drop: f64,
    seed: u64,
    stop: Arc<AtomicBool>,
    stats: Arc<ChaosStats>,
) {
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
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(TAKE_EVERY_MILLIS)).await;
                take(&channel, &mut rng, drop, &stats).await?;
            }
            let _ = connection.close(200, "done".into()).await;
            Ok::<(), String>(())
        };
        if let Err(error) = session.await {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("rabbitmq chaos: {error}; again");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn take(
    channel: &Channel,
    rng: &mut StdRng,
    drop: f64,
    stats: &ChaosStats,
) -> Result<(), String> {
    let Some(message) = channel
        .basic_get(QUEUE.into(), BasicGetOptions::default())
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    stats.taken.fetch_add(1, Ordering::Relaxed);
    let delivery = message.delivery;
    if rng.random_bool(drop) {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
    } else {
        for _ in 0..2 {
            let confirm = channel
                .basic_publish(
                    EXCHANGE.into(),
                    delivery.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    BasicProperties::default()
                        .with_message_id(
                            delivery.properties.message_id().clone().unwrap_or_default(),
                        )
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
        stats.duplicated.fetch_add(1, Ordering::Relaxed);
    }
    delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}
