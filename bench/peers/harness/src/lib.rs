//! The workloads of the peers benchmark, shared by its two binaries (`headwater-peers`, which
//! measures Headwater's stores and prints the table, and `headwater-peers-sqlx`, which measures
//! the peers): the same event, the same writers, the same figures for every subject.
//!
//! The workloads follow `headwater bench` (crates/headwater-cli/src/bench/store.rs): each writer
//! appends to its own `account-{n}` stream, waits for each append, and expects the version it
//! last saw; events are deposits of about 150 bytes of JSON with random ids.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use uuid::Uuid;

/// The event type of every benchmark event (as in `headwater bench`).
pub const EVENT_TYPE: &str = "account.deposited";
/// The record size of the fsync loop, in bytes (as `headwater bench`'s default).
pub const FSYNC_RECORD_BYTES: usize = 256;
/// The highest latency the histograms hold, in nanoseconds (a minute).
const LATENCY_NANOS_MAX: u64 = 60_000_000_000;
/// Significant figures of the latency histograms.
const LATENCY_SIGNIFICANT_FIGURES: u8 = 2;

/// The data of one benchmark event: the same fields, in the same order, as the ~150-byte JSON
/// object `headwater bench` appends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deposit {
    pub account_id: String,
    pub amount_cents: u64,
    pub currency: String,
    pub command_id: Uuid,
    pub channel: String,
    pub reference: String,
}

impl Deposit {
    /// A deposit to account `account_id`, as a client builds it.
    pub fn random(account_id: &str, rng: &mut impl Rng) -> Deposit {
        let command_id = random_uuid(rng);
        let amount_cents = (command_id.as_u128() % 1_000_000) as u64 + 1;
        Deposit {
            account_id: account_id.to_owned(),
            amount_cents,
            currency: "EUR".to_owned(),
            command_id,
            channel: "sepa-instant".to_owned(),
            reference: format!("invoice 2026-{:05}", amount_cents % 100_000),
        }
    }

    /// `count` deposits to `account_id`.
    pub fn batch(account_id: &str, count: u32) -> Vec<Deposit> {
        let mut rng = rand::rng();
        (0..count)
            .map(|_| Deposit::random(account_id, &mut rng))
            .collect()
    }
}

/// A random (v4) UUID from `rng` (the thread's fast generator, not a system call per id).
pub fn random_uuid(rng: &mut impl Rng) -> Uuid {
    uuid::Builder::from_random_bytes(rng.random()).into_uuid()
}

/// The sizes and durations of one run, the same for every subject.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    /// How long each timed append phase runs.
    pub phase: Duration,
    /// Events of the one large stream that is read forward.
    pub stream_events: u64,
    /// Concurrent writers of the many-writers figure (1 event per append).
    pub writers: u32,
    /// Events per append of the batch figures.
    pub batch_events: u32,
    /// Concurrent writers of the many-batch-writers figure.
    pub batch_writers: u32,
}

/// What one subject measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Figures {
    pub one_writer: Option<Figure>,
    pub many_writers: Option<Figure>,
    pub batch_one_writer: Option<Figure>,
    pub batch_many_writers: Option<Figure>,
    /// Reading the large stream forward; `None` where the subject has no such read.
    pub read_stream: Option<Figure>,
    /// Notes on this subject's settings, printed under the table.
    pub notes: Vec<String>,
}

/// One figure: a rate, latencies of one operation, and retried conflicts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Figure {
    pub events_per_sec: f64,
    pub events: u64,
    pub ops: u64,
    pub seconds: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Appends refused by the store for a conflict that is not one (each writer has its own
    /// stream), retried by the benchmark: failed attempts, not counted as events.
    pub conflicts_retried: u64,
}

/// The store under measure, as the workloads drive it.
pub trait Subject: Send + Sync + 'static {
    /// What a writer keeps between appends: its stream and the version it last saw.
    type Writer: Send + 'static;

    /// A writer of the fresh stream `account-{n}`.
    fn writer(&self, n: u64) -> Self::Writer;

    /// Appends `events` to the writer's stream, expecting the version it last saw, and waits
    /// until the store acknowledges them as durable. Returns the conflicts retried meanwhile.
    fn append(
        &self,
        writer: &mut Self::Writer,
        events: Vec<Deposit>,
    ) -> impl Future<Output = anyhow::Result<u64>> + Send;

    /// Reads the writer's whole stream forward; the number of events read, or `None` if this
    /// subject has no such read.
    fn read_stream(
        &self,
        writer: &Self::Writer,
    ) -> impl Future<Output = anyhow::Result<Option<u64>>> + Send;
}

/// Events, operations and latencies of one phase.
#[derive(Debug)]
struct Rate {
    ops: u64,
    events: u64,
    conflicts: u64,
    latency: Option<Histogram<u64>>,
}

impl Rate {
    fn new() -> Rate {
        Rate {
            ops: 0,
            events: 0,
            conflicts: 0,
            latency: Histogram::new_with_bounds(1, LATENCY_NANOS_MAX, LATENCY_SIGNIFICANT_FIGURES)
                .ok(),
        }
    }

    fn record(&mut self, latency: Duration, events: u64) {
        self.ops += 1;
        self.events += events;
        if let Some(histogram) = &mut self.latency {
            let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
            histogram.saturating_record(nanos.max(1));
        }
    }

    fn merge(&mut self, other: &Rate) {
        self.ops += other.ops;
        self.events += other.events;
        self.conflicts += other.conflicts;
        if let (Some(ours), Some(theirs)) = (&mut self.latency, &other.latency) {
            // Same bounds on both sides: adding cannot fail.
            let _ = ours.add(theirs);
        }
    }

    fn figure(&self, elapsed: Duration) -> Figure {
        let seconds = elapsed.as_secs_f64();
        let quantile = |q: f64| {
            self.latency
                .as_ref()
                .filter(|h| !h.is_empty())
                .map(|h| h.value_at_quantile(q) as f64 / 1e6)
        };
        Figure {
            events_per_sec: if seconds > 0.0 {
                self.events as f64 / seconds
            } else {
                0.0
            },
            events: self.events,
            ops: self.ops,
            seconds,
            p50_ms: quantile(0.50),
            p99_ms: quantile(0.99),
            conflicts_retried: self.conflicts,
        }
    }
}

/// Hands out fresh stream numbers 1, 2, 3 …
#[derive(Debug, Default)]
struct Streams {
    next: AtomicU64,
}

impl Streams {
    fn next(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// The account id of stream number `n` (the stream is `account-{n}`).
pub fn account_id(n: u64) -> String {
    n.to_string()
}

/// Runs every workload against `subject`, in `headwater bench`'s order: the large stream is
/// written first (in batches), then the four timed append figures, then the large stream is read.
pub async fn run<S: Subject>(subject: S, plan: &Plan, label: &str) -> anyhow::Result<Figures> {
    let subject = Arc::new(subject);
    let streams = Arc::new(Streams::default());

    let large_number = streams.next();
    let large_account = account_id(large_number);
    let mut large = subject.writer(large_number);
    let mut written = 0u64;
    let started = Instant::now();
    while written < plan.stream_events {
        let n = (plan.stream_events - written).min(u64::from(plan.batch_events));
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        subject
            .append(&mut large, Deposit::batch(&large_account, n))
            .await
            .context("writing the large stream")?;
        written += u64::from(n);
    }
    eprintln!(
        "[{label}] wrote the large stream ({written} events) in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let one_writer = phase(&subject, &streams, 1, 1, plan.phase, label).await?;
    let many_writers = phase(&subject, &streams, plan.writers, 1, plan.phase, label).await?;
    let batch_one_writer =
        phase(&subject, &streams, 1, plan.batch_events, plan.phase, label).await?;
    let batch_many_writers = phase(
        &subject,
        &streams,
        plan.batch_writers,
        plan.batch_events,
        plan.phase,
        label,
    )
    .await?;
    let read_stream = read_phase(&subject, &large, plan, label).await?;
    Ok(Figures {
        one_writer: Some(one_writer),
        many_writers: Some(many_writers),
        batch_one_writer: Some(batch_one_writer),
        batch_many_writers: Some(batch_many_writers),
        read_stream,
        notes: Vec::new(),
    })
}

/// `writers` tasks, each appending `events_per_append` events at a time to its own stream and
/// waiting for each append, until `duration` has passed.
async fn phase<S: Subject>(
    subject: &Arc<S>,
    streams: &Arc<Streams>,
    writers: u32,
    events_per_append: u32,
    duration: Duration,
    label: &str,
) -> anyhow::Result<Figure> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for _ in 0..writers {
        let subject = Arc::clone(subject);
        let n = streams.next();
        tasks.spawn(async move {
            let mut writer = subject.writer(n);
            let account = account_id(n);
            let mut rate = Rate::new();
            while Instant::now() < deadline {
                let events = Deposit::batch(&account, events_per_append);
                let op = Instant::now();
                let conflicts = subject
                    .append(&mut writer, events)
                    .await
                    .with_context(|| format!("append to account-{n}"))?;
                rate.record(op.elapsed(), u64::from(events_per_append));
                rate.conflicts += conflicts;
            }
            Ok::<Rate, anyhow::Error>(rate)
        });
    }
    let mut total = Rate::new();
    while let Some(joined) = tasks.join_next().await {
        total.merge(&joined.context("a writer task failed")??);
    }
    let figure = total.figure(start.elapsed());
    eprintln!(
        "[{label}] {writers} writer(s), {events_per_append} event(s) per append: {:.0} events/s, p50 {:.2} ms, p99 {:.2} ms{}",
        figure.events_per_sec,
        figure.p50_ms.unwrap_or(0.0),
        figure.p99_ms.unwrap_or(0.0),
        if figure.conflicts_retried > 0 {
            format!(", {} conflicts retried", figure.conflicts_retried)
        } else {
            String::new()
        }
    );
    Ok(figure)
}

/// Reads the large stream forward, again and again until the phase has passed (at least once,
/// at most 3 times), checking that every event came back.
async fn read_phase<S: Subject>(
    subject: &Arc<S>,
    large: &S::Writer,
    plan: &Plan,
    label: &str,
) -> anyhow::Result<Option<Figure>> {
    const READS_MAX: u32 = 3;
    let mut rate = Rate::new();
    let start = Instant::now();
    for _ in 0..READS_MAX {
        let op = Instant::now();
        let Some(read) = subject.read_stream(large).await? else {
            return Ok(None);
        };
        if read != plan.stream_events {
            bail!(
                "read {read} events of the large stream, {} were written",
                plan.stream_events
            );
        }
        rate.record(op.elapsed(), read);
        if start.elapsed() >= plan.phase {
            break;
        }
    }
    let mut figure = rate.figure(start.elapsed());
    // One "operation" is a whole read: its latency says nothing about one event.
    figure.p50_ms = None;
    figure.p99_ms = None;
    eprintln!(
        "[{label}] read a {}-event stream forward: {:.0} events/s",
        plan.stream_events, figure.events_per_sec
    );
    Ok(Some(figure))
}

/// The fsync bound: `write(FSYNC_RECORD_BYTES) + fdatasync` in a loop on a growing file in
/// `dir`, for `duration`; commits per second.
pub fn fsync_bound(dir: &Path, duration: Duration) -> anyhow::Result<f64> {
    use std::io::Write;
    let path = dir.join("fsync-bound");
    let mut file = std::fs::File::create(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let record = [0x5a_u8; FSYNC_RECORD_BYTES];
    let start = Instant::now();
    let mut commits = 0u64;
    while start.elapsed() < duration {
        file.write_all(&record).context("fsync loop: write")?;
        file.sync_data().context("fsync loop: fdatasync")?;
        commits += 1;
    }
    let per_sec = commits as f64 / start.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    Ok(per_sec)
}

/// Whether a database error message or code says "retry me": a serialization failure
/// (40001), a deadlock (40P01), or SQLite's busy/locked.
pub fn is_retryable(code: Option<&str>, message: &str) -> bool {
    matches!(code, Some("40001" | "40P01" | "5" | "6" | "517" | "262"))
        || message.contains("database is locked")
        || message.contains("could not serialize access")
}

/// `url` with its database replaced by `database` (`postgres://USER@HOST:PORT/DB?…`).
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

/// A fresh database name with `prefix`.
pub fn fresh_database_name(prefix: &str) -> String {
    format!("{prefix}_{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deposits_are_about_150_bytes_of_json() {
        let deposit = Deposit::random("42", &mut rand::rng());
        let json = serde_json::to_string(&deposit).unwrap();
        assert!((120..=200).contains(&json.len()), "{json}");
        assert!(
            json.starts_with(r#"{"account_id":"42","amount_cents":"#),
            "{json}"
        );
    }

    #[test]
    fn database_is_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h:1/db?sslmode=disable", "y"),
            "postgres://u:p@h:1/y?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:1", "z"), "postgres://h:1/z");
    }
}
