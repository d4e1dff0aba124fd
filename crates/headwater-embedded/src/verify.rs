//! The operator's view of a store directory: [`inspect`] (a summary) and [`verify`] (a full
//! integrity check). Both open the database read-only and never take the directory lock, so they
//! work on a live store.
//!
//! # Reading a live or a closed store
//! Both open `events.sqlite3` with `SQLITE_OPEN_READONLY` and read inside one read transaction: a
//! consistent snapshot, even while the store's own process goes on appending (WAL readers never
//! block the writer; the writer's checkpoints cannot pass the snapshot while it is held, so a
//! long `verify` lets the WAL grow until it ends, and a store closed meanwhile waits up to its
//! busy timeout for its final `wal_checkpoint(TRUNCATE)`, then leaves the WAL to the next open).
//!
//! A read-only connection still needs the WAL's `-wal` and `-shm` files. When the store is open
//! elsewhere they exist and are used as they are. When it is closed, SQLite creates them, empty,
//! and leaves them behind (a read-only connection never checkpoints nor deletes the WAL); the next
//! [`EmbeddedStore::open`](crate::EmbeddedStore::open) uses and removes them as usual. So the
//! directory must be writable when the store is closed; the database file itself is never written.
//! After a crash the read-only connection rebuilds SQLite's WAL index (in `-shm`) from the WAL, and
//! sees exactly what the next open will see; nothing is checkpointed.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use headwater_core::{EventId, EventType, Position, StreamName, StreamVersion, Timestamp};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};

use crate::OpenError;
use crate::open::sqlite_error;
use crate::schema::{APPLICATION_ID, DATABASE_FILE, EventFields, FORMAT_VERSION};

/// How many categories [`Inspection::top_categories`] lists at most.
pub const TOP_CATEGORIES_MAX: usize = 20;
/// How many problems a [`VerifyReport`] records at most; it counts the rest in
/// [`VerifyReport::problems_found`].
pub const PROBLEMS_RECORDED_MAX: usize = 100;
/// [`verify`] reports its progress every this many rows.
pub const PROGRESS_INTERVAL_EVENTS: u64 = 10_000;
/// How long the read-only connection waits for a lock (SQLite's WAL recovery by another
/// connection), in milliseconds.
const BUSY_TIMEOUT_MILLIS: u64 = 5_000;

/// A summary of a store directory, from [`inspect`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Inspection {
    /// The database file inspected.
    pub path: PathBuf,
    /// The store's format version (`PRAGMA user_version`).
    pub format_version: i64,
    /// How many streams the store holds.
    pub streams: u64,
    /// How many events the store holds (rows counted).
    pub events: u64,
    /// The position of the last event ([`Position::START`] when empty).
    pub head: Position,
    /// When the first event (by position) was recorded.
    pub first_recorded_at: Option<Timestamp>,
    /// When the last event (by position) was recorded.
    pub last_recorded_at: Option<Timestamp>,
    /// The size of the store's files.
    pub files: FileSizes,
    /// How many categories the stream names have.
    pub categories: u64,
    /// The categories with the most events, most first (ties by name), at most
    /// [`TOP_CATEGORIES_MAX`].
    pub top_categories: Vec<CategoryCount>,
}

/// The size on disk of a store's files, in bytes; 0 for a missing file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileSizes {
    /// `events.sqlite3`.
    pub database_bytes: u64,
    /// `events.sqlite3-wal`: commits not yet copied into the database file.
    pub wal_bytes: u64,
    /// `events.sqlite3-shm`: SQLite's index of the WAL.
    pub shm_bytes: u64,
    /// The three together.
    pub total_bytes: u64,
}

/// One category's share of a store, in [`Inspection::top_categories`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CategoryCount {
    /// The category (`account` for `account-42`).
    pub category: String,
    /// How many streams it has.
    pub streams: u64,
    /// How many events its streams hold (the sum of their heads; [`verify`] checks that the heads
    /// match the events).
    pub events: u64,
}

/// Summarises the store in `dir` without changing it, without taking its lock: it works while
/// the store is open in another process (see the module's documentation for the files SQLite may
/// create). Counts come from one consistent snapshot.
///
/// Cost: counting the events reads the smallest index whole; the rest reads the `streams` table.
pub fn inspect(dir: &Path) -> Result<Inspection, OpenError> {
    let store = ReadOnly::open(dir)?;
    let path = store.path.clone();
    let err = sqlite_error(&path);
    let conn = &store.conn;
    conn.execute_batch("BEGIN").map_err(&err)?;
    let count = |sql: &str| -> Result<u64, OpenError> {
        let n: i64 = conn.query_row(sql, [], |row| row.get(0)).map_err(&err)?;
        Ok(u64::try_from(n).unwrap_or(0))
    };
    let streams = count("SELECT count(*) FROM streams")?;
    let events = count("SELECT count(*) FROM events")?;
    let recorded_at = |sql: &str| -> Result<(Option<u64>, Option<Timestamp>), OpenError> {
        let row: Option<(i64, i64)> = conn
            .query_row(sql, [], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()
            .map_err(&err)?;
        Ok(match row {
            None => (None, None),
            Some((position, at)) => (
                u64::try_from(position).ok(),
                u64::try_from(at).ok().map(Timestamp::from_unix_micros),
            ),
        })
    };
    let (_, first_recorded_at) =
        recorded_at("SELECT position, recorded_at FROM events ORDER BY position LIMIT 1")?;
    let (last, last_recorded_at) =
        recorded_at("SELECT position, recorded_at FROM events ORDER BY position DESC LIMIT 1")?;
    let categories = count(CATEGORY_COUNT)?;
    let mut top_categories = Vec::new();
    {
        let mut statement = conn.prepare(TOP_CATEGORIES).map_err(&err)?;
        let mut rows = statement.query([TOP_CATEGORIES_MAX as i64]).map_err(&err)?;
        while let Some(row) = rows.next().map_err(&err)? {
            let category = match row.get_ref(0).map_err(&err)? {
                ValueRef::Text(t) | ValueRef::Blob(t) => String::from_utf8_lossy(t).into_owned(),
                other => format!("{other:?}"),
            };
            let streams: i64 = row.get(1).map_err(&err)?;
            let events: Option<i64> = row.get(2).map_err(&err)?;
            top_categories.push(CategoryCount {
                category,
                streams: u64::try_from(streams).unwrap_or(0),
                events: events.and_then(|e| u64::try_from(e).ok()).unwrap_or(0),
            });
        }
    }
    conn.execute_batch("COMMIT").map_err(&err)?;
    let format_version = store.format_version;
    drop(store);
    Ok(Inspection {
        files: file_sizes(&path),
        path: path.clone(),
        format_version,
        streams,
        events,
        head: Position(last.unwrap_or(0)),
        first_recorded_at,
        last_recorded_at,
        categories,
        top_categories,
    })
}

/// The category of a stream name in SQL: everything before the first `-` (the whole name when
/// it has none, which `verify` reports).
macro_rules! category_of_name {
    () => {
        "CASE WHEN instr(name, '-') > 0 THEN substr(name, 1, instr(name, '-') - 1) ELSE name END"
    };
}

const CATEGORY_COUNT: &str = concat!(
    "SELECT count(DISTINCT ",
    category_of_name!(),
    ") FROM streams"
);

const TOP_CATEGORIES: &str = concat!(
    "SELECT ",
    category_of_name!(),
    " AS category, count(*), sum(head) FROM streams GROUP BY category ",
    "ORDER BY sum(head) DESC, category LIMIT ?1"
);

fn file_sizes(database: &Path) -> FileSizes {
    let size = |suffix: &str| {
        let mut name = database.as_os_str().to_owned();
        name.push(suffix);
        fs::metadata(PathBuf::from(name)).map_or(0, |m| m.len())
    };
    let database_bytes = size("");
    let wal_bytes = size("-wal");
    let shm_bytes = size("-shm");
    FileSizes {
        database_bytes,
        wal_bytes,
        shm_bytes,
        total_bytes: database_bytes + wal_bytes + shm_bytes,
    }
}

/// A read-only connection to a store's database whose format was checked.
struct ReadOnly {
    path: PathBuf,
    conn: Connection,
    format_version: i64,
}

impl ReadOnly {
    fn open(dir: &Path) -> Result<ReadOnly, OpenError> {
        let path = dir.join(DATABASE_FILE);
        // SQLite would report a missing file as "unable to open"; say what is missing.
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => {}
            Ok(_) => {
                return Err(OpenError::NotAStore {
                    path,
                    reason: "it is not a file".to_owned(),
                });
            }
            Err(source) => {
                return Err(OpenError::Io {
                    what: "opening",
                    path,
                    source,
                });
            }
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_EXRESCODE;
        let err = sqlite_error(&path);
        let conn = Connection::open_with_flags(&path, flags).map_err(&err)?;
        conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MILLIS))
            .map_err(&err)?;
        let application_id: i32 = conn
            .pragma_query_value(None, "application_id", |row| row.get(0))
            .map_err(&err)?;
        let format_version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(&err)?;
        let not_a_store = |reason: String| OpenError::NotAStore {
            path: path.clone(),
            reason,
        };
        if application_id == 0 {
            let objects: i64 = conn
                .query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))
                .map_err(&err)?;
            return Err(not_a_store(if objects == 0 {
                "the database is empty (the store was never initialised)".to_owned()
            } else {
                "the SQLite database has no Headwater application id".to_owned()
            }));
        }
        if application_id != APPLICATION_ID {
            return Err(not_a_store(format!(
                "the SQLite database has application id {application_id:#x}"
            )));
        }
        if format_version > i64::from(FORMAT_VERSION) {
            return Err(OpenError::NewerFormat {
                path: path.clone(),
                found: format_version,
                supported: i64::from(FORMAT_VERSION),
            });
        }
        if format_version < i64::from(FORMAT_VERSION) {
            return Err(not_a_store(format!(
                "unknown format version {format_version}"
            )));
        }
        Ok(ReadOnly {
            path: path.clone(),
            conn,
            format_version,
        })
    }
}

/// Where [`verify`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerifyStage {
    /// SQLite's own check of every page and index (`PRAGMA integrity_check`); no progress is
    /// reported inside it.
    IntegrityCheck,
    /// Every event in position order: positions, checksums, fields.
    Events,
    /// Every stream with its events in version order: versions and heads.
    Streams,
    /// Every event id, in id order: uniqueness.
    EventIds,
    /// The feeds file, when the store has one: its integrity check, every feed, feed event,
    /// subject and reader row (progress counts feed events).
    Feeds,
}

impl fmt::Display for VerifyStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VerifyStage::IntegrityCheck => "SQLite integrity check",
            VerifyStage::Events => "events",
            VerifyStage::Streams => "streams",
            VerifyStage::EventIds => "event ids",
            VerifyStage::Feeds => "feeds",
        })
    }
}

/// [`verify`]'s progress: `done` of `total` rows of the current stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyProgress {
    /// The stage running.
    pub stage: VerifyStage,
    /// Rows of the stage checked so far (0 throughout the integrity check).
    pub done: u64,
    /// Every stage but the integrity check reads each event once: `total` is the event count.
    pub total: u64,
}

/// What [`verify`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Events read in position order.
    pub events_checked: u64,
    /// Rows of the `streams` table read.
    pub streams_checked: u64,
    /// The first [`PROBLEMS_RECORDED_MAX`] problems, in the order found.
    pub problems: Vec<Problem>,
    /// How many problems were found, recorded or not.
    pub problems_found: u64,
    /// Feeds checked (0 when the store has no feeds file).
    pub feeds_checked: u64,
    /// Feed events read in position order.
    pub feed_events_checked: u64,
}

impl VerifyReport {
    /// Whether no problem was found.
    pub fn is_clean(&self) -> bool {
        self.problems_found == 0
    }
}

/// One kind of damage [`verify`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// A finding of SQLite's `PRAGMA integrity_check` (a damaged page, an index out of step with
    /// its table …).
    Integrity { detail: String },
    /// A stage stopped early because SQLite could not read on (a damaged page): what it did not
    /// read was not checked.
    Unreadable { stage: VerifyStage, detail: String },
    /// No event has the positions from `after + 1` up to `next - 1`.
    PositionGap { after: Position, next: Position },
    /// The event's checksum does not match its fields.
    Checksum {
        position: Position,
        stored: i64,
        computed: u32,
    },
    /// A field of the event's row is out of its domain (its checksum may well match: the row was
    /// written so).
    InvalidField {
        position: Position,
        field: &'static str,
        detail: String,
    },
    /// The stream's versions, in version order, skip from `expected - 1` to `found`.
    VersionGap {
        stream: String,
        expected: StreamVersion,
        found: StreamVersion,
        position: Position,
    },
    /// Version `version` of the stream sits at a position before the previous version's.
    VersionOrder {
        stream: String,
        version: StreamVersion,
        position: Position,
        previous: Position,
    },
    /// The stream's recorded head is not its last version.
    HeadMismatch {
        stream: String,
        head: i64,
        last_version: StreamVersion,
    },
    /// Events refer to a stream row that does not exist.
    MissingStream {
        stream_id: i64,
        events: u64,
        first: Position,
    },
    /// The stream's name is not a valid stream name.
    InvalidStreamName { stream_id: i64, name: String },
    /// Two events have the same id.
    DuplicateEventId {
        event_id: EventId,
        first: Position,
        second: Position,
    },
    /// A finding of SQLite's `PRAGMA integrity_check` on the feeds file.
    FeedIntegrity { detail: String },
    /// A row of the feeds file is damaged (a checksum mismatch, a field out of its domain, a row
    /// that belongs nowhere).
    FeedDamage { feed: String, detail: String },
    /// No event of the feed has the positions from `after + 1` up to `next - 1`.
    FeedPositionGap { feed: String, after: u64, next: u64 },
    /// The feed's recorded head is not its last position.
    FeedHeadMismatch { feed: String, head: u64, last: u64 },
    /// The subject's sequences skip from `after` to `next`.
    SequenceGap {
        feed: String,
        subject: String,
        after: u64,
        next: u64,
    },
    /// The feed's projector cursor is past the log's head.
    FeedAheadOfLog {
        feed: String,
        cursor: Position,
        head: Position,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Integrity { detail } => write!(f, "SQLite integrity check: {detail}"),
            Problem::Unreadable { stage, detail } => {
                write!(
                    f,
                    "the {stage} stage stopped early, the rest of it is unchecked: {detail}"
                )
            }
            Problem::PositionGap { after, next } => {
                if next.0 == after.0 + 2 {
                    write!(f, "position {} is missing", after.0 + 1)
                } else {
                    write!(
                        f,
                        "positions {} to {} are missing",
                        after.0 + 1,
                        next.0.saturating_sub(1)
                    )
                }
            }
            Problem::Checksum {
                position,
                stored,
                computed,
            } => write!(
                f,
                "event at position {}: checksum mismatch (stored {stored:#x}, computed {computed:#x})",
                position.0
            ),
            Problem::InvalidField {
                position,
                field,
                detail,
            } => write!(f, "event at position {}: {field} {detail}", position.0),
            Problem::VersionGap {
                stream,
                expected,
                found,
                position,
            } => write!(
                f,
                "stream {stream}: version {} expected, {} found (at position {})",
                expected.0, found.0, position.0
            ),
            Problem::VersionOrder {
                stream,
                version,
                position,
                previous,
            } => write!(
                f,
                "stream {stream}: version {} is at position {}, before the previous version's {}",
                version.0, position.0, previous.0
            ),
            Problem::HeadMismatch {
                stream,
                head,
                last_version,
            } => {
                if last_version.0 == 0 {
                    write!(f, "stream {stream} has no events (its head is {head})")
                } else {
                    write!(
                        f,
                        "stream {stream}: head is {head} but the last version is {}",
                        last_version.0
                    )
                }
            }
            Problem::MissingStream {
                stream_id,
                events,
                first,
            } => write!(
                f,
                "{events} events (the first at position {}) belong to stream row {stream_id}, which does not exist",
                first.0
            ),
            Problem::InvalidStreamName { stream_id, name } => {
                write!(f, "stream row {stream_id} has an invalid name {name:?}")
            }
            Problem::DuplicateEventId {
                event_id,
                first,
                second,
            } => write!(
                f,
                "event id {event_id:?} is recorded twice, at positions {} and {}",
                first.0, second.0
            ),
            Problem::FeedIntegrity { detail } => {
                write!(f, "feeds file: SQLite integrity check: {detail}")
            }
            Problem::FeedDamage { feed, detail } => write!(f, "feed {feed}: {detail}"),
            Problem::FeedPositionGap { feed, after, next } => write!(
                f,
                "feed {feed}: positions {} to {} are missing",
                after + 1,
                next.saturating_sub(1)
            ),
            Problem::FeedHeadMismatch { feed, head, last } => write!(
                f,
                "feed {feed}: head is {head} but the last position is {last}"
            ),
            Problem::SequenceGap {
                feed,
                subject,
                after,
                next,
            } => write!(
                f,
                "feed {feed}, subject {subject}: sequence {} expected, {next} found",
                after + 1
            ),
            Problem::FeedAheadOfLog { feed, cursor, head } => write!(
                f,
                "feed {feed}: the projector cursor {} is past the log's head {}",
                cursor.0, head.0
            ),
        }
    }
}

/// The problems found so far: the first [`PROBLEMS_RECORDED_MAX`] and a count.
pub(crate) struct Findings {
    problems: Vec<Problem>,
    found: u64,
}

impl Findings {
    pub(crate) fn push(&mut self, problem: Problem) {
        self.found += 1;
        if self.problems.len() < PROBLEMS_RECORDED_MAX {
            self.problems.push(problem);
        }
    }
}

/// How a stage ended early.
pub(crate) enum StageError {
    /// SQLite could not read on: damage, recorded as [`Problem::Unreadable`].
    Damage(String),
    /// Anything else (a lock timeout, out of memory): verification cannot go on.
    Failed(rusqlite::Error),
}

pub(crate) fn damage(e: rusqlite::Error) -> StageError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase | ErrorCode::SystemIoFailure) => {
            StageError::Damage(e.to_string())
        }
        _ => StageError::Failed(e),
    }
}

/// Checks the whole store in `dir`: SQLite's `integrity_check`, then every event in position
/// order (positions contiguous from 1, checksums, fields valid under `headwater-core`'s rules),
/// every stream in id order with its events in version order (versions contiguous from 1 and in
/// position order, `head` equal to the last version, names valid, no event without its stream),
/// and every event id in id order (no duplicate).
///
/// Like [`inspect`] it reads one snapshot of a possibly live store, read-only, without its lock.
/// Memory stays bounded whatever the store's size: every check is a scan in index order that
/// keeps one row of state, and at most [`PROBLEMS_RECORDED_MAX`] problems are kept.
///
/// `progress` is called at the start and the end of each stage and every
/// [`PROGRESS_INTERVAL_EVENTS`] rows inside it.
///
/// `Err` means the store could not be checked at all (no store, not a store, an unreadable
/// header, a lock timeout); damage found inside it is in the report, as
/// [`Problem::Unreadable`] when it stopped a stage.
pub fn verify(
    dir: &Path,
    progress: &mut dyn FnMut(VerifyProgress),
) -> Result<VerifyReport, OpenError> {
    let store = ReadOnly::open(dir)?;
    let path = &store.path;
    let conn = &store.conn;
    let err = sqlite_error(path);
    let mut findings = Findings {
        problems: Vec::new(),
        found: 0,
    };
    // The feeds' snapshot is taken before the log's, so that every cursor in it is within the
    // log's snapshot (the feeds only ever project what the log already holds).
    let feeds = open_feeds(dir, &mut findings)?;
    conn.execute_batch("BEGIN").map_err(&err)?;
    // The snapshot starts with this first read.
    let total = match conn.query_row("SELECT count(*) FROM events", [], |row| {
        row.get::<_, i64>(0)
    }) {
        Ok(total) => u64::try_from(total).unwrap_or(0),
        Err(e) => match damage(e) {
            // The stages will meet the damage and report it.
            StageError::Damage(_) => 0,
            StageError::Failed(e) => return Err(err(e)),
        },
    };
    let mut events_checked = 0;
    let mut streams_checked = 0;
    let mut feeds_checked = 0;
    let mut feed_events_checked = 0;
    let stages = [
        VerifyStage::IntegrityCheck,
        VerifyStage::Events,
        VerifyStage::Streams,
        VerifyStage::EventIds,
        VerifyStage::Feeds,
    ];
    for stage in stages {
        let total = match (stage, &feeds) {
            (VerifyStage::Feeds, None) => continue,
            (VerifyStage::Feeds, Some((_, feed_events))) => *feed_events,
            _ => total,
        };
        progress(VerifyProgress {
            stage,
            done: 0,
            total,
        });
        let mut tick = |done| progress(VerifyProgress { stage, done, total });
        let result = match stage {
            VerifyStage::IntegrityCheck => integrity_check(conn, &mut findings),
            VerifyStage::Events => {
                check_events(conn, &mut findings, &mut tick, &mut events_checked)
            }
            VerifyStage::Streams => {
                check_streams(conn, &mut findings, &mut tick, &mut streams_checked)
            }
            VerifyStage::EventIds => check_event_ids(conn, &mut findings, &mut tick),
            VerifyStage::Feeds => match &feeds {
                None => Ok(()),
                Some((feeds_conn, _)) => log_head(conn).and_then(|head| {
                    let (feeds, events) = crate::feeds::verify::check_feeds(
                        feeds_conn,
                        head,
                        &mut findings,
                        &mut tick,
                    )?;
                    feeds_checked = feeds;
                    feed_events_checked = events;
                    Ok(())
                }),
            },
        };
        match result {
            Ok(()) => {}
            Err(StageError::Damage(detail)) => findings.push(Problem::Unreadable { stage, detail }),
            Err(StageError::Failed(e)) => return Err(err(e)),
        }
        let done = if stage == VerifyStage::IntegrityCheck {
            0
        } else {
            total
        };
        progress(VerifyProgress { stage, done, total });
    }
    // Ending a read transaction cannot lose anything.
    let _ = conn.execute_batch("COMMIT");
    if let Some((feeds_conn, _)) = &feeds {
        let _ = feeds_conn.execute_batch("COMMIT");
    }
    Ok(VerifyReport {
        events_checked,
        streams_checked,
        problems: findings.problems,
        problems_found: findings.found,
        feeds_checked,
        feed_events_checked,
    })
}

/// The log's head in the snapshot.
fn log_head(conn: &Connection) -> Result<Position, StageError> {
    let head: Option<i64> = conn
        .query_row("SELECT max(position) FROM events", [], |row| row.get(0))
        .map_err(damage)?;
    Ok(Position(
        head.and_then(|h| u64::try_from(h).ok()).unwrap_or(0),
    ))
}

/// A read-only connection to the store's feeds file inside a read transaction, with its event
/// count; `None` when the store has no feeds. A feeds file that cannot be read as one is a
/// problem of the store, recorded.
fn open_feeds(dir: &Path, findings: &mut Findings) -> Result<Option<(Connection, u64)>, OpenError> {
    use crate::feeds::schema::{FEEDS_FILE, FEEDS_FORMAT};
    let path = dir.join(FEEDS_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let opened = (|| {
        let conn = crate::open::connect_read_only(&path, 2 * 1024 * 1024)?;
        crate::open::check_format_of(&conn, &path, &FEEDS_FORMAT)?;
        conn.execute_batch("BEGIN").map_err(sqlite_error(&path))?;
        let count: i64 = conn
            .query_row("SELECT count(*) FROM feed_events", [], |row| row.get(0))
            .map_err(sqlite_error(&path))?;
        Ok::<_, OpenError>((conn, u64::try_from(count).unwrap_or(0)))
    })();
    match opened {
        Ok(opened) => Ok(Some(opened)),
        Err(error @ (OpenError::Io { .. } | OpenError::Sqlite { .. })) => Err(error),
        Err(error) => {
            findings.push(Problem::FeedIntegrity {
                detail: error.to_string(),
            });
            Ok(None)
        }
    }
}

fn integrity_check(conn: &Connection, findings: &mut Findings) -> Result<(), StageError> {
    let sql = format!("PRAGMA integrity_check({PROBLEMS_RECORDED_MAX})");
    let mut statement = conn.prepare(&sql).map_err(damage)?;
    let mut rows = statement.query([]).map_err(damage)?;
    while let Some(row) = rows.next().map_err(damage)? {
        let text: String = row.get(0).map_err(damage)?;
        // A row may hold several findings, one a line, under a `*** in database main ***` title.
        for detail in text.lines() {
            if detail != "ok" && !detail.starts_with("*** in database") {
                findings.push(Problem::Integrity {
                    detail: detail.to_owned(),
                });
            }
        }
    }
    Ok(())
}

/// The columns of the position-order scan. `LEFT JOIN` keeps an event whose stream row is
/// missing (the stream scan reports it).
const SELECT_EVENTS_BY_POSITION: &str = "SELECT e.position, s.name, e.version, e.event_id, \
     e.event_type, e.schema_version, e.correlation_id, e.causation_id, e.recorded_at, e.data, \
     e.crc FROM events AS e LEFT JOIN streams AS s ON s.id = e.stream_id ORDER BY e.position";

fn check_events(
    conn: &Connection,
    findings: &mut Findings,
    tick: &mut dyn FnMut(u64),
    checked: &mut u64,
) -> Result<(), StageError> {
    let mut statement = conn.prepare(SELECT_EVENTS_BY_POSITION).map_err(damage)?;
    let mut rows = statement.query([]).map_err(damage)?;
    let mut last = 0i64;
    while let Some(row) = rows.next().map_err(damage)? {
        *checked += 1;
        if checked.is_multiple_of(PROGRESS_INTERVAL_EVENTS) {
            tick(*checked);
        }
        let raw_position: i64 = row.get(0).map_err(damage)?;
        let position = Position(u64::try_from(raw_position).unwrap_or(0));
        if raw_position <= 0 {
            findings.push(Problem::InvalidField {
                position,
                field: "position",
                detail: format!("{raw_position} is not positive"),
            });
            continue;
        }
        if raw_position != last + 1 {
            findings.push(Problem::PositionGap {
                after: Position(u64::try_from(last).unwrap_or(0)),
                next: position,
            });
        }
        last = raw_position;
        check_event_row(row, position, findings);
    }
    Ok(())
}

/// Checks one row of [`SELECT_EVENTS_BY_POSITION`]: its fields' types and domains, then its
/// checksum (when its stream exists: the checksum covers the stream's name).
fn check_event_row(row: &rusqlite::Row<'_>, position: Position, findings: &mut Findings) {
    let value = |i: usize| row.get_ref(i).unwrap_or(ValueRef::Null);
    let int = |i: usize| match value(i) {
        ValueRef::Integer(n) => Ok(n),
        other => Err(format!("is not an integer ({})", kind(other))),
    };
    let bytes = |i: usize| match value(i) {
        ValueRef::Text(b) | ValueRef::Blob(b) => Ok(b),
        other => Err(format!("is not text or a blob ({})", kind(other))),
    };
    let nullable = |i: usize| match value(i) {
        ValueRef::Null => Ok(None),
        ValueRef::Blob(b) => Ok(Some(b)),
        other => Err(format!("is not a blob or null ({})", kind(other))),
    };
    // Names are checked by the stream scan; without a usable name there is no checksum.
    let stream = match value(1) {
        ValueRef::Text(b) | ValueRef::Blob(b) => Some(b),
        _ => None,
    };
    fn take<T>(
        findings: &mut Findings,
        position: Position,
        field: &'static str,
        value: Result<T, String>,
    ) -> Option<T> {
        value
            .map_err(|detail| {
                findings.push(Problem::InvalidField {
                    position,
                    field,
                    detail,
                })
            })
            .ok()
    }
    let version = take(findings, position, "version", int(2));
    let event_id = take(findings, position, "event_id", bytes(3));
    let event_type = take(findings, position, "event_type", bytes(4));
    let schema_version = take(findings, position, "schema_version", int(5));
    let correlation_id = take(findings, position, "correlation_id", nullable(6));
    let causation_id = take(findings, position, "causation_id", nullable(7));
    let recorded_at = take(findings, position, "recorded_at", int(8));
    let data = take(findings, position, "data", bytes(9));
    let crc = take(findings, position, "crc", int(10));
    let (
        Some(version),
        Some(event_id),
        Some(event_type),
        Some(schema_version),
        Some(correlation_id),
        Some(causation_id),
        Some(recorded_at),
        Some(data),
        Some(stored),
    ) = (
        version,
        event_id,
        event_type,
        schema_version,
        correlation_id,
        causation_id,
        recorded_at,
        data,
        crc,
    )
    else {
        return;
    };
    if let Some(stream) = stream {
        let fields = EventFields {
            position: i64::try_from(position.0).unwrap_or(i64::MAX),
            stream,
            version,
            event_id,
            event_type,
            schema_version,
            correlation_id,
            causation_id,
            recorded_at,
            data,
        };
        let computed = fields.crc();
        if i64::from(computed) != stored {
            findings.push(Problem::Checksum {
                position,
                stored,
                computed,
            });
        }
    }
    let mut invalid = |field: &'static str, detail: String| {
        findings.push(Problem::InvalidField {
            position,
            field,
            detail,
        });
    };
    if version <= 0 {
        invalid("version", format!("{version} is not positive"));
    }
    if event_id.len() != 16 {
        invalid("event_id", format!("is {} bytes, not 16", event_id.len()));
    }
    match std::str::from_utf8(event_type) {
        Ok(name) => {
            if let Err(e) = EventType::new(name) {
                invalid("event_type", format!("is invalid: {e}"));
            }
        }
        Err(_) => invalid("event_type", "is not UTF-8".to_owned()),
    }
    if u32::try_from(schema_version).map_or(true, |v| v == 0) {
        invalid(
            "schema_version",
            format!("{schema_version} is out of range"),
        );
    }
    for (field, id) in [
        ("correlation_id", correlation_id),
        ("causation_id", causation_id),
    ] {
        if let Some(id) = id.filter(|id| id.len() != 16) {
            invalid(field, format!("is {} bytes, not 16", id.len()));
        }
    }
    if recorded_at < 0 {
        invalid("recorded_at", format!("{recorded_at} is negative"));
    }
}

fn kind(value: ValueRef<'_>) -> &'static str {
    match value {
        ValueRef::Null => "null",
        ValueRef::Integer(_) => "an integer",
        ValueRef::Real(_) => "a real",
        ValueRef::Text(_) => "text",
        ValueRef::Blob(_) => "a blob",
    }
}

/// The state of the stream the version-order scan is in.
struct StreamState {
    id: i64,
    name: String,
    head: i64,
    /// The last version seen and its position.
    last: Option<(i64, i64)>,
}

fn check_streams(
    conn: &Connection,
    findings: &mut Findings,
    tick: &mut dyn FnMut(u64),
    checked: &mut u64,
) -> Result<(), StageError> {
    let mut streams_statement = conn
        .prepare("SELECT id, name, head FROM streams ORDER BY id")
        .map_err(damage)?;
    let mut streams = streams_statement.query([]).map_err(damage)?;
    let mut events_statement = conn
        .prepare("SELECT stream_id, version, position FROM events ORDER BY stream_id, version")
        .map_err(damage)?;
    let mut events = events_statement.query([]).map_err(damage)?;
    let mut next_event = |done: &mut u64| -> Result<Option<(i64, i64, i64)>, StageError> {
        match events.next().map_err(damage)? {
            None => Ok(None),
            Some(row) => {
                *done += 1;
                if done.is_multiple_of(PROGRESS_INTERVAL_EVENTS) {
                    tick(*done);
                }
                let value = |i: usize| match row.get_ref(i) {
                    Ok(ValueRef::Integer(n)) => n,
                    // Reported by the position scan; 0 is no valid id, version or position.
                    _ => 0,
                };
                Ok(Some((value(0), value(1), value(2))))
            }
        }
    };
    let mut done = 0u64;
    let mut event = next_event(&mut done)?;
    loop {
        let stream = match streams.next().map_err(damage)? {
            None => None,
            Some(row) => {
                *checked += 1;
                let id: i64 = match row.get_ref(0).map_err(damage)? {
                    ValueRef::Integer(n) => n,
                    _ => 0,
                };
                let name = match row.get_ref(1).map_err(damage)? {
                    ValueRef::Text(b) | ValueRef::Blob(b) => {
                        String::from_utf8_lossy(b).into_owned()
                    }
                    other => format!("({})", kind(other)),
                };
                let head = match row.get_ref(2).map_err(damage)? {
                    ValueRef::Integer(n) => n,
                    _ => -1,
                };
                if StreamName::new(name.as_str()).is_err() {
                    findings.push(Problem::InvalidStreamName {
                        stream_id: id,
                        name: name.clone(),
                    });
                }
                Some(StreamState {
                    id,
                    name,
                    head,
                    last: None,
                })
            }
        };
        // Events of stream ids below this stream's (or all that remain): their stream is missing.
        while let Some((stream_id, _, position)) = event {
            if stream.as_ref().is_some_and(|s| stream_id >= s.id) {
                break;
            }
            let mut events = 0u64;
            let first = position;
            while let Some((id, _, _)) = event {
                if id != stream_id {
                    break;
                }
                events += 1;
                event = next_event(&mut done)?;
            }
            findings.push(Problem::MissingStream {
                stream_id,
                events,
                first: Position(u64::try_from(first).unwrap_or(0)),
            });
        }
        let Some(mut stream) = stream else { break };
        while let Some((stream_id, version, position)) = event {
            if stream_id != stream.id {
                break;
            }
            let expected = stream.last.map_or(1, |(v, _)| v + 1);
            if version != expected {
                findings.push(Problem::VersionGap {
                    stream: stream.name.clone(),
                    expected: StreamVersion(u64::try_from(expected).unwrap_or(0)),
                    found: StreamVersion(u64::try_from(version).unwrap_or(0)),
                    position: Position(u64::try_from(position).unwrap_or(0)),
                });
            }
            if let Some((_, previous)) = stream.last.filter(|(_, p)| *p > position) {
                findings.push(Problem::VersionOrder {
                    stream: stream.name.clone(),
                    version: StreamVersion(u64::try_from(version).unwrap_or(0)),
                    position: Position(u64::try_from(position).unwrap_or(0)),
                    previous: Position(u64::try_from(previous).unwrap_or(0)),
                });
            }
            stream.last = Some((version, position));
            event = next_event(&mut done)?;
        }
        let last_version = stream.last.map_or(0, |(v, _)| v);
        if stream.head != last_version || last_version == 0 {
            findings.push(Problem::HeadMismatch {
                stream: stream.name,
                head: stream.head,
                last_version: StreamVersion(u64::try_from(last_version).unwrap_or(0)),
            });
        }
    }
    Ok(())
}

fn check_event_ids(
    conn: &Connection,
    findings: &mut Findings,
    tick: &mut dyn FnMut(u64),
) -> Result<(), StageError> {
    let mut statement = conn
        .prepare("SELECT event_id, position FROM events ORDER BY event_id, position")
        .map_err(damage)?;
    let mut rows = statement.query([]).map_err(damage)?;
    let mut previous: Option<([u8; 16], i64)> = None;
    let mut done = 0u64;
    while let Some(row) = rows.next().map_err(damage)? {
        done += 1;
        if done.is_multiple_of(PROGRESS_INTERVAL_EVENTS) {
            tick(done);
        }
        // Ids of the wrong type or length were reported by the position scan.
        let id = match row.get_ref(0).map_err(damage)? {
            ValueRef::Blob(b) => <[u8; 16]>::try_from(b).ok(),
            _ => None,
        };
        let Some(id) = id else { continue };
        let position: i64 = match row.get_ref(1).map_err(damage)? {
            ValueRef::Integer(n) => n,
            _ => 0,
        };
        if let Some((previous_id, previous_position)) = previous
            && previous_id == id
        {
            findings.push(Problem::DuplicateEventId {
                event_id: EventId::from_bytes(id),
                first: Position(u64::try_from(previous_position).unwrap_or(0)),
                second: Position(u64::try_from(position).unwrap_or(0)),
            });
        }
        previous = Some((id, position));
    }
    Ok(())
}
