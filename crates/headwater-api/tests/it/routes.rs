//! Every row of SPEC.md's table of the feed API, and the wire format of an event.

use headwater_core::FeedStatus;
use headwater_store::FeedStore;
use serde_json::json;

use crate::{ALL, SOURCE, V2_ONLY, commit, feed, fixture, get};

#[tokio::test]
async fn feeds_lists_name_version_status_head() {
    let fx = fixture(5).await;
    let answer = get(&fx.router, "/feeds", Some(ALL)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.content_type(), "application/json");
    let feeds = answer.json();
    let summary: Vec<_> = feeds
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            json!({"name": f["name"], "version": f["version"], "status": f["status"], "head": f["head"]})
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            json!({"name":"accounts","version":1,"status":"live","head":5}),
            json!({"name":"accounts","version":2,"status":"live","head":5}),
            json!({"name":"loans","version":1,"status":"backfilling","head":5}),
        ]
    );
    // Before any read, nobody read.
    assert_eq!(feeds[0]["readers"], json!([]));
}

#[tokio::test]
async fn feeds_lists_each_publishers_cursor_and_lag() {
    use headwater_core::{EventId, EventType, FeedPosition, Position, Subject, Timestamp};
    use headwater_store::{ProjectedEvent, ProjectorBatch};

    let fx = fixture(5).await;
    let v2 = feed("accounts.v2");
    // Two more events that happened long ago (the fixture's are in the future).
    let old = |p: u64| ProjectedEvent {
        id: EventId::new_random(),
        event_type: EventType::new("accounts.deposited").unwrap(),
        subject: Subject::new("s9").unwrap(),
        time: Timestamp::from_unix_micros(1_000_000 * p),
        data: b"{}".to_vec(),
        source_position: Position(p),
    };
    fx.store
        .commit(
            &v2,
            ProjectorBatch {
                from: Position(5),
                to: Position(7),
                events: vec![old(6), old(7)],
            },
        )
        .await
        .unwrap();
    let rabbitmq = fx
        .store
        .advance_publisher(&v2, "rabbitmq", FeedPosition(0), FeedPosition(5))
        .await
        .unwrap();
    fx.store
        .advance_publisher(&v2, "nats", FeedPosition(0), FeedPosition(7))
        .await
        .unwrap();

    let feeds = get(&fx.router, "/feeds", Some(ALL)).await.json();
    assert_eq!(feeds[0]["publishers"], json!([]), "accounts.v1 has none");
    let publishers = feeds[1]["publishers"].as_array().unwrap();
    assert_eq!(publishers.len(), 2, "{feeds}");
    // By name; caught up: no lag.
    assert_eq!(publishers[0]["publisher"], "nats");
    assert_eq!(publishers[0]["cursor"], 7);
    assert_eq!(publishers[0]["lag"], 0);
    assert_eq!(publishers[0]["lag_seconds"], 0.0);
    // Two behind, the first of them from 6 s after the epoch.
    let behind = &publishers[1];
    assert_eq!(behind["publisher"], "rabbitmq");
    assert_eq!(behind["cursor"], 5);
    assert_eq!(behind["lag"], 2);
    let seconds = behind["lag_seconds"].as_f64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - 6.0 - seconds).abs() < 60.0,
        "{seconds} s behind, {now} s now"
    );
    assert_eq!(
        behind["updated_at"],
        headwater_api::rfc3339(rabbitmq.updated_at)
    );
    // A token sees the publishers of the feeds it may read only.
    let feeds = get(&fx.router, "/feeds", Some(V2_ONLY)).await.json();
    assert_eq!(feeds.as_array().unwrap().len(), 1);
    assert_eq!(feeds[0]["publishers"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_feed_page_is_a_cloudevents_batch() {
    let fx = fixture(5).await;
    let answer = get(&fx.router, "/feeds/accounts/v2?after=1&limit=2", Some(ALL)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.content_type(), "application/cloudevents-batch+json");
    let events = answer.json();
    let events = events.as_array().unwrap();
    assert_eq!(events.len(), 2);
    let first = &events[0];
    let stored = fx
        .store
        .read_feed(&feed("accounts.v2"), headwater_core::FeedPosition(1), 1)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        *first,
        json!({
            "specversion": "1.0",
            "id": stored.id.to_string(),
            "source": SOURCE,
            "type": "accounts.deposited",
            "subject": "s2",
            "time": "2026-12-27T14:06:59.123458Z",
            "datacontenttype": "application/json",
            "data": {"amount": 2, "note": "a \"quoted\" word"},
            "sequence": 1,
            "position": 2,
            "feed": "accounts.v2",
        })
    );
    assert_eq!(events[1]["position"], 3);
    // The data is embedded as stored, byte for byte (its spacing kept).
    let text = String::from_utf8(answer.body.clone()).unwrap();
    assert!(
        text.contains(r#""data":{"amount": 2, "note":"a \"quoted\" word"}"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_feed_page_defaults_to_the_start_and_ends_with_an_empty_array() {
    let fx = fixture(5).await;
    let all = get(&fx.router, "/feeds/accounts/v2", Some(ALL))
        .await
        .json();
    let positions: Vec<_> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, [1, 2, 3, 4, 5]);
    let after_head = get(&fx.router, "/feeds/accounts/v2?after=5", Some(ALL)).await;
    assert_eq!(after_head.status, 200);
    assert_eq!(after_head.body, b"[]");
    let far_ahead = get(&fx.router, "/feeds/accounts/v2?after=1000", Some(ALL)).await;
    assert_eq!(far_ahead.body, b"[]");
}

#[tokio::test]
async fn subjects_lists_every_subject_head_in_order_and_pages() {
    let fx = fixture(7).await;
    let answer = get(&fx.router, "/feeds/accounts/v2/subjects", Some(V2_ONLY)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.content_type(), "application/json");
    assert_eq!(
        answer.json(),
        json!([
            {"subject":"s0","sequence":2},
            {"subject":"s1","sequence":3},
            {"subject":"s2","sequence":2},
        ])
    );
    let page = get(
        &fx.router,
        "/feeds/accounts/v2/subjects?after=s0&limit=1",
        Some(V2_ONLY),
    )
    .await;
    assert_eq!(page.json(), json!([{"subject":"s1","sequence":3}]));
    let end = get(
        &fx.router,
        "/feeds/accounts/v2/subjects?after=s2",
        Some(V2_ONLY),
    )
    .await;
    assert_eq!(end.body, b"[]");
}

#[tokio::test]
async fn a_subject_page_holds_its_events_after_the_sequence() {
    let fx = fixture(7).await;
    let answer = get(
        &fx.router,
        "/feeds/accounts/v2/subjects/s1?after=1",
        Some(V2_ONLY),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.content_type(), "application/cloudevents-batch+json");
    let events = answer.json();
    let got: Vec<_> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["subject"].clone(),
                e["sequence"].clone(),
                e["position"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (json!("s1"), json!(2), json!(4)),
            (json!("s1"), json!(3), json!(7))
        ]
    );
    let limited = get(
        &fx.router,
        "/feeds/accounts/v2/subjects/s1?limit=1",
        Some(V2_ONLY),
    )
    .await;
    assert_eq!(limited.json()[0]["sequence"], 1);
    assert_eq!(limited.json().as_array().unwrap().len(), 1);
    let unknown = get(
        &fx.router,
        "/feeds/accounts/v2/subjects/nobody",
        Some(V2_ONLY),
    )
    .await;
    assert_eq!(unknown.status, 200);
    assert_eq!(unknown.body, b"[]");
}

#[tokio::test]
async fn a_backfilling_feed_is_served_as_far_as_it_goes() {
    let fx = fixture(3).await;
    let page = get(&fx.router, "/feeds/loans/v1", Some(ALL)).await;
    assert_eq!(page.status, 200);
    assert_eq!(page.json().as_array().unwrap().len(), 3);
    commit(&fx.store, &feed("loans.v1"), 3, 2).await;
    let more = get(&fx.router, "/feeds/loans/v1?after=3", Some(ALL)).await;
    assert_eq!(more.json().as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn an_unknown_feed_is_404() {
    let fx = fixture(1).await;
    for uri in [
        "/feeds/accounts/v3",
        "/feeds/nothing/v1",
        "/feeds/accounts/v3/subjects",
        "/feeds/accounts/v3/subjects/s1",
    ] {
        get(&fx.router, uri, Some(ALL))
            .await
            .problem(404, "unknown-feed");
    }
}

#[tokio::test]
async fn a_retired_feed_is_410_naming_the_newest_served_version() {
    let fx = fixture(2).await;
    fx.store
        .set_status(&feed("accounts.v1"), FeedStatus::Retired)
        .await
        .unwrap();
    for uri in [
        "/feeds/accounts/v1",
        "/feeds/accounts/v1/subjects",
        "/feeds/accounts/v1/subjects/s1",
    ] {
        let problem = get(&fx.router, uri, Some(ALL))
            .await
            .problem(410, "feed-retired");
        assert_eq!(problem["successor"], "accounts.v2");
        assert_eq!(problem["successor_url"], "/feeds/accounts/v2");
        assert!(problem["detail"].as_str().unwrap().contains("accounts.v2"));
    }
    // A newer version that is itself retired is not named; with none left, there is no successor.
    fx.store
        .set_status(&feed("accounts.v2"), FeedStatus::Retired)
        .await
        .unwrap();
    let problem = get(&fx.router, "/feeds/accounts/v1", Some(ALL))
        .await
        .problem(410, "feed-retired");
    assert!(problem.get("successor").is_none(), "{problem}");
    // The listing still shows retired feeds, with their status.
    let feeds = get(&fx.router, "/feeds", Some(ALL)).await.json();
    assert_eq!(feeds[0]["status"], "retired");
}

#[tokio::test]
async fn head_requests_are_answered_like_get() {
    let fx = fixture(1).await;
    let answer = crate::send(
        &fx.router,
        axum::http::Request::head("/feeds/accounts/v2")
            .header("authorization", format!("Bearer {ALL}"))
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert!(answer.body.is_empty());
}

#[tokio::test]
async fn openapi_is_served_parses_and_names_every_route() {
    let fx = fixture(0).await;
    let answer = get(&fx.router, "/openapi.json", None).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.content_type(), "application/json");
    let doc = answer.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for route in [
        "/feeds",
        "/feeds/{name}/{version}",
        "/feeds/{name}/{version}/subjects",
        "/feeds/{name}/{version}/subjects/{subject}",
        "/openapi.json",
        "/metrics",
    ] {
        assert!(paths[route]["get"].is_object(), "{route} is not documented");
    }
    assert_eq!(paths.len(), 6, "a documented route that is not served");
    // Every documented problem type is one the API has, and every one is documented.
    let description = doc["info"]["description"].as_str().unwrap();
    for kind in headwater_api::ProblemType::ALL {
        let slug = kind.uri().rsplit('/').next().unwrap();
        assert!(description.contains(slug), "{slug} is not documented");
    }
}
