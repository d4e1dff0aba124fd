//! The demo's commands: concurrent clients sending random opens, deposits and withdrawals to
//! `accounts` over HTTP, and the ledger of what `accounts` acknowledged.
//!
//! The ledger is what the verdict checks the producer against: for every account, the producer's
//! balance must be the sum of the acknowledged deposits minus the acknowledged withdrawals (each
//! counted once, each refused one not at all). It also counts the events each feed version must
//! hold, so the demo knows when the link has read everything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use headwater::Uuid;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::progress::Gauges;
use super::report::Commands;
use crate::client::{Answer, Client, ClientError, Problem};

/// The largest deposit, in cents (100.00 EUR).
const DEPOSIT_CENTS_MAX: u64 = 10_000;
/// The largest withdrawal asked, in cents: larger than a deposit, so some are refused.
const WITHDRAWAL_CENTS_MAX: u64 = 15_000;
/// The chance that a deposit (rather than a withdrawal) is sent to an open account.
const DEPOSIT_CHANCE: f64 = 0.55;
/// The chance that a command is sent a second time with the same command id.
const RETRY_CHANCE: f64 = 0.02;
/// Attempts of one command whose answer did not arrive (timeouts, connection errors), each with
/// the same command id.
const ATTEMPTS_MAX: u32 = 10;
/// The wait between two attempts.
const ATTEMPT_BACKOFF: Duration = Duration::from_millis(100);
/// Tries at finding an account no other client is opening right now.
const PICK_TRIES_MAX: usize = 8;

/// An account's id in the demo: `acc-00042`.
pub(super) fn account_id(index: usize) -> String {
    format!("acc-{index:05}")
}

/// What `accounts` acknowledged for one account.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Tally {
    state: State,
    /// Acknowledged deposits minus acknowledged withdrawals, in cents.
    pub(super) net: i128,
    /// Events of the account in feed v1 (opened, deposited, withdrew).
    pub v1_events: u64,
    /// Events in feed v2 (v1's and the refused withdrawals).
    pub v2_events: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum State {
    #[default]
    Unopened,
    /// A client is opening it.
    Opening,
    Open,
}

/// Every account's tally.
#[derive(Debug)]
pub(super) struct Ledger {
    accounts: Vec<Tally>,
}

impl Ledger {
    pub(super) fn new(accounts: usize) -> Ledger {
        Ledger {
            accounts: vec![Tally::default(); accounts],
        }
    }

    pub(super) fn tallies(&self) -> &[Tally] {
        &self.accounts
    }

    /// Events feed v1 must hold.
    pub(super) fn v1_events(&self) -> u64 {
        self.accounts.iter().map(|t| t.v1_events).sum()
    }

    /// Events feed v2 must hold.
    pub(super) fn v2_events(&self) -> u64 {
        self.accounts.iter().map(|t| t.v2_events).sum()
    }

    /// The accounts that were opened.
    pub(super) fn opened(&self) -> impl Iterator<Item = usize> + '_ {
        self.accounts
            .iter()
            .enumerate()
            .filter(|(_, t)| t.state == State::Open)
            .map(|(i, _)| i)
    }
}

/// A command, kept to be sent again with the same id.
#[derive(Clone, Copy, Debug)]
enum Command {
    Open,
    Deposit(u64),
    Withdraw(u64),
}

/// The counters of a run of commands, shared by its clients.
#[derive(Debug, Default)]
struct Counts {
    done: AtomicU64,
    insufficient: AtomicU64,
    refused_other: AtomicU64,
    retried: AtomicU64,
    retry_mismatches: AtomicU64,
}

/// What to send.
#[derive(Clone, Copy, Debug)]
pub(super) struct Plan {
    pub(super) commands: u64,
    pub(super) clients: usize,
    /// Commands per second at most (0: as fast as the clients go).
    pub(super) rate: u64,
    /// The seed of the clients' choices.
    pub(super) seed: u64,
}

/// Sends `plan.commands` random commands over the ledger's accounts with `plan.clients`
/// concurrent clients, at most `plan.rate` a second, and returns what became of them.
///
/// # Errors
/// When `accounts` does not answer a command after [`ATTEMPTS_MAX`] attempts, or answers what
/// the contract does not allow (the ledger would not know the command's outcome).
///
/// # Cancel safety
/// Not cancel safe: a command cancelled in flight leaves its outcome unknown to the ledger.
pub(super) async fn run(
    client: &Arc<Client>,
    ledger: &Arc<Mutex<Ledger>>,
    gauges: &Arc<Gauges>,
    plan: Plan,
) -> anyhow::Result<Commands> {
    let Plan {
        commands: total,
        clients,
        rate,
        seed,
    } = plan;
    let started = Instant::now();
    let start = tokio::time::Instant::now();
    // Command k is sent no earlier than k / rate seconds after the start.
    let interval = (rate > 0).then(|| Duration::from_secs_f64(1.0 / rate as f64));
    let next = Arc::new(AtomicU64::new(0));
    let counts = Arc::new(Counts::default());
    let sent_before = gauges.commands_sent.load(Ordering::Relaxed);
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..clients.max(1) {
        let (client, ledger, gauges) = (client.clone(), ledger.clone(), gauges.clone());
        let (next, counts) = (next.clone(), counts.clone());
        // Each client its own stream of choices, from the run's seed.
        let mut rng =
            StdRng::seed_from_u64(seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        tasks.spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= total {
                    break;
                }
                if let Some(interval) = interval {
                    tokio::time::sleep_until(start + interval.mul_f64(k as f64)).await;
                }
                if !one(&client, &ledger, &counts, &mut rng).await? {
                    gauges.commands_refused.fetch_add(1, Ordering::Relaxed);
                }
                gauges.commands_sent.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("a client task failed")??;
    }
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mismatches = get(&counts.retry_mismatches);
    anyhow::ensure!(
        mismatches == 0,
        "{mismatches} commands sent again with the same command id were answered differently (idempotency broken)"
    );
    Ok(Commands {
        sent: gauges.commands_sent.load(Ordering::Relaxed) - sent_before,
        done: get(&counts.done),
        insufficient_funds: get(&counts.insufficient),
        refused_other: get(&counts.refused_other),
        retried: get(&counts.retried),
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// One random command: an open of an account not open yet, else a deposit or a withdrawal.
/// `true` when it was done, `false` when refused.
async fn one(
    client: &Client,
    ledger: &Mutex<Ledger>,
    counts: &Counts,
    rng: &mut StdRng,
) -> anyhow::Result<bool> {
    let (index, command) = {
        let mut ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
        let accounts = ledger.accounts.len();
        let mut pick = rng.random_range(0..accounts);
        for _ in 0..PICK_TRIES_MAX {
            if ledger.accounts[pick].state != State::Opening {
                break;
            }
            pick = rng.random_range(0..accounts);
        }
        let tally = &mut ledger.accounts[pick];
        let command = match tally.state {
            State::Unopened => {
                tally.state = State::Opening;
                Command::Open
            }
            // Opened by another client right now: open it again (refused, already open).
            State::Opening => Command::Open,
            State::Open if rng.random_bool(DEPOSIT_CHANCE) => {
                Command::Deposit(rng.random_range(1..=DEPOSIT_CENTS_MAX))
            }
            State::Open => Command::Withdraw(rng.random_range(1..=WITHDRAWAL_CENTS_MAX)),
        };
        (pick, command)
    };
    let id = account_id(index);
    let command_id = Uuid::new_v4();
    let answer = send(client, &id, command, command_id).await?;
    {
        let mut ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
        let tally = &mut ledger.accounts[index];
        match (&answer, command) {
            (Answer::Done(_), Command::Open) => {
                tally.state = State::Open;
                tally.v1_events += 1;
                tally.v2_events += 1;
            }
            (Answer::Done(_), Command::Deposit(amount)) => {
                tally.net += i128::from(amount);
                tally.v1_events += 1;
                tally.v2_events += 1;
            }
            (Answer::Done(_), Command::Withdraw(amount)) => {
                tally.net -= i128::from(amount);
                tally.v1_events += 1;
                tally.v2_events += 1;
            }
            (Answer::Refused(problem), Command::Withdraw(_)) if is_insufficient(problem) => {
                // Recorded by `accounts` as a private event, public in v2 only.
                tally.v2_events += 1;
            }
            (Answer::Refused(_), _) => {}
        }
    }
    match &answer {
        Answer::Done(_) => counts.done.fetch_add(1, Ordering::Relaxed),
        Answer::Refused(problem) if is_insufficient(problem) => {
            counts.insufficient.fetch_add(1, Ordering::Relaxed)
        }
        Answer::Refused(_) => counts.refused_other.fetch_add(1, Ordering::Relaxed),
    };
    // Now and then the same command again, with the same id: the original answer, nothing
    // changed (G3).
    if rng.random_bool(RETRY_CHANCE) {
        let again = send(client, &id, command, command_id).await?;
        counts.retried.fetch_add(1, Ordering::Relaxed);
        if !same_answer(&answer, &again) {
            tracing::error!(account = %id, ?answer, ?again, "a command sent again with its command id was answered differently");
            counts.retry_mismatches.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(matches!(answer, Answer::Done(_)))
}

/// Sends a deposit of `amount` cents to each of `accounts`, with no randomness: the demo's "last
/// events", which the link will lose.
///
/// # Errors
/// As [`run`].
///
/// # Cancel safety
/// Not cancel safe (as [`run`]).
pub(super) async fn last_deposits(
    client: &Client,
    ledger: &Mutex<Ledger>,
    accounts: &[usize],
    amount: u64,
) -> anyhow::Result<()> {
    for &index in accounts {
        let id = account_id(index);
        match send(client, &id, Command::Deposit(amount), Uuid::new_v4()).await? {
            Answer::Done(_) => {
                let mut ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
                let tally = &mut ledger.accounts[index];
                tally.net += i128::from(amount);
                tally.v1_events += 1;
                tally.v2_events += 1;
            }
            Answer::Refused(problem) => {
                anyhow::bail!("the last deposit to {id} was refused: {problem:?}")
            }
        }
    }
    Ok(())
}

/// Opens `count` new accounts, each with a deposit of `amount` cents (accounts the link will
/// never deliver: the demo then reads them through `statements`, which bootstraps them on
/// demand). Returns their indexes.
///
/// # Errors
/// As [`run`], and when `accounts` refuses one of these commands.
///
/// # Cancel safety
/// Not cancel safe (as [`run`]).
pub(super) async fn open_new(
    client: &Client,
    ledger: &Mutex<Ledger>,
    count: usize,
    amount: u64,
) -> anyhow::Result<Vec<usize>> {
    let mut opened = Vec::with_capacity(count);
    for _ in 0..count {
        let index = {
            let mut ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
            ledger.accounts.push(Tally {
                state: State::Opening,
                ..Tally::default()
            });
            ledger.accounts.len() - 1
        };
        let id = account_id(index);
        match send(client, &id, Command::Open, Uuid::new_v4()).await? {
            Answer::Done(_) => {
                let mut ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
                let tally = &mut ledger.accounts[index];
                tally.state = State::Open;
                tally.v1_events += 1;
                tally.v2_events += 1;
            }
            Answer::Refused(problem) => {
                anyhow::bail!("the opening of {id} was refused: {problem:?}")
            }
        }
        last_deposits(client, ledger, &[index], amount).await?;
        opened.push(index);
    }
    Ok(opened)
}

/// Sends one command until it is answered, retrying with the same command id when the answer did
/// not arrive.
async fn send(
    client: &Client,
    id: &str,
    command: Command,
    command_id: Uuid,
) -> anyhow::Result<Answer> {
    let mut attempt = 1;
    loop {
        let answer = match command {
            Command::Open => client.open(id, "Ada", command_id).await,
            Command::Deposit(amount) => client.deposit(id, amount, command_id).await,
            Command::Withdraw(amount) => client.withdraw(id, amount, command_id).await,
        };
        match answer {
            Ok(answer) => return Ok(answer),
            Err(error) if attempt < ATTEMPTS_MAX && retryable(&error) => {
                tracing::debug!(account = id, %error, attempt, "no answer; sending the command again with its id");
                attempt += 1;
                tokio::time::sleep(ATTEMPT_BACKOFF).await;
            }
            Err(error) => {
                return Err(anyhow::Error::new(error)
                    .context(format!("{command:?} to {id}: accounts did not answer")));
            }
        }
    }
}

/// A withdrawal refused for insufficient funds (the one refusal `accounts` records).
fn is_insufficient(problem: &Problem) -> bool {
    problem.kind() == "insufficient-funds"
}

/// Whether a command's answer can change by sending it again with the same id.
fn retryable(error: &ClientError) -> bool {
    error.is_retryable()
}

/// The same outcome: the same balance and version after it, or the same refusal.
fn same_answer(first: &Answer, again: &Answer) -> bool {
    match (first, again) {
        (Answer::Done(a), Answer::Done(b)) => {
            a.balance == b.balance && a.version_or_sequence == b.version_or_sequence
        }
        (Answer::Refused(a), Answer::Refused(b)) => a.kind() == b.kind(),
        _ => false,
    }
}
