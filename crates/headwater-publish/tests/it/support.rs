//! What the tests share: the servers' URLs, feeds of their own, filling a feed, waiting for a
//! publisher, and the checker of what a broker received.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::StreamExt;
use headwater_core::{EventId, EventType, FeedId, Position, Subject, Timestamp};
use headwater_publish::{NatsBroker, PublisherStatus, Publishers, exchange_name, stream_name};
use headwater_store::{FeedEvent, FeedStore, ProjectedEvent, ProjectorBatch};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::time::Instant;

/// The CloudEvents `source` of every test feed.
pub(crate) const SOURCE: &str = "accounts";

/// A server's URL from the variable `scripts/test` sets; without it the test fails, loudly.
pub(crate) fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run ./scripts/test (it starts PostgreSQL, RabbitMQ and NATS), or \
             source scripts/lib/{{postgres,rabbitmq,nats}}.sh and start them"
        )
    })
}

pub(crate) fn amqp_url() -> String {
    env("HEADWATER_TEST_AMQP_URL")
}

pub(crate) fn nats_url() -> String {
    env("HEADWATER_TEST_NATS_URL")
}

/// A feed nobody else uses: `{prefix}_{16 hex}.v1`.
pub(crate) fn unique_feed(prefix: &str) -> FeedId {
    let id = uuid::Uuid::new_v4().simple().to_string();
    FeedId::parse(&format!("{prefix}_{}.v1", &id[..16])).unwrap()
}

/// Appends `count` events to `feed` after internal position `from`, in commits of `per_commit`;
/// the event at position `p` has the subject `subject(p)`, `time` a fixed instant plus `p` µs.
pub(crate) async fn append(
    store: &(impl FeedStore + ?Sized),
    feed: &FeedId,
    from: u64,
    count: u64,
    per_commit: u64,
    subject: impl Fn(u64) -> String,
) {
    store.register(feed).await.unwrap();
    let mut position = from;
    while position < from + count {
        let to = (position + per_commit).min(from + count);
        let events = (position + 1..=to)
            .map(|p| ProjectedEvent {
                id: EventId::new_random(),
                event_type: EventType::new("accounts.deposited").unwrap(),
                subject: Subject::new(subject(p)).unwrap(),
                time: Timestamp::from_unix_micros(1_798_380_419_000_000 + p),
                data: format!(r#"{{"amount":{p}}}"#).into_bytes(),
                source_position: Position(p),
            })
            .collect();
        let batch = ProjectorBatch {
            from: Position(position),
            to: Position(to),
            events,
        };
        store.commit(feed, batch).await.unwrap();
        position = to;
    }
}

/// Waits (at most `wait`) until the publisher of `feed` reports a status `until` accepts.
pub(crate) async fn wait_for_status(
    publishers: &Publishers,
    feed: &FeedId,
    what: &str,
    wait: Duration,
    until: impl Fn(&PublisherStatus) -> bool,
) -> PublisherStatus {
    let mut status = publishers.watch(feed).unwrap();
    let deadline = Instant::now() + wait;
    loop {
        {
            let now = status.borrow_and_update();
            if until(&now) {
                return now.clone();
            }
        }
        if !matches!(
            tokio::time::timeout_at(deadline, status.changed()).await,
            Ok(Ok(()))
        ) {
            panic!("timed out waiting for {what}: {:?}", status.borrow());
        }
    }
}

/// What a consumer of the broker received: each CloudEvent's id, subject and sequence, in
/// arrival order.
#[derive(Debug, Default)]
pub(crate) struct Deliveries {
    pub(crate) log: Vec<(String, String, u64)>,
}

impl Deliveries {
    pub(crate) fn push(&mut self, body: &[u8]) {
        let event: serde_json::Value = serde_json::from_slice(body).unwrap();
        self.log.push((
            event["id"].as_str().unwrap().to_owned(),
            event["subject"].as_str().unwrap().to_owned(),
            event["sequence"].as_u64().unwrap(),
        ));
    }

    pub(crate) fn distinct(&self) -> usize {
        self.log.iter().map(|e| &e.0).collect::<BTreeSet<_>>().len()
    }

    /// G6 as a consumer sees it: every event of `feed` at least once, nothing else, and each
    /// subject's first deliveries in sequence order.
    pub(crate) fn check(&self, feed: &[FeedEvent]) {
        let expected: BTreeSet<String> = feed.iter().map(|e| e.id.to_string()).collect();
        let received: BTreeSet<String> = self.log.iter().map(|e| e.0.clone()).collect();
        let missing = expected.difference(&received).count();
        assert_eq!(missing, 0, "{missing} events of the feed never arrived");
        assert_eq!(received, expected, "something not of the feed arrived");
        let mut last: BTreeMap<&str, u64> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for (at, (id, subject, sequence)) in self.log.iter().enumerate() {
            if !seen.insert(id) {
                continue;
            }
            let last = last.entry(subject).or_insert(0);
            assert_eq!(
                *sequence,
                *last + 1,
                "subject {subject}: the first delivery of sequence {sequence} (message {at} of \
                 {}) came after {last}",
                self.log.len()
            );
            *last = *sequence;
        }
    }
}

/// A consumer's queue on RabbitMQ: the feed's exchange declared (durable topic, as the publisher
/// declares it) and an exclusive queue bound to it with `#`, before anything is published.
pub(crate) struct AmqpQueue {
    _connection: Connection,
    pub(crate) channel: Channel,
    pub(crate) queue: String,
    exchange: String,
}

impl AmqpQueue {
    pub(crate) async fn bind(url: &str, feed: &FeedId) -> AmqpQueue {
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
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .name()
            .to_string();
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
        AmqpQueue {
            _connection: connection,
            channel,
            queue,
            exchange,
        }
    }

    /// Consumes (and acks) until `distinct` different events arrived, at most `wait`.
    pub(crate) async fn receive(&self, distinct: usize, wait: Duration) -> Deliveries {
        let mut consumer = self
            .channel
            .basic_consume(
                self.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut received = Deliveries::default();
        let deadline = Instant::now() + wait;
        while received.distinct() < distinct {
            let delivery = tokio::time::timeout_at(deadline, consumer.next())
                .await
                .unwrap_or_else(|_| panic!("{} of {distinct} arrived", received.distinct()))
                .unwrap()
                .unwrap();
            received.push(&delivery.data);
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        received
    }

    /// Deletes the exchange (the exclusive queue goes with the connection).
    pub(crate) async fn delete(self) {
        self.channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await
            .unwrap();
    }
}

/// Everything the feed's JetStream stream holds, in stream order, and then deletes the stream.
pub(crate) async fn nats_take_stream(url: &str, feed: &FeedId) -> Deliveries {
    let broker = NatsBroker::connect(url).await.unwrap();
    let jetstream = broker.jetstream().await.unwrap();
    let stream = jetstream.get_stream(stream_name(feed)).await.unwrap();
    let stored = stream.get_info().await.unwrap().state.messages;
    let mut received = Deliveries::default();
    for sequence in 1..=stored {
        let message = stream.get_raw_message(sequence).await.unwrap();
        received.push(&message.payload);
    }
    jetstream.delete_stream(stream_name(feed)).await.unwrap();
    received
}
