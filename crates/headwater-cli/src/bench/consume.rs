//! The consume suite of `headwater bench`: issue 6's figures, in one run.
//!
//! 1. **Apply rate** of the consumer's view stores with a realistic handler (a balance upsert
//!    per event: the event's JSON data parsed, one `INSERT … ON CONFLICT DO UPDATE`), beside the
//!    backend's raw bound measured in the same run on the same disk or server, the three taking
//!    turns in 5 slices of the phase (the disk's speed drifts on a shared machine); every SQLite
//!    file's write-ahead log is first grown past its automatic checkpoint and restarted, as in a
//!    long-running process (`prime_wal`):
//!    - `EmbeddedView`: one event per apply through `Consumer::deliver` (a transport's
//!      delivery: the cursor read, then the apply transaction), and pages of 100 events of one
//!      subject through `ViewStore::apply` (what a bootstrap or a heal commits per page);
//!      against SQLite's own single-row commits (WAL, `synchronous=FULL`, a fresh file beside).
//!    - `PgView` (with `--postgres URL`): the same, against single-row `INSERT` commits on one
//!      connection of the same server.
//! 2. **Heal latency**: a real producer in process (the embedded store, a projector, the feed
//!    API on loopback), the consumer's upstream a `FeedClient`; each round delivers a subject's
//!    event `#gap + 1` to a view that has none of it, and times `Consumer::deliver` — the cursor
//!    read that finds the gap, the fetch over HTTP, the apply of the missing events, the apply of
//!    the delivered one. Gaps of 1 and of 100 events.
//! 3. **Append → applied**: internal events appended to the producer at a steady rate (paced,
//!    not closed-loop), the consumer following the feed over HTTP (`Consumer::follow_feed`,
//!    `FeedClient`) into an `EmbeddedView`; the time from each append's return to the commit of
//!    its integration event in the view (taken when the view store's apply returns).
//! 4. **Reconstitution walk** over a feed of `--walk-subjects` subjects (1,000,000 by default;
//!    the log filled in batches of 100, then backfilled by a projection that makes one subject of
//!    each event): one walk of the `Walker` (unpaced) through `FeedClient`, (a) on a view caught
//!    up with every subject (the walk lists and compares cursors), beside paging through the
//!    listing alone and `Consumer::reconstitute` on the same view, (b) on the same view with 1 %
//!    of its subjects missing (the walk fetches and applies them). The view's cursors are
//!    written in bulk beforehand (one SQLite transaction: the rows an apply of each subject's
//!    event would have left).
//!
//! The 1-minute load average is sampled at the start of each figure: the machine is shared.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_trait::async_trait;
use hdrhistogram::Histogram;
use headwater_api::{ApiConfig, FeedApi, Tokens};
use headwater_consume::{
    Applied, Consumer, ConsumerOptions, DeadLetter, Delivery, EmbeddedView, FeedClient,
    IntegrationEvent, NewDeadLetter, PgHandler, PgView, ViewError, ViewStore, Walker,
    WalkerOptions,
};
use headwater_core::{
    EventId, EventType, ExpectedVersion, FeedId, NewEvent, Sequence, StreamName, Subject,
};
use headwater_embedded::{EmbeddedFeedStore, EmbeddedStore};
use headwater_feed::Projectors;
use headwater_store::{EventStore, FeedStore};
use serde::{Deserialize, Serialize};

use super::Plan;
use super::feeds::BenchProjection;
use crate::text::group;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// SPEC's aim for healing one gap on loopback, p99, in microseconds.
const AIM_HEAL_P99_US: u64 = 20_000;
/// SPEC's aim for append → consumer applied through the HTTP feed on loopback, p99, in
/// microseconds.
const AIM_APPLIED_P99_US: u64 = 10_000;
/// The prefix of the `PgView` figures' schemas (not the store suite's `headwater_bench_`: a
/// run of each side by side must not see the other's schema).
const PG_SCHEMA_PREFIX: &str = "headwater_consume_bench_";
/// The bearer token of the suite's feed API.
const TOKEN: &str = "headwater-bench-consume-token";
/// The CloudEvents `source` of the suite's producer.
const SOURCE: &str = "headwater-bench";
/// Subjects the one-event deliveries rotate over (accounts of the balance view).
const DELIVERY_SUBJECTS: u64 = 1_000;
/// Events per apply of the batched figure (a bootstrap page of that many).
const BATCH_EVENTS: u64 = 100;
/// The larger gap of the heal figure, in events.
const HEAL_GAP_LARGE: u64 = 100;
/// Streams the append → applied appends rotate over (each a subject of the feed).
const LATENCY_STREAMS: u64 = 100;
/// Appends of the latency figure that may wait for the store at once.
const LATENCY_APPENDS_IN_FLIGHT_MAX: usize = 256;
/// The slowest latency the histograms tell apart, in microseconds (fixed bounds: a slower one
/// counts as this, and is seen as such in the maximum).
const LATENCY_MICROS_MAX: u64 = 60_000_000;
/// How long the consumer may take to apply the last appended event, after the last append.
const APPLIED_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the producer's projector may take to catch up with the appends of a figure.
const PROJECTED_TIMEOUT: Duration = Duration::from_secs(600);
/// One subject in this many is missing from the view of the second walk: 1 %.
const WALK_BEHIND_EVERY: u64 = 100;
/// The long poll of the follower (the API's default wait is far longer than any gap here).
const FOLLOW_WAIT: Duration = Duration::from_secs(10);
/// The integration event's data in every figure: a deposit on the subject's account.
const DEPOSIT: &str = r#"{"amount_cents":100,"currency":"EUR"}"#;

/// The consume suite's sizes, from the plan.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ConsumePlan {
    /// How long each apply-rate phase runs.
    pub(crate) phase_secs: f64,
    pub(crate) heal_rounds: u64,
    pub(crate) latency_events: u64,
    /// Appends per second of the append → applied figure.
    pub(crate) latency_rate: u32,
    pub(crate) walk_subjects: u64,
}

impl ConsumePlan {
    pub(crate) fn from_plan(plan: &Plan) -> ConsumePlan {
        ConsumePlan {
            phase_secs: plan.phase.as_secs_f64(),
            heal_rounds: if plan.quick { 20 } else { 300 },
            latency_events: if plan.quick { 200 } else { 5_000 },
            latency_rate: if plan.quick { 500 } else { 1_000 },
            walk_subjects: plan
                .walk_subjects
                .unwrap_or(if plan.quick { 2_000 } else { 1_000_000 }),
        }
    }
}

/// Everything one run of the consume suite measured.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ConsumeFigures {
    pub(crate) embedded: ApplyFigures,
    pub(crate) postgres: Option<ApplyFigures>,
    pub(crate) heal_one: LatencyFigure,
    pub(crate) heal_large: LatencyFigure,
    pub(crate) applied: AppliedLatency,
    pub(crate) walk: WalkFigures,
}

/// A view store's apply rates beside its backend's raw commit rate, same run.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ApplyFigures {
    pub(crate) load1: f64,
    /// The backend's own single-row commits per second.
    pub(crate) raw_per_sec: f64,
    /// One event per `Consumer::deliver`.
    pub(crate) deliver_per_sec: f64,
    pub(crate) deliver_p50_us: u64,
    pub(crate) deliver_p99_us: u64,
    /// Pages of [`BATCH_EVENTS`] per `ViewStore::apply`.
    pub(crate) batch_per_sec: f64,
    pub(crate) batch_p50_us: u64,
    pub(crate) batch_p99_us: u64,
}

/// A latency distribution, in microseconds.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct LatencyFigure {
    pub(crate) load1: f64,
    pub(crate) rounds: u64,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) max_us: u64,
}

/// Append → applied through the HTTP feed.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct AppliedLatency {
    pub(crate) latency: LatencyFigure,
    /// The appends' achieved rate, per second.
    pub(crate) append_rate: f64,
    /// The appends themselves (start → return), for context.
    pub(crate) append_p50_us: u64,
    pub(crate) append_p99_us: u64,
    /// The view's applies and feed-position saves over the figure (each one commit).
    pub(crate) applies: u64,
    pub(crate) position_saves: u64,
}

/// The reconstitution walks.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct WalkFigures {
    pub(crate) load1: f64,
    pub(crate) subjects: u64,
    /// Backfilling the walk's feed from its log, events per second (context).
    pub(crate) fill_per_sec: f64,
    /// Subjects per second of the listing alone (`FeedClient::subjects`, the walk's page size):
    /// the bound of a walk that finds nothing to fetch.
    pub(crate) listing_per_sec: f64,
    /// Subjects per second of `Consumer::reconstitute` on the caught-up view (a cursor read per
    /// subject), beside the walker's.
    pub(crate) reconstitute_per_sec: f64,
    /// Subjects per second, the view caught up.
    pub(crate) caught_up_per_sec: f64,
    /// Subjects per second, 1 % of the subjects missing from the view.
    pub(crate) behind_per_sec: f64,
    /// Subjects the second walk found behind (and fetched).
    pub(crate) behind: u64,
}

/// The 1-minute load average, from `/proc/loadavg` (0 where there is none).
fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn feed_id() -> FeedId {
    FeedId::parse("bench_consume.v1").expect("a valid constant feed id")
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::<u64>::new_with_bounds(1, LATENCY_MICROS_MAX, 3)
        .context("the latency histogram's bounds")
}

fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// The whole consume suite, in `dir` (fresh), with `PgView` figures when `postgres` is given.
pub(crate) async fn measure(
    dir: &Path,
    postgres: Option<&str>,
    keep: bool,
    plan: &Plan,
) -> anyhow::Result<ConsumeFigures> {
    let p = ConsumePlan::from_plan(plan);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let phase = plan.phase;
    let embedded = embedded_apply(dir, phase).await?;
    let postgres = match postgres {
        Some(url) => Some(postgres_apply(url, keep, phase).await?),
        None => None,
    };
    let producer = Producer::start(&dir.join("producer")).await?;
    let measured = async {
        let heal_one = heal(&producer, dir, "heal-1", 1, p.heal_rounds).await?;
        let heal_large = heal(
            &producer,
            dir,
            "heal-large",
            HEAL_GAP_LARGE,
            (p.heal_rounds / 3).max(1),
        )
        .await?;
        let applied = append_to_applied(&producer, dir, &p).await?;
        anyhow::Ok((heal_one, heal_large, applied))
    }
    .await;
    producer.stop().await;
    let (heal_one, heal_large, applied) = measured?;
    let walk = walk(dir, p.walk_subjects).await?;
    Ok(ConsumeFigures {
        embedded,
        postgres,
        heal_one,
        heal_large,
        applied,
        walk,
    })
}

// ---------------------------------------------------------------------------------------------
// Events and the balance view.

/// The CloudEvent JSON of a deposit on `subject` at `sequence`, decoded as a transport would.
fn deposit(subject: &str, sequence: u64, position: u64) -> anyhow::Result<IntegrationEvent> {
    let json = format!(
        r#"{{"specversion":"1.0","id":"{}","source":"{SOURCE}","type":"bench.deposited","subject":"{subject}","time":"2026-11-27T12:00:00Z","data":{DEPOSIT},"sequence":{sequence},"position":{position},"feed":"{}"}}"#,
        uuid::Uuid::new_v4(),
        feed_id()
    );
    IntegrationEvent::from_cloud_event(json.as_bytes()).context("the benchmark's own CloudEvent")
}

/// What the balance handler reads of an event.
#[derive(Deserialize)]
struct Deposit {
    amount_cents: i64,
}

const BALANCES_SQLITE: &str = "CREATE TABLE IF NOT EXISTS balances (
    account TEXT PRIMARY KEY,
    cents INTEGER NOT NULL,
    events INTEGER NOT NULL
) WITHOUT ROWID";

/// The embedded view's handler: the deposit added to the subject's balance.
fn sqlite_balance(
    tx: &rusqlite::Transaction<'_>,
    event: &IntegrationEvent,
) -> Result<(), BoxError> {
    let deposit: Deposit = event.data_as()?;
    tx.prepare_cached(
        "INSERT INTO balances (account, cents, events) VALUES (?1, ?2, 1)
         ON CONFLICT (account) DO UPDATE SET cents = cents + excluded.cents, events = events + 1",
    )?
    .execute(rusqlite::params![
        event.subject.as_str(),
        deposit.amount_cents
    ])?;
    Ok(())
}

/// Frames the write-ahead log is grown to before a figure: past SQLite's automatic checkpoint
/// (1,000 pages), so that it has cycled once.
const WAL_PRIME_PAGES: u64 = 1_200;

/// Brings the SQLite database at `path` (WAL mode) to the state a long-running one is in: its
/// write-ahead log grown past the automatic checkpoint and checkpointed with `RESTART`, so that
/// later commits overwrite the log's space instead of growing the file. On this disk a
/// commit's `fdatasync` costs several times more while the file grows (a journal commit of the
/// filesystem each time), so a fresh database measures its first thousand commits in another
/// regime than the rest; the raw bound and every view are primed alike.
///
/// SQLite removes the log when the last connection to the database closes: keep the returned
/// connection open until the measured one is open.
fn prime_wal(path: &Path) -> anyhow::Result<rusqlite::Connection> {
    let connection = rusqlite::Connection::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    connection.busy_timeout(Duration::from_secs(5))?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    prime(&connection)?;
    Ok(connection)
}

/// Grows the log of `connection`'s database past the automatic checkpoint and restarts it.
fn prime(connection: &rusqlite::Connection) -> anyhow::Result<()> {
    connection.execute_batch(&format!(
        "CREATE TABLE headwater_bench_prime (page BLOB NOT NULL);
         BEGIN;
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {WAL_PRIME_PAGES})
         INSERT INTO headwater_bench_prime SELECT zeroblob(4000) FROM n;
         COMMIT;
         DROP TABLE headwater_bench_prime;"
    ))?;
    connection.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))?;
    Ok(())
}

fn balance_view(path: &Path) -> anyhow::Result<EmbeddedView> {
    let primer = prime_wal(path)?;
    let view = EmbeddedView::open(path, |tx| tx.execute_batch(BALANCES_SQLITE), sqlite_balance)
        .with_context(|| format!("cannot open the view {}", path.display()))?;
    drop(primer);
    Ok(view)
}

const BALANCES_POSTGRES: &str = "CREATE TABLE IF NOT EXISTS balances (
    account TEXT PRIMARY KEY,
    cents BIGINT NOT NULL,
    events BIGINT NOT NULL)";

/// The PostgreSQL view's handler: the same upsert.
struct PgBalance;

#[async_trait]
impl PgHandler for PgBalance {
    async fn apply(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        event: &IntegrationEvent,
    ) -> Result<(), BoxError> {
        let deposit: Deposit = event.data_as()?;
        tx.execute(
            "INSERT INTO balances (account, cents, events) VALUES ($1, $2, 1)
             ON CONFLICT (account) DO UPDATE
             SET cents = balances.cents + excluded.cents, events = balances.events + 1",
            &[&event.subject.as_str(), &deposit.amount_cents],
        )
        .await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Apply rates.

/// A consumer whose upstream is never asked (every delivery continues its subject).
fn local_consumer<V: ViewStore>(view: Arc<V>) -> Consumer<V, headwater_consume::MemoryUpstream> {
    Consumer::new(
        feed_id(),
        view,
        Arc::new(headwater_consume::MemoryUpstream::new()),
        ConsumerOptions::default(),
    )
}

/// The backend's own single-row commits: the bound of a view store that commits each event.
enum RawBound {
    /// A fresh SQLite file beside the view (WAL, `synchronous=FULL`), on a blocking thread.
    Sqlite(Option<rusqlite::Connection>),
    /// One connection to the view's server, a table in the view's schema.
    Postgres(tokio_postgres::Client, tokio_postgres::Statement),
}

impl RawBound {
    fn sqlite(dir: &Path) -> anyhow::Result<RawBound> {
        let path = dir.join("raw.sqlite");
        let connection = rusqlite::Connection::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "FULL")?;
        prime(&connection)?;
        connection.execute_batch(
            "CREATE TABLE raw (id INTEGER PRIMARY KEY, account TEXT NOT NULL, \
             cents INTEGER NOT NULL)",
        )?;
        Ok(RawBound::Sqlite(Some(connection)))
    }

    /// A connection to `url` and a table in `schema` (which exists); the connection's task.
    async fn postgres(
        url: &str,
        schema: &str,
    ) -> anyhow::Result<(RawBound, tokio::task::JoinHandle<()>)> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .context("cannot connect to PostgreSQL (--postgres)")?;
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        client
            .batch_execute(&format!(
                "CREATE TABLE {schema}.raw (id BIGSERIAL PRIMARY KEY, account TEXT NOT NULL, \
                 cents BIGINT NOT NULL)"
            ))
            .await
            .context("create the raw table")?;
        let insert = client
            .prepare(&format!(
                "INSERT INTO {schema}.raw (account, cents) VALUES ($1, $2)"
            ))
            .await?;
        Ok((RawBound::Postgres(client, insert), connection))
    }

    /// Single-row commits for `slice`; how many.
    async fn run(&mut self, slice: Duration) -> anyhow::Result<u64> {
        match self {
            RawBound::Sqlite(slot) => {
                let connection = slot.take().context("the raw SQLite connection is gone")?;
                let (connection, commits) = tokio::task::spawn_blocking(move || {
                    let commits = sqlite_commits(&connection, slice);
                    (connection, commits)
                })
                .await
                .context("the raw SQLite loop")?;
                *slot = Some(connection);
                commits
            }
            RawBound::Postgres(client, insert) => {
                let started = Instant::now();
                let mut commits = 0_u64;
                while started.elapsed() < slice {
                    let account = format!("account-{}", commits % DELIVERY_SUBJECTS);
                    client.execute(&*insert, &[&account, &100_i64]).await?;
                    commits += 1;
                }
                Ok(commits)
            }
        }
    }
}

fn sqlite_commits(connection: &rusqlite::Connection, slice: Duration) -> anyhow::Result<u64> {
    let mut insert =
        connection.prepare_cached("INSERT INTO raw (account, cents) VALUES (?1, ?2)")?;
    let started = Instant::now();
    let mut commits = 0_u64;
    while started.elapsed() < slice {
        let account = format!("account-{}", commits % DELIVERY_SUBJECTS);
        insert.execute(rusqlite::params![account, 100])?;
        commits += 1;
    }
    Ok(commits)
}

/// Slices of each phase: the raw bound, the deliveries and the pages take turns, so that the
/// three see the same disk (this machine's is shared and its speed drifts).
const APPLY_SLICES: u32 = 5;

/// In [`APPLY_SLICES`] turns of `phase / APPLY_SLICES` each: the backend's raw single-row
/// commits; one event per `Consumer::deliver`, subjects in rotation; pages of [`BATCH_EVENTS`]
/// events of a fresh subject per `ViewStore::apply`. Events are made between the timed calls;
/// each rate is events over the time spent in the calls.
async fn apply_rates<V: ViewStore>(
    view: Arc<V>,
    raw: &mut RawBound,
    label: &str,
    phase: Duration,
) -> anyhow::Result<ApplyFigures> {
    let load1 = load1();
    let consumer = local_consumer(Arc::clone(&view));
    let feed = feed_id();
    let slice = phase / APPLY_SLICES;
    let bar = super::progress_bar(
        &format!("consume: {label}: raw, deliveries, pages"),
        u64::from(APPLY_SLICES) * 3,
        "slices",
    );
    let mut raw_commits = 0_u64;
    let mut raw_spent = Duration::ZERO;
    let mut one = histogram()?;
    let mut one_spent = Duration::ZERO;
    let mut delivered = 0_u64;
    let mut pages = histogram()?;
    let mut pages_spent = Duration::ZERO;
    let mut page_number = 0_u64;
    for turn in 1..=APPLY_SLICES {
        let started = Instant::now();
        raw_commits += raw.run(slice).await?;
        raw_spent += started.elapsed();
        bar.inc(1);

        while one_spent < slice * turn {
            let subject = format!("account-{}", delivered % DELIVERY_SUBJECTS);
            let sequence = delivered / DELIVERY_SUBJECTS + 1;
            let event = deposit(&subject, sequence, delivered + 1)?;
            let started = Instant::now();
            let outcome = consumer.deliver(event).await.context("a delivery")?;
            let took = started.elapsed();
            if outcome != (Delivery::Applied { healed: 0 }) {
                bail!("delivery {delivered} was not applied as is: {outcome:?}");
            }
            one_spent += took;
            one.saturating_record(micros(took));
            delivered += 1;
        }
        bar.inc(1);

        while pages_spent < slice * turn {
            let subject = format!("batch-{page_number}");
            let page = (1..=BATCH_EVENTS)
                .map(|sequence| deposit(&subject, sequence, sequence))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let subject = Subject::new(subject)?;
            let started = Instant::now();
            let done = view.apply(&feed, &subject, &page).await.context("a page")?;
            let took = started.elapsed();
            if done.applied != BATCH_EVENTS {
                bail!("page {page_number} applied {} events", done.applied);
            }
            pages_spent += took;
            pages.saturating_record(micros(took));
            page_number += 1;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let per_sec = |n: u64, spent: Duration| n as f64 / spent.as_secs_f64().max(f64::MIN_POSITIVE);
    Ok(ApplyFigures {
        load1,
        raw_per_sec: per_sec(raw_commits, raw_spent),
        deliver_per_sec: per_sec(delivered, one_spent),
        deliver_p50_us: one.value_at_quantile(0.5),
        deliver_p99_us: one.value_at_quantile(0.99),
        batch_per_sec: per_sec(page_number * BATCH_EVENTS, pages_spent),
        batch_p50_us: pages.value_at_quantile(0.5),
        batch_p99_us: pages.value_at_quantile(0.99),
    })
}

async fn embedded_apply(dir: &Path, phase: Duration) -> anyhow::Result<ApplyFigures> {
    let mut raw = RawBound::sqlite(dir)?;
    let view = Arc::new(balance_view(&dir.join("apply-view.sqlite"))?);
    apply_rates(view, &mut raw, "EmbeddedView", phase).await
}

async fn postgres_apply(url: &str, keep: bool, phase: Duration) -> anyhow::Result<ApplyFigures> {
    let schema = format!("{PG_SCHEMA_PREFIX}{:016x}", rand::random::<u64>());
    let measured = async {
        let view = Arc::new(
            PgView::connect(url, &schema, BALANCES_POSTGRES, PgBalance)
                .await
                .context("cannot connect the PgView (--postgres)")?,
        );
        let (mut raw, connection) = RawBound::postgres(url, &schema).await?;
        let figures = apply_rates(view, &mut raw, "PgView", phase).await;
        drop(raw);
        let _ = connection.await;
        figures
    }
    .await;
    if keep {
        tracing::info!(schema = %schema, "kept the PostgreSQL schema");
    } else if let Err(error) = super::postgres::drop_schema(url, &schema).await {
        tracing::warn!(schema = %schema, "could not drop the benchmark's schema: {error:#}");
    }
    measured
}

fn spinner(message: &str) -> indicatif::ProgressBar {
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(message.to_owned());
    spinner.enable_steady_tick(Duration::from_millis(200));
    spinner
}

// ---------------------------------------------------------------------------------------------
// The producer: an embedded store, a projector, the feed API on loopback.

struct Producer {
    events: Arc<EmbeddedStore>,
    feeds: Arc<EmbeddedFeedStore>,
    projectors: Projectors,
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Serves `feeds` on a loopback port with the suite's token; `(url, stop, server)`.
async fn serve(
    feeds: Arc<dyn FeedStore>,
) -> anyhow::Result<(
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
)> {
    let mut registry = prometheus_client::registry::Registry::default();
    let tokens = Tokens::one_for_all("bench", TOKEN).context("the benchmark's token")?;
    let api = FeedApi::new(
        feeds,
        ApiConfig::new(SOURCE, tokens).context("the feed API's configuration")?,
        &mut registry,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen on loopback")?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        api.serve(listener, Arc::new(registry), async {
            let _ = stopped.await;
        })
        .await
    });
    Ok((url, stop, server))
}

impl Producer {
    async fn start(dir: &Path) -> anyhow::Result<Producer> {
        let store = EmbeddedStore::open(dir)
            .with_context(|| format!("cannot open an embedded store in {}", dir.display()))?;
        let feeds = Arc::new(store.feeds().context("cannot open its feeds")?);
        let events = Arc::new(store);
        let feed = feed_id();
        let projectors = Projectors::builder()
            .projection(BenchProjection::new(feed.clone()))
            .start(Arc::clone(&events), Arc::clone(&feeds))
            .await
            .context("cannot start the producer's projector")?;
        super::feeds::wait_live(
            feeds.as_ref(),
            &projectors,
            &feed,
            "consume: the producer's feed turns live",
            0,
        )
        .await?;
        let (url, stop, server) = serve(feeds.clone()).await?;
        Ok(Producer {
            events,
            feeds,
            projectors,
            url,
            stop,
            server,
        })
    }

    fn client(&self) -> anyhow::Result<FeedClient> {
        FeedClient::new(&self.url, Some(TOKEN.to_owned())).context("the feed client")
    }

    /// Waits until the projector has projected everything appended so far.
    async fn projected(&self, label: &str) -> anyhow::Result<()> {
        let head = self.events.head_position().get();
        let feed = feed_id();
        let deadline = Instant::now() + PROJECTED_TIMEOUT;
        loop {
            let state = self
                .feeds
                .feed(&feed)
                .await?
                .context("the producer's feed is not registered")?;
            if state.cursor.get() >= head {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{label}: the projector did not reach {head} within {PROJECTED_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.server.await;
        self.projectors.shutdown().await;
    }
}

fn internal_event(data: String) -> anyhow::Result<NewEvent> {
    Ok(NewEvent::new(
        EventId::new_random(),
        EventType::new("account.deposited")?,
        data.into_bytes(),
    ))
}

// ---------------------------------------------------------------------------------------------
// 2. Heal latency.

/// `rounds` subjects of `gap + 1` events each at the producer; each round delivers `#gap + 1` of
/// one to a fresh view and times the delivery (gap found, fetched, applied, event applied).
async fn heal(
    producer: &Producer,
    dir: &Path,
    name: &str,
    gap: u64,
    rounds: u64,
) -> anyhow::Result<LatencyFigure> {
    let streams: Vec<StreamName> = (0..rounds)
        .map(|r| StreamName::new(format!("{name}-{r}")))
        .collect::<Result<_, _>>()?;
    for stream in &streams {
        let batch = (0..=gap)
            .map(|_| internal_event(DEPOSIT.to_owned()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        producer
            .events
            .append(stream, ExpectedVersion::Any, batch)
            .await
            .context("append the heal figure's events")?;
    }
    producer.projected(name).await?;
    let client = Arc::new(producer.client()?);
    let feed = feed_id();
    // The delivered events, read beforehand (not timed).
    let mut delivered = Vec::with_capacity(streams.len());
    for stream in &streams {
        let subject = Subject::new(stream.id())?;
        let page = headwater_consume::Upstream::read_subject(
            client.as_ref(),
            &feed,
            &subject,
            Sequence(gap),
            1,
        )
        .await
        .context("read the event to deliver")?;
        let [event] = <[IntegrationEvent; 1]>::try_from(page)
            .map_err(|page| anyhow::anyhow!("{subject} #{}: {} events", gap + 1, page.len()))?;
        delivered.push(event);
    }
    let view = Arc::new(balance_view(&dir.join(format!("{name}-view.sqlite")))?);
    let consumer = Consumer::new(
        feed.clone(),
        view,
        Arc::clone(&client),
        ConsumerOptions::default(),
    );
    let load1 = load1();
    let bar = super::progress_bar(&format!("consume: heal a gap of {gap}"), rounds, "rounds");
    let mut latencies = histogram()?;
    for event in delivered {
        let started = Instant::now();
        let outcome = consumer
            .deliver(event)
            .await
            .context("a healing delivery")?;
        let took = started.elapsed();
        if outcome != (Delivery::Applied { healed: gap }) {
            bail!("a delivery after a gap of {gap} ended {outcome:?}");
        }
        latencies.saturating_record(micros(took));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(LatencyFigure {
        load1,
        rounds,
        p50_us: latencies.value_at_quantile(0.5),
        p99_us: latencies.value_at_quantile(0.99),
        max_us: latencies.max(),
    })
}

// ---------------------------------------------------------------------------------------------
// 3. Append → applied.

/// A view store that notes when each benchmark event's apply returned (committed). Every other
/// method is the inner store's (a method added to `ViewStore` must be delegated here).
struct TimedView<V> {
    inner: V,
    /// By the event's number in its data (`"n"`): when its apply returned.
    applied_at: Mutex<Vec<Option<Instant>>>,
    applied: AtomicU64,
    /// Applies (each one commit).
    applies: AtomicU64,
    /// Feed positions saved (each one commit of its own).
    saves: AtomicU64,
}

/// What the timed view reads of an event.
#[derive(Deserialize)]
struct Numbered {
    n: usize,
}

impl<V> TimedView<V> {
    /// One commit that applied `done` of `events`, returned at `now`.
    fn record(&self, now: Instant, events: &[IntegrationEvent], done: &Applied) {
        self.applies.fetch_add(1, Ordering::Relaxed);
        let skip = usize::try_from(done.duplicates).unwrap_or(usize::MAX);
        let take = usize::try_from(done.applied).unwrap_or(0);
        let mut applied_at = self.applied_at.lock().unwrap_or_else(|e| e.into_inner());
        for event in events.iter().skip(skip).take(take) {
            if let Ok(Numbered { n }) = event.data_as::<Numbered>()
                && let Some(slot) = applied_at.get_mut(n)
                && slot.is_none()
            {
                *slot = Some(now);
                self.applied.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[async_trait]
impl<V: ViewStore> ViewStore for TimedView<V> {
    async fn cursor(&self, feed: &FeedId, subject: &Subject) -> Result<Sequence, ViewError> {
        self.inner.cursor(feed, subject).await
    }

    async fn apply(
        &self,
        feed: &FeedId,
        subject: &Subject,
        events: &[IntegrationEvent],
    ) -> Result<Applied, ViewError> {
        let done = self.inner.apply(feed, subject, events).await?;
        self.record(Instant::now(), events, &done);
        Ok(done)
    }

    async fn apply_many(
        &self,
        feed: &FeedId,
        batches: &[(Subject, Vec<IntegrationEvent>)],
    ) -> Result<Vec<Applied>, ViewError> {
        let done = self.inner.apply_many(feed, batches).await?;
        let now = Instant::now();
        for ((_, events), done) in batches.iter().zip(&done) {
            self.record(now, events, done);
        }
        Ok(done)
    }

    async fn cursors(
        &self,
        feed: &FeedId,
        after: Option<&Subject>,
        limit: u64,
    ) -> Result<Vec<(Subject, Sequence)>, ViewError> {
        self.inner.cursors(feed, after, limit).await
    }

    async fn feed_position(&self, feed: &FeedId) -> Result<u64, ViewError> {
        self.inner.feed_position(feed).await
    }

    async fn save_feed_position(&self, feed: &FeedId, position: u64) -> Result<(), ViewError> {
        self.saves.fetch_add(1, Ordering::Relaxed);
        self.inner.save_feed_position(feed, position).await
    }

    async fn mark(&self, key: &str) -> Result<Option<String>, ViewError> {
        self.inner.mark(key).await
    }

    async fn set_mark(&self, key: &str, value: Option<&str>) -> Result<(), ViewError> {
        self.inner.set_mark(key, value).await
    }

    async fn record_dead_letter(&self, letter: &NewDeadLetter) -> Result<u64, ViewError> {
        self.inner.record_dead_letter(letter).await
    }

    async fn dead_letters(
        &self,
        feed: &FeedId,
        after: u64,
        limit: u64,
    ) -> Result<Vec<DeadLetter>, ViewError> {
        self.inner.dead_letters(feed, after, limit).await
    }

    async fn resolve_dead_letters(
        &self,
        feed: &FeedId,
        subject: &Subject,
        through: Sequence,
    ) -> Result<u64, ViewError> {
        self.inner
            .resolve_dead_letters(feed, subject, through)
            .await
    }

    async fn discard_dead_letter(&self, feed: &FeedId, id: u64) -> Result<bool, ViewError> {
        self.inner.discard_dead_letter(feed, id).await
    }
}

/// Appends paced at the plan's rate, a follower applying them into a fresh view; the time from
/// each append's return to its event's commit in the view.
async fn append_to_applied(
    producer: &Producer,
    dir: &Path,
    p: &ConsumePlan,
) -> anyhow::Result<AppliedLatency> {
    let total = usize::try_from(p.latency_events).context("too many latency events")?;
    let feed = feed_id();
    let view = Arc::new(TimedView {
        inner: balance_view(&dir.join("follow-view.sqlite"))?,
        applied_at: Mutex::new(vec![None; total]),
        applied: AtomicU64::new(0),
        applies: AtomicU64::new(0),
        saves: AtomicU64::new(0),
    });
    // The follower starts at the feed's head: the heal figures' events are not its business.
    producer.projected("append → applied").await?;
    let head = producer
        .feeds
        .feed(&feed)
        .await?
        .context("the producer's feed is not registered")?
        .head;
    view.save_feed_position(&feed, head.get()).await?;
    let consumer = Arc::new(Consumer::new(
        feed.clone(),
        Arc::clone(&view),
        Arc::new(producer.client()?),
        ConsumerOptions::default(),
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let follower = tokio::spawn({
        let consumer = Arc::clone(&consumer);
        async move {
            consumer
                .follow_feed(FOLLOW_WAIT, async {
                    let _ = stopped.await;
                })
                .await
        }
    });
    let load1 = load1();
    let appended_at: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; total]));
    let appends = paced_appends(producer, p, Arc::clone(&appended_at)).await;
    // Every event applied, or the follower failed, or time ran out.
    let deadline = Instant::now() + APPLIED_TIMEOUT;
    let waited = loop {
        if view.applied.load(Ordering::Relaxed) >= p.latency_events {
            break Ok(());
        }
        if follower.is_finished() {
            break Err(anyhow::anyhow!("the follower stopped early"));
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "{} of {} events applied within {APPLIED_TIMEOUT:?} of the last append",
                view.applied.load(Ordering::Relaxed),
                p.latency_events
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let _ = stop.send(());
    let followed = follower.await.context("the follower panicked")?;
    let (append_rate, append_latencies) = appends?;
    waited.map_err(|e| match &followed {
        Err(error) => e.context(format!("the follower failed: {error}")),
        Ok(()) => e,
    })?;
    followed.context("the follower")?;
    let mut latencies = histogram()?;
    let appended_at = appended_at.lock().unwrap_or_else(|e| e.into_inner());
    let applied_at = view.applied_at.lock().unwrap_or_else(|e| e.into_inner());
    for (appended, applied) in appended_at.iter().zip(applied_at.iter()) {
        let (Some(appended), Some(applied)) = (appended, applied) else {
            bail!("an event without its append or its apply instant");
        };
        latencies.saturating_record(micros(applied.saturating_duration_since(*appended)));
    }
    Ok(AppliedLatency {
        latency: LatencyFigure {
            load1,
            rounds: p.latency_events,
            p50_us: latencies.value_at_quantile(0.5),
            p99_us: latencies.value_at_quantile(0.99),
            max_us: latencies.max(),
        },
        append_rate,
        append_p50_us: append_latencies.value_at_quantile(0.5),
        append_p99_us: append_latencies.value_at_quantile(0.99),
        applies: view.applies.load(Ordering::Relaxed),
        position_saves: view.saves.load(Ordering::Relaxed),
    })
}

/// Appends the plan's events one per append at its rate (each on its tick, whatever earlier
/// ones take), noting when each returned; `(achieved rate, append latencies)`.
async fn paced_appends(
    producer: &Producer,
    p: &ConsumePlan,
    appended_at: Arc<Mutex<Vec<Option<Instant>>>>,
) -> anyhow::Result<(f64, Histogram<u64>)> {
    let bar = super::progress_bar(
        "consume: append → applied, HTTP feed",
        p.latency_events,
        "events",
    );
    let streams: Vec<StreamName> = (0..LATENCY_STREAMS)
        .map(|s| StreamName::new(format!("follow-{s}")))
        .collect::<Result<_, _>>()?;
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(
        1.0 / f64::from(p.latency_rate.max(1)),
    ));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let slots = Arc::new(tokio::sync::Semaphore::new(LATENCY_APPENDS_IN_FLIGHT_MAX));
    let latencies = Arc::new(Mutex::new(histogram()?));
    let mut appends = tokio::task::JoinSet::new();
    let started = Instant::now();
    for n in 0..p.latency_events {
        ticks.tick().await;
        let slot = Arc::clone(&slots).acquire_owned().await?;
        let events = Arc::clone(&producer.events);
        let stream = streams[usize::try_from(n % LATENCY_STREAMS).unwrap_or(0)].clone();
        let event = internal_event(format!(
            r#"{{"amount_cents":100,"currency":"EUR","n":{n}}}"#
        ))?;
        let appended_at = Arc::clone(&appended_at);
        let latencies = Arc::clone(&latencies);
        let bar = bar.clone();
        appends.spawn(async move {
            let start = Instant::now();
            let appended = events
                .append(&stream, ExpectedVersion::Any, vec![event])
                .await
                .context("append while measuring");
            let returned = Instant::now();
            drop(slot);
            appended?;
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if let Some(slot) = appended_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(n)
            {
                *slot = Some(returned);
            }
            latencies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .saturating_record(micros(returned - start));
            bar.inc(1);
            anyhow::Ok(())
        });
        while let Some(done) = appends.try_join_next() {
            done??;
        }
    }
    while let Some(done) = appends.join_next().await {
        done??;
    }
    bar.finish_and_clear();
    let rate = p.latency_events as f64 / started.elapsed().as_secs_f64().max(f64::MIN_POSITIVE);
    let latencies = latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok((rate, latencies))
}

// ---------------------------------------------------------------------------------------------
// 4. Reconstitution walk.

/// The walk feed's subject of the internal event at log position `position` (1-based).
fn walk_subject(position: u64) -> String {
    format!("account-{position:07}")
}

/// Fills the log of `events` with `subjects` internal events (batches of 100 over the feeds
/// suite's 10,000 streams), then backfills `feed` from it with a projection that makes one
/// subject of each event (the subject named after its log position), and stops the projector
/// once the feed is live; the backfill's rate.
async fn fill_walk_feed(
    events: &Arc<EmbeddedStore>,
    feeds: &Arc<EmbeddedFeedStore>,
    feed: &FeedId,
    subjects: u64,
) -> anyhow::Result<f64> {
    super::feeds::fill(events.as_ref(), subjects, "consume: fill the walk's log").await?;
    let event_type = EventType::new("bench.deposited")?;
    let projection = headwater_feed::projection(&feed.to_string(), move |event, out| {
        let subject = Subject::new(walk_subject(event.position.get()))
            .map_err(headwater_feed::ProjectionError::failed)?;
        out.emit_json_bytes(event_type.clone(), subject, DEPOSIT.as_bytes().to_vec())
    });
    let started = Instant::now();
    let projectors = Projectors::builder()
        .projection(projection)
        .start(Arc::clone(events), Arc::clone(feeds))
        .await
        .context("cannot start the walk feed's projector")?;
    let live = super::feeds::wait_live(
        feeds.as_ref(),
        &projectors,
        feed,
        "consume: backfill the walk's feed",
        subjects,
    )
    .await;
    projectors.shutdown().await;
    live?;
    Ok(subjects as f64 / started.elapsed().as_secs_f64().max(f64::MIN_POSITIVE))
}

/// Writes the cursors (and balances) of the walk subjects `keep` says, in one
/// transaction: what applying each subject's one event would have left in the view.
fn fill_view(path: &Path, subjects: u64, keep: impl Fn(u64) -> bool) -> anyhow::Result<()> {
    let mut connection = rusqlite::Connection::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    connection.busy_timeout(Duration::from_secs(5))?;
    let tx = connection.transaction()?;
    {
        let feed = feed_id().to_string();
        let mut cursor = tx.prepare(
            "INSERT OR REPLACE INTO headwater_cursors (feed, subject, sequence) VALUES (?1, ?2, 1)",
        )?;
        let mut balance = tx.prepare(
            "INSERT OR REPLACE INTO balances (account, cents, events) VALUES (?1, 100, 1)",
        )?;
        for n in (1..=subjects).filter(|&n| keep(n)) {
            let subject = walk_subject(n);
            cursor.execute(rusqlite::params![feed, subject])?;
            balance.execute(rusqlite::params![subject])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Removes the cursors (and balances) of the subjects `drop` says, in one transaction.
fn forget(path: &Path, subjects: u64, drop: impl Fn(u64) -> bool) -> anyhow::Result<()> {
    let mut connection = rusqlite::Connection::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    connection.busy_timeout(Duration::from_secs(5))?;
    let tx = connection.transaction()?;
    {
        // The whole key (feed, subject): by subject alone each delete would scan the table.
        let feed = feed_id().to_string();
        let mut cursor =
            tx.prepare("DELETE FROM headwater_cursors WHERE feed = ?1 AND subject = ?2")?;
        let mut balance = tx.prepare("DELETE FROM balances WHERE account = ?1")?;
        for n in (1..=subjects).filter(|&n| drop(n)) {
            let subject = walk_subject(n);
            cursor.execute(rusqlite::params![feed, subject])?;
            balance.execute(rusqlite::params![subject])?;
        }
    }
    tx.commit()?;
    Ok(())
}

async fn walk(dir: &Path, subjects: u64) -> anyhow::Result<WalkFigures> {
    let feed = feed_id();
    let store_dir = dir.join("walk-producer");
    let store = EmbeddedStore::open(&store_dir)
        .with_context(|| format!("cannot open an embedded store in {}", store_dir.display()))?;
    let feeds = Arc::new(store.feeds().context("cannot open its feeds")?);
    let events = Arc::new(store);
    let fill_per_sec = fill_walk_feed(&events, &feeds, &feed, subjects).await?;
    let (url, stop, server) = serve(feeds.clone()).await?;
    let measured = async {
        let path = dir.join("walk-view.sqlite");
        let view = Arc::new(balance_view(&path)?);
        let spinner = spinner("consume: fill the walk's view");
        let fill_path = path.clone();
        tokio::task::spawn_blocking(move || fill_view(&fill_path, subjects, |_| true))
            .await
            .context("filling the view")??;
        spinner.finish_and_clear();
        let client =
            Arc::new(FeedClient::new(&url, Some(TOKEN.to_owned())).context("the feed client")?);
        let consumer = Consumer::new(
            feed.clone(),
            view,
            Arc::clone(&client),
            ConsumerOptions::default(),
        );
        let walker = Walker::new(Arc::new(consumer), WalkerOptions::default().unpaced());
        let load1 = load1();
        let listing_per_sec = listing(&client, subjects).await?;
        let caught_up = timed_walk(&walker, subjects, "consume: walk, view caught up").await?;
        if caught_up.1 != 0 {
            bail!("the walk of a caught-up view found {} behind", caught_up.1);
        }
        let reconstitute_per_sec = timed_reconstitute(
            walker.consumer(),
            subjects,
            "consume: Consumer::reconstitute, view caught up",
        )
        .await?;
        let forget_path = path.clone();
        tokio::task::spawn_blocking(move || {
            forget(&forget_path, subjects, |n| n % WALK_BEHIND_EVERY == 0)
        })
        .await
        .context("forgetting subjects")??;
        let expected = subjects / WALK_BEHIND_EVERY;
        let behind =
            timed_walk(&walker, subjects, "consume: walk, 1 % of the view missing").await?;
        if behind.1 != expected {
            bail!(
                "the walk found {} subjects behind, not {expected}",
                behind.1
            );
        }
        anyhow::Ok(WalkFigures {
            load1,
            subjects,
            fill_per_sec,
            listing_per_sec,
            reconstitute_per_sec,
            caught_up_per_sec: caught_up.0,
            behind_per_sec: behind.0,
            behind: behind.1,
        })
    }
    .await;
    let _ = stop.send(());
    let _ = server.await;
    measured
}

/// Pages through the producer's whole subject listing as a walk does (same page size), and
/// nothing else; subjects per second.
async fn listing(client: &FeedClient, subjects: u64) -> anyhow::Result<f64> {
    let spinner = spinner("consume: the subject listing alone");
    let feed = feed_id();
    let started = Instant::now();
    let mut after: Option<Subject> = None;
    let mut listed = 0_u64;
    loop {
        let page = headwater_consume::Upstream::subjects(
            client,
            &feed,
            after.as_ref(),
            headwater_consume::PAGE_EVENTS_DEFAULT,
        )
        .await
        .context("the subject listing")?;
        let Some(last) = page.last() else {
            break;
        };
        listed += page.len() as u64;
        after = Some(last.subject.clone());
    }
    let elapsed = started.elapsed();
    spinner.finish_and_clear();
    if listed != subjects {
        bail!("the listing has {listed} subjects, not {subjects}");
    }
    Ok(subjects as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE))
}

/// One walk of the walker (unpaced); `(subjects per second, subjects behind)`.
async fn timed_walk<V: ViewStore, U: headwater_consume::Upstream>(
    walker: &Walker<V, U>,
    subjects: u64,
    label: &str,
) -> anyhow::Result<(f64, u64)> {
    let bar = super::progress_bar(label, subjects, "subjects");
    let mut watch = walker.watch();
    let shown = bar.clone();
    let progress = tokio::spawn(async move {
        while watch.changed().await.is_ok() {
            let listed = watch.borrow_and_update().running.as_ref().map(|r| r.listed);
            if let Some(listed) = listed {
                shown.set_position(listed);
            }
        }
    });
    let started = Instant::now();
    let report = walker.walk().await;
    progress.abort();
    let report = report.context("the walk")?;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    if report.listed != subjects || report.failed != 0 {
        bail!(
            "the walk listed {} subjects (not {subjects}), {} failed",
            report.listed,
            report.failed
        );
    }
    Ok((
        subjects as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
        report.behind,
    ))
}

/// One `Consumer::reconstitute`; subjects per second.
async fn timed_reconstitute<V: ViewStore, U: headwater_consume::Upstream>(
    consumer: &Consumer<V, U>,
    subjects: u64,
    label: &str,
) -> anyhow::Result<f64> {
    let spinner = spinner(label);
    let started = Instant::now();
    let report = consumer
        .reconstitute()
        .await
        .context("the reconstitution")?;
    let elapsed = started.elapsed();
    spinner.finish_and_clear();
    if report.subjects != subjects || report.behind != 0 {
        bail!(
            "the reconstitution listed {} subjects (not {subjects}), {} behind",
            report.subjects,
            report.behind
        );
    }
    Ok(subjects as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE))
}

// ---------------------------------------------------------------------------------------------
// The report.

/// The median of each number over the runs, for the JSON report (objects and arrays element by
/// element; a field missing from some runs is the median of the others).
pub(crate) fn median(runs: &[ConsumeFigures]) -> serde_json::Value {
    let values: Vec<serde_json::Value> = runs
        .iter()
        .filter_map(|r| serde_json::to_value(r).ok())
        .collect();
    median_value(&values)
}

fn median_value(values: &[serde_json::Value]) -> serde_json::Value {
    use serde_json::Value;
    let Some(first) = values.first() else {
        return Value::Null;
    };
    match first {
        Value::Object(fields) => Value::Object(
            fields
                .keys()
                .map(|key| {
                    let each: Vec<Value> = values
                        .iter()
                        .filter_map(|v| v.get(key))
                        .filter(|v| !v.is_null())
                        .cloned()
                        .collect();
                    (key.clone(), median_value(&each))
                })
                .collect(),
        ),
        Value::Number(_) => {
            let mut numbers: Vec<f64> = values.iter().filter_map(Value::as_f64).collect();
            numbers.sort_by(f64::total_cmp);
            numbers
                .get(numbers.len() / 2)
                .and_then(|&m| serde_json::Number::from_f64(m))
                .map_or(Value::Null, Value::Number)
        }
        other => other.clone(),
    }
}

fn med(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn ms(us: f64) -> String {
    format!("{:.2}", us / 1_000.0)
}

/// The consuming section of the report, for BENCHMARKS.md.
pub(crate) fn markdown(
    plan: &Plan,
    machine: &super::system::Machine,
    runs: &[ConsumeFigures],
) -> String {
    use std::fmt::Write as _;
    if runs.is_empty() {
        return String::new();
    }
    let p = ConsumePlan::from_plan(plan);
    let several = runs.len() > 1;
    let m = |get: &dyn Fn(&ConsumeFigures) -> f64| med(runs.iter().map(get).collect());
    let each_with = |separator: &str, get: &dyn Fn(&ConsumeFigures) -> String| {
        if several {
            runs.iter().map(get).collect::<Vec<_>>().join(separator)
        } else {
            String::new()
        }
    };
    let each = |get: &dyn Fn(&ConsumeFigures) -> String| each_with(" / ", get);
    let loads = |get: &dyn Fn(&ConsumeFigures) -> f64| {
        runs.iter()
            .map(|r| format!("{:.1}", get(r)))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let mut out = String::new();
    let _ = writeln!(out, "\n#### Consuming\n");
    let _ = writeln!(out, "- command: `{}`", super::report::command_line());
    let _ = writeln!(
        out,
        "- machine: {}, {} cores, {}; disk: {}",
        machine.cpu, machine.cores, machine.kernel, machine.filesystem
    );
    let _ = writeln!(
        out,
        "- workload: a balance view (each event's JSON parsed, one `INSERT … ON CONFLICT DO \
         UPDATE`); apply phases of {:.1} s; deliveries over {} subjects; heal: {} rounds of a \
         gap of 1, {} of a gap of {}, producer (embedded store, projector, feed API) and \
         `FeedClient` on loopback; append → applied: {} events at {} appends/s over {} streams, \
         `follow_feed` into an `EmbeddedView`; walk: {} subjects of one event each",
        p.phase_secs,
        group(DELIVERY_SUBJECTS as f64),
        p.heal_rounds,
        (p.heal_rounds / 3).max(1),
        HEAL_GAP_LARGE,
        group(p.latency_events as f64),
        p.latency_rate,
        LATENCY_STREAMS,
        group(p.walk_subjects as f64),
    );
    if several {
        let _ = writeln!(
            out,
            "- {} runs: each figure is the median (each run's figure in the last column); a \
             ratio is the median of each run's ratio",
            runs.len()
        );
    }
    if plan.quick {
        let _ = writeln!(
            out,
            "- note: a `--quick` run (a smoke test): figures that mean little"
        );
    }
    let _ = writeln!(
        out,
        "\n| figure | measured | compared to, same run | load (1 min) | runs |\n| --- | ---: | --- | --- | --- |"
    );
    let mut row =
        |figure: String, measured: String, compared: String, load: String, runs: String| {
            let _ = writeln!(
                out,
                "| {figure} | {measured} | {compared} | {load} | {runs} |"
            );
        };
    type Get = fn(&ConsumeFigures) -> Option<&ApplyFigures>;
    let stores: [(&str, &str, Get); 2] = [
        (
            "EmbeddedView",
            "SQLite single-row commits (WAL, synchronous=FULL, same disk)",
            |r| Some(&r.embedded),
        ),
        (
            "PgView",
            "PostgreSQL single-row INSERT commits, 1 connection",
            |r| r.postgres.as_ref(),
        ),
    ];
    for (name, raw_name, get) in stores {
        if runs.iter().any(|r| get(r).is_none()) {
            continue;
        }
        let a = |f: fn(&ApplyFigures) -> f64| move |r: &ConsumeFigures| get(r).map_or(0.0, f);
        let raw = m(&a(|x| x.raw_per_sec));
        let load = loads(&a(|x| x.load1));
        row(
            format!("{name}: raw bound, {raw_name}"),
            format!("{} commits/s", group(raw)),
            String::new(),
            load.clone(),
            each(&|r| group(a(|x| x.raw_per_sec)(r))),
        );
        row(
            format!("{name}: 1 event per apply (`Consumer::deliver`), p50 / p99"),
            format!(
                "{} events/s ({} / {} ms)",
                group(m(&a(|x| x.deliver_per_sec))),
                ms(m(&a(|x| x.deliver_p50_us as f64))),
                ms(m(&a(|x| x.deliver_p99_us as f64))),
            ),
            format!(
                "{:.0} % of the raw bound",
                m(&a(
                    |x| x.deliver_per_sec / x.raw_per_sec.max(f64::MIN_POSITIVE)
                )) * 100.0
            ),
            load.clone(),
            each(&|r| group(a(|x| x.deliver_per_sec)(r))),
        );
        row(
            format!(
                "{name}: pages of {BATCH_EVENTS} per apply (`ViewStore::apply`), p50 / p99 per page"
            ),
            format!(
                "{} events/s ({} / {} ms)",
                group(m(&a(|x| x.batch_per_sec))),
                ms(m(&a(|x| x.batch_p50_us as f64))),
                ms(m(&a(|x| x.batch_p99_us as f64))),
            ),
            format!(
                "{:.1}× the raw bound",
                m(&a(
                    |x| x.batch_per_sec / x.raw_per_sec.max(f64::MIN_POSITIVE)
                ))
            ),
            load,
            each(&|r| group(a(|x| x.batch_per_sec)(r))),
        );
    }
    let verdict = |p99: f64, aim: u64| if p99 <= aim as f64 { "met" } else { "SHORT" };
    type Lat = fn(&ConsumeFigures) -> &LatencyFigure;
    let heals: [(String, Lat); 2] = [
        (
            "heal a gap of 1 (`deliver` of #2 to an empty subject)".to_owned(),
            |r| &r.heal_one,
        ),
        (
            format!(
                "heal a gap of {HEAL_GAP_LARGE} (`deliver` of #{} to an empty subject)",
                HEAL_GAP_LARGE + 1
            ),
            |r| &r.heal_large,
        ),
    ];
    for (figure, get) in heals {
        let p99 = m(&|r| get(r).p99_us as f64);
        row(
            format!("{figure}, p50 / p99 (max)"),
            format!(
                "{} / {} ms ({} ms)",
                ms(m(&|r| get(r).p50_us as f64)),
                ms(p99),
                ms(runs
                    .iter()
                    .map(|r| get(r).max_us as f64)
                    .fold(0.0, f64::max)),
            ),
            format!(
                "aim p99 ≤ {} ms: {}",
                AIM_HEAL_P99_US / 1_000,
                verdict(p99, AIM_HEAL_P99_US)
            ),
            loads(&|r| get(r).load1),
            // Each run's p50 / p99, runs apart by "; ".
            each_with("; ", &|r| {
                format!(
                    "{} / {}",
                    ms(get(r).p50_us as f64),
                    ms(get(r).p99_us as f64)
                )
            }),
        );
    }
    let p99 = m(&|r| r.applied.latency.p99_us as f64);
    row(
        "append → applied in the view, HTTP feed, p50 / p99 (max)".to_owned(),
        format!(
            "{} / {} ms ({} ms)",
            ms(m(&|r| r.applied.latency.p50_us as f64)),
            ms(p99),
            ms(runs
                .iter()
                .map(|r| r.applied.latency.max_us as f64)
                .fold(0.0, f64::max)),
        ),
        format!(
            "aim p99 ≤ {} ms: {}; {} appends/s achieved; the append itself {} / {} ms; the view \
             committed {:.2} times per event (applies and feed-position saves)",
            AIM_APPLIED_P99_US / 1_000,
            verdict(p99, AIM_APPLIED_P99_US),
            group(m(&|r| r.applied.append_rate)),
            ms(m(&|r| r.applied.append_p50_us as f64)),
            ms(m(&|r| r.applied.append_p99_us as f64)),
            m(&|r| (r.applied.applies + r.applied.position_saves) as f64
                / (r.applied.latency.rounds as f64).max(1.0)),
        ),
        loads(&|r| r.applied.latency.load1),
        each_with("; ", &|r| {
            format!(
                "{} / {}",
                ms(r.applied.latency.p50_us as f64),
                ms(r.applied.latency.p99_us as f64)
            )
        }),
    );
    let subjects = group(p.walk_subjects as f64);
    row(
        format!("reconstitution walk over {subjects} subjects, view caught up"),
        format!("{} subjects/s", group(m(&|r| r.walk.caught_up_per_sec))),
        format!(
            "{:.0} % of paging through the listing alone ({} subjects/s); \
             `Consumer::reconstitute` on the same view: {} subjects/s",
            m(&|r| r.walk.caught_up_per_sec / r.walk.listing_per_sec.max(f64::MIN_POSITIVE))
                * 100.0,
            group(m(&|r| r.walk.listing_per_sec)),
            group(m(&|r| r.walk.reconstitute_per_sec)),
        ),
        loads(&|r| r.walk.load1),
        each(&|r| group(r.walk.caught_up_per_sec)),
    );
    row(
        format!("reconstitution walk over {subjects} subjects, 1 % missing from the view"),
        format!("{} subjects/s", group(m(&|r| r.walk.behind_per_sec))),
        format!(
            "{} subjects fetched and applied",
            group(m(&|r| r.walk.behind as f64))
        ),
        loads(&|r| r.walk.load1),
        each(&|r| group(r.walk.behind_per_sec)),
    );
    let _ = writeln!(
        out,
        "\nBackfilling the walk's feed from its log (one subject per event; not in the figures): \
         {} events/s.",
        runs.iter()
            .map(|r| group(r.walk.fill_per_sec))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    out
}
