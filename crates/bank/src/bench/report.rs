//! The figures beside their bounds: timings, the machine, the markdown table (for BENCHMARKS.md)
//! and the JSON.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The slowest time a histogram tells apart, in microseconds (longer ones count as this).
const LATENCY_MICROS_MAX: u64 = 60_000_000;
/// Significant figures of recorded times (0.1 % precision).
const LATENCY_SIGNIFICANT_FIGURES: u8 = 3;

/// Operations (commands, appends, events applied) and how long each took.
#[derive(Clone, Debug)]
pub(crate) struct Throughput {
    ops: u64,
    elapsed: Duration,
    /// CPU time this process spent during the phase (every thread: the service and the
    /// clients alike), when known.
    cpu: Option<Duration>,
    latency: Histogram<u64>,
}

impl Throughput {
    pub(crate) fn new() -> Throughput {
        Throughput {
            ops: 0,
            elapsed: Duration::ZERO,
            cpu: None,
            // The bounds are constants that hdrhistogram accepts.
            latency: Histogram::new_with_bounds(1, LATENCY_MICROS_MAX, LATENCY_SIGNIFICANT_FIGURES)
                .expect("constant histogram bounds are valid"),
        }
    }

    /// One operation that took `latency`.
    pub(crate) fn record(&mut self, latency: Duration) {
        self.ops += 1;
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency.saturating_record(micros.max(1));
    }

    /// Adds another's operations (concurrent clients); not its duration.
    pub(crate) fn merge(&mut self, other: &Throughput) {
        self.ops += other.ops;
        // Same bounds on both sides: adding cannot fail.
        let _ = self.latency.add(&other.latency);
    }

    /// The wall-clock time the operations took.
    pub(crate) fn finish(&mut self, elapsed: Duration) {
        self.elapsed = elapsed;
    }

    /// The CPU time the process spent during the phase (see [`cpu_time`]).
    pub(crate) fn set_cpu(&mut self, cpu: Option<Duration>) {
        self.cpu = cpu;
    }

    pub(crate) fn ops(&self) -> u64 {
        self.ops
    }

    pub(crate) fn per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ops as f64 / secs
        } else {
            0.0
        }
    }

    fn quantile_ms(&self, quantile: f64) -> Option<f64> {
        (!self.latency.is_empty())
            .then(|| self.latency.value_at_quantile(quantile) as f64 / 1_000.0)
    }

    pub(crate) fn summary(&self) -> Summary {
        Summary {
            per_second: self.per_second().round(),
            ops: self.ops,
            seconds: self.elapsed.as_secs_f64(),
            p50_ms: self.quantile_ms(0.50),
            p99_ms: self.quantile_ms(0.99),
            max_ms: self.quantile_ms(1.0),
            cpu_us_per_op: self
                .cpu
                .filter(|_| self.ops > 0)
                .map(|cpu| (cpu.as_secs_f64() * 1e6 / self.ops as f64).round()),
        }
    }
}

/// The CPU time (user and system) this process has used so far, from `/proc/self/stat`
/// (in clock ticks of 10 ms: read it over phases of seconds). `None` off Linux.
pub(crate) fn cpu_time() -> Option<Duration> {
    /// Linux's clock ticks per second as `/proc` reports them (`USER_HZ`).
    const TICKS_PER_SECOND: u64 = 100;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis(
        (utime + stime) * 1_000 / TICKS_PER_SECOND,
    ))
}

/// CPU time used since `before` was sampled.
pub(crate) fn cpu_since(before: Option<Duration>) -> Option<Duration> {
    Some(cpu_time()?.saturating_sub(before?))
}

/// A throughput or a latency, as reported.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Summary {
    /// Operations per second over the timed phase.
    pub(crate) per_second: f64,
    pub(crate) ops: u64,
    pub(crate) seconds: f64,
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
    pub(crate) max_ms: Option<f64>,
    /// CPU time of the whole process per operation, in microseconds (see [`Throughput`]).
    pub(crate) cpu_us_per_op: Option<f64>,
}

/// Commands through `accounts` on one store, beside the raw store with as many writers.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Commands {
    /// Commands answered per second, and the latency of each (request sent → answer read).
    pub(crate) service: Summary,
    /// The raw store's durable appends, 1 event each, same writers, same disk or server.
    pub(crate) bound: Summary,
    /// Commands refused (a benchmark's commands are never refused: anything here is a bug).
    pub(crate) refused: u64,
    /// The 1-minute load average when the figure started.
    pub(crate) load: Option<f64>,
}

/// Append → applied in statements' view through one transport, beside the feed API's long-poll
/// wake-up measured on the same events.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Latencies {
    /// The event's time at the producer → applied in the view.
    pub(crate) applied: Summary,
    /// The event's time at the producer → a long-poll of the feed API answered with it.
    pub(crate) bound: Summary,
    /// Commands sent per second (paced).
    pub(crate) commands_per_second: f64,
    pub(crate) load: Option<f64>,
}

/// The figures of one run.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct RunFigures {
    pub(crate) embedded: Option<Commands>,
    pub(crate) postgres: Option<Commands>,
    pub(crate) http_feed: Option<Latencies>,
    pub(crate) amqp: Option<Latencies>,
}

/// The machine a run measured, read from `/proc` (anything unreadable is "unknown").
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Machine {
    pub(crate) cpu: String,
    pub(crate) cores: usize,
    pub(crate) memory_gib: Option<f64>,
    pub(crate) kernel: String,
    /// Where the embedded stores lived.
    pub(crate) dir: String,
}

impl Machine {
    pub(crate) fn describe(dir: &std::path::Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown cpu".to_owned());
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|meminfo| {
                meminfo.lines().find_map(|line| {
                    let value = line.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?;
                    value.trim().parse::<f64>().ok()
                })
            })
            .map(|kib| kib / 1024.0 / 1024.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|release| format!("Linux {}", release.trim()))
            .unwrap_or_else(|_| std::env::consts::OS.to_owned());
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib,
            kernel,
            dir: dir.display().to_string(),
        }
    }
}

/// The 1-minute load average, from `/proc/loadavg`.
pub(crate) fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What was run, for the report.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Setup {
    pub(crate) command: String,
    pub(crate) started_utc: String,
    pub(crate) runs: usize,
    pub(crate) quick: bool,
    pub(crate) clients: u32,
    pub(crate) phase_secs: f64,
    pub(crate) probe_rate: u32,
    pub(crate) probe_secs: f64,
}

/// Everything `bank bench` measured.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) setup: Setup,
    pub(crate) machine: Machine,
    pub(crate) runs: Vec<RunFigures>,
}

/// The median (the mean of the two middle values for an even count); `None` for no values.
pub(crate) fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

impl Report {
    /// The report as markdown: the setup, the machine, one table of medians with each run's
    /// figures.
    pub(crate) fn markdown(&self) -> String {
        let mut out = String::new();
        let s = &self.setup;
        let m = &self.machine;
        let n = self.runs.len();
        let _ = writeln!(out, "\n## The bank: `bank bench`\n");
        let _ = writeln!(out, "- command: `{}`", s.command);
        let _ = writeln!(out, "- started: {} UTC", s.started_utc);
        let _ = writeln!(
            out,
            "- machine: {}, {} cores, {} of memory, {}; embedded stores in `{}`",
            m.cpu,
            m.cores,
            m.memory_gib
                .map_or("unknown".to_owned(), |g| format!("{g:.0} GiB")),
            m.kernel,
            m.dir,
        );
        let _ = writeln!(
            out,
            "- commands: {} clients over loopback HTTP (keep-alive), each on its own account, \
             alternating deposits and withdrawals for {:.1} s; append → applied: {} deposits/s \
             paced for {:.1} s{}",
            s.clients,
            s.phase_secs,
            s.probe_rate,
            s.probe_secs,
            if s.quick {
                "; **--quick: a smoke test, the figures mean little**"
            } else {
                ""
            },
        );
        let _ = writeln!(
            out,
            "- {n} run{}: each figure is the median of the runs, each run's figures in the last \
             column; \"bound\" is measured in the same run; load is the 1-minute load average \
             when the figure started\n",
            if n == 1 { "" } else { "s" }
        );
        let _ = writeln!(
            out,
            "| figure | measured | p50 / p99 (max) | bound, same run | figure ÷ bound | load | runs |"
        );
        let _ = writeln!(out, "| --- | ---: | --- | --- | --- | --- | --- |");
        self.command_row(&mut out, "embedded store", |r| r.embedded.as_ref());
        self.command_row(&mut out, "PostgreSQL", |r| r.postgres.as_ref());
        self.latency_row(&mut out, "HTTP feed", |r| r.http_feed.as_ref());
        self.latency_row(&mut out, "RabbitMQ", |r| r.amqp.as_ref());
        let refused: u64 = self
            .runs
            .iter()
            .flat_map(|r| [r.embedded.as_ref(), r.postgres.as_ref()])
            .flatten()
            .map(|c| c.refused)
            .sum();
        if refused > 0 {
            let _ = writeln!(
                out,
                "\n**{refused} commands were refused** (none should be: see the logs)."
            );
        }
        out
    }

    fn command_row(
        &self,
        out: &mut String,
        store: &str,
        pick: impl Fn(&RunFigures) -> Option<&Commands>,
    ) {
        let runs: Vec<&Commands> = self.runs.iter().filter_map(&pick).collect();
        if runs.is_empty() {
            return;
        }
        let med = |f: &dyn Fn(&Commands) -> Option<f64>| median(runs.iter().filter_map(|c| f(c)));
        let rate = med(&|c| Some(c.service.per_second)).unwrap_or(0.0);
        let bound = med(&|c| Some(c.bound.per_second)).unwrap_or(0.0);
        let ratio =
            med(&|c| (c.bound.per_second > 0.0).then(|| c.service.per_second / c.bound.per_second));
        let _ = writeln!(
            out,
            "| commands/s through `accounts`, {store}, {} clients (each account's stream grows \
             to ~{} events) | **{} commands/s** | {} | raw store, {} writers, 1 event per \
             durable append: {} events/s ({}) | {}; CPU per command {}, per raw append {} | {} \
             | {} |",
            self.setup.clients,
            group(
                med(&|c| Some(c.service.ops as f64 / f64::from(self.setup.clients.max(1))))
                    .unwrap_or(0.0)
                    + 1.0
            ),
            group(rate),
            quantiles(
                med(&|c| c.service.p50_ms),
                med(&|c| c.service.p99_ms),
                runs.iter()
                    .filter_map(|c| c.service.max_ms)
                    .reduce(f64::max),
            ),
            self.setup.clients,
            group(bound),
            quantiles(med(&|c| c.bound.p50_ms), med(&|c| c.bound.p99_ms), None),
            ratio.map_or("—".to_owned(), |r| format!("{:.0} %", r * 100.0)),
            micros(med(&|c| c.service.cpu_us_per_op)),
            micros(med(&|c| c.bound.cpu_us_per_op)),
            loads(runs.iter().map(|c| c.load)),
            runs.iter()
                .map(|c| format!(
                    "{} ({})",
                    group(c.service.per_second),
                    quantiles(c.service.p50_ms, c.service.p99_ms, None)
                ))
                .collect::<Vec<_>>()
                .join("; "),
        );
    }

    fn latency_row(
        &self,
        out: &mut String,
        transport: &str,
        pick: impl Fn(&RunFigures) -> Option<&Latencies>,
    ) {
        let runs: Vec<&Latencies> = self.runs.iter().filter_map(&pick).collect();
        if runs.is_empty() {
            return;
        }
        let med = |f: &dyn Fn(&Latencies) -> Option<f64>| median(runs.iter().filter_map(|l| f(l)));
        let p50 = med(&|l| l.applied.p50_ms);
        let p99 = med(&|l| l.applied.p99_ms);
        let share = med(&|l| Some(l.applied.p50_ms? - l.bound.p50_ms?))
            .map_or("—".to_owned(), |d| format!("{d:+.2} ms"));
        let _ = writeln!(
            out,
            "| append → applied in statements' view, {transport} | **p99 {}** | {} | long-poll \
             wake-up of the feed API (append → answer), same events: {} | statements' share at \
             p50: {share}; {} events, {} commands/s | {} | {} |",
            p99.map_or("—".to_owned(), |p99| format!("{} ms", format_ms(p99))),
            quantiles(
                p50,
                p99,
                runs.iter()
                    .filter_map(|l| l.applied.max_ms)
                    .reduce(f64::max)
            ),
            quantiles(med(&|l| l.bound.p50_ms), med(&|l| l.bound.p99_ms), None),
            runs.iter().map(|l| l.applied.ops).sum::<u64>(),
            group(med(&|l| Some(l.commands_per_second)).unwrap_or(0.0)),
            loads(runs.iter().map(|l| l.load)),
            runs.iter()
                .map(|l| quantiles(l.applied.p50_ms, l.applied.p99_ms, None))
                .collect::<Vec<_>>()
                .join("; "),
        );
    }
}

/// `p50 / p99 ms (max ms)`.
fn quantiles(p50: Option<f64>, p99: Option<f64>, max: Option<f64>) -> String {
    let ms = |v: Option<f64>| v.map_or("—".to_owned(), format_ms);
    match max {
        Some(max) => format!("{} / {} ms ({} ms)", ms(p50), ms(p99), format_ms(max)),
        None => format!("{} / {} ms", ms(p50), ms(p99)),
    }
}

fn micros(value: Option<f64>) -> String {
    value.map_or("?".to_owned(), |us| format!("{} µs", group(us)))
}

fn loads(loads: impl Iterator<Item = Option<f64>>) -> String {
    loads
        .map(|l| l.map_or("?".to_owned(), |l| format!("{l:.1}")))
        .collect::<Vec<_>>()
        .join(" / ")
}

fn format_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

/// A number with thousands separators: `12,345`.
pub(crate) fn group(value: f64) -> String {
    let digits = format!("{:.0}", value.round().max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The command line as typed, quoted where a shell needs it, with any URL's password hidden.
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
    fn reads_the_cpu_time() {
        if !std::path::Path::new("/proc/self/stat").exists() {
            return;
        }
        let before = cpu_time().unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let used = cpu_since(Some(before)).unwrap();
        assert!(used >= Duration::from_millis(20), "{used:?}");
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(group(0.0), "0");
        assert_eq!(group(999.4), "999");
        assert_eq!(group(1_000.0), "1,000");
        assert_eq!(group(1_234_567.0), "1,234,567");
    }

    #[test]
    fn medians() {
        assert_eq!(median([].into_iter()), None);
        assert_eq!(median([5.0, 1.0, 3.0].into_iter()), Some(3.0));
        assert_eq!(median([4.0, 1.0, 3.0, 2.0].into_iter()), Some(2.5));
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact_password("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_password("--runs"), "--runs");
    }

    #[test]
    fn throughput_counts_and_measures() {
        let mut a = Throughput::new();
        a.record(Duration::from_millis(1));
        let mut b = Throughput::new();
        b.record(Duration::from_millis(3));
        a.merge(&b);
        a.finish(Duration::from_secs(2));
        let summary = a.summary();
        assert_eq!(summary.ops, 2);
        assert_eq!(summary.per_second, 1.0);
        assert!(summary.p99_ms.unwrap() >= 2.99, "{summary:?}");
        assert!(summary.p50_ms.unwrap() < 1.01, "{summary:?}");
    }
}
