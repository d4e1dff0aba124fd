//! `kill -9` of an appending process mid-transaction: a child process (this test binary
//! re-executed) appends concurrently, with every commit held open for a moment by a commit hook,
//! and says what it sent and what was acknowledged on stdout. The parent watches
//! `pg_stat_activity` until the child's writer is inside a transaction that has written, kills
//! the child with SIGKILL right then, waits for PostgreSQL to end the session, and checks that
//! every acknowledged append is there, whole, where it was acknowledged; that nothing else is
//! (every event belongs to a sent append, whole, at most once); and that the log is gap-free.
//! The next child first retries the appends the last one left unanswered (G3 across a crash).
//!
//! `HEADWATER_PG_CRASH_SEED=<u64>` replays a run's random choices; the seed is printed first.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use headwater_core::{EventId, EventType, ExpectedVersion, NewEvent, StreamName, StreamVersion};
use headwater_postgres::{CommitHook, Options, PostgresStore};
use headwater_store::conformance::assert_store_invariants;
use headwater_store::{AppendError, AppendOutcome, EventStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::support::Fresh;
use headwater_testkit::process::{ChildProcess, say};

/// How often the parent polls `pg_stat_activity` for the end of the child's sessions, in
/// milliseconds.
const POLL_MILLIS: u64 = 5;

/// Set in the child: the server's URL. Marks the process as a child.
const CHILD_URL_ENV: &str = "HEADWATER_PG_CRASH_CHILD_URL";
const CHILD_SCHEMA_ENV: &str = "HEADWATER_PG_CRASH_CHILD_SCHEMA";
const CHILD_SEED_ENV: &str = "HEADWATER_PG_CRASH_CHILD_SEED";
/// Set in the child: the appends to retry first, one per line.
const CHILD_RETRY_ENV: &str = "HEADWATER_PG_CRASH_RETRY";
/// Set by whoever runs the tests: the seed to replay.
const SEED_ENV: &str = "HEADWATER_PG_CRASH_SEED";

/// Kill cycles.
const CYCLES: usize = 8;
/// Concurrent appenders in the child.
const APPENDERS: u64 = 8;
/// Streams every appender writes to besides its own.
const SHARED_STREAMS: u64 = 3;
/// How long the child's commit hook holds each commit open, in microseconds.
const HOLD_MICROS: std::ops::Range<u64> = 0..3_000;
/// The parent lets the child run at least this long before it looks for an open transaction to
/// kill it in, in milliseconds (so that some appends are acknowledged first).
const RUN_BEFORE_KILL_MILLIS: std::ops::Range<u64> = 30..300;
/// The child stops by itself after this long (it is always killed well before), in seconds.
const CHILD_LIFETIME_SECS: u64 = 60;
/// How long the parent waits for the child to start, or for a state it polls for, in seconds.
const WAIT_SECS: u64 = 60;

/// The `i`-th of `n` events of the append whose first event id is `first`.
fn append_event(first: EventId, i: usize, n: usize) -> NewEvent {
    let id = if i == 0 {
        first
    } else {
        EventId::derived(first.as_uuid(), &(i as u64).to_le_bytes())
    };
    NewEvent::new(
        id,
        EventType::new("crash.tested").unwrap(),
        format!("append {first} {i} of {n}").into_bytes(),
    )
}

fn append_events(first: EventId, n: usize) -> Vec<NewEvent> {
    (0..n).map(|i| append_event(first, i, n)).collect()
}

/// (first id, i, n) of an event of [`append_event`].
fn parse_marker(data: &[u8]) -> Option<(EventId, usize, usize)> {
    let text = std::str::from_utf8(data).ok()?;
    let words: Vec<&str> = text.split(' ').collect();
    let ["append", first, i, "of", n] = words.as_slice() else {
        return None;
    };
    Some((EventId::parse(first)?, i.parse().ok()?, n.parse().ok()?))
}

/// An append a child sent: `SENT <first id> <stream> <expected> <n>`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Intent {
    first: EventId,
    stream: StreamName,
    expected: ExpectedVersion,
    n: usize,
}

impl Intent {
    fn line(&self) -> String {
        let expected = match self.expected {
            ExpectedVersion::Any => "any".to_owned(),
            ExpectedVersion::NoStream => "none".to_owned(),
            ExpectedVersion::StreamExists => "exists".to_owned(),
            ExpectedVersion::Exact(v) => v.0.to_string(),
        };
        format!("{} {} {expected} {}", self.first, self.stream, self.n)
    }

    fn parse(text: &str) -> Intent {
        let words: Vec<&str> = text.split(' ').collect();
        let [first, stream, expected, n] = words.as_slice() else {
            panic!("a bad intent {text:?}")
        };
        Intent {
            first: EventId::parse(first).unwrap(),
            stream: StreamName::new(*stream).unwrap(),
            expected: match *expected {
                "any" => ExpectedVersion::Any,
                "none" => ExpectedVersion::NoStream,
                "exists" => ExpectedVersion::StreamExists,
                v => ExpectedVersion::Exact(StreamVersion(v.parse().unwrap())),
            },
            n: n.parse().unwrap(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The child.

fn hold_hook(seed: u64) -> CommitHook {
    let rng = std::sync::Arc::new(std::sync::Mutex::new(StdRng::seed_from_u64(seed)));
    std::sync::Arc::new(move |_| {
        let hold = Duration::from_micros(rng.lock().unwrap().random_range(HOLD_MICROS));
        Box::pin(async move {
            tokio::time::sleep(hold).await;
            Ok(())
        })
    })
}

/// The child: connects, retries the appends it was given, and appends until it is killed. Does
/// nothing in a normal test run.
#[test]
fn child_appender() {
    let Ok(url) = std::env::var(CHILD_URL_ENV) else {
        return;
    };
    let schema = std::env::var(CHILD_SCHEMA_ENV).unwrap();
    let seed: u64 = std::env::var(CHILD_SEED_ENV).unwrap().parse().unwrap();
    let retries: Vec<Intent> = std::env::var(CHILD_RETRY_ENV)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .map(Intent::parse)
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let mut options = Options::with_schema(schema);
        options.before_commit = Some(hold_hook(seed));
        let store = PostgresStore::connect(&url, options).await.unwrap();
        for intent in &retries {
            send(&store, intent).await;
        }
        say("READY");
        let stop = Instant::now() + Duration::from_secs(CHILD_LIFETIME_SECS);
        let mut tasks = Vec::new();
        for task in 0..APPENDERS {
            tasks.push(tokio::spawn(appender(store.clone(), seed, task, stop)));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
}

/// Sends one append and says what became of it. Only a conflict may refuse it.
async fn send(store: &PostgresStore, intent: &Intent) -> Option<AppendOutcome> {
    say(&format!("SENT {}", intent.line()));
    let result = store
        .append(
            &intent.stream,
            intent.expected,
            append_events(intent.first, intent.n),
        )
        .await;
    match result {
        Ok(o) => {
            say(&format!(
                "ACK {} {} {} {} {}",
                intent.first,
                o.first_position.0,
                o.last_position.0,
                o.stream_version.0,
                u8::from(o.replayed)
            ));
            Some(o)
        }
        Err(AppendError::Conflict { .. }) => {
            say(&format!("REFUSED {}", intent.first));
            None
        }
        Err(e) => panic!("append {intent:?} failed: {e}"),
    }
}

async fn appender(store: PostgresStore, seed: u64, task: u64, stop: Instant) {
    let mut rng = StdRng::seed_from_u64(seed ^ (task + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let own = StreamName::new(format!("own-{seed:x}-{task}")).unwrap();
    let mut own_head: Option<StreamVersion> = None;
    while Instant::now() < stop {
        let (stream, expected) = if rng.random_bool(0.4) {
            let name = format!("shared-{}", rng.random_range(0..SHARED_STREAMS));
            (StreamName::new(name).unwrap(), ExpectedVersion::Any)
        } else {
            let expected = own_head.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
            (own.clone(), expected)
        };
        let intent = Intent {
            first: EventId::from_bytes(rng.random()),
            stream,
            expected,
            n: rng.random_range(1..=5),
        };
        let Some(outcome) = send(&store, &intent).await else {
            assert_ne!(intent.stream, own, "only this task writes its own stream");
            continue;
        };
        if intent.stream == own {
            own_head = Some(outcome.stream_version);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The parent.

/// An acknowledged append: (first position, last position, version, replayed).
type Ack = (u64, u64, u64, bool);

#[derive(Debug, Default)]
struct Ledger {
    intents: HashMap<EventId, Intent>,
    acks: HashMap<EventId, Ack>,
    refused: HashSet<EventId>,
}

impl Ledger {
    fn hear(&mut self, line: &str) -> Option<(EventId, Ack)> {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "SENT" => {
                let intent = Intent::parse(rest);
                if let Some(known) = self.intents.get(&intent.first) {
                    assert_eq!(known, &intent, "one id, one append");
                }
                self.intents.insert(intent.first, intent);
            }
            "ACK" => {
                let words: Vec<&str> = rest.split(' ').collect();
                let [first, from, to, version, replayed] = words.as_slice() else {
                    panic!("a bad ack {line:?}")
                };
                let first = EventId::parse(first).unwrap();
                assert!(
                    self.intents.contains_key(&first),
                    "an ack of an append never sent"
                );
                let ack = (
                    from.parse().unwrap(),
                    to.parse().unwrap(),
                    version.parse().unwrap(),
                    *replayed == "1",
                );
                return Some((first, ack));
            }
            "REFUSED" => {
                self.refused.insert(EventId::parse(rest).unwrap());
            }
            _ => {}
        }
        None
    }

    fn unanswered(&self) -> String {
        let mut pending: Vec<&Intent> = self
            .intents
            .values()
            .filter(|i| !self.acks.contains_key(&i.first) && !self.refused.contains(&i.first))
            .collect();
        pending.sort_by_key(|i| i.first);
        pending.iter().map(|i| i.line() + "\n").collect()
    }
}

/// The backend pid and whether it is inside a transaction that has written (has an xid), of
/// the child's writer session; `None` when the child has no session.
async fn child_writer(client: &tokio_postgres::Client, app: &str) -> Vec<(i32, bool)> {
    client
        .query(
            "SELECT pid, backend_xid IS NOT NULL FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_transaction_loses_no_acknowledged_append() {
    let seed = std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("{SEED_ENV}={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let fresh = Fresh::new();
    drop(fresh.connect(fresh.options()).await);
    let client = fresh.client().await;
    let app = format!("hw_crash_{}", fresh.schema);
    let child_url = format!(
        "{}{}application_name={app}",
        fresh.url,
        if fresh.url.contains('?') { '&' } else { '?' }
    );
    let mut ledger = Ledger::default();
    let mut mid_transaction_kills = 0;
    let mut acknowledged = 0;
    for cycle in 0..CYCLES {
        let mut child = ChildProcess::spawn(
            "crash::child_appender",
            &[
                (CHILD_URL_ENV, child_url.clone()),
                (CHILD_SCHEMA_ENV, fresh.schema.clone()),
                (CHILD_SEED_ENV, (seed ^ cycle as u64).to_string()),
                (CHILD_RETRY_ENV, ledger.unanswered()),
            ],
        );
        let mut acks = Vec::new();
        let wait = Duration::from_secs(WAIT_SECS);
        child.wait_for("READY", wait, |line| acks.extend(ledger.hear(line)));
        // Not waiting for anything: the kill lands after a random stretch of appending.
        tokio::time::sleep(Duration::from_millis(
            rng.random_range(RUN_BEFORE_KILL_MILLIS),
        ))
        .await;
        let deadline = Instant::now() + wait;
        let mut mid_transaction = false;
        while Instant::now() < deadline {
            if child_writer(&client, &app)
                .await
                .iter()
                .any(|(_, wrote)| *wrote)
            {
                mid_transaction = true;
                break;
            }
        }
        let rest = child.kill();
        mid_transaction_kills += usize::from(mid_transaction);
        for line in &rest {
            acks.extend(ledger.hear(line));
        }
        // PostgreSQL notices the closed sockets and ends the sessions, rolling back.
        let deadline = Instant::now() + wait;
        while !child_writer(&client, &app).await.is_empty() {
            assert!(
                Instant::now() < deadline,
                "the killed child's sessions linger"
            );
            tokio::time::sleep(Duration::from_millis(POLL_MILLIS)).await;
        }

        let store = fresh.connect(fresh.options()).await;
        let log = assert_store_invariants(&store).await;
        // Every event belongs to a sent append, which is whole and recorded once.
        let mut found: HashMap<EventId, Ack> = HashMap::new();
        let mut at = 0;
        while at < log.len() {
            let head = &log[at];
            let (first, i, n) = parse_marker(&head.data)
                .unwrap_or_else(|| panic!("cycle {cycle}: a foreign event {head:?}"));
            assert_eq!(
                (i, head.event_id),
                (0, first),
                "an append starts at its first event"
            );
            let intent = &ledger.intents[&first];
            assert_eq!(
                (&intent.stream, intent.n),
                (&head.stream, n),
                "cycle {cycle}"
            );
            assert!(at + n <= log.len(), "cycle {cycle}: append {first} is cut");
            for (k, event) in log[at..at + n].iter().enumerate() {
                assert!(event.records(&append_event(first, k, n)), "cycle {cycle}");
            }
            let last = &log[at + n - 1];
            let place = (
                head.position.0,
                last.position.0,
                last.stream_version.0,
                false,
            );
            assert!(
                found.insert(first, place).is_none(),
                "{first} recorded twice"
            );
            assert!(
                !ledger.refused.contains(&first),
                "{first} refused but recorded"
            );
            at += n;
        }
        for (first, ack) in acks {
            let place = found.get(&first).unwrap_or_else(|| {
                panic!("cycle {cycle}: LOST: acknowledged append {first} {ack:?} is not stored")
            });
            assert_eq!(
                (place.0, place.1, place.2),
                (ack.0, ack.1, ack.2),
                "cycle {cycle}: {first} is not where it was acknowledged"
            );
            if let Some(earlier) = ledger.acks.insert(first, ack) {
                assert_eq!(
                    (earlier.0, earlier.1),
                    (ack.0, ack.1),
                    "two answers disagree"
                );
            } else {
                acknowledged += 1;
            }
        }
        drop(store);
    }
    println!(
        "{CYCLES} kills, {mid_transaction_kills} inside a writing transaction; \
         {acknowledged} appends acknowledged"
    );
    assert!(
        mid_transaction_kills > 0,
        "some kill landed mid-transaction"
    );
    assert!(acknowledged > 0, "the children appended");
}
