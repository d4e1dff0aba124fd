//! `bank`: Headwater's reference system — the `accounts` producer, the `statements` consumer,
//! the `demo` that runs both through a lossy link, and the `bench` of the whole.
//!
//! Exit codes: 0 when the work is done (for `demo`: the consumer converged to the producer),
//! 1 when it failed (for `demo`: it did not), 2 on usage errors.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Headwater's reference system: two services that keep account balances consistent across a
/// feed that may lose, duplicate and reorder events.
///
/// Logs go to stderr (filter them with `RUST_LOG`, e.g. `RUST_LOG=debug`).
#[derive(Debug, Parser)]
#[command(name = "bank", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the `accounts` service (the producer): commands over HTTP, the `accounts` feeds (v1 and
    /// v2) under `/feeds`, published to RabbitMQ or NATS when asked.
    Accounts(bank::accounts::Args),
    /// Run the `statements` service (the consumer): every account's balance from the `accounts`
    /// feed, healed, bootstrapped on demand and reconstituted.
    Statements(bank::statements::Args),
    /// Run both services in one process through a link that loses, duplicates and reorders
    /// events on purpose, then check that the consumer converged to the producer.
    Demo(bank::demo::Args),
    /// Measure the bank: commands/s and latency through `accounts` over HTTP, append → applied
    /// latency through the HTTP feed and RabbitMQ.
    Bench(bank::bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo talks to people on the screen: only warnings and errors from its services, unless
    // RUST_LOG asks for more.
    let default_filter = match cli.command {
        Command::Demo(_) => "warn",
        _ => "info",
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Accounts(args) => bank::accounts::run(args).await,
            Command::Statements(args) => bank::statements::run(args).await,
            Command::Demo(args) => bank::demo::run(args).await,
            Command::Bench(args) => bank::bench::run(args).await,
        }
    });
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
