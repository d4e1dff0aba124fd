//! `PgFeedStore` against `MemoryFeedStore` (the reference semantics), two replicas committing
//! from one cursor, and head watches woken by another replica's commit.

use std::time::{Duration, Instant};

use headwater_core::limits::{INTEGRATION_DATA_BYTES_MAX, READ_PAGE_BYTES_MAX};
use headwater_core::{
    EventId, EventType, FeedId, FeedPosition, FeedStatus, Position, Sequence, Subject, Timestamp,
};
use headwater_postgres::{Options, PgFeedStore, PostgresStore};
use headwater_store::{
    FeedError, FeedEvent, FeedState, FeedStore, MemoryFeedStore, ProjectedEvent, ProjectorBatch,
    ReaderSeen,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::support::Fresh;

/// How long a test waits for a state it polls for, in seconds.
const WAIT_SECS: u64 = 30;

pub(crate) fn feed(text: &str) -> FeedId {
    FeedId::parse(text).unwrap()
}

pub(crate) fn projected(source: u64, index: u32, subject: &str, data: Vec<u8>) -> ProjectedEvent {
    let mut name = source.to_be_bytes().to_vec();
    name.extend_from_slice(&index.to_be_bytes());
    ProjectedEvent {
        id: EventId::derived(&uuid::Uuid::nil(), &name),
        event_type: EventType::new("accounts.changed").unwrap(),
        subject: Subject::new(subject).unwrap(),
        time: Timestamp::from_unix_micros(1_700_000_000_000_000 + source),
        data,
        source_position: Position(source),
    }
}

/// A batch from `from` of `sources` internal events, each making 0 to 3 integration events on
/// random subjects (some of them sorting differently by byte than by a natural collation).
pub(crate) fn random_batch(rng: &mut StdRng, from: u64, sources: u64) -> ProjectorBatch {
    const SUBJECTS: [&str; 9] = ["a", "B", "b", "Z", "_x", "-x", "~x", "a.1", "A"];
    let mut events = Vec::new();
    for source in from + 1..=from + sources {
        for index in 0..rng.random_range(0..=3u32) {
            let subject = SUBJECTS[rng.random_range(0..SUBJECTS.len())];
            let data = format!("{{\"source\":{source},\"index\":{index}}}").into_bytes();
            events.push(projected(source, index, subject, data));
        }
    }
    ProjectorBatch {
        from: Position(from),
        to: Position(from + sources),
        events,
    }
}

async fn pg(fresh: &Fresh) -> PgFeedStore {
    fresh.connect(fresh.options()).await.feed_store()
}

/// Everything a reader can see of a feed, read in pages of `page`.
async fn contents<S: FeedStore>(
    store: &S,
    feed: &FeedId,
    page: u64,
) -> (
    Vec<FeedEvent>,
    Vec<(Subject, Sequence)>,
    Vec<Vec<FeedEvent>>,
) {
    let mut events = Vec::new();
    loop {
        let after = events
            .last()
            .map_or(FeedPosition::START, |e: &FeedEvent| e.position);
        let next = store.read_feed(feed, after, page).await.unwrap();
        if next.is_empty() {
            break;
        }
        events.extend(next);
    }
    let mut subjects = Vec::new();
    loop {
        let after = subjects
            .last()
            .map(|(s, _): &(Subject, Sequence)| s.clone());
        let next = store.subjects(feed, after.as_ref(), page).await.unwrap();
        if next.is_empty() {
            break;
        }
        subjects.extend(next.into_iter().map(|h| (h.subject, h.sequence)));
    }
    let mut per_subject = Vec::new();
    for (subject, _) in &subjects {
        let mut read = Vec::new();
        loop {
            let after = read
                .last()
                .map_or(Sequence::START, |e: &FeedEvent| e.sequence);
            let next = store
                .read_subject(feed, subject, after, page)
                .await
                .unwrap();
            if next.is_empty() {
                break;
            }
            read.extend(next);
        }
        per_subject.push(read);
    }
    (events, subjects, per_subject)
}

/// The state without its clock readings.
fn bare(state: &FeedState) -> (FeedId, FeedStatus, FeedPosition, Position, bool) {
    (
        state.feed.clone(),
        state.status,
        state.head,
        state.cursor,
        state.live_at.is_some(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_batches_match_the_memory_store() {
    let seed = rand::random::<u64>();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let fresh = Fresh::new();
    let store = pg(&fresh).await;
    let memory = MemoryFeedStore::new();
    let feeds = [
        feed("accounts.v1"),
        feed("accounts.v2"),
        feed("ledger_x.v1"),
    ];
    for f in &feeds {
        let state = store.register(f).await.unwrap();
        assert_eq!(bare(&state), bare(&memory.register(f).await.unwrap()));
        // Registering again changes nothing.
        assert_eq!(store.register(f).await.unwrap(), state);
    }
    let mut cursors = [0u64; 3];
    for _ in 0..40 {
        let i = rng.random_range(0..feeds.len());
        let sources = rng.random_range(0..20);
        let batch = random_batch(&mut rng, cursors[i], sources);
        let expected = memory.commit(&feeds[i], batch.clone()).await.unwrap();
        assert_eq!(store.commit(&feeds[i], batch).await.unwrap(), expected);
        cursors[i] = expected.cursor.0;
    }
    // A stale cursor moves nothing.
    let stale = random_batch(&mut rng, 0, 3);
    match store.commit(&feeds[0], stale).await {
        Err(FeedError::CursorMoved {
            expected, actual, ..
        }) => assert_eq!((expected, actual), (Position(0), Position(cursors[0]))),
        other => panic!("expected CursorMoved, got {other:?}"),
    }
    store.set_status(&feeds[1], FeedStatus::Live).await.unwrap();
    memory
        .set_status(&feeds[1], FeedStatus::Live)
        .await
        .unwrap();
    let pg_feeds: Vec<_> = store.feeds().await.unwrap().iter().map(bare).collect();
    let mem_feeds: Vec<_> = memory.feeds().await.unwrap().iter().map(bare).collect();
    assert_eq!(pg_feeds, mem_feeds);
    for f in &feeds {
        for page in [1, 7, 10_000] {
            assert_eq!(
                contents(&store, f, page).await,
                contents(&memory, f, page).await,
                "feed {f}, pages of {page}"
            );
        }
        assert_eq!(
            store.feed(f).await.unwrap().map(|s| bare(&s)),
            memory.feed(f).await.unwrap().map(|s| bare(&s))
        );
    }
}

/// A database of its own whose default collation is ICU's `en-US` (where `a < B < b`), dropped
/// with this.
struct NaturalCollationDatabase {
    url: String,
    name: String,
}

impl NaturalCollationDatabase {
    async fn new(fresh: &Fresh) -> NaturalCollationDatabase {
        let name = format!("hw_test_icu_{:016x}", rand::random::<u64>());
        fresh
            .client()
            .await
            .batch_execute(&format!(
                "CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' \
                 LOCALE 'C.UTF-8'"
            ))
            .await
            .unwrap();
        NaturalCollationDatabase {
            url: fresh.url.clone(),
            name,
        }
    }

    fn config(&self) -> tokio_postgres::Config {
        let mut config: tokio_postgres::Config = self.url.parse().unwrap();
        config.dbname(&self.name);
        config
    }
}

impl Drop for NaturalCollationDatabase {
    fn drop(&mut self) {
        headwater_testkit::postgres::execute_blocking(
            &self.url,
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// In a database whose collation sorts `a` before `B`, subjects are still listed by byte.
#[tokio::test]
async fn subjects_are_listed_in_byte_order() {
    let fresh = Fresh::new();
    let database = NaturalCollationDatabase::new(&fresh).await;
    let store = PostgresStore::connect_with(database.config(), fresh.options())
        .await
        .unwrap()
        .feed_store();
    let f = feed("accounts.v1");
    store.register(&f).await.unwrap();
    let names = ["b", "B", "a", "_", "-", "~", "Z9", "a-b", "a.b", "aB", "0"];
    let events = names
        .iter()
        .enumerate()
        .map(|(i, s)| projected(i as u64 + 1, 0, s, b"{}".to_vec()))
        .collect();
    store
        .commit(
            &f,
            ProjectorBatch {
                from: Position(0),
                to: Position(names.len() as u64),
                events,
            },
        )
        .await
        .unwrap();
    let mut sorted: Vec<&str> = names.to_vec();
    sorted.sort_unstable();
    let listed: Vec<String> = store
        .subjects(&f, None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.subject.as_str().to_owned())
        .collect();
    assert_eq!(listed, sorted);
    let after_a: Vec<String> = store
        .subjects(&f, Some(&Subject::new("a").unwrap()), 2)
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.subject.as_str().to_owned())
        .collect();
    assert_eq!(after_a, ["a-b", "a.b"]);
    drop(store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_stops_at_the_byte_limit() {
    let fresh = Fresh::new();
    let store = pg(&fresh).await;
    let f = feed("big.v1");
    store.register(&f).await.unwrap();
    let per_page = READ_PAGE_BYTES_MAX / INTEGRATION_DATA_BYTES_MAX;
    let events: Vec<_> = (0..per_page + 3)
        .map(|i| projected(i as u64 + 1, 0, "s", vec![b'x'; INTEGRATION_DATA_BYTES_MAX]))
        .collect();
    let n = events.len() as u64;
    store
        .commit(
            &f,
            ProjectorBatch {
                from: Position(0),
                to: Position(n),
                events,
            },
        )
        .await
        .unwrap();
    let page = store.read_feed(&f, FeedPosition(0), 10_000).await.unwrap();
    assert_eq!(page.len(), per_page);
    let page = store
        .read_subject(&f, &Subject::new("s").unwrap(), Sequence(1), 10_000)
        .await
        .unwrap();
    assert_eq!(page.len(), per_page);
    assert_eq!(page[0].sequence, Sequence(2));
}

#[tokio::test]
async fn unknown_feeds_and_bad_limits_are_refused() {
    let fresh = Fresh::new();
    let store = pg(&fresh).await;
    let f = feed("nope.v1");
    assert!(store.feed(&f).await.unwrap().is_none());
    assert!(matches!(
        store.read_feed(&f, FeedPosition(0), 10).await,
        Err(FeedError::UnknownFeed(_))
    ));
    assert!(matches!(
        store
            .commit(
                &f,
                ProjectorBatch {
                    from: Position(0),
                    to: Position(1),
                    events: vec![]
                }
            )
            .await,
        Err(FeedError::UnknownFeed(_))
    ));
    assert!(matches!(
        store.set_status(&f, FeedStatus::Live).await,
        Err(FeedError::UnknownFeed(_))
    ));
    store.register(&f).await.unwrap();
    for limit in [0, 10_001] {
        assert!(matches!(
            store.read_feed(&f, FeedPosition(0), limit).await,
            Err(FeedError::Invalid(_))
        ));
    }
    let mut late = projected(1, 0, "s", b"{}".to_vec());
    late.time = Timestamp::from_unix_micros(u64::MAX);
    assert!(matches!(
        store
            .commit(
                &f,
                ProjectorBatch {
                    from: Position(0),
                    to: Position(1),
                    events: vec![late]
                }
            )
            .await,
        Err(FeedError::Invalid(_))
    ));
    assert_eq!(store.feed(&f).await.unwrap().unwrap().cursor, Position(0));
}

#[tokio::test]
async fn readers_are_recorded() {
    let fresh = Fresh::new();
    let store = pg(&fresh).await;
    let f = feed("accounts.v1");
    store.register(&f).await.unwrap();
    let at = |s: u64| Timestamp::from_unix_micros(1_700_000_000_000_000 + s);
    let seen = |reader: &str, t: u64, reads: u64| ReaderSeen {
        feed: f.clone(),
        reader: reader.to_owned(),
        at: at(t),
        reads,
    };
    store
        .record_readers(vec![
            seen("billing", 5, 2),
            seen("billing", 3, 1),
            seen("audit", 4, 1),
            ReaderSeen {
                feed: feed("unknown.v1"),
                ..seen("x", 1, 1)
            },
        ])
        .await
        .unwrap();
    store
        .record_readers(vec![seen("billing", 9, 4)])
        .await
        .unwrap();
    let readers: Vec<_> = store
        .readers(&f)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.reader, r.first_read_at, r.last_read_at, r.reads))
        .collect();
    assert_eq!(
        readers,
        [
            ("audit".to_owned(), at(4), at(4), 1),
            ("billing".to_owned(), at(3), at(9), 7)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_from_one_cursor_one_wins() {
    let fresh = Fresh::new();
    let a = pg(&fresh).await;
    let b = pg(&fresh).await;
    let f = feed("accounts.v1");
    a.register(&f).await.unwrap();
    b.register(&f).await.unwrap();
    let mut rng = StdRng::seed_from_u64(rand::random());
    let mut cursor = 0;
    for round in 0..20 {
        let batch_a = random_batch(&mut rng, cursor, 5);
        let mut batch_b = batch_a.clone();
        batch_b.to = Position(cursor + 4);
        batch_b.events.retain(|e| e.source_position <= batch_b.to);
        let (ra, rb) = tokio::join!(a.commit(&f, batch_a.clone()), b.commit(&f, batch_b.clone()));
        let winner = match (ra, rb) {
            (Ok(c), Err(FeedError::CursorMoved { actual, .. })) => {
                assert_eq!(actual, c.cursor);
                batch_a
            }
            (Err(FeedError::CursorMoved { actual, .. }), Ok(c)) => {
                assert_eq!(actual, c.cursor);
                batch_b
            }
            other => panic!("round {round}: not exactly one winner: {other:?}"),
        };
        cursor = winner.to.0;
    }
    let state = a.feed(&f).await.unwrap().unwrap();
    assert_eq!(state.cursor, Position(cursor));
    let events = a.read_feed(&f, FeedPosition::START, 10_000).await.unwrap();
    assert_eq!(events.len() as u64, state.head.0);
    let mut ids: Vec<_> = events.iter().map(|e| e.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        events.len(),
        "an integration event is in the feed twice"
    );
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.position, FeedPosition(i as u64 + 1));
        assert!(e.source_position <= state.cursor);
    }
    for pair in events.windows(2) {
        assert!(
            pair[0].source_position <= pair[1].source_position,
            "out of log order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_publishers_of_one_name_from_one_cursor_one_wins() {
    let fresh = Fresh::new();
    let a = pg(&fresh).await;
    let b = pg(&fresh).await;
    let f = feed("accounts.v1");
    a.register(&f).await.unwrap();
    let events: Vec<ProjectedEvent> = (1..=100)
        .map(|i| projected(i, 0, "a", b"{}".to_vec()))
        .collect();
    a.commit(
        &f,
        ProjectorBatch {
            from: Position(0),
            to: Position(100),
            events,
        },
    )
    .await
    .unwrap();
    let mut cursor = 0;
    // Both race from the same cursor, to different places; the first round creates the row.
    for round in 0..30 {
        let (to_a, to_b) = (FeedPosition(cursor + 1), FeedPosition(cursor + 2));
        let from = FeedPosition(cursor);
        let (ra, rb) = tokio::join!(
            a.advance_publisher(&f, "rabbitmq", from, to_a),
            b.advance_publisher(&f, "rabbitmq", from, to_b),
        );
        let won = match (ra, rb) {
            (Ok(c), Err(FeedError::PublisherMoved { actual, .. }))
            | (Err(FeedError::PublisherMoved { actual, .. }), Ok(c)) => {
                assert_eq!(
                    actual, c.position,
                    "round {round}: the loser sees the winner's cursor"
                );
                c.position
            }
            other => panic!("round {round}: not exactly one winner: {other:?}"),
        };
        cursor = won.get();
        let listed = b.publishers(&f).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].position, won);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replicas_commit_wakes_a_watch() {
    let fresh = Fresh::new();
    let writer = pg(&fresh).await;
    // The watching replica polls only once an hour: only the notification can wake it in time.
    let mut options = fresh.options();
    options.head_poll_interval = Duration::from_secs(3_600);
    let watcher = fresh.connect(options).await.feed_store();
    let f = feed("accounts.v1");
    writer.register(&f).await.unwrap();
    let first = random_batch(&mut StdRng::seed_from_u64(1), 0, 30);
    let head = writer.commit(&f, first).await.unwrap().head;
    assert!(head > FeedPosition::START);
    // A new watch starts at the feed's head (read at once, not at the next poll).
    let mut watch = watcher.watch_head(&f);
    let deadline = Duration::from_secs(WAIT_SECS);
    tokio::time::timeout(deadline, watch.wait_for(|h| *h == head))
        .await
        .expect("the watch starts at the head")
        .unwrap();
    let started = Instant::now();
    let mut cursor = 30;
    for round in 0..5 {
        let mut rng = StdRng::seed_from_u64(round + 2);
        let mut batch = random_batch(&mut rng, cursor, 10);
        batch
            .events
            .push(projected(cursor + 10, 9, "w", b"{}".to_vec()));
        cursor += 10;
        let head = writer.commit(&f, batch).await.unwrap().head;
        tokio::time::timeout(deadline, watch.wait_for(|h| *h >= head))
            .await
            .expect("the other replica's commit wakes the watch")
            .unwrap();
    }
    println!("5 wake-ups in {:?}", started.elapsed());
}

#[tokio::test]
async fn feeds_share_the_schema_with_the_log() {
    let fresh = Fresh::new();
    let store = fresh.connect(Options::with_schema(&fresh.schema)).await;
    store
        .feed_store()
        .register(&feed("accounts.v1"))
        .await
        .unwrap();
    let client = fresh.client().await;
    let tables: Vec<String> = client
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1",
            &[&fresh.schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for table in [
        "feed_events",
        "feed_readers",
        "feeds",
        "feed_subjects",
        "events",
    ] {
        assert!(
            tables.iter().any(|t| t == table),
            "{table} missing from {tables:?}"
        );
    }
}
