//! Appends decided in one group commit — on the fast path (`append_group`, every append
//! admitted) and on the slow path (conflicts, recorded ids, replays in the group) — each on the
//! state including the earlier ones, with exactly `MemoryStore`'s answers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use headwater_core::{ExpectedVersion, NewEvent, Position, StreamName, StreamVersion};
use headwater_postgres::{CommitAttempt, Options};
use headwater_store::conformance::{assert_store_invariants, events, stream};
use headwater_store::{AppendError, AppendOutcome, EventStore, MemoryStore};
use tokio::sync::{Notify, oneshot};

use crate::support::Fresh;

/// How long the test waits for the writer or the spawned appends before failing.
const WAIT_MAX: Duration = Duration::from_secs(30);

type Case = (StreamName, ExpectedVersion, Vec<NewEvent>);

/// An append's answer, comparable across stores (errors by their variant and fields).
fn answer(result: &Result<AppendOutcome, AppendError>) -> String {
    match result {
        Ok(outcome) => format!("{outcome:?}"),
        Err(AppendError::Conflict {
            stream,
            expected,
            actual,
        }) => format!("conflict {stream} {expected} {actual:?}"),
        Err(AppendError::DuplicateEventId {
            event_id,
            stream,
            stream_version,
        }) => format!("duplicate {event_id} {stream} {stream_version}"),
        Err(other) => format!("unexpected {other:?}"),
    }
}

/// Yields to the other tasks of this (current-thread) runtime until `done`, or fails after
/// [`WAIT_MAX`].
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_MAX;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::task::yield_now().await;
    }
}

/// Runs `cases` as one group (behind a plug append that holds the writer in its commit hook)
/// and compares every answer with `MemoryStore`'s, one append after the other.
async fn one_group(fresh: &Fresh, cases: Vec<Case>) -> headwater_postgres::PostgresStore {
    let reference = MemoryStore::new();
    let mut expected = Vec::new();
    for (name, version, new) in &cases {
        expected.push(answer(&reference.append(name, *version, new.clone()).await));
    }

    let (entered_tx, entered_rx) = oneshot::channel::<()>();
    let entered_tx = Mutex::new(Some(entered_tx));
    let release = Arc::new(Notify::new());
    let groups = Arc::new(Mutex::new(Vec::new()));
    let mut options: Options = fresh.options();
    options.before_commit = Some({
        let groups = groups.clone();
        let release = release.clone();
        Arc::new(move |attempt: CommitAttempt| {
            groups.lock().unwrap().push(attempt.appends);
            let plug = attempt.number == 1;
            if plug {
                let _ = entered_tx.lock().unwrap().take().unwrap().send(());
            }
            let release = release.clone();
            Box::pin(async move {
                if plug {
                    tokio::time::timeout(WAIT_MAX, release.notified())
                        .await
                        .map_err(|_| "the test never released the plug".to_owned())?;
                }
                Ok(())
            })
        })
    });
    let store = fresh.connect(options).await;
    let plug = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .append(&stream("plug"), ExpectedVersion::Any, events(1))
                .await
        })
    };
    tokio::time::timeout(WAIT_MAX, entered_rx)
        .await
        .expect("the writer holds the plug")
        .unwrap();
    let queued = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (name, version, new) in cases.clone() {
        let store = store.clone();
        let queued = queued.clone();
        tasks.push(tokio::spawn(async move {
            // On this current-thread runtime the append runs from here to its queueing without
            // yielding (the queue has room), so `queued` counts queued appends.
            queued.fetch_add(1, Ordering::SeqCst);
            store.append(&name, version, new).await
        }));
    }
    until("the appends to queue", || {
        queued.load(Ordering::SeqCst) == cases.len()
    })
    .await;
    release.notify_one();
    plug.await.unwrap().unwrap();
    let mut got = Vec::new();
    for task in tasks {
        // The plug took position 1: shift the positions back to compare.
        let result = task.await.unwrap().map(|o| AppendOutcome {
            first_position: Position(o.first_position.0 - 1),
            last_position: Position(o.last_position.0 - 1),
            ..o
        });
        got.push(answer(&result));
    }
    assert_eq!(
        *groups.lock().unwrap(),
        [1, cases.len()],
        "the cases formed one group"
    );
    for (i, (got, expected)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(got, expected, "case {i}");
    }
    assert_store_invariants(&store).await;
    store
}

#[tokio::test]
async fn one_group_on_the_fast_path_decides_like_the_reference() {
    let (x, y, z) = (stream("x"), stream("y"), stream("z"));
    let cases: Vec<Case> = vec![
        (x.clone(), ExpectedVersion::NoStream, events(2)),
        (y.clone(), ExpectedVersion::Any, events(1)),
        (
            x.clone(),
            ExpectedVersion::Exact(StreamVersion(2)),
            events(3),
        ),
        (y.clone(), ExpectedVersion::StreamExists, events(2)),
        (z.clone(), ExpectedVersion::NoStream, events(1)),
        (x.clone(), ExpectedVersion::Any, events(1)),
    ];
    let fresh = Fresh::new();
    let store = one_group(&fresh, cases).await;
    assert_eq!(store.stream_head(&x).await.unwrap(), Some(StreamVersion(6)));
    assert_eq!(store.stream_head(&y).await.unwrap(), Some(StreamVersion(3)));
    assert_eq!(store.stream_head(&z).await.unwrap(), Some(StreamVersion(1)));
}

#[tokio::test]
async fn one_group_on_the_slow_path_decides_like_the_reference() {
    let x = stream("x");
    let y = stream("y");
    let first = events(2);
    let fresh = events(4);
    let cases: Vec<Case> = vec![
        (x.clone(), ExpectedVersion::NoStream, first.clone()),
        // Conflicts with the append before it in the same group.
        (x.clone(), ExpectedVersion::NoStream, events(1)),
        // Its second id was recorded by the first append: refused, its first event undone.
        (
            x.clone(),
            ExpectedVersion::Exact(StreamVersion(2)),
            vec![fresh[0].clone(), first[0].clone()],
        ),
        // So this one lands at version 3, right after the first append.
        (
            x.clone(),
            ExpectedVersion::Exact(StreamVersion(2)),
            vec![fresh[0].clone()],
        ),
        // A retry of the first append in the same group: replayed.
        (x.clone(), ExpectedVersion::NoStream, first.clone()),
        // A new stream whose append is refused leaves no stream behind.
        (
            y.clone(),
            ExpectedVersion::Any,
            vec![fresh[1].clone(), first[1].clone()],
        ),
        (
            y.clone(),
            ExpectedVersion::StreamExists,
            vec![fresh[2].clone()],
        ),
        (y.clone(), ExpectedVersion::NoStream, vec![fresh[3].clone()]),
    ];
    let fresh = Fresh::new();
    let store = one_group(&fresh, cases).await;
    assert_eq!(store.stream_head(&x).await.unwrap(), Some(StreamVersion(3)));
    assert_eq!(store.stream_head(&y).await.unwrap(), Some(StreamVersion(1)));
}

#[tokio::test]
async fn a_recorded_id_sends_an_admitted_group_to_the_slow_path() {
    let x = stream("x");
    let first = events(2);
    let cases: Vec<Case> = vec![
        (x.clone(), ExpectedVersion::Any, first.clone()),
        (stream("w"), ExpectedVersion::Any, events(1)),
        // Admitted by its expectation, but a retry: the group's insert hits the id index.
        (x.clone(), ExpectedVersion::Any, first.clone()),
        (x.clone(), ExpectedVersion::Any, events(1)),
    ];
    let fresh = Fresh::new();
    let store = one_group(&fresh, cases).await;
    assert_eq!(store.stream_head(&x).await.unwrap(), Some(StreamVersion(3)));
}
