//! `inspect` and `verify`: a clean store verifies clean, and each kind of damage that can be
//! produced is reported as exactly the problems it causes.

use std::path::Path;

use headwater_core::{EventType, ExpectedVersion, NewEvent, Position, StreamName, StreamVersion};
use headwater_embedded::{
    OpenError, PROBLEMS_RECORDED_MAX, Problem, VerifyProgress, VerifyReport, VerifyStage, inspect,
    verify,
};
use headwater_store::EventStore;
use headwater_store::conformance::{event, events};
use tempfile::TempDir;

use crate::support::open;

/// The marker in the data of the event at position [`MARKED_POSITION`].
const MARKER: &str = "integrity-marker-5f1c2a";
const MARKED_POSITION: u64 = 6;

fn name(name: &str) -> StreamName {
    StreamName::new(name).unwrap()
}

/// A closed store of 10 events (everything checkpointed into the database file):
///
/// | position | 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 | 9 | 10 |
/// |----------|---|---|---|---|---|---|---|---|---|----|
/// | stream   | acct-1 | acct-2 | acct-1 | order-1 | order-1 | acct-1 | acct-2 | acct-1 | acct-2 | acct-1 |
/// | version  | 1 | 1 | 2 | 1 | 2 | 3 | 2 | 4 | 3 | 5 |
async fn fixture() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let appends: [(&str, Vec<NewEvent>); 9] = [
        ("acct-1", events(1)),
        ("acct-2", events(1)),
        ("acct-1", events(1)),
        ("order-1", events(2)),
        (
            "acct-1",
            vec![event(format!("{{\"m\":\"{MARKER}\"}}").into_bytes())],
        ),
        ("acct-2", events(1)),
        ("acct-1", events(1)),
        ("acct-2", events(1)),
        ("acct-1", events(1)),
    ];
    for (stream, new) in appends {
        store
            .append(&name(stream), ExpectedVersion::Any, new)
            .await
            .unwrap();
    }
    assert_eq!(store.head_position(), Position(10));
    drop(store);
    dir
}

/// Runs `sql` on the store's database through a plain SQLite connection.
fn edit(dir: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(dir.join("events.sqlite3")).unwrap();
    conn.execute_batch(sql).unwrap();
}

fn stream_id(dir: &Path, stream: &str) -> i64 {
    let conn = rusqlite::Connection::open(dir.join("events.sqlite3")).unwrap();
    conn.query_row("SELECT id FROM streams WHERE name = ?1", [stream], |row| {
        row.get(0)
    })
    .unwrap()
}

fn stored_crc(dir: &Path, position: u64) -> i64 {
    let conn = rusqlite::Connection::open(dir.join("events.sqlite3")).unwrap();
    conn.query_row(
        "SELECT crc FROM events WHERE position = ?1",
        [position as i64],
        |row| row.get(0),
    )
    .unwrap()
}

fn check(dir: &Path) -> VerifyReport {
    verify(dir, &mut |_| {}).unwrap()
}

/// Asserts the report holds exactly `expected`, where `Checksum` problems are compared by
/// position only (the checksums are what they are).
fn assert_problems(report: &VerifyReport, expected: &[Problem]) {
    let simplify = |p: &Problem| match p {
        Problem::Checksum { position, .. } => Problem::Checksum {
            position: *position,
            stored: 0,
            computed: 0,
        },
        other => other.clone(),
    };
    let found: Vec<Problem> = report.problems.iter().map(simplify).collect();
    let expected: Vec<Problem> = expected.iter().map(simplify).collect();
    assert_eq!(found, expected, "{report:#?}");
    assert_eq!(report.problems_found, expected.len() as u64);
}

fn checksum(position: u64) -> Problem {
    Problem::Checksum {
        position: Position(position),
        stored: 0,
        computed: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_store_verifies_clean_and_inspects_right() {
    let dir = fixture().await;
    let database = std::fs::read(dir.path().join("events.sqlite3")).unwrap();

    let mut seen: Vec<VerifyProgress> = Vec::new();
    let report = verify(dir.path(), &mut |p| seen.push(p)).unwrap();
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!((report.events_checked, report.streams_checked), (10, 3));
    let stages: Vec<VerifyStage> = seen.iter().map(|p| p.stage).collect();
    for stage in [
        VerifyStage::IntegrityCheck,
        VerifyStage::Events,
        VerifyStage::Streams,
        VerifyStage::EventIds,
    ] {
        assert!(stages.contains(&stage), "{seen:?}");
    }
    let last = seen.last().unwrap();
    assert_eq!(
        (last.stage, last.done, last.total),
        (VerifyStage::EventIds, 10, 10)
    );

    let inspection = inspect(dir.path()).unwrap();
    assert_eq!(inspection.format_version, 1);
    assert_eq!((inspection.streams, inspection.events), (3, 10));
    assert_eq!(inspection.head, Position(10));
    let (first, last) = (
        inspection.first_recorded_at.unwrap(),
        inspection.last_recorded_at.unwrap(),
    );
    assert!(first.0 > 0 && first <= last, "{first:?} {last:?}");
    assert_eq!(inspection.categories, 2);
    let top: Vec<(&str, u64, u64)> = inspection
        .top_categories
        .iter()
        .map(|c| (c.category.as_str(), c.streams, c.events))
        .collect();
    assert_eq!(top, [("acct", 2, 8), ("order", 1, 2)]);
    let files = inspection.files;
    assert_eq!(files.database_bytes, database.len() as u64);
    assert_eq!(
        files.total_bytes,
        files.database_bytes + files.wal_bytes + files.shm_bytes
    );

    // Neither changed the database file; the store opens and appends as before.
    assert!(std::fs::read(dir.path().join("events.sqlite3")).unwrap() == database);
    let store = open(dir.path());
    store
        .append(&name("acct-3"), ExpectedVersion::NoStream, events(1))
        .await
        .unwrap();
    assert_eq!(store.head_position(), Position(11));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_store_can_be_inspected_and_verified() {
    let dir = fixture().await;
    let store = open(dir.path());
    store
        .append(&name("live-1"), ExpectedVersion::NoStream, events(3))
        .await
        .unwrap();
    // The new events are in the WAL only, and the store holds its lock.
    let inspection = inspect(dir.path()).unwrap();
    assert_eq!((inspection.streams, inspection.events), (4, 13));
    assert!(inspection.files.wal_bytes > 0, "{inspection:?}");
    let report = check(dir.path());
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!(report.events_checked, 13);
    // The store goes on after.
    store
        .append(
            &name("live-1"),
            ExpectedVersion::Exact(StreamVersion(3)),
            events(1),
        )
        .await
        .unwrap();
    assert_eq!(inspect(dir.path()).unwrap().events, 14);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_store_verifies_clean() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let inspection = inspect(dir.path()).unwrap();
    assert_eq!((inspection.streams, inspection.events), (0, 0));
    assert_eq!(inspection.head, Position::START);
    assert_eq!(inspection.first_recorded_at, None);
    assert!(inspection.top_categories.is_empty());
    let report = check(dir.path());
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!(report.events_checked, 0);
}

#[test]
fn what_is_not_a_store_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = inspect(dir.path()).unwrap_err();
    assert!(matches!(err, OpenError::Io { .. }), "{err:?}");
    assert!(
        !dir.path().join("events.sqlite3").exists(),
        "inspect created a database"
    );
    let err = verify(dir.path(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, OpenError::Io { .. }), "{err:?}");

    std::fs::write(
        dir.path().join("events.sqlite3"),
        "not a database\n".repeat(300),
    )
    .unwrap();
    let err = verify(dir.path(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, OpenError::NotAStore { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_in_event_data_are_a_checksum_problem() {
    let dir = fixture().await;
    let file = dir.path().join("events.sqlite3");
    let mut bytes = std::fs::read(&file).unwrap();
    let at: Vec<usize> = bytes
        .windows(MARKER.len())
        .enumerate()
        .filter(|(_, w)| *w == MARKER.as_bytes())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "the marker is in the database file once");
    bytes[at[0] + 2] ^= 0x20;
    std::fs::write(&file, &bytes).unwrap();
    let report = check(dir.path());
    assert_problems(&report, &[checksum(MARKED_POSITION)]);
    assert!(
        report.problems[0]
            .to_string()
            .contains("position 6: checksum mismatch"),
        "{}",
        report.problems[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_checksum_is_reported() {
    let dir = fixture().await;
    let crc = stored_crc(dir.path(), 3);
    edit(
        dir.path(),
        "UPDATE events SET crc = (crc | 1) - (crc & 1) WHERE position = 3",
    );
    let report = check(dir.path());
    assert_problems(&report, &[checksum(3)]);
    match report.problems[0] {
        Problem::Checksum {
            stored, computed, ..
        } => assert_eq!((stored, i64::from(computed)), (crc ^ 1, crc)),
        ref other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_version_is_reported() {
    let dir = fixture().await;
    // acct-2's last event, version 3 at position 9, claims version 4.
    edit(
        dir.path(),
        "UPDATE events SET version = 4 WHERE position = 9",
    );
    let report = check(dir.path());
    assert_problems(
        &report,
        &[
            checksum(9),
            Problem::VersionGap {
                stream: "acct-2".to_owned(),
                expected: StreamVersion(3),
                found: StreamVersion(4),
                position: Position(9),
            },
            Problem::HeadMismatch {
                stream: "acct-2".to_owned(),
                head: 3,
                last_version: StreamVersion(4),
            },
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_event_is_a_position_and_a_version_gap() {
    let dir = fixture().await;
    // acct-1's version 3.
    edit(dir.path(), "DELETE FROM events WHERE position = 6");
    let report = check(dir.path());
    assert_problems(
        &report,
        &[
            Problem::PositionGap {
                after: Position(5),
                next: Position(7),
            },
            Problem::VersionGap {
                stream: "acct-1".to_owned(),
                expected: StreamVersion(3),
                found: StreamVersion(4),
                position: Position(8),
            },
        ],
    );
    assert_eq!(report.problems[0].to_string(), "position 6 is missing");
    assert_eq!(report.events_checked, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_head_is_reported() {
    let dir = fixture().await;
    edit(
        dir.path(),
        "UPDATE streams SET head = 7 WHERE name = 'order-1'",
    );
    let report = check(dir.path());
    assert_problems(
        &report,
        &[Problem::HeadMismatch {
            stream: "order-1".to_owned(),
            head: 7,
            last_version: StreamVersion(2),
        }],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_versions_are_out_of_order() {
    let dir = fixture().await;
    // order-1's two events swap versions: version 1 now comes after version 2.
    edit(
        dir.path(),
        "UPDATE events SET version = -version WHERE position IN (4, 5);
         UPDATE events SET version = 3 + version WHERE position IN (4, 5);",
    );
    let report = check(dir.path());
    assert_problems(
        &report,
        &[
            checksum(4),
            checksum(5),
            Problem::VersionOrder {
                stream: "order-1".to_owned(),
                version: StreamVersion(2),
                position: Position(4),
                previous: Position(5),
            },
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_names_and_types_are_reported() {
    let dir = fixture().await;
    let order = stream_id(dir.path(), "order-1");
    edit(
        dir.path(),
        "UPDATE events SET event_type = 'not a type' WHERE position = 2;
         UPDATE streams SET name = 'order' WHERE name = 'order-1';",
    );
    let report = check(dir.path());
    assert_problems(
        &report,
        &[
            checksum(2),
            Problem::InvalidField {
                position: Position(2),
                field: "event_type",
                detail: format!("is invalid: {}", EventType::new("not a type").unwrap_err()),
            },
            // The checksum covers the stream's name.
            checksum(4),
            checksum(5),
            Problem::InvalidStreamName {
                stream_id: order,
                name: "order".to_owned(),
            },
        ],
    );
    assert!(
        report.problems[1]
            .to_string()
            .contains("event_type is invalid"),
        "{}",
        report.problems[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_without_their_stream_are_reported() {
    let dir = fixture().await;
    let order = stream_id(dir.path(), "order-1");
    edit(dir.path(), "DELETE FROM streams WHERE name = 'order-1'");
    let report = check(dir.path());
    assert_problems(
        &report,
        &[Problem::MissingStream {
            stream_id: order,
            events: 2,
            first: Position(4),
        }],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_event_id_is_reported() {
    let dir = fixture().await;
    // Without its unique index the table takes a duplicate.
    edit(
        dir.path(),
        "DROP INDEX events_by_id;
         UPDATE events SET event_id = (SELECT event_id FROM events WHERE position = 1)
             WHERE position = 10;",
    );
    let conn = rusqlite::Connection::open(dir.path().join("events.sqlite3")).unwrap();
    let id: Vec<u8> = conn
        .query_row("SELECT event_id FROM events WHERE position = 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    drop(conn);
    let report = check(dir.path());
    assert_problems(
        &report,
        &[
            checksum(10),
            Problem::DuplicateEventId {
                event_id: headwater_core::EventId::from_bytes(id.try_into().unwrap()),
                first: Position(1),
                second: Position(10),
            },
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn problems_are_capped_but_counted() {
    let dir = tempfile::tempdir().unwrap();
    let total = PROBLEMS_RECORDED_MAX as u64 + 50;
    {
        let store = open(dir.path());
        store
            .append(
                &name("many-1"),
                ExpectedVersion::NoStream,
                events(total as usize),
            )
            .await
            .unwrap();
    }
    edit(dir.path(), "UPDATE events SET crc = crc + 1");
    let report = check(dir.path());
    assert_eq!(report.problems.len(), PROBLEMS_RECORDED_MAX);
    assert_eq!(report.problems_found, total);
    assert!(!report.is_clean());
    assert!(report.problems.iter().enumerate().all(
        |(i, p)| matches!(p, Problem::Checksum { position, .. } if position.0 == i as u64 + 1)
    ));
}
