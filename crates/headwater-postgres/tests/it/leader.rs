//! Leader election: two follower processes (this test binary re-executed) on one database; the
//! leader appends "term N" events with expected versions (so a second leader writing at the same
//! time would conflict visibly); the parent checks `pg_locks` throughout, kills the leader with
//! SIGKILL, and the other process must take over within seconds. In-process: a leader whose
//! session is terminated learns it at once, and another takes over with a greater term.

use std::time::{Duration, Instant};

use headwater_core::{EventType, ExpectedVersion, StreamName, StreamVersion};
use headwater_postgres::{LeaderElection, Options, PostgresStore};
use headwater_store::conformance::event;
use headwater_store::{AppendError, EventStore};

use crate::support::Fresh;
use headwater_testkit::process::{ChildProcess, say};

const CHILD_URL_ENV: &str = "HEADWATER_PG_LEADER_CHILD_URL";
const CHILD_SCHEMA_ENV: &str = "HEADWATER_PG_LEADER_CHILD_SCHEMA";
const CHILD_ID_ENV: &str = "HEADWATER_PG_LEADER_CHILD_ID";

/// The follower whose leader is elected.
const FOLLOWER: &str = "projector";
/// The stream the leaders write to.
const LOG_STREAM: &str = "leader-log";
/// How long a leader waits between two appends, in milliseconds.
const WRITE_EVERY_MILLIS: u64 = 20;
/// Election settings of the children, in milliseconds: short, so the test is quick.
const RETRY_MILLIS: u64 = 100;
const HEALTH_CHECK_MILLIS: u64 = 100;
/// The longest a takeover may take after the leader died (the requirement: within seconds).
const TAKEOVER_SECS_MAX: u64 = 10;
/// How long the parent watches both children before it kills the leader, in milliseconds.
const WATCH_MILLIS: u64 = 600;
/// The child stops by itself after this long, in seconds.
const CHILD_LIFETIME_SECS: u64 = 60;
/// How long the parent waits for a child's line, in seconds.
const WAIT_SECS: u64 = 30;

fn election(store: &PostgresStore) -> LeaderElection {
    let mut election = store.leader_election(FOLLOWER);
    election.retry_interval = Duration::from_millis(RETRY_MILLIS);
    election.health_check_interval = Duration::from_millis(HEALTH_CHECK_MILLIS);
    election
}

/// A follower process: leads when it can, and while it leads appends `term T by ID` events,
/// each expecting the version it last saw. Does nothing in a normal test run.
#[test]
fn child_follower() {
    let Ok(url) = std::env::var(CHILD_URL_ENV) else {
        return;
    };
    let schema = std::env::var(CHILD_SCHEMA_ENV).unwrap();
    let id = std::env::var(CHILD_ID_ENV).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = PostgresStore::connect(&url, Options::with_schema(schema))
            .await
            .unwrap();
        let election = election(&store);
        let stream = StreamName::new(LOG_STREAM).unwrap();
        let stop = Instant::now() + Duration::from_secs(CHILD_LIFETIME_SECS);
        say("STARTED");
        while Instant::now() < stop {
            let leadership = election.acquire().await.unwrap();
            let term = leadership.term();
            say(&format!("LEAD {term}"));
            let mut version = store.stream_head(&stream).await.unwrap();
            while leadership.is_leader() && Instant::now() < stop {
                let expected = version.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
                let mut new = event(format!("term {term} by {id}").into_bytes());
                new.event_type = EventType::new("leader.wrote").unwrap();
                match store.append(&stream, expected, vec![new]).await {
                    Ok(outcome) => version = Some(outcome.stream_version),
                    Err(AppendError::Conflict { .. }) => {
                        say(&format!("CONFLICT {term}"));
                        break;
                    }
                    Err(e) => panic!("{e}"),
                }
                tokio::select! {
                    _ = leadership.lost() => say(&format!("LOST {term}")),
                    _ = tokio::time::sleep(Duration::from_millis(WRITE_EVERY_MILLIS)) => {}
                }
            }
        }
    });
}

/// The pids of the sessions holding `key` (bigint advisory lock).
async fn holders(client: &tokio_postgres::Client, key: i64) -> Vec<i32> {
    client
        .query(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
             AND classid = (($1::bigint >> 32) & 4294967295)::oid \
             AND objid = ($1::bigint & 4294967295)::oid",
            &[&key],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn spawn_child(fresh: &Fresh, id: &str) -> ChildProcess {
    ChildProcess::spawn(
        "leader::child_follower",
        &[
            (CHILD_URL_ENV, fresh.url.clone()),
            (CHILD_SCHEMA_ENV, fresh.schema.clone()),
            (CHILD_ID_ENV, id.to_owned()),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_process_takes_over_when_the_leader_dies() {
    let fresh = Fresh::new();
    let store = fresh.connect(fresh.options()).await;
    let key = store.leader_election(FOLLOWER).lock_key();
    let client = fresh.client().await;
    let wait = Duration::from_secs(WAIT_SECS);
    let fail_on = |line: &str| {
        assert!(!line.starts_with("CONFLICT"), "two leaders wrote: {line}");
    };

    let mut a = spawn_child(&fresh, "A");
    a.wait_for("STARTED", wait, fail_on);
    let lead_a = a.wait_for("LEAD", wait, fail_on);
    let mut b = spawn_child(&fresh, "B");
    b.wait_for("STARTED", wait, fail_on);
    // Both run; only A holds the lock, and B does not lead.
    let until = Instant::now() + Duration::from_millis(WATCH_MILLIS);
    let mut samples = 0;
    while Instant::now() < until {
        let pids = holders(&client, key).await;
        assert_eq!(
            pids.len(),
            1,
            "exactly one holder of the leader lock: {pids:?}"
        );
        samples += 1;
    }
    assert!(samples > 0);
    assert!(
        b.line_before(Instant::now()).is_none(),
        "B said something while A leads"
    );

    let killed_at = Instant::now();
    let rest = a.kill();
    for line in &rest {
        fail_on(line);
    }
    let lead_b = b.wait_for("LEAD", Duration::from_secs(TAKEOVER_SECS_MAX), fail_on);
    let takeover = killed_at.elapsed();
    println!("{lead_a} (A) killed; {lead_b} (B) after {takeover:?}");
    let term = |line: &str| line["LEAD ".len()..].parse::<u64>().unwrap();
    assert!(
        term(&lead_b) > term(&lead_a),
        "a new leadership has a greater term"
    );
    // B writes after taking over; then the log shows terms in order, each term by one process.
    let stream = StreamName::new(LOG_STREAM).unwrap();
    let deadline = Instant::now() + wait;
    loop {
        let pids = holders(&client, key).await;
        assert!(pids.len() <= 1, "one holder at most: {pids:?}");
        let log = store
            .read_stream(&stream, StreamVersion::START, 10_000)
            .await
            .unwrap();
        if log
            .last()
            .is_some_and(|e| e.data.ends_with(b" by B") && log.len() > 1)
        {
            break;
        }
        assert!(Instant::now() < deadline, "B never wrote as leader");
        tokio::time::sleep(Duration::from_millis(WRITE_EVERY_MILLIS)).await;
    }
    drop(b);
    let log = store
        .read_stream(&stream, StreamVersion::START, 10_000)
        .await
        .unwrap();
    let mut last: Option<(u64, String)> = None;
    for e in &log {
        let text = String::from_utf8(e.data.clone()).unwrap();
        let words: Vec<&str> = text.split(' ').collect();
        let ["term", t, "by", who] = words.as_slice() else {
            panic!("{text}")
        };
        let t: u64 = t.parse().unwrap();
        if let Some((prev, prev_who)) = &last {
            assert!(
                t >= *prev,
                "term {t} written after term {prev}: two leaders"
            );
            if t == *prev {
                assert_eq!(prev_who, who, "term {t} written by two processes");
            }
        }
        last = Some((t, (*who).to_owned()));
    }
    let by_a = log.iter().filter(|e| e.data.ends_with(b" by A")).count();
    assert!(by_a > 0, "A wrote while it led");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_session_ends_knows_it_and_another_takes_over() {
    let fresh = Fresh::new();
    let store = fresh.connect(fresh.options()).await;
    let first = election(&store);
    let second = election(&store);
    let client = fresh.client().await;
    let leader = first
        .try_acquire()
        .await
        .unwrap()
        .expect("nobody leads yet");
    assert!(leader.is_leader());
    assert!(
        second.try_acquire().await.unwrap().is_none(),
        "one leader at a time"
    );
    let pids = holders(&client, first.lock_key()).await;
    assert_eq!(pids.len(), 1);
    // The leader's connection dies (as when a proxy drops it or an operator ends it).
    client
        .execute("SELECT pg_terminate_backend($1)", &[&pids[0]])
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(WAIT_SECS), leader.lost())
        .await
        .expect("the leader learns it lost its lock");
    assert!(!leader.is_leader());
    let next = tokio::time::timeout(Duration::from_secs(WAIT_SECS), second.acquire())
        .await
        .expect("another takes over")
        .unwrap();
    assert!(next.term() > leader.term());
    // Dropping a leadership releases the lock.
    drop(next);
    let again = tokio::time::timeout(Duration::from_secs(WAIT_SECS), first.acquire())
        .await
        .expect("the lock is free again")
        .unwrap();
    assert!(again.is_leader());
}

/// Options whose elections retry and check quickly.
fn quick(fresh: &Fresh) -> Options {
    let mut options = fresh.options();
    options.leader_retry_interval = Duration::from_millis(RETRY_MILLIS);
    options.leader_health_check_interval = Duration::from_millis(HEALTH_CHECK_MILLIS);
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_a_leadership_one_lease_at_a_time() {
    use headwater_store::Leadership;

    let fresh = Fresh::new();
    let (a, b) = (
        fresh.connect(quick(&fresh)).await,
        fresh.connect(quick(&fresh)).await,
    );
    let client = fresh.client().await;
    let key = a.leader_election("x").lock_key();
    let wait = Duration::from_secs(WAIT_SECS);

    // Both ask; exactly one gets a lease, the other keeps waiting.
    let mut lead_a = Box::pin(a.lead("x"));
    let mut lead_b = Box::pin(b.lead("x"));
    let (first, mut waiting, first_is_a) = tokio::time::timeout(wait, async {
        tokio::select! {
            lease = &mut lead_a => (lease.unwrap(), lead_b, true),
            lease = &mut lead_b => (lease.unwrap(), lead_a, false),
        }
    })
    .await
    .expect("one of them leads");
    assert!(!first.is_lost());
    assert_eq!(holders(&client, key).await.len(), 1);
    // Several of the loser's retries go by: it still waits.
    let retries = Duration::from_millis(RETRY_MILLIS * 5);
    assert!(
        tokio::time::timeout(retries, &mut waiting).await.is_err(),
        "two leases at once"
    );
    // Another follower's election is another lock.
    let other = tokio::time::timeout(wait, if first_is_a { b.lead("y") } else { a.lead("y") })
        .await
        .expect("y is free")
        .unwrap();
    assert!(!other.is_lost());

    // Releasing the lease ends the leadership: the other replica leads.
    drop(first);
    let second = tokio::time::timeout(wait, waiting)
        .await
        .expect("the other takes over once the lease is dropped")
        .unwrap();
    assert!(!second.is_lost());
    let pids = holders(&client, key).await;
    assert_eq!(pids.len(), 1);

    // Its session killed on the server, the leader's lease is lost.
    client
        .execute("SELECT pg_terminate_backend($1)", &[&pids[0]])
        .await
        .unwrap();
    tokio::time::timeout(wait, second.lost())
        .await
        .expect("the lease is lost once the session is gone");
    assert!(second.is_lost());
    assert!(!other.is_lost(), "y's lease is its own");
    // And the first replica may lead again.
    let again = tokio::time::timeout(wait, if first_is_a { a.lead("x") } else { b.lead("x") })
        .await
        .expect("x is free again")
        .unwrap();
    assert!(!again.is_lost());
}
