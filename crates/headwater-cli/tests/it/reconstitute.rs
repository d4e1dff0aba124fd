//! `headwater reconstitute URL` against a real consumer service: a walker's routes served by axum
//! on loopback, in the test's process, over a producer in memory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use headwater_consume::{
    Consumer, ConsumerOptions, IntegrationEvent, MemoryUpstream, MemoryView, Walker, WalkerOptions,
    WalkerStatus, walker_router,
};
use headwater_core::FeedId;

use super::{headwater, text};

type State = BTreeMap<String, u64>;
type TestWalker = Walker<MemoryView<State>, MemoryUpstream>;

/// A consumer service: its walker, and the runtime serving its routes.
struct Service {
    runtime: tokio::runtime::Runtime,
    walker: Arc<TestWalker>,
    url: String,
}

fn event(position: u64, subject: &str, sequence: u64) -> IntegrationEvent {
    let json = format!(
        r#"{{"specversion":"1.0","id":"{}","source":"accounts","type":"accounts.deposited",
        "subject":"{subject}","time":"2026-11-27T18:00:00.000000Z","datacontenttype":"application/json",
        "data":{{"amount":1}},"sequence":{sequence},"position":{position},"feed":"accounts.v1"}}"#,
        uuid::Uuid::new_v4()
    );
    IntegrationEvent::from_cloud_event(json.as_bytes()).unwrap()
}

/// A producer with `subjects` subjects of 2 events each, a consumer that has none of them, its
/// walker (unpaced) and its routes on a loopback port; with `runner`, the walker's runner runs
/// (on demand only).
fn service(subjects: usize, token: Option<&str>, runner: bool) -> Service {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let upstream = Arc::new(MemoryUpstream::new());
    let mut position = 0;
    for sequence in 1..=2 {
        for s in 0..subjects {
            position += 1;
            upstream.push(event(position, &format!("acc-{s:04}"), sequence));
        }
    }
    let view = Arc::new(MemoryView::new(
        State::new(),
        |state: &mut State, e: &IntegrationEvent| {
            *state.entry(e.subject.to_string()).or_default() = e.sequence.get();
            Ok(())
        },
    ));
    let consumer = Arc::new(Consumer::new(
        FeedId::parse("accounts.v1").unwrap(),
        view,
        upstream,
        ConsumerOptions::default(),
    ));
    let walker = Arc::new(Walker::new(
        consumer,
        WalkerOptions::default().unpaced().with_page_subjects(100),
    ));
    let router = walker_router(walker.clone(), token);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    runtime.spawn(async move { axum::serve(listener, router).await });
    if runner {
        runtime.spawn(walker.clone().run(None, std::future::pending()));
        runtime.block_on(until(&walker, |s| s.runner));
    }
    Service {
        runtime,
        walker,
        url,
    }
}

async fn until(walker: &TestWalker, done: impl Fn(&WalkerStatus) -> bool) {
    let mut watch = walker.watch();
    tokio::time::timeout(Duration::from_secs(60), watch.wait_for(|s| done(s)))
        .await
        .expect("the walker got there within a minute")
        .unwrap();
}

impl Service {
    fn caught_up(&self) -> usize {
        self.walker
            .consumer()
            .view()
            .read(|state| state.values().filter(|s| **s == 2).count())
    }
}

#[test]
fn help_names_every_flag() {
    let out = headwater(&["--help"]);
    assert!(text(&out.stdout).contains("reconstitute"));
    let out = headwater(&["reconstitute", "--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for flag in [
        "<URL>",
        "--token",
        "HEADWATER_ADMIN_TOKEN",
        "--no-wait",
        "--json",
        "Exits 0",
    ] {
        assert!(help.contains(flag), "no {flag} in\n{help}");
    }
    let out = headwater(&["reconstitute"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn reconstitute_walks_a_running_consumer_and_follows_it_to_the_end() {
    let service = service(500, Some("s3cret"), true);
    assert_eq!(service.caught_up(), 0);
    let out = headwater(&["reconstitute", &service.url, "--token", "s3cret"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.starts_with("accounts.v1: walk #1 finished in "),
        "{stdout}"
    );
    assert!(
        stdout.contains("500 subjects listed, 500 behind, 1,000 events applied, 0 failed"),
        "{stdout}"
    );
    assert_eq!(service.caught_up(), 500);

    // --json: the service's record of the walk; nothing behind any more.
    let out = headwater(&["reconstitute", &service.url, "--token", "s3cret", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let walk: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(walk["id"], 2);
    assert_eq!(walk["state"], "finished");
    assert_eq!(walk["trigger"], "requested");
    assert_eq!(
        (walk["listed"].as_u64(), walk["behind"].as_u64()),
        (Some(500), Some(0))
    );

    // --no-wait returns at once; the walk happens anyway. The token may come from the
    // environment.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_headwater"))
        .args(["reconstitute", &service.url, "--no-wait"])
        .env("HEADWATER_ADMIN_TOKEN", "s3cret")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("walk #3 requested"),
        "{}",
        text(&out.stdout)
    );
    service.runtime.block_on(until(&service.walker, |s| {
        s.last.as_ref().is_some_and(|l| l.id == 3)
    }));
}

#[test]
fn reconstitute_says_clearly_what_went_wrong() {
    let service = service(3, Some("s3cret"), true);
    for token in [None, Some("wrong")] {
        let mut args = vec!["reconstitute", service.url.as_str()];
        if let Some(token) = token {
            args.extend(["--token", token]);
        }
        let out = headwater(&args);
        assert_eq!(out.status.code(), Some(1));
        let stderr = text(&out.stderr);
        assert!(stderr.contains("401"), "{stderr}");
        assert!(stderr.contains("--token"), "{stderr}");
        assert!(
            !stderr.contains("wrong"),
            "the token is not echoed: {stderr}"
        );
    }
    assert_eq!(service.walker.status().walks, 0);

    // A service whose walker's runner does not run refuses on-demand walks.
    let idle = self::service(3, None, false);
    let out = headwater(&["reconstitute", &idle.url]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("503") && stderr.contains("No walker runs"),
        "{stderr}"
    );

    // Nothing listens there.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let out = headwater(&["reconstitute", &closed]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot reach the consumer service at {closed}")),
        "{stderr}"
    );

    // Not an http URL.
    let out = headwater(&["reconstitute", "localhost:8080"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not an http:// URL"));
}
