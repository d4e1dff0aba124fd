//! A quick rate check of the embedded feed store, for its developers (the project's benchmark is
//! `headwater bench`). Run in release mode, on the disk to measure:
//!
//! ```text
//! cargo run --release -p headwater-embedded --example feed_rate -- [DIR] [BATCHES] [SUBJECTS]
//! ```
//!
//! Fills the log with `BATCHES` × 2,000 events, then commits `BATCHES` projector batches of
//! 10,000 integration events each (5 per log event, ~170 bytes of JSON data, subjects drawn from
//! `SUBJECTS` accounts) and prints the commit rate; then reads the whole feed forward in pages of
//! 1,000 (one reader, then four at once), and one subject at a time.

use std::path::PathBuf;
use std::time::Instant;

use headwater_core::{
    EventId, EventType, ExpectedVersion, FeedId, FeedPosition, NewEvent, Position, Sequence,
    StreamName, Subject, Timestamp,
};
use headwater_embedded::EmbeddedStore;
use headwater_store::{EventStore, FeedStore, ProjectedEvent, ProjectorBatch};

const BATCH_EVENTS: usize = 10_000;
const EVENTS_PER_SOURCE: u64 = 5;
const PAGE: u64 = 1_000;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map(PathBuf::from);
    let batches: u64 = args.next().map_or(100, |a| a.parse().unwrap());
    let subjects: u64 = args.next().map_or(100_000, |a| a.parse().unwrap());
    let temp;
    let dir = match dir {
        Some(dir) => dir,
        None => {
            temp = tempfile::tempdir_in(".").unwrap();
            temp.path().join("store")
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(dir, batches, subjects));
}

async fn run(dir: PathBuf, batches: u64, subjects: u64) {
    let store = EmbeddedStore::open(&dir).unwrap();
    let sources = batches * BATCH_EVENTS as u64 / EVENTS_PER_SOURCE;
    let stream = StreamName::from_parts("source", "1").unwrap();
    while store.head_position().0 < sources {
        let events = (0..1_000)
            .map(|_| {
                NewEvent::new(
                    EventId::new_random(),
                    EventType::new("source.happened").unwrap(),
                    b"{}".to_vec(),
                )
            })
            .collect();
        store
            .append(&stream, ExpectedVersion::Any, events)
            .await
            .unwrap();
    }
    let feeds = store.feeds().unwrap();
    let feed = FeedId::parse("accounts.v1").unwrap();
    let state = feeds.register(&feed).await.unwrap();
    let event_type = EventType::new("accounts.deposited").unwrap();
    let mut cursor = state.cursor;
    // Batches are made before the clock starts: only the store's work is timed.
    let mut made = Vec::new();
    for _ in 0..batches {
        let to = Position(cursor.0 + BATCH_EVENTS as u64 / EVENTS_PER_SOURCE);
        let events = (0..BATCH_EVENTS as u64)
            .map(|i| {
                let account = rand::random::<u64>() % subjects;
                ProjectedEvent {
                    id: EventId::new_random(),
                    event_type: event_type.clone(),
                    subject: Subject::new(format!("{account:012}")).unwrap(),
                    time: Timestamp::from_unix_micros(1_700_000_000_000_000 + i),
                    data: format!(
                        "{{\"account\":\"{account:012}\",\"amount\":{},\"currency\":\"EUR\",\"reference\":\"benchmark payment with a realistic size of text\"}}",
                        rand::random::<u32>()
                    )
                    .into_bytes(),
                    source_position: Position(cursor.0 + 1 + i / EVENTS_PER_SOURCE),
                }
            })
            .collect();
        made.push(ProjectorBatch {
            from: cursor,
            to,
            events,
        });
        cursor = to;
    }
    let started = Instant::now();
    let mut slowest = 0f64;
    for batch in made {
        let one = Instant::now();
        feeds.commit(&feed, batch).await.unwrap();
        slowest = slowest.max(one.elapsed().as_secs_f64());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total = batches * BATCH_EVENTS as u64;
    println!(
        "commit: {total} events in {batches} batches of {BATCH_EVENTS} over {subjects} subjects: \
         {:.0} events/s ({:.1} ms per batch, slowest {:.1} ms)",
        total as f64 / elapsed,
        elapsed * 1000.0 / batches as f64,
        slowest * 1000.0
    );

    let read_all = |feeds: headwater_embedded::EmbeddedFeedStore, feed: FeedId| async move {
        let mut after = FeedPosition::START;
        let mut n = 0u64;
        loop {
            let page = feeds.read_feed(&feed, after, PAGE).await.unwrap();
            let Some(last) = page.last() else { break };
            after = last.position;
            n += page.len() as u64;
        }
        n
    };
    let started = Instant::now();
    let n = read_all(feeds.clone(), feed.clone()).await;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "read_feed, 1 reader, pages of {PAGE}: {:.0} events/s",
        n as f64 / elapsed
    );
    let started = Instant::now();
    let readers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(read_all(feeds.clone(), feed.clone())))
        .collect();
    let mut n = 0;
    for reader in readers {
        n += reader.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "read_feed, 4 readers at once, pages of {PAGE}: {:.0} events/s in all",
        n as f64 / elapsed
    );
    // Subjects: list them all, then read 2,000 subjects whole.
    let started = Instant::now();
    let mut listed = Vec::new();
    loop {
        let page = feeds.subjects(&feed, listed.last(), 10_000).await.unwrap();
        let Some(last) = page.last() else { break };
        let last = last.subject.clone();
        listed.push(last);
    }
    let pages = listed.len();
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "subjects: {pages} pages of up to 10,000 subjects in {:.1} ms",
        elapsed * 1000.0
    );
    let mut all_subjects = Vec::new();
    let mut after: Option<Subject> = None;
    while all_subjects.len() < 2_000 {
        let page = feeds.subjects(&feed, after.as_ref(), 2_000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.subject.clone());
        all_subjects.extend(page.into_iter().map(|h| h.subject));
    }
    let started = Instant::now();
    let mut n = 0;
    for subject in &all_subjects {
        n += feeds
            .read_subject(&feed, subject, Sequence::START, PAGE)
            .await
            .unwrap()
            .len();
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "read_subject: {} subjects, {n} events: {:.0} subjects/s, {:.0} events/s",
        all_subjects.len(),
        all_subjects.len() as f64 / elapsed,
        n as f64 / elapsed
    );
    let size = std::fs::metadata(dir.join("feeds.sqlite3")).map_or(0, |m| m.len())
        + std::fs::metadata(dir.join("feeds.sqlite3-wal")).map_or(0, |m| m.len());
    println!(
        "feeds file: {:.1} MiB, {:.0} bytes per event",
        size as f64 / 1_048_576.0,
        size as f64 / total as f64
    );
}
