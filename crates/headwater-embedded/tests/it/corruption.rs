//! A damaged event is reported, never served (G11).

use headwater_core::{ExpectedVersion, Position, StreamVersion};
use headwater_store::conformance::{event, events, stream};
use headwater_store::{EventStore, ReadError};

use crate::support::open;

/// The offsets of `needle` in `haystack`.
fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

fn assert_corrupt_at<T: std::fmt::Debug>(result: Result<T, ReadError>, position: u64) {
    match result {
        Err(ReadError::Corrupt {
            position: p,
            detail,
        }) => {
            assert_eq!(p, Position(position), "{detail}");
            assert!(detail.contains("checksum"), "{detail}");
        }
        other => panic!("expected corruption at {position}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_is_reported_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let name = stream("damaged");
    let marker = format!("corrupt-me-{}", uuid::Uuid::new_v4().simple());
    let target = event(format!("{{\"marker\":\"{marker}\"}}").into_bytes());
    {
        let store = open(dir.path());
        for _ in 0..5 {
            store
                .append(&name, ExpectedVersion::Any, events(1))
                .await
                .unwrap();
        }
        store
            .append(&name, ExpectedVersion::Any, vec![target.clone()])
            .await
            .unwrap();
        for _ in 0..4 {
            store
                .append(&name, ExpectedVersion::Any, events(1))
                .await
                .unwrap();
        }
    }
    // Closed cleanly: everything is in the database file.
    let file = dir.path().join("events.sqlite3");
    let mut bytes = std::fs::read(&file).unwrap();
    let found = find_all(&bytes, marker.as_bytes());
    assert_eq!(
        found.len(),
        1,
        "the marker is stored once, in the database file"
    );
    bytes[found[0] + 3] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();

    let store = open(dir.path());
    let before = store.read_all(Position::START, 5).await.unwrap();
    assert_eq!(before.len(), 5, "events before the damage are served");
    assert_corrupt_at(store.read_all(Position::START, 100).await, 6);
    assert_corrupt_at(store.read_all(Position(5), 1).await, 6);
    let after = store.read_all(Position(6), 100).await.unwrap();
    assert_eq!(
        after.iter().map(|e| e.position.0).collect::<Vec<_>>(),
        [7, 8, 9, 10],
        "events after the damage are served"
    );
    assert_corrupt_at(store.read_stream(&name, StreamVersion::START, 100).await, 6);
    assert_corrupt_at(store.find_event(target.event_id).await, 6);
    assert_eq!(
        store
            .read_stream(&name, StreamVersion(5), 1)
            .await
            .map(|p| p.len())
            .ok(),
        None,
        "the damaged event is never returned"
    );
}
