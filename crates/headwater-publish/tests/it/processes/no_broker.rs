//! No broker when the producer starts: it runs, appends, projects and serves its feed over HTTP
//! meanwhile; once the broker appears on its port, everything is published.

use std::time::Duration;

use headwater_core::FeedPosition;
use headwater_testkit::broker::{BrokerKind, BrokerProcess};
use rand::Rng;

use crate::processes::producer::{
    APPEND_SLOW_EVERY_MILLIS, Producer, http_get, read_feed, unique_feed,
};
use crate::processes::{Checker, checker, runtime, seeded};

/// Projected before the broker starts, in events.
const PROJECTED_BEFORE_BROKER_EVENTS: u64 = 300;
/// The longest each step may take, in seconds.
const STEP_SECS_MAX: u64 = 60;

fn no_broker_at_start(kind: BrokerKind) {
    let mut rng = seeded();
    let step = Duration::from_secs(STEP_SECS_MAX);
    let mut broker = BrokerProcess::unstarted(kind);
    let url = broker.url();
    let feed = unique_feed();
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime();
    let checker = match kind {
        // RabbitMQ keeps only what a queue takes: the checker's queue must exist before the
        // first publish, so the node declares it as it boots.
        BrokerKind::RabbitMq => {
            let (definitions, queue) = checker::amqp_definitions(&url, &feed);
            broker.rabbitmq_definitions(&definitions);
            Checker::Amqp(queue)
        }
        _ => runtime.block_on(Checker::prepare(kind, &url, &feed)),
    };

    let mut producer = Producer::start(
        dir.path(),
        &url,
        &feed,
        rng.random(),
        Some(APPEND_SLOW_EVERY_MILLIS),
    );
    let before = producer.wait_status(
        "projecting without a broker",
        step,
        |_| {},
        |s| s.feed >= PROJECTED_BEFORE_BROKER_EVENTS && s.error.is_some(),
    );
    assert_eq!(before.published, 0, "{before:?}");
    // The feed API serves the feed meanwhile.
    let (code, body) = http_get(
        producer.api,
        &format!(
            "/feeds/{}/v{}?after=0&limit={PROJECTED_BEFORE_BROKER_EVENTS}",
            feed.name.as_str(),
            feed.version.get()
        ),
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let served: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(served.len() as u64, PROJECTED_BEFORE_BROKER_EVENTS);

    producer.stop_appending();
    broker.start_again();
    let done = producer.wait_status("everything published", step, |_| {}, |s| s.caught_up());
    producer.kill();

    let (expected, published) = runtime.block_on(read_feed(dir.path(), &feed));
    assert_eq!(published, FeedPosition(expected.len() as u64));
    for (element, event) in served.iter().zip(&expected) {
        let stored: serde_json::Value = serde_json::from_slice(
            &headwater_api::cloud_event_json(&feed, crate::processes::producer::SOURCE, event)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(element, &stored, "the feed API served another event");
    }
    runtime.block_on(checker.check(&feed, &expected));
    // The outage is over: the last error went with the first batch confirmed after it.
    assert_eq!(done.error, None, "{done:?}");
}

#[test]
fn nats_appearing_later_gets_everything() {
    no_broker_at_start(BrokerKind::Nats);
}

#[test]
fn rabbitmq_appearing_later_gets_everything() {
    no_broker_at_start(BrokerKind::RabbitMq);
}
