//! The embedded feed store: a producer's integration feeds in `feeds.sqlite3`, a second SQLite
//! database beside the log in the store's directory, under the same directory lock.
//!
//! Why a second file, its layout, its commit protocol and what a crash does: `docs/design/
//! storage.md`, "Feeds".

mod read;
pub(crate) mod schema;
pub(crate) mod verify;
mod writer;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use async_trait::async_trait;
use headwater_core::{FeedId, FeedPosition, FeedStatus, Position, Sequence, Subject};
use headwater_store::{
    FeedCommit, FeedError, FeedEvent, FeedReader, FeedState, FeedStore, ProjectorBatch,
    PublisherCursor, ReaderSeen, SubjectHead, validate_batch, validate_feed_limit,
    validate_subject_limit,
};
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot, watch};

use crate::checkpoint::Checkpointer;
use crate::open::{
    check_format_of, configure_writer, connect, connect_read_only, create_database_of, is_blank,
    sqlite_error, sync_dir, upgrade_of,
};
use crate::reader::Readers;
use crate::{EmbeddedStore, OpenError, Options};

use self::schema::{
    FEEDS_FILE, FEEDS_FORMAT, FeedRow, PUBLISHERS_FORMAT_VERSION, SELECT_FEEDS, decode_feed,
};
use self::writer::{FeedWriter, Request};

pub use self::schema::{FEED_POSITION_MAX, FEEDS_MAX};

/// How many writes may wait for the feeds' writer.
const QUEUE_WRITES_MAX: usize = 64;
/// The page cache of the feeds' write connection, at least, in bytes: a backfill commit inserts
/// into the subject index at as many places as the batch has subjects.
pub const FEEDS_PAGE_CACHE_BYTES_MIN: u64 = 64 * 1024 * 1024;

/// The embedded [`FeedStore`]: the feeds of the store it was opened from
/// ([`EmbeddedStore::feeds`]), or a read-only view of a store directory
/// ([`EmbeddedFeedStore::open_read_only`]). Clones share one feed store; it keeps its
/// [`EmbeddedStore`] (and so the directory lock) open.
///
/// # Durability
/// A write returns `Ok` only after its SQLite transaction committed with `synchronous=FULL`: the
/// feeds file's WAL was fsynced. A projector commit (events, subject heads and cursor) is one
/// transaction: after a crash the feed is exactly as of some acknowledged commit, or the one
/// after it if that one reached the disk unanswered.
#[derive(Clone)]
pub struct EmbeddedFeedStore {
    inner: Arc<FeedInner>,
    /// Keeps the log (and its directory lock) open as long as the feeds are; `None` read-only.
    _store: Option<EmbeddedStore>,
}

impl fmt::Debug for EmbeddedFeedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedFeedStore")
            .field("path", &self.inner.path)
            .field("read_only", &self.inner.requests.is_none())
            .finish_non_exhaustive()
    }
}

/// What the writer thread and the handles share: the head watches and the feeds' row ids.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    watches: Mutex<HashMap<FeedId, watch::Sender<FeedPosition>>>,
    ids: Mutex<HashMap<FeedId, i64>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section below is one infallible map operation.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn subscribe(&self, feed: &FeedId) -> watch::Receiver<FeedPosition> {
        lock(&self.watches)
            .entry(feed.clone())
            .or_insert_with(|| watch::channel(FeedPosition::START).0)
            .subscribe()
    }

    pub(crate) fn publish(&self, feed: &FeedId, head: FeedPosition) {
        lock(&self.watches)
            .entry(feed.clone())
            .or_insert_with(|| watch::channel(head).0)
            .send_if_modified(|current| {
                let moved = *current != head;
                *current = head;
                moved
            });
    }

    pub(crate) fn known(&self, feed: &FeedId, id: i64) {
        lock(&self.ids).insert(feed.clone(), id);
    }

    fn id(&self, feed: &FeedId) -> Option<i64> {
        lock(&self.ids).get(feed).copied()
    }
}

pub(crate) struct FeedInner {
    path: PathBuf,
    /// `None` read-only, or once closing: the writer thread ends when the last sender is gone.
    requests: Option<mpsc::Sender<Request>>,
    readers: Arc<Readers>,
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    /// The log's head watch (`None` read-only): a commit waits for it to reach its batch.
    log_head: Option<watch::Receiver<Position>>,
    /// Whether the file has the `publishers` table: always once opened for writing (the open
    /// upgrades it); a read-only view of a file of format 1 has none, and no publishers.
    has_publishers: bool,
}

/// How long a commit waits for the log's head watch to reach its batch's cursor before it refuses
/// the batch as past the log's head. The log's writer publishes its new head right after the
/// commit that readers can already see, so a projector can read events an instant before the
/// watch shows them; that instant is microseconds, this bound is for a loaded machine.
const LOG_HEAD_LAG_MAX: std::time::Duration = std::time::Duration::from_secs(2);

impl Drop for FeedInner {
    fn drop(&mut self) {
        // Readers first, so that the writer's connection is the last one and SQLite removes the
        // WAL when it closes.
        self.readers.close();
        self.requests = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Reads every feed row, checked.
fn load_feeds(conn: &Connection, path: &Path) -> Result<Vec<FeedRow>, OpenError> {
    let mut statement = conn.prepare(SELECT_FEEDS).map_err(sqlite_error(path))?;
    let mut rows = statement.query([]).map_err(sqlite_error(path))?;
    let mut feeds = Vec::new();
    while let Some(row) = rows.next().map_err(sqlite_error(path))? {
        feeds.push(decode_feed(row).map_err(|detail| OpenError::Corrupt {
            path: path.to_owned(),
            detail,
        })?);
    }
    Ok(feeds)
}

/// Opens (creating it if missing) the feeds file of the store in `dir`, whose lock the caller
/// holds and whose log's head `log_head` watches.
pub(crate) fn open(
    dir: &Path,
    options: &Options,
    log_head: watch::Receiver<Position>,
) -> Result<FeedInner, OpenError> {
    let path = dir.join(FEEDS_FILE);
    let exists = path.try_exists().map_err(|source| OpenError::Io {
        what: "looking for",
        path: path.clone(),
        source,
    })?;
    if !exists {
        create_database_of(dir, &path, &FEEDS_FORMAT)?;
    }
    let mut conn = connect(
        &path,
        options.page_cache_bytes.max(FEEDS_PAGE_CACHE_BYTES_MIN),
    )?;
    let found = check_format_of(&conn, &path, &FEEDS_FORMAT)?;
    if is_blank(&conn, &path)? {
        return Err(OpenError::Corrupt {
            path,
            detail: "the feeds file is empty (it is never created in place: it was truncated)"
                .to_owned(),
        });
    }
    configure_writer(&conn, &path, options)?;
    upgrade_of(&conn, &path, &FEEDS_FORMAT, found)?;
    sync_dir(dir).map_err(|source| OpenError::Io {
        what: "syncing the directory",
        path: dir.to_owned(),
        source,
    })?;
    let rows = load_feeds(&conn, &path)?;
    let head = *log_head.borrow();
    for row in &rows {
        if row.state.cursor > head {
            return Err(OpenError::FeedAheadOfLog {
                path,
                feed: row.state.feed.to_string(),
                cursor: row.state.cursor,
                head,
            });
        }
    }
    let max = |sql: &str| -> Result<i64, OpenError> {
        let max: Option<i64> = conn
            .query_row(sql, [], |row| row.get(0))
            .map_err(sqlite_error(&path))?;
        Ok(max.unwrap_or(0))
    };
    let next_feed_id = max("SELECT max(id) FROM feeds")? + 1;
    let next_subject_id = max("SELECT max(id) FROM subjects")? + 1;
    let shared = Arc::new(Shared::default());
    for row in &rows {
        shared.known(&row.state.feed, row.id);
        shared.publish(&row.state.feed, row.state.head);
    }
    let feeds = rows
        .into_iter()
        .map(|row| (row.state.feed.clone(), row))
        .collect();
    let readers = Arc::new(Readers::open(path.clone(), options)?);
    let checkpointer = Checkpointer::start(&path)?;
    checkpointer.hook(&mut conn).map_err(sqlite_error(&path))?;
    let writer = FeedWriter::new(
        conn,
        checkpointer,
        feeds,
        next_feed_id,
        next_subject_id,
        shared.clone(),
        log_head.clone(),
    );
    let (requests, queue) = mpsc::channel(QUEUE_WRITES_MAX);
    let thread = std::thread::Builder::new()
        .name("headwater-feeds".to_owned())
        .spawn(move || writer.run(queue))
        .map_err(|source| OpenError::Io {
            what: "starting the feeds' writer thread for",
            path: path.clone(),
            source,
        })?;
    Ok(FeedInner {
        path,
        requests: Some(requests),
        readers,
        shared,
        writer: Some(thread),
        log_head: Some(log_head),
        has_publishers: true,
    })
}

impl EmbeddedStore {
    /// The store's feeds, in `feeds.sqlite3` beside the log (created on first use). Every call
    /// returns the same feed store; it keeps this store open.
    ///
    /// Blocks briefly the first time (file system and SQLite calls).
    ///
    /// Fails with [`OpenError::FeedAheadOfLog`] when a feed's cursor is past the log's head: the
    /// feeds file belongs to another log (or the log was replaced by an older copy).
    pub fn feeds(&self) -> Result<EmbeddedFeedStore, OpenError> {
        let mut slot = lock(&self.inner.feeds);
        let inner = match &*slot {
            Some(inner) => inner.clone(),
            None => {
                let inner = Arc::new(open(
                    &self.inner.dir,
                    &self.inner.options,
                    self.inner.head.clone(),
                )?);
                *slot = Some(inner.clone());
                inner
            }
        };
        Ok(EmbeddedFeedStore {
            inner,
            _store: Some(self.clone()),
        })
    }
}

/// Why a write was refused by a read-only feed store.
#[derive(Debug, thiserror::Error)]
#[error("the feeds of {0} are open read-only")]
struct ReadOnly(PathBuf);

impl EmbeddedFeedStore {
    /// [`EmbeddedStore::feeds`] of `store`.
    pub fn open(store: &EmbeddedStore) -> Result<EmbeddedFeedStore, OpenError> {
        store.feeds()
    }

    /// A read-only view of the feeds of the store in `dir`, for operator tools: it takes no lock
    /// (the store may be open in another process) and refuses every write. Its head watches do
    /// not move: follow a feed by reading it again.
    ///
    /// A store without feeds (no `feeds.sqlite3`) is refused with [`OpenError::Io`] (not found).
    pub fn open_read_only(dir: impl AsRef<Path>) -> Result<EmbeddedFeedStore, OpenError> {
        let path = dir.as_ref().join(FEEDS_FILE);
        std::fs::metadata(&path).map_err(|source| OpenError::Io {
            what: "opening",
            path: path.clone(),
            source,
        })?;
        let options = Options::default();
        let conn = connect_read_only(&path, options.reader_page_cache_bytes)?;
        let found = check_format_of(&conn, &path, &FEEDS_FORMAT)?;
        let shared = Arc::new(Shared::default());
        for row in load_feeds(&conn, &path)? {
            shared.known(&row.state.feed, row.id);
            shared.publish(&row.state.feed, row.state.head);
        }
        drop(conn);
        let readers = Arc::new(Readers::open_read_only(path.clone(), &options)?);
        Ok(EmbeddedFeedStore {
            inner: Arc::new(FeedInner {
                path,
                requests: None,
                readers,
                shared,
                writer: None,
                log_head: None,
                has_publishers: found >= PUBLISHERS_FORMAT_VERSION,
            }),
            _store: None,
        })
    }

    /// The feeds file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn write<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T, FeedError>>) -> Request,
    ) -> Result<T, FeedError> {
        let requests = self
            .inner
            .requests
            .as_ref()
            .ok_or_else(|| FeedError::backend(ReadOnly(self.inner.path.clone())))?;
        let (reply, answer) = oneshot::channel();
        requests
            .send(request(reply))
            .await
            .map_err(|_| FeedError::Closed)?;
        answer.await.map_err(|_| FeedError::Closed)?
    }

    async fn read<T, F>(&self, read: F) -> Result<T, FeedError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, FeedError> + Send + 'static,
    {
        Readers::run(&self.inner.readers, read).await
    }

    /// The feed's row id: known, or looked up (a feed registered by the process that owns a store
    /// this handle reads read-only).
    async fn id(&self, feed: &FeedId) -> Result<i64, FeedError> {
        if let Some(id) = self.inner.shared.id(feed) {
            return Ok(id);
        }
        let wanted = feed.clone();
        let row = self.read(move |conn| read::feed_row(conn, &wanted)).await?;
        let row = row.ok_or_else(|| FeedError::UnknownFeed(feed.clone()))?;
        self.inner.shared.known(feed, row.id);
        Ok(row.id)
    }
}

#[async_trait]
impl FeedStore for EmbeddedFeedStore {
    async fn register(&self, feed: &FeedId) -> Result<FeedState, FeedError> {
        let feed = feed.clone();
        self.write(|reply| Request::Register { feed, reply }).await
    }

    async fn feeds(&self) -> Result<Vec<FeedState>, FeedError> {
        self.read(read::feeds).await
    }

    async fn feed(&self, feed: &FeedId) -> Result<Option<FeedState>, FeedError> {
        let feed = feed.clone();
        let row = self.read(move |conn| read::feed_row(conn, &feed)).await?;
        Ok(row.map(|row| row.state))
    }

    async fn set_status(&self, feed: &FeedId, status: FeedStatus) -> Result<FeedState, FeedError> {
        let feed = feed.clone();
        self.write(|reply| Request::SetStatus {
            feed,
            status,
            reply,
        })
        .await
    }

    /// # Durability
    /// `Ok` means the batch's events, its subjects' heads and the cursor are in the feeds
    /// file's WAL and the WAL was fsynced, in one transaction. A [`FeedError::Backend`] from a
    /// failed commit means the outcome is unknown; the feed store then refuses writes until the
    /// store is reopened, and the projector reloads its cursor.
    ///
    /// # Cancel safety
    /// Dropping the future after its first poll may still commit the batch.
    async fn commit(&self, feed: &FeedId, batch: ProjectorBatch) -> Result<FeedCommit, FeedError> {
        validate_batch(&batch)?;
        if let Some(log_head) = &self.inner.log_head {
            let mut log_head = log_head.clone();
            let caught_up = log_head.wait_for(|head| *head >= batch.to);
            // On a timeout the writer refuses the batch; a closed store refuses it as closed.
            let _ = tokio::time::timeout(LOG_HEAD_LAG_MAX, caught_up).await;
        }
        let feed = feed.clone();
        self.write(|reply| Request::Commit { feed, batch, reply })
            .await
    }

    async fn read_feed(
        &self,
        feed: &FeedId,
        after: FeedPosition,
        limit: u64,
    ) -> Result<Vec<FeedEvent>, FeedError> {
        let limit = validate_feed_limit(limit)?;
        let id = self.id(feed).await?;
        let feed = feed.clone();
        self.read(move |conn| read::read_feed(conn, &feed, id, after, limit))
            .await
    }

    async fn subjects(
        &self,
        feed: &FeedId,
        after: Option<&Subject>,
        limit: u64,
    ) -> Result<Vec<SubjectHead>, FeedError> {
        let limit = validate_subject_limit(limit)?;
        let id = self.id(feed).await?;
        let feed = feed.clone();
        let after = after.cloned();
        self.read(move |conn| read::subjects(conn, &feed, id, after.as_ref(), limit))
            .await
    }

    async fn read_subject(
        &self,
        feed: &FeedId,
        subject: &Subject,
        after: Sequence,
        limit: u64,
    ) -> Result<Vec<FeedEvent>, FeedError> {
        let limit = validate_feed_limit(limit)?;
        let id = self.id(feed).await?;
        let feed = feed.clone();
        let subject = subject.clone();
        self.read(move |conn| read::read_subject(conn, &feed, id, &subject, after, limit))
            .await
    }

    fn watch_head(&self, feed: &FeedId) -> watch::Receiver<FeedPosition> {
        self.inner.shared.subscribe(feed)
    }

    async fn record_readers(&self, seen: Vec<ReaderSeen>) -> Result<(), FeedError> {
        self.write(|reply| Request::RecordReaders { seen, reply })
            .await
    }

    async fn readers(&self, feed: &FeedId) -> Result<Vec<FeedReader>, FeedError> {
        let id = self.id(feed).await?;
        let feed = feed.clone();
        self.read(move |conn| read::readers(conn, &feed, id)).await
    }

    /// # Durability
    /// `Ok` means the cursor's row is in the feeds file's WAL and the WAL was fsynced
    /// (`synchronous=FULL`), as a commit's.
    ///
    /// # Cancel safety
    /// Dropping the future after its first poll may still move the cursor.
    async fn advance_publisher(
        &self,
        feed: &FeedId,
        publisher: &str,
        from: FeedPosition,
        to: FeedPosition,
    ) -> Result<PublisherCursor, FeedError> {
        let feed = feed.clone();
        let publisher = publisher.to_owned();
        self.write(|reply| Request::AdvancePublisher {
            feed,
            publisher,
            from,
            to,
            reply,
        })
        .await
    }

    async fn publishers(&self, feed: &FeedId) -> Result<Vec<PublisherCursor>, FeedError> {
        let id = self.id(feed).await?;
        if !self.inner.has_publishers {
            return Ok(Vec::new());
        }
        let feed = feed.clone();
        self.read(move |conn| read::publishers(conn, &feed, id))
            .await
    }
}
