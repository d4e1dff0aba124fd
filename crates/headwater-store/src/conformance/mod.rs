//! The backend conformance suite: every [`EventStore`] backend runs it unchanged.
//!
//! A backend's test suite provides a [`Harness`] (how to open its store on fresh storage, and
//! how to reopen the same storage) and expands [`conformance_suite!`](crate::conformance_suite)
//! into one test per check:
//!
//! ```text
//! headwater_store::conformance_suite!(MyHarness::new());
//! ```
//!
//! Feed stores have their own suite in [`feed`]: a [`FeedHarness`] and
//! [`feed_conformance_suite!`](crate::feed_conformance_suite).

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use headwater_core::limits::{
    APPEND_EVENTS_MAX, EVENT_DATA_BYTES_MAX, READ_PAGE_BYTES_MAX, READ_PAGE_EVENTS_MAX,
};
use headwater_core::{
    EventId, EventType, ExpectedVersion, InvalidAppend, NewEvent, Position, RecordedEvent,
    StreamName, StreamVersion,
};
use uuid::Uuid;

use crate::{AppendError, AppendOutcome, EventStore, ReadError, read_all_pages};

pub mod feed;
mod feed_model;
mod model;
pub use feed::FeedHarness;
pub use model::random_operations_match_the_model;

/// How the suite opens the backend under test.
pub trait Harness: Send + Sync + 'static {
    type Store: EventStore + Clone;

    /// Opens the store. The first call opens fresh, empty storage; later calls reopen the same
    /// storage (for a durable backend: as a restarted process would, after every earlier handle
    /// was dropped).
    fn open(&self) -> impl Future<Output = Self::Store> + Send;
}

/// Expands into one `#[tokio::test]` per conformance check, each on a fresh harness built by
/// `$harness` (an expression evaluated once per test).
#[macro_export]
macro_rules! conformance_suite {
    ($harness:expr) => {
        $crate::conformance_suite!(@tests $harness;
            append_then_read_your_writes,
            metadata_and_data_round_trip,
            expected_version_conflicts_write_nothing,
            idempotent_retry_returns_original_result,
            idempotent_retry_survives_reopen,
            duplicate_event_id_elsewhere_is_refused,
            invalid_appends_write_nothing,
            atomic_multi_event_append,
            read_limits_are_enforced,
            paging_at_the_limits,
            byte_limit_ends_a_page,
            concurrent_appenders_on_one_stream,
            concurrent_appenders_on_distinct_streams,
            follower_never_misses_a_position,
            watch_head_wakes_followers,
            find_event_by_id,
            reopen_keeps_everything,
        );

        #[test]
        fn random_operations_match_the_model() {
            $crate::conformance::random_operations_match_the_model(|| $harness, 64);
        }
    };
    (@tests $harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let harness = $harness;
                $crate::conformance::$name(&harness).await;
            }
        )*
    };
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// `n` new events of type `test.happened`, each with a fresh id and data naming its index.
pub fn events(n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| event(format!("{{\"i\":{i}}}").into_bytes()))
        .collect()
}

/// One new event with fresh id and the given data.
pub fn event(data: Vec<u8>) -> NewEvent {
    NewEvent::new(
        EventId::new_random(),
        EventType::new("test.happened").unwrap(),
        data,
    )
}

/// A stream name, `test-{id}`.
pub fn stream(id: &str) -> StreamName {
    StreamName::from_parts("test", id).unwrap()
}

async fn whole_stream<S: EventStore>(store: &S, name: &StreamName) -> Vec<RecordedEvent> {
    let mut out = Vec::new();
    loop {
        let after = out
            .last()
            .map_or(StreamVersion::START, |e: &RecordedEvent| e.stream_version);
        let page = store
            .read_stream(name, after, READ_PAGE_EVENTS_MAX)
            .await
            .unwrap();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

async fn whole_log<S: EventStore>(store: &S) -> Vec<RecordedEvent> {
    let mut out = Vec::new();
    read_all_pages(store, Position::START, READ_PAGE_EVENTS_MAX, |page| {
        out.extend_from_slice(page)
    })
    .await
    .unwrap();
    out
}

/// Checks the invariants every store holds at rest: positions 1..=n, each stream's versions
/// 1..=k in position order, ids unique, `head_position` and `stream_head` agree with the log.
pub async fn assert_store_invariants<S: EventStore>(store: &S) -> Vec<RecordedEvent> {
    let log = whole_log(store).await;
    let mut ids = HashSet::new();
    let mut heads: BTreeMap<StreamName, u64> = BTreeMap::new();
    for (i, event) in log.iter().enumerate() {
        assert_eq!(
            event.position,
            Position(i as u64 + 1),
            "positions are contiguous from 1"
        );
        assert!(
            ids.insert(event.event_id),
            "event id {} recorded twice",
            event.event_id
        );
        let head = heads.entry(event.stream.clone()).or_default();
        *head += 1;
        assert_eq!(
            event.stream_version,
            StreamVersion(*head),
            "versions of {} contiguous",
            event.stream
        );
    }
    assert_eq!(
        store.head_position(),
        Position(log.len() as u64),
        "head_position matches the log"
    );
    for (name, head) in &heads {
        assert_eq!(
            store.stream_head(name).await.unwrap(),
            Some(StreamVersion(*head))
        );
        let events = whole_stream(store, name).await;
        let from_log: Vec<_> = log.iter().filter(|e| &e.stream == name).cloned().collect();
        assert_eq!(events, from_log, "read_stream({name}) agrees with read_all");
    }
    log
}

fn assert_records(recorded: &[RecordedEvent], new: &[NewEvent]) {
    assert_eq!(recorded.len(), new.len());
    for (r, n) in recorded.iter().zip(new) {
        assert!(r.records(n), "{r:?} does not record {n:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The checks

pub async fn append_then_read_your_writes<H: Harness>(harness: &H) {
    let store = harness.open().await;
    let name = stream("1");
    assert_eq!(store.stream_head(&name).await.unwrap(), None);
    assert_eq!(store.head_position(), Position::START);
    assert!(
        store
            .read_stream(&name, StreamVersion::START, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .read_all(Position::START, 10)
            .await
            .unwrap()
            .is_empty()
    );

    let first = events(3);
    let outcome = store
        .append(&name, ExpectedVersion::NoStream, first.clone())
        .await
        .unwrap();
    assert_eq!(
        outcome,
        AppendOutcome {
            stream_version: StreamVersion(3),
            first_position: Position(1),
            last_position: Position(3),
            replayed: false,
        }
    );
    assert_eq!(store.head_position(), Position(3));
    assert_eq!(
        store.stream_head(&name).await.unwrap(),
        Some(StreamVersion(3))
    );
    let read = store
        .read_stream(&name, StreamVersion::START, 10)
        .await
        .unwrap();
    assert_records(&read, &first);
    for (i, e) in read.iter().enumerate() {
        assert_eq!(e.stream, name);
        assert_eq!(e.stream_version, StreamVersion(i as u64 + 1));
        assert_eq!(e.position, Position(i as u64 + 1));
    }
    let second = events(2);
    let other = stream("2");
    let outcome = store
        .append(&other, ExpectedVersion::Any, second.clone())
        .await
        .unwrap();
    assert_eq!(
        (outcome.first_position, outcome.last_position),
        (Position(4), Position(5))
    );
    assert_eq!(outcome.stream_version, StreamVersion(2));
    let after_two = store
        .read_stream(&name, StreamVersion(2), 10)
        .await
        .unwrap();
    assert_records(&after_two, &first[2..]);
    let all = store.read_all(Position(2), 10).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.position.0).collect::<Vec<_>>(),
        [3, 4, 5]
    );
    assert!(store.read_all(Position(5), 10).await.unwrap().is_empty());
    assert!(
        store
            .read_all(Position(u64::MAX), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .read_stream(&name, StreamVersion(u64::MAX), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_store_invariants(&store).await;
}

pub async fn metadata_and_data_round_trip<H: Harness>(harness: &H) {
    let store = harness.open().await;
    let name = stream("meta");
    let mut binary = event((0..=255u8).collect());
    binary.schema_version = 3;
    binary.correlation_id = Some(Uuid::new_v4());
    binary.causation_id = Some(Uuid::new_v4());
    let empty = event(Vec::new());
    let big = event(vec![7; EVENT_DATA_BYTES_MAX]);
    let new = vec![binary, empty, big];
    store
        .append(&name, ExpectedVersion::Any, new.clone())
        .await
        .unwrap();
    let read = store
        .read_stream(&name, StreamVersion::START, 10)
        .await
        .unwrap();
    assert_records(&read, &new);
    assert!(
        read.iter()
            .all(|e| e.metadata.recorded_at.unix_micros() > 0),
        "recorded_at is set"
    );
    assert_eq!(
        store.find_event(new[0].event_id).await.unwrap().unwrap(),
        read[0]
    );
}

pub async fn expected_version_conflicts_write_nothing<H: Harness>(harness: &H) {
    let store = harness.open().await;
    let name = stream("c");
    let missing = stream("missing");
    store
        .append(&name, ExpectedVersion::NoStream, events(2))
        .await
        .unwrap();
    let cases = [
        (&name, ExpectedVersion::NoStream, Some(StreamVersion(2))),
        (
            &name,
            ExpectedVersion::Exact(StreamVersion(1)),
            Some(StreamVersion(2)),
        ),
        (
            &name,
            ExpectedVersion::Exact(StreamVersion(3)),
            Some(StreamVersion(2)),
        ),
        (&missing, ExpectedVersion::StreamExists, None),
        (&missing, ExpectedVersion::Exact(StreamVersion(1)), None),
    ];
    for (target, expected, actual_head) in cases {
        let err = store.append(target, expected, events(3)).await.unwrap_err();
        match err {
            AppendError::Conflict {
                stream,
                expected: e,
                actual,
            } => {
                assert_eq!((&stream, e, actual), (target, expected, actual_head));
            }
            other => panic!("{expected} on {target}: expected a conflict, got {other:?}"),
        }
        assert_eq!(err_kind_of_conflict(), headwater_core::ErrorKind::Conflict);
    }
    assert_eq!(
        store.head_position(),
        Position(2),
        "conflicts wrote nothing"
    );
    assert_eq!(store.stream_head(&missing).await.unwrap(), None);
    // The expectations that hold do append.
    for expected in [
        ExpectedVersion::Exact(StreamVersion(2)),
        ExpectedVersion::StreamExists,
        ExpectedVersion::Any,
    ] {
        store.append(&name, expected, events(1)).await.unwrap();
    }
    assert_eq!(
        store.stream_head(&name).await.unwrap(),
        Some(StreamVersion(5))
    );
    assert_store_invariants(&store).await;
}

fn err_kind_of_conflict() -> headwater_core::ErrorKind {
    AppendError::Conflict {
        stream: stream("x"),
        expected: ExpectedVersion::Any,
        actual: None,
    }
    .kind()
}

pub async fn idempotent_retry_returns_original_result<H: Harness>(harness: &H) {
    let store = harness.open().await;
    let name = stream("idem");
    let batch = events(3);
    let original = store
        .append(&name, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    store
        .append(&stream("other"), ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    let replayed = AppendOutcome {
        replayed: true,
        ..original
    };
    // The same append, whatever expectation a retry carries that admits its place.
    for expected in [
        ExpectedVersion::NoStream,
        ExpectedVersion::Any,
        ExpectedVersion::StreamExists,
    ] {
        let again = store.append(&name, expected, batch.clone()).await.unwrap();
        assert_eq!(again, replayed, "retry with {expected}");
    }
    // Later appends to the stream do not change what a retry of the first one answers.
    let next = events(2);
    let second = store
        .append(
            &name,
            ExpectedVersion::Exact(StreamVersion(3)),
            next.clone(),
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .append(&name, ExpectedVersion::NoStream, batch.clone())
            .await
            .unwrap(),
        replayed
    );
    assert_eq!(
        store
            .append(
                &name,
                ExpectedVersion::Exact(StreamVersion(3)),
                next.clone()
            )
            .await
            .unwrap(),
        AppendOutcome {
            replayed: true,
            ..second
        }
    );
    // The same ids at a place the retry does not name: a conflict, as for any stale writer.
    let err = store
        .append(
            &name,
            ExpectedVersion::Exact(StreamVersion(1)),
            batch.clone(),
        )
        .await;
    assert!(matches!(err, Err(AppendError::Conflict { .. })), "{err:?}");
    assert_eq!(store.head_position(), Position(6), "retries wrote nothing");
    assert_store_invariants(&store).await;
}

pub async fn idempotent_retry_survives_reopen<H: Harness>(harness: &H) {
    let name = stream("reopen");
    let batch = events(4);
    let original = {
        let store = harness.open().await;
        let outcome = store
            .append(&name, ExpectedVersion::NoStream, batch.clone())
            .await
            .unwrap();
        store
            .append(&name, ExpectedVersion::Any, events(1))
            .await
            .unwrap();
        outcome
    };
    let store = harness.open().await;
    let again = store
        .append(&name, ExpectedVersion::NoStream, batch)
        .await
        .unwrap();
    assert_eq!(
        again,
        AppendOutcome {
            replayed: true,
            ..original
        }
    );
    assert_eq!(store.head_position(), Position(5));
    assert_store_invariants(&store).await;
}

pub async fn duplicate_event_id_elsewhere_is_refused<H: Harness>(harness: &H) {
    let store = harness.open().await;
    let a = stream("a");
    let b = stream("b");
    let batch = events(3);
    store
        .append(&a, ExpectedVersion::Any, batch.clone())
        .await
        .unwrap();
    let cases: Vec<(StreamName, Vec<NewEvent>)> = vec![
        // The same events into another stream.
        (b.clone(), batch.clone()),
        // One recorded id among new ones, first or later.
        (b.clone(), vec![batch[1].clone(), event(vec![])]),
        (b.clone(), vec![event(vec![]), batch[1].clone()]),
        (a.clone(), vec![event(vec![]), batch[0].clone()]),
        // A prefix of the recorded append followed by a new event.
        (
            a.clone(),
            vec![batch[0].clone(), batch[1].clone(), event(vec![])],
        ),
        // The recorded ids in another order.
        (a.clone(), vec![batch[1].clone(), batch[0].clone()]),
    ];
    for (target, new) in cases {
        let err = store
            .append(&target, ExpectedVersion::Any, new)
            .await
            .unwrap_err();
        assert!(
            matches!(err, AppendError::DuplicateEventId { .. }),
            "{err:?}"
        );
        assert_eq!(err.kind(), headwater_core::ErrorKind::BadRequest);
    }
    // A retry of a suffix of the recorded append is a retry of nothing that was appended: but
    // its ids are recorded at that place, in order, so it is recognised as recorded.
    assert_eq!(store.head_position(), Position(3), "refusals wrote nothing");
    assert_eq!(store.stream_head(&b).await.unwrap(), None);
    assert_store_invariants(&store).await;
}

pub async fn invalid_appends_write_nothing<H: Harness>(harness: &H) {
    let store = harness.open().await;
    let name = stream("bad");
    store
        .append(&name, ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    let repeated = event(vec![1]);
    let mut zero_schema = event(vec![]);
    zero_schema.schema_version = 0;
    type Case = (ExpectedVersion, Vec<NewEvent>, fn(&InvalidAppend) -> bool);
    let cases: Vec<Case> = vec![
        (ExpectedVersion::Any, vec![], |e| {
            matches!(e, InvalidAppend::NoEvents)
        }),
        (ExpectedVersion::Any, events(APPEND_EVENTS_MAX + 1), |e| {
            matches!(e, InvalidAppend::TooManyEvents { .. })
        }),
        (
            ExpectedVersion::Any,
            vec![event(vec![0; EVENT_DATA_BYTES_MAX + 1])],
            |e| matches!(e, InvalidAppend::EventTooLarge { .. }),
        ),
        (
            ExpectedVersion::Any,
            (0..17)
                .map(|_| event(vec![0; EVENT_DATA_BYTES_MAX]))
                .collect(),
            |e| matches!(e, InvalidAppend::AppendTooLarge { .. }),
        ),
        (
            ExpectedVersion::Any,
            vec![repeated.clone(), repeated],
            |e| matches!(e, InvalidAppend::RepeatedEventId(_)),
        ),
        (ExpectedVersion::Any, vec![zero_schema], |e| {
            matches!(e, InvalidAppend::ZeroSchemaVersion(_))
        }),
        (
            ExpectedVersion::Exact(StreamVersion::START),
            events(1),
            |e| matches!(e, InvalidAppend::ExpectedVersionZero),
        ),
    ];
    for (expected, new, is_expected) in cases {
        match store.append(&name, expected, new).await {
            Err(AppendError::Invalid(e)) if is_expected(&e) => {}
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(
        store.head_position(),
        Position(1),
        "bad input wrote nothing"
    );
    // The largest valid append still goes through.
    store
        .append(&name, ExpectedVersion::Any, events(APPEND_EVENTS_MAX))
        .await
        .unwrap();
    assert_store_invariants(&store).await;
}

pub async fn atomic_multi_event_append<H: Harness>(harness: &H) {
    let store = harness.open().await;
    let names: Vec<_> = (0..4).map(|i| stream(&format!("atomic{i}"))).collect();
    // Interleave appends of different sizes; a conflicting one in the middle writes none of its
    // events.
    for round in 0..10u64 {
        for (i, name) in names.iter().enumerate() {
            let n = 1 + (round as usize + i) % 5;
            store
                .append(name, ExpectedVersion::Any, events(n))
                .await
                .unwrap();
            let bad = store
                .append(name, ExpectedVersion::NoStream, events(n))
                .await;
            assert!(matches!(bad, Err(AppendError::Conflict { .. })));
        }
    }
    let log = assert_store_invariants(&store).await;
    // Each append's events are contiguous in the log.
    let mut runs = 0;
    for pair in log.windows(2) {
        if pair[0].stream != pair[1].stream {
            runs += 1;
        }
    }
    assert_eq!(
        runs + 1,
        40,
        "40 appends, each one contiguous run of positions"
    );
}

pub async fn read_limits_are_enforced<H: Harness>(harness: &H) {
    let store = harness.open().await;
    let name = stream("limits");
    store
        .append(&name, ExpectedVersion::Any, events(2))
        .await
        .unwrap();
    for limit in [0, READ_PAGE_EVENTS_MAX + 1, u64::MAX] {
        let err = store.read_all(Position::START, limit).await.unwrap_err();
        assert!(matches!(err, ReadError::Invalid(_)), "{err:?}");
        assert_eq!(err.kind(), headwater_core::ErrorKind::BadRequest);
        let err = store
            .read_stream(&name, StreamVersion::START, limit)
            .await
            .unwrap_err();
        assert!(matches!(err, ReadError::Invalid(_)), "{err:?}");
    }
}

pub async fn paging_at_the_limits<H: Harness>(harness: &H) {
    let store = harness.open().await;
    let name = stream("paging");
    let total = READ_PAGE_EVENTS_MAX as usize + 5;
    let mut version = ExpectedVersion::NoStream;
    let mut left = total;
    while left > 0 {
        let n = left.min(APPEND_EVENTS_MAX);
        let outcome = store.append(&name, version, events(n)).await.unwrap();
        version = ExpectedVersion::Exact(outcome.stream_version);
        left -= n;
    }
    let page = store
        .read_stream(&name, StreamVersion::START, READ_PAGE_EVENTS_MAX)
        .await
        .unwrap();
    assert_eq!(page.len() as u64, READ_PAGE_EVENTS_MAX);
    let rest = store
        .read_stream(
            &name,
            page.last().unwrap().stream_version,
            READ_PAGE_EVENTS_MAX,
        )
        .await
        .unwrap();
    assert_eq!(rest.len(), 5);
    let page = store
        .read_all(Position::START, READ_PAGE_EVENTS_MAX)
        .await
        .unwrap();
    assert_eq!(page.len() as u64, READ_PAGE_EVENTS_MAX);
    let one = store.read_all(Position(7), 1).await.unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].position, Position(8));
    // Odd page sizes walk the log exactly once.
    let mut seen = Vec::new();
    read_all_pages(&store, Position::START, 333, |p| {
        seen.extend(p.iter().map(|e| e.position.0))
    })
    .await
    .unwrap();
    assert_eq!(seen, (1..=total as u64).collect::<Vec<_>>());
    assert_store_invariants(&store).await;
}

pub async fn byte_limit_ends_a_page<H: Harness>(harness: &H) {
    let store = harness.open().await;
    let name = stream("bytes");
    let per_page = READ_PAGE_BYTES_MAX / EVENT_DATA_BYTES_MAX;
    let count = per_page + 3;
    for _ in 0..count {
        store
            .append(
                &name,
                ExpectedVersion::Any,
                vec![event(vec![1; EVENT_DATA_BYTES_MAX])],
            )
            .await
            .unwrap();
    }
    let page = store.read_all(Position::START, 100).await.unwrap();
    assert!(
        !page.is_empty() && page.len() <= per_page,
        "page of {} events of 1 MiB",
        page.len()
    );
    let total: usize = page.iter().map(|e| e.data.len()).sum();
    assert!(total <= READ_PAGE_BYTES_MAX);
    let stream_page = store
        .read_stream(&name, StreamVersion::START, 100)
        .await
        .unwrap();
    assert!(!stream_page.is_empty() && stream_page.len() <= per_page);
    // Paging still reaches every event.
    let mut n = 0;
    read_all_pages(&store, Position::START, 100, |p| n += p.len())
        .await
        .unwrap();
    assert_eq!(n, count);
}

pub async fn concurrent_appenders_on_one_stream<H: Harness>(harness: &H) {
    let store = harness.open().await;
    let name = stream("hot");
    let writers = 8;
    let appends_each = 25;
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let store = store.clone();
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0u64;
            let mut mine = Vec::new();
            for _ in 0..appends_each {
                let batch = events(2);
                loop {
                    let head = store.stream_head(&name).await.unwrap();
                    let expected = head.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
                    match store.append(&name, expected, batch.clone()).await {
                        Ok(outcome) => {
                            assert!(!outcome.replayed);
                            mine.push((batch[0].event_id, outcome.stream_version));
                            break;
                        }
                        Err(AppendError::Conflict { .. }) => conflicts += 1,
                        Err(other) => panic!("{other:?}"),
                    }
                }
            }
            (mine, conflicts)
        }));
    }
    let mut acknowledged = Vec::new();
    for task in tasks {
        acknowledged.extend(task.await.unwrap().0);
    }
    let log = assert_store_invariants(&store).await;
    assert_eq!(log.len(), writers * appends_each * 2);
    for (first_id, last_version) in acknowledged {
        let event = store
            .find_event(first_id)
            .await
            .unwrap()
            .expect("acknowledged append is recorded");
        assert_eq!(
            event.stream_version.0 + 1,
            last_version.0,
            "both events of an append are adjacent"
        );
    }
}

pub async fn concurrent_appenders_on_distinct_streams<H: Harness>(harness: &H) {
    let store = harness.open().await;
    let writers = 16;
    let appends_each = 40;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let name = stream(&format!("w{w}"));
            let mut expected = ExpectedVersion::NoStream;
            let mut last = Position::START;
            for i in 0..appends_each {
                let outcome = store
                    .append(&name, expected, events(1 + i % 3))
                    .await
                    .unwrap();
                assert!(
                    outcome.first_position > last,
                    "a writer's own appends are in order"
                );
                last = outcome.last_position;
                expected = ExpectedVersion::Exact(outcome.stream_version);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let log = assert_store_invariants(&store).await;
    let per_writer: usize = (0..appends_each).map(|i| 1 + i % 3).sum();
    assert_eq!(log.len(), writers * per_writer);
}

pub async fn follower_never_misses_a_position<H: Harness>(harness: &H) {
    let store = harness.open().await;
    let writers = 8;
    let appends_each = 50;
    let total = (writers * appends_each * 2) as u64;
    let follower = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut cursor = Position::START;
            let mut seen = Vec::new();
            while cursor.0 < total {
                crate::wait_for_position(&store, cursor, Duration::from_millis(200)).await;
                let page = store.read_all(cursor, 64).await.unwrap();
                for event in &page {
                    assert_eq!(
                        event.position,
                        cursor.next(),
                        "the follower saw a gap or a repeat"
                    );
                    cursor = event.position;
                    seen.push(event.event_id);
                }
            }
            seen
        })
    };
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..appends_each {
                store
                    .append(&stream(&format!("f{w}")), ExpectedVersion::Any, events(2))
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let seen = tokio::time::timeout(Duration::from_secs(60), follower)
        .await
        .expect("follower caught up")
        .unwrap();
    let log = assert_store_invariants(&*store).await;
    assert_eq!(seen, log.iter().map(|e| e.event_id).collect::<Vec<_>>());
}

pub async fn watch_head_wakes_followers<H: Harness>(harness: &H) {
    let store = harness.open().await;
    let mut watch = store.watch_head();
    assert_eq!(*watch.borrow_and_update(), Position::START);
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move {
            crate::wait_for_position(&store, Position::START, Duration::from_secs(30)).await
        })
    };
    store
        .append(&stream("w"), ExpectedVersion::Any, events(3))
        .await
        .unwrap();
    assert_eq!(waiter.await.unwrap(), Position(3));
    tokio::time::timeout(Duration::from_secs(5), watch.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*watch.borrow(), Position(3));
    // With nothing new, the wait ends at its timeout and reports the head.
    let head = crate::wait_for_position(&store, Position(3), Duration::from_millis(20)).await;
    assert_eq!(head, Position(3));
}

pub async fn find_event_by_id<H: Harness>(harness: &H) {
    let store = harness.open().await;
    let batch = events(3);
    store
        .append(&stream("find"), ExpectedVersion::Any, batch.clone())
        .await
        .unwrap();
    let found = store.find_event(batch[1].event_id).await.unwrap().unwrap();
    assert_eq!(
        (found.stream_version, found.position),
        (StreamVersion(2), Position(2))
    );
    assert!(found.records(&batch[1]));
    assert_eq!(store.find_event(EventId::new_random()).await.unwrap(), None);
}

pub async fn reopen_keeps_everything<H: Harness>(harness: &H) {
    let before = {
        let store = harness.open().await;
        for i in 0..20 {
            store
                .append(
                    &stream(&format!("r{}", i % 3)),
                    ExpectedVersion::Any,
                    events(1 + i % 4),
                )
                .await
                .unwrap();
        }
        whole_log(&store).await
    };
    let store = harness.open().await;
    let after = assert_store_invariants(&store).await;
    assert_eq!(before, after);
    let outcome = store
        .append(&stream("r0"), ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    assert_eq!(
        outcome.first_position,
        Position(before.len() as u64 + 1),
        "positions go on after reopen"
    );
}
