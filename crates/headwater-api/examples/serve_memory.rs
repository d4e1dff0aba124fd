//! Serves the feed API on a memory feed store holding a small sample (`accounts.v1` live with 50
//! events over 5 subjects, `accounts.v2` backfilling, `legacy.v1` retired beside a live `legacy.v2`),
//! for trying the API by hand or fuzzing it against its OpenAPI document:
//!
//! `cargo run -p headwater-api --example serve_memory -- [ADDR] [TOKEN]`
//! (defaults `127.0.0.1:8088` and `demo-token`), then e.g.
//! `curl -H 'Authorization: Bearer demo-token' 'http://127.0.0.1:8088/feeds/accounts/v1?after=0&limit=3'`.

use std::sync::Arc;

use headwater_api::{ApiConfig, FeedApi, Tokens};
use headwater_core::{EventId, EventType, FeedId, FeedStatus, Position, Subject, Timestamp};
use headwater_store::{FeedStore, MemoryFeedStore, ProjectedEvent, ProjectorBatch};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let address = args.next().unwrap_or_else(|| "127.0.0.1:8088".to_owned());
    let token = args.next().unwrap_or_else(|| "demo-token".to_owned());

    let store = Arc::new(MemoryFeedStore::new());
    for (feed, status) in [
        ("accounts.v1", FeedStatus::Live),
        ("accounts.v2", FeedStatus::Backfilling),
        ("legacy.v1", FeedStatus::Retired),
        ("legacy.v2", FeedStatus::Live),
    ] {
        let feed = FeedId::parse(feed)?;
        store.register(&feed).await?;
        let events = (1..=50u64)
            .map(|i| ProjectedEvent {
                id: EventId::new_random(),
                event_type: EventType::new("accounts.deposited").expect("a valid type"),
                subject: Subject::new(format!("{}", i % 5)).expect("a valid subject"),
                time: Timestamp::from_unix_micros(1_795_780_524_000_000 + i),
                data: format!(r#"{{"amount":{i}}}"#).into_bytes(),
                source_position: Position(i),
            })
            .collect();
        let batch = ProjectorBatch {
            from: Position(0),
            to: Position(50),
            events,
        };
        store.commit(&feed, batch).await?;
        store.set_status(&feed, status).await?;
    }
    let mut registry = prometheus_client::registry::Registry::default();
    let config = ApiConfig::new("sample", Tokens::one_for_all("demo", &token)?)?;
    let api = FeedApi::new(store, config, &mut registry);
    let listener = tokio::net::TcpListener::bind(&address).await?;
    eprintln!("feed API on http://{address} (token {token:?}); Ctrl-C stops it");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    api.serve(listener, Arc::new(registry), shutdown).await?;
    api.close().await?;
    Ok(())
}
