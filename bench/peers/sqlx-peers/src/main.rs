//! `headwater-peers-sqlx`: the peers of the benchmark under its workloads, run by
//! `headwater-peers` once per peer. Prints the figures as one line of JSON on stdout; progress
//! on stderr.
//!
//! - `cqrs-postgres`: cqrs-es 0.5 with postgres-es 0.5, through cqrs-es's `EventStore::commit`
//!   (the append a `CqrsFramework` makes after handling a command, without the load before it);
//! - `cqrs-sqlite`: the same with sqlite-es 0.5, in WAL mode with `synchronous=FULL`;
//! - `disintegrate`: disintegrate 4.0 with disintegrate-postgres 4.0.1, through its
//!   `EventStore::append` (SERIALIZABLE, a concurrency check by query), retried on conflicts.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::{EventStoreAggregateContext, PersistedEventRepository, PersistedEventStore};
use cqrs_es::{Aggregate, AggregateError, DomainEvent, EventStore as _};
use disintegrate::serde::json::Json;
use disintegrate::{EventStore as _, StreamItem};
use disintegrate_postgres::PgEventStore;
use futures::StreamExt as _;
use headwater_peers_harness::{self as harness, Deposit, Figures, Plan, Subject};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection as _, Executor as _, PgConnection};

#[derive(Debug, Parser)]
#[command(about = "The peers of `headwater-peers` (run by it, one peer at a time)")]
struct Args {
    /// The peer to measure.
    #[arg(long, value_enum)]
    peer: Peer,
    /// The PostgreSQL server (`postgres://USER@HOST:PORT/DB`); each peer runs in a fresh
    /// database, dropped at its end.
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
    /// Where the SQLite peer puts its database (a fresh directory inside DIR).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The plan, as JSON (written by `headwater-peers`).
    #[arg(long, value_name = "JSON")]
    plan: String,
    /// Connections of the peer's sqlx pool.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pool: u32,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Peer {
    CqrsPostgres,
    CqrsSqlite,
    Disintegrate,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let plan: Plan = serde_json::from_str(&args.plan).context("--plan is not a plan")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let figures = runtime.block_on(async {
        match args.peer {
            Peer::CqrsPostgres => cqrs_postgres(&args, &plan).await,
            Peer::CqrsSqlite => cqrs_sqlite(&args, &plan).await,
            Peer::Disintegrate => disintegrate(&args, &plan).await,
        }
    })?;
    println!("{}", serde_json::to_string(&figures)?);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// cqrs-es

/// The aggregate: an account that counts its deposits.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Account {
    deposits: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum AccountEvent {
    Deposited(Deposit),
}

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> String {
        harness::EVENT_TYPE.to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

#[derive(Debug)]
struct Never;

impl std::fmt::Display for Never {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("never")
    }
}

impl std::error::Error for Never {}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Command = ();
    type Event = AccountEvent;
    type Error = Never;
    type Services = ();

    async fn handle(
        &mut self,
        _command: (),
        _services: &(),
        _sink: &EventSink<Self>,
    ) -> Result<(), Never> {
        Ok(())
    }

    fn apply(&mut self, _event: AccountEvent) {
        self.deposits += 1;
    }
}

struct Cqrs<R: PersistedEventRepository> {
    store: PersistedEventStore<R, Account>,
}

#[derive(Debug)]
struct CqrsWriter {
    aggregate_id: String,
    sequence: usize,
}

impl<R: PersistedEventRepository + 'static> Subject for Cqrs<R> {
    type Writer = CqrsWriter;

    fn writer(&self, n: u64) -> CqrsWriter {
        CqrsWriter {
            aggregate_id: harness::account_id(n),
            sequence: 0,
        }
    }

    async fn append(&self, writer: &mut CqrsWriter, events: Vec<Deposit>) -> anyhow::Result<u64> {
        let mut conflicts = 0;
        let metadata: HashMap<String, String> = events
            .first()
            .map(|d| {
                let id = d.command_id.to_string();
                HashMap::from([
                    ("correlation_id".to_owned(), id.clone()),
                    ("causation_id".to_owned(), id),
                ])
            })
            .unwrap_or_default();
        let events: Vec<AccountEvent> = events.into_iter().map(AccountEvent::Deposited).collect();
        let count = events.len();
        loop {
            // What `CqrsFramework::execute` hands to `commit` after loading the aggregate.
            let context = EventStoreAggregateContext {
                aggregate_id: writer.aggregate_id.clone(),
                aggregate: Account::default(),
                current_sequence: writer.sequence,
                current_snapshot: None,
            };
            match self
                .store
                .commit(events.clone(), context, metadata.clone())
                .await
            {
                Ok(_) => {
                    writer.sequence += count;
                    return Ok(conflicts);
                }
                Err(error) if retryable_cqrs(&error) => conflicts += 1,
                Err(error) => return Err(anyhow::anyhow!("cqrs-es commit: {error}")),
            }
        }
    }

    async fn read_stream(&self, writer: &CqrsWriter) -> anyhow::Result<Option<u64>> {
        let events = self
            .store
            .load_events(&writer.aggregate_id)
            .await
            .map_err(|error| anyhow::anyhow!("cqrs-es load_events: {error}"))?;
        Ok(Some(events.len() as u64))
    }
}

/// SQLite's "database is locked" under concurrent writers (the pool's busy timeout passed).
fn retryable_cqrs(error: &AggregateError<Never>) -> bool {
    match error {
        AggregateError::DatabaseConnectionError(e) | AggregateError::UnexpectedError(e) => {
            harness::is_retryable(None, &e.to_string())
        }
        _ => false,
    }
}

const CQRS_EVENTS_TABLE: &str = "CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json                                 NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);";

const SQLITE_EVENTS_TABLE: &str = "CREATE TABLE events
(
  aggregate_type text                          NOT NULL,
  aggregate_id   text                          NOT NULL,
  sequence       integer CHECK (sequence >= 0) NOT NULL,
  event_type     text                          NOT NULL,
  event_version  text                          NOT NULL,
  payload        text                          NOT NULL,
  metadata       text                          NOT NULL,
  PRIMARY KEY (aggregate_type, aggregate_id, sequence)
) STRICT;
CREATE TABLE snapshots
(
  aggregate_type   text                                  NOT NULL,
  aggregate_id     text                                  NOT NULL,
  last_sequence    integer CHECK (last_sequence >= 0)    NOT NULL,
  current_snapshot integer CHECK (current_snapshot >= 0) NOT NULL,
  payload          text                                  NOT NULL,
  PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
) STRICT;";

async fn cqrs_postgres(args: &Args, plan: &Plan) -> anyhow::Result<Figures> {
    let url = args
        .postgres
        .as_deref()
        .context("cqrs-postgres needs --postgres URL")?;
    let database = FreshDatabase::create(url, "peers_cqrs").await?;
    let result = async {
        let pool = PgPoolOptions::new()
            .max_connections(args.pool)
            .connect(&database.url)
            .await
            .context("cannot connect to the fresh database")?;
        sqlx::raw_sql(CQRS_EVENTS_TABLE)
            .execute(&pool)
            .await
            .context("cannot create postgres-es's tables")?;
        let repo = postgres_es::PostgresEventRepository::new(pool.clone());
        let subject = Cqrs {
            store: PersistedEventStore::new_event_store(repo),
        };
        let mut figures = harness::run(subject, plan, "cqrs-es/postgres-es").await?;
        figures.notes.push(format!(
            "cqrs-es 0.5.0 + postgres-es 0.5.0 (sqlx 0.8, pool of {} connections): appends through `PersistedEventStore::commit` (one transaction, one INSERT per event); the stream read is `load_events`.",
            args.pool
        ));
        pool.close().await;
        Ok(figures)
    }
    .await;
    database.drop_database().await;
    result
}

async fn cqrs_sqlite(args: &Args, plan: &Plan) -> anyhow::Result<Figures> {
    let dir = tempfile_dir(&args.dir, "peers-sqlite-es")?;
    let path = dir.join("events.db");
    // sqlite-es's `default_sqlite_pool`, but with synchronous=FULL instead of NORMAL: NORMAL
    // does not fsync each commit in WAL mode, so an acknowledged append could be lost on power
    // loss. FULL makes it durable, as Headwater's appends are.
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
        .context("the SQLite path")?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(args.pool)
        .connect_with(options)
        .await
        .context("cannot open the SQLite database")?;
    sqlx::raw_sql(SQLITE_EVENTS_TABLE)
        .execute(&pool)
        .await
        .context("cannot create sqlite-es's tables")?;
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&pool)
        .await
        .context("PRAGMA synchronous")?;
    anyhow::ensure!(
        synchronous == 2,
        "PRAGMA synchronous is {synchronous}, not FULL (2)"
    );
    let repo = sqlite_es::SqliteEventRepository::new(pool.clone());
    let subject = Cqrs {
        store: PersistedEventStore::new_event_store(repo),
    };
    let mut figures = harness::run(subject, plan, "cqrs-es/sqlite-es").await?;
    figures.notes.push(format!(
        "cqrs-es 0.5.0 + sqlite-es 0.5.0 (sqlx 0.8, pool of {} connections), WAL with `PRAGMA synchronous=FULL` set by the benchmark (sqlite-es's `default_sqlite_pool` sets NORMAL, which does not fsync each commit: not durable).",
        args.pool
    ));
    pool.close().await;
    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    Ok(figures)
}

fn tempfile_dir(parent: &std::path::Path, prefix: &str) -> anyhow::Result<PathBuf> {
    let dir = parent.join(format!("{prefix}-{:016x}", rand_u64()));
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

fn rand_u64() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

// ---------------------------------------------------------------------------------------------
// disintegrate

#[derive(Debug, Clone, PartialEq, Eq, disintegrate::Event, Serialize, Deserialize)]
#[stream(AccountStream, [Deposited])]
enum BankEvent {
    Deposited {
        #[id]
        account_id: String,
        amount_cents: u64,
        currency: String,
        command_id: uuid::Uuid,
        channel: String,
        reference: String,
    },
}

impl From<Deposit> for BankEvent {
    fn from(d: Deposit) -> BankEvent {
        BankEvent::Deposited {
            account_id: d.account_id,
            amount_cents: d.amount_cents,
            currency: d.currency,
            command_id: d.command_id,
            channel: d.channel,
            reference: d.reference,
        }
    }
}

/// disintegrate-postgres 4.0.1's schema (its `Migrator::init_event_store`), with the one hex
/// literal of `event_store_begin_epoch` (`0xFFFFFFFF`, PostgreSQL 16 syntax) written in decimal
/// so that it runs on PostgreSQL 15, and the `account_id` domain-id column and index the
/// migrator adds for `BankEvent`.
const DISINTEGRATE_SCHEMA: &str = r#"
CREATE SEQUENCE IF NOT EXISTS seq_event_event_id;
CREATE TABLE IF NOT EXISTS event (
    event_id BIGINT PRIMARY KEY DEFAULT nextval('seq_event_event_id'),
    event_type VARCHAR(255),
    payload BYTEA,
    inserted_at TIMESTAMP DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_event_type_btree ON event(event_type);
CREATE OR REPLACE FUNCTION event_store_current_epoch()
RETURNS BIGINT AS $$
DECLARE
    persisted_event_id BIGINT;
    pending_event_id BIGINT;
    db_id INT;
BEGIN
    SELECT COALESCE(MAX(event_id), 0) INTO persisted_event_id FROM event;
    SELECT oid INTO db_id FROM pg_database WHERE datname = current_database();

    SELECT MIN((l3.objid::bigint << 32) + l2.objid::bigint)
    INTO pending_event_id
    FROM pg_locks l1
    INNER JOIN pg_locks l2 ON l1.pid = l2.pid
    INNER JOIN pg_locks l3 ON l1.pid = l3.pid
    WHERE
        l1.classid = db_id
        AND l2.classid = 1
        AND l3.classid = 2
        AND l1.locktype = 'advisory';

    RETURN LEAST(COALESCE(pending_event_id, persisted_event_id), persisted_event_id);
END;
$$ LANGUAGE plpgsql;
CREATE OR REPLACE FUNCTION event_store_begin_epoch()
RETURNS void AS $$
DECLARE
    id BIGINT;
    db_id INT;
BEGIN
    SELECT last_value INTO id FROM seq_event_event_id;
    SELECT oid INTO db_id FROM pg_database WHERE datname = current_database();

    PERFORM pg_try_advisory_xact_lock_shared(db_id, 0);
    PERFORM pg_try_advisory_xact_lock_shared(1, (id & 4294967295)::bit(32)::integer);
    PERFORM pg_try_advisory_xact_lock_shared(2, (id >> 32)::bit(32)::integer);
END;
$$ LANGUAGE plpgsql;
ALTER TABLE event ADD COLUMN IF NOT EXISTS account_id TEXT;
CREATE INDEX IF NOT EXISTS idx_event_account_id ON event (account_id) WHERE account_id IS NOT NULL;
"#;

struct Disintegrate {
    store: PgEventStore<BankEvent, Json<BankEvent>>,
}

#[derive(Debug)]
struct DisintegrateWriter {
    account_id: String,
    /// The id of the last event of the stream this writer saw (0: none).
    version: i64,
}

impl Subject for Disintegrate {
    type Writer = DisintegrateWriter;

    fn writer(&self, n: u64) -> DisintegrateWriter {
        DisintegrateWriter {
            account_id: harness::account_id(n),
            version: 0,
        }
    }

    async fn append(
        &self,
        writer: &mut DisintegrateWriter,
        events: Vec<Deposit>,
    ) -> anyhow::Result<u64> {
        let events: Vec<BankEvent> = events.into_iter().map(BankEvent::from).collect();
        let mut conflicts = 0;
        loop {
            let account_id = writer.account_id.clone();
            let query = disintegrate::query!(BankEvent; account_id == account_id);
            match self
                .store
                .append(events.clone(), query, writer.version)
                .await
            {
                Ok(persisted) => {
                    if let Some(last) = persisted.last() {
                        writer.version = last.id();
                    }
                    return Ok(conflicts);
                }
                // Each writer has its own stream, so every conflict is a false one: a
                // serialization failure of the SERIALIZABLE transaction (or its concurrency
                // check) caused by another stream's append. The caller retries, as a
                // disintegrate `DecisionMaker` would.
                Err(disintegrate_postgres::Error::Concurrency) => conflicts += 1,
                Err(disintegrate_postgres::Error::Database(sqlx::Error::Database(e)))
                    if harness::is_retryable(e.code().as_deref(), e.message()) =>
                {
                    conflicts += 1;
                }
                Err(error) => return Err(anyhow::anyhow!("disintegrate append: {error}")),
            }
        }
    }

    async fn read_stream(&self, writer: &DisintegrateWriter) -> anyhow::Result<Option<u64>> {
        let account_id = writer.account_id.clone();
        let query = disintegrate::query!(BankEvent; account_id == account_id);
        let mut stream = self.store.stream(&query);
        let mut events = 0u64;
        while let Some(item) = stream.next().await {
            match item.map_err(|e| anyhow::anyhow!("disintegrate stream: {e}"))? {
                StreamItem::Event(_) => events += 1,
                StreamItem::End(_) => break,
            }
        }
        Ok(Some(events))
    }
}

async fn disintegrate(args: &Args, plan: &Plan) -> anyhow::Result<Figures> {
    let url = args
        .postgres
        .as_deref()
        .context("disintegrate needs --postgres URL")?;
    let database = FreshDatabase::create(url, "peers_disintegrate").await?;
    let result = async {
        let pool = PgPoolOptions::new()
            .max_connections(args.pool)
            .connect(&database.url)
            .await
            .context("cannot connect to the fresh database")?;
        sqlx::raw_sql(DISINTEGRATE_SCHEMA)
            .execute(&pool)
            .await
            .context("cannot create disintegrate-postgres's schema")?;
        let store = PgEventStore::new_uninitialized(pool.clone(), Json::<BankEvent>::default());
        let mut figures = harness::run(Disintegrate { store }, plan, "disintegrate").await?;
        figures.notes.push(format!(
            "disintegrate 4.0.0 + disintegrate-postgres 4.0.1 (sqlx 0.8, pool of {} connections) on PostgreSQL 15: schema created by the benchmark (the migrator's `0xFFFFFFFF` needs PostgreSQL 16; written in decimal), store opened with `new_uninitialized`. Appends run SERIALIZABLE: the conflicts between writers on distinct streams are retried and counted beside the figure.",
            args.pool
        ));
        pool.close().await;
        Ok(figures)
    }
    .await;
    database.drop_database().await;
    result
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/// A database of its own for one peer, created on the server of `--postgres`.
struct FreshDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl FreshDatabase {
    async fn create(admin_url: &str, prefix: &str) -> anyhow::Result<FreshDatabase> {
        let name = harness::fresh_database_name(prefix);
        let mut admin = PgConnection::connect(admin_url)
            .await
            .context("cannot connect to PostgreSQL (--postgres)")?;
        // The name is ours: a constant prefix and hex digits, no quoting needed.
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .with_context(|| format!("CREATE DATABASE {name}"))?;
        admin.close().await.ok();
        Ok(FreshDatabase {
            admin_url: admin_url.to_owned(),
            url: harness::with_database(admin_url, &name),
            name,
        })
    }

    async fn drop_database(self) {
        let result = async {
            let mut admin = PgConnection::connect(&self.admin_url).await?;
            admin
                .execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str())
                .await?;
            admin.close().await
        }
        .await;
        if let Err(error) = result {
            eprintln!("could not drop the database {}: {error}", self.name);
        }
    }
}
