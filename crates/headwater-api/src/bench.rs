//! Workloads that measure the feed API over real loopback sockets, on any [`FeedStore`]: the feed
//! read rate with N concurrent clients, and the long-poll wake-up latency from a commit to the
//! waiting client's complete answer. For `headwater bench` and `examples/feed_api_bench.rs`;
//! behind the `bench` feature. Never used by tests as timing assertions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use headwater_core::{FeedId, FeedPosition};
use headwater_store::FeedStore;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus_client::registry::Registry;

use crate::{ApiConfig, FeedApi, Tokens};

const BENCH_TOKEN: &str = "headwater-bench-token";
/// The slowest wake-up the latency histogram tells apart, in microseconds (one minute).
const LATENCY_US_MAX: u64 = 60_000_000;

/// Why a workload failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    #[error("the benchmark server failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("a request failed: {0}")]
    Request(String),
    #[error("an answer was not a page of events: {0}")]
    Answer(String),
    #[error("the feed store failed: {0}")]
    Store(#[from] headwater_store::FeedError),
}

/// The feed read rate of one run.
#[derive(Clone, Debug)]
pub struct ReadRate {
    pub clients: usize,
    /// Events received, over all clients (each reads the whole feed).
    pub events: u64,
    pub elapsed: Duration,
}

impl ReadRate {
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

/// Long-poll wake-up latencies, commit start to the complete answer, in microseconds.
#[derive(Clone, Debug)]
pub struct WakeLatency {
    pub rounds: usize,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// A feed API served on 127.0.0.1 for the workloads; stopped on drop.
struct Server {
    address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    client: Client<HttpConnector, Body>,
}

impl Server {
    async fn start(store: Arc<dyn FeedStore>) -> Result<Server, BenchError> {
        let mut registry = Registry::default();
        let tokens = Tokens::one_for_all("bench", BENCH_TOKEN)
            .map_err(|e| BenchError::Request(e.to_string()))?;
        let config =
            ApiConfig::new("bench", tokens).map_err(|e| BenchError::Request(e.to_string()))?;
        let api = FeedApi::new(store, config, &mut registry);
        let router = api.router(Arc::new(registry));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _api = api;
            let _ = crate::serve(listener, router, async {
                let _ = stopped.await;
            })
            .await;
        });
        let client = Client::builder(TokioExecutor::new()).build_http();
        Ok(Server {
            address,
            stop: Some(stop),
            client,
        })
    }

    /// GETs `path_and_query`, returns the positions of the events of the page.
    async fn page(&self, path_and_query: &str) -> Result<Vec<u64>, BenchError> {
        #[derive(serde::Deserialize)]
        struct Position {
            position: u64,
        }
        let request = axum::http::Request::get(format!("http://{}{path_and_query}", self.address))
            .header("authorization", format!("Bearer {BENCH_TOKEN}"))
            .body(Body::empty())
            .map_err(|e| BenchError::Request(e.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| BenchError::Request(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| BenchError::Request(e.to_string()))?
            .to_bytes();
        if status != 200 {
            return Err(BenchError::Answer(format!(
                "{status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        // A consumer parses every event; this one keeps only the positions.
        let events: Vec<Position> =
            serde_json::from_slice(&body).map_err(|e| BenchError::Answer(e.to_string()))?;
        Ok(events.into_iter().map(|e| e.position).collect())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn feed_path(feed: &FeedId) -> String {
    format!("/feeds/{}/{}", feed.name, feed.version)
}

/// `clients` clients each read the whole of `feed` from the start, in pages of `page_events`, at
/// the same time, over HTTP on loopback.
pub async fn read_rate(
    store: Arc<dyn FeedStore>,
    feed: &FeedId,
    clients: usize,
    page_events: u64,
) -> Result<ReadRate, BenchError> {
    read_rate_bounded(store, feed, clients, page_events, u64::MAX).await
}

/// As [`read_rate`], each client stopping once it has read `events_per_client` events (or the
/// whole feed, if shorter).
pub async fn read_rate_bounded(
    store: Arc<dyn FeedStore>,
    feed: &FeedId,
    clients: usize,
    page_events: u64,
    events_per_client: u64,
) -> Result<ReadRate, BenchError> {
    let server = Arc::new(Server::start(store).await?);
    let path = feed_path(feed);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients.max(1) {
        let server = Arc::clone(&server);
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let mut after = 0u64;
            let mut events = 0u64;
            loop {
                let positions = server
                    .page(&format!("{path}?after={after}&limit={page_events}"))
                    .await?;
                let Some(last) = positions.last() else {
                    return Ok::<u64, BenchError>(events);
                };
                events += positions.len() as u64;
                after = *last;
                if events >= events_per_client {
                    return Ok(events);
                }
            }
        }));
    }
    let mut events = 0;
    for task in tasks {
        events += task
            .await
            .map_err(|e| BenchError::Request(e.to_string()))??;
    }
    Ok(ReadRate {
        clients: clients.max(1),
        events,
        elapsed: started.elapsed(),
    })
}

/// `rounds` times: a client long-polls at the head of `feed`; once it waits, `commit` adds one
/// event; the time from the start of `commit` to the client's complete answer is recorded.
/// `commit` is given the feed's head and must commit exactly one event after it.
pub async fn wake_latency<F, Fut>(
    store: Arc<dyn FeedStore>,
    feed: &FeedId,
    rounds: usize,
    mut commit: F,
) -> Result<WakeLatency, BenchError>
where
    F: FnMut(FeedPosition) -> Fut,
    Fut: std::future::Future<Output = Result<(), BenchError>>,
{
    /// Time for the request to reach the server and start waiting before the commit. Measured
    /// latencies do not include it; a commit that lands first only makes a round faster.
    const SETTLE: Duration = Duration::from_millis(2);
    let server = Arc::new(Server::start(Arc::clone(&store)).await?);
    let path = feed_path(feed);
    // Fixed bounds: `saturating_record` clamps to the histogram's current range, and an
    // auto-resizing histogram starts with a range of 1 to 2 (every round then read 2 µs).
    let mut histogram = hdrhistogram::Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 3)
        .map_err(|e| BenchError::Request(e.to_string()))?;
    for _ in 0..rounds {
        let head = store
            .feed(feed)
            .await?
            .ok_or_else(|| BenchError::Answer(format!("no feed {feed}")))?
            .head;
        let waiting = {
            let server = Arc::clone(&server);
            let uri = format!("{path}?after={}&timeout_ms=10000", head.get());
            tokio::spawn(async move {
                let positions = server.page(&uri).await?;
                Ok::<(Instant, Vec<u64>), BenchError>((Instant::now(), positions))
            })
        };
        tokio::time::sleep(SETTLE).await;
        let started = Instant::now();
        commit(head).await?;
        let (answered, positions) = waiting
            .await
            .map_err(|e| BenchError::Request(e.to_string()))??;
        if positions.first() != Some(&(head.get() + 1)) {
            return Err(BenchError::Answer(format!(
                "expected position {} after the commit, got {positions:?}",
                head.get() + 1
            )));
        }
        if answered < started {
            return Err(BenchError::Answer(format!(
                "the long poll after position {} was answered before the commit: the feed was \
                 still moving (wait until its projector is idle)",
                head.get()
            )));
        }
        let micros = answered.duration_since(started).as_micros();
        histogram.saturating_record(u64::try_from(micros).unwrap_or(u64::MAX));
    }
    Ok(WakeLatency {
        rounds,
        p50_us: histogram.value_at_quantile(0.5),
        p99_us: histogram.value_at_quantile(0.99),
        max_us: histogram.max(),
    })
}
