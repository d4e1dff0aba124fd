//! Taking the directory lock (`LOCK`, an exclusive `flock`).
//!
//! A `flock` belongs to the open file description, and a child process holds a copy of every
//! open file description of its parent from its fork until its `exec` closes them (`O_CLOEXEC`).
//! So when any thread of this process spawns a process just as the store is closed, the LOCK
//! stays locked for that instant, and an immediate reopen (after poisoning, or in a test)
//! would be refused as if another process had the store. Opening therefore retries a held lock
//! for a short, bounded time before it reports [`OpenError::Locked`](crate::OpenError::Locked).

use std::fs::{File, TryLockError};
use std::time::{Duration, Instant};

/// How long opening retries a lock that is held before reporting it, in milliseconds.
pub(crate) const LOCK_WAIT_MILLIS: u64 = 500;
/// The pause between two attempts, in milliseconds.
const LOCK_RETRY_MILLIS: u64 = 2;

/// Takes the exclusive lock on `file`, retrying while it is held for up to
/// [`LOCK_WAIT_MILLIS`]. Blocks the calling thread meanwhile.
pub(crate) fn lock_exclusive(file: &File) -> Result<(), TryLockError> {
    let deadline = Instant::now() + Duration::from_millis(LOCK_WAIT_MILLIS);
    loop {
        match file.try_lock() {
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(LOCK_RETRY_MILLIS));
            }
            result => return result,
        }
    }
}
