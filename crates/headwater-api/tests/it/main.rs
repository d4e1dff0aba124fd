//! The feed API through its router (no sockets) and one real socket.

mod auth;
mod errors;
mod long_poll;
mod observability;
mod routes;
mod socket;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use headwater_api::{ApiConfig, FeedApi, FeedScope, Tokens};
use headwater_core::{
    EventId, EventType, FeedId, FeedStatus, Position, Subject, Timestamp, integration_event_id,
};
use headwater_store::{FeedStore, MemoryFeedStore, ProjectedEvent, ProjectorBatch};
use http_body_util::BodyExt;
use prometheus_client::registry::Registry;
use tower::ServiceExt;

pub(crate) const ALL: &str = "token-for-everything-0123456789";
pub(crate) const V2_ONLY: &str = "token-for-accounts-v2-abcdef";
pub(crate) const LOANS: &str = "token-for-loans-xyz";
pub(crate) const SOURCE: &str = "https://accounts.bank.example";

pub(crate) struct Fixture {
    pub(crate) store: MemoryFeedStore,
    pub(crate) api: FeedApi,
    pub(crate) router: Router,
    pub(crate) registry: Arc<Registry>,
}

pub(crate) fn feed(text: &str) -> FeedId {
    FeedId::parse(text).unwrap()
}

pub(crate) fn tokens() -> Tokens {
    let mut tokens = Tokens::new();
    tokens.add("ops", ALL, vec![FeedScope::All]).unwrap();
    tokens
        .add(
            "statements",
            V2_ONLY,
            vec![FeedScope::parse("accounts.v2").unwrap()],
        )
        .unwrap();
    tokens
        .add("loans", LOANS, vec![FeedScope::parse("loans").unwrap()])
        .unwrap();
    tokens
}

/// A store with `accounts.v1` (live), `accounts.v2` (live) and `loans.v1` (backfilling), each
/// holding `events` events over subjects `s0`..`s2` in turn.
pub(crate) async fn fixture(events: u64) -> Fixture {
    let store = MemoryFeedStore::new();
    for id in ["accounts.v1", "accounts.v2", "loans.v1"] {
        let id = feed(id);
        store.register(&id).await.unwrap();
        commit(&store, &id, 0, events).await;
        if id.name.as_str() == "accounts" {
            store.set_status(&id, FeedStatus::Live).await.unwrap();
        }
    }
    let mut registry = Registry::default();
    let api = FeedApi::new(
        Arc::new(store.clone()),
        ApiConfig::new(SOURCE, tokens()).unwrap(),
        &mut registry,
    );
    let registry = Arc::new(registry);
    let router = api.router(Arc::clone(&registry));
    Fixture {
        store,
        api,
        router,
        registry,
    }
}

/// Commits internal positions `from + 1 ..= from + count` as one event each, subject `s{i % 3}`.
pub(crate) async fn commit(store: &MemoryFeedStore, id: &FeedId, from: u64, count: u64) {
    let events = (from + 1..=from + count)
        .map(|p| ProjectedEvent {
            id: integration_event_id(
                EventId::from_uuid(uuid::Uuid::from_u128(u128::from(p))),
                id,
                0,
            ),
            event_type: EventType::new("accounts.deposited").unwrap(),
            subject: Subject::new(format!("s{}", p % 3)).unwrap(),
            time: Timestamp::from_unix_micros(1_798_380_419_123_456 + p),
            data: format!(r#"{{"amount": {p}, "note":"a \"quoted\" word"}}"#).into_bytes(),
            source_position: Position(p),
        })
        .collect();
    store
        .commit(
            id,
            ProjectorBatch {
                from: Position(from),
                to: Position(from + count),
                events,
            },
        )
        .await
        .unwrap();
}

pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Vec<u8>,
}

impl Answer {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub(crate) fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .map_or("", |v| v.to_str().unwrap())
    }

    /// Asserts an RFC 9457 problem of this status and type and returns its body.
    pub(crate) fn problem(&self, status: u16, kind: &str) -> serde_json::Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.content_type(), "application/problem+json");
        let body = self.json();
        assert_eq!(
            body["type"],
            format!("https://headwater.dev/problems/{kind}"),
            "{body}"
        );
        assert_eq!(body["status"], status);
        assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(body["detail"].as_str().is_some_and(|t| !t.is_empty()));
        body
    }
}

pub(crate) async fn send(router: &Router, request: Request<Body>) -> Answer {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

pub(crate) async fn get(router: &Router, uri: &str, token: Option<&str>) -> Answer {
    let mut request = Request::get(uri);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    send(router, request.body(Body::empty()).unwrap()).await
}
