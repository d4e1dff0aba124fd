//! `bank statements`: the consumer. It keeps every account's balance from the `accounts` feed
//! (v1 or v2, see [`crate::model`]) in a view of its own, with the consumer library doing the
//! hard part: each event applied exactly once, in order per account, whatever the transport lost,
//! duplicated or reordered (gaps healed from the producer, G7), lost last events found by
//! periodic reconstitution (G8), unknown accounts bootstrapped on demand (G9), and a move from v1
//! to v2 without downtime (G10).
//!
//! - The view ([`view`]): an `EmbeddedView` (SQLite) in `--data DIR`, table `balances_v1` or
//!   `balances_v2` per feed version, cursors committed with the rows.
//! - The transport: the producer's HTTP feed (default), or RabbitMQ (`--amqp`) / NATS JetStream
//!   (`--nats`); healing, bootstraps and reconstitution always read the producer's feed API
//!   (`--upstream`).
//! - The HTTP API ([`routes`]): `GET /balances/{id}`, `GET /status`, `GET /metrics`,
//!   `POST`/`GET /reconstitute`.
//!
//! In process (the demo, the benchmark): [`start`] with a [`Config`], then [`Statements`].

mod routes;
mod view;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use headwater::consume::{
    ActiveFeed, AmqpSource, Consumer, ConsumerStats, DeadLetterStatus, EmbeddedView, FeedClient,
    NatsSource, OpenGap, SwitchOptions, SwitchStatus, TransportStats, VersionedConsumer,
    WalkControl, WalkProgress, Walker, WalkerNotRunning, WalkerOptions, WalkerStatus,
};
use headwater::feed::{FeedId, Subject};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::model::{FEED_V1, FEED_V2};
pub use view::{Balance, Refused, VIEW_FILE};

/// The consumer's name by default: its durable mark in the view (`active/statements`), its
/// RabbitMQ queue (`headwater.accounts.v1.statements`), its NATS durable consumer.
pub const CONSUMER_NAME: &str = "statements";
/// Seconds between two reconstitution walks by default.
pub const RECONSTITUTE_EVERY_SECS_DEFAULT: u64 = 60;
/// Requests per second a reconstitution walk makes of the producer by default.
pub const WALK_REQUESTS_PER_SECOND_DEFAULT: u32 = 100;

/// The consumer of `statements`: its view in SQLite, the producer's feed API upstream.
pub type StatementsConsumer = Consumer<EmbeddedView, FeedClient>;

/// The flags of `bank statements`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The directory of the view (the SQLite file `statements.sqlite3`: balances and cursors);
    /// created if missing.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Where the HTTP API listens: GET /balances/{id}, GET /status, GET /metrics,
    /// POST /reconstitute.
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// The `accounts` service (its feed API under /feeds), e.g. http://127.0.0.1:8080. The HTTP
    /// feed is read from it; gaps, bootstraps and reconstitution always heal from it.
    #[arg(long, value_name = "URL")]
    pub upstream: String,
    /// The feed version to keep balances from. A view built on accounts.v1 started with
    /// accounts.v2 builds v2 beside v1 while v1 keeps serving, then switches.
    #[arg(long, value_name = "FEED", default_value = FEED_V1, value_parser = parse_feed)]
    pub feed: FeedId,
    #[command(flatten)]
    pub broker: BrokerFlags,
    /// The bearer token for the producer's feed API (its reads are refused without one).
    #[arg(long, value_name = "T", env = "BANK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Seconds between two reconstitution walks (the walk finds events no delivery brought, such
    /// as an account's lost last event); 0: only on request (POST /reconstitute).
    #[arg(long, value_name = "SECS", default_value_t = RECONSTITUTE_EVERY_SECS_DEFAULT)]
    pub reconstitute_every: u64,
}

/// `--amqp URL` or `--nats URL`: take the feed from a broker instead of the HTTP feed.
#[derive(Clone, Debug, Default, clap::Args)]
#[group(multiple = false)]
pub struct BrokerFlags {
    /// Consume the feed from RabbitMQ (amqp://user:password@host:5672/vhost): a durable queue
    /// `headwater.accounts.v1.statements` bound to the producer's exchange.
    #[arg(long, value_name = "URL")]
    pub amqp: Option<String>,
    /// Consume the feed from NATS JetStream (nats://host:4222): a durable pull consumer
    /// `statements` on the producer's stream.
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
}

fn parse_feed(text: &str) -> Result<FeedId, String> {
    let feed = FeedId::parse(text).map_err(|e| e.to_string())?;
    if view::table(&feed).is_none() {
        return Err(format!("{FEED_V1} or {FEED_V2}, not {text}"));
    }
    Ok(feed)
}

/// Runs `bank statements` until SIGTERM or Ctrl-C.
///
/// # Errors
/// The service could not start (the view cannot be opened, the address is taken, a bad URL),
/// or its transport ended for a reason waiting cannot fix (the producer refuses the token, the
/// feed is unknown).
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let transport = match (args.broker.amqp, args.broker.nats) {
        (Some(url), _) => Transport::Amqp(url),
        (None, Some(url)) => Transport::Nats(url),
        (None, None) => Transport::Http,
    };
    let mut config = Config::new(args.data, &args.upstream);
    config.listen = args.listen;
    config.feed = args.feed;
    config.transport = transport;
    config.token = args.token;
    config.reconstitute_every =
        (args.reconstitute_every > 0).then(|| Duration::from_secs(args.reconstitute_every));
    let mut statements = start(config).await?;
    let failed = tokio::select! {
        () = crate::shutdown::signal() => {
            tracing::info!("statements: shutting down (the view commits every event with its cursor: nothing to flush)");
            None
        }
        error = statements.failed() => Some(error),
    };
    let shutdown = statements.shutdown().await;
    if let Some(error) = failed {
        return Err(error);
    }
    shutdown?;
    tracing::info!("statements: stopped");
    Ok(ExitCode::SUCCESS)
}

/// Where the events come from.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transport {
    /// The producer's HTTP feed, long polled (the default).
    Http,
    /// A RabbitMQ queue of this consumer bound to the feed's exchange (the URL).
    Amqp(String),
    /// A durable pull consumer on the feed's NATS JetStream stream (the URL).
    Nats(String),
    /// None: the caller delivers events itself to [`Statements::consumer`] (the demo's lossy
    /// link). Healing, bootstraps and reconstitution still read `upstream`.
    External,
}

impl Transport {
    fn kind(&self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Amqp(_) => "rabbitmq",
            Transport::Nats(_) => "nats",
            Transport::External => "external",
        }
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A broker URL may hold a password: never shown.
        f.write_str(self.kind())
    }
}

/// How to run `statements` in process.
#[derive(Clone)]
#[non_exhaustive]
pub struct Config {
    /// The directory of the view (created if missing).
    pub data: PathBuf,
    /// Where the HTTP API listens (`127.0.0.1:0` by default: a free port, see
    /// [`Statements::address`]).
    pub listen: SocketAddr,
    /// The producer's feed API.
    pub upstream: String,
    /// The feed version to keep (`accounts.v1` by default).
    pub feed: FeedId,
    pub transport: Transport,
    pub token: Option<String>,
    /// Time between reconstitution walks; `None`: only on request.
    pub reconstitute_every: Option<Duration>,
    /// Requests per second a walk makes of the producer; `None`: unpaced.
    pub walk_requests_per_second: Option<NonZeroU32>,
    /// The consumer's name (its mark, queue and durable consumer): [`CONSUMER_NAME`].
    pub name: String,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("data", &self.data)
            .field("listen", &self.listen)
            .field("upstream", &self.upstream)
            .field("feed", &self.feed)
            .field("transport", &self.transport)
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .field("reconstitute_every", &self.reconstitute_every)
            .field("walk_requests_per_second", &self.walk_requests_per_second)
            .field("name", &self.name)
            .finish()
    }
}

impl Config {
    /// The defaults: a free port on loopback, `accounts.v1` over the HTTP feed, no token, a walk
    /// every [`RECONSTITUTE_EVERY_SECS_DEFAULT`] seconds.
    pub fn new(data: impl Into<PathBuf>, upstream: &str) -> Config {
        Config {
            data: data.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            upstream: upstream.to_owned(),
            feed: FeedId::parse(FEED_V1).expect("a valid feed id"),
            transport: Transport::Http,
            token: None,
            reconstitute_every: Some(Duration::from_secs(RECONSTITUTE_EVERY_SECS_DEFAULT)),
            walk_requests_per_second: NonZeroU32::new(WALK_REQUESTS_PER_SECOND_DEFAULT),
            name: CONSUMER_NAME.to_owned(),
        }
    }
}

/// What `GET /status` answers (and [`Statements::status`]): the active version's consumer.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Status {
    /// The feed version readers read (`accounts.v1`).
    pub feed: String,
    /// The version asked for (differs from `feed` while a move is under way).
    pub target: String,
    /// `http`, `rabbitmq`, `nats` or `external`.
    pub transport: &'static str,
    /// Accounts in the active version's view.
    pub accounts: u64,
    /// Subjects with a cursor in the active version.
    pub cursors: u64,
    pub events_applied: u64,
    pub duplicates_skipped: u64,
    pub gaps_detected: u64,
    /// Gaps detected and closed since the start.
    pub gaps_healed: u64,
    /// Events fetched from the producer to heal gaps.
    pub events_healed: u64,
    pub bootstraps: u64,
    pub reconstitutions: u64,
    pub events_reconstituted: u64,
    /// Gaps seen and not healed yet, and the oldest of them.
    pub open_gaps: u64,
    pub gaps: Vec<OpenGap>,
    pub dead_letters: DeadLetterStatus,
    /// The last reconstitution walk (periodic, requested or direct), when there was one.
    pub last_reconstitution: Option<WalkProgress>,
    /// The walker: the running walk, its period and pace.
    pub reconstitution: WalkerStatus,
    /// The move between versions.
    pub switch: SwitchStatus,
    /// The broker transport's counters (`rabbitmq`, `nats`).
    pub broker: Option<TransportStats>,
}

/// `statements` running in process. Dropping it stops its tasks (prefer [`Statements::shutdown`],
/// which waits for them).
pub struct Statements {
    address: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    transport: Option<JoinHandle<anyhow::Result<()>>>,
    walker: Option<JoinHandle<()>>,
}

// Checked at compile time: the demo and the bench share a `Statements` between tasks.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Statements>();
};

impl std::fmt::Debug for Statements {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Statements")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// A broker source running for the active version (for its counters in the status).
enum Source {
    Amqp(Arc<AmqpSource>),
    Nats(Arc<NatsSource>),
}

/// What the tasks and the routes share.
pub(crate) struct Shared {
    name: String,
    view: Arc<EmbeddedView>,
    versioned: VersionedConsumer<EmbeddedView, FeedClient>,
    active: ActiveFeed<EmbeddedView, FeedClient>,
    /// The version asked for (what `switch_to` set last).
    target: watch::Sender<FeedId>,
    transport: Transport,
    /// The active version's walker (replaced after a flip).
    walker: watch::Sender<Arc<Walker<EmbeddedView, FeedClient>>>,
    walker_options: WalkerOptions,
    reconstitute_every: Option<Duration>,
    /// Metrics: the consumers', walkers' and sources' as they are made.
    registry: Mutex<Registry>,
    registered: Mutex<HashSet<String>>,
    source: Mutex<Option<Source>>,
    /// The service's own metrics.
    metrics: routes::Metrics,
}

/// Starts `statements`: opens the view, starts the transport, the walker and the HTTP API.
///
/// # Errors
/// The view cannot be opened, the feed is not one of [`crate::model`]'s, the upstream URL or
/// the token is not usable, the address cannot be bound, a broker URL is not valid.
///
/// # Cancel safety
/// Not cancel safe: cancelled after the listener was bound, the tasks started are dropped with
/// their handles (they stop on their own only when dropped with a [`Statements`]).
pub async fn start(config: Config) -> anyhow::Result<Statements> {
    if view::table(&config.feed).is_none() {
        anyhow::bail!(
            "statements reads {FEED_V1} or {FEED_V2}, not {}",
            config.feed
        );
    }
    std::fs::create_dir_all(&config.data)
        .with_context(|| format!("cannot create {}", config.data.display()))?;
    let path = config.data.join(VIEW_FILE);
    let view = EmbeddedView::open(&path, view::setup, |tx, event| {
        view::apply(tx, event).map_err(Into::into)
    })
    .with_context(|| format!("cannot open the view {}", path.display()))?;
    let view = Arc::new(view);
    let upstream = FeedClient::new(&config.upstream, config.token.clone())
        .context("the --upstream URL or the --token is not usable")?;
    match &config.transport {
        Transport::Amqp(url) => drop(AmqpSource::new(url, &config.feed, &config.name)?),
        Transport::Nats(url) => drop(NatsSource::new(url, &config.feed, &config.name)?),
        Transport::Http | Transport::External => {}
    }
    let versioned = VersionedConsumer::open(
        &config.name,
        config.feed.clone(),
        Arc::clone(&view),
        Arc::new(upstream),
        SwitchOptions::default(),
    )
    .await
    .context("cannot open the consumer")?;
    let active = versioned.active();
    let mut registry = Registry::default();
    versioned.register_metrics(&mut registry);
    let mut walker_options = WalkerOptions::default();
    walker_options = match config.walk_requests_per_second {
        Some(rate) => {
            walker_options.with_pace(rate, headwater::consume::WALK_BURST_REQUESTS_DEFAULT)
        }
        None => walker_options.unpaced(),
    };
    let walker = Arc::new(Walker::new(active.consumer(), walker_options.clone()));
    walker.register_metrics(&mut registry);
    let metrics = routes::Metrics::default();
    metrics.register(&mut registry);
    // What `register_metrics` registered: the active version's consumer, the target's, the
    // walker's. What is made later (after a flip) is registered then, once.
    let registered = HashSet::from([
        format!("consumer {}", active.feed()),
        format!("consumer {}", config.feed),
        format!("walker {}", active.feed()),
    ]);

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let address = listener.local_addr()?;

    let shared = Arc::new(Shared {
        name: config.name.clone(),
        view,
        target: watch::Sender::new(config.feed.clone()),
        versioned,
        active,
        transport: config.transport.clone(),
        walker: watch::Sender::new(walker),
        walker_options,
        reconstitute_every: config.reconstitute_every,
        registry: Mutex::new(registry),
        registered: Mutex::new(registered),
        source: Mutex::new(None),
        metrics,
    });

    tracing::info!(view = %path.display(), "statements: the view (balances and cursors, SQLite) lives here");
    tracing::info!(
        active = %shared.active.feed(),
        feed = %config.feed,
        upstream = %config.upstream,
        transport = config.transport.kind(),
        "statements: following the accounts feed (healing, bootstraps and reconstitution read the upstream's feed API)"
    );
    if shared.active.feed() != config.feed {
        tracing::info!(from = %shared.active.feed(), to = %config.feed, "statements: the view is on another version; it moves while the active one keeps serving");
    }
    if config.token.is_none() {
        tracing::warn!("statements: no --token: the producer's feed API refuses reads without one");
    }
    match config.reconstitute_every {
        Some(every) => tracing::info!(
            every_seconds = every.as_secs_f64(),
            "statements: reconstitution walks periodically and on POST /reconstitute"
        ),
        None => tracing::info!("statements: reconstitution only on POST /reconstitute"),
    }

    let (stop, _) = watch::channel(false);
    let router = routes::router(Arc::clone(&shared));
    let server = tokio::spawn({
        let stopped = stopped(stop.subscribe());
        async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stopped)
                .await
                .context("the HTTP server failed")
        }
    });
    tracing::info!(%address, "statements: listening: GET /balances/{{id}}, GET /status, GET /metrics, POST /reconstitute");
    let transport = tokio::spawn(follow(Arc::clone(&shared), stop.subscribe()));
    let walker = tokio::spawn(walk(Arc::clone(&shared), stop.subscribe()));
    Ok(Statements {
        address,
        shared,
        stop,
        server: Some(server),
        transport: Some(transport),
        walker: Some(walker),
    })
}

/// Resolves once `stop` is set (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// The transport task: the active version's events into the view, and the moves between
/// versions.
async fn follow(shared: Arc<Shared>, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    if shared.transport == Transport::Http {
        // The versioned consumer follows the active version's HTTP feed, and moves when asked.
        return shared
            .versioned
            .run(stopped(stop))
            .await
            .context("the HTTP feed transport ended");
    }
    let mut targets = shared.target.subscribe();
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let target = targets.borrow_and_update().clone();
        let ends = {
            let stop = stop.clone();
            let mut targets = targets.clone();
            async move {
                tokio::select! {
                    () = stopped(stop) => {}
                    _ = targets.changed() => {}
                }
            }
        };
        if shared.active.feed() != target {
            // The move is done over the HTTP feed (the library's switch builds the new version
            // with it while the active one's HTTP feed keeps it fresh); the broker takes over
            // once the new version is active.
            *shared.source.lock().unwrap_or_else(|e| e.into_inner()) = None;
            let mut active = shared.versioned.active();
            shared
                .versioned
                .run(async move {
                    tokio::select! {
                        () = ends => {}
                        () = active.wait_for(&target) => {}
                    }
                })
                .await
                .context("moving to another feed version")?;
            continue;
        }
        let consumer = shared.active.consumer();
        match &shared.transport {
            Transport::Amqp(url) => {
                let source = Arc::new(AmqpSource::new(url, consumer.feed(), &shared.name)?);
                shared.register(&format!("rabbitmq {}", consumer.feed()), |r| {
                    source.register_metrics(r);
                });
                tracing::info!(
                    queue = source.queue(),
                    "statements: consuming from RabbitMQ"
                );
                *shared.source.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Source::Amqp(Arc::clone(&source)));
                source.run(&consumer, ends).await?;
            }
            Transport::Nats(url) => {
                let source = Arc::new(NatsSource::new(url, consumer.feed(), &shared.name)?);
                shared.register(&format!("nats {}", consumer.feed()), |r| {
                    source.register_metrics(r);
                });
                tracing::info!(
                    stream = source.stream(),
                    durable = source.durable(),
                    "statements: consuming from NATS JetStream"
                );
                *shared.source.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Source::Nats(Arc::clone(&source)));
                source.run(&consumer, ends).await?;
            }
            // The caller delivers; wait for a stop or a move.
            Transport::External | Transport::Http => ends.await,
        }
    }
}

/// The walker task: the active version's walker runs periodically and on request; after a flip,
/// a walker of the new version replaces it.
async fn walk(shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let mut active = shared.versioned.active();
    loop {
        let mut walker = Arc::clone(&shared.walker.borrow());
        if walker.consumer().feed() != &active.feed() {
            let consumer = active.consumer();
            walker = Arc::new(Walker::new(consumer, shared.walker_options.clone()));
            let feed = walker.consumer().feed();
            shared.register(&format!("consumer {feed}"), |r| {
                walker.consumer().register_metrics(r);
            });
            shared.register(&format!("walker {feed}"), |r| walker.register_metrics(r));
            shared.walker.send_replace(Arc::clone(&walker));
        }
        let flipped = std::sync::atomic::AtomicBool::new(false);
        let ends = async {
            tokio::select! {
                () = stopped(stop.clone()) => {}
                _ = active.changed() => flipped.store(true, std::sync::atomic::Ordering::Relaxed),
            }
        };
        walker.run(shared.reconstitute_every, ends).await;
        if !flipped.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
    }
}

impl Shared {
    /// Registers metrics once per `key` (a consumer, walker or source made after the start).
    fn register(&self, key: &str, register: impl FnOnce(&mut Registry)) {
        let mut registered = self.registered.lock().unwrap_or_else(|e| e.into_inner());
        if registered.insert(key.to_owned()) {
            register(&mut self.registry.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }

    /// One account's balance in the active version, bootstrapped from the producer when the
    /// view does not hold it (G9); `None` when the producer has no such account either. With
    /// whether it was bootstrapped.
    async fn balance(&self, account: &str) -> Result<(Option<Balance>, bool), LookupError> {
        // One snapshot: a read is entirely of one version.
        let consumer = self.active.consumer();
        let feed = consumer.feed().clone();
        if let Some(balance) = view::balance(&self.view, &feed, account).await? {
            return Ok((Some(balance), false));
        }
        let subject = Subject::new(account).map_err(|_| LookupError::BadId)?;
        let cursor = consumer.ensure(&subject).await?;
        if cursor.get() == 0 {
            return Ok((None, false));
        }
        Ok((view::balance(&self.view, &feed, account).await?, true))
    }

    async fn status(&self) -> anyhow::Result<Status> {
        let consumer = self.active.consumer();
        let feed = consumer.feed().clone();
        let (accounts, cursors) = view::counts(&self.view, &feed).await?;
        let status = consumer.status();
        let stats: ConsumerStats = status.stats;
        let walker = self.walker.borrow().status();
        let broker = match &*self.source.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(Source::Amqp(source)) => Some(source.stats()),
            Some(Source::Nats(source)) => Some(source.stats()),
            None => None,
        };
        Ok(Status {
            feed: feed.to_string(),
            // The versioned consumer's: it may move to a retired feed's successor by itself.
            target: self.versioned.target().to_string(),
            transport: self.transport.kind(),
            accounts,
            cursors,
            events_applied: stats.applied,
            duplicates_skipped: stats.duplicates,
            gaps_detected: stats.gaps,
            gaps_healed: stats
                .gaps
                .saturating_sub(status.open_gaps + status.untracked_gaps),
            events_healed: stats.healed,
            bootstraps: stats.bootstraps,
            reconstitutions: stats.reconstitutions,
            events_reconstituted: stats.reconstituted,
            open_gaps: status.open_gaps + status.untracked_gaps,
            gaps: status.gaps,
            dead_letters: status.dead_letters,
            last_reconstitution: walker.last.clone(),
            reconstitution: walker,
            switch: self.versioned.status(),
            broker,
        })
    }
}

/// Why a balance could not be looked up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LookupError {
    #[error("not an account id")]
    BadId,
    #[error("bootstrapping the account from the producer: {0}")]
    Bootstrap(#[from] headwater::consume::ConsumeError),
    #[error("reading the view: {0}")]
    View(#[from] headwater::consume::ViewError),
}

/// `POST /reconstitute` reaches the active version's walker, whichever it is.
struct ActiveWalker(Arc<Shared>);

impl WalkControl for ActiveWalker {
    fn request_walk(&self) -> Result<u64, WalkerNotRunning> {
        self.0.walker.borrow().request()
    }

    fn walker_status(&self) -> WalkerStatus {
        self.0.walker.borrow().status()
    }
}

impl Statements {
    /// Where the HTTP API listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The active version's consumer: [`Transport::External`] delivers events to it
    /// (`deliver`, or `handle_event` to dead-letter what cannot be applied). After a move to
    /// another version, ask again.
    pub fn consumer(&self) -> Arc<StatementsConsumer> {
        self.shared.active.consumer()
    }

    /// The feed version readers read now.
    pub fn feed(&self) -> FeedId {
        self.shared.active.feed()
    }

    /// One reconstitution walk now, unpaced by anything but the configured pace, through every
    /// subject the producer lists (G8): returns how many accounts it found behind and caught
    /// up. It waits for a walk in progress to end first.
    ///
    /// # Errors
    /// The producer cannot be listed or read, the view fails; or an account could not be caught
    /// up (its events refused by the handler: dead-lettered).
    ///
    /// # Cancel safety
    /// Cancel safe: a cancelled walk is recorded as such; the next one resumes after its last
    /// listing page.
    pub async fn reconstitute(&self) -> anyhow::Result<u64> {
        let walker = Arc::clone(&self.shared.walker.borrow());
        let mut fixed = 0;
        loop {
            let walk = walker.walk().await?;
            fixed += walk.behind.saturating_sub(walk.failed);
            if walk.failed > 0 {
                anyhow::bail!(
                    "the walk could not catch up {} account(s): see GET /status, dead_letters",
                    walk.failed
                );
            }
            // A walk that resumed an interrupted one went through the rest of the listing only:
            // walk once more from the start (the mark is cleared now).
            if walk.resumed_after.is_none() {
                return Ok(fixed);
            }
        }
    }

    /// One account in the active version, as `GET /balances/{id}` answers it (bootstrapped on
    /// demand); `None` when the producer has no such account.
    ///
    /// # Errors
    /// A bad id, the producer unreachable for a bootstrap, the view failing.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn balance(&self, account: &str) -> anyhow::Result<Option<Balance>> {
        Ok(self.shared.balance(account).await?.0)
    }

    /// Every account the active version's view holds (no bootstrap).
    ///
    /// # Errors
    /// The view failing.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn balances(&self) -> anyhow::Result<BTreeMap<String, Balance>> {
        let consumer = self.shared.active.consumer();
        Ok(view::balances(&self.shared.view, consumer.feed()).await?)
    }

    /// Moves to another feed version (`accounts.v2`): built beside the active one, which keeps
    /// serving, then switched to (not durable: a restart goes back to the configured version's
    /// move). See [`Statements::wait_for`].
    ///
    /// # Errors
    /// A feed this service does not read.
    pub fn switch_to(&self, feed: FeedId) -> anyhow::Result<()> {
        if view::table(&feed).is_none() {
            anyhow::bail!("statements reads {FEED_V1} or {FEED_V2}, not {feed}");
        }
        self.shared.versioned.switch_to(feed.clone());
        self.shared.target.send_replace(feed);
        Ok(())
    }

    /// Waits until `feed` is the active version.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn wait_for(&self, feed: &FeedId) {
        let mut active = self.shared.versioned.active();
        active.wait_for(feed).await;
    }

    /// What `GET /status` answers.
    ///
    /// # Errors
    /// The view failing.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn status(&self) -> anyhow::Result<Status> {
        self.shared.status().await
    }

    /// Resolves with the error that ended the transport (the producer refused the token, an
    /// unknown feed…); pending while it runs.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn failed(&mut self) -> anyhow::Error {
        let Some(task) = self.transport.as_mut() else {
            return std::future::pending().await;
        };
        let ended = task.await;
        self.transport = None;
        match ended {
            Ok(Err(error)) => error,
            Ok(Ok(())) => std::future::pending().await,
            Err(error) => anyhow::anyhow!("the transport task failed: {error}"),
        }
    }

    /// Stops: the HTTP API finishes the requests in flight, the transport the event in hand
    /// (every applied event is committed with its cursor; the HTTP feed's position is saved),
    /// the walker its walk (recorded as cancelled: the next one resumes after its last page).
    ///
    /// # Errors
    /// What ended a task with an error.
    ///
    /// # Cancel safety
    /// Cancel safe: the tasks are told to stop at the first poll.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop.send_replace(true);
        let mut result = Ok(());
        if let Some(server) = self.server.take() {
            result = result.and(server.await.context("the HTTP server task")?);
        }
        if let Some(transport) = self.transport.take() {
            result = result.and(transport.await.context("the transport task")?);
        }
        if let Some(walker) = self.walker.take() {
            walker.await.context("the walker task")?;
        }
        result
    }
}

impl Drop for Statements {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}
