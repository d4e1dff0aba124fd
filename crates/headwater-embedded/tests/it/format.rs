//! Opening refuses what is not a Headwater store of a known version, and a directory another
//! handle holds; the refused files are left as they were.

use std::path::Path;

use headwater_core::ExpectedVersion;
use headwater_embedded::{EmbeddedStore, OpenError};
use headwater_store::EventStore;
use headwater_store::conformance::{events, stream};

use crate::support::open;

fn database(dir: &Path) -> std::path::PathBuf {
    dir.join("events.sqlite3")
}

/// Opens `dir`, expecting a refusal, and checks the database file was not touched.
fn refused(dir: &Path) -> OpenError {
    let before = std::fs::read(database(dir)).unwrap();
    let err = EmbeddedStore::open(dir).expect_err("the open is refused");
    let after = std::fs::read(database(dir)).unwrap();
    assert!(before == after, "a refused open changed the database file");
    for suffix in ["-wal", "-journal"] {
        let extra = dir.join(format!("events.sqlite3{suffix}"));
        assert!(
            !extra.exists(),
            "a refused open created {}",
            extra.display()
        );
    }
    err
}

#[test]
fn a_file_that_is_not_sqlite_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(database(dir.path()), "not a database\n".repeat(300)).unwrap();
    let err = refused(dir.path());
    assert!(matches!(err, OpenError::NotAStore { .. }), "{err:?}");
    assert!(err.to_string().contains("not a Headwater store"), "{err}");
}

#[test]
fn another_application_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(database(dir.path())).unwrap();
        conn.execute_batch("PRAGMA application_id = 42; CREATE TABLE t (x INTEGER);")
            .unwrap();
    }
    let err = refused(dir.path());
    assert!(matches!(err, OpenError::NotAStore { .. }), "{err:?}");

    // A database without any application id but with tables is somebody else's too.
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(database(dir.path())).unwrap();
        conn.execute_batch("CREATE TABLE events (x INTEGER);")
            .unwrap();
    }
    let err = refused(dir.path());
    assert!(matches!(err, OpenError::NotAStore { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store
            .append(&stream("a"), ExpectedVersion::Any, events(2))
            .await
            .unwrap();
    }
    {
        let conn = rusqlite::Connection::open(database(dir.path())).unwrap();
        conn.execute_batch("PRAGMA user_version = 2; PRAGMA wal_checkpoint(TRUNCATE);")
            .unwrap();
        conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
    }
    let err = refused(dir.path());
    match err {
        OpenError::NewerFormat {
            found, supported, ..
        } => assert_eq!((found, supported), (2, 1)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_handle_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path());
    let err = EmbeddedStore::open(dir.path()).expect_err("the directory is locked");
    assert!(matches!(err, OpenError::Locked { .. }), "{err:?}");
    assert!(err.to_string().contains("in use"), "{err}");
    // The refused open disturbed nothing.
    first
        .append(&stream("a"), ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    drop(first);
    let second = open(dir.path());
    assert_eq!(second.head_position().0, 1);
}

#[test]
fn an_emptied_database_file_is_refused_not_recreated() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(store.append(&stream("a"), ExpectedVersion::Any, events(3)))
            .unwrap();
    }
    // Something truncates the database file (an operator's `> events.sqlite3`, a bad copy).
    std::fs::write(database(dir.path()), b"").unwrap();
    let err = refused(dir.path());
    assert!(matches!(err, OpenError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("empty"), "{err}");
    assert_eq!(std::fs::metadata(database(dir.path())).unwrap().len(), 0);
}

#[test]
fn a_creation_cut_short_is_started_again() {
    let dir = tempfile::tempdir().unwrap();
    // What a crash while creating the store leaves: the database under its temporary name.
    std::fs::write(dir.path().join("events.sqlite3.creating"), b"half").unwrap();
    std::fs::write(dir.path().join("events.sqlite3.creating-journal"), b"x").unwrap();
    let store = open(dir.path());
    assert_eq!(store.head_position(), headwater_core::Position::START);
    drop(store);
    assert!(!dir.path().join("events.sqlite3.creating").exists());
    assert!(!dir.path().join("events.sqlite3.creating-journal").exists());
    // And the store it made is a store.
    drop(open(dir.path()));
}
