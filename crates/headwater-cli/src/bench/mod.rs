//! `headwater bench`: the project's benchmark, on the disk where the store lives.
//!
//! - `fsync`: the bound every durable store is measured against (a plain write + fdatasync loop);
//! - `store`: the workloads, generic over [`EventStore`], so every backend runs the same ones;
//! - `system`: the machine and the process's memory, from `/proc`;
//! - `report`: the figures beside their comparisons, as a markdown table and as JSON.

mod consume;
mod feeds;
mod fsync;
mod postgres;
mod publish;
mod publish_broker;
mod report;
mod store;
mod system;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use headwater_core::limits::APPEND_EVENTS_MAX;
use headwater_embedded::EmbeddedStore;
use headwater_store::{EventStore, MemoryStore};
use indicatif::{ProgressBar, ProgressStyle};

/// The size of one record of the fsync loop by default, in bytes: about what one appended event
/// of the benchmark takes on disk (its ~150-byte JSON data, id, stream, type, metadata, framing).
const RECORD_BYTES_DEFAULT: u64 = 256;
/// The largest fsync record, in bytes.
const RECORD_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// The longest timed phase, in seconds (a guard against typos such as `--phase-secs 5000`).
const PHASE_SECS_MAX: f64 = 3_600.0;
/// The most concurrent writers.
const WRITERS_MAX: u32 = 10_000;
/// The most runs of one benchmark.
const RUNS_MAX: u32 = 20;
/// The most events the store may be filled with.
const EVENTS_MAX: u64 = 1_000_000_000;

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Where to run: the benchmark creates a fresh working directory inside DIR (the store and
    /// the fsync files) and removes it at the end unless `--keep`. Put it on the disk to measure.
    /// [default: $TMPDIR, or /tmp]
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,

    /// Keep the working directory (the store and the fsync files) after the run.
    #[arg(long)]
    keep: bool,

    /// The store to measure.
    #[arg(long, value_enum, default_value_t = Backend::DEFAULT)]
    backend: Backend,

    /// The PostgreSQL server of `--backend postgres` (`postgres://USER@HOST:PORT/DB`). Each run
    /// uses a fresh schema `headwater_bench_<random>`, dropped at its end unless `--keep`.
    /// Put `--dir` on the disk of the server's data directory, so that the fsync bound is that
    /// disk's. With `--suite consume`, the server of the `PgView` figures (any backend).
    #[arg(long, value_name = "URL", required_if_eq("backend", "postgres"))]
    postgres: Option<String>,

    /// A run of a few seconds: short phases, a small store. For smoke tests: its figures mean
    /// little. Any size flag given beside it still applies.
    #[arg(long)]
    quick: bool,

    /// Runs of the whole benchmark, each on a fresh store; every figure is then the median of
    /// the runs (this machine's disk is noisy: 3 runs give a steadier figure).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(RUNS_MAX)))]
    runs: u32,

    /// How long each timed phase runs (the fsync loops and the append figures), in seconds.
    /// [default: 5; with --quick: 0.2]
    #[arg(long, value_name = "SECS", value_parser = parse_phase_secs)]
    phase_secs: Option<Duration>,

    /// The record size of the fsync loops, in bytes: one appended event's on-disk footprint.
    #[arg(long, value_name = "BYTES", default_value_t = RECORD_BYTES_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..=RECORD_BYTES_MAX))]
    record_bytes: u64,

    /// Events the store holds at the end: the whole-log read and the memory table are measured
    /// at 10 %, 50 % and 100 % of it. [default: 1000000; with --quick: 20000]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=EVENTS_MAX))]
    events: Option<u64>,

    /// Events of the one large stream that is read forward.
    /// [default: 100000; with --quick: 5000]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=EVENTS_MAX))]
    stream_events: Option<u64>,

    /// Concurrent writers of the many-writers figure (each on its own stream, 1 event per
    /// append).
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(WRITERS_MAX)))]
    writers: u32,

    /// Events per append of the batch figures.
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=APPEND_EVENTS_MAX as i64))]
    batch_events: u32,

    /// Concurrent writers of the many-batch-writers figure (and of the store fill).
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(WRITERS_MAX)))]
    batch_writers: u32,

    /// How writers make event ids: `random` (UUID v4, what most clients do) or `time-ordered`
    /// (UUID v7, which keeps a store's id index appending at its end).
    #[arg(long, value_enum, default_value_t = EventIds::Random)]
    event_ids: EventIds,

    /// What to measure, comma-separated: `store` (the event store's appends, reads, memory),
    /// `feeds` (backfill of a new projection version while appends go on, feed reads over HTTP
    /// with 1 and 16 clients, long-poll wake-up from append to answer) and `publish` (to the
    /// brokers of `--amqp` and `--nats`: the broker's raw publish-with-confirm rate, the
    /// publisher's throughput and the append → broker latency; not a default: it needs a broker)
    /// and `consume` (the consumer: apply rates of its view stores beside the backend's raw
    /// commits, heal latency, append → applied through the HTTP feed, reconstitution walk rate;
    /// its producer is always an embedded store in the working directory).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Suite::Store, Suite::Feeds])]
    suite: Vec<Suite>,

    /// The RabbitMQ broker of `--suite publish` (`amqp://USER:PASSWORD@HOST:PORT/VHOST`). The
    /// suite declares exchanges and durable queues named `headwater.bench_*` and deletes them.
    #[arg(long, value_name = "URL")]
    amqp: Option<String>,

    /// The NATS server (with JetStream) of `--suite publish` (`nats://HOST:PORT`). The suite
    /// creates streams named `HEADWATER_BENCH_*` and deletes them.
    #[arg(long, value_name = "URL")]
    nats: Option<String>,

    /// Events of the publish suite's pre-filled feed (and messages of its raw figure).
    /// [default: 200000; with --quick: 5000]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=EVENTS_MAX))]
    publish_events: Option<u64>,

    /// Subjects of the consume suite's reconstitution walk (one event each).
    /// [default: 1000000; with --quick: 2000]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=EVENTS_MAX))]
    walk_subjects: Option<u64>,

    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// The parts of `headwater bench`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Suite {
    /// The event store: appends, reads, memory.
    Store,
    /// Integration feeds: backfill, HTTP reads, long-poll wake-up.
    Feeds,
    /// Publishing to RabbitMQ and NATS JetStream: raw rate, publisher throughput, latency.
    Publish,
    /// The self-healing consumer: apply rates, heal latency, append → applied, walk rate.
    Consume,
}

/// The stores `headwater bench` can measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Backend {
    /// The embedded store (SQLite, group commit), in the working directory: the default.
    Embedded,
    /// The in-memory reference store: not durable, a measure of the harness itself.
    Memory,
    /// The PostgreSQL store, on the server given by `--postgres`.
    Postgres,
}

impl Backend {
    const DEFAULT: Backend = Backend::Embedded;

    fn name(self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Memory => "memory",
            Backend::Postgres => "postgres",
        }
    }

    fn durable(self) -> bool {
        match self {
            Backend::Embedded | Backend::Postgres => true,
            Backend::Memory => false,
        }
    }

    /// Whether the store's files are written by this process (so its disk usage and its write
    /// calls are the store's).
    fn local_files(self) -> bool {
        match self {
            Backend::Embedded => true,
            Backend::Memory | Backend::Postgres => false,
        }
    }
}

fn parse_phase_secs(text: &str) -> Result<Duration, String> {
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

/// How the benchmark's writers make event ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum EventIds {
    /// Random UUID v4, as most clients produce them.
    Random,
    /// Time-ordered UUID v7.
    TimeOrdered,
}

impl EventIds {
    fn name(self) -> &'static str {
        match self {
            EventIds::Random => "random v4",
            EventIds::TimeOrdered => "time-ordered v7",
        }
    }
}

/// Every size and duration of one run, with `--quick` and the defaults resolved.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub(crate) phase: Duration,
    pub(crate) record_bytes: u64,
    pub(crate) events: u64,
    pub(crate) stream_events: u64,
    pub(crate) writers: u32,
    pub(crate) batch_events: u32,
    pub(crate) batch_writers: u32,
    pub(crate) event_ids: EventIds,
    /// `--publish-events`, when given.
    pub(crate) publish_events: Option<u64>,
    /// `--walk-subjects`, when given.
    pub(crate) walk_subjects: Option<u64>,
    /// A `--quick` run: a smoke test whose figures mean little.
    pub(crate) quick: bool,
}

impl Plan {
    fn from_args(args: &BenchArgs) -> Plan {
        let quick = args.quick;
        Plan {
            phase: args.phase_secs.unwrap_or(if quick {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(5)
            }),
            record_bytes: args.record_bytes,
            events: args
                .events
                .unwrap_or(if quick { 20_000 } else { 1_000_000 }),
            stream_events: args
                .stream_events
                .unwrap_or(if quick { 5_000 } else { 100_000 }),
            writers: args.writers,
            batch_events: args.batch_events,
            batch_writers: args.batch_writers,
            event_ids: args.event_ids,
            publish_events: args.publish_events,
            walk_subjects: args.walk_subjects,
            quick,
        }
    }

    /// The store sizes at which the whole log is read and memory is sampled.
    fn checkpoints(&self) -> Vec<u64> {
        let mut sizes: Vec<u64> = [self.events / 10, self.events / 2, self.events]
            .into_iter()
            .filter(|&n| n > 0)
            .collect();
        sizes.dedup();
        sizes
    }
}

pub(crate) fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let plan = Plan::from_args(args);
    let targets = match publish_targets(args) {
        Ok(targets) => targets,
        Err(usage) => {
            // A usage error, as clap reports its own: exit code 2.
            eprintln!("error: {usage}");
            return Ok(ExitCode::from(2));
        }
    };
    let parent = match &args.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir(),
    };
    if !parent.is_dir() {
        bail!(
            "--dir {}: no such directory (the benchmark creates its working directory inside it)",
            parent.display()
        );
    }
    let workdir = tempfile::Builder::new()
        .prefix("headwater-bench-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a working directory in {}", parent.display()))?;
    let machine = system::Machine::describe(workdir.path());
    tracing::info!(
        dir = %workdir.path().display(),
        filesystem = %machine.filesystem,
        backend = args.backend.name(),
        "benchmark starting"
    );
    if machine.filesystem.starts_with("tmpfs") {
        tracing::warn!("the working directory is on tmpfs: fsync does nothing there");
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let store_suite = args.suite.contains(&Suite::Store);
    let feeds_suite = args.suite.contains(&Suite::Feeds);
    let publish_suite = args.suite.contains(&Suite::Publish);
    let consume_suite = args.suite.contains(&Suite::Consume);
    let mut consume_results = Vec::new();
    let mut results = Vec::new();
    let mut feed_results = Vec::new();
    let mut publish_results = Vec::new();
    for run in 1..=args.runs {
        let run_dir = workdir.path().join(format!("run-{run}"));
        std::fs::create_dir(&run_dir)
            .with_context(|| format!("cannot create {}", run_dir.display()))?;
        let store_dir = run_dir.join("store");
        let fsync_dir = run_dir.join("fsync");
        if args.runs > 1 {
            tracing::info!(run, of = args.runs, "run starting");
        }
        // The store suite first: its memory figures are this process's RSS, which the feeds
        // suite (1 M events projected, 16 HTTP clients) would inflate for good (freed memory
        // stays in the allocator's arenas).
        if store_suite {
            let result = runtime.block_on(async {
                match args.backend {
                    Backend::Memory => {
                        measure(MemoryStore::new(), &store_dir, &fsync_dir, &plan).await
                    }
                    Backend::Embedded => {
                        let store = EmbeddedStore::open(&store_dir).with_context(|| {
                            format!("cannot open an embedded store in {}", store_dir.display())
                        })?;
                        measure(store, &store_dir, &fsync_dir, &plan).await
                    }
                    Backend::Postgres => {
                        let url = args
                            .postgres
                            .as_deref()
                            .context("--backend postgres needs --postgres URL")?;
                        postgres::measure(url, args.keep, &store_dir, &fsync_dir, &plan).await
                    }
                }
            })?;
            results.push(result);
        }
        if feeds_suite {
            let feeds_dir = run_dir.join("feeds-store");
            feed_results.push(runtime.block_on(measure_feeds(args, &feeds_dir, &plan))?);
        }
        if publish_suite {
            publish_results.push(measure_publish(&runtime, args, &targets, &run_dir, &plan)?);
        }
        if consume_suite {
            consume_results.push(runtime.block_on(consume::measure(
                &run_dir.join("consume"),
                args.postgres.as_deref(),
                args.keep,
                &plan,
            ))?);
        }
        // The next run starts on an empty disk, as this one did.
        if !args.keep && run < args.runs {
            std::fs::remove_dir_all(&run_dir)
                .with_context(|| format!("cannot remove {}", run_dir.display()))?;
        }
    }
    drop(runtime);

    let feed_machine = machine.clone();
    let report = store_suite.then(|| {
        report::Report::new(
            &plan,
            args.backend.name(),
            args.backend.durable(),
            args.backend.local_files(),
            machine,
            &results,
        )
    });
    if let Some(report) = &report {
        print!("{}", report.markdown());
    }
    if feeds_suite {
        print!(
            "{}",
            feeds::markdown(args.backend.name(), &plan, &feed_machine, &feed_results)
        );
    }
    if publish_suite {
        print!(
            "{}",
            publish::markdown(args.backend.name(), &plan, &feed_machine, &publish_results)
        );
    }
    if consume_suite {
        print!(
            "{}",
            consume::markdown(&plan, &feed_machine, &consume_results)
        );
    }
    if let Some(path) = &args.json {
        // The store report's fields at the top level (as before the feeds suite), `feeds` beside.
        let mut json = match &report {
            Some(report) => serde_json::to_value(report)?,
            None => serde_json::json!({}),
        };
        if feeds_suite {
            json["feeds"] = serde_json::json!({
                "runs": feed_results,
                "median": feeds::median(&feed_results),
            });
        }
        if publish_suite {
            json["publish"] = serde_json::json!({
                "runs": publish_results,
                "median": publish::median(&publish_results),
            });
        }
        if consume_suite {
            json["consume"] = serde_json::json!({
                "runs": consume_results,
                "median": consume::median(&consume_results),
            });
        }
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("cannot write the JSON results to {}", path.display()))?;
    }
    if args.keep {
        let kept = workdir.keep();
        tracing::info!(dir = %kept.display(), "kept the working directory");
    } else {
        let path = workdir.path().to_path_buf();
        workdir
            .close()
            .with_context(|| format!("cannot remove the working directory {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The feeds suite of one run, on a fresh store of the chosen backend.
async fn measure_feeds(
    args: &BenchArgs,
    dir: &Path,
    plan: &Plan,
) -> anyhow::Result<feeds::FeedFigures> {
    match args.backend {
        Backend::Memory => {
            let events = std::sync::Arc::new(MemoryStore::new());
            let feeds = std::sync::Arc::new(headwater_store::MemoryFeedStore::new());
            feeds::measure(events, feeds, plan).await
        }
        Backend::Embedded => {
            let store = EmbeddedStore::open(dir)
                .with_context(|| format!("cannot open an embedded store in {}", dir.display()))?;
            let feeds = std::sync::Arc::new(store.feeds().context("cannot open its feeds")?);
            feeds::measure(std::sync::Arc::new(store), feeds, plan).await
        }
        Backend::Postgres => {
            let url = args
                .postgres
                .as_deref()
                .context("--backend postgres needs --postgres URL")?;
            postgres::measure_feeds(url, args.keep, plan).await
        }
    }
}

/// The brokers of the publish suite, checked against the suites asked for; `Err`: what is wrong
/// with the command line.
fn publish_targets(args: &BenchArgs) -> Result<Vec<publish_broker::Target>, String> {
    let targets: Vec<publish_broker::Target> = [
        args.amqp.clone().map(publish_broker::Target::Amqp),
        args.nats.clone().map(publish_broker::Target::Nats),
    ]
    .into_iter()
    .flatten()
    .collect();
    let publish = args.suite.contains(&Suite::Publish);
    if publish && targets.is_empty() {
        return Err(
            "--suite publish needs a broker: --amqp URL (RabbitMQ) and/or --nats URL \
                    (NATS with JetStream); scripts/bench-publish starts private ones and runs it"
                .to_owned(),
        );
    }
    if !publish && !targets.is_empty() {
        return Err("--amqp and --nats are for --suite publish (add it to --suite)".to_owned());
    }
    if publish && args.backend == Backend::Postgres {
        return Err(
            "--suite publish runs on the embedded or the memory store, not --backend postgres"
                .to_owned(),
        );
    }
    Ok(targets)
}

/// The publish suite of one run: the fsync context, then each broker on fresh stores.
fn measure_publish(
    runtime: &tokio::runtime::Runtime,
    args: &BenchArgs,
    targets: &[publish_broker::Target],
    run_dir: &Path,
    plan: &Plan,
) -> anyhow::Result<publish::PublishFigures> {
    // Blocking, on this thread: nothing else runs meanwhile.
    let fsync_per_sec = publish::fsync_bound(&run_dir.join("publish-fsync"), plan)?;
    let mut brokers = Vec::new();
    for target in targets {
        let figures = runtime.block_on(async {
            match args.backend {
                Backend::Embedded => {
                    let filled =
                        embedded_stores(&run_dir.join(format!("publish-{}", target.key())))?;
                    let live = embedded_stores(&run_dir.join(format!("latency-{}", target.key())))?;
                    publish::measure(target, filled, live, plan).await
                }
                Backend::Memory | Backend::Postgres => {
                    publish::measure(target, memory_stores(), memory_stores(), plan).await
                }
            }
        })?;
        brokers.push(figures);
    }
    Ok(publish::PublishFigures {
        fsync_per_sec,
        brokers,
    })
}

fn embedded_stores(
    dir: &Path,
) -> anyhow::Result<publish::Stores<EmbeddedStore, headwater_embedded::EmbeddedFeedStore>> {
    let store = EmbeddedStore::open(dir)
        .with_context(|| format!("cannot open an embedded store in {}", dir.display()))?;
    let feeds = std::sync::Arc::new(store.feeds().context("cannot open its feeds")?);
    Ok(publish::Stores {
        events: std::sync::Arc::new(store),
        feeds,
    })
}

fn memory_stores() -> publish::Stores<MemoryStore, headwater_store::MemoryFeedStore> {
    publish::Stores {
        events: std::sync::Arc::new(MemoryStore::new()),
        feeds: std::sync::Arc::new(headwater_store::MemoryFeedStore::new()),
    }
}

/// Everything one run measured.
#[derive(Debug)]
pub(crate) struct Results {
    pub(crate) fsync: fsync::FsyncFigures,
    pub(crate) prepared: store::Prepared,
    pub(crate) appends: store::Appends,
    pub(crate) reads: store::Reads,
}

/// The whole run against one store. The fsync loops run right before the append figures, on the
/// same disk, so that both see the same conditions (this machine's disk is shared and noisy).
pub(crate) async fn measure<S: EventStore>(
    store: S,
    store_dir: &Path,
    fsync_dir: &Path,
    plan: &Plan,
) -> anyhow::Result<Results> {
    let mut bench = store::StoreBench::new(store, store_dir, plan);
    let prepared = bench.prepare().await?;

    std::fs::create_dir(fsync_dir)
        .with_context(|| format!("cannot create {}", fsync_dir.display()))?;
    // Blocking calls on the runtime's own thread: nothing else runs meanwhile.
    let fsync = fsync::measure(fsync_dir, plan).context("the fsync bound")?;
    std::fs::remove_dir_all(fsync_dir)
        .with_context(|| format!("cannot remove {}", fsync_dir.display()))?;

    let appends = bench.appends().await?;
    let reads = bench.reads().await?;
    Ok(Results {
        fsync,
        prepared,
        appends,
        reads,
    })
}

/// A progress bar on stderr for a phase of known length (hidden when stderr is not a terminal).
pub(crate) fn progress_bar(label: &str, length: u64, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(length);
    let template = format!("{{msg:44}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{elapsed}})");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(label.to_owned());
    bar
}
