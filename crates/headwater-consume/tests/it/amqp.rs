//! The RabbitMQ transport against the real server (`HEADWATER_TEST_AMQP_URL`): messages removed
//! from the consumer's queue behind its back are healed from upstream, duplicates are skipped,
//! bad messages are dead-lettered while the other subjects go on, a failed commit leaves the
//! message on the queue, dropped connections lose nothing.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use headwater_consume::{
    AmqpSource, DeadLetterKind, MemoryView, TransportOptions, ViewStore, amqp_exchange, amqp_queue,
};
use headwater_core::FeedId;
use headwater_publish::{AmqpBroker, Broker};
use headwater_store::FeedEvent;
use headwater_testkit::broker::BrokerProcess;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::time::Instant;

use crate::broker_kit::{
    FailingView, Produced, Proxy, Refused, SOURCE, State, amqp_url, authority, consumer, expected,
    produce, round_robin, unique_feed, view, wait_until,
};

const WAIT: Duration = Duration::from_secs(20);

fn source(url: &str, feed: &FeedId) -> AmqpSource {
    AmqpSource::new(url, feed, "statements")
        .unwrap()
        .with_options(
            TransportOptions::default()
                .with_backoff(Duration::from_millis(10), Duration::from_millis(200)),
        )
}

/// A channel of the test's own, on the real server.
async fn channel(url: &str) -> (Connection, Channel) {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

/// Publishes `events` as the publisher does (`AmqpBroker`: same bodies, routing keys, confirms).
async fn publish(broker: &AmqpBroker, feed: &FeedId, events: &[FeedEvent]) {
    for outcome in broker.publish(feed, SOURCE, events).await.unwrap() {
        assert!(outcome.is_confirmed(), "{outcome:?}");
    }
}

/// Publishes one raw body to the feed's exchange.
async fn publish_raw(channel: &Channel, feed: &FeedId, routing_key: &str, body: &[u8]) {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = channel
        .basic_publish(
            amqp_exchange(feed).as_str().into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
}

/// Messages ready in the queue.
async fn ready(channel: &Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
}

async fn wait_ready(channel: &Channel, queue: &str, count: u32) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = ready(channel, queue).await;
        if now == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{now} messages ready, not {count}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn delete(channel: &Channel, feed: &FeedId) {
    channel
        .queue_delete(
            amqp_queue(feed, "statements").as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    channel
        .exchange_delete(
            amqp_exchange(feed).as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
}

/// Runs `source` into `consumer` while `drive` runs, then stops it.
macro_rules! running {
    ($source:expr, $consumer:expr, $drive:expr) => {{
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = $source.run($consumer, async {
            let _ = stop_rx.await;
        });
        let drive = async {
            let out = $drive.await;
            stop_tx.send(()).unwrap();
            out
        };
        let (ran, out) = tokio::join!(run, drive);
        ran.unwrap();
        out
    }};
}

fn applied(view: &MemoryView<State>) -> State {
    view.read(Clone::clone)
}

#[test]
fn names_are_the_publishers() {
    let feed = FeedId::parse("accounts.v1").unwrap();
    assert_eq!(
        amqp_exchange(&feed),
        headwater_publish::exchange_name(&feed)
    );
    assert_eq!(
        amqp_queue(&feed, "statements"),
        "headwater.accounts.v1.statements"
    );
    for bad in ["", "a.b", "A", "a b", "#", &"x".repeat(65)] {
        assert!(
            AmqpSource::new("amqp://127.0.0.1:1/%2f", &feed, bad).is_err(),
            "{bad:?}"
        );
    }
    assert!(AmqpSource::new("http://127.0.0.1:1", &feed, "statements").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_messages_are_healed_and_duplicates_skipped() {
    let url = amqp_url();
    let feed = unique_feed("amqp_heal");
    let produced = produce(&feed, &round_robin(120, 6));
    let source = source(&url, &feed);
    // The consumer's queue exists before anything is published (a deployment step).
    source.declare().await.unwrap();
    let broker = AmqpBroker::connect(&url).await.unwrap();
    broker.declare(&feed).await.unwrap();
    publish(&broker, &feed, &produced.events[..60]).await;
    // Behind the consumer's back: the first 10 messages taken off its queue (each subject's #1,
    // and #2 of four of them).
    let (_connection, channel) = channel(&url).await;
    for _ in 0..10 {
        let message = channel
            .basic_get(source.queue().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("a message on the queue");
        message
            .delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
    }
    // And duplicates published into it.
    publish(&broker, &feed, &produced.events[20..35]).await;
    let refused = Refused::default();
    let view = Arc::new(view(&refused));
    let consumer = consumer(&produced, &view);
    running!(source, &consumer, async {
        publish(&broker, &feed, &produced.events[60..]).await;
        let want = expected(&produced.events);
        wait_until("every event applied", WAIT, || applied(&view) == want).await;
    });
    // The handler refuses any event out of order: the view is each stream once, in order.
    assert_eq!(applied(&view), expected(&produced.events));
    let stats = consumer.stats();
    assert_eq!(stats.healed, 10, "{stats:?}");
    assert!(stats.duplicates >= 15, "{stats:?}");
    let transport = source.stats();
    assert_eq!(transport.received, 120 - 10 + 15, "{transport:?}");
    assert_eq!(transport.acked, transport.received, "{transport:?}");
    // Everything acked: nothing left on the queue once the consumer is gone.
    wait_ready(&channel, source.queue(), 0).await;
    delete(&channel, &feed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_dead_lettered_and_the_other_subjects_go_on() {
    let url = amqp_url();
    let feed = unique_feed("amqp_dead");
    let produced = produce(&feed, &round_robin(60, 6));
    let source = source(&url, &feed);
    source.declare().await.unwrap();
    let (_connection, channel) = channel(&url).await;
    // Garbage, and an event of another feed, among the feed's events.
    publish_raw(&channel, &feed, "acc-0", b"\x00not json at all").await;
    let other = produce(&FeedId::parse("accounts.v9").unwrap(), &round_robin(1, 1));
    publish_raw(&channel, &feed, "acc-0", &other.bodies[0]).await;
    for (event, body) in produced.events.iter().zip(&produced.bodies) {
        publish_raw(&channel, &feed, event.subject.as_str(), body).await;
    }
    // The handler refuses every event of acc-3.
    let refused: Refused = Arc::new(Mutex::new(BTreeSet::from(["acc-3".to_owned()])));
    let view = Arc::new(view(&refused));
    let consumer = consumer(&produced, &view);
    let others: Vec<FeedEvent> = produced
        .events
        .iter()
        .filter(|e| e.subject.as_str() != "acc-3")
        .cloned()
        .collect();
    running!(source, &consumer, async {
        wait_until("every message settled", WAIT, || {
            source.stats().acked == 62 && applied(&view) == expected(&others)
        })
        .await;
    });
    let letters = consumer.dead_letters(0, 100).await.unwrap();
    let of = |kind| {
        letters
            .iter()
            .filter(|l| l.kind == kind)
            .collect::<Vec<_>>()
    };
    let undecodable = of(DeadLetterKind::Undecodable);
    assert_eq!(undecodable.len(), 1, "{letters:#?}");
    assert_eq!(
        undecodable[0].body.as_deref(),
        Some(&b"\x00not json at all"[..])
    );
    assert!(undecodable[0].reason.contains("not an integration event"));
    assert_eq!(undecodable[0].transport, "rabbitmq");
    assert_eq!(of(DeadLetterKind::WrongFeed).len(), 1, "{letters:#?}");
    let handler = of(DeadLetterKind::Handler);
    assert_eq!(handler.len(), 1, "{letters:#?}");
    assert_eq!(handler[0].subject.as_ref().unwrap().as_str(), "acc-3");
    assert_eq!(handler[0].sequence.unwrap().get(), 1);
    assert!(handler[0].reason.contains("the handler refuses acc-3"));
    // acc-3's later events are parked behind its first.
    let parked: Vec<u64> = of(DeadLetterKind::Parked)
        .iter()
        .map(|l| l.sequence.unwrap().get())
        .collect();
    assert_eq!(parked, (2..=10).collect::<Vec<_>>());
    assert_eq!(consumer.dead_letter_status().parked_subjects, 1);
    assert_eq!(consumer.status().dead_letters.parked_subjects, 1);
    // And the metrics say so.
    let mut registry = prometheus_client::registry::Registry::default();
    consumer.register_metrics(&mut registry);
    source.register_metrics(&mut registry);
    let mut metrics = String::new();
    prometheus_client::encoding::text::encode(&mut metrics, &registry).unwrap();
    for line in [
        format!(
            r#"headwater_consumer_dead_letters_recorded_total{{feed="{feed}",kind="undecodable"}} 1"#
        ),
        format!(
            r#"headwater_consumer_dead_letters_recorded_total{{feed="{feed}",kind="parked"}} 9"#
        ),
        format!(r#"headwater_consumer_parked_subjects{{feed="{feed}"}} 1"#),
        format!(
            r#"headwater_consumer_broker_messages_acked_total{{feed="{feed}",transport="rabbitmq"}} 62"#
        ),
        format!(
            r#"headwater_consumer_broker_messages_dead_lettered_total{{feed="{feed}",transport="rabbitmq"}} 12"#
        ),
    ] {
        assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    }
    wait_ready(&channel, source.queue(), 0).await;
    // The operator fixes the handler; the next walk catches acc-3 up and resolves its letters.
    refused.lock().unwrap().clear();
    let walk = consumer.reconstitute().await.unwrap();
    assert_eq!((walk.behind, walk.applied, walk.failed), (1, 10, 0));
    assert_eq!(applied(&view), expected(&produced.events));
    let left: Vec<DeadLetterKind> = consumer
        .dead_letters(0, 100)
        .await
        .unwrap()
        .iter()
        .map(|l| l.kind)
        .collect();
    assert_eq!(
        left,
        [DeadLetterKind::Undecodable, DeadLetterKind::WrongFeed]
    );
    assert_eq!(consumer.dead_letter_status().parked_subjects, 0);
    delete(&channel, &feed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_leaves_the_message_on_the_queue() {
    let url = amqp_url();
    let feed = unique_feed("amqp_commit");
    let produced: Produced = produce(&feed, &round_robin(20, 4));
    let source = source(&url, &feed);
    source.declare().await.unwrap();
    let broker = AmqpBroker::connect(&url).await.unwrap();
    publish(&broker, &feed, &produced.events).await;
    let view = Arc::new(FailingView {
        inner: view(&Refused::default()),
        failing: true.into(),
    });
    let consumer = consumer(&produced, &view);
    running!(source, &consumer, async {
        wait_until("every message received and retried", WAIT, || {
            let stats = source.stats();
            stats.received == 20 && stats.retries >= 4
        })
        .await;
    });
    assert_eq!(source.stats().acked, 0);
    assert!(view.inner.read(State::is_empty));
    // Nothing was acked: once the consumer is gone, all 20 are on the queue again.
    let (_connection, channel) = channel(&url).await;
    wait_ready(&channel, source.queue(), 20).await;
    view.failing.store(false, Ordering::SeqCst);
    running!(source, &consumer, async {
        let want = expected(&produced.events);
        wait_until("every event applied", WAIT, || {
            view.inner.read(Clone::clone) == want
        })
        .await;
    });
    assert!(source.stats().redelivered >= 20, "{:?}", source.stats());
    wait_ready(&channel, source.queue(), 0).await;
    delete(&channel, &feed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_lose_nothing() {
    let url = amqp_url();
    let feed = unique_feed("amqp_drop");
    let produced = produce(&feed, &round_robin(600, 13));
    let proxy = Proxy::start(authority(&url)).await;
    let source = source(&proxy.url(&url), &feed);
    source.declare().await.unwrap();
    let broker = AmqpBroker::connect(&url).await.unwrap();
    let view = Arc::new(view(&Refused::default()));
    let consumer = consumer(&produced, &view);
    running!(source, &consumer, async {
        let mut cuts = 0;
        let mut sessions_at_cut = 0;
        for chunk in produced.events.chunks(100) {
            // The session the last cut ended is over (what it had buffered is handled) and a new
            // one has started: a delivery from now on comes through a connection to cut.
            wait_until("a new session", WAIT, || {
                source.stats().sessions > sessions_at_cut
            })
            .await;
            let received = source.stats().received;
            publish(&broker, &feed, chunk).await;
            // Let the consumer get some of it, then cut its connection.
            wait_until("a delivery", WAIT, || source.stats().received > received).await;
            sessions_at_cut = source.stats().sessions;
            cuts += proxy.cut();
        }
        assert!(cuts >= 5, "{cuts} connections cut");
        let want = expected(&produced.events);
        wait_until("every event applied", WAIT, || applied(&view) == want).await;
    });
    assert_eq!(applied(&view), expected(&produced.events));
    assert!(source.stats().sessions >= 6, "{:?}", source.stats());
    assert_eq!(view.cursors(&feed, None, 100).await.unwrap().len(), 13);
    let (_connection, channel) = channel(&url).await;
    wait_ready(&channel, source.queue(), 0).await;
    delete(&channel, &feed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_the_operator_declared_with_other_arguments_is_used_as_it_is() {
    let url = amqp_url();
    let feed = unique_feed("amqp_quorum");
    let produced = produce(&feed, &round_robin(30, 3));
    let source = source(&url, &feed);
    // The operator's choice: a quorum queue (RabbitMQ refuses to declare it again as classic).
    let (_connection, channel) = channel(&url).await;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            source.queue().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .unwrap();
    source.declare().await.unwrap();
    let broker = AmqpBroker::connect(&url).await.unwrap();
    publish(&broker, &feed, &produced.events).await;
    let view = Arc::new(view(&Refused::default()));
    let consumer = consumer(&produced, &view);
    running!(source, &consumer, async {
        let want = expected(&produced.events);
        wait_until("every event applied", WAIT, || applied(&view) == want).await;
    });
    assert_eq!(source.stats().session_errors, 0);
    wait_ready(&channel, source.queue(), 0).await;
    delete(&channel, &feed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_loses_nothing() {
    let mut node = tokio::task::spawn_blocking(BrokerProcess::rabbitmq)
        .await
        .unwrap();
    let url = node.url();
    let feed = unique_feed("amqp_restart");
    let produced = produce(&feed, &round_robin(300, 10));
    let source = source(&url, &feed);
    source.declare().await.unwrap();
    let broker = AmqpBroker::connect(&url).await.unwrap();
    let view = Arc::new(view(&Refused::default()));
    let consumer = consumer(&produced, &view);
    running!(source, &consumer, async {
        publish(&broker, &feed, &produced.events[..150]).await;
        wait_until("a delivery", WAIT, || source.stats().acked > 0).await;
        // Stopped and started again under the consumer, with events on its durable queue.
        tokio::task::block_in_place(|| {
            node.stop();
            node.start_again();
        });
        broker.declare(&feed).await.unwrap();
        publish(&broker, &feed, &produced.events[150..]).await;
        let want = expected(&produced.events);
        wait_until("every event applied", WAIT, || applied(&view) == want).await;
    });
    assert!(source.stats().sessions >= 2, "{:?}", source.stats());
    let (_connection, channel) = channel(&url).await;
    wait_ready(&channel, source.queue(), 0).await;
}
