//! The publisher follower against the real brokers started by `scripts/test`
//! (HEADWATER_TEST_AMQP_URL, HEADWATER_TEST_NATS_URL); without them these tests fail.

use std::sync::Arc;
use std::time::Duration;

use headwater_core::{FeedId, FeedPosition};
use headwater_publish::{AmqpBroker, Broker, NatsBroker, PublisherOptions, Publishers};
use headwater_store::{FeedStore, MemoryFeedStore};

use crate::support::{
    AmqpQueue, SOURCE, amqp_url, nats_take_stream, nats_url, unique_feed, wait_for_status,
};

const WAIT: Duration = Duration::from_secs(30);
/// Subjects with dots, including ones NATS cannot take as they are.
const SUBJECTS: [&str; 5] = ["acc-1", "eu.acc-2", "acc_3", ".acc-4", "acc..5"];

fn fast() -> PublisherOptions {
    PublisherOptions::default()
        .with_batch_events_max(100)
        .with_in_flight_events_max(1_000)
        .with_backoff(Duration::from_millis(20), Duration::from_millis(200))
}

async fn append(store: &MemoryFeedStore, feed: &FeedId, from: u64, count: u64) {
    crate::support::append(store, feed, from, count, 250, |p| {
        SUBJECTS[(p % SUBJECTS.len() as u64) as usize].to_owned()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_returned_messages_hold_the_cursor_until_a_queue_is_bound() {
    let feed = unique_feed("hwf");
    let store = Arc::new(MemoryFeedStore::new());
    append(&store, &feed, 0, 1_000).await;
    let broker: Arc<dyn Broker> = Arc::new(AmqpBroker::lazy(&amqp_url()).unwrap());
    let publishers = Publishers::builder(broker, SOURCE)
        .feed(feed.clone())
        .options(fast())
        .start(Arc::clone(&store))
        .unwrap();
    // The exchange exists, no queue is bound: RabbitMQ returns every message.
    let status = wait_for_status(&publishers, &feed, "returned messages", WAIT, |s| {
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
    let queue = AmqpQueue::bind(&amqp_url(), &feed).await;
    append(&store, &feed, 1_000, 500).await;
    wait_for_status(&publishers, &feed, "the head", WAIT, |s| {
        s.cursor == FeedPosition(1_500)
    })
    .await;
    publishers.shutdown().await;
    let received = queue.receive(1_500, WAIT).await;
    received.check(
        &store
            .read_feed(&feed, FeedPosition::START, 10_000)
            .await
            .unwrap(),
    );
    queue.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_publishes_a_growing_feed_once_each() {
    let feed = unique_feed("hwf");
    let store = Arc::new(MemoryFeedStore::new());
    append(&store, &feed, 0, 2_000).await;
    let broker = Arc::new(NatsBroker::lazy(&nats_url()).await.unwrap());
    let publishers = Publishers::builder(broker, SOURCE)
        .feed(feed.clone())
        .options(fast())
        .start(Arc::clone(&store))
        .unwrap();
    // Appends while it publishes.
    for round in 0..10 {
        append(&store, &feed, 2_000 + round * 300, 300).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = wait_for_status(&publishers, &feed, "the head", WAIT, |s| {
        s.cursor == FeedPosition(5_000)
    })
    .await;
    assert_eq!(status.last_error, None);
    publishers.shutdown().await;

    let received = nats_take_stream(&nats_url(), &feed).await;
    assert_eq!(received.log.len(), 5_000, "once each");
    received.check(
        &store
            .read_feed(&feed, FeedPosition::START, 10_000)
            .await
            .unwrap(),
    );
}
