//! Reads: a small pool of connections, each read on a blocking thread, every row checked.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use headwater_core::limits::{READ_PAGE_BYTES_MAX, READ_PAGE_EVENTS_MAX};
use headwater_core::{EventId, Position, RecordedEvent, StreamName, StreamVersion};
use headwater_store::ReadError;
use rusqlite::{Connection, ErrorCode, OptionalExtension};
use tokio::sync::Semaphore;

use crate::open::connect;
use crate::schema::{
    Corrupt, SELECT_ALL_AFTER, SELECT_BY_ID, SELECT_STREAM_AFTER, SELECT_STREAM_NAME, decode_event,
    stream_id_of,
};
use crate::{OpenError, Options};

/// The read connections. At most `permits` reads run at once; each takes a connection from
/// `idle` (opening one if a panicked read lost one) and puts it back.
#[derive(Debug)]
pub(crate) struct Readers {
    path: PathBuf,
    options: Options,
    /// Connections opened `SQLITE_OPEN_READONLY` (tools reading a store another process owns).
    read_only: bool,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

/// The errors a read through [`Readers::run`] may end with besides its own.
pub(crate) trait PoolError: Send + 'static {
    /// The pool is closed.
    fn closed() -> Self;
    /// The pool failed (a connection could not be opened, the blocking task panicked).
    fn pool_failed(error: Box<dyn std::error::Error + Send + Sync>) -> Self;
}

impl PoolError for ReadError {
    fn closed() -> ReadError {
        ReadError::Closed
    }

    fn pool_failed(error: Box<dyn std::error::Error + Send + Sync>) -> ReadError {
        ReadError::Backend(error)
    }
}

impl PoolError for headwater_store::FeedError {
    fn closed() -> headwater_store::FeedError {
        headwater_store::FeedError::Closed
    }

    fn pool_failed(error: Box<dyn std::error::Error + Send + Sync>) -> headwater_store::FeedError {
        headwater_store::FeedError::Backend(error)
    }
}

impl Readers {
    pub(crate) fn open(path: PathBuf, options: &Options) -> Result<Readers, OpenError> {
        Readers::open_with(path, options, false)
    }

    /// A pool of `SQLITE_OPEN_READONLY` connections.
    pub(crate) fn open_read_only(path: PathBuf, options: &Options) -> Result<Readers, OpenError> {
        Readers::open_with(path, options, true)
    }

    fn open_with(path: PathBuf, options: &Options, read_only: bool) -> Result<Readers, OpenError> {
        let count = options.readers.max(1);
        let mut idle = Vec::with_capacity(count);
        for _ in 0..count {
            idle.push(reader_connection(&path, options, read_only)?);
        }
        Ok(Readers {
            path,
            options: options.clone(),
            read_only,
            idle: Mutex::new(idle),
            permits: Arc::new(Semaphore::new(count)),
        })
    }

    /// How many reads may run at once.
    pub(crate) fn count(&self) -> usize {
        self.options.readers.max(1)
    }

    /// Closes the idle connections and refuses further reads.
    pub(crate) fn close(&self) {
        self.permits.close();
        self.idle_connections().clear();
    }

    fn idle_connections(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        // A panic while holding the lock leaves a valid Vec.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `read` with a connection on a blocking thread.
    pub(crate) async fn run<T, E, F>(readers: &Arc<Readers>, read: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: PoolError,
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    {
        let permit = readers
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| E::closed())?;
        let readers = readers.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match readers.idle_connections().pop() {
                Some(conn) => conn,
                None => reader_connection(&readers.path, &readers.options, readers.read_only)
                    .map_err(|e| E::pool_failed(e.into()))?,
            };
            let result = read(&conn);
            if !readers.permits.is_closed() {
                readers.idle_connections().push(conn);
            }
            drop(permit);
            result
        })
        .await
        .map_err(|e| E::pool_failed(e.into()))?
    }
}

fn reader_connection(
    path: &std::path::Path,
    options: &Options,
    read_only: bool,
) -> Result<Connection, OpenError> {
    let conn = if read_only {
        crate::open::connect_read_only(path, options.reader_page_cache_bytes)?
    } else {
        connect(path, options.reader_page_cache_bytes)?
    };
    conn.pragma_update(None, "query_only", true)
        .map_err(crate::open::sqlite_error(path))?;
    Ok(conn)
}

/// Maps a SQLite error: damage is [`ReadError::Corrupt`], never a plain failure.
fn sqlite(position: Position) -> impl Fn(rusqlite::Error) -> ReadError {
    move |e| match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => ReadError::Corrupt {
            position,
            detail: e.to_string(),
        },
        _ => ReadError::backend(e),
    }
}

fn to_sql(value: u64) -> Option<i64> {
    i64::try_from(value).ok()
}

/// Stream names by row id, for the rows of one read. Bounded by the read's page size.
#[derive(Debug, Default)]
struct StreamNames {
    names: HashMap<i64, StreamName>,
}

impl StreamNames {
    /// The name of stream `id`, looked up once per read.
    fn get(
        &mut self,
        conn: &Connection,
        id: i64,
        position: Position,
    ) -> Result<&StreamName, ReadError> {
        match self.names.entry(id) {
            Entry::Occupied(entry) => Ok(entry.into_mut()),
            Entry::Vacant(entry) => {
                let name: Option<String> = conn
                    .prepare_cached(SELECT_STREAM_NAME)
                    .and_then(|mut s| s.query_row([id], |row| row.get(0)).optional())
                    .map_err(sqlite(position))?;
                let corrupt = |detail: String| ReadError::Corrupt { position, detail };
                let name = name.ok_or_else(|| corrupt(format!("stream {id} is missing")))?;
                let name = StreamName::new(name)
                    .map_err(|e| corrupt(format!("stream {id} has an invalid name: {e}")))?;
                Ok(entry.insert(name))
            }
        }
    }
}

/// Reads rows into a page: at most `limit` (the statement's LIMIT), stopping before the event
/// whose data would take the page past `READ_PAGE_BYTES_MAX` (a page holds at least one event).
fn page(
    conn: &Connection,
    mut rows: rusqlite::Rows<'_>,
    limit: u64,
    near: Position,
    mut names: StreamNames,
) -> Result<Vec<RecordedEvent>, ReadError> {
    let corrupt = |c: Corrupt| ReadError::Corrupt {
        position: c.position,
        detail: c.detail,
    };
    let mut out: Vec<RecordedEvent> = Vec::with_capacity(limit.min(READ_PAGE_EVENTS_MAX) as usize);
    let mut bytes = 0usize;
    while let Some(row) = rows.next().map_err(sqlite(near))? {
        let stream_id = stream_id_of(row).map_err(corrupt)?;
        let near = out.last().map_or(near, |e| e.position.next());
        let stream = names.get(conn, stream_id, near)?;
        let previous_type = out.last().map(|e| &e.event_type);
        let event = decode_event(row, stream, previous_type).map_err(corrupt)?;
        if !out.is_empty() && bytes + event.data.len() > READ_PAGE_BYTES_MAX {
            break;
        }
        bytes += event.data.len();
        out.push(event);
    }
    Ok(out)
}

pub(crate) fn read_all(
    conn: &Connection,
    after: Position,
    limit: u64,
) -> Result<Vec<RecordedEvent>, ReadError> {
    let (Some(after_sql), Some(limit_sql)) = (to_sql(after.0), to_sql(limit)) else {
        return Ok(Vec::new());
    };
    let near = Position(after.0.saturating_add(1));
    let mut statement = conn
        .prepare_cached(SELECT_ALL_AFTER)
        .map_err(sqlite(near))?;
    let rows = statement
        .query((after_sql, limit_sql))
        .map_err(sqlite(near))?;
    page(conn, rows, limit, near, StreamNames::default())
}

/// The stream's row id and head.
fn stream_row(conn: &Connection, stream: &StreamName) -> Result<Option<(i64, i64)>, ReadError> {
    let mut statement = conn
        .prepare_cached("SELECT id, head FROM streams WHERE name = ?1")
        .map_err(sqlite(Position::START))?;
    statement
        .query_row([stream.as_str()], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()
        .map_err(sqlite(Position::START))
}

/// What [`read_stream`] found.
#[derive(Debug)]
pub(crate) enum StreamRead {
    /// The page.
    Page(Vec<RecordedEvent>),
    /// The page would hold at least `split_min` events: read it in parts; the stream's head is
    /// this.
    Long(StreamVersion),
}

/// One page of a stream, or, when the page would hold at least `split_min` events, the
/// stream's head instead (so that the caller reads the page in parts).
pub(crate) fn read_stream(
    conn: &Connection,
    stream: &StreamName,
    after: StreamVersion,
    limit: u64,
    split_min: u64,
) -> Result<StreamRead, ReadError> {
    let Some((stream_id, head)) = stream_row(conn, stream)? else {
        return Ok(StreamRead::Page(Vec::new()));
    };
    let head = u64::try_from(head).unwrap_or(0);
    if limit.min(head.saturating_sub(after.0)) >= split_min {
        return Ok(StreamRead::Long(StreamVersion(head)));
    }
    let (Some(after_sql), Some(limit_sql)) = (to_sql(after.0), to_sql(limit)) else {
        return Ok(StreamRead::Page(Vec::new()));
    };
    let mut statement = conn
        .prepare_cached(SELECT_STREAM_AFTER)
        .map_err(sqlite(Position::START))?;
    let rows = statement
        .query((stream_id, after_sql, limit_sql))
        .map_err(sqlite(Position::START))?;
    // The id was found by this name, so the stored name is this one (if the index lied, the
    // checksums, which cover the stored name, tell).
    let mut names = StreamNames::default();
    names.names.insert(stream_id, stream.clone());
    page(conn, rows, limit, Position::START, names).map(StreamRead::Page)
}

pub(crate) fn stream_head(
    conn: &Connection,
    stream: &StreamName,
) -> Result<Option<StreamVersion>, ReadError> {
    let mut statement = conn
        .prepare_cached("SELECT head FROM streams WHERE name = ?1")
        .map_err(sqlite(Position::START))?;
    let head: Option<i64> = statement
        .query_row([stream.as_str()], |row| row.get(0))
        .optional()
        .map_err(sqlite(Position::START))?;
    match head.map(u64::try_from) {
        None => Ok(None),
        Some(Ok(head)) if head > 0 => Ok(Some(StreamVersion(head))),
        Some(_) => Err(ReadError::Corrupt {
            position: Position::START,
            detail: format!("stream {stream} has head {head:?}"),
        }),
    }
}

pub(crate) fn find_event(
    conn: &Connection,
    event_id: EventId,
) -> Result<Option<RecordedEvent>, ReadError> {
    let mut statement = conn
        .prepare_cached(SELECT_BY_ID)
        .map_err(sqlite(Position::START))?;
    let rows = statement
        .query([&event_id.as_bytes()[..]])
        .map_err(sqlite(Position::START))?;
    let mut events = page(conn, rows, 1, Position::START, StreamNames::default())?;
    match events.pop() {
        Some(event) if event.event_id != event_id => Err(ReadError::Corrupt {
            position: event.position,
            detail: format!("event {} is indexed under id {event_id}", event.event_id),
        }),
        found => Ok(found),
    }
}
