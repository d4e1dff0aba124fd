//! Connections dropped under the publisher: a TCP proxy between it and the real broker cuts every
//! connection at random moments while a feed grows. Nothing may be lost, the publisher must come
//! back by itself, and first deliveries stay in order per subject.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use headwater_core::{FeedId, FeedPosition};
use headwater_publish::{
    AmqpBroker, Broker, NatsBroker, PublisherOptions, PublisherStatus, Publishers,
};
use headwater_store::{FeedEvent, FeedStore, MemoryFeedStore};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::support::{
    AmqpQueue, SOURCE, amqp_url, nats_take_stream, nats_url, unique_feed, wait_for_status,
};

const WAIT: Duration = Duration::from_secs(60);
const SUBJECTS: u64 = 13;
const EVENTS: u64 = 6_000;
const CUTS: u32 = 6;

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
        let from = step * EVENTS / steps;
        crate::support::append(store, feed, from, EVENTS / steps, EVENTS, |p| {
            format!("acc-{}", p % SUBJECTS)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        if step % (steps / u64::from(CUTS)) == 2 {
            cut += proxy.cut();
        }
    }
    assert!(cut > 0, "no connection was ever cut");
    wait_for_status(publishers, feed, "the publisher to catch up", WAIT, |s| {
        s.cursor == FeedPosition(EVENTS)
    })
    .await
}

async fn whole_feed(store: &MemoryFeedStore, feed: &FeedId) -> Vec<FeedEvent> {
    let events = store
        .read_feed(feed, FeedPosition::START, 10_000)
        .await
        .unwrap();
    assert_eq!(events.len() as u64, EVENTS);
    events
}

fn options() -> PublisherOptions {
    PublisherOptions::default()
        .with_batch_events_max(200)
        .with_in_flight_events_max(2_000)
        .with_backoff(Duration::from_millis(20), Duration::from_millis(500))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_connections_dropped_mid_stream_lose_nothing() {
    let url = amqp_url();
    let feed = unique_feed("hwd");
    // The consumer's queue, bound before anything is published (directly, not through the proxy).
    let queue = AmqpQueue::bind(&url, &feed).await;
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

    let feed_events = whole_feed(&store, &feed).await;
    queue
        .receive(feed_events.len(), WAIT)
        .await
        .check(&feed_events);
    queue.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_connections_dropped_mid_stream_lose_nothing() {
    let url = nats_url();
    let feed = unique_feed("hwd");
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

    let feed_events = whole_feed(&store, &feed).await;
    let received = nats_take_stream(&url, &feed).await;
    received.check(&feed_events);
    // JetStream dropped the messages published again within its duplicate window.
    assert_eq!(received.log.len() as u64, EVENTS, "{status:?}");
}
