//! Headwater's PostgreSQL event store (PostgreSQL 15+): one database for all replicas of a
//! service, with a log that followers read without ever skipping an event (G4).
//!
//! - [`PostgresStore::connect`] creates and migrates its schema itself (versioned migrations in
//!   this crate, applied under an advisory lock, so replicas may start at once).
//! - Appends go through one writer task per process that commits concurrent appends in groups.
//!   Every group transaction locks the one row of `log_head` before it allocates positions, so
//!   transactions that write events commit one after the other, in position order, across all
//!   processes: a reader of `position > cursor` can never see a later position before an
//!   earlier one is visible. `docs/design/postgres.md` says why this design and what it costs.
//! - The head is watched with `LISTEN`/`NOTIFY` (the append transaction notifies; PostgreSQL
//!   delivers at commit) on a dedicated connection, with a fallback poll.
//! - [`LeaderElection`] runs a follower on exactly one replica, with session advisory locks.
//!
//! Architecture invariant: this crate is the only one that knows the tables. Everything above it
//! sees an [`EventStore`](headwater_store::EventStore).

mod feed;
mod head;
mod leader;
mod reader;
mod schema;
mod tools;
mod writer;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use headwater_core::limits::READ_PAGE_BYTES_MAX;
use headwater_core::{
    EventId, ExpectedVersion, NewEvent, Position, RecordedEvent, StreamName, StreamVersion,
    validate_append,
};
use headwater_store::{AppendError, AppendOutcome, EventStore, ReadError, validate_limit};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;

use crate::schema::Sql;
use crate::writer::Request;

pub use crate::feed::{FEED_TIME_MICROS_MAX, PgFeedStore};
pub use crate::leader::{
    FOLLOWER_NAME_BYTES_MAX, HEALTH_CHECK_INTERVAL_MILLIS_DEFAULT,
    HEALTH_CHECK_TIMEOUT_MILLIS_DEFAULT, LeaderElection, LeaderError, Leadership,
    RETRY_BACKOFF_MILLIS_MAX, RETRY_INTERVAL_MILLIS_DEFAULT,
};
pub use crate::tools::{
    CategoryCount, EVENT_TYPES_CHECKED_MAX, Inspection, PROBLEMS_RECORDED_MAX, Problem,
    TOP_CATEGORIES_MAX, VerifyProgress, VerifyReport, VerifyStage, inspect, verify,
};

/// The version of the tables this build reads and writes (its last migration).
pub const SCHEMA_VERSION: i32 = 4;
/// The schema a store uses unless told otherwise.
pub const SCHEMA_DEFAULT: &str = "headwater";
/// The longest schema name, in bytes (PostgreSQL's identifiers stop at 63).
pub const SCHEMA_NAME_BYTES_MAX: usize = 48;
/// The most events one group commit writes (it always takes at least one append whole).
pub const GROUP_EVENTS_MAX: usize = 10_000;
/// The most event data one group commit writes, in bytes (it always takes at least one append).
pub const GROUP_BYTES_MAX: usize = 32 * 1024 * 1024;
/// How many appends may wait for the writer before `append` waits for room.
pub const QUEUE_APPENDS_MAX: usize = 4_096;
/// Connections of the writer, by default. With more than one, the next group waits at the
/// server for the log head lock while one commits; measured here with 64 closed-loop writers
/// that splits the groups and costs more fsyncs than it saves round trips (docs/design/postgres.md).
pub const WRITER_CONNECTIONS_DEFAULT: usize = 1;
/// Pooled connections for reads, by default.
pub const READ_CONNECTIONS_DEFAULT: usize = 8;
/// How often the head is read when no notification came, by default, in milliseconds.
pub const HEAD_POLL_INTERVAL_MILLIS_DEFAULT: u64 = 1_000;
/// How long a group transaction waits for the log head lock before it fails, by default, in
/// milliseconds (another process's writer holds it while it commits).
pub const LOCK_TIMEOUT_MILLIS_DEFAULT: u64 = 30_000;
/// After this long idle inside a transaction, PostgreSQL ends a writer's session (and so
/// releases the log head lock), by default, in milliseconds.
pub const IDLE_IN_TRANSACTION_TIMEOUT_MILLIS_DEFAULT: u64 = 10_000;
/// The longest one statement of the writer may run, by default, in milliseconds.
pub const STATEMENT_TIMEOUT_MILLIS_DEFAULT: u64 = 30_000;

/// A hook the writer awaits just before each `COMMIT` (tests only, see
/// [`Options::before_commit`]). It may take its time (the transaction stays open, holding the
/// log head lock); an `Err` rolls the group back, as a failed commit would.
pub type CommitHook = Arc<
    dyn Fn(CommitAttempt) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync,
>;

/// What a commit is about to write, as told to a [`CommitHook`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommitAttempt {
    /// 1 for the first commit attempt of this handle's writer, then 2, 3 …
    pub number: u64,
    /// How many appends the group holds (refused ones included).
    pub appends: usize,
    /// The positions the group's events take if it commits (empty when it writes none).
    pub positions: (Position, Position),
}

/// How to connect a [`PostgresStore`]. `Options::default()` is what production uses; change
/// fields on it.
#[derive(Clone)]
#[non_exhaustive]
pub struct Options {
    /// The schema that holds the store's tables ([`SCHEMA_DEFAULT`]). Several stores can share
    /// one database, each in its own schema.
    pub schema: String,
    /// Pooled connections for reads ([`READ_CONNECTIONS_DEFAULT`], at least 1). The writer
    /// (`writer_connections`), the head listener and each [`Leadership`] use dedicated
    /// connections besides.
    pub read_connections: usize,
    /// Connections of the writer ([`WRITER_CONNECTIONS_DEFAULT`], at least 1). Groups from one
    /// handle may commit in either order when several are in flight; appends that are not
    /// concurrent (one awaited before the next is sent) keep their order.
    pub writer_connections: usize,
    /// The most events one group commit writes ([`GROUP_EVENTS_MAX`]).
    pub group_events_max: usize,
    /// The most event data one group commit writes, in bytes ([`GROUP_BYTES_MAX`]).
    pub group_bytes_max: usize,
    /// How many appends may wait for the writer ([`QUEUE_APPENDS_MAX`]).
    pub queue_appends_max: usize,
    /// The fallback poll of the head ([`HEAD_POLL_INTERVAL_MILLIS_DEFAULT`]).
    pub head_poll_interval: Duration,
    /// `lock_timeout` of the writer's session ([`LOCK_TIMEOUT_MILLIS_DEFAULT`]).
    pub lock_timeout: Duration,
    /// `idle_in_transaction_session_timeout` of the writer's session
    /// ([`IDLE_IN_TRANSACTION_TIMEOUT_MILLIS_DEFAULT`]).
    pub idle_in_transaction_timeout: Duration,
    /// `statement_timeout` of the writer's session ([`STATEMENT_TIMEOUT_MILLIS_DEFAULT`]).
    pub statement_timeout: Duration,
    /// How long a [`LeaderElection`] (and so [`headwater_store::Leadership::lead`]) waits
    /// between tries while another replica leads ([`RETRY_INTERVAL_MILLIS_DEFAULT`]).
    pub leader_retry_interval: Duration,
    /// How often a leader checks that it still holds its lock
    /// ([`HEALTH_CHECK_INTERVAL_MILLIS_DEFAULT`]): how late, at most plus the timeout, a
    /// leader learns it lost the lock.
    pub leader_health_check_interval: Duration,
    /// How long one such check may take ([`HEALTH_CHECK_TIMEOUT_MILLIS_DEFAULT`]).
    pub leader_health_check_timeout: Duration,
    /// **For tests**: awaited before each commit; an `Err` rolls the group back.
    pub before_commit: Option<CommitHook>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            schema: SCHEMA_DEFAULT.to_owned(),
            read_connections: READ_CONNECTIONS_DEFAULT,
            writer_connections: WRITER_CONNECTIONS_DEFAULT,
            group_events_max: GROUP_EVENTS_MAX,
            group_bytes_max: GROUP_BYTES_MAX,
            queue_appends_max: QUEUE_APPENDS_MAX,
            head_poll_interval: Duration::from_millis(HEAD_POLL_INTERVAL_MILLIS_DEFAULT),
            lock_timeout: Duration::from_millis(LOCK_TIMEOUT_MILLIS_DEFAULT),
            idle_in_transaction_timeout: Duration::from_millis(
                IDLE_IN_TRANSACTION_TIMEOUT_MILLIS_DEFAULT,
            ),
            statement_timeout: Duration::from_millis(STATEMENT_TIMEOUT_MILLIS_DEFAULT),
            leader_retry_interval: Duration::from_millis(RETRY_INTERVAL_MILLIS_DEFAULT),
            leader_health_check_interval: Duration::from_millis(
                HEALTH_CHECK_INTERVAL_MILLIS_DEFAULT,
            ),
            leader_health_check_timeout: Duration::from_millis(HEALTH_CHECK_TIMEOUT_MILLIS_DEFAULT),
            before_commit: None,
        }
    }
}

impl Options {
    /// The default options with another schema.
    pub fn with_schema(schema: impl Into<String>) -> Options {
        Options {
            schema: schema.into(),
            ..Options::default()
        }
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("schema", &self.schema)
            .field("read_connections", &self.read_connections)
            .field("writer_connections", &self.writer_connections)
            .field("group_events_max", &self.group_events_max)
            .field("group_bytes_max", &self.group_bytes_max)
            .field("queue_appends_max", &self.queue_appends_max)
            .field("head_poll_interval", &self.head_poll_interval)
            .field("lock_timeout", &self.lock_timeout)
            .field(
                "idle_in_transaction_timeout",
                &self.idle_in_transaction_timeout,
            )
            .field("statement_timeout", &self.statement_timeout)
            .field("leader_retry_interval", &self.leader_retry_interval)
            .field(
                "leader_health_check_interval",
                &self.leader_health_check_interval,
            )
            .field(
                "leader_health_check_timeout",
                &self.leader_health_check_timeout,
            )
            .field("before_commit", &self.before_commit.as_ref().map(|_| "…"))
            .finish()
    }
}

/// Why a store could not be connected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The URL is not a PostgreSQL connection string.
    #[error("invalid PostgreSQL URL: {}", detail(.0))]
    InvalidUrl(#[source] tokio_postgres::Error),
    /// The schema name breaks the rules of [`Options::schema`].
    #[error(
        "invalid schema name {0:?}: use lower-case ASCII letters, digits and _, at most {max} bytes, not starting with a digit or pg_",
        max = SCHEMA_NAME_BYTES_MAX
    )]
    InvalidSchema(String),
    /// The server could not be reached or refused the connection.
    #[error("cannot connect to PostgreSQL: {}", detail(.0))]
    Connect(#[source] tokio_postgres::Error),
    /// Creating or migrating the schema failed.
    #[error("cannot create or migrate the store's schema: {}", detail(.0))]
    Migrate(#[source] tokio_postgres::Error),
    /// The schema was migrated by a newer build: this one does not know its format.
    #[error("the store's schema is at version {found}, newer than this build knows ({known})")]
    NewerSchema { found: i32, known: i32 },
    /// The schema holds no store (for the read-only tools, which create nothing).
    #[error("schema {schema:?} holds no Headwater store")]
    NoStore { schema: String },
    /// The server is older than PostgreSQL 15.
    #[error("PostgreSQL {found} is too old: 15 or newer is needed")]
    ServerTooOld { found: String },
}

/// The connection settings shared by every connection of one store.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub(crate) config: tokio_postgres::Config,
    pub(crate) schema: String,
    pub(crate) sql: Arc<Sql>,
}

impl Target {
    /// Opens one dedicated connection; its driver runs on a task that ends with the client.
    pub(crate) async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = self.config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "PostgreSQL connection ended");
            }
        });
        Ok(client)
    }
}

/// An [`EventStore`] on PostgreSQL. Clones share one writer, one pool and one head watch.
///
/// # Durability
/// An append returns `Ok` after its transaction committed with `synchronous_commit = on`
/// (set on the writer's session whatever the server's default): PostgreSQL flushed its WAL. With
/// a synchronous standby configured, the commit also waited for it.
#[derive(Clone, Debug)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    target: Target,
    pool: Pool,
    queue: mpsc::Sender<Request>,
    head: Arc<watch::Sender<Position>>,
    tasks: Vec<JoinHandle<()>>,
    /// The feeds' head watches and row ids ([`PgFeedStore`]).
    feeds: Arc<feed::FeedShared>,
    /// What opens a feed commit's transaction: `BEGIN` and the writer's session settings, for
    /// this transaction only (feed commits run on pooled connections).
    feed_begin: String,
    /// The leader elections' settings: (retry interval, health check interval, its timeout).
    leader_timing: (Duration, Duration, Duration),
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The writer ends by itself once the queue's last sender (ours) is gone.
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`), creates or migrates
    /// the store's schema, and starts the writer and the head listener.
    ///
    /// Must be called within a Tokio runtime. TLS is not supported yet: connect over loopback or
    /// a private network.
    ///
    /// # Cancel safety
    /// Cancel safe: a migration interrupted midway is rolled back by PostgreSQL (each runs in a
    /// transaction) and applied again by the next `connect`.
    pub async fn connect(url: &str, options: Options) -> Result<PostgresStore, ConnectError> {
        let config: tokio_postgres::Config = url.parse().map_err(ConnectError::InvalidUrl)?;
        PostgresStore::connect_with(config, options).await
    }

    /// Like [`PostgresStore::connect`], with a parsed configuration.
    ///
    /// # Cancel safety
    /// As [`PostgresStore::connect`].
    pub async fn connect_with(
        mut config: tokio_postgres::Config,
        options: Options,
    ) -> Result<PostgresStore, ConnectError> {
        if !schema::valid_schema_name(&options.schema) {
            return Err(ConnectError::InvalidSchema(options.schema));
        }
        if config.get_application_name().is_none() {
            config.application_name("headwater");
        }
        let target = Target {
            config,
            schema: options.schema.clone(),
            sql: Arc::new(Sql::new(&options.schema)),
        };
        let admin = target.connect().await.map_err(ConnectError::Connect)?;
        check_server_version(&admin).await?;
        schema::migrate(&admin, &options.schema).await?;
        let row = admin
            .query_one(target.sql.read_head.as_str(), &[])
            .await
            .map_err(ConnectError::Connect)?;
        let feeds = Arc::new(feed::FeedShared::default());
        feeds.preload(
            &admin
                .query(target.sql.feeds.heads.as_str(), &[])
                .await
                .map_err(ConnectError::Connect)?,
        );
        drop(admin);
        let head_now = Position(reader::to_u64(row.get::<_, i64>(0)).unwrap_or(0));

        let manager = Manager::from_config(
            target.config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.read_connections.max(1))
            .build()
            .expect("a pool without timeouts needs no runtime setting");

        let millis = |d: Duration| d.as_millis().max(1);
        let feed_begin = format!(
            "BEGIN ISOLATION LEVEL READ COMMITTED;
             SET LOCAL synchronous_commit = on;
             SET LOCAL lock_timeout = {};
             SET LOCAL idle_in_transaction_session_timeout = {};
             SET LOCAL statement_timeout = {};",
            millis(options.lock_timeout),
            millis(options.idle_in_transaction_timeout),
            millis(options.statement_timeout),
        );
        let (head_tx, _) = watch::channel(head_now);
        let head = Arc::new(head_tx);
        let (queue, requests) = mpsc::channel(options.queue_appends_max.max(1));
        let writer = writer::Writer::new(target.clone(), head.clone(), &options);
        let mut tasks = Vec::new();
        // The writer is not aborted on drop: it ends when the queue closes, after answering
        // what it took.
        tokio::spawn(writer.run(requests));
        tasks.push(tokio::spawn(head::follow(
            target.clone(),
            head.clone(),
            feeds.clone(),
            options.head_poll_interval,
        )));
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                target,
                pool,
                queue,
                head,
                tasks,
                feeds,
                feed_begin,
                leader_timing: (
                    options.leader_retry_interval,
                    options.leader_health_check_interval,
                    options.leader_health_check_timeout,
                ),
            }),
        })
    }

    /// The schema this store lives in.
    pub fn schema(&self) -> &str {
        &self.inner.target.schema
    }

    /// A leader election among the replicas of this store, for the follower `name` (see
    /// [`LeaderElection`]), with the timing of [`Options`] (`leader_*`).
    pub fn leader_election(&self, name: &str) -> LeaderElection {
        let mut election = LeaderElection::new(self.inner.target.clone(), name);
        let (retry, check, timeout) = self.inner.leader_timing;
        election.retry_interval = retry;
        election.health_check_interval = check;
        election.health_check_timeout = timeout;
        election
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, ReadError> {
        self.inner.pool.get().await.map_err(ReadError::backend)
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, ReadError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(|e| ReadError::backend(PgError(e)))?;
        client
            .query(&statement, params)
            .await
            .map_err(|e| ReadError::backend(PgError(e)))
    }
}

async fn check_server_version(client: &tokio_postgres::Client) -> Result<(), ConnectError> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(ConnectError::Connect)?;
    let version: i32 = row.get(0);
    if version < 150_000 {
        return Err(ConnectError::ServerTooOld {
            found: format!("{}.{}", version / 10_000, version % 10_000),
        });
    }
    Ok(())
}

fn page_bytes_max() -> i64 {
    i64::try_from(READ_PAGE_BYTES_MAX).expect("the page byte limit fits in i64")
}

#[async_trait]
impl EventStore for PostgresStore {
    /// # Durability
    /// On `Ok`, the group transaction holding the append committed with `synchronous_commit =
    /// on`.
    ///
    /// # Cancel safety
    /// Dropping the future after it was first polled may still append the events (the writer
    /// has them): retry the same append to learn the outcome (G3).
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, AppendError> {
        validate_append(expected, &events)?;
        let (reply, answer) = oneshot::channel();
        let request = Request {
            stream: stream.clone(),
            expected,
            events,
            reply,
        };
        self.inner
            .queue
            .send(request)
            .await
            .map_err(|_| AppendError::Closed)?;
        answer.await.map_err(|_| AppendError::Closed)?
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        after: StreamVersion,
        limit: u64,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        let limit = reader::to_i64(validate_limit(limit)?);
        let after = reader::to_i64(after.0);
        let rows = self
            .query(
                &self.inner.target.sql.read_stream,
                &[&stream.as_str(), &after, &limit, &page_bytes_max()],
            )
            .await?;
        rows.iter().map(reader::event_from_row).collect()
    }

    async fn read_all(&self, after: Position, limit: u64) -> Result<Vec<RecordedEvent>, ReadError> {
        let limit = reader::to_i64(validate_limit(limit)?);
        let after = reader::to_i64(after.0);
        let rows = self
            .query(
                &self.inner.target.sql.read_all,
                &[&after, &limit, &page_bytes_max()],
            )
            .await?;
        rows.iter().map(reader::event_from_row).collect()
    }

    async fn stream_head(&self, stream: &StreamName) -> Result<Option<StreamVersion>, ReadError> {
        let rows = self
            .query(&self.inner.target.sql.stream_head, &[&stream.as_str()])
            .await?;
        match rows.first() {
            None => Ok(None),
            Some(row) => {
                let head: i64 = row.get(0);
                reader::to_u64(head)
                    .map(|v| Some(StreamVersion(v)))
                    .ok_or_else(|| ReadError::Corrupt {
                        position: Position::START,
                        detail: format!("stream {stream} has head {head}"),
                    })
            }
        }
    }

    async fn find_event(&self, event_id: EventId) -> Result<Option<RecordedEvent>, ReadError> {
        let rows = self
            .query(&self.inner.target.sql.find_event, &[event_id.as_uuid()])
            .await?;
        rows.first().map(reader::event_from_row).transpose()
    }

    fn head_position(&self) -> Position {
        *self.inner.head.borrow()
    }

    fn watch_head(&self) -> watch::Receiver<Position> {
        self.inner.head.subscribe()
    }
}

/// A PostgreSQL error with the server's message in its `Display` (tokio-postgres shows only
/// "db error" for errors the server reported).
#[derive(Debug)]
pub(crate) struct PgError(pub(crate) tokio_postgres::Error);

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&detail(&self.0))
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// The message of a PostgreSQL error, the server's own when it reported one.
pub(crate) fn detail(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db),
        None => error.to_string(),
    }
}

/// Moves a head watch forward to `position` (never back).
pub(crate) fn advance(head: &watch::Sender<Position>, position: Position) {
    head.send_if_modified(|current| {
        let moved = position > *current;
        if moved {
            *current = position;
        }
        moved
    });
}
