//! What the broker transport tests share: the servers' URLs, a producer's feed (the bodies a
//! publisher sends, and the same events in a `MemoryUpstream` to heal from), a view that checks
//! order and can refuse subjects, a view store whose commits can be made to fail, and a TCP
//! proxy that cuts connections.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use headwater_consume::{
    Applied, Consumer, ConsumerOptions, DeadLetter, IntegrationEvent, MemoryUpstream, MemoryView,
    NewDeadLetter, ViewError, ViewStore,
};
use headwater_core::{
    EventId, EventType, FeedId, FeedPosition, Position, Sequence, Subject, Timestamp,
};
use headwater_store::FeedEvent;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The CloudEvents `source` of the test feeds.
pub(crate) const SOURCE: &str = "accounts";

/// A server's URL from the variable `scripts/test` sets; without it the test fails, loudly.
pub(crate) fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run ./scripts/test (it starts RabbitMQ and NATS), or source \
             scripts/lib/{{rabbitmq,nats}}.sh and start them"
        )
    })
}

pub(crate) fn amqp_url() -> String {
    env("HEADWATER_TEST_AMQP_URL")
}

pub(crate) fn nats_url() -> String {
    env("HEADWATER_TEST_NATS_URL")
}

/// A feed nobody else uses: `{prefix}_{16 hex}.v1`.
pub(crate) fn unique_feed(prefix: &str) -> FeedId {
    let id = uuid::Uuid::new_v4().simple().to_string();
    FeedId::parse(&format!("{prefix}_{}.v1", &id[..16])).unwrap()
}

/// A producer's feed: the events as the publisher holds them, their bodies on the wire, and the
/// same events in an upstream to heal from.
pub(crate) struct Produced {
    pub(crate) feed: FeedId,
    pub(crate) events: Vec<FeedEvent>,
    pub(crate) bodies: Vec<Vec<u8>>,
    pub(crate) upstream: Arc<MemoryUpstream>,
}

/// `subjects[i]` is the subject of the event at position `i + 1`.
pub(crate) fn produce(feed: &FeedId, subjects: &[String]) -> Produced {
    let upstream = Arc::new(MemoryUpstream::new());
    let mut sequences: BTreeMap<&str, u64> = BTreeMap::new();
    let mut events = Vec::new();
    let mut bodies = Vec::new();
    for (i, subject) in subjects.iter().enumerate() {
        let sequence = sequences.entry(subject).or_insert(0);
        *sequence += 1;
        let position = i as u64 + 1;
        let event = FeedEvent {
            position: FeedPosition(position),
            sequence: Sequence(*sequence),
            id: EventId::new_random(),
            event_type: EventType::new("accounts.deposited").unwrap(),
            subject: Subject::new(subject.clone()).unwrap(),
            time: Timestamp(1_798_380_419_000_000 + position),
            data: format!(r#"{{"amount":{position}}}"#).into_bytes(),
            source_position: Position(position),
        };
        let body = headwater_api::cloud_event_json(feed, SOURCE, &event).unwrap();
        upstream.push(IntegrationEvent::from_cloud_event(&body).unwrap());
        events.push(event);
        bodies.push(body);
    }
    Produced {
        feed: feed.clone(),
        events,
        bodies,
        upstream,
    }
}

/// `count` events over `subjects` subjects `acc-0 …`, round robin.
pub(crate) fn round_robin(count: usize, subjects: usize) -> Vec<String> {
    (0..count)
        .map(|i| format!("acc-{}", i % subjects))
        .collect()
}

/// Per subject, the sequences applied, in order.
pub(crate) type State = BTreeMap<String, Vec<u64>>;

/// Subjects whose events the handler refuses (until taken out).
pub(crate) type Refused = Arc<Mutex<BTreeSet<String>>>;

/// A view whose handler refuses an event that is not its subject's next, and any event of a
/// subject in `refused`.
pub(crate) fn view(refused: &Refused) -> MemoryView<State> {
    let refused = Arc::clone(refused);
    MemoryView::new(
        State::new(),
        move |state: &mut State, e: &IntegrationEvent| {
            if refused.lock().unwrap().contains(e.subject.as_str()) {
                return Err(format!("the handler refuses {}", e.subject).into());
            }
            let applied = state.entry(e.subject.to_string()).or_default();
            let next = applied.len() as u64 + 1;
            if e.sequence.get() != next {
                return Err(format!("#{} where #{next} was due", e.sequence.get()).into());
            }
            applied.push(e.sequence.get());
            Ok(())
        },
    )
}

/// Each subject's whole stream, once, in order.
pub(crate) fn expected(events: &[FeedEvent]) -> State {
    let mut state = State::new();
    for e in events {
        state
            .entry(e.subject.to_string())
            .or_default()
            .push(e.sequence.get());
    }
    state
}

pub(crate) fn options() -> ConsumerOptions {
    ConsumerOptions::default().with_backoff(Duration::from_millis(5), Duration::from_millis(50))
}

pub(crate) fn consumer<V: ViewStore>(
    produced: &Produced,
    view: &Arc<V>,
) -> Consumer<V, MemoryUpstream> {
    Consumer::new(
        produced.feed.clone(),
        Arc::clone(view),
        Arc::clone(&produced.upstream),
        options(),
    )
}

/// Polls `done` every 10 ms until it holds or `wait` passes (then panics with `what`).
pub(crate) async fn wait_until(what: &str, wait: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + wait;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A view store in memory whose commits fail while `failing` is set (nothing written).
pub(crate) struct FailingView {
    pub(crate) inner: MemoryView<State>,
    pub(crate) failing: AtomicBool,
}

impl std::fmt::Debug for FailingView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailingView").finish_non_exhaustive()
    }
}

#[async_trait]
impl ViewStore for FailingView {
    async fn cursor(&self, feed: &FeedId, subject: &Subject) -> Result<Sequence, ViewError> {
        self.inner.cursor(feed, subject).await
    }

    async fn apply(
        &self,
        feed: &FeedId,
        subject: &Subject,
        events: &[IntegrationEvent],
    ) -> Result<Applied, ViewError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(ViewError::Backend("the commit failed (on purpose)".into()));
        }
        self.inner.apply(feed, subject, events).await
    }

    async fn apply_many(
        &self,
        feed: &FeedId,
        batches: &[(Subject, Vec<IntegrationEvent>)],
    ) -> Result<Vec<Applied>, ViewError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(ViewError::Backend("the commit failed (on purpose)".into()));
        }
        self.inner.apply_many(feed, batches).await
    }

    async fn cursors(
        &self,
        feed: &FeedId,
        after: Option<&Subject>,
        limit: u64,
    ) -> Result<Vec<(Subject, Sequence)>, ViewError> {
        self.inner.cursors(feed, after, limit).await
    }

    async fn feed_position(&self, feed: &FeedId) -> Result<u64, ViewError> {
        self.inner.feed_position(feed).await
    }

    async fn save_feed_position(&self, feed: &FeedId, position: u64) -> Result<(), ViewError> {
        self.inner.save_feed_position(feed, position).await
    }

    async fn mark(&self, key: &str) -> Result<Option<String>, ViewError> {
        self.inner.mark(key).await
    }

    async fn set_mark(&self, key: &str, value: Option<&str>) -> Result<(), ViewError> {
        self.inner.set_mark(key, value).await
    }

    async fn record_dead_letter(&self, letter: &NewDeadLetter) -> Result<u64, ViewError> {
        self.inner.record_dead_letter(letter).await
    }

    async fn dead_letters(
        &self,
        feed: &FeedId,
        after: u64,
        limit: u64,
    ) -> Result<Vec<DeadLetter>, ViewError> {
        self.inner.dead_letters(feed, after, limit).await
    }

    async fn resolve_dead_letters(
        &self,
        feed: &FeedId,
        subject: &Subject,
        through: Sequence,
    ) -> Result<u64, ViewError> {
        self.inner
            .resolve_dead_letters(feed, subject, through)
            .await
    }

    async fn discard_dead_letter(&self, feed: &FeedId, id: u64) -> Result<bool, ViewError> {
        self.inner.discard_dead_letter(feed, id).await
    }
}

/// A TCP proxy to `upstream` whose connections can all be cut at once.
pub(crate) struct Proxy {
    pub(crate) port: u16,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub(crate) async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let connections = Arc::clone(&connections);
            async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        return;
                    };
                    let upstream = upstream.clone();
                    let connection = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(&upstream).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().unwrap().push(connection);
                }
            }
        });
        Proxy {
            port,
            connections,
            accept,
        }
    }

    /// Drops every open connection (both ends see a reset or EOF); how many were open.
    pub(crate) fn cut(&self) -> usize {
        let connections: Vec<_> = self.connections.lock().unwrap().drain(..).collect();
        let open = connections.iter().filter(|c| !c.is_finished()).count();
        for connection in connections {
            connection.abort();
        }
        open
    }

    /// `url` with its host and port replaced by the proxy's.
    pub(crate) fn url(&self, url: &str) -> String {
        url.replacen(&authority(url), &format!("127.0.0.1:{}", self.port), 1)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// `host:port` of a broker URL.
pub(crate) fn authority(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap();
    let rest = rest.rsplit('@').next().unwrap();
    rest.split('/').next().unwrap().to_owned()
}
