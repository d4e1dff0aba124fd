//! The end-to-end bank test, over the real `bank` binary: `bank accounts` (one replica on the
//! embedded store, or two replicas on one PostgreSQL database) and `bank statements`, each a
//! child process on a loopback port of its own. While concurrent clients send deposits and
//! withdrawals — each retried with the same command id until it gets an answer — the test kills
//! `accounts` and `statements` with SIGKILL at random moments and starts them again on the same
//! data, and the delivery path loses and duplicates events: the HTTP feed through a lossy proxy
//! ([`proxy`]), or RabbitMQ with a competing consumer on `statements`' queue ([`rabbit`]). Then
//! the checks of [`checks`]: producer balances = the acknowledged commands, never a negative
//! balance, the consumer = the producer after one reconstitution, every subject's feed
//! contiguous.
//!
//! Seeded: `BANK_E2E_SEED=<u64>` replays a run's random choices (the processes' timing is not
//! replayed); each run prints its seed, and a failure names it. `BANK_E2E_SECS` sets how long
//! the clients run under chaos (default [`CHAOS_SECS_DEFAULT`]); `BANK_E2E_LOG` the services'
//! `RUST_LOG`.
//!
//! The RabbitMQ variants run a RabbitMQ node of their own (`BrokerProcess`): the feed's exchange
//! and `statements`' queue have fixed names (`headwater.accounts.v1[.statements]`), which
//! another test on a shared server would use at the same time.

mod checks;
mod clients;
mod http;
mod proxy;
mod rabbit;
mod services;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use headwater_testkit::broker::{BrokerProcess, free_ports};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use checks::{Findings, Targets};
use clients::{Clients, Ledger, Op, Watched};
use http::Http;
use proxy::{FeedProxy, Lossiness};
use rabbit::ChaosStats;
use services::Service;

/// The variable that replays a run.
const SEED_ENV: &str = "BANK_E2E_SEED";
/// The variable that sets how long the clients run under chaos, in seconds.
const SECS_ENV: &str = "BANK_E2E_SECS";
/// How long the clients run under chaos unless [`SECS_ENV`] says, in seconds.
const CHAOS_SECS_DEFAULT: u64 = 30;
/// The accounts.
const ACCOUNTS: usize = 24;
/// Concurrent clients.
const CLIENTS: usize = 8;
/// Concurrent watchers.
const WATCHERS: usize = 2;
/// The pause between a restart and the next kill, in milliseconds.
const KILL_EVERY_MILLIS: std::ops::Range<u64> = 1_000..3_500;
/// How long a killed service stays down, in milliseconds.
const DOWN_MILLIS: std::ops::Range<u64> = 0..600;
/// `statements --reconstitute-every`, in seconds.
const RECONSTITUTE_EVERY_SECS: u64 = 10;
/// How the HTTP link garbles the feed's pages.
const LOSSY: Lossiness = Lossiness {
    drop: 0.08,
    duplicate: 0.06,
    skip: 0.03,
};
/// The clients must all have their answer this long after they were told to stop, in seconds.
const CLIENTS_STOP_SECS_MAX: u64 = clients::COMMAND_SECS_MAX + 10;
/// The bearer token of every API (commands, feeds, statements).
const TOKEN: &str = "e2e-secret-token";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Store {
    Embedded,
    Postgres,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delivery {
    Http,
    RabbitMq,
}

/// Breakage the test's own side can be told to have, to show that the checks catch it.
#[derive(Clone, Copy, Debug, Default)]
struct Faults {
    /// The ledger counts a command that needed a retry twice.
    count_retried_twice: bool,
    /// `statements` runs without reconstitution and none is asked for at the end.
    no_reconstitution: bool,
}

#[derive(Clone, Copy, Debug)]
struct Scenario {
    store: Store,
    delivery: Delivery,
    chaos: Duration,
    /// The HTTP link's losses.
    lossiness: Lossiness,
    faults: Faults,
}

impl Scenario {
    fn new(store: Store, delivery: Delivery) -> Scenario {
        let secs = std::env::var(SECS_ENV)
            .ok()
            .map_or(CHAOS_SECS_DEFAULT, |s| {
                s.parse()
                    .unwrap_or_else(|_| panic!("{SECS_ENV}={s} is not a number of seconds"))
            });
        Scenario {
            store,
            delivery,
            chaos: Duration::from_secs(secs),
            lossiness: LOSSY,
            faults: Faults::default(),
        }
    }
}

/// What a run did and found.
struct Run {
    seed: u64,
    findings: Findings,
    summary: String,
    logs: String,
}

fn seed() -> u64 {
    let seed = std::env::var(SEED_ENV)
        .ok()
        .map_or_else(rand::random::<u64>, |s| {
            s.parse()
                .unwrap_or_else(|_| panic!("{SEED_ENV}={s} is not a u64"))
        });
    eprintln!("{SEED_ENV}={seed}");
    seed
}

/// A PostgreSQL schema of the test's own for `accounts --postgres-schema`, dropped at the end.
struct Schema {
    url: String,
    name: String,
}

impl Schema {
    fn fresh() -> Schema {
        Schema {
            url: headwater_testkit::postgres::url(),
            name: headwater_testkit::postgres::fresh_schema(),
        }
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        headwater_testkit::postgres::drop_schema(&self.url, &self.name);
    }
}

/// Runs a scenario whole: setup (blocking: the broker), then the run.
fn run(scenario: Scenario) -> Run {
    let seed = seed();
    let schema = (scenario.store == Store::Postgres).then(Schema::fresh);
    let broker = (scenario.delivery == Delivery::RabbitMq).then(BrokerProcess::rabbitmq);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let run = runtime.block_on(run_async(
        scenario,
        seed,
        schema.as_ref(),
        broker.as_ref().map(BrokerProcess::url),
    ));
    drop(runtime);
    run
}

async fn run_async(
    scenario: Scenario,
    seed: u64,
    postgres: Option<&Schema>,
    amqp: Option<String>,
) -> Run {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let http = Http::new();

    // The services: one or two accounts replicas, statements behind the proxy.
    let replicas = match scenario.store {
        Store::Embedded => 1,
        Store::Postgres => 2,
    };
    let ports: [u16; 3] = free_ports();
    let mut services: Vec<Service> = Vec::new();
    for (replica, port) in ports.iter().copied().enumerate().take(replicas) {
        let name = format!("accounts-{}", replica + 1);
        let mut args = vec![
            "accounts".to_owned(),
            "--token".to_owned(),
            TOKEN.to_owned(),
        ];
        match postgres {
            Some(schema) => args.extend([
                "--postgres".to_owned(),
                schema.url.clone(),
                "--postgres-schema".to_owned(),
                schema.name.clone(),
            ]),
            None => args.extend([
                "--data".to_owned(),
                dir.path().join(&name).display().to_string(),
            ]),
        }
        if let Some(url) = &amqp {
            args.extend(["--amqp".to_owned(), url.clone()]);
        }
        services.push(Service::new(&name, args, port, dir.path()));
    }
    let producers: Vec<String> = services.iter().map(Service::url).collect();
    let proxy = FeedProxy::start(
        services.iter().map(Service::address).collect(),
        (scenario.delivery == Delivery::Http).then_some(scenario.lossiness),
        rng.random(),
    )
    .await;
    let mut args = vec![
        "statements".to_owned(),
        "--data".to_owned(),
        dir.path().join("statements").display().to_string(),
        "--upstream".to_owned(),
        proxy.url(),
        "--token".to_owned(),
        TOKEN.to_owned(),
    ];
    // 0: only on request (`Faults::no_reconstitution` asks for none).
    let every = if scenario.faults.no_reconstitution {
        0
    } else {
        RECONSTITUTE_EVERY_SECS
    };
    args.extend(["--reconstitute-every".to_owned(), every.to_string()]);
    if let Some(url) = &amqp {
        args.extend(["--amqp".to_owned(), url.clone()]);
    }
    services.push(Service::new("statements", args, ports[2], dir.path()));
    let statements = services.last().unwrap().url();
    if let Some(url) = &amqp {
        rabbit::declare(url).await;
    }
    for service in &mut services {
        service.start();
    }
    for service in &mut services {
        service.wait_ready(&http).await;
    }

    // The clients open the accounts, then run with the watchers and the RabbitMQ chaos.
    let stop = Arc::new(AtomicBool::new(false));
    let clients = Clients {
        http: http.clone(),
        commands: Arc::new(
            producers
                .iter()
                .map(|url| {
                    bank::client::Client::new(url)
                        .unwrap()
                        .with_timeout(Duration::from_millis(clients::ATTEMPT_TIMEOUT_MILLIS))
                })
                .collect(),
        ),
        endpoints: Arc::new(producers.clone()),
        accounts: Arc::new((0..ACCOUNTS).map(|i| format!("acc-{i:03}")).collect()),
        token: TOKEN.to_owned(),
        ledger: Arc::new(Mutex::new(Ledger::default())),
        stop: Arc::clone(&stop),
    };
    clients.open_all(&mut rng).await;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        tasks.push(tokio::spawn(clients.clone().run(rng.random())));
    }
    let watched = Arc::new(Mutex::new(Watched::default()));
    let statements_reads = Arc::new(AtomicU64::new(0));
    for _ in 0..WATCHERS {
        tasks.push(tokio::spawn(clients::watch(
            clients.clone(),
            statements.clone(),
            Arc::clone(&watched),
            rng.random(),
            Arc::clone(&statements_reads),
        )));
    }
    let chaos_stop = Arc::new(AtomicBool::new(false));
    let chaos_stats = Arc::new(ChaosStats::default());
    let chaos = amqp.clone().map(|url| {
        tokio::spawn(rabbit::compete(
            url,
            rng.random(),
            Arc::clone(&chaos_stop),
            Arc::clone(&chaos_stats),
        ))
    });

    // The killer: in rounds, each round every service once in a random order, at random moments.
    let mut crashes = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let chaos_until = Instant::now() + scenario.chaos;
    while Instant::now() < chaos_until {
        let pause = Duration::from_millis(rng.random_range(KILL_EVERY_MILLIS));
        tokio::time::sleep(pause.min(chaos_until.saturating_duration_since(Instant::now()))).await;
        for service in &mut services {
            if let Some(status) = service.exited() {
                crashes.push(format!(
                    "{} exited by itself ({status}); its log:\n{}",
                    service.name,
                    service.log_tail()
                ));
                service.reap();
                service.start();
                service.wait_ready(&http).await;
            }
        }
        if Instant::now() >= chaos_until {
            break;
        }
        if round.is_empty() {
            round = (0..services.len()).collect();
            round.shuffle(&mut rng);
        }
        let service = &mut services[round.pop().unwrap()];
        service.kill();
        tokio::time::sleep(Duration::from_millis(rng.random_range(DOWN_MILLIS))).await;
        service.start();
        service.wait_ready(&http).await;
    }

    // The clients finish their commands in flight, then the lossy paths stop.
    stop.store(true, Ordering::SeqCst);
    let stopping = Instant::now();
    for task in tasks {
        tokio::time::timeout(
            Duration::from_secs(CLIENTS_STOP_SECS_MAX).saturating_sub(stopping.elapsed()),
            task,
        )
        .await
        .expect("the clients have their answers")
        .unwrap();
    }
    chaos_stop.store(true, Ordering::SeqCst);
    if let Some(chaos) = chaos {
        chaos.await.unwrap();
    }
    proxy.heal();
    let chaos_secs = started.elapsed().as_secs_f64();
    // The last events of a few accounts are lost on purpose: only a reconstitution finds them.
    let lost_last = lose_last_events(&clients, &proxy, amqp.as_deref(), &mut rng).await;
    // The consumer reads the feed to its head (what the link lost is lost to it).
    let caught_up = match scenario.delivery {
        Delivery::Http => follower_caught_up(&http, &producers[0], &proxy).await,
        Delivery::RabbitMq => Ok(()),
    };

    // The checks.
    let ledger = std::mem::take(&mut *clients.ledger.lock().unwrap());
    let watched = std::mem::take(&mut *watched.lock().unwrap());
    let targets = Targets {
        http: &http,
        producers: &producers,
        statements: &statements,
        token: TOKEN,
        accounts: &clients.accounts,
    };
    let mut findings = checks::check(
        &targets,
        &ledger,
        &watched,
        scenario.faults.count_retried_twice,
        !scenario.faults.no_reconstitution,
    )
    .await;
    findings.violations.extend(caught_up.err());
    match &lost_last {
        Ok(doomed) => {
            let lost = proxy.stats().lost.load(Ordering::Relaxed);
            if scenario.delivery == Delivery::Http && lost < doomed.len() as u64 {
                findings.violations.push(format!(
                    "the proxy lost {lost} events, not the last events of {doomed:?}"
                ));
            }
        }
        Err(error) => findings.violations.push(error.clone()),
    }
    findings.violations.extend(crashes);
    findings
        .violations
        .extend(ledger.violations.iter().cloned());
    findings
        .violations
        .extend(watched.violations.iter().cloned());
    let status = http
        .get(
            &format!("{statements}/status"),
            Some(TOKEN),
            Duration::from_secs(10),
        )
        .await
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .unwrap_or_else(|e| e);
    // Nothing was dead-lettered (the services' events are all good) and no gap is left open.
    let parsed: serde_json::Value = serde_json::from_str(&status).unwrap_or_default();
    for (what, value) in [
        ("dead letters", &parsed["dead_letters"]["recorded"]),
        (
            "parked accounts",
            &parsed["dead_letters"]["parked_subjects"],
        ),
        ("open gaps", &parsed["open_gaps"]),
    ] {
        if value.as_u64() != Some(0) {
            findings
                .violations
                .push(format!("statements' status shows {what}: {value}"));
        }
    }
    let (acked, refused) = ledger.commands();
    let kills: Vec<String> = services
        .iter()
        .map(|s| format!("{} killed {} times", s.name, s.kills))
        .collect();
    let summary = format!(
        "{scenario:?}, seed {seed}: {acked} commands acknowledged, {refused} withdrawals \
         refused, {} attempts retried ({} commands needed a retry); {}; {} balances read from \
         accounts and {} from statements during the run; {} feed events in v1, {} in v2; {}; {}; \
         walks: {:?}; \
         statements' status: {status}; {chaos_secs:.1} s of chaos, {:.1} s in all",
        ledger.retries,
        ledger.retried_commands,
        kills.join(", "),
        watched.producer_reads,
        statements_reads.load(Ordering::Relaxed),
        findings.feed_events,
        findings.v2_events,
        proxy.stats(),
        chaos_stats,
        findings.walks,
        started.elapsed().as_secs_f64(),
    );
    eprintln!("{summary}");
    // The run must have been what it says: commands under kills and losses.
    if acked == 0 || refused == 0 {
        findings.violations.push(format!(
            "too few commands: {acked} acknowledged, {refused} refused"
        ));
    }
    if services.iter().any(|s| s.kills == 0) {
        findings
            .violations
            .push(format!("a service was never killed: {kills:?}"));
    }
    let logs = services
        .iter()
        .map(|s| format!("--- {} (the end of its log) ---\n{}", s.name, s.log_tail()))
        .collect::<Vec<_>>()
        .join("\n");
    Run {
        seed,
        findings,
        summary,
        logs,
    }
}

/// Accounts whose last event the delivery path loses on purpose at the end.
const LOST_LAST_ACCOUNTS: usize = 3;

/// Makes the last events of [`LOST_LAST_ACCOUNTS`] accounts lost to `statements`: a deposit to
/// each that the proxy drops from every page (HTTP) or that goes to a sink queue instead of
/// `statements`' (RabbitMQ), then a deposit to another account (so that the HTTP follower reads
/// past them). Returns those accounts.
async fn lose_last_events(
    clients: &Clients,
    proxy: &FeedProxy,
    amqp: Option<&str>,
    rng: &mut StdRng,
) -> Result<Vec<String>, String> {
    let mut accounts = (*clients.accounts).clone();
    accounts.shuffle(rng);
    let sentinel = accounts.pop().unwrap();
    accounts.truncate(LOST_LAST_ACCOUNTS);
    // Each one's next v1 event: after its opening and its acknowledged moves.
    let events: Vec<(String, u64)> = {
        let ledger = clients.ledger.lock().unwrap();
        accounts
            .iter()
            .map(|a| {
                (
                    a.clone(),
                    2 + ledger.acked.get(a).map_or(0, Vec::len) as u64,
                )
            })
            .collect()
    };
    for (account, sequence) in &events {
        proxy.lose_from(account, *sequence);
    }
    if let Some(url) = amqp {
        rabbit::divert(url).await?;
    }
    for account in &accounts {
        let amount = rng.random_range(1..=1_000);
        clients.execute(rng, account, Op::Deposit, amount).await;
    }
    if let Some(url) = amqp {
        rabbit::divert_back(url, &events).await?;
    }
    clients.execute(rng, &sentinel, Op::Deposit, 1).await;
    Ok(accounts)
}

/// The longest the consumer may take to read the feed to its head once the commands stopped, in
/// seconds.
const CATCH_UP_SECS_MAX: u64 = 60;

/// How the finding that the consumer did not read the whole feed starts.
const NOT_CAUGHT_UP: &str = "the consumer read the feed up to";

/// Waits until the consumer asked the proxy for the feed's page after its head: it read every
/// page.
async fn follower_caught_up(http: &Http, producer: &str, proxy: &FeedProxy) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(CATCH_UP_SECS_MAX);
    let mut head = None;
    loop {
        if let Ok(Ok(feeds)) = http
            .get(
                &format!("{producer}/feeds"),
                Some(TOKEN),
                Duration::from_secs(10),
            )
            .await
            .map(|r| r.json())
        {
            head = feeds.as_array().into_iter().flatten().find_map(|f| {
                (f["name"] == "accounts" && f["version"] == 1).then(|| f["head"].as_u64())?
            });
        }
        let read = proxy.stats().highest_after.load(Ordering::SeqCst);
        if head.is_some_and(|head| read >= head) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{NOT_CAUGHT_UP} {read}, not to its head {head:?}, within {CATCH_UP_SECS_MAX} s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs a variant and fails on any finding, naming the seed.
fn variant(store: Store, delivery: Delivery) {
    let run = run(Scenario::new(store, delivery));
    assert!(
        run.findings.violations.is_empty(),
        "{SEED_ENV}={} — {} violations:\n{}\n\n{}\n\n{}",
        run.seed,
        run.findings.violations.len(),
        run.findings.violations.join("\n"),
        run.summary,
        run.logs
    );
}

#[test]
fn bank_over_the_http_feed_embedded() {
    variant(Store::Embedded, Delivery::Http);
}

#[test]
fn bank_over_the_http_feed_postgres_two_replicas() {
    variant(Store::Postgres, Delivery::Http);
}

#[test]
fn bank_over_rabbitmq_embedded() {
    variant(Store::Embedded, Delivery::RabbitMq);
}

#[test]
fn bank_over_rabbitmq_postgres_two_replicas() {
    variant(Store::Postgres, Delivery::RabbitMq);
}

/// How long the clients run under chaos in the test of the checks, in seconds.
const CHECKS_TEST_SECS: u64 = 12;

/// The checks catch what they are there for: a ledger that counts a command twice when it
/// needed a retry, and a consumer that never reconstitutes while the link loses events (some of
/// them the last of their account, which nothing but a reconstitution finds).
#[test]
fn the_checks_catch_a_double_count_and_a_consumer_that_never_reconstitutes() {
    let mut scenario = Scenario::new(Store::Embedded, Delivery::Http);
    scenario.chaos = Duration::from_secs(CHECKS_TEST_SECS);
    scenario.faults = Faults {
        count_retried_twice: true,
        no_reconstitution: true,
    };
    let run = run(scenario);
    let findings = &run.findings;
    // Not a consumer that lags: one that read the whole feed (through the lossy link).
    assert!(
        !findings
            .violations
            .iter()
            .any(|v| v.starts_with(NOT_CAUGHT_UP)),
        "{SEED_ENV}={}: {:?}",
        run.seed,
        findings.violations
    );
    assert!(
        findings.ledger_mismatches > 0 && findings.consumer_mismatches >= LOST_LAST_ACCOUNTS,
        "{SEED_ENV}={}: the checks found {} balances off the double-counting ledger and {} \
         consumer balances off the producer's: both must be some\n{}\n\n{}",
        run.seed,
        findings.ledger_mismatches,
        findings.consumer_mismatches,
        findings.violations.join("\n"),
        run.summary
    );
}
