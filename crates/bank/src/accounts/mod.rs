//! `bank accounts`: the producer. The aggregate [`Account`](account::Account) behind the command
//! API, its private log projected into the public feeds `accounts.v1` and `accounts.v2`, served by
//! the feed API under `/feeds` and published to RabbitMQ or NATS JetStream when asked.
//!
//! - Embedded store in `--data DIR` by default (one process); `--postgres URL` for several
//!   replicas on one database: every replica accepts commands, and each projector and publisher
//!   runs on one replica at a time (PostgreSQL leadership, see docs/design/feeds.md).
//! - `--token T`: the bearer token of the feed API (and of `/metrics`). Without it the feed API
//!   refuses every read (401) and `/metrics` is public.
//! - Graceful shutdown: in-flight commands finish, projectors commit and stop, publishers fold
//!   what the broker confirmed into their cursors, the feed API records its readers.
//!
//! In-process (the demo, the bench, the tests): [`start`] a [`Config`], get an [`Accounts`].

pub mod account;
pub mod projections;
mod routes;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use headwater::CommandHandler;
use headwater::api::{ApiConfig, FeedApi, MetricsAccess, Tokens};
use headwater::feed::{
    AlwaysLead, FeedId, FeedStore, ProjectorState, ProjectorStatus, Projectors, ProjectorsBuilder,
};
use headwater::publish::{Broker, BrokerArgs, PublisherStatus, Publishers, PublishersBuilder};
use headwater::store::postgres::{Options as PostgresOptions, PostgresStore};
use headwater::store::{EmbeddedStore, EventStore};
use prometheus_client::registry::Registry;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::model::{self, SOURCE};
pub use routes::{PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_PREFIX, Problem};

/// The PostgreSQL schema of the accounts store, unless `--postgres-schema` says another.
pub const POSTGRES_SCHEMA_DEFAULT: &str = "bank_accounts";
/// The address the service listens on by default.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:8080";
/// How long a graceful shutdown waits for the projectors to include the last commands, in
/// seconds.
pub const SHUTDOWN_CATCH_UP_WAIT_SECS: u64 = 5;
/// The name of the feed API's one token (`--token`), as readers are recorded.
pub const TOKEN_NAME: &str = "default";
/// Accounts whose state the command handler keeps in memory (the ones used last), so that a
/// command reads only the events since that account's previous command instead of its whole
/// history. An `Account` is a few dozen bytes: a few MiB at most.
pub const STATE_CACHE_ACCOUNTS: usize = 65_536;

/// The flags of `bank accounts`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The directory of the embedded store (created if missing). Not used with --postgres.
    #[arg(long, value_name = "DIR", default_value = "accounts-data")]
    pub data: PathBuf,
    /// Where the command API, the feed API (/feeds) and /metrics listen.
    #[arg(long, value_name = "ADDR", default_value = LISTEN_DEFAULT)]
    pub listen: SocketAddr,
    /// Keep the events in PostgreSQL (postgres://user@host:port/db) instead of the embedded
    /// store, so that several replicas can share them.
    #[arg(
        long,
        value_name = "URL",
        env = "BANK_POSTGRES_URL",
        hide_env_values = true
    )]
    pub postgres: Option<String>,
    /// The PostgreSQL schema of the store.
    #[arg(long, value_name = "NAME", default_value = POSTGRES_SCHEMA_DEFAULT)]
    pub postgres_schema: String,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The bearer token readers of the feed API (and of /metrics) must send. Without it the
    /// feed API refuses every read.
    #[arg(long, value_name = "T", env = "BANK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The versions of the `accounts` feed to project and serve (1, 2 or both).
    #[arg(long, value_name = "V,…", value_delimiter = ',', default_value = "1,2")]
    pub versions: Vec<u32>,
    /// The versions published to the broker (--amqp / --nats), among those projected; all of
    /// them by default. On RabbitMQ a version no queue is bound to is refused and retried
    /// forever (logged at ERROR): publish only what consumers read from the broker.
    #[arg(long, value_name = "V,…", value_delimiter = ',')]
    pub publish_versions: Option<Vec<u32>>,
}

/// How to run the service in-process. `Config::new(dir)` is the embedded store in `dir`, on a
/// free loopback port, with feeds v1 and v2, no broker and no token; change fields on it.
#[derive(Clone, Debug)]
pub struct Config {
    /// The embedded store's directory (not used with `postgres`).
    pub data: PathBuf,
    pub listen: SocketAddr,
    /// PostgreSQL instead of the embedded store.
    pub postgres: Option<String>,
    pub postgres_schema: String,
    pub broker: BrokerArgs,
    pub token: Option<String>,
    /// The feed versions projected from the start (more with [`Accounts::add_version`]).
    pub versions: Vec<u32>,
    /// The versions published to the broker, when there is one (`None`: every version
    /// projected, those added later included).
    pub publish_versions: Option<Vec<u32>>,
}

impl Config {
    pub fn new(data: impl Into<PathBuf>) -> Config {
        Config {
            data: data.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            postgres: None,
            postgres_schema: POSTGRES_SCHEMA_DEFAULT.to_owned(),
            broker: BrokerArgs::default(),
            token: None,
            versions: projections::VERSIONS.to_vec(),
            publish_versions: None,
        }
    }
}

impl From<Args> for Config {
    fn from(args: Args) -> Config {
        Config {
            data: args.data,
            listen: args.listen,
            postgres: args.postgres,
            postgres_schema: args.postgres_schema,
            broker: args.broker,
            token: args.token,
            versions: args.versions,
            publish_versions: args.publish_versions,
        }
    }
}

/// Runs `bank accounts` until SIGTERM or Ctrl-C, then shuts down gracefully.
///
/// # Errors
/// The store cannot be opened, the address cannot be bound, a flag is invalid.
///
/// # Cancel safety
/// Not cancel safe: dropped, the service stops without draining (as after a crash; every
/// command answered is durable, and a retry of one not answered tells whether it was recorded).
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let accounts = start(args.into()).await?;
    crate::shutdown::signal().await;
    tracing::info!("shutting down: finishing the commands in flight");
    accounts.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// The store the service runs on.
#[derive(Clone)]
enum Backend {
    Embedded,
    Postgres(PostgresStore),
}

impl Backend {
    fn projectors(&self, builder: ProjectorsBuilder) -> ProjectorsBuilder {
        match self {
            Backend::Embedded => builder.leadership(AlwaysLead),
            Backend::Postgres(store) => builder.leadership(store.clone()),
        }
    }

    fn publishers(&self, builder: PublishersBuilder) -> PublishersBuilder {
        match self {
            Backend::Embedded => builder.leadership(AlwaysLead),
            Backend::Postgres(store) => builder.leadership(store.clone()),
        }
    }
}

/// A running `accounts` service.
pub struct Accounts {
    address: SocketAddr,
    events: Arc<dyn EventStore>,
    feeds: Arc<dyn FeedStore>,
    backend: Backend,
    broker: Option<Arc<dyn Broker>>,
    /// The versions published (`None`: all).
    publish_versions: Option<BTreeSet<u32>>,
    /// The versions projected, and their projectors and publishers (one set per start or
    /// [`Accounts::add_version`]).
    running: Mutex<Running>,
    api: FeedApi,
    stop_server: Option<oneshot::Sender<()>>,
    server: JoinHandle<std::io::Result<()>>,
}

#[derive(Default)]
struct Running {
    versions: BTreeSet<u32>,
    projectors: Vec<Projectors>,
    publishers: Vec<Publishers>,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

fn feed_id(version: u32) -> anyhow::Result<FeedId> {
    match version {
        1 => Ok(FeedId::parse(model::FEED_V1)?),
        2 => Ok(FeedId::parse(model::FEED_V2)?),
        other => anyhow::bail!("the accounts feed has versions 1 and 2, not {other}"),
    }
}

/// Whether feed `version` is published, given `--publish-versions` (`None`: all).
fn publishes(publish_versions: Option<&BTreeSet<u32>>, version: u32) -> bool {
    publish_versions.is_none_or(|published| published.contains(&version))
}

/// `url` with its password, if any, replaced by `***`: what the logs show of a PostgreSQL URL.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// The private log and the feeds: PostgreSQL when `config.postgres` says so, the embedded store in
/// `config.data` otherwise.
async fn open_store(
    config: &Config,
) -> anyhow::Result<(Arc<dyn EventStore>, Arc<dyn FeedStore>, Backend)> {
    Ok(match &config.postgres {
        Some(url) => {
            let store = PostgresStore::connect(
                url,
                PostgresOptions::with_schema(config.postgres_schema.clone()),
            )
            .await
            .context("cannot connect to PostgreSQL")?;
            tracing::info!(
                server = %without_password(url),
                schema = %config.postgres_schema,
                "events and feeds in PostgreSQL: every replica on this schema takes commands; \
                 each feed's projector and publisher run on one replica at a time"
            );
            let feeds = Arc::new(store.feed_store());
            (Arc::new(store.clone()), feeds, Backend::Postgres(store))
        }
        None => {
            let dir = config.data.clone();
            let store = tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let store = EmbeddedStore::open(&dir)
                    .with_context(|| format!("cannot open the store in {}", dir.display()))?;
                let feeds = store.feeds().context("cannot open the feed store")?;
                anyhow::Ok((store, feeds))
            })
            .await??;
            tracing::info!(dir = %config.data.display(), "events and feeds in the embedded store");
            (Arc::new(store.0), Arc::new(store.1), Backend::Embedded)
        }
    })
}

/// What the startup logs say: what listens, which feeds are projected and published, whether
/// the feed API needs a token.
fn log_startup(
    config: &Config,
    address: SocketAddr,
    backend: &Backend,
    feed_ids: &[FeedId],
    versions: &BTreeSet<u32>,
    publish_versions: Option<&BTreeSet<u32>>,
) {
    tracing::info!(%address, "listening: commands on /accounts, feeds on /feeds, metrics on /metrics");
    let feeds_shown = feed_ids
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    match backend {
        Backend::Embedded => tracing::info!(feeds = %feeds_shown, "projecting"),
        Backend::Postgres(_) => tracing::info!(
            feeds = %feeds_shown,
            "projecting when this replica leads (\"leading\" below), standing by otherwise"
        ),
    }
    match &config.token {
        Some(_) => tracing::info!("the feed API and /metrics require the bearer token (--token)"),
        None => tracing::warn!(
            "no --token: the feed API refuses every read (401) until one is given; /metrics is public"
        ),
    }
    let published = feed_ids
        .iter()
        .zip(versions)
        .filter(|(_, v)| publishes(publish_versions, **v))
        .map(|(feed, _)| feed.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    match (&config.broker.amqp, &config.broker.nats) {
        (Some(_), _) => tracing::info!(feeds = %published, "publishing to RabbitMQ (--amqp)"),
        (None, Some(_)) => {
            tracing::info!(feeds = %published, "publishing to NATS JetStream (--nats)");
        }
        (None, None) => tracing::info!("no broker: the feeds are served over HTTP only"),
    }
}

/// Starts the service: opens the store, starts the projectors (and publishers), and listens.
///
/// # Errors
/// The store cannot be opened, the address cannot be bound, a version or the token is invalid,
/// a broker URL is invalid.
///
/// # Cancel safety
/// Not cancel safe: dropped midway, what was started stops as its handles drop.
pub async fn start(config: Config) -> anyhow::Result<Accounts> {
    let mut versions = BTreeSet::new();
    for version in &config.versions {
        feed_id(*version)?;
        versions.insert(*version);
    }
    let (events, feeds, backend) = open_store(&config).await?;
    let mut registry = Registry::default();
    let commands = routes::Commands {
        handler: CommandHandler::from_arc(Arc::clone(&events)).with_state_cache(
            std::num::NonZeroUsize::new(STATE_CACHE_ACCOUNTS).context("a state cache of 0")?,
        ),
        metrics: routes::CommandMetrics::register(&mut registry),
    };
    let broker = config
        .broker
        .broker()
        .await
        .context("the broker's URL is not usable")?;
    let publish_versions: Option<BTreeSet<u32>> = match &config.publish_versions {
        Some(list) => {
            for version in list {
                feed_id(*version)?;
            }
            Some(list.iter().copied().collect())
        }
        None => None,
    };
    let mut running = Running::default();
    let feed_ids = versions
        .iter()
        .map(|v| feed_id(*v))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !feed_ids.is_empty() {
        let mut builder = backend.projectors(Projectors::builder());
        for version in &versions {
            if let Some(projection) = projections::for_version(*version) {
                builder = builder.projection_arc(projection);
            }
        }
        let projectors = builder
            .metrics(&mut registry)
            .start(Arc::clone(&events), Arc::clone(&feeds))
            .await
            .context("cannot start the projectors")?;
        running.projectors.push(projectors);
        let published: Vec<&FeedId> = versions
            .iter()
            .zip(&feed_ids)
            .filter(|(v, _)| publishes(publish_versions.as_ref(), **v))
            .map(|(_, feed)| feed)
            .collect();
        if let (Some(broker), false) = (&broker, published.is_empty()) {
            let mut builder = backend.publishers(Publishers::builder(Arc::clone(broker), SOURCE));
            for feed in published {
                builder = builder.feed(feed.clone());
            }
            let publishers = builder
                .metrics(&mut registry)
                .start(Arc::clone(&feeds))
                .context("cannot start the publishers")?;
            running.publishers.push(publishers);
        }
    }
    running.versions = versions.clone();
    let (tokens, metrics_access) = match &config.token {
        Some(token) => (
            Tokens::one_for_all(TOKEN_NAME, token).context("the token is not usable")?,
            MetricsAccess::AnyToken,
        ),
        None => (Tokens::new(), MetricsAccess::Public),
    };
    let mut api_config = ApiConfig::new(SOURCE, tokens).context("the feed API's configuration")?;
    api_config.metrics_access = metrics_access;
    let api = FeedApi::new(Arc::clone(&feeds), api_config, &mut registry);
    let router = routes::router(commands).merge(api.router(Arc::new(registry)));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let address = listener.local_addr()?;
    let (stop_server, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(headwater::api::serve(listener, router, async move {
        let _ = stopped.await;
    }));
    log_startup(
        &config,
        address,
        &backend,
        &feed_ids,
        &versions,
        publish_versions.as_ref(),
    );
    Ok(Accounts {
        address,
        events,
        feeds,
        backend,
        broker,
        publish_versions,
        running: Mutex::new(running),
        api,
        stop_server: Some(stop_server),
        server,
    })
}

impl Accounts {
    /// Where the command API, the feed API and `/metrics` listen.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://address`: what a [`crate::client::Client`] or a consumer's `--upstream` takes.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The event store (the private log).
    pub fn events(&self) -> Arc<dyn EventStore> {
        Arc::clone(&self.events)
    }

    /// The feed store (the public feeds).
    pub fn feeds(&self) -> Arc<dyn FeedStore> {
        Arc::clone(&self.feeds)
    }

    /// The feed versions projected.
    pub fn versions(&self) -> Vec<u32> {
        self.lock().versions.iter().copied().collect()
    }

    /// Every projector's status.
    pub fn projector_statuses(&self) -> Vec<ProjectorStatus> {
        self.lock()
            .projectors
            .iter()
            .flat_map(Projectors::statuses)
            .collect()
    }

    /// Every publisher's status (none without a broker).
    pub fn publisher_statuses(&self) -> Vec<PublisherStatus> {
        self.lock()
            .publishers
            .iter()
            .flat_map(Publishers::statuses)
            .collect()
    }

    /// The status watch of the projector of feed `version`, `None` when it is not projected.
    pub fn watch_projector(&self, version: u32) -> Option<watch::Receiver<ProjectorStatus>> {
        let feed = feed_id(version).ok()?;
        self.lock().projectors.iter().find_map(|p| p.watch(&feed))
    }

    /// Waits until feed `version` includes every event the log held when it was called, at most
    /// `timeout`. On this replica's projector; with PostgreSQL, the feed store's cursor (another
    /// replica may be projecting).
    ///
    /// # Errors
    /// The feed is not projected, or did not catch up in time.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn caught_up(&self, version: u32, timeout: Duration) -> anyhow::Result<()> {
        let feed = feed_id(version)?;
        let head = self.events.head_position();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let state = self.feeds.feed(&feed).await?;
            if state.as_ref().is_some_and(|s| s.cursor >= head) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "feed {feed} did not reach position {head} within {timeout:?} (at {:?})",
                    state.map(|s| s.cursor)
                );
            }
            let mut head_watch = self.feeds.watch_head(&feed);
            let _ = tokio::time::timeout(Duration::from_millis(20), head_watch.changed()).await;
        }
    }

    /// Starts projecting (and publishing) feed `version` live: a new feed backfills from the
    /// start of the log while commands go on, then follows it. Nothing happens for a version
    /// already projected.
    ///
    /// Its projector and publisher are not in `/metrics` (the metrics families are registered
    /// once, at start); they are in [`Accounts::projector_statuses`].
    ///
    /// # Errors
    /// An unknown version; the feed cannot be registered.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped midway, the feed may be registered and not projected (adding it
    /// again fixes that).
    pub async fn add_version(&self, version: u32) -> anyhow::Result<()> {
        let feed = feed_id(version)?;
        if self.lock().versions.contains(&version) {
            return Ok(());
        }
        let Some(projection) = projections::for_version(version) else {
            anyhow::bail!("no projection for version {version}");
        };
        let projectors = self
            .backend
            .projectors(Projectors::builder())
            .projection_arc(projection)
            .start(Arc::clone(&self.events), Arc::clone(&self.feeds))
            .await
            .with_context(|| format!("cannot start the projector of {feed}"))?;
        let publishers = match &self.broker {
            Some(broker) if publishes(self.publish_versions.as_ref(), version) => Some(
                self.backend
                    .publishers(Publishers::builder(Arc::clone(broker), SOURCE))
                    .feed(feed.clone())
                    .start(Arc::clone(&self.feeds))
                    .with_context(|| format!("cannot start the publisher of {feed}"))?,
            ),
            _ => None,
        };
        let extra = {
            let mut running = self.lock();
            if running.versions.insert(version) {
                running.projectors.push(projectors);
                running.publishers.extend(publishers);
                None
            } else {
                Some((projectors, publishers))
            }
        };
        if let Some((projectors, publishers)) = extra {
            // Added concurrently by another call: let this one's projector go.
            projectors.shutdown().await;
            if let Some(publishers) = publishers {
                publishers.shutdown().await;
            }
            return Ok(());
        }
        tracing::info!(%feed, "projecting a new feed version: backfilling, then live");
        Ok(())
    }

    /// Stops the service gracefully: stops accepting, lets the commands in flight finish (long
    /// polls of the feed API answer at once), waits (at most [`SHUTDOWN_CATCH_UP_WAIT_SECS`]) for
    /// the projectors running here to include the last commands, stops the publishers after
    /// folding what the broker confirmed into their cursors and the projectors after their
    /// in-flight commit, and records the feed API's readers.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped midway, the rest stops as its handles drop.
    pub async fn shutdown(mut self) {
        self.api.drain();
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
        match (&mut self.server).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "the HTTP server stopped with an error"),
            Err(error) => tracing::warn!(%error, "the HTTP server's task failed"),
        }
        // The commands are done: let the projectors running here include them, so that a
        // graceful stop leaves every feed at the log's head. Bounded, and only for projectors
        // that are running (one standing by or retrying is not waited for).
        let head = self.events.head_position();
        let watches: Vec<_> = self
            .lock()
            .projectors
            .iter()
            .flat_map(Projectors::watches)
            .collect();
        let caught_up = async {
            for mut watch in watches {
                let _ = watch
                    .wait_for(|s| s.state != ProjectorState::Running || s.cursor >= head)
                    .await;
            }
        };
        let wait = Duration::from_secs(SHUTDOWN_CATCH_UP_WAIT_SECS);
        if tokio::time::timeout(wait, caught_up).await.is_err() {
            tracing::warn!(
                ?wait,
                "the feeds did not catch up with the log before stopping; they will at the next start"
            );
        }
        let running = std::mem::take(&mut *self.lock());
        for publishers in running.publishers {
            publishers.shutdown().await;
        }
        for projectors in running.projectors {
            for (feed, outcome) in projectors.shutdown().await {
                match outcome {
                    Ok(stopped) => tracing::info!(%feed, ?stopped, "projector stopped"),
                    Err(error) => tracing::warn!(%feed, %error, "projector had failed"),
                }
            }
        }
        let Accounts { api, .. } = self;
        if let Err(error) = api.close().await {
            tracing::warn!(%error, "could not record the feed API's last readers");
        }
        tracing::info!("accounts stopped");
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_handle_can_be_shared_between_tasks() {
        fn shared<T: Send + Sync + 'static>() {}
        shared::<Accounts>();
        shared::<crate::client::Client>();
    }

    #[test]
    fn logs_show_no_password() {
        for (url, shown) in [
            (
                "postgres://bank:s3cret@db:5432/bank",
                "postgres://bank:***@db:5432/bank",
            ),
            ("postgres://bank@db/bank", "postgres://bank@db/bank"),
            ("postgres://db/bank", "postgres://db/bank"),
            ("host=db password=x", "<not a URL>"),
        ] {
            assert_eq!(without_password(url), shown);
        }
    }
}
