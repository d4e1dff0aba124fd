//! Opening a store directory: the lock, the format check, creating a fresh store, the
//! connections and the writer thread.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use headwater_core::Position;
use rusqlite::{Connection, ErrorCode, OpenFlags};
use tokio::sync::{mpsc, watch};

use crate::checkpoint::Checkpointer;
use crate::reader::Readers;
use crate::schema::{APPLICATION_ID, CREATE_SCHEMA, DATABASE_FILE, FORMAT_VERSION, LOCK_FILE};
use crate::writer::Writer;
use crate::{EmbeddedStore, Inner, OpenError, Options};

/// How long a connection waits for a lock held by another connection of this process (the
/// checkpoint, a reader starting while the WAL restarts) before giving up, in milliseconds.
const BUSY_TIMEOUT_MILLIS: u64 = 5_000;
/// The WAL file is truncated back to this size after a checkpoint resets it, in bytes.
const WAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;

pub(crate) fn open(dir: &Path, options: Options) -> Result<EmbeddedStore, OpenError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| OpenError::Io { what, path, source }
    };
    let created = !dir.exists();
    fs::create_dir_all(dir).map_err(io("creating the directory", dir))?;
    let dir = dir
        .canonicalize()
        .map_err(io("resolving the directory", dir))?;
    if created && let Some(parent) = dir.parent() {
        // The new directory's own entry, so that the store's name survives a power loss.
        sync_dir(parent).map_err(io("syncing the directory", parent))?;
    }

    let lock_path = dir.join(LOCK_FILE);
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(io("opening", &lock_path))?;
    match crate::lock::lock_exclusive(&lock) {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Err(OpenError::Locked { dir }),
        Err(TryLockError::Error(e)) => return Err(io("locking", &lock_path)(e)),
    }

    let path = dir.join(DATABASE_FILE);
    let exists = path.try_exists().map_err(io("looking for", &path))?;
    if !exists {
        create_database(&dir, &path)?;
    }
    let mut conn = connect(&path, options.page_cache_bytes)?;
    check_format(&conn, &path)?;
    if is_blank(&conn, &path)? {
        // A store's database is created whole under another name and renamed into place, so an
        // empty one was emptied by something else: refuse it rather than start afresh over it.
        return Err(OpenError::Corrupt {
            path,
            detail:
                "the database file is empty (a store is never created in place: it was truncated)"
                    .to_owned(),
        });
    }
    configure_writer(&conn, &path, &options)?;
    // SQLite fsyncs the directory when it creates the WAL; the database and LOCK files are ours
    // to make durable by name.
    sync_dir(&dir).map_err(io("syncing the directory", &dir))?;

    let head = last_position(&conn, &path)?;
    let readers = Arc::new(Readers::open(path.clone(), &options)?);
    let (head_tx, head_rx) = watch::channel(head);
    let (requests, queue) = mpsc::channel(options.queue_appends_max.max(1));
    let checkpointer = Checkpointer::start(&path)?;
    checkpointer.hook(&mut conn).map_err(sqlite_error(&path))?;
    let writer = Writer::new(conn, head, head_tx, &options, checkpointer);
    let options_kept = options.clone();
    let thread = std::thread::Builder::new()
        .name("headwater-writer".to_owned())
        .spawn(move || writer.run(queue, lock))
        .map_err(io("starting the writer thread for", &dir))?;
    Ok(EmbeddedStore {
        inner: Arc::new(Inner {
            dir,
            options: options_kept,
            feeds: std::sync::Mutex::new(None),
            requests: Some(requests),
            head: head_rx,
            readers,
            writer: Some(thread),
        }),
    })
}

/// Maps a SQLite error met while opening: a damaged or foreign file gets its own variant.
pub(crate) fn sqlite_error(path: &Path) -> impl Fn(rusqlite::Error) -> OpenError + '_ {
    move |source| match source.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => OpenError::NotAStore {
            path: path.to_owned(),
            reason: "the file is not a SQLite database".to_owned(),
        },
        Some(ErrorCode::DatabaseCorrupt) => OpenError::Corrupt {
            path: path.to_owned(),
            detail: source.to_string(),
        },
        _ => OpenError::Sqlite {
            path: path.to_owned(),
            source,
        },
    }
}

/// A connection to the database file with the settings every connection shares.
pub(crate) fn connect(path: &Path, cache_bytes: u64) -> Result<Connection, OpenError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_EXRESCODE;
    let conn = Connection::open_with_flags(path, flags).map_err(sqlite_error(path))?;
    conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MILLIS))
        .map_err(sqlite_error(path))?;
    // A negative cache_size is in KiB.
    let cache_kib = i64::try_from(cache_bytes / 1024).unwrap_or(i64::MAX);
    conn.pragma_update(None, "cache_size", -cache_kib.max(1))
        .map_err(sqlite_error(path))?;
    // Memory-mapped I/O would count the mapped file in the process's RSS.
    conn.pragma_update(None, "mmap_size", 0)
        .map_err(sqlite_error(path))?;
    Ok(conn)
}

/// A `SQLITE_OPEN_READONLY` connection to an existing database file, with the settings every
/// connection shares (for tools reading a store another process may own).
pub(crate) fn connect_read_only(path: &Path, cache_bytes: u64) -> Result<Connection, OpenError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_EXRESCODE;
    let conn = Connection::open_with_flags(path, flags).map_err(sqlite_error(path))?;
    conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MILLIS))
        .map_err(sqlite_error(path))?;
    let cache_kib = i64::try_from(cache_bytes / 1024).unwrap_or(i64::MAX);
    conn.pragma_update(None, "cache_size", -cache_kib.max(1))
        .map_err(sqlite_error(path))?;
    conn.pragma_update(None, "mmap_size", 0)
        .map_err(sqlite_error(path))?;
    Ok(conn)
}

/// The format markers and schema of one of the store's database files.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Format {
    /// The file's name in the store directory.
    pub(crate) file: &'static str,
    pub(crate) application_id: i32,
    pub(crate) version: i32,
    /// The whole schema of `version`, for a new file.
    pub(crate) schema: &'static str,
    /// The steps from the older versions this build still opens: `upgrades[i]` turns a file of
    /// version `version - upgrades.len() + i` into the next version. Applied by the writer at
    /// open ([`upgrade_of`]); a file older than the first step is refused.
    pub(crate) upgrades: &'static [&'static str],
}

/// The event log's file.
pub(crate) const LOG_FORMAT: Format = Format {
    file: DATABASE_FILE,
    application_id: APPLICATION_ID,
    version: FORMAT_VERSION,
    schema: CREATE_SCHEMA,
    upgrades: &[],
};

/// Refuses a file that is not a Headwater store of a known version. Reads only the header.
fn check_format(conn: &Connection, path: &Path) -> Result<(), OpenError> {
    check_format_of(conn, path, &LOG_FORMAT).map(|_| ())
}

/// Refuses a file that is not a database of `format`. Reads only the header.
pub(crate) fn check_format_of(
    conn: &Connection,
    path: &Path,
    format: &Format,
) -> Result<i32, OpenError> {
    let application_id: i32 = conn
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(sqlite_error(path))?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(sqlite_error(path))?;
    if application_id == 0 {
        // Either a blank database (created and not initialised yet) or somebody else's.
        return if is_blank(conn, path)? {
            Ok(format.version)
        } else {
            Err(OpenError::NotAStore {
                path: path.to_owned(),
                reason: "the SQLite database has no Headwater application id".to_owned(),
            })
        };
    }
    if application_id != format.application_id {
        return Err(OpenError::NotAStore {
            path: path.to_owned(),
            reason: format!("the SQLite database has application id {application_id:#x}"),
        });
    }
    if version > i64::from(format.version) {
        return Err(OpenError::NewerFormat {
            path: path.to_owned(),
            found: version,
            supported: i64::from(format.version),
        });
    }
    let oldest = i64::from(format.version) - format.upgrades.len() as i64;
    if version < oldest {
        return Err(OpenError::NotAStore {
            path: path.to_owned(),
            reason: format!("unknown format version {version}"),
        });
    }
    // Between `oldest` and `format.version`: fits.
    Ok(version as i32)
}

/// Brings a file of version `found` (checked by [`check_format_of`]) to `format.version`, one
/// step a transaction (the step's statements and its `user_version` together), on the writer's
/// connection (`synchronous=FULL`). A crash between steps leaves a file of an intermediate
/// version, which the next open upgrades on from there.
pub(crate) fn upgrade_of(
    conn: &Connection,
    path: &Path,
    format: &Format,
    found: i32,
) -> Result<(), OpenError> {
    let oldest = format.version - format.upgrades.len() as i32;
    for version in found..format.version {
        let Ok(step) = usize::try_from(version - oldest) else {
            continue;
        };
        let sql = format!(
            "BEGIN IMMEDIATE;
             {}
             PRAGMA user_version = {};
             COMMIT;",
            format.upgrades[step],
            version + 1
        );
        if let Err(e) = conn.execute_batch(&sql) {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(sqlite_error(path)(e));
        }
    }
    Ok(())
}

/// Whether the database is empty: no schema and no application id.
pub(crate) fn is_blank(conn: &Connection, path: &Path) -> Result<bool, OpenError> {
    let application_id: i32 = conn
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(sqlite_error(path))?;
    let objects: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))
        .map_err(sqlite_error(path))?;
    Ok(application_id == 0 && objects == 0)
}

/// Creates a new store's database whole under a temporary name (schema, format markers, WAL
/// mode), makes it durable, and renames it into place. A crash at any step leaves either no
/// database (the next open starts again, removing the leftover) or a complete one.
fn create_database(dir: &Path, path: &Path) -> Result<(), OpenError> {
    create_database_of(dir, path, &LOG_FORMAT)
}

/// [`create_database`] for a file of `format`.
pub(crate) fn create_database_of(
    dir: &Path,
    path: &Path,
    format: &Format,
) -> Result<(), OpenError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| OpenError::Io { what, path, source }
    };
    let creating = dir.join(format!("{}.creating", format.file));
    for leftover in ["", "-journal", "-wal", "-shm"] {
        let file = dir.join(format!("{}.creating{leftover}", format.file));
        match fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("removing the leftover", &file)(e)),
        }
    }
    {
        let conn = connect(&creating, 1024 * 1024)?;
        create(&conn, &creating, format)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(sqlite_error(&creating))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(io("switching to WAL mode", &creating)(
                std::io::Error::other(format!("journal_mode stayed {mode}")),
            ));
        }
        // Closing checkpoints and removes the (empty) WAL.
    }
    File::open(&creating)
        .and_then(|file| file.sync_all())
        .map_err(io("syncing", &creating))?;
    fs::rename(&creating, path).map_err(io("renaming into place", &creating))?;
    sync_dir(dir).map_err(io("syncing the directory", dir))
}

/// Creates the schema and the format markers in one transaction.
fn create(conn: &Connection, path: &Path, format: &Format) -> Result<(), OpenError> {
    let sql = format!(
        "BEGIN IMMEDIATE;
         PRAGMA application_id = {};
         PRAGMA user_version = {};
         {}
         COMMIT;",
        format.application_id, format.version, format.schema
    );
    conn.execute_batch(&sql).map_err(sqlite_error(path))
}

pub(crate) fn configure_writer(
    conn: &Connection,
    path: &Path,
    options: &Options,
) -> Result<(), OpenError> {
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(sqlite_error(path))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(OpenError::Io {
            what: "switching to WAL mode",
            path: path.to_owned(),
            source: std::io::Error::other(format!("journal_mode stayed {mode}")),
        });
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sqlite_error(path))?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT_BYTES)
        .map_err(sqlite_error(path))?;
    if let Some(pages) = options.max_page_count {
        let pages = i64::try_from(pages).unwrap_or(i64::MAX);
        conn.pragma_update(None, "max_page_count", pages)
            .map_err(sqlite_error(path))?;
    }
    Ok(())
}

fn last_position(conn: &Connection, path: &Path) -> Result<Position, OpenError> {
    let last: Option<i64> = conn
        .query_row("SELECT max(position) FROM events", [], |row| row.get(0))
        .map_err(sqlite_error(path))?;
    match last.map(u64::try_from) {
        None => Ok(Position::START),
        Some(Ok(p)) => Ok(Position(p)),
        Some(Err(_)) => Err(OpenError::Corrupt {
            path: path.to_owned(),
            detail: "the last position is negative".to_owned(),
        }),
    }
}

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
