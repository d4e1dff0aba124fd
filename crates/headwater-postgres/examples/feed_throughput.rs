//! A throughput check of the PostgreSQL feed store, for its developers. Run in release mode
//! against the server to measure (a schema `hw_bench_<random>` is created and dropped):
//!
//! ```text
//! cargo run --release -p headwater-postgres --example feed_throughput -- URL [BATCHES] [SUBJECTS]
//! ```
//!
//! Commits `BATCHES` (default 30) projector batches of 10,000 integration events each (one per
//! internal event, on `SUBJECTS` subjects, default 100,000, about 150 bytes of JSON data each)
//! to one feed, one after the other as a projector does, and prints commits/s and events/s; then
//! reads the whole feed forward in pages of `FEED_PAGE_EVENTS_MAX` and prints events/s; then
//! lists every subject in pages of `SUBJECT_PAGE_MAX` and reads 1,000 subjects whole.

use std::time::Instant;

use headwater_core::limits::{FEED_PAGE_EVENTS_MAX, SUBJECT_PAGE_MAX};
use headwater_core::{
    EventId, EventType, FeedId, FeedPosition, Position, Sequence, Subject, Timestamp,
};
use headwater_postgres::{Options, PostgresStore};
use headwater_store::{FeedStore, ProjectedEvent, ProjectorBatch};

/// Events per projector batch.
const BATCH_EVENTS: u64 = 10_000;

fn batch(from: u64, subjects: u64, event_type: &EventType) -> ProjectorBatch {
    let events = (from + 1..=from + BATCH_EVENTS)
        .map(|source| {
            let subject = format!("account-{:08}", source.wrapping_mul(7_919) % subjects);
            let data = format!(
                "{{\"account\":\"{subject}\",\"amount_cents\":{},\"currency\":\"EUR\",\"reference\":\"benchmark payment of a realistic size\"}}",
                source % 100_000
            );
            ProjectedEvent {
                id: EventId::new_random(),
                event_type: event_type.clone(),
                subject: Subject::new(subject).unwrap(),
                time: Timestamp::from_unix_micros(1_700_000_000_000_000 + source),
                data: data.into_bytes(),
                source_position: Position(source),
            }
        })
        .collect();
    ProjectorBatch {
        from: Position(from),
        to: Position(from + BATCH_EVENTS),
        events,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .or_else(|| std::env::var("HEADWATER_TEST_POSTGRES_URL").ok())
        .expect("usage: feed_throughput URL [BATCHES] [SUBJECTS]");
    let batches: u64 = args.next().map_or(30, |a| a.parse().unwrap());
    let subjects: u64 = args.next().map_or(100_000, |a| a.parse().unwrap());
    let schema = format!("hw_bench_{:016x}", rand::random::<u64>());
    let store = PostgresStore::connect(&url, Options::with_schema(&schema))
        .await
        .unwrap();
    let feeds = store.feed_store();
    let feed = FeedId::parse("accounts.v1").unwrap();
    feeds.register(&feed).await.unwrap();
    let event_type = EventType::new("accounts.deposited").unwrap();

    // Batches are built before the clock starts: the projection's own work is not measured.
    let mut commit_secs = Vec::new();
    let started = Instant::now();
    for i in 0..batches {
        let batch = batch(i * BATCH_EVENTS, subjects, &event_type);
        let t = Instant::now();
        feeds.commit(&feed, batch).await.unwrap();
        commit_secs.push(t.elapsed().as_secs_f64());
    }
    let wall = started.elapsed().as_secs_f64();
    let in_commit: f64 = commit_secs.iter().sum();
    commit_secs.sort_by(f64::total_cmp);
    let total = batches * BATCH_EVENTS;
    println!(
        "commit: {batches} batches of {BATCH_EVENTS} events on {subjects} subjects: {:.0} events/s \
         inside commit ({:.1} commits/s; per commit median {:.0} ms, max {:.0} ms); {:.0} events/s \
         with the batches' building",
        total as f64 / in_commit,
        batches as f64 / in_commit,
        commit_secs[commit_secs.len() / 2] * 1e3,
        commit_secs[commit_secs.len() - 1] * 1e3,
        total as f64 / wall,
    );

    for round in 0..2 {
        let t = Instant::now();
        let mut after = FeedPosition::START;
        let mut read = 0u64;
        loop {
            let page = feeds
                .read_feed(&feed, after, FEED_PAGE_EVENTS_MAX)
                .await
                .unwrap();
            let Some(last) = page.last() else { break };
            after = last.position;
            read += page.len() as u64;
        }
        assert_eq!(read, total);
        println!(
            "read_feed (round {}): {read} events in pages of {FEED_PAGE_EVENTS_MAX}: {:.0} events/s",
            round + 1,
            read as f64 / t.elapsed().as_secs_f64()
        );
    }

    let t = Instant::now();
    let (mut after, mut listed) = (None::<Subject>, 0u64);
    loop {
        let page = feeds
            .subjects(&feed, after.as_ref(), SUBJECT_PAGE_MAX)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.subject.clone());
        listed += page.len() as u64;
    }
    println!(
        "subjects: {listed} in pages of {SUBJECT_PAGE_MAX}: {:.0} subjects/s",
        listed as f64 / t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let mut read = 0u64;
    for i in 0..1_000u64 {
        let subject =
            Subject::new(format!("account-{:08}", i * (subjects / 1_000).max(1))).unwrap();
        read += feeds
            .read_subject(&feed, &subject, Sequence::START, FEED_PAGE_EVENTS_MAX)
            .await
            .unwrap()
            .len() as u64;
    }
    println!(
        "read_subject: 1000 subjects, {read} events: {:.0} subjects/s",
        1_000.0 / t.elapsed().as_secs_f64()
    );

    drop(feeds);
    drop(store);
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
}
