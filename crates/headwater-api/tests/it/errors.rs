//! Bad input (G11): each refused with its status and problem type, never a panic.

use axum::body::Body;
use axum::http::Request;

use crate::{ALL, fixture, get, send};

/// (request URI, expected status, expected problem type)
const BAD_INPUTS: &[(&str, u16, &str)] = &[
    // Feed name and version syntax.
    ("/feeds/Accounts/v2", 400, "bad-parameter"),
    ("/feeds/1accounts/v2", 400, "bad-parameter"),
    ("/feeds/acc-ounts/v2", 400, "bad-parameter"),
    (
        "/feeds/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/v1",
        400,
        "bad-parameter",
    ),
    ("/feeds/accounts/2", 400, "bad-parameter"),
    ("/feeds/accounts/v0", 400, "bad-parameter"),
    ("/feeds/accounts/v02", 400, "bad-parameter"),
    ("/feeds/accounts/v-1", 400, "bad-parameter"),
    ("/feeds/accounts/v4294967296", 400, "bad-parameter"),
    ("/feeds/accounts/V2", 400, "bad-parameter"),
    ("/feeds/accounts/v2x", 400, "bad-parameter"),
    ("/feeds/accounts/v%FF", 400, "bad-parameter"),
    ("/feeds/accounts/v2/subjects/%FF", 400, "bad-parameter"),
    // `after`.
    ("/feeds/accounts/v2?after=-1", 400, "bad-parameter"),
    ("/feeds/accounts/v2?after=abc", 400, "bad-parameter"),
    ("/feeds/accounts/v2?after=", 400, "bad-parameter"),
    ("/feeds/accounts/v2?after=%2B1", 400, "bad-parameter"),
    ("/feeds/accounts/v2?after=1.5", 400, "bad-parameter"),
    (
        "/feeds/accounts/v2?after=18446744073709551616",
        400,
        "bad-parameter",
    ),
    ("/feeds/accounts/v2?after=1&after=2", 400, "bad-parameter"),
    (
        "/feeds/accounts/v2?after=9223372036854775808",
        400,
        "bad-parameter",
    ),
    (
        "/feeds/accounts/v2/subjects/42?after=9223372036854775808",
        400,
        "bad-parameter",
    ),
    // `limit`.
    ("/feeds/accounts/v2?limit=0", 400, "bad-parameter"),
    ("/feeds/accounts/v2?limit=10001", 400, "bad-parameter"),
    ("/feeds/accounts/v2?limit=x", 400, "bad-parameter"),
    ("/feeds/accounts/v2/subjects?limit=0", 400, "bad-parameter"),
    (
        "/feeds/accounts/v2/subjects?limit=10001",
        400,
        "bad-parameter",
    ),
    (
        "/feeds/accounts/v2/subjects/s1?limit=0",
        400,
        "bad-parameter",
    ),
    (
        "/feeds/accounts/v2/subjects/s1?limit=10001",
        400,
        "bad-parameter",
    ),
    // `timeout_ms`.
    ("/feeds/accounts/v2?timeout_ms=30001", 400, "bad-parameter"),
    ("/feeds/accounts/v2?timeout_ms=-5", 400, "bad-parameter"),
    ("/feeds/accounts/v2?timeout_ms=1s", 400, "bad-parameter"),
    // Subjects: charset and length, in the path and in `after`.
    ("/feeds/accounts/v2/subjects/a%20b", 400, "bad-parameter"),
    ("/feeds/accounts/v2/subjects/a%2Fb", 400, "bad-parameter"),
    ("/feeds/accounts/v2/subjects/%C3%A9", 400, "bad-parameter"),
    (
        "/feeds/accounts/v2/subjects?after=a%20b",
        400,
        "bad-parameter",
    ),
    ("/feeds/accounts/v2/subjects?after=", 400, "bad-parameter"),
    (
        "/feeds/accounts/v2/subjects/s1?after=s1",
        400,
        "bad-parameter",
    ),
    // Unknown parameters, also ones that belong to another route.
    ("/feeds/accounts/v2?limt=5", 400, "bad-parameter"),
    (
        "/feeds/accounts/v2/subjects?timeout_ms=5",
        400,
        "bad-parameter",
    ),
    (
        "/feeds/accounts/v2/subjects/s1?timeout_ms=5",
        400,
        "bad-parameter",
    ),
    ("/feeds?after=1", 400, "bad-parameter"),
    ("/metrics?x=1", 400, "bad-parameter"),
    ("/openapi.json?x=1", 400, "bad-parameter"),
    // Routes that do not exist.
    ("/", 404, "not-found"),
    ("/feeds/", 404, "not-found"),
    ("/feeds/accounts", 404, "not-found"),
    ("/feeds/accounts/v2/", 404, "not-found"),
    ("/feeds/accounts/v2/subjects/s1/more", 404, "not-found"),
    ("/feeds/accounts/v2/events", 404, "not-found"),
];

#[tokio::test]
async fn every_bad_input_is_refused_with_its_problem() {
    let fx = fixture(3).await;
    for (uri, status, kind) in BAD_INPUTS {
        let answer = get(&fx.router, uri, Some(ALL)).await;
        assert_eq!(
            answer.status.as_u16(),
            *status,
            "{uri}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        answer.problem(*status, kind);
    }
}

#[tokio::test]
async fn a_long_subject_is_refused_and_the_longest_is_accepted() {
    let fx = fixture(1).await;
    let longest = "x".repeat(headwater_core::limits::SUBJECT_BYTES_MAX);
    let ok = get(
        &fx.router,
        &format!("/feeds/accounts/v2/subjects/{longest}"),
        Some(ALL),
    )
    .await;
    assert_eq!(ok.status, 200);
    let too_long = format!("{longest}x");
    get(
        &fx.router,
        &format!("/feeds/accounts/v2/subjects/{too_long}"),
        Some(ALL),
    )
    .await
    .problem(400, "bad-parameter");
    get(
        &fx.router,
        &format!("/feeds/accounts/v2/subjects?after={too_long}"),
        Some(ALL),
    )
    .await
    .problem(400, "bad-parameter");
}

#[tokio::test]
async fn bounds_are_accepted() {
    let fx = fixture(1).await;
    for uri in [
        "/feeds/accounts/v2?limit=1",
        "/feeds/accounts/v2?limit=10000",
        "/feeds/accounts/v2?after=9223372036854775807",
        "/feeds/accounts/v2?timeout_ms=0",
        "/feeds/accounts/v2/subjects?limit=10000",
        "/feeds/accounts/v2/subjects/s1?after=9223372036854775807&limit=10000",
    ] {
        let answer = get(&fx.router, uri, Some(ALL)).await;
        assert_eq!(answer.status, 200, "{uri}");
    }
}

#[tokio::test]
async fn other_methods_are_405() {
    let fx = fixture(1).await;
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let answer = send(
            &fx.router,
            Request::builder()
                .method(method)
                .uri("/feeds/accounts/v2")
                .header("authorization", format!("Bearer {ALL}"))
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
        answer.problem(405, "method-not-allowed");
    }
}

#[tokio::test]
async fn details_quote_a_bounded_part_of_a_huge_value() {
    let fx = fixture(1).await;
    let huge = "9".repeat(5000);
    let problem = get(
        &fx.router,
        &format!("/feeds/accounts/v2?after={huge}"),
        Some(ALL),
    )
    .await
    .problem(400, "bad-parameter");
    assert!(problem["detail"].as_str().unwrap().len() < 300, "{problem}");
    let problem = get(
        &fx.router,
        &format!("/feeds/accounts/v2?{huge}=1"),
        Some(ALL),
    )
    .await
    .problem(400, "bad-parameter");
    assert!(problem["detail"].as_str().unwrap().len() < 300, "{problem}");
}

#[tokio::test]
async fn an_event_whose_data_is_not_json_is_reported_not_served() {
    use headwater_core::{EventId, EventType, Position, Subject, Timestamp};
    use headwater_store::{FeedStore, ProjectedEvent, ProjectorBatch};
    let fx = fixture(0).await;
    let id = crate::feed("accounts.v2");
    fx.store
        .commit(
            &id,
            ProjectorBatch {
                from: Position(0),
                to: Position(1),
                events: vec![ProjectedEvent {
                    id: EventId::new_random(),
                    event_type: EventType::new("accounts.broken").unwrap(),
                    subject: Subject::new("s1").unwrap(),
                    time: Timestamp::from_unix_micros(1),
                    data: b"{not json".to_vec(),
                    source_position: Position(1),
                }],
            },
        )
        .await
        .unwrap();
    get(&fx.router, "/feeds/accounts/v2", Some(ALL))
        .await
        .problem(503, "unavailable");
    get(&fx.router, "/feeds/accounts/v2/subjects/s1", Some(ALL))
        .await
        .problem(503, "unavailable");
}

/// A feed store whose every read fails in one way, to see each failure become its problem.
struct FailingStore {
    inner: headwater_store::MemoryFeedStore,
    fail: Failure,
}

#[derive(Clone, Copy)]
enum Failure {
    Panic,
    Closed,
    Backend,
}

impl FailingStore {
    fn fail<T>(&self) -> Result<T, headwater_store::FeedError> {
        match self.fail {
            Failure::Panic => panic!("a bug in a feed store"),
            Failure::Closed => Err(headwater_store::FeedError::Closed),
            Failure::Backend => Err(headwater_store::FeedError::backend(std::io::Error::other(
                "disk on fire",
            ))),
        }
    }
}

#[async_trait::async_trait]
impl headwater_store::FeedStore for FailingStore {
    async fn register(
        &self,
        feed: &headwater_core::FeedId,
    ) -> Result<headwater_store::FeedState, headwater_store::FeedError> {
        self.inner.register(feed).await
    }
    async fn feeds(&self) -> Result<Vec<headwater_store::FeedState>, headwater_store::FeedError> {
        self.fail()
    }
    async fn feed(
        &self,
        _: &headwater_core::FeedId,
    ) -> Result<Option<headwater_store::FeedState>, headwater_store::FeedError> {
        self.fail()
    }
    async fn set_status(
        &self,
        feed: &headwater_core::FeedId,
        status: headwater_core::FeedStatus,
    ) -> Result<headwater_store::FeedState, headwater_store::FeedError> {
        self.inner.set_status(feed, status).await
    }
    async fn commit(
        &self,
        feed: &headwater_core::FeedId,
        batch: headwater_store::ProjectorBatch,
    ) -> Result<headwater_store::FeedCommit, headwater_store::FeedError> {
        self.inner.commit(feed, batch).await
    }
    async fn read_feed(
        &self,
        _: &headwater_core::FeedId,
        _: headwater_core::FeedPosition,
        _: u64,
    ) -> Result<Vec<headwater_store::FeedEvent>, headwater_store::FeedError> {
        self.fail()
    }
    async fn subjects(
        &self,
        _: &headwater_core::FeedId,
        _: Option<&headwater_core::Subject>,
        _: u64,
    ) -> Result<Vec<headwater_store::SubjectHead>, headwater_store::FeedError> {
        self.fail()
    }
    async fn read_subject(
        &self,
        _: &headwater_core::FeedId,
        _: &headwater_core::Subject,
        _: headwater_core::Sequence,
        _: u64,
    ) -> Result<Vec<headwater_store::FeedEvent>, headwater_store::FeedError> {
        self.fail()
    }
    fn watch_head(
        &self,
        feed: &headwater_core::FeedId,
    ) -> tokio::sync::watch::Receiver<headwater_core::FeedPosition> {
        self.inner.watch_head(feed)
    }
    async fn record_readers(
        &self,
        _: Vec<headwater_store::ReaderSeen>,
    ) -> Result<(), headwater_store::FeedError> {
        self.fail()
    }
    async fn readers(
        &self,
        _: &headwater_core::FeedId,
    ) -> Result<Vec<headwater_store::FeedReader>, headwater_store::FeedError> {
        self.fail()
    }
    async fn advance_publisher(
        &self,
        _: &headwater_core::FeedId,
        _: &str,
        _: headwater_core::FeedPosition,
        _: headwater_core::FeedPosition,
    ) -> Result<headwater_store::PublisherCursor, headwater_store::FeedError> {
        self.fail()
    }
    async fn publishers(
        &self,
        _: &headwater_core::FeedId,
    ) -> Result<Vec<headwater_store::PublisherCursor>, headwater_store::FeedError> {
        self.fail()
    }
}

#[tokio::test]
async fn store_failures_and_panics_become_problems() {
    use std::sync::Arc;
    for (fail, status, kind) in [
        (Failure::Panic, 500, "internal"),
        (Failure::Closed, 503, "unavailable"),
        (Failure::Backend, 500, "internal"),
    ] {
        let store = FailingStore {
            inner: headwater_store::MemoryFeedStore::new(),
            fail,
        };
        let mut registry = prometheus_client::registry::Registry::default();
        let api = headwater_api::FeedApi::new(
            Arc::new(store),
            headwater_api::ApiConfig::new(crate::SOURCE, crate::tokens()).unwrap(),
            &mut registry,
        );
        let router = api.router(Arc::new(registry));
        for uri in [
            "/feeds",
            "/feeds/accounts/v2",
            "/feeds/accounts/v2/subjects",
            "/feeds/accounts/v2/subjects/s1",
            "/metrics",
        ] {
            let problem = get(&router, uri, Some(ALL)).await.problem(status, kind);
            // The backend's own words stay in the producer's logs.
            assert!(
                !problem.to_string().contains("disk on fire"),
                "{uri}: {problem}"
            );
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

    /// Whatever the path and query, the answer is a 200 or a problem, never a panic or a 500.
    #[test]
    fn arbitrary_requests_get_an_answer_or_a_problem(
        route in proptest::sample::select(vec![
            "/feeds", "/feeds/accounts/v2", "/feeds/accounts/v2/subjects",
            "/feeds/accounts/v2/subjects/s1",
        ]),
        segment in "[a-zA-Z0-9%._~-]{0,12}",
        pairs in proptest::collection::vec(
            (
                proptest::sample::select(vec!["after", "limit", "timeout_ms", "x", ""]),
                "[0-9]{0,3}|[a-z0-9%+.~-]{0,6}",
            ),
            0..4,
        ),
        noise in "[a-z_=&%0-9+.-]{0,20}",
    ) {
        let mut query: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        query.push(noise);
        let query = query.join("&");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let fx = fixture(3).await;
            for uri in [format!("{route}?{query}"), format!("{route}/{segment}?{query}"),
                        format!("/feeds/{segment}/v2?{query}")] {
                let Ok(uri) = uri.parse::<axum::http::Uri>() else { continue };
                let answer = get(&fx.router, &uri.to_string(), Some(ALL)).await;
                let status = answer.status.as_u16();
                if status == 200 {
                    continue;
                }
                assert!(matches!(status, 400 | 404), "{uri}: {status}");
                assert_eq!(answer.content_type(), "application/problem+json", "{uri}");
                let body = answer.json();
                assert!(body["type"].as_str().unwrap().starts_with("https://headwater.dev/problems/"));
            }
        });
    }
}
