//! The reconstitution walker: paced, resumable, failure-tolerant, one walk at a time, periodic and
//! on demand, observable (progress, metrics, admin routes). Timing is never asserted against the
//! wall clock: the paced tests run on tokio's paused clock, where every wait is exact.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use headwater_consume::{
    ConsumeError, Consumer, ConsumerOptions, IntegrationEvent, MemoryUpstream, MemoryView,
    SubjectHead, Upstream, UpstreamError, ViewStore, WalkState, WalkTrigger, Walker, WalkerOptions,
    WalkerStatus, walker_router,
};
use headwater_core::{FeedId, Sequence, Subject};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::consumer::event;

type State = BTreeMap<String, Vec<u64>>;
type TestView = MemoryView<State>;
type TestWalker = Walker<TestView, Probe>;

fn feed() -> FeedId {
    FeedId::parse("accounts.v1").unwrap()
}

fn subject(i: usize) -> String {
    format!("acc-{i:03}")
}

/// A view that keeps, per subject, the sequences applied; the handler refuses an event that is
/// not the next one, and every event of a subject in `refused`.
fn view(refused: &[&str]) -> Arc<TestView> {
    let refused: BTreeSet<String> = refused.iter().map(|s| (*s).to_owned()).collect();
    Arc::new(MemoryView::new(
        State::new(),
        move |state: &mut State, e: &IntegrationEvent| {
            if refused.contains(e.subject.as_str()) {
                return Err(format!("{} is refused by this view", e.subject).into());
            }
            let applied = state.entry(e.subject.to_string()).or_default();
            if e.sequence.get() != applied.len() as u64 + 1 {
                return Err(format!("{} #{} out of order", e.subject, e.sequence.get()).into());
            }
            applied.push(e.sequence.get());
            Ok(())
        },
    ))
}

/// The producer in memory, watched: every call counted, listings recorded, calls in flight at
/// once measured; listings can be made to fail from the n-th on, a subject's answers garbled.
#[derive(Debug, Default)]
struct Probe {
    inner: MemoryUpstream,
    /// The `after` of each listing call, in order.
    listings: Mutex<Vec<Option<String>>>,
    /// From this listing call on (1-based), `Unavailable`; 0: never.
    fail_listing_from: AtomicU64,
    /// This subject's pages lose their first event (upstream inconsistent).
    garbled: Mutex<Option<String>>,
    /// This subject's reads answer nothing, though the listing shows its head.
    silent: Mutex<Option<String>>,
    /// This subject's next read waits for `release`.
    stalled: Mutex<Option<String>>,
    release: tokio::sync::Notify,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

impl Probe {
    fn calls(&self) -> u64 {
        self.inner.calls()
    }

    fn listings(&self) -> Vec<Option<String>> {
        self.listings.lock().unwrap().clone()
    }

    fn enter(&self) -> InFlight<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(&self.in_flight)
    }
}

struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Upstream for Probe {
    async fn read_subject(
        &self,
        feed: &FeedId,
        subject: &Subject,
        after: Sequence,
        limit: u64,
    ) -> Result<Vec<IntegrationEvent>, UpstreamError> {
        let _in = self.enter();
        let stall = {
            let mut stalled = self.stalled.lock().unwrap();
            let stall = stalled.as_deref() == Some(subject.as_str());
            if stall {
                *stalled = None;
            }
            stall
        };
        if stall {
            self.release.notified().await;
        }
        let mut page = self.inner.read_subject(feed, subject, after, limit).await?;
        if self.garbled.lock().unwrap().as_deref() == Some(subject.as_str()) && !page.is_empty() {
            page.remove(0);
        }
        if self.silent.lock().unwrap().as_deref() == Some(subject.as_str()) {
            page.clear();
        }
        Ok(page)
    }

    async fn subjects(
        &self,
        feed: &FeedId,
        after: Option<&Subject>,
        limit: u64,
    ) -> Result<Vec<SubjectHead>, UpstreamError> {
        let _in = self.enter();
        let n = {
            let mut listings = self.listings.lock().unwrap();
            listings.push(after.map(ToString::to_string));
            listings.len() as u64
        };
        let from = self.fail_listing_from.load(Ordering::SeqCst);
        if from > 0 && n >= from {
            return Err(UpstreamError::Unavailable("the producer is down".into()));
        }
        self.inner.subjects(feed, after, limit).await
    }

    async fn read_feed(
        &self,
        feed: &FeedId,
        after: u64,
        limit: u64,
        wait: Duration,
    ) -> Result<Vec<IntegrationEvent>, UpstreamError> {
        self.inner.read_feed(feed, after, limit, wait).await
    }
}

/// `subjects` subjects with `events` events each, pushed to the producer in round-robin order.
/// Returns every event.
fn produce(probe: &Probe, subjects: usize, events: u64) -> Vec<IntegrationEvent> {
    let mut all = Vec::new();
    for sequence in 1..=events {
        for s in 0..subjects {
            let e = event(all.len() as u64 + 1, &subject(s), sequence);
            probe.inner.push(e.clone());
            all.push(e);
        }
    }
    all
}

/// What the view holds after applying each subject's whole stream once, in order.
fn complete(subjects: usize, events: u64, except: &[&str]) -> State {
    (0..subjects)
        .map(subject)
        .filter(|s| !except.contains(&s.as_str()))
        .map(|s| (s, (1..=events).collect()))
        .collect()
}

fn consumer(view: &Arc<TestView>, probe: &Arc<Probe>) -> Arc<Consumer<TestView, Probe>> {
    Arc::new(Consumer::new(
        feed(),
        Arc::clone(view),
        Arc::clone(probe),
        ConsumerOptions::default()
            .with_heal_attempts(1)
            .with_backoff(Duration::from_millis(1), Duration::from_millis(5)),
    ))
}

fn walker(view: &Arc<TestView>, probe: &Arc<Probe>, options: WalkerOptions) -> Arc<TestWalker> {
    Arc::new(Walker::new(consumer(view, probe), options))
}

/// Waits (on the test's clock) until the walker's status satisfies `done`.
async fn until(walker: &TestWalker, done: impl Fn(&WalkerStatus) -> bool) -> WalkerStatus {
    let mut watch = walker.watch();
    tokio::time::timeout(Duration::from_secs(3_600), watch.wait_for(|s| done(s)))
        .await
        .expect("the walker got there within the deadline")
        .unwrap()
        .clone()
}

#[tokio::test(start_paused = true)]
async fn pacing_bounds_the_requests_in_every_window() {
    const RATE: u32 = 20;
    const BURST: u32 = 2;
    let probe = Arc::new(Probe::default());
    produce(&probe, 40, 2);
    let paced = walker(
        &view(&[]),
        &probe,
        WalkerOptions::default()
            .with_pace(NonZeroU32::new(RATE).unwrap(), BURST)
            .with_page_subjects(10),
    );
    // Samples of (seconds since the start, calls so far), every 100 ms of the test's clock.
    let samples = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let sampler = {
        let (probe, samples) = (Arc::clone(&probe), Arc::clone(&samples));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let at = start.elapsed().as_secs_f64();
                samples.lock().unwrap().push((at, probe.calls()));
            }
        })
    };
    let report = paced.walk().await.unwrap();
    let took = start.elapsed().as_secs_f64();
    sampler.abort();
    // 5 listing pages (the last one empty) and, for each of the 40 subjects, its page of 2
    // events (which reaches the head listed: no empty page asked after it).
    assert_eq!(probe.calls(), 45);
    assert_eq!(report.requests, 45);
    assert_eq!((report.listed, report.behind, report.applied), (40, 40, 80));
    let samples = samples.lock().unwrap().clone();
    assert!(samples.len() > 15, "{} samples", samples.len());
    for (at, calls) in &samples {
        let bound = f64::from(BURST) + f64::from(RATE) * at;
        #[allow(clippy::cast_precision_loss)]
        let calls = *calls as f64;
        assert!(
            calls <= bound + 1e-6,
            "{calls} calls after {at} s (at most {bound})"
        );
    }
    // All 45 could not have passed sooner than the pace lets them.
    let least = (45.0 - f64::from(BURST)) / f64::from(RATE);
    assert!(
        took >= least - 1e-6,
        "the walk took {took} s, at least {least} s due"
    );

    // Unpaced (the benchmark's setting), the same walk takes no time on the paused clock.
    let unpaced = walker(&view(&[]), &probe, WalkerOptions::default().unpaced());
    let start = Instant::now();
    let report = unpaced.walk().await.unwrap();
    assert_eq!(report.applied, 80);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn an_interrupted_walk_resumes_after_the_last_page_walked() {
    let probe = Arc::new(Probe::default());
    produce(&probe, 100, 1);
    let view = view(&[]);
    let options = WalkerOptions::default().unpaced().with_page_subjects(10);
    // The producer goes down at the 4th listing page: the first walk gets through 3 pages.
    probe.fail_listing_from.store(4, Ordering::SeqCst);
    let first = walker(&view, &probe, options.clone());
    let error = first.walk().await.unwrap_err();
    assert!(
        matches!(error, ConsumeError::Upstream(UpstreamError::Unavailable(_))),
        "{error}"
    );
    let status = first.status();
    let last = status.last.as_ref().unwrap();
    assert_eq!(last.state, WalkState::Interrupted);
    assert_eq!((last.listed, last.behind, last.applied), (30, 30, 30));
    assert!(last.error.as_deref().unwrap().contains("down"));
    assert_eq!(status.resume_after.as_deref(), Some("acc-029"));
    let mark = view.mark("walk/accounts.v1").await.unwrap();
    assert_eq!(mark.as_deref(), Some("acc-029"));

    // The producer is back; a new walker (the service restarted) resumes after acc-029, and its
    // runner says so before it walks.
    probe.fail_listing_from.store(0, Ordering::SeqCst);
    let listed_before = probe.listings().len();
    let second = walker(&view, &probe, options);
    let runner = tokio::spawn(Arc::clone(&second).run(None, std::future::pending()));
    let before = until(&second, |s| s.runner && s.resume_after.is_some()).await;
    assert_eq!(before.resume_after.as_deref(), Some("acc-029"));
    runner.abort();
    assert!(runner.await.unwrap_err().is_cancelled());
    let report = second.walk().await.unwrap();
    assert_eq!(report.resumed_after.as_deref(), Some("acc-029"));
    assert_eq!((report.listed, report.behind, report.applied), (70, 70, 70));
    assert_eq!(report.state, WalkState::Finished);
    let listings = probe.listings();
    assert_eq!(listings[listed_before].as_deref(), Some("acc-029"));
    assert_eq!(
        listings.len() - listed_before,
        8,
        "7 pages and the empty one"
    );
    assert_eq!(view.read(Clone::clone), complete(100, 1, &[]));
    // A finished walk clears the mark: the next one starts from the first subject.
    assert_eq!(view.mark("walk/accounts.v1").await.unwrap(), None);
    assert_eq!(second.status().resume_after, None);
    let third = second.walk().await.unwrap();
    assert_eq!(
        (third.resumed_after, third.listed, third.behind),
        (None, 100, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_walk_resumes_after_the_last_page_walked() {
    let probe = Arc::new(Probe::default());
    produce(&probe, 100, 1);
    let view = view(&[]);
    // 10 requests per second, one at a time: 3 s is far from enough for 100 subjects.
    let walker = walker(
        &view,
        &probe,
        WalkerOptions::default()
            .with_pace(NonZeroU32::new(10).unwrap(), 1)
            .with_page_subjects(10),
    );
    let cancelled = tokio::time::timeout(Duration::from_secs(3), walker.walk()).await;
    assert!(cancelled.is_err(), "the walk was cut short");
    let status = walker.status();
    assert!(status.running.is_none());
    let last = status.last.unwrap();
    assert_eq!(last.state, WalkState::Cancelled);
    let mark = view.mark("walk/accounts.v1").await.unwrap();
    assert!(mark.is_some(), "at least one page was walked");
    assert_eq!(status.resume_after, mark);
    let walked = view.read(BTreeMap::len);
    assert!(walked < 100, "{walked} subjects caught up in 3 s");

    let report = walker.walk().await.unwrap();
    assert_eq!(report.resumed_after, mark);
    assert!(
        report.listed < 100,
        "{} subjects listed again",
        report.listed
    );
    assert_eq!(view.read(Clone::clone), complete(100, 1, &[]));
}

#[tokio::test(start_paused = true)]
async fn the_lost_last_events_of_many_subjects_are_found() {
    const SUBJECTS: usize = 300;
    let probe = Arc::new(Probe::default());
    let events = produce(&probe, SUBJECTS, 3);
    let view = view(&[]);
    let walker = walker(
        &view,
        &probe,
        WalkerOptions::default().unpaced().with_page_subjects(64),
    );
    let mut registry = prometheus_client::registry::Registry::default();
    walker.register_metrics(&mut registry);
    // Delivered: everything except the last event of every odd subject; every tenth subject
    // was never delivered at all (the consumer does not know it).
    let consumer = walker.consumer();
    for e in &events {
        let i: usize = e.subject.as_str()[4..].parse().unwrap();
        if i.is_multiple_of(10) || (i % 2 == 1 && e.sequence.get() == 3) {
            continue;
        }
        consumer.deliver(e.clone()).await.unwrap();
    }
    // 30 subjects unknown to the consumer (3 events each), 150 that lost their last event.
    let behind = 30 + 150;
    let lost = 30 * 3 + 150;

    let report = walker.walk().await.unwrap();
    assert_eq!(
        (report.listed, report.behind, report.applied, report.failed),
        (SUBJECTS as u64, behind, lost, 0)
    );
    assert_eq!(view.read(Clone::clone), complete(SUBJECTS, 3, &[]));
    assert_eq!(consumer.stats().reconstituted, lost);
    assert_eq!(consumer.stats().reconstitutions, 1);

    let again = walker.walk().await.unwrap();
    assert_eq!(
        (again.listed, again.behind, again.applied),
        (SUBJECTS as u64, 0, 0)
    );
    assert_eq!((again.id, again.trigger), (2, WalkTrigger::Direct));

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        "headwater_consumer_walks_total{feed=\"accounts.v1\",result=\"finished\"} 2",
        "headwater_consumer_walk_subjects_total{feed=\"accounts.v1\"} 600",
        "headwater_consumer_walk_subjects_behind_total{feed=\"accounts.v1\"} 180",
        "headwater_consumer_walk_events_applied_total{feed=\"accounts.v1\"} 240",
        "headwater_consumer_walk_subject_failures_total{feed=\"accounts.v1\"} 0",
        "headwater_consumer_walk_duration_seconds_count{feed=\"accounts.v1\"} 2",
        "headwater_consumer_walk_running{feed=\"accounts.v1\"} 0",
    ] {
        assert!(text.contains(line), "no {line} in\n{text}");
    }
    assert!(
        text.contains("headwater_consumer_walk_last_end_timestamp_seconds{feed=\"accounts.v1\"} 1")
    );
    assert!(text.contains("headwater_consumer_walk_requests_total{feed=\"accounts.v1\"}"));
}

#[tokio::test(start_paused = true)]
async fn a_failing_subject_does_not_stop_the_walk() {
    let probe = Arc::new(Probe::default());
    produce(&probe, 20, 2);
    // acc-005: the view's handler refuses its events; acc-007: the producer answers it with a
    // hole; acc-011: the producer lists it but answers none of its events.
    *probe.garbled.lock().unwrap() = Some("acc-007".into());
    *probe.silent.lock().unwrap() = Some("acc-011".into());
    let view = view(&["acc-005"]);
    let walker = walker(
        &view,
        &probe,
        WalkerOptions::default().unpaced().with_page_subjects(4),
    );
    let report = walker.walk().await.unwrap();
    assert_eq!(report.state, WalkState::Finished);
    assert_eq!(
        (report.listed, report.behind, report.applied, report.failed),
        (20, 20, 34, 3)
    );
    assert_eq!(
        view.read(Clone::clone),
        complete(20, 2, &["acc-005", "acc-007", "acc-011"])
    );
    assert_eq!(view.mark("walk/accounts.v1").await.unwrap(), None);

    // Consumer::reconstitute walks everything too, then reports the first failure.
    let fresh = self::view(&["acc-005"]);
    let consumer = consumer(&fresh, &probe);
    let error = consumer.reconstitute().await.unwrap_err();
    assert!(error.to_string().contains("acc-005"), "{error}");
    assert_eq!(
        fresh.read(Clone::clone),
        complete(20, 2, &["acc-005", "acc-007", "acc-011"])
    );
}

#[tokio::test(start_paused = true)]
async fn the_runner_walks_at_start_and_again_every_period() {
    let probe = Arc::new(Probe::default());
    produce(&probe, 10, 1);
    let view = view(&[]);
    let walker = walker(&view, &probe, WalkerOptions::default());
    let stop = Arc::new(tokio::sync::Notify::new());
    let runner = tokio::spawn({
        let (walker, stop) = (Arc::clone(&walker), Arc::clone(&stop));
        async move {
            walker
                .run(Some(Duration::from_secs(60)), stop.notified())
                .await
        }
    });
    let start = Instant::now();
    let first = until(&walker, |s| s.last.is_some()).await;
    let first = first.last.unwrap();
    assert_eq!(
        (first.id, first.trigger, first.behind),
        (1, WalkTrigger::Periodic, 10)
    );
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "the first walk is at start"
    );

    // A subject's new last event is lost on its way: the next periodic walk finds it.
    probe.inner.push(event(11, "acc-003", 2));
    let second = until(&walker, |s| s.last.as_ref().is_some_and(|l| l.id == 2)).await;
    assert!(
        start.elapsed() >= Duration::from_secs(60),
        "the second walk waited its period"
    );
    let second = second.last.unwrap();
    assert_eq!(
        (second.trigger, second.behind, second.applied),
        (WalkTrigger::Periodic, 1, 1)
    );
    assert_eq!(view.read(|s| s["acc-003"].clone()), vec![1, 2]);
    until(&walker, |s| s.last.as_ref().is_some_and(|l| l.id == 3)).await;
    assert!(start.elapsed() >= Duration::from_secs(120));

    stop.notify_one();
    runner.await.unwrap();
    assert!(!walker.status().runner);
    assert!(walker.request().is_err(), "no runner, no request");
}

#[tokio::test(start_paused = true)]
async fn on_demand_requests_never_run_two_walks_at_once() {
    let probe = Arc::new(Probe::default());
    produce(&probe, 30, 1);
    probe.inner.set_delay(Duration::from_millis(10));
    let view = view(&[]);
    // One request at a time within a walk: more than one in flight would mean two walks.
    let walker = walker(
        &view,
        &probe,
        WalkerOptions::default()
            .with_page_subjects(5)
            .with_fetches_at_once(1),
    );
    assert!(walker.request().is_err(), "no runner, no request");
    let runner = tokio::spawn(Arc::clone(&walker).run(None, std::future::pending()));
    until(&walker, |s| s.runner).await;

    assert_eq!(walker.request(), Ok(1));
    until(&walker, |s| s.running.is_some()).await;
    // Eight requests during walk 1 share walk 2, which starts after it.
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let walker = Arc::clone(&walker);
            tokio::spawn(async move { walker.request() })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap(), Ok(2));
    }
    let done = until(&walker, |s| {
        s.running.is_none() && !s.requested && s.last.as_ref().is_some_and(|l| l.id == 2)
    })
    .await;
    assert_eq!(done.walks, 2);
    assert_eq!(done.last.unwrap().trigger, WalkTrigger::Requested);

    // Direct walks beside the runner and a request: still one at a time.
    let direct: Vec<_> = (0..3)
        .map(|_| {
            let walker = Arc::clone(&walker);
            tokio::spawn(async move { walker.walk().await.map(|r| r.id) })
        })
        .collect();
    walker.request().unwrap();
    let mut ids = BTreeSet::new();
    for walk in direct {
        ids.insert(walk.await.unwrap().unwrap());
    }
    // The request is served by the first walk to start after it: one of the direct ones, or
    // the runner's.
    let done = until(&walker, |s| s.running.is_none() && !s.requested).await;
    assert!(done.walks >= 5, "{} walks", done.walks);
    assert_eq!(ids.len(), 3);
    assert_eq!(probe.max_in_flight.load(Ordering::SeqCst), 1);
    runner.abort();
}

async fn call(
    router: &axum::Router,
    method: &str,
    token: Option<&str>,
) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
    let mut request = Request::builder().method(method).uri("/reconstitute");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = router
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (parts.status, parts.headers, value)
}

#[tokio::test(start_paused = true)]
async fn admin_routes_start_a_walk_and_show_its_progress() {
    let probe = Arc::new(Probe::default());
    produce(&probe, 12, 2);
    let view = view(&[]);
    let walker = walker(&view, &probe, WalkerOptions::default());
    let router = walker_router(walker.clone(), Some("s3cret"));

    for token in [None, Some("wrong")] {
        let (status, headers, body) = call(&router, "GET", token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers["content-type"], "application/problem+json");
        assert!(
            headers["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
        assert_eq!(body["type"], "https://headwater.dev/problems/unauthorized");
        assert_eq!(body["status"], 401);
    }
    let (status, headers, body) = call(&router, "GET", Some("s3cret")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(body["feed"], "accounts.v1");
    assert_eq!(body["runner"], false);
    assert_eq!(body["walks"], 0);
    assert_eq!(body["requests_per_second"], 100);

    // Without the runner, nothing would serve the request: refused, not accepted and lost.
    let (status, _, body) = call(&router, "POST", Some("s3cret")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body["type"],
        "https://headwater.dev/problems/walker-not-running"
    );

    let runner = tokio::spawn(Arc::clone(&walker).run(None, std::future::pending()));
    until(&walker, |s| s.runner).await;
    let (status, _, body) = call(&router, "POST", Some("s3cret")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["walk"], 1);
    assert_eq!(body["status"]["runner"], true);
    until(&walker, |s| s.last.is_some()).await;
    let (status, _, body) = call(&router, "GET", Some("s3cret")).await;
    assert_eq!(status, StatusCode::OK);
    let last = &body["last"];
    assert_eq!(last["id"], 1);
    assert_eq!(last["trigger"], "requested");
    assert_eq!(last["state"], "finished");
    assert_eq!(
        (
            last["listed"].as_u64(),
            last["behind"].as_u64(),
            last["applied"].as_u64()
        ),
        (Some(12), Some(12), Some(24))
    );
    assert!(last["started_at"].as_str().unwrap().ends_with('Z'));
    assert!(last["finished_at"].as_str().is_some());
    assert_eq!(body["running"], serde_json::Value::Null);
    assert_eq!(view.read(Clone::clone), complete(12, 2, &[]));

    let (status, headers, body) = call(&router, "DELETE", Some("s3cret")).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers["allow"], "GET, POST");
    assert_eq!(
        body["type"],
        "https://headwater.dev/problems/method-not-allowed"
    );
    runner.abort();
}

#[tokio::test]
async fn a_walk_resumes_from_the_mark_in_a_reopened_embedded_view() {
    use headwater_consume::EmbeddedView;
    let dir = tempfile::tempdir().unwrap();
    let open = || {
        Arc::new(
            EmbeddedView::open(
                dir.path().join("view.sqlite3"),
                |tx| {
                    tx.execute_batch(
                        "CREATE TABLE IF NOT EXISTS seen (subject TEXT, sequence INTEGER)",
                    )
                },
                |tx, e: &IntegrationEvent| {
                    if e.subject.as_str() == "acc-033" {
                        return Err("this view refuses acc-033".into());
                    }
                    tx.execute(
                        "INSERT INTO seen (subject, sequence) VALUES (?1, ?2)",
                        rusqlite::params![e.subject.as_str(), e.sequence.get() as i64],
                    )?;
                    Ok(())
                },
            )
            .unwrap(),
        )
    };
    let probe = Arc::new(Probe::default());
    produce(&probe, 50, 2);
    probe.fail_listing_from.store(3, Ordering::SeqCst);
    let options = ConsumerOptions::default().with_heal_attempts(1);
    let walker_on = |view: &Arc<EmbeddedView>| {
        Walker::new(
            Arc::new(Consumer::new(
                feed(),
                Arc::clone(view),
                Arc::clone(&probe),
                options.clone(),
            )),
            WalkerOptions::default().unpaced().with_page_subjects(10),
        )
    };
    let view = open();
    walker_on(&view).walk().await.unwrap_err();
    drop(view);

    probe.fail_listing_from.store(0, Ordering::SeqCst);
    let view = open();
    let report = walker_on(&view).walk().await.unwrap();
    assert_eq!(report.resumed_after.as_deref(), Some("acc-019"));
    // acc-033 is refused: its batch is rolled back whole, then applied subject by subject.
    assert_eq!(
        (report.listed, report.behind, report.applied, report.failed),
        (30, 30, 58, 1)
    );
    let rows: i64 = view
        .read(|c| c.query_row("SELECT count(*) FROM seen", [], |row| row.get(0)))
        .await
        .unwrap();
    assert_eq!(rows, 98, "every event once, but acc-033's");
    assert_eq!(view.mark("walk/accounts.v1").await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn subjects_far_behind_are_caught_up_a_page_at_a_time_to_their_listed_head() {
    let probe = Arc::new(Probe::default());
    produce(&probe, 5, 10);
    let view = view(&[]);
    let consumer = Arc::new(Consumer::new(
        feed(),
        Arc::clone(&view),
        Arc::clone(&probe),
        ConsumerOptions::default().with_page_events(3),
    ));
    // acc-002 has its first 4 events already.
    let events: Vec<_> = (1..=4).map(|n| event(100 + n, "acc-002", n)).collect();
    for e in events {
        consumer.deliver(e).await.unwrap();
    }
    let walker = Walker::new(consumer, WalkerOptions::default().unpaced());
    let report = walker.walk().await.unwrap();
    assert_eq!((report.listed, report.behind, report.applied), (5, 5, 46));
    assert_eq!(view.read(Clone::clone), complete(5, 10, &[]));
    // The listing and the empty page after it; 4 pages of 3, 3, 3, 1 for each subject but
    // acc-002 (3, 3), and no page asked beyond a head.
    assert_eq!(report.requests, 2 + 4 * 4 + 2);
    assert_eq!(probe.calls(), report.requests);
}

#[tokio::test(start_paused = true)]
async fn what_was_fetched_is_applied_while_a_slow_fetch_is_under_way() {
    let probe = Arc::new(Probe::default());
    produce(&probe, 10, 1);
    *probe.stalled.lock().unwrap() = Some("acc-005".into());
    let view = view(&[]);
    let walker = walker(&view, &probe, WalkerOptions::default().unpaced());
    let walk = tokio::spawn({
        let walker = Arc::clone(&walker);
        async move { walker.walk().await }
    });
    // The read of acc-005 hangs; the five subjects fetched before it are applied meanwhile.
    let during = until(&walker, |s| {
        s.running.as_ref().is_some_and(|r| r.applied == 5)
    })
    .await;
    assert_eq!(during.running.unwrap().current.as_deref(), Some("acc-004"));
    assert_eq!(view.read(BTreeMap::len), 5);
    probe.release.notify_one();
    let report = walk.await.unwrap().unwrap();
    assert_eq!((report.behind, report.applied), (10, 10));
    assert_eq!(view.read(Clone::clone), complete(10, 1, &[]));
}

#[tokio::test(start_paused = true)]
async fn first_pages_are_fetched_several_at_once() {
    let probe = Arc::new(Probe::default());
    produce(&probe, 20, 1);
    probe.inner.set_delay(Duration::from_millis(10));
    let mut took = Vec::new();
    for at_once in [1, 4] {
        probe.max_in_flight.store(0, Ordering::SeqCst);
        let view = view(&[]);
        let walker = walker(
            &view,
            &probe,
            WalkerOptions::default()
                .unpaced()
                .with_fetches_at_once(at_once),
        );
        let start = Instant::now();
        let report = walker.walk().await.unwrap();
        took.push(start.elapsed());
        assert_eq!(report.applied, 20);
        assert_eq!(view.read(Clone::clone), complete(20, 1, &[]));
        assert_eq!(probe.max_in_flight.load(Ordering::SeqCst), at_once as u64);
    }
    // Two listing calls and 20 reads of 10 ms: one at a time 220 ms; four at once 70 ms.
    assert_eq!(
        took,
        [Duration::from_millis(220), Duration::from_millis(70)]
    );
}
