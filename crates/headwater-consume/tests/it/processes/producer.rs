//! The producer: a child process of this test binary (`producer::child_producer`) that runs what a
//! service on the embedded backend runs — appenders on many account streams, the projector of one
//! feed and the feed API on loopback — and reports its progress on stdout. The parent starts it,
//! tells it to stop appending, and reads its feed over HTTP (the reference the consumer is checked
//! against).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use headwater_api::{ApiConfig, FeedApi, Tokens};
use headwater_core::{EventId, EventType, ExpectedVersion, FeedId, NewEvent, StreamName};
use headwater_embedded::{EmbeddedFeedStore, EmbeddedStore};
use headwater_feed::{ProjectorOptions, Projectors, projection};
use headwater_store::{EventStore, FeedStore};
use headwater_testkit::process::{ChildProcess, say};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::processes::{CHECKSUM_START, checksum};

/// Set in the child: the store directory. Marks the process as a producer child.
const DIR_ENV: &str = "HEADWATER_CONSUME_PRODUCER_DIR";
/// Set in the child: the seed of its appends.
const SEED_ENV: &str = "HEADWATER_CONSUME_PRODUCER_SEED";
/// Set in the child: the account streams it appends to.
const ACCOUNTS_ENV: &str = "HEADWATER_CONSUME_PRODUCER_ACCOUNTS";
/// Set in the child: events it appends before it says it is ready.
const PRELOAD_ENV: &str = "HEADWATER_CONSUME_PRODUCER_PRELOAD";
/// Set in the child when it appends all along: how often each appender appends, in
/// microseconds.
const APPEND_ENV: &str = "HEADWATER_CONSUME_PRODUCER_APPEND_EVERY_MICROS";
/// Once this file exists, the child's appenders stop (the parent's way to say so).
const STOP_FILE: &str = "stop-appending";

/// The feed, in every producer's store of its own.
pub(crate) const FEED: &str = "accounts.v1";
/// The CloudEvents source of the feed.
const SOURCE: &str = "accounts";
/// The feed API's one token.
pub(crate) const TOKEN: &str = "consume-crash-test-token";
/// Concurrent appenders in the child.
const APPENDERS: u64 = 4;
/// Events in one append, at most (1 ..= this, at random).
const APPEND_EVENTS_MAX: u64 = 3;
/// Events in one append of the preload, at most (1 ..= this, at random).
const PRELOAD_APPEND_EVENTS_MAX: u64 = 10;
/// How often the child reports its progress, in milliseconds.
const STATUS_INTERVAL_MILLIS: u64 = 50;
/// The child stops by itself after this long (it is always killed before), in seconds.
const CHILD_LIFETIME_SECS: u64 = 300;
/// How long the parent waits for the child to be ready, in seconds.
const START_TIMEOUT_SECS: u64 = 60;
/// A page read from the feed API by the parent, in events.
const READ_PAGE_EVENTS: u64 = 1_000;

pub(crate) fn feed() -> FeedId {
    FeedId::parse(FEED).unwrap()
}

/// The projection: one integration event per deposit, on the account's subject (`acct-7` → `7`).
fn accounts(feed: &FeedId) -> impl headwater_feed::Projection {
    projection(&feed.to_string(), |event, out| {
        if event.stream.category() != "acct" {
            return Ok(());
        }
        let data: serde_json::Value = serde_json::from_slice(&event.data)?;
        out.emit(
            "accounts.deposited",
            event.stream.id(),
            &serde_json::json!({ "amount": data["amount"].as_u64().unwrap_or(0) }),
        )?;
        Ok(())
    })
}

fn projector_options() -> ProjectorOptions {
    let mut options = ProjectorOptions::default();
    // Small commits: the feed grows steadily while the consumer follows it.
    options.commit_events_max = 100;
    options.retry_backoff_min = Duration::from_millis(1);
    options.retry_backoff_max = Duration::from_millis(50);
    options
}

async fn append(events: &EmbeddedStore, rng: &mut StdRng, accounts: u64, count: u64) {
    let account = rng.random_range(0..accounts);
    let stream = StreamName::new(format!("acct-{account}")).unwrap();
    let batch = (0..count)
        .map(|_| {
            NewEvent::new(
                EventId::new_random(),
                EventType::new("acct.deposited").unwrap(),
                format!("{{\"amount\":{}}}", rng.random_range(1..1_000)).into_bytes(),
            )
        })
        .collect();
    events
        .append(&stream, ExpectedVersion::Any, batch)
        .await
        .unwrap();
}

/// The child: opens the store, appends the preload, starts the projector, the feed API and the
/// appenders, waits until the preload is projected, says `READY api=ADDRESS`, then a
/// `STATUS appenders=… log=… projected=… feed=…` line every [`STATUS_INTERVAL_MILLIS`], and runs
/// until killed. Does nothing in a normal test run.
#[test]
fn child_producer() {
    let Some(dir) = std::env::var_os(DIR_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let number = |key: &str| -> u64 { std::env::var(key).unwrap().parse().unwrap() };
    let seed = number(SEED_ENV);
    let accounts_count = number(ACCOUNTS_ENV);
    let preload = number(PRELOAD_ENV);
    let append_every = std::env::var(APPEND_ENV)
        .ok()
        .map(|micros| Duration::from_micros(micros.parse().unwrap()));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEADWATER_TEST_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let feed = feed();
        let events = Arc::new(EmbeddedStore::open(dir.join("store")).unwrap());
        let mut rng = StdRng::seed_from_u64(seed);
        let mut preloaded = 0;
        while preloaded < preload {
            let count = rng
                .random_range(1..=PRELOAD_APPEND_EVENTS_MAX)
                .min(preload - preloaded);
            append(&events, &mut rng, accounts_count, count).await;
            preloaded += count;
        }
        let feeds = Arc::new(EmbeddedFeedStore::open(&events).unwrap());
        let projectors = Projectors::builder()
            .options(projector_options())
            .projection(accounts(&feed))
            .start(Arc::clone(&events), Arc::clone(&feeds))
            .await
            .unwrap();
        let mut registry = prometheus_client::registry::Registry::default();
        let api = FeedApi::new(
            Arc::clone(&feeds) as Arc<dyn FeedStore>,
            ApiConfig::new(SOURCE, Tokens::one_for_all("test", TOKEN).unwrap()).unwrap(),
            &mut registry,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let registry = Arc::new(registry);
        tokio::spawn(async move {
            api.serve(listener, registry, std::future::pending())
                .await
                .unwrap();
        });
        let mut projector = projectors.watch(&feed).unwrap();
        let preloaded_at = events.head_position();
        projector
            .wait_for(|s| s.cursor >= preloaded_at)
            .await
            .unwrap();
        let appenders = Arc::new(AtomicU64::new(0));
        if let Some(append_every) = append_every {
            for task in 0..APPENDERS {
                let events = Arc::clone(&events);
                let appenders = Arc::clone(&appenders);
                let stop = dir.join(STOP_FILE);
                appenders.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut rng = StdRng::seed_from_u64(seed ^ (task + 1));
                    let mut every = tokio::time::interval(append_every);
                    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !stop.exists() {
                        every.tick().await;
                        let count = rng.random_range(1..=APPEND_EVENTS_MAX);
                        append(&events, &mut rng, accounts_count, count).await;
                    }
                    appenders.fetch_sub(1, Ordering::SeqCst);
                });
            }
        }
        say(&format!("READY api={address}"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(CHILD_LIFETIME_SECS);
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(STATUS_INTERVAL_MILLIS)).await;
            let projected = projector.borrow_and_update().clone();
            say(&format!(
                "STATUS appenders={} log={} projected={} feed={}",
                appenders.load(Ordering::SeqCst),
                events.head_position().0,
                projected.cursor.0,
                projected.feed_head.0,
            ));
        }
    });
}

/// What a `STATUS` line says.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Status {
    /// Appenders still appending.
    pub(crate) appenders: u64,
    /// The internal log's head.
    pub(crate) log: u64,
    /// The projector's cursor (an internal position).
    pub(crate) projected: u64,
    /// The feed's head.
    pub(crate) feed: u64,
}

impl Status {
    fn parse(line: &str) -> Option<Status> {
        let fields: HashMap<&str, u64> = line
            .strip_prefix("STATUS ")?
            .split(' ')
            .filter_map(|f| f.split_once('='))
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect();
        Some(Status {
            appenders: *fields.get("appenders")?,
            log: *fields.get("log")?,
            projected: *fields.get("projected")?,
            feed: *fields.get("feed")?,
        })
    }
}

/// How a producer appends.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Workload {
    /// Account streams (= the feed's subjects).
    pub(crate) accounts: u64,
    /// Events appended before it is ready.
    pub(crate) preload: u64,
    /// How often each of the appenders appends 1 to 3 events after that (none: never), in
    /// microseconds.
    pub(crate) append_every_micros: Option<u64>,
}

/// A running producer, seen from the parent.
#[derive(Debug)]
pub(crate) struct Producer {
    child: ChildProcess,
    dir: PathBuf,
    /// The feed API's address.
    pub(crate) api: SocketAddr,
    /// The last status it reported.
    last: Status,
}

impl Producer {
    /// Starts a producer on the store in `dir` (a directory of the test's own) and waits until it
    /// is ready: its preload projected, its feed API listening.
    pub(crate) fn start(dir: &Path, seed: u64, workload: Workload) -> Producer {
        let mut env = vec![
            (DIR_ENV, dir.display().to_string()),
            (SEED_ENV, seed.to_string()),
            (ACCOUNTS_ENV, workload.accounts.to_string()),
            (PRELOAD_ENV, workload.preload.to_string()),
        ];
        if let Some(micros) = workload.append_every_micros {
            env.push((APPEND_ENV, micros.to_string()));
        }
        // The child test's path in this binary, wherever this module sits.
        let module = module_path!().split_once("::").map_or("", |(_, path)| path);
        let mut child = ChildProcess::spawn(&format!("{module}::child_producer"), &env);
        let ready = child.wait_for("READY", Duration::from_secs(START_TIMEOUT_SECS), |_| {});
        let api = ready
            .strip_prefix("READY api=")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("a READY line without the API's address: {ready:?}"));
        Producer {
            child,
            dir: dir.to_owned(),
            api,
            last: Status::default(),
        }
    }

    /// Makes its appenders stop, then waits until it says so and its feed has everything
    /// appended; returns that status.
    pub(crate) fn stop_appending(&mut self, timeout: Duration) -> Status {
        std::fs::write(self.dir.join(STOP_FILE), b"").unwrap();
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            let Some(line) = self.child.line_before(deadline) else {
                panic!("the producer did not stop and catch up within {timeout:?}: {last:?}");
            };
            let Some(status) = Status::parse(&line) else {
                continue;
            };
            if status.appenders == 0 && status.projected == status.log {
                return status;
            }
            last = Some(status);
        }
    }

    /// Drains the status lines written so far; returns the last one it reported.
    pub(crate) fn status(&mut self) -> Status {
        while let Some(line) = self.child.line_before(Instant::now()) {
            self.last = Status::parse(&line).unwrap_or(self.last);
        }
        self.last
    }

    /// SIGKILLs it.
    pub(crate) fn kill(self) {
        self.child.kill();
    }
}

/// `GET path` on the feed API at `api` with the token: the status code and the body.
pub(crate) fn http_get(api: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    headwater_testkit::http::get(api, path, TOKEN)
}

/// `GET path`, which must answer 200 with a JSON array.
fn get_array(api: SocketAddr, path: &str) -> Vec<serde_json::Value> {
    let (code, body) = http_get(api, path);
    assert_eq!(code, 200, "{path}: {}", String::from_utf8_lossy(&body));
    match serde_json::from_slice(&body).unwrap() {
        serde_json::Value::Array(items) => items,
        other => panic!("{path}: not an array: {other}"),
    }
}

/// One subject as the producer has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Expected {
    /// Its last sequence.
    pub(crate) head: u64,
    /// [`checksum`] over its event ids in sequence order.
    pub(crate) checksum: u64,
}

/// The whole feed as the producer's feed API serves it (read page by page, without the
/// consumer's client): per subject, its head and checksum. Checks that each subject's sequences
/// run 1, 2, 3 … in feed order and that positions increase without a hole.
pub(crate) fn read_feed(api: SocketAddr) -> BTreeMap<String, Expected> {
    let mut subjects: BTreeMap<String, Expected> = BTreeMap::new();
    let mut after = 0;
    loop {
        let page = get_array(
            api,
            &format!("/feeds/accounts/v1?after={after}&limit={READ_PAGE_EVENTS}"),
        );
        if page.is_empty() {
            return subjects;
        }
        for event in page {
            let position = event["position"].as_u64().unwrap();
            assert_eq!(position, after + 1, "a hole in the feed: {event}");
            after = position;
            let subject = event["subject"].as_str().unwrap().to_owned();
            let sequence = event["sequence"].as_u64().unwrap();
            let id = event["id"].as_str().unwrap();
            let entry = subjects.entry(subject).or_insert(Expected {
                head: 0,
                checksum: CHECKSUM_START,
            });
            assert_eq!(sequence, entry.head + 1, "out of order: {event}");
            entry.head = sequence;
            entry.checksum = checksum(entry.checksum, id);
        }
    }
}

/// The subjects' heads from the producer's listing (`subjects?after=`), all pages.
pub(crate) fn subject_heads(api: SocketAddr) -> BTreeMap<String, u64> {
    let mut heads = BTreeMap::new();
    let mut after = String::new();
    loop {
        let path = if after.is_empty() {
            format!("/feeds/accounts/v1/subjects?limit={READ_PAGE_EVENTS}")
        } else {
            format!("/feeds/accounts/v1/subjects?after={after}&limit={READ_PAGE_EVENTS}")
        };
        let page = get_array(api, &path);
        if page.is_empty() {
            return heads;
        }
        for head in page {
            after = head["subject"].as_str().unwrap().to_owned();
            heads.insert(after.clone(), head["sequence"].as_u64().unwrap());
        }
    }
}
