//! Appends decided in one group commit: each on the state including the earlier ones, a refused
//! one leaving no trace, with exactly `MemoryStore`'s answers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use headwater_core::{ExpectedVersion, NewEvent, StreamName, StreamVersion};
use headwater_embedded::{CommitAttempt, Options};
use headwater_store::conformance::{assert_store_invariants, events, stream};
use headwater_store::{AppendError, AppendOutcome, EventStore, MemoryStore};

use crate::support::open_with;

/// How long the test waits for the writer or the spawned appends before failing.
const WAIT_MAX: Duration = Duration::from_secs(30);

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

#[tokio::test]
async fn one_group_decides_like_the_reference() {
    let x = stream("x");
    let y = stream("y");
    let first = events(2);
    let fresh = events(4);
    type Case = (StreamName, ExpectedVersion, Vec<NewEvent>);
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

    // The reference, one append after the other.
    let reference = MemoryStore::new();
    let mut expected = Vec::new();
    for (name, version, new) in &cases {
        expected.push(answer(&reference.append(name, *version, new.clone()).await));
    }

    // The embedded store: a plug append holds the writer in its commit hook while the cases
    // queue up behind it, so that they all form the next group.
    let (entered_tx, entered) = mpsc::channel::<()>();
    let (release, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let groups = Arc::new(Mutex::new(Vec::new()));
    let mut options = Options::default();
    options.before_commit = Some({
        let groups = groups.clone();
        Arc::new(move |attempt: &CommitAttempt| {
            groups.lock().unwrap().push(attempt.appends);
            if attempt.number == 1 {
                entered_tx.send(()).unwrap();
                release_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(WAIT_MAX)
                    .expect("the test releases the plug");
            }
            Ok(())
        })
    });
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), options);
    let plug = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .append(&stream("plug"), ExpectedVersion::Any, events(1))
                .await
        })
    };
    until("the writer to hold the plug", || entered.try_recv().is_ok()).await;
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
    release.send(()).unwrap();
    plug.await.unwrap().unwrap();
    let mut got = Vec::new();
    for task in tasks {
        let result = task.await.unwrap();
        // The plug took position 1: shift the embedded positions back to compare.
        let result = result.map(|o| AppendOutcome {
            first_position: headwater_core::Position(o.first_position.0 - 1),
            last_position: headwater_core::Position(o.last_position.0 - 1),
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
    assert_eq!(store.stream_head(&x).await.unwrap(), Some(StreamVersion(3)));
    assert_eq!(store.stream_head(&y).await.unwrap(), Some(StreamVersion(1)));
    assert_store_invariants(&store).await;
}
