//! The feed API: a producer's integration feeds over HTTP, as SPEC.md's "The feed API" specifies.
//!
//! - `GET /feeds` — the feeds the token may read: name, version, status, head, `readers`, and
//!   `publishers` (each publisher's cursor and lag);
//! - `GET /feeds/{name}/v{version}?after&limit&timeout_ms` — a page of CloudEvents after a feed
//!   position, long polling up to `timeout_ms` when there is none;
//! - `GET /feeds/{name}/v{version}/subjects?after&limit` — the head sequence of every subject;
//! - `GET /feeds/{name}/v{version}/subjects/{subject}?after&limit` — one subject's events;
//! - `GET /openapi.json` (the document in this crate's `openapi.json`) and `GET /metrics`.
//!
//! It is built on a [`FeedStore`] only: whatever fills the feeds (the projector) runs beside it.
//! Routes, wire format, problem types, tokens and long polling are described in
//! `docs/design/feed-api.md`.
//!
//! ```no_run
//! # async fn example(store: std::sync::Arc<dyn headwater_store::FeedStore>) -> std::io::Result<()> {
//! use headwater_api::{ApiConfig, FeedApi, Tokens};
//! let mut registry = prometheus_client::registry::Registry::default();
//! let tokens = Tokens::one_for_all("default", "s3cret").unwrap();
//! let api = FeedApi::new(store, ApiConfig::new("accounts", tokens).unwrap(), &mut registry);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! api.serve(listener, std::sync::Arc::new(registry), async { /* a shutdown signal */ }).await?;
//! api.close().await.ok();
//! # Ok(()) }
//! ```

mod auth;
#[cfg(feature = "bench")]
pub mod bench;
mod metrics;
mod problem;
mod readers;
mod routes;
mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use headwater_store::{FeedError, FeedStore};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use auth::{
    ConfigError, FeedScope, SOURCE_BYTES_MAX, TOKEN_BYTES_MAX, TOKEN_FILE_BYTES_MAX,
    TOKEN_NAME_BYTES_MAX, TOKENS_MAX, Tokens,
};
pub use problem::{PROBLEM_CONTENT_TYPE, ProblemType};
pub use wire::{CLOUDEVENTS_BATCH_CONTENT_TYPE, NotJson, cloud_event_json, rfc3339};

/// The longest a feed read waits for a new event (`timeout_ms`), in milliseconds. Longer
/// requests are refused (400), so a client learns the bound instead of being cut silently.
pub const LONG_POLL_TIMEOUT_MS_MAX: u64 = 30_000;
/// The page size of a feed or subject read without `limit`.
pub const FEED_PAGE_EVENTS_DEFAULT: u64 = 1_000;
/// The page size of a subject listing without `limit`.
pub const SUBJECT_PAGE_DEFAULT: u64 = 1_000;
/// The most feed reads waiting at once by default (`ApiConfig::long_polls_max`). Past it a read
/// answers at once with what is there (usually `[]`), which the contract allows: the client asks
/// again. A bound on the tasks and watches that waiting requests hold.
pub const LONG_POLLS_WAITING_MAX: usize = 10_000;
/// How often the reads counted in memory are written to the feed store.
pub const READERS_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// The OpenAPI 3 document of this API, served at `/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// Who may read `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MetricsAccess {
    /// Any configured token, whatever its feeds (the default): a scraper is configured with a
    /// token of its own. Metrics name the feeds and their heads, which an anonymous caller
    /// should not learn.
    #[default]
    AnyToken,
    /// Everyone: for a listener that only the monitoring network reaches.
    Public,
}

/// How the feed API is set up.
#[derive(Debug)]
#[non_exhaustive]
pub struct ApiConfig {
    /// The CloudEvents `source` of every event: the producing service (`accounts`, or a URI).
    pub source: String,
    pub tokens: Tokens,
    pub metrics_access: MetricsAccess,
    /// How often reads are recorded in the store ([`READERS_FLUSH_INTERVAL`] by default).
    pub readers_flush_interval: Duration,
    /// The most reads waiting at once ([`LONG_POLLS_WAITING_MAX`] by default).
    pub long_polls_max: usize,
}

impl ApiConfig {
    pub fn new(source: &str, tokens: Tokens) -> Result<ApiConfig, ConfigError> {
        if source.is_empty()
            || source.len() > SOURCE_BYTES_MAX
            || !source.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ConfigError::Source);
        }
        Ok(ApiConfig {
            source: source.to_owned(),
            tokens,
            metrics_access: MetricsAccess::default(),
            readers_flush_interval: READERS_FLUSH_INTERVAL,
            long_polls_max: LONG_POLLS_WAITING_MAX,
        })
    }
}

pub(crate) struct AppState {
    store: Arc<dyn FeedStore>,
    source: String,
    tokens: Tokens,
    metrics_access: MetricsAccess,
    metrics: metrics::ApiMetrics,
    readers: readers::ReaderLog,
    /// Set once the API shuts down: waiting long polls answer at once.
    draining: watch::Sender<bool>,
    long_polls_max: usize,
    long_polls: std::sync::atomic::AtomicUsize,
}

/// The feed API over one feed store. Dropping it stops its reader flusher without a last flush:
/// call [`FeedApi::close`].
pub struct FeedApi {
    state: Arc<AppState>,
    stop_flusher: watch::Sender<bool>,
    flusher: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FeedApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedApi")
            .field("source", &self.state.source)
            .field("tokens", &self.state.tokens)
            .finish_non_exhaustive()
    }
}

impl FeedApi {
    /// Sets up the API and registers its metrics into `registry`; starts the task that records
    /// readers every `config.readers_flush_interval`.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn new(store: Arc<dyn FeedStore>, config: ApiConfig, registry: &mut Registry) -> FeedApi {
        let state = Arc::new(AppState {
            store,
            source: config.source,
            tokens: config.tokens,
            metrics_access: config.metrics_access,
            metrics: metrics::ApiMetrics::register(registry),
            readers: readers::ReaderLog::default(),
            draining: watch::channel(false).0,
            long_polls_max: config.long_polls_max,
            long_polls: std::sync::atomic::AtomicUsize::new(0),
        });
        let (stop_flusher, mut stop) = watch::channel(false);
        let interval = config.readers_flush_interval;
        let flushing = Arc::clone(&state);
        let flusher = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.wait_for(|stop| *stop) => return,
                }
                if let Err(error) = flushing.readers.flush(flushing.store.as_ref()).await {
                    tracing::warn!(%error, "could not record the feed readers; retrying later");
                }
            }
        });
        FeedApi {
            state,
            stop_flusher,
            flusher: Some(flusher),
        }
    }

    /// The routes, for `serve` or for tests (`tower::ServiceExt::oneshot`). `registry` is what
    /// `/metrics` renders: the one given to [`FeedApi::new`], after every other component
    /// registered into it.
    pub fn router(&self, registry: Arc<Registry>) -> Router {
        routes::router(Arc::clone(&self.state), registry)
    }

    /// Makes every waiting long poll answer now (with what is there, usually `[]`) and every new
    /// one answer without waiting. For shutdown: graceful shutdown then does not wait for them.
    pub fn drain(&self) {
        self.state.draining.send_replace(true);
    }

    /// Records in the store the reads counted since the last flush.
    ///
    /// # Cancel safety
    /// Not cancel safe: a cancelled flush may lose the counts it took.
    pub async fn flush_readers(&self) -> Result<(), FeedError> {
        self.state.readers.flush(self.state.store.as_ref()).await
    }

    /// Serves the API on `listener` until `shutdown` completes, then drains long polls and waits
    /// for the requests in flight. Call [`FeedApi::close`] afterwards to record the last reads.
    ///
    /// # Cancel safety
    /// Dropping the future closes the listener and every connection at once.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        registry: Arc<Registry>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = Arc::clone(&self.state);
        let shutdown = async move {
            shutdown.await;
            state.draining.send_replace(true);
        };
        serve(listener, self.router(registry), shutdown).await
    }

    /// Drains long polls, stops the reader flusher and records the last reads.
    ///
    /// # Cancel safety
    /// Not cancel safe: a cancelled close may lose the last counts.
    pub async fn close(mut self) -> Result<(), FeedError> {
        self.drain();
        self.stop_flusher.send_replace(true);
        if let Some(flusher) = self.flusher.take() {
            // A flusher that panicked has nothing more to lose; the final flush below still runs.
            let _ = flusher.await;
        }
        self.flush_readers().await
    }
}

impl Drop for FeedApi {
    fn drop(&mut self) {
        if let Some(flusher) = self.flusher.take() {
            flusher.abort();
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting and waits for
/// the requests in flight (graceful shutdown).
///
/// # Cancel safety
/// Dropping the future closes the listener and every connection at once.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
