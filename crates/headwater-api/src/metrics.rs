//! The feed API's own metrics, registered into the service's registry at construction.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    /// The route template (`/feeds/{name}/{version}`), `unmatched` for no route: bounded.
    pub(crate) route: String,
    pub(crate) status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    pub(crate) route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FeedLabels {
    pub(crate) feed: String,
}

#[derive(Clone, Debug)]
pub(crate) struct ApiMetrics {
    pub(crate) requests: Family<RequestLabels, Counter>,
    pub(crate) latency: Family<RouteLabels, Histogram>,
    pub(crate) feed_head: Family<FeedLabels, Gauge>,
    pub(crate) long_polls: Gauge,
    pub(crate) events_served: Counter,
}

impl ApiMetrics {
    pub(crate) fn register(registry: &mut Registry) -> ApiMetrics {
        let metrics = ApiMetrics {
            requests: Family::default(),
            // 100 µs to ~52 s: long polls land in the upper buckets.
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_1, 2.0, 20))
            }),
            feed_head: Family::default(),
            long_polls: Gauge::default(),
            events_served: Counter::default(),
        };
        registry.register(
            "headwater_api_requests",
            "Feed API requests answered, by route template and status",
            metrics.requests.clone(),
        );
        registry.register(
            "headwater_api_request_duration_seconds",
            "Feed API request latency by route template (long polls include their wait)",
            metrics.latency.clone(),
        );
        registry.register(
            "headwater_feed_head",
            "The last feed position of each feed, as of the last scrape",
            metrics.feed_head.clone(),
        );
        registry.register(
            "headwater_api_long_polls_waiting",
            "Feed reads waiting for a new event",
            metrics.long_polls.clone(),
        );
        registry.register(
            "headwater_api_events_served",
            "Integration events sent in feed and subject pages",
            metrics.events_served.clone(),
        );
        metrics
    }
}
