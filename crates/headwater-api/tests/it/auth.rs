//! Access control (G12): 401 without a valid token, 403 outside its scope, listings filtered.

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use headwater_api::{ApiConfig, FeedApi, MetricsAccess, Tokens};
use prometheus_client::registry::Registry;

use crate::{ALL, LOANS, V2_ONLY, fixture, get, send};

const FEED_ROUTES: &[&str] = &[
    "/feeds",
    "/feeds/accounts/v2",
    "/feeds/accounts/v2/subjects",
    "/feeds/accounts/v2/subjects/s1",
    "/metrics",
];

async fn with_authorization(router: &axum::Router, uri: &str, value: &[u8]) -> crate::Answer {
    send(
        router,
        Request::get(uri)
            .header("authorization", value)
            .body(Body::empty())
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn no_token_is_401_with_a_bearer_challenge() {
    let fx = fixture(1).await;
    for uri in FEED_ROUTES {
        let answer = get(&fx.router, uri, None).await;
        answer.problem(401, "unauthorized");
        assert_eq!(
            answer.headers["www-authenticate"],
            "Bearer realm=\"headwater\""
        );
    }
    // Before anything else: an unauthenticated caller learns nothing, not even bad syntax.
    get(&fx.router, "/feeds/Bad/v0?limit=0", None)
        .await
        .problem(401, "unauthorized");
}

#[tokio::test]
async fn malformed_and_wrong_tokens_are_401() {
    let fx = fixture(1).await;
    let wrong = format!("Bearer {ALL}x");
    let prefix = format!("Bearer {}", &ALL[..ALL.len() - 1]);
    let basic = format!("Basic {ALL}");
    let bare = ALL.to_owned();
    let lower = format!("bearer {ALL}");
    let cases: Vec<(&[u8], u16)> = vec![
        (wrong.as_bytes(), 401),
        (prefix.as_bytes(), 401),
        (basic.as_bytes(), 401),
        (bare.as_bytes(), 401),
        (b"Bearer", 401),
        (b"Bearer ", 401),
        (b"Bearer a b", 401),
        (b"Bearer \xff\xfe", 401),
        (b"", 401),
        // The scheme is case-insensitive (RFC 7235).
        (lower.as_bytes(), 200),
    ];
    for uri in FEED_ROUTES {
        for (value, status) in &cases {
            let answer = with_authorization(&fx.router, uri, value).await;
            if *status == 401 {
                answer.problem(401, "unauthorized");
                assert!(
                    answer.headers["www-authenticate"]
                        .to_str()
                        .unwrap()
                        .starts_with("Bearer realm=\"headwater\""),
                    "{uri} {value:?}"
                );
            } else {
                assert_eq!(answer.status, 200, "{uri} {value:?}");
            }
        }
    }
    // Two Authorization headers are refused, even if one is right.
    let answer = send(
        &fx.router,
        Request::get("/feeds")
            .header("authorization", format!("Bearer {ALL}"))
            .header("authorization", "Bearer nope")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    answer.problem(401, "unauthorized");
}

#[tokio::test]
async fn a_token_without_the_feed_is_403() {
    let fx = fixture(1).await;
    for uri in [
        "/feeds/accounts/v1",
        "/feeds/accounts/v1/subjects",
        "/feeds/accounts/v1/subjects/s1",
        "/feeds/loans/v1",
        // Also for a feed that does not exist: a token learns nothing outside its scope.
        "/feeds/accounts/v9",
        "/feeds/secret/v1",
    ] {
        get(&fx.router, uri, Some(V2_ONLY))
            .await
            .problem(403, "forbidden");
    }
    // A name scope covers every version of that name, and only those.
    assert_eq!(
        get(&fx.router, "/feeds/loans/v1", Some(LOANS)).await.status,
        200
    );
    get(&fx.router, "/feeds/loans/v7", Some(LOANS))
        .await
        .problem(404, "unknown-feed");
    get(&fx.router, "/feeds/accounts/v2", Some(LOANS))
        .await
        .problem(403, "forbidden");
}

#[tokio::test]
async fn the_listing_shows_only_the_feeds_of_the_token() {
    let fx = fixture(1).await;
    let names = |json: serde_json::Value| -> Vec<String> {
        json.as_array()
            .unwrap()
            .iter()
            .map(|f| format!("{}.v{}", f["name"].as_str().unwrap(), f["version"]))
            .collect()
    };
    assert_eq!(
        names(get(&fx.router, "/feeds", Some(ALL)).await.json()),
        ["accounts.v1", "accounts.v2", "loans.v1"]
    );
    assert_eq!(
        names(get(&fx.router, "/feeds", Some(V2_ONLY)).await.json()),
        ["accounts.v2"]
    );
    assert_eq!(
        names(get(&fx.router, "/feeds", Some(LOANS)).await.json()),
        ["loans.v1"]
    );
}

#[tokio::test]
async fn openapi_is_public_and_metrics_take_any_token_unless_public() {
    let fx = fixture(1).await;
    assert_eq!(get(&fx.router, "/openapi.json", None).await.status, 200);
    // Any valid token reads the metrics, whatever its feeds.
    assert_eq!(get(&fx.router, "/metrics", Some(V2_ONLY)).await.status, 200);
    get(&fx.router, "/metrics", None)
        .await
        .problem(401, "unauthorized");

    let mut config = ApiConfig::new(crate::SOURCE, crate::tokens()).unwrap();
    config.metrics_access = MetricsAccess::Public;
    let mut registry = Registry::default();
    let api = FeedApi::new(Arc::new(fx.store.clone()), config, &mut registry);
    let router = api.router(Arc::new(registry));
    assert_eq!(get(&router, "/metrics", None).await.status, 200);
    get(&router, "/feeds", None)
        .await
        .problem(401, "unauthorized");
}

#[tokio::test]
async fn with_no_token_configured_nothing_is_readable() {
    let fx = fixture(1).await;
    let mut registry = Registry::default();
    let api = FeedApi::new(
        Arc::new(fx.store.clone()),
        ApiConfig::new(crate::SOURCE, Tokens::new()).unwrap(),
        &mut registry,
    );
    let router = api.router(Arc::new(registry));
    get(&router, "/feeds", Some(ALL))
        .await
        .problem(401, "unauthorized");
}

#[tokio::test]
async fn a_token_file_configures_names_and_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.json");
    std::fs::write(
        &path,
        r#"{"tokens": [
            {"name": "statements", "token": "file-token-1", "feeds": ["accounts.v2"]},
            {"name": "ops", "token": "file-token-2", "feeds": ["*"]}
        ]}"#,
    )
    .unwrap();
    let tokens = Tokens::from_file(&path).unwrap();
    let fx = fixture(1).await;
    let mut registry = Registry::default();
    let api = FeedApi::new(
        Arc::new(fx.store.clone()),
        ApiConfig::new(crate::SOURCE, tokens).unwrap(),
        &mut registry,
    );
    let router = api.router(Arc::new(registry));
    assert_eq!(
        get(&router, "/feeds/accounts/v2", Some("file-token-1"))
            .await
            .status,
        200
    );
    get(&router, "/feeds/accounts/v1", Some("file-token-1"))
        .await
        .problem(403, "forbidden");
    assert_eq!(
        get(&router, "/feeds/accounts/v1", Some("file-token-2"))
            .await
            .status,
        200
    );

    std::fs::write(
        &path,
        r#"{"tokens": [{"name": "x", "token": "t", "feeds": ["Bad"]}]}"#,
    )
    .unwrap();
    assert!(Tokens::from_file(&path).is_err());
    assert!(Tokens::from_file(&dir.path().join("missing.json")).is_err());
}

#[tokio::test]
async fn one_token_for_all_feeds() {
    let fx = fixture(1).await;
    let mut registry = Registry::default();
    let api = FeedApi::new(
        Arc::new(fx.store.clone()),
        ApiConfig::new(crate::SOURCE, Tokens::one_for_all("bank", "T").unwrap()).unwrap(),
        &mut registry,
    );
    let router = api.router(Arc::new(registry));
    for uri in [
        "/feeds/accounts/v1",
        "/feeds/accounts/v2",
        "/feeds/loans/v1",
    ] {
        assert_eq!(get(&router, uri, Some("T")).await.status, 200, "{uri}");
    }
}
