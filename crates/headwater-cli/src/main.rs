//! `headwater`, the operator's tool: inspect a store, verify its integrity, run the benchmarks,
//! ask a consumer service for a reconstitution walk.
//!
//! Exit codes: 0 when the work is done, 1 when it failed or a check found damage (`verify`),
//! 2 on usage errors.

mod bench;
mod feed_http;
mod feed_open;
mod feed_tools;
mod pg_tools;
mod reconstitute;
mod store_arg;
mod store_tools;
mod text;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// The operator's tool for Headwater event stores.
///
/// Logs go to stderr (filter them with `RUST_LOG`, e.g. `RUST_LOG=debug`); results go to stdout.
#[derive(Debug, Parser)]
#[command(name = "headwater", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show what a store holds: streams, event counts, head position, size on disk (an embedded
    /// store's directory, or a PostgreSQL store with `--postgres URL`).
    Inspect(store_tools::InspectArgs),
    /// Check a store's integrity: contiguous versions and positions, checksums (embedded), heads
    /// (an embedded store's directory, or a PostgreSQL store with `--postgres URL`).
    ///
    /// Exits 0 when the store is sound and 1, with a report of each problem, when it is not.
    Verify(store_tools::VerifyArgs),
    /// Measure the event store on this machine's disk, beside the fsync bound and SPEC's aims.
    ///
    /// One run measures: the fsync bound (write + fdatasync of one record, on a growing file and
    /// on pre-allocated space); durable appends with 1 writer, with many concurrent writers on
    /// distinct streams, and in batches (1 and several writers); reading one large stream and the
    /// whole log forward; peak memory and memory as the store grows. Prints a markdown table
    /// (for BENCHMARKS.md) with the machine and the command line; `--json` writes the same as
    /// JSON. A default run takes 1–2 minutes; `--quick` a few seconds (a smoke test, not a
    /// measurement).
    Bench(bench::BenchArgs),
    /// Show a producer's integration feeds: status (backfilling, live, retired), head, how far
    /// the projector is through the log, and which readers (token names) read each version and
    /// when last — what to look at before retiring a version.
    Feeds(feed_tools::FeedsArgs),
    /// Print a feed's events (the last ones, or one subject's), and with `--follow` the new ones
    /// as they come.
    Tail(feed_tools::TailArgs),
    /// Retire a feed version: the feed API then answers 410 Gone for it, naming the newer
    /// version, and its projector stops. Refused while a reader read it within `--idle-secs`
    /// or when no newer version is live, unless `--force`. An embedded store must not be open
    /// in its service.
    Retire(feed_tools::RetireArgs),
    /// Ask a running consumer service for a reconstitution walk now and follow it: every
    /// subject its producer lists is compared with the service's cursor and what is behind is
    /// fetched (the walker's `POST /reconstitute`, then `GET /reconstitute` until it ends).
    ///
    /// A walk running already is not disturbed: the request is served by the next walk, which
    /// starts right after it. Exits 0 when the walk went through every subject without a
    /// failure, 1 when some subjects could not be caught up, the walk was interrupted, or the
    /// service could not be reached.
    Reconstitute(reconstitute::ReconstituteArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let outcome = match cli.command {
        Command::Inspect(args) => store_tools::inspect(&args),
        Command::Verify(args) => store_tools::verify(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Feeds(args) => feed_tools::feeds(&args),
        Command::Tail(args) => feed_tools::tail(&args),
        Command::Retire(args) => feed_tools::retire(&args),
        Command::Reconstitute(args) => reconstitute::reconstitute(&args),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error}");
            let mut said = error.to_string();
            for cause in error.chain().skip(1) {
                let cause = cause.to_string();
                // Some errors repeat their source in their own message: say it once.
                if !said.ends_with(&cause) {
                    eprintln!("  caused by: {cause}");
                }
                said = cause;
            }
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}
