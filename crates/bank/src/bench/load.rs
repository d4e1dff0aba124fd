//! The command load: `plan.clients` clients, each with its own keep-alive connection to
//! `accounts` on loopback and its own account, open it, then alternate deposits and withdrawals
//! (never refused: each withdrawal takes half the deposit before it) as fast as the answers come,
//! for `plan.phase`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use headwater::Uuid;
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use super::raw::millis;
use super::report::{Throughput, cpu_since, cpu_time};
use super::services::System;
use super::{Plan, progress_bar};
use crate::client::{Answer, Client, ClientError};

/// Cents of each deposit.
const DEPOSIT_CENTS: u64 = 1_000;
/// Cents of each withdrawal (half a deposit: the balance only grows).
const WITHDRAWAL_CENTS: u64 = 500;

/// Attempts of one command before the benchmark gives up on it.
const COMMAND_ATTEMPTS: u32 = 10;
/// The pause before sending a command again.
const RETRY_PAUSE: Duration = Duration::from_millis(10);

/// Sends a command until it gets an answer of the API: again, with the same command id, after
/// a transport error, a timeout or a 5xx (a 503 when the store is unavailable or the account's
/// stream kept changing under the command), as a client of the API must; at most
/// [`COMMAND_ATTEMPTS`] times.
pub(crate) async fn answered<F, Fut>(what: &str, mut send: F) -> anyhow::Result<Answer>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Answer, ClientError>>,
{
    let mut attempt = 1;
    loop {
        match send().await {
            Ok(answer) => return Ok(answer),
            Err(error) if error.is_retryable() && attempt < COMMAND_ATTEMPTS => {
                tracing::debug!(%error, attempt, "{what}: sending it again");
                attempt += 1;
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(error) => {
                return Err(anyhow::Error::new(error)
                    .context(format!("{what} (attempt {attempt} of {COMMAND_ATTEMPTS})")));
            }
        }
    }
}

/// What the clients did.
#[derive(Debug)]
pub(crate) struct Load {
    pub(crate) commands: Throughput,
    pub(crate) refused: u64,
}

/// Starts `accounts` (data in `dir`, or on `postgres`), runs the load, stops it. Account ids
/// are unique per run.
pub(crate) async fn on_service(
    dir: &std::path::Path,
    postgres: Option<&str>,
    plan: &Plan,
    run: u32,
) -> anyhow::Result<Load> {
    let system = System::start(dir, postgres, None).await?;
    let label = if postgres.is_some() {
        "commands: accounts on PostgreSQL"
    } else {
        "commands: accounts, embedded store"
    };
    let prefix = format!("bench-{run}-{}", &Uuid::new_v4().simple().to_string()[..8]);
    let load = commands(&system.accounts_url(), &prefix, plan, label).await;
    system.shutdown().await;
    load
}

/// Runs the load against `accounts` at `base_url`. Account ids start with `prefix` (unique per
/// run: a PostgreSQL database may hold the accounts of earlier runs).
pub(crate) async fn commands(
    base_url: &str,
    prefix: &str,
    plan: &Plan,
    label: &str,
) -> anyhow::Result<Load> {
    let clients = usize::try_from(plan.clients).unwrap_or(usize::MAX);
    // Everyone starts the timed phase together, once every account is open.
    let opened = Arc::new(Barrier::new(clients + 1));
    let started = Arc::new(tokio::sync::OnceCell::<Instant>::new());
    let bar = progress_bar(label, millis(plan.phase), "ms");
    let mut tasks = JoinSet::new();
    for n in 0..plan.clients {
        let client = Client::new(base_url).context("cannot make an HTTP client")?;
        let id = format!("{prefix}-{n}");
        let opened = Arc::clone(&opened);
        let started = Arc::clone(&started);
        let bar = bar.clone();
        let phase = plan.phase;
        tasks.spawn(async move {
            let open = client.open(&id, "Bench", Uuid::new_v4()).await;
            // Wait for the others even after a failure, or they would wait forever.
            opened.wait().await;
            match open.with_context(|| format!("open {id}"))? {
                Answer::Done(_) => {}
                Answer::Refused(problem) => bail!("open {id} refused: {problem:?}"),
            }
            let start = *started.get_or_init(|| async { Instant::now() }).await;
            let deadline = start + phase;
            let mut done = Throughput::new();
            let mut refused = 0;
            let mut deposit = true;
            while Instant::now() < deadline {
                let command_id = Uuid::new_v4();
                let sent = Instant::now();
                let answer = answered(&format!("a command on {id}"), || async {
                    if deposit {
                        client.deposit(&id, DEPOSIT_CENTS, command_id).await
                    } else {
                        client.withdraw(&id, WITHDRAWAL_CENTS, command_id).await
                    }
                })
                .await?;
                let took = sent.elapsed();
                match answer {
                    Answer::Done(_) => done.record(took),
                    Answer::Refused(problem) => {
                        refused += 1;
                        tracing::warn!(account = %id, ?problem, "a benchmark command was refused");
                    }
                }
                deposit = !deposit;
                bar.set_position(millis(start.elapsed()));
            }
            anyhow::Ok((done, refused))
        });
    }
    opened.wait().await;
    let started_at = Instant::now();
    let cpu_before = cpu_time();
    let mut total = Throughput::new();
    let mut refused = 0;
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined.context("a client task panicked")? {
            Ok((done, r)) => {
                total.merge(&done);
                refused += r;
            }
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    let start = started.get().copied().unwrap_or(started_at);
    total.finish(start.elapsed());
    total.set_cpu(cpu_since(cpu_before));
    bar.finish_and_clear();
    tracing::info!(
        figure = label,
        commands_per_sec = format_args!("{:.0}", total.per_second()),
        "command figure"
    );
    Ok(Load {
        commands: total,
        refused,
    })
}
