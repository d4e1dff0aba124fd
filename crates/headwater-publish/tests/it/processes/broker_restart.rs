//! The broker stopped (then frozen with messages in flight and killed) and started again while a
//! producer publishes and keeps appending: the publisher reports each outage, resumes by itself
//! once the broker is back, and nothing is lost.

use std::collections::BTreeSet;
use std::time::Duration;

use headwater_core::FeedPosition;
use headwater_testkit::broker::{BrokerKind, BrokerProcess};
use rand::Rng;

use crate::processes::producer::{
    APPEND_SLOW_EVERY_MILLIS, Producer, metric, read_feed, unique_feed,
};
use crate::processes::{Checker, runtime, seeded};

/// Published after each start of the broker before it goes down again, in events.
const PUBLISHED_BEFORE_OUTAGE_EVENTS: u64 = 200;
/// Appended while the broker is down, in events.
const APPENDED_WHILE_DOWN_EVENTS: u64 = 300;
/// The longest each step may take, in seconds.
const STEP_SECS_MAX: u64 = 60;

/// How the broker goes down.
#[derive(Clone, Copy, Debug)]
enum Outage {
    /// A graceful stop (SIGTERM): the broker closes its connections.
    Stop,
    /// Frozen (SIGSTOP) until the publisher has events in flight, then SIGKILL: what the broker
    /// had not processed is lost with it, and must be published again.
    FreezeThenKill,
}

fn broker_restart(kind: BrokerKind) {
    let mut rng = seeded();
    let started = std::time::Instant::now();
    let at = || format!("{:.1}s", started.elapsed().as_secs_f64());
    let step = Duration::from_secs(STEP_SECS_MAX);
    let mut broker = BrokerProcess::start(kind);
    let url = broker.url();
    let feed = unique_feed();
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime();
    let checker = runtime.block_on(Checker::prepare(kind, &url, &feed));

    let mut producer = Producer::start(
        dir.path(),
        &url,
        &feed,
        rng.random(),
        Some(APPEND_SLOW_EVERY_MILLIS),
    );
    let mut published_before = 0;
    for outage in [Outage::Stop, Outage::FreezeThenKill] {
        producer.wait_status(
            "publishing",
            step,
            |_| {},
            |s| s.published >= published_before + PUBLISHED_BEFORE_OUTAGE_EVENTS,
        );
        eprintln!("{}: {outage:?}", at());
        match outage {
            Outage::Stop => broker.stop(),
            Outage::FreezeThenKill => {
                broker.freeze();
                let frozen =
                    producer.wait_status("events in flight", step, |_| {}, |s| s.in_flight > 0);
                eprintln!("{} in flight to the frozen broker", frozen.in_flight);
                broker.kill();
            }
        }
        let gone = producer.status.clone();
        let mut states = BTreeSet::new();
        let down = producer.wait_status(
            "appending and starting over (backoff) while the broker is down",
            step,
            |s| {
                states.insert(s.state.clone());
            },
            |s| {
                s.log >= gone.log + APPENDED_WHILE_DOWN_EVENTS
                    && s.reconnects > gone.reconnects
                    && s.error.is_some()
            },
        );
        eprintln!(
            "{outage:?}: published {} of {} while down, {} reconnects, states {states:?}, \
             error {:?}",
            down.published, down.feed, down.reconnects, down.error
        );
        assert!(down.published < down.feed, "{down:?}");
        // `/metrics` counts them too.
        let reconnects = metric(producer.api, "headwater_publisher_reconnects_total");
        assert!(
            reconnects >= down.reconnects as f64,
            "{reconnects} < {down:?}"
        );
        broker.start_again();
        producer.wait_status(
            "resuming by itself",
            step,
            |_| {},
            |s| s.published > down.feed,
        );
        published_before = producer.status.published;
    }
    producer.stop_appending();
    let done = producer.wait_status("caught up", step, |_| {}, |s| s.caught_up());
    producer.kill();
    eprintln!("{}: caught up", at());

    let (expected, published) = runtime.block_on(read_feed(dir.path(), &feed));
    assert_eq!(published, FeedPosition(expected.len() as u64));
    runtime.block_on(checker.check(&feed, &expected));
    // The outage is over: the last error went with the first batch confirmed after it.
    assert_eq!(done.error, None, "{done:?}");
    eprintln!("{}: checked", at());
}

#[test]
fn nats_restarted_mid_stream_loses_nothing() {
    broker_restart(BrokerKind::Nats);
}

#[test]
fn rabbitmq_restarted_mid_stream_loses_nothing() {
    broker_restart(BrokerKind::RabbitMq);
}
