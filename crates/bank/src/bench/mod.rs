//! `bank bench`: the bank's figures, each beside a bound measured in the same run.
//!
//! - **Commands/s** through `accounts` over loopback HTTP, `--clients` concurrent clients
//!   (keep-alive connections, each on its own account), on the embedded store and, with
//!   `--postgres`, on PostgreSQL; the latency of each command (p50 / p99). Bound: the raw event
//!   store's durable appends with as many writers on the same disk / the same server
//!   ([`raw`]).
//! - **Append → applied** in `statements`' view, p50 / p99, through the HTTP feed and, with
//!   `--amqp`, through RabbitMQ: deposits paced at `--probe-rate` (latency, not saturation), from
//!   each event's time at the producer (its CloudEvents `time`) to its commit in the view. Bound:
//!   the feed API's long-poll wake-up alone, on the same events ([`latency`]).
//!
//! Both services run in this process (`accounts::start`, `statements::start`), on stores in a
//! fresh working directory; the clients reach them over loopback HTTP as any client would.

mod latency;
mod load;
mod raw;
mod report;
mod services;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use headwater::store::EmbeddedStore;
use headwater::store::postgres::{Options as PgOptions, PostgresStore};
use indicatif::{ProgressBar, ProgressStyle};

use report::{Commands, Machine, Report, RunFigures, Setup};

/// The most runs of one benchmark.
const RUNS_MAX: u32 = 20;
/// The most concurrent clients.
const CLIENTS_MAX: u32 = 1_024;
/// The longest timed phase, in seconds (a guard against typos such as `--phase-secs 5000`).
const PHASE_SECS_MAX: f64 = 3_600.0;
/// The fastest probe rate of the latency figures, in commands per second.
const PROBE_RATE_MAX: u32 = 10_000;
/// The prefix of the PostgreSQL schemas the benchmark creates (and drops).
const SCHEMA_PREFIX: &str = "bank_bench_";

/// The flags of `bank bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to run: the benchmark creates a fresh working directory inside DIR (the embedded
    /// stores and views) and removes it at the end. Put it on the disk to measure.
    /// [default: $TMPDIR, or /tmp]
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Also measure `accounts` on this PostgreSQL server (`postgres://USER@HOST:PORT/DB`): each
    /// run uses fresh schemas `bank_bench_*`, dropped at its end.
    #[arg(long, value_name = "URL")]
    pub postgres: Option<String>,

    /// Also measure append → applied through this RabbitMQ broker
    /// (`amqp://USER:PASSWORD@HOST:PORT/VHOST`).
    #[arg(long, value_name = "URL")]
    pub amqp: Option<String>,

    /// Runs of the whole benchmark, each on fresh stores; every figure is then the median of
    /// the runs.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(RUNS_MAX)))]
    pub runs: u32,

    /// A run of a few seconds: short phases. A smoke test: its figures mean little.
    #[arg(long)]
    pub quick: bool,

    /// Concurrent clients of the command figures (and writers of their bound).
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(CLIENTS_MAX)))]
    pub clients: u32,

    /// How long each command figure (and its bound) runs, in seconds.
    /// [default: 10; with --quick: 1]
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub phase_secs: Option<Duration>,

    /// Deposits per second of the append → applied figures (paced, whatever the answers).
    #[arg(long, value_name = "N", default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(PROBE_RATE_MAX)))]
    pub probe_rate: u32,

    /// How long each append → applied figure runs, in seconds. [default: 10; with --quick: 1]
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub probe_secs: Option<Duration>,

    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

fn parse_secs(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= PHASE_SECS_MAX) {
        return Err(format!(
            "{text} is outside the range of a phase (0 < SECS <= {PHASE_SECS_MAX})"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Every size and duration of one run, with `--quick` and the defaults resolved.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub(crate) clients: u32,
    pub(crate) phase: Duration,
    pub(crate) probe_rate: u32,
    pub(crate) probe: Duration,
}

impl Plan {
    fn from_args(args: &Args) -> Plan {
        let quick_or = |secs: u64| {
            if args.quick {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(secs)
            }
        };
        Plan {
            clients: args.clients,
            phase: args.phase_secs.unwrap_or_else(|| quick_or(10)),
            probe_rate: args.probe_rate,
            probe: args.probe_secs.unwrap_or_else(|| quick_or(10)),
        }
    }
}

/// Runs `bank bench`: `--runs` runs, then the report (markdown on stdout, JSON with `--json`).
///
/// # Errors
/// When a service cannot start, a store or broker cannot be reached, or a command fails.
///
/// # Cancel safety
/// Not cancel safe: stopping it mid-run leaves the working directory and schemas behind.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let plan = Plan::from_args(&args);
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    if !parent.is_dir() {
        bail!(
            "--dir {}: no such directory (the benchmark creates its working directory inside it)",
            parent.display()
        );
    }
    let workdir = tempfile::Builder::new()
        .prefix("bank-bench-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a working directory in {}", parent.display()))?;
    let machine = Machine::describe(workdir.path());
    let setup = Setup {
        command: report::command_line(),
        started_utc: utc_now(),
        runs: usize::try_from(args.runs).unwrap_or(1),
        quick: args.quick,
        clients: plan.clients,
        phase_secs: plan.phase.as_secs_f64(),
        probe_rate: plan.probe_rate,
        probe_secs: plan.probe.as_secs_f64(),
    };
    tracing::info!(dir = %workdir.path().display(), "bank bench starting");

    let mut runs = Vec::new();
    for run in 1..=args.runs {
        if args.runs > 1 {
            tracing::info!(run, of = args.runs, "run starting");
        }
        let dir = workdir.path().join(format!("run-{run}"));
        std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut figures = RunFigures::default();

        // Commands on the embedded store, after the raw store's bound on the same disk.
        let load = report::load_average();
        let raw = EmbeddedStore::open(dir.join("raw"))
            .with_context(|| format!("cannot open a raw store in {}", dir.display()))?;
        let bound = raw::appends(Arc::new(raw), &plan, "bound: raw embedded store").await?;
        let service = load::on_service(&dir.join("accounts"), None, &plan, run).await?;
        figures.embedded = Some(Commands {
            service: service.commands.summary(),
            bound: bound.summary(),
            refused: service.refused,
            load,
        });

        if let Some(url) = &args.postgres {
            let load = report::load_average();
            let schema = format!("{SCHEMA_PREFIX}raw_{:016x}", rand::random::<u64>());
            let raw = PostgresStore::connect(url, PgOptions::with_schema(&schema))
                .await
                .context("cannot connect the raw PostgreSQL store (--postgres)")?;
            let bound = raw::appends(Arc::new(raw), &plan, "bound: raw PostgreSQL store").await;
            drop_schema(url, &schema).await;
            let bound = bound?;
            let service = load::on_service(&dir.join("accounts-pg"), Some(url), &plan, run).await?;
            figures.postgres = Some(Commands {
                service: service.commands.summary(),
                bound: bound.summary(),
                refused: service.refused,
                load,
            });
        }

        let mut http = latency::applied(&dir.join("http"), None, &plan).await?;
        http.load = report::load_average();
        figures.http_feed = Some(http);
        if let Some(amqp) = &args.amqp {
            let load = report::load_average();
            let mut figure = latency::applied(&dir.join("amqp"), Some(amqp), &plan).await?;
            figure.load = load;
            figures.amqp = Some(figure);
        }
        runs.push(figures);
        // The next run starts on an empty disk, as this one did.
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
    }

    let report = Report {
        setup,
        machine,
        runs,
    };
    print!("{}", report.markdown());
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Drops a schema the benchmark made; a failure is logged (the figures still count).
pub(crate) async fn drop_schema(url: &str, schema: &str) {
    use headwater::consume::tokio_postgres;
    let dropped = async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let connection = tokio::spawn(connection);
        // The name is ours: a constant prefix and hex digits, nothing to quote.
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await?;
        drop(client);
        let _ = connection.await;
        anyhow::Ok(())
    };
    if let Err(error) = dropped.await {
        tracing::warn!(%schema, "could not drop the benchmark's schema: {error:#}");
    }
}

/// A progress bar on stderr (drawn only on a terminal).
pub(crate) fn progress_bar(label: &str, length: u64, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(length);
    let template = format!("{{msg:40}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{elapsed}})");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(label.to_owned());
    bar
}

/// Now, as `YYYY-MM-DD HH:MM` in UTC.
fn utc_now() -> String {
    let now = std::time::SystemTime::now();
    let text = humantime::format_rfc3339_seconds(now).to_string();
    text.replace('T', " ")
        .trim_end_matches('Z')
        .get(..16)
        .unwrap_or(&text)
        .to_owned()
}
