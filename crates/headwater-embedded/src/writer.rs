//! The writer: one thread owns the write connection and commits appends in groups.
//!
//! Each turn it takes the first waiting append, drains whatever else is queued (up to the group
//! limits), decides every append of the group in order on the state that includes the earlier
//! ones, and commits them all in one transaction: one fsync for the whole group. Only then does
//! it answer them and publish the new head.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::fs::File;
use std::io;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use headwater_core::{ExpectedVersion, NewEvent, Position, StreamName, StreamVersion};
use headwater_store::{AppendError, AppendOutcome};
use rusqlite::{Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot, watch};

use crate::checkpoint::Checkpointer;
use crate::schema::{EventFields, INSERT_EVENT};
use crate::{CommitAttempt, CommitHook, Options};

/// The most streams whose state the writer caches (about 100 bytes each, plus the name).
const STREAM_CACHE_ENTRIES_MAX: usize = 16_384;

/// One append waiting for the writer. Its input was validated before it was queued.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) stream: StreamName,
    pub(crate) expected: ExpectedVersion,
    pub(crate) events: Vec<NewEvent>,
    pub(crate) reply: oneshot::Sender<Result<AppendOutcome, AppendError>>,
}

/// Why a group's transaction failed. Every append of the group is answered with it.
#[derive(Debug)]
enum GroupError {
    Sqlite(rusqlite::Error),
    /// The commit hook of [`Options::before_commit`] (tests) failed the commit.
    Injected(io::Error),
    /// A stored row the writer needed is damaged.
    Corrupt(String),
}

impl fmt::Display for GroupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupError::Sqlite(e) => write!(f, "the write transaction failed: {e}"),
            GroupError::Injected(e) => write!(f, "the commit failed: {e}"),
            GroupError::Corrupt(detail) => write!(f, "the store is corrupt: {detail}"),
        }
    }
}

impl StdError for GroupError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            GroupError::Sqlite(e) => Some(e),
            GroupError::Injected(e) => Some(e),
            GroupError::Corrupt(_) => None,
        }
    }
}

impl From<rusqlite::Error> for GroupError {
    fn from(e: rusqlite::Error) -> GroupError {
        GroupError::Sqlite(e)
    }
}

/// The failure of a group commit, shared by every append of the group.
#[derive(Debug, Clone)]
struct CommitFailed(Arc<GroupError>);

impl fmt::Display for CommitFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}; the store refuses writes until it is reopened",
            self.0
        )
    }
}

impl StdError for CommitFailed {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}

/// What an append decided inside a group: its answer if the group commits.
type Decision = Result<AppendOutcome, AppendError>;

pub(crate) struct Writer {
    conn: Connection,
    /// Checkpoints off the commit path (`checkpoint.rs`); `None` once stopped.
    checkpointer: Option<Checkpointer>,
    /// The position the next event gets.
    next_position: u64,
    head: watch::Sender<Position>,
    group_events_max: usize,
    group_bytes_max: usize,
    before_commit: Option<CommitHook>,
    after_commit: Option<Arc<dyn Fn() + Send + Sync>>,
    commits: u64,
    poisoned: bool,
    /// Streams' row ids and heads, so that the common append needs no lookup. Exact because this
    /// thread is the only writer; cleared when a group fails.
    streams: HashMap<StreamName, StreamState>,
}

impl Writer {
    pub(crate) fn new(
        conn: Connection,
        head: Position,
        head_tx: watch::Sender<Position>,
        options: &Options,
        checkpointer: Checkpointer,
    ) -> Writer {
        Writer {
            conn,
            checkpointer: Some(checkpointer),
            next_position: head.0 + 1,
            head: head_tx,
            group_events_max: options.group_events_max.max(1),
            group_bytes_max: options.group_bytes_max.max(1),
            before_commit: options.before_commit.clone(),
            after_commit: options.after_commit.clone(),
            commits: 0,
            poisoned: false,
            streams: HashMap::new(),
        }
    }

    /// Serves appends until every sender is gone, then checkpoints the WAL and closes. `lock`
    /// (the directory lock) is released last.
    pub(crate) fn run(mut self, mut queue: mpsc::Receiver<Request>, lock: File) {
        let mut group = Vec::new();
        while let Some(first) = queue.blocking_recv() {
            let mut events = first.events.len();
            let mut bytes = data_bytes(&first.events);
            group.push(first);
            while events < self.group_events_max && bytes < self.group_bytes_max {
                let Ok(next) = queue.try_recv() else { break };
                events += next.events.len();
                bytes += data_bytes(&next.events);
                group.push(next);
            }
            self.serve(&mut group);
        }
        if let Some(mut checkpointer) = self.checkpointer.take() {
            // The hook holds a way to wake the thread: remove it first.
            let _ = self
                .conn
                .wal_hook(None::<fn(&mut rusqlite::hooks::Wal, i32) -> rusqlite::Result<()>>);
            checkpointer.stop();
        }
        if !self.poisoned {
            // Best effort: a failure leaves the WAL in place for the next open to recover.
            let _ = self
                .conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        }
        drop(self.conn);
        drop(lock);
    }

    fn serve(&mut self, group: &mut Vec<Request>) {
        if self.poisoned {
            for request in group.drain(..) {
                let _ = request.reply.send(Err(AppendError::Poisoned));
            }
            return;
        }
        let start = self.next_position;
        match self.commit(group) {
            Ok(decisions) => {
                if let Some(hook) = &self.after_commit {
                    hook();
                }
                let head = Position(self.next_position - 1);
                self.head.send_if_modified(|current| {
                    let moved = *current != head;
                    *current = head;
                    moved
                });
                for (request, decision) in group.drain(..).zip(decisions) {
                    let _ = request.reply.send(decision);
                }
            }
            Err(error) => {
                // Never retried: after a failed fsync the file's state is unknown.
                let _ = self.conn.execute_batch("ROLLBACK");
                self.poisoned = true;
                self.next_position = start;
                self.streams.clear();
                let error = CommitFailed(Arc::new(error));
                for request in group.drain(..) {
                    let _ = request.reply.send(Err(AppendError::backend(error.clone())));
                }
            }
        }
    }

    /// Runs one transaction for the whole group: each append's decision, then the commit.
    fn commit(&mut self, group: &[Request]) -> Result<Vec<Decision>, GroupError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let recorded_at = now_micros();
        let mut decisions = Vec::with_capacity(group.len());
        for request in group {
            decisions.push(self.append(request, recorded_at)?);
        }
        self.commits += 1;
        if let Some(hook) = &self.before_commit {
            let attempt = CommitAttempt {
                number: self.commits,
                appends: group.len(),
            };
            hook(&attempt).map_err(GroupError::Injected)?;
        }
        self.conn.execute_batch("COMMIT")?;
        Ok(decisions)
    }

    /// Decides one append on the state including the group's earlier appends, and writes it if
    /// it is admitted, with `MemoryStore::append`'s rules.
    ///
    /// The common case costs no lookup beyond the stream's state (usually cached): the
    /// expected version holds, so the events are inserted, and the unique index on `event_id`
    /// tells whether an id was already recorded. Only then, or when the expected version does
    /// not hold, are the ids looked up, in `MemoryStore`'s order (G3 replay, duplicate,
    /// conflict), after undoing what this append inserted: a refused append leaves no trace in
    /// the group.
    fn append(&mut self, request: &Request, recorded_at: i64) -> Result<Decision, GroupError> {
        let Request {
            stream,
            expected,
            events,
            ..
        } = request;
        let state = self.stream_state(stream)?;
        if expected.admits(state.map(|s| StreamVersion(s.head)))
            && let Some(outcome) = self.insert(stream, state, events, recorded_at)?
        {
            return Ok(Ok(outcome));
        }
        self.refusal(stream, state, *expected, events)
    }

    /// Why an append is refused: its first id recorded (a G3 replay or a refusal), another id
    /// recorded, or the expected version.
    fn refusal(
        &mut self,
        stream: &StreamName,
        state: Option<StreamState>,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<Decision, GroupError> {
        if let Some(outcome) = self.replay(stream, state, expected, events)? {
            return Ok(outcome);
        }
        for event in &events[1..] {
            if let Some(recorded) = self.find_id(event.event_id.as_bytes())? {
                return Ok(Err(AppendError::DuplicateEventId {
                    event_id: event.event_id,
                    stream: self.stream_name(recorded.stream_id)?,
                    stream_version: recorded.version,
                }));
            }
        }
        let head = state.map(|s| StreamVersion(s.head));
        if !expected.admits(head) {
            return Ok(Err(AppendError::Conflict {
                stream: stream.clone(),
                expected,
                actual: head,
            }));
        }
        Err(GroupError::Corrupt(format!(
            "appending to {stream} hit a unique index, but none of its event ids is recorded"
        )))
    }

    /// Inserts the append's events (and the stream's row if it is new). `None` when an event id
    /// is already recorded: then every row this call inserted was deleted again.
    fn insert(
        &mut self,
        stream: &StreamName,
        state: Option<StreamState>,
        events: &[NewEvent],
        recorded_at: i64,
    ) -> Result<Option<AppendOutcome>, GroupError> {
        let head = state.map_or(0, |s| s.head);
        let new_head = sql_int(head + events.len() as u64)?;
        let (stream_id, new_stream) = match state {
            Some(state) => (state.id, false),
            None => {
                let mut insert = self
                    .conn
                    .prepare_cached("INSERT INTO streams (name, head) VALUES (?1, ?2)")?;
                insert.execute((stream.as_str(), new_head))?;
                (self.conn.last_insert_rowid(), true)
            }
        };
        let first_position = self.next_position;
        let mut version = state.map_or(StreamVersion::START, |s| StreamVersion(s.head));
        let mut insert = self.conn.prepare_cached(INSERT_EVENT)?;
        for event in events {
            version = version.next();
            let fields = EventFields {
                position: sql_int(self.next_position)?,
                stream: stream.as_str().as_bytes(),
                version: sql_int(version.0)?,
                event_id: event.event_id.as_bytes(),
                event_type: event.event_type.as_str().as_bytes(),
                schema_version: i64::from(event.schema_version),
                correlation_id: event.correlation_id.as_ref().map(|u| &u.as_bytes()[..]),
                causation_id: event.causation_id.as_ref().map(|u| &u.as_bytes()[..]),
                recorded_at,
                data: &event.data,
            };
            let inserted = insert.execute(rusqlite::params![
                fields.position,
                stream_id,
                fields.version,
                fields.event_id,
                event.event_type.as_str(),
                fields.schema_version,
                fields.correlation_id,
                fields.causation_id,
                fields.recorded_at,
                fields.data,
                i64::from(fields.crc()),
            ]);
            match inserted {
                Ok(_) => self.next_position += 1,
                Err(e) if is_unique_violation(&e) => {
                    // The failed statement changed nothing; undo the ones before it.
                    drop(insert);
                    self.conn
                        .prepare_cached("DELETE FROM events WHERE position >= ?1")?
                        .execute([sql_int(first_position)?])?;
                    if new_stream {
                        self.conn
                            .prepare_cached("DELETE FROM streams WHERE id = ?1")?
                            .execute([stream_id])?;
                    }
                    self.next_position = first_position;
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            }
        }
        drop(insert);
        if !new_stream {
            self.conn
                .prepare_cached("UPDATE streams SET head = ?1 WHERE id = ?2")?
                .execute((new_head, stream_id))?;
        }
        self.remember(
            stream,
            StreamState {
                id: stream_id,
                head: version.0,
            },
        );
        Ok(Some(AppendOutcome {
            stream_version: version,
            first_position: Position(first_position),
            last_position: Position(self.next_position - 1),
            replayed: false,
        }))
    }

    /// G3: if the append's first event id is recorded, the answer: the original outcome when
    /// this is the same append at the same place, else a refusal.
    fn replay(
        &mut self,
        stream: &StreamName,
        state: Option<StreamState>,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<Option<Decision>, GroupError> {
        let Some(first) = self.find_id(events[0].event_id.as_bytes())? else {
            return Ok(None);
        };
        let duplicate = |this: &Self| -> Result<Option<Decision>, GroupError> {
            Ok(Some(Err(AppendError::DuplicateEventId {
                event_id: events[0].event_id,
                stream: this.stream_name(first.stream_id)?,
                stream_version: first.version,
            })))
        };
        let Some(state) = state.filter(|s| s.id == first.stream_id) else {
            return duplicate(self);
        };
        let mut recorded = Vec::with_capacity(events.len());
        {
            let mut select = self.conn.prepare_cached(
                "SELECT event_id, position, version FROM events \
                 WHERE stream_id = ?1 AND version >= ?2 ORDER BY version LIMIT ?3",
            )?;
            let mut rows = select.query((
                state.id,
                sql_int(first.version.0)?,
                sql_int(events.len() as u64)?,
            ))?;
            while let Some(r) = rows.next()? {
                let id: Vec<u8> = r.get(0)?;
                let position: i64 = r.get(1)?;
                let version: i64 = r.get(2)?;
                recorded.push((id, position, version));
            }
        }
        let same = recorded.len() == events.len()
            && recorded
                .iter()
                .zip(events)
                .all(|((id, _, _), new)| id.as_slice() == new.event_id.as_bytes());
        if !same {
            return duplicate(self);
        }
        let at_place = expected.first_version().is_none_or(|v| v == first.version);
        if !at_place {
            return Ok(Some(Err(AppendError::Conflict {
                stream: stream.clone(),
                expected,
                actual: Some(StreamVersion(state.head)),
            })));
        }
        let (_, last_position, last_version) = recorded.last().expect("events is not empty");
        Ok(Some(Ok(AppendOutcome {
            stream_version: StreamVersion(from_sql(*last_version)?),
            first_position: first.position,
            last_position: Position(from_sql(*last_position)?),
            replayed: true,
        })))
    }

    /// The stream's row id and head, from the cache or the database; `None` for a stream with
    /// no events.
    fn stream_state(&mut self, stream: &StreamName) -> Result<Option<StreamState>, GroupError> {
        if let Some(state) = self.streams.get(stream) {
            return Ok(Some(*state));
        }
        let row: Option<(i64, i64)> = self
            .conn
            .prepare_cached("SELECT id, head FROM streams WHERE name = ?1")?
            .query_row([stream.as_str()], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        let Some((id, head)) = row else {
            return Ok(None);
        };
        let state = StreamState {
            id,
            head: from_sql(head)?,
        };
        self.remember(stream, state);
        Ok(Some(state))
    }

    /// Caches a stream's state. The cache is bounded: when full it starts over.
    fn remember(&mut self, stream: &StreamName, state: StreamState) {
        if let Some(cached) = self.streams.get_mut(stream) {
            *cached = state;
            return;
        }
        if self.streams.len() >= STREAM_CACHE_ENTRIES_MAX {
            self.streams.clear();
        }
        self.streams.insert(stream.clone(), state);
    }

    fn stream_name(&self, id: i64) -> Result<StreamName, GroupError> {
        let mut select = self
            .conn
            .prepare_cached("SELECT name FROM streams WHERE id = ?1")?;
        let name: String = select.query_row([id], |row| row.get(0))?;
        StreamName::new(name).map_err(|e| GroupError::Corrupt(e.to_string()))
    }

    fn find_id(&self, event_id: &[u8; 16]) -> Result<Option<RecordedId>, GroupError> {
        let mut select = self.conn.prepare_cached(
            "SELECT position, stream_id, version FROM events WHERE event_id = ?1",
        )?;
        let row = select
            .query_row([&event_id[..]], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                ))
            })
            .optional()?;
        match row {
            None => Ok(None),
            Some((position, stream_id, version)) => Ok(Some(RecordedId {
                position: Position(from_sql(position)?),
                stream_id,
                version: StreamVersion(from_sql(version)?),
            })),
        }
    }
}

/// Whether `error` is a unique or primary key constraint failing.
fn is_unique_violation(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error(),
        Some(e) if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

/// A stream's row id and the version of its last event, as the writer caches them.
#[derive(Clone, Copy, Debug)]
struct StreamState {
    id: i64,
    head: u64,
}

/// Where an event id is recorded.
#[derive(Clone, Copy, Debug)]
struct RecordedId {
    position: Position,
    stream_id: i64,
    version: StreamVersion,
}

fn data_bytes(events: &[NewEvent]) -> usize {
    events.iter().map(|e| e.data.len()).sum()
}

fn sql_int(value: u64) -> Result<i64, GroupError> {
    i64::try_from(value).map_err(|_| GroupError::Corrupt(format!("{value} exceeds SQLite's range")))
}

fn from_sql(value: i64) -> Result<u64, GroupError> {
    u64::try_from(value).map_err(|_| GroupError::Corrupt(format!("negative counter {value}")))
}

fn now_micros() -> i64 {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    i64::try_from(micros).unwrap_or(i64::MAX)
}
