//! The publishers' Prometheus metrics, labelled by feed and publisher.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PublisherLabel {
    pub(crate) feed: String,
    pub(crate) publisher: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RefusalLabel {
    pub(crate) feed: String,
    pub(crate) publisher: String,
    pub(crate) reason: &'static str,
}

/// Every publisher's metrics; one set per [`crate::Publishers`], one label value per feed.
#[derive(Clone, Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) cursor: Family<PublisherLabel, Gauge>,
    pub(crate) head: Family<PublisherLabel, Gauge>,
    pub(crate) lag_positions: Family<PublisherLabel, Gauge>,
    pub(crate) lag_seconds: Family<PublisherLabel, Gauge<f64, AtomicU64>>,
    pub(crate) in_flight: Family<PublisherLabel, Gauge>,
    pub(crate) confirmed: Family<PublisherLabel, Counter>,
    pub(crate) duplicates: Family<PublisherLabel, Counter>,
    pub(crate) refused: Family<RefusalLabel, Counter>,
    pub(crate) reconnects: Family<PublisherLabel, Counter>,
    pub(crate) errors: Family<PublisherLabel, Counter>,
    pub(crate) leading: Family<PublisherLabel, Gauge>,
}

impl Metrics {
    /// Registers every metric into `registry` (names prefixed `headwater_publisher_`).
    pub(crate) fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("headwater_publisher");
        r.register(
            "cursor_position",
            "The last feed position the broker confirmed, with every one before it",
            self.cursor.clone(),
        );
        r.register(
            "feed_head_position",
            "The feed's last position, as the publisher last saw it",
            self.head.clone(),
        );
        r.register(
            "lag_positions",
            "Feed positions not yet confirmed by the broker",
            self.lag_positions.clone(),
        );
        r.register(
            "lag_seconds",
            "Age of the oldest event not yet confirmed by the broker (0 when caught up)",
            self.lag_seconds.clone(),
        );
        r.register(
            "in_flight_events",
            "Events sent to the broker and not yet confirmed",
            self.in_flight.clone(),
        );
        r.register(
            "confirmed_events",
            "Events the broker confirmed",
            self.confirmed.clone(),
        );
        r.register(
            "duplicate_events",
            "Events the broker confirmed as duplicates of a message it had (JetStream)",
            self.duplicates.clone(),
        );
        r.register(
            "refused_events",
            "Events the broker did not confirm (nacked, returned, timed out …), by reason",
            self.refused.clone(),
        );
        r.register(
            "reconnects",
            "Times the publisher started again after the broker failed or refused",
            self.reconnects.clone(),
        );
        r.register(
            "store_errors",
            "Feed store operations of the publisher that failed",
            self.errors.clone(),
        );
        r.register(
            "leading",
            "1 while this replica runs the publisher, else 0",
            self.leading.clone(),
        );
    }
}
