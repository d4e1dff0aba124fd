//! Schema creation and migration: several replicas starting at once on a fresh database, and a
//! schema from a newer build.

use headwater_core::{ExpectedVersion, Position};
use headwater_postgres::{ConnectError, Options, PostgresStore, SCHEMA_VERSION};
use headwater_store::EventStore;
use headwater_store::conformance::{events, stream};

use crate::support::Fresh;

/// Replicas that connect at once to a schema that does not exist yet.
const REPLICAS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_replicas_migrate_once() {
    let fresh = Fresh::new();
    let mut connects = Vec::new();
    for _ in 0..REPLICAS {
        let url = fresh.url.clone();
        let options = fresh.options();
        connects.push(tokio::spawn(async move {
            PostgresStore::connect(&url, options).await
        }));
    }
    let mut stores = Vec::new();
    for connect in connects {
        stores.push(connect.await.unwrap().expect("every replica connects"));
    }
    let client = fresh.client().await;
    let rows = client
        .query(
            &format!(
                "SELECT version, count(*) FROM \"{}\".schema_migrations GROUP BY version ORDER BY version",
                fresh.schema
            ),
            &[],
        )
        .await
        .unwrap();
    let applied: Vec<(i32, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let once: Vec<(i32, i64)> = (1..=SCHEMA_VERSION).map(|v| (v, 1)).collect();
    assert_eq!(applied, once, "each migration applied exactly once");
    // They all see one store.
    stores[0]
        .append(&stream("m"), ExpectedVersion::NoStream, events(2))
        .await
        .unwrap();
    for store in &stores {
        assert_eq!(
            store.read_all(Position::START, 10).await.unwrap().len(),
            2,
            "every replica reads the same log"
        );
    }
    // And a replica started later finds nothing to do.
    drop(stores);
    let again = fresh.connect(fresh.options()).await;
    assert_eq!(again.head_position(), Position(2));
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let fresh = Fresh::new();
    drop(fresh.connect(fresh.options()).await);
    let client = fresh.client().await;
    client
        .batch_execute(&format!(
            "INSERT INTO \"{}\".schema_migrations (version, description) VALUES (999, 'future')",
            fresh.schema
        ))
        .await
        .unwrap();
    match PostgresStore::connect(&fresh.url, fresh.options()).await {
        Err(ConnectError::NewerSchema { found: 999, known }) => assert!(known < 999),
        other => panic!("expected NewerSchema, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_schema_names_and_urls_are_refused() {
    let url = crate::support::url();
    for schema in ["", "Bad", "a-b", "pg_x", "x\"; DROP TABLE y; --"] {
        match PostgresStore::connect(&url, Options::with_schema(schema)).await {
            Err(ConnectError::InvalidSchema(s)) => assert_eq!(s, schema),
            other => panic!("{schema:?}: expected InvalidSchema, got {other:?}"),
        }
    }
    assert!(matches!(
        PostgresStore::connect("not a url at all ::", Options::default()).await,
        Err(ConnectError::InvalidUrl(_))
    ));
}

/// How long a dropped store's sessions may take to end, in seconds.
const SESSIONS_END_SECS: u64 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_store_and_leadership_leave_no_session_behind() {
    let fresh = Fresh::new();
    let app = format!("hw_drop_{}", fresh.schema);
    let url = format!(
        "{}{}application_name={app}",
        fresh.url,
        if fresh.url.contains('?') { '&' } else { '?' }
    );
    let store = PostgresStore::connect(&url, fresh.options()).await.unwrap();
    store
        .append(&stream("d"), ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    store.read_all(Position::START, 10).await.unwrap();
    let leadership = store
        .leader_election("dropper")
        .try_acquire()
        .await
        .unwrap()
        .expect("nobody else leads");
    let client = fresh.client().await;
    let sessions = || async {
        client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    // Writer, listener, a pooled reader and the leadership's connection.
    assert!(sessions().await >= 4, "the store's sessions are visible");
    drop(leadership);
    drop(store);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(SESSIONS_END_SECS);
    while sessions().await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "sessions outlive the dropped store"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// How long the store may take to recover from lost connections, in seconds.
const RECOVER_SECS: u64 = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_recovers_when_its_connections_are_cut() {
    let fresh = Fresh::new();
    let app = format!("hw_cut_{}", fresh.schema);
    let url = format!(
        "{}{}application_name={app}",
        fresh.url,
        if fresh.url.contains('?') { '&' } else { '?' }
    );
    let store = PostgresStore::connect(&url, fresh.options()).await.unwrap();
    let other = fresh.connect(fresh.options()).await;
    store
        .append(&stream("cut"), ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    store.read_all(Position::START, 10).await.unwrap();
    let client = fresh.client().await;
    let cut: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get(0);
    assert!(cut >= 3, "writer, listener and a reader were cut ({cut})");

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(RECOVER_SECS);
    // An append may fail while the writer learns its connection is gone; the same append
    // retried goes through once (G3).
    let batch = events(2);
    let outcome = loop {
        match store
            .append(&stream("cut"), ExpectedVersion::Any, batch.clone())
            .await
        {
            Ok(outcome) => break outcome,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "appends never recovered: {e}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(outcome.last_position, Position(3));
    let read = loop {
        match store.read_all(Position::START, 10).await {
            Ok(read) => break read,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "reads never recovered: {e}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(read.len(), 3);
    // The listener is back: another handle's append reaches this handle's watch.
    other
        .append(&stream("elsewhere"), ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    let head = headwater_store::wait_for_position(&store, Position(3), left).await;
    assert_eq!(head, Position(4));
}

/// Appends per handle in the isolation test.
const ISOLATION_APPENDS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serializable_default_isolation_does_not_break_appends() {
    // The writer's reasoning needs READ COMMITTED (a fresh snapshot per statement after the
    // lock); a server or role default of SERIALIZABLE must not change that.
    let fresh = Fresh::new();
    let url = format!(
        "{}{}options=-c%20default_transaction_isolation%3Dserializable",
        fresh.url,
        if fresh.url.contains('?') { '&' } else { '?' }
    );
    let a = PostgresStore::connect(&url, fresh.options()).await.unwrap();
    let b = PostgresStore::connect(&url, fresh.options()).await.unwrap();
    let mut tasks = Vec::new();
    for (i, store) in [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
    {
        tasks.push(tokio::spawn(async move {
            for _ in 0..ISOLATION_APPENDS {
                store
                    .append(
                        &stream(&format!("iso{}", i % 2)),
                        ExpectedVersion::Any,
                        events(1),
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let log = headwater_store::conformance::assert_store_invariants(&a).await;
    assert_eq!(log.len(), 4 * ISOLATION_APPENDS);
}
