//! The runtime: retired feeds, transient failures, two projectors of one feed, leadership,
//! shutdown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use headwater_core::{FeedId, FeedPosition, FeedStatus, Sequence, Subject};
use headwater_feed::{
    Leadership, Lease, LeaseHolder, ProjectorOptions, ProjectorState, Projectors, Stopped,
    build_feed,
};
use headwater_store::{
    EventStore, FeedCommit, FeedError, FeedEvent, FeedReader, FeedState, FeedStore,
    MemoryFeedStore, MemoryStore, ProjectorBatch, PublisherCursor, ReaderSeen, SubjectHead,
};
use tokio::sync::watch;

use crate::support::{
    Accounts, append, arc, read_whole_feed, wait_caught_up, wait_status, workload,
};

fn fast_retries() -> ProjectorOptions {
    let mut options = ProjectorOptions::default();
    options.read_page_events = 50;
    options.retry_backoff_min = Duration::from_millis(1);
    options.retry_backoff_max = Duration::from_millis(5);
    options.status_check_interval = Duration::from_millis(20);
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_feed_is_not_projected() {
    let events = arc(MemoryStore::new());
    let feeds = arc(MemoryFeedStore::new());
    workload(&*events, 20).await;
    let v1 = Accounts::v1().feed_id();
    feeds.register(&v1).await.unwrap();
    feeds.set_status(&v1, FeedStatus::Retired).await.unwrap();
    let projectors = Projectors::builder()
        .projection(Accounts::v1())
        .projection(Accounts::v2())
        .options(fast_retries())
        .start(events.clone(), feeds.clone())
        .await
        .unwrap();
    let v2 = Accounts::v2().feed_id();
    wait_caught_up(&mut projectors.watch(&v2).unwrap(), events.head_position()).await;
    let status = projectors.watch(&v1).unwrap().borrow().clone();
    assert_eq!(
        (status.state, status.feed_status),
        (ProjectorState::Stopped, FeedStatus::Retired)
    );
    assert_eq!(
        feeds.feed(&v1).await.unwrap().unwrap().head,
        FeedPosition::START
    );

    // Retiring a running feed stops its projector.
    feeds.set_status(&v2, FeedStatus::Retired).await.unwrap();
    append(&*events, 1, 1, 1).await;
    wait_status(&mut projectors.watch(&v2).unwrap(), "stopped", |s| {
        s.state == ProjectorState::Stopped && s.feed_status == FeedStatus::Retired
    })
    .await;
    let outcomes = projectors.shutdown().await;
    assert!(
        outcomes
            .iter()
            .all(|(_, o)| matches!(o, Ok(Stopped::Retired))),
        "{outcomes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_projections_of_one_feed_are_refused() {
    let events = arc(MemoryStore::new());
    let feeds = arc(MemoryFeedStore::new());
    let started = Projectors::builder()
        .projection(Accounts::v1())
        .projection(Accounts::v1())
        .start(events, feeds)
        .await;
    assert!(matches!(
        started,
        Err(headwater_feed::StartError::DuplicateFeed(_))
    ));
}

/// A feed store that fails some commits: before writing (`Backend`), or after writing (the
/// answer is lost, like a connection cut after the commit).
#[derive(Debug)]
struct Flaky {
    inner: MemoryFeedStore,
    commits: AtomicU64,
    failures: AtomicU64,
}

#[async_trait]
impl FeedStore for Flaky {
    async fn register(&self, feed: &FeedId) -> Result<FeedState, FeedError> {
        self.inner.register(feed).await
    }
    async fn feeds(&self) -> Result<Vec<FeedState>, FeedError> {
        self.inner.feeds().await
    }
    async fn feed(&self, feed: &FeedId) -> Result<Option<FeedState>, FeedError> {
        self.inner.feed(feed).await
    }
    async fn set_status(&self, feed: &FeedId, status: FeedStatus) -> Result<FeedState, FeedError> {
        self.inner.set_status(feed, status).await
    }
    async fn commit(&self, feed: &FeedId, batch: ProjectorBatch) -> Result<FeedCommit, FeedError> {
        let n = self.commits.fetch_add(1, Ordering::Relaxed);
        match n % 5 {
            1 => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                Err(FeedError::backend("injected: failed before writing"))
            }
            3 => {
                self.inner.commit(feed, batch).await?;
                self.failures.fetch_add(1, Ordering::Relaxed);
                Err(FeedError::backend("injected: the answer was lost"))
            }
            _ => self.inner.commit(feed, batch).await,
        }
    }
    async fn read_feed(
        &self,
        feed: &FeedId,
        after: FeedPosition,
        limit: u64,
    ) -> Result<Vec<FeedEvent>, FeedError> {
        self.inner.read_feed(feed, after, limit).await
    }
    async fn subjects(
        &self,
        feed: &FeedId,
        after: Option<&Subject>,
        limit: u64,
    ) -> Result<Vec<SubjectHead>, FeedError> {
        self.inner.subjects(feed, after, limit).await
    }
    async fn read_subject(
        &self,
        feed: &FeedId,
        subject: &Subject,
        after: Sequence,
        limit: u64,
    ) -> Result<Vec<FeedEvent>, FeedError> {
        self.inner.read_subject(feed, subject, after, limit).await
    }
    fn watch_head(&self, feed: &FeedId) -> watch::Receiver<FeedPosition> {
        self.inner.watch_head(feed)
    }
    async fn record_readers(&self, seen: Vec<ReaderSeen>) -> Result<(), FeedError> {
        self.inner.record_readers(seen).await
    }
    async fn readers(&self, feed: &FeedId) -> Result<Vec<FeedReader>, FeedError> {
        self.inner.readers(feed).await
    }
    async fn advance_publisher(
        &self,
        feed: &FeedId,
        publisher: &str,
        from: FeedPosition,
        to: FeedPosition,
    ) -> Result<PublisherCursor, FeedError> {
        self.inner
            .advance_publisher(feed, publisher, from, to)
            .await
    }
    async fn publishers(&self, feed: &FeedId) -> Result<Vec<PublisherCursor>, FeedError> {
        self.inner.publishers(feed).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_lost_commits_are_retried_without_hole_or_duplicate() {
    let events = arc(MemoryStore::new());
    workload(&*events, 300).await;
    let feeds = arc(Flaky {
        inner: MemoryFeedStore::new(),
        commits: AtomicU64::new(0),
        failures: AtomicU64::new(0),
    });
    let projectors = Projectors::builder()
        .projection(Accounts::v1())
        .options(fast_retries())
        .start(events.clone(), feeds.clone())
        .await
        .unwrap();
    let v1 = Accounts::v1().feed_id();
    wait_caught_up(&mut projectors.watch(&v1).unwrap(), events.head_position()).await;
    assert!(feeds.failures.load(Ordering::Relaxed) >= 4);
    let status = projectors.watch(&v1).unwrap().borrow().clone();
    assert!(
        status
            .last_error
            .is_some_and(|e| e.contains("injected") || e.contains("cursor"))
    );
    let offline = build_feed(&*events, &Accounts::v1()).await.unwrap();
    assert!(read_whole_feed(&feeds.inner, &v1).await == offline);
    projectors.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_projectors_of_one_feed_at_once_write_it_once() {
    let events = arc(MemoryStore::new());
    let feeds = arc(MemoryFeedStore::new());
    let start = || {
        Projectors::builder()
            .projection(Accounts::v1())
            .options(fast_retries())
            .start(events.clone(), feeds.clone())
    };
    let (a, b) = (start().await.unwrap(), start().await.unwrap());
    for round in 0..20 {
        workload(&*events, 10 + round).await;
    }
    let v1 = Accounts::v1().feed_id();
    wait_caught_up(&mut a.watch(&v1).unwrap(), events.head_position()).await;
    wait_caught_up(&mut b.watch(&v1).unwrap(), events.head_position()).await;
    let offline = build_feed(&*events, &Accounts::v1()).await.unwrap();
    assert!(read_whole_feed(&*feeds, &v1).await == offline);
    a.shutdown().await;
    b.shutdown().await;
}

/// Leases granted one at a time, by the test.
#[derive(Debug, Default)]
struct Granted {
    holders: Mutex<Vec<LeaseHolder>>,
    asked: watch::Sender<u64>,
    grant: watch::Sender<u64>,
}

#[derive(Debug)]
struct Leader(Arc<Granted>);

#[async_trait]
impl Leadership for Leader {
    async fn lead(
        &self,
        _follower: &str,
    ) -> Result<Lease, Box<dyn std::error::Error + Send + Sync>> {
        let mut want = 0;
        self.0.asked.send_modify(|n| {
            *n += 1;
            want = *n;
        });
        let mut grant = self.0.grant.subscribe();
        grant.wait_for(|granted| *granted >= want).await?;
        let (lease, holder) = Lease::new();
        self.0.holders.lock().unwrap().push(holder);
        Ok(lease)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_runs_only_while_it_leads() {
    let events = arc(MemoryStore::new());
    let feeds = arc(MemoryFeedStore::new());
    workload(&*events, 50).await;
    let leader = Arc::new(Granted::default());
    let projectors = Projectors::builder()
        .projection(Accounts::v1())
        .options(fast_retries())
        .leadership(Leader(leader.clone()))
        .start(events.clone(), feeds.clone())
        .await
        .unwrap();
    let v1 = Accounts::v1().feed_id();
    let mut status = projectors.watch(&v1).unwrap();
    wait_status(&mut status, "standby", |s| {
        s.state == ProjectorState::Standby
    })
    .await;
    assert_eq!(
        feeds.feed(&v1).await.unwrap().unwrap().cursor,
        headwater_core::Position::START
    );

    leader.grant.send_replace(1);
    wait_caught_up(&mut status, events.head_position()).await;

    // Lost: back to standby; appends wait.
    leader.holders.lock().unwrap().pop().unwrap().lose();
    wait_status(&mut status, "standby again", |s| {
        s.state == ProjectorState::Standby
    })
    .await;
    let before = feeds.feed(&v1).await.unwrap().unwrap().cursor;
    workload(&*events, 30).await;
    assert_eq!(feeds.feed(&v1).await.unwrap().unwrap().cursor, before);

    leader.grant.send_replace(2);
    wait_caught_up(&mut status, events.head_position()).await;
    let offline = build_feed(&*events, &Accounts::v1()).await.unwrap();
    assert!(read_whole_feed(&*feeds, &v1).await == offline);
    let outcomes = projectors.shutdown().await;
    assert!(
        outcomes
            .iter()
            .all(|(_, o)| matches!(o, Ok(Stopped::Shutdown))),
        "{outcomes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_each_feed() {
    let events = arc(MemoryStore::new());
    let feeds = arc(MemoryFeedStore::new());
    workload(&*events, 40).await;
    let mut registry = prometheus_client::registry::Registry::default();
    let projectors = Projectors::builder()
        .projection(Accounts::v1())
        .projection(Accounts::v2())
        .metrics(&mut registry)
        .start(events.clone(), feeds.clone())
        .await
        .unwrap();
    let head = events.head_position();
    for feed in [Accounts::v1().feed_id(), Accounts::v2().feed_id()] {
        wait_caught_up(&mut projectors.watch(&feed).unwrap(), head).await;
    }
    let v1_head = feeds
        .feed(&Accounts::v1().feed_id())
        .await
        .unwrap()
        .unwrap()
        .head;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        "headwater_projector_lag_positions{feed=\"accounts.v1\"} 0".to_owned(),
        format!(
            "headwater_projector_cursor_position{{feed=\"accounts.v2\"}} {}",
            head.0
        ),
        format!(
            "headwater_projector_feed_head_position{{feed=\"accounts.v1\"}} {}",
            v1_head.0
        ),
        "headwater_projector_live{feed=\"accounts.v2\"} 1".to_owned(),
        format!(
            "headwater_projector_source_events_total{{feed=\"accounts.v1\"}} {}",
            head.0
        ),
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    assert!(text.contains("headwater_projector_commits_total{feed=\"accounts.v1\"}"));
    projectors.shutdown().await;
}

/// An event store that counts the reads of the log.
#[derive(Debug, Default)]
struct Counting {
    inner: MemoryStore,
    reads: AtomicU64,
}

#[async_trait]
impl EventStore for Counting {
    async fn append(
        &self,
        stream: &headwater_core::StreamName,
        expected: headwater_core::ExpectedVersion,
        events: Vec<headwater_core::NewEvent>,
    ) -> Result<headwater_store::AppendOutcome, headwater_store::AppendError> {
        self.inner.append(stream, expected, events).await
    }
    async fn read_stream(
        &self,
        stream: &headwater_core::StreamName,
        after: headwater_core::StreamVersion,
        limit: u64,
    ) -> Result<Vec<headwater_core::RecordedEvent>, headwater_store::ReadError> {
        self.inner.read_stream(stream, after, limit).await
    }
    async fn read_all(
        &self,
        after: headwater_core::Position,
        limit: u64,
    ) -> Result<Vec<headwater_core::RecordedEvent>, headwater_store::ReadError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read_all(after, limit).await
    }
    async fn stream_head(
        &self,
        stream: &headwater_core::StreamName,
    ) -> Result<Option<headwater_core::StreamVersion>, headwater_store::ReadError> {
        self.inner.stream_head(stream).await
    }
    async fn find_event(
        &self,
        event_id: headwater_core::EventId,
    ) -> Result<Option<headwater_core::RecordedEvent>, headwater_store::ReadError> {
        self.inner.find_event(event_id).await
    }
    fn head_position(&self) -> headwater_core::Position {
        self.inner.head_position()
    }
    fn watch_head(&self) -> watch::Receiver<headwater_core::Position> {
        self.inner.watch_head()
    }
}

/// A caught-up projector waits on the head watch: an hour without appends (on tokio's paused
/// clock) reads the log not once; one append wakes it.
#[tokio::test(start_paused = true)]
async fn a_caught_up_projector_does_not_poll_the_log() {
    let events = arc(Counting::default());
    let feeds = arc(MemoryFeedStore::new());
    workload(&*events, 30).await;
    let projectors = Projectors::builder()
        .projection(Accounts::v1())
        .start(events.clone(), feeds.clone())
        .await
        .unwrap();
    let v1 = Accounts::v1().feed_id();
    let mut status = projectors.watch(&v1).unwrap();
    wait_caught_up(&mut status, events.head_position()).await;
    let reads = events.reads.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3_600)).await;
    assert_eq!(events.reads.load(Ordering::Relaxed), reads);
    append(&*events, 1, 1, 1).await;
    wait_caught_up(&mut status, events.head_position()).await;
    assert_eq!(events.reads.load(Ordering::Relaxed), reads + 1);
    projectors.shutdown().await;
}
