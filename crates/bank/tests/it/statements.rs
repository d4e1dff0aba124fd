//! Tests of `bank statements`, in process (`statements::start`), against a producer built here
//! from the facade: a `MemoryStore`, the projections of `accounts.v1` and `accounts.v2` exactly
//! as `bank::model` describes them, and the feed API on a loopback port. Building the producer
//! here lets a test make it publish what `accounts` never would (a v2 balance that does not
//! follow from the amounts).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{Method, Request};
use bank::model::{self, v1, v2};
use bank::statements::{self, Balance, Config, Statements, Transport};
use headwater::api::{ApiConfig, FeedApi, Tokens};
use headwater::consume::{AmqpSource, DeadLetterKind, FeedClient, NatsSource, Upstream};
use headwater::feed::{
    Emit, FeedId, FeedPosition, FeedStatus, FeedStore, MemoryFeedStore, ProjectionError,
    Projectors, projection,
};
use headwater::publish::{AmqpBroker, Broker, NatsBroker};
use headwater::store::{EventStore, MemoryStore};
use headwater::{EventId, EventType, ExpectedVersion, NewEvent, RecordedEvent, StreamName};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

const TOKEN: &str = "statements-test-token-0123456789";
/// Far more than anything here should take.
const PROMPT: Duration = Duration::from_secs(30);

fn feed(text: &str) -> FeedId {
    FeedId::parse(text).unwrap()
}

// ---- The producer ----------------------------------------------------------------------------

/// What the producer decided for one account: its balance and its last sequence in each feed
/// version (v2 also numbers refused withdrawals).
#[derive(Clone, Copy, Debug, Default)]
struct Account {
    balance: u64,
    v1: u64,
    v2: u64,
    /// The v2 balance the consumer must hold: it stops at a corrupted event (parked).
    v2_balance: u64,
    /// The v2 sequence the consumer must hold.
    v2_held: u64,
    parked: bool,
}

/// A producer of `accounts.v1` and `accounts.v2`. Private events: `account.opened {owner}`,
/// `account.deposited / withdrew / withdrawal_refused {amount, balance}` — the balance after
/// the event, which the v2 projection publishes as it is.
struct Producer {
    events: Arc<MemoryStore>,
    feeds: Arc<MemoryFeedStore>,
    projectors: Option<Projectors>,
    url: String,
    accounts: BTreeMap<String, Account>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

fn project(version: u32, event: &RecordedEvent, out: &mut Emit) -> Result<(), ProjectionError> {
    let data: Value = serde_json::from_slice(&event.data)?;
    let account = event.stream.id();
    let amount = data["amount"].as_u64().unwrap_or(0);
    let balance = data["balance"].as_u64().unwrap_or(0);
    let money = json!({"cents": amount, "currency": model::CURRENCY});
    match (version, event.event_type.as_str()) {
        (1, "account.opened") => out.emit(
            v1::OPENED,
            account,
            &v1::Opened {
                owner: data["owner"].as_str().unwrap_or_default().to_owned(),
            },
        ),
        (1, "account.deposited") => out.emit(v1::DEPOSITED, account, &v1::Moved { amount }),
        (1, "account.withdrew") => out.emit(v1::WITHDREW, account, &v1::Moved { amount }),
        (1, _) => Ok(()),
        (_, "account.opened") => out.emit(
            v2::ACCOUNT_OPENED,
            account,
            &json!({"owner": data["owner"], "currency": model::CURRENCY, "balance": 0}),
        ),
        (_, "account.deposited") => out.emit(
            v2::CREDITED,
            account,
            &json!({"amount": money, "balance": balance}),
        ),
        (_, "account.withdrew") => out.emit(
            v2::DEBITED,
            account,
            &json!({"amount": money, "balance": balance}),
        ),
        (_, _) => out.emit(
            v2::WITHDRAWAL_REFUSED,
            account,
            &json!({"amount": money, "balance": balance}),
        ),
    }
}

impl Producer {
    async fn start() -> Producer {
        let events = Arc::new(MemoryStore::new());
        let feeds = Arc::new(MemoryFeedStore::new());
        let projectors = Projectors::builder()
            .projection(projection(model::FEED_V1, |e, out| project(1, e, out)))
            .projection(projection(model::FEED_V2, |e, out| project(2, e, out)))
            .start(Arc::clone(&events), Arc::clone(&feeds))
            .await
            .unwrap();
        let mut registry = prometheus_client::registry::Registry::default();
        let config = ApiConfig::new(
            model::SOURCE,
            Tokens::one_for_all("statements", TOKEN).unwrap(),
        )
        .unwrap();
        let api = FeedApi::new(feeds.clone(), config, &mut registry);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            api.serve(listener, Arc::new(registry), async {
                let _ = stopped.await;
            })
            .await
        });
        Producer {
            events,
            feeds,
            projectors: Some(projectors),
            url,
            accounts: BTreeMap::new(),
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Stops serving the feed API (the port then refuses connections).
    async fn stop_serving(&mut self) {
        drop(self.stop.take());
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }

    async fn append(&self, account: &str, kind: &str, data: Value) {
        let stream = StreamName::new(format!("account-{account}")).unwrap();
        self.events
            .append(
                &stream,
                ExpectedVersion::Any,
                vec![NewEvent::new(
                    EventId::new_random(),
                    EventType::new(kind).unwrap(),
                    data.to_string().into_bytes(),
                )],
            )
            .await
            .unwrap();
    }

    async fn open(&mut self, account: &str) {
        self.append(account, "account.opened", json!({"owner": "Ada"}))
            .await;
        self.accounts.insert(
            account.to_owned(),
            Account {
                v1: 1,
                v2: 1,
                v2_held: 1,
                ..Account::default()
            },
        );
    }

    async fn deposit(&mut self, account: &str, amount: u64) {
        let mut state = self.accounts[account];
        state.balance += amount;
        self.append(
            account,
            "account.deposited",
            json!({"amount": amount, "balance": state.balance}),
        )
        .await;
        state.v1 += 1;
        state.v2 += 1;
        if !state.parked {
            state.v2_balance = state.balance;
            state.v2_held = state.v2;
        }
        self.accounts.insert(account.to_owned(), state);
    }

    /// A withdrawal; refused (and recorded, published in v2 only) when over the balance.
    async fn withdraw(&mut self, account: &str, amount: u64) {
        let mut state = self.accounts[account];
        let kind = if amount <= state.balance {
            state.balance -= amount;
            state.v1 += 1;
            "account.withdrew"
        } else {
            "account.withdrawal_refused"
        };
        self.append(
            account,
            kind,
            json!({"amount": amount, "balance": state.balance}),
        )
        .await;
        state.v2 += 1;
        if !state.parked {
            state.v2_balance = state.balance;
            state.v2_held = state.v2;
        }
        self.accounts.insert(account.to_owned(), state);
    }

    /// A deposit whose v2 event states a balance 1 cent off: v2 readers must refuse it (and so
    /// hold the account at the event before it).
    async fn corrupt_deposit(&mut self, account: &str, amount: u64) {
        let mut state = self.accounts[account];
        state.balance += amount;
        self.append(
            account,
            "account.deposited",
            json!({"amount": amount, "balance": state.balance + 1}),
        )
        .await;
        state.v1 += 1;
        state.v2 += 1;
        state.parked = true;
        self.accounts.insert(account.to_owned(), state);
    }

    /// A seeded mix of deposits and withdrawals (some refused) over `accounts`.
    async fn traffic(&mut self, accounts: &[String], operations: u64, seed: u64) {
        let mut random = seed;
        for _ in 0..operations {
            random = random
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let account =
                &accounts[usize::try_from((random >> 33) % accounts.len() as u64).unwrap()];
            let amount = 1 + (random >> 17) % 500;
            if random.is_multiple_of(3) {
                self.withdraw(account, amount).await;
            } else {
                self.deposit(account, amount).await;
            }
        }
    }

    /// Waits until both feeds hold every event appended so far.
    async fn projected(&self) {
        let head = self.events.head_position();
        for version in [model::FEED_V1, model::FEED_V2] {
            let mut status = self
                .projectors
                .as_ref()
                .unwrap()
                .watch(&feed(version))
                .unwrap();
            tokio::time::timeout(
                PROMPT,
                status.wait_for(|s| s.cursor >= head && s.feed_status == FeedStatus::Live),
            )
            .await
            .expect("the projector did not catch up")
            .unwrap();
        }
    }

    /// What a consumer of `version` must hold once it caught up.
    fn expected(&self, version: u32) -> BTreeMap<String, Balance> {
        self.accounts
            .iter()
            .map(|(id, a)| {
                let balance = match version {
                    1 => Balance {
                        balance: a.balance,
                        sequence: a.v1,
                    },
                    _ => Balance {
                        balance: a.v2_balance,
                        sequence: a.v2_held,
                    },
                };
                (id.clone(), balance)
            })
            .collect()
    }

    fn client(&self) -> FeedClient {
        FeedClient::new(&self.url, Some(TOKEN.to_owned())).unwrap()
    }
}

// ---- Helpers -----------------------------------------------------------------------------------

fn config(data: &tempfile::TempDir, producer: &Producer, transport: Transport) -> Config {
    let mut config = Config::new(data.path(), &producer.url);
    config.token = Some(TOKEN.to_owned());
    config.transport = transport;
    // Walks only when asked: a walk at start would bring in what a test wants bootstrapped.
    config.reconstitute_every = None;
    config.walk_requests_per_second = None;
    config
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// One HTTP request: the status, the content type and the body as JSON (`Null` if it is not).
async fn http(method: Method, url: &str) -> (u16, String, Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(PROMPT, client.request(request))
        .await
        .expect("no answer in time")
        .unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

async fn get(statements: &Statements, path: &str) -> (u16, String, Value) {
    http(
        Method::GET,
        &format!("http://{}{path}", statements.address()),
    )
    .await
}

/// Polls until the view equals `expected`; fails with the difference after [`PROMPT`].
async fn converges(statements: &Statements, expected: &BTreeMap<String, Balance>) {
    let deadline = Instant::now() + PROMPT;
    loop {
        let balances = statements.balances().await.unwrap();
        if balances == *expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the view did not converge: {balances:?}\nexpected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `done` until it holds; fails after [`PROMPT`].
async fn until<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PROMPT;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- Tests -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_account_is_bootstrapped_on_demand() {
    let mut producer = Producer::start().await;
    producer.open("ada").await;
    producer.deposit("ada", 500).await;
    producer.withdraw("ada", 200).await;
    producer.withdraw("ada", 900).await; // refused: not in v1
    producer.deposit("ada", 1).await;
    producer.open("bob").await;
    producer.projected().await;
    let data = tempfile::tempdir().unwrap();
    // Nothing delivers: only the bootstrap can bring the account in.
    let statements = statements::start(config(&data, &producer, Transport::External))
        .await
        .unwrap();
    assert!(statements.balances().await.unwrap().is_empty());

    let (status, content_type, body) = get(&statements, "/balances/ada").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "application/json");
    assert_eq!(body, json!({"balance": 301, "sequence": 4}));
    let (_, _, body) = get(&statements, "/balances/ada").await;
    assert_eq!(body, json!({"balance": 301, "sequence": 4}));
    let status = statements.status().await.unwrap();
    assert_eq!(
        status.bootstraps, 1,
        "the second read is served by the view"
    );
    assert_eq!(
        status.accounts, 1,
        "only the account asked for is in the view"
    );
    assert_eq!(
        statements.balance("bob").await.unwrap(),
        Some(Balance {
            balance: 0,
            sequence: 1
        })
    );
    statements.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_the_producer_does_not_have_is_404() {
    let mut producer = Producer::start().await;
    producer.open("ada").await;
    producer.projected().await;
    let data = tempfile::tempdir().unwrap();
    let statements = statements::start(config(&data, &producer, Transport::External))
        .await
        .unwrap();
    let (status, content_type, body) = get(&statements, "/balances/nobody").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(body["status"], 404);
    assert!(
        body["type"]
            .as_str()
            .unwrap()
            .ends_with("/problems/account-not-found"),
        "{body}"
    );
    assert_eq!(statements.status().await.unwrap().accounts, 0);
    statements.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_account_ids_are_400() {
    let producer = Producer::start().await;
    let data = tempfile::tempdir().unwrap();
    let statements = statements::start(config(&data, &producer, Transport::External))
        .await
        .unwrap();
    let long = "a".repeat(65);
    for id in [
        "a.b",
        "a%20b",
        "%C3%A9t%C3%A9",
        "a%2Fb",
        "%FF",
        "a~b",
        long.as_str(),
    ] {
        let (status, content_type, body) = get(&statements, &format!("/balances/{id}")).await;
        assert_eq!(status, 400, "{id}: {body}");
        assert_eq!(content_type, "application/problem+json", "{id}");
        assert!(
            body["type"]
                .as_str()
                .unwrap()
                .ends_with("/problems/bad-request"),
            "{id}: {body}"
        );
    }
    // The longest id is an id.
    let (status, _, _) = get(&statements, &format!("/balances/{}", "a".repeat(64))).await;
    assert_eq!(status, 404);
    statements.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_feed_is_followed_to_equality() {
    let mut producer = Producer::start().await;
    let accounts = ids("acc-", 12);
    for id in &accounts[..6] {
        producer.open(id).await;
    }
    producer.traffic(&accounts[..6], 100, 1).await;
    let data = tempfile::tempdir().unwrap();
    let statements = statements::start(config(&data, &producer, Transport::Http))
        .await
        .unwrap();
    // More while it follows, with accounts it never saw.
    for id in &accounts[6..] {
        producer.open(id).await;
    }
    producer.traffic(&accounts, 200, 2).await;
    producer.projected().await;
    converges(&statements, &producer.expected(1)).await;
    let (status, _, body) = get(&statements, "/balances/acc-7").await;
    assert_eq!(status, 200);
    let expected = producer.expected(1)["acc-7"];
    assert_eq!(
        body,
        json!({"balance": expected.balance, "sequence": expected.sequence})
    );
    let status = statements.status().await.unwrap();
    assert_eq!(status.cursors, 12);
    assert_eq!(status.transport, "http");
    assert_eq!(status.dead_letters.parked_subjects, 0);
    statements.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_view() {
    let mut producer = Producer::start().await;
    let accounts = ids("k", 5);
    for id in &accounts {
        producer.open(id).await;
    }
    producer.traffic(&accounts, 60, 3).await;
    producer.projected().await;
    let data = tempfile::tempdir().unwrap();
    let statements = statements::start(config(&data, &producer, Transport::Http))
        .await
        .unwrap();
    converges(&statements, &producer.expected(1)).await;
    statements.shutdown().await.unwrap();

    // The producer is gone: what the restarted service answers comes from its own file.
    producer.stop_serving().await;
    let statements = statements::start(config(&data, &producer, Transport::External))
        .await
        .unwrap();
    assert_eq!(statements.balances().await.unwrap(), producer.expected(1));
    let (status, _, body) = get(&statements, "/balances/k3").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["balance"], producer.expected(1)["k3"].balance);
    let status = statements.status().await.unwrap();
    assert_eq!((status.cursors, status.bootstraps), (5, 0));
    statements.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v2_handler_checks_the_arithmetic_and_dead_letters_a_mismatch() {
    let mut producer = Producer::start().await;
    for id in ["good", "refusals", "corrupt"] {
        producer.open(id).await;
        producer.deposit(id, 1_000).await;
    }
    producer.withdraw("refusals", 5_000).await; // refused: published in v2
    producer.withdraw("refusals", 300).await;
    producer.withdraw("refusals", 800).await; // refused
    producer.withdraw("good", 250).await;
    producer.corrupt_deposit("corrupt", 10).await; // v2 states 1 cent too much
    producer.deposit("corrupt", 5).await;
    producer.projected().await;
    let data = tempfile::tempdir().unwrap();
    let mut config = config(&data, &producer, Transport::Http);
    config.feed = feed(model::FEED_V2);
    let statements = statements::start(config).await.unwrap();
    converges(&statements, &producer.expected(2)).await;
    let expected = producer.expected(2);
    assert_eq!(
        expected["refusals"],
        Balance {
            balance: 700,
            sequence: 5
        },
        "v2 numbers the refusals"
    );
    assert_eq!(
        expected["corrupt"],
        Balance {
            balance: 1_000,
            sequence: 2
        },
        "held before the corrupted event"
    );
    until("the mismatch to be dead-lettered", || async {
        statements
            .status()
            .await
            .unwrap()
            .dead_letters
            .parked_subjects
            == 1
    })
    .await;
    let letters = statements.consumer().dead_letters(0, 100).await.unwrap();
    let letter = letters
        .iter()
        .find(|l| l.kind == DeadLetterKind::Handler)
        .unwrap_or_else(|| panic!("no handler letter in {letters:?}"));
    assert_eq!(letter.subject.as_ref().unwrap().as_str(), "corrupt");
    assert_eq!(letter.sequence.unwrap().get(), 3);
    assert!(letter.reason.contains("arithmetic"), "{}", letter.reason);
    let (status, _, body) = get(&statements, "/status").await;
    assert_eq!(status, 200);
    assert_eq!(body["feed"], "accounts.v2");
    assert_eq!(body["dead_letters"]["parked_subjects"], 1);
    statements.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_v2_moves_a_view_built_on_v1() {
    let mut producer = Producer::start().await;
    let accounts = ids("m", 8);
    for id in &accounts {
        producer.open(id).await;
    }
    producer.traffic(&accounts, 120, 4).await;
    producer.projected().await;
    let data = tempfile::tempdir().unwrap();
    let statements = statements::start(config(&data, &producer, Transport::Http))
        .await
        .unwrap();
    converges(&statements, &producer.expected(1)).await;
    statements.shutdown().await.unwrap();

    // `--feed accounts.v2` on the v1 view: it serves v1 until v2 is built, then switches.
    producer.traffic(&accounts, 60, 5).await;
    let mut moved = config(&data, &producer, Transport::Http);
    moved.feed = feed(model::FEED_V2);
    let statements = statements::start(moved).await.unwrap();
    assert_eq!(statements.feed(), feed(model::FEED_V1), "v1 serves first");
    tokio::time::timeout(PROMPT, statements.wait_for(&feed(model::FEED_V2)))
        .await
        .expect("the move to v2 did not complete");
    producer.traffic(&accounts, 60, 6).await;
    producer.projected().await;
    converges(&statements, &producer.expected(2)).await;
    let status = statements.status().await.unwrap();
    assert_eq!(
        (status.feed.as_str(), status.target.as_str()),
        ("accounts.v2", "accounts.v2")
    );
    assert_eq!(status.switch.switches, 1);
    statements.shutdown().await.unwrap();

    // A restart stays on v2.
    let mut again = config(&data, &producer, Transport::External);
    again.feed = feed(model::FEED_V2);
    let statements = statements::start(again).await.unwrap();
    assert_eq!(statements.feed(), feed(model::FEED_V2));
    assert_eq!(statements.balances().await.unwrap(), producer.expected(2));
    statements.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_to_moves_an_external_transport_in_process() {
    let mut producer = Producer::start().await;
    let accounts = ids("s", 4);
    for id in &accounts {
        producer.open(id).await;
    }
    producer.traffic(&accounts, 40, 7).await;
    producer.projected().await;
    let data = tempfile::tempdir().unwrap();
    let statements = statements::start(config(&data, &producer, Transport::External))
        .await
        .unwrap();
    assert_eq!(statements.reconstitute().await.unwrap(), 4);
    assert_eq!(statements.balances().await.unwrap(), producer.expected(1));
    statements.switch_to(feed(model::FEED_V2)).unwrap();
    assert!(statements.switch_to(feed("accounts.v3")).is_err());
    tokio::time::timeout(PROMPT, statements.wait_for(&feed(model::FEED_V2)))
        .await
        .expect("the move to v2 did not complete");
    assert_eq!(statements.consumer().feed(), &feed(model::FEED_V2));
    converges(&statements, &producer.expected(2)).await;
    // After the move the caller delivers v2 (here: a lost last event, found by a walk).
    producer.deposit("s0", 7).await;
    producer.projected().await;
    assert_eq!(statements.reconstitute().await.unwrap(), 1);
    assert_eq!(statements.balances().await.unwrap(), producer.expected(2));
    statements.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_counts_duplicates_gaps_and_reconstitutions() {
    let mut producer = Producer::start().await;
    for id in ["x", "y"] {
        producer.open(id).await;
        producer.deposit(id, 10).await;
        producer.deposit(id, 20).await;
    }
    producer.projected().await;
    let data = tempfile::tempdir().unwrap();
    let statements = statements::start(config(&data, &producer, Transport::External))
        .await
        .unwrap();
    let events = producer
        .client()
        .read_feed(&feed(model::FEED_V1), 0, 100, Duration::ZERO)
        .await
        .unwrap();
    let event = |subject: &str, sequence: u64| {
        events
            .iter()
            .find(|e| e.subject.as_str() == subject && e.sequence.get() == sequence)
            .unwrap()
            .clone()
    };
    let consumer = statements.consumer();
    // x: #1, #1 again (a duplicate), #3 (a gap: #2 healed). y: #1, #2, and its last event lost.
    for (subject, sequence) in [("x", 1), ("x", 1), ("x", 3), ("y", 1), ("y", 2)] {
        consumer.deliver(event(subject, sequence)).await.unwrap();
    }
    let status = statements.status().await.unwrap();
    assert_eq!(status.feed, "accounts.v1");
    assert_eq!(status.transport, "external");
    assert_eq!(status.cursors, 2);
    assert_eq!(status.duplicates_skipped, 1);
    assert_eq!(status.gaps_detected, 1);
    assert_eq!(status.gaps_healed, 1);
    assert_eq!(status.events_healed, 1);
    assert_eq!(status.open_gaps, 0);
    assert!(status.last_reconstitution.is_none());
    assert_eq!(statements.balance("y").await.unwrap().unwrap().sequence, 2);

    // The lost last event: only a walk finds it.
    assert_eq!(statements.reconstitute().await.unwrap(), 1);
    assert_eq!(statements.balances().await.unwrap(), producer.expected(1));
    let (code, _, body) = get(&statements, "/status").await;
    assert_eq!(code, 200);
    for key in [
        "feed",
        "cursors",
        "gaps_healed",
        "duplicates_skipped",
        "open_gaps",
        "dead_letters",
        "last_reconstitution",
    ] {
        assert!(body.get(key).is_some(), "/status has no {key}: {body}");
    }
    assert_eq!(body["reconstitutions"], 1);
    assert_eq!(body["events_reconstituted"], 1);
    assert_eq!(body["last_reconstitution"]["state"], "finished");
    assert_eq!(body["last_reconstitution"]["behind"], 1);

    // The walker's routes: on request (its runner runs even without a period).
    let url = format!("http://{}/reconstitute", statements.address());
    let (code, _, body) = http(Method::POST, &url).await;
    assert_eq!(code, 202, "{body}");
    until("the requested walk", || async {
        statements.status().await.unwrap().reconstitutions == 2
    })
    .await;
    let (code, _, _) = get(&statements, "/balances/x").await;
    assert_eq!(code, 200);
    let (code, _, _) = get(&statements, "/balances/x.y").await;
    assert_eq!(code, 400);
    let (code, content_type, text) = {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let uri = format!("http://{}/metrics", statements.address());
        let response = client.get(uri.parse().unwrap()).await.unwrap();
        let code = response.status().as_u16();
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (
            code,
            content_type,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    };
    assert_eq!(code, 200);
    assert!(content_type.starts_with("application/openmetrics-text"));
    assert!(
        text.contains("headwater_consumer_duplicates_skipped_total{feed=\"accounts.v1\"} 1"),
        "{text}"
    );
    for outcome in ["view", "bad_request"] {
        assert!(
            text.contains(&format!(
                "bank_balance_requests_total{{outcome=\"{outcome}\"}} 1"
            )),
            "{text}"
        );
    }
    statements.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_transport_heals_what_the_queue_lost_and_skips_duplicates() {
    let url = std::env::var("HEADWATER_TEST_AMQP_URL")
        .expect("HEADWATER_TEST_AMQP_URL is not set: run scripts/test, or rabbitmq_start");
    broker_transport(Transport::Amqp(url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_transport_heals_what_the_stream_lost() {
    let url = std::env::var("HEADWATER_TEST_NATS_URL")
        .expect("HEADWATER_TEST_NATS_URL is not set: run scripts/test, or nats_start");
    broker_transport(Transport::Nats(url)).await;
}

/// A broker between the producer and `statements` that lost events (every 5th, and the last
/// one of the first account) and duplicated others (every 4th sent twice; NATS drops those
/// itself, by message id): every account ends equal to the producer's, gaps healed from the
/// producer's feed API, the lost last event found by a walk.
async fn broker_transport(transport: Transport) {
    let mut producer = Producer::start().await;
    // Unique ids and queue: the broker may be shared with other tests of the run.
    let run = headwater::Uuid::new_v4().simple().to_string();
    let accounts = ids(&format!("r{}-", &run[..8]), 6);
    for id in &accounts {
        producer.open(id).await;
    }
    producer.traffic(&accounts, 120, 8).await;
    producer.projected().await;
    let v1 = feed(model::FEED_V1);
    let name = format!("statements_{}", &run[..12]);
    let broker: Arc<dyn Broker> = match &transport {
        Transport::Amqp(url) => {
            AmqpSource::new(url, &v1, &name)
                .unwrap()
                .declare()
                .await
                .unwrap();
            Arc::new(AmqpBroker::connect(url).await.unwrap())
        }
        Transport::Nats(url) => {
            NatsSource::new(url, &v1, &name)
                .unwrap()
                .declare()
                .await
                .unwrap();
            Arc::new(NatsBroker::connect(url).await.unwrap())
        }
        _ => unreachable!("a broker transport"),
    };
    let events = producer
        .feeds
        .read_feed(&v1, FeedPosition(0), 10_000)
        .await
        .unwrap();
    let last_of_first = events
        .iter()
        .rev()
        .find(|e| e.subject.as_str() == accounts[0])
        .unwrap()
        .position;
    let mut sent = Vec::new();
    for (i, event) in events.iter().enumerate() {
        if i % 5 == 4 || event.position == last_of_first {
            continue;
        }
        sent.push(event.clone());
        if i % 4 == 0 {
            sent.push(event.clone());
        }
    }
    broker.declare(&v1).await.unwrap();
    let outcomes = broker.publish(&v1, model::SOURCE, &sent).await.unwrap();
    assert!(
        outcomes.iter().all(|o| o.is_confirmed()),
        "{:?}",
        outcomes.iter().find(|o| !o.is_confirmed())
    );
    let kind = match &transport {
        Transport::Amqp(_) => "rabbitmq",
        _ => "nats",
    };

    let data = tempfile::tempdir().unwrap();
    let transport_again = transport.clone();
    let transport_v2 = transport.clone();
    let name_again = name.clone();
    let name_v2 = name.clone();
    let config_again = config;
    let mut config = config(&data, &producer, transport);
    config.name = name;
    let statements = statements::start(config).await.unwrap();
    // What reaches the consumer: RabbitMQ keeps the duplicates, JetStream drops them.
    let mut unique: Vec<_> = sent.iter().map(|e| e.position).collect();
    unique.dedup();
    let delivered = if kind == "rabbitmq" {
        sent.len()
    } else {
        unique.len()
    } as u64;
    until("every message acked", || async {
        statements
            .status()
            .await
            .unwrap()
            .broker
            .is_some_and(|b| b.acked >= delivered)
    })
    .await;
    let status = statements.status().await.unwrap();
    assert_eq!(status.transport, kind);
    if kind == "rabbitmq" {
        assert!(status.duplicates_skipped > 0, "{status:?}");
    }
    assert!(status.events_healed > 0, "{status:?}");
    // The first account's last event never came: a walk finds it.
    assert!(statements.reconstitute().await.unwrap() >= 1);
    let mut mine = statements.balances().await.unwrap();
    mine.retain(|id, _| accounts.contains(id));
    assert_eq!(mine, producer.expected(1));
    statements.shutdown().await.unwrap();

    // Restarted with `--feed accounts.v2`: the move runs over the HTTP feed, then the broker
    // source of v2 takes over (its queue / durable consumer made then).
    producer.traffic(&accounts, 30, 9).await;
    producer.projected().await;
    let mut config = config_again(&data, &producer, transport_again);
    config.feed = feed(model::FEED_V2);
    config.name = name_again;
    let statements = statements::start(config).await.unwrap();
    tokio::time::timeout(PROMPT, statements.wait_for(&feed(model::FEED_V2)))
        .await
        .expect("the move to v2 did not complete");
    until("the v2 broker source to run", || async {
        statements
            .status()
            .await
            .unwrap()
            .broker
            .is_some_and(|b| b.sessions > 0)
    })
    .await;
    producer.traffic(&accounts, 30, 10).await;
    producer.projected().await;
    let v2 = feed(model::FEED_V2);
    let events = producer
        .feeds
        .read_feed(&v2, FeedPosition(0), 10_000)
        .await
        .unwrap();
    // Only the events after the move's head come by the broker in production; all of them here
    // (what the view has is skipped). The source declares its queue as it connects; declared
    // here too, so that nothing is published before it exists.
    match &transport_v2 {
        Transport::Amqp(url) => AmqpSource::new(url, &v2, &name_v2)
            .unwrap()
            .declare()
            .await
            .unwrap(),
        Transport::Nats(url) => NatsSource::new(url, &v2, &name_v2)
            .unwrap()
            .declare()
            .await
            .unwrap(),
        _ => unreachable!("a broker transport"),
    }
    broker.declare(&v2).await.unwrap();
    let outcomes = broker.publish(&v2, model::SOURCE, &events).await.unwrap();
    assert!(
        outcomes.iter().all(|o| o.is_confirmed()),
        "{:?}",
        outcomes.iter().find(|o| !o.is_confirmed())
    );
    let expected = producer.expected(2);
    until("v2 to equal the producer's", || async {
        let mut mine = statements.balances().await.unwrap();
        mine.retain(|id, _| accounts.contains(id));
        mine == expected
    })
    .await;
    let status = statements.status().await.unwrap();
    assert_eq!(status.feed, "accounts.v2");
    assert!(status.broker.is_some_and(|b| b.received > 0), "{status:?}");
    statements.shutdown().await.unwrap();
}

/// Against the real producer (`accounts::start`) through its command API: the handlers agree
/// with its projections — v1, then v2 added live and moved to in process — account by account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_agree_with_the_accounts_service_on_v1_then_v2() {
    let producer_data = tempfile::tempdir().unwrap();
    let mut accounts_config = bank::accounts::Config::new(producer_data.path());
    accounts_config.token = Some(TOKEN.to_owned());
    accounts_config.versions = vec![1];
    let accounts = bank::accounts::start(accounts_config).await.unwrap();
    let client = bank::client::Client::new(&accounts.url()).unwrap();
    let ids = ids("real-", 6);
    let command = headwater::Uuid::new_v4;
    for id in &ids {
        client.open(id, "Ada", command()).await.unwrap();
    }
    let traffic = |seed: u64| {
        let client = &client;
        let ids = &ids;
        async move {
            let mut random = seed;
            for _ in 0..60 {
                random = random
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let id = &ids[usize::try_from((random >> 33) % ids.len() as u64).unwrap()];
                let amount = 1 + (random >> 17) % 500;
                if random.is_multiple_of(3) {
                    // Some are refused (insufficient funds): recorded, in v2 only.
                    client.withdraw(id, amount, command()).await.unwrap();
                } else {
                    client.deposit(id, amount, command()).await.unwrap();
                }
            }
        }
    };
    traffic(11).await;

    let data = tempfile::tempdir().unwrap();
    let mut config = Config::new(data.path(), &accounts.url());
    config.token = Some(TOKEN.to_owned());
    config.reconstitute_every = None;
    let statements = statements::start(config).await.unwrap();
    // The producer's own answers, as a consumer of `version` must hold them.
    let producer = |version: u32| {
        let client = &client;
        let ids = &ids;
        async move {
            let mut expected = BTreeMap::new();
            for id in ids {
                let account = client.account(id).await.unwrap().unwrap();
                expected.insert(id.clone(), account);
            }
            if version == 2 {
                // One v2 event per private event: the sequence is the stream's version.
                return expected
                    .into_iter()
                    .map(|(id, a)| {
                        (
                            id,
                            Balance {
                                balance: a.balance,
                                sequence: a.version(),
                            },
                        )
                    })
                    .collect::<BTreeMap<_, _>>();
            }
            expected
                .into_iter()
                .map(|(id, a)| (id, a.balance))
                .map(|(id, balance)| {
                    (
                        id,
                        Balance {
                            balance,
                            sequence: 0,
                        },
                    )
                })
                .collect()
        }
    };
    accounts.caught_up(1, PROMPT).await.unwrap();
    let expected = producer(1).await;
    until("v1 to equal the producer's balances", || async {
        let view = statements.balances().await.unwrap();
        view.len() == expected.len() && view.iter().all(|(id, b)| b.balance == expected[id].balance)
    })
    .await;
    let reader = bank::client::Client::new(&format!("http://{}", statements.address())).unwrap();
    let answer = reader.statement(&ids[0]).await.unwrap().unwrap();
    assert_eq!(answer.balance, expected[&ids[0]].balance);

    // v2 added live, the consumer moved to it while commands go on.
    accounts.add_version(2).await.unwrap();
    statements.switch_to(feed(model::FEED_V2)).unwrap();
    traffic(12).await;
    tokio::time::timeout(PROMPT, statements.wait_for(&feed(model::FEED_V2)))
        .await
        .expect("the move to v2 did not complete");
    traffic(13).await;
    accounts.caught_up(2, PROMPT).await.unwrap();
    converges(&statements, &producer(2).await).await;
    let status = statements.status().await.unwrap();
    assert_eq!(status.dead_letters.parked_subjects, 0, "{status:?}");
    statements.shutdown().await.unwrap();
    accounts.shutdown().await;
}

/// The real binary: its startup logs say where the view lives, what listens, which feed and
/// transport; it serves; SIGTERM stops it cleanly (exit 0) and a restart serves the same view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_logs_what_it_does_and_stops_cleanly_on_sigterm() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let mut producer = Producer::start().await;
    producer.open("ada").await;
    producer.deposit("ada", 250).await;
    producer.projected().await;
    let data = tempfile::tempdir().unwrap();
    let url = producer.url.clone();
    let run = |expect: u64| {
        let data = data.path().to_owned();
        let url = url.clone();
        async move {
            let mut child = Command::new(env!("CARGO_BIN_EXE_bank"))
                .args(["statements", "--listen", "127.0.0.1:0", "--upstream", &url])
                .arg("--data")
                .arg(&data)
                .args(["--token", TOKEN, "--reconstitute-every", "0"])
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let (lines, logged) = std::sync::mpsc::channel::<String>();
            let stderr = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { return };
                    if lines.send(line).is_err() {
                        return;
                    }
                }
            });
            let mut log = Vec::new();
            let deadline = Instant::now() + PROMPT;
            let address = loop {
                let line = logged
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    .unwrap_or_else(|_| panic!("no 'listening' line: {log:#?}"));
                log.push(line.clone());
                if line.contains("listening") {
                    let address = line.split("address=").nth(1).unwrap().trim().to_owned();
                    break address;
                }
            };
            let startup = log.join("\n");
            for said in [
                &*data.join(statements::VIEW_FILE).display().to_string(),
                "feed=accounts.v1",
                &format!("upstream={url}"),
                "transport=\"http\"",
                "GET /balances/{id}",
            ] {
                assert!(
                    startup.contains(said),
                    "the startup logs do not say {said:?}:\n{startup}"
                );
            }
            until("the expected balance", || async {
                let (status, _, body) =
                    http(Method::GET, &format!("http://{address}/balances/ada")).await;
                assert_eq!(status, 200, "{body}");
                body["balance"] == expect
            })
            .await;
            let kill = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(kill.success());
            let deadline = Instant::now() + PROMPT;
            let exit = loop {
                if let Some(exit) = child.try_wait().unwrap() {
                    break exit;
                }
                assert!(
                    Instant::now() < deadline,
                    "statements did not stop on SIGTERM"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            log.extend(logged.try_iter());
            assert!(exit.success(), "{exit}: {log:#?}");
            assert!(
                log.last().is_some_and(|l| l.contains("stopped")),
                "{log:#?}"
            );
        }
    };
    run(250).await;
    // Restarted after the producer moved on: the view is there, the feed continues.
    producer.deposit("ada", 50).await;
    producer.projected().await;
    run(300).await;
}
