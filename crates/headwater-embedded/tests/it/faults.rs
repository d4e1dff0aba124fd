//! Write failures poison the store: the failed group's appends get `Backend`, every later append
//! `Poisoned`, reads go on, and a reopened store holds exactly the acknowledged appends.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use headwater_core::{ErrorKind, ExpectedVersion, NewEvent, RecordedEvent};
use headwater_embedded::{CommitAttempt, EmbeddedStore, Options};
use headwater_store::conformance::{event, events, stream};
use headwater_store::{AppendError, EventStore};

use crate::support::{assert_head, chain, open, open_with, whole_log};

/// Checks that `log` holds exactly `acknowledged`, in order.
fn assert_holds(log: &[RecordedEvent], acknowledged: &[NewEvent]) {
    assert_eq!(
        log.len(),
        acknowledged.len(),
        "the log holds the acknowledged events only"
    );
    for (recorded, new) in log.iter().zip(acknowledged) {
        assert!(recorded.records(new), "{recorded:?} vs {new:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_commit_poisons_until_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let fail_at = Arc::new(AtomicU64::new(u64::MAX));
    let failed_group = Arc::new(AtomicUsize::new(0));
    let mut options = Options::default();
    options.before_commit = Some({
        let fail_at = fail_at.clone();
        let failed_group = failed_group.clone();
        Arc::new(move |attempt: &CommitAttempt| {
            if attempt.number == fail_at.load(Ordering::SeqCst) {
                failed_group.store(attempt.appends, Ordering::SeqCst);
                return Err(io::Error::other("injected fsync failure"));
            }
            Ok(())
        })
    });
    let store = open_with(dir.path(), options);
    let mut acknowledged = Vec::new();
    for i in 0..5 {
        let batch = events(1 + i % 3);
        store
            .append(
                &stream(&format!("ok{i}")),
                ExpectedVersion::Any,
                batch.clone(),
            )
            .await
            .unwrap();
        acknowledged.extend(batch);
    }
    let head = store.head_position();

    // The sixth commit fails, whatever appends it groups.
    fail_at.store(6, Ordering::SeqCst);
    let mut tasks = Vec::new();
    for w in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .append(
                    &stream(&format!("lost{w}")),
                    ExpectedVersion::Any,
                    events(2),
                )
                .await
        }));
    }
    let mut backend = 0;
    for task in tasks {
        match task.await.unwrap() {
            Err(AppendError::Backend(e)) => {
                backend += 1;
                let text = chain(&*e);
                assert!(text.contains("injected fsync failure"), "{text}");
            }
            Err(AppendError::Poisoned) => {}
            other => panic!("an append after a failed commit gave {other:?}"),
        }
    }
    assert!(backend >= 1, "the failed group's appends are told");
    assert_eq!(
        backend,
        failed_group.load(Ordering::SeqCst),
        "every append of the failed group got the failure"
    );

    // From now on every append is refused, even one the hook would let through.
    fail_at.store(u64::MAX, Ordering::SeqCst);
    let err = store
        .append(&stream("later"), ExpectedVersion::Any, events(1))
        .await
        .unwrap_err();
    assert!(matches!(err, AppendError::Poisoned), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Unavailable);

    // Reads go on, and show only what was acknowledged.
    assert_eq!(store.head_position(), head);
    assert_holds(&whole_log(&store).await, &acknowledged);
    drop(store);

    let store = open(dir.path());
    assert_eq!(store.head_position(), head);
    assert_holds(&whole_log(&store).await, &acknowledged);
    let outcome = store
        .append(&stream("after"), ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    assert_eq!(outcome.first_position, head.next(), "positions go on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_poisons_until_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = Options::default();
    // 64 pages of 4 KiB: the schema takes a few, each event below about three.
    options.max_page_count = Some(64);
    let store = open_with(dir.path(), options);
    let mut acknowledged = Vec::new();
    let mut failure = None;
    for i in 0..1_000 {
        let new = event(vec![b'x'; 8 * 1024]);
        match store
            .append(
                &stream(&format!("s{i}")),
                ExpectedVersion::NoStream,
                vec![new.clone()],
            )
            .await
        {
            Ok(_) => acknowledged.push(new),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("the database filled up");
    assert!(!acknowledged.is_empty(), "some appends fit");
    match &failure {
        AppendError::Backend(e) => {
            let text = chain(&**e);
            assert!(text.contains("full"), "{text}");
        }
        other => panic!("a full database gave {other:?}"),
    }
    let err = store
        .append(&stream("tiny"), ExpectedVersion::Any, vec![event(vec![])])
        .await
        .unwrap_err();
    assert!(matches!(err, AppendError::Poisoned), "{err:?}");
    assert_holds(&whole_log(&store).await, &acknowledged);
    drop(store);

    let store = open(dir.path());
    assert_head(&store, acknowledged.len() as u64);
    assert_holds(&whole_log(&store).await, &acknowledged);
    store
        .append(&stream("roomy"), ExpectedVersion::Any, events(3))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_closes_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let clone = store.clone();
    store
        .append(&stream("a"), ExpectedVersion::Any, events(3))
        .await
        .unwrap();
    let watch = store.watch_head();
    drop(store);
    // A clone keeps the store open.
    clone
        .append(&stream("a"), ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    drop(clone);
    assert!(
        watch.has_changed().is_err(),
        "the head watch ends with the store"
    );
    // The WAL was checkpointed into the database and removed.
    let wal = dir.path().join("events.sqlite3-wal");
    let wal_bytes = std::fs::metadata(&wal).map_or(0, |m| m.len());
    assert_eq!(
        wal_bytes,
        0,
        "{} is left with {wal_bytes} bytes",
        wal.display()
    );
    let store: EmbeddedStore = open(dir.path());
    assert_head(&store, 4);
}
