//! A quick throughput check of the embedded store, for its developers (the project's benchmark is
//! `headwater bench`). Run in release mode, on the disk to measure:
//!
//! ```text
//! cargo run --release -p headwater-embedded --example throughput -- [DIR] [SECS] [ONLY]
//! ```
//!
//! `ONLY` runs one workload: `fsync`, `one`, `many`, `batch` or `batch4` (then `read`).
//!
//! Prints the fsync bound of the disk, then durable appends/s with 1 writer, events/s with 64
//! writers on distinct streams, events/s in batches of 100, and events/s reading the log forward.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use headwater_core::limits::READ_PAGE_EVENTS_MAX;
use headwater_core::{EventId, EventType, ExpectedVersion, NewEvent, Position, StreamName};
use headwater_embedded::EmbeddedStore;
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

fn fsync_bound(dir: &std::path::Path, secs: Duration) -> f64 {
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path).unwrap();
    let record = [7u8; 256];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < secs {
        file.write_all(&record).unwrap();
        file.sync_data().unwrap();
        n += 1;
    }
    std::fs::remove_file(path).unwrap();
    n as f64 / start.elapsed().as_secs_f64()
}

/// The CPU time this process used so far, user and system, in seconds (from `/proc/self/stat`,
/// in clock ticks of 10 ms).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of the whole line; 12 and 13 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Runs `writers` tasks appending `batch` events per append to their own streams for `secs`.
async fn appends(store: &EmbeddedStore, writers: usize, batch: usize, secs: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let prefix = rand::random::<u32>();
    for w in 0..writers {
        let store = store.clone();
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
    let cpu = cpu_secs();
    tokio::time::sleep(secs).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let events = count.load(Ordering::Relaxed) as f64;
    let cpu_micros = (cpu_secs() - cpu) * 1e6 / events;
    print!("[{cpu_micros:.1} µs CPU/event] ");
    events / start.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let base = args.next().map_or_else(std::env::temp_dir, PathBuf::from);
    let secs = Duration::from_secs_f64(args.next().map_or(5.0, |s| s.parse().unwrap()));
    let only = args.next();
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let dir = tempfile::tempdir_in(base).unwrap();
    if run("fsync") {
        let bound = fsync_bound(dir.path(), secs);
        println!("fsync bound (256 B write + fdatasync): {bound:.0}/s");
    }
    let store = EmbeddedStore::open(dir.path().join("store")).unwrap();
    if run("one") {
        let one = appends(&store, 1, 1, secs).await;
        println!("1 writer, 1 event per append: {one:.0} appends/s");
    }
    if run("many") {
        let many = appends(&store, 64, 1, secs).await;
        println!("64 writers on distinct streams, 1 event each: {many:.0} events/s");
    }
    if run("batch") {
        let batches = appends(&store, 1, 100, secs).await;
        println!("1 writer, batches of 100: {batches:.0} events/s");
    }
    if run("batch4") {
        let batches4 = appends(&store, 4, 100, secs).await;
        println!("4 writers, batches of 100: {batches4:.0} events/s");
    }
    if only.as_deref() == Some("read") {
        // Fill the store for the read figure alone.
        appends(&store, 4, 100, secs).await;
    }
    let total = store.head_position().0;
    let rounds = if only.as_deref() == Some("read") {
        5
    } else {
        1
    };
    for _ in 0..rounds {
        let start = Instant::now();
        let cpu = cpu_secs();
        let mut cursor = Position::START;
        let mut read = 0u64;
        loop {
            let page = store.read_all(cursor, READ_PAGE_EVENTS_MAX).await.unwrap();
            let Some(last) = page.last() else { break };
            cursor = last.position;
            read += page.len() as u64;
        }
        assert_eq!(read, total);
        let rate = read as f64 / start.elapsed().as_secs_f64();
        let cpu_micros = (cpu_secs() - cpu) * 1e6 / read as f64;
        print!("[{cpu_micros:.2} µs CPU/event] ");
        println!(
            "read forward, pages of {READ_PAGE_EVENTS_MAX}: {rate:.0} events/s ({read} events)"
        );
    }
    let db = std::fs::metadata(dir.path().join("store/events.sqlite3")).map_or(0, |m| m.len());
    println!("database file: {:.1} MiB", db as f64 / 1048576.0);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for line in status.lines() {
        if line.starts_with("VmRSS") || line.starts_with("VmHWM") {
            println!("{line}");
        }
    }
}
