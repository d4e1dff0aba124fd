//! Connections dropped under the publisher: a TCP proxy between it and the real broker cuts every
//! connection at random moments while a feed grows. Nothing may be lost, the publisher must come
//! back by itself, and first deliveries stay in order per subject.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use headwater_core::{EventId, EventType, FeedId, FeedPosition, Position, Subject, Timestamp};
use headwater_publish::{
    AmqpBroker, Broker, NatsBroker, PublisherOptions, PublisherStatus, Publishers, exchange_name,
    stream_name,
};
use headwater_store::{FeedStore, MemoryFeedStore, ProjectedEvent, ProjectorBatch};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const SOURCE: &str = "accounts";
const WAIT: Duration = Duration::from_secs(60);
const SUBJECTS: u64 = 13;
const EVENTS: u64 = 6_000;
const CUTS: u32 = 6;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run scripts/test (it starts RabbitMQ and NATS)")
    })
}

fn unique_feed() -> FeedId {
    let id = uuid::Uuid::new_v4().simple().to_string();
    FeedId::parse(&format!("hwd_{}.v1", &id[..16])).unwrap()
}

/// A TCP proxy to `upstream` whose connections can all be cut at once.
struct Proxy {
    port: u16,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
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

    /// Drops every open connection (both ends see a reset or EOF).
    fn cut(&self) -> usize {
        let connections: Vec<_> = self.connections.lock().unwrap().drain(..).collect();
        let open = connections.iter().filter(|c| !c.is_finished()).count();
        for connection in connections {
            connection.abort();
        }
        open
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// `host:port` of a broker URL.
fn authority(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap();
    let rest = rest.rsplit('@').next().unwrap();
    rest.split('/').next().unwrap().to_owned()
}

fn through(url: &str, proxy: &Proxy) -> String {
    url.replacen(&authority(url), &format!("127.0.0.1:{}", proxy.port), 1)
}

async fn append(store: &MemoryFeedStore, feed: &FeedId, from: u64, count: u64) {
    store.register(feed).await.unwrap();
    let to = from + count;
    let events = (from + 1..=to)
        .map(|p| ProjectedEvent {
            id: EventId::new_random(),
            event_type: EventType::new("accounts.deposited").unwrap(),
            subject: Subject::new(format!("acc-{}", p % SUBJECTS)).unwrap(),
            time: Timestamp::from_unix_micros(1_798_380_419_000_000 + p),
            data: format!(r#"{{"amount":{p}}}"#).into_bytes(),
            source_position: Position(p),
        })
        .collect();
    store
        .commit(
            feed,
            ProjectorBatch {
                from: Position(from),
                to: Position(to),
                events,
            },
        )
        .await
        .unwrap();
}

/// Appends [`EVENTS`] in steps while cutting the proxy's connections [`CUTS`] times, then waits
/// for the publisher to confirm the head.
async fn grow_and_cut(
    store: &MemoryFeedStore,
    feed: &FeedId,
    publishers: &Publishers,
    proxy: &Proxy,
) -> PublisherStatus {
    let steps = 30u64;
    let mut cut = 0;
    for step in 0..steps {
        append(store, feed, step * EVENTS / steps, EVENTS / steps).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        if step % (steps / u64::from(CUTS)) == 2 {
            cut += proxy.cut();
        }
    }
    assert!(cut > 0, "no connection was ever cut");
    let mut status = publishers.watch(feed).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        {
            let now = status.borrow_and_update();
            if now.cursor == FeedPosition(EVENTS) {
                return now.clone();
            }
        }
        if !matches!(
            tokio::time::timeout_at(deadline, status.changed()).await,
            Ok(Ok(()))
        ) {
            panic!("the publisher did not catch up: {:?}", status.borrow());
        }
    }
}

/// Every event at least once, first deliveries in sequence order per subject.
fn check(log: &[(String, String, u64)], expected: &BTreeSet<String>) {
    let ids: BTreeSet<String> = log.iter().map(|e| e.0.clone()).collect();
    assert_eq!(&ids, expected, "every event of the feed, nothing else");
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (id, subject, sequence) in log {
        if seen.insert(id) {
            let last = last.entry(subject).or_insert(0);
            if *sequence != *last + 1 {
                let at = log.iter().position(|e| &e.0 == id).unwrap();
                let around: Vec<_> = log[at.saturating_sub(30)..(at + 10).min(log.len())]
                    .iter()
                    .map(|e| (e.1.clone(), e.2))
                    .collect();
                eprintln!("around {at}: {around:?}");
                let missing = log.iter().position(|e| &e.1 == subject && e.2 == *last + 1);
                eprintln!(
                    "the missing one is at stream index {missing:?} of {}",
                    log.len()
                );
                if let Some(m) = missing {
                    let around: Vec<_> = log[m.saturating_sub(5)..(m + 5).min(log.len())]
                        .iter()
                        .map(|e| (e.1.clone(), e.2))
                        .collect();
                    eprintln!("around it: {around:?}");
                }
            }
            assert_eq!(*sequence, *last + 1, "subject {subject}: first deliveries");
            *last = *sequence;
        }
    }
}

fn parse(body: &[u8]) -> (String, String, u64) {
    let event: serde_json::Value = serde_json::from_slice(body).unwrap();
    (
        event["id"].as_str().unwrap().to_owned(),
        event["subject"].as_str().unwrap().to_owned(),
        event["sequence"].as_u64().unwrap(),
    )
}

async fn feed_ids(store: &MemoryFeedStore, feed: &FeedId) -> BTreeSet<String> {
    let events = store
        .read_feed(feed, FeedPosition::START, 10_000)
        .await
        .unwrap();
    assert_eq!(events.len() as u64, EVENTS);
    events.iter().map(|e| e.id.to_string()).collect()
}

fn options() -> PublisherOptions {
    PublisherOptions::default()
        .with_batch_events_max(200)
        .with_in_flight_events_max(2_000)
        .with_backoff(Duration::from_millis(20), Duration::from_millis(500))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_connections_dropped_mid_stream_lose_nothing() {
    let url = env("HEADWATER_TEST_AMQP_URL");
    let feed = unique_feed();
    // The consumer's queue, bound before anything is published (directly, not through the proxy).
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .exchange_declare(
            exchange_name(&feed).as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .name()
        .to_string();
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange_name(&feed).as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let proxy = Proxy::start(authority(&url)).await;
    let store = Arc::new(MemoryFeedStore::new());
    let broker: Arc<dyn Broker> = Arc::new(
        AmqpBroker::lazy(&through(&url, &proxy))
            .unwrap()
            .with_confirm_timeout(Duration::from_secs(5)),
    );
    let publishers = Publishers::builder(broker, SOURCE)
        .feed(feed.clone())
        .options(options())
        .start(Arc::clone(&store))
        .unwrap();
    let status = grow_and_cut(&store, &feed, &publishers, &proxy).await;
    assert!(status.reconnects > 0, "{status:?}");
    publishers.shutdown().await;

    let expected = feed_ids(&store, &feed).await;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut log = Vec::new();
    let mut distinct = BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    while distinct.len() < expected.len() {
        let delivery = tokio::time::timeout_at(deadline, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {} arrived", distinct.len(), expected.len()))
            .unwrap()
            .unwrap();
        let event = parse(&delivery.data);
        distinct.insert(event.0.clone());
        log.push(event);
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    check(&log, &expected);
    channel
        .exchange_delete(
            exchange_name(&feed).as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_connections_dropped_mid_stream_lose_nothing() {
    let url = env("HEADWATER_TEST_NATS_URL");
    let feed = unique_feed();
    let proxy = Proxy::start(authority(&url)).await;
    let store = Arc::new(MemoryFeedStore::new());
    let broker: Arc<dyn Broker> = Arc::new(
        NatsBroker::lazy(&through(&url, &proxy))
            .await
            .unwrap()
            .with_confirm_timeout(Duration::from_secs(3)),
    );
    let publishers = Publishers::builder(broker, SOURCE)
        .feed(feed.clone())
        .options(options())
        .start(Arc::clone(&store))
        .unwrap();
    let status = grow_and_cut(&store, &feed, &publishers, &proxy).await;
    publishers.shutdown().await;

    let expected = feed_ids(&store, &feed).await;
    let direct = NatsBroker::connect(&url).await.unwrap();
    let stream = direct
        .jetstream()
        .await
        .unwrap()
        .get_stream(stream_name(&feed))
        .await
        .unwrap();
    let stored = stream.get_info().await.unwrap().state.messages;
    let mut log = Vec::new();
    for sequence in 1..=stored {
        let message = stream.get_raw_message(sequence).await.unwrap();
        log.push(parse(&message.payload));
    }
    check(&log, &expected);
    // JetStream dropped the messages published again within its duplicate window.
    assert_eq!(stored, EVENTS, "{status:?}");
    direct
        .jetstream()
        .await
        .unwrap()
        .delete_stream(stream_name(&feed))
        .await
        .unwrap();
}
