//! The embedded feed store beyond the conformance suite: damage reported and never served, a
//! feeds file that does not belong to its log, `verify` on feeds, the read-only view.

use headwater_core::{FeedId, FeedPosition, FeedStatus, Position, Sequence};
use headwater_embedded::{EmbeddedFeedStore, OpenError, Problem, verify};
use headwater_store::conformance::feed::{batch, subject};
use headwater_store::{FeedError, FeedStore};

use crate::feed_conformance::open_feeds;

fn feed() -> FeedId {
    FeedId::parse("accounts.v1").unwrap()
}

fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

#[track_caller]
fn assert_corrupt<T: std::fmt::Debug>(result: Result<T, FeedError>, what: &str) {
    match result {
        Err(FeedError::Corrupt { feed: f, detail }) => {
            assert_eq!(f, feed(), "{what}");
            assert!(detail.contains("checksum"), "{what}: {detail}");
        }
        other => panic!("{what}: expected Corrupt, got {other:?}"),
    }
}

/// Commits 10 events (subjects a, b alternating) of which the 6th carries `marker`.
async fn feed_with_marker(dir: &std::path::Path, marker: &str) {
    let feeds = open_feeds(dir).await;
    feeds.register(&feed()).await.unwrap();
    let subjects: Vec<(&str, u64)> = (1..=10)
        .map(|i| (if i % 2 == 0 { "a" } else { "b" }, i))
        .collect();
    let mut batch = batch(0, 10, &subjects);
    batch.events[5].data = format!("{{\"marker\":\"{marker}\"}}").into_bytes();
    feeds.commit(&feed(), batch).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_feed_event_is_reported_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("corrupt-me-{}", uuid::Uuid::new_v4().simple());
    feed_with_marker(dir.path(), &marker).await;
    // Closed cleanly: everything is in the feeds file.
    let file = dir.path().join("feeds.sqlite3");
    let mut bytes = std::fs::read(&file).unwrap();
    let found = find_all(&bytes, marker.as_bytes());
    assert_eq!(found.len(), 1, "the marker is stored once");
    bytes[found[0] + 3] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();

    let report = verify(dir.path(), &mut |_| {}).unwrap();
    assert!(!report.is_clean());
    assert!(
        report.problems.iter().any(|p| matches!(
            p,
            Problem::FeedDamage { feed, detail } if feed == "accounts.v1" && detail.contains("checksum")
        )),
        "{report:#?}"
    );

    let feeds = open_feeds(dir.path()).await;
    let before = feeds
        .read_feed(&feed(), FeedPosition::START, 5)
        .await
        .unwrap();
    assert_eq!(before.len(), 5, "events before the damage are served");
    assert_corrupt(
        feeds.read_feed(&feed(), FeedPosition::START, 100).await,
        "read_feed over it",
    );
    assert_corrupt(
        feeds.read_feed(&feed(), FeedPosition(5), 1).await,
        "read_feed of it",
    );
    let after = feeds
        .read_feed(&feed(), FeedPosition(6), 100)
        .await
        .unwrap();
    assert_eq!(after.len(), 4, "events after the damage are served");
    // The 6th event is subject a's 3rd.
    assert_corrupt(
        feeds
            .read_subject(&feed(), &subject("a"), Sequence::START, 100)
            .await,
        "read_subject over it",
    );
    let b = feeds
        .read_subject(&feed(), &subject("b"), Sequence::START, 100)
        .await
        .unwrap();
    assert_eq!(b.len(), 5, "the other subject is served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_subject_row_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    feed_with_marker(dir.path(), "x").await;
    {
        // A row rewritten without its checksum: subject a's events now seem to be c's.
        let conn = rusqlite::Connection::open(dir.path().join("feeds.sqlite3")).unwrap();
        conn.execute("UPDATE subjects SET subject = 'c' WHERE subject = 'a'", [])
            .unwrap();
    }
    let report = verify(dir.path(), &mut |_| {}).unwrap();
    assert!(
        report.problems.iter().any(
            |p| matches!(p, Problem::FeedDamage { detail, .. } if detail.contains("checksum"))
        ),
        "{report:#?}"
    );
    let feeds = open_feeds(dir.path()).await;
    assert_corrupt(
        feeds
            .read_subject(&feed(), &subject("c"), Sequence::START, 10)
            .await,
        "read_subject",
    );
    assert_corrupt(feeds.subjects(&feed(), None, 10).await, "subjects");
    // A commit touching the subject refuses to number on from a damaged row.
    let error = feeds
        .commit(&feed(), batch(10, 11, &[("c", 11)]))
        .await
        .unwrap_err();
    assert!(matches!(error, FeedError::Corrupt { .. }), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_holes_and_wrong_heads() {
    let dir = tempfile::tempdir().unwrap();
    feed_with_marker(dir.path(), "x").await;
    let clean = verify(dir.path(), &mut |_| {}).unwrap();
    assert!(clean.is_clean(), "{clean:#?}");
    assert_eq!((clean.feeds_checked, clean.feed_events_checked), (1, 10));
    {
        // Whole rows removed (their checksums are fine): a hole in the feed and in a subject.
        let conn = rusqlite::Connection::open(dir.path().join("feeds.sqlite3")).unwrap();
        for position in [4i64, 10] {
            let key = (1i64 << 40) | position;
            conn.execute("DELETE FROM feed_events WHERE key = ?1", [key])
                .unwrap();
            conn.execute("DELETE FROM subject_events WHERE key = ?1", [key])
                .unwrap();
        }
        // And an index entry whose event is gone.
        conn.execute("DELETE FROM feed_events WHERE key = ?1", [(1i64 << 40) | 7])
            .unwrap();
    }
    let report = verify(dir.path(), &mut |_| {}).unwrap();
    let problems = &report.problems;
    assert!(
        problems.iter().any(|p| matches!(
            p,
            Problem::FeedPositionGap {
                after: 3,
                next: 5,
                ..
            }
        )),
        "{report:#?}"
    );
    assert!(
        problems.iter().any(|p| matches!(
            p,
            Problem::FeedHeadMismatch {
                head: 10,
                last: 9,
                ..
            }
        )),
        "{report:#?}"
    );
    assert!(
        problems.iter().any(|p| matches!(
            p,
            Problem::SequenceGap { subject, after: 1, next: 3, .. } if subject == "a"
        )),
        "{report:#?}"
    );
    assert!(
        problems.iter().any(|p| matches!(
            p,
            Problem::FeedDamage { detail, .. } if detail.contains("the index entry points at key")
        )),
        "{report:#?}"
    );
    assert!(
        problems.iter().any(|p| matches!(
            p,
            Problem::FeedDamage { detail, .. } if detail.contains("the subject index holds 8 entries for 7")
        )),
        "{report:#?}"
    );
    // Reads refuse to serve across the hole.
    let feeds = open_feeds(dir.path()).await;
    let error = feeds
        .read_feed(&feed(), FeedPosition::START, 10)
        .await
        .unwrap_err();
    assert!(matches!(error, FeedError::Corrupt { .. }), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feeds_of_another_log_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let long = dir.path().join("long");
    {
        let feeds = open_feeds(&long).await;
        feeds.register(&feed()).await.unwrap();
        feeds
            .commit(&feed(), batch(0, 900, &[("a", 5)]))
            .await
            .unwrap();
    }
    // Another store whose log is shorter than the feed's cursor.
    let short = dir.path().join("short");
    {
        let store = crate::support::open(&short);
        use headwater_store::EventStore;
        store
            .append(
                &headwater_store::conformance::stream("s"),
                headwater_core::ExpectedVersion::Any,
                headwater_store::conformance::events(10),
            )
            .await
            .unwrap();
    }
    std::fs::copy(long.join("feeds.sqlite3"), short.join("feeds.sqlite3")).unwrap();
    let report = verify(&short, &mut |_| {}).unwrap();
    assert!(
        report.problems.iter().any(|p| matches!(
            p,
            Problem::FeedAheadOfLog {
                cursor: Position(900),
                head: Position(10),
                ..
            }
        )),
        "{report:#?}"
    );
    let store = crate::support::open(&short);
    match store.feeds() {
        Err(OpenError::FeedAheadOfLog { cursor, head, .. }) => {
            assert_eq!((cursor, head), (Position(900), Position(10)));
        }
        other => panic!("expected FeedAheadOfLog, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_only_view_reads_a_live_store_and_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        EmbeddedFeedStore::open_read_only(dir.path()),
        Err(OpenError::Io { .. })
    ));
    let feeds = open_feeds(dir.path()).await;
    feeds.register(&feed()).await.unwrap();
    feeds
        .commit(&feed(), batch(0, 3, &[("a", 1), ("b", 3)]))
        .await
        .unwrap();
    feeds.set_status(&feed(), FeedStatus::Live).await.unwrap();

    let view = EmbeddedFeedStore::open_read_only(dir.path()).unwrap();
    assert_eq!(view.feeds().await.unwrap(), feeds.feeds().await.unwrap());
    assert_eq!(
        view.read_feed(&feed(), FeedPosition::START, 10)
            .await
            .unwrap(),
        feeds
            .read_feed(&feed(), FeedPosition::START, 10)
            .await
            .unwrap()
    );
    assert_eq!(*view.watch_head(&feed()).borrow(), FeedPosition(2));
    assert!(view.register(&feed()).await.is_err());
    assert!(view.commit(&feed(), batch(3, 4, &[])).await.is_err());
    // A feed registered after the view opened is found.
    let later = FeedId::parse("accounts.v2").unwrap();
    feeds.register(&later).await.unwrap();
    feeds
        .commit(&later, batch(0, 1, &[("z", 1)]))
        .await
        .unwrap();
    assert_eq!(
        view.read_feed(&later, FeedPosition::START, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(matches!(
        view.read_feed(&FeedId::parse("other.v1").unwrap(), FeedPosition::START, 10)
            .await,
        Err(FeedError::UnknownFeed(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feeds_is_one_store_per_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::support::open(dir.path());
    let one = store.feeds().unwrap();
    let two = store.feeds().unwrap();
    one.register(&feed()).await.unwrap();
    let mut watch = two.watch_head(&feed());
    assert_eq!(one.path(), two.path());
    drop(store);
    // The feeds keep the store (and its lock) open.
    assert!(matches!(
        headwater_embedded::EmbeddedStore::open(dir.path()),
        Err(OpenError::Locked { .. })
    ));
    assert!(two.feed(&feed()).await.unwrap().is_some());
    drop((one, two));
    assert!(
        watch.changed().await.is_err(),
        "closed with the last handle"
    );
    let reopened = crate::support::open(dir.path());
    assert!(
        reopened
            .feeds()
            .unwrap()
            .feed(&feed())
            .await
            .unwrap()
            .is_some()
    );
}

/// A follower that commits as soon as it has read events must never be refused as "past the
/// log's head": readers see a log commit an instant before the log's head watch moves, and the
/// feed store's check against that watch must wait that instant out. (Found by `headwater bench`:
/// a live projector behind busy writers stopped with an `Invalid` batch.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_right_behind_busy_writers_is_never_refused() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use headwater_core::ExpectedVersion;
    use headwater_store::EventStore;
    use headwater_store::conformance::{events, stream};

    /// Commits the follower must make before the test ends.
    const COMMITS: u64 = 100;
    let dir = tempfile::tempdir().unwrap();
    // Widens the instant between a commit readers see and the head watch moving.
    let mut options = headwater_embedded::Options::default();
    options.after_commit = Some(Arc::new(|| {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }));
    let store =
        Arc::new(headwater_embedded::EmbeddedStore::open_with(dir.path(), options).unwrap());
    let feeds = store.feeds().unwrap();
    feeds.register(&feed()).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
            tokio::spawn(async move {
                let stream = stream(&format!("w{w}"));
                while !stop.load(Ordering::Relaxed) {
                    store
                        .append(&stream, ExpectedVersion::Any, events(1))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let mut cursor = Position::START;
    let mut commits = 0;
    while commits < COMMITS {
        let page = store.read_all(cursor, 1_000).await.unwrap();
        let Some(last) = page.last() else {
            tokio::task::yield_now().await;
            continue;
        };
        let to = last.position;
        let batch = batch(cursor.get(), to.get(), &[("a", to.get())]);
        let result = feeds.commit(&feed(), batch).await;
        if let Err(error) = result {
            stop.store(true, Ordering::Relaxed);
            panic!("commit {commits} to {to} refused: {error}");
        }
        cursor = to;
        commits += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
}

/// A feed commit that fails (here a full disk: `max_page_count`) writes nothing and poisons the
/// feeds' writer: later commits are refused until the store is reopened (an fsync is never
/// retried), reads go on, and after a reopen the feed is as it was before the failed commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_feed_commit_writes_nothing_and_poisons_until_reopen() {
    use headwater_core::{ErrorKind, ExpectedVersion};
    use headwater_store::conformance::{events, stream};
    use headwater_store::{EventStore, ProjectedEvent, ProjectorBatch};

    let dir = tempfile::tempdir().unwrap();
    let mut options = headwater_embedded::Options::default();
    // Room for the log's few events and the feeds' schema, not for a large batch.
    options.max_page_count = Some(64);
    {
        let store = headwater_embedded::EmbeddedStore::open_with(dir.path(), options).unwrap();
        store
            .append(&stream("s"), ExpectedVersion::Any, events(10))
            .await
            .unwrap();
        let feeds = store.feeds().unwrap();
        feeds.register(&feed()).await.unwrap();
        feeds
            .commit(&feed(), batch(0, 2, &[("a", 1), ("b", 2)]))
            .await
            .unwrap();

        let big: Vec<ProjectedEvent> = (0..2_000)
            .map(|i| {
                let mut event = headwater_store::conformance::feed::projected("c", 3);
                event.data = format!("{{\"pad\":\"{}\",\"i\":{i}}}", "x".repeat(400)).into_bytes();
                event
            })
            .collect();
        let too_big = ProjectorBatch {
            from: Position(2),
            to: Position(3),
            events: big,
        };
        let error = feeds.commit(&feed(), too_big).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Internal, "{error}");

        // Poisoned: even a small commit from the unchanged cursor is refused now.
        let error = feeds
            .commit(&feed(), batch(2, 3, &[("c", 3)]))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Internal, "{error}");
        assert!(
            error
                .to_string()
                .contains("refuse writes until the store is reopened"),
            "{error}"
        );
        // Reads go on, and show the feed as before the failed commit.
        let state = feeds.feed(&feed()).await.unwrap().unwrap();
        assert_eq!((state.cursor, state.head), (Position(2), FeedPosition(2)));
        let page = feeds
            .read_feed(&feed(), FeedPosition::START, 100)
            .await
            .unwrap();
        assert_eq!(page.len(), 2);
    }
    // Reopened (with room): as before the failed commit, and writable again.
    let store = crate::support::open(dir.path());
    let feeds = store.feeds().unwrap();
    let state = feeds.feed(&feed()).await.unwrap().unwrap();
    assert_eq!((state.cursor, state.head), (Position(2), FeedPosition(2)));
    feeds
        .commit(&feed(), batch(2, 3, &[("c", 3)]))
        .await
        .unwrap();
    let subjects = feeds.subjects(&feed(), None, 10).await.unwrap();
    assert_eq!(subjects.len(), 3);
}

/// Turns the feeds file in `dir` (closed) into one the previous build made: format 1, without
/// the `publishers` table.
fn downgrade_to_format_1(dir: &std::path::Path) {
    let conn = rusqlite::Connection::open(dir.join("feeds.sqlite3")).unwrap();
    conn.execute_batch(
        "BEGIN; DROP TABLE publishers; PRAGMA user_version = 1; COMMIT;
         PRAGMA wal_checkpoint(TRUNCATE);",
    )
    .unwrap();
}

fn format_version(dir: &std::path::Path) -> i64 {
    let conn = rusqlite::Connection::open(dir.join("feeds.sqlite3")).unwrap();
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feeds_file_of_format_1_is_upgraded_and_keeps_its_feeds() {
    let dir = tempfile::tempdir().unwrap();
    feed_with_marker(dir.path(), "x").await;
    let (events, states) = {
        let feeds = open_feeds(dir.path()).await;
        (
            feeds
                .read_feed(&feed(), FeedPosition::START, 100)
                .await
                .unwrap(),
            feeds.feeds().await.unwrap(),
        )
    };
    assert_eq!(format_version(dir.path()), 2);
    downgrade_to_format_1(dir.path());
    assert_eq!(format_version(dir.path()), 1);

    // Operator tools read it as it is: no publishers, nothing to complain about.
    let view = EmbeddedFeedStore::open_read_only(dir.path()).unwrap();
    assert!(view.publishers(&feed()).await.unwrap().is_empty());
    drop(view);
    let report = verify(dir.path(), &mut |_| {}).unwrap();
    assert!(report.problems.is_empty(), "{report:#?}");
    assert_eq!(
        format_version(dir.path()),
        1,
        "read-only tools upgrade nothing"
    );

    // The service's open upgrades it; the feeds are as they were, and publishers work.
    {
        let feeds = open_feeds(dir.path()).await;
        assert_eq!(feeds.feeds().await.unwrap(), states);
        assert_eq!(
            feeds
                .read_feed(&feed(), FeedPosition::START, 100)
                .await
                .unwrap(),
            events
        );
        assert!(feeds.publishers(&feed()).await.unwrap().is_empty());
        feeds
            .advance_publisher(&feed(), "rabbitmq", FeedPosition::START, FeedPosition(4))
            .await
            .unwrap();
    }
    assert_eq!(format_version(dir.path()), 2);
    let feeds = open_feeds(dir.path()).await;
    let cursors = feeds.publishers(&feed()).await.unwrap();
    assert_eq!(cursors.len(), 1);
    assert_eq!(cursors[0].position, FeedPosition(4));
    let report = verify(dir.path(), &mut |_| {}).unwrap();
    assert!(report.problems.is_empty(), "{report:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_publisher_row_is_reported_not_served() {
    let dir = tempfile::tempdir().unwrap();
    feed_with_marker(dir.path(), "x").await;
    {
        let feeds = open_feeds(dir.path()).await;
        for publisher in ["nats", "rabbitmq"] {
            feeds
                .advance_publisher(&feed(), publisher, FeedPosition::START, FeedPosition(4))
                .await
                .unwrap();
        }
    }
    let clean = verify(dir.path(), &mut |_| {}).unwrap();
    assert!(clean.problems.is_empty(), "{clean:#?}");
    {
        // A cursor moved by hand, without its checksum.
        let conn = rusqlite::Connection::open(dir.path().join("feeds.sqlite3")).unwrap();
        conn.execute(
            "UPDATE publishers SET position = 9 WHERE publisher = 'rabbitmq'",
            [],
        )
        .unwrap();
    }
    let report = verify(dir.path(), &mut |_| {}).unwrap();
    assert!(
        report.problems.iter().any(|p| matches!(
            p,
            Problem::FeedDamage { detail, .. } if detail.contains("publisher") && detail.contains("checksum")
        )),
        "{report:#?}"
    );
    let feeds = open_feeds(dir.path()).await;
    assert_corrupt(feeds.publishers(&feed()).await, "publishers");
    let error = feeds
        .advance_publisher(&feed(), "rabbitmq", FeedPosition(4), FeedPosition(5))
        .await
        .unwrap_err();
    assert!(matches!(error, FeedError::Corrupt { .. }), "{error:?}");
    // The other publisher's row is sound and moves.
    feeds
        .advance_publisher(&feed(), "nats", FeedPosition(4), FeedPosition(5))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_a_publisher_of_no_feed() {
    let dir = tempfile::tempdir().unwrap();
    feed_with_marker(dir.path(), "x").await;
    {
        let feeds = open_feeds(dir.path()).await;
        feeds
            .advance_publisher(&feed(), "nats", FeedPosition::START, FeedPosition(10))
            .await
            .unwrap();
    }
    {
        let conn = rusqlite::Connection::open(dir.path().join("feeds.sqlite3")).unwrap();
        conn.execute(
            "INSERT INTO publishers (feed_id, publisher, position, updated_at, crc) \
             SELECT feed_id + 1, publisher, position, updated_at, crc FROM publishers",
            [],
        )
        .unwrap();
    }
    let report = verify(dir.path(), &mut |_| {}).unwrap();
    assert_eq!(report.problems.len(), 1, "{report:#?}");
    assert!(
        report.problems.iter().any(|p| matches!(
            p,
            Problem::FeedDamage { detail, .. } if detail.contains("does not exist")
        )),
        "{report:#?}"
    );
}
