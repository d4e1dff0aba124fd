//! Two replicas on one PostgreSQL store (`HEADWATER_TEST_POSTGRES_URL`), each with a publisher of
//! the same feed to NATS (`HEADWATER_TEST_NATS_URL`) and its `PostgresStore` as the leadership:
//! one publishes at a time, the other takes over when it stops, and the stream ends up holding
//! the feed once, in order. These tests fail without the servers; they are never skipped.

use std::sync::Arc;
use std::time::Duration;

use headwater_core::FeedId;
use headwater_core::FeedPosition;
use headwater_postgres::{Options, PostgresStore};
use headwater_publish::{
    Broker, NatsBroker, PublisherOptions, PublisherState, PublisherStatus, Publishers,
};
use headwater_store::FeedStore;
use tokio::time::Instant;

use crate::support::{nats_take_stream, nats_url, unique_feed};

const WAIT: Duration = Duration::from_secs(30);

/// A schema of its own, dropped at the end.
struct Fresh {
    url: String,
    schema: String,
}

impl Fresh {
    fn new() -> Fresh {
        Fresh {
            url: headwater_testkit::postgres::url(),
            schema: headwater_testkit::postgres::fresh_schema(),
        }
    }

    /// A replica's store; its leader elections retry and check quickly, so takeovers are.
    async fn connect(&self) -> PostgresStore {
        let mut options = Options::with_schema(&self.schema);
        options.leader_retry_interval = Duration::from_millis(50);
        options.leader_health_check_interval = Duration::from_millis(100);
        PostgresStore::connect(&self.url, options).await.unwrap()
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        headwater_testkit::postgres::drop_schema(&self.url, &self.schema);
    }
}

async fn append(feeds: &impl FeedStore, feed: &FeedId, from: u64, count: u64) {
    crate::support::append(feeds, feed, from, count, count, |p| {
        format!("acc-{}", p % 7)
    })
    .await;
}

async fn wait_until(
    what: &str,
    replicas: &[&Publishers],
    feed: &FeedId,
    until: impl Fn(&[PublisherStatus]) -> bool,
) -> Vec<PublisherStatus> {
    let deadline = Instant::now() + WAIT;
    loop {
        let statuses: Vec<PublisherStatus> = replicas
            .iter()
            .map(|p| p.watch(feed).unwrap().borrow().clone())
            .collect();
        if until(&statuses) {
            return statuses;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn publishing(status: &PublisherStatus) -> bool {
    matches!(
        status.state,
        PublisherState::Publishing | PublisherState::CaughtUp
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_publishes_at_a_time_and_another_takes_over() {
    let fresh = Fresh::new();
    let (a, b) = (fresh.connect().await, fresh.connect().await);
    let feed = unique_feed("hwp");
    let feeds_a = Arc::new(a.feed_store());
    let feeds_b = Arc::new(b.feed_store());
    append(&*feeds_a, &feed, 0, 1_000).await;

    let nats = nats_url();
    let start = |store: PostgresStore, feeds| {
        let nats = nats.clone();
        let feed = feed.clone();
        async move {
            let broker: Arc<dyn Broker> = Arc::new(NatsBroker::lazy(&nats).await.unwrap());
            Publishers::builder(broker, "accounts")
                .feed(feed)
                .leadership(store)
                .options(
                    PublisherOptions::default()
                        .with_backoff(Duration::from_millis(20), Duration::from_millis(200)),
                )
                .start(feeds)
                .unwrap()
        }
    };
    let replica_a = start(a, Arc::clone(&feeds_a)).await;
    let replica_b = start(b, Arc::clone(&feeds_b)).await;

    // One leads and publishes everything; the other waits.
    let statuses = wait_until(
        "one replica at the head",
        &[&replica_a, &replica_b],
        &feed,
        |s| {
            s.iter()
                .any(|s| s.cursor == FeedPosition(1_000) && publishing(s))
        },
    )
    .await;
    let leaders = statuses.iter().filter(|s| publishing(s)).count();
    let waiting = statuses
        .iter()
        .filter(|s| s.state == PublisherState::WaitingForLeadership)
        .count();
    assert_eq!((leaders, waiting), (1, 1), "{statuses:?}");
    let (leader, follower) = if publishing(&statuses[0]) {
        (replica_a, replica_b)
    } else {
        (replica_b, replica_a)
    };

    // The leader stops; the other takes over from the shared cursor and publishes what follows.
    leader.shutdown().await;
    append(&*feeds_b, &feed, 1_000, 500).await;
    wait_until(
        "the other replica at the new head",
        &[&follower],
        &feed,
        |s| s[0].cursor == FeedPosition(1_500) && publishing(&s[0]),
    )
    .await;
    follower.shutdown().await;
    let cursors = feeds_a.publishers(&feed).await.unwrap();
    assert_eq!(cursors.len(), 1);
    assert_eq!(cursors[0].position, FeedPosition(1_500));

    // The stream holds the feed once, in order (a takeover republishes from the shared cursor:
    // duplicates at most, which JetStream drops).
    let received = nats_take_stream(&nats, &feed).await;
    received.check(
        &feeds_a
            .read_feed(&feed, FeedPosition::START, 10_000)
            .await
            .unwrap(),
    );
}
