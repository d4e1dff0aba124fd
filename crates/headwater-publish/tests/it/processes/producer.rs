//! The producer: a child process of this test binary (`producer::child_producer`) that runs what a
//! service with the embedded backend runs — appends to 50 account streams, the projector of one
//! feed, the publisher of that feed to a broker (connecting lazily) and the feed API on loopback
//! — and reports its progress on stdout. The parent starts it, kills it, reads its feed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use headwater_api::{ApiConfig, FeedApi, Tokens};
use headwater_core::limits::FEED_PAGE_EVENTS_MAX;
use headwater_core::{
    EventId, EventType, ExpectedVersion, FeedId, FeedPosition, NewEvent, StreamName,
};
use headwater_embedded::{EmbeddedFeedStore, EmbeddedStore};
use headwater_feed::{ProjectorOptions, Projectors, projection};
use headwater_publish::{AmqpBroker, Broker, NatsBroker, PublisherOptions, Publishers};
use headwater_store::{EventStore, FeedEvent, FeedStore};
use headwater_testkit::process::{ChildProcess, say};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Set in the child: the store directory. Marks the process as a child.
const DIR_ENV: &str = "HEADWATER_PUBLISH_PRODUCER_DIR";
/// Set in the child: the broker URL (`amqp://…` or `nats://…`).
const BROKER_ENV: &str = "HEADWATER_PUBLISH_PRODUCER_BROKER";
/// Set in the child: the feed it projects and publishes (`hwt_….v1`).
const FEED_ENV: &str = "HEADWATER_PUBLISH_PRODUCER_FEED";
/// Set in the child: the seed of its appends.
const SEED_ENV: &str = "HEADWATER_PUBLISH_PRODUCER_SEED";
/// Set in the child when it appends (otherwise it only projects and publishes what is there):
/// how often each appender appends, in milliseconds.
const APPEND_ENV: &str = "HEADWATER_PUBLISH_PRODUCER_APPEND_EVERY_MILLIS";
/// Once this file exists, the child's appenders stop (the parent's way to say so).
const STOP_FILE: &str = "stop-appending";
/// The store's directory in a producer's directory.
const STORE_DIR: &str = "store";

/// The CloudEvents source of the feed.
pub(crate) const SOURCE: &str = "accounts";
/// The feed API's one token.
pub(crate) const TOKEN: &str = "s3cret-test-token";
/// The account streams the producer appends to.
const ACCOUNTS: u64 = 50;
/// Concurrent appenders in the child.
const APPENDERS: u64 = 2;
/// Appending fast: each appender appends this often (about 1 000 events per second in all, 1 to
/// 3 an append), in milliseconds.
pub(crate) const APPEND_FAST_EVERY_MILLIS: u64 = 4;
/// Appending slowly (about 400 events per second), in milliseconds: for tests where the
/// broker is down for seconds, so that the backlog stays small.
pub(crate) const APPEND_SLOW_EVERY_MILLIS: u64 = 10;
/// How often the child reports its progress, in milliseconds.
const STATUS_INTERVAL_MILLIS: u64 = 50;
/// The child stops by itself after this long (it is always killed before), in seconds.
const CHILD_LIFETIME_SECS: u64 = 120;
/// How long the parent waits for the child to be ready, in seconds.
pub(crate) const START_TIMEOUT_SECS: u64 = 60;
/// The longest the publisher waits between two attempts: short, so that a test does not wait
/// long for a broker that is back.
const BACKOFF_MAX_MILLIS: u64 = 500;
/// The shortest wait between two attempts.
const BACKOFF_MIN_MILLIS: u64 = 20;

/// The workload's event type.
const EVENT_TYPE: &str = "acct.deposited";

/// A feed nobody else uses on a shared broker.
pub(crate) fn unique_feed() -> FeedId {
    let id = uuid::Uuid::new_v4().simple().to_string();
    FeedId::parse(&format!("hwt_{}.v1", &id[..16])).unwrap()
}

/// The projection of the workload into `feed`: one integration event per deposit, on the
/// account's subject, and a second one on subject `big` for deposits of 900 and more.
fn accounts(feed: &FeedId) -> impl headwater_feed::Projection {
    projection(&feed.to_string(), |event, out| {
        if event.stream.category() != "acct" {
            return Ok(());
        }
        let data: serde_json::Value = serde_json::from_slice(&event.data)?;
        let amount = data["amount"].as_u64().unwrap_or(0);
        out.emit(
            "accounts.deposited",
            event.stream.id(),
            &serde_json::json!({ "amount": amount }),
        )?;
        if amount >= 900 {
            out.emit(
                "accounts.big_deposit",
                "big",
                &serde_json::json!({ "account": event.stream.id(), "amount": amount }),
            )?;
        }
        Ok(())
    })
}

fn projector_options() -> ProjectorOptions {
    let mut options = ProjectorOptions::default();
    // Small commits: the feed grows while the publisher follows it.
    options.commit_events_max = 50;
    options.retry_backoff_min = Duration::from_millis(1);
    options.retry_backoff_max = Duration::from_millis(50);
    options
}

fn publisher_options() -> PublisherOptions {
    // Small batches and window: many confirms per second, so that kills land between them.
    PublisherOptions::default()
        .with_batch_events_max(64)
        .with_in_flight_events_max(512)
        .with_backoff(
            Duration::from_millis(BACKOFF_MIN_MILLIS),
            Duration::from_millis(BACKOFF_MAX_MILLIS),
        )
}

async fn append(events: &EmbeddedStore, rng: &mut StdRng) {
    let account = rng.random_range(0..ACCOUNTS);
    let stream = StreamName::new(format!("acct-{account}")).unwrap();
    let batch = (0..rng.random_range(1..4))
        .map(|_| {
            NewEvent::new(
                EventId::new_random(),
                EventType::new(EVENT_TYPE).unwrap(),
                format!("{{\"amount\":{}}}", rng.random_range(1..1_000)).into_bytes(),
            )
        })
        .collect();
    events
        .append(&stream, ExpectedVersion::Any, batch)
        .await
        .unwrap();
}

/// The child: opens the store, starts the projector, the publisher and the feed API (and the
/// appenders), says `READY api=ADDRESS`, then a `STATUS …` line every
/// [`STATUS_INTERVAL_MILLIS`], and runs until killed. Does nothing in a normal test run.
#[test]
fn child_producer() {
    let Some(dir) = std::env::var_os(DIR_ENV) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let broker_url = std::env::var(BROKER_ENV).unwrap();
    let feed = FeedId::parse(&std::env::var(FEED_ENV).unwrap()).unwrap();
    let seed: u64 = std::env::var(SEED_ENV).unwrap().parse().unwrap();
    let append_every = std::env::var(APPEND_ENV)
        .ok()
        .map(|millis| Duration::from_millis(millis.parse().unwrap()));
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
        let events = Arc::new(EmbeddedStore::open(dir.join(STORE_DIR)).unwrap());
        let feeds = Arc::new(EmbeddedFeedStore::open(&events).unwrap());
        let projectors = Projectors::builder()
            .options(projector_options())
            .projection(accounts(&feed))
            .start(Arc::clone(&events), Arc::clone(&feeds))
            .await
            .unwrap();
        let broker: Arc<dyn Broker> = if broker_url.starts_with("amqp://") {
            Arc::new(AmqpBroker::lazy(&broker_url).unwrap())
        } else {
            Arc::new(NatsBroker::lazy(&broker_url).await.unwrap())
        };
        let mut registry = prometheus_client::registry::Registry::default();
        let publishers = Publishers::builder(broker, SOURCE)
            .feed(feed.clone())
            .options(publisher_options())
            .metrics(&mut registry)
            .start(Arc::clone(&feeds))
            .unwrap();
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
        let appenders = Arc::new(AtomicU64::new(0));
        if let Some(append_every) = append_every {
            for task in 0..APPENDERS {
                let events = Arc::clone(&events);
                let appenders = Arc::clone(&appenders);
                let stop = dir.join(STOP_FILE);
                appenders.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut rng = StdRng::seed_from_u64(seed ^ task);
                    let mut every = tokio::time::interval(append_every);
                    while !stop.exists() {
                        every.tick().await;
                        append(&events, &mut rng).await;
                    }
                    appenders.fetch_sub(1, Ordering::SeqCst);
                });
            }
        }
        say(&format!("READY api={address}"));
        let mut projector = projectors.watch(&feed).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(CHILD_LIFETIME_SECS);
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(STATUS_INTERVAL_MILLIS)).await;
            let projected = projector.borrow_and_update().clone();
            let Some(published) = publishers.statuses().into_iter().find(|s| s.feed == feed) else {
                continue;
            };
            let log_head = events.head_position();
            say(&format!(
                "STATUS appenders={} log={} projected={} feed={} published={} in_flight={} \
                 reconnects={} state={} error={}",
                appenders.load(Ordering::SeqCst),
                log_head.0,
                projected.cursor.0,
                projected.feed_head.0,
                published.cursor.0,
                published.in_flight,
                published.reconnects,
                published.state.as_str(),
                published
                    .last_error
                    .as_deref()
                    .unwrap_or("-")
                    .replace('\n', " "),
            ));
        }
    });
}

/// What a `STATUS` line says.
#[derive(Clone, Debug, Default)]
pub(crate) struct Status {
    /// Appenders still appending.
    pub(crate) appenders: u64,
    /// The internal log's head.
    pub(crate) log: u64,
    /// The projector's cursor (an internal position).
    pub(crate) projected: u64,
    /// The feed's head.
    pub(crate) feed: u64,
    /// The publisher's cursor.
    pub(crate) published: u64,
    /// Events sent and not yet confirmed.
    pub(crate) in_flight: u64,
    /// Times the publisher started over after a failure.
    pub(crate) reconnects: u64,
    pub(crate) state: String,
    pub(crate) error: Option<String>,
}

impl Status {
    fn parse(line: &str) -> Option<Status> {
        let rest = line.strip_prefix("STATUS ")?;
        let (fields, error) = rest.split_once(" error=")?;
        let fields: HashMap<&str, &str> = fields
            .split(' ')
            .filter_map(|f| f.split_once('='))
            .collect();
        let number = |key: &str| fields.get(key)?.parse::<u64>().ok();
        Some(Status {
            appenders: number("appenders")?,
            log: number("log")?,
            projected: number("projected")?,
            feed: number("feed")?,
            published: number("published")?,
            in_flight: number("in_flight")?,
            reconnects: number("reconnects")?,
            state: fields.get("state")?.to_string(),
            error: (error != "-").then(|| error.to_owned()),
        })
    }

    /// Nothing is appended any more, everything appended is projected, and everything projected
    /// is published.
    pub(crate) fn caught_up(&self) -> bool {
        self.appenders == 0 && self.projected == self.log && self.published == self.feed
    }
}

/// A running producer, seen from the parent.
#[derive(Debug)]
pub(crate) struct Producer {
    child: ChildProcess,
    dir: std::path::PathBuf,
    /// The feed API's address.
    pub(crate) api: SocketAddr,
    /// The last status it reported.
    pub(crate) status: Status,
}

impl Producer {
    /// Starts a producer on the store in `dir` (a directory of the test's own), publishing
    /// `feed` to the broker at `broker_url`, each appender appending every
    /// `append_every_millis` (none: no appends), and waits until it is ready.
    pub(crate) fn start(
        dir: &Path,
        broker_url: &str,
        feed: &FeedId,
        seed: u64,
        append_every_millis: Option<u64>,
    ) -> Producer {
        let mut env = vec![
            (DIR_ENV, dir.display().to_string()),
            (BROKER_ENV, broker_url.to_owned()),
            (FEED_ENV, feed.to_string()),
            (SEED_ENV, seed.to_string()),
        ];
        if let Some(millis) = append_every_millis {
            env.push((APPEND_ENV, millis.to_string()));
        }
        // The child test's path in this binary: this module's path without the binary's name
        // (`producer::child_producer`), wherever the module sits.
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
            status: Status::default(),
        }
    }

    /// Reads its status lines until one satisfies `done` (returned), or panics after `timeout`
    /// with the last status. `seen` sees every status on the way.
    pub(crate) fn wait_status(
        &mut self,
        what: &str,
        timeout: Duration,
        mut seen: impl FnMut(&Status),
        mut done: impl FnMut(&Status) -> bool,
    ) -> Status {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(line) = self.child.line_before(deadline) else {
                panic!(
                    "{what}: not within {timeout:?}; last status {:?}",
                    self.status
                );
            };
            let Some(status) = Status::parse(&line) else {
                continue;
            };
            seen(&status);
            self.status = status;
            if done(&self.status) {
                return self.status.clone();
            }
        }
    }

    /// Makes its appenders stop (its status says `appenders=0` once they did).
    pub(crate) fn stop_appending(&self) {
        std::fs::write(self.dir.join(STOP_FILE), b"").unwrap();
    }

    /// SIGKILLs it; returns its last status (from the lines not read yet, if any).
    pub(crate) fn kill(self) -> Status {
        let mut status = self.status;
        for line in self.child.kill() {
            if let Some(s) = Status::parse(&line) {
                status = s;
            }
        }
        status
    }
}

fn open(dir: &Path) -> EmbeddedFeedStore {
    let events = EmbeddedStore::open(dir.join(STORE_DIR)).unwrap();
    EmbeddedFeedStore::open(&events).unwrap()
}

/// The publisher's cursor of `feed`, `START` before its first move.
async fn publisher_cursor(feeds: &EmbeddedFeedStore, feed: &FeedId) -> FeedPosition {
    let publishers = feeds.publishers(feed).await.unwrap();
    assert!(publishers.len() <= 1, "{publishers:?}");
    publishers
        .first()
        .map_or(FeedPosition::START, |p| p.position)
}

/// The head of `feed` and its publisher's cursor in the producer's store in `dir` (no producer
/// may run on it).
pub(crate) async fn feed_head_and_cursor(
    dir: &Path,
    feed: &FeedId,
) -> (FeedPosition, FeedPosition) {
    let feeds = open(dir);
    let head = feeds
        .feed(feed)
        .await
        .unwrap()
        .map_or(FeedPosition::START, |state| state.head);
    (head, publisher_cursor(&feeds, feed).await)
}

/// Every event of `feed` in the producer's store in `dir` (no producer may run on it), and the
/// cursor of its one publisher.
pub(crate) async fn read_feed(dir: &Path, feed: &FeedId) -> (Vec<FeedEvent>, FeedPosition) {
    let feeds = open(dir);
    let mut out = Vec::new();
    let mut after = FeedPosition::START;
    loop {
        let page = feeds
            .read_feed(feed, after, FEED_PAGE_EVENTS_MAX)
            .await
            .unwrap();
        let Some(last) = page.last() else {
            break;
        };
        after = last.position;
        out.extend(page);
    }
    let cursor = publisher_cursor(&feeds, feed).await;
    (out, cursor)
}

/// `GET path` on the feed API at `api` with the token: the status code and the body.
pub(crate) fn http_get(api: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    headwater_testkit::http::get(api, path, TOKEN)
}

/// The value of the metric `name` (its first sample, labels aside) on the feed API's `/metrics`.
pub(crate) fn metric(api: SocketAddr, name: &str) -> f64 {
    let (code, body) = http_get(api, "/metrics");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let text = String::from_utf8(body).unwrap();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| value.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no metric {name} in /metrics:\n{text}"))
}
