//! What the demo found, and how it is shown: a short table per phase and one verdict line.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::link::LinkStats;

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The seed of the run (`--seed` replays the link's schedule and the commands' choices).
    pub seed: u64,
    /// Accounts the commands went to.
    pub accounts: u64,
    /// Phase 1 (feed v1), then phase 2 (v2 added live, the consumer moved to it) when phase 1
    /// converged.
    pub phases: Vec<Phase>,
    /// The account whose deposit the link corrupted on purpose (`Fault::CorruptOneDeposit`).
    pub corrupted: Option<String>,
    /// Wall time of the whole demo, services included, in milliseconds.
    pub wall_ms: u64,
}

impl Report {
    /// Whether every phase converged (exit 0).
    pub fn converged(&self) -> bool {
        !self.phases.is_empty() && self.phases.iter().all(|p| p.verdict.converged())
    }

    /// The first account that differs, in the first phase that did not converge.
    pub fn first_difference(&self) -> Option<&str> {
        self.phases.iter().find_map(|p| match &p.verdict {
            Verdict::Converged { .. } => None,
            Verdict::Differs { account, .. } | Verdict::ProducerDisagrees { account, .. } => {
                Some(account.as_str())
            }
        })
    }
}

/// One phase: commands through `accounts`, the feed through the link into `statements`, a
/// reconstitution, the verdict.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    /// What the phase shows, e.g. "accounts.v1 through a lossy link".
    pub title: String,
    /// The feed the consumer read at the verdict.
    pub feed: String,
    pub commands: Commands,
    /// Events of the feed the link read during the phase.
    pub events: u64,
    pub link: LinkStats,
    /// Last events of accounts that the link never delivered (only reconstitution finds them).
    pub lost_last: u64,
    /// Deliveries the consumer could not complete (left to a later delivery or the
    /// reconstitution).
    pub failed_deliveries: u64,
    /// The consumer's work during the phase.
    pub consumer: ConsumerWork,
    /// Accounts that differed between the consumer and the producer right before the
    /// reconstitution.
    pub behind_before_reconstitution: u64,
    /// What the reconstitution fixed; `None` when it was skipped.
    pub reconstitution: Option<Fixes>,
    /// The v1 → v2 move, in phase 2: how long from `switch_to` to the flip, in milliseconds.
    pub switch_ms: Option<u64>,
    /// From an event's time (its append at the producer) to its apply by the consumer, for the
    /// events the link delivered that were applied by their delivery (microseconds).
    pub latency_p50_us: Option<u64>,
    pub latency_p99_us: Option<u64>,
    pub verdict: Verdict,
}

/// Commands sent during a phase.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Commands {
    pub sent: u64,
    /// Accepted (opened, deposited, withdrew).
    pub done: u64,
    /// Refused with insufficient funds (a withdrawal over the balance).
    pub insufficient_funds: u64,
    /// Refused otherwise (e.g. an account opened twice by two clients at once).
    pub refused_other: u64,
    /// Sent again with the same command id: each answered the original outcome.
    pub retried: u64,
    /// Wall time of the commands, in milliseconds.
    pub elapsed_ms: u64,
}

impl Commands {
    /// Adds another run of commands.
    pub fn add(&mut self, other: &Commands) {
        self.sent += other.sent;
        self.done += other.done;
        self.insufficient_funds += other.insufficient_funds;
        self.refused_other += other.refused_other;
        self.retried += other.retried;
        self.elapsed_ms += other.elapsed_ms;
    }
}

/// The consumer's counters over a phase.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ConsumerWork {
    /// Gaps seen (a delivery ahead of its account's next event).
    pub gaps: u64,
    /// Events fetched from the producer to heal them.
    pub healed: u64,
    pub duplicates: u64,
    pub bootstraps: u64,
}

/// What one reconstitution walk fixed.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Fixes {
    /// Accounts walked (every account the producer lists).
    pub walked: u64,
    /// Accounts found behind.
    pub accounts: u64,
    /// Events applied.
    pub events: u64,
}

/// The verdict of a phase.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// The consumer's balance equals the producer's for every account, and the producer's
    /// equals the sum of the acknowledged commands.
    Converged { accounts: u64 },
    /// The consumer differs from the producer (`None`: the account is missing on that side).
    Differs {
        account: String,
        producer: Option<u64>,
        consumer: Option<u64>,
        /// Accounts that differ in all.
        differing: u64,
    },
    /// The producer's balance is not the sum of the acknowledged commands (a command applied
    /// twice or lost).
    ProducerDisagrees {
        account: String,
        producer: u64,
        acknowledged: i128,
    },
}

impl Verdict {
    pub fn converged(&self) -> bool {
        matches!(self, Verdict::Converged { .. })
    }

    /// The one verdict line.
    pub fn line(&self, feed: &str) -> String {
        match self {
            Verdict::Converged { accounts } => format!(
                "verdict: CONVERGED — the consumer's balance equals the producer's for all {} accounts ({feed})",
                count(*accounts)
            ),
            Verdict::Differs {
                account,
                producer,
                consumer,
                differing,
            } => format!(
                "verdict: DIFFERENT — account {account}: producer {}, consumer {} ({} of the accounts differ, {feed})",
                balance(*producer),
                balance(*consumer),
                count(*differing)
            ),
            Verdict::ProducerDisagrees {
                account,
                producer,
                acknowledged,
            } => format!(
                "verdict: DIFFERENT — account {account}: the producer holds {} but the acknowledged commands sum to {} ({feed})",
                cents(*producer),
                signed_cents(*acknowledged)
            ),
        }
    }
}

/// The table of one phase and its verdict line.
pub(super) fn render_phase(phase: &Phase) -> String {
    let mut out = String::from("\n");
    let rule = "─".repeat(58usize.saturating_sub(phase.title.chars().count()));
    let _ = writeln!(out, "── {} {rule}", phase.title);
    let c = &phase.commands;
    let rate = c
        .sent
        .saturating_mul(1_000)
        .checked_div(c.elapsed_ms)
        .map(|rate| format!(" ({}/s)", count(rate)))
        .unwrap_or_default();
    let mut row = |name: &str, value: String| {
        let _ = writeln!(out, "  {name:<24}{value}");
    };
    let other = if c.refused_other > 0 {
        format!(", {} refused otherwise", count(c.refused_other))
    } else {
        String::new()
    };
    row(
        "commands",
        format!(
            "{} in {}{rate}: {} done, {} refused (insufficient funds){other}",
            count(c.sent),
            seconds(c.elapsed_ms),
            count(c.done),
            count(c.insufficient_funds),
        ),
    );
    row(
        "sent again, same id",
        format!("{}, each answered as the first time", count(c.retried)),
    );
    row(
        "events",
        format!(
            "{} read from {} by the link",
            count(phase.events),
            phase.feed
        ),
    );
    let l = &phase.link;
    let failed = if phase.failed_deliveries > 0 {
        format!(
            "; {} deliveries failed (left to the reconstitution)",
            count(phase.failed_deliveries)
        )
    } else {
        String::new()
    };
    row(
        "lossy link",
        format!(
            "{} dropped, {} doubled, {} reordered; {} last events lost{failed}",
            count(l.dropped),
            count(l.duplicated),
            count(l.reordered),
            count(phase.lost_last)
        ),
    );
    let w = &phase.consumer;
    row(
        "gaps healed",
        format!(
            "{} ({} events fetched from the producer)",
            count(w.gaps),
            count(w.healed)
        ),
    );
    row("duplicates skipped", count(w.duplicates));
    row(
        "bootstraps",
        if w.bootstraps > 0 {
            format!(
                "{} (accounts read through GET /balances/{{id}} before any event of theirs arrived)",
                count(w.bootstraps)
            )
        } else {
            count(w.bootstraps)
        },
    );
    if let Some(ms) = phase.switch_ms {
        row(
            "move v1 → v2",
            format!("built beside v1 and flipped in {}", seconds(ms)),
        );
    }
    row(
        "reconstitution fixes",
        match phase.reconstitution {
            Some(f) => format!(
                "{} accounts ({} events) in a walk over {}; {} balances differed before it",
                count(f.accounts),
                count(f.events),
                count(f.walked),
                count(phase.behind_before_reconstitution),
            ),
            None => format!(
                "skipped (--skip-reconstitution): {} balances differ",
                count(phase.behind_before_reconstitution)
            ),
        },
    );
    row(
        "latency event → applied",
        match (phase.latency_p50_us, phase.latency_p99_us) {
            (Some(p50), Some(p99)) => format!("p50 {} · p99 {}", micros(p50), micros(p99)),
            _ => "no event applied by its delivery".to_owned(),
        },
    );
    let _ = writeln!(out, "{}", phase.verdict.line(&phase.feed));
    out
}

/// `1234567` → `1,234,567`.
pub(super) fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Cents as money: `123456` → `1,234.56 EUR`.
pub(super) fn cents(n: u64) -> String {
    format!(
        "{}.{:02} {}",
        count(n / 100),
        n % 100,
        crate::model::CURRENCY
    )
}

fn signed_cents(n: i128) -> String {
    let magnitude = u64::try_from(n.unsigned_abs()).unwrap_or(u64::MAX);
    if n < 0 {
        format!("-{}", cents(magnitude))
    } else {
        cents(magnitude)
    }
}

fn balance(b: Option<u64>) -> String {
    b.map_or_else(|| "(no such account)".to_owned(), cents)
}

/// Milliseconds as seconds: `1234` → `1.2 s`.
pub(super) fn seconds(ms: u64) -> String {
    format!("{:.1} s", Duration::from_millis(ms).as_secs_f64())
}

/// Microseconds, readable: `850` → `0.85 ms`, `41_300` → `41 ms`, `1_200_000` → `1.2 s`.
pub(super) fn micros(us: u64) -> String {
    if us < 10_000 {
        format!("{:.2} ms", us as f64 / 1_000.0)
    } else if us < 1_000_000 {
        format!("{} ms", us / 1_000)
    } else {
        format!("{:.1} s", us as f64 / 1_000_000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(cents(5), "0.05 EUR");
        assert_eq!(cents(123_456), "1,234.56 EUR");
        assert_eq!(signed_cents(-250), "-2.50 EUR");
        assert_eq!(micros(850), "0.85 ms");
        assert_eq!(micros(41_300), "41 ms");
        assert_eq!(micros(1_200_000), "1.2 s");
        assert_eq!(seconds(1_234), "1.2 s");
    }

    #[test]
    fn the_verdict_names_the_account() {
        let differs = Verdict::Differs {
            account: "acc-0042".into(),
            producer: Some(1_250),
            consumer: None,
            differing: 3,
        };
        let line = differs.line("accounts.v1");
        assert!(!differs.converged());
        assert!(line.starts_with("verdict: DIFFERENT — account acc-0042: producer 12.50 EUR, consumer (no such account)"), "{line}");
        let converged = Verdict::Converged { accounts: 1_000 };
        assert!(converged.converged());
        assert!(
            converged
                .line("accounts.v2")
                .contains("all 1,000 accounts (accounts.v2)")
        );
    }
}
