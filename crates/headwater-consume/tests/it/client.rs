//! `FeedClient` against a real feed API on a loopback port, and against fake servers that answer
//! what no feed API would.

use std::sync::Arc;
use std::time::{Duration, Instant};

use headwater_api::{ApiConfig, FeedApi, FeedScope, Tokens};
use headwater_consume::{FeedClient, SubjectHead, Upstream, UpstreamError};
use headwater_core::{
    EventId, EventType, FeedId, FeedStatus, Position, Sequence, Subject, Timestamp,
};
use headwater_store::{FeedStore, MemoryFeedStore, ProjectedEvent, ProjectorBatch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "consumer-token-0123456789abcdef";
const LOANS_TOKEN: &str = "loans-only-token-fedcba9876543210";
/// Far more than anything here should take on loopback.
const PROMPT: Duration = Duration::from_secs(10);

fn feed(text: &str) -> FeedId {
    FeedId::parse(text).unwrap()
}

fn subject(text: &str) -> Subject {
    Subject::new(text).unwrap()
}

/// A feed API serving `store` on a loopback port until dropped.
struct Server {
    url: String,
    address: std::net::SocketAddr,
    store: MemoryFeedStore,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn serve(store: MemoryFeedStore) -> Server {
    let mut tokens = Tokens::one_for_all("consumer", TOKEN).unwrap();
    tokens
        .add(
            "loans",
            LOANS_TOKEN,
            vec![FeedScope::parse("loans").unwrap()],
        )
        .unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let api = FeedApi::new(
        Arc::new(store.clone()),
        ApiConfig::new("accounts", tokens).unwrap(),
        &mut registry,
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        api.serve(listener, Arc::new(registry), async {
            let _ = stopped.await;
        })
        .await
    });
    Server {
        url: format!("http://{address}"),
        address,
        store,
        _stop: stop,
    }
}

/// Appends feed positions `from + 1 ..= from + count` to `feed` in one commit; the event at
/// position `p` has the subject `subject(p)` and the data `{"amount":p}`.
async fn append(
    store: &MemoryFeedStore,
    feed: &FeedId,
    from: u64,
    count: u64,
    subject: impl Fn(u64) -> String,
) {
    store.register(feed).await.unwrap();
    let events = (from + 1..=from + count)
        .map(|p| ProjectedEvent {
            id: EventId::new_random(),
            event_type: EventType::new("accounts.deposited").unwrap(),
            subject: Subject::new(subject(p)).unwrap(),
            time: Timestamp::from_unix_micros(1_798_380_419_000_000 + p),
            data: format!(r#"{{"amount":{p}}}"#).into_bytes(),
            source_position: Position(p),
        })
        .collect();
    let batch = ProjectorBatch {
        from: Position(from),
        to: Position(from + count),
        events,
    };
    store.commit(feed, batch).await.unwrap();
}

fn in_three(p: u64) -> String {
    format!("s{}", p % 3)
}

/// A server with `accounts.v1` (retired), `accounts.v2` (live, 30 events over `s0`..`s2`) and
/// `loans.v1` (live, empty).
async fn producer() -> Server {
    let store = MemoryFeedStore::new();
    append(&store, &feed("accounts.v1"), 0, 5, in_three).await;
    store
        .set_status(&feed("accounts.v1"), FeedStatus::Retired)
        .await
        .unwrap();
    append(&store, &feed("accounts.v2"), 0, 30, in_three).await;
    store
        .set_status(&feed("accounts.v2"), FeedStatus::Live)
        .await
        .unwrap();
    store.register(&feed("loans.v1")).await.unwrap();
    store
        .set_status(&feed("loans.v1"), FeedStatus::Live)
        .await
        .unwrap();
    serve(store).await
}

fn client(server: &Server) -> FeedClient {
    FeedClient::new(&server.url, Some(TOKEN.to_owned())).unwrap()
}

fn refused(result: Result<impl std::fmt::Debug, UpstreamError>) -> String {
    match result {
        Err(UpstreamError::Refused(refusal)) => refusal.message,
        other => panic!("not refused: {other:?}"),
    }
}

fn unavailable(result: Result<impl std::fmt::Debug, UpstreamError>) -> String {
    match result {
        Err(UpstreamError::Unavailable(text)) => text,
        other => panic!("not unavailable: {other:?}"),
    }
}

fn malformed(result: Result<impl std::fmt::Debug, UpstreamError>) -> String {
    match result {
        Err(UpstreamError::Malformed(text)) => text,
        other => panic!("not malformed: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_is_read_page_by_page_after_a_sequence() {
    let server = producer().await;
    let client = client(&server);
    let v2 = feed("accounts.v2");
    let s1 = subject("s1");
    // s1 holds the positions 1, 4, 7, … 28: ten events.
    let mut read = Vec::new();
    let mut after = Sequence(0);
    loop {
        let page = client.read_subject(&v2, &s1, after, 3).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3, "{} events", page.len());
        after = page.last().unwrap().sequence;
        read.extend(page);
        assert!(read.len() <= 10, "read past the subject's end");
    }
    let sequences: Vec<u64> = read.iter().map(|e| e.sequence.get()).collect();
    assert_eq!(sequences, (1..=10).collect::<Vec<_>>());
    let positions: Vec<u64> = read.iter().map(|e| e.position).collect();
    assert_eq!(positions, (0..10).map(|i| 1 + 3 * i).collect::<Vec<_>>());
    for event in &read {
        assert_eq!(event.subject, s1);
        assert_eq!(event.feed, v2);
        assert_eq!(event.source, "accounts");
        assert_eq!(event.event_type, "accounts.deposited");
        assert_eq!(event.data, format!(r#"{{"amount":{}}}"#, event.position));
    }

    let tail = client
        .read_subject(&v2, &s1, Sequence(8), 100)
        .await
        .unwrap();
    let sequences: Vec<u64> = tail.iter().map(|e| e.sequence.get()).collect();
    assert_eq!(sequences, [9, 10]);
    let unknown = client
        .read_subject(&v2, &subject("nobody"), Sequence(0), 100)
        .await
        .unwrap();
    assert!(unknown.is_empty(), "{unknown:?}");
    assert!(
        client
            .read_subject(&v2, &s1, Sequence(0), 0)
            .await
            .unwrap()
            .is_empty()
    );
    // A limit above the API's bound is lowered to it, not refused.
    assert_eq!(
        client
            .read_subject(&v2, &s1, Sequence(0), u64::MAX)
            .await
            .unwrap()
            .len(),
        10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_made_of_dots_and_tildes_reach_the_right_subject() {
    let store = MemoryFeedStore::new();
    let names = [".", "..", "~", "a.b", "..."];
    let v1 = feed("odd.v1");
    append(&store, &v1, 0, 10, |p| names[(p % 5) as usize].to_owned()).await;
    let server = serve(store).await;
    let client = client(&server);
    for (i, name) in names.iter().enumerate() {
        let events = client
            .read_subject(&v1, &subject(name), Sequence(0), 100)
            .await
            .unwrap();
        let positions: Vec<u64> = events.iter().map(|e| e.position).collect();
        let expected: Vec<u64> = (1..=10).filter(|p| p % 5 == i as u64).collect();
        assert_eq!(positions, expected, "subject {name:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subject_listing_is_read_page_by_page() {
    let store = MemoryFeedStore::new();
    let v1 = feed("many.v1");
    append(&store, &v1, 0, 50, |p| format!("k{:02}", p % 7)).await;
    let server = serve(store).await;
    let client = client(&server);
    let mut heads: Vec<SubjectHead> = Vec::new();
    loop {
        let after = heads.last().map(|h| h.subject.clone());
        let page = client.subjects(&v1, after.as_ref(), 3).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3, "{} subjects", page.len());
        heads.extend(page);
        assert!(heads.len() <= 7, "listed past the end");
    }
    let listed: Vec<(String, u64)> = heads
        .iter()
        .map(|h| (h.subject.as_str().to_owned(), h.sequence.get()))
        .collect();
    // k00 has the positions 7, 14, … 49 (7 events); k01..k06 have 8, 7, 7, 7, 7, 7.
    let expected: Vec<(String, u64)> = (0..7)
        .map(|k| {
            let count = (1..=50u64).filter(|p| p % 7 == k).count() as u64;
            (format!("k{k:02}"), count)
        })
        .collect();
    assert_eq!(listed, expected);
    let after_k04 = client
        .subjects(&v1, Some(&subject("k04")), 100)
        .await
        .unwrap();
    let names: Vec<&str> = after_k04.iter().map(|h| h.subject.as_str()).collect();
    assert_eq!(names, ["k05", "k06"]);
    assert!(client.subjects(&v1, None, 0).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_is_read_after_a_position_and_a_long_poll_wakes_on_an_append() {
    let server = producer().await;
    // A request timeout shorter than the waits: a long poll may take its wait on top of it.
    let client = client(&server).with_timeout(Duration::from_millis(500));
    let v2 = feed("accounts.v2");

    let page = client
        .read_feed(&v2, 10, 5, Duration::from_secs(20))
        .await
        .unwrap();
    let positions: Vec<u64> = page.iter().map(|e| e.position).collect();
    assert_eq!(
        positions,
        [11, 12, 13, 14, 15],
        "events already there come at once"
    );

    // Nothing after the head: the wait ends empty (longer than the request timeout).
    let started = Instant::now();
    let empty = client
        .read_feed(&v2, 30, 100, Duration::from_millis(800))
        .await
        .unwrap();
    assert!(empty.is_empty(), "{empty:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "it did not wait: {:?}",
        started.elapsed()
    );

    // A long poll at the head, woken by an append.
    let waiting = {
        let client = client.clone();
        let v2 = v2.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let page = client
                .read_feed(&v2, 30, 100, Duration::from_secs(25))
                .await;
            (page, started.elapsed())
        })
    };
    wait_for_a_waiting_long_poll(server.address).await;
    append(&server.store, &v2, 30, 2, in_three).await;
    let (page, took) = tokio::time::timeout(PROMPT, waiting)
        .await
        .expect("the long poll did not wake")
        .unwrap();
    let positions: Vec<u64> = page.unwrap().iter().map(|e| e.position).collect();
    assert_eq!(positions, [31, 32]);
    assert!(
        took < PROMPT,
        "woken by its timeout, not the append: {took:?}"
    );
}

/// The API's metrics text, read over a connection of its own.
async fn metrics(address: std::net::SocketAddr) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let request = format!(
        "GET /metrics HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {TOKEN}\r\n\
         connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// Polls the API's metrics until one long poll waits (so the append comes during the wait).
async fn wait_for_a_waiting_long_poll(address: std::net::SocketAddr) {
    let deadline = Instant::now() + PROMPT;
    loop {
        if metrics(address)
            .await
            .contains("headwater_api_long_polls_waiting 1")
        {
            return;
        }
        assert!(Instant::now() < deadline, "the long poll never waited");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retired_unknown_and_forbidden_feeds_and_bad_tokens_are_refused() {
    let server = producer().await;
    let client = client(&server);
    let s0 = subject("s0");
    for (feed_text, problem) in [
        ("accounts.v1", "problems/feed-retired"),
        ("nothing.v1", "problems/unknown-feed"),
    ] {
        let f = feed(feed_text);
        for text in [
            refused(client.read_subject(&f, &s0, Sequence(0), 10).await),
            refused(client.subjects(&f, None, 10).await),
            refused(client.read_feed(&f, 0, 10, Duration::ZERO).await),
        ] {
            assert!(text.contains(problem), "{feed_text}: {text}");
        }
    }
    let retired = refused(
        client
            .read_feed(&feed("accounts.v1"), 0, 10, Duration::ZERO)
            .await,
    );
    assert!(retired.contains("410"), "{retired}");
    assert!(retired.contains("successor: accounts.v2"), "{retired}");

    let loans_only = FeedClient::new(&server.url, Some(LOANS_TOKEN.to_owned())).unwrap();
    let text = refused(loans_only.subjects(&feed("accounts.v2"), None, 10).await);
    assert!(text.contains("problems/forbidden"), "{text}");
    assert!(!text.contains(LOANS_TOKEN), "{text}");
    assert!(
        loans_only
            .subjects(&feed("loans.v1"), None, 10)
            .await
            .unwrap()
            .is_empty()
    );

    let wrong_token = "wrong-token-that-must-stay-secret";
    let wrong = FeedClient::new(&server.url, Some(wrong_token.to_owned())).unwrap();
    for text in [
        refused(
            wrong
                .read_subject(&feed("accounts.v2"), &s0, Sequence(0), 10)
                .await,
        ),
        refused(wrong.subjects(&feed("accounts.v2"), None, 10).await),
        refused(
            wrong
                .read_feed(&feed("accounts.v2"), 0, 10, Duration::ZERO)
                .await,
        ),
    ] {
        assert!(text.contains("401"), "{text}");
        assert!(text.contains("problems/unauthorized"), "{text}");
        assert!(!text.contains(wrong_token), "{text}");
    }
    assert!(!format!("{wrong:?}").contains(wrong_token));

    let anonymous = FeedClient::new(&server.url, None).unwrap();
    let text = refused(anonymous.subjects(&feed("accounts.v2"), None, 10).await);
    assert!(text.contains("problems/unauthorized"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_is_not_there_is_unavailable() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let client = FeedClient::new(&format!("http://{address}"), Some(TOKEN.to_owned())).unwrap();
    let text = unavailable(client.subjects(&feed("accounts.v2"), None, 10).await);
    assert!(!text.contains(TOKEN), "{text}");
    let error = client
        .read_feed(&feed("accounts.v2"), 0, 10, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(error.is_transient(), "{error}");
}

/// What a fake server does with each connection.
#[derive(Clone)]
enum Fake {
    /// Reads the request, writes these bytes, closes.
    Answer(Vec<u8>),
    /// Reads the request, answers 200 with a chunked body that never ends.
    Endless,
    /// Reads the request and never answers.
    Silent,
    /// Answers the first request of a connection with these bytes and keeps it open; closes it
    /// without an answer when the next request comes (a server closing an idle connection just
    /// as the client reuses it).
    KeepAliveOnce(Vec<u8>),
}

/// A fake server on a loopback port; returns its URL.
async fn fake(behaviour: Fake) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let behaviour = behaviour.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                match behaviour {
                    Fake::Answer(bytes) => {
                        let _ = stream.write_all(&bytes).await;
                        let _ = stream.shutdown().await;
                    }
                    Fake::Endless => {
                        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                    transfer-encoding: chunked\r\n\r\n";
                        if stream.write_all(head.as_bytes()).await.is_err() {
                            return;
                        }
                        let chunk = format!("10000\r\n{}\r\n", "[".repeat(0x10000));
                        while stream.write_all(chunk.as_bytes()).await.is_ok() {}
                    }
                    Fake::Silent => {
                        let _ = stream.read(&mut buffer).await;
                    }
                    Fake::KeepAliveOnce(bytes) => {
                        if stream.write_all(&bytes).await.is_err() {
                            return;
                        }
                        // The next request: read it, then close without an answer.
                        let _ = stream.read(&mut buffer).await;
                    }
                }
            });
        }
    });
    format!("http://{address}")
}

/// An answer after which the fake closes the connection (and says so: no client reuses it).
fn http(status: &str, headers: &str, body: &str) -> Fake {
    Fake::Answer(
        format!(
            "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: {}\r\n{headers}\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

/// One CloudEvent of `accounts.v2` as the feed API writes it.
fn cloud_event(subject: &str, sequence: u64, position: u64) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{}","source":"accounts","type":"accounts.deposited","subject":"{subject}","time":"2026-11-27T14:06:59.123456Z","datacontenttype":"application/json","data":{{"amount":1}},"sequence":{sequence},"position":{position},"feed":"accounts.v2"}}"#,
        uuid::Uuid::new_v4()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_servers_give_errors_and_never_a_panic() {
    let v2 = feed("accounts.v2");
    let s1 = subject("s1");
    let client_of = |url: &str| {
        FeedClient::new(url, Some(TOKEN.to_owned()))
            .unwrap()
            .with_timeout(Duration::from_millis(1500))
    };

    let garbage = client_of(&fake(Fake::Answer(b"hello, this is not HTTP\r\n\r\n".to_vec())).await);
    malformed(garbage.read_subject(&v2, &s1, Sequence(0), 10).await);

    let failing = client_of(&fake(http("500 Internal Server Error", "", "")).await);
    unavailable(failing.read_subject(&v2, &s1, Sequence(0), 10).await);
    let busy = client_of(&fake(http("503 Service Unavailable", "", "{}")).await);
    unavailable(busy.subjects(&v2, None, 10).await);

    let not_json = client_of(&fake(http("200 OK", "", "<html>hello</html>")).await);
    malformed(not_json.read_subject(&v2, &s1, Sequence(0), 10).await);
    malformed(not_json.subjects(&v2, None, 10).await);
    malformed(not_json.read_feed(&v2, 0, 10, Duration::ZERO).await);

    let announced_huge = client_of(
        &fake(Fake::Answer(
            b"HTTP/1.1 200 OK\r\ncontent-length: 104857600\r\n\r\n[".to_vec(),
        ))
        .await,
    );
    let text = malformed(announced_huge.read_feed(&v2, 0, 10, Duration::ZERO).await);
    assert!(text.contains("104857600"), "{text}");

    let endless = client_of(&fake(Fake::Endless).await).with_response_bytes_max(1024 * 1024);
    let started = Instant::now();
    malformed(endless.read_feed(&v2, 0, 10, Duration::ZERO).await);
    assert!(started.elapsed() < PROMPT, "{:?}", started.elapsed());

    let silent = client_of(&fake(Fake::Silent).await).with_timeout(Duration::from_millis(300));
    let text = unavailable(silent.read_subject(&v2, &s1, Sequence(0), 10).await);
    assert!(text.contains("within"), "{text}");

    let closing = client_of(&fake(Fake::Answer(Vec::new())).await);
    unavailable(closing.subjects(&v2, None, 10).await);

    // A problem that quotes the token back: the error does not.
    let echo = format!(
        r#"{{"type":"https://headwater.dev/problems/unauthorized","title":"Unauthorized","detail":"you sent {TOKEN}"}}"#
    );
    let echoing = client_of(&fake(http("401 Unauthorized", "", &echo)).await);
    let text = refused(echoing.subjects(&v2, None, 10).await);
    assert!(!text.contains(TOKEN), "{text}");
    assert!(text.contains("you sent <token>"), "{text}");

    // A kept-alive connection closed as it is reused: asked again on a new one, no error.
    let reused = client_of(
        &fake(Fake::KeepAliveOnce(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]".to_vec(),
        ))
        .await,
    );
    for _ in 0..3 {
        assert!(reused.subjects(&v2, None, 10).await.unwrap().is_empty());
    }

    let redirect = client_of(&fake(http("302 Found", "location: http://elsewhere/\r\n", "")).await);
    malformed(redirect.subjects(&v2, None, 10).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_that_are_not_what_was_asked_are_malformed() {
    let v2 = feed("accounts.v2");
    let s1 = subject("s1");
    let answering = |body: String| async move {
        let url = fake(http(
            "200 OK",
            "content-type: application/cloudevents-batch+json\r\n",
            &body,
        ))
        .await;
        FeedClient::new(&url, Some(TOKEN.to_owned())).unwrap()
    };
    let page = |events: &[String]| format!("[{}]", events.join(","));

    // Right: s1's sequences 3, 4 after 2.
    let right = answering(page(&[cloud_event("s1", 3, 7), cloud_event("s1", 4, 9)])).await;
    assert_eq!(
        right
            .read_subject(&v2, &s1, Sequence(2), 10)
            .await
            .unwrap()
            .len(),
        2
    );
    // Another subject, a gap, a repeat, a sequence not after the cursor, another feed, too many.
    for (events, after, limit) in [
        (vec![cloud_event("s2", 3, 7)], 2, 10),
        (
            vec![cloud_event("s1", 3, 7), cloud_event("s1", 5, 9)],
            2,
            10,
        ),
        (
            vec![cloud_event("s1", 3, 7), cloud_event("s1", 3, 7)],
            2,
            10,
        ),
        (vec![cloud_event("s1", 2, 7)], 2, 10),
        (
            vec![cloud_event("s1", 3, 7).replace("accounts.v2", "accounts.v3")],
            2,
            10,
        ),
        (vec![cloud_event("s1", 3, 7), cloud_event("s1", 4, 9)], 2, 1),
    ] {
        let client = answering(page(&events)).await;
        malformed(client.read_subject(&v2, &s1, Sequence(after), limit).await);
    }

    // Feed pages: positions must increase after the cursor.
    let right = answering(page(&[cloud_event("s1", 3, 7), cloud_event("s2", 1, 9)])).await;
    assert_eq!(
        right
            .read_feed(&v2, 6, 10, Duration::ZERO)
            .await
            .unwrap()
            .len(),
        2
    );
    for (events, after) in [
        (vec![cloud_event("s1", 3, 7), cloud_event("s2", 1, 7)], 6),
        (vec![cloud_event("s1", 3, 7)], 7),
    ] {
        let client = answering(page(&events)).await;
        malformed(client.read_feed(&v2, after, 10, Duration::ZERO).await);
    }

    // Listings: subjects valid, increasing, after the cursor, with a head of at least 1.
    let right =
        answering(r#"[{"subject":"a","sequence":2},{"subject":"b","sequence":1}]"#.into()).await;
    assert_eq!(right.subjects(&v2, None, 10).await.unwrap().len(), 2);
    for body in [
        r#"[{"subject":"b","sequence":2},{"subject":"a","sequence":1}]"#,
        r#"[{"subject":"a","sequence":2},{"subject":"a","sequence":3}]"#,
        r#"[{"subject":"a b","sequence":2}]"#,
        r#"[{"subject":"a","sequence":0}]"#,
        r#"[{"subject":"a","sequence":-1}]"#,
        r#"{"subject":"a","sequence":1}"#,
    ] {
        let client = answering(body.into()).await;
        malformed(client.subjects(&v2, None, 10).await);
    }
    let client = answering(r#"[{"subject":"a","sequence":2}]"#.into()).await;
    malformed(client.subjects(&v2, Some(&subject("a")), 10).await);
}

#[test]
fn the_client_bounds_are_the_apis() {
    assert_eq!(
        headwater_consume::LONG_POLL_WAIT_MAX,
        Duration::from_millis(headwater_api::LONG_POLL_TIMEOUT_MS_MAX)
    );
    assert_eq!(
        headwater_consume::TOKEN_BYTES_MAX,
        headwater_api::TOKEN_BYTES_MAX
    );
}

/// A fake server that answers `[]` to each request and hands over each request's head.
async fn recording() -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (heads, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let heads = heads.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                loop {
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buffer[..n]),
                        }
                    }
                    let end = request.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let head: Vec<u8> = request.drain(..end).collect();
                    let _ = heads.send(String::from_utf8_lossy(&head).into_owned());
                    let answer = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]";
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{address}"), received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_what_the_contract_says() {
    let (url, mut heads) = recording().await;
    let client = FeedClient::new(&format!("{url}/producer/"), Some(TOKEN.to_owned())).unwrap();
    let v2 = feed("accounts.v2");
    let mut next = async || {
        tokio::time::timeout(PROMPT, heads.recv())
            .await
            .unwrap()
            .unwrap()
    };

    client
        .read_subject(&v2, &subject(".."), Sequence(7), 50)
        .await
        .unwrap();
    let head = next().await;
    assert!(
        head.starts_with(
            "GET /producer/feeds/accounts/v2/subjects/%2E%2E?after=7&limit=50 HTTP/1.1\r\n"
        ),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("\r\nauthorization: bearer {TOKEN}\r\n").to_ascii_lowercase()),
        "{head}"
    );

    client
        .subjects(&v2, Some(&subject("s~1")), 20_000)
        .await
        .unwrap();
    let head = next().await;
    assert!(
        head.starts_with("GET /producer/feeds/accounts/v2/subjects?limit=10000&after=s~1 HTTP/1.1"),
        "{head}"
    );
    client.subjects(&v2, None, 5).await.unwrap();
    let head = next().await;
    assert!(
        head.starts_with("GET /producer/feeds/accounts/v2/subjects?limit=5 HTTP/1.1"),
        "{head}"
    );

    client
        .read_feed(&v2, 12, 100, Duration::from_secs(3600))
        .await
        .unwrap();
    let head = next().await;
    assert!(
        head.starts_with(
            "GET /producer/feeds/accounts/v2?after=12&limit=100&timeout_ms=30000 HTTP/1.1"
        ),
        "{head}"
    );

    let anonymous = FeedClient::new(&url, None).unwrap();
    anonymous.subjects(&v2, None, 5).await.unwrap();
    let head = next().await;
    assert!(
        !head.to_ascii_lowercase().contains("authorization"),
        "{head}"
    );
}

type Applied = std::collections::BTreeMap<String, Vec<u64>>;

/// A view of which sequences of each subject were applied; its handler refuses any event that
/// is not its subject's next.
fn sequence_view() -> Arc<headwater_consume::MemoryView<Applied>> {
    Arc::new(headwater_consume::MemoryView::new(
        Applied::new(),
        |state: &mut Applied, e: &headwater_consume::IntegrationEvent| {
            let applied = state.entry(e.subject.to_string()).or_default();
            if e.sequence.get() != applied.len() as u64 + 1 {
                return Err(format!("{} #{} out of order", e.subject, e.sequence).into());
            }
            applied.push(e.sequence.get());
            Ok(())
        },
    ))
}

/// What a view holds once it applied positions `1 ..= count` of a feed with subjects `in_three`.
fn applied_in_three(count: u64) -> Applied {
    let mut state = Applied::new();
    for p in 1..=count {
        let applied = state.entry(in_three(p)).or_default();
        applied.push(applied.len() as u64 + 1);
    }
    state
}

/// The consumer's rules over HTTP: it follows the feed (long-polled, woken by appends), heals a
/// gap, bootstraps a subject (concurrent callers, one fetch) and reconstitutes, all through
/// `FeedClient` from a real feed API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_works_through_the_client_against_a_real_feed_api() {
    use headwater_consume::{Consumer, ConsumerOptions, Delivery};
    let server = producer().await;
    let upstream = Arc::new(client(&server));
    let v2 = feed("accounts.v2");
    let options = ConsumerOptions::default()
        .with_backoff(Duration::from_millis(5), Duration::from_millis(50))
        .with_page_events(4);

    // Following the feed, also what is appended while it waits.
    let view = sequence_view();
    let consumer = Arc::new(Consumer::new(
        v2.clone(),
        Arc::clone(&view),
        Arc::clone(&upstream),
        options.clone(),
    ));
    let stop = Arc::new(tokio::sync::Notify::new());
    let follower = {
        let consumer = Arc::clone(&consumer);
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            consumer
                .follow_feed(Duration::from_secs(20), stop.notified())
                .await
        })
    };
    let deadline = Instant::now() + PROMPT;
    while view.read(Clone::clone) != applied_in_three(30) {
        assert!(Instant::now() < deadline, "the feed was not followed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    append(&server.store, &v2, 30, 6, in_three).await;
    while view.read(Clone::clone) != applied_in_three(36) {
        assert!(
            Instant::now() < deadline,
            "the appended events were not followed"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop.notify_one();
    follower.await.unwrap().unwrap();
    assert_eq!(consumer.stats().applied, 36);

    // A gap: the 5th event of s2 delivered to a consumer that has nothing heals 1..=4 first.
    let view = sequence_view();
    let healing = Consumer::new(
        v2.clone(),
        Arc::clone(&view),
        Arc::clone(&upstream),
        options.clone(),
    );
    let fifth = upstream
        .read_subject(&v2, &subject("s2"), Sequence(4), 1)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(
        healing.deliver(fifth.clone()).await.unwrap(),
        Delivery::Applied { healed: 4 }
    );
    assert_eq!(healing.deliver(fifth).await.unwrap(), Delivery::Duplicate);
    assert_eq!(view.read(|s| s["s2"].clone()), [1, 2, 3, 4, 5]);

    // Bootstrap on demand: eight callers, one fetch.
    let view = sequence_view();
    let bootstrapping = Arc::new(Consumer::new(
        v2.clone(),
        Arc::clone(&view),
        Arc::clone(&upstream),
        options.clone(),
    ));
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let consumer = Arc::clone(&bootstrapping);
            tokio::spawn(async move { consumer.ensure(&subject("s0")).await })
        })
        .collect();
    for caller in callers {
        assert_eq!(caller.await.unwrap().unwrap(), Sequence(12));
    }
    assert_eq!(bootstrapping.stats().applied, 12);
    assert_eq!(view.read(|s| s["s0"].len()), 12);

    // Reconstitution walks every subject of the listing.
    let report = bootstrapping.reconstitute().await.unwrap();
    assert_eq!((report.subjects, report.behind, report.applied), (3, 2, 24));
    assert_eq!(view.read(Clone::clone), applied_in_three(36));
}

/// A long poll given up by the client (its future dropped) ends at the server too: the waiting
/// read is not left behind until its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_long_poll_stops_waiting_at_the_server() {
    let server = producer().await;
    let client = client(&server);
    let v2 = feed("accounts.v2");
    let waiting = {
        let client = client.clone();
        let v2 = v2.clone();
        tokio::spawn(async move {
            client
                .read_feed(&v2, 30, 100, Duration::from_secs(30))
                .await
        })
    };
    wait_for_a_waiting_long_poll(server.address).await;
    waiting.abort();
    let _ = waiting.await;
    let deadline = Instant::now() + PROMPT;
    loop {
        if metrics(server.address)
            .await
            .contains("headwater_api_long_polls_waiting 0")
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the server still waits for a client that left"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Every log line, whatever its level.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
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

    let server = producer().await;
    let v2 = feed("accounts.v2");
    let good = client(&server);
    good.read_subject(&v2, &subject("s1"), Sequence(0), 5)
        .await
        .unwrap();
    good.read_feed(&v2, 0, 5, Duration::ZERO).await.unwrap();
    good.subjects(&v2, None, 5).await.unwrap();
    let wrong_token = "wrong-token-that-must-not-be-logged";
    let wrong = FeedClient::new(&server.url, Some(wrong_token.to_owned())).unwrap();
    refused(wrong.subjects(&v2, None, 5).await);
    // A retry on a new connection is logged (at DEBUG).
    let reused = FeedClient::new(
        &fake(Fake::KeepAliveOnce(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]".to_vec(),
        ))
        .await,
        Some(TOKEN.to_owned()),
    )
    .unwrap();
    for _ in 0..2 {
        reused.subjects(&v2, None, 5).await.unwrap();
    }

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("asking again on a new connection"),
        "nothing of the client was logged:\n{logs}"
    );
    for secret in [TOKEN, wrong_token] {
        assert!(!logs.contains(secret), "a token was logged:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_listing_gives_status_and_head_within_the_tokens_scope() {
    let server = producer().await;
    let listed: Vec<(String, FeedStatus, u64)> = client(&server)
        .feeds()
        .await
        .unwrap()
        .into_iter()
        .map(|f| (f.feed.to_string(), f.status, f.head))
        .collect();
    assert_eq!(
        listed,
        [
            ("accounts.v1".to_owned(), FeedStatus::Retired, 5),
            ("accounts.v2".to_owned(), FeedStatus::Live, 30),
            ("loans.v1".to_owned(), FeedStatus::Live, 0),
        ]
    );
    let loans_only = FeedClient::new(&server.url, Some(LOANS_TOKEN.to_owned())).unwrap();
    let listed: Vec<String> = loans_only
        .feeds()
        .await
        .unwrap()
        .iter()
        .map(|f| f.feed.to_string())
        .collect();
    assert_eq!(listed, ["loans.v1"]);
    let wrong = FeedClient::new(&server.url, Some("not-a-token".to_owned())).unwrap();
    refused(wrong.feeds().await);

    for body in [
        r#"[{"name":"a","version":0,"status":"live","head":1}]"#,
        r#"[{"name":"a","version":1,"status":"asleep","head":1}]"#,
        r#"[{"name":"a b","version":1,"status":"live","head":1}]"#,
        r#"[{"name":"a","version":1,"status":"live"}]"#,
        r#"{}"#,
    ] {
        let url = fake(http("200 OK", "", body)).await;
        let client = FeedClient::new(&url, Some(TOKEN.to_owned())).unwrap();
        malformed(client.feeds().await);
    }
}
