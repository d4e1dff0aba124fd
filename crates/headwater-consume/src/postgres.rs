//! The PostgreSQL view store: the consumer's tables and its cursors in one schema, so applying an
//! event and moving its subject's cursor is one PostgreSQL transaction.

use async_trait::async_trait;
use headwater_core::{FeedId, Sequence, Subject};
use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::{Client, NoTls, Transaction};

use crate::IntegrationEvent;
use crate::dead::{DEAD_LETTERS_MAX, DeadLetter, DeadLetterKind, NewDeadLetter};
use crate::view::{Applied, ViewError, ViewStore, check_contiguous, check_mark};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The longest schema name PostgreSQL keeps whole.
const SCHEMA_BYTES_MAX: usize = 63;

/// What a consumer does to its view for one event, inside the transaction that also moves the
/// subject's cursor.
#[async_trait]
pub trait PgHandler: Send + Sync + 'static {
    /// Changes the view for `event` with `tx` (the schema is the view's: `search_path` is set).
    ///
    /// # Errors
    /// Any error rolls the whole apply back: neither the view nor the cursor moves.
    async fn apply(&self, tx: &Transaction<'_>, event: &IntegrationEvent) -> Result<(), BoxError>;
}

/// A view in a PostgreSQL schema of its own: the user's tables (made by the `setup` SQL at
/// connect) and `headwater_cursors`, `headwater_feed_positions`. One connection, opened again
/// when it was lost; applies are serialized on it.
pub struct PgView<H> {
    url: String,
    schema: String,
    client: Mutex<Option<Client>>,
    handler: H,
}

impl<H> std::fmt::Debug for PgView<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        f.debug_struct("PgView")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

fn backend(error: tokio_postgres::Error) -> ViewError {
    ViewError::Backend(Box::new(error))
}

fn valid_schema(schema: &str) -> bool {
    let mut bytes = schema.bytes();
    schema.len() <= SCHEMA_BYTES_MAX
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl<H: PgHandler> PgView<H> {
    /// Connects to `url`, creates `schema` and the cursor tables if they do not exist, runs
    /// `setup` (SQL that creates the view's tables if they do not exist) in the same transaction.
    ///
    /// # Errors
    /// [`ViewError::Backend`] for a schema name outside `[a-z_][a-z0-9_]{0,62}`, a server that
    /// cannot be reached, or `setup` failing.
    ///
    /// # Cancel safety
    /// Cancel safe: the setup is one transaction.
    pub async fn connect(
        url: &str,
        schema: &str,
        setup: &str,
        handler: H,
    ) -> Result<PgView<H>, ViewError> {
        if !valid_schema(schema) {
            return Err(ViewError::Backend(
                format!("invalid schema name {schema:?}: [a-z_][a-z0-9_]{{0,62}}").into(),
            ));
        }
        let view = PgView {
            url: url.to_owned(),
            schema: schema.to_owned(),
            client: Mutex::new(None),
            handler,
        };
        {
            let mut guard = view.client().await?;
            let client = guard.as_mut().ok_or_else(lost)?;
            let tx = client.transaction().await.map_err(backend)?;
            tx.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema};
                 SET LOCAL search_path TO {schema};
                 CREATE TABLE IF NOT EXISTS headwater_cursors (
                     feed TEXT NOT NULL,
                     subject TEXT COLLATE \"C\" NOT NULL,
                     sequence BIGINT NOT NULL CHECK (sequence > 0),
                     PRIMARY KEY (feed, subject));
                 CREATE TABLE IF NOT EXISTS headwater_feed_positions (
                     feed TEXT PRIMARY KEY,
                     position BIGINT NOT NULL);
                 CREATE TABLE IF NOT EXISTS headwater_marks (
                     key TEXT PRIMARY KEY,
                     value TEXT NOT NULL);"
            ))
            .await
            .map_err(backend)?;
            tx.batch_execute(DEAD_LETTERS_TABLE)
                .await
                .map_err(backend)?;
            tx.batch_execute(setup).await.map_err(backend)?;
            tx.commit().await.map_err(backend)?;
        }
        Ok(view)
    }

    /// The view's connection (its `search_path` is the view's schema), for reads of the view.
    /// Holding it holds up applies.
    ///
    /// # Errors
    /// [`ViewError::Backend`] when the server cannot be reached.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn client(&self) -> Result<MutexGuard<'_, Option<Client>>, ViewError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            let (client, connection) = tokio_postgres::connect(&self.url, NoTls)
                .await
                .map_err(backend)?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %e, "the view's PostgreSQL connection ended");
                }
            });
            client
                .batch_execute(&format!("SET search_path TO {}", self.schema))
                .await
                .map_err(backend)?;
            *guard = Some(client);
        }
        Ok(guard)
    }
}

impl<H: PgHandler> PgView<H> {
    /// Applies `events` of `subject` in `tx` (not committed) under the subject's advisory lock:
    /// the handler on each new one, then the cursor.
    async fn apply_in(
        &self,
        tx: &Transaction<'_>,
        feed: &FeedId,
        subject: &Subject,
        events: &[IntegrationEvent],
    ) -> Result<Applied, ViewError> {
        // Two processes on one view apply a subject one at a time.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 0))",
            &[&feed.to_string(), &subject.as_str()],
        )
        .await
        .map_err(backend)?;
        let cursor = cursor_in(tx, feed, subject).await?;
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
            self.handler
                .apply(tx, event)
                .await
                .map_err(|e| ViewError::Handler {
                    subject: subject.clone(),
                    sequence: event.sequence,
                    reason: e.to_string(),
                })?;
        }
        let sequence = i64::try_from(last.sequence.get()).unwrap_or(i64::MAX);
        tx.execute(
            "INSERT INTO headwater_cursors (feed, subject, sequence) VALUES ($1, $2, $3)
             ON CONFLICT (feed, subject) DO UPDATE SET sequence = excluded.sequence",
            &[&feed.to_string(), &subject.as_str(), &sequence],
        )
        .await
        .map_err(backend)?;
        Ok(Applied {
            cursor: last.sequence,
            applied: new.len() as u64,
            duplicates: duplicates as u64,
        })
    }
}

fn lost() -> ViewError {
    ViewError::Backend("no connection to PostgreSQL".into())
}

async fn cursor_in(
    client: &impl tokio_postgres::GenericClient,
    feed: &FeedId,
    subject: &Subject,
) -> Result<Sequence, ViewError> {
    let row = client
        .query_opt(
            "SELECT sequence FROM headwater_cursors WHERE feed = $1 AND subject = $2",
            &[&feed.to_string(), &subject.as_str()],
        )
        .await
        .map_err(backend)?;
    Ok(Sequence(row.map_or(0, |r| {
        u64::try_from(r.get::<_, i64>(0)).unwrap_or(0)
    })))
}

#[async_trait]
impl<H: PgHandler> ViewStore for PgView<H> {
    async fn cursor(&self, feed: &FeedId, subject: &Subject) -> Result<Sequence, ViewError> {
        let guard = self.client().await?;
        let client = guard.as_ref().ok_or_else(lost)?;
        cursor_in(client, feed, subject).await
    }

    async fn apply(
        &self,
        feed: &FeedId,
        subject: &Subject,
        events: &[IntegrationEvent],
    ) -> Result<Applied, ViewError> {
        let mut guard = self.client().await?;
        let client = guard.as_mut().ok_or_else(lost)?;
        let tx = client.transaction().await.map_err(backend)?;
        let applied = self.apply_in(&tx, feed, subject, events).await?;
        if applied.applied > 0 {
            tx.commit().await.map_err(backend)?;
        }
        Ok(applied)
    }

    async fn apply_many(
        &self,
        feed: &FeedId,
        batches: &[(Subject, Vec<IntegrationEvent>)],
    ) -> Result<Vec<Applied>, ViewError> {
        // The advisory locks are taken in subject order, so two processes applying overlapping
        // batches cannot deadlock; the answers come back in the caller's order.
        let mut order: Vec<usize> = (0..batches.len()).collect();
        order.sort_by(|&a, &b| batches[a].0.cmp(&batches[b].0));
        let mut guard = self.client().await?;
        let client = guard.as_mut().ok_or_else(lost)?;
        let tx = client.transaction().await.map_err(backend)?;
        let mut applied = vec![None; batches.len()];
        for i in order {
            let (subject, events) = &batches[i];
            applied[i] = Some(self.apply_in(&tx, feed, subject, events).await?);
        }
        let applied: Vec<Applied> = applied.into_iter().flatten().collect();
        if applied.iter().any(|a| a.applied > 0) {
            tx.commit().await.map_err(backend)?;
        }
        Ok(applied)
    }

    async fn cursors(
        &self,
        feed: &FeedId,
        after: Option<&Subject>,
        limit: u64,
    ) -> Result<Vec<(Subject, Sequence)>, ViewError> {
        let guard = self.client().await?;
        let client = guard.as_ref().ok_or_else(lost)?;
        let after = after.map(|s| s.as_str().to_owned()).unwrap_or_default();
        let rows = client
            .query(
                "SELECT subject, sequence FROM headwater_cursors
                 WHERE feed = $1 AND subject > $2 ORDER BY subject LIMIT $3",
                &[
                    &feed.to_string(),
                    &after,
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|row| {
                let subject = Subject::new(row.get::<_, String>(0))
                    .map_err(|e| ViewError::Backend(Box::new(e)))?;
                Ok((
                    subject,
                    Sequence(u64::try_from(row.get::<_, i64>(1)).unwrap_or(0)),
                ))
            })
            .collect()
    }

    async fn feed_position(&self, feed: &FeedId) -> Result<u64, ViewError> {
        let guard = self.client().await?;
        let client = guard.as_ref().ok_or_else(lost)?;
        let row = client
            .query_opt(
                "SELECT position FROM headwater_feed_positions WHERE feed = $1",
                &[&feed.to_string()],
            )
            .await
            .map_err(backend)?;
        Ok(row.map_or(0, |r| u64::try_from(r.get::<_, i64>(0)).unwrap_or(0)))
    }

    async fn save_feed_position(&self, feed: &FeedId, position: u64) -> Result<(), ViewError> {
        let guard = self.client().await?;
        let client = guard.as_ref().ok_or_else(lost)?;
        client
            .execute(
                "INSERT INTO headwater_feed_positions (feed, position) VALUES ($1, $2)
                 ON CONFLICT (feed) DO UPDATE
                 SET position = GREATEST(headwater_feed_positions.position, excluded.position)",
                &[
                    &feed.to_string(),
                    &i64::try_from(position).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    // --- Marks ---

    async fn mark(&self, key: &str) -> Result<Option<String>, ViewError> {
        check_mark(key, None)?;
        let guard = self.client().await?;
        let client = guard.as_ref().ok_or_else(lost)?;
        let row = client
            .query_opt("SELECT value FROM headwater_marks WHERE key = $1", &[&key])
            .await
            .map_err(backend)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn set_mark(&self, key: &str, value: Option<&str>) -> Result<(), ViewError> {
        check_mark(key, value)?;
        let guard = self.client().await?;
        let client = guard.as_ref().ok_or_else(lost)?;
        match value {
            Some(value) => {
                client
                    .execute(
                        "INSERT INTO headwater_marks (key, value) VALUES ($1, $2)
                         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        &[&key, &value],
                    )
                    .await
            }
            None => {
                client
                    .execute("DELETE FROM headwater_marks WHERE key = $1", &[&key])
                    .await
            }
        }
        .map_err(backend)?;
        Ok(())
    }

    // --- Dead letters ---

    async fn record_dead_letter(&self, letter: &NewDeadLetter) -> Result<u64, ViewError> {
        let mut guard = self.client().await?;
        let client = guard.as_mut().ok_or_else(lost)?;
        let tx = client.transaction().await.map_err(backend)?;
        let feed = letter.feed.to_string();
        let row = tx
            .query_one(
                "INSERT INTO headwater_dead_letters (feed, subject, sequence, event_id, kind,
                     reason, transport, body, first_at_ms, last_at_ms, count)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, 1)
                 ON CONFLICT (feed, subject, sequence) DO UPDATE SET
                     reason = excluded.reason, transport = excluded.transport,
                     body = coalesce(excluded.body, headwater_dead_letters.body),
                     last_at_ms = excluded.last_at_ms,
                     count = headwater_dead_letters.count + 1
                 RETURNING id",
                &[
                    &feed,
                    &letter.subject.as_ref().map(Subject::as_str),
                    &letter
                        .sequence
                        .map(|s| i64::try_from(s.get()).unwrap_or(i64::MAX)),
                    &letter.event_id,
                    &letter.kind.as_str(),
                    &letter.reason,
                    &letter.transport,
                    &letter.body,
                    &i64::try_from(letter.at_ms).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(backend)?;
        tx.execute(
            "DELETE FROM headwater_dead_letters WHERE feed = $1 AND id <= (
                 SELECT id FROM headwater_dead_letters WHERE feed = $1
                 ORDER BY id DESC LIMIT 1 OFFSET $2)",
            &[&feed, &i64::try_from(DEAD_LETTERS_MAX).unwrap_or(i64::MAX)],
        )
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    async fn dead_letters(
        &self,
        feed: &FeedId,
        after: u64,
        limit: u64,
    ) -> Result<Vec<DeadLetter>, ViewError> {
        let guard = self.client().await?;
        let client = guard.as_ref().ok_or_else(lost)?;
        let rows = client
            .query(
                "SELECT id, subject, sequence, event_id, kind, reason, transport, body,
                     first_at_ms, last_at_ms, count
                 FROM headwater_dead_letters WHERE feed = $1 AND id > $2 ORDER BY id LIMIT $3",
                &[
                    &feed.to_string(),
                    &i64::try_from(after).unwrap_or(i64::MAX),
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(backend)?;
        let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
        rows.iter()
            .map(|row| {
                let kind: String = row.get(4);
                Ok(DeadLetter {
                    id: unsigned(row.get(0)),
                    feed: feed.clone(),
                    subject: row
                        .get::<_, Option<String>>(1)
                        .map(Subject::new)
                        .transpose()
                        .map_err(|e| ViewError::Backend(Box::new(e)))?,
                    sequence: row.get::<_, Option<i64>>(2).map(|s| Sequence(unsigned(s))),
                    event_id: row.get(3),
                    kind: DeadLetterKind::parse(&kind).ok_or_else(|| {
                        ViewError::Backend(format!("a dead letter of unknown kind {kind:?}").into())
                    })?,
                    reason: row.get(5),
                    transport: row.get(6),
                    body: row.get(7),
                    first_at_ms: unsigned(row.get(8)),
                    last_at_ms: unsigned(row.get(9)),
                    count: unsigned(row.get(10)),
                })
            })
            .collect()
    }

    async fn resolve_dead_letters(
        &self,
        feed: &FeedId,
        subject: &Subject,
        through: Sequence,
    ) -> Result<u64, ViewError> {
        let guard = self.client().await?;
        let client = guard.as_ref().ok_or_else(lost)?;
        client
            .execute(
                "DELETE FROM headwater_dead_letters
                 WHERE feed = $1 AND subject = $2 AND sequence <= $3",
                &[
                    &feed.to_string(),
                    &subject.as_str(),
                    &i64::try_from(through.get()).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(backend)
    }

    async fn discard_dead_letter(&self, feed: &FeedId, id: u64) -> Result<bool, ViewError> {
        let guard = self.client().await?;
        let client = guard.as_ref().ok_or_else(lost)?;
        let removed = client
            .execute(
                "DELETE FROM headwater_dead_letters WHERE feed = $1 AND id = $2",
                &[&feed.to_string(), &i64::try_from(id).unwrap_or(i64::MAX)],
            )
            .await
            .map_err(backend)?;
        Ok(removed > 0)
    }
}

// --- Dead letters ---

/// The dead letters, beside the cursors (`ViewStore::record_dead_letter`).
const DEAD_LETTERS_TABLE: &str = "CREATE TABLE IF NOT EXISTS headwater_dead_letters (
    id BIGSERIAL PRIMARY KEY,
    feed TEXT NOT NULL,
    subject TEXT COLLATE \"C\",
    sequence BIGINT,
    event_id TEXT,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    transport TEXT NOT NULL,
    body BYTEA,
    first_at_ms BIGINT NOT NULL,
    last_at_ms BIGINT NOT NULL,
    count BIGINT NOT NULL,
    UNIQUE (feed, subject, sequence));
CREATE INDEX IF NOT EXISTS headwater_dead_letters_feed ON headwater_dead_letters (feed, id);";
