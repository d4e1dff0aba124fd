//! Tests of `bank accounts`, in-process over loopback HTTP: the command API's contract
//! (idempotency, refusals, bad input), the feeds v1 and v2, a version added live, and two
//! replicas on PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use bank::accounts::{self, Accounts, Config};
use bank::client::{Answer, Balance, Client};
use bank::model;
use headwater::Uuid;
use headwater::feed::{FeedEvent, FeedId, FeedPosition, build_feed};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

mod nats;
mod postgres;

/// The feed API's token in these tests.
pub(crate) const TOKEN: &str = "accounts-test-token";
/// How long a feed may take to catch up, in seconds (far more than it takes).
pub(crate) const CATCH_UP_SECS: u64 = 30;

/// A service on the embedded store in a temporary directory.
pub(crate) struct Service {
    pub(crate) accounts: Accounts,
    pub(crate) client: Client,
    _dir: tempfile::TempDir,
}

pub(crate) async fn service(versions: &[u32]) -> Service {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(dir.path().join("accounts"));
    config.token = Some(TOKEN.to_owned());
    config.versions = versions.to_vec();
    let accounts = accounts::start(config).await.unwrap();
    let client = Client::new(&accounts.url()).unwrap();
    Service {
        accounts,
        client,
        _dir: dir,
    }
}

/// A raw request: the status, the content type and the body as JSON (`Null` when it is not).
pub(crate) async fn request(
    base: &str,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String, Value) {
    let http = HttpClient::builder(TokioExecutor::new()).build_http::<Full<axum::body::Bytes>>();
    let request = axum::http::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(axum::body::Bytes::from(body.to_owned())))
        .unwrap();
    let response = http.request(request).await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

pub(crate) fn done(answer: Answer) -> Balance {
    match answer {
        Answer::Done(balance) => balance,
        Answer::Refused(problem) => panic!("refused: {problem:?}"),
    }
}

fn refused(answer: Answer) -> String {
    match answer {
        Answer::Refused(problem) => problem.kind().to_owned(),
        Answer::Done(balance) => panic!("not refused: {balance:?}"),
    }
}

fn balance(balance: u64, version: u64) -> Balance {
    Balance {
        balance,
        version_or_sequence: version,
    }
}

pub(crate) fn id() -> Uuid {
    Uuid::new_v4()
}

/// The whole feed `version` from the feed store.
pub(crate) async fn feed(accounts: &Accounts, version: u32) -> Vec<FeedEvent> {
    let feed = FeedId::parse(&format!("accounts.v{version}")).unwrap();
    let feeds = accounts.feeds();
    let mut all = Vec::new();
    loop {
        let after = all
            .last()
            .map_or(FeedPosition::START, |e: &FeedEvent| e.position);
        let page = feeds.read_feed(&feed, after, 1_000).await.unwrap();
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

/// The feed `version` built offline from the log as it is now (G5): what the projected feed
/// must equal.
pub(crate) async fn offline(accounts: &Accounts, version: u32) -> Vec<FeedEvent> {
    let projection = accounts::projections::for_version(version).unwrap();
    build_feed(&*accounts.events(), &*projection).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_answers_the_original_outcome_and_records_nothing() {
    let service = service(&[1]).await;
    let client = &service.client;
    let open = id();
    assert_eq!(
        done(client.open("ada", "Ada", open).await.unwrap()),
        balance(0, 1)
    );
    assert_eq!(
        done(client.open("ada", "Ada", open).await.unwrap()),
        balance(0, 1)
    );
    let deposit = id();
    assert_eq!(
        done(client.deposit("ada", 100, deposit).await.unwrap()),
        balance(100, 2)
    );
    assert_eq!(
        done(client.withdraw("ada", 30, id()).await.unwrap()),
        balance(70, 3)
    );
    // Retried after another command: the original outcome, not the balance now.
    assert_eq!(
        done(client.deposit("ada", 100, deposit).await.unwrap()),
        balance(100, 2)
    );
    // A retry carries the command id: whatever else it says, it is the recorded command.
    assert_eq!(
        done(client.deposit("ada", 999, deposit).await.unwrap()),
        balance(100, 2)
    );
    let head = service.accounts.events().head_position();
    assert_eq!(head.0, 3, "one event per command, retries record nothing");
    assert_eq!(client.account("ada").await.unwrap(), Some(balance(70, 3)));
    service.accounts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_record_once() {
    const RETRIES: usize = 16;
    let service = service(&[1]).await;
    let client = &service.client;
    done(client.open("ada", "Ada", id()).await.unwrap());
    for round in 0..10u64 {
        let command = id();
        let answers = futures_join(RETRIES, |_| {
            let client = client.clone();
            async move { client.deposit("ada", 10, command).await.unwrap() }
        })
        .await;
        for answer in answers {
            assert_eq!(done(answer), balance(10 * (round + 1), round + 2));
        }
    }
    assert_eq!(service.accounts.events().head_position().0, 11);
    assert_eq!(client.account("ada").await.unwrap(), Some(balance(100, 11)));
    // A withdrawal over the balance, retried at once: refused each time, recorded once.
    let command = id();
    let answers = futures_join(RETRIES, |_| {
        let client = client.clone();
        async move { client.withdraw("ada", 1_000, command).await.unwrap() }
    })
    .await;
    for answer in answers {
        assert_eq!(refused(answer), "insufficient-funds");
    }
    assert_eq!(service.accounts.events().head_position().0, 12);
    // An opening, retried at once: one account, every retry answered 201 with version 1.
    let command = id();
    let answers = futures_join(RETRIES, |_| {
        let client = client.clone();
        async move { client.open("bob", "Bob", command).await.unwrap() }
    })
    .await;
    for answer in answers {
        assert_eq!(done(answer), balance(0, 1));
    }
    assert_eq!(service.accounts.events().head_position().0, 13);
    service.accounts.shutdown().await;
}

/// Runs `count` futures made by `make` at once (tasks) and returns their outputs in order.
async fn futures_join<F, Fut, T>(count: usize, make: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let tasks: Vec<_> = (0..count).map(|i| tokio::spawn(make(i))).collect();
    let mut out = Vec::with_capacity(count);
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_withdrawal_is_refused_again_on_retry_even_after_a_deposit() {
    let service = service(&[1]).await;
    let client = &service.client;
    done(client.open("ada", "Ada", id()).await.unwrap());
    done(client.deposit("ada", 50, id()).await.unwrap());
    let withdrawal = id();
    assert_eq!(
        refused(client.withdraw("ada", 80, withdrawal).await.unwrap()),
        "insufficient-funds"
    );
    assert_eq!(
        done(client.deposit("ada", 100, id()).await.unwrap()),
        balance(150, 4)
    );
    // Enough money now, but the retry is the same command: refused, as it was.
    assert_eq!(
        refused(client.withdraw("ada", 80, withdrawal).await.unwrap()),
        "insufficient-funds"
    );
    assert_eq!(client.account("ada").await.unwrap(), Some(balance(150, 4)));
    assert_eq!(service.accounts.events().head_position().0, 4);
    // A new withdrawal of the same amount goes through.
    assert_eq!(
        done(client.withdraw("ada", 80, id()).await.unwrap()),
        balance(70, 5)
    );
    service.accounts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_a_problem_and_changes_nothing() {
    let service = service(&[1]).await;
    let base = service.accounts.url();
    let command = |extra: Value| {
        let mut body = json!({ "command_id": id().to_string() });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body.to_string()
    };
    let reused = id();
    let (status, _, _) = request(
        &base,
        "POST",
        "/accounts/ada",
        &json!({"owner": "Ada", "command_id": reused.to_string()}).to_string(),
    )
    .await;
    assert_eq!(status, 201);
    let (status, _, _) = request(
        &base,
        "POST",
        "/accounts/ada/deposits",
        &command(json!({"amount": 100})),
    )
    .await;
    assert_eq!(status, 200);
    let before_head = service.accounts.events().head_position();
    let long = format!("/accounts/{}", "x".repeat(65));
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/accounts/ada", command(json!({"owner": "Ada"})), 409, "already-open"),
        ("/accounts/bob/deposits", command(json!({"amount": 5})), 404, "account-not-found"),
        ("/accounts/bob/withdrawals", command(json!({"amount": 5})), 404, "account-not-found"),
        (
            "/accounts/bob",
            json!({"owner": "Bob", "command_id": reused.to_string()}).to_string(),
            409,
            "command-id-reused",
        ),
        (
            "/accounts/ada/deposits",
            command(json!({"amount": 1_000_000_000_000_000u64})),
            409,
            "balance-limit",
        ),
        // Bad input.
        ("/accounts/ada/deposits", "{not json".to_owned(), 400, "bad-request"),
        ("/accounts/ada/deposits", String::new(), 400, "bad-request"),
        ("/accounts/ada/deposits", command(json!({"amount": 0})), 400, "bad-request"),
        ("/accounts/ada/deposits", command(json!({})), 400, "bad-request"),
        ("/accounts/ada/deposits", command(json!({"amount": -5})), 400, "bad-request"),
        ("/accounts/ada/deposits", command(json!({"amount": 1.5})), 400, "bad-request"),
        ("/accounts/ada/deposits", command(json!({"amount": "5"})), 400, "bad-request"),
        (
            "/accounts/ada/deposits",
            command(json!({"amount": 1_000_000_000_000_001u64})),
            400,
            "bad-request",
        ),
        (
            "/accounts/ada/withdrawals",
            command(json!({"amount": u64::MAX})),
            400,
            "bad-request",
        ),
        (
            "/accounts/ada/deposits",
            r#"{"amount": 100000000000000000000, "command_id": "6f1a2b3c-0000-4000-8000-000000000001"}"#.to_owned(),
            400,
            "bad-request",
        ),
        (
            "/accounts/ada/deposits",
            json!({"amount": 5, "command_id": "not-a-uuid"}).to_string(),
            400,
            "bad-request",
        ),
        ("/accounts/ada/deposits", json!({"amount": 5}).to_string(), 400, "bad-request"),
        ("/accounts/carl", command(json!({})), 400, "bad-request"),
        ("/accounts/carl", command(json!({"owner": ""})), 400, "bad-request"),
        ("/accounts/carl", command(json!({"owner": "a\u{0}b"})), 400, "bad-request"),
        ("/accounts/bad.id", command(json!({"owner": "Bad"})), 400, "bad-request"),
        ("/accounts/bad%20id/deposits", command(json!({"amount": 5})), 400, "bad-request"),
        (
            &long,
            command(json!({"owner": "Long"})),
            400,
            "bad-request",
        ),
    ];
    for (path, body, status, kind) in cases {
        let (got, content_type, problem) = request(&base, "POST", path, &body).await;
        assert_eq!(got, status, "POST {path} {body}: {problem}");
        assert_eq!(
            content_type, "application/problem+json",
            "POST {path} {body}"
        );
        assert_eq!(
            problem["type"],
            format!("https://headwater.dev/problems/{kind}"),
            "POST {path} {body}: {problem}"
        );
        assert_eq!(problem["status"], status, "{problem}");
        assert!(
            problem["title"].is_string() && problem["detail"].is_string(),
            "{problem}"
        );
    }
    assert_eq!(
        service.accounts.events().head_position(),
        before_head,
        "a refusal recorded something"
    );
    assert_eq!(
        service.client.account("ada").await.unwrap(),
        Some(balance(100, 2))
    );
    assert_eq!(service.client.account("bob").await.unwrap(), None);
    assert_eq!(service.client.account("carl").await.unwrap(), None);
    // Through the client, any id reaches the service, which refuses the bad ones.
    for bad in ["a b", "a/b", "é", "", "x?y=1"] {
        let answer = service.client.open(bad, "Bad", id()).await.unwrap();
        assert!(
            matches!(answer, Answer::Refused(ref p) if p.status == 400 || p.status == 404),
            "{bad:?}: {answer:?}"
        );
    }
    let (status, content_type, problem) = request(&base, "GET", "/accounts/bob", "").await;
    assert_eq!(
        (status, content_type.as_str()),
        (404, "application/problem+json")
    );
    assert_eq!(
        problem["type"],
        "https://headwater.dev/problems/account-not-found"
    );
    assert_eq!(service.accounts.events().head_position(), before_head);
    service.accounts.shutdown().await;
}

/// The scripted history of the feed tests: (account, command, amount), in order.
async fn scripted_history(client: &Client) {
    done(client.open("ada", "Ada", id()).await.unwrap());
    done(client.deposit("ada", 100, id()).await.unwrap());
    done(client.open("bob", "Bob", id()).await.unwrap());
    done(client.withdraw("ada", 30, id()).await.unwrap());
    refused(client.withdraw("ada", 500, id()).await.unwrap());
    done(client.deposit("bob", 7, id()).await.unwrap());
    done(client.deposit("ada", 5, id()).await.unwrap());
}

/// (type, subject, sequence, data) of every event of a feed.
fn contents(feed: &[FeedEvent]) -> Vec<(String, String, u64, Value)> {
    feed.iter()
        .map(|e| {
            (
                e.event_type.as_str().to_owned(),
                e.subject.as_str().to_owned(),
                e.sequence.0,
                serde_json::from_slice(&e.data).unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feeds_v1_and_v2_of_a_scripted_history() {
    let service = service(&[1, 2]).await;
    scripted_history(&service.client).await;
    for version in [1, 2] {
        service
            .accounts
            .caught_up(version, Duration::from_secs(CATCH_UP_SECS))
            .await
            .unwrap();
    }
    let s = |t: &str, subject: &str, sequence: u64, data: Value| {
        (t.to_owned(), subject.to_owned(), sequence, data)
    };
    let eur = |cents: u64| json!({"cents": cents, "currency": "EUR"});
    let v1 = feed(&service.accounts, 1).await;
    assert_eq!(
        contents(&v1),
        vec![
            s(model::v1::OPENED, "ada", 1, json!({"owner": "Ada"})),
            s(model::v1::DEPOSITED, "ada", 2, json!({"amount": 100})),
            s(model::v1::OPENED, "bob", 1, json!({"owner": "Bob"})),
            s(model::v1::WITHDREW, "ada", 3, json!({"amount": 30})),
            s(model::v1::DEPOSITED, "bob", 2, json!({"amount": 7})),
            s(model::v1::DEPOSITED, "ada", 4, json!({"amount": 5})),
        ]
    );
    let v2 = feed(&service.accounts, 2).await;
    assert_eq!(
        contents(&v2),
        vec![
            s(
                model::v2::ACCOUNT_OPENED,
                "ada",
                1,
                json!({"owner": "Ada", "currency": "EUR", "balance": 0})
            ),
            s(
                model::v2::CREDITED,
                "ada",
                2,
                json!({"amount": eur(100), "balance": 100})
            ),
            s(
                model::v2::ACCOUNT_OPENED,
                "bob",
                1,
                json!({"owner": "Bob", "currency": "EUR", "balance": 0})
            ),
            s(
                model::v2::DEBITED,
                "ada",
                3,
                json!({"amount": eur(30), "balance": 70})
            ),
            s(
                model::v2::WITHDRAWAL_REFUSED,
                "ada",
                4,
                json!({"amount": eur(500), "balance": 70})
            ),
            s(
                model::v2::CREDITED,
                "bob",
                2,
                json!({"amount": eur(7), "balance": 7})
            ),
            s(
                model::v2::CREDITED,
                "ada",
                5,
                json!({"amount": eur(5), "balance": 75})
            ),
        ]
    );
    // Both equal the offline build from the log (G5).
    assert_eq!(v1, offline(&service.accounts, 1).await);
    assert_eq!(v2, offline(&service.accounts, 2).await);
    // Over HTTP, with the token; refused without it.
    let address = service.accounts.address();
    let (status, body) = tokio::task::spawn_blocking(move || {
        headwater_testkit::http::get(address, "/feeds/accounts/v2?after=0&limit=100", TOKEN)
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
    let page: Vec<Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(page.len(), v2.len());
    assert_eq!(page[4]["type"], model::v2::WITHDRAWAL_REFUSED);
    assert_eq!(page[4]["source"], model::SOURCE);
    let (status, _) = tokio::task::spawn_blocking(move || {
        headwater_testkit::http::get(address, "/feeds/accounts/v1?after=0", "wrong")
    })
    .await
    .unwrap();
    assert_eq!(status, 401);
    service.accounts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_added_live_ends_equal_to_its_offline_build() {
    const WRITERS: usize = 4;
    const COMMANDS_EACH: usize = 60;
    let service = Arc::new(service(&[1]).await);
    for writer in 0..WRITERS {
        done(
            service
                .client
                .open(&format!("acc-{writer}"), "Ada", id())
                .await
                .unwrap(),
        );
    }
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let client = service.client.clone();
            tokio::spawn(async move {
                let account = format!("acc-{writer}");
                for i in 0..COMMANDS_EACH {
                    if i % 3 == 2 {
                        client.withdraw(&account, 25, id()).await.unwrap();
                    } else {
                        client.deposit(&account, 10, id()).await.unwrap();
                    }
                }
            })
        })
        .collect();
    // Add v2 while the writers are writing.
    tokio::time::sleep(Duration::from_millis(50)).await;
    service.accounts.add_version(2).await.unwrap();
    let added_at = service.accounts.events().head_position();
    assert_eq!(service.accounts.versions(), vec![1, 2]);
    for writer in writers {
        writer.await.unwrap();
    }
    for version in [1, 2] {
        service
            .accounts
            .caught_up(version, Duration::from_secs(CATCH_UP_SECS))
            .await
            .unwrap();
    }
    assert!(
        service.accounts.events().head_position() > added_at,
        "no command after v2 was added: the test does not test a live addition"
    );
    let v2 = feed(&service.accounts, 2).await;
    assert_eq!(v2.len(), WRITERS * (COMMANDS_EACH + 1));
    assert_eq!(v2, offline(&service.accounts, 2).await);
    assert_eq!(
        feed(&service.accounts, 1).await,
        offline(&service.accounts, 1).await
    );
    let Ok(service) = Arc::try_unwrap(service) else {
        panic!("the service is still shared");
    };
    service.accounts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_the_same_data_keeps_every_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        let mut config = Config::new(dir.path().join("accounts"));
        config.token = Some(TOKEN.to_owned());
        accounts::start(config)
    };
    let first = start().await.unwrap();
    let client = Client::new(&first.url()).unwrap();
    let (open, deposit, refused_withdrawal) = (id(), id(), id());
    done(client.open("ada", "Ada", open).await.unwrap());
    done(client.deposit("ada", 40, deposit).await.unwrap());
    refused(
        client
            .withdraw("ada", 90, refused_withdrawal)
            .await
            .unwrap(),
    );
    first.shutdown().await;

    let second = start().await.unwrap();
    let client = Client::new(&second.url()).unwrap();
    // Retries after the restart: the original outcomes, nothing recorded.
    assert_eq!(
        done(client.open("ada", "Ada", open).await.unwrap()),
        balance(0, 1)
    );
    assert_eq!(
        done(client.deposit("ada", 40, deposit).await.unwrap()),
        balance(40, 2)
    );
    done(client.deposit("ada", 100, id()).await.unwrap());
    assert_eq!(
        refused(
            client
                .withdraw("ada", 90, refused_withdrawal)
                .await
                .unwrap()
        ),
        "insufficient-funds"
    );
    assert_eq!(client.account("ada").await.unwrap(), Some(balance(140, 4)));
    for version in [1, 2] {
        second
            .caught_up(version, Duration::from_secs(CATCH_UP_SECS))
            .await
            .unwrap();
        assert_eq!(
            feed(&second, version).await,
            offline(&second, version).await
        );
    }
    assert_eq!(feed(&second, 2).await.len(), 4);
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_under_load_loses_no_answer_and_leaves_the_feeds_at_the_head() {
    const WRITERS: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("accounts");
    let config = || {
        let mut config = Config::new(&data);
        config.token = Some(TOKEN.to_owned());
        config
    };
    let first = accounts::start(config()).await.unwrap();
    let client = Client::new(&first.url()).unwrap();
    for writer in 0..WRITERS {
        done(
            client
                .open(&format!("w{writer}"), "Ada", id())
                .await
                .unwrap(),
        );
    }
    // Writers deposit until the service stops answering; each keeps what it was told.
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let client = client.clone();
            tokio::spawn(async move {
                let account = format!("w{writer}");
                let mut told = Vec::new();
                loop {
                    let command = id();
                    match client.deposit(&account, 1, command).await {
                        Ok(answer) => told.push((command, Some(answer))),
                        Err(_) => {
                            told.push((command, None));
                            return told;
                        }
                    }
                }
            })
        })
        .collect();
    // Shut down once every writer has been answered a few times.
    let deadline = std::time::Instant::now() + Duration::from_secs(CATCH_UP_SECS);
    while first.events().head_position().0 < (WRITERS * 5) as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writers do not write"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.shutdown().await;
    let mut told = Vec::new();
    for writer in writers {
        told.push(writer.await.unwrap());
    }
    // Every feed includes every recorded event: the projectors caught up before stopping.
    {
        let store = headwater::store::EmbeddedStore::open(&data).unwrap();
        let feeds = store.feeds().unwrap();
        let head = headwater::store::EventStore::head_position(&store);
        for feed in [model::FEED_V1, model::FEED_V2] {
            let state = headwater::feed::FeedStore::feed(&feeds, &FeedId::parse(feed).unwrap())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(state.cursor, head, "{feed} stopped behind the log");
        }
    }
    // After a restart, every answer given is given again; the unanswered command of each writer
    // gets an answer now, and the balances add up.
    let second = accounts::start(config()).await.unwrap();
    let client = Client::new(&second.url()).unwrap();
    for (writer, told) in told.into_iter().enumerate() {
        let account = format!("w{writer}");
        let mut deposited = 0;
        for (command, answer) in told {
            let again = client.deposit(&account, 1, command).await.unwrap();
            if let Some(answer) = answer {
                assert_eq!(again, answer, "{account}: another answer after the restart");
            }
            deposited += 1;
        }
        let balance = client.account(&account).await.unwrap().unwrap().balance;
        assert_eq!(balance, deposited, "{account}");
    }
    second.shutdown().await;
}

/// What the model says a command answers: `Ok((balance, version))` or `Err(problem kind)`.
type Expected = Result<(u64, u64), &'static str>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_commands_and_retries_answer_as_the_model_says() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    const COMMANDS: usize = 400;
    const ACCOUNTS: usize = 4;
    let seed = std::env::var("BANK_ACCOUNTS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let mut rng = StdRng::seed_from_u64(seed);
    let service = service(&[2]).await;
    let client = &service.client;
    // The model: per account, open or not, its balance and version.
    let mut model: Vec<Option<(u64, u64)>> = vec![None; ACCOUNTS];
    // Every command that recorded something, with its answer: a retry must answer it again.
    let mut recorded: Vec<(usize, u8, u64, Uuid, Expected)> = Vec::new();
    for step in 0..COMMANDS {
        let context = format!("seed {seed} (BANK_ACCOUNTS_TEST_SEED), step {step}");
        if !recorded.is_empty() && rng.random_bool(0.2) {
            let (account, kind, amount, command, expected) =
                recorded[rng.random_range(0..recorded.len())];
            let answer = send(client, account, kind, amount, command).await;
            assert_eq!(outcome(answer), expected, "a retry; {context}");
            continue;
        }
        let account = rng.random_range(0..ACCOUNTS);
        let kind = rng.random_range(0..3u8);
        let amount = rng.random_range(1..200u64);
        let command = id();
        let expected: Expected = match (kind, model[account]) {
            (0, Some(_)) => Err("already-open"),
            (0, None) => Ok((0, 1)),
            (_, None) => Err("account-not-found"),
            (1, Some((balance, version))) => Ok((balance + amount, version + 1)),
            (_, Some((balance, version))) if amount <= balance => {
                Ok((balance - amount, version + 1))
            }
            (_, Some(_)) => Err("insufficient-funds"),
        };
        let answer = send(client, account, kind, amount, command).await;
        assert_eq!(outcome(answer), expected, "{context}");
        // What records an event: a success, or a refused withdrawal.
        let records = match expected {
            Ok(state) => {
                model[account] = Some(state);
                true
            }
            Err("insufficient-funds") => {
                let (balance, version) = model[account].unwrap();
                model[account] = Some((balance, version + 1));
                true
            }
            Err(_) => false,
        };
        if records {
            recorded.push((account, kind, amount, command, expected));
        }
    }
    let mut events = 0;
    for (account, state) in model.iter().enumerate() {
        let got = client.account(&format!("m{account}")).await.unwrap();
        assert_eq!(got.map(|b| (b.balance, b.version())), *state, "seed {seed}");
        events += state.map_or(0, |(_, version)| version);
    }
    assert_eq!(
        service.accounts.events().head_position().0,
        events,
        "seed {seed}"
    );
    // Feed v2's balances are the model's.
    service
        .accounts
        .caught_up(2, Duration::from_secs(CATCH_UP_SECS))
        .await
        .unwrap();
    for event in feed(&service.accounts, 2).await.iter().rev() {
        let account: usize = event.subject.as_str()[1..].parse().unwrap();
        let data: Value = serde_json::from_slice(&event.data).unwrap();
        if event.sequence.0 == model[account].unwrap().1 {
            assert_eq!(data["balance"], model[account].unwrap().0, "seed {seed}");
        }
    }
    service.accounts.shutdown().await;
}

/// Sends command `kind` (0 open, 1 deposit, 2 withdraw) on account `m{account}`.
async fn send(client: &Client, account: usize, kind: u8, amount: u64, command: Uuid) -> Answer {
    let account = format!("m{account}");
    match kind {
        0 => client.open(&account, "Ada", command).await,
        1 => client.deposit(&account, amount, command).await,
        _ => client.withdraw(&account, amount, command).await,
    }
    .unwrap()
}

fn outcome(answer: Answer) -> Expected {
    match answer {
        Answer::Done(balance) => Ok((balance.balance, balance.version())),
        Answer::Refused(problem) => Err(match problem.kind() {
            "already-open" => "already-open",
            "account-not-found" => "account-not-found",
            "insufficient-funds" => "insufficient-funds",
            other => panic!("an unexpected refusal {other}: {problem:?}"),
        }),
    }
}
