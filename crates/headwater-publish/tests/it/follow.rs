//! The publisher follower against the real brokers started by `scripts/test`
//! (HEADWATER_TEST_AMQP_URL, HEADWATER_TEST_NATS_URL); without them these tests fail.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use headwater_core::{EventId, EventType, FeedId, FeedPosition, Position, Subject, Timestamp};
use headwater_publish::{
    AmqpBroker, Broker, NatsBroker, PublisherOptions, PublisherStatus, Publishers, exchange_name,
    stream_name,
};
use headwater_store::{FeedStore, MemoryFeedStore, ProjectedEvent, ProjectorBatch};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::time::Instant;

const SOURCE: &str = "accounts";
const WAIT: Duration = Duration::from_secs(30);
/// Subjects with dots, including ones NATS cannot take as they are.
const SUBJECTS: [&str; 5] = ["acc-1", "eu.acc-2", "acc_3", ".acc-4", "acc..5"];

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run scripts/test (it starts RabbitMQ and NATS)")
    })
}

fn unique_feed() -> FeedId {
    let id = uuid::Uuid::new_v4().simple().to_string();
    FeedId::parse(&format!("hwf_{}.v1", &id[..16])).unwrap()
}

fn fast() -> PublisherOptions {
    PublisherOptions::default()
        .with_batch_events_max(100)
        .with_in_flight_events_max(1_000)
        .with_backoff(Duration::from_millis(20), Duration::from_millis(200))
}

/// Appends `count` events over [`SUBJECTS`] after internal position `from`.
async fn append(store: &MemoryFeedStore, feed: &FeedId, from: u64, count: u64) {
    store.register(feed).await.unwrap();
    let mut position = from;
    while position < from + count {
        let to = (position + 250).min(from + count);
        let events = (position + 1..=to)
            .map(|p| ProjectedEvent {
                id: EventId::new_random(),
                event_type: EventType::new("accounts.deposited").unwrap(),
                subject: Subject::new(SUBJECTS[(p % SUBJECTS.len() as u64) as usize]).unwrap(),
                time: Timestamp::from_unix_micros(1_798_380_419_000_000 + p),
                data: format!(r#"{{"amount":{p}}}"#).into_bytes(),
                source_position: Position(p),
            })
            .collect();
        store
            .commit(
                feed,
                ProjectorBatch {
                    from: Position(position),
                    to: Position(to),
                    events,
                },
            )
            .await
            .unwrap();
        position = to;
    }
}

async fn wait_for(
    publishers: &Publishers,
    feed: &FeedId,
    what: &str,
    until: impl Fn(&PublisherStatus) -> bool,
) -> PublisherStatus {
    let mut status = publishers.watch(feed).unwrap();
    let deadline = Instant::now() + WAIT;
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

/// What a consumer saw: the CloudEvents' ids, subjects and sequences, in arrival order.
#[derive(Default)]
struct Received {
    log: Vec<(String, String, u64)>,
}

impl Received {
    fn push(&mut self, body: &[u8]) {
        let event: serde_json::Value = serde_json::from_slice(body).unwrap();
        self.log.push((
            event["id"].as_str().unwrap().to_owned(),
            event["subject"].as_str().unwrap().to_owned(),
            event["sequence"].as_u64().unwrap(),
        ));
    }

    fn distinct(&self) -> usize {
        self.log.iter().map(|e| &e.0).collect::<BTreeSet<_>>().len()
    }

    /// Every event of the feed at least once; first deliveries in sequence order per subject.
    async fn check(&self, store: &MemoryFeedStore, feed: &FeedId) {
        let events = store
            .read_feed(feed, FeedPosition::START, 10_000)
            .await
            .unwrap();
        let ids: BTreeSet<String> = self.log.iter().map(|e| e.0.clone()).collect();
        for event in &events {
            assert!(
                ids.contains(&event.id.to_string()),
                "event {} never arrived",
                event.position
            );
        }
        assert_eq!(ids.len(), events.len(), "nothing but the feed's events");
        let mut last: BTreeMap<&str, u64> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for (id, subject, sequence) in &self.log {
            if seen.insert(id) {
                let last = last.entry(subject).or_insert(0);
                assert_eq!(*sequence, *last + 1, "subject {subject}");
                *last = *sequence;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_returned_messages_hold_the_cursor_until_a_queue_is_bound() {
    let feed = unique_feed();
    let store = Arc::new(MemoryFeedStore::new());
    append(&store, &feed, 0, 1_000).await;
    let broker: Arc<dyn Broker> =
        Arc::new(AmqpBroker::lazy(&env("HEADWATER_TEST_AMQP_URL")).unwrap());
    let publishers = Publishers::builder(broker, SOURCE)
        .feed(feed.clone())
        .options(fast())
        .start(Arc::clone(&store))
        .unwrap();
    // The exchange exists, no queue is bound: RabbitMQ returns every message.
    let status = wait_for(&publishers, &feed, "returned messages", |s| {
        s.reconnects >= 2
    })
    .await;
    assert_eq!(status.cursor, FeedPosition::START, "{status:?}");
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("returned")),
        "{status:?}"
    );

    // A consumer binds its queue: everything is published, and more as it comes.
    let connection = Connection::connect(
        &env("HEADWATER_TEST_AMQP_URL"),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
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
            exchange_name(&feed).as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    append(&store, &feed, 1_000, 500).await;
    wait_for(&publishers, &feed, "the head", |s| {
        s.cursor == FeedPosition(1_500)
    })
    .await;
    publishers.shutdown().await;

    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut received = Received::default();
    let deadline = Instant::now() + WAIT;
    while received.distinct() < 1_500 {
        let delivery = tokio::time::timeout_at(deadline, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("{} of 1500 arrived", received.distinct()))
            .unwrap()
            .unwrap();
        received.push(&delivery.data);
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    received.check(&store, &feed).await;
    channel
        .exchange_delete(
            exchange_name(&feed).as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_publishes_a_growing_feed_once_each() {
    let feed = unique_feed();
    let store = Arc::new(MemoryFeedStore::new());
    append(&store, &feed, 0, 2_000).await;
    let broker = Arc::new(
        NatsBroker::lazy(&env("HEADWATER_TEST_NATS_URL"))
            .await
            .unwrap(),
    );
    let publishers = Publishers::builder(broker.clone(), SOURCE)
        .feed(feed.clone())
        .options(fast())
        .start(Arc::clone(&store))
        .unwrap();
    // Appends while it publishes.
    for round in 0..10 {
        append(&store, &feed, 2_000 + round * 300, 300).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = wait_for(&publishers, &feed, "the head", |s| {
        s.cursor == FeedPosition(5_000)
    })
    .await;
    assert_eq!(status.last_error, None);
    publishers.shutdown().await;

    let stream = broker
        .jetstream()
        .await
        .unwrap()
        .get_stream(stream_name(&feed))
        .await
        .unwrap();
    assert_eq!(stream.get_info().await.unwrap().state.messages, 5_000);
    let mut received = Received::default();
    for sequence in 1..=5_000 {
        let message = stream.get_raw_message(sequence).await.unwrap();
        received.push(&message.payload);
    }
    received.check(&store, &feed).await;
    broker
        .jetstream()
        .await
        .unwrap()
        .delete_stream(stream_name(&feed))
        .await
        .unwrap();
}
