//! Figures beside what they are compared to: the markdown table (for BENCHMARKS.md) and JSON.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::system::{Machine, Memory};
use super::{Plan, Results};
use crate::text::group;

/// The slowest latency a histogram tells apart, in nanoseconds (longer ones count as this).
const LATENCY_NANOS_MAX: u64 = 60_000_000_000;
/// Significant figures of recorded latencies: 2 (1 % precision) keeps a histogram near 30 KiB,
/// where 3 would take over 200 KiB per concurrent writer.
const LATENCY_SIGNIFICANT_FIGURES: u8 = 2;

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
    /// Created at the first recorded operation: reads have none. Small (tens of KiB), since
    /// every concurrent writer holds one and the benchmark's own memory counts in its figures.
    latency: Option<Histogram<u64>>,
    /// Bytes the process wrote while this was measured (see `system::written_bytes`).
    written_bytes: Option<u64>,
}

impl Default for Rate {
    fn default() -> Rate {
        Rate::new()
    }
}

impl Rate {
    pub(crate) fn new() -> Rate {
        Rate {
            ops: 0,
            events: 0,
            elapsed: Duration::ZERO,
            latency: None,
            written_bytes: None,
        }
    }

    /// One operation that took `latency` and handled `events` events.
    pub(crate) fn record(&mut self, latency: Duration, events: u64) {
        self.ops += 1;
        self.events += events;
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        if let Some(latency) = self.histogram() {
            latency.saturating_record(nanos.max(1));
        }
    }

    /// The latency histogram, created on first use; `None` only if the constant bounds were
    /// refused, which they are not.
    fn histogram(&mut self) -> Option<&mut Histogram<u64>> {
        if self.latency.is_none() {
            self.latency =
                Histogram::new_with_bounds(1, LATENCY_NANOS_MAX, LATENCY_SIGNIFICANT_FIGURES).ok();
        }
        self.latency.as_mut()
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
        if let Some(theirs) = &other.latency
            && let Some(ours) = self.histogram()
        {
            let _ = ours.add(theirs);
        }
    }

    /// The wall-clock time the work took.
    pub(crate) fn finish(&mut self, elapsed: Duration) {
        self.elapsed = elapsed;
    }

    /// Counts bytes written during the measurement (`None`: unknown, changes nothing).
    pub(crate) fn add_written_bytes(&mut self, bytes: Option<u64>) {
        if let Some(bytes) = bytes {
            self.written_bytes = Some(self.written_bytes.unwrap_or(0) + bytes);
        }
    }

    pub(crate) fn add_elapsed(&mut self, elapsed: Duration) {
        self.elapsed += elapsed;
    }

    pub(crate) fn written_bytes(&self) -> Option<u64> {
        self.written_bytes
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
        let latency = self.latency.as_ref().filter(|h| !h.is_empty())?;
        Some(Duration::from_nanos(latency.value_at_quantile(quantile)))
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
            written_bytes_per_event: self
                .written_bytes
                .filter(|_| self.events > 0)
                .map(|bytes| (bytes as f64 / self.events as f64).round()),
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
    /// Bytes the process wrote per event (write calls: a store's WAL, checkpoints, files).
    written_bytes_per_event: Option<f64>,
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

/// What a figure is held against.
#[derive(Clone, Copy, Debug)]
enum Aim {
    None,
    /// At least this share of the fsync bound measured in the same run.
    ShareOfBound(f64),
    /// At least this many events per second.
    AtLeast(f64),
}

impl Aim {
    fn text(self) -> Option<String> {
        match self {
            Aim::None => None,
            Aim::ShareOfBound(share) => {
                Some(format!("≥ {:.0} % of the fsync bound", share * 100.0))
            }
            Aim::AtLeast(rate) => Some(format!("≥ {} events/s", group(rate))),
        }
    }

    fn verdict(self, per_second: f64, ratio_to_bound: Option<f64>) -> Option<Verdict> {
        match self {
            Aim::None => None,
            Aim::ShareOfBound(share) => {
                Some(Verdict::of(ratio_to_bound.is_some_and(|r| r >= share)))
            }
            Aim::AtLeast(rate) => Some(Verdict::of(per_second >= rate)),
        }
    }
}

/// One line of the table.
#[derive(Debug, Serialize)]
struct Row {
    key: &'static str,
    figure: String,
    unit: &'static str,
    /// With several runs: the median of each run's figure (and of its p50 and p99); `events`,
    /// `ops` and `seconds` add up all runs.
    #[serde(flatten)]
    rate: RateSummary,
    /// Each run's figure, in run order.
    runs_per_second: Vec<f64>,
    /// This figure over the fsync bound of the same run (the median over runs).
    ratio_to_bound: Option<f64>,
    compared_to: Option<String>,
    aim: Option<String>,
    verdict: Option<Verdict>,
    #[serde(skip)]
    aim_kind: Aim,
}

impl Row {
    fn new(key: &'static str, figure: String, unit: &'static str, rate: &Rate) -> Row {
        let summary = rate.summary();
        Row {
            key,
            figure,
            unit,
            runs_per_second: vec![summary.per_second],
            rate: summary,
            ratio_to_bound: None,
            compared_to: None,
            aim: None,
            verdict: None,
            aim_kind: Aim::None,
        }
    }

    /// Compares the figure with the fsync bound of its run.
    fn against_bound(mut self, bound: f64) -> Row {
        self.ratio_to_bound = (bound > 0.0).then(|| self.rate.per_second / bound);
        self
    }

    fn aiming(mut self, aim: Aim) -> Row {
        self.aim_kind = aim;
        self
    }

    /// Fills the comparison, the aim and the verdict from the figures.
    fn judged(mut self) -> Row {
        self.compared_to = self.ratio_to_bound.map(|r| relative(r, "the fsync bound"));
        self.aim = self.aim_kind.text();
        self.verdict = self
            .aim_kind
            .verdict(self.rate.per_second, self.ratio_to_bound);
        self
    }

    /// The row of several runs: medians of the figures, sums of the counts.
    fn median_of(runs: &[&Row]) -> Option<Row> {
        let first = runs.first()?;
        let median_of = |f: &dyn Fn(&Row) -> Option<f64>| median(runs.iter().filter_map(|r| f(r)));
        let rate = RateSummary {
            per_second: median_of(&|r| Some(r.rate.per_second)).unwrap_or(0.0),
            events: runs.iter().map(|r| r.rate.events).sum(),
            ops: runs.iter().map(|r| r.rate.ops).sum(),
            seconds: runs.iter().map(|r| r.rate.seconds).sum(),
            p50_ms: median_of(&|r| r.rate.p50_ms),
            p99_ms: median_of(&|r| r.rate.p99_ms),
            max_ms: runs.iter().filter_map(|r| r.rate.max_ms).reduce(f64::max),
            written_bytes_per_event: median_of(&|r| r.rate.written_bytes_per_event),
        };
        let row = Row {
            key: first.key,
            figure: first.figure.clone(),
            unit: first.unit,
            rate,
            runs_per_second: runs.iter().map(|r| r.rate.per_second).collect(),
            ratio_to_bound: median_of(&|r| r.ratio_to_bound),
            compared_to: None,
            aim: None,
            verdict: None,
            aim_kind: first.aim_kind,
        };
        Some(row.judged())
    }
}

/// The median (the mean of the two middle values for an even count); `None` for no values.
fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// The figures of one run, judged.
fn run_rows(plan: &Plan, results: &Results, local_files: bool) -> Vec<Row> {
    let Results {
        fsync,
        prepared: _,
        appends,
        reads,
    } = results;
    let bound = fsync.growing.per_second();
    let mut rows = vec![
        Row::new(
            "fsync_growing",
            format!(
                "fsync bound: write {} B + fdatasync, growing file",
                plan.record_bytes
            ),
            "ops/s",
            &fsync.growing,
        ),
        Row::new(
            "fsync_overwrite",
            format!(
                "write {} B + fdatasync, pre-allocated space",
                plan.record_bytes
            ),
            "ops/s",
            &fsync.overwrite,
        )
        .against_bound(bound),
        Row::new(
            "append_one_writer",
            "durable append, 1 writer, 1 event per append".to_owned(),
            "events/s",
            &appends.one_writer,
        )
        .against_bound(bound)
        .aiming(Aim::ShareOfBound(AIM_ONE_WRITER_OF_BOUND)),
        Row::new(
            "append_many_writers",
            format!(
                "durable append, {} writers on distinct streams, 1 event each",
                plan.writers
            ),
            "events/s",
            &appends.many_writers,
        )
        .against_bound(bound)
        .aiming(Aim::AtLeast(AIM_MANY_WRITERS_EVENTS_PER_SEC)),
        Row::new(
            "append_batch_one_writer",
            format!("durable append, batches of {}, 1 writer", plan.batch_events),
            "events/s",
            &appends.batch_one_writer,
        )
        .against_bound(bound)
        .aiming(Aim::AtLeast(AIM_BATCH_EVENTS_PER_SEC)),
        Row::new(
            "append_batch_many_writers",
            format!(
                "durable append, batches of {}, {} writers",
                plan.batch_events, plan.batch_writers
            ),
            "events/s",
            &appends.batch_many_writers,
        )
        .against_bound(bound)
        .aiming(Aim::AtLeast(AIM_BATCH_EVENTS_PER_SEC)),
        Row::new(
            "read_stream",
            format!(
                "read one stream forward ({} events)",
                group(plan.stream_events as f64)
            ),
            "events/s",
            &reads.read_stream,
        )
        .aiming(Aim::AtLeast(AIM_READ_EVENTS_PER_SEC)),
        Row::new(
            "read_all",
            format!(
                "read the whole log forward (~{} events)",
                group(reads.events_end as f64)
            ),
            "events/s",
            &reads.read_all,
        )
        .aiming(Aim::AtLeast(AIM_READ_EVENTS_PER_SEC)),
    ];
    if !local_files {
        // The store writes in another process: this one's write calls are not its writes.
        for row in &mut rows {
            row.rate.written_bytes_per_event = None;
        }
    }
    rows.into_iter().map(Row::judged).collect()
}

#[derive(Debug, Serialize)]
struct PlanSummary {
    runs: usize,
    quick: bool,
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

/// Memory and size on disk in one run. Memory is the process's: a later run starts with what
/// earlier ones left (a peak stays a peak).
#[derive(Debug, Serialize)]
struct MemorySummary {
    events_end: u64,
    disk_bytes_end: u64,
    checkpoints: Vec<CheckpointSummary>,
    end: Memory,
    verdict: Option<Verdict>,
}

impl MemorySummary {
    fn of(results: &Results) -> MemorySummary {
        let (prepared, reads) = (&results.prepared, &results.reads);
        let highest_rss = prepared
            .checkpoints
            .iter()
            .map(|c| c.memory)
            .chain(std::iter::once(reads.memory_end))
            .filter_map(|m| m.rss_kib)
            .max();
        MemorySummary {
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
            verdict: highest_rss.map(|rss| Verdict::of(rss <= AIM_RSS_KIB)),
        }
    }
}

/// One run's figures, as measured.
#[derive(Debug, Serialize)]
struct RunSummary {
    figures: Vec<Row>,
    memory: MemorySummary,
    /// Filling the store for the reads and the memory table (batches, several writers).
    fill: RateSummary,
}

/// The results of all runs.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    command: String,
    backend: &'static str,
    durable: bool,
    machine: Machine,
    plan: PlanSummary,
    /// Each figure: the median over the runs (the figure itself for one run).
    figures: Vec<Row>,
    memory_aim: String,
    /// The memory verdict: every run's RSS stayed within the aim at every size.
    memory_verdict: Option<Verdict>,
    /// The highest VmHWM seen, in KiB.
    peak_kib: Option<u64>,
    runs: Vec<RunSummary>,
}

impl Report {
    pub(crate) fn new(
        plan: &Plan,
        backend: &'static str,
        durable: bool,
        local_files: bool,
        machine: Machine,
        results: &[Results],
    ) -> Report {
        let runs: Vec<RunSummary> = results
            .iter()
            .map(|r| RunSummary {
                figures: run_rows(plan, r, local_files),
                memory: MemorySummary::of(r),
                fill: r.prepared.fill.summary(),
            })
            .collect();
        let figure_count = runs.first().map_or(0, |r| r.figures.len());
        let figures = (0..figure_count)
            .filter_map(|i| {
                let rows: Vec<&Row> = runs.iter().filter_map(|r| r.figures.get(i)).collect();
                Row::median_of(&rows)
            })
            .collect();
        let verdicts: Vec<Verdict> = runs.iter().filter_map(|r| r.memory.verdict).collect();
        let memory_verdict = (!verdicts.is_empty())
            .then(|| Verdict::of(verdicts.iter().all(|v| matches!(v, Verdict::Pass))));
        Report {
            command: command_line(),
            backend,
            durable,
            machine,
            plan: PlanSummary {
                runs: results.len(),
                quick: plan.quick,
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
            memory_aim: format!(
                "flat as the store grows: RSS ≤ {} MiB at every size",
                AIM_RSS_KIB / 1024
            ),
            memory_verdict,
            peak_kib: runs.iter().filter_map(|r| r.memory.end.peak_kib).max(),
            runs,
        }
    }

    /// The human report: a markdown section that can be pasted into BENCHMARKS.md.
    pub(crate) fn markdown(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let p = &self.plan;
        let several = p.runs > 1;
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
        if several {
            let _ = writeln!(
                out,
                "- {} runs, each on a fresh store: every figure is the median of the runs \
                 (each run's figure in the last column); \"compared to\" is the median of each \
                 run's figure over that run's fsync bound; memory is the process's, so a run \
                 starts with what earlier runs left",
                p.runs
            );
        }
        if p.quick {
            let _ = writeln!(
                out,
                "- note: a `--quick` run (a smoke test): short phases on a small store, figures \
                 that mean little"
            );
        }
        if self.backend == "postgres" {
            let _ = writeln!(
                out,
                "- note: the store is a PostgreSQL server: its memory and disk writes are not in \
                 this process's figures, and the fsync bound is that of the disk of `--dir`"
            );
        }
        if !self.durable {
            let _ = writeln!(
                out,
                "- note: the {} backend keeps nothing on disk: its append figures measure the \
                 harness, not durability, and its memory grows with the store by design",
                self.backend
            );
        }
        out.push('\n');
        let runs_head = if several { " runs |" } else { "" };
        let runs_rule = if several { " --- |" } else { "" };
        let _ = writeln!(
            out,
            "| figure | rate | p50 | p99 | compared to | aim | verdict |{runs_head}"
        );
        let _ = writeln!(
            out,
            "| --- | ---: | ---: | ---: | --- | --- | --- |{runs_rule}"
        );
        let dash = "—".to_owned();
        for row in &self.figures {
            let runs = if several {
                let each: Vec<String> = row.runs_per_second.iter().map(|v| group(*v)).collect();
                format!(" {} |", each.join(" / "))
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "| {} | {} {} | {} | {} | {} | {} | {} |{runs}",
                row.figure,
                group(row.rate.per_second),
                row.unit,
                row.rate.p50_ms.map_or(dash.clone(), format_ms),
                row.rate.p99_ms.map_or(dash.clone(), format_ms),
                row.compared_to.as_deref().unwrap_or("—"),
                row.aim.as_deref().unwrap_or("—"),
                row.verdict.map_or("—", Verdict::label),
            );
        }
        let extra = if several { " — |" } else { "" };
        let _ = writeln!(
            out,
            "| peak memory (VmHWM) | {} | — | — | — | — | — |{extra}",
            format_kib(self.peak_kib)
        );
        if let Some(last) = self.runs.last() {
            let _ = writeln!(
                out,
                "| RSS at the end ({} events in the store) | {} | — | — | — | {} | {} |{extra}",
                group(last.memory.events_end as f64),
                format_kib(last.memory.end.rss_kib),
                self.memory_aim,
                self.memory_verdict.map_or("—", Verdict::label),
            );
        }
        out.push_str(
            "\np50 / p99: latency of one operation (one append, one write + fdatasync).\n",
        );
        let written: Vec<&Row> = self
            .figures
            .iter()
            .filter(|row| {
                row.key.starts_with("append") && row.rate.written_bytes_per_event.is_some()
            })
            .collect();
        if !written.is_empty() {
            out.push_str(
                "\nBytes written per appended event (all write calls of the process: the store's \
                 log or WAL, its checkpoints, its other files):\n\n",
            );
            out.push_str("| figure | bytes written per event |\n| --- | ---: |\n");
            for row in written {
                let _ = writeln!(
                    out,
                    "| {} | {} |",
                    row.figure,
                    row.rate
                        .written_bytes_per_event
                        .map_or("—".to_owned(), group),
                );
            }
        }

        out.push_str("\nMemory as the store grows:\n\n");
        let run_col = if several { "| run " } else { "" };
        let run_rule = if several { "| ---: " } else { "" };
        let _ = writeln!(
            out,
            "{run_col}| events in the store | on disk | RSS | RSS anon | RSS file | peak (VmHWM) | read the whole log |"
        );
        let _ = writeln!(
            out,
            "{run_rule}| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for (n, run) in self.runs.iter().enumerate() {
            let run_cell = if several {
                format!("| {} ", n + 1)
            } else {
                String::new()
            };
            let mem = &run.memory;
            for c in &mem.checkpoints {
                let _ = writeln!(
                    out,
                    "{run_cell}| {} | {} | {} | {} | {} | {} | {} events/s |",
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
                "{run_cell}| {} (end) | {} | {} | {} | {} | {} | — |",
                group(mem.events_end as f64),
                format_disk(mem.disk_bytes_end, mem.events_end),
                format_kib(mem.end.rss_kib),
                format_kib(mem.end.rss_anon_kib),
                format_kib(mem.end.rss_file_kib),
                format_kib(mem.end.peak_kib),
            );
        }
        let fills: Vec<String> = self
            .runs
            .iter()
            .map(|r| {
                if r.fill.events == 0 {
                    "—".to_owned()
                } else {
                    group(r.fill.per_second)
                }
            })
            .collect();
        let _ = writeln!(
            out,
            "\nFilling the store (batches of {}, {} writers): {} events/s.",
            p.batch_events,
            p.batch_writers,
            fills.join(" / "),
        );
        out
    }
}

/// `ratio` as a share or a multiple of what `name` says.
fn relative(ratio: f64, name: &str) -> String {
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

/// The command line as typed, quoted where a shell needs it, with any password in a URL hidden.
pub(crate) fn command_line() -> String {
    std::env::args_os()
        .map(|arg| {
            let arg = redact_password(&arg.to_string_lossy());
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

/// `scheme://user:password@host…` with the password replaced by `***`.
fn redact_password(arg: &str) -> String {
    let Some(scheme_end) = arg.find("://") else {
        return arg.to_owned();
    };
    let rest = &arg[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return arg.to_owned();
    };
    let Some(colon) = rest[..at].find(':') else {
        return arg.to_owned();
    };
    format!(
        "{}{}:***{}",
        &arg[..scheme_end + 3],
        &rest[..colon],
        &rest[at..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_is_a_share_then_a_multiple() {
        assert_eq!(relative(0.7, "b"), "70 % of b");
        assert_eq!(relative(12.3, "b"), "12.3 × b");
    }

    #[test]
    fn a_rate_without_operations_has_no_histogram() {
        let mut read = Rate::new();
        read.add_events(1_000);
        read.finish(Duration::from_millis(1));
        assert!(read.latency.is_none());
        assert_eq!(read.quantile(0.99), None);
        let mut merged = Rate::new();
        merged.merge(&read);
        assert!(merged.latency.is_none());
        assert_eq!(merged.events, 1_000);
    }

    #[test]
    fn histograms_are_small() {
        let mut rate = Rate::new();
        rate.record(Duration::from_micros(150), 1);
        let histogram = rate.latency.as_ref().unwrap();
        let bytes = histogram.distinct_values() * std::mem::size_of::<u64>();
        assert!(bytes <= 64 * 1024, "{bytes} bytes");
    }

    #[test]
    fn passwords_in_urls_are_hidden() {
        for (arg, shown) in [
            (
                "postgres://bench:s3cr:et@db:5432/x",
                "postgres://bench:***@db:5432/x",
            ),
            ("postgres://bench@db:5432/x", "postgres://bench@db:5432/x"),
            ("postgres://db/x?a=b@c", "postgres://db/x?a=b@c"),
            ("--events", "--events"),
            ("/tmp/a@b:c", "/tmp/a@b:c"),
        ] {
            assert_eq!(redact_password(arg), shown, "{arg}");
        }
    }

    #[test]
    fn medians() {
        assert_eq!(median([].into_iter()), None);
        assert_eq!(median([3.0].into_iter()), Some(3.0));
        assert_eq!(median([5.0, 1.0, 3.0].into_iter()), Some(3.0));
        assert_eq!(median([4.0, 1.0, 3.0, 2.0].into_iter()), Some(2.5));
    }

    #[test]
    fn the_median_row_is_judged_on_medians() {
        let row = |per_second: f64, bound: f64| {
            let mut rate = Rate::new();
            rate.record(Duration::from_millis(1), 1);
            rate.add_events(u64::try_from(per_second as i64).unwrap() - 1);
            rate.finish(Duration::from_secs(1));
            Row::new("k", "figure".to_owned(), "events/s", &rate)
                .against_bound(bound)
                .aiming(Aim::ShareOfBound(0.7))
                .judged()
        };
        // Shares of their own run's bound: 50 %, 40 %, 90 %: the median share, 50 %, is short
        // although the median rate, 800, is 80 % of the median bound, 1,000.
        let runs = [
            row(500.0, 1_000.0),
            row(800.0, 2_000.0),
            row(900.0, 1_000.0),
        ];
        let runs = [&runs[0], &runs[1], &runs[2]];
        let median_row = Row::median_of(&runs).unwrap();
        assert_eq!(median_row.rate.per_second, 800.0);
        assert_eq!(median_row.runs_per_second, vec![500.0, 800.0, 900.0]);
        assert_eq!(median_row.ratio_to_bound, Some(0.5));
        assert_eq!(
            median_row.compared_to.as_deref(),
            Some("50 % of the fsync bound")
        );
        assert!(matches!(median_row.verdict, Some(Verdict::Short)));
        assert_eq!(median_row.rate.events, 2_200);

        let pass = [row(700.0, 1_000.0)];
        let pass = Row::median_of(&[&pass[0]]).unwrap();
        assert!(matches!(pass.verdict, Some(Verdict::Pass)));
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
