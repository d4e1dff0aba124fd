//! The clients: concurrent tasks sending deposits and withdrawals with command ids to the
//! `accounts` replicas, each command retried with the SAME id on a timeout, a connection error or
//! a 5xx until it gets an answer — acknowledged (200) or refused for insufficient funds (409) —,
//! and the ledger of those answers. And the watchers, which read balances while the test runs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bank::client::{Answer, Client};
use headwater::Uuid;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::http::Http;

/// One attempt of a command may take this long before it is retried, in milliseconds.
pub(crate) const ATTEMPT_TIMEOUT_MILLIS: u64 = 3_000;
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
    Open,
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
                        Op::Open => 0,
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

/// One attempt of a command through `client` (of an `accounts` replica).
async fn attempt(client: &Client, account: &str, op: Op, amount: u64, command_id: Uuid) -> Attempt {
    let answer = match op {
        Op::Open => client.open(account, "e2e", command_id).await,
        Op::Deposit => client.deposit(account, amount, command_id).await,
        Op::Withdraw => client.withdraw(account, amount, command_id).await,
    };
    match answer {
        Ok(Answer::Done(balance)) => Attempt::Done {
            balance: balance.balance,
            version: balance.version(),
        },
        Ok(Answer::Refused(problem)) => Attempt::Refused {
            kind: format!("{} {}", problem.status, problem.kind()),
            body: format!("{problem:?}"),
        },
        Err(error) if error.is_retryable() => Attempt::Again(error.to_string()),
        Err(error) => Attempt::Refused {
            kind: "unexpected answer".to_owned(),
            body: error.to_string(),
        },
    }
}

/// What the clients share.
#[derive(Clone, Debug)]
pub(crate) struct Clients {
    pub(crate) http: Http,
    /// `bank::client` clients of the `accounts` replicas, for the commands.
    pub(crate) commands: Arc<Vec<Client>>,
    /// The replicas' URLs, for the watchers' own reads.
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
            let command_id = Uuid::new_v4();
            let started = Instant::now();
            loop {
                let client = &self.commands[rng.random_range(0..self.commands.len())];
                match attempt(client, account, Op::Open, 0, command_id).await {
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
                Op::Withdraw => rng.random_range(1..=AMOUNT_CENTS_MAX * 3 / 2),
                _ => rng.random_range(1..=AMOUNT_CENTS_MAX),
            };
            self.execute(&mut rng, &account, op, amount).await;
        }
    }

    /// Sends one command with a new command id, again with the same id until it gets an answer
    /// (or for [`COMMAND_SECS_MAX`]), and records the answer in the ledger.
    pub(crate) async fn execute(&self, rng: &mut StdRng, account: &str, op: Op, amount: u64) {
        let command_id = Uuid::new_v4();
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let client = &self.commands[rng.random_range(0..self.commands.len())];
            let outcome = attempt(client, account, op, amount, command_id).await;
            let answered = {
                let mut ledger = self.ledger.lock().unwrap();
                match outcome {
                    Attempt::Done { balance, version } => {
                        ledger.retried_commands += u64::from(attempts > 1);
                        let acked = Acked {
                            command_id,
                            op,
                            amount,
                            balance,
                            version,
                            attempts,
                        };
                        ledger
                            .acked
                            .entry(account.to_owned())
                            .or_default()
                            .push(acked);
                        true
                    }
                    Attempt::Refused { kind, .. }
                        if op == Op::Withdraw && kind == "409 insufficient-funds" =>
                    {
                        ledger.retried_commands += u64::from(attempts > 1);
                        *ledger.refused.entry(account.to_owned()).or_default() += 1;
                        true
                    }
                    Attempt::Refused { kind, body } => {
                        ledger.violations.push(format!(
                            "{op:?} of {amount} on {account} ({command_id}, attempt {attempts}): \
                             refused {kind}: {body}"
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
                return;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(RETRY_PAUSE_MILLIS))).await;
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
