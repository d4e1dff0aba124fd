//! The feed API's figures on the in-memory feed store (or, with `--embedded`, the embedded one in
//! a temporary directory): feed read rate over HTTP on loopback with 1 and 16 clients, and
//! long-poll wake-up latency from commit to answer.
//!
//! `cargo run --release -p headwater-api --features bench --example feed_api_bench [--embedded] [EVENTS] [ROUNDS]`

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

async fn fill(store: &dyn FeedStore, feed: &FeedId, events: u64) {
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

async fn fill_log(log: &headwater_embedded::EmbeddedStore, events: u64) {
    use headwater_core::{ExpectedVersion, NewEvent, StreamName};
    use headwater_store::EventStore;
    let mut done = 0;
    let mut stream = 0;
    while done < events {
        let count = (events - done).min(1_000);
        let batch = (0..count)
            .map(|_| {
                NewEvent::new(
                    EventId::new_random(),
                    EventType::new("accounts.deposited").unwrap(),
                    b"{}".to_vec(),
                )
            })
            .collect();
        let name = StreamName::new(format!("account-{stream}")).unwrap();
        log.append(&name, ExpectedVersion::NoStream, batch)
            .await
            .unwrap();
        done += count;
        stream += 1;
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let embedded = args.first().is_some_and(|a| a == "--embedded");
    if embedded {
        args.remove(0);
    }
    let events: u64 = args.first().map_or(200_000, |a| a.parse().unwrap());
    let rounds: usize = args.get(1).map_or(1_000, |a| a.parse().unwrap());
    let feed = FeedId::parse("accounts.v2").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (store, name): (Arc<dyn FeedStore>, &str) = if embedded {
        let log = headwater_embedded::EmbeddedStore::open(dir.path()).unwrap();
        // The embedded feed store keeps each cursor within the log: give it a log to project
        // (the events themselves do not matter here).
        fill_log(&log, events + rounds as u64).await;
        let feeds = headwater_embedded::EmbeddedFeedStore::open(&log).unwrap();
        (Arc::new(feeds), "EmbeddedFeedStore")
    } else {
        (Arc::new(MemoryFeedStore::new()), "MemoryFeedStore")
    };
    store.register(&feed).await.unwrap();
    fill(store.as_ref(), &feed, events).await;
    store.set_status(&feed, FeedStatus::Live).await.unwrap();

    println!("feed API on {name}, {events} events of ~70 bytes, pages of 1,000");
    for clients in [1, 16] {
        let rate = read_rate(Arc::clone(&store), &feed, clients, 1_000)
            .await
            .unwrap();
        println!(
            "read rate, {clients:>2} client(s): {:>10.0} events/s ({} events in {:.2?})",
            rate.events_per_second(),
            rate.events,
            rate.elapsed
        );
    }

    let cursor = std::sync::atomic::AtomicU64::new(events);
    let latency = wake_latency(Arc::clone(&store), &feed, rounds, |_head: FeedPosition| {
        let store = Arc::clone(&store);
        let feed = feed.clone();
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
