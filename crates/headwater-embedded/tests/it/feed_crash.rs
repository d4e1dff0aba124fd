//! `kill -9` of a projecting process: a child appends to the log and projects it into a feed,
//! one batch at a time, saying which batch it sends and which commit was acknowledged; the
//! parent kills it at a random moment, reopens the store and checks that the feed is exactly
//! the projection of the log up to the feed's cursor (no hole, no duplicate, sequences
//! contiguous), and that the cursor is the last acknowledged one or the one batch sent after
//! it. Every few cycles `verify` checks the whole store, feeds included.
//!
//! `HEADWATER_FEED_CRASH_SEED=<u64>` replays a run's random choices; the seed is printed first.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use headwater_core::limits::FEED_PAGE_EVENTS_MAX;
use headwater_core::{
    EventType, ExpectedVersion, FeedId, FeedPosition, Position, RecordedEvent, Sequence,
    StreamName, Subject, integration_event_id,
};
use headwater_embedded::{EmbeddedStore, verify};
use headwater_store::conformance::events;
use headwater_store::{EventStore, FeedEvent, FeedStore, ProjectedEvent, ProjectorBatch};
use headwater_testkit::process::{ChildProcess, say};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::crash::seed;

/// Set in the child: the store directory. Marks the process as a child.
const CHILD_ENV: &str = "HEADWATER_FEED_CRASH_CHILD";
/// Set by whoever runs the tests: the seed of the parent.
const SEED_ENV: &str = "HEADWATER_FEED_CRASH_SEED";

/// Kill cycles.
const CYCLES: usize = 24;
/// The child is killed this long after it said it is ready, in milliseconds.
const KILL_AFTER_MILLIS: std::ops::Range<u64> = 10..250;
/// A batch projects at most this many log positions.
const BATCH_POSITIONS_MAX: u64 = 1_500;
/// The child appends this many events at a time when the log runs short of a batch.
const APPEND_EVENTS: usize = 1_000;
/// The child stops by itself after this long (it is always killed well before), in seconds.
const CHILD_LIFETIME_SECS: u64 = 60;
/// How long the parent waits for the child to start, in seconds.
const START_TIMEOUT_SECS: u64 = 60;
/// `verify` runs after every this many cycles (and after the last).
const VERIFY_EVERY_CYCLES: usize = 6;

fn feed() -> FeedId {
    FeedId::parse("crash.v1").unwrap()
}

/// The projection under test: a pure function of the log event. Every fifth position makes
/// nothing, every seventh two events, the rest one; subjects cycle through 41 values.
fn project(event: &RecordedEvent, feed: &FeedId) -> Vec<ProjectedEvent> {
    let p = event.position.0;
    let count = if p.is_multiple_of(5) {
        0
    } else if p.is_multiple_of(7) {
        2
    } else {
        1
    };
    (0..count)
        .map(|i| ProjectedEvent {
            id: integration_event_id(event.event_id, feed, i),
            event_type: EventType::new("crash.projected").unwrap(),
            subject: Subject::new(format!("s{}", (p + u64::from(i)) % 41)).unwrap(),
            time: event.metadata.recorded_at,
            data: event.data.clone(),
            source_position: event.position,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The child.

/// The child: opens the store and its feed, then appends and projects until it is killed. Does
/// nothing in a normal test run.
#[test]
fn child_projector() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = EmbeddedStore::open(&dir).unwrap();
        let feeds = store.feeds().unwrap();
        let feed = feed();
        let state = feeds.register(&feed).await.unwrap();
        let mut cursor = state.cursor;
        say(&format!("READY {}", cursor.0));
        let stream = StreamName::from_parts("source", "1").unwrap();
        let stop = Instant::now() + Duration::from_secs(CHILD_LIFETIME_SECS);
        while Instant::now() < stop {
            if store.head_position().0 < cursor.0 + BATCH_POSITIONS_MAX {
                store
                    .append(&stream, ExpectedVersion::Any, events(APPEND_EVENTS))
                    .await
                    .unwrap();
            }
            let page = store.read_all(cursor, BATCH_POSITIONS_MAX).await.unwrap();
            let to = page.last().map_or(cursor, |e| e.position);
            let batch = ProjectorBatch {
                from: cursor,
                to,
                events: page.iter().flat_map(|e| project(e, &feed)).collect(),
            };
            say(&format!("SENDING {} {}", cursor.0, to.0));
            let commit = feeds.commit(&feed, batch).await.unwrap();
            say(&format!("COMMITTED {} {}", commit.cursor.0, commit.head.0));
            cursor = to;
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The parent.

/// What the parent knows: the last acknowledged cursor, the batch sent after it, and the feed
/// checked so far (its head and each subject's last sequence).
#[derive(Debug, Default)]
struct Ledger {
    acknowledged: u64,
    acknowledged_head: u64,
    /// (from, to) of the last batch sent, if it was not acknowledged.
    pending: Option<(u64, u64)>,
    commits: u64,
    /// The cursor and head checked against the log.
    cursor: u64,
    head: u64,
    sequences: HashMap<Subject, u64>,
}

impl Ledger {
    fn hear(&mut self, line: &str) {
        let words: Vec<&str> = line.split(' ').collect();
        let number = |i: usize| words[i].parse::<u64>().unwrap();
        match words[0] {
            "READY" => {}
            "SENDING" => self.pending = Some((number(1), number(2))),
            "COMMITTED" => {
                assert_eq!(self.pending.map(|(_, to)| to), Some(number(1)), "{line}");
                assert!(number(1) >= self.acknowledged);
                self.acknowledged = number(1);
                self.acknowledged_head = number(2);
                self.pending = None;
                self.commits += 1;
            }
            other => panic!("unexpected line from the child: {other}"),
        }
    }

    /// Checks the reopened feed against the log, after the part checked before.
    async fn check(&mut self, store: &EmbeddedStore, cycle: usize) {
        let feeds = store.feeds().unwrap();
        let feed = feed();
        let Some(state) = feeds.feed(&feed).await.unwrap() else {
            assert_eq!(self.acknowledged, 0, "cycle {cycle}: the feed is gone");
            return;
        };
        let cursor = state.cursor.0;
        let allowed: Vec<u64> = std::iter::once(self.acknowledged)
            .chain(self.pending.map(|(_, to)| to))
            .collect();
        assert!(
            allowed.contains(&cursor),
            "cycle {cycle}: the cursor is {cursor}, not the acknowledged {} or the pending {:?}",
            self.acknowledged,
            self.pending
        );
        assert!(cursor >= self.cursor, "cycle {cycle}: the cursor went back");
        assert!(cursor <= store.head_position().0);
        if cursor == self.acknowledged {
            assert_eq!(state.head.0, self.acknowledged_head.max(self.head));
        }
        // The log's events the feed projected since the last check.
        let mut expected = Vec::new();
        let mut after = Position(self.cursor);
        while after.0 < cursor {
            let page = store
                .read_all(after, (cursor - after.0).min(10_000))
                .await
                .unwrap();
            assert!(
                !page.is_empty(),
                "cycle {cycle}: the log ends before the cursor"
            );
            after = page.last().unwrap().position;
            expected.extend(
                page.iter()
                    .filter(|e| e.position.0 <= cursor)
                    .flat_map(|e| project(e, &feed)),
            );
        }
        // The feed's events since the last check: exactly those, numbered on.
        let mut got: Vec<FeedEvent> = Vec::new();
        loop {
            let from = got.last().map_or(FeedPosition(self.head), |e| e.position);
            let page = feeds
                .read_feed(&feed, from, FEED_PAGE_EVENTS_MAX)
                .await
                .unwrap();
            if page.is_empty() {
                break;
            }
            got.extend(page);
        }
        assert_eq!(
            got.len(),
            expected.len(),
            "cycle {cycle}: the feed after {} holds {} events, the projection of the log from {} to {cursor} {}",
            self.head,
            got.len(),
            self.cursor,
            expected.len()
        );
        for (i, (event, projected)) in got.iter().zip(&expected).enumerate() {
            let sequence = self.sequences.entry(projected.subject.clone()).or_default();
            *sequence += 1;
            assert_eq!(event.position, FeedPosition(self.head + 1 + i as u64));
            assert_eq!(
                event.sequence,
                Sequence(*sequence),
                "cycle {cycle}: {event:?}"
            );
            assert_eq!(
                (
                    &event.id,
                    &event.subject,
                    &event.data,
                    event.source_position
                ),
                (
                    &projected.id,
                    &projected.subject,
                    &projected.data,
                    projected.source_position
                ),
                "cycle {cycle}: feed position {}",
                event.position
            );
        }
        self.cursor = cursor;
        self.head += got.len() as u64;
        assert_eq!(state.head.0, self.head, "cycle {cycle}: the feed's head");
        if cursor != self.acknowledged {
            // The unanswered batch was committed: it counts as acknowledged from now on.
            self.acknowledged = cursor;
            self.acknowledged_head = self.head;
        }
        self.pending = None;
    }
}

fn run_child(dir: &Path, rng: &mut StdRng) -> Vec<String> {
    let mut said = Vec::new();
    let mut child = ChildProcess::spawn(
        "feed_crash::child_projector",
        &[(CHILD_ENV, dir.display().to_string())],
    );
    child.wait_for("READY", Duration::from_secs(START_TIMEOUT_SECS), |line| {
        said.push(line.to_owned())
    });
    let deadline = Instant::now() + Duration::from_millis(rng.random_range(KILL_AFTER_MILLIS));
    while let Some(line) = child.line_before(deadline) {
        said.push(line);
    }
    said.extend(child.kill());
    said
}

#[test]
fn a_killed_projector_leaves_the_feed_consistent_with_its_cursor() {
    let seed = seed(SEED_ENV);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut ledger = Ledger::default();
    let started = Instant::now();
    let mut unanswered_committed = 0;
    for cycle in 0..CYCLES {
        for line in run_child(&store_dir, &mut rng) {
            ledger.hear(&line);
        }
        let pending = ledger.pending;
        runtime.block_on(async {
            let store = EmbeddedStore::open(&store_dir)
                .unwrap_or_else(|e| panic!("cycle {cycle}: reopening after the kill: {e}"));
            ledger.check(&store, cycle).await;
        });
        if pending.is_some_and(|(_, to)| to == ledger.cursor) {
            unanswered_committed += 1;
        }
        if cycle % VERIFY_EVERY_CYCLES == VERIFY_EVERY_CYCLES - 1 || cycle == CYCLES - 1 {
            let report = verify(&store_dir, &mut |_| {}).unwrap();
            assert!(report.is_clean(), "cycle {cycle}: {report:#?}");
            assert_eq!(report.feed_events_checked, ledger.head);
            assert_eq!(report.feeds_checked, 1);
        }
    }
    println!(
        "{CYCLES} kill cycles in {:?}: {} commits acknowledged, {unanswered_committed} committed \
         without an answer, cursor {}, {} feed events",
        started.elapsed(),
        ledger.commits,
        ledger.cursor,
        ledger.head
    );
    assert!(
        ledger.commits >= CYCLES as u64 / 2,
        "the children got commits through"
    );
}
