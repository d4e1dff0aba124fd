//! The checker: consumes what a broker holds of a feed and compares it with the feed.
//!
//! RabbitMQ keeps only what a queue takes: the test declares the feed's exchange and a durable
//! queue bound to it with `#` before anything is published ([`amqp_prepare`]). JetStream keeps
//! the stream the publisher declared: the checker reads it from the start with an ordered
//! consumer.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::StreamExt;
use headwater_core::FeedId;
use headwater_publish::{NATS_MSG_ID_HEADER, exchange_name, nats_subject, stream_name};
use headwater_store::FeedEvent;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};

use crate::processes::producer::SOURCE;

/// The longest the checker waits for the next message of what the broker holds.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages the checker's RabbitMQ consumer takes ahead.
const PREFETCH_MESSAGES: u16 = 1_000;

/// Deliveries, in the order the broker delivered them: (message id, routing subject, body).
#[derive(Debug, Default)]
pub(crate) struct Deliveries(Vec<(String, String, Vec<u8>)>);

/// Checks that `deliveries` hold every event of `feed` (`expected`, the whole feed) at least
/// once with its exact body, nothing else, and for each subject the first delivery of each of
/// its events in sequence order. `route` gives the routing subject of a feed subject.
pub(crate) fn check(
    feed: &FeedId,
    expected: &[FeedEvent],
    deliveries: &Deliveries,
    route: impl Fn(&str) -> String,
) {
    assert!(!expected.is_empty(), "an empty feed checks nothing");
    let by_id: HashMap<String, &FeedEvent> =
        expected.iter().map(|e| (e.id.to_string(), e)).collect();
    let mut first_seen = HashSet::new();
    let mut last_sequence: HashMap<&str, u64> = HashMap::new();
    for (index, (id, routed, body)) in deliveries.0.iter().enumerate() {
        let event = by_id
            .get(id)
            .unwrap_or_else(|| panic!("delivery {index}: message id {id:?} is not in the feed"));
        assert_eq!(
            routed,
            &route(event.subject.as_str()),
            "delivery {index}: {event:?}"
        );
        assert!(
            body == &headwater_api::cloud_event_json(feed, SOURCE, event).unwrap(),
            "delivery {index}: the body differs from the feed's element at {}",
            event.position.0
        );
        if !first_seen.insert(id.clone()) {
            continue;
        }
        let last = last_sequence.entry(event.subject.as_str()).or_insert(0);
        assert!(
            event.sequence.0 > *last,
            "delivery {index}: the first delivery of {} sequence {} (position {}) comes after \
             that of sequence {last}",
            event.subject.as_str(),
            event.sequence.0,
            event.position.0,
        );
        *last = event.sequence.0;
    }
    let missing: Vec<u64> = expected
        .iter()
        .filter(|e| !first_seen.contains(&e.id.to_string()))
        .map(|e| e.position.0)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} events were never delivered, at positions {:?}…",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(20)]
    );
    eprintln!(
        "checked: {} events, {} deliveries ({} duplicates), {} subjects in order",
        expected.len(),
        deliveries.0.len(),
        deliveries.0.len() - expected.len(),
        last_sequence.len()
    );
}

// ---- RabbitMQ ----

/// The checker's queue on a RabbitMQ broker.
#[derive(Debug)]
pub(crate) struct AmqpQueue {
    url: String,
    feed: FeedId,
    queue: String,
}

/// Declares the feed's exchange as the publisher does (a durable topic exchange) and a durable
/// queue bound to it with `#`: from now on the queue keeps every message published to the feed,
/// across broker restarts.
pub(crate) async fn amqp_prepare(url: &str, feed: &FeedId) -> AmqpQueue {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let exchange = exchange_name(feed);
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let queue = format!("{exchange}.checker");
    channel
        .queue_declare(
            queue.as_str().into(),
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
            queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "prepared".into()).await;
    AmqpQueue {
        url: url.to_owned(),
        feed: feed.clone(),
        queue,
    }
}

/// What [`amqp_prepare`] declares, as definitions a RabbitMQ node imports at boot
/// ([`headwater_testkit::broker::BrokerProcess::rabbitmq_definitions`]): for a node that is not
/// running yet.
pub(crate) fn amqp_definitions(url: &str, feed: &FeedId) -> (String, AmqpQueue) {
    let exchange = exchange_name(feed);
    let queue = format!("{exchange}.checker");
    let definitions = serde_json::json!({
        "users": [{"name": "guest", "password": "guest", "tags": "administrator"}],
        "vhosts": [{"name": "/"}],
        "permissions": [
            {"user": "guest", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
        ],
        "exchanges": [{
            "name": exchange, "vhost": "/", "type": "topic", "durable": true,
            "auto_delete": false, "internal": false, "arguments": {}
        }],
        "queues": [{
            "name": queue, "vhost": "/", "durable": true, "auto_delete": false, "arguments": {}
        }],
        "bindings": [{
            "source": exchange, "vhost": "/", "destination": queue,
            "destination_type": "queue", "routing_key": "#", "arguments": {}
        }]
    });
    let queue = AmqpQueue {
        url: url.to_owned(),
        feed: feed.clone(),
        queue,
    };
    (definitions.to_string(), queue)
}

impl AmqpQueue {
    /// Consumes the queue until every event of `expected` was delivered (or nothing more comes
    /// for [`RECEIVE_TIMEOUT`]), checks the deliveries, and deletes the queue and the exchange.
    pub(crate) async fn check(self, expected: &[FeedEvent]) {
        let connection = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .basic_qos(PREFETCH_MESSAGES, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                "checker".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut wanted: HashSet<String> = expected.iter().map(|e| e.id.to_string()).collect();
        let mut deliveries = Deliveries::default();
        while !wanted.is_empty() {
            let Ok(next) = tokio::time::timeout(RECEIVE_TIMEOUT, consumer.next()).await else {
                break;
            };
            let delivery = next.expect("the consumer ended").unwrap();
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default();
            wanted.remove(&id);
            deliveries
                .0
                .push((id, delivery.routing_key.to_string(), delivery.data));
        }
        check(&self.feed, expected, &deliveries, |subject| {
            subject.to_owned()
        });
        channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        channel
            .exchange_delete(
                exchange_name(&self.feed).as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await
            .unwrap();
        let _ = connection.close(200, "checked".into()).await;
    }
}

// ---- NATS JetStream ----

/// Reads the feed's whole JetStream stream in order with an ordered consumer, checks it, and
/// deletes the stream.
pub(crate) async fn nats_check(url: &str, feed: &FeedId, expected: &[FeedEvent]) {
    let client = async_nats::connect(url).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let mut stream = jetstream.get_stream(stream_name(feed)).await.unwrap();
    let held = stream.info().await.unwrap().state.messages;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut deliveries = Deliveries::default();
    for index in 0..held {
        let message = tokio::time::timeout(RECEIVE_TIMEOUT, messages.next())
            .await
            .unwrap_or_else(|_| panic!("message {index} of {held} did not come"))
            .expect("the consumer ended")
            .unwrap();
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(NATS_MSG_ID_HEADER))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        deliveries
            .0
            .push((id, message.subject.to_string(), message.payload.to_vec()));
    }
    check(feed, expected, &deliveries, |subject| {
        nats_subject(feed, subject)
    });
    jetstream.delete_stream(stream_name(feed)).await.unwrap();
}
