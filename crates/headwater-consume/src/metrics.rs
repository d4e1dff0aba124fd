//! The consumer's counters, its open gaps and its Prometheus metrics (`headwater_consumer_…`,
//! labelled by feed).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use headwater_core::{FeedId, Sequence, Subject};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Serialize;

/// Open gaps tracked one by one; a gap seen while this many are open is not tracked, only
/// counted (bounded memory whatever happens upstream).
pub const OPEN_GAPS_TRACKED_MAX: usize = 10_000;

/// The buckets of the heal latency histogram, in seconds: 0.5 ms … 32 s.
const HEAL_SECONDS_BUCKETS: [f64; 17] = [
    0.000_5, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048,
    4.096, 8.192, 16.384, 32.768,
];

/// The consumer's counters. Each is a Prometheus counter (cheap, atomic) read back by
/// `Consumer::stats`.
#[derive(Debug)]
pub(crate) struct Counters {
    feed: String,
    pub(crate) applied: Counter,
    pub(crate) duplicates: Counter,
    pub(crate) gaps: Counter,
    pub(crate) healed: Counter,
    pub(crate) bootstraps: Counter,
    pub(crate) reconstitutions: Counter,
    pub(crate) reconstituted: Counter,
    pub(crate) heal_failures: Counter,
    pub(crate) heal_seconds: Histogram,
    /// Gaps seen and not healed yet, by subject.
    pub(crate) open: OpenGaps,
}

impl Counters {
    pub(crate) fn new(feed: &FeedId) -> Counters {
        Counters {
            feed: feed.to_string(),
            applied: Counter::default(),
            duplicates: Counter::default(),
            gaps: Counter::default(),
            healed: Counter::default(),
            bootstraps: Counter::default(),
            reconstitutions: Counter::default(),
            reconstituted: Counter::default(),
            heal_failures: Counter::default(),
            heal_seconds: Histogram::new(HEAL_SECONDS_BUCKETS),
            open: OpenGaps::default(),
        }
    }

    pub(crate) fn add(counter: &Counter, n: u64) {
        counter.inc_by(n);
    }

    /// Registers every metric into `registry`, names prefixed `headwater_consumer_`, labelled
    /// with the feed. A registry takes one consumer per feed.
    pub(crate) fn register(&self, registry: &mut Registry) {
        let r = registry
            .sub_registry_with_prefix("headwater_consumer")
            .sub_registry_with_label(("feed".into(), self.feed.clone().into()));
        let counters = [
            (
                "events_applied",
                "Events applied to the view (delivered, healed, bootstrapped or reconstituted)",
                &self.applied,
            ),
            (
                "duplicates_skipped",
                "Deliveries skipped: the view had them (sequence at or below the cursor)",
                &self.duplicates,
            ),
            (
                "gaps_detected",
                "Deliveries ahead of their subject's next sequence",
                &self.gaps,
            ),
            (
                "events_healed",
                "Events fetched from the producer to fill gaps",
                &self.healed,
            ),
            (
                "heal_failures",
                "Heals given up after the configured attempts (the gap stays open)",
                &self.heal_failures,
            ),
            (
                "bootstraps",
                "Subjects caught up on demand (ensure)",
                &self.bootstraps,
            ),
            (
                "reconstitutions",
                "Reconstitution walks completed",
                &self.reconstitutions,
            ),
            (
                "events_reconstituted",
                "Events applied by reconstitution walks (no delivery brought them)",
                &self.reconstituted,
            ),
        ];
        for (name, help, counter) in counters {
            // A clone shares the consumer's atomic.
            r.register(name, help, counter.clone());
        }
        r.register(
            "heal_seconds",
            "From a gap's detection to the delivered event applied after the missing ones",
            self.heal_seconds.clone(),
        );
        r.register(
            "open_gaps",
            "Subjects with a gap seen and not healed yet",
            self.open.gauge.clone(),
        );
        r.register(
            "open_gap_events",
            "Events missing behind the open gaps (over subjects: seen − cursor − 1)",
            self.open.lag.clone(),
        );
    }
}

/// A gap seen on a subject and not healed yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct OpenGap {
    pub subject: String,
    /// The subject's cursor when the gap was last looked at.
    pub cursor: u64,
    /// The highest sequence delivered beyond the gap.
    pub seen: u64,
    /// When the gap was first seen.
    #[serde(with = "rfc3339")]
    pub since: SystemTime,
    /// Heals tried and given up (upstream unavailable, refused, inconsistent).
    pub failed_heals: u64,
    /// Why the last heal failed.
    pub last_error: Option<String>,
}

impl OpenGap {
    /// Events missing between the cursor and what was seen.
    pub fn missing(&self) -> u64 {
        self.seen.saturating_sub(self.cursor + 1)
    }
}

/// The open gaps, by subject (at most [`OPEN_GAPS_TRACKED_MAX`]; more are only counted).
#[derive(Debug, Default)]
pub(crate) struct OpenGaps {
    gaps: Mutex<OpenGapsInner>,
    gauge: Gauge,
    lag: Gauge,
}

#[derive(Debug, Default)]
struct OpenGapsInner {
    by_subject: BTreeMap<Subject, (OpenGap, Instant)>,
    /// Gaps seen while the table was full, since the start (never decreases: their healing is
    /// not followed).
    untracked: u64,
}

impl OpenGaps {
    fn lock(&self) -> std::sync::MutexGuard<'_, OpenGapsInner> {
        self.gaps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A delivery of `seen` found `subject` at `cursor`, behind it. Returns when the gap was
    /// first seen (its age is the heal latency).
    pub(crate) fn opened(&self, subject: &Subject, cursor: Sequence, seen: Sequence) -> Instant {
        let mut inner = self.lock();
        let now = Instant::now();
        let tracked = inner.by_subject.len();
        let first_seen = match inner.by_subject.get_mut(subject) {
            Some((gap, first)) => {
                gap.cursor = cursor.get();
                gap.seen = gap.seen.max(seen.get());
                *first
            }
            None if tracked < OPEN_GAPS_TRACKED_MAX => {
                inner.by_subject.insert(
                    subject.clone(),
                    (
                        OpenGap {
                            subject: subject.to_string(),
                            cursor: cursor.get(),
                            seen: seen.get(),
                            since: SystemTime::now(),
                            failed_heals: 0,
                            last_error: None,
                        },
                        now,
                    ),
                );
                now
            }
            None => {
                inner.untracked += 1;
                now
            }
        };
        self.publish(&inner);
        first_seen
    }

    /// A heal of `subject` failed: the gap stays open.
    pub(crate) fn failed(
        &self,
        subject: &Subject,
        cursor: Sequence,
        error: &dyn std::fmt::Display,
    ) {
        let mut inner = self.lock();
        if let Some((gap, _)) = inner.by_subject.get_mut(subject) {
            gap.cursor = cursor.get();
            gap.failed_heals += 1;
            gap.last_error = Some(error.to_string());
        }
        self.publish(&inner);
    }

    /// `subject` reached `cursor`: a gap it closes is healed.
    pub(crate) fn reached(&self, subject: &Subject, cursor: Sequence) {
        let mut inner = self.lock();
        let healed = match inner.by_subject.get_mut(subject) {
            Some((gap, _)) if cursor.get() + 1 >= gap.seen => true,
            Some((gap, _)) => {
                gap.cursor = gap.cursor.max(cursor.get());
                false
            }
            None => false,
        };
        if healed {
            inner.by_subject.remove(subject);
        }
        self.publish(&inner);
    }

    /// The open gaps, oldest first, at most `limit`; how many are open; how many gaps were not
    /// tracked since the start because [`OPEN_GAPS_TRACKED_MAX`] were open.
    pub(crate) fn snapshot(&self, limit: usize) -> (Vec<OpenGap>, u64, u64) {
        let inner = self.lock();
        let mut gaps: Vec<_> = inner.by_subject.values().cloned().collect();
        gaps.sort_by_key(|(_, first)| *first);
        let open = gaps.len() as u64;
        let listed = gaps.into_iter().take(limit).map(|(g, _)| g).collect();
        (listed, open, inner.untracked)
    }

    fn publish(&self, inner: &OpenGapsInner) {
        let open = inner.by_subject.len() as u64;
        self.gauge.set(i64::try_from(open).unwrap_or(i64::MAX));
        let missing: u64 = inner.by_subject.values().map(|(g, _)| g.missing()).sum();
        self.lag.set(i64::try_from(missing).unwrap_or(i64::MAX));
    }
}

/// Observes a heal that took `elapsed`.
pub(crate) fn observe(histogram: &Histogram, elapsed: Duration) {
    histogram.observe(elapsed.as_secs_f64());
}

/// `SystemTime` as RFC 3339 text (UTC, microseconds), as the feed API writes times.
mod rfc3339 {
    use std::time::SystemTime;

    pub(super) fn serialize<S: serde::Serializer>(
        time: &SystemTime,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::rfc3339_text(*time))
    }
}

/// `SystemTime` as RFC 3339 text, UTC, microseconds (`2026-11-27T14:06:59.123456Z`).
pub(crate) fn rfc3339_text(time: SystemTime) -> String {
    humantime::format_rfc3339_micros(time).to_string()
}
