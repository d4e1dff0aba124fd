//! [`PgFeedStore`]: the feeds of a service on PostgreSQL, in the same schema as its log.
//!
//! - A commit is one transaction, sent in one flight: `BEGIN`, `SELECT feed_commit(…)` (see
//!   `schema::FEEDS`: lock the feed's row, compare the cursor, number and insert the whole
//!   batch from column arrays, move the subjects' heads, the feed's head and cursor, notify) and
//!   `COMMIT`. A batch of 10,000 events is one round trip.
//! - Feed heads are watched by the store's head listener (`head.rs`): it `LISTEN`s on the
//!   channel `<schema>.feeds` too, whose payload is `<feed> <head>`, and its fallback poll reads
//!   every feed's head while some feed is watched. So a commit by another replica wakes long
//!   polls here.
//! - Reads are single statements on the read pool; a page is the key range (positions of the
//!   feed, or sequences of the subject, both contiguous) that fits the page's limits.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use headwater_core::{
    EventId, EventType, FeedId, FeedName, FeedPosition, FeedStatus, FeedVersion, Position,
    Sequence, Subject, Timestamp,
};
use headwater_store::{
    FeedCommit, FeedError, FeedEvent, FeedReader, FeedState, FeedStore, ProjectorBatch,
    PublisherCursor, ReaderSeen, SubjectHead, validate_batch, validate_feed_limit,
    validate_publisher_advance, validate_publisher_name, validate_subject_limit,
};
use tokio::sync::{Notify, watch};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::reader::{micros_since_epoch, to_i64, to_u64};
use crate::schema::{CURSOR_MOVED_SQLSTATE, UNKNOWN_FEED_SQLSTATE};
use crate::{PgError, PostgresStore, page_bytes_max};

/// The latest time an integration event may carry, in microseconds since the Unix epoch: the
/// end of the year 9999 (PostgreSQL's `timestamptz` goes further, but not to `u64::MAX`).
pub const FEED_TIME_MICROS_MAX: u64 = 253_402_300_799_999_999;

/// What the feed store shares among the clones of one [`PostgresStore`]: the head watches
/// (moved by commits here and by the head listener) and the feeds' row ids.
#[derive(Debug, Default)]
pub(crate) struct FeedShared {
    watches: Mutex<HashMap<FeedId, watch::Sender<FeedPosition>>>,
    /// Feed ids never change once registered (the store never deletes a feed).
    ids: Mutex<HashMap<FeedId, i32>>,
    /// Asks the head listener to read every feed's head now: a new watch wants its start.
    pub(crate) poll_now: Notify,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section below is a map insert or lookup: a panic cannot leave it torn.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl FeedShared {
    /// Moves the feed's watch forward to `head` (never back), if anyone watches it.
    pub(crate) fn advance(&self, feed: &FeedId, head: FeedPosition) {
        if let Some(watch) = lock(&self.watches).get(feed) {
            watch.send_if_modified(|current| {
                let moved = head > *current;
                if moved {
                    *current = head;
                }
                moved
            });
        }
    }

    /// Moves the feed's watch forward to `head`, creating it if nobody watched the feed yet: a
    /// later [`PgFeedStore::watch_head`] then starts right there.
    pub(crate) fn seen(&self, feed: &FeedId, head: FeedPosition) {
        let mut watches = lock(&self.watches);
        match watches.get(feed) {
            Some(watch) => {
                watch.send_if_modified(|current| {
                    let moved = head > *current;
                    if moved {
                        *current = head;
                    }
                    moved
                });
            }
            None => {
                watches.insert(feed.clone(), watch::channel(head).0);
            }
        }
    }

    /// Starts a watch for every feed of a row set `(name, version, head)` (at `connect`).
    pub(crate) fn preload(&self, rows: &[Row]) {
        for (feed, head) in rows.iter().filter_map(head_from_row) {
            self.seen(&feed, head);
        }
    }

    /// Whether some feed is watched (the listener polls the feeds' heads only then).
    pub(crate) fn watching(&self) -> bool {
        !lock(&self.watches).is_empty()
    }

    /// Parses a notification's payload, `<feed> <head>`, and moves that feed's watch.
    pub(crate) fn notified(&self, payload: &str) {
        let Some((feed, head)) = payload.rsplit_once(' ') else {
            return;
        };
        if let (Ok(feed), Ok(head)) = (FeedId::parse(feed), head.parse::<u64>()) {
            self.advance(&feed, FeedPosition(head));
        }
    }

    /// Moves the watches to the heads of a row set `(name, version, head)` (the listener's poll).
    pub(crate) fn polled(&self, rows: &[Row]) {
        for (feed, head) in rows.iter().filter_map(head_from_row) {
            self.advance(&feed, head);
        }
    }
}

/// A feed and its head from a row `(name, version, head)`; `None` if the row is not one.
fn head_from_row(row: &Row) -> Option<(FeedId, FeedPosition)> {
    let name: String = row.try_get(0).ok()?;
    let version: i64 = row.try_get(1).ok()?;
    let head: i64 = row.try_get(2).ok()?;
    Some((feed_id(&name, version)?, FeedPosition(to_u64(head)?)))
}

fn feed_id(name: &str, version: i64) -> Option<FeedId> {
    let name = FeedName::new(name).ok()?;
    let version = FeedVersion::new(u32::try_from(version).ok()?)?;
    Some(FeedId::new(name, version))
}

/// A [`FeedStore`] on PostgreSQL, in the schema of the [`PostgresStore`] it was made from
/// ([`PostgresStore::feed_store`]); it shares that store's read pool and head listener. Clones
/// share everything.
///
/// Feeds are never deleted by the store; each handle caches the row ids of the feeds it used. An
/// operator who deletes a feed's rows by hand must restart the service's replicas.
///
/// # Durability
/// A commit (and a publisher's advance) returns `Ok` after its transaction committed with
/// `synchronous_commit = on` (set for the transaction whatever the server's default): PostgreSQL
/// flushed its WAL. `register`,
/// `set_status` and `record_readers` are single autocommitted statements, durable as the
/// server's `synchronous_commit` says.
///
/// # Cancel safety
/// Reads are cancel safe. A write (`register`, `set_status`, `commit`, `record_readers`,
/// `advance_publisher`) dropped
/// after its first poll may still be applied: its statements are on their way to the server.
#[derive(Clone, Debug)]
pub struct PgFeedStore {
    store: PostgresStore,
}

impl PostgresStore {
    /// The feed store in this store's schema (its tables come with the schema's migrations).
    pub fn feed_store(&self) -> PgFeedStore {
        PgFeedStore {
            store: self.clone(),
        }
    }
}

fn backend(error: tokio_postgres::Error) -> FeedError {
    FeedError::backend(PgError(error))
}

fn sql_state(error: &tokio_postgres::Error) -> Option<&str> {
    error.as_db_error().map(|db| db.code().code())
}

fn timestamp(time: SystemTime) -> Timestamp {
    Timestamp::from_unix_micros(micros_since_epoch(time))
}

fn system_time(time: Timestamp) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(time.unix_micros().min(FEED_TIME_MICROS_MAX))
}

fn corrupt(feed: &FeedId, detail: String) -> FeedError {
    FeedError::Corrupt {
        feed: feed.clone(),
        detail,
    }
}

/// Reads a feed event from a row with the columns of [`crate::schema::FEED_EVENT_COLUMNS`].
fn event_from_row(feed: &FeedId, row: &Row) -> Result<FeedEvent, FeedError> {
    let db = |e: tokio_postgres::Error| backend(e);
    let position: i64 = row.try_get(0).map_err(db)?;
    let bad = |what: &str, value: &dyn std::fmt::Display| {
        corrupt(feed, format!("feed position {position}: {what} {value}"))
    };
    let position_u = to_u64(position).ok_or_else(|| bad("position", &position))?;
    let sequence: i64 = row.try_get(1).map_err(db)?;
    let sequence = to_u64(sequence).ok_or_else(|| bad("sequence", &sequence))?;
    let id: Uuid = row.try_get(2).map_err(db)?;
    let event_type: String = row.try_get(3).map_err(db)?;
    let event_type = EventType::new(event_type.as_str())
        .map_err(|e| bad("event type", &format!("{event_type:?}: {e}")))?;
    let subject: String = row.try_get(4).map_err(db)?;
    let subject =
        Subject::new(subject.as_str()).map_err(|e| bad("subject", &format!("{subject:?}: {e}")))?;
    let time: SystemTime = row.try_get(5).map_err(db)?;
    let data: Vec<u8> = row.try_get(6).map_err(db)?;
    let source: i64 = row.try_get(7).map_err(db)?;
    let source = to_u64(source).ok_or_else(|| bad("source position", &source))?;
    Ok(FeedEvent {
        position: FeedPosition(position_u),
        sequence: Sequence(sequence),
        id: EventId::from_uuid(id),
        event_type,
        subject,
        time: timestamp(time),
        data,
        source_position: Position(source),
    })
}

/// Reads a feed's id and state from a row with `id` and the columns of
/// [`crate::schema::FEED_COLUMNS`].
fn state_from_row(row: &Row) -> Result<(i32, FeedState), FeedError> {
    let db = |e: tokio_postgres::Error| backend(e);
    let id: i32 = row.try_get(0).map_err(db)?;
    let name: String = row.try_get(1).map_err(db)?;
    let version: i64 = row.try_get(2).map_err(db)?;
    let feed = feed_id(&name, version).ok_or_else(|| {
        FeedError::backend(format!(
            "the feeds table holds an invalid feed {name:?} version {version}"
        ))
    })?;
    let status: String = row.try_get(3).map_err(db)?;
    let status = FeedStatus::parse(&status)
        .map_err(|e| corrupt(&feed, format!("status {status:?}: {e}")))?;
    let head: i64 = row.try_get(4).map_err(db)?;
    let head = to_u64(head).ok_or_else(|| corrupt(&feed, format!("head {head}")))?;
    let cursor: i64 = row.try_get(5).map_err(db)?;
    let cursor = to_u64(cursor).ok_or_else(|| corrupt(&feed, format!("cursor {cursor}")))?;
    let registered_at: SystemTime = row.try_get(6).map_err(db)?;
    let live_at: Option<SystemTime> = row.try_get(7).map_err(db)?;
    Ok((
        id,
        FeedState {
            feed,
            status,
            head: FeedPosition(head),
            cursor: Position(cursor),
            registered_at: timestamp(registered_at),
            live_at: live_at.map(timestamp),
        },
    ))
}

/// The feed's events as column arrays, for `feed_commit`, numbered within the batch: each
/// event's subject as an index (from 1) into the batch's distinct subjects, and its rank (from
/// 1) among the batch's events of that subject. The server adds each subject's head.
#[derive(Default)]
struct Columns<'a> {
    ids: Vec<Uuid>,
    types: Vec<&'a str>,
    subjects: Vec<&'a str>,
    subject_indexes: Vec<i32>,
    ranks: Vec<i64>,
    times: Vec<SystemTime>,
    data: Vec<&'a [u8]>,
    sources: Vec<i64>,
    distinct_subjects: Vec<&'a str>,
}

impl<'a> Columns<'a> {
    fn of(batch: &'a ProjectorBatch) -> Result<Columns<'a>, FeedError> {
        let n = batch.events.len();
        let mut columns = Columns {
            ids: Vec::with_capacity(n),
            types: Vec::with_capacity(n),
            subjects: Vec::with_capacity(n),
            subject_indexes: Vec::with_capacity(n),
            ranks: Vec::with_capacity(n),
            times: Vec::with_capacity(n),
            data: Vec::with_capacity(n),
            sources: Vec::with_capacity(n),
            distinct_subjects: Vec::new(),
        };
        // Per subject: its index (from 1) and the events of it so far.
        let mut seen: HashMap<&str, (i32, i64)> = HashMap::new();
        for event in &batch.events {
            if event.time.unix_micros() > FEED_TIME_MICROS_MAX {
                return Err(FeedError::Invalid(format!(
                    "event {} has time {} µs after the epoch, later than {FEED_TIME_MICROS_MAX}",
                    event.id,
                    event.time.unix_micros()
                )));
            }
            let subject = event.subject.as_str();
            let next_index = columns.distinct_subjects.len() + 1;
            let (index, rank) = seen.entry(subject).or_insert_with(|| {
                // At most `COMMIT_EVENTS_MAX` subjects (validated): fits in i32.
                (i32::try_from(next_index).unwrap_or(i32::MAX), 0)
            });
            if *rank == 0 {
                columns.distinct_subjects.push(subject);
            }
            *rank += 1;
            columns.subject_indexes.push(*index);
            columns.ranks.push(*rank);
            columns.ids.push(*event.id.as_uuid());
            columns.types.push(event.event_type.as_str());
            columns.subjects.push(subject);
            columns.times.push(system_time(event.time));
            columns.data.push(event.data.as_slice());
            columns.sources.push(to_i64(event.source_position.0));
        }
        Ok(columns)
    }
}

impl PgFeedStore {
    fn shared(&self) -> &FeedShared {
        &self.store.inner.feeds
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, FeedError> {
        self.store
            .inner
            .pool
            .get()
            .await
            .map_err(FeedError::backend)
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, FeedError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(backend)?;
        client.query(&statement, params).await.map_err(backend)
    }

    /// The feed's row id, [`FeedError::UnknownFeed`] when it is not registered.
    async fn id(&self, feed: &FeedId) -> Result<i32, FeedError> {
        if let Some(id) = lock(&self.shared().ids).get(feed) {
            return Ok(*id);
        }
        let sql = &self.store.inner.target.sql.feeds;
        let rows = self
            .query(
                &sql.feed_id,
                &[&feed.name.as_str(), &i64::from(feed.version.get())],
            )
            .await?;
        let id: i32 = rows
            .first()
            .ok_or_else(|| FeedError::UnknownFeed(feed.clone()))?
            .try_get(0)
            .map_err(backend)?;
        lock(&self.shared().ids).insert(feed.clone(), id);
        Ok(id)
    }

    fn remember(&self, id: i32, state: &FeedState) {
        lock(&self.shared().ids).insert(state.feed.clone(), id);
        self.shared().seen(&state.feed, state.head);
    }
}

#[async_trait]
impl FeedStore for PgFeedStore {
    async fn register(&self, feed: &FeedId) -> Result<FeedState, FeedError> {
        let sql = &self.store.inner.target.sql.feeds;
        let version = i64::from(feed.version.get());
        self.query(&sql.register, &[&feed.name.as_str(), &version])
            .await?;
        // A second statement (a fresh snapshot): it sees the row whoever inserted it.
        let rows = self
            .query(&sql.feed, &[&feed.name.as_str(), &version])
            .await?;
        let row = rows.first().ok_or_else(|| {
            FeedError::backend(format!("feed {feed} is not there after registering it"))
        })?;
        let (id, state) = state_from_row(row)?;
        self.remember(id, &state);
        Ok(state)
    }

    async fn feeds(&self) -> Result<Vec<FeedState>, FeedError> {
        let sql = &self.store.inner.target.sql.feeds;
        let rows = self.query(&sql.feeds, &[]).await?;
        let mut feeds = Vec::with_capacity(rows.len());
        for row in &rows {
            let (id, state) = state_from_row(row)?;
            self.remember(id, &state);
            feeds.push(state);
        }
        // The table orders names by byte, versions as numbers: as `FeedId`'s `Ord` does.
        Ok(feeds)
    }

    async fn feed(&self, feed: &FeedId) -> Result<Option<FeedState>, FeedError> {
        let sql = &self.store.inner.target.sql.feeds;
        let version = i64::from(feed.version.get());
        let rows = self
            .query(&sql.feed, &[&feed.name.as_str(), &version])
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let (id, state) = state_from_row(row)?;
        self.remember(id, &state);
        Ok(Some(state))
    }

    async fn set_status(&self, feed: &FeedId, status: FeedStatus) -> Result<FeedState, FeedError> {
        let sql = &self.store.inner.target.sql.feeds;
        let version = i64::from(feed.version.get());
        let rows = self
            .query(
                &sql.set_status,
                &[&feed.name.as_str(), &version, &status.as_str()],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| FeedError::UnknownFeed(feed.clone()))?;
        let (id, state) = state_from_row(row)?;
        self.remember(id, &state);
        Ok(state)
    }

    /// # Durability
    /// On `Ok`, the transaction holding the batch and the cursor committed with
    /// `synchronous_commit = on`.
    ///
    /// # Cancel safety
    /// The whole transaction, `COMMIT` included, is sent on the first poll: dropping the future
    /// then does not stop it. The next commit from the same `from` tells (`CursorMoved`).
    async fn commit(&self, feed: &FeedId, batch: ProjectorBatch) -> Result<FeedCommit, FeedError> {
        validate_batch(&batch)?;
        let columns = Columns::of(&batch)?;
        let inner = &self.store.inner;
        let sql = &inner.target.sql.feeds;
        let name = feed.name.as_str();
        let version = i64::from(feed.version.get());
        let from = to_i64(batch.from.0);
        let to = to_i64(batch.to.0);
        let params: [&(dyn ToSql + Sync); 14] = [
            &name,
            &version,
            &from,
            &to,
            &columns.ids,
            &columns.types,
            &columns.subjects,
            &columns.subject_indexes,
            &columns.ranks,
            &columns.times,
            &columns.data,
            &columns.sources,
            &columns.distinct_subjects,
            &sql.channel,
        ];
        let client = self.client().await?;
        let statement = client.prepare_cached(&sql.commit).await.map_err(backend)?;
        // One flight. After a failed statement the pipelined COMMIT ends the aborted
        // transaction (as a rollback), so the connection goes back to the pool clean.
        let (began, committed, ended) = tokio::join!(
            client.batch_execute(&inner.feed_begin),
            client.query_one(&statement, &params),
            client.batch_execute("COMMIT"),
        );
        began.map_err(backend)?;
        let row = match committed {
            Ok(row) => row,
            Err(e) if sql_state(&e) == Some(CURSOR_MOVED_SQLSTATE) => {
                let actual = e
                    .as_db_error()
                    .and_then(|db| db.detail())
                    .and_then(|d| d.parse::<u64>().ok())
                    .ok_or_else(|| backend(e))?;
                return Err(FeedError::CursorMoved {
                    feed: feed.clone(),
                    expected: batch.from,
                    actual: Position(actual),
                });
            }
            Err(e) if sql_state(&e) == Some(UNKNOWN_FEED_SQLSTATE) => {
                return Err(FeedError::UnknownFeed(feed.clone()));
            }
            Err(e) => return Err(backend(e)),
        };
        ended.map_err(backend)?;
        let head: i64 = row.try_get(0).map_err(backend)?;
        let head = FeedPosition(
            to_u64(head).ok_or_else(|| corrupt(feed, format!("feed_commit answered {head}")))?,
        );
        self.shared().advance(feed, head);
        Ok(FeedCommit {
            head,
            cursor: batch.to,
        })
    }

    async fn read_feed(
        &self,
        feed: &FeedId,
        after: FeedPosition,
        limit: u64,
    ) -> Result<Vec<FeedEvent>, FeedError> {
        let limit = to_i64(validate_feed_limit(limit)?);
        let id = self.id(feed).await?;
        let sql = &self.store.inner.target.sql.feeds;
        let rows = self
            .query(
                &sql.read_feed,
                &[&id, &to_i64(after.0), &limit, &page_bytes_max()],
            )
            .await?;
        rows.iter().map(|r| event_from_row(feed, r)).collect()
    }

    async fn subjects(
        &self,
        feed: &FeedId,
        after: Option<&Subject>,
        limit: u64,
    ) -> Result<Vec<SubjectHead>, FeedError> {
        let limit = to_i64(validate_subject_limit(limit)?);
        let id = self.id(feed).await?;
        let sql = &self.store.inner.target.sql.feeds;
        // Every subject is at least one byte: all of them sort after "".
        let after = after.map_or("", Subject::as_str);
        let rows = self.query(&sql.subjects, &[&id, &after, &limit]).await?;
        rows.iter()
            .map(|row| {
                let subject: String = row.try_get(0).map_err(backend)?;
                let sequence: i64 = row.try_get(1).map_err(backend)?;
                let bad = || corrupt(feed, format!("subject head {subject:?} at {sequence}"));
                Ok(SubjectHead {
                    subject: Subject::new(subject.as_str()).map_err(|_| bad())?,
                    sequence: Sequence(to_u64(sequence).ok_or_else(bad)?),
                })
            })
            .collect()
    }

    async fn read_subject(
        &self,
        feed: &FeedId,
        subject: &Subject,
        after: Sequence,
        limit: u64,
    ) -> Result<Vec<FeedEvent>, FeedError> {
        let limit = to_i64(validate_feed_limit(limit)?);
        let id = self.id(feed).await?;
        let sql = &self.store.inner.target.sql.feeds;
        let rows = self
            .query(
                &sql.read_subject,
                &[
                    &id,
                    &subject.as_str(),
                    &to_i64(after.0),
                    &limit,
                    &page_bytes_max(),
                ],
            )
            .await?;
        rows.iter().map(|r| event_from_row(feed, r)).collect()
    }

    fn watch_head(&self, feed: &FeedId) -> watch::Receiver<FeedPosition> {
        let shared = self.shared();
        let mut watches = lock(&shared.watches);
        if let Some(watch) = watches.get(feed) {
            return watch.subscribe();
        }
        let (sender, receiver) = watch::channel(FeedPosition::START);
        watches.insert(feed.clone(), sender);
        drop(watches);
        // Every feed known at `connect`, or registered or read since, has its watch already.
        // For another one the listener reads every feed's head now (and again every poll
        // interval), which starts this watch at the feed's head; notifications move it on.
        shared.poll_now.notify_one();
        receiver
    }

    async fn record_readers(&self, seen: Vec<ReaderSeen>) -> Result<(), FeedError> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut names = Vec::with_capacity(seen.len());
        let mut versions = Vec::with_capacity(seen.len());
        let mut readers = Vec::with_capacity(seen.len());
        let mut ats = Vec::with_capacity(seen.len());
        let mut reads = Vec::with_capacity(seen.len());
        for s in &seen {
            if s.reader.contains('\0') {
                return Err(FeedError::Invalid(
                    "a reader name holds a NUL character".to_owned(),
                ));
            }
            names.push(s.feed.name.as_str());
            versions.push(i64::from(s.feed.version.get()));
            readers.push(s.reader.as_str());
            ats.push(system_time(s.at));
            reads.push(to_i64(s.reads));
        }
        let sql = &self.store.inner.target.sql.feeds;
        self.query(
            &sql.record_readers,
            &[&names, &versions, &readers, &ats, &reads],
        )
        .await?;
        Ok(())
    }

    async fn readers(&self, feed: &FeedId) -> Result<Vec<FeedReader>, FeedError> {
        let id = self.id(feed).await?;
        let sql = &self.store.inner.target.sql.feeds;
        let rows = self.query(&sql.readers, &[&id]).await?;
        rows.iter()
            .map(|row| {
                let reads: i64 = row.try_get(3).map_err(backend)?;
                Ok(FeedReader {
                    reader: row.try_get(0).map_err(backend)?,
                    first_read_at: timestamp(row.try_get(1).map_err(backend)?),
                    last_read_at: timestamp(row.try_get(2).map_err(backend)?),
                    reads: to_u64(reads).unwrap_or(0),
                })
            })
            .collect()
    }

    /// One statement in one flight (`BEGIN`, the compare-and-set upsert of
    /// `FeedSql::advance_publisher`, `COMMIT`); a refused advance whose snapshot saw the cursor
    /// at `from` (a concurrent advance won) reads the cursor again for its error.
    ///
    /// # Durability
    /// On `Ok`, the transaction committed with `synchronous_commit = on`. `updated_at` is the
    /// server's clock (`now()`), as the feeds' other times are.
    ///
    /// # Cancel safety
    /// The whole transaction is sent on the first poll: dropping the future then does not stop
    /// it. The next advance from the same `from` tells (`PublisherMoved`).
    async fn advance_publisher(
        &self,
        feed: &FeedId,
        publisher: &str,
        from: FeedPosition,
        to: FeedPosition,
    ) -> Result<PublisherCursor, FeedError> {
        // The head is checked in the statement; this is the rest of the validation (as the
        // other stores do, an unknown feed is told before an invalid advance).
        if let Err(invalid) = validate_publisher_advance(feed, publisher, from, to, to.max(from)) {
            self.id(feed).await?;
            return Err(invalid);
        }
        let inner = &self.store.inner;
        let sql = &inner.target.sql.feeds;
        let name = feed.name.as_str();
        let version = i64::from(feed.version.get());
        let (from_i, to_i) = (to_i64(from.get()), to_i64(to.get()));
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&sql.advance_publisher)
            .await
            .map_err(backend)?;
        let params: [&(dyn ToSql + Sync); 5] = [&name, &version, &publisher, &from_i, &to_i];
        let (began, advanced, ended) = tokio::join!(
            client.batch_execute(&inner.feed_begin),
            client.query(&statement, &params),
            client.batch_execute("COMMIT"),
        );
        began.map_err(backend)?;
        let rows = advanced.map_err(backend)?;
        ended.map_err(backend)?;
        let row = rows
            .first()
            .ok_or_else(|| FeedError::UnknownFeed(feed.clone()))?;
        let position = |value: i64| {
            to_u64(value)
                .map(FeedPosition)
                .ok_or_else(|| corrupt(feed, format!("publisher {publisher} at {value}")))
        };
        let head = position(row.try_get(0).map_err(backend)?)?;
        let seen: Option<i64> = row.try_get(1).map_err(backend)?;
        let moved: Option<i64> = row.try_get(2).map_err(backend)?;
        let updated_at: Option<SystemTime> = row.try_get(3).map_err(backend)?;
        if let (Some(moved), Some(updated_at)) = (moved, updated_at) {
            return Ok(PublisherCursor {
                publisher: publisher.to_owned(),
                position: position(moved)?,
                updated_at: timestamp(updated_at),
            });
        }
        validate_publisher_advance(feed, publisher, from, to, head)?;
        let mut actual = seen
            .map(position)
            .transpose()?
            .unwrap_or(FeedPosition::START);
        if actual == from {
            // The snapshot was older than the advance that won: read the cursor it left.
            let id: i32 = row_id(&self.query(&sql.feed_id, &[&name, &version]).await?, feed)?;
            let rows = self.query(&sql.publisher, &[&id, &publisher]).await?;
            if let Some(row) = rows.first() {
                actual = position(row.try_get(0).map_err(backend)?)?;
            }
        }
        Err(FeedError::PublisherMoved {
            feed: feed.clone(),
            publisher: publisher.to_owned(),
            expected: from,
            actual,
        })
    }

    async fn publishers(&self, feed: &FeedId) -> Result<Vec<PublisherCursor>, FeedError> {
        let id = self.id(feed).await?;
        let sql = &self.store.inner.target.sql.feeds;
        let rows = self.query(&sql.publishers, &[&id]).await?;
        rows.iter()
            .map(|row| {
                let publisher: String = row.try_get(0).map_err(backend)?;
                let position: i64 = row.try_get(1).map_err(backend)?;
                let updated_at: SystemTime = row.try_get(2).map_err(backend)?;
                let bad = || corrupt(feed, format!("publisher {publisher:?} at {position}"));
                validate_publisher_name(&publisher).map_err(|_| bad())?;
                Ok(PublisherCursor {
                    position: FeedPosition(to_u64(position).ok_or_else(bad)?),
                    publisher,
                    updated_at: timestamp(updated_at),
                })
            })
            .collect()
    }
}

/// The feed's id from a `feed_id` row set.
fn row_id(rows: &[Row], feed: &FeedId) -> Result<i32, FeedError> {
    rows.first()
        .ok_or_else(|| FeedError::UnknownFeed(feed.clone()))?
        .try_get(0)
        .map_err(backend)
}
