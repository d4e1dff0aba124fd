//! The writer: one task per store handle (by default one connection, see
//! `Options::writer_connections`) commits appends in groups.
//!
//! Each turn it takes the first waiting append, drains whatever else is queued (up to the group
//! limits) and runs one READ COMMITTED transaction for the whole group:
//!
//! 1. The fast path, in one flight: `BEGIN`, `SELECT append_group(…)` and (unless a test's
//!    commit hook must run first) `COMMIT`. The function (`schema::APPEND_GROUP`) takes the row
//!    lock of `log_head` — the store's serialisation point, held until the commit, so the group
//!    transactions of all processes commit one at a time in the order in which they allocated
//!    positions (a waiter is woken only after the holder's commit became visible: PostgreSQL
//!    releases a transaction's locks after `ProcArrayEndTransaction`) — then decides every
//!    append on the streams' heads (the group's earlier appends included) and writes them all.
//! 2. When an expectation fails (`HW409`) or an event id is already recorded (the unique
//!    violation of `events_event_id_key`), the transaction wrote nothing; the group is decided
//!    again append by append in a new transaction under the same lock, with
//!    `MemoryStore::append`'s rules and order (G3 replay, duplicate, conflict), each append on
//!    the state that includes the earlier ones.
//! 3. After `COMMIT` (with `synchronous_commit = on`): the answers and the head watch.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use headwater_core::{ExpectedVersion, NewEvent, Position, StreamName, StreamVersion};
use headwater_store::{AppendError, AppendOutcome};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use crate::reader::{to_i64, to_u64};
use crate::{CommitAttempt, CommitHook, Options, Target, advance};

/// Every group transaction runs in READ COMMITTED, whatever the session's default: the
/// statements after the log head lock must each see a fresh snapshot (module docs).
const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// One append waiting for the writer. Its input was validated before it was queued.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) stream: StreamName,
    pub(crate) expected: ExpectedVersion,
    pub(crate) events: Vec<NewEvent>,
    pub(crate) reply: oneshot::Sender<Result<AppendOutcome, AppendError>>,
}

/// Why a group's transaction failed. Every append of the group is answered with it; none of
/// them was written (or, when the connection broke during `COMMIT`, the caller cannot know:
/// a retry of the same append tells, G3).
#[derive(Debug)]
enum GroupError {
    Postgres(tokio_postgres::Error),
    /// The commit hook of [`Options::before_commit`] (tests) rolled the group back.
    Injected(String),
    /// A stored row the writer needed is damaged.
    Corrupt(String),
}

impl fmt::Display for GroupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupError::Postgres(e) => {
                write!(f, "the write transaction failed: {}", crate::detail(e))
            }
            GroupError::Injected(e) => write!(f, "the commit was rolled back: {e}"),
            GroupError::Corrupt(detail) => write!(f, "the store is corrupt: {detail}"),
        }
    }
}

impl StdError for GroupError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            GroupError::Postgres(e) => Some(e),
            GroupError::Injected(_) | GroupError::Corrupt(_) => None,
        }
    }
}

impl From<tokio_postgres::Error> for GroupError {
    fn from(e: tokio_postgres::Error) -> GroupError {
        GroupError::Postgres(e)
    }
}

/// The failure of a group commit, shared by every append of the group.
#[derive(Debug, Clone)]
struct CommitFailed(Arc<GroupError>);

impl fmt::Display for CommitFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl StdError for CommitFailed {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}

/// What an append decided inside a group: its answer if the group commits.
type Decision = Result<AppendOutcome, AppendError>;

/// The writer's connection and its prepared statements.
struct Connection {
    client: Client,
    lock_head: Statement,
    set_head: Statement,
    append_group: Statement,
    stream_head: Statement,
    insert_events_or_skip: Statement,
    upsert_streams: Statement,
    delete_from: Statement,
    find_id: Statement,
    find_ids: Statement,
    stream_run: Statement,
}

/// One of the writer's connections, with what it needs to commit groups.
#[derive(Clone)]
pub(crate) struct Writer {
    target: Target,
    conn: Option<Arc<Connection>>,
    head: Arc<watch::Sender<Position>>,
    group_events_max: usize,
    group_bytes_max: usize,
    session: Arc<str>,
    before_commit: Option<CommitHook>,
    /// Commit attempts of all the writer's connections (for [`CommitAttempt::number`]).
    commits: Arc<AtomicU64>,
    connections: usize,
}

impl Writer {
    pub(crate) fn new(
        target: Target,
        head: Arc<watch::Sender<Position>>,
        options: &Options,
    ) -> Writer {
        let millis = |d: Duration| d.as_millis().max(1);
        let session = format!(
            "SET synchronous_commit = on;
             SET lock_timeout = {};
             SET idle_in_transaction_session_timeout = {};
             SET statement_timeout = {};",
            millis(options.lock_timeout),
            millis(options.idle_in_transaction_timeout),
            millis(options.statement_timeout),
        );
        Writer {
            target,
            conn: None,
            head,
            group_events_max: options.group_events_max.max(1),
            group_bytes_max: options.group_bytes_max.max(1),
            session: session.into(),
            before_commit: options.before_commit.clone(),
            commits: Arc::new(AtomicU64::new(0)),
            connections: options.writer_connections.max(1),
        }
    }

    /// Serves appends until every sender is gone, on `connections` connections: each takes the
    /// next group from the queue while the others commit theirs, so that the next group waits
    /// at the server for the log head lock instead of in this process.
    pub(crate) async fn run(self, queue: mpsc::Receiver<Request>) {
        let queue = Arc::new(tokio::sync::Mutex::new(queue));
        let mut workers = Vec::new();
        for _ in 1..self.connections {
            workers.push(tokio::spawn(self.clone().work(queue.clone())));
        }
        self.work(queue).await;
        for worker in workers {
            let _ = worker.await;
        }
    }

    async fn work(mut self, queue: Arc<tokio::sync::Mutex<mpsc::Receiver<Request>>>) {
        let mut group = Vec::new();
        loop {
            {
                let mut queue = queue.lock().await;
                let Some(first) = queue.recv().await else {
                    return;
                };
                let mut events = first.events.len();
                let mut bytes = data_bytes(&first.events);
                group.push(first);
                while events < self.group_events_max && bytes < self.group_bytes_max {
                    let Ok(next) = queue.try_recv() else { break };
                    events += next.events.len();
                    bytes += data_bytes(&next.events);
                    group.push(next);
                }
            }
            self.serve(&mut group).await;
        }
    }

    async fn serve(&mut self, group: &mut Vec<Request>) {
        match self.commit(group).await {
            Ok((decisions, head)) => {
                advance(&self.head, head);
                for (request, decision) in group.drain(..).zip(decisions) {
                    let _ = request.reply.send(decision);
                }
            }
            Err(error) => {
                // A connection that cannot roll back is dropped: PostgreSQL then rolls back.
                if let Some(conn) = &self.conn
                    && (conn.client.is_closed()
                        || conn.client.batch_execute("ROLLBACK").await.is_err())
                {
                    self.conn = None;
                }
                tracing::warn!(%error, appends = group.len(), "group commit failed");
                let error = CommitFailed(Arc::new(error));
                for request in group.drain(..) {
                    let _ = request.reply.send(Err(AppendError::backend(error.clone())));
                }
            }
        }
    }

    async fn connection(&mut self) -> Result<Arc<Connection>, GroupError> {
        if self.conn.as_ref().is_some_and(|c| c.client.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            let client = self.target.connect().await?;
            client.batch_execute(&self.session).await?;
            let sql = &self.target.sql;
            let (lock_head, set_head, append_group, stream_head, insert_events_or_skip) = tokio::try_join!(
                client.prepare(&sql.lock_head),
                client.prepare(&sql.set_head),
                client.prepare(&sql.append_group),
                client.prepare(&sql.stream_head),
                client.prepare(&sql.insert_events_or_skip),
            )?;
            let (upsert_streams, delete_from, find_id, find_ids, stream_run) = tokio::try_join!(
                client.prepare(&sql.upsert_streams),
                client.prepare(&sql.delete_from),
                client.prepare(&sql.find_id),
                client.prepare(&sql.find_ids),
                client.prepare(&sql.stream_run),
            )?;
            self.conn = Some(Arc::new(Connection {
                client,
                lock_head,
                set_head,
                append_group,
                stream_head,
                insert_events_or_skip,
                upsert_streams,
                delete_from,
                find_id,
                find_ids,
                stream_run,
            }));
        }
        Ok(self.conn.clone().expect("connected above"))
    }

    /// Runs the group's transaction; returns each append's decision and the log head after it.
    async fn commit(&mut self, group: &[Request]) -> Result<(Vec<Decision>, Position), GroupError> {
        let recorded_at = now();
        let attempt = self.commits.fetch_add(1, Ordering::Relaxed) + 1;
        let hook = self.before_commit.clone();
        let channel = self.target.sql.channel.clone();
        let conn = self.connection().await?;
        let conn = &*conn;
        // Without a hook, COMMIT goes out in the same flight as the group.
        let outcome = match fast(conn, group, recorded_at, &channel, hook.is_none()).await? {
            Fast::Committed(decisions, head) => return Ok((decisions, head)),
            Fast::Open(decisions, head) => (decisions, head),
            Fast::Refused => {
                // An expectation failed or an id is recorded: the transaction wrote nothing.
                // A pipelined COMMIT ended it (as a rollback); else it is aborted and open.
                if hook.is_some() {
                    conn.client.batch_execute("ROLLBACK").await?;
                }
                // Decide again, append by append.
                let start = begin(conn).await?;
                slow(conn, group, start, recorded_at, &channel).await?
            }
        };
        if let Some(hook) = hook {
            let start = outcome.0.iter().find_map(|d| d.as_ref().ok());
            let positions = match start {
                Some(first) => (first.first_position, outcome.1),
                None => (Position::START, Position::START),
            };
            hook(CommitAttempt {
                number: attempt,
                appends: group.len(),
                positions,
            })
            .await
            .map_err(GroupError::Injected)?;
        }
        conn.client.batch_execute("COMMIT").await?;
        Ok(outcome)
    }
}

/// For the slow path: `BEGIN` and the log head lock, in one flight; returns the committed head.
async fn begin(conn: &Connection) -> Result<Position, GroupError> {
    let (_, row) = tokio::try_join!(
        conn.client.batch_execute(BEGIN),
        conn.client.query_one(&conn.lock_head, &[]),
    )?;
    let head: i64 = row.get(0);
    to_u64(head)
        .map(Position)
        .ok_or_else(|| GroupError::Corrupt(format!("the log head is {head}")))
}

enum Fast {
    /// Every append was admitted, written and committed.
    Committed(Vec<Decision>, Position),
    /// Every append was admitted and written; the transaction is open.
    Open(Vec<Decision>, Position),
    /// An expectation failed, or an event id is recorded: nothing was written.
    Refused,
}

/// Step 1 of the module's description, in one flight: `BEGIN`, `append_group(…)` (see
/// `schema::APPEND_GROUP`) and, when `commit`, `COMMIT`.
async fn fast(
    conn: &Connection,
    group: &[Request],
    recorded_at: SystemTime,
    channel: &str,
    commit: bool,
) -> Result<Fast, GroupError> {
    let events: usize = group.iter().map(|r| r.events.len()).sum();
    let mut streams = Vec::with_capacity(group.len());
    let mut expected = Vec::with_capacity(group.len());
    let mut counts = Vec::with_capacity(group.len());
    let mut ids = Vec::with_capacity(events);
    let mut types = Vec::with_capacity(events);
    let mut schema_versions = Vec::with_capacity(events);
    let mut correlation_ids = Vec::with_capacity(events);
    let mut causation_ids = Vec::with_capacity(events);
    let mut data = Vec::with_capacity(events);
    for request in group {
        streams.push(request.stream.as_str());
        expected.push(match request.expected {
            ExpectedVersion::Any => -1,
            ExpectedVersion::NoStream => -2,
            ExpectedVersion::StreamExists => -3,
            ExpectedVersion::Exact(v) => to_i64(v.0),
        });
        counts.push(request.events.len() as i64);
        for event in &request.events {
            ids.push(*event.event_id.as_uuid());
            types.push(event.event_type.as_str());
            schema_versions.push(i64::from(event.schema_version));
            correlation_ids.push(event.correlation_id);
            causation_ids.push(event.causation_id);
            data.push(event.data.as_slice());
        }
    }
    let params: [&(dyn ToSql + Sync); 11] = [
        &streams,
        &expected,
        &counts,
        &ids,
        &types,
        &schema_versions,
        &correlation_ids,
        &causation_ids,
        &data,
        &recorded_at,
        &channel,
    ];
    let (began, appended, committed) = tokio::join!(
        conn.client.batch_execute(BEGIN),
        conn.client.query_one(&conn.append_group, &params),
        async {
            if commit {
                conn.client.batch_execute("COMMIT").await
            } else {
                Ok(())
            }
        },
    );
    began?;
    let row = match appended {
        Err(e) if is_recorded_id(&e) || is_refused(&e) => return Ok(Fast::Refused),
        other => other?,
    };
    // After a failed statement a pipelined COMMIT rolls back without an error; the statement's
    // error came first above.
    committed?;
    let Some(answer) = row.get::<_, Option<Vec<i64>>>(0) else {
        return Err(GroupError::Corrupt("append_group answered NULL".to_owned()));
    };
    let corrupt = || GroupError::Corrupt(format!("append_group answered {answer:?}"));
    let (&start, priors) = answer.split_first().ok_or_else(corrupt)?;
    if priors.len() != group.len() {
        return Err(corrupt());
    }
    let mut next = to_u64(start).ok_or_else(corrupt)? + 1;
    let mut decisions = Vec::with_capacity(group.len());
    for (request, &prior) in group.iter().zip(priors) {
        let n = request.events.len() as u64;
        let prior = to_u64(prior).ok_or_else(corrupt)?;
        decisions.push(Ok(AppendOutcome {
            stream_version: StreamVersion(prior + n),
            first_position: Position(next),
            last_position: Position(next + n - 1),
            replayed: false,
        }));
        next += n;
    }
    let head = Position(next - 1);
    Ok(if commit {
        Fast::Committed(decisions, head)
    } else {
        Fast::Open(decisions, head)
    })
}

/// Whether `error` is `append_group` refusing the group for an expected version.
fn is_refused(error: &tokio_postgres::Error) -> bool {
    error
        .as_db_error()
        .is_some_and(|db| db.code().code() == crate::schema::REFUSED_SQLSTATE)
}

/// Whether `error` is the unique index on `event_id` refusing a row.
fn is_recorded_id(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_some_and(|db| {
        db.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            && db.constraint() == Some("events_event_id_key")
    })
}

/// The events of a group in column arrays, for one `INSERT … SELECT unnest(…)`.
#[derive(Default)]
struct Columns<'a> {
    positions: Vec<i64>,
    streams: Vec<&'a str>,
    versions: Vec<i64>,
    ids: Vec<Uuid>,
    types: Vec<&'a str>,
    schema_versions: Vec<i64>,
    correlation_ids: Vec<Option<Uuid>>,
    causation_ids: Vec<Option<Uuid>>,
    recorded_at: Vec<SystemTime>,
    data: Vec<&'a [u8]>,
}

impl<'a> Columns<'a> {
    fn push(
        &mut self,
        stream: &'a StreamName,
        events: &'a [NewEvent],
        first_position: u64,
        head: Option<StreamVersion>,
        recorded_at: SystemTime,
    ) {
        let mut version = head.unwrap_or(StreamVersion::START);
        for (i, event) in events.iter().enumerate() {
            version = version.next();
            self.positions.push(to_i64(first_position + i as u64));
            self.streams.push(stream.as_str());
            self.versions.push(to_i64(version.0));
            self.ids.push(*event.event_id.as_uuid());
            self.types.push(event.event_type.as_str());
            self.schema_versions.push(i64::from(event.schema_version));
            self.correlation_ids.push(event.correlation_id);
            self.causation_ids.push(event.causation_id);
            self.recorded_at.push(recorded_at);
            self.data.push(&event.data);
        }
    }

    async fn insert(
        &self,
        conn: &Connection,
        statement: &Statement,
    ) -> Result<u64, tokio_postgres::Error> {
        conn.client
            .execute(
                statement,
                &[
                    &self.positions,
                    &self.streams,
                    &self.versions,
                    &self.ids,
                    &self.types,
                    &self.schema_versions,
                    &self.correlation_ids,
                    &self.causation_ids,
                    &self.recorded_at,
                    &self.data,
                ],
            )
            .await
    }
}

/// Step 2 of the module's description: the group decided append by append.
async fn slow(
    conn: &Connection,
    group: &[Request],
    start: Position,
    recorded_at: SystemTime,
    channel: &str,
) -> Result<(Vec<Decision>, Position), GroupError> {
    let mut next = start.0 + 1;
    let mut decisions = Vec::with_capacity(group.len());
    for request in group {
        decisions.push(append_one(conn, request, &mut next, recorded_at).await?);
    }
    if next > start.0 + 1 {
        conn.client
            .execute(&conn.set_head, &[&to_i64(next - 1), &channel])
            .await?;
    }
    Ok((decisions, Position(next - 1)))
}

/// Decides one append on the state including the group's earlier appends, and writes it if it
/// is admitted, as the embedded writer does: insert first; only when an id turns out to be
/// recorded, or the expectation fails, look the ids up (after deleting what this append
/// inserted, so that a refused append leaves no trace in the group).
async fn append_one(
    conn: &Connection,
    request: &Request,
    next: &mut u64,
    recorded_at: SystemTime,
) -> Result<Decision, GroupError> {
    let Request {
        stream,
        expected,
        events,
        ..
    } = request;
    let head = stream_head(conn, stream).await?;
    if expected.admits(head) {
        let mut columns = Columns::default();
        columns.push(stream, events, *next, head, recorded_at);
        let inserted = columns.insert(conn, &conn.insert_events_or_skip).await?;
        if inserted == events.len() as u64 {
            let version = head.map_or(0, |h| h.0) + events.len() as u64;
            conn.client
                .execute(
                    &conn.upsert_streams,
                    &[&vec![stream.as_str()], &vec![to_i64(version)]],
                )
                .await?;
            let first = *next;
            *next += events.len() as u64;
            return Ok(Ok(AppendOutcome {
                stream_version: StreamVersion(version),
                first_position: Position(first),
                last_position: Position(*next - 1),
                replayed: false,
            }));
        }
        if inserted > 0 {
            conn.client
                .execute(&conn.delete_from, &[&to_i64(*next)])
                .await?;
        }
    }
    refusal(conn, stream, head, *expected, events).await
}

async fn stream_head(
    conn: &Connection,
    stream: &StreamName,
) -> Result<Option<StreamVersion>, GroupError> {
    let row = conn
        .client
        .query_opt(&conn.stream_head, &[&stream.as_str()])
        .await?;
    match row {
        None => Ok(None),
        Some(row) => {
            let head: i64 = row.get(0);
            to_u64(head)
                .map(|h| Some(StreamVersion(h)))
                .ok_or_else(|| GroupError::Corrupt(format!("stream {stream} has head {head}")))
        }
    }
}

fn stream_name(name: String) -> Result<StreamName, GroupError> {
    StreamName::new(name).map_err(|e| GroupError::Corrupt(e.to_string()))
}

fn version(value: i64) -> Result<u64, GroupError> {
    to_u64(value).ok_or_else(|| GroupError::Corrupt(format!("negative counter {value}")))
}

/// Why an append is refused, in `MemoryStore`'s order: its first id recorded (a G3 replay or a
/// refusal), another id recorded, or the expected version.
async fn refusal(
    conn: &Connection,
    stream: &StreamName,
    head: Option<StreamVersion>,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<Decision, GroupError> {
    let first_id = events[0].event_id;
    if let Some(row) = conn
        .client
        .query_opt(&conn.find_id, &[first_id.as_uuid()])
        .await?
    {
        let recorded_stream = stream_name(row.get(0))?;
        let first_version = StreamVersion(version(row.get(1))?);
        let first_position = Position(version(row.get(2))?);
        let duplicate = |recorded_stream: StreamName| {
            Ok(Err(AppendError::DuplicateEventId {
                event_id: first_id,
                stream: recorded_stream,
                stream_version: first_version,
            }))
        };
        if &recorded_stream != stream {
            return duplicate(recorded_stream);
        }
        let run = conn
            .client
            .query(
                &conn.stream_run,
                &[
                    &stream.as_str(),
                    &to_i64(first_version.0),
                    &to_i64(events.len() as u64),
                ],
            )
            .await?;
        let same = run.len() == events.len()
            && run
                .iter()
                .zip(events)
                .all(|(row, new)| row.get::<_, Uuid>(0) == *new.event_id.as_uuid());
        if !same {
            return duplicate(recorded_stream);
        }
        let at_place = expected.first_version().is_none_or(|v| v == first_version);
        if !at_place {
            return Ok(Err(AppendError::Conflict {
                stream: stream.clone(),
                expected,
                actual: head,
            }));
        }
        let last = run.last().expect("events is not empty");
        return Ok(Ok(AppendOutcome {
            stream_version: StreamVersion(version(last.get(2))?),
            first_position,
            last_position: Position(version(last.get(1))?),
            replayed: true,
        }));
    }
    let ids: Vec<Uuid> = events[1..].iter().map(|e| *e.event_id.as_uuid()).collect();
    if !ids.is_empty() {
        let rows = conn.client.query(&conn.find_ids, &[&ids]).await?;
        let mut recorded = HashMap::with_capacity(rows.len());
        for row in rows {
            let id: Uuid = row.get(0);
            recorded.insert(id, (row.get::<_, String>(1), row.get::<_, i64>(2)));
        }
        for event in &events[1..] {
            if let Some((name, v)) = recorded.remove(event.event_id.as_uuid()) {
                return Ok(Err(AppendError::DuplicateEventId {
                    event_id: event.event_id,
                    stream: stream_name(name)?,
                    stream_version: StreamVersion(version(v)?),
                }));
            }
        }
    }
    if !expected.admits(head) {
        return Ok(Err(AppendError::Conflict {
            stream: stream.clone(),
            expected,
            actual: head,
        }));
    }
    Err(GroupError::Corrupt(format!(
        "appending to {stream} hit the event id index, but none of its event ids is recorded"
    )))
}

fn data_bytes(events: &[NewEvent]) -> usize {
    events.iter().map(|e| e.data.len()).sum()
}

/// Now, to the microsecond (what PostgreSQL stores), so that the time an append is answered
/// with is the one read back.
fn now() -> SystemTime {
    let micros = crate::reader::micros_since_epoch(SystemTime::now());
    SystemTime::UNIX_EPOCH + Duration::from_micros(micros)
}
