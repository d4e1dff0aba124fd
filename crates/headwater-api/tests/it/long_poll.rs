//! Long polling: a read with `timeout_ms` waits for the next commit, and no longer.

use std::time::{Duration, Instant};

use crate::{ALL, commit, feed, fixture, get};

/// A bound no passing run comes near; a failing one (a wait for the whole timeout) exceeds it.
const PROMPT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_waiting_read_answers_as_soon_as_a_commit_lands() {
    let fx = fixture(2).await;
    let router = fx.router.clone();
    let started = Instant::now();
    let waiting = tokio::spawn(async move {
        get(
            &router,
            "/feeds/accounts/v2?after=2&timeout_ms=30000",
            Some(ALL),
        )
        .await
    });
    // Commit once the read is waiting (the gauge says so), not after a guessed sleep.
    let deadline = Instant::now() + PROMPT;
    while !metrics_text(&fx)
        .await
        .contains("headwater_api_long_polls_waiting 1")
    {
        assert!(Instant::now() < deadline, "the read never waited");
        tokio::task::yield_now().await;
    }
    commit(&fx.store, &feed("accounts.v2"), 2, 1).await;
    let answer = tokio::time::timeout(PROMPT, waiting)
        .await
        .expect("the read did not wake on the commit")
        .unwrap();
    assert!(started.elapsed() < PROMPT);
    assert_eq!(answer.status, 200);
    let events = answer.json();
    assert_eq!(events.as_array().unwrap().len(), 1);
    assert_eq!(events[0]["position"], 3);
}

#[tokio::test]
async fn a_commit_to_another_feed_does_not_wake_it() {
    let fx = fixture(2).await;
    let router = fx.router.clone();
    let waiting = tokio::spawn(async move {
        get(
            &router,
            "/feeds/accounts/v2?after=2&timeout_ms=300",
            Some(ALL),
        )
        .await
    });
    commit(&fx.store, &feed("accounts.v1"), 2, 1).await;
    let answer = waiting.await.unwrap();
    assert_eq!(answer.body, b"[]");
}

#[tokio::test(start_paused = true)]
async fn with_nothing_committed_it_answers_empty_after_the_timeout() {
    let fx = fixture(2).await;
    let started = tokio::time::Instant::now();
    let answer = get(
        &fx.router,
        "/feeds/accounts/v2?after=2&timeout_ms=1500",
        Some(ALL),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, b"[]");
    // Paused time: exactly the timeout passed, no earlier answer and no later one.
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1500), "{waited:?}");
    assert!(waited < Duration::from_millis(1600), "{waited:?}");
}

#[tokio::test]
async fn events_already_there_are_answered_without_waiting() {
    let fx = fixture(3).await;
    let started = Instant::now();
    let answer = get(
        &fx.router,
        "/feeds/accounts/v2?after=1&timeout_ms=30000",
        Some(ALL),
    )
    .await;
    assert!(started.elapsed() < PROMPT);
    assert_eq!(answer.json().as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn drain_ends_waiting_reads_at_once() {
    let fx = fixture(1).await;
    let router = fx.router.clone();
    let waiting = tokio::spawn(async move {
        get(
            &router,
            "/feeds/accounts/v2?after=1&timeout_ms=30000",
            Some(ALL),
        )
        .await
    });
    let deadline = Instant::now() + PROMPT;
    while !metrics_text(&fx)
        .await
        .contains("headwater_api_long_polls_waiting 1")
    {
        assert!(Instant::now() < deadline, "the read never waited");
        tokio::task::yield_now().await;
    }
    fx.api.drain();
    let answer = tokio::time::timeout(PROMPT, waiting)
        .await
        .expect("drain did not end the wait")
        .unwrap();
    assert_eq!(answer.body, b"[]");
    // After a drain, reads do not wait at all.
    let started = Instant::now();
    let answer = get(
        &fx.router,
        "/feeds/accounts/v2?after=1&timeout_ms=30000",
        Some(ALL),
    )
    .await;
    assert_eq!(answer.body, b"[]");
    assert!(started.elapsed() < PROMPT);
}

pub(crate) async fn metrics_text(fx: &crate::Fixture) -> String {
    String::from_utf8(get(&fx.router, "/metrics", Some(ALL)).await.body).unwrap()
}

#[tokio::test]
async fn past_the_bound_on_waiting_reads_a_read_answers_at_once() {
    use std::sync::Arc;
    let fx = fixture(1).await;
    let mut config = headwater_api::ApiConfig::new(crate::SOURCE, crate::tokens()).unwrap();
    config.long_polls_max = 1;
    let mut registry = prometheus_client::registry::Registry::default();
    let api = headwater_api::FeedApi::new(Arc::new(fx.store.clone()), config, &mut registry);
    let router = api.router(Arc::new(registry));
    let first = {
        let router = router.clone();
        tokio::spawn(async move {
            get(
                &router,
                "/feeds/accounts/v2?after=1&timeout_ms=30000",
                Some(ALL),
            )
            .await
        })
    };
    let deadline = Instant::now() + PROMPT;
    loop {
        let text = String::from_utf8(get(&router, "/metrics", Some(ALL)).await.body).unwrap();
        if text.contains("headwater_api_long_polls_waiting 1") {
            break;
        }
        assert!(Instant::now() < deadline, "the first read never waited");
        tokio::task::yield_now().await;
    }
    let started = Instant::now();
    let second = get(
        &router,
        "/feeds/accounts/v2?after=1&timeout_ms=30000",
        Some(ALL),
    )
    .await;
    assert!(started.elapsed() < PROMPT, "the second read waited");
    assert_eq!(second.status, 200);
    assert_eq!(second.body, b"[]");
    commit(&fx.store, &feed("accounts.v2"), 1, 1).await;
    let first = tokio::time::timeout(PROMPT, first).await.unwrap().unwrap();
    assert_eq!(first.json()[0]["position"], 2);
}
