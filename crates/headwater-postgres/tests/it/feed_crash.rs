//! `kill -9` of a projecting process mid-commit: a child process (this test binary re-executed)
//! commits projector batches to a feed, each made deterministically of its source positions,
//! and says each acknowledged cursor on stdout. The parent waits until the child's session is
//! inside a transaction that has written, kills it with SIGKILL right then, waits for
//! PostgreSQL to end the session, and checks that the feed is exactly the projection of the log
//! up to its cursor (no hole, no duplicate, the numbering of a feed built in one go), that its
//! cursor is at least the last acknowledged one, and that the subject heads match. The next
//! child goes on from the stored cursor.
//!
//! `HEADWATER_PG_FEED_CRASH_SEED=<u64>` replays a run's random choices; the seed is printed.

use std::time::{Duration, Instant};

use headwater_core::{FeedPosition, Position};
use headwater_postgres::{Options, PostgresStore};
use headwater_store::{FeedError, FeedEvent, FeedStore, MemoryFeedStore, ProjectorBatch};
use headwater_testkit::process::{ChildProcess, say};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::feeds::{feed, projected};
use crate::support::Fresh;

const CHILD_URL_ENV: &str = "HEADWATER_PG_FEED_CRASH_CHILD_URL";
const CHILD_SCHEMA_ENV: &str = "HEADWATER_PG_FEED_CRASH_CHILD_SCHEMA";
const SEED_ENV: &str = "HEADWATER_PG_FEED_CRASH_SEED";

/// Kill cycles.
const CYCLES: usize = 6;
/// Internal events per projector batch (each makes 0 to 3 integration events).
const BATCH_SOURCES: u64 = 2_000;
/// Internal events per batch of the reference feed (another size than the child's).
const REFERENCE_BATCH_SOURCES: u64 = 7_000;
/// Subjects the projection spreads events over.
const SUBJECTS: u64 = 500;
/// The parent lets the child run at least this long before it looks for an open transaction to
/// kill it in, in milliseconds.
const RUN_BEFORE_KILL_MILLIS: std::ops::Range<u64> = 20..400;
/// The child stops by itself after this long (it is always killed well before), in seconds.
const CHILD_LIFETIME_SECS: u64 = 60;
/// How long the parent waits for the child to start, or for a state it polls for, in seconds.
const WAIT_SECS: u64 = 60;
/// How often the parent polls `pg_stat_activity` for the end of the child's sessions, in
/// milliseconds.
const POLL_MILLIS: u64 = 5;

const FEED: &str = "accounts.v1";

/// The projector batch of the internal events `from + 1 ..= to`: a fixed function of the
/// positions, as a projection of a fixed log is.
fn batch(from: u64, to: u64) -> ProjectorBatch {
    let mut events = Vec::new();
    for source in from + 1..=to {
        let mix = source.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for index in 0..(mix >> 60) % 4 {
            let subject = format!("acct-{}", (mix >> 20).wrapping_add(index) % SUBJECTS);
            let data = format!("{{\"source\":{source},\"index\":{index}}}").into_bytes();
            events.push(projected(source, index as u32, &subject, data));
        }
    }
    ProjectorBatch {
        from: Position(from),
        to: Position(to),
        events,
    }
}

/// The child: commits batches from the stored cursor until it is killed. Does nothing in a
/// normal test run.
#[test]
fn child_projector() {
    let Ok(url) = std::env::var(CHILD_URL_ENV) else {
        return;
    };
    let schema = std::env::var(CHILD_SCHEMA_ENV).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = PostgresStore::connect(&url, Options::with_schema(schema))
            .await
            .unwrap()
            .feed_store();
        let f = feed(FEED);
        let mut cursor = store.register(&f).await.unwrap().cursor.0;
        say("READY");
        let stop = Instant::now() + Duration::from_secs(CHILD_LIFETIME_SECS);
        while Instant::now() < stop {
            let commit = store
                .commit(&f, batch(cursor, cursor + BATCH_SOURCES))
                .await
                .unwrap();
            cursor = commit.cursor.0;
            say(&format!("ACK {cursor}"));
        }
    });
}

/// Pids of the child's sessions and whether each is inside a transaction that has written.
async fn child_sessions(client: &tokio_postgres::Client, app: &str) -> Vec<bool> {
    client
        .query(
            "SELECT backend_xid IS NOT NULL FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn whole_feed<S: FeedStore>(store: &S) -> Vec<FeedEvent> {
    let f = feed(FEED);
    let mut out: Vec<FeedEvent> = Vec::new();
    loop {
        let after = out.last().map_or(FeedPosition::START, |e| e.position);
        let page = store.read_feed(&f, after, 10_000).await.unwrap();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_commit_leaves_the_feed_consistent_with_its_cursor() {
    let seed = std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("{SEED_ENV}={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let fresh = Fresh::new();
    drop(fresh.connect(fresh.options()).await);
    let client = fresh.client().await;
    let app = format!("hw_feed_crash_{}", fresh.schema);
    let child_url = format!(
        "{}{}application_name={app}",
        fresh.url,
        if fresh.url.contains('?') { '&' } else { '?' }
    );
    let f = feed(FEED);
    let mut acknowledged = 0u64;
    let mut mid_commit_kills = 0;
    for cycle in 0..CYCLES {
        let mut child = ChildProcess::spawn(
            "feed_crash::child_projector",
            &[
                (CHILD_URL_ENV, child_url.clone()),
                (CHILD_SCHEMA_ENV, fresh.schema.clone()),
            ],
        );
        let mut acks = Vec::new();
        let hear = |line: &str, acks: &mut Vec<u64>| {
            if let Some(cursor) = line.strip_prefix("ACK ") {
                acks.push(cursor.parse().unwrap());
            }
        };
        child.wait_for("READY", Duration::from_secs(WAIT_SECS), |l| {
            hear(l, &mut acks)
        });
        // Not waiting for anything: the kill lands after a random stretch of committing.
        tokio::time::sleep(Duration::from_millis(
            rng.random_range(RUN_BEFORE_KILL_MILLIS),
        ))
        .await;
        let deadline = Instant::now() + Duration::from_secs(WAIT_SECS);
        let mut mid_commit = false;
        while Instant::now() < deadline {
            if child_sessions(&client, &app).await.contains(&true) {
                mid_commit = true;
                break;
            }
        }
        for line in child.kill() {
            hear(&line, &mut acks);
        }
        mid_commit_kills += usize::from(mid_commit);
        let deadline = Instant::now() + Duration::from_secs(WAIT_SECS);
        while !child_sessions(&client, &app).await.is_empty() {
            assert!(
                Instant::now() < deadline,
                "the killed child's sessions linger"
            );
            tokio::time::sleep(Duration::from_millis(POLL_MILLIS)).await;
        }

        let store = fresh.connect(fresh.options()).await.feed_store();
        let state = store.feed(&f).await.unwrap().unwrap();
        let last_ack = acks.iter().copied().max().unwrap_or(acknowledged);
        assert!(
            state.cursor.0 >= last_ack,
            "cycle {cycle}: LOST: the cursor is {}, {last_ack} was acknowledged",
            state.cursor
        );
        assert_eq!(state.cursor.0 % BATCH_SOURCES, 0, "a torn batch");
        acknowledged = state.cursor.0;
        // The feed equals the one the same log makes in batches of another size.
        let reference = MemoryFeedStore::new();
        reference.register(&f).await.unwrap();
        let mut from = 0;
        while from < state.cursor.0 {
            let to = (from + REFERENCE_BATCH_SOURCES).min(state.cursor.0);
            reference.commit(&f, batch(from, to)).await.unwrap();
            from = to;
        }
        let events = whole_feed(&store).await;
        assert_eq!(
            events,
            whole_feed(&reference).await,
            "cycle {cycle}: the feed is not the projection of the log up to its cursor"
        );
        assert_eq!(state.head, FeedPosition(events.len() as u64));
        let mut after = None;
        loop {
            let heads = store.subjects(&f, after.as_ref(), 10_000).await.unwrap();
            let Some(last) = heads.last() else { break };
            after = Some(last.subject.clone());
            for head in &heads {
                let last_sequence = events
                    .iter()
                    .filter(|e| e.subject == head.subject)
                    .map(|e| e.sequence)
                    .max();
                assert_eq!(Some(head.sequence), last_sequence, "cycle {cycle}");
            }
        }
        // A stale projector is refused and writes nothing.
        if state.cursor.0 >= BATCH_SOURCES {
            let from = state.cursor.0 - BATCH_SOURCES;
            assert!(matches!(
                store.commit(&f, batch(from, state.cursor.0)).await,
                Err(FeedError::CursorMoved { .. })
            ));
        }
    }
    println!(
        "{CYCLES} kills, {mid_commit_kills} inside a writing transaction; cursor at {acknowledged}"
    );
    assert!(mid_commit_kills > 0, "some kill landed mid-commit");
    assert!(acknowledged > 0, "the children committed");
}
