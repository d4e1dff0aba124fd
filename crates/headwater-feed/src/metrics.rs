//! The projectors' Prometheus metrics, labelled by feed.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FeedLabel {
    pub(crate) feed: String,
}

/// Every projector's metrics; one set per runtime, one label value per feed.
#[derive(Clone, Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) lag: Family<FeedLabel, Gauge>,
    pub(crate) cursor: Family<FeedLabel, Gauge>,
    pub(crate) log_head: Family<FeedLabel, Gauge>,
    pub(crate) feed_head: Family<FeedLabel, Gauge>,
    pub(crate) backfill_done: Family<FeedLabel, Gauge>,
    pub(crate) backfill_total: Family<FeedLabel, Gauge>,
    pub(crate) backfill_rate: Family<FeedLabel, Gauge<f64, AtomicU64>>,
    pub(crate) live: Family<FeedLabel, Gauge>,
    pub(crate) commits: Family<FeedLabel, Counter>,
    pub(crate) source_events: Family<FeedLabel, Counter>,
    pub(crate) projected_events: Family<FeedLabel, Counter>,
    pub(crate) errors: Family<FeedLabel, Counter>,
}

impl Metrics {
    /// Registers every metric into `registry` (names prefixed `headwater_projector_`).
    pub(crate) fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("headwater_projector");
        r.register(
            "lag_positions",
            "Internal log positions the feed's projector is behind the log head",
            self.lag.clone(),
        );
        r.register(
            "cursor_position",
            "The last internal log position the feed includes",
            self.cursor.clone(),
        );
        r.register(
            "log_head_position",
            "The internal log head the projector last saw",
            self.log_head.clone(),
        );
        r.register(
            "feed_head_position",
            "The feed's last position",
            self.feed_head.clone(),
        );
        r.register(
            "backfill_done_positions",
            "Backfill progress: internal positions projected",
            self.backfill_done.clone(),
        );
        r.register(
            "backfill_total_positions",
            "Backfill progress: internal positions to project (the log head)",
            self.backfill_total.clone(),
        );
        r.register(
            "backfill_rate_events_per_second",
            "Backfill rate since the backfill started in this process",
            self.backfill_rate.clone(),
        );
        r.register(
            "live",
            "1 when the feed is live, 0 while it backfills",
            self.live.clone(),
        );
        r.register(
            "commits",
            "Batches committed to the feed store",
            self.commits.clone(),
        );
        r.register(
            "source_events",
            "Internal events projected",
            self.source_events.clone(),
        );
        r.register(
            "projected_events",
            "Integration events committed to the feed",
            self.projected_events.clone(),
        );
        r.register(
            "errors",
            "Errors met by the projector (retried or fatal)",
            self.errors.clone(),
        );
    }
}

pub(crate) fn gauge_value(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
