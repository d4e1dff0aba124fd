//! The embedded view store: the consumer's own tables and its cursors in one SQLite database, so
//! applying an event and moving its subject's cursor is one SQLite transaction.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use headwater_core::{FeedId, Sequence, Subject};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use crate::IntegrationEvent;
use crate::dead::{DEAD_LETTERS_MAX, DeadLetter, DeadLetterKind, NewDeadLetter};
use crate::view::{Applied, ViewError, ViewStore, check_contiguous, check_mark};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
type Handler = dyn Fn(&Transaction<'_>, &IntegrationEvent) -> Result<(), BoxError> + Send + Sync;

/// The tables of cursors and feed positions, beside the user's tables.
const CURSORS_TABLE: &str = "CREATE TABLE IF NOT EXISTS headwater_cursors (
    feed TEXT NOT NULL,
    subject TEXT NOT NULL,
    sequence INTEGER NOT NULL CHECK (sequence > 0),
    PRIMARY KEY (feed, subject)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS headwater_feed_positions (
    feed TEXT PRIMARY KEY,
    position INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS headwater_marks (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID";

/// A view in a SQLite database file (WAL, `synchronous=FULL`: a committed apply survives a crash
/// of the process or the machine). The handler gets the open transaction and changes the user's
/// tables with it; the cursor is written in the same transaction by this store.
pub struct EmbeddedView {
    connection: Arc<Mutex<Connection>>,
    handler: Arc<Handler>,
}

impl std::fmt::Debug for EmbeddedView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedView").finish_non_exhaustive()
    }
}

impl EmbeddedView {
    /// Opens (creating) the database at `path`, runs `setup` on it in a transaction (create the
    /// view's tables if they do not exist) and keeps `handler` for the events.
    ///
    /// # Errors
    /// [`ViewError::Backend`] when the file cannot be opened or `setup` fails.
    pub fn open(
        path: impl AsRef<Path>,
        setup: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<()>,
        handler: impl Fn(&Transaction<'_>, &IntegrationEvent) -> Result<(), BoxError>
        + Send
        + Sync
        + 'static,
    ) -> Result<EmbeddedView, ViewError> {
        let mut connection = Connection::open(path).map_err(backend)?;
        connection
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(backend)?;
        connection
            .pragma_update(None, "synchronous", "FULL")
            .map_err(backend)?;
        connection
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(backend)?;
        let tx = connection.transaction().map_err(backend)?;
        tx.execute_batch(CURSORS_TABLE).map_err(backend)?;
        tx.execute_batch(DEAD_LETTERS_TABLE).map_err(backend)?;
        setup(&tx).map_err(backend)?;
        tx.commit().map_err(backend)?;
        Ok(EmbeddedView {
            connection: Arc::new(Mutex::new(connection)),
            handler: Arc::new(handler),
        })
    }

    /// Reads the view (a query of the user's tables), on a blocking thread.
    ///
    /// # Errors
    /// What `read` returns, or [`ViewError::Backend`] if the blocking task failed.
    ///
    /// # Cancel safety
    /// Cancel safe (the read runs to its end on its thread, its answer is dropped).
    pub async fn read<R: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, ViewError> {
        self.blocking(move |connection| read(connection).map_err(backend))
            .await
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, ViewError> + Send + 'static,
    ) -> Result<R, ViewError> {
        let connection = Arc::clone(&self.connection);
        tokio::task::spawn_blocking(move || f(&mut lock(&connection)))
            .await
            .map_err(|e| ViewError::Backend(Box::new(e)))?
    }
}

fn lock(connection: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    // A panic in a handler rolls its transaction back (dropped uncommitted): the connection is
    // sound.
    connection.lock().unwrap_or_else(|e| e.into_inner())
}

fn backend(error: rusqlite::Error) -> ViewError {
    ViewError::Backend(Box::new(error))
}

fn cursor_in(
    connection: &Connection,
    feed: &FeedId,
    subject: &Subject,
) -> Result<Sequence, ViewError> {
    let sequence: Option<i64> = connection
        .query_row(
            "SELECT sequence FROM headwater_cursors WHERE feed = ?1 AND subject = ?2",
            params![feed.to_string(), subject.as_str()],
            |row| row.get(0),
        )
        .optional()
        .map_err(backend)?;
    Ok(Sequence(
        sequence.map_or(0, |s| u64::try_from(s).unwrap_or(0)),
    ))
}

/// Applies `events` of `subject` in `tx` (not committed): the handler on each new one, then the
/// cursor.
fn apply_in(
    tx: &Transaction<'_>,
    handler: &Handler,
    feed: &FeedId,
    subject: &Subject,
    events: &[IntegrationEvent],
) -> Result<Applied, ViewError> {
    let cursor = cursor_in(tx, feed, subject)?;
    let duplicates = check_contiguous(subject, cursor, events)?;
    let new = &events[duplicates..];
    let Some(last) = new.last() else {
        return Ok(Applied {
            cursor,
            applied: 0,
            duplicates: duplicates as u64,
        });
    };
    for event in new {
        handler(tx, event).map_err(|e| ViewError::Handler {
            subject: subject.clone(),
            sequence: event.sequence,
            reason: e.to_string(),
        })?;
    }
    let sequence = i64::try_from(last.sequence.get()).map_err(|_| ViewError::NotContiguous {
        subject: subject.clone(),
        cursor,
        detail: "a sequence above 2^63".into(),
    })?;
    tx.execute(
        "INSERT INTO headwater_cursors (feed, subject, sequence) VALUES (?1, ?2, ?3)
         ON CONFLICT (feed, subject) DO UPDATE SET sequence = excluded.sequence",
        params![feed.to_string(), subject.as_str(), sequence],
    )
    .map_err(backend)?;
    Ok(Applied {
        cursor: last.sequence,
        applied: new.len() as u64,
        duplicates: duplicates as u64,
    })
}

#[async_trait]
impl ViewStore for EmbeddedView {
    async fn cursor(&self, feed: &FeedId, subject: &Subject) -> Result<Sequence, ViewError> {
        let (feed, subject) = (feed.clone(), subject.clone());
        self.blocking(move |connection| cursor_in(connection, &feed, &subject))
            .await
    }

    async fn apply(
        &self,
        feed: &FeedId,
        subject: &Subject,
        events: &[IntegrationEvent],
    ) -> Result<Applied, ViewError> {
        let (feed, subject, events) = (feed.clone(), subject.clone(), events.to_vec());
        let handler = Arc::clone(&self.handler);
        self.blocking(move |connection| {
            let tx = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            let applied = apply_in(&tx, &*handler, &feed, &subject, &events)?;
            if applied.applied > 0 {
                tx.commit().map_err(backend)?;
            }
            Ok(applied)
        })
        .await
    }

    async fn apply_many(
        &self,
        feed: &FeedId,
        batches: &[(Subject, Vec<IntegrationEvent>)],
    ) -> Result<Vec<Applied>, ViewError> {
        let (feed, batches) = (feed.clone(), batches.to_vec());
        let handler = Arc::clone(&self.handler);
        self.blocking(move |connection| {
            let tx = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            let applied = batches
                .iter()
                .map(|(subject, events)| apply_in(&tx, &*handler, &feed, subject, events))
                .collect::<Result<Vec<_>, _>>()?;
            if applied.iter().any(|a| a.applied > 0) {
                tx.commit().map_err(backend)?;
            }
            Ok(applied)
        })
        .await
    }

    async fn cursors(
        &self,
        feed: &FeedId,
        after: Option<&Subject>,
        limit: u64,
    ) -> Result<Vec<(Subject, Sequence)>, ViewError> {
        let feed = feed.to_string();
        let after = after.map(|s| s.as_str().to_owned()).unwrap_or_default();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.blocking(move |connection| {
            let mut statement = connection
                .prepare_cached(
                    "SELECT subject, sequence FROM headwater_cursors
                     WHERE feed = ?1 AND subject > ?2 ORDER BY subject LIMIT ?3",
                )
                .map_err(backend)?;
            let rows = statement
                .query_map(params![feed, after, limit], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                })
                .map_err(backend)?;
            let mut cursors = Vec::new();
            for row in rows {
                let (subject, sequence) = row.map_err(backend)?;
                let subject = Subject::new(subject).map_err(|e| ViewError::Backend(Box::new(e)))?;
                cursors.push((subject, Sequence(u64::try_from(sequence).unwrap_or(0))));
            }
            Ok(cursors)
        })
        .await
    }

    async fn feed_position(&self, feed: &FeedId) -> Result<u64, ViewError> {
        let feed = feed.to_string();
        self.blocking(move |connection| {
            let position: Option<i64> = connection
                .query_row(
                    "SELECT position FROM headwater_feed_positions WHERE feed = ?1",
                    params![feed],
                    |row| row.get(0),
                )
                .optional()
                .map_err(backend)?;
            Ok(position.map_or(0, |p| u64::try_from(p).unwrap_or(0)))
        })
        .await
    }

    async fn save_feed_position(&self, feed: &FeedId, position: u64) -> Result<(), ViewError> {
        let feed = feed.to_string();
        let position = i64::try_from(position).unwrap_or(i64::MAX);
        self.blocking(move |connection| {
            connection
                .execute(
                    "INSERT INTO headwater_feed_positions (feed, position) VALUES (?1, ?2)
                     ON CONFLICT (feed) DO UPDATE SET position = max(position, excluded.position)",
                    params![feed, position],
                )
                .map_err(backend)?;
            Ok(())
        })
        .await
    }

    // --- Marks ---

    async fn mark(&self, key: &str) -> Result<Option<String>, ViewError> {
        check_mark(key, None)?;
        let key = key.to_owned();
        self.blocking(move |connection| {
            connection
                .query_row(
                    "SELECT value FROM headwater_marks WHERE key = ?1",
                    params![key],
                    |row| row.get(0),
                )
                .optional()
                .map_err(backend)
        })
        .await
    }

    async fn set_mark(&self, key: &str, value: Option<&str>) -> Result<(), ViewError> {
        check_mark(key, value)?;
        let key = key.to_owned();
        let value = value.map(str::to_owned);
        self.blocking(move |connection| {
            match value {
                Some(value) => connection.execute(
                    "INSERT INTO headwater_marks (key, value) VALUES (?1, ?2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    params![key, value],
                ),
                None => {
                    connection.execute("DELETE FROM headwater_marks WHERE key = ?1", params![key])
                }
            }
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    // --- Dead letters ---

    async fn record_dead_letter(&self, letter: &NewDeadLetter) -> Result<u64, ViewError> {
        let letter = letter.clone();
        self.blocking(move |connection| {
            let tx = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            let id: i64 = tx
                .query_row(
                    "INSERT INTO headwater_dead_letters (feed, subject, sequence, event_id, kind,
                         reason, transport, body, first_at_ms, last_at_ms, count)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, 1)
                     ON CONFLICT (feed, subject, sequence) DO UPDATE SET
                         reason = excluded.reason, transport = excluded.transport,
                         body = coalesce(excluded.body, body), last_at_ms = excluded.last_at_ms,
                         count = count + 1
                     RETURNING id",
                    params![
                        letter.feed.to_string(),
                        letter.subject.as_ref().map(Subject::as_str),
                        letter
                            .sequence
                            .map(|s| i64::try_from(s.get()).unwrap_or(i64::MAX)),
                        letter.event_id,
                        letter.kind.as_str(),
                        letter.reason,
                        letter.transport,
                        letter.body,
                        i64::try_from(letter.at_ms).unwrap_or(i64::MAX),
                    ],
                    |row| row.get(0),
                )
                .map_err(backend)?;
            tx.execute(
                "DELETE FROM headwater_dead_letters WHERE feed = ?1 AND id <= (
                     SELECT id FROM headwater_dead_letters WHERE feed = ?1
                     ORDER BY id DESC LIMIT 1 OFFSET ?2)",
                params![
                    letter.feed.to_string(),
                    i64::try_from(DEAD_LETTERS_MAX).unwrap_or(i64::MAX)
                ],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(u64::try_from(id).unwrap_or(0))
        })
        .await
    }

    async fn dead_letters(
        &self,
        feed: &FeedId,
        after: u64,
        limit: u64,
    ) -> Result<Vec<DeadLetter>, ViewError> {
        let feed = feed.clone();
        self.blocking(move |connection| {
            let mut statement = connection
                .prepare_cached(
                    "SELECT id, subject, sequence, event_id, kind, reason, transport, body,
                         first_at_ms, last_at_ms, count
                     FROM headwater_dead_letters WHERE feed = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
                )
                .map_err(backend)?;
            let rows = statement
                .query_map(
                    params![
                        feed.to_string(),
                        i64::try_from(after).unwrap_or(i64::MAX),
                        i64::try_from(limit).unwrap_or(i64::MAX)
                    ],
                    |row| {
                        Ok(StoredLetter {
                            id: row.get(0)?,
                            subject: row.get(1)?,
                            sequence: row.get(2)?,
                            event_id: row.get(3)?,
                            kind: row.get(4)?,
                            reason: row.get(5)?,
                            transport: row.get(6)?,
                            body: row.get(7)?,
                            first_at_ms: row.get(8)?,
                            last_at_ms: row.get(9)?,
                            count: row.get(10)?,
                        })
                    },
                )
                .map_err(backend)?;
            let mut letters = Vec::new();
            for row in rows {
                letters.push(row.map_err(backend)?.into_letter(&feed)?);
            }
            Ok(letters)
        })
        .await
    }

    async fn resolve_dead_letters(
        &self,
        feed: &FeedId,
        subject: &Subject,
        through: Sequence,
    ) -> Result<u64, ViewError> {
        let (feed, subject) = (feed.to_string(), subject.as_str().to_owned());
        let through = i64::try_from(through.get()).unwrap_or(i64::MAX);
        self.blocking(move |connection| {
            let removed = connection
                .execute(
                    "DELETE FROM headwater_dead_letters
                     WHERE feed = ?1 AND subject = ?2 AND sequence <= ?3",
                    params![feed, subject, through],
                )
                .map_err(backend)?;
            Ok(removed as u64)
        })
        .await
    }

    async fn discard_dead_letter(&self, feed: &FeedId, id: u64) -> Result<bool, ViewError> {
        let feed = feed.to_string();
        let id = i64::try_from(id).unwrap_or(i64::MAX);
        self.blocking(move |connection| {
            let removed = connection
                .execute(
                    "DELETE FROM headwater_dead_letters WHERE feed = ?1 AND id = ?2",
                    params![feed, id],
                )
                .map_err(backend)?;
            Ok(removed > 0)
        })
        .await
    }
}

// --- Dead letters ---

/// The dead letters, beside the cursors (`ViewStore::record_dead_letter`).
const DEAD_LETTERS_TABLE: &str = "CREATE TABLE IF NOT EXISTS headwater_dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    feed TEXT NOT NULL,
    subject TEXT,
    sequence INTEGER,
    event_id TEXT,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    transport TEXT NOT NULL,
    body BLOB,
    first_at_ms INTEGER NOT NULL,
    last_at_ms INTEGER NOT NULL,
    count INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS headwater_dead_letters_event
    ON headwater_dead_letters (feed, subject, sequence);
CREATE INDEX IF NOT EXISTS headwater_dead_letters_feed ON headwater_dead_letters (feed, id)";

/// A row of `headwater_dead_letters`.
struct StoredLetter {
    id: i64,
    subject: Option<String>,
    sequence: Option<i64>,
    event_id: Option<String>,
    kind: String,
    reason: String,
    transport: String,
    body: Option<Vec<u8>>,
    first_at_ms: i64,
    last_at_ms: i64,
    count: i64,
}

impl StoredLetter {
    fn into_letter(self, feed: &FeedId) -> Result<DeadLetter, ViewError> {
        let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(DeadLetter {
            id: unsigned(self.id),
            feed: feed.clone(),
            subject: self
                .subject
                .map(Subject::new)
                .transpose()
                .map_err(|e| ViewError::Backend(Box::new(e)))?,
            sequence: self.sequence.map(|s| Sequence(unsigned(s))),
            event_id: self.event_id,
            kind: DeadLetterKind::parse(&self.kind).ok_or_else(|| {
                ViewError::Backend(format!("a dead letter of unknown kind {:?}", self.kind).into())
            })?,
            reason: self.reason,
            transport: self.transport,
            body: self.body,
            first_at_ms: unsigned(self.first_at_ms),
            last_at_ms: unsigned(self.last_at_ms),
            count: unsigned(self.count),
        })
    }
}
