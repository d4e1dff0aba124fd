//! Measures the backfill rate of a new projection version on the embedded store, while appends
//! go on: `cargo run --release -p headwater-feed --example backfill_rate -- [EVENTS] [DIR]`.
//!
//! Fills an embedded store with EVENTS internal events (default 1,000,000; kept in DIR if given,
//! so a second run skips the filling), then starts a projector for a new feed version (in the
//! store's embedded feed store) while one task keeps appending (batches of 10 events, as fast as the store takes them),
//! and reports the internal events projected per second until the feed is live.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use headwater_core::{
    EventId, EventType, ExpectedVersion, FeedId, FeedStatus, NewEvent, RecordedEvent, StreamName,
};
use headwater_embedded::{EmbeddedFeedStore, EmbeddedStore};
use headwater_feed::{Emit, Projection, ProjectionError, Projectors};
use headwater_store::{EventStore, FeedStore};

/// Accounts in the generated log.
const ACCOUNTS: u64 = 10_000;
/// Events per append while filling.
const FILL_APPEND_EVENTS: u64 = 1_000;
/// Events per append while the backfill runs.
const LIVE_APPEND_EVENTS: u64 = 10;

/// `accounts.vN`: each run backfills a new version (the feeds stay in the store's directory).
struct Accounts(u32);

#[derive(serde::Deserialize)]
struct Deposited {
    amount: u64,
}

impl Projection for Accounts {
    fn feed(&self) -> FeedId {
        FeedId::parse(&format!("accounts.v{}", self.0)).unwrap()
    }

    fn project(&self, event: &RecordedEvent, out: &mut Emit) -> Result<(), ProjectionError> {
        if event.stream.category() != "account" {
            return Ok(());
        }
        let data: Deposited = serde_json::from_slice(&event.data)?;
        out.emit(
            "accounts.deposited",
            event.stream.id(),
            &serde_json::json!({ "account": event.stream.id(), "amount": data.amount }),
        )
    }
}

fn deposits(first: u64, count: u64) -> Vec<NewEvent> {
    (first..first + count)
        .map(|n| {
            NewEvent::new(
                EventId::new_random(),
                EventType::new("account.deposited").unwrap(),
                format!("{{\"amount\":{}}}", n % 1000).into_bytes(),
            )
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let total: u64 = args
        .next()
        .map_or(1_000_000, |a| a.parse().expect("EVENTS"));
    let keep = args.next();
    let temp = tempfile::tempdir().unwrap();
    let dir = keep.map_or_else(|| temp.path().to_owned(), std::path::PathBuf::from);
    let events = Arc::new(EmbeddedStore::open(&dir).unwrap());

    let started = Instant::now();
    let mut n = events.head_position().0;
    while n < total {
        let count = FILL_APPEND_EVENTS.min(total - n);
        let stream =
            StreamName::new(format!("account-{}", n / FILL_APPEND_EVENTS % ACCOUNTS)).unwrap();
        events
            .append(&stream, ExpectedVersion::Any, deposits(n, count))
            .await
            .unwrap();
        n += count;
    }
    eprintln!(
        "log: {} events ({:.1} s to fill)",
        events.head_position().0,
        started.elapsed().as_secs_f64()
    );

    let feeds = Arc::new(EmbeddedFeedStore::open(&events).unwrap());
    let version = feeds
        .feeds()
        .await
        .unwrap()
        .iter()
        .map(|f| f.feed.version.get())
        .max()
        .unwrap_or(0)
        + 1;
    let stop = Arc::new(AtomicBool::new(false));
    let appended = Arc::new(AtomicU64::new(0));
    let appender = {
        let events = Arc::clone(&events);
        let stop = Arc::clone(&stop);
        let appended = Arc::clone(&appended);
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let stream = StreamName::new(format!("account-{}", n % ACCOUNTS)).unwrap();
                events
                    .append(
                        &stream,
                        ExpectedVersion::Any,
                        deposits(n, LIVE_APPEND_EVENTS),
                    )
                    .await
                    .unwrap();
                appended.fetch_add(LIVE_APPEND_EVENTS, Ordering::Relaxed);
                n += LIVE_APPEND_EVENTS;
            }
        })
    };

    let start_head = events.head_position();
    let started = Instant::now();
    let projectors = Projectors::builder()
        .projection(Accounts(version))
        .start(Arc::clone(&events), Arc::clone(&feeds))
        .await
        .unwrap();
    let feed = Accounts(version).feed();
    let mut status = projectors.watch(&feed).unwrap();
    let live = status
        .wait_for(|s| s.feed_status == FeedStatus::Live)
        .await
        .unwrap()
        .clone();
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    appender.await.unwrap();
    projectors.shutdown().await;
    let state = feeds.feed(&feed).await.unwrap().unwrap();
    println!(
        "backfill of {feed}: {} internal events in {seconds:.2} s = {:.0} events/s \
         (log head {} at the start, {} at live; {} events appended during the backfill = {:.0}/s); \
         feed head {}",
        live.cursor.0,
        live.cursor.0 as f64 / seconds,
        start_head.0,
        live.cursor.0,
        appended.load(Ordering::Relaxed),
        appended.load(Ordering::Relaxed) as f64 / seconds,
        state.head.0,
    );
}
