//! `kill -9` with real processes: a child process appends concurrently and acknowledges each
//! append on stdout; the parent kills it at a random moment, reopens the store and checks that
//! every acknowledged append is there exactly once, whole, where it was acknowledged, that nothing
//! half-written is visible, and that `verify` finds nothing. Then the next child goes on with the
//! same store, first retrying the appends the last one left unanswered (G3 across a crash).
//! Every few cycles `inspect` and `verify` also run on the store while the child appends to it.
//!
//! `HEADWATER_CRASH_SEED=<u64>` replays a run's random choices (the kill moments, the workload);
//! the seed is printed first.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use headwater_core::limits::READ_PAGE_EVENTS_MAX;
use headwater_core::{
    EventId, EventType, ExpectedVersion, NewEvent, Position, RecordedEvent, StreamName,
    StreamVersion,
};
use headwater_embedded::{EmbeddedStore, inspect, verify};
use headwater_store::{AppendError, AppendOutcome, EventStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use headwater_testkit::process::{ChildProcess, say};

/// Set in the child: the store directory. Marks the process as a child.
const CHILD_ENV: &str = "HEADWATER_CRASH_CHILD";
/// Set in the child: the seed of its workload.
const CHILD_SEED_ENV: &str = "HEADWATER_CRASH_CHILD_SEED";
/// Set in the child: the appends to retry first, one per line (see [`Intent`]).
const CHILD_RETRY_ENV: &str = "HEADWATER_CRASH_RETRY";
/// Set by whoever runs the tests: the seed of the parent.
const SEED_ENV: &str = "HEADWATER_CRASH_SEED";

/// Kill cycles in the middle of appending.
const CYCLES: usize = 30;
/// Kill cycles during the open (recovery of the previous cycle's WAL), interleaved.
const EARLY_CYCLES: usize = 5;
/// The child is killed this long after it opened the store, in milliseconds.
const KILL_AFTER_MILLIS: std::ops::Range<u64> = 20..300;
/// An early kill comes this long after the child said it is opening, in microseconds.
const EARLY_KILL_AFTER_MICROS: std::ops::Range<u64> = 0..1_500;
/// Concurrent appenders in the child.
const APPENDERS: u64 = 8;
/// Streams every appender writes to (besides its own).
const SHARED_STREAMS: u64 = 3;
/// The child stops by itself after this long (it is always killed well before), in seconds.
const CHILD_LIFETIME_SECS: u64 = 60;
/// `verify` runs after every this many cycles (and after the last): it reads the whole store.
const VERIFY_EVERY_CYCLES: usize = 5;
/// How long the parent waits for the child to start, in seconds.
const START_TIMEOUT_SECS: u64 = 60;

/// The event type of every event appended here.
const EVENT_TYPE: &str = "crash.tested";

/// The `i`-th of `n` events of the append whose first event id is `first`: its id is derived
/// from `first`, its data names the append and its place in it.
fn append_event(first: EventId, i: usize, n: usize) -> NewEvent {
    let id = if i == 0 {
        first
    } else {
        EventId::derived(first.as_uuid(), &(i as u64).to_le_bytes())
    };
    NewEvent::new(
        id,
        EventType::new(EVENT_TYPE).unwrap(),
        format!("append {first} {i} of {n}").into_bytes(),
    )
}

pub(crate) fn append_events(first: EventId, n: usize) -> Vec<NewEvent> {
    (0..n).map(|i| append_event(first, i, n)).collect()
}

/// Parses the data of an event of [`append_event`]: (first id, i, n).
fn parse_marker(data: &[u8]) -> Option<(EventId, usize, usize)> {
    let text = std::str::from_utf8(data).ok()?;
    let mut words = text.split(' ');
    let ("append", Some(first), Some(i), Some("of"), Some(n), None) = (
        words.next()?,
        words.next(),
        words.next(),
        words.next(),
        words.next(),
        words.next(),
    ) else {
        return None;
    };
    Some((EventId::parse(first)?, i.parse().ok()?, n.parse().ok()?))
}

fn expected_text(expected: ExpectedVersion) -> String {
    match expected {
        ExpectedVersion::Any => "any".to_owned(),
        ExpectedVersion::NoStream => "none".to_owned(),
        ExpectedVersion::StreamExists => "exists".to_owned(),
        ExpectedVersion::Exact(v) => v.0.to_string(),
    }
}

fn parse_expected(text: &str) -> ExpectedVersion {
    match text {
        "any" => ExpectedVersion::Any,
        "none" => ExpectedVersion::NoStream,
        "exists" => ExpectedVersion::StreamExists,
        v => ExpectedVersion::Exact(StreamVersion(v.parse().unwrap())),
    }
}

/// An append a child sent: `SENT <first id> <stream> <expected> <n>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Intent {
    pub(crate) first: EventId,
    pub(crate) stream: StreamName,
    pub(crate) expected: ExpectedVersion,
    pub(crate) n: usize,
}

impl Intent {
    fn line(&self) -> String {
        format!(
            "{} {} {} {}",
            self.first,
            self.stream,
            expected_text(self.expected),
            self.n
        )
    }

    fn parse(words: &[&str]) -> Intent {
        let [first, stream, expected, n] = words else {
            panic!("a bad intent {words:?}")
        };
        Intent {
            first: EventId::parse(first).unwrap(),
            stream: StreamName::new(*stream).unwrap(),
            expected: parse_expected(expected),
            n: n.parse().unwrap(),
        }
    }
}

/// An acknowledged append: `ACK <first id> <first position> <last position> <version>
/// <replayed>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ack {
    pub(crate) first: EventId,
    pub(crate) first_position: u64,
    pub(crate) last_position: u64,
    pub(crate) version: u64,
    pub(crate) replayed: bool,
}

fn ack_line(first: EventId, outcome: &AppendOutcome) -> String {
    format!(
        "ACK {first} {} {} {} {}",
        outcome.first_position.0,
        outcome.last_position.0,
        outcome.stream_version.0,
        u8::from(outcome.replayed)
    )
}

/// What a child said, line by line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Said {
    Sent(Intent),
    Ack(Ack),
    Refused(EventId),
    Other(String),
}

pub(crate) fn parse_line(line: &str) -> Said {
    let words: Vec<&str> = line.split(' ').collect();
    match words.as_slice() {
        ["SENT", rest @ ..] => Said::Sent(Intent::parse(rest)),
        ["ACK", first, from, to, version, replayed] => Said::Ack(Ack {
            first: EventId::parse(first).unwrap(),
            first_position: from.parse().unwrap(),
            last_position: to.parse().unwrap(),
            version: version.parse().unwrap(),
            replayed: *replayed == "1",
        }),
        ["REFUSED", first] => Said::Refused(EventId::parse(first).unwrap()),
        _ => Said::Other(line.to_owned()),
    }
}

// ---------------------------------------------------------------------------------------------
// The child.

/// The child: opens the store, retries the appends it was given, and runs [`APPENDERS`]
/// concurrent appenders until it is killed. Does nothing in a normal test run.
#[test]
fn child_appender() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let seed: u64 = std::env::var(CHILD_SEED_ENV).unwrap().parse().unwrap();
    let retries: Vec<Intent> = match std::env::var_os(CHILD_RETRY_ENV) {
        None => Vec::new(),
        Some(path) => std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|line| Intent::parse(&line.split(' ').collect::<Vec<_>>()))
            .collect(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        say("OPENING");
        let store = EmbeddedStore::open(&dir).unwrap();
        say(&format!("READY {}", store.head_position().0));
        let stop = Instant::now() + Duration::from_secs(CHILD_LIFETIME_SECS);
        let mut tasks = Vec::new();
        {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for intent in retries {
                    send(&store, &intent).await;
                }
            }));
        }
        for task in 0..APPENDERS {
            let store = store.clone();
            tasks.push(tokio::spawn(appender(store, seed, task, stop)));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
}

/// Sends one append and says what became of it. Only a conflict may refuse it.
async fn send(store: &EmbeddedStore, intent: &Intent) -> Option<AppendOutcome> {
    say(&format!("SENT {}", intent.line()));
    let result = store
        .append(
            &intent.stream,
            intent.expected,
            append_events(intent.first, intent.n),
        )
        .await;
    match result {
        Ok(outcome) => {
            say(&ack_line(intent.first, &outcome));
            Some(outcome)
        }
        Err(AppendError::Conflict { .. }) => {
            say(&format!("REFUSED {}", intent.first));
            None
        }
        Err(e) => panic!("append {intent:?} failed: {e}"),
    }
}

async fn appender(store: EmbeddedStore, seed: u64, task: u64, stop: Instant) {
    let mut rng = StdRng::seed_from_u64(seed ^ (task + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let own = StreamName::new(format!("own-{seed:x}-{task}")).unwrap();
    let mut own_head: Option<StreamVersion> = None;
    while Instant::now() < stop {
        let (stream, expected) = if rng.random_bool(0.4) {
            let stream =
                StreamName::new(format!("shared-{}", rng.random_range(0..SHARED_STREAMS))).unwrap();
            let expected = if rng.random_bool(0.5) {
                ExpectedVersion::Any
            } else {
                match store.stream_head(&stream).await.unwrap() {
                    None => ExpectedVersion::NoStream,
                    Some(head) => ExpectedVersion::Exact(head),
                }
            };
            (stream, expected)
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
        if rng.random_bool(0.25) {
            // The same append again: the original outcome, nothing written.
            let again = send(&store, &intent).await.expect("a retry is answered");
            assert_eq!(
                again,
                AppendOutcome {
                    replayed: true,
                    ..outcome
                }
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The parent.

/// One append as found in the store.
#[derive(Clone, Debug)]
struct Group {
    first_position: u64,
    last_position: u64,
    first_version: u64,
    last_version: u64,
    n: usize,
    /// The cycle after which it was first seen.
    cycle: usize,
}

/// What the parent knows across cycles.
#[derive(Debug, Default)]
struct Ledger {
    intents: HashMap<EventId, Intent>,
    /// The first answer of each answered append (later ones must agree).
    acks: HashMap<EventId, Ack>,
    refused: HashSet<EventId>,
    groups: HashMap<EventId, Group>,
    stream_heads: HashMap<StreamName, u64>,
    /// Every position up to this one was checked.
    checked_head: u64,
    /// Acknowledged appends, counted once each.
    acknowledged: u64,
    replays: u64,
}

impl Ledger {
    fn hear(&mut self, line: &str, cycle: usize, cycle_acks: &mut Vec<Ack>) {
        match parse_line(line) {
            Said::Sent(intent) => {
                if let Some(known) = self.intents.get(&intent.first) {
                    assert_eq!(known, &intent, "one id, one append");
                }
                self.intents.insert(intent.first, intent);
            }
            Said::Ack(ack) => {
                assert!(
                    self.intents.contains_key(&ack.first),
                    "cycle {cycle}: an ack of an append never sent: {line}"
                );
                cycle_acks.push(ack);
            }
            Said::Refused(first) => {
                assert!(
                    !self.groups.contains_key(&first),
                    "cycle {cycle}: {first} was refused but is recorded"
                );
                self.refused.insert(first);
            }
            Said::Other(_) => {}
        }
    }

    /// Checks the events after `checked_head`: whole appends, contiguous positions and
    /// versions, each append once.
    fn scan(&mut self, log: &[RecordedEvent], cycle: usize) {
        let mut at = 0;
        while at < log.len() {
            let head = &log[at];
            let (first, i, n) = parse_marker(&head.data)
                .unwrap_or_else(|| panic!("cycle {cycle}: a foreign event {head:?}"));
            assert_eq!(
                i, 0,
                "cycle {cycle}: an append starts at its first event: {head:?}"
            );
            assert_eq!(head.event_id, first, "cycle {cycle}: {head:?}");
            assert!(
                at + n <= log.len(),
                "cycle {cycle}: append {first} is cut: {} of its {n} events are visible",
                log.len() - at
            );
            let events = &log[at..at + n];
            for (k, event) in events.iter().enumerate() {
                assert!(
                    event.records(&append_event(first, k, n)),
                    "cycle {cycle}: event {k} of append {first} is {event:?}"
                );
                assert_eq!(event.stream, head.stream, "cycle {cycle}: {event:?}");
                assert_eq!(
                    event.stream_version.0,
                    head.stream_version.0 + k as u64,
                    "cycle {cycle}: {event:?}"
                );
            }
            for event in events {
                assert_eq!(
                    event.position.0,
                    self.checked_head + 1,
                    "cycle {cycle}: positions are contiguous"
                );
                self.checked_head += 1;
            }
            let stream_head = self.stream_heads.entry(head.stream.clone()).or_insert(0);
            assert_eq!(
                head.stream_version.0,
                *stream_head + 1,
                "cycle {cycle}: versions of {} are contiguous",
                head.stream
            );
            *stream_head += n as u64;
            let intent = self
                .intents
                .get(&first)
                .unwrap_or_else(|| panic!("cycle {cycle}: append {first} was never sent"));
            assert_eq!(
                (&intent.stream, intent.n),
                (&head.stream, n),
                "cycle {cycle}: {first}"
            );
            let before = head.stream_version.0 - 1;
            assert!(
                intent
                    .expected
                    .admits((before > 0).then_some(StreamVersion(before))),
                "cycle {cycle}: {intent:?} landed after version {before}"
            );
            assert!(
                !self.refused.contains(&first),
                "cycle {cycle}: {first} was refused but is recorded"
            );
            let group = Group {
                first_position: head.position.0,
                last_position: head.position.0 + n as u64 - 1,
                first_version: head.stream_version.0,
                last_version: head.stream_version.0 + n as u64 - 1,
                n,
                cycle,
            };
            if let Some(earlier) = self.groups.insert(first, group) {
                panic!("cycle {cycle}: append {first} is recorded twice: {earlier:?} and now");
            }
            at += n;
        }
    }

    /// Checks this cycle's acknowledgements against the store.
    fn check_acks(&mut self, acks: &[Ack], cycle: usize) {
        for ack in acks {
            let group = self.groups.get(&ack.first).unwrap_or_else(|| {
                panic!("cycle {cycle}: LOST: the acknowledged append {ack:?} is not in the store")
            });
            assert_eq!(
                (ack.first_position, ack.last_position, ack.version),
                (
                    group.first_position,
                    group.last_position,
                    group.last_version
                ),
                "cycle {cycle}: append {} is not where it was acknowledged ({group:?})",
                ack.first
            );
            assert_eq!(
                group.last_position - group.first_position + 1,
                group.n as u64
            );
            assert!(group.first_version >= 1);
            if ack.replayed {
                self.replays += 1;
            } else {
                assert_eq!(
                    group.cycle, cycle,
                    "cycle {cycle}: a fresh ack of an append recorded before: {ack:?}"
                );
            }
            if let Some(first_ack) = self.acks.get(&ack.first) {
                assert_eq!(
                    (first_ack.first_position, first_ack.last_position),
                    (ack.first_position, ack.last_position),
                    "cycle {cycle}: two answers disagree"
                );
            } else {
                self.acks.insert(ack.first, *ack);
                self.acknowledged += 1;
            }
        }
    }

    /// The sent appends without an answer: the next child retries them.
    fn unanswered(&self) -> Vec<&Intent> {
        let mut pending: Vec<&Intent> = self
            .intents
            .values()
            .filter(|i| !self.acks.contains_key(&i.first) && !self.refused.contains(&i.first))
            .collect();
        pending.sort_by_key(|i| i.first);
        pending
    }
}

async fn log_after(store: &EmbeddedStore, after: u64) -> Vec<RecordedEvent> {
    let mut log = Vec::new();
    headwater_store::read_all_pages(store, Position(after), READ_PAGE_EVENTS_MAX, |page| {
        log.extend_from_slice(page)
    })
    .await
    .unwrap();
    log
}

/// The seed in the environment variable `var`, or a random one; printed either way (the output
/// is captured, and shown when the test fails).
pub(crate) fn seed(var: &str) -> u64 {
    let seed = match std::env::var(var) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{var} is not a u64: {text:?}")),
        Err(_) => rand::random(),
    };
    println!("seed: {var}={seed}");
    seed
}

/// Runs the child in `dir` for one cycle, kills it, and returns what it said.
fn run_child(
    dir: &Path,
    seed: u64,
    retry_file: &Path,
    early: bool,
    live_check: Option<u64>,
    rng: &mut StdRng,
) -> Vec<String> {
    let mut said = Vec::new();
    let mut child = ChildProcess::spawn(
        "crash::child_appender",
        &[
            (CHILD_ENV, dir.display().to_string()),
            (CHILD_SEED_ENV, seed.to_string()),
            (CHILD_RETRY_ENV, retry_file.display().to_string()),
        ],
    );
    let start = Duration::from_secs(START_TIMEOUT_SECS);
    child.wait_for("OPENING", start, |line| said.push(line.to_owned()));
    if early {
        let wait = Duration::from_micros(rng.random_range(EARLY_KILL_AFTER_MICROS));
        // Not waiting for anything: the kill lands at a random moment of the open.
        std::thread::sleep(wait);
    } else {
        child.wait_for("READY", start, |line| said.push(line.to_owned()));
        if let Some(checked_head) = live_check {
            // An operator looks at the store while the child appends to it.
            let inspection = inspect(dir).unwrap();
            assert!(inspection.head.0 >= checked_head, "{inspection:?}");
            let report = verify(dir, &mut |_| {}).unwrap();
            assert!(report.is_clean(), "verify of the live store: {report:#?}");
            assert!(report.events_checked >= checked_head, "{report:?}");
        }
        let deadline = Instant::now() + Duration::from_millis(rng.random_range(KILL_AFTER_MILLIS));
        while let Some(line) = child.line_before(deadline) {
            said.push(line);
        }
    }
    said.extend(child.kill());
    said
}

#[test]
fn acknowledged_appends_survive_kill_9() {
    let seed = seed(SEED_ENV);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let retry_file = dir.path().join("retry");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut ledger = Ledger::default();
    let started = Instant::now();
    let total = CYCLES + EARLY_CYCLES;
    let mut verify_time = Duration::ZERO;
    let mut killed_opening = 0;
    for cycle in 0..total {
        // Every (total / EARLY_CYCLES)-th cycle kills the child while it opens the store.
        let early = cycle % (total / EARLY_CYCLES) == total / EARLY_CYCLES - 1;
        let retries: String = ledger
            .unanswered()
            .iter()
            .map(|i| format!("{}\n", i.line()))
            .collect();
        std::fs::write(&retry_file, retries).unwrap();
        let child_seed = rng.random();
        let live_check =
            (!early && cycle % VERIFY_EVERY_CYCLES == 2).then_some(ledger.checked_head);
        let said = run_child(
            &store_dir,
            child_seed,
            &retry_file,
            early,
            live_check,
            &mut rng,
        );
        let mut acks = Vec::new();
        for line in &said {
            ledger.hear(line, cycle, &mut acks);
        }
        runtime.block_on(async {
            let store = EmbeddedStore::open(&store_dir)
                .unwrap_or_else(|e| panic!("cycle {cycle}: reopening after the kill: {e}"));
            let log = log_after(&store, ledger.checked_head).await;
            ledger.scan(&log, cycle);
            assert_eq!(
                store.head_position().0,
                ledger.checked_head,
                "cycle {cycle}: the head is the last event"
            );
        });
        ledger.check_acks(&acks, cycle);
        if early && said.iter().all(|line| !line.starts_with("READY")) {
            killed_opening += 1;
        }
        if cycle % VERIFY_EVERY_CYCLES == VERIFY_EVERY_CYCLES - 1 || cycle == total - 1 {
            let verifying = Instant::now();
            let report = verify(&store_dir, &mut |_| {}).unwrap();
            verify_time += verifying.elapsed();
            assert!(report.is_clean(), "cycle {cycle}: {report:#?}");
            assert_eq!(report.events_checked, ledger.checked_head);
        }
    }
    // Everything ever refused is still absent; everything acknowledged is still present, once.
    runtime.block_on(async {
        let store = EmbeddedStore::open(&store_dir).unwrap();
        let log = log_after(&store, 0).await;
        let mut replay = Ledger {
            intents: ledger.intents.clone(),
            refused: ledger.refused.clone(),
            ..Ledger::default()
        };
        replay.scan(&log, total);
        for ack in ledger.acks.values() {
            let group = &replay.groups[&ack.first];
            assert_eq!(
                (group.first_position, group.last_position),
                (ack.first_position, ack.last_position)
            );
        }
        assert_eq!(replay.groups.len(), ledger.groups.len());
    });
    println!(
        "{total} kill cycles ({killed_opening} of {EARLY_CYCLES} early ones before the store was \
         open) in {:?} ({:?} verifying): {} appends acknowledged, {} replayed, {} refused, \
         {} events, {} appends recorded without an answer",
        started.elapsed(),
        verify_time,
        ledger.acknowledged,
        ledger.replays,
        ledger.refused.len(),
        ledger.checked_head,
        ledger.groups.len() as u64 - ledger.acknowledged,
    );
    assert!(
        ledger.acknowledged >= CYCLES as u64,
        "the children got appends through"
    );
    assert!(ledger.replays > 0, "retries were answered by replay");
}
