//! The clients: concurrent tasks sending deposits and withdrawals with command ids to the
//! `accounts` replicas, each command retried with the SAME id on a timeout, a connection error or
//! a 5xx until it gets an answer — acknowledged (200) or refused for insufficient funds (409) —,
//! and the ledger of those answers. And the watchers, which read balances while the test runs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use headwater::Uuid;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::http::Http;

/// One attempt of a command may take this long before it is retried, in milliseconds.
const ATTEMPT_TIMEOUT_MILLIS: u64 = 3_000;
/// A command must get an answer within this long, retries included, in seconds.
pub(crate) const COMMAND_SECS_MAX: u64 = 60;
/// The pause before a retry, in milliseconds (a range: clients do not retry in step).
const RETRY_PAUSE_MILLIS: std::ops::Range<u64> = 10..100;
/// Deposits are 1 ..= this many cents; withdrawals up to 1.5 times as much (some are refused).
const AMOUNT_CENTS_MAX: u64 = 1_000;
/// Of the commands, this many percent are deposits.
const DEPOSIT_PERCENT: u32 = 55;
/// A watcher reads a balance this often, in milliseconds.
const WATCH_EVERY_MILLIS: u64 = 50;

/// A command's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Deposit,
    Withdraw,
}

/// An acknowledged command: what it asked and what `accounts` answered.
#[derive(Clone, Debug)]
pub(crate) struct Acked {
    pub(crate) command_id: Uuid,
    pub(crate) op: Op,
    pub(crate) amount: u64,
    /// The balance and stream version after it, as answered.
    pub(crate) balance: u64,
    pub(crate) version: u64,
    pub(crate) attempts: u32,
}

/// Every answer the clients got, per account.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    pub(crate) acked: BTreeMap<String, Vec<Acked>>,
    /// Withdrawals refused for insufficient funds, per account (each answered once).
    pub(crate) refused: BTreeMap<String, u64>,
    /// Attempts that got no answer (and were retried).
    pub(crate) retries: u64,
    /// Commands that needed more than one attempt.
    pub(crate) retried_commands: u64,
    /// What no answer may be (an unexpected refusal, a command never answered …).
    pub(crate) violations: Vec<String>,
}

impl Ledger {
    /// The balance the acknowledged commands of `account` add up to: each counted once (or,
    /// with `count_retried_twice`, the broken bookkeeping the test must catch: a command that
    /// needed a retry counted once per answer… of its attempts that reached the service).
    pub(crate) fn expected_balance(&self, account: &str, count_retried_twice: bool) -> i128 {
        self.acked.get(account).map_or(0, |acked| {
            acked
                .iter()
                .map(|a| {
                    let times = if count_retried_twice && a.attempts > 1 {
                        2
                    } else {
                        1
                    };
                    let amount = i128::from(a.amount) * times;
                    match a.op {
                        Op::Deposit => amount,
                        Op::Withdraw => -amount,
                    }
                })
                .sum()
        })
    }

    pub(crate) fn commands(&self) -> (usize, u64) {
        (
            self.acked.values().map(Vec::len).sum(),
            self.refused.values().sum(),
        )
    }
}

/// How one attempt ended.
enum Attempt {
    /// 200/201: `{"balance","version"}`.
    Done { balance: u64, version: u64 },
    /// A 4xx problem: its `type`'s last segment (`insufficient-funds`) and the body.
    Refused { kind: String, body: String },
    /// No answer (transport error, timeout) or a 5xx: retry with the same id.
    Again(String),
}

/// One attempt of a command at `endpoint` (an `accounts` replica's URL).
async fn attempt(
    http: &Http,
    endpoint: &str,
    path: &str,
    body: &serde_json::Value,
    token: &str,
) -> Attempt {
    let url = format!("{endpoint}{path}");
    let reply = match http
        .send(
            axum::http::Method::POST,
            &url,
            Some(token),
            Some(body),
            Duration::from_millis(ATTEMPT_TIMEOUT_MILLIS),
        )
        .await
    {
        Ok(reply) => reply,
        Err(error) => return Attempt::Again(error),
    };
    if reply.status >= 500 {
        return Attempt::Again(format!(
            "{url}: {} {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        ));
    }
    let text = String::from_utf8_lossy(&reply.body).into_owned();
    let Ok(json) = reply.json() else {
        return Attempt::Refused {
            kind: format!("status {} without JSON", reply.status),
            body: text,
        };
    };
    if reply.status == 200 || reply.status == 201 {
        match (json["balance"].as_u64(), json["version"].as_u64()) {
            (Some(balance), Some(version)) => Attempt::Done { balance, version },
            _ => Attempt::Refused {
                kind: format!("status {} without a balance and a version", reply.status),
                body: text,
            },
        }
    } else {
        let kind = json["type"]
            .as_str()
            .and_then(|t| t.rsplit('/').next())
            .unwrap_or("(no type)")
            .to_owned();
        Attempt::Refused {
            kind: format!("{} {kind}", reply.status),
            body: text,
        }
    }
}

/// What the clients share.
#[derive(Clone, Debug)]
pub(crate) struct Clients {
    pub(crate) http: Http,
    pub(crate) endpoints: Arc<Vec<String>>,
    pub(crate) accounts: Arc<Vec<String>>,
    pub(crate) token: String,
    pub(crate) ledger: Arc<Mutex<Ledger>>,
    pub(crate) stop: Arc<AtomicBool>,
}

impl Clients {
    /// Opens every account (retrying as the commands do), before the chaos starts.
    pub(crate) async fn open_all(&self, rng: &mut StdRng) {
        for account in self.accounts.iter() {
            let body =
                serde_json::json!({"owner": "e2e", "command_id": Uuid::new_v4().to_string()});
            let started = Instant::now();
            loop {
                let endpoint = &self.endpoints[rng.random_range(0..self.endpoints.len())];
                match attempt(
                    &self.http,
                    endpoint,
                    &format!("/accounts/{account}"),
                    &body,
                    &self.token,
                )
                .await
                {
                    Attempt::Done { balance, version } => {
                        assert_eq!((balance, version), (0, 1), "opening {account}");
                        break;
                    }
                    Attempt::Refused { kind, body } => {
                        panic!("opening {account}: refused {kind}: {body}")
                    }
                    Attempt::Again(error) => {
                        assert!(
                            started.elapsed() < Duration::from_secs(COMMAND_SECS_MAX),
                            "opening {account}: no answer within {COMMAND_SECS_MAX} s: {error}"
                        );
                        tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MILLIS.end)).await;
                    }
                }
            }
        }
    }

    /// One client: random commands until `stop`; the command in flight then is still retried
    /// until answered.
    pub(crate) async fn run(self, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        while !self.stop.load(Ordering::SeqCst) {
            let account = self.accounts[rng.random_range(0..self.accounts.len())].clone();
            let op = if rng.random_range(0..100) < DEPOSIT_PERCENT {
                Op::Deposit
            } else {
                Op::Withdraw
            };
            let amount = match op {
                Op::Deposit => rng.random_range(1..=AMOUNT_CENTS_MAX),
                Op::Withdraw => rng.random_range(1..=AMOUNT_CENTS_MAX * 3 / 2),
            };
            let command_id = Uuid::new_v4();
            let path = match op {
                Op::Deposit => format!("/accounts/{account}/deposits"),
                Op::Withdraw => format!("/accounts/{account}/withdrawals"),
            };
            let body = serde_json::json!({"amount": amount, "command_id": command_id.to_string()});
            let started = Instant::now();
            let mut attempts = 0;
            loop {
                attempts += 1;
                let endpoint = &self.endpoints[rng.random_range(0..self.endpoints.len())];
                let outcome = attempt(&self.http, endpoint, &path, &body, &self.token).await;
                let answered = {
                    let mut ledger = self.ledger.lock().unwrap();
                    match outcome {
                        Attempt::Done { balance, version } => {
                            ledger.retried_commands += u64::from(attempts > 1);
                            ledger
                                .acked
                                .entry(account.clone())
                                .or_default()
                                .push(Acked {
                                    command_id,
                                    op,
                                    amount,
                                    balance,
                                    version,
                                    attempts,
                                });
                            true
                        }
                        Attempt::Refused { kind, .. }
                            if op == Op::Withdraw && kind == "409 insufficient-funds" =>
                        {
                            ledger.retried_commands += u64::from(attempts > 1);
                            *ledger.refused.entry(account.clone()).or_default() += 1;
                            true
                        }
                        Attempt::Refused { kind, body } => {
                            ledger.violations.push(format!(
                                "{op:?} of {amount} on {account} ({command_id}, attempt \
                             {attempts}): refused {kind}: {body}"
                            ));
                            true
                        }
                        Attempt::Again(error) => {
                            ledger.retries += 1;
                            if started.elapsed() > Duration::from_secs(COMMAND_SECS_MAX) {
                                ledger.violations.push(format!(
                                    "{op:?} of {amount} on {account} ({command_id}): no answer in \
                                 {attempts} attempts over {COMMAND_SECS_MAX} s, the last: {error}"
                                ));
                                true
                            } else {
                                false
                            }
                        }
                    }
                };
                if answered {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(RETRY_PAUSE_MILLIS)))
                    .await;
            }
        }
    }
}

/// A balance `statements` answered during the run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seen {
    pub(crate) sequence: u64,
    pub(crate) balance: u64,
}

/// What the watchers saw.
#[derive(Debug, Default)]
pub(crate) struct Watched {
    /// `statements`' answers, per account, in the order seen.
    pub(crate) statements: BTreeMap<String, Vec<Seen>>,
    pub(crate) producer_reads: u64,
    pub(crate) violations: Vec<String>,
}

/// Reads random balances from `accounts` (GET /accounts/{id}) and `statements`
/// (GET /balances/{id}) until `stop`: none may be negative, and `statements`' sequence of an
/// account never goes back (its cursor commits with its view).
pub(crate) async fn watch(
    clients: Clients,
    statements: String,
    watched: Arc<Mutex<Watched>>,
    seed: u64,
    reads: Arc<AtomicU64>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let timeout = Duration::from_millis(ATTEMPT_TIMEOUT_MILLIS);
    while !clients.stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(WATCH_EVERY_MILLIS)).await;
        let account = &clients.accounts[rng.random_range(0..clients.accounts.len())];
        let endpoint = &clients.endpoints[rng.random_range(0..clients.endpoints.len())];
        let producer = clients
            .http
            .get(
                &format!("{endpoint}/accounts/{account}"),
                Some(&clients.token),
                timeout,
            )
            .await;
        if let Some(reply) = producer.ok().filter(|r| r.status == 200) {
            let json = reply.json().unwrap_or_default();
            let mut watched = watched.lock().unwrap();
            watched.producer_reads += 1;
            if json["balance"].as_i64().is_none_or(|b| b < 0) {
                watched.violations.push(format!(
                    "GET {endpoint}/accounts/{account} answered {json}: not a balance ≥ 0"
                ));
            }
        }
        let consumer = clients
            .http
            .get(
                &format!("{statements}/balances/{account}"),
                Some(&clients.token),
                timeout,
            )
            .await;
        if let Some(reply) = consumer.ok().filter(|r| r.status == 200) {
            reads.fetch_add(1, Ordering::Relaxed);
            let json = reply.json().unwrap_or_default();
            let mut watched = watched.lock().unwrap();
            match (json["balance"].as_i64(), json["sequence"].as_u64()) {
                (Some(balance), Some(sequence)) if balance >= 0 => {
                    let seen = watched.statements.entry(account.clone()).or_default();
                    if let Some(last) = seen.last().filter(|l| l.sequence > sequence) {
                        let message = format!(
                            "statements' sequence of {account} went back from {} to {sequence}",
                            last.sequence
                        );
                        watched.violations.push(message);
                    } else {
                        seen.push(Seen {
                            sequence,
                            balance: balance.unsigned_abs(),
                        });
                    }
                }
                _ => watched.violations.push(format!(
                    "GET {statements}/balances/{account} answered {json}: not a balance ≥ 0 at \
                     a sequence"
                )),
            }
        }
    }
}
