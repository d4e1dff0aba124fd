//! `inspect` and `verify` on a small store, then on the same store damaged behind its back.

use headwater_core::{ExpectedVersion, Position};
use headwater_postgres::{ConnectError, Problem, VerifyStage, inspect, verify};
use headwater_store::EventStore;
use headwater_store::conformance::{events, stream};

use crate::support::Fresh;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_and_verify_a_sound_then_a_damaged_store() {
    let fresh = Fresh::new();
    let store = fresh.connect(fresh.options()).await;
    for i in 0..6 {
        store
            .append(
                &stream(&format!("s{}", i % 3)),
                ExpectedVersion::Any,
                events(2),
            )
            .await
            .unwrap();
    }
    store
        .append(
            &headwater_core::StreamName::new("other-1").unwrap(),
            ExpectedVersion::Any,
            events(1),
        )
        .await
        .unwrap();
    drop(store);

    let inspection = inspect(&fresh.url, &fresh.schema).await.unwrap();
    assert_eq!(
        (inspection.streams, inspection.events, inspection.head),
        (4, 13, Position(13))
    );
    assert_eq!(
        inspection.schema_version,
        headwater_postgres::SCHEMA_VERSION
    );
    assert_eq!(inspection.categories, 2);
    assert_eq!(inspection.top_categories[0].category, "test");
    assert_eq!(
        (
            inspection.top_categories[0].streams,
            inspection.top_categories[0].events
        ),
        (3, 12)
    );
    assert!(inspection.first_recorded_at <= inspection.last_recorded_at);
    assert!(inspection.total_bytes > 0);

    let mut stages = Vec::new();
    let report = verify(&fresh.url, &fresh.schema, &mut |p| stages.push(p.stage))
        .await
        .unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!((report.events_checked, report.streams_checked), (13, 4));
    assert!(stages.contains(&VerifyStage::Positions) && stages.contains(&VerifyStage::Streams));

    // Damage: an event deleted from the middle of a stream, the log head moved, a stream row
    // with a bad name and no events.
    let client = fresh.client().await;
    let q = format!("\"{}\"", fresh.schema);
    client
        .batch_execute(&format!(
            "DELETE FROM {q}.events WHERE position = 5;
             UPDATE {q}.log_head SET position = 99;
             INSERT INTO {q}.streams (name, head) VALUES ('no dash here', 3);"
        ))
        .await
        .unwrap();
    let report = verify(&fresh.url, &fresh.schema, &mut |_| {})
        .await
        .unwrap();
    assert!(!report.is_clean());
    let has = |wanted: &dyn Fn(&Problem) -> bool| report.problems.iter().any(wanted);
    assert!(has(&|p| matches!(
        p,
        Problem::PositionGap {
            after: Position(4),
            next: Position(6)
        }
    )));
    assert!(has(&|p| matches!(p, Problem::LogHead { log_head: 99, .. })));
    assert!(has(&|p| matches!(p, Problem::VersionGap { .. })));
    assert!(has(&|p| matches!(
        p,
        Problem::HeadMismatch { stream, head: Some(3), last_version: None } if stream == "no dash here"
    )));
    assert!(has(&|p| matches!(
        p,
        Problem::InvalidName {
            what: "stream name",
            ..
        }
    )));
    assert_eq!(report.problems_found, report.problems.len() as u64);
    for problem in &report.problems {
        assert!(!problem.to_string().is_empty());
    }
}

#[tokio::test]
async fn the_tools_create_nothing() {
    let fresh = Fresh::new();
    match inspect(&fresh.url, &fresh.schema).await {
        Err(ConnectError::NoStore { schema }) => assert_eq!(schema, fresh.schema),
        other => panic!("expected NoStore, got {other:?}"),
    }
    assert!(matches!(
        verify(&fresh.url, &fresh.schema, &mut |_| {}).await,
        Err(ConnectError::NoStore { .. })
    ));
    let client = fresh.client().await;
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&fresh.schema],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!exists, "the tools created the schema");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_checks_the_feeds() {
    use headwater_core::{FeedPosition, Sequence};
    use headwater_store::{FeedStore, ProjectorBatch};

    use crate::feeds::{feed, projected};

    let fresh = Fresh::new();
    let store = fresh.connect(fresh.options()).await;
    store
        .append(&stream("s"), ExpectedVersion::Any, events(8))
        .await
        .unwrap();
    let feeds = store.feed_store();
    for f in ["accounts.v1", "accounts.v2"] {
        feeds.register(&feed(f)).await.unwrap();
    }
    let subjects = ["a", "b", "a", "c", "a", "b", "a", "a"];
    let events: Vec<_> = subjects
        .iter()
        .enumerate()
        .map(|(i, s)| projected(i as u64 + 1, 0, s, b"{}".to_vec()))
        .collect();
    feeds
        .commit(
            &feed("accounts.v1"),
            ProjectorBatch {
                from: Position(0),
                to: Position(8),
                events,
            },
        )
        .await
        .unwrap();
    feeds
        .advance_publisher(
            &feed("accounts.v1"),
            "rabbitmq",
            FeedPosition(0),
            FeedPosition(8),
        )
        .await
        .unwrap();
    drop((feeds, store));

    let mut stages = Vec::new();
    let report = verify(&fresh.url, &fresh.schema, &mut |p| stages.push(p.stage))
        .await
        .unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!((report.feeds_checked, report.feed_events_checked), (2, 8));
    assert!(stages.contains(&VerifyStage::Feeds));

    // Damage: the feed event at position 3 (subject a, sequence 2) deleted, a subject no
    // longer listed, accounts.v2's cursor past the log head, an event made of a source after the cursor,
    // a subject row with a bad name.
    let client = fresh.client().await;
    let q = format!("\"{}\"", fresh.schema);
    client
        .batch_execute(&format!(
            "DELETE FROM {q}.feed_events WHERE position = 3;
             DELETE FROM {q}.feed_subjects WHERE subject = 'b';
             UPDATE {q}.feeds SET cursor = 99 WHERE version = 2;
             UPDATE {q}.feed_events SET source_position = 50 WHERE position = 8;
             INSERT INTO {q}.feed_subjects (feed, subject)
                 SELECT id, 'bad subject' FROM {q}.feeds WHERE version = 1;
             INSERT INTO {q}.feed_publishers (feed, publisher, position, updated_at)
                 SELECT id, 'NATS', 9, now() FROM {q}.feeds WHERE version = 2;
             INSERT INTO {q}.feed_publishers (feed, publisher, position, updated_at)
                 VALUES (12345, 'ghost', 1, now());"
        ))
        .await
        .unwrap();
    let report = verify(&fresh.url, &fresh.schema, &mut |_| {})
        .await
        .unwrap();
    let has = |wanted: &dyn Fn(&Problem) -> bool| report.problems.iter().any(wanted);
    assert!(has(&|p| matches!(
        p,
        Problem::FeedPositionGap { feed, after: FeedPosition(2), next: FeedPosition(4) }
            if feed == "accounts.v1"
    )));
    assert!(has(&|p| matches!(
        p,
        Problem::SequenceGap { subject, expected: Sequence(2), found: Sequence(3), .. }
            if subject == "a"
    )));
    assert!(has(&|p| matches!(
        p,
        Problem::SubjectListing { subject, listed: false, last: Some(Sequence(2)), .. }
            if subject == "b"
    )));
    assert!(has(&|p| matches!(
        p,
        Problem::SubjectListing { subject, listed: true, last: None, .. }
            if subject == "bad subject"
    )));
    assert!(has(&|p| matches!(
        p,
        Problem::CursorAhead { feed, cursor: 99, log_head: 8 } if feed == "accounts.v2"
    )));
    assert!(has(&|p| matches!(
        p,
        Problem::SourceAfterCursor { feed, source: Position(50), cursor: 8 }
            if feed == "accounts.v1"
    )));
    assert!(has(&|p| matches!(
        p,
        Problem::InvalidName { what: "subject", name } if name == "bad subject"
    )));
    assert!(has(&|p| matches!(
        p,
        Problem::PublisherAhead { feed, publisher, position: 9, head: Some(0) }
            if feed == "accounts.v2" && publisher == "NATS"
    )));
    assert!(has(&|p| matches!(
        p,
        Problem::PublisherAhead { feed, publisher, position: 1, head: None }
            if feed == "#12345" && publisher == "ghost"
    )));
    assert!(has(&|p| matches!(
        p,
        Problem::InvalidName { what: "publisher name", name } if name == "NATS"
    )));
    assert_eq!(report.problems_found, report.problems.len() as u64);
    for problem in &report.problems {
        assert!(!problem.to_string().is_empty());
    }
    // The recorded head no longer matches the last position once the last event goes.
    client
        .batch_execute(&format!("DELETE FROM {q}.feed_events WHERE position = 8"))
        .await
        .unwrap();
    let report = verify(&fresh.url, &fresh.schema, &mut |_| {})
        .await
        .unwrap();
    assert!(report.problems.iter().any(|p| matches!(
        p,
        Problem::FeedHead { feed, head: Some(8), last: FeedPosition(7) } if feed == "accounts.v1"
    )));
}
