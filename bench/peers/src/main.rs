//! `headwater-peers`: Headwater's stores beside the peers a user would pick instead, under the
//! same workloads, in the same run, on the same machine; prints one markdown table.
//!
//! This binary measures Headwater's embedded and PostgreSQL stores itself and runs
//! `headwater-peers-sqlx` (the `sqlx-peers/` package) once per peer: every peer depends on
//! sqlx 0.8, whose SQLite driver cannot be linked beside headwater-embedded's rusqlite (both
//! declare `links = "sqlite3"`, at different versions), so the peers live in a program of their
//! own. See README.md.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use headwater_core::limits::READ_PAGE_EVENTS_MAX;
use headwater_core::{EventId, EventType, ExpectedVersion, NewEvent, StreamName, StreamVersion};
use headwater_embedded::EmbeddedStore;
use headwater_peers_harness::{self as harness, Deposit, Figure, Figures, Plan, Subject};
use headwater_postgres::{Options, PostgresStore};
use headwater_store::EventStore;
use serde_json::json;

/// The longest timed phase, in seconds.
const PHASE_SECS_MAX: f64 = 3_600.0;
/// How long the fsync loop runs, at most, in seconds.
const FSYNC_SECS_MAX: f64 = 3.0;
/// The most runs.
const RUNS_MAX: u32 = 20;

#[derive(Debug, Parser)]
#[command(
    name = "headwater-peers",
    about = "Headwater's stores beside cqrs-es (postgres-es, sqlite-es) and disintegrate \
             (disintegrate-postgres): the workloads of `headwater bench`, in one run"
)]
struct Args {
    /// The PostgreSQL server (`postgres://USER@HOST:PORT/DB`, a user that may create
    /// databases). Every PostgreSQL subject runs in a fresh database of its own, dropped at its
    /// end. `bench/peers/run.sh` starts a private cluster and passes it.
    #[arg(long, value_name = "URL")]
    postgres: String,

    /// The peers' program (`sqlx-peers/target/release/headwater-peers-sqlx`).
    #[arg(long, value_name = "PATH")]
    peers_bin: Option<PathBuf>,

    /// Where the embedded stores, the SQLite peer and the fsync loop write (a fresh directory
    /// inside DIR, removed at the end). Put it on the disk of the PostgreSQL data directory.
    /// [default: $TMPDIR, or /tmp]
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,

    /// A run of a few seconds per subject: short phases, a small stream. Its figures mean
    /// little. Size flags given beside it still apply.
    #[arg(long)]
    quick: bool,

    /// Runs of the whole comparison, the subjects interleaved in each; every figure is then the
    /// median of the runs.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(RUNS_MAX)))]
    runs: u32,

    /// How long each of the four timed append phases runs, in seconds.
    /// [default: 10, about a minute per subject; with --quick: 1]
    #[arg(long, value_name = "SECS", value_parser = parse_phase_secs)]
    phase_secs: Option<Duration>,

    /// Events of the one large stream that is written, then read forward.
    /// [default: 100000; with --quick: 5000]
    #[arg(long, value_name = "N")]
    stream_events: Option<u64>,

    /// Concurrent writers of the many-writers figure (each on its own stream, 1 event per
    /// append).
    #[arg(long, value_name = "N", default_value_t = 64)]
    writers: u32,

    /// Events per append of the batch figures.
    #[arg(long, value_name = "N", default_value_t = 100)]
    batch_events: u32,

    /// Concurrent writers of the many-batch-writers figure.
    #[arg(long, value_name = "N", default_value_t = 8)]
    batch_writers: u32,

    /// Connections of each peer's sqlx pool (sqlx's and the peers' default pools hold 10).
    #[arg(long, value_name = "N", default_value_t = 10)]
    pool: u32,

    /// Only these subjects (comma-separated): embedded, postgres, cqrs-postgres, cqrs-sqlite,
    /// disintegrate. [default: all]
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    only: Vec<String>,

    /// Also write every run's figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

fn parse_phase_secs(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= PHASE_SECS_MAX) {
        return Err(format!("{text} is outside 0 < SECS <= {PHASE_SECS_MAX}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// One column of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SubjectKind {
    Embedded,
    Postgres,
    CqrsPostgres,
    CqrsSqlite,
    Disintegrate,
}

impl SubjectKind {
    const ALL: [SubjectKind; 5] = [
        SubjectKind::Embedded,
        SubjectKind::Postgres,
        SubjectKind::CqrsPostgres,
        SubjectKind::CqrsSqlite,
        SubjectKind::Disintegrate,
    ];

    fn key(self) -> &'static str {
        match self {
            SubjectKind::Embedded => "embedded",
            SubjectKind::Postgres => "postgres",
            SubjectKind::CqrsPostgres => "cqrs-postgres",
            SubjectKind::CqrsSqlite => "cqrs-sqlite",
            SubjectKind::Disintegrate => "disintegrate",
        }
    }

    fn title(self) -> &'static str {
        match self {
            SubjectKind::Embedded => "Headwater embedded (SQLite)",
            SubjectKind::Postgres => "Headwater PostgreSQL",
            SubjectKind::CqrsPostgres => "cqrs-es + postgres-es",
            SubjectKind::CqrsSqlite => "cqrs-es + sqlite-es (sync=FULL)",
            SubjectKind::Disintegrate => "disintegrate-postgres",
        }
    }

    fn on_postgres(self) -> bool {
        matches!(
            self,
            SubjectKind::Postgres | SubjectKind::CqrsPostgres | SubjectKind::Disintegrate
        )
    }

    fn is_ours(self) -> bool {
        matches!(self, SubjectKind::Embedded | SubjectKind::Postgres)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let plan = Plan {
        phase: args.phase_secs.unwrap_or(if args.quick {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(10)
        }),
        stream_events: args
            .stream_events
            .unwrap_or(if args.quick { 5_000 } else { 100_000 }),
        writers: args.writers,
        batch_events: args.batch_events,
        batch_writers: args.batch_writers,
    };
    let subjects: Vec<SubjectKind> = if args.only.is_empty() {
        SubjectKind::ALL.to_vec()
    } else {
        let mut chosen = Vec::new();
        for key in &args.only {
            match SubjectKind::ALL.iter().find(|s| s.key() == key.trim()) {
                Some(s) => chosen.push(*s),
                None => bail!("--only: unknown subject {key:?}"),
            }
        }
        chosen
    };
    let peers_bin = match &args.peers_bin {
        Some(path) => path.clone(),
        None => default_peers_bin()?,
    };
    if subjects.iter().any(|s| !s.is_ours()) && !peers_bin.is_file() {
        bail!(
            "the peers' program {} is missing: build bench/peers/sqlx-peers (`cargo build --release`) or pass --peers-bin",
            peers_bin.display()
        );
    }
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let workdir = tempfile::Builder::new()
        .prefix("headwater-peers-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a working directory in {}", parent.display()))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let server = runtime.block_on(postgres_server(&args.postgres))?;

    let mut runs: Vec<Run> = Vec::new();
    for run in 1..=args.runs {
        eprintln!("== run {run} of {}", args.runs);
        let fsync_per_sec = harness::fsync_bound(
            workdir.path(),
            plan.phase.min(Duration::from_secs_f64(FSYNC_SECS_MAX)),
        )?;
        eprintln!("fsync bound: {fsync_per_sec:.0} write+fdatasync/s");
        let mut results = Vec::new();
        for &subject in &subjects {
            let started = Instant::now();
            let outcome = match subject {
                SubjectKind::Embedded => runtime.block_on(measure_embedded(workdir.path(), &plan)),
                SubjectKind::Postgres => runtime.block_on(measure_postgres(&args.postgres, &plan)),
                _ => runtime.block_on(measure_peer(
                    &peers_bin,
                    subject,
                    &args,
                    workdir.path(),
                    &plan,
                )),
            };
            match &outcome {
                Ok(_) => eprintln!(
                    "{} done in {:.0} s",
                    subject.title(),
                    started.elapsed().as_secs_f64()
                ),
                Err(error) => eprintln!("{} FAILED: {error:#}", subject.title()),
            }
            results.push((subject, outcome.map_err(|e| format!("{e:#}"))));
        }
        runs.push(Run {
            fsync_per_sec,
            results,
        });
    }
    drop(runtime);

    let machine = machine(workdir.path(), &server);
    print!("{}", markdown(&args, &plan, &subjects, &runs, &machine));
    if let Some(path) = &args.json {
        let value = json!({
            "command": command_line(),
            "machine": machine,
            "plan": plan,
            "runs": runs.iter().map(|run| json!({
                "fsync_per_sec": run.fsync_per_sec,
                "subjects": run.results.iter().map(|(s, r)| json!({
                    "subject": s.key(),
                    "figures": r.as_ref().ok(),
                    "error": r.as_ref().err(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&value)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    workdir
        .close()
        .context("cannot remove the working directory")?;
    Ok(())
}

/// `sqlx-peers/target/release/headwater-peers-sqlx` beside this program's package.
fn default_peers_bin() -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("sqlx-peers/target/release/headwater-peers-sqlx"))
}

#[derive(Debug)]
struct Run {
    fsync_per_sec: f64,
    results: Vec<(SubjectKind, Result<Figures, String>)>,
}

// ---------------------------------------------------------------------------------------------
// Headwater's stores

/// A Headwater store under the workloads.
struct Headwater<S> {
    store: S,
    event_type: EventType,
}

#[derive(Debug)]
struct HeadwaterWriter {
    stream: StreamName,
    head: Option<StreamVersion>,
}

impl<S: EventStore + 'static> Subject for Headwater<S> {
    type Writer = HeadwaterWriter;

    fn writer(&self, n: u64) -> HeadwaterWriter {
        HeadwaterWriter {
            stream: StreamName::new(format!("account-{n}"))
                .expect("account-N is a valid stream name"),
            head: None,
        }
    }

    async fn append(
        &self,
        writer: &mut HeadwaterWriter,
        events: Vec<Deposit>,
    ) -> anyhow::Result<u64> {
        let events = {
            let mut rng = rand::rng();
            events
                .into_iter()
                .map(|deposit| {
                    let data = serde_json::to_vec(&deposit)?;
                    let mut event = NewEvent::new(
                        EventId::from_uuid(harness::random_uuid(&mut rng)),
                        self.event_type.clone(),
                        data,
                    );
                    event.correlation_id = Some(deposit.command_id);
                    event.causation_id = Some(deposit.command_id);
                    Ok(event)
                })
                .collect::<anyhow::Result<Vec<_>>>()?
        };
        let expected = match writer.head {
            None => ExpectedVersion::NoStream,
            Some(version) => ExpectedVersion::Exact(version),
        };
        let outcome = self
            .store
            .append(&writer.stream, expected, events)
            .await
            .with_context(|| format!("append to {}", writer.stream))?;
        writer.head = Some(outcome.stream_version);
        Ok(0)
    }

    async fn read_stream(&self, writer: &HeadwaterWriter) -> anyhow::Result<Option<u64>> {
        let mut cursor = StreamVersion::START;
        let mut events = 0u64;
        loop {
            let page = self
                .store
                .read_stream(&writer.stream, cursor, READ_PAGE_EVENTS_MAX)
                .await
                .with_context(|| format!("read {}", writer.stream))?;
            let Some(last) = page.last() else { break };
            cursor = last.stream_version;
            events += page.len() as u64;
        }
        Ok(Some(events))
    }
}

fn headwater<S: EventStore + 'static>(store: S) -> anyhow::Result<Headwater<S>> {
    Ok(Headwater {
        store,
        event_type: EventType::new(harness::EVENT_TYPE).context("the event type")?,
    })
}

async fn measure_embedded(parent: &Path, plan: &Plan) -> anyhow::Result<Figures> {
    let dir = tempfile::Builder::new()
        .prefix("headwater-embedded-")
        .tempdir_in(parent)
        .context("cannot create the embedded store's directory")?;
    let store = EmbeddedStore::open(dir.path())
        .with_context(|| format!("cannot open an embedded store in {}", dir.path().display()))?;
    let mut figures = harness::run(headwater(store)?, plan, "Headwater embedded").await?;
    figures.notes.push(
        "Headwater embedded: headwater-embedded (SQLite WAL through rusqlite, group commit, fsync per commit), default options.".to_owned(),
    );
    dir.close().context("cannot remove the embedded store")?;
    Ok(figures)
}

async fn measure_postgres(url: &str, plan: &Plan) -> anyhow::Result<Figures> {
    let database = harness::fresh_database_name("peers_headwater");
    admin(url, &format!("CREATE DATABASE {database}")).await?;
    let result = async {
        let store = PostgresStore::connect(&harness::with_database(url, &database), Options::default())
            .await
            .context("cannot connect the PostgreSQL store")?;
        let mut figures = harness::run(headwater(store)?, plan, "Headwater PostgreSQL").await?;
        figures.notes.push(
            "Headwater PostgreSQL: headwater-postgres (one writer connection, group commit, gap-free positions), default options.".to_owned(),
        );
        Ok(figures)
    }
    .await;
    if let Err(error) = admin(
        url,
        &format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
    )
    .await
    {
        eprintln!("could not drop {database}: {error:#}");
    }
    result
}

/// Runs one statement on the server's administration database.
async fn admin(url: &str, statement: &str) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("cannot connect to PostgreSQL (--postgres)")?;
    let connection = tokio::spawn(connection);
    client
        .batch_execute(statement)
        .await
        .with_context(|| statement.to_owned())?;
    drop(client);
    let _ = connection.await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The peers, in their own program

async fn measure_peer(
    bin: &Path,
    subject: SubjectKind,
    args: &Args,
    dir: &Path,
    plan: &Plan,
) -> anyhow::Result<Figures> {
    let output = tokio::process::Command::new(bin)
        .arg("--peer")
        .arg(subject.key())
        .arg("--postgres")
        .arg(&args.postgres)
        .arg("--dir")
        .arg(dir)
        .arg("--pool")
        .arg(args.pool.to_string())
        .arg("--plan")
        .arg(serde_json::to_string(plan)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?
        // Not `Command::output`, which would capture stderr too: the peer's progress shows.
        .wait_with_output()
        .await
        .with_context(|| format!("cannot wait for {}", bin.display()))?;
    if !output.status.success() {
        bail!(
            "{} {} exited with {}",
            bin.display(),
            subject.key(),
            output.status
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("the peers' program printed no figures")?;
    serde_json::from_str(line).context("the peers' program printed figures that do not parse")
}

// ---------------------------------------------------------------------------------------------
// The machine

#[derive(Debug, serde::Serialize)]
struct Server {
    version: String,
    settings: String,
}

async fn postgres_server(url: &str) -> anyhow::Result<Server> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("cannot connect to PostgreSQL (--postgres)")?;
    let connection = tokio::spawn(connection);
    let mut settings = Vec::new();
    for name in [
        "fsync",
        "synchronous_commit",
        "wal_sync_method",
        "full_page_writes",
        "shared_buffers",
        "max_connections",
    ] {
        let row = client
            .query_one(&format!("SHOW {name}"), &[])
            .await
            .with_context(|| format!("SHOW {name}"))?;
        settings.push(format!("{name}={}", row.get::<_, String>(0)));
    }
    let version: String = client
        .query_one("SHOW server_version", &[])
        .await
        .context("SHOW server_version")?
        .get(0);
    drop(client);
    let _ = connection.await;
    Ok(Server {
        version,
        settings: settings.join(", "),
    })
}

fn machine(dir: &Path, server: &Server) -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|kib| kib.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .map_or("unknown".to_owned(), |kib| {
            format!("{:.1} GiB", kib as f64 / 1_048_576.0)
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    json!({
        "cpu": cpu,
        "cores": cores,
        "memory": memory,
        "kernel": kernel,
        "filesystem": filesystem(dir),
        "postgresql": server.version,
        "postgresql_settings": server.settings,
    })
}

/// The filesystem type and device of the mount holding `dir` (from /proc/mounts).
fn filesystem(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let device = fields.next()?;
            let mount = fields.next()?;
            let kind = fields.next()?;
            dir.starts_with(mount)
                .then(|| (mount.len(), format!("{kind} ({device} on {mount})")))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "unknown".to_owned(), |(_, text)| text)
}

/// The command line, with any password in a URL hidden.
fn command_line() -> String {
    std::env::args()
        .map(|arg| hide_password(&arg))
        .collect::<Vec<_>>()
        .join(" ")
}

fn hide_password(arg: &str) -> String {
    let Some(scheme_end) = arg.find("://") else {
        return arg.to_owned();
    };
    let rest = &arg[scheme_end + 3..];
    let Some(at) = rest.find('@') else {
        return arg.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{}{user}:***{}", &arg[..scheme_end + 3], &rest[at..]),
        None => arg.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// The table

/// One row of the table: which figure, from each subject's figures.
struct Row {
    label: String,
    pick: fn(&Figures) -> Option<&Figure>,
    latency: bool,
}

fn markdown(
    args: &Args,
    plan: &Plan,
    subjects: &[SubjectKind],
    runs: &[Run],
    machine: &serde_json::Value,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let median_of = |values: Vec<f64>| median(values);
    let fsync = median_of(runs.iter().map(|r| r.fsync_per_sec).collect());
    let _ = writeln!(
        out,
        "# Headwater and its peers, same workloads, same machine\n"
    );
    let _ = writeln!(out, "Command: `{}`\n", command_line());
    let _ = writeln!(
        out,
        "Machine: {} ({} cores), {}, kernel {}; disk: {}; PostgreSQL {} ({}), a private cluster on the same disk.\n",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cores"],
        machine["memory"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?"),
        machine["filesystem"].as_str().unwrap_or("?"),
        machine["postgresql"].as_str().unwrap_or("?"),
        machine["postgresql_settings"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        out,
        "{} run(s), every figure the median of the runs; each append phase {:.0} s; events of ~150 bytes of JSON (`headwater bench`'s deposit), random ids; every append durable when acknowledged; each writer on its own stream, expecting the version it last saw. fsync bound (write {} B + fdatasync, one loop, same disk): **{}/s**.\n",
        runs.len(),
        plan.phase.as_secs_f64(),
        harness::FSYNC_RECORD_BYTES,
        group(fsync),
    );

    let rows = [
        Row {
            label: "durable append, 1 writer, 1 event per append (events/s, p50/p99 ms)".to_owned(),
            pick: |f| f.one_writer.as_ref(),
            latency: true,
        },
        Row {
            label: format!(
                "durable append, {} writers on distinct streams, 1 event each (events/s, p50/p99 ms)",
                plan.writers
            ),
            pick: |f| f.many_writers.as_ref(),
            latency: true,
        },
        Row {
            label: format!("batches of {}, 1 writer (events/s)", plan.batch_events),
            pick: |f| f.batch_one_writer.as_ref(),
            latency: false,
        },
        Row {
            label: format!(
                "batches of {}, {} writers (events/s)",
                plan.batch_events, plan.batch_writers
            ),
            pick: |f| f.batch_many_writers.as_ref(),
            latency: false,
        },
        Row {
            label: format!(
                "read a {}-event stream forward (events/s)",
                group(plan.stream_events as f64)
            ),
            pick: |f| f.read_stream.as_ref(),
            latency: false,
        },
    ];

    let _ = write!(out, "| figure |");
    for s in subjects {
        let _ = write!(out, " {} |", s.title());
    }
    let _ = writeln!(
        out,
        " PostgreSQL: Headwater ÷ best peer | SQLite: Headwater ÷ sqlite-es |"
    );
    let _ = write!(out, "| --- |");
    for _ in subjects {
        let _ = write!(out, " ---: |");
    }
    let _ = writeln!(out, " ---: | ---: |");

    for row in &rows {
        let _ = write!(out, "| {} |", row.label);
        let mut medians: Vec<(SubjectKind, Option<f64>)> = Vec::new();
        for &subject in subjects {
            let figures: Vec<Option<&Figure>> = runs
                .iter()
                .map(|run| {
                    run.results
                        .iter()
                        .find(|(s, _)| *s == subject)
                        .and_then(|(_, r)| r.as_ref().ok())
                        .and_then(|f| (row.pick)(f))
                })
                .collect();
            let failed = runs
                .iter()
                .any(|run| run.results.iter().any(|(s, r)| *s == subject && r.is_err()));
            if failed {
                medians.push((subject, None));
                let _ = write!(out, " failed (see below) |");
                continue;
            }
            if figures.iter().any(Option::is_none) {
                medians.push((subject, None));
                let _ = write!(out, " — |");
                continue;
            }
            let figures: Vec<&Figure> = figures.into_iter().flatten().collect();
            let rate = median_of(figures.iter().map(|f| f.events_per_sec).collect());
            medians.push((subject, Some(rate)));
            let mut cell = group(rate);
            if row.latency {
                let p50 = median_of(figures.iter().filter_map(|f| f.p50_ms).collect());
                let p99 = median_of(figures.iter().filter_map(|f| f.p99_ms).collect());
                let _ = write!(cell, " ({} / {})", millis(p50), millis(p99));
            }
            let conflicts = median_of(figures.iter().map(|f| f.conflicts_retried as f64).collect());
            if conflicts > 0.0 {
                let attempts = median_of(
                    figures
                        .iter()
                        .map(|f| (f.ops + f.conflicts_retried) as f64)
                        .collect(),
                );
                let _ = write!(
                    cell,
                    ", {} conflicts retried ({:.0} % of attempts)",
                    group(conflicts),
                    100.0 * conflicts / attempts.max(1.0)
                );
            }
            let _ = write!(out, " {cell} |");
        }
        let rate_of = |kind: SubjectKind| {
            medians
                .iter()
                .find(|(s, _)| *s == kind)
                .and_then(|(_, r)| *r)
        };
        let best_pg_peer = medians
            .iter()
            .filter(|(s, _)| s.on_postgres() && !s.is_ours())
            .filter_map(|(_, r)| *r)
            .fold(None, |best: Option<f64>, r| {
                Some(best.map_or(r, |b| b.max(r)))
            });
        let pg_ratio = ratio(rate_of(SubjectKind::Postgres), best_pg_peer);
        let sqlite_ratio = ratio(
            rate_of(SubjectKind::Embedded),
            rate_of(SubjectKind::CqrsSqlite),
        );
        let _ = writeln!(out, " {pg_ratio} | {sqlite_ratio} |");
    }

    let _ = writeln!(out, "\nSettings of each subject:\n");
    let mut seen = std::collections::BTreeSet::new();
    for run in runs {
        for (_, result) in &run.results {
            if let Ok(figures) = result {
                for note in &figures.notes {
                    if seen.insert(note.clone()) {
                        let _ = writeln!(out, "- {note}");
                    }
                }
            }
        }
    }
    let _ = writeln!(
        out,
        "- Gap-free positions for followers (G4): Headwater's stores only. cqrs-es has no global position (a sequence per aggregate); disintegrate's event ids come from a PostgreSQL sequence, with gaps (see bench/peers/README.md)."
    );
    for (n, run) in runs.iter().enumerate() {
        for (subject, result) in &run.results {
            if let Err(error) = result {
                let _ = writeln!(out, "- run {}: {} failed: {error}", n + 1, subject.title());
            }
        }
    }
    if args.quick {
        let _ = writeln!(
            out,
            "\n--quick: short phases, a small stream; these figures mean little."
        );
    }
    out
}

fn ratio(ours: Option<f64>, theirs: Option<f64>) -> String {
    match (ours, theirs) {
        (Some(ours), Some(theirs)) if theirs > 0.0 => format!("{:.1}×", ours / theirs),
        _ => "—".to_owned(),
    }
}

/// The median (the mean of the middle two for an even count); NaN for none.
fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn millis(ms: f64) -> String {
    if ms.is_nan() {
        "—".to_owned()
    } else if ms < 10.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.0}")
    }
}

/// `1234567.8` → `1,234,568`.
fn group(value: f64) -> String {
    if !value.is_finite() {
        return "—".to_owned();
    }
    let digits = format!("{:.0}", value.round());
    let (sign, digits) = match digits.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", digits.as_str()),
    };
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_groups() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
        assert_eq!(group(1_234_567.8), "1,234,568");
        assert_eq!(group(999.0), "999");
        assert_eq!(group(1000.0), "1,000");
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            hide_password("postgres://u:secret@h:1/db"),
            "postgres://u:***@h:1/db"
        );
        assert_eq!(hide_password("postgres://u@h:1/db"), "postgres://u@h:1/db");
        assert_eq!(hide_password("--quick"), "--quick");
    }
}
