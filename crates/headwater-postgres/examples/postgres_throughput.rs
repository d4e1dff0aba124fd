//! A throughput check of the PostgreSQL store, for its developers. Run in release mode against
//! the server to measure (a schema `hw_bench_<random>` is created and dropped):
//!
//! ```text
//! cargo run --release -p headwater-postgres --example postgres_throughput -- URL [SECS] [ONLY]
//! ```
//!
//! `HEADWATER_WRITER_CONNECTIONS=N` sets `Options::writer_connections`. `ONLY` runs one workload: `commit`, `one`, `many`, `many4`, `batch` or `batch4` (then the
//! read). Prints the server's commit bound (single-row autocommit `INSERT`s on one connection,
//! and on 8 connections in parallel — what PostgreSQL does without any serialisation), then
//! durable appends/s with 1 writer, events/s with 64 writers on distinct streams (in one
//! process, and spread over 4 store handles as 4 replicas would be), events/s in batches of 100,
//! and events/s reading the log forward.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use headwater_core::limits::READ_PAGE_EVENTS_MAX;
use headwater_core::{EventId, EventType, ExpectedVersion, NewEvent, Position, StreamName};
use headwater_postgres::{Options, PostgresStore};
use headwater_store::EventStore;

fn event() -> NewEvent {
    let data = format!(
        "{{\"account\":\"{}\",\"amount\":{},\"currency\":\"EUR\",\"reference\":\"benchmark payment with a realistic size of text\"}}",
        EventId::new_random(),
        rand::random::<u32>()
    );
    NewEvent::new(
        EventId::new_time_ordered(),
        EventType::new("account.deposited").unwrap(),
        data.into_bytes(),
    )
}

async fn client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// Single-row autocommit inserts on `connections` connections for `secs`: commits/s.
async fn commit_bound(url: &str, schema: &str, connections: usize, secs: Duration) -> f64 {
    let setup = client(url).await;
    setup
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS \"{schema}\".probe (id bigserial PRIMARY KEY, data bytea)"
        ))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let c = client(url).await;
        c.batch_execute("SET synchronous_commit = on")
            .await
            .unwrap();
        let insert = c
            .prepare(&format!(
                "INSERT INTO \"{schema}\".probe (data) VALUES ($1)"
            ))
            .await
            .unwrap();
        let stop = stop.clone();
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            let data = vec![7u8; 256];
            while !stop.load(Ordering::Relaxed) {
                c.execute(&insert, &[&data]).await.unwrap();
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(secs).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Runs `writers` tasks appending `batch` events per append to their own streams for `secs`,
/// spread over `stores`.
async fn appends(stores: &[PostgresStore], writers: usize, batch: usize, secs: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let prefix = rand::random::<u32>();
    for w in 0..writers {
        let store = stores[w % stores.len()].clone();
        let stop = stop.clone();
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            let name = StreamName::new(format!("bench-{prefix}w{w}")).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let events: Vec<_> = (0..batch).map(|_| event()).collect();
                store
                    .append(&name, ExpectedVersion::Any, events)
                    .await
                    .unwrap();
                count.fetch_add(batch as u64, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(secs).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .or_else(|| std::env::var("HEADWATER_TEST_POSTGRES_URL").ok())
        .expect("usage: throughput URL [SECS] [ONLY]");
    let secs = Duration::from_secs_f64(args.next().map_or(5.0, |s| s.parse().unwrap()));
    let only = args.next();
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let schema = format!("hw_bench_{:08x}", rand::random::<u32>());
    let options = || {
        let mut options = Options::with_schema(&schema);
        if let Ok(n) = std::env::var("HEADWATER_WRITER_CONNECTIONS") {
            options.writer_connections = n.parse().unwrap();
        }
        options
    };
    let store = PostgresStore::connect(&url, options()).await.unwrap();
    if run("commit") {
        let one = commit_bound(&url, &schema, 1, secs).await;
        let eight = commit_bound(&url, &schema, 8, secs).await;
        println!(
            "commit bound (autocommit 1-row INSERT): {one:.0}/s on 1 connection, {eight:.0}/s on 8"
        );
    }
    if run("one") {
        let one = appends(std::slice::from_ref(&store), 1, 1, secs).await;
        println!("1 writer, 1 event per append: {one:.0} appends/s");
    }
    if run("many") {
        let many = appends(std::slice::from_ref(&store), 64, 1, secs).await;
        println!("64 writers on distinct streams, 1 event each: {many:.0} events/s");
    }
    if run("many4") {
        let mut stores = vec![store.clone()];
        for _ in 1..4 {
            stores.push(PostgresStore::connect(&url, options()).await.unwrap());
        }
        let many = appends(&stores, 64, 1, secs).await;
        println!(
            "64 writers on distinct streams, 1 event each, over 4 store handles (as 4 replicas): {many:.0} events/s"
        );
    }
    if run("batch") {
        let batches = appends(std::slice::from_ref(&store), 1, 100, secs).await;
        println!("1 writer, batches of 100: {batches:.0} events/s");
    }
    if run("batch4") {
        let batches = appends(std::slice::from_ref(&store), 4, 100, secs).await;
        println!("4 writers, batches of 100: {batches:.0} events/s");
    }
    // Wait until this handle's head has caught up with everything written.
    let c = client(&url).await;
    let total: i64 = c
        .query_one(&format!("SELECT position FROM \"{schema}\".log_head"), &[])
        .await
        .unwrap()
        .get(0);
    let start = Instant::now();
    let mut cursor = Position::START;
    let mut read = 0u64;
    loop {
        let page = store.read_all(cursor, READ_PAGE_EVENTS_MAX).await.unwrap();
        let Some(last) = page.last() else { break };
        cursor = last.position;
        read += page.len() as u64;
    }
    assert_eq!(read, total as u64);
    let rate = read as f64 / start.elapsed().as_secs_f64();
    println!("read forward, pages of {READ_PAGE_EVENTS_MAX}: {rate:.0} events/s ({read} events)");
    drop(store);
    c.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
}
