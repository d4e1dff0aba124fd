//! On PostgreSQL (`HEADWATER_TEST_POSTGRES_URL`; these tests fail without it, never skip):
//! backfill while appending, and projectors on two replicas with their `PostgresStore` as their
//! `Leadership`.

use std::sync::Arc;
use std::time::Duration;

use headwater_feed::{ProjectorOptions, ProjectorState, Projectors, Stopped, build_feed};
use headwater_postgres::{Options, PostgresStore};
use headwater_store::{EventStore, FeedStore};

use crate::support::{Accounts, read_whole_feed, wait_caught_up, wait_status, workload};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_backfills_while_appends_go_on_postgres() {
    let fresh = Fresh::new();
    let store = fresh.connect().await;
    let feeds = Arc::new(store.feed_store());
    crate::backfill::backfill_while_appending(Arc::new(store), feeds, 1_500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_projects_at_a_time_and_another_takes_over() {
    let fresh = Fresh::new();
    let (a, b) = (fresh.connect().await, fresh.connect().await);
    workload(&a, 100).await;
    let mut options = ProjectorOptions::default();
    options.read_page_events = 20;
    let start = |store: &PostgresStore| {
        Projectors::builder()
            .projection(Accounts::v1())
            .options(options.clone())
            .leadership(store.clone())
            .start(Arc::new(store.clone()), Arc::new(store.feed_store()))
    };
    let first = start(&a).await.unwrap();
    let v1 = Accounts::v1().feed_id();
    wait_caught_up(&mut first.watch(&v1).unwrap(), a.head_position()).await;
    let second = start(&b).await.unwrap();
    let mut standby = second.watch(&v1).unwrap();
    wait_status(&mut standby, "standby", |s| {
        s.state == ProjectorState::Standby
    })
    .await;
    workload(&a, 50).await;
    wait_caught_up(&mut first.watch(&v1).unwrap(), a.head_position()).await;
    assert_eq!(standby.borrow().state, ProjectorState::Standby);

    // The leader stops; the other replica takes over and projects what comes next.
    let outcomes = first.shutdown().await;
    assert!(
        outcomes
            .iter()
            .all(|(_, o)| matches!(o, Ok(Stopped::Shutdown))),
        "{outcomes:?}"
    );
    workload(&a, 50).await;
    let head = a.head_position();
    let mut head_b = b.watch_head();
    tokio::time::timeout(Duration::from_secs(30), head_b.wait_for(|h| *h >= head))
        .await
        .unwrap()
        .unwrap();
    wait_caught_up(&mut standby, head).await;
    let offline = build_feed(&b, &Accounts::v1()).await.unwrap();
    assert!(read_whole_feed(&b.feed_store(), &v1).await == offline);
    assert_eq!(
        b.feed_store().feed(&v1).await.unwrap().unwrap().cursor,
        head
    );
    second.shutdown().await;
}
