//! Two replicas of `accounts` on one PostgreSQL database (`HEADWATER_TEST_POSTGRES_URL`): both
//! accept commands, each feed is projected by one of them at a time, and when the one projecting
//! shuts down the other takes over, the feeds staying contiguous and equal to their offline
//! build.

use std::time::{Duration, Instant};

use bank::accounts::{self, Accounts, Config};
use bank::client::{Answer, Client};
use headwater::feed::{FeedId, ProjectorState};
use headwater::publish::PublisherState;
use headwater_testkit::postgres;

use super::{CATCH_UP_SECS, TOKEN, done, feed, id, offline};

/// Accounts in the test.
const ACCOUNTS: usize = 6;
/// Commands each replica's writer sends per round.
const COMMANDS_PER_ROUND: usize = 40;
/// How long the projectors may take to settle on one leader per feed, in seconds.
const SETTLE_SECS: u64 = 15;

/// Drops the test's schema when the test ends, passed or not.
struct Schema {
    url: String,
    name: String,
}

impl Drop for Schema {
    fn drop(&mut self) {
        postgres::drop_schema(&self.url, &self.name);
    }
}

async fn replica(url: &str, schema: &str) -> (Accounts, Client) {
    replica_with(url, schema, None).await
}

async fn replica_with(url: &str, schema: &str, nats: Option<&str>) -> (Accounts, Client) {
    let mut config = Config::new("unused-with-postgres");
    config.postgres = Some(url.to_owned());
    config.postgres_schema = schema.to_owned();
    config.token = Some(TOKEN.to_owned());
    config.versions = vec![1, 2];
    config.broker.nats = nats.map(str::to_owned);
    let accounts = accounts::start(config).await.unwrap();
    let client = Client::new(&accounts.url()).unwrap();
    (accounts, client)
}

/// Per replica, the feeds it projects (state `Running`) and those it waits for (`Standby`).
fn roles(replica: &Accounts) -> (Vec<String>, Vec<String>) {
    let statuses = replica.projector_statuses();
    let with = |state: ProjectorState| -> Vec<String> {
        statuses
            .iter()
            .filter(|s| s.state == state)
            .map(|s| s.feed.to_string())
            .collect()
    };
    (with(ProjectorState::Running), with(ProjectorState::Standby))
}

/// Waits until each feed is projected by exactly one of `replicas` while every other one
/// stands by for it; returns, per replica, the feeds it projects.
async fn settled(replicas: &[&Accounts]) -> Vec<Vec<String>> {
    let feeds = ["accounts.v1", "accounts.v2"];
    let deadline = Instant::now() + Duration::from_secs(SETTLE_SECS);
    loop {
        let roles: Vec<_> = replicas.iter().map(|r| roles(r)).collect();
        let one_leader_each = feeds.iter().all(|feed| {
            let running = roles
                .iter()
                .filter(|(r, _)| r.iter().any(|f| f == feed))
                .count();
            let standby = roles
                .iter()
                .filter(|(_, s)| s.iter().any(|f| f == feed))
                .count();
            running == 1 && standby == replicas.len() - 1
        });
        if one_leader_each {
            return roles.into_iter().map(|(running, _)| running).collect();
        }
        assert!(
            Instant::now() < deadline,
            "the projectors did not settle on one leader per feed, the others standing by: \
             {roles:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Deposits and withdrawals on every account through `client`; returns how many it sent.
async fn writes(client: Client, seed: usize) -> usize {
    for i in 0..COMMANDS_PER_ROUND {
        let account = format!("acc-{}", (seed + i) % ACCOUNTS);
        let answer = if i % 4 == 3 {
            client.withdraw(&account, 15, id()).await.unwrap()
        } else {
            client.deposit(&account, 10, id()).await.unwrap()
        };
        if let Answer::Refused(problem) = &answer {
            assert_eq!(problem.kind(), "insufficient-funds", "{problem:?}");
        }
    }
    COMMANDS_PER_ROUND
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgres_one_projects_the_other_takes_over() {
    let url = postgres::url();
    let schema = Schema {
        url: url.clone(),
        name: postgres::fresh_schema(),
    };
    let (a, client_a) = replica(&url, &schema.name).await;
    let (b, client_b) = replica(&url, &schema.name).await;
    for account in 0..ACCOUNTS {
        let client = if account % 2 == 0 {
            &client_a
        } else {
            &client_b
        };
        done(
            client
                .open(&format!("acc-{account}"), "Ada", id())
                .await
                .unwrap(),
        );
    }
    // Both accept commands, on the same accounts at once.
    let (sent_a, sent_b) = tokio::join!(writes(client_a.clone(), 0), writes(client_b.clone(), 3));
    let mut commands = ACCOUNTS + sent_a + sent_b;
    // Each feed is projected by one replica; the other waits.
    let leaders = settled(&[&a, &b]).await;
    a.caught_up(2, Duration::from_secs(CATCH_UP_SECS))
        .await
        .unwrap();
    a.caught_up(1, Duration::from_secs(CATCH_UP_SECS))
        .await
        .unwrap();
    // The replica that leads v1 shuts down while the other keeps writing.
    let (leader, survivor, survivor_client) = if leaders[0].contains(&"accounts.v1".to_owned()) {
        (a, b, client_b)
    } else {
        (b, a, client_a)
    };
    let writer = tokio::spawn(writes(survivor_client.clone(), 1));
    leader.shutdown().await;
    commands += writer.await.unwrap();
    commands += writes(survivor_client.clone(), 2).await;
    // The survivor now projects both feeds, up to the end.
    let leaders = settled(&[&survivor]).await;
    assert_eq!(leaders[0].len(), 2, "{leaders:?}");
    survivor
        .caught_up(1, Duration::from_secs(CATCH_UP_SECS))
        .await
        .unwrap();
    survivor
        .caught_up(2, Duration::from_secs(CATCH_UP_SECS))
        .await
        .unwrap();
    assert_eq!(survivor.events().head_position().0, commands as u64);
    // Contiguous, each event once, equal to the offline build from the shared log (G5).
    let v2 = feed(&survivor, 2).await;
    assert_eq!(v2.len(), commands, "v2 has one event per command");
    for (index, event) in v2.iter().enumerate() {
        assert_eq!(
            event.position.0,
            index as u64 + 1,
            "a hole or a repeat in v2"
        );
    }
    assert_eq!(v2, offline(&survivor, 2).await);
    assert_eq!(feed(&survivor, 1).await, offline(&survivor, 1).await);
    survivor.shutdown().await;
}

/// Per replica, the feeds it publishes and those it waits to publish.
fn publishing(replica: &Accounts) -> (Vec<String>, Vec<String>) {
    let mut roles = (Vec::new(), Vec::new());
    for status in replica.publisher_statuses() {
        match status.state {
            PublisherState::WaitingForLeadership => roles.1.push(status.feed.to_string()),
            PublisherState::Stopped => {}
            _ => roles.0.push(status.feed.to_string()),
        }
    }
    roles
}

/// Waits until each feed is published by exactly one of `replicas` while every other one waits
/// for the leadership; returns, per replica, the feeds it publishes.
async fn publishers_settled(replicas: &[&Accounts]) -> Vec<Vec<String>> {
    let feeds = ["accounts.v1", "accounts.v2"];
    let deadline = Instant::now() + Duration::from_secs(SETTLE_SECS);
    loop {
        let roles: Vec<_> = replicas.iter().map(|r| publishing(r)).collect();
        let one_each = feeds.iter().all(|feed| {
            let leading = roles
                .iter()
                .filter(|(p, _)| p.iter().any(|f| f == feed))
                .count();
            let waiting = roles
                .iter()
                .filter(|(_, w)| w.iter().any(|f| f == feed))
                .count();
            leading == 1 && waiting == replicas.len() - 1
        });
        if one_each {
            return roles
                .into_iter()
                .map(|(publishing, _)| publishing)
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "the publishers did not settle on one per feed, the others waiting: {roles:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the broker confirmed feed `feed` up to its head (the shared publisher cursor).
async fn published(replica: &Accounts, feed: &str) {
    let feed = FeedId::parse(feed).unwrap();
    let feeds = replica.feeds();
    let deadline = Instant::now() + Duration::from_secs(CATCH_UP_SECS);
    loop {
        let head = feeds.feed(&feed).await.unwrap().unwrap().head;
        let cursors = feeds.publishers(&feed).await.unwrap();
        if cursors.iter().any(|c| c.position == head) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{feed} not published up to {head}: {cursors:?}, {:?}",
            replica.publisher_statuses()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgres_publish_each_feed_from_one_at_a_time() {
    let url = postgres::url();
    let nats = std::env::var("HEADWATER_TEST_NATS_URL").unwrap_or_else(|_| {
        panic!("HEADWATER_TEST_NATS_URL is not set: run ./scripts/test (it starts NATS)")
    });
    let schema = Schema {
        url: url.clone(),
        name: postgres::fresh_schema(),
    };
    let (a, client_a) = replica_with(&url, &schema.name, Some(&nats)).await;
    let (b, client_b) = replica_with(&url, &schema.name, Some(&nats)).await;
    for account in 0..ACCOUNTS {
        done(
            client_a
                .open(&format!("acc-{account}"), "Ada", id())
                .await
                .unwrap(),
        );
    }
    let (_, _) = tokio::join!(writes(client_a.clone(), 0), writes(client_b.clone(), 3));
    let leaders = publishers_settled(&[&a, &b]).await;
    for feed in ["accounts.v1", "accounts.v2"] {
        published(&a, feed).await;
    }
    // The replica publishing v1 stops; the other publishes everything, from the shared cursor.
    let (leader, survivor, survivor_client) = if leaders[0].contains(&"accounts.v1".to_owned()) {
        (a, b, client_b)
    } else {
        (b, a, client_a)
    };
    leader.shutdown().await;
    writes(survivor_client, 1).await;
    let leaders = publishers_settled(&[&survivor]).await;
    assert_eq!(leaders[0].len(), 2, "{leaders:?}");
    for feed in ["accounts.v1", "accounts.v2"] {
        published(&survivor, feed).await;
    }
    survivor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_answers_503_and_the_client_says_retry() {
    let url = postgres::url();
    let schema = Schema {
        url: url.clone(),
        name: postgres::fresh_schema(),
    };
    let (replica, client) = replica(&url, &schema.name).await;
    done(client.open("ada", "Ada", id()).await.unwrap());
    // The store's tables disappear under the service.
    let (drop_url, drop_name) = (url.clone(), schema.name.clone());
    tokio::task::spawn_blocking(move || postgres::drop_schema(&drop_url, &drop_name))
        .await
        .unwrap();
    let base = replica.url();
    let body = serde_json::json!({"amount": 5, "command_id": id().to_string()}).to_string();
    let (status, content_type, problem) =
        super::request(&base, "POST", "/accounts/ada/deposits", &body).await;
    assert_eq!(status, 503, "{problem}");
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(
        problem["type"],
        "https://headwater.dev/problems/unavailable"
    );
    let error = client.deposit("ada", 5, id()).await.unwrap_err();
    assert!(error.is_retryable(), "{error}");
    replica.shutdown().await;
}
