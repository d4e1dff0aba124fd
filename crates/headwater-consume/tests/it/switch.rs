//! G10 on the consumer's side: a consumer moves from `accounts.v1` to `accounts.v2` of a real
//! producer (event store, projectors, feed API on a loopback port) while appends go on, without
//! downtime; readers never see a mix of versions; crashes before and after the flip resume; a
//! retired feed is a structured refusal that names its successor.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use headwater_api::{ApiConfig, FeedApi, Tokens};
use headwater_consume::{
    ActiveFeed, ConsumeError, ConsumerOptions, EmbeddedView, FeedClient, IntegrationEvent,
    MemoryUpstream, MemoryView, SubjectHead, SwitchError, SwitchOptions, SwitchPhase, Upstream,
    UpstreamError, VersionedConsumer, ViewStore,
};
use headwater_core::{
    EventId, EventType, ExpectedVersion, FeedId, FeedStatus, NewEvent, RecordedEvent, Sequence,
    StreamName, Subject,
};
use headwater_feed::{Emit, Projection, ProjectionError, Projectors};
use headwater_store::{EventStore, FeedStore, MemoryFeedStore, MemoryStore};
use tokio::net::TcpListener;

const TOKEN: &str = "statements-token-0123456789abcdef";
/// The consumer's token name: what the producer's `readers` show.
const READER: &str = "statements";
const CONSUMER: &str = "statements";
/// Far more than anything here should take.
const PROMPT: Duration = Duration::from_secs(30);
/// Accounts of the workload, and the tasks appending to them (each owns `account % TASKS`).
const ACCOUNTS: u64 = 24;
const TASKS: u64 = 3;
/// Each appender's pause between appends: below the projectors' and consumers' rate in a debug
/// build, so that the point is appends going on, not a race.
const APPEND_PAUSE: Duration = Duration::from_millis(4);

fn feed(text: &str) -> FeedId {
    FeedId::parse(text).unwrap()
}

fn v1() -> FeedId {
    feed("accounts.v1")
}

fn v2() -> FeedId {
    feed("accounts.v2")
}

// ---------------------------------------------------------------------------------------------
// The producer: internal events `account.opened` {owner}, `account.deposited` / `withdrawn`
// {amount, balance}. Feed v1 is the delta model (`accounts.deposited` / `accounts.withdrawn` with
// the amount; the opening is not published); v2 is the state model (`accounts.opened` with the
// owner, then `accounts.changed` with the signed change and the balance after it). So a subject's
// sequences differ between the versions (v2 has one more event), and so do types and data.

#[derive(Debug)]
struct Bank {
    version: u32,
}

#[derive(serde::Deserialize)]
struct Internal {
    #[serde(default)]
    owner: String,
    #[serde(default)]
    amount: i64,
    #[serde(default)]
    balance: i64,
}

impl Projection for Bank {
    fn feed(&self) -> FeedId {
        feed(&format!("accounts.v{}", self.version))
    }

    fn project(&self, event: &RecordedEvent, out: &mut Emit) -> Result<(), ProjectionError> {
        let data: Internal = serde_json::from_slice(&event.data)?;
        let subject = event.stream.id();
        match (self.version, event.event_type.as_str()) {
            (1, "account.opened") => Ok(()),
            (1, "account.deposited") => out.emit(
                "accounts.deposited",
                subject,
                &serde_json::json!({"amount": data.amount}),
            ),
            (1, "account.withdrawn") => out.emit(
                "accounts.withdrawn",
                subject,
                &serde_json::json!({"amount": data.amount}),
            ),
            (_, "account.opened") => out.emit(
                "accounts.opened",
                subject,
                &serde_json::json!({"owner": data.owner}),
            ),
            (_, kind) => {
                let change = if kind == "account.withdrawn" {
                    -data.amount
                } else {
                    data.amount
                };
                out.emit(
                    "accounts.changed",
                    subject,
                    &serde_json::json!({"change": change, "balance": data.balance}),
                )
            }
        }
    }
}

/// Every account's balances, as the appenders decided them: entry 0 is the opening (balance 0),
/// entry k the balance after the k-th deposit or withdrawal. An entry is recorded *before* its
/// event is appended, so a reader that sees an event finds its entry.
type History = Arc<Mutex<BTreeMap<String, Vec<i64>>>>;

struct Producer {
    events: Arc<MemoryStore>,
    feeds: Arc<MemoryFeedStore>,
    projectors: tokio::sync::Mutex<Option<Projectors>>,
    url: String,
    history: History,
    appending: Arc<AtomicBool>,
    appenders: Mutex<Vec<tokio::task::JoinHandle<u64>>>,
    appends: Arc<AtomicU64>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Producer {
    /// A producer with the given versions projected, every account opened, served on loopback.
    async fn start(versions: &[u32]) -> Producer {
        let events = Arc::new(MemoryStore::new());
        let feeds = Arc::new(MemoryFeedStore::new());
        let history: History = Arc::default();
        for account in 0..ACCOUNTS {
            let subject = format!("{account}");
            history.lock().unwrap().insert(subject.clone(), vec![0]);
            append(
                &events,
                &subject,
                "account.opened",
                &serde_json::json!({"owner": format!("owner {account}")}),
            )
            .await;
        }
        let mut registry = prometheus_client::registry::Registry::default();
        let mut config =
            ApiConfig::new("accounts", Tokens::one_for_all(READER, TOKEN).unwrap()).unwrap();
        config.readers_flush_interval = Duration::from_millis(50);
        let api = FeedApi::new(feeds.clone(), config, &mut registry);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            api.serve(listener, Arc::new(registry), async {
                let _ = stopped.await;
            })
            .await
        });
        let producer = Producer {
            events,
            feeds,
            projectors: tokio::sync::Mutex::new(None),
            url,
            history,
            appending: Arc::new(AtomicBool::new(true)),
            appenders: Mutex::new(Vec::new()),
            appends: Arc::default(),
            _stop: stop,
        };
        producer.project(versions).await;
        producer
    }

    /// (Re)starts the projectors with these versions, as a redeploy would; waits until each is
    /// live and caught up with the log.
    async fn project(&self, versions: &[u32]) {
        let mut projectors = self.projectors.lock().await;
        if let Some(running) = projectors.take() {
            running.shutdown().await;
        }
        let mut builder = Projectors::builder();
        for &version in versions {
            builder = builder.projection(Bank { version });
        }
        let running = builder
            .start(Arc::clone(&self.events), Arc::clone(&self.feeds))
            .await
            .unwrap();
        for &version in versions {
            self.caught_up(&running, version).await;
        }
        *projectors = Some(running);
    }

    /// Waits until the version's projector has projected the log up to its head now.
    async fn wait_projected(&self, version: u32) {
        let projectors = self.projectors.lock().await;
        self.caught_up(projectors.as_ref().unwrap(), version).await;
    }

    /// Waits until version's projector is live and has projected the log up to its head now.
    async fn caught_up(&self, projectors: &Projectors, version: u32) {
        let head = self.events.head_position();
        let mut status = projectors
            .watch(&feed(&format!("accounts.v{version}")))
            .unwrap();
        tokio::time::timeout(
            PROMPT,
            status.wait_for(|s| s.cursor >= head && s.feed_status == FeedStatus::Live),
        )
        .await
        .expect("the projector did not catch up")
        .unwrap();
    }

    /// Starts the appenders: each owns `account % TASKS` and deposits or withdraws (never below
    /// zero) until `stop_appending`.
    fn start_appending(&self, seed: u64) {
        self.start_appending_paced(seed, APPEND_PAUSE);
    }

    /// As `start_appending`, each appender pausing `pause` between appends.
    fn start_appending_paced(&self, seed: u64, pause: Duration) {
        let mut appenders = self.appenders.lock().unwrap();
        for task in 0..TASKS {
            let events = Arc::clone(&self.events);
            let history = Arc::clone(&self.history);
            let appending = Arc::clone(&self.appending);
            let appends = Arc::clone(&self.appends);
            appenders.push(tokio::spawn(async move {
                let mut random = seed ^ (task + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let mut count = 0;
                while appending.load(Ordering::Relaxed) {
                    random = random
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    let account = ((random >> 33) % (ACCOUNTS / TASKS)) * TASKS + task;
                    let subject = account.to_string();
                    let amount = i64::try_from(1 + (random >> 17) % 500).unwrap();
                    let (kind, balance) = {
                        let mut history = history.lock().unwrap();
                        let balances = history.get_mut(&subject).unwrap();
                        let balance = *balances.last().unwrap();
                        let (kind, after) = if random.is_multiple_of(3) && balance >= amount {
                            ("account.withdrawn", balance - amount)
                        } else {
                            ("account.deposited", balance + amount)
                        };
                        balances.push(after);
                        (kind, after)
                    };
                    append(
                        &events,
                        &subject,
                        kind,
                        &serde_json::json!({"amount": amount, "balance": balance}),
                    )
                    .await;
                    count += 1;
                    appends.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(pause).await;
                }
                count
            }));
        }
    }

    async fn stop_appending(&self) -> u64 {
        self.appending.store(false, Ordering::Relaxed);
        let appenders = std::mem::take(&mut *self.appenders.lock().unwrap());
        let mut total = 0;
        for appender in appenders {
            total += appender.await.unwrap();
        }
        total
    }

    /// Waits until `more` appends were made from now on.
    async fn wait_appends(&self, more: u64) {
        let target = self.appends.load(Ordering::Relaxed) + more;
        poll("appends to go on", || async {
            self.appends.load(Ordering::Relaxed) >= target
        })
        .await;
    }

    fn client(&self) -> FeedClient {
        FeedClient::new(&self.url, Some(TOKEN.to_owned())).unwrap()
    }

    /// Every account's balances as decided so far.
    fn history(&self) -> BTreeMap<String, Vec<i64>> {
        self.history.lock().unwrap().clone()
    }

    /// The reads of `feed` by the consumer's token, as the producer's `GET /feeds` shows them.
    async fn reads(&self, feed: &FeedId) -> u64 {
        let listing = self.client().feeds().await.unwrap();
        listing
            .iter()
            .find(|f| f.feed == *feed)
            .and_then(|f| f.readers.iter().find(|r| r.reader == READER))
            .map_or(0, |r| r.reads)
    }
}

async fn append(events: &MemoryStore, account: &str, kind: &str, data: &serde_json::Value) {
    let stream = StreamName::new(format!("acct-{account}")).unwrap();
    events
        .append(
            &stream,
            ExpectedVersion::Any,
            vec![NewEvent::new(
                EventId::new_random(),
                EventType::new(kind).unwrap(),
                data.to_string().into_bytes(),
            )],
        )
        .await
        .unwrap();
}

/// Polls `done` every few milliseconds until it holds; fails after [`PROMPT`].
async fn poll<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PROMPT;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The consumer's view: one SQLite file with each version's own table, written by one handler
// that looks at the event's feed; cursors, feed positions and the active mark beside them.

const TABLES: &str = "
CREATE TABLE IF NOT EXISTS balances_v1 (
    account TEXT PRIMARY KEY, balance INTEGER NOT NULL, sequence INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS balances_v2 (
    account TEXT PRIMARY KEY, owner TEXT NOT NULL, balance INTEGER NOT NULL,
    sequence INTEGER NOT NULL);";

fn open_view(path: &Path) -> Arc<EmbeddedView> {
    open_view_refusing(path, Arc::new(AtomicBool::new(false)))
}

/// The view, whose handler refuses every event of v2 while `refuse_v2` is set.
fn open_view_refusing(path: &Path, refuse_v2: Arc<AtomicBool>) -> Arc<EmbeddedView> {
    Arc::new(
        EmbeddedView::open(
            path,
            |tx| tx.execute_batch(TABLES),
            move |tx, event: &IntegrationEvent| {
                #[derive(serde::Deserialize)]
                struct Data {
                    #[serde(default)]
                    amount: i64,
                    #[serde(default)]
                    change: i64,
                    #[serde(default)]
                    balance: i64,
                    #[serde(default)]
                    owner: String,
                }
                if refuse_v2.load(Ordering::SeqCst) && event.feed.version.get() == 2 {
                    return Err("v2 refused on purpose".into());
                }
                let data: Data = event.data_as()?;
                let account = event.subject.as_str();
                let sequence = i64::try_from(event.sequence.get())?;
                let changed = match (event.feed.version.get(), event.event_type.as_str()) {
                    (1, "accounts.deposited" | "accounts.withdrawn") => {
                        let delta = if event.event_type == "accounts.withdrawn" {
                            -data.amount
                        } else {
                            data.amount
                        };
                        tx.execute(
                            "INSERT INTO balances_v1 (account, balance, sequence) VALUES (?1, ?2, ?3)
                             ON CONFLICT (account) DO UPDATE
                             SET balance = balance + excluded.balance, sequence = excluded.sequence",
                            rusqlite::params![account, delta, sequence],
                        )?
                    }
                    (2, "accounts.opened") => tx.execute(
                        "INSERT INTO balances_v2 (account, owner, balance, sequence)
                         VALUES (?1, ?2, 0, ?3)",
                        rusqlite::params![account, data.owner, sequence],
                    )?,
                    // The state model carries the balance: it must follow from the change.
                    (2, "accounts.changed") => tx.execute(
                        "UPDATE balances_v2 SET balance = ?2, sequence = ?3
                         WHERE account = ?1 AND balance + ?4 = ?2",
                        rusqlite::params![account, data.balance, sequence, data.change],
                    )?,
                    _ => 0,
                };
                if changed != 1 {
                    return Err(format!("{} {} does not fit the view", event.feed, event.event_type).into());
                }
                Ok(())
            },
        )
        .unwrap(),
    )
}

/// One read of a version's table: (account, balance, sequence), by account.
type Rows = Vec<(String, i64, u64)>;

async fn read_view(view: &EmbeddedView, feed: &FeedId) -> Rows {
    let table = format!("balances_v{}", feed.version.get());
    view.read(move |connection| {
        let mut statement = connection.prepare(&format!(
            "SELECT account, balance, sequence FROM {table} ORDER BY account"
        ))?;
        let rows = statement.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)?,
                u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0),
            ))
        })?;
        rows.collect()
    })
    .await
    .unwrap()
}

/// Whether every row of a read of `feed` is a state the producer had: the balance after the
/// row's sequence, in that version's numbering (v2 numbers the opening too).
fn check_rows(
    feed: &FeedId,
    rows: &Rows,
    history: &BTreeMap<String, Vec<i64>>,
) -> Result<(), String> {
    for (account, balance, sequence) in rows {
        let balances = history
            .get(account)
            .ok_or_else(|| format!("{feed}: account {account} does not exist"))?;
        let index = match feed.version.get() {
            1 => usize::try_from(*sequence).unwrap(),
            _ => usize::try_from(*sequence).unwrap() - 1,
        };
        if balances.get(index) != Some(balance) {
            return Err(format!(
                "{feed}: account {account} at #{sequence} holds {balance}, the producer had {:?}",
                balances.get(index)
            ));
        }
    }
    Ok(())
}

/// What the v2 view must hold once every decided event arrived.
fn expected_v2(history: &BTreeMap<String, Vec<i64>>) -> Rows {
    history
        .iter()
        .map(|(account, balances)| {
            (
                account.clone(),
                *balances.last().unwrap(),
                balances.len() as u64,
            )
        })
        .collect()
}

fn options() -> SwitchOptions {
    SwitchOptions::default()
        .with_consumer(
            ConsumerOptions::default()
                .with_backoff(Duration::from_millis(5), Duration::from_millis(50))
                .with_page_events(50),
        )
        .with_feed_wait(Duration::from_millis(200))
        .with_poll_interval(Duration::from_millis(20))
}

type Versioned = VersionedConsumer<EmbeddedView, FeedClient>;

async fn open_consumer(
    producer: &Producer,
    view: &Arc<EmbeddedView>,
    target: FeedId,
) -> Arc<Versioned> {
    Arc::new(
        VersionedConsumer::open(
            CONSUMER,
            target,
            Arc::clone(view),
            Arc::new(producer.client()),
            options(),
        )
        .await
        .unwrap(),
    )
}

/// A consumer's `run` on a task, stopped by `stop`.
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), SwitchError>>,
}

fn run<V: ViewStore>(consumer: &Arc<VersionedConsumer<V, FeedClient>>) -> Running {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer = Arc::clone(consumer);
    let task = tokio::spawn(async move {
        consumer
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    Running { stop, task }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }

    /// A crash: the run is dropped wherever it is, with its transports.
    async fn crash(self) {
        self.task.abort();
        assert!(self.task.await.unwrap_err().is_cancelled());
    }
}

/// A reader polling the active version throughout: every read through one `ActiveFeed`
/// snapshot, checked to be a state the producer had, entirely of one version; versions only go
/// from v1 to v2; a read of v2 holds every account at least as far as the producer was when the
/// move was asked for (`floor`).
fn spawn_reader(
    active: ActiveFeed<EmbeddedView, FeedClient>,
    view: Arc<EmbeddedView>,
    history: History,
    floor: BTreeMap<String, u64>,
    reading: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<BTreeMap<u32, Vec<u64>>> {
    tokio::spawn(async move {
        // By version: the sum of the sequences of each read (how far the view was).
        let mut reads: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        while reading.load(Ordering::Relaxed) {
            let consumer = active.consumer();
            let feed = consumer.feed().clone();
            let rows = read_view(&view, &feed).await;
            let history = history.lock().unwrap().clone();
            if let Err(torn) = check_rows(&feed, &rows, &history) {
                panic!("a reader saw a state the producer never had: {torn}");
            }
            let version = feed.version.get();
            assert!(
                reads.keys().all(|&v| v <= version),
                "a reader went back from a later version to {feed}"
            );
            if version == 2 {
                for (account, at_least) in &floor {
                    let row = rows.iter().find(|(a, _, _)| a == account);
                    assert!(
                        row.is_some_and(|(_, _, sequence)| sequence >= at_least),
                        "a reader of v2 saw account {account} at {row:?}, before #{at_least}: v2 was \
                         made active before it was built"
                    );
                }
            }
            reads
                .entry(version)
                .or_default()
                .push(rows.iter().map(|(_, _, s)| s).sum());
            tokio::task::yield_now().await;
        }
        reads
    })
}

/// How far each account's v2 stream surely is now (its entries but the one that may be in
/// flight), in v2 sequences.
fn v2_floor(history: &BTreeMap<String, Vec<i64>>) -> BTreeMap<String, u64> {
    history
        .iter()
        .map(|(account, balances)| (account.clone(), balances.len() as u64 - 1))
        .filter(|(_, sequence)| *sequence > 0)
        .collect()
}

/// Waits until the v2 view equals the producer's v2 model (after the appends stopped), and
/// checks it against the producer's own listing of v2 too.
async fn assert_v2_converges(producer: &Producer, view: &Arc<EmbeddedView>) {
    let expected = expected_v2(&producer.history());
    poll("the v2 view to equal the producer's", || async {
        read_view(view, &v2()).await == expected
    })
    .await;
    let listed: Vec<SubjectHead> = producer
        .client()
        .subjects(&v2(), None, 1_000)
        .await
        .unwrap();
    assert_eq!(listed.len(), expected.len());
    for (head, (account, _, sequence)) in listed.iter().zip(&expected) {
        assert_eq!(
            (head.subject.as_str(), head.sequence.get()),
            (account.as_str(), *sequence)
        );
    }
}

// ---------------------------------------------------------------------------------------------

/// The whole move, live: v1 consumed, v2 added to the producer and backfilled while appends go
/// on, the consumer asked to move; readers poll throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_moves_from_v1_to_v2_while_appends_go_on_and_readers_never_see_a_mix() {
    let producer = Producer::start(&[1]).await;
    producer.start_appending(7);
    let directory = tempfile::tempdir().unwrap();
    let view = open_view(&directory.path().join("view.sqlite"));

    let consumer = open_consumer(&producer, &view, v1()).await;
    assert_eq!(consumer.active().feed(), v1());
    let running = run(&consumer);
    poll("the v1 view to fill", || async {
        read_view(&view, &v1()).await.len() as u64 >= ACCOUNTS / 2
    })
    .await;

    // The producer adds v2 (backfilled while appends go on).
    producer.project(&[1, 2]).await;

    // Readers poll the active version from now on.
    let reading = Arc::new(AtomicBool::new(true));
    let floor = v2_floor(&producer.history());
    producer.wait_projected(2).await;
    let reader = spawn_reader(
        consumer.active(),
        Arc::clone(&view),
        Arc::clone(&producer.history),
        floor,
        Arc::clone(&reading),
    );
    producer.wait_appends(20).await;

    // The move.
    let mut phases = consumer.watch_status();
    let watching = tokio::spawn(async move {
        let mut seen = vec![phases.borrow_and_update().phase];
        while phases.changed().await.is_ok() {
            let phase = phases.borrow_and_update().phase;
            if seen.last() != Some(&phase) {
                seen.push(phase);
            }
            if phase == SwitchPhase::Following && seen.len() > 2 {
                break;
            }
        }
        seen
    });
    let started = Instant::now();
    consumer.switch_to(v2());
    let mut active = consumer.active();
    tokio::time::timeout(PROMPT, active.wait_for(&v2()))
        .await
        .expect("the consumer did not switch");
    let took = started.elapsed();
    // The phases seen (a watch may skip some) come in the move's order.
    let phases = tokio::time::timeout(PROMPT, watching)
        .await
        .unwrap()
        .unwrap();
    let order = [
        SwitchPhase::Following,
        SwitchPhase::WaitingForLive,
        SwitchPhase::Walking,
        SwitchPhase::CatchingUp,
        SwitchPhase::Following,
    ];
    let mut at = 0;
    for phase in &phases {
        at += order[at..]
            .iter()
            .position(|p| p == phase)
            .unwrap_or_else(|| panic!("phases out of order: {phases:?}"));
    }
    assert_eq!(phases.last(), Some(&SwitchPhase::Following), "{phases:?}");
    let status = consumer.status();
    assert_eq!(
        (
            status.active.as_str(),
            status.target.as_str(),
            status.switches
        ),
        ("accounts.v2", "accounts.v2", 1)
    );
    assert_eq!(status.walked_subjects, ACCOUNTS);
    assert!(status.walk_applied > 0, "{status:?}");
    assert_eq!(
        view.mark(&format!("active/{CONSUMER}"))
            .await
            .unwrap()
            .as_deref(),
        Some("accounts.v2")
    );

    // Appends go on a while after the flip, then stop; v2 equals the producer's model.
    producer.wait_appends(50).await;
    let appended = producer.stop_appending().await;
    assert_v2_converges(&producer, &view).await;
    reading.store(false, Ordering::Relaxed);
    let reads = reader.await.unwrap();
    let v1_reads = &reads[&1];
    let v2_reads = &reads[&2];
    assert!(
        v1_reads.first() < v1_reads.last(),
        "the v1 view did not move while readers read it"
    );
    assert!(!v2_reads.is_empty());
    eprintln!(
        "switch: {appended} appends, the move took {took:?}; {} reads of v1, {} of v2; {status:?}",
        v1_reads.len(),
        v2_reads.len()
    );

    // The producer sees the consumer's token on v2, and its reads of v1 stop.
    poll(
        "the producer to list the consumer as a reader of v2",
        || async { producer.reads(&v2()).await > 0 },
    )
    .await;
    let v2_changes = |n: usize| {
        let producer = &producer;
        async move {
            for _ in 0..n {
                let before = producer.reads(&v2()).await;
                poll("the consumer's reads of v2 to be recorded", || async {
                    producer.reads(&v2()).await > before
                })
                .await;
            }
        }
    };
    // Two recorded flushes after the old transport stopped: its last reads are in.
    v2_changes(2).await;
    let v1_after = producer.reads(&v1()).await;
    assert!(v1_after > 0);
    v2_changes(3).await;
    assert_eq!(
        producer.reads(&v1()).await,
        v1_after,
        "the consumer still reads v1 after the switch"
    );
    running.stop().await;
}

/// Makes `read_subject` of one feed hang after `allowed` calls: a walk frozen half way.
struct Freezing {
    inner: FeedClient,
    feed: FeedId,
    allowed: AtomicU64,
    frozen: tokio::sync::Notify,
}

#[async_trait]
impl Upstream for Freezing {
    async fn read_subject(
        &self,
        feed: &FeedId,
        subject: &Subject,
        after: Sequence,
        limit: u64,
    ) -> Result<Vec<IntegrationEvent>, UpstreamError> {
        if *feed == self.feed
            && self
                .allowed
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
        {
            self.frozen.notify_one();
            std::future::pending::<()>().await;
        }
        self.inner.read_subject(feed, subject, after, limit).await
    }

    async fn subjects(
        &self,
        feed: &FeedId,
        after: Option<&Subject>,
        limit: u64,
    ) -> Result<Vec<SubjectHead>, UpstreamError> {
        self.inner.subjects(feed, after, limit).await
    }

    async fn read_feed(
        &self,
        feed: &FeedId,
        after: u64,
        limit: u64,
        wait: Duration,
    ) -> Result<Vec<IntegrationEvent>, UpstreamError> {
        self.inner.read_feed(feed, after, limit, wait).await
    }

    async fn feed_listing(
        &self,
        feed: &FeedId,
    ) -> Result<Option<headwater_consume::FeedListing>, UpstreamError> {
        self.inner.feed_listing(feed).await
    }
}

/// A crash half way through the build of v2 (everything dropped, the view reopened from its
/// file): v1 is still active and serving, the part of v2 built is kept, the move resumes and
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_flip_keeps_v1_active_and_the_build_resumes() {
    let producer = Producer::start(&[1, 2]).await;
    producer.start_appending(11);
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("view.sqlite");

    // Consuming v1.
    let view = open_view(&path);
    let consumer = open_consumer(&producer, &view, v1()).await;
    let running = run(&consumer);
    poll("the v1 view to fill", || async {
        read_view(&view, &v1()).await.len() as u64 >= ACCOUNTS / 2
    })
    .await;
    running.stop().await;
    drop((consumer, view));

    // Restarted to move to v2; the walk freezes after three subjects; then the crash.
    let view = open_view(&path);
    let freezing = Arc::new(Freezing {
        inner: producer.client(),
        feed: v2(),
        allowed: AtomicU64::new(3),
        frozen: tokio::sync::Notify::new(),
    });
    let consumer = Arc::new(
        VersionedConsumer::open(
            CONSUMER,
            v2(),
            Arc::clone(&view),
            Arc::clone(&freezing),
            options(),
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        consumer.active().feed(),
        v1(),
        "v1 serves while v2 is built"
    );
    let frozen = freezing.frozen.notified();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = {
        let consumer = Arc::clone(&consumer);
        tokio::spawn(async move {
            consumer
                .run(async {
                    let _ = stopped.await;
                })
                .await
        })
    };
    tokio::time::timeout(PROMPT, frozen)
        .await
        .expect("the walk did not reach the frozen read");
    assert_eq!(consumer.status().phase, SwitchPhase::Walking);
    // What was fetched before the freeze is applied (and nothing more will be).
    poll("the first subjects of v2 to be applied", || async {
        !view.cursors(&v2(), None, 1).await.unwrap().is_empty()
    })
    .await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    drop((stop, consumer, freezing, view));

    // Reopened from the file: v1 active, part of v2 there.
    let view = open_view(&path);
    assert_eq!(
        view.mark(&format!("active/{CONSUMER}"))
            .await
            .unwrap()
            .as_deref(),
        Some("accounts.v1")
    );
    let built = view.cursors(&v2(), None, 1_000).await.unwrap();
    assert!(
        !built.is_empty() && (built.len() as u64) < ACCOUNTS,
        "v2 is not half built: {built:?}"
    );
    assert!(view.feed_position(&v2()).await.unwrap() > 0);
    let consumer = open_consumer(&producer, &view, v2()).await;
    assert_eq!(consumer.active().feed(), v1());
    let mut registry = prometheus_client::registry::Registry::default();
    consumer.register_metrics(&mut registry);
    check_rows(&v1(), &read_view(&view, &v1()).await, &producer.history()).unwrap();
    let mut changes = consumer.active();
    let running = run(&consumer);
    let changed = tokio::time::timeout(PROMPT, changes.changed())
        .await
        .expect("the resumed move did not switch");
    assert_eq!(changed, Some(v2()));
    assert_eq!(consumer.active().feed(), v2());
    let mut metrics = String::new();
    prometheus_client::encoding::text::encode(&mut metrics, &registry).unwrap();
    for line in [
        r#"headwater_consumer_switches_total{consumer="statements"} 1"#,
        r#"headwater_consumer_active_version{consumer="statements"} 2"#,
        r#"headwater_consumer_switch_moving{consumer="statements"} 0"#,
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
    for feed in ["accounts.v1", "accounts.v2"] {
        let applied = format!(r#"headwater_consumer_events_applied_total{{feed="{feed}"}} "#);
        assert!(metrics.contains(&applied), "{applied} not in {metrics}");
    }
    for (subject, sequence) in built {
        assert!(view.cursor(&v2(), &subject).await.unwrap() >= sequence);
    }
    producer.wait_appends(20).await;
    producer.stop_appending().await;
    assert_v2_converges(&producer, &view).await;
    running.stop().await;
}

/// A crash right after the flip: the reopened consumer follows v2 alone; v1 is not read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_flip_follows_v2_alone() {
    let producer = Producer::start(&[1, 2]).await;
    producer.start_appending(13);
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("view.sqlite");

    let view = open_view(&path);
    let consumer = open_consumer(&producer, &view, v1()).await;
    let running = run(&consumer);
    poll("the v1 view to fill", || async {
        read_view(&view, &v1()).await.len() as u64 >= ACCOUNTS / 2
    })
    .await;
    consumer.switch_to(v2());
    tokio::time::timeout(PROMPT, consumer.active().wait_for(&v2()))
        .await
        .expect("the consumer did not switch");
    running.crash().await;
    drop((consumer, view));

    let view = open_view(&path);
    let consumer = open_consumer(&producer, &view, v2()).await;
    assert_eq!(consumer.active().feed(), v2());
    let running = run(&consumer);
    producer.wait_appends(10).await;
    let v1_position = view.feed_position(&v1()).await.unwrap();
    let v1_cursors = view.cursors(&v1(), None, 1_000).await.unwrap();
    producer.wait_appends(50).await;
    producer.stop_appending().await;
    assert_v2_converges(&producer, &view).await;
    assert_eq!(view.feed_position(&v1()).await.unwrap(), v1_position);
    assert_eq!(view.cursors(&v1(), None, 1_000).await.unwrap(), v1_cursors);
    assert_eq!(consumer.status().switches, 0);
    running.stop().await;
}

/// A retired feed: every read is a structured refusal naming the successor; a consumer of it
/// moves to the successor by itself (or, told not to, ends with the refusal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_feed_is_a_structured_refusal_and_the_consumer_moves_to_its_successor() {
    let producer = Producer::start(&[1, 2]).await;
    producer.start_appending(17);
    let directory = tempfile::tempdir().unwrap();
    let view = open_view(&directory.path().join("view.sqlite"));
    let consumer = open_consumer(&producer, &view, v1()).await;
    let running = run(&consumer);
    poll("the v1 view to fill", || async {
        read_view(&view, &v1()).await.len() as u64 >= ACCOUNTS / 2
    })
    .await;

    producer
        .feeds
        .set_status(&v1(), FeedStatus::Retired)
        .await
        .unwrap();
    let client = producer.client();
    for error in [
        client
            .read_feed(&v1(), 0, 10, Duration::ZERO)
            .await
            .unwrap_err(),
        client.subjects(&v1(), None, 10).await.unwrap_err(),
        client
            .read_subject(&v1(), &Subject::new("1").unwrap(), Sequence(0), 10)
            .await
            .unwrap_err(),
    ] {
        let refusal = error.refusal().expect("a refusal").clone();
        assert_eq!(refusal.status, Some(410), "{refusal:?}");
        assert!(refusal.is_retired(), "{refusal:?}");
        assert_eq!(
            refusal.problem_type.as_deref(),
            Some("https://headwater.dev/problems/feed-retired")
        );
        assert_eq!(refusal.successor, Some(v2()));
        assert_eq!(error.successor(), Some(&v2()));
        assert!(refusal.message.contains("410"), "{refusal:?}");
        assert!(!error.is_transient());
    }
    // Other refusals carry their status and no successor.
    let unknown = client
        .read_feed(&feed("loans.v1"), 0, 10, Duration::ZERO)
        .await
        .unwrap_err();
    let refusal = unknown.refusal().unwrap();
    assert_eq!(
        (
            refusal.status,
            refusal.is_retired(),
            refusal.successor.as_ref()
        ),
        (Some(404), false, None)
    );
    let wrong = FeedClient::new(&producer.url, Some("not-the-token".to_owned())).unwrap();
    let refusal = wrong.subjects(&v2(), None, 1).await.unwrap_err();
    assert_eq!(refusal.refusal().unwrap().status, Some(401));

    // The running consumer moves to the successor by itself.
    tokio::time::timeout(PROMPT, consumer.active().wait_for(&v2()))
        .await
        .expect("the consumer of a retired feed did not move to its successor");
    assert_eq!(consumer.target(), v2());
    producer.wait_appends(20).await;

    // Told not to follow successors, a consumer of the retired feed ends with the refusal.
    let other = tempfile::tempdir().unwrap();
    let other_view = open_view(&other.path().join("view.sqlite"));
    let stubborn = VersionedConsumer::open(
        "stubborn",
        v1(),
        other_view,
        Arc::new(producer.client()),
        options().with_follow_successor(false),
    )
    .await
    .unwrap();
    let error = tokio::time::timeout(PROMPT, stubborn.run(std::future::pending()))
        .await
        .expect("a consumer of a retired feed did not stop")
        .unwrap_err();
    assert_eq!(error.successor(), Some(&v2()), "{error}");
    assert!(matches!(
        error,
        SwitchError::Consume(ConsumeError::Upstream(UpstreamError::Refused(_)))
    ));

    producer.stop_appending().await;
    assert_v2_converges(&producer, &view).await;
    running.stop().await;
}

/// A move that cannot complete (the view refuses v2's events for a while) never takes v1 down:
/// v1 keeps serving and moving, the status says why, and the move completes once v2 can be
/// built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_that_cannot_complete_keeps_v1_serving_and_tries_again() {
    let producer = Producer::start(&[1, 2]).await;
    producer.start_appending(19);
    let directory = tempfile::tempdir().unwrap();
    let refuse = Arc::new(AtomicBool::new(true));
    let view = open_view_refusing(&directory.path().join("view.sqlite"), Arc::clone(&refuse));
    let consumer = Arc::new(
        VersionedConsumer::open(
            CONSUMER,
            v1(),
            Arc::clone(&view),
            Arc::new(producer.client()),
            options().with_retry_interval(Duration::from_millis(50)),
        )
        .await
        .unwrap(),
    );
    let running = run(&consumer);
    poll("the v1 view to fill", || async {
        read_view(&view, &v1()).await.len() as u64 >= ACCOUNTS / 2
    })
    .await;

    consumer.switch_to(v2());
    poll("the move to fail", || async {
        consumer
            .status()
            .last_error
            .is_some_and(|e| e.contains("v2 refused on purpose"))
    })
    .await;
    let sum = |rows: Rows| rows.iter().map(|(_, _, s)| s).sum::<u64>();
    let before = sum(read_view(&view, &v1()).await);
    poll("v1 to keep moving while the move fails", || async {
        sum(read_view(&view, &v1()).await) > before
    })
    .await;
    assert_eq!(consumer.active().feed(), v1());
    assert!(!running.task.is_finished());
    check_rows(&v1(), &read_view(&view, &v1()).await, &producer.history()).unwrap();

    refuse.store(false, Ordering::SeqCst);
    tokio::time::timeout(PROMPT, consumer.active().wait_for(&v2()))
        .await
        .expect("the move did not complete once v2 could be built");
    assert_eq!(consumer.status().last_error, None);
    producer.wait_appends(20).await;
    producer.stop_appending().await;
    assert_v2_converges(&producer, &view).await;
    running.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Opening, without a producer.

fn memory_view() -> Arc<MemoryView<()>> {
    Arc::new(MemoryView::new((), |_: &mut (), _: &IntegrationEvent| {
        Ok(())
    }))
}

/// The active version at open: the mark when there is one; else a lower version the view holds
/// (a view made before the switch); else the one asked for. Bad names and marks are refused.
#[tokio::test]
async fn the_active_version_at_open_comes_from_the_mark_or_the_view() {
    let upstream = Arc::new(MemoryUpstream::new());
    let open = |view: Arc<MemoryView<()>>, name: &'static str, target: FeedId| {
        let upstream = Arc::clone(&upstream);
        async move {
            VersionedConsumer::open(name, target, view, upstream, SwitchOptions::default()).await
        }
    };

    // An empty view: the version asked for, written down.
    let view = memory_view();
    let consumer = open(Arc::clone(&view), "a", v2()).await.unwrap();
    assert_eq!(consumer.active().feed(), v2());
    assert_eq!(
        view.mark("active/a").await.unwrap().as_deref(),
        Some("accounts.v2")
    );
    assert_eq!(consumer.status().phase, SwitchPhase::Idle);

    // A view holding v1 without a mark: v1 stays active until the move to v3 is done.
    let view = memory_view();
    let event = IntegrationEvent::from_cloud_event(
        br#"{"specversion":"1.0","id":"e7b23afc-d543-584c-acf0-5990b9e4e014","source":"accounts",
        "type":"accounts.deposited","subject":"42","time":"2026-11-27T14:06:59.123456Z",
        "datacontenttype":"application/json","data":{"amount":1},"sequence":1,"position":1,
        "feed":"accounts.v1"}"#,
    )
    .unwrap();
    view.apply(&v1(), &event.subject, std::slice::from_ref(&event))
        .await
        .unwrap();
    let consumer = open(Arc::clone(&view), "b", feed("accounts.v3"))
        .await
        .unwrap();
    assert_eq!(consumer.active().feed(), v1());
    assert_eq!(consumer.target(), feed("accounts.v3"));
    assert_eq!(
        view.mark("active/b").await.unwrap().as_deref(),
        Some("accounts.v1")
    );
    // Once marked, the mark decides.
    view.set_mark("active/b", Some("accounts.v3"))
        .await
        .unwrap();
    let consumer = open(Arc::clone(&view), "b", feed("accounts.v3"))
        .await
        .unwrap();
    assert_eq!(consumer.active().feed(), feed("accounts.v3"));

    view.set_mark("active/c", Some("not a feed")).await.unwrap();
    assert!(matches!(
        open(Arc::clone(&view), "c", v2()).await,
        Err(SwitchError::Mark { .. })
    ));
    for name in ["", "a/b", "tab\t"] {
        let view = memory_view();
        let result = VersionedConsumer::open(
            name,
            v2(),
            view,
            Arc::clone(&upstream),
            SwitchOptions::default(),
        )
        .await;
        assert!(matches!(result, Err(SwitchError::Name)), "{name:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The same move on a PostgreSQL view (`HEADWATER_TEST_POSTGRES_URL`; fails without it): both
// versions' tables, cursors and the mark in one schema.

/// The bank view's handler on PostgreSQL: as `open_view`'s.
struct PgBank;

#[async_trait]
impl headwater_consume::PgHandler for PgBank {
    async fn apply(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        event: &IntegrationEvent,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        #[derive(serde::Deserialize)]
        struct Data {
            #[serde(default)]
            amount: i64,
            #[serde(default)]
            change: i64,
            #[serde(default)]
            balance: i64,
            #[serde(default)]
            owner: String,
        }
        let data: Data = event.data_as()?;
        let account = event.subject.as_str();
        let sequence = i64::try_from(event.sequence.get())?;
        let changed = match (event.feed.version.get(), event.event_type.as_str()) {
            (1, kind @ ("accounts.deposited" | "accounts.withdrawn")) => {
                let delta = if kind == "accounts.withdrawn" {
                    -data.amount
                } else {
                    data.amount
                };
                tx.execute(
                    "INSERT INTO balances_v1 (account, balance, sequence) VALUES ($1, $2, $3)
                     ON CONFLICT (account) DO UPDATE
                     SET balance = balances_v1.balance + excluded.balance,
                         sequence = excluded.sequence",
                    &[&account, &delta, &sequence],
                )
                .await?
            }
            (2, "accounts.opened") => {
                tx.execute(
                    "INSERT INTO balances_v2 (account, owner, balance, sequence)
                     VALUES ($1, $2, 0, $3)",
                    &[&account, &data.owner, &sequence],
                )
                .await?
            }
            (2, "accounts.changed") => {
                tx.execute(
                    "UPDATE balances_v2 SET balance = $2, sequence = $3
                     WHERE account = $1 AND balance + $4 = $2",
                    &[&account, &data.balance, &sequence, &data.change],
                )
                .await?
            }
            _ => 0,
        };
        if changed != 1 {
            return Err(
                format!("{} {} does not fit the view", event.feed, event.event_type).into(),
            );
        }
        Ok(())
    }
}

/// Each appender's pause between appends in the PostgreSQL test.
const PG_APPEND_PAUSE: Duration = Duration::from_millis(25);

const PG_TABLES: &str = "
CREATE TABLE IF NOT EXISTS balances_v1 (
    account TEXT COLLATE \"C\" PRIMARY KEY, balance BIGINT NOT NULL, sequence BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS balances_v2 (
    account TEXT COLLATE \"C\" PRIMARY KEY, owner TEXT NOT NULL, balance BIGINT NOT NULL,
    sequence BIGINT NOT NULL);";

async fn read_pg(view: &headwater_consume::PgView<PgBank>, feed: &FeedId) -> Rows {
    let guard = view.client().await.unwrap();
    let client = guard.as_ref().unwrap();
    client
        .query(
            &format!(
                "SELECT account, balance, sequence FROM balances_v{} ORDER BY account",
                feed.version.get()
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                r.get::<_, i64>(1),
                u64::try_from(r.get::<_, i64>(2)).unwrap(),
            )
        })
        .collect()
}

/// The move on a PostgreSQL view, and a crash right after the flip: the reconnected view names
/// v2 active and converges to the producer's model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_move_on_a_postgres_view() {
    /// Drops the test's schema at the end, also when it fails.
    struct Schema(String, String);
    impl Drop for Schema {
        fn drop(&mut self) {
            headwater_testkit::postgres::drop_schema(&self.0, &self.1);
        }
    }
    let schema = Schema(
        headwater_testkit::postgres::url(),
        headwater_testkit::postgres::fresh_schema(),
    );
    let connect = || async {
        Arc::new(
            headwater_consume::PgView::connect(&schema.0, &schema.1, PG_TABLES, PgBank)
                .await
                .unwrap(),
        )
    };
    let producer = Producer::start(&[1, 2]).await;
    // Slower: a PostgreSQL view applies a few hundred events per second in a debug build, and
    // a consumer that cannot keep up with the producer never catches up to move.
    producer.start_appending_paced(23, PG_APPEND_PAUSE);
    let view = connect().await;
    let consumer = Arc::new(
        VersionedConsumer::open(
            CONSUMER,
            v1(),
            Arc::clone(&view),
            Arc::new(producer.client()),
            options(),
        )
        .await
        .unwrap(),
    );
    let running = run(&consumer);
    poll("the v1 view to fill", || async {
        read_pg(&view, &v1()).await.len() as u64 >= ACCOUNTS / 2
    })
    .await;
    consumer.switch_to(v2());
    tokio::time::timeout(PROMPT, consumer.active().wait_for(&v2()))
        .await
        .expect("the consumer did not switch");
    check_rows(&v2(), &read_pg(&view, &v2()).await, &producer.history()).unwrap();
    running.crash().await;
    drop((consumer, view));

    let view = connect().await;
    assert_eq!(
        view.mark(&format!("active/{CONSUMER}"))
            .await
            .unwrap()
            .as_deref(),
        Some("accounts.v2")
    );
    let consumer = Arc::new(
        VersionedConsumer::open(
            CONSUMER,
            v2(),
            Arc::clone(&view),
            Arc::new(producer.client()),
            options(),
        )
        .await
        .unwrap(),
    );
    assert_eq!(consumer.active().feed(), v2());
    let running = run(&consumer);
    producer.wait_appends(20).await;
    producer.stop_appending().await;
    let expected = expected_v2(&producer.history());
    poll("the v2 view to equal the producer's", || async {
        read_pg(&view, &v2()).await == expected
    })
    .await;
    running.stop().await;
    drop((consumer, view));
}
