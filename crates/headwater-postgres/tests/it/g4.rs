//! G4 torture: several store handles (each with its own writer and connections, as separate
//! processes would have; half of them with two writer connections) append concurrently while a commit hook holds their transactions open
//! for a random while or rolls them back at random; a follower on another handle reads the log
//! page by page (random page sizes) as it grows. The follower must see exactly the committed
//! appends: positions 1, 2, 3 … with no gap and no repeat, each stream's versions in order, every
//! acknowledged append where it was acknowledged, nothing else.
//!
//! `HEADWATER_G4_SEED=<u64>` replays a run's random choices; the seed is printed first. (The
//! interleaving of the server's commits is not under the seed's control; the choices are.)

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use headwater_core::{EventId, ExpectedVersion, Position, StreamName, StreamVersion};
use headwater_postgres::{CommitHook, Options, PostgresStore};
use headwater_store::conformance::{assert_store_invariants, events, stream};
use headwater_store::{AppendError, EventStore, wait_for_position};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::support::Fresh;

/// Set by whoever runs the tests: the seed to replay.
const SEED_ENV: &str = "HEADWATER_G4_SEED";
/// Store handles that write (each has its own writer task and connection).
const WRITER_HANDLES: usize = 4;
/// Concurrent appenders, spread over the handles.
const APPENDERS: usize = 16;
/// Appends each appender sends.
const APPENDS_EACH: usize = 30;
/// Streams shared by all appenders (besides one of each appender's own).
const SHARED_STREAMS: u64 = 3;
/// The chance that a commit is held open before it commits, in percent.
const HOLD_PERCENT: u32 = 30;
/// How long a held commit stays open, in milliseconds.
const HOLD_MILLIS: std::ops::Range<u64> = 1..25;
/// The chance that a commit is rolled back, in percent.
const ROLLBACK_PERCENT: u32 = 15;
/// The most events the follower asks for in one page.
const FOLLOWER_PAGE_MAX: u64 = 40;
/// The whole test's bound, in seconds.
const TEST_TIMEOUT_SECS: u64 = 120;

/// What the hook answers when it rolls back: the only error an appender accepts.
const INJECTED: &str = "injected rollback";

fn hook(seed: u64) -> CommitHook {
    let rng = Arc::new(Mutex::new(StdRng::seed_from_u64(seed)));
    Arc::new(move |_attempt| {
        let (hold, rollback) = {
            let mut rng = rng.lock().unwrap();
            let hold = rng
                .random_ratio(HOLD_PERCENT, 100)
                .then(|| Duration::from_millis(rng.random_range(HOLD_MILLIS)));
            (hold, rng.random_ratio(ROLLBACK_PERCENT, 100))
        };
        Box::pin(async move {
            if let Some(hold) = hold {
                tokio::time::sleep(hold).await;
            }
            if rollback {
                Err(INJECTED.to_owned())
            } else {
                Ok(())
            }
        })
    })
}

/// An acknowledged append: its events' ids, where it landed.
#[derive(Debug, Clone)]
struct Acked {
    ids: Vec<EventId>,
    stream: StreamName,
    first_position: Position,
    last_position: Position,
    last_version: StreamVersion,
}

async fn appender(store: PostgresStore, seed: u64, index: usize) -> (Vec<Acked>, usize) {
    let mut rng = StdRng::seed_from_u64(seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9));
    let own = stream(&format!("own{index}"));
    let mut own_head: Option<StreamVersion> = None;
    let mut acked = Vec::new();
    let mut rolled_back = 0;
    for _ in 0..APPENDS_EACH {
        let (name, expected) = if rng.random_bool(0.3) {
            let name = stream(&format!("shared{}", rng.random_range(0..SHARED_STREAMS)));
            (name, ExpectedVersion::Any)
        } else {
            let expected = own_head.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
            (own.clone(), expected)
        };
        let batch = events(rng.random_range(1..=3));
        let ids = batch.iter().map(|e| e.event_id).collect();
        match store.append(&name, expected, batch).await {
            Ok(outcome) => {
                if name == own {
                    own_head = Some(outcome.stream_version);
                }
                acked.push(Acked {
                    ids,
                    stream: name,
                    first_position: outcome.first_position,
                    last_position: outcome.last_position,
                    last_version: outcome.stream_version,
                });
            }
            Err(AppendError::Backend(e)) if e.to_string().contains(INJECTED) => rolled_back += 1,
            Err(other) => panic!("appender {index}: unexpected failure {other}"),
        }
    }
    (acked, rolled_back)
}

/// Reads the log as it grows, checking each page as it comes, until it has `total` events.
async fn follow(
    store: PostgresStore,
    seed: u64,
    done: Arc<Mutex<Option<u64>>>,
) -> Vec<(Position, EventId, StreamName, StreamVersion)> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xf011_0e4e);
    let mut cursor = Position::START;
    let mut seen = Vec::new();
    loop {
        let target = *done.lock().unwrap();
        if target.is_some_and(|total| cursor.0 >= total) {
            return seen;
        }
        wait_for_position(&store, cursor, Duration::from_millis(50)).await;
        let page = store
            .read_all(cursor, rng.random_range(1..=FOLLOWER_PAGE_MAX))
            .await
            .unwrap();
        for event in page {
            assert_eq!(
                event.position,
                cursor.next(),
                "the follower saw position {} right after {cursor}: a gap (an event skipped, or \
                 one that commits later) or a repeat",
                event.position
            );
            cursor = event.position;
            seen.push((
                event.position,
                event.event_id,
                event.stream,
                event.stream_version,
            ));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_sees_exactly_the_committed_log() {
    let seed = std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("{SEED_ENV}={seed}");
    let fresh = Fresh::new();
    let run = async {
        let follower_store = fresh.connect(fresh.options()).await;
        let mut handles = Vec::new();
        for h in 0..WRITER_HANDLES {
            let mut options: Options = fresh.options();
            options.before_commit = Some(hook(seed.wrapping_add(h as u64)));
            // Half the handles keep two groups in flight.
            options.writer_connections = 1 + h % 2;
            handles.push(fresh.connect(options).await);
        }
        let done = Arc::new(Mutex::new(None));
        let follower = tokio::spawn(follow(follower_store.clone(), seed, done.clone()));
        let mut appenders = Vec::new();
        for a in 0..APPENDERS {
            let store = handles[a % WRITER_HANDLES].clone();
            appenders.push(tokio::spawn(appender(store, seed, a)));
        }
        let mut acked = Vec::new();
        let mut rolled_back = 0;
        for task in appenders {
            let (mine, failed) = task.await.unwrap();
            acked.extend(mine);
            rolled_back += failed;
        }
        let total: usize = acked.iter().map(|a| a.ids.len()).sum();
        *done.lock().unwrap() = Some(total as u64);
        let seen = follower.await.unwrap();
        println!(
            "{} appends acknowledged ({total} events), {rolled_back} rolled back",
            acked.len()
        );
        assert!(rolled_back > 0, "the hook rolled some appends back");
        (follower_store, acked, seen, total)
    };
    let (store, acked, seen, total) =
        tokio::time::timeout(Duration::from_secs(TEST_TIMEOUT_SECS), run)
            .await
            .unwrap_or_else(|_| panic!("the run took over {TEST_TIMEOUT_SECS} s (seed {seed})"));

    // Exactly the committed events, each where its append was acknowledged.
    assert_eq!(
        seen.len(),
        total,
        "the follower saw every committed event, once"
    );
    let by_position: HashMap<Position, &(Position, EventId, StreamName, StreamVersion)> =
        seen.iter().map(|e| (e.0, e)).collect();
    for append in &acked {
        let n = append.ids.len() as u64;
        assert_eq!(append.last_position.0 - append.first_position.0 + 1, n);
        for (k, id) in append.ids.iter().enumerate() {
            let position = Position(append.first_position.0 + k as u64);
            let (_, seen_id, seen_stream, seen_version) = by_position[&position];
            assert_eq!(seen_id, id, "acknowledged event at {position}");
            assert_eq!(seen_stream, &append.stream);
            assert_eq!(seen_version.0, append.last_version.0 + 1 - n + k as u64);
        }
    }
    // Each stream's versions go 1, 2, 3 … in position order.
    let mut heads: BTreeMap<&StreamName, u64> = BTreeMap::new();
    for (position, _, name, version) in &seen {
        let head = heads.entry(name).or_default();
        *head += 1;
        assert_eq!(version.0, *head, "{name} at {position}");
    }
    // The follower's handle learns the final head from the other handles' notifications (or
    // its poll).
    let head = wait_for_position(&store, Position(total as u64 - 1), Duration::from_secs(30)).await;
    assert_eq!(head, Position(total as u64));
    let log = assert_store_invariants(&store).await;
    assert_eq!(log.len(), total);
}
