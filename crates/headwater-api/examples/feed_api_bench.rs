//! The feed API's figures on the in-memory feed store: feed read rate over HTTP on loopback with
//! 1 and 16 clients, and long-poll wake-up latency from commit to answer.
//!
//! `cargo run --release -p headwater-api --features bench --example feed_api_bench [EVENTS] [ROUNDS]`

use std::sync::Arc;

use headwater_api::bench::{BenchError, read_rate, wake_latency};
use headwater_core::{
    EventId, EventType, FeedId, FeedPosition, FeedStatus, Position, Subject, Timestamp,
    integration_event_id,
};
use headwater_store::{FeedStore, MemoryFeedStore, ProjectedEvent, ProjectorBatch};

const SUBJECTS: u64 = 1_000;
const COMMIT_EVENTS: u64 = 10_000;

fn event(feed: &FeedId, p: u64) -> ProjectedEvent {
    ProjectedEvent {
        id: integration_event_id(
            EventId::from_uuid(uuid::Uuid::from_u128(u128::from(p))),
            feed,
            0,
        ),
        event_type: EventType::new("accounts.deposited").unwrap(),
        subject: Subject::new(format!("account-{}", p % SUBJECTS)).unwrap(),
        time: Timestamp::from_unix_micros(1_798_380_419_000_000 + p),
        data: format!(
            r#"{{"account":"account-{}","amount":{},"balance":{}}}"#,
            p % SUBJECTS,
            p % 977,
            p * 3
        )
        .into_bytes(),
        source_position: Position(p),
    }
}

async fn fill(store: &MemoryFeedStore, feed: &FeedId, events: u64) {
    let mut from = 0;
    while from < events {
        let to = (from + COMMIT_EVENTS).min(events);
        let batch = ProjectorBatch {
            from: Position(from),
            to: Position(to),
            events: (from + 1..=to).map(|p| event(feed, p)).collect(),
        };
        store.commit(feed, batch).await.unwrap();
        from = to;
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let events: u64 = args.next().map_or(200_000, |a| a.parse().unwrap());
    let rounds: usize = args.next().map_or(1_000, |a| a.parse().unwrap());
    let feed = FeedId::parse("accounts.v2").unwrap();
    let store = MemoryFeedStore::new();
    store.register(&feed).await.unwrap();
    fill(&store, &feed, events).await;
    store.set_status(&feed, FeedStatus::Live).await.unwrap();
    let shared: Arc<dyn FeedStore> = Arc::new(store.clone());

    println!("feed API on MemoryFeedStore, {events} events of ~70 bytes, pages of 1,000");
    for clients in [1, 16] {
        let rate = read_rate(Arc::clone(&shared), &feed, clients, 1_000)
            .await
            .unwrap();
        println!(
            "read rate, {clients:>2} client(s): {:>10.0} events/s ({} events in {:.2?})",
            rate.events_per_second(),
            rate.events,
            rate.elapsed
        );
    }

    let committing = store.clone();
    let feed_for_commit = feed.clone();
    let cursor = std::sync::atomic::AtomicU64::new(events);
    let latency = wake_latency(Arc::clone(&shared), &feed, rounds, |_head: FeedPosition| {
        let store = committing.clone();
        let feed = feed_for_commit.clone();
        let from = cursor.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        async move {
            let batch = ProjectorBatch {
                from: Position(from),
                to: Position(from + 1),
                events: vec![event(&feed, from + 1)],
            };
            store
                .commit(&feed, batch)
                .await
                .map(|_| ())
                .map_err(BenchError::from)
        }
    })
    .await
    .unwrap();
    println!(
        "long-poll wake-up, commit -> answer, {} rounds: p50 {} µs, p99 {} µs, max {} µs",
        latency.rounds, latency.p50_us, latency.p99_us, latency.max_us
    );
}
