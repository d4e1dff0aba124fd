//! WAL checkpoints, off the commit path.
//!
//! SQLite's default copies the WAL back into the database file inside the commit that finds the
//! WAL past 1,000 pages, on the writer's thread, so every few hundred commits one append waits
//! for a checkpoint (thousands of page writes and an fsync of the database file). Instead, the
//! writer's WAL hook wakes a checkpointer thread with its own connection, which runs `PASSIVE`
//! checkpoints concurrently with the writer. Because a concurrent checkpoint never catches up
//! with a writer that keeps committing, and the WAL only starts over once it was copied whole,
//! the writer still checkpoints itself at a larger size (a backstop, cheap by then: the
//! checkpointer has copied nearly everything).

use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;

use rusqlite::Connection;

use crate::OpenError;
use crate::open::{connect, sqlite_error};

/// The WAL growth, in pages, after which the writer wakes the checkpointer (SQLite's default
/// checkpoint interval).
pub(crate) const WAL_CHECKPOINT_PAGES: i32 = 1_000;
/// The WAL size, in pages, past which the writer checkpoints itself (16 × the above, 64 MiB of
/// 4 KiB pages).
pub(crate) const WAL_BACKSTOP_PAGES: i32 = 16 * WAL_CHECKPOINT_PAGES;
/// The page cache of the checkpointer's connection, in bytes (a checkpoint streams pages).
const CHECKPOINTER_PAGE_CACHE_BYTES: u64 = 256 * 1024;

/// The checkpointer thread and the way to wake it.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    wake: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Opens the checkpointer's connection and starts its thread.
    pub(crate) fn start(path: &Path) -> Result<Checkpointer, OpenError> {
        let conn = connect(path, CHECKPOINTER_PAGE_CACHE_BYTES)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sqlite_error(path))?;
        let (wake, woken) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("headwater-checkpointer".to_owned())
            .spawn(move || run(conn, woken))
            .map_err(|source| OpenError::Io {
                what: "starting the checkpointer thread for",
                path: path.to_owned(),
                source,
            })?;
        Ok(Checkpointer {
            wake: Some(wake),
            thread: Some(thread),
        })
    }

    /// Installs the WAL hook on the writer's connection: it wakes the checkpointer, and
    /// checkpoints itself past the backstop. The hook never fails a commit (the commit is done
    /// when it runs); a checkpoint that cannot run now (busy) is tried again after a later
    /// commit.
    pub(crate) fn hook(&self, conn: &mut Connection) -> rusqlite::Result<()> {
        let wake = self.wake.clone();
        // The WAL size at which to wake the checkpointer next: every `WAL_CHECKPOINT_PAGES` new
        // pages, so that each checkpoint (and its fsync of the database file) covers that many.
        let mut next_wake = WAL_CHECKPOINT_PAGES;
        let mut last_pages = 0;
        conn.wal_hook(Some(move |wal: &mut rusqlite::hooks::Wal, pages: i32| {
            if pages < last_pages {
                // The WAL started over.
                next_wake = WAL_CHECKPOINT_PAGES;
            }
            last_pages = pages;
            if pages >= WAL_BACKSTOP_PAGES {
                let _ = wal.checkpoint();
            } else if pages >= next_wake
                && let Some(wake) = &wake
            {
                next_wake = pages.saturating_add(WAL_CHECKPOINT_PAGES);
                match wake.try_send(()) {
                    // Already awake, or gone: either way nothing to do.
                    Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
                }
            }
            Ok(())
        }))
    }

    /// Stops the thread (after the checkpoint it is running, if any). The writer's hook must be
    /// removed first, since it holds a way to wake the thread.
    pub(crate) fn stop(&mut self) {
        self.wake = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(conn: Connection, woken: Receiver<()>) {
    while woken.recv().is_ok() {
        // Busy (the writer's backstop is running) or failed: the frames stay in the WAL, which
        // remains the authority until a checkpoint completes; the next wake tries again.
        let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
    }
}
