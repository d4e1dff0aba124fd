//! Logs (never a token), metrics, and who read which feed.

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::Request;
use headwater_store::FeedStore;

use crate::{ALL, LOANS, V2_ONLY, feed, fixture, get, send};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn tokens_never_appear_in_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let fx = fixture(2).await;
    for (uri, token) in [
        ("/feeds", ALL),
        ("/feeds/accounts/v2?after=0", V2_ONLY),
        ("/feeds/accounts/v2/subjects", V2_ONLY),
        ("/feeds/accounts/v2/subjects/s1", V2_ONLY),
        ("/feeds/accounts/v1", V2_ONLY),
        ("/feeds/accounts/v2?limit=0", ALL),
        ("/metrics", LOANS),
    ] {
        get(&fx.router, uri, Some(token)).await;
    }
    let wrong = "wrong-token-that-must-not-be-logged";
    get(&fx.router, "/feeds", Some(wrong)).await;
    send(
        &fx.router,
        Request::get("/feeds")
            .header("authorization", format!("Basic {wrong}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    fx.api.flush_readers().await.unwrap();

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    // Something was logged about these requests: the reader's name, the routes.
    assert!(logs.contains("statements"), "{logs}");
    assert!(logs.contains("/feeds/{name}/{version}"), "{logs}");
    for secret in [ALL, V2_ONLY, LOANS, wrong] {
        assert!(!logs.contains(secret), "a token was logged:\n{logs}");
    }
}

#[tokio::test]
async fn reads_are_recorded_per_token_name_in_batches() {
    let fx = fixture(2).await;
    for _ in 0..3 {
        get(&fx.router, "/feeds/accounts/v2", Some(V2_ONLY)).await;
    }
    get(&fx.router, "/feeds/accounts/v2/subjects", Some(ALL)).await;
    get(&fx.router, "/feeds/accounts/v1/subjects/s1", Some(ALL)).await;
    // Refused reads are not reads.
    get(&fx.router, "/feeds/accounts/v1", Some(V2_ONLY)).await;
    get(&fx.router, "/feeds/accounts/v2?limit=0", Some(V2_ONLY)).await;

    // Nothing is written per request: the store has seen nothing yet.
    let v2 = feed("accounts.v2");
    assert!(fx.store.readers(&v2).await.unwrap().is_empty());
    fx.api.flush_readers().await.unwrap();

    let readers = fx.store.readers(&v2).await.unwrap();
    let counts: Vec<_> = readers
        .iter()
        .map(|r| (r.reader.as_str(), r.reads))
        .collect();
    assert_eq!(counts, [("ops", 1), ("statements", 3)]);
    let v1 = fx.store.readers(&feed("accounts.v1")).await.unwrap();
    let counts: Vec<_> = v1.iter().map(|r| (r.reader.as_str(), r.reads)).collect();
    assert_eq!(counts, [("ops", 1)]);

    // GET /feeds shows them, with the last read time.
    let feeds = get(&fx.router, "/feeds", Some(V2_ONLY)).await.json();
    let readers = &feeds[0]["readers"];
    assert_eq!(readers.as_array().unwrap().len(), 2, "{feeds}");
    assert_eq!(readers[1]["reader"], "statements");
    assert_eq!(readers[1]["reads"], 3);
    let last = readers[1]["last_read_at"].as_str().unwrap();
    assert!(last.ends_with('Z') && last.len() == 27, "{last}");

    // close() records what is left.
    get(&fx.router, "/feeds/accounts/v2", Some(V2_ONLY)).await;
    let store = fx.store.clone();
    fx.api.close().await.unwrap();
    let readers = store.readers(&v2).await.unwrap();
    assert_eq!(readers[1].reads, 4);
}

#[tokio::test(start_paused = true)]
async fn the_flusher_records_reads_every_interval() {
    let fx = fixture(1).await;
    get(&fx.router, "/feeds/accounts/v2", Some(V2_ONLY)).await;
    let v2 = feed("accounts.v2");
    assert!(fx.store.readers(&v2).await.unwrap().is_empty());
    tokio::time::sleep(headwater_api::READERS_FLUSH_INTERVAL * 2).await;
    assert_eq!(fx.store.readers(&v2).await.unwrap().len(), 1);
}

#[tokio::test]
async fn metrics_count_requests_and_show_feed_heads() {
    let fx = fixture(4).await;
    get(&fx.router, "/feeds/accounts/v2", Some(ALL)).await;
    get(&fx.router, "/feeds/accounts/v2", Some(ALL)).await;
    get(&fx.router, "/feeds/accounts/v2?limit=0", Some(ALL)).await;
    get(&fx.router, "/nowhere", Some(ALL)).await;
    let answer = get(&fx.router, "/metrics", Some(ALL)).await;
    assert_eq!(answer.status, 200);
    assert!(
        answer
            .content_type()
            .starts_with("application/openmetrics-text")
    );
    let text = String::from_utf8(answer.body).unwrap();
    for line in [
        r#"headwater_api_requests_total{route="/feeds/{name}/{version}",status="200"} 2"#,
        r#"headwater_api_requests_total{route="/feeds/{name}/{version}",status="400"} 1"#,
        r#"headwater_api_requests_total{route="unmatched",status="404"} 1"#,
        r#"headwater_feed_head{feed="accounts.v2"} 4"#,
        r#"headwater_feed_head{feed="loans.v1"} 4"#,
        "headwater_api_events_served_total 8",
        r#"headwater_api_request_duration_seconds_count{route="/feeds/{name}/{version}"} 3"#,
    ] {
        assert!(text.contains(line), "missing {line}:\n{text}");
    }
}

#[tokio::test]
async fn metrics_render_what_other_components_registered() {
    use prometheus_client::metrics::counter::Counter;
    let store = headwater_store::MemoryFeedStore::new();
    let mut registry = prometheus_client::registry::Registry::default();
    let api = headwater_api::FeedApi::new(
        Arc::new(store),
        headwater_api::ApiConfig::new(crate::SOURCE, crate::tokens()).unwrap(),
        &mut registry,
    );
    let lag: Counter = Counter::default();
    registry.register("headwater_projector_batches", "a projector's", lag.clone());
    lag.inc_by(7);
    let router = api.router(Arc::new(registry));
    let text = String::from_utf8(get(&router, "/metrics", Some(ALL)).await.body).unwrap();
    assert!(
        text.contains("headwater_projector_batches_total 7"),
        "{text}"
    );
}
