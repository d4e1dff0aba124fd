//! One real socket: a plain HTTP client long-polls a served API and is woken by a commit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::{ALL, commit, feed, fixture};

const PROMPT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polling_over_a_socket_wakes_on_a_commit_and_shuts_down_gracefully() {
    let fx = fixture(1).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let api = Arc::new(fx.api);
    let serving = {
        let api = Arc::clone(&api);
        let registry = Arc::clone(&fx.registry);
        tokio::spawn(async move {
            api.serve(listener, registry, async {
                let _ = stopped.await;
            })
            .await
        })
    };

    let client: Client<_, Body> = Client::builder(TokioExecutor::new()).build_http();
    let request = |uri: String| {
        axum::http::Request::get(uri)
            .header("authorization", format!("Bearer {ALL}"))
            .body(Body::empty())
            .unwrap()
    };
    let waiting = {
        let client = client.clone();
        let request = request(format!(
            "http://{address}/feeds/accounts/v2?after=1&timeout_ms=30000"
        ));
        tokio::spawn(async move {
            let response = client.request(request).await.unwrap();
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        })
    };
    // Commit once the server holds the read (its gauge says so).
    let deadline = Instant::now() + PROMPT;
    loop {
        let response = client
            .request(request(format!("http://{address}/metrics")))
            .await
            .unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        if String::from_utf8_lossy(&body).contains("headwater_api_long_polls_waiting 1") {
            break;
        }
        assert!(Instant::now() < deadline, "the read never waited");
        tokio::task::yield_now().await;
    }
    commit(&fx.store, &feed("accounts.v2"), 1, 2).await;
    let (status, body) = tokio::time::timeout(PROMPT, waiting)
        .await
        .expect("the long poll did not wake")
        .unwrap();
    assert_eq!(status, 200);
    let events: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let positions: Vec<_> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, [2, 3]);

    // A long poll in flight at shutdown answers at once, and serve returns.
    let pending = {
        let client = client.clone();
        let request = request(format!(
            "http://{address}/feeds/accounts/v2?after=3&timeout_ms=30000"
        ));
        tokio::spawn(async move { client.request(request).await.map(|r| r.status()) })
    };
    let deadline = Instant::now() + PROMPT;
    loop {
        let response = client
            .request(request(format!("http://{address}/metrics")))
            .await
            .unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        if String::from_utf8_lossy(&body).contains("headwater_api_long_polls_waiting 1") {
            break;
        }
        assert!(Instant::now() < deadline, "the read never waited");
        tokio::task::yield_now().await;
    }
    stop.send(()).unwrap();
    let status = tokio::time::timeout(PROMPT, pending)
        .await
        .expect("the long poll held up shutdown")
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
    tokio::time::timeout(PROMPT, serving)
        .await
        .expect("serve did not return")
        .unwrap()
        .unwrap();
}
