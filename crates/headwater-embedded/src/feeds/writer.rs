//! The feeds' writer: one thread owns the feeds file's write connection and runs every write
//! (registrations, status changes, projector commits, reader records) as one transaction each.
//!
//! It keeps every feed's row in memory (exact: it is the only writer) and a bounded cache of
//! subjects' ids and heads, so that a commit of a backfill batch looks up only the subjects it
//! has not seen lately.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use headwater_core::{FeedId, FeedPosition, FeedStatus, Position, Subject, Timestamp};
use headwater_store::{
    FeedCommit, FeedError, FeedState, ProjectorBatch, PublisherCursor, ReaderSeen,
    validate_publisher_advance,
};
use rusqlite::{Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot, watch};

use super::Shared;
use super::schema::{
    FEED_POSITION_MAX, FEEDS_MAX, FeedEventFields, FeedRow, INSERT_FEED_EVENT,
    INSERT_SUBJECT_EVENT, SELECT_SUBJECT_HEAD, event_key, publisher_crc, reader_crc, subject_crc,
};
use crate::checkpoint::Checkpointer;

/// The most subjects whose id and head the writer caches (about 100 bytes each, plus the name).
const SUBJECT_CACHE_ENTRIES_MAX: usize = 262_144;

/// One write waiting for the writer. Batches were validated before they were queued.
#[derive(Debug)]
pub(crate) enum Request {
    Register {
        feed: FeedId,
        reply: oneshot::Sender<Result<FeedState, FeedError>>,
    },
    SetStatus {
        feed: FeedId,
        status: FeedStatus,
        reply: oneshot::Sender<Result<FeedState, FeedError>>,
    },
    Commit {
        feed: FeedId,
        batch: ProjectorBatch,
        reply: oneshot::Sender<Result<FeedCommit, FeedError>>,
    },
    RecordReaders {
        seen: Vec<ReaderSeen>,
        reply: oneshot::Sender<Result<(), FeedError>>,
    },
    AdvancePublisher {
        feed: FeedId,
        publisher: String,
        from: FeedPosition,
        to: FeedPosition,
        reply: oneshot::Sender<Result<PublisherCursor, FeedError>>,
    },
}

/// Why the writer refuses writes: an earlier transaction failed.
#[derive(Debug, thiserror::Error)]
#[error(
    "an earlier write to the feeds failed ({0}); the feeds refuse writes until the store is reopened"
)]
pub(crate) struct Poisoned(String);

/// A subject's row id and head, as the writer caches them.
#[derive(Clone, Copy, Debug)]
struct SubjectState {
    id: i64,
    head: u64,
}

pub(crate) struct FeedWriter {
    pub(crate) conn: Connection,
    pub(crate) checkpointer: Option<Checkpointer>,
    /// Every feed's row, by feed.
    pub(crate) feeds: HashMap<FeedId, FeedRow>,
    pub(crate) next_feed_id: i64,
    pub(crate) next_subject_id: i64,
    /// Per feed row id, subjects' ids and heads; bounded, cleared when a write fails.
    subjects: HashMap<i64, HashMap<Subject, SubjectState>>,
    subjects_cached: usize,
    pub(crate) shared: Arc<Shared>,
    pub(crate) log_head: watch::Receiver<Position>,
    /// Why writes are refused, once a transaction failed.
    poisoned: Option<String>,
}

fn sql(e: rusqlite::Error) -> FeedError {
    FeedError::backend(e)
}

fn int(value: u64) -> i64 {
    // Every counter stored was checked against a bound below 2^63.
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) fn now() -> Timestamp {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    Timestamp::from_unix_micros(u64::try_from(micros).unwrap_or(0).min(i64::MAX as u64))
}

impl FeedWriter {
    pub(crate) fn new(
        conn: Connection,
        checkpointer: Checkpointer,
        feeds: HashMap<FeedId, FeedRow>,
        next_feed_id: i64,
        next_subject_id: i64,
        shared: Arc<Shared>,
        log_head: watch::Receiver<Position>,
    ) -> FeedWriter {
        FeedWriter {
            conn,
            checkpointer: Some(checkpointer),
            feeds,
            next_feed_id,
            next_subject_id,
            subjects: HashMap::new(),
            subjects_cached: 0,
            shared,
            log_head,
            poisoned: None,
        }
    }

    /// Serves writes until every sender is gone, then checkpoints the WAL and closes. (The
    /// directory lock outlives this thread: the log's writer holds it until the last handle,
    /// feed stores included, is gone.)
    pub(crate) fn run(mut self, mut queue: mpsc::Receiver<Request>) {
        while let Some(request) = queue.blocking_recv() {
            match request {
                Request::Register { feed, reply } => {
                    let _ = reply.send(self.register(&feed));
                }
                Request::SetStatus {
                    feed,
                    status,
                    reply,
                } => {
                    let _ = reply.send(self.set_status(&feed, status));
                }
                Request::Commit { feed, batch, reply } => {
                    let _ = reply.send(self.commit(&feed, batch));
                }
                Request::RecordReaders { seen, reply } => {
                    let _ = reply.send(self.record_readers(seen));
                }
                Request::AdvancePublisher {
                    feed,
                    publisher,
                    from,
                    to,
                    reply,
                } => {
                    let _ = reply.send(self.advance_publisher(&feed, &publisher, from, to));
                }
            }
        }
        if let Some(mut checkpointer) = self.checkpointer.take() {
            let _ = self
                .conn
                .wal_hook(None::<fn(&mut rusqlite::hooks::Wal, i32) -> rusqlite::Result<()>>);
            checkpointer.stop();
        }
        if self.poisoned.is_none() {
            let _ = self
                .conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        }
    }

    fn check_poisoned(&self) -> Result<(), FeedError> {
        match &self.poisoned {
            None => Ok(()),
            Some(why) => Err(FeedError::backend(Poisoned(why.clone()))),
        }
    }

    /// Runs `write` in one `BEGIN IMMEDIATE … COMMIT`. On any failure it rolls back and poisons
    /// the writer (never retried: after a failed fsync the file's state is unknown).
    fn transaction<T>(
        &mut self,
        write: impl FnOnce(&mut FeedWriter) -> Result<T, FeedError>,
    ) -> Result<T, FeedError> {
        self.check_poisoned()?;
        let result = self
            .conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(sql)
            .and_then(|()| write(self))
            .and_then(|value| {
                self.conn
                    .execute_batch("COMMIT")
                    .map_err(sql)
                    .map(|()| value)
            });
        if let Err(error) = &result {
            let _ = self.conn.execute_batch("ROLLBACK");
            self.poisoned = Some(error.to_string());
            self.subjects.clear();
            self.subjects_cached = 0;
        }
        result
    }

    fn write_feed_row(&self, row: &FeedRow) -> Result<(), FeedError> {
        let s = &row.state;
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO feeds (id, name, version, status, head, cursor, \
                 registered_at, live_at, crc) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .and_then(|mut insert| {
                insert.execute(rusqlite::params![
                    row.id,
                    s.feed.name.as_str(),
                    i64::from(s.feed.version.get()),
                    s.status.as_str(),
                    int(s.head.get()),
                    int(s.cursor.0),
                    int(s.registered_at.unix_micros()),
                    s.live_at.map(|t| int(t.unix_micros())),
                    i64::from(row.crc()),
                ])
            })
            .map_err(sql)?;
        Ok(())
    }

    fn register(&mut self, feed: &FeedId) -> Result<FeedState, FeedError> {
        if let Some(row) = self.feeds.get(feed) {
            return Ok(row.state.clone());
        }
        let id = self.next_feed_id;
        if id > FEEDS_MAX {
            return Err(FeedError::Invalid(format!(
                "the store holds {FEEDS_MAX} feeds, the most it can"
            )));
        }
        let row = FeedRow {
            id,
            state: FeedState {
                feed: feed.clone(),
                status: FeedStatus::Backfilling,
                head: FeedPosition::START,
                cursor: Position::START,
                registered_at: now(),
                live_at: None,
            },
        };
        self.transaction(|w| w.write_feed_row(&row))?;
        self.next_feed_id += 1;
        self.shared.known(feed, id);
        self.shared.publish(feed, FeedPosition::START);
        self.feeds.insert(feed.clone(), row.clone());
        Ok(row.state)
    }

    fn set_status(&mut self, feed: &FeedId, status: FeedStatus) -> Result<FeedState, FeedError> {
        let mut row = self
            .feeds
            .get(feed)
            .cloned()
            .ok_or_else(|| FeedError::UnknownFeed(feed.clone()))?;
        row.state.status = status;
        if status == FeedStatus::Live && row.state.live_at.is_none() {
            row.state.live_at = Some(now());
        }
        self.transaction(|w| w.write_feed_row(&row))?;
        self.feeds.insert(feed.clone(), row.clone());
        Ok(row.state)
    }

    fn commit(&mut self, feed: &FeedId, batch: ProjectorBatch) -> Result<FeedCommit, FeedError> {
        let row = self
            .feeds
            .get(feed)
            .cloned()
            .ok_or_else(|| FeedError::UnknownFeed(feed.clone()))?;
        if row.state.cursor != batch.from {
            return Err(FeedError::CursorMoved {
                feed: feed.clone(),
                expected: batch.from,
                actual: row.state.cursor,
            });
        }
        let log_head = *self.log_head.borrow();
        if batch.to > log_head {
            return Err(FeedError::Invalid(format!(
                "the batch moves the cursor of {feed} to {}, past the log's head {log_head}",
                batch.to
            )));
        }
        let head = row.state.head.get();
        let new_head = head + batch.events.len() as u64;
        if new_head > FEED_POSITION_MAX {
            return Err(FeedError::Invalid(format!(
                "feed {feed} would pass its last position {FEED_POSITION_MAX}"
            )));
        }
        if let Some(event) = batch
            .events
            .iter()
            .find(|e| e.time.unix_micros() > i64::MAX as u64)
        {
            return Err(FeedError::Invalid(format!(
                "event {} has a time past what the store records",
                event.id
            )));
        }
        let unchanged = FeedCommit {
            head: row.state.head,
            cursor: row.state.cursor,
        };
        if batch.to == batch.from && batch.events.is_empty() {
            return Ok(unchanged);
        }
        let mut new_row = row.clone();
        new_row.state.head = FeedPosition(new_head);
        new_row.state.cursor = batch.to;
        let touched = self.transaction(|w| w.write_batch(&new_row, head, &batch))?;
        self.remember(row.id, touched);
        self.feeds.insert(feed.clone(), new_row);
        if new_head != head {
            self.shared.publish(feed, FeedPosition(new_head));
        }
        Ok(FeedCommit {
            head: FeedPosition(new_head),
            cursor: batch.to,
        })
    }

    /// Writes a batch's events, its subjects' heads and the feed's row. Returns the subjects'
    /// new states, for the cache once the transaction commits.
    fn write_batch(
        &mut self,
        row: &FeedRow,
        head: u64,
        batch: &ProjectorBatch,
    ) -> Result<Vec<(Subject, SubjectState)>, FeedError> {
        let feed_id = row.id;
        // Each subject of the batch: its row id, head before the batch, next sequence, and
        // whether its row is new.
        let mut touched: HashMap<&Subject, (SubjectState, u64, bool)> = HashMap::new();
        let mut index: Vec<(i64, i64, i64)> = Vec::new();
        // The batch's subjects in byte order: lookups walk the subjects' index left to right,
        // and new subjects get ids (and index entries) in that order.
        let mut distinct: Vec<&Subject> = batch.events.iter().map(|e| &e.subject).collect();
        distinct.sort_unstable();
        distinct.dedup();
        for subject in &distinct {
            let cached = self
                .subjects
                .get(&feed_id)
                .and_then(|m| m.get(*subject))
                .copied();
            let state = match cached {
                Some(state) => Some(state),
                None => self.load_subject(feed_id, &row.state.feed, subject)?,
            };
            let entry = match state {
                Some(state) => (state, state.head, false),
                None => {
                    let id = self.next_subject_id;
                    self.next_subject_id += 1;
                    (SubjectState { id, head: 0 }, 0, true)
                }
            };
            touched.insert(subject, entry);
        }
        {
            let mut insert = self.conn.prepare_cached(INSERT_FEED_EVENT).map_err(sql)?;
            let mut position = head;
            index.reserve(batch.events.len());
            for event in &batch.events {
                position += 1;
                let (state, next, _) = touched
                    .get_mut(&event.subject)
                    .expect("every subject was looked up");
                *next += 1;
                let fields = FeedEventFields {
                    key: event_key(feed_id, position),
                    subject_id: state.id,
                    sequence: int(*next),
                    event_id: event.id.as_bytes(),
                    event_type: event.event_type.as_str().as_bytes(),
                    subject: event.subject.as_str().as_bytes(),
                    time: int(event.time.unix_micros()),
                    data: &event.data,
                    source_position: int(event.source_position.0),
                };
                insert
                    .execute(rusqlite::params![
                        fields.key,
                        fields.subject_id,
                        fields.sequence,
                        fields.event_id,
                        event.event_type.as_str(),
                        event.subject.as_str(),
                        fields.time,
                        fields.data,
                        fields.source_position,
                        i64::from(fields.crc()),
                    ])
                    .map_err(sql)?;
                index.push((fields.subject_id, fields.sequence, fields.key));
            }
        }
        // The subject index, in its own order: the inserts walk its B-tree once, left to right,
        // instead of jumping to a random leaf per event.
        index.sort_unstable();
        {
            let mut insert = self
                .conn
                .prepare_cached(INSERT_SUBJECT_EVENT)
                .map_err(sql)?;
            for entry in &index {
                insert.execute(*entry).map_err(sql)?;
            }
        }
        let mut states = Vec::with_capacity(touched.len());
        {
            let mut insert = self
                .conn
                .prepare_cached(
                    "INSERT INTO subjects (id, feed_id, subject, crc) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(sql)?;
            for subject in distinct {
                let (state, next, new) = touched[subject];
                if new {
                    let crc = subject_crc(state.id, feed_id, subject.as_str().as_bytes());
                    insert
                        .execute(rusqlite::params![
                            state.id,
                            feed_id,
                            subject.as_str(),
                            i64::from(crc)
                        ])
                        .map_err(sql)?;
                }
                states.push((
                    subject.clone(),
                    SubjectState {
                        id: state.id,
                        head: next,
                    },
                ));
            }
        }
        self.write_feed_row(row)?;
        Ok(states)
    }

    /// A subject's row id (its checksum checked) and head, from the database.
    fn load_subject(
        &self,
        feed_id: i64,
        feed: &FeedId,
        subject: &Subject,
    ) -> Result<Option<SubjectState>, FeedError> {
        let row: Option<(i64, i64)> = self
            .conn
            .prepare_cached("SELECT id, crc FROM subjects WHERE feed_id = ?1 AND subject = ?2")
            .and_then(|mut s| {
                s.query_row((feed_id, subject.as_str()), |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(sql)?;
        let Some((id, stored)) = row else {
            return Ok(None);
        };
        if stored != i64::from(subject_crc(id, feed_id, subject.as_str().as_bytes())) {
            return Err(FeedError::Corrupt {
                feed: feed.clone(),
                detail: format!("subject row {id} ({subject}): checksum mismatch"),
            });
        }
        let head: Option<i64> = self
            .conn
            .prepare_cached(SELECT_SUBJECT_HEAD)
            .and_then(|mut s| s.query_row([id], |r| r.get(0)))
            .map_err(sql)?;
        let head = u64::try_from(head.unwrap_or(0)).map_err(|_| FeedError::Corrupt {
            feed: feed.clone(),
            detail: format!("subject {subject} has a negative sequence"),
        })?;
        Ok(Some(SubjectState { id, head }))
    }

    fn remember(&mut self, feed_id: i64, states: Vec<(Subject, SubjectState)>) {
        if self.subjects_cached + states.len() > SUBJECT_CACHE_ENTRIES_MAX {
            self.subjects.clear();
            self.subjects_cached = 0;
        }
        let cache = self.subjects.entry(feed_id).or_default();
        for (subject, state) in states {
            if cache.insert(subject, state).is_none() {
                self.subjects_cached += 1;
            }
        }
    }

    fn record_readers(&mut self, seen: Vec<ReaderSeen>) -> Result<(), FeedError> {
        let seen: Vec<(i64, ReaderSeen)> = seen
            .into_iter()
            .filter_map(|s| self.feeds.get(&s.feed).map(|row| (row.id, s)))
            .collect();
        if seen.is_empty() {
            return Ok(());
        }
        self.transaction(|w| {
            for (feed_id, seen) in &seen {
                w.record_reader(*feed_id, seen)?;
            }
            Ok(())
        })
    }

    fn record_reader(&self, feed_id: i64, seen: &ReaderSeen) -> Result<(), FeedError> {
        let at = int(seen.at.unix_micros());
        let reader = seen.reader.as_bytes();
        let row: Option<(i64, i64, i64, i64)> = self
            .conn
            .prepare_cached(
                "SELECT first_read_at, last_read_at, reads, crc FROM readers \
                 WHERE feed_id = ?1 AND reader = ?2",
            )
            .and_then(|mut s| {
                s.query_row((feed_id, seen.reader.as_str()), |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()
            })
            .map_err(sql)?;
        let (first, last, reads) = match row {
            None => (at, at, 0),
            Some((first, last, reads, stored)) => {
                if stored != i64::from(reader_crc(feed_id, reader, first, last, reads)) {
                    return Err(FeedError::Corrupt {
                        feed: seen.feed.clone(),
                        detail: format!("the row of reader {:?}: checksum mismatch", seen.reader),
                    });
                }
                (first.min(at), last.max(at), reads)
            }
        };
        let reads = reads.saturating_add(int(seen.reads));
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO readers (feed_id, reader, first_read_at, last_read_at, \
                 reads, crc) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut s| {
                s.execute(rusqlite::params![
                    feed_id,
                    seen.reader.as_str(),
                    first,
                    last,
                    reads,
                    i64::from(reader_crc(feed_id, reader, first, last, reads)),
                ])
            })
            .map_err(sql)?;
        Ok(())
    }

    /// Moves a publisher's cursor by compare-and-set. The writer is the feeds file's only writer,
    /// so the cursor read here (its checksum checked) is the one the transaction replaces.
    fn advance_publisher(
        &mut self,
        feed: &FeedId,
        publisher: &str,
        from: FeedPosition,
        to: FeedPosition,
    ) -> Result<PublisherCursor, FeedError> {
        let row = self
            .feeds
            .get(feed)
            .ok_or_else(|| FeedError::UnknownFeed(feed.clone()))?;
        let feed_id = row.id;
        validate_publisher_advance(feed, publisher, from, to, row.state.head)?;
        self.check_poisoned()?;
        let stored: Option<(i64, i64, i64)> = self
            .conn
            .prepare_cached(
                "SELECT position, updated_at, crc FROM publishers \
                 WHERE feed_id = ?1 AND publisher = ?2",
            )
            .and_then(|mut s| {
                s.query_row((feed_id, publisher), |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()
            })
            .map_err(sql)?;
        let actual = match stored {
            None => FeedPosition::START,
            Some((position, updated_at, crc)) => {
                let computed = publisher_crc(feed_id, publisher.as_bytes(), position, updated_at);
                let position = u64::try_from(position).ok();
                match position {
                    Some(position) if crc == i64::from(computed) => FeedPosition(position),
                    _ => {
                        return Err(FeedError::Corrupt {
                            feed: feed.clone(),
                            detail: format!("the row of publisher {publisher:?} is damaged"),
                        });
                    }
                }
            }
        };
        if actual != from {
            return Err(FeedError::PublisherMoved {
                feed: feed.clone(),
                publisher: publisher.to_owned(),
                expected: from,
                actual,
            });
        }
        let cursor = PublisherCursor {
            publisher: publisher.to_owned(),
            position: to,
            updated_at: now(),
        };
        let position = int(to.get());
        let updated_at = int(cursor.updated_at.unix_micros());
        let crc = publisher_crc(feed_id, publisher.as_bytes(), position, updated_at);
        self.transaction(|w| {
            w.conn
                .prepare_cached(
                    "INSERT OR REPLACE INTO publishers (feed_id, publisher, position, \
                     updated_at, crc) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .and_then(|mut s| {
                    s.execute(rusqlite::params![
                        feed_id,
                        publisher,
                        position,
                        updated_at,
                        i64::from(crc)
                    ])
                })
                .map_err(sql)?;
            Ok(())
        })?;
        Ok(cursor)
    }
}
