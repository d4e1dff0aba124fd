//! `kill -9` of a producer while it publishes: killed at random moments, restarted each time,
//! then left to catch up; the broker holds every event of the feed, first deliveries in order.

use std::time::{Duration, Instant};

use headwater_core::FeedPosition;
use headwater_testkit::broker::BrokerKind;
use rand::Rng;

use crate::processes::producer::{
    APPEND_FAST_EVERY_MILLIS, Producer, feed_head_and_cursor, read_feed, unique_feed,
};
use crate::processes::{Checker, runtime, seeded, shared_broker_url};

/// Kill cycles.
const CYCLES: usize = 24;
/// The producer is killed this long after it said it is ready, in milliseconds.
const KILL_AFTER_MILLIS: std::ops::Range<u64> = 0..400;
/// The longest the last producer may take to publish everything, in seconds.
const CATCH_UP_SECS_MAX: u64 = 60;

fn crash_loop(kind: BrokerKind) {
    let mut rng = seeded();
    let url = shared_broker_url(kind);
    let feed = unique_feed();
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime();
    let checker = runtime.block_on(Checker::prepare(kind, &url, &feed));
    let started = Instant::now();
    let mut published_before = FeedPosition::START;
    let mut killed_behind = 0;
    let mut progressed = 0;
    for _ in 0..CYCLES {
        let producer = Producer::start(
            dir.path(),
            &url,
            &feed,
            rng.random(),
            Some(APPEND_FAST_EVERY_MILLIS),
        );
        std::thread::sleep(Duration::from_millis(rng.random_range(KILL_AFTER_MILLIS)));
        producer.kill();
        let (head, published) = runtime.block_on(feed_head_and_cursor(dir.path(), &feed));
        assert!(published <= head, "published {published:?} > head {head:?}");
        assert!(published >= published_before, "the cursor went back");
        killed_behind += usize::from(published < head);
        progressed += usize::from(published > published_before);
        published_before = published;
    }
    eprintln!(
        "{CYCLES} kills in {:.1} s: {progressed} cycles moved the publisher's cursor, \
         {killed_behind} kills left it behind the feed's head",
        started.elapsed().as_secs_f64()
    );
    assert!(
        progressed > 0,
        "no producer published anything before its kill"
    );

    let mut producer = Producer::start(dir.path(), &url, &feed, 0, None);
    producer.wait_status(
        "caught up",
        Duration::from_secs(CATCH_UP_SECS_MAX),
        |_| {},
        |s| s.caught_up(),
    );
    producer.kill();
    let (expected, published) = runtime.block_on(read_feed(dir.path(), &feed));
    assert_eq!(published, FeedPosition(expected.len() as u64));
    eprintln!("the feed has {} events", expected.len());
    runtime.block_on(checker.check(&feed, &expected));
}

#[test]
fn killed_producers_publish_every_event_to_rabbitmq() {
    crash_loop(BrokerKind::RabbitMq);
}

#[test]
fn killed_producers_publish_every_event_to_nats() {
    crash_loop(BrokerKind::Nats);
}
