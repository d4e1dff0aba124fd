//! `kill -9` of a projector with real processes, on the embedded store and its feed store: a
//! child appends and projects (`accounts.v1` from the start, `accounts.v2` added after a few
//! cycles, so that its backfill is killed too); the parent kills it at random moments, checks
//! after every kill that each feed is exactly the projection of the log up to its cursor, and
//! after the last one lets the projectors catch up and compares each feed with the feed built
//! offline from the final log.
//!
//! `HEADWATER_CRASH_SEED=<u64>` replays a run's random choices; the seed is printed first.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use headwater_embedded::{EmbeddedFeedStore, EmbeddedStore};
use headwater_feed::{
    Projection, ProjectorOptions, Projectors, Stopped, build_feed, build_feed_until,
};
use headwater_store::{EventStore, FeedStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use headwater_testkit::process::{ChildProcess, say};

use crate::support::{Accounts, append, assert_numbered, read_whole_feed, wait_caught_up};

/// Set in the child: the store directory. Marks the process as a child.
const CHILD_ENV: &str = "HEADWATER_PROJECTOR_CRASH_CHILD";
/// Set in the child: the seed of its workload.
const CHILD_SEED_ENV: &str = "HEADWATER_PROJECTOR_CRASH_CHILD_SEED";
/// Set in the child when it also runs `accounts.v2`.
const CHILD_V2_ENV: &str = "HEADWATER_PROJECTOR_CRASH_CHILD_V2";
/// Set by whoever runs the tests: the seed of the parent.
const SEED_ENV: &str = "HEADWATER_CRASH_SEED";

/// Kill cycles.
const CYCLES: usize = 24;
/// From this cycle on the child also projects `accounts.v2` (its backfill starts then).
const V2_FROM_CYCLE: usize = 8;
/// The child is killed this long after it said it runs, in milliseconds.
const KILL_AFTER_MILLIS: std::ops::Range<u64> = 10..250;
/// Concurrent appenders in the child.
const APPENDERS: u64 = 3;
/// The child stops by itself after this long (it is always killed well before), in seconds.
const CHILD_LIFETIME_SECS: u64 = 60;
/// How long the parent waits for the child to start, in seconds.
const START_TIMEOUT_SECS: u64 = 60;

fn options() -> ProjectorOptions {
    let mut options = ProjectorOptions::default();
    // Small pages and batches: many commits per second, so kills land in every step.
    options.read_page_events = 40;
    options.commit_events_max = 25;
    options.retry_backoff_min = Duration::from_millis(1);
    options.retry_backoff_max = Duration::from_millis(20);
    options
}

fn projections(v2: bool) -> Vec<Arc<dyn Projection>> {
    let mut all: Vec<Arc<dyn Projection>> = vec![Arc::new(Accounts::v1())];
    if v2 {
        all.push(Arc::new(Accounts::v2()));
    }
    all
}

async fn open(dir: &Path) -> (Arc<EmbeddedStore>, Arc<EmbeddedFeedStore>) {
    let events = EmbeddedStore::open(dir).unwrap();
    let feeds = EmbeddedFeedStore::open(&events).unwrap();
    (Arc::new(events), Arc::new(feeds))
}

/// The child: opens the store, starts the projectors and the appenders, and runs until killed.
/// Does nothing in a normal test run.
#[test]
fn child_projector() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let seed: u64 = std::env::var(CHILD_SEED_ENV).unwrap().parse().unwrap();
    let v2 = std::env::var_os(CHILD_V2_ENV).is_some();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let (events, feeds) = open(Path::new(&dir)).await;
        let mut builder = Projectors::builder().options(options());
        for projection in projections(v2) {
            builder = builder.projection_arc(projection);
        }
        let _projectors = builder
            .start(Arc::clone(&events), Arc::clone(&feeds))
            .await
            .unwrap();
        for task in 0..APPENDERS {
            let events = Arc::clone(&events);
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed ^ task);
                loop {
                    let account = rng.random_range(0..20);
                    let n = rng.random_range(0..1_000_000);
                    append(&*events, account, n, rng.random_range(1..4)).await;
                }
            });
        }
        say("RUNNING");
        tokio::time::sleep(Duration::from_secs(CHILD_LIFETIME_SECS)).await;
    });
}

/// Each feed is exactly the projection of the log up to its cursor.
async fn check_consistent(dir: &Path, v2: bool) {
    let (events, feeds) = open(dir).await;
    for projection in projections(v2) {
        let feed = projection.feed();
        let Some(state) = feeds.feed(&feed).await.unwrap() else {
            continue;
        };
        assert!(state.cursor <= events.head_position(), "{state:?}");
        let expected = build_feed_until(&*events, &*projection, Some(state.cursor))
            .await
            .unwrap();
        let got = read_whole_feed(&*feeds, &feed).await;
        assert_numbered(&got);
        assert_eq!(
            got.len(),
            expected.len(),
            "{feed} at cursor {}",
            state.cursor
        );
        assert!(
            got == expected,
            "{feed} differs from the offline build at cursor {}",
            state.cursor
        );
        assert_eq!(state.head.0, got.len() as u64);
    }
}

#[test]
fn killed_projectors_leave_feeds_equal_to_the_offline_build() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let seed = std::env::var(SEED_ENV)
        .ok()
        .map_or_else(rand::random::<u64>, |s| s.parse().unwrap());
    eprintln!("{SEED_ENV}={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    for cycle in 0..CYCLES {
        let v2 = cycle >= V2_FROM_CYCLE;
        let mut env = vec![
            (CHILD_ENV, dir.path().display().to_string()),
            (CHILD_SEED_ENV, rng.random::<u64>().to_string()),
        ];
        if v2 {
            env.push((CHILD_V2_ENV, "1".to_owned()));
        }
        let mut child = ChildProcess::spawn("crash::child_projector", &env);
        child.wait_for("RUNNING", Duration::from_secs(START_TIMEOUT_SECS), |_| {});
        std::thread::sleep(Duration::from_millis(rng.random_range(KILL_AFTER_MILLIS)));
        child.kill();
        runtime.block_on(check_consistent(dir.path(), v2));
    }
    eprintln!("{CYCLES} kills in {:.1} s", started.elapsed().as_secs_f64());

    // After the last kill: the projectors catch up, and each feed equals the offline build.
    runtime.block_on(async {
        let (events, feeds) = open(dir.path()).await;
        let mut builder = Projectors::builder().options(options());
        for projection in projections(true) {
            builder = builder.projection_arc(projection);
        }
        let projectors = builder
            .start(Arc::clone(&events), Arc::clone(&feeds))
            .await
            .unwrap();
        let head = events.head_position();
        assert!(head.0 > 1_000, "the children appended only {head} events");
        for projection in projections(true) {
            let feed = projection.feed();
            wait_caught_up(&mut projectors.watch(&feed).unwrap(), head).await;
            let offline = build_feed(&*events, &*projection).await.unwrap();
            let projected = read_whole_feed(&*feeds, &feed).await;
            assert_eq!(projected.len(), offline.len(), "{feed}");
            assert!(
                projected == offline,
                "{feed} differs from the offline build"
            );
        }
        for (feed, outcome) in projectors.shutdown().await {
            assert!(
                matches!(outcome, Ok(Stopped::Shutdown)),
                "{feed}: {outcome:?}"
            );
        }
    });
}
