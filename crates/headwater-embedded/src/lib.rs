//! Headwater's embedded event store, the default backend: one directory per service, nothing to
//! install or start.
//!
//! The events live in a SQLite database (`events.sqlite3`, WAL mode, `synchronous=FULL`) written
//! by one thread that commits appends in groups, so that concurrent appends share one fsync.
//! `docs/design/storage.md` describes the files, the commit protocol and what a crash does at
//! each step.
//!
//! Architecture invariant: this crate is the only one that knows the store's files. Everything
//! above it sees an [`EventStore`].

mod checkpoint;
mod feeds;
mod lock;
mod open;
mod reader;
mod schema;
mod verify;
mod writer;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use headwater_core::limits::READ_PAGE_BYTES_MAX;
use headwater_core::{
    EventId, ExpectedVersion, NewEvent, Position, RecordedEvent, StreamName, StreamVersion,
    validate_append,
};
use headwater_store::{AppendError, AppendOutcome, EventStore, ReadError};
use tokio::sync::{mpsc, oneshot, watch};

use crate::reader::Readers;
use crate::writer::Request;

pub use crate::feeds::{
    EmbeddedFeedStore, FEED_POSITION_MAX, FEEDS_MAX, FEEDS_PAGE_CACHE_BYTES_MIN,
};
pub use crate::verify::{
    CategoryCount, FileSizes, Inspection, PROBLEMS_RECORDED_MAX, PROGRESS_INTERVAL_EVENTS, Problem,
    TOP_CATEGORIES_MAX, VerifyProgress, VerifyReport, VerifyStage, inspect, verify,
};

/// A group commit stops taking appends once it holds this many events (appends are never split:
/// the last one taken can carry it past, by at most `APPEND_EVENTS_MAX`).
pub const GROUP_EVENTS_MAX: usize = 10_000;
/// A group commit stops taking appends once their data reach this many bytes (the last one
/// taken can carry it past, by at most `APPEND_BYTES_MAX`).
pub const GROUP_BYTES_MAX: usize = 32 * 1024 * 1024;
/// How many appends may wait for the writer before `append` waits for room.
pub const QUEUE_APPENDS_MAX: usize = 4_096;
/// A page of `read_all` or `read_stream` is read in two halves at once, on two connections,
/// when each half holds at least this many events.
const SPLIT_READ_EVENTS_MIN: u64 = 1_000;
/// Read connections, by default.
pub const READERS_DEFAULT: usize = 4;
/// The page cache of the write connection, by default, in bytes. The writer's inserts touch the
/// table's tail, the streams' rows and the leaves of the two indexes where appends land: the
/// larger the cache, the fewer of those it reads back from the operating system.
pub const PAGE_CACHE_BYTES_DEFAULT: u64 = 8 * 1024 * 1024;
/// The page cache of each read connection, by default, in bytes. Reads walk forward; the
/// operating system's cache serves pages again.
pub const READER_PAGE_CACHE_BYTES_DEFAULT: u64 = 2 * 1024 * 1024;

/// A hook the writer calls just before each `COMMIT` (tests only, see
/// [`Options::before_commit`]). An `Err` fails that commit as a failed fsync would.
pub type CommitHook = Arc<dyn Fn(&CommitAttempt) -> io::Result<()> + Send + Sync>;

/// What a commit is about to write, as told to a [`CommitHook`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommitAttempt {
    /// 1 for the first commit since the store was opened, then 2, 3 …
    pub number: u64,
    /// How many appends the group holds (refused ones included).
    pub appends: usize,
}

/// How to open an [`EmbeddedStore`]. `Options::default()` is what production uses; change
/// fields on it.
#[derive(Clone)]
#[non_exhaustive]
pub struct Options {
    /// A group commit stops taking appends at this many events ([`GROUP_EVENTS_MAX`]).
    pub group_events_max: usize,
    /// A group commit stops taking appends at this much event data, in bytes
    /// ([`GROUP_BYTES_MAX`]).
    pub group_bytes_max: usize,
    /// How many appends may wait for the writer ([`QUEUE_APPENDS_MAX`]).
    pub queue_appends_max: usize,
    /// How many read connections serve reads concurrently ([`READERS_DEFAULT`], at least 1).
    pub readers: usize,
    /// The page cache of the write connection, in bytes ([`PAGE_CACHE_BYTES_DEFAULT`]).
    pub page_cache_bytes: u64,
    /// The page cache of each read connection, in bytes
    /// ([`READER_PAGE_CACHE_BYTES_DEFAULT`]).
    pub reader_page_cache_bytes: u64,
    /// **For tests**: called before each commit; an `Err` fails the commit (and poisons the
    /// store) as a failed fsync would.
    pub before_commit: Option<CommitHook>,
    /// **For tests**: called after each successful commit, before the new head is published
    /// (readers already see the commit then): a hook that sleeps widens that window.
    pub after_commit: Option<Arc<dyn Fn() + Send + Sync>>,
    /// **For tests**: `PRAGMA max_page_count` of the write connection, so that a write fails
    /// with `SQLITE_FULL` as on a full disk.
    pub max_page_count: Option<u64>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            group_events_max: GROUP_EVENTS_MAX,
            group_bytes_max: GROUP_BYTES_MAX,
            queue_appends_max: QUEUE_APPENDS_MAX,
            readers: READERS_DEFAULT,
            page_cache_bytes: PAGE_CACHE_BYTES_DEFAULT,
            reader_page_cache_bytes: READER_PAGE_CACHE_BYTES_DEFAULT,
            before_commit: None,
            after_commit: None,
            max_page_count: None,
        }
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("group_events_max", &self.group_events_max)
            .field("group_bytes_max", &self.group_bytes_max)
            .field("queue_appends_max", &self.queue_appends_max)
            .field("readers", &self.readers)
            .field("page_cache_bytes", &self.page_cache_bytes)
            .field("reader_page_cache_bytes", &self.reader_page_cache_bytes)
            .field("before_commit", &self.before_commit.as_ref().map(|_| "…"))
            .field("after_commit", &self.after_commit.as_ref().map(|_| "…"))
            .field("max_page_count", &self.max_page_count)
            .finish()
    }
}

/// Why a store could not be opened. A database file that is refused (not a store, a newer
/// format, locked) is left as it was.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The directory holds an `events.sqlite3` that is not a Headwater store.
    #[error("{path} is not a Headwater store: {reason}")]
    NotAStore { path: PathBuf, reason: String },
    /// The store was written by a newer Headwater, in a format this one does not know.
    #[error(
        "{path} has format version {found}; this program knows versions up to {supported}: use a newer Headwater"
    )]
    NewerFormat {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// Another process (or another handle in this one) has the store open.
    #[error("{dir} is in use by another process (its LOCK file is locked)")]
    Locked { dir: PathBuf },
    /// The database file is damaged.
    #[error("{path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    /// A file system operation failed. (Its cause is the error's `source`, not repeated in its
    /// message: print the chain.)
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A feed's projector cursor is past the log's head: the feeds file does not belong to this
    /// log (or the log was replaced by an older copy). Nothing was changed.
    #[error(
        "{path}: feed {feed} has projected the log up to position {cursor}, but the log ends at {head}: the feeds do not belong to this log"
    )]
    FeedAheadOfLog {
        path: PathBuf,
        feed: String,
        cursor: Position,
        head: Position,
    },
    /// SQLite failed.
    #[error("opening {path}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

/// The embedded event store. Clones share one store; dropping the last clone closes it (the
/// writer finishes what it was given, checkpoints the WAL and releases the directory lock).
///
/// # Durability
/// An append returns `Ok` only after the SQLite transaction holding it committed with
/// `synchronous=FULL`: the WAL was fsynced. Its events then survive `kill -9` and power loss,
/// on a disk that honours fsync.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    options: Options,
    /// The feeds, once [`EmbeddedStore::feeds`] opened them.
    feeds: std::sync::Mutex<Option<Arc<feeds::FeedInner>>>,
    /// `None` once closing: the writer thread ends when the last sender is gone.
    requests: Option<mpsc::Sender<Request>>,
    head: watch::Receiver<Position>,
    readers: Arc<Readers>,
    writer: Option<JoinHandle<()>>,
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("dir", &self.inner.dir)
            .field("head", &*self.inner.head.borrow())
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The feeds first: their writer finishes while the directory lock is still held.
        drop(
            self.feeds
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        // Readers first, so that the writer's connection is the last one and SQLite removes the
        // WAL when it closes.
        self.readers.close();
        self.requests = None;
        if let Some(writer) = self.writer.take() {
            // A panic of the writer thread was already reported by its panic hook; the appends
            // it left unanswered saw `Closed`.
            let _ = writer.join();
        }
    }
}

impl EmbeddedStore {
    /// Opens the store in `dir`, creating the directory and an empty store if missing.
    ///
    /// Blocks briefly (file system and SQLite calls); calling it inside a tokio runtime is fine.
    pub fn open(dir: impl AsRef<Path>) -> Result<EmbeddedStore, OpenError> {
        EmbeddedStore::open_with(dir, Options::default())
    }

    /// [`EmbeddedStore::open`] with options.
    pub fn open_with(dir: impl AsRef<Path>, options: Options) -> Result<EmbeddedStore, OpenError> {
        open::open(dir.as_ref(), options)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    async fn read<T, F>(&self, read: F) -> Result<T, ReadError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> Result<T, ReadError> + Send + 'static,
    {
        Readers::run(&self.inner.readers, read).await
    }
}

#[async_trait]
impl EventStore for EmbeddedStore {
    /// # Durability
    /// `Ok` means the events are in the WAL and the WAL was fsynced. An
    /// [`AppendError::Backend`] from a failed commit means the outcome is unknown (a failed
    /// fsync may still have written the events); the store is then poisoned: reopen it and retry
    /// the same append, which tells (G3).
    ///
    /// # Cancel safety
    /// Dropping the future after its first poll may still append the events; retry with the same
    /// event ids to find out.
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, AppendError> {
        validate_append(expected, &events)?;
        let requests = self.inner.requests.as_ref().ok_or(AppendError::Closed)?;
        let (reply, answer) = oneshot::channel();
        let request = Request {
            stream: stream.clone(),
            expected,
            events,
            reply,
        };
        requests
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
        let limit = headwater_store::validate_limit(limit)?;
        // As `read_all`: versions are contiguous, so a long page is read in two halves at once.
        // The first read tells whether the page is long (and reads it whole if not).
        let split_min = if self.inner.readers.count() >= 2 {
            2 * SPLIT_READ_EVENTS_MIN
        } else {
            u64::MAX
        };
        let name = stream.clone();
        let head = match self
            .read(move |conn| reader::read_stream(conn, &name, after, limit, split_min))
            .await?
        {
            reader::StreamRead::Page(page) => return Ok(page),
            reader::StreamRead::Long(head) => head,
        };
        let first_half = limit.min(head.0.saturating_sub(after.0)) / 2;
        let middle = StreamVersion(after.0 + first_half);
        let (one, two) = (stream.clone(), stream.clone());
        let whole = |read| match read {
            reader::StreamRead::Page(page) => Ok(page),
            reader::StreamRead::Long(_) => Err(ReadError::backend("a half page asked to split")),
        };
        let (first, second) = tokio::join!(
            self.read(move |conn| reader::read_stream(conn, &one, after, first_half, u64::MAX)),
            self.read(move |conn| {
                reader::read_stream(conn, &two, middle, limit - first_half, u64::MAX)
            }),
        );
        Ok(join_halves(whole(first?)?, first_half, whole(second?)?))
    }

    async fn read_all(&self, after: Position, limit: u64) -> Result<Vec<RecordedEvent>, ReadError> {
        let limit = headwater_store::validate_limit(limit)?;
        // A long page is read in two halves at once, on two connections: positions are
        // contiguous, so where the second half starts is known before the first is read.
        let known = self.head_position().0.saturating_sub(after.0);
        let first_half = limit.min(known) / 2;
        if first_half < SPLIT_READ_EVENTS_MIN || self.inner.readers.count() < 2 {
            return self
                .read(move |conn| reader::read_all(conn, after, limit))
                .await;
        }
        let middle = Position(after.0 + first_half);
        let (first, second) = tokio::join!(
            self.read(move |conn| reader::read_all(conn, after, first_half)),
            self.read(move |conn| reader::read_all(conn, middle, limit - first_half)),
        );
        Ok(join_halves(first?, first_half, second?))
    }

    async fn stream_head(&self, stream: &StreamName) -> Result<Option<StreamVersion>, ReadError> {
        let stream = stream.clone();
        self.read(move |conn| reader::stream_head(conn, &stream))
            .await
    }

    async fn find_event(&self, event_id: EventId) -> Result<Option<RecordedEvent>, ReadError> {
        self.read(move |conn| reader::find_event(conn, event_id))
            .await
    }

    fn head_position(&self) -> Position {
        *self.inner.head.borrow()
    }

    fn watch_head(&self) -> watch::Receiver<Position> {
        self.inner.head.clone()
    }
}

/// Joins the two halves of a page read at once: the first half asked for `first_half` events,
/// the second for the rest, starting right after (positions and versions are contiguous).
/// The result is the page one read would have given.
fn join_halves(
    mut page: Vec<RecordedEvent>,
    first_half: u64,
    second: Vec<RecordedEvent>,
) -> Vec<RecordedEvent> {
    if page.len() as u64 != first_half {
        // The first half ended early (its data reached the byte limit): it is the page.
        return page;
    }
    // The second half's events are a prefix that fits the byte limit alone; keep what fits
    // beside the first half.
    page.reserve_exact(second.len());
    let mut bytes: usize = page.iter().map(|e| e.data.len()).sum();
    for event in second {
        if bytes + event.data.len() > READ_PAGE_BYTES_MAX {
            break;
        }
        bytes += event.data.len();
        page.push(event);
    }
    page
}
