//! What an operator sees: counters, open gaps (with their lag) while a heal cannot complete, the
//! heal latency histogram, and the admin router's `/status` and `/metrics`.

use std::sync::Arc;

use axum::body::Body;
use headwater_consume::{MemoryUpstream, admin};
use headwater_core::Subject;
use http_body_util::BodyExt;
use hyper::Request;
use prometheus_client::registry::Registry;
use tower::ServiceExt;

use crate::consumer::{consumer, produce, view};
use headwater_consume::{Consumer, ConsumerOptions};

/// The value of the one sample of `name` in OpenMetrics `text`.
fn sample(text: &str, name: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

async fn get(router: &axum::Router, path: &str) -> (String, String) {
    let response = router
        .clone()
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{path}");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (content_type, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn an_open_gap_shows_with_its_lag_until_it_is_healed_and_the_heal_is_timed() {
    let upstream = Arc::new(MemoryUpstream::new());
    let events = produce(&upstream, &[1, 1, 1, 1, 2, 2]);
    let view = view();
    let consumer = Arc::new(consumer(&view, &upstream));
    let mut registry = Registry::default();
    consumer.register_metrics(&mut registry);
    let router = admin::router(Arc::clone(&consumer), Arc::new(registry));

    // acc-1 #1 applied; then #4 arrives while the producer is down: the gap stays open.
    consumer.deliver(events[0].clone()).await.unwrap();
    upstream.set_down(true);
    consumer.deliver(events[3].clone()).await.unwrap_err();
    let status = consumer.status();
    assert_eq!((status.open_gaps, status.stats.gaps), (1, 1));
    let gap = &status.gaps[0];
    assert_eq!(
        (gap.subject.as_str(), gap.cursor, gap.seen),
        ("acc-1", 1, 4)
    );
    assert_eq!((gap.missing(), gap.failed_heals), (2, 1));
    assert!(gap.last_error.as_deref().unwrap().contains("unavailable"));

    let (content_type, text) = get(&router, "/metrics").await;
    assert!(content_type.starts_with("application/openmetrics-text"));
    assert_eq!(sample(&text, "headwater_consumer_open_gaps"), 1.0);
    assert_eq!(sample(&text, "headwater_consumer_open_gap_events"), 2.0);
    assert_eq!(sample(&text, "headwater_consumer_heal_failures_total"), 1.0);
    assert_eq!(sample(&text, "headwater_consumer_heal_seconds_count"), 0.0);
    assert!(text.contains(r#"feed="accounts.v1""#), "{text}");

    let (content_type, json) = get(&router, "/status").await;
    assert_eq!(content_type, "application/json");
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["feed"], "accounts.v1");
    assert_eq!(json["open_gaps"], 1);
    assert_eq!(json["gaps"][0]["subject"], "acc-1");
    assert_eq!(json["gaps"][0]["seen"], 4);
    assert!(json["gaps"][0]["since"].as_str().unwrap().ends_with('Z'));

    // Back up: the next delivery heals it, the heal is timed, the gap closes.
    upstream.set_down(false);
    consumer.deliver(events[3].clone()).await.unwrap();
    // A second gap, healed at once, on another subject.
    consumer.deliver(events[5].clone()).await.unwrap();
    let status = consumer.status();
    // Three detections: acc-1's twice (down, then again when delivered anew), acc-2's once.
    assert_eq!((status.open_gaps, status.stats.gaps), (0, 3));
    assert!(status.gaps.is_empty());
    let (_, text) = get(&router, "/metrics").await;
    assert_eq!(sample(&text, "headwater_consumer_open_gaps"), 0.0);
    assert_eq!(sample(&text, "headwater_consumer_open_gap_events"), 0.0);
    // Two heals completed; acc-1's is timed from its first detection.
    assert_eq!(sample(&text, "headwater_consumer_heal_seconds_count"), 2.0);
    assert_eq!(sample(&text, "headwater_consumer_events_healed_total"), 3.0);
    assert_eq!(sample(&text, "headwater_consumer_gaps_detected_total"), 3.0);
    assert_eq!(
        sample(&text, "headwater_consumer_events_applied_total"),
        6.0
    );
}

#[tokio::test]
async fn a_gap_left_open_is_closed_by_a_catch_up() {
    let upstream = Arc::new(MemoryUpstream::new());
    let events = produce(&upstream, &[1, 1, 1]);
    let view = view();
    let consumer = consumer(&view, &upstream);
    upstream.set_down(true);
    consumer.deliver(events[2].clone()).await.unwrap_err();
    assert_eq!(consumer.status().open_gaps, 1);
    upstream.set_down(false);
    // Not the delivery again: a bootstrap (or a walk) brings the subject up to date.
    consumer
        .ensure(&Subject::new("acc-1").unwrap())
        .await
        .unwrap();
    assert_eq!(consumer.status().open_gaps, 0);
    // A duplicate is counted, and opens nothing.
    consumer.deliver(events[1].clone()).await.unwrap();
    let status = consumer.status();
    assert_eq!((status.open_gaps, status.stats.duplicates), (0, 1));
}

#[tokio::test]
async fn two_consumers_in_one_registry_give_one_family_per_metric() {
    // A switch holds v1's and v2's consumers: Prometheus refuses a second TYPE line of a name.
    let upstream = Arc::new(MemoryUpstream::new());
    let events = produce(&upstream, &[1, 1]);
    let view = view();
    let v1 = Arc::new(consumer(&view, &upstream));
    let v2 = Consumer::new(
        headwater_core::FeedId::parse("accounts.v2").unwrap(),
        Arc::clone(&view),
        Arc::clone(&upstream),
        ConsumerOptions::default(),
    );
    let mut registry = Registry::default();
    v1.register_metrics(&mut registry);
    v2.register_metrics(&mut registry);
    v1.deliver(events[0].clone()).await.unwrap();
    let router = admin::router(v1, Arc::new(registry));
    let (_, text) = get(&router, "/metrics").await;
    let mut types: Vec<_> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    let all = types.len();
    types.sort_unstable();
    types.dedup();
    assert_eq!(types.len(), all, "a family given twice:\n{text}");
    // Both consumers' samples are there, under their one family, and the text ends as it must.
    let family: Vec<_> = text
        .lines()
        .skip_while(|l| !l.starts_with("# TYPE headwater_consumer_events_applied "))
        .skip(1)
        .take_while(|l| !l.starts_with('#'))
        .collect();
    assert_eq!(family.len(), 2, "{text}");
    assert!(
        family
            .iter()
            .any(|l| l.contains(r#"feed="accounts.v1""#) && l.ends_with(" 1"))
    );
    assert!(
        family
            .iter()
            .any(|l| l.contains(r#"feed="accounts.v2""#) && l.ends_with(" 0"))
    );
    assert!(text.ends_with("# EOF\n"));
    assert_eq!(text.matches("# EOF").count(), 1);
}
