//! Figures beside what they are compared to: the markdown table (for BENCHMARKS.md) and JSON.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::system::{Machine, Memory};
use super::{Plan, Results};
use crate::text::group;

/// The slowest latency a histogram tells apart, in nanoseconds (longer ones count as this).
const LATENCY_NANOS_MAX: u64 = 60_000_000_000;
/// Significant figures of recorded latencies.
const LATENCY_SIGNIFICANT_FIGURES: u8 = 3;

/// SPEC's aim for one waiting writer: this share of the fsync bound.
const AIM_ONE_WRITER_OF_BOUND: f64 = 0.70;
/// SPEC's aim for 64 concurrent writers, 1 event per append, in events per second.
const AIM_MANY_WRITERS_EVENTS_PER_SEC: f64 = 50_000.0;
/// SPEC's aim for batches of 100 events, in events per second.
const AIM_BATCH_EVENTS_PER_SEC: f64 = 300_000.0;
/// SPEC's aim for reading forward, in events per second.
const AIM_READ_EVENTS_PER_SEC: f64 = 1_000_000.0;
/// SPEC's aim for memory: RSS of a producer holding 10 M events, in KiB.
const AIM_RSS_KIB: u64 = 64 * 1024;

/// A throughput, with the latency of each operation when there is one per operation.
#[derive(Clone, Debug)]
pub(crate) struct Rate {
    ops: u64,
    events: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

impl Default for Rate {
    fn default() -> Rate {
        Rate::new()
    }
}

impl Rate {
    pub(crate) fn new() -> Rate {
        let latency = Histogram::new_with_bounds(1, LATENCY_NANOS_MAX, LATENCY_SIGNIFICANT_FIGURES)
            .unwrap_or_else(|_| unreachable!("constant histogram bounds are valid"));
        Rate {
            ops: 0,
            events: 0,
            elapsed: Duration::ZERO,
            latency,
        }
    }

    /// One operation that took `latency` and handled `events` events.
    pub(crate) fn record(&mut self, latency: Duration, events: u64) {
        self.ops += 1;
        self.events += events;
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.latency.saturating_record(nanos.max(1));
    }

    /// Events handled without a latency of their own (reads).
    pub(crate) fn add_events(&mut self, events: u64) {
        self.events += events;
    }

    /// Adds another's operations and events (concurrent writers); not its duration.
    pub(crate) fn merge(&mut self, other: &Rate) {
        self.ops += other.ops;
        self.events += other.events;
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
    }

    /// The wall-clock time the work took.
    pub(crate) fn finish(&mut self, elapsed: Duration) {
        self.elapsed = elapsed;
    }

    pub(crate) fn add_elapsed(&mut self, elapsed: Duration) {
        self.elapsed += elapsed;
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// Events (or operations, for the fsync loops: one event each) per second.
    pub(crate) fn per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.events as f64 / secs
        } else {
            0.0
        }
    }

    fn quantile(&self, quantile: f64) -> Option<Duration> {
        (self.ops > 0 && !self.latency.is_empty())
            .then(|| Duration::from_nanos(self.latency.value_at_quantile(quantile)))
    }

    fn summary(&self) -> RateSummary {
        RateSummary {
            per_second: self.per_second().round(),
            events: self.events,
            ops: self.ops,
            seconds: self.elapsed.as_secs_f64(),
            p50_ms: self.quantile(0.50).map(millis),
            p99_ms: self.quantile(0.99).map(millis),
            max_ms: self.quantile(1.0).map(millis),
        }
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

#[derive(Debug, Serialize)]
struct RateSummary {
    /// Events per second (operations per second for the fsync loops).
    per_second: f64,
    events: u64,
    ops: u64,
    seconds: f64,
    /// Latency of one operation (one append, one write + fdatasync), when measured.
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    max_ms: Option<f64>,
}

#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "UPPERCASE")]
enum Verdict {
    Pass,
    Short,
}

impl Verdict {
    fn of(pass: bool) -> Verdict {
        if pass { Verdict::Pass } else { Verdict::Short }
    }

    fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Short => "SHORT",
        }
    }
}

/// One line of the table.
#[derive(Debug, Serialize)]
struct Row {
    key: &'static str,
    figure: String,
    unit: &'static str,
    #[serde(flatten)]
    rate: RateSummary,
    compared_to: Option<String>,
    aim: Option<String>,
    verdict: Option<Verdict>,
}

#[derive(Debug, Serialize)]
struct PlanSummary {
    phase_secs: f64,
    record_bytes: u64,
    events: u64,
    stream_events: u64,
    writers: u32,
    batch_events: u32,
    batch_writers: u32,
    event_ids: &'static str,
    event_data_bytes: usize,
}

#[derive(Debug, Serialize)]
struct CheckpointSummary {
    events: u64,
    disk_bytes: u64,
    #[serde(flatten)]
    memory: Memory,
    read_all_per_second: f64,
}

#[derive(Debug, Serialize)]
struct MemorySummary {
    peak_kib: Option<u64>,
    rss_end_kib: Option<u64>,
    events_end: u64,
    disk_bytes_end: u64,
    checkpoints: Vec<CheckpointSummary>,
    end: Memory,
    aim: String,
    verdict: Option<Verdict>,
}

/// A whole run's results.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    command: String,
    backend: &'static str,
    durable: bool,
    machine: Machine,
    plan: PlanSummary,
    figures: Vec<Row>,
    memory: MemorySummary,
    /// Filling the store for the reads and the memory table (batches, several writers).
    fill: RateSummary,
}

impl Report {
    pub(crate) fn new(
        plan: &Plan,
        backend: &'static str,
        durable: bool,
        machine: Machine,
        results: Results,
    ) -> Report {
        let Results {
            fsync,
            prepared,
            appends,
            reads,
        } = results;
        let bound = fsync.growing.per_second();
        let of_bound = |rate: &Rate| Some(relative(rate.per_second(), bound, "the fsync bound"));
        let at_least = |rate: &Rate, aim: f64| {
            (
                Some(format!("≥ {} events/s", group(aim))),
                Some(Verdict::of(rate.per_second() >= aim)),
            )
        };
        let mut figures = Vec::new();
        figures.push(Row {
            key: "fsync_growing",
            figure: format!(
                "fsync bound: write {} B + fdatasync, growing file",
                plan.record_bytes
            ),
            unit: "ops/s",
            rate: fsync.growing.summary(),
            compared_to: None,
            aim: None,
            verdict: None,
        });
        figures.push(Row {
            key: "fsync_overwrite",
            figure: format!(
                "write {} B + fdatasync, pre-allocated space",
                plan.record_bytes
            ),
            unit: "ops/s",
            rate: fsync.overwrite.summary(),
            compared_to: of_bound(&fsync.overwrite),
            aim: None,
            verdict: None,
        });
        figures.push(Row {
            key: "append_one_writer",
            figure: "durable append, 1 writer, 1 event per append".to_owned(),
            unit: "events/s",
            rate: appends.one_writer.summary(),
            compared_to: of_bound(&appends.one_writer),
            aim: Some(format!(
                "≥ {:.0} % of the fsync bound",
                AIM_ONE_WRITER_OF_BOUND * 100.0
            )),
            verdict: Some(Verdict::of(
                bound > 0.0 && appends.one_writer.per_second() >= AIM_ONE_WRITER_OF_BOUND * bound,
            )),
        });
        let (aim, verdict) = at_least(&appends.many_writers, AIM_MANY_WRITERS_EVENTS_PER_SEC);
        figures.push(Row {
            key: "append_many_writers",
            figure: format!(
                "durable append, {} writers on distinct streams, 1 event each",
                plan.writers
            ),
            unit: "events/s",
            rate: appends.many_writers.summary(),
            compared_to: of_bound(&appends.many_writers),
            aim,
            verdict,
        });
        let (aim, verdict) = at_least(&appends.batch_one_writer, AIM_BATCH_EVENTS_PER_SEC);
        figures.push(Row {
            key: "append_batch_one_writer",
            figure: format!("durable append, batches of {}, 1 writer", plan.batch_events),
            unit: "events/s",
            rate: appends.batch_one_writer.summary(),
            compared_to: of_bound(&appends.batch_one_writer),
            aim,
            verdict,
        });
        let (aim, verdict) = at_least(&appends.batch_many_writers, AIM_BATCH_EVENTS_PER_SEC);
        figures.push(Row {
            key: "append_batch_many_writers",
            figure: format!(
                "durable append, batches of {}, {} writers",
                plan.batch_events, plan.batch_writers
            ),
            unit: "events/s",
            rate: appends.batch_many_writers.summary(),
            compared_to: of_bound(&appends.batch_many_writers),
            aim,
            verdict,
        });
        let (aim, verdict) = at_least(&reads.read_stream, AIM_READ_EVENTS_PER_SEC);
        figures.push(Row {
            key: "read_stream",
            figure: format!(
                "read one stream forward ({} events)",
                group(plan.stream_events as f64)
            ),
            unit: "events/s",
            rate: reads.read_stream.summary(),
            compared_to: None,
            aim,
            verdict,
        });
        let (aim, verdict) = at_least(&reads.read_all, AIM_READ_EVENTS_PER_SEC);
        figures.push(Row {
            key: "read_all",
            figure: format!(
                "read the whole log forward ({} events)",
                group(reads.events_end as f64)
            ),
            unit: "events/s",
            rate: reads.read_all.summary(),
            compared_to: None,
            aim,
            verdict,
        });

        let samples = prepared
            .checkpoints
            .iter()
            .map(|c| c.memory)
            .chain(std::iter::once(reads.memory_end));
        let highest_rss = samples.filter_map(|m| m.rss_kib).max();
        let memory = MemorySummary {
            peak_kib: reads.memory_end.peak_kib,
            rss_end_kib: reads.memory_end.rss_kib,
            events_end: reads.events_end,
            disk_bytes_end: reads.disk_bytes_end,
            checkpoints: prepared
                .checkpoints
                .iter()
                .map(|c| CheckpointSummary {
                    events: c.events,
                    disk_bytes: c.disk_bytes,
                    memory: c.memory,
                    read_all_per_second: c.read_all.per_second().round(),
                })
                .collect(),
            end: reads.memory_end,
            aim: format!(
                "flat as the store grows: RSS ≤ {} MiB at every size",
                AIM_RSS_KIB / 1024
            ),
            verdict: highest_rss.map(|rss| Verdict::of(rss <= AIM_RSS_KIB)),
        };
        Report {
            command: command_line(),
            backend,
            durable,
            machine,
            plan: PlanSummary {
                phase_secs: plan.phase.as_secs_f64(),
                record_bytes: plan.record_bytes,
                events: plan.events,
                stream_events: plan.stream_events,
                writers: plan.writers,
                batch_events: plan.batch_events,
                batch_writers: plan.batch_writers,
                event_ids: plan.event_ids.name(),
                event_data_bytes: super::store::sample_data_bytes(),
            },
            figures,
            memory,
            fill: prepared.fill.summary(),
        }
    }

    pub(crate) fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let mut file = std::fs::File::create(path)?;
        serde_json::to_writer_pretty(&mut file, self)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        Ok(())
    }

    /// The human report: a markdown section that can be pasted into BENCHMARKS.md.
    pub(crate) fn markdown(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let p = &self.plan;
        let _ = writeln!(out, "### `headwater bench`: {} backend\n", self.backend);
        let _ = writeln!(out, "- command: `{}`", self.command);
        let memory_total = m
            .memory_total_kib
            .map(|kib| format!(", {:.0} GiB of memory", kib as f64 / 1024.0 / 1024.0))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "- machine: {}, {} cores{memory_total}, {}",
            m.cpu, m.cores, m.kernel
        );
        let _ = writeln!(out, "- disk: {} at `{}`", m.filesystem, m.dir);
        let _ = writeln!(
            out,
            "- workload: `account.deposited` events with ~{} bytes of JSON data and {} ids, \
             one `account-{{n}}` stream per writer; fsync record {} B; timed phases {} s each; \
             store filled to {} events before the append figures",
            p.event_data_bytes,
            p.event_ids,
            p.record_bytes,
            trim_float(p.phase_secs),
            group(p.events as f64)
        );
        if !self.durable {
            let _ = writeln!(
                out,
                "- note: the {} backend keeps nothing on disk: its append figures measure the \
                 harness, not durability, and its memory grows with the store by design",
                self.backend
            );
        }
        out.push('\n');
        out.push_str("| figure | rate | p50 | p99 | compared to | aim | verdict |\n");
        out.push_str("| --- | ---: | ---: | ---: | --- | --- | --- |\n");
        for row in &self.figures {
            let _ = writeln!(
                out,
                "| {} | {} {} | {} | {} | {} | {} | {} |",
                row.figure,
                group(row.rate.per_second),
                row.unit,
                row.rate.p50_ms.map_or("—".to_owned(), format_ms),
                row.rate.p99_ms.map_or("—".to_owned(), format_ms),
                row.compared_to.as_deref().unwrap_or("—"),
                row.aim.as_deref().unwrap_or("—"),
                row.verdict.map_or("—", Verdict::label),
            );
        }
        let mem = &self.memory;
        let _ = writeln!(
            out,
            "| peak memory (VmHWM) | {} | — | — | — | — | — |",
            format_kib(mem.peak_kib)
        );
        let _ = writeln!(
            out,
            "| RSS at the end ({} events in the store) | {} | — | — | — | {} | {} |",
            group(mem.events_end as f64),
            format_kib(mem.rss_end_kib),
            mem.aim,
            mem.verdict.map_or("—", Verdict::label),
        );
        out.push_str(
            "\np50 / p99: latency of one operation (one append, one write + fdatasync).\n",
        );

        out.push_str("\nMemory as the store grows:\n\n");
        out.push_str("| events in the store | on disk | RSS | RSS anon | RSS file | peak (VmHWM) | read the whole log |\n");
        out.push_str("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        for c in &mem.checkpoints {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} events/s |",
                group(c.events as f64),
                format_disk(c.disk_bytes, c.events),
                format_kib(c.memory.rss_kib),
                format_kib(c.memory.rss_anon_kib),
                format_kib(c.memory.rss_file_kib),
                format_kib(c.memory.peak_kib),
                group(c.read_all_per_second),
            );
        }
        let _ = writeln!(
            out,
            "| {} (end) | {} | {} | {} | {} | {} | — |",
            group(mem.events_end as f64),
            format_disk(mem.disk_bytes_end, mem.events_end),
            format_kib(mem.end.rss_kib),
            format_kib(mem.end.rss_anon_kib),
            format_kib(mem.end.rss_file_kib),
            format_kib(mem.end.peak_kib),
        );
        let _ = writeln!(
            out,
            "\nFilling the store: {} events/s (batches of {}, {} writers, {} events).",
            group(self.fill.per_second),
            p.batch_events,
            p.batch_writers,
            group(self.fill.events as f64),
        );
        out
    }
}

/// `rate` as a share or a multiple of `base`.
fn relative(rate: f64, base: f64, name: &str) -> String {
    if base <= 0.0 {
        return format!("({name} not measured)");
    }
    let ratio = rate / base;
    if ratio < 2.0 {
        format!("{:.0} % of {name}", ratio * 100.0)
    } else {
        format!("{ratio:.1} × {name}")
    }
}

fn format_ms(ms: f64) -> String {
    if ms < 1.0 {
        format!("{ms:.3} ms")
    } else if ms < 100.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

fn format_kib(kib: Option<u64>) -> String {
    kib.map_or("unknown".to_owned(), |kib| {
        format!("{:.1} MiB", kib as f64 / 1024.0)
    })
}

/// Bytes on disk, and per event.
fn format_disk(bytes: u64, events: u64) -> String {
    if bytes == 0 {
        return "—".to_owned();
    }
    let per_event = if events > 0 {
        format!(" ({:.0} B/event)", bytes as f64 / events as f64)
    } else {
        String::new()
    };
    format!("{:.1} MiB{per_event}", bytes as f64 / 1024.0 / 1024.0)
}

fn trim_float(value: f64) -> String {
    let text = format!("{value:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// The command line as typed, quoted where a shell needs it.
fn command_line() -> String {
    std::env::args_os()
        .map(|arg| {
            let arg = arg.to_string_lossy().into_owned();
            let plain = !arg.is_empty()
                && arg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain {
                arg
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_is_a_share_then_a_multiple() {
        assert_eq!(relative(70.0, 100.0, "b"), "70 % of b");
        assert_eq!(relative(1_230.0, 100.0, "b"), "12.3 × b");
        assert_eq!(relative(1.0, 0.0, "b"), "(b not measured)");
    }

    #[test]
    fn rate_merges_and_measures() {
        let mut a = Rate::new();
        a.record(Duration::from_millis(1), 1);
        let mut b = Rate::new();
        b.record(Duration::from_millis(3), 100);
        a.merge(&b);
        a.finish(Duration::from_secs(2));
        assert_eq!((a.ops, a.events), (2, 101));
        assert!((a.per_second() - 50.5).abs() < 1e-9);
        let p99 = a.quantile(0.99).unwrap();
        assert!(p99 >= Duration::from_micros(2_990), "{p99:?}");
        assert_eq!(Rate::new().quantile(0.5), None);
    }
}
