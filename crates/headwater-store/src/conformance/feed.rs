//! The feed store conformance suite: every [`FeedStore`] backend runs it unchanged.
//!
//! A backend's test suite provides a [`FeedHarness`] (how to open its feed store on fresh
//! storage, and how to reopen the same storage) and expands
//! [`feed_conformance_suite!`](crate::feed_conformance_suite) into one test per check:
//!
//! ```text
//! headwater_store::feed_conformance_suite!(MyFeedHarness::new());
//! ```
//!
//! The suite never moves a cursor past [`SOURCE_POSITIONS_MAX`]: a backend that checks cursors
//! against its internal log opens its feed store beside a log at least that long.

use std::future::Future;
use std::time::Duration;

use headwater_core::limits::{
    FEED_PAGE_EVENTS_MAX, INTEGRATION_DATA_BYTES_MAX, READ_PAGE_BYTES_MAX, SUBJECT_PAGE_MAX,
};
use headwater_core::{
    EventId, EventType, FeedId, FeedPosition, FeedStatus, Position, Sequence, Subject, Timestamp,
};

use crate::feed::{
    COMMIT_EVENTS_MAX, FeedCommit, FeedError, FeedEvent, FeedReader, FeedState, FeedStore,
    ProjectedEvent, ProjectorBatch, PublisherCursor, ReaderSeen, SubjectHead,
    wait_for_feed_position,
};

pub use super::feed_model::random_feed_operations_match_the_model;

/// The suite (and its property test) never moves a feed's cursor past this internal position.
pub const SOURCE_POSITIONS_MAX: u64 = 1_000;

/// How the feed suite opens the backend under test.
pub trait FeedHarness: Send + Sync + 'static {
    type Store: FeedStore + Clone;

    /// Opens the feed store. The first call opens fresh, empty storage; later calls reopen the
    /// same storage (for a durable backend: as a restarted process would, after every earlier
    /// handle was dropped).
    fn open(&self) -> impl Future<Output = Self::Store> + Send;
}

/// Expands into one `#[tokio::test]` per feed conformance check, each on a fresh harness built
/// by `$harness` (an expression evaluated once per test), plus the model property test.
#[macro_export]
macro_rules! feed_conformance_suite {
    ($harness:expr) => {
        $crate::feed_conformance_suite!(@tests $harness;
            register_is_idempotent,
            feeds_are_ordered_by_name_then_version,
            set_status_and_live_at,
            commits_number_positions_and_sequences,
            a_stale_cursor_is_refused_and_writes_nothing,
            invalid_batches_write_nothing,
            an_empty_batch_moves_the_cursor,
            read_feed_pages_and_limits,
            a_byte_limit_ends_a_feed_page,
            subjects_are_listed_in_byte_order,
            read_subject_pages_and_limits,
            unknown_feeds_are_errors,
            watch_head_wakes_on_commit,
            readers_accumulate,
            reopen_keeps_every_feed,
            publisher_cursors_move_by_compare_and_set,
            invalid_publisher_advances_write_nothing,
            publishers_are_independent_and_listed_by_name,
        );

        #[test]
        fn random_feed_operations_match_the_model() {
            $crate::conformance::feed::random_feed_operations_match_the_model(|| $harness, 48);
        }
    };
    (@tests $harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let harness = $harness;
                $crate::conformance::feed::$name(&harness).await;
            }
        )*
    };
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// A feed id from its text, `accounts.v2`.
pub fn feed_id(text: &str) -> FeedId {
    FeedId::parse(text).unwrap()
}

/// A subject from its text.
pub fn subject(text: &str) -> Subject {
    Subject::new(text).unwrap()
}

/// A projected event of `subject` made of the internal event at `source`, with a fresh id and
/// data naming both.
pub fn projected(subject_text: &str, source: u64) -> ProjectedEvent {
    ProjectedEvent {
        id: EventId::new_random(),
        event_type: EventType::new("test.projected").unwrap(),
        subject: subject(subject_text),
        time: Timestamp::from_unix_micros(1_700_000_000_000_000 + source),
        data: format!("{{\"subject\":\"{subject_text}\",\"source\":{source}}}").into_bytes(),
        source_position: Position(source),
    }
}

/// A batch from `from` to `to` with one event per `(subject, source)`.
pub fn batch(from: u64, to: u64, events: &[(&str, u64)]) -> ProjectorBatch {
    ProjectorBatch {
        from: Position(from),
        to: Position(to),
        events: events.iter().map(|(s, p)| projected(s, *p)).collect(),
    }
}

async fn whole_feed<S: FeedStore>(store: &S, feed: &FeedId) -> Vec<FeedEvent> {
    let mut out: Vec<FeedEvent> = Vec::new();
    loop {
        let after = out.last().map_or(FeedPosition::START, |e| e.position);
        let page = store
            .read_feed(feed, after, FEED_PAGE_EVENTS_MAX)
            .await
            .unwrap();
        if page.is_empty() {
            return out;
        }
        assert!(
            page[0].position > after,
            "{feed}: a page after {after} starts after it"
        );
        out.extend(page);
    }
}

async fn all_subjects<S: FeedStore>(store: &S, feed: &FeedId) -> Vec<SubjectHead> {
    let mut out: Vec<SubjectHead> = Vec::new();
    loop {
        let after = out.last().map(|h| h.subject.clone());
        let page = store
            .subjects(feed, after.as_ref(), SUBJECT_PAGE_MAX)
            .await
            .unwrap();
        if page.is_empty() {
            return out;
        }
        assert!(
            after.is_none_or(|a| page[0].subject.as_str().as_bytes() > a.as_str().as_bytes()),
            "{feed}: a subject page starts after its `after`"
        );
        out.extend(page);
    }
}

/// Checks the invariants every feed holds at rest: positions 1..=n, each subject's sequences
/// 1..=k in feed order, the subject listing and `read_subject` agree with the feed, the state's
/// head is the last position and the cursor is not behind any event's source. Returns the feed.
pub async fn assert_feed_invariants<S: FeedStore>(store: &S, feed: &FeedId) -> Vec<FeedEvent> {
    let state = store
        .feed(feed)
        .await
        .unwrap()
        .expect("the feed is registered");
    let events = whole_feed(store, feed).await;
    let mut heads: std::collections::BTreeMap<Subject, u64> = Default::default();
    for (i, event) in events.iter().enumerate() {
        assert_eq!(
            event.position,
            FeedPosition(i as u64 + 1),
            "{feed}: positions are contiguous from 1"
        );
        let head = heads.entry(event.subject.clone()).or_default();
        *head += 1;
        assert_eq!(
            event.sequence,
            Sequence(*head),
            "{feed}: sequences of {} contiguous",
            event.subject
        );
        assert!(
            event.source_position <= state.cursor,
            "{feed}: event {} made of {} is past the cursor {}",
            event.position,
            event.source_position,
            state.cursor
        );
        if i > 0 {
            assert!(event.source_position >= events[i - 1].source_position);
        }
    }
    assert_eq!(
        state.head,
        FeedPosition(events.len() as u64),
        "{feed}: head"
    );
    let listed = all_subjects(store, feed).await;
    let want: Vec<_> = heads
        .iter()
        .map(|(subject, head)| SubjectHead {
            subject: subject.clone(),
            sequence: Sequence(*head),
        })
        .collect();
    assert_eq!(
        listed, want,
        "{feed}: the subject listing agrees with the feed"
    );
    for (subject, _) in heads {
        let read = store
            .read_subject(feed, &subject, Sequence::START, FEED_PAGE_EVENTS_MAX)
            .await
            .unwrap();
        let from_feed: Vec<_> = events
            .iter()
            .filter(|e| e.subject == subject)
            .cloned()
            .collect();
        assert_eq!(read, from_feed, "{feed}: read_subject({subject}) agrees");
    }
    events
}

fn assert_records(recorded: &FeedEvent, projected: &ProjectedEvent) {
    assert_eq!(recorded.id, projected.id);
    assert_eq!(recorded.event_type, projected.event_type);
    assert_eq!(recorded.subject, projected.subject);
    assert_eq!(recorded.time, projected.time);
    assert_eq!(recorded.data, projected.data);
    assert_eq!(recorded.source_position, projected.source_position);
}

#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(result: Result<T, FeedError>, what: &str) {
    match result {
        Err(FeedError::Invalid(_)) => {}
        other => panic!("{what}: expected Invalid, got {other:?}"),
    }
}

#[track_caller]
fn assert_unknown<T: std::fmt::Debug>(result: Result<T, FeedError>, feed: &FeedId, what: &str) {
    match result {
        Err(FeedError::UnknownFeed(f)) if &f == feed => {}
        other => panic!("{what}: expected UnknownFeed({feed}), got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The checks

pub async fn register_is_idempotent<H: FeedHarness>(harness: &H) {
    let store = harness.open().await;
    let feed = feed_id("accounts.v1");
    assert_eq!(store.feed(&feed).await.unwrap(), None);
    assert!(store.feeds().await.unwrap().is_empty());
    let state = store.register(&feed).await.unwrap();
    assert_eq!(state.feed, feed);
    assert_eq!(state.status, FeedStatus::Backfilling);
    assert_eq!(state.head, FeedPosition::START);
    assert_eq!(state.cursor, Position::START);
    assert_eq!(state.live_at, None);
    assert_eq!(store.feed(&feed).await.unwrap(), Some(state.clone()));

    store.commit(&feed, batch(0, 2, &[("a", 1)])).await.unwrap();
    store.set_status(&feed, FeedStatus::Live).await.unwrap();
    let before = store.feed(&feed).await.unwrap().unwrap();
    let again = store.register(&feed).await.unwrap();
    assert_eq!(again, before, "registering a known feed changes nothing");
    assert_eq!(again.registered_at, state.registered_at);
    assert_eq!(store.feeds().await.unwrap(), vec![before]);
    assert!(
        store.feed(&feed_id("accounts.v2")).await.unwrap().is_none(),
        "another version is another feed"
    );
}

pub async fn feeds_are_ordered_by_name_then_version<H: FeedHarness>(harness: &H) {
    let store = harness.open().await;
    for text in [
        "accounts.v2",
        "zeta.v1",
        "accounts.v10",
        "accounts.v1",
        "alpha.v3",
        "accounts_x.v1",
    ] {
        store.register(&feed_id(text)).await.unwrap();
    }
    let names: Vec<String> = store
        .feeds()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.feed.to_string())
        .collect();
    assert_eq!(
        names,
        [
            "accounts.v1",
            "accounts.v2",
            "accounts.v10",
            "accounts_x.v1",
            "alpha.v3",
            "zeta.v1"
        ],
        "by name (bytes), then by version (numbers)"
    );
}

pub async fn set_status_and_live_at<H: FeedHarness>(harness: &H) {
    let store = harness.open().await;
    let feed = feed_id("accounts.v1");
    let other = feed_id("accounts.v2");
    store.register(&feed).await.unwrap();
    store.register(&other).await.unwrap();

    let retired = store.set_status(&feed, FeedStatus::Retired).await.unwrap();
    assert_eq!(retired.status, FeedStatus::Retired);
    assert_eq!(retired.live_at, None, "only Live sets live_at");

    let live = store.set_status(&feed, FeedStatus::Live).await.unwrap();
    assert_eq!(live.status, FeedStatus::Live);
    let live_at = live
        .live_at
        .expect("live_at is set when the feed goes live");
    assert!(live_at >= live.registered_at);
    assert_eq!(store.feed(&feed).await.unwrap(), Some(live.clone()));

    for status in [
        FeedStatus::Retired,
        FeedStatus::Backfilling,
        FeedStatus::Live,
    ] {
        let state = store.set_status(&feed, status).await.unwrap();
        assert_eq!(state.status, status);
        assert_eq!(
            state.live_at,
            Some(live_at),
            "live_at is the first time only"
        );
        assert_eq!(state.head, live.head);
        assert_eq!(state.cursor, live.cursor);
        assert_eq!(state.registered_at, live.registered_at);
    }
    let untouched = store.feed(&other).await.unwrap().unwrap();
    assert_eq!(untouched.status, FeedStatus::Backfilling);
    assert_eq!(untouched.live_at, None);
}

pub async fn commits_number_positions_and_sequences<H: FeedHarness>(harness: &H) {
    let store = harness.open().await;
    let feed = feed_id("accounts.v1");
    let other = feed_id("accounts.v2");
    store.register(&feed).await.unwrap();
    store.register(&other).await.unwrap();

    let first = batch(0, 4, &[("a", 1), ("b", 2), ("a", 2), ("c", 4)]);
    let commit = store.commit(&feed, first.clone()).await.unwrap();
    assert_eq!(
        commit,
        FeedCommit {
            head: FeedPosition(4),
            cursor: Position(4)
        }
    );
    let second = batch(4, 9, &[("b", 5), ("a", 7), ("d", 9), ("a", 9)]);
    let commit = store.commit(&feed, second.clone()).await.unwrap();
    assert_eq!(
        commit,
        FeedCommit {
            head: FeedPosition(8),
            cursor: Position(9)
        }
    );
    let state = store.feed(&feed).await.unwrap().unwrap();
    assert_eq!((state.head, state.cursor), (FeedPosition(8), Position(9)));

    let events = assert_feed_invariants(&store, &feed).await;
    let projected: Vec<_> = first.events.iter().chain(&second.events).collect();
    assert_eq!(events.len(), projected.len());
    let sequences = [1, 1, 2, 1, 2, 3, 1, 4];
    for ((event, projected), sequence) in events.iter().zip(&projected).zip(sequences) {
        assert_records(event, projected);
        assert_eq!(event.sequence, Sequence(sequence), "{event:?}");
    }

    // The other feed numbers on its own.
    let commit = store
        .commit(&other, batch(0, 3, &[("a", 3)]))
        .await
        .unwrap();
    assert_eq!(commit.head, FeedPosition(1));
    let events = assert_feed_invariants(&store, &other).await;
    assert_eq!(
        (events[0].position, events[0].sequence),
        (FeedPosition(1), Sequence(1))
    );
    assert_eq!(whole_feed(&store, &feed).await.len(), 8);
}

pub async fn a_stale_cursor_is_refused_and_writes_nothing<H: FeedHarness>(harness: &H) {
    let store = harness.open().await;
    let feed = feed_id("accounts.v1");
    store.register(&feed).await.unwrap();
    store
        .commit(&feed, batch(0, 5, &[("a", 1), ("b", 5)]))
        .await
        .unwrap();
    let before = whole_feed(&store, &feed).await;
    for from in [0, 4, 6, 100] {
        let result = store
            .commit(&feed, batch(from, from + 3, &[("a", from + 1)]))
            .await;
        match result {
            Err(FeedError::CursorMoved {
                feed: f,
                expected,
                actual,
            }) => {
                assert_eq!(f, feed);
                assert_eq!(expected, Position(from));
                assert_eq!(actual, Position(5));
            }
            other => panic!("from {from}: expected CursorMoved, got {other:?}"),
        }
        let error = store
            .commit(&feed, batch(from, from, &[]))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), headwater_core::ErrorKind::Conflict);
    }
    assert_eq!(whole_feed(&store, &feed).await, before, "nothing written");
    let state = store.feed(&feed).await.unwrap().unwrap();
    assert_eq!((state.head, state.cursor), (FeedPosition(2), Position(5)));
    // The right cursor still commits, numbering on.
    let commit = store.commit(&feed, batch(5, 6, &[("a", 6)])).await.unwrap();
    assert_eq!(commit.head, FeedPosition(3));
    let events = assert_feed_invariants(&store, &feed).await;
    assert_eq!(events[2].sequence, Sequence(2));
}

pub async fn invalid_batches_write_nothing<H: FeedHarness>(harness: &H) {
    let store = harness.open().await;
    let feed = feed_id("accounts.v1");
    store.register(&feed).await.unwrap();
    store.commit(&feed, batch(0, 2, &[("a", 1)])).await.unwrap();
    let before = store.feed(&feed).await.unwrap().unwrap();

    let mut oversized = batch(2, 4, &[("a", 3)]);
    oversized.events[0].data = vec![b'x'; INTEGRATION_DATA_BYTES_MAX + 1];
    let too_many = ProjectorBatch {
        from: Position(2),
        to: Position(3),
        events: (0..=COMMIT_EVENTS_MAX).map(|_| projected("a", 3)).collect(),
    };
    let cases = [
        ("backwards", batch(2, 1, &[])),
        ("source at from", batch(2, 4, &[("a", 2)])),
        ("source before from", batch(2, 4, &[("a", 1)])),
        ("source past to", batch(2, 4, &[("a", 3), ("b", 5)])),
        ("sources out of order", batch(2, 6, &[("a", 4), ("b", 3)])),
        ("oversized data", oversized),
        ("too many events", too_many),
    ];
    for (what, invalid) in cases {
        let result = store.commit(&feed, invalid).await;
        assert_invalid(result, what);
        assert_eq!(
            store.feed(&feed).await.unwrap().unwrap(),
            before,
            "{what}: nothing written"
        );
    }
    assert_eq!(whole_feed(&store, &feed).await.len(), 1);

    // The largest valid data fits.
    let mut largest = batch(2, 3, &[("a", 3)]);
    largest.events[0].data = vec![b'y'; INTEGRATION_DATA_BYTES_MAX];
    store.commit(&feed, largest).await.unwrap();
    let events = assert_feed_invariants(&store, &feed).await;
    assert_eq!(events[1].data.len(), INTEGRATION_DATA_BYTES_MAX);
}

pub async fn an_empty_batch_moves_the_cursor<H: FeedHarness>(harness: &H) {
    let store = harness.open().await;
    let feed = feed_id("accounts.v1");
    store.register(&feed).await.unwrap();
    let commit = store.commit(&feed, batch(0, 10, &[])).await.unwrap();
    assert_eq!(
        commit,
        FeedCommit {
            head: FeedPosition::START,
            cursor: Position(10)
        }
    );
    let state = store.feed(&feed).await.unwrap().unwrap();
    assert_eq!(
        (state.head, state.cursor),
        (FeedPosition::START, Position(10))
    );
    // A batch that moves nothing is valid and changes nothing.
    let commit = store.commit(&feed, batch(10, 10, &[])).await.unwrap();
    assert_eq!(commit.cursor, Position(10));
    let commit = store
        .commit(&feed, batch(10, 12, &[("a", 12)]))
        .await
        .unwrap();
    assert_eq!(commit.head, FeedPosition(1));
    let commit = store.commit(&feed, batch(12, 20, &[])).await.unwrap();
    assert_eq!(
        commit,
        FeedCommit {
            head: FeedPosition(1),
            cursor: Position(20)
        }
    );
    assert!(
        store
            .read_feed(&feed, FeedPosition(1), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_feed_invariants(&store, &feed).await;
}

pub async fn read_feed_pages_and_limits<H: FeedHarness>(harness: &H) {
    let store = harness.open().await;
    let feed = feed_id("accounts.v1");
    store.register(&feed).await.unwrap();
    assert!(
        store
            .read_feed(&feed, FeedPosition::START, 10)
            .await
            .unwrap()
            .is_empty(),
        "an empty feed reads empty"
    );
    let subjects = ["a", "b", "c"];
    let events: Vec<_> = (1..=25u64)
        .map(|i| (subjects[(i % 3) as usize], i))
        .collect();
    store.commit(&feed, batch(0, 25, &events)).await.unwrap();

    let positions = |page: &[FeedEvent]| page.iter().map(|e| e.position.get()).collect::<Vec<_>>();
    let page = store
        .read_feed(&feed, FeedPosition::START, 10)
        .await
        .unwrap();
    assert_eq!(positions(&page), (1..=10).collect::<Vec<_>>());
    let page = store.read_feed(&feed, FeedPosition(10), 10).await.unwrap();
    assert_eq!(positions(&page), (11..=20).collect::<Vec<_>>());
    let page = store.read_feed(&feed, FeedPosition(20), 10).await.unwrap();
    assert_eq!(positions(&page), (21..=25).collect::<Vec<_>>());
    let page = store.read_feed(&feed, FeedPosition(24), 1).await.unwrap();
    assert_eq!(positions(&page), [25]);
    for after in [25, 26, 1_000, u64::MAX] {
        assert!(
            store
                .read_feed(&feed, FeedPosition(after), 10)
                .await
                .unwrap()
                .is_empty(),
            "nothing after {after}"
        );
    }
    let page = store
        .read_feed(&feed, FeedPosition::START, FEED_PAGE_EVENTS_MAX)
        .await
        .unwrap();
    assert_eq!(page.len(), 25);
    assert_invalid(
        store.read_feed(&feed, FeedPosition::START, 0).await,
        "limit 0",
    );
    assert_invalid(
        store
            .read_feed(&feed, FeedPosition::START, FEED_PAGE_EVENTS_MAX + 1)
            .await,
        "limit past the maximum",
    );
    assert_invalid(
        store.read_feed(&feed, FeedPosition::START, u64::MAX).await,
        "limit u64::MAX",
    );
}

pub async fn a_byte_limit_ends_a_feed_page<H: FeedHarness>(harness: &H) {
    let store = harness.open().await;
    let feed = feed_id("accounts.v1");
    store.register(&feed).await.unwrap();
    let count = READ_PAGE_BYTES_MAX / INTEGRATION_DATA_BYTES_MAX + 2;
    let mut big = ProjectorBatch {
        from: Position::START,
        to: Position(count as u64),
        events: (1..=count as u64).map(|i| projected("big", i)).collect(),
    };
    for event in &mut big.events {
        event.data = vec![b'z'; INTEGRATION_DATA_BYTES_MAX];
    }
    store.commit(&feed, big).await.unwrap();
    let fits = READ_PAGE_BYTES_MAX / INTEGRATION_DATA_BYTES_MAX;
    let page = store
        .read_feed(&feed, FeedPosition::START, FEED_PAGE_EVENTS_MAX)
        .await
        .unwrap();
    assert_eq!(page.len(), fits, "a page stops at READ_PAGE_BYTES_MAX");
    let page = store
        .read_subject(
            &feed,
            &subject("big"),
            Sequence::START,
            FEED_PAGE_EVENTS_MAX,
        )
        .await
        .unwrap();
    assert_eq!(page.len(), fits, "a subject page too");
    let rest = store
        .read_feed(&feed, FeedPosition(fits as u64), FEED_PAGE_EVENTS_MAX)
        .await
        .unwrap();
    assert_eq!(rest.len(), count - fits);
}

pub async fn subjects_are_listed_in_byte_order<H: FeedHarness>(harness: &H) {
    let store = harness.open().await;
    let feed = feed_id("accounts.v1");
    store.register(&feed).await.unwrap();
    assert!(
        store.subjects(&feed, None, 10).await.unwrap().is_empty(),
        "an empty feed has no subjects"
    );
    let written = [
        "a", "A", "a-b", "a.b", "Z~", "b", "0", "a", "a_b", "~", "a.b", "a", "aa", "-",
    ];
    let events: Vec<_> = written
        .iter()
        .enumerate()
        .map(|(i, s)| (*s, i as u64 + 1))
        .collect();
    store
        .commit(&feed, batch(0, written.len() as u64, &events))
        .await
        .unwrap();
    let mut want: Vec<&str> = written.to_vec();
    want.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    want.dedup();
    assert_eq!(
        want,
        [
            "-", "0", "A", "Z~", "a", "a-b", "a.b", "a_b", "aa", "b", "~"
        ],
        "the expected byte order"
    );
    let heads = |page: Vec<SubjectHead>| {
        page.into_iter()
            .map(|h| (h.subject.as_str().to_owned(), h.sequence.get()))
            .collect::<Vec<_>>()
    };
    let all = heads(store.subjects(&feed, None, SUBJECT_PAGE_MAX).await.unwrap());
    let names: Vec<_> = all.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(names, want);
    let count = |s: &str| written.iter().filter(|w| **w == s).count() as u64;
    for (s, head) in &all {
        assert_eq!(*head, count(s), "head of {s}");
    }

    // Paging with `after`, two at a time, walks the same list.
    let mut walked = Vec::new();
    let mut after: Option<Subject> = None;
    loop {
        let page = store.subjects(&feed, after.as_ref(), 2).await.unwrap();
        assert!(page.len() <= 2);
        assert!(
            walked.len() <= all.len(),
            "paging goes on past the last subject"
        );
        let Some(last) = page.last() else { break };
        after = Some(last.subject.clone());
        walked.extend(heads(page));
    }
    assert_eq!(walked, all);

    // `after` need not be a subject of the feed.
    let page = heads(store.subjects(&feed, Some(&subject("B")), 2).await.unwrap());
    assert_eq!(page, [("Z~".to_owned(), 1), ("a".to_owned(), 3)]);
    let page = heads(store.subjects(&feed, Some(&subject("a")), 3).await.unwrap());
    assert_eq!(
        page,
        [
            ("a-b".to_owned(), 1),
            ("a.b".to_owned(), 2),
            ("a_b".to_owned(), 1)
        ]
    );
    assert!(
        store
            .subjects(&feed, Some(&subject("~")), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .subjects(&feed, Some(&subject("~~")), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_invalid(store.subjects(&feed, None, 0).await, "limit 0");
    assert_invalid(
        store.subjects(&feed, None, SUBJECT_PAGE_MAX + 1).await,
        "limit past the maximum",
    );
    assert_feed_invariants(&store, &feed).await;
}

pub async fn read_subject_pages_and_limits<H: FeedHarness>(harness: &H) {
    let store = harness.open().await;
    let feed = feed_id("accounts.v1");
    store.register(&feed).await.unwrap();
    store
        .commit(
            &feed,
            batch(
                0,
                9,
                &[
                    ("a", 1),
                    ("b", 2),
                    ("a", 3),
                    ("a", 4),
                    ("b", 5),
                    ("a", 6),
                    ("a", 9),
                ],
            ),
        )
        .await
        .unwrap();
    let a = subject("a");
    let read = |after: u64, limit: u64| {
        let store = store.clone();
        let feed = feed.clone();
        let a = a.clone();
        async move {
            store
                .read_subject(&feed, &a, Sequence(after), limit)
                .await
                .map(|page| {
                    page.into_iter()
                        .map(|e| (e.sequence.get(), e.position.get()))
                        .collect::<Vec<_>>()
                })
        }
    };
    assert_eq!(read(0, 2).await.unwrap(), [(1, 1), (2, 3)]);
    assert_eq!(read(2, 10).await.unwrap(), [(3, 4), (4, 6), (5, 7)]);
    assert_eq!(read(4, 1).await.unwrap(), [(5, 7)]);
    assert!(read(5, 10).await.unwrap().is_empty());
    assert!(read(u64::MAX, 10).await.unwrap().is_empty());
    assert_invalid(read(0, 0).await, "limit 0");
    assert_invalid(
        read(0, FEED_PAGE_EVENTS_MAX + 1).await,
        "limit past the maximum",
    );
    for unknown in ["c", "A", "a-", "aa"] {
        assert!(
            store
                .read_subject(&feed, &subject(unknown), Sequence::START, 10)
                .await
                .unwrap()
                .is_empty(),
            "unknown subject {unknown} reads empty"
        );
    }
    let b = store
        .read_subject(&feed, &subject("b"), Sequence::START, 10)
        .await
        .unwrap();
    assert_eq!(
        b.iter()
            .map(|e| e.source_position.get())
            .collect::<Vec<_>>(),
        [2, 5]
    );
    assert!(b.iter().all(|e| e.subject == subject("b")));
}

pub async fn unknown_feeds_are_errors<H: FeedHarness>(harness: &H) {
    let store = harness.open().await;
    let known = feed_id("accounts.v1");
    store.register(&known).await.unwrap();
    let feed = feed_id("accounts.v2");
    assert_eq!(store.feed(&feed).await.unwrap(), None);
    assert_unknown(
        store.set_status(&feed, FeedStatus::Live).await,
        &feed,
        "set_status",
    );
    assert_unknown(
        store.commit(&feed, batch(0, 1, &[("a", 1)])).await,
        &feed,
        "commit",
    );
    assert_unknown(
        store.read_feed(&feed, FeedPosition::START, 10).await,
        &feed,
        "read_feed",
    );
    assert_unknown(store.subjects(&feed, None, 10).await, &feed, "subjects");
    assert_unknown(
        store
            .read_subject(&feed, &subject("a"), Sequence::START, 10)
            .await,
        &feed,
        "read_subject",
    );
    assert_unknown(store.readers(&feed).await, &feed, "readers");
    assert_unknown(
        store
            .advance_publisher(&feed, "rabbitmq", FeedPosition::START, FeedPosition::START)
            .await,
        &feed,
        "advance_publisher",
    );
    assert_unknown(store.publishers(&feed).await, &feed, "publishers");
    let error = store.readers(&feed).await.unwrap_err();
    assert_eq!(error.kind(), headwater_core::ErrorKind::BadRequest);
    // Nothing was created by asking.
    assert_eq!(store.feed(&feed).await.unwrap(), None);
    assert_eq!(store.feeds().await.unwrap().len(), 1);
}

pub async fn watch_head_wakes_on_commit<H: FeedHarness>(harness: &H) {
    let store = harness.open().await;
    let feed = feed_id("accounts.v1");
    let mut early = store.watch_head(&feed);
    assert_eq!(*early.borrow(), FeedPosition::START, "unregistered: START");
    store.register(&feed).await.unwrap();
    let mut watch = store.watch_head(&feed);
    assert_eq!(*watch.borrow_and_update(), FeedPosition::START);

    let waiter = {
        let store = store.clone();
        let feed = feed.clone();
        tokio::spawn(async move {
            wait_for_feed_position(&store, &feed, FeedPosition::START, Duration::from_secs(30))
                .await
        })
    };
    let committer = {
        let store = store.clone();
        let feed = feed.clone();
        tokio::spawn(async move {
            store
                .commit(&feed, batch(0, 2, &[("a", 1), ("b", 2)]))
                .await
                .unwrap()
        })
    };
    assert_eq!(committer.await.unwrap().head, FeedPosition(2));
    assert_eq!(waiter.await.unwrap(), FeedPosition(2));
    tokio::time::timeout(
        Duration::from_secs(30),
        watch.wait_for(|h| *h == FeedPosition(2)),
    )
    .await
    .expect("the watch sees the commit")
    .unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        early.wait_for(|h| *h == FeedPosition(2)),
    )
    .await
    .expect("a watch taken before the feed was registered sees the commit")
    .unwrap();
    // Already past: returns at once with the head.
    let head =
        wait_for_feed_position(&store, &feed, FeedPosition(1), Duration::from_secs(30)).await;
    assert_eq!(head, FeedPosition(2));
    // Nothing new: times out with the head.
    let head =
        wait_for_feed_position(&store, &feed, FeedPosition(2), Duration::from_millis(50)).await;
    assert_eq!(head, FeedPosition(2));
    // An empty batch does not move the head.
    store.commit(&feed, batch(2, 5, &[])).await.unwrap();
    assert_eq!(*store.watch_head(&feed).borrow(), FeedPosition(2));
}

pub async fn readers_accumulate<H: FeedHarness>(harness: &H) {
    let store = harness.open().await;
    let v1 = feed_id("accounts.v1");
    let v2 = feed_id("accounts.v2");
    store.register(&v1).await.unwrap();
    store.register(&v2).await.unwrap();
    assert!(store.readers(&v1).await.unwrap().is_empty());
    let at = Timestamp::from_unix_micros;
    let seen = |feed: &FeedId, reader: &str, micros: u64, reads: u64| ReaderSeen {
        feed: feed.clone(),
        reader: reader.to_owned(),
        at: at(micros),
        reads,
    };
    store
        .record_readers(vec![
            seen(&v1, "ledger", 1_000, 2),
            seen(&v1, "audit", 2_000, 1),
            seen(&v2, "ledger", 3_000, 5),
            seen(&feed_id("unknown.v1"), "ledger", 3_000, 5),
        ])
        .await
        .unwrap();
    store
        .record_readers(vec![
            seen(&v1, "ledger", 5_000, 3),
            // An older sighting recorded late moves only first_read_at.
            seen(&v1, "audit", 500, 4),
        ])
        .await
        .unwrap();
    store.record_readers(Vec::new()).await.unwrap();
    assert_eq!(
        store.readers(&v1).await.unwrap(),
        [
            FeedReader {
                reader: "audit".to_owned(),
                first_read_at: at(500),
                last_read_at: at(2_000),
                reads: 5,
            },
            FeedReader {
                reader: "ledger".to_owned(),
                first_read_at: at(1_000),
                last_read_at: at(5_000),
                reads: 5,
            },
        ]
    );
    assert_eq!(
        store.readers(&v2).await.unwrap(),
        [FeedReader {
            reader: "ledger".to_owned(),
            first_read_at: at(3_000),
            last_read_at: at(3_000),
            reads: 5,
        }]
    );
    assert!(
        store.feed(&feed_id("unknown.v1")).await.unwrap().is_none(),
        "unknown feeds are ignored, not created"
    );
}

pub async fn reopen_keeps_every_feed<H: FeedHarness>(harness: &H) {
    let v1 = feed_id("accounts.v1");
    let v2 = feed_id("accounts.v2");
    let (states, feed_v1, feed_v2, subjects_v1, readers_v1, publishers_v1) = {
        let store = harness.open().await;
        store.register(&v1).await.unwrap();
        store.register(&v2).await.unwrap();
        store
            .commit(&v1, batch(0, 6, &[("a", 1), ("b", 3), ("a", 6)]))
            .await
            .unwrap();
        store.commit(&v2, batch(0, 4, &[("x", 4)])).await.unwrap();
        store.commit(&v2, batch(4, 8, &[])).await.unwrap();
        store.set_status(&v1, FeedStatus::Live).await.unwrap();
        store.set_status(&v1, FeedStatus::Retired).await.unwrap();
        store
            .record_readers(vec![ReaderSeen {
                feed: v1.clone(),
                reader: "ledger".to_owned(),
                at: Timestamp::from_unix_micros(42),
                reads: 7,
            }])
            .await
            .unwrap();
        store
            .advance_publisher(&v1, "rabbitmq", FeedPosition::START, FeedPosition(2))
            .await
            .unwrap();
        store
            .advance_publisher(&v1, "nats", FeedPosition::START, FeedPosition(3))
            .await
            .unwrap();
        (
            store.feeds().await.unwrap(),
            assert_feed_invariants(&store, &v1).await,
            assert_feed_invariants(&store, &v2).await,
            all_subjects(&store, &v1).await,
            store.readers(&v1).await.unwrap(),
            store.publishers(&v1).await.unwrap(),
        )
    };
    let store = harness.open().await;
    assert_eq!(store.feeds().await.unwrap(), states);
    let reopened: Vec<FeedState> = states.clone();
    assert_eq!(reopened[0].status, FeedStatus::Retired);
    assert!(reopened[0].live_at.is_some());
    assert_eq!(reopened[1].cursor, Position(8));
    assert_eq!(assert_feed_invariants(&store, &v1).await, feed_v1);
    assert_eq!(assert_feed_invariants(&store, &v2).await, feed_v2);
    assert_eq!(all_subjects(&store, &v1).await, subjects_v1);
    assert_eq!(store.readers(&v1).await.unwrap(), readers_v1);
    assert_eq!(publishers_v1.len(), 2);
    assert_eq!(store.publishers(&v1).await.unwrap(), publishers_v1);
    assert!(store.publishers(&v2).await.unwrap().is_empty());
    // The reopened cursors go on from where they were.
    assert_publisher_moved(
        store
            .advance_publisher(&v1, "rabbitmq", FeedPosition::START, FeedPosition(3))
            .await,
        "rabbitmq",
        FeedPosition::START,
        FeedPosition(2),
    );
    store
        .advance_publisher(&v1, "rabbitmq", FeedPosition(2), FeedPosition(3))
        .await
        .unwrap();
    assert_eq!(*store.watch_head(&v1).borrow(), FeedPosition(3));
    // Numbering goes on where it stopped.
    let commit = store
        .commit(&v1, batch(6, 7, &[("b", 7), ("c", 7)]))
        .await
        .unwrap();
    assert_eq!(commit.head, FeedPosition(5));
    let events = assert_feed_invariants(&store, &v1).await;
    assert_eq!(
        events[3..]
            .iter()
            .map(|e| (e.subject.as_str(), e.sequence.get()))
            .collect::<Vec<_>>(),
        [("b", 2), ("c", 1)]
    );
    assert_eq!(
        store.register(&v1).await.unwrap().status,
        FeedStatus::Retired
    );
}

#[track_caller]
fn assert_publisher_moved<T: std::fmt::Debug>(
    result: Result<T, FeedError>,
    publisher: &str,
    expected: FeedPosition,
    actual: FeedPosition,
) {
    match result {
        Err(
            ref error @ FeedError::PublisherMoved {
                publisher: ref p,
                expected: e,
                actual: a,
                ..
            },
        ) if p == publisher && e == expected && a == actual => {
            assert_eq!(error.kind(), headwater_core::ErrorKind::Conflict);
        }
        other => panic!(
            "expected PublisherMoved of {publisher} (expected {expected}, actual {actual}), got {other:?}"
        ),
    }
}

/// A feed `accounts.v1` with `events` events (its head), in a fresh store.
async fn feed_with_events<H: FeedHarness>(harness: &H, events: u64) -> (H::Store, FeedId) {
    let store = harness.open().await;
    let feed = feed_id("accounts.v1");
    store.register(&feed).await.unwrap();
    let events: Vec<(&str, u64)> = (1..=events).map(|p| ("a", p)).collect();
    let to = events.last().map_or(0, |e| e.1);
    store.commit(&feed, batch(0, to, &events)).await.unwrap();
    (store, feed)
}

pub async fn publisher_cursors_move_by_compare_and_set<H: FeedHarness>(harness: &H) {
    let (store, feed) = feed_with_events(harness, 3).await;
    assert!(store.publishers(&feed).await.unwrap().is_empty());

    // The first advance, from START, creates the cursor.
    let before = crate::memory::now();
    let first = store
        .advance_publisher(&feed, "rabbitmq", FeedPosition::START, FeedPosition(1))
        .await
        .unwrap();
    assert_eq!(first.publisher, "rabbitmq");
    assert_eq!(first.position, FeedPosition(1));
    // The store's clock (PostgreSQL's may be a little behind this process's).
    assert!(
        first.updated_at.unix_micros() + 60_000_000 >= before.unix_micros(),
        "{first:?} is stamped long before {before:?}"
    );
    assert_eq!(
        store.publishers(&feed).await.unwrap(),
        std::slice::from_ref(&first)
    );

    // An advance moves it.
    let second = store
        .advance_publisher(&feed, "rabbitmq", FeedPosition(1), FeedPosition(3))
        .await
        .unwrap();
    assert_eq!(second.position, FeedPosition(3));
    assert!(second.updated_at >= first.updated_at);
    assert_eq!(
        store.publishers(&feed).await.unwrap(),
        std::slice::from_ref(&second)
    );

    // A stale `from` is refused with the actual cursor, and writes nothing.
    assert_publisher_moved(
        store
            .advance_publisher(&feed, "rabbitmq", FeedPosition(1), FeedPosition(2))
            .await,
        "rabbitmq",
        FeedPosition(1),
        FeedPosition(3),
    );
    assert_publisher_moved(
        store
            .advance_publisher(&feed, "rabbitmq", FeedPosition::START, FeedPosition(3))
            .await,
        "rabbitmq",
        FeedPosition::START,
        FeedPosition(3),
    );
    // A publisher without a cursor is at START.
    assert_publisher_moved(
        store
            .advance_publisher(&feed, "nats", FeedPosition(1), FeedPosition(2))
            .await,
        "nats",
        FeedPosition(1),
        FeedPosition::START,
    );
    assert_eq!(
        store.publishers(&feed).await.unwrap(),
        std::slice::from_ref(&second)
    );

    // An advance to where it is only stamps it.
    let stamped = store
        .advance_publisher(&feed, "rabbitmq", FeedPosition(3), FeedPosition(3))
        .await
        .unwrap();
    assert_eq!(stamped.position, FeedPosition(3));
    assert!(stamped.updated_at >= second.updated_at);
    assert_eq!(
        store.publishers(&feed).await.unwrap(),
        std::slice::from_ref(&stamped)
    );

    // The cursor follows the feed's head as it grows.
    store
        .commit(&feed, batch(3, 5, &[("b", 4), ("a", 5)]))
        .await
        .unwrap();
    let last = store
        .advance_publisher(&feed, "rabbitmq", FeedPosition(3), FeedPosition(5))
        .await
        .unwrap();
    assert_eq!(last.position, FeedPosition(5));
    assert_eq!(store.publishers(&feed).await.unwrap(), [last]);
}

pub async fn invalid_publisher_advances_write_nothing<H: FeedHarness>(harness: &H) {
    let (store, feed) = feed_with_events(harness, 3).await;
    let kept = store
        .advance_publisher(&feed, "rabbitmq", FeedPosition::START, FeedPosition(2))
        .await
        .unwrap();
    let unchanged = [kept.clone()];

    assert_invalid(
        store
            .advance_publisher(&feed, "rabbitmq", FeedPosition(2), FeedPosition(1))
            .await,
        "to < from",
    );
    assert_invalid(
        store
            .advance_publisher(&feed, "rabbitmq", FeedPosition(2), FeedPosition(4))
            .await,
        "to past the head",
    );
    // Past the head is refused before the cursor is compared (and creates nothing).
    assert_invalid(
        store
            .advance_publisher(&feed, "nats", FeedPosition::START, FeedPosition(4))
            .await,
        "a new publisher past the head",
    );
    let max = headwater_core::limits::PUBLISHER_NAME_BYTES_MAX;
    let too_long = "a".repeat(max + 1);
    for name in [
        "",
        too_long.as_str(),
        "RabbitMQ",
        "rabbit/mq",
        "rabbit mq",
        "rabbit.mq",
        "nats\0",
        "é",
    ] {
        assert_invalid(
            store
                .advance_publisher(&feed, name, FeedPosition::START, FeedPosition(1))
                .await,
            &format!("publisher name {name:?}"),
        );
    }
    assert_eq!(store.publishers(&feed).await.unwrap(), unchanged);

    // The longest name and every character allowed are fine.
    let longest = "a".repeat(max);
    for name in [longest.as_str(), "rabbitmq-2_eu", "0"] {
        let cursor = store
            .advance_publisher(&feed, name, FeedPosition::START, FeedPosition(3))
            .await
            .unwrap();
        assert_eq!(cursor.publisher, name);
    }
    assert_eq!(store.publishers(&feed).await.unwrap().len(), 4);
    let rabbitmq = store
        .publishers(&feed)
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.publisher == "rabbitmq");
    assert_eq!(rabbitmq, Some(kept));
}

pub async fn publishers_are_independent_and_listed_by_name<H: FeedHarness>(harness: &H) {
    let (store, v1) = feed_with_events(harness, 4).await;
    let v2 = feed_id("accounts.v2");
    store.register(&v2).await.unwrap();

    // On an empty feed the first advance (START to START) creates the cursor at START.
    let empty = store
        .advance_publisher(&v2, "nats", FeedPosition::START, FeedPosition::START)
        .await
        .unwrap();
    assert_eq!(empty.position, FeedPosition::START);
    assert_eq!(
        store.publishers(&v2).await.unwrap(),
        std::slice::from_ref(&empty)
    );

    let advance = |publisher: &'static str, from: u64, to: u64| {
        let store = store.clone();
        let feed = v1.clone();
        async move {
            store
                .advance_publisher(&feed, publisher, FeedPosition(from), FeedPosition(to))
                .await
                .unwrap()
        }
    };
    advance("rabbitmq", 0, 1).await;
    advance("nats", 0, 4).await;
    advance("audit", 0, 2).await;
    advance("rabbitmq", 1, 3).await;
    // One publisher's cursor is not another's `from`.
    assert_publisher_moved(
        store
            .advance_publisher(&v1, "audit", FeedPosition(3), FeedPosition(4))
            .await,
        "audit",
        FeedPosition(3),
        FeedPosition(2),
    );
    let listed = store.publishers(&v1).await.unwrap();
    let cursors: Vec<(&str, FeedPosition)> = listed
        .iter()
        .map(|p: &PublisherCursor| (p.publisher.as_str(), p.position))
        .collect();
    assert_eq!(
        cursors,
        [
            ("audit", FeedPosition(2)),
            ("nats", FeedPosition(4)),
            ("rabbitmq", FeedPosition(3)),
        ]
    );
    // The other feed's publisher of the same name is its own.
    assert_eq!(store.publishers(&v2).await.unwrap(), [empty]);
    store.commit(&v2, batch(0, 1, &[("x", 1)])).await.unwrap();
    let moved = store
        .advance_publisher(&v2, "nats", FeedPosition::START, FeedPosition(1))
        .await
        .unwrap();
    assert_eq!(store.publishers(&v2).await.unwrap(), [moved]);
    assert_eq!(store.publishers(&v1).await.unwrap(), listed);
}
