//! `accounts` publishing its feeds to NATS JetStream (`HEADWATER_TEST_NATS_URL`): every event of
//! both feeds is confirmed by the broker, including those of a version added live.

use std::time::{Duration, Instant};

use bank::accounts::{self, Config};
use bank::client::Client;
use headwater::feed::FeedId;

use super::{CATCH_UP_SECS, TOKEN, done, id};

/// The test server's URL; the test fails without it.
fn nats_url() -> String {
    std::env::var("HEADWATER_TEST_NATS_URL").unwrap_or_else(|_| {
        panic!("HEADWATER_TEST_NATS_URL is not set: run ./scripts/test (it starts NATS)")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_feeds_are_published_to_nats() {
    const COMMANDS: u64 = 30;
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(dir.path().join("accounts"));
    config.token = Some(TOKEN.to_owned());
    config.versions = vec![1];
    config.broker.nats = Some(nats_url());
    let accounts = accounts::start(config).await.unwrap();
    let client = Client::new(&accounts.url()).unwrap();
    // An account of its own on the shared server's streams: the cursors are what is checked.
    let account = format!("nats-{}", id().simple());
    done(client.open(&account, "Ada", id()).await.unwrap());
    for _ in 0..COMMANDS {
        done(client.deposit(&account, 3, id()).await.unwrap());
    }
    accounts.add_version(2).await.unwrap();
    for version in [1, 2] {
        accounts
            .caught_up(version, Duration::from_secs(CATCH_UP_SECS))
            .await
            .unwrap();
    }
    let feeds = accounts.feeds();
    let deadline = Instant::now() + Duration::from_secs(CATCH_UP_SECS);
    for feed in ["accounts.v1", "accounts.v2"] {
        let feed = FeedId::parse(feed).unwrap();
        let head = feeds.feed(&feed).await.unwrap().unwrap().head;
        assert_eq!(head.0, COMMANDS + 1);
        loop {
            let cursors = feeds.publishers(&feed).await.unwrap();
            if cursors.iter().any(|c| c.position >= head) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{feed} not published up to {head}: {cursors:?}, {:?}",
                accounts.publisher_statuses()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(accounts.publisher_statuses().len(), 2);
    accounts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_versions_asked_are_published() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(dir.path().join("accounts"));
    config.token = Some(TOKEN.to_owned());
    config.versions = vec![1];
    config.publish_versions = Some(vec![2]);
    config.broker.nats = Some(nats_url());
    let accounts = accounts::start(config).await.unwrap();
    assert!(
        accounts.publisher_statuses().is_empty(),
        "v1 is not to be published"
    );
    let client = Client::new(&accounts.url()).unwrap();
    let account = format!("nats-{}", id().simple());
    done(client.open(&account, "Ada", id()).await.unwrap());
    // v2, added live, is published.
    accounts.add_version(2).await.unwrap();
    let statuses = accounts.publisher_statuses();
    assert_eq!(statuses.len(), 1);
    assert_eq!(statuses[0].feed.to_string(), "accounts.v2");
    accounts
        .caught_up(2, Duration::from_secs(CATCH_UP_SECS))
        .await
        .unwrap();
    let feeds = accounts.feeds();
    let v2 = FeedId::parse("accounts.v2").unwrap();
    let deadline = Instant::now() + Duration::from_secs(CATCH_UP_SECS);
    while !feeds
        .publishers(&v2)
        .await
        .unwrap()
        .iter()
        .any(|c| c.position.0 == 1)
    {
        assert!(Instant::now() < deadline, "v2 not published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v1 = FeedId::parse("accounts.v1").unwrap();
    assert!(feeds.publishers(&v1).await.unwrap().is_empty());
    accounts.shutdown().await;
}
