//! G7 under `kill -9`: a consumer process following a busy producer (the HTTP feed, plus a lossy
//! path whose gaps it heals) or walking it (reconstitution after reconstitution) is killed with
//! SIGKILL at random moments and started again, at least 20 times; after every kill its view
//! holds each subject's events 1 ..= cursor exactly once; at the end, once the producer stops
//! appending and the consumer has reconstituted, its view equals the producer's feed read over
//! HTTP — every subject's events applied exactly once, in order (same checksum of their ids).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::processes::consumer::{ConsumerProcess, ViewAt, check_consistent, read_view};
use crate::processes::producer::{Producer, Workload, read_feed};
use crate::processes::seeded;

/// The producer's subjects.
const ACCOUNTS: u64 = 1_000;
/// The producer's workload with the embedded view: a backlog of events before the first consumer
/// starts, then each of its 4 appenders appends 1 to 3 events every 4 ms (1,000 to 2,000 events/s
/// in all, as fast as the appenders go on a shared machine).
const HEAVY: Workload = Workload {
    accounts: ACCOUNTS,
    preload: 5_000,
    append_every_micros: Some(4_000),
};
/// With the PostgreSQL view, whose consumer applies fewer events per second (each apply a
/// PostgreSQL transaction of several round trips, one at a time): every 16 ms.
const LIGHTER: Workload = Workload {
    accounts: ACCOUNTS,
    preload: 1_000,
    append_every_micros: Some(16_000),
};
/// A consumer is killed this long after it said it is ready, in milliseconds.
const KILL_AFTER_MILLIS: std::ops::Range<u64> = 0..800;
/// Of the consumers, this many percent walk (reconstitute again and again) instead of following
/// the feed: kills land in the middle of walks too.
const WALKING_PERCENT: u32 = 25;
/// The longest the producer may take to project what was appended once it stops, in seconds.
const STOP_SECS_MAX: u64 = 60;
/// The longest the last consumer's reconstitution may take, in seconds.
const RECONSTITUTE_SECS_MAX: u64 = 120;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn crash_loop(view: &ViewAt, workload: Workload, cycles: usize) {
    let (seed, mut rng) = seeded();
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime();
    let mut producer = Producer::start(dir.path(), seed, workload);
    let started = Instant::now();
    let mut before: BTreeMap<String, u64> = BTreeMap::new();
    let (mut progressed, mut behind, mut walks) = (0, 0, 0);
    let (mut handled, mut gaps, mut healed, mut duplicates) = (0, 0, 0, 0);
    for cycle in 0..cycles {
        let walking = rng.random_range(0..100) < WALKING_PERCENT;
        walks += usize::from(walking);
        let mut consumer = if walking {
            ConsumerProcess::walk(producer.api, view)
        } else {
            ConsumerProcess::follow(producer.api, view, rng.random())
        };
        let kill_after = Duration::from_millis(rng.random_range(KILL_AFTER_MILLIS));
        consumer.run_until(Instant::now() + kill_after);
        let status = consumer.kill();
        let feed_head = producer.status().feed;
        handled += status.applied;
        gaps += status.gaps;
        healed += status.healed;
        duplicates += status.duplicates;

        // Right after the kill: every subject holds 1 ..= cursor, each once; no cursor went back.
        let state = runtime.block_on(read_view(view));
        let applied = check_consistent(&state, &format!("after kill {}", cycle + 1));
        for (subject, cursor) in &before {
            let now = state.get(subject).map_or(0, |s| s.cursor);
            assert!(
                now >= *cursor,
                "cycle {cycle}: {subject}'s cursor went back from {cursor} to {now}"
            );
        }
        let total_before: u64 = before.values().sum();
        progressed += usize::from(applied > total_before);
        behind += usize::from(applied < feed_head);
        before = state.into_iter().map(|(s, v)| (s, v.cursor)).collect();
    }
    let loop_secs = started.elapsed().as_secs_f64();
    let stopped = producer.stop_appending(Duration::from_secs(STOP_SECS_MAX));
    let walk = ConsumerProcess::reconstitute(
        producer.api,
        view,
        Duration::from_secs(RECONSTITUTE_SECS_MAX),
    );
    let expected = read_feed(producer.api);
    producer.kill();
    let state = runtime.block_on(read_view(view));
    let applied = check_consistent(&state, "after reconstitution");
    let held: u64 = before.values().sum();
    eprintln!(
        "{cycles} kills ({walks} of walking consumers) in {loop_secs:.1} s: the feed grew to {} \
         events over {} subjects; {progressed} cycles moved the view, {behind} kills caught the \
         consumer behind the producer; the consumers applied {handled} events, saw {gaps} gaps, \
         healed {healed} events, skipped {duplicates} duplicates; the view held {held} events at \
         the last kill; {walk}",
        stopped.feed,
        expected.len(),
    );
    assert_eq!(applied, stopped.feed, "every event of the feed, once");
    let mismatched: Vec<_> = expected
        .iter()
        .filter(|(subject, e)| {
            state
                .get(*subject)
                .is_none_or(|s| (s.cursor, s.checksum) != (e.head, e.checksum))
        })
        .map(|(subject, e)| (subject, e, state.get(subject)))
        .take(5)
        .collect();
    assert!(
        mismatched.is_empty(),
        "subjects the view does not have as the producer does: {mismatched:?}"
    );
    let unknown: Vec<_> = state
        .keys()
        .filter(|s| !expected.contains_key(*s))
        .collect();
    assert!(
        unknown.is_empty(),
        "subjects the producer does not have: {unknown:?}"
    );
    assert!(
        progressed > 0,
        "no consumer applied anything before its kill"
    );
    assert!(healed > 0, "no gap was healed: the lossy path did not work");
}

#[test]
fn killed_consumers_apply_every_event_exactly_once_embedded() {
    let dir = tempfile::tempdir().unwrap();
    crash_loop(&ViewAt::Sqlite(dir.path().join("view.sqlite3")), HEAVY, 40);
}

/// A schema of the test's own on the test server, dropped at the end.
struct Schema {
    url: String,
    name: String,
}

impl Drop for Schema {
    fn drop(&mut self) {
        headwater_testkit::postgres::drop_schema(&self.url, &self.name);
    }
}

#[test]
fn killed_consumers_apply_every_event_exactly_once_postgres() {
    let schema = Schema {
        url: headwater_testkit::postgres::url(),
        name: headwater_testkit::postgres::fresh_schema(),
    };
    crash_loop(&ViewAt::Postgres(schema.name.clone()), LIGHTER, 20);
}
