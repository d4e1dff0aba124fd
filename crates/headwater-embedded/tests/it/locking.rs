//! The directory lock held for an instant by someone else (a child process between its fork
//! and its exec holds the LOCK file's open file description) does not refuse an open.

use std::fs::OpenOptions;
use std::time::Duration;

use headwater_embedded::{EmbeddedStore, OpenError};

/// How long the other holder keeps the lock, in milliseconds: well under the time `open` waits.
const HELD_MILLIS: u64 = 50;

#[test]
fn a_lock_held_for_an_instant_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    drop(crate::support::open(dir.path()));
    // Another open file description of LOCK, locked: what a freshly forked child holds.
    let other = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join("LOCK"))
        .unwrap();
    other.try_lock().unwrap();
    let holder = std::thread::spawn(move || {
        // Simulates the child's fork-to-exec window; not waiting for anything.
        std::thread::sleep(Duration::from_millis(HELD_MILLIS));
        drop(other);
    });
    let opened = EmbeddedStore::open(dir.path());
    holder.join().unwrap();
    let store = opened.unwrap_or_else(|e| panic!("the open gave up: {e}"));
    drop(store);

    // A lock that stays held is still refused.
    let other = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join("LOCK"))
        .unwrap();
    other.try_lock().unwrap();
    let err = EmbeddedStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, OpenError::Locked { .. }), "{err:?}");
}
