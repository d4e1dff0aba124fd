//! The consumer: a child process of this test binary (`consumer::child_consumer`) that keeps a
//! view of the producer's feed — in a SQLite file (`EmbeddedView`) or a PostgreSQL schema
//! (`PgView`) — with `Consumer::follow_feed` over `FeedClient`, and beside it a lossy path that
//! delivers the newest events with drops, duplicates and swaps, so that gaps are healed all the
//! time. Or it walks: reconstitutes again and again (killed in the middle of walks); or, in its
//! last run, it reconstitutes once. The parent kills it, restarts it, and reads its view.
//!
//! The view records what the handler did, so that "exactly once" can be checked: `applied` gets
//! a row per handled event (no key: an event handled twice leaves two rows), and `totals` per
//! subject how many events were handled, the last sequence and the [`checksum`] of their ids.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use headwater_consume::{
    ConsumeError, Consumer, ConsumerOptions, EmbeddedView, FeedClient, IntegrationEvent, PgHandler,
    PgView, Upstream, ViewStore,
};
use headwater_testkit::process::{ChildProcess, say};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::{OptionalExtension, params};

use crate::processes::producer::{TOKEN, feed};
use crate::processes::{CHECKSUM_START, checksum};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Set in the child: the producer's feed API. Marks the process as a consumer child.
const API_ENV: &str = "HEADWATER_CONSUME_CONSUMER_API";
/// Set in the child: the view, `sqlite:PATH` or `postgres:SCHEMA` (on the server of
/// `HEADWATER_TEST_POSTGRES_URL`).
const VIEW_ENV: &str = "HEADWATER_CONSUME_CONSUMER_VIEW";
/// Set in the child: `follow`, `walk` (reconstitution walks, one after another) or
/// `reconstitute` (one walk).
const MODE_ENV: &str = "HEADWATER_CONSUME_CONSUMER_MODE";
/// Set in the child: the seed of its lossy path.
const SEED_ENV: &str = "HEADWATER_CONSUME_CONSUMER_SEED";

/// How often the child reports its progress, in milliseconds.
const STATUS_INTERVAL_MILLIS: u64 = 20;
/// The child stops by itself after this long (it is always killed before), in seconds.
const CHILD_LIFETIME_SECS: u64 = 300;
/// How long the parent waits for the child to be ready, in seconds.
const START_TIMEOUT_SECS: u64 = 60;
/// Events the consumer asks upstream per page (feed pages, heals, walks).
const PAGE_EVENTS: u64 = 200;
/// How long a long poll of the feed waits, in milliseconds.
const FEED_WAIT_MILLIS: u64 = 2_000;
/// Of the newest events, the lossy path drops this many percent…
const LOSSY_DROP_PERCENT: u32 = 30;
/// … delivers this many percent twice…
const LOSSY_DUPLICATE_PERCENT: u32 = 10;
/// … and swaps this many percent with their neighbour.
const LOSSY_SWAP_PERCENT: u32 = 20;
/// The lossy path asks again this long after the producer did not answer.
const RETRY_AFTER: Duration = Duration::from_millis(50);

/// The view's tables.
const SQLITE_SETUP: &str = "
    CREATE TABLE IF NOT EXISTS applied (
        subject TEXT NOT NULL, sequence INTEGER NOT NULL, id TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS totals (
        subject TEXT PRIMARY KEY, applied INTEGER NOT NULL, last_sequence INTEGER NOT NULL,
        checksum INTEGER NOT NULL) WITHOUT ROWID";
const POSTGRES_SETUP: &str = "
    CREATE TABLE IF NOT EXISTS applied (
        subject TEXT NOT NULL, sequence BIGINT NOT NULL, id TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS totals (
        subject TEXT PRIMARY KEY, applied BIGINT NOT NULL, last_sequence BIGINT NOT NULL,
        checksum BIGINT NOT NULL)";

/// Where a consumer's view is.
#[derive(Clone, Debug)]
pub(crate) enum ViewAt {
    Sqlite(PathBuf),
    /// A schema on the test server.
    Postgres(String),
}

impl ViewAt {
    fn to_env(&self) -> String {
        match self {
            ViewAt::Sqlite(path) => format!("sqlite:{}", path.display()),
            ViewAt::Postgres(schema) => format!("postgres:{schema}"),
        }
    }

    fn from_env(text: &str) -> ViewAt {
        match text.split_once(':') {
            Some(("sqlite", path)) => ViewAt::Sqlite(path.into()),
            Some(("postgres", schema)) => ViewAt::Postgres(schema.to_owned()),
            _ => panic!("a bad {VIEW_ENV}: {text:?}"),
        }
    }
}

fn as_stored(n: u64) -> i64 {
    i64::from_ne_bytes(n.to_ne_bytes())
}

fn from_stored(n: i64) -> u64 {
    u64::from_ne_bytes(n.to_ne_bytes())
}

/// The embedded view at `path`, its handler recording each event.
pub(crate) fn open_embedded(path: &std::path::Path) -> EmbeddedView {
    EmbeddedView::open(
        path,
        |tx| tx.execute_batch(SQLITE_SETUP),
        |tx, e: &IntegrationEvent| {
            let id = e.id.to_string();
            tx.execute(
                "INSERT INTO applied (subject, sequence, id) VALUES (?1, ?2, ?3)",
                params![e.subject.as_str(), as_stored(e.sequence.get()), id],
            )?;
            let previous: Option<i64> = tx
                .query_row(
                    "SELECT checksum FROM totals WHERE subject = ?1",
                    params![e.subject.as_str()],
                    |row| row.get(0),
                )
                .optional()?;
            let sum = checksum(previous.map_or(CHECKSUM_START, from_stored), &id);
            tx.execute(
                "INSERT INTO totals (subject, applied, last_sequence, checksum)
                 VALUES (?1, 1, ?2, ?3)
                 ON CONFLICT (subject) DO UPDATE SET applied = applied + 1,
                     last_sequence = excluded.last_sequence, checksum = excluded.checksum",
                params![
                    e.subject.as_str(),
                    as_stored(e.sequence.get()),
                    as_stored(sum)
                ],
            )?;
            Ok(())
        },
    )
    .unwrap()
}

/// The PostgreSQL view's handler: the same as the embedded one's.
#[derive(Debug)]
pub(crate) struct Recorder;

#[async_trait]
impl PgHandler for Recorder {
    async fn apply(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        e: &IntegrationEvent,
    ) -> Result<(), BoxError> {
        let id = e.id.to_string();
        let sequence = as_stored(e.sequence.get());
        tx.execute(
            "INSERT INTO applied (subject, sequence, id) VALUES ($1, $2, $3)",
            &[&e.subject.as_str(), &sequence, &id],
        )
        .await?;
        let previous: Option<i64> = tx
            .query_opt(
                "SELECT checksum FROM totals WHERE subject = $1",
                &[&e.subject.as_str()],
            )
            .await?
            .map(|row| row.get(0));
        let sum = as_stored(checksum(previous.map_or(CHECKSUM_START, from_stored), &id));
        tx.execute(
            "INSERT INTO totals (subject, applied, last_sequence, checksum) VALUES ($1, 1, $2, $3)
             ON CONFLICT (subject) DO UPDATE SET applied = totals.applied + 1,
                 last_sequence = excluded.last_sequence, checksum = excluded.checksum",
            &[&e.subject.as_str(), &sequence, &sum],
        )
        .await?;
        Ok(())
    }
}

pub(crate) async fn open_postgres(schema: &str) -> PgView<Recorder> {
    PgView::connect(
        &headwater_testkit::postgres::url(),
        schema,
        POSTGRES_SETUP,
        Recorder,
    )
    .await
    .unwrap()
}

fn options() -> ConsumerOptions {
    ConsumerOptions::default()
        .with_backoff(Duration::from_millis(5), Duration::from_millis(200))
        .with_page_events(PAGE_EVENTS)
}

/// The child: opens the view, then either follows the feed (and runs the lossy path) or walks,
/// saying `READY` and a `STATUS …` line every [`STATUS_INTERVAL_MILLIS`]; or it reconstitutes
/// once and says `RECONSTITUTED …`. On any error it says `FAILED …`. It runs until killed. Does
/// nothing in a normal test run.
#[test]
fn child_consumer() {
    let Some(api) = std::env::var_os(API_ENV) else {
        return;
    };
    let api: SocketAddr = api.to_str().unwrap().parse().unwrap();
    let view = ViewAt::from_env(&std::env::var(VIEW_ENV).unwrap());
    let mode = std::env::var(MODE_ENV).unwrap();
    let seed: u64 = std::env::var(SEED_ENV).unwrap().parse().unwrap();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEADWATER_TEST_LOG")
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        match view {
            ViewAt::Sqlite(path) => {
                let view = Arc::new(open_embedded(&path));
                run(view, api, &mode, seed).await;
            }
            ViewAt::Postgres(schema) => {
                let view = Arc::new(open_postgres(&schema).await);
                run(view, api, &mode, seed).await;
            }
        }
    });
}

async fn run<V: ViewStore>(view: Arc<V>, api: SocketAddr, mode: &str, seed: u64) {
    let client =
        Arc::new(FeedClient::new(&format!("http://{api}"), Some(TOKEN.to_owned())).unwrap());
    let consumer = Arc::new(Consumer::new(feed(), view, Arc::clone(&client), options()));
    if mode == "reconstitute" {
        match consumer.reconstitute().await {
            Ok(walk) => say(&format!(
                "RECONSTITUTED subjects={} behind={} applied={}",
                walk.subjects, walk.behind, walk.applied
            )),
            Err(e) => say(&format!("FAILED reconstitute: {e}")),
        }
        std::future::pending::<()>().await;
    }
    let mut tasks = Vec::new();
    if mode == "walk" {
        let consumer = Arc::clone(&consumer);
        tasks.push(tokio::spawn(async move {
            loop {
                if let Err(e) = consumer.reconstitute().await {
                    return format!("reconstitute: {e}");
                }
            }
        }));
    } else {
        let follower = Arc::clone(&consumer);
        tasks.push(tokio::spawn(async move {
            let ended = follower
                .follow_feed(
                    Duration::from_millis(FEED_WAIT_MILLIS),
                    std::future::pending(),
                )
                .await;
            format!("follow_feed: {ended:?}")
        }));
        let lossy = lossy(Arc::clone(&consumer), client, seed);
        tasks.push(tokio::spawn(async move {
            format!("the lossy path: {:?}", lossy.await)
        }));
    }
    say("READY");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(CHILD_LIFETIME_SECS);
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(STATUS_INTERVAL_MILLIS)).await;
        if let Some(ended) = tasks.iter_mut().find(|t| t.is_finished()) {
            let why = format!("{:?}", ended.await);
            say(&format!("FAILED {}", why.replace('\n', " ")));
            std::future::pending::<()>().await;
        }
        let stats = consumer.stats();
        say(&format!(
            "STATUS applied={} duplicates={} gaps={} healed={}",
            stats.applied, stats.duplicates, stats.gaps, stats.healed
        ));
    }
}

/// Delivers the feed's newest events (from its head when it starts), with drops, duplicates and
/// swaps: ahead of `follow_feed`, whose restarts begin at the saved position, they open gaps that
/// are healed from the producer. Returns only on an error that is not the producer's absence.
async fn lossy<V: ViewStore>(
    consumer: Arc<Consumer<V, FeedClient>>,
    client: Arc<FeedClient>,
    seed: u64,
) -> Result<(), String> {
    let feed = feed();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut after = loop {
        match client.feeds().await {
            Ok(feeds) => {
                break feeds.iter().find(|f| f.feed == feed).map_or(0, |f| f.head);
            }
            Err(e) if e.is_transient() => tokio::time::sleep(RETRY_AFTER).await,
            Err(e) => return Err(e.to_string()),
        }
    };
    loop {
        let page = match client
            .read_feed(
                &feed,
                after,
                PAGE_EVENTS,
                Duration::from_millis(FEED_WAIT_MILLIS),
            )
            .await
        {
            Ok(page) => page,
            Err(e) if e.is_transient() => {
                tokio::time::sleep(RETRY_AFTER).await;
                continue;
            }
            Err(e) => return Err(e.to_string()),
        };
        let Some(last) = page.last() else {
            continue;
        };
        after = last.position;
        let mut deliveries = Vec::with_capacity(page.len() * 2);
        for event in page {
            let dice = rng.random_range(0..100);
            if dice < LOSSY_DROP_PERCENT {
                continue;
            }
            if dice >= 100 - LOSSY_DUPLICATE_PERCENT {
                deliveries.push(event.clone());
            }
            deliveries.push(event);
        }
        for i in 1..deliveries.len() {
            if rng.random_range(0..100) < LOSSY_SWAP_PERCENT {
                deliveries.swap(i - 1, i);
            }
        }
        for event in deliveries {
            match consumer.deliver(event).await {
                Ok(_) => {}
                Err(ConsumeError::Upstream(e)) if e.is_transient() => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// What a consumer's `STATUS` line says (counters since that process started).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Status {
    pub(crate) applied: u64,
    pub(crate) duplicates: u64,
    pub(crate) gaps: u64,
    pub(crate) healed: u64,
}

impl Status {
    fn parse(line: &str) -> Option<Status> {
        let fields: BTreeMap<&str, u64> = line
            .strip_prefix("STATUS ")?
            .split(' ')
            .filter_map(|f| f.split_once('='))
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect();
        Some(Status {
            applied: *fields.get("applied")?,
            duplicates: *fields.get("duplicates")?,
            gaps: *fields.get("gaps")?,
            healed: *fields.get("healed")?,
        })
    }
}

/// A running consumer, seen from the parent.
#[derive(Debug)]
pub(crate) struct ConsumerProcess {
    child: ChildProcess,
    /// The last status it reported.
    pub(crate) status: Status,
}

fn spawn(api: SocketAddr, view: &ViewAt, mode: &str, seed: u64) -> ChildProcess {
    let env = [
        (API_ENV, api.to_string()),
        (VIEW_ENV, view.to_env()),
        (MODE_ENV, mode.to_owned()),
        (SEED_ENV, seed.to_string()),
    ];
    let module = module_path!().split_once("::").map_or("", |(_, path)| path);
    ChildProcess::spawn(&format!("{module}::child_consumer"), &env)
}

fn failed(line: &str) {
    assert!(!line.starts_with("FAILED"), "the consumer failed: {line}");
}

impl ConsumerProcess {
    /// Starts a consumer following the producer at `api` into `view`, and waits until it is
    /// ready.
    pub(crate) fn follow(api: SocketAddr, view: &ViewAt, seed: u64) -> ConsumerProcess {
        ConsumerProcess::start(api, view, "follow", seed)
    }

    /// Starts a consumer that walks (reconstitutes again and again) into `view`, and waits until
    /// it is ready.
    pub(crate) fn walk(api: SocketAddr, view: &ViewAt) -> ConsumerProcess {
        ConsumerProcess::start(api, view, "walk", 0)
    }

    fn start(api: SocketAddr, view: &ViewAt, mode: &str, seed: u64) -> ConsumerProcess {
        let mut child = spawn(api, view, mode, seed);
        child.wait_for("READY", Duration::from_secs(START_TIMEOUT_SECS), failed);
        ConsumerProcess {
            child,
            status: Status::default(),
        }
    }

    /// Reads its lines until `deadline` (failing on a `FAILED` one), keeping the last status.
    pub(crate) fn run_until(&mut self, deadline: Instant) {
        while let Some(line) = self.child.line_before(deadline) {
            failed(&line);
            self.status = Status::parse(&line).unwrap_or(self.status);
        }
    }

    /// SIGKILLs it; returns its last status.
    pub(crate) fn kill(self) -> Status {
        let mut status = self.status;
        for line in self.child.kill() {
            failed(&line);
            status = Status::parse(&line).unwrap_or(status);
        }
        status
    }

    /// Runs a consumer that only reconstitutes its view from the producer at `api`, waits for
    /// its walk and kills it; returns what the walk said.
    pub(crate) fn reconstitute(api: SocketAddr, view: &ViewAt, timeout: Duration) -> String {
        let mut child = spawn(api, view, "reconstitute", 0);
        let line = child.wait_for("RECONSTITUTED", timeout, failed);
        child.kill();
        line
    }
}

/// One subject in a consumer's view.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SubjectView {
    /// Its cursor (`headwater_cursors`).
    pub(crate) cursor: u64,
    /// The sequences the handler handled, in order (`applied`).
    pub(crate) sequences: Vec<u64>,
    /// `totals`: events handled, the last sequence, the checksum.
    pub(crate) applied: u64,
    pub(crate) last: u64,
    pub(crate) checksum: u64,
}

type Rows = (
    Vec<(String, i64)>,
    Vec<(String, i64)>,
    Vec<(String, i64, i64, i64)>,
);

fn fold(rows: Rows) -> BTreeMap<String, SubjectView> {
    let (cursors, applied, totals) = rows;
    let mut view: BTreeMap<String, SubjectView> = BTreeMap::new();
    for (subject, sequence) in cursors {
        view.entry(subject).or_default().cursor = from_stored(sequence);
    }
    for (subject, sequence) in applied {
        view.entry(subject)
            .or_default()
            .sequences
            .push(from_stored(sequence));
    }
    for (subject, applied, last, sum) in totals {
        let entry = view.entry(subject).or_default();
        entry.applied = from_stored(applied);
        entry.last = from_stored(last);
        entry.checksum = from_stored(sum);
    }
    view
}

const CURSORS_QUERY: &str =
    "SELECT subject, sequence FROM headwater_cursors WHERE feed = 'accounts.v1'";
const APPLIED_QUERY: &str = "SELECT subject, sequence FROM applied ORDER BY subject, sequence";
const TOTALS_QUERY: &str = "SELECT subject, applied, last_sequence, checksum FROM totals";

/// Everything in the view at `at` (no consumer may be writing it).
pub(crate) async fn read_view(at: &ViewAt) -> BTreeMap<String, SubjectView> {
    match at {
        ViewAt::Sqlite(path) => {
            let connection = rusqlite::Connection::open(path).unwrap();
            fold(read_sqlite(&connection).unwrap())
        }
        ViewAt::Postgres(schema) => {
            let view = open_postgres(schema).await;
            let guard = view.client().await.unwrap();
            let client = guard.as_ref().unwrap();
            let pairs = |rows: Vec<tokio_postgres::Row>| -> Vec<(String, i64)> {
                rows.iter().map(|r| (r.get(0), r.get(1))).collect()
            };
            // One snapshot: a killed consumer's last commit may still land meanwhile.
            client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .unwrap();
            let cursors = pairs(client.query(CURSORS_QUERY, &[]).await.unwrap());
            let applied = pairs(client.query(APPLIED_QUERY, &[]).await.unwrap());
            let totals = client
                .query(TOTALS_QUERY, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
                .collect();
            client.batch_execute("COMMIT").await.unwrap();
            fold((cursors, applied, totals))
        }
    }
}

/// The rows of an embedded view, in one snapshot.
pub(crate) fn read_sqlite(connection: &rusqlite::Connection) -> rusqlite::Result<Rows> {
    let tx = connection.unchecked_transaction()?;
    let connection = &*tx;
    let pairs = |sql: &str| -> rusqlite::Result<Vec<(String, i64)>> {
        let mut statement = connection.prepare(sql)?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        rows.collect()
    };
    let mut statement = connection.prepare(TOTALS_QUERY)?;
    let totals = statement
        .query_map([], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let rows = (pairs(CURSORS_QUERY)?, pairs(APPLIED_QUERY)?, totals);
    drop(statement);
    tx.commit()?;
    Ok(rows)
}

/// The view of an embedded view open in this process.
pub(crate) async fn read_embedded(view: &EmbeddedView) -> BTreeMap<String, SubjectView> {
    fold(view.read(read_sqlite).await.unwrap())
}

/// Checks that every subject of `view` was applied exactly once up to its cursor: the handler
/// saw 1, 2, … cursor once each, and its totals agree. Returns the events applied.
pub(crate) fn check_consistent(view: &BTreeMap<String, SubjectView>, when: &str) -> u64 {
    let mut events = 0;
    for (subject, s) in view {
        let once: Vec<u64> = (1..=s.cursor).collect();
        assert!(
            s.sequences == once,
            "{when}: subject {subject}: the cursor is at {} but the handler applied {}",
            s.cursor,
            describe(&s.sequences, s.cursor)
        );
        assert_eq!(
            (s.applied, s.last),
            (s.cursor, s.cursor),
            "{when}: subject {subject}: totals (applied, last) against the cursor"
        );
        events += s.cursor;
    }
    events
}

/// What is wrong with a subject's applied sequences against its cursor (they can be thousands).
fn describe(sequences: &[u64], cursor: u64) -> String {
    let mut twice = Vec::new();
    let mut missing = Vec::new();
    let mut seen = std::collections::BTreeMap::<u64, u64>::new();
    for s in sequences {
        *seen.entry(*s).or_default() += 1;
    }
    for (s, n) in &seen {
        if *n > 1 {
            twice.push(*s);
        }
    }
    for s in 1..=cursor {
        if !seen.contains_key(&s) {
            missing.push(s);
        }
    }
    let beyond: Vec<u64> = seen.keys().filter(|s| **s > cursor).copied().collect();
    format!(
        "{} handled; applied more than once: {twice:?}; missing: {missing:?}; \
         beyond the cursor: {beyond:?}",
        sequences.len()
    )
}
