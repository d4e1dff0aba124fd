//! Against real brokers: RabbitMQ at HEADWATER_TEST_AMQP_URL and NATS (JetStream) at
//! HEADWATER_TEST_NATS_URL, both started by `scripts/test` (scripts/lib/rabbitmq.sh, nats.sh).
//! Without them these tests fail: they are never skipped.
//!
//! Every test declares exchanges and streams of a feed with a unique name and deletes them.

use std::time::Duration;

use futures_util::StreamExt;
use headwater_core::{
    EventId, EventType, FeedId, FeedPosition, Position, Sequence, Subject, Timestamp,
};
use headwater_publish::{
    AmqpBroker, Broker, BrokerError, NATS_MSG_ID_HEADER, NatsBroker, Outcome, Refusal,
    exchange_name, nats_subject, stream_name,
};
use headwater_store::FeedEvent;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;

use crate::support::{AmqpQueue, SOURCE, amqp_url, nats_url, unique_feed};

/// Generous: only bounds a wait for messages that are already on the broker.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(20);
const SUBJECTS: [&str; 3] = ["acc-1", "acc.2", "acc_3"];

/// `count` events over [`SUBJECTS`], round robin, with positions 1.. and sequences per subject.
fn events(count: usize) -> Vec<FeedEvent> {
    let mut sequences = [0u64; SUBJECTS.len()];
    (0..count)
        .map(|i| {
            let s = i % SUBJECTS.len();
            sequences[s] += 1;
            FeedEvent {
                position: FeedPosition(i as u64 + 1),
                sequence: Sequence(sequences[s]),
                id: EventId::new_random(),
                event_type: EventType::new("Deposited").unwrap(),
                subject: Subject::new(SUBJECTS[s]).unwrap(),
                time: Timestamp::from_unix_micros(1_798_380_419_000_000 + i as u64),
                data: format!(r#"{{"amount": {i}}}"#).into_bytes(),
                source_position: Position(i as u64 + 10),
            }
        })
        .collect()
}

fn body(feed: &FeedId, event: &FeedEvent) -> Vec<u8> {
    headwater_api::cloud_event_json(feed, SOURCE, event).unwrap()
}

fn all_confirmed(outcomes: &[Outcome], duplicate: bool) {
    for (i, outcome) in outcomes.iter().enumerate() {
        assert_eq!(outcome, &Outcome::Confirmed { duplicate }, "event {i}");
    }
}

// ---- RabbitMQ ----

/// Deletes the feed's stream.
async fn nats_delete(broker: &NatsBroker, feed: &FeedId) {
    let jetstream = broker.jetstream().await.unwrap();
    jetstream.delete_stream(stream_name(feed)).await.unwrap();
}

#[tokio::test]
async fn amqp_publishes_confirmed_persistent_messages_in_order() {
    let feed = unique_feed("hwt");
    let broker = AmqpBroker::connect(&amqp_url()).await.unwrap();
    broker.declare(&feed).await.unwrap();
    broker
        .declare(&feed)
        .await
        .expect("declaring again is a no-op");
    let queue = AmqpQueue::bind(&amqp_url(), &feed).await;

    let events = events(300);
    let (first, second) = events.split_at(200);
    all_confirmed(&broker.publish(&feed, SOURCE, first).await.unwrap(), false);
    all_confirmed(&broker.publish(&feed, SOURCE, second).await.unwrap(), false);

    let mut consumer = queue
        .channel
        .basic_consume(
            queue.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // One queue receives in publish order: feed order, so every subject's order too.
    for (i, event) in events.iter().enumerate() {
        let delivery = tokio::time::timeout(RECEIVE_TIMEOUT, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("message {i} did not arrive"))
            .unwrap()
            .unwrap();
        let properties = &delivery.properties;
        assert_eq!(
            properties.message_id().as_ref().map(|id| id.as_str()),
            Some(event.id.to_string().as_str()),
            "message {i}"
        );
        assert_eq!(*properties.delivery_mode(), Some(2), "persistent");
        assert_eq!(delivery.routing_key.as_str(), event.subject.as_str());
        assert_eq!(delivery.exchange.as_str(), exchange_name(&feed));
        assert_eq!(delivery.data, body(&feed, event), "message {i}");
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    queue.delete().await;
}

#[tokio::test]
async fn amqp_unroutable_or_undeclared_is_refused_and_the_broker_recovers() {
    let feed = unique_feed("hwt");
    let broker = AmqpBroker::connect(&amqp_url()).await.unwrap();
    let events = events(20);

    // No exchange: the broker closes the channel; nothing is confirmed.
    let outcomes = broker.publish(&feed, SOURCE, &events[..10]).await.unwrap();
    assert_eq!(outcomes.len(), 10);
    assert_eq!(outcomes[0], Outcome::Refused(Refusal::NotDeclared));
    assert!(outcomes.iter().all(|o| !o.is_confirmed()), "{outcomes:?}");

    // The exchange, but no queue bound: every message is returned.
    broker.declare(&feed).await.unwrap();
    let outcomes = broker.publish(&feed, SOURCE, &events[..10]).await.unwrap();
    for outcome in &outcomes {
        assert!(
            matches!(
                outcome,
                Outcome::Refused(Refusal::Returned { code: 312, .. })
            ),
            "{outcome:?}"
        );
    }

    // Bound: the same broker (a new channel) publishes again.
    let queue = AmqpQueue::bind(&amqp_url(), &feed).await;
    all_confirmed(
        &broker.publish(&feed, SOURCE, &events).await.unwrap(),
        false,
    );
    queue.delete().await;
}

#[tokio::test]
async fn amqp_stops_a_batch_at_an_event_it_cannot_encode() {
    let feed = unique_feed("hwt");
    let broker = AmqpBroker::connect(&amqp_url()).await.unwrap();
    broker.declare(&feed).await.unwrap();
    let queue = AmqpQueue::bind(&amqp_url(), &feed).await;
    let mut events = events(6);
    events[3].data = b"{not json".to_vec();
    let outcomes = broker.publish(&feed, SOURCE, &events).await.unwrap();
    all_confirmed(&outcomes[..3], false);
    assert_eq!(
        outcomes[3..],
        [
            Outcome::Refused(Refusal::NotJson),
            Outcome::Refused(Refusal::NotSent),
            Outcome::Refused(Refusal::NotSent)
        ]
    );
    queue.delete().await;
}

#[tokio::test]
async fn amqp_connect_errors_are_typed() {
    let err = AmqpBroker::connect("nats://127.0.0.1:1").await.unwrap_err();
    assert!(matches!(err, BrokerError::Url(_)), "{err}");
    // Port 1 on loopback: nothing listens there.
    let err = AmqpBroker::connect("amqp://guest:guest@127.0.0.1:1/%2f")
        .await
        .unwrap_err();
    assert!(matches!(err, BrokerError::Connect(_)), "{err}");
}

// ---- NATS JetStream ----

#[tokio::test]
async fn nats_publishes_acked_messages_in_order() {
    let feed = unique_feed("hwt");
    let broker = NatsBroker::connect(&nats_url()).await.unwrap();
    broker.declare(&feed).await.unwrap();
    broker
        .declare(&feed)
        .await
        .expect("declaring again is a no-op");

    let events = events(300);
    let (first, second) = events.split_at(200);
    all_confirmed(&broker.publish(&feed, SOURCE, first).await.unwrap(), false);
    all_confirmed(&broker.publish(&feed, SOURCE, second).await.unwrap(), false);

    let stream = broker
        .jetstream()
        .await
        .unwrap()
        .get_stream(stream_name(&feed))
        .await
        .unwrap();
    assert_eq!(stream.get_info().await.unwrap().state.messages, 300);
    // The stream's order is publish order: feed order, so every subject's order too.
    for (i, event) in events.iter().enumerate() {
        let message = stream.get_raw_message(i as u64 + 1).await.unwrap();
        assert_eq!(
            message.subject.as_str(),
            nats_subject(&feed, event.subject.as_str())
        );
        assert_eq!(
            message.headers.get(NATS_MSG_ID_HEADER).map(|v| v.as_str()),
            Some(event.id.to_string().as_str()),
            "message {i}"
        );
        assert_eq!(message.payload.as_ref(), body(&feed, event), "message {i}");
    }
    nats_delete(&broker, &feed).await;
}

/// More unacked publishes than async-nats lets a JetStream context hold by default (5,000),
/// none awaited yet, as the publisher sends its window before it awaits the oldest send: every
/// one goes out and is acked (a client at its limit would hold the next publish until the send
/// times out).
#[tokio::test]
async fn nats_sends_a_window_beyond_the_clients_default_of_pending_acks() {
    let feed = unique_feed("hwt");
    let broker = NatsBroker::connect(&nats_url())
        .await
        .unwrap()
        .with_confirm_timeout(Duration::from_secs(5));
    broker.declare(&feed).await.unwrap();
    let events = events(3 * 2_048);
    let mut sends = Vec::new();
    for batch in events.chunks(2_048) {
        sends.push(broker.send(&feed, SOURCE, batch).await.unwrap());
    }
    for pending in sends {
        all_confirmed(&pending.outcomes().await, false);
    }
    nats_delete(&broker, &feed).await;
}

#[tokio::test]
async fn nats_deduplicates_by_event_id() {
    let feed = unique_feed("hwt");
    let broker = NatsBroker::connect(&nats_url()).await.unwrap();
    broker.declare(&feed).await.unwrap();
    let events = events(50);
    all_confirmed(
        &broker.publish(&feed, SOURCE, &events).await.unwrap(),
        false,
    );
    // Published again (a publisher restarted before saving its cursor): acked, not stored twice.
    all_confirmed(&broker.publish(&feed, SOURCE, &events).await.unwrap(), true);
    let stream = broker
        .jetstream()
        .await
        .unwrap()
        .get_stream(stream_name(&feed))
        .await
        .unwrap();
    assert_eq!(stream.get_info().await.unwrap().state.messages, 50);
    nats_delete(&broker, &feed).await;
}

#[tokio::test]
async fn nats_undeclared_stream_is_refused() {
    let feed = unique_feed("hwt");
    let broker = NatsBroker::connect(&nats_url())
        .await
        .unwrap()
        .with_confirm_timeout(RECEIVE_TIMEOUT);
    let outcomes = broker.publish(&feed, SOURCE, &events(10)).await.unwrap();
    assert_eq!(outcomes.len(), 10);
    for outcome in &outcomes {
        assert_eq!(outcome, &Outcome::Refused(Refusal::NotDeclared));
    }
    broker.declare(&feed).await.unwrap();
    all_confirmed(
        &broker.publish(&feed, SOURCE, &events(10)).await.unwrap(),
        false,
    );
    nats_delete(&broker, &feed).await;
}

#[tokio::test]
async fn nats_connect_errors_are_typed() {
    let err = NatsBroker::connect("amqp://127.0.0.1:1").await.unwrap_err();
    assert!(matches!(err, BrokerError::Url(_)), "{err}");
    let err = NatsBroker::connect("nats://127.0.0.1:1").await.unwrap_err();
    assert!(matches!(err, BrokerError::Connect(_)), "{err}");
}

#[tokio::test]
async fn nats_no_ack_in_time_is_refused_as_timed_out() {
    let feed = unique_feed("hwt");
    // Not a stream: a plain subscriber that takes the messages and never answers.
    let client = async_nats::connect(nats_url()).await.unwrap();
    let _silent = client
        .subscribe(headwater_publish::stream_subjects(&feed))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let timeout = Duration::from_millis(300);
    let broker = NatsBroker::connect(&nats_url())
        .await
        .unwrap()
        .with_confirm_timeout(timeout);
    let outcomes = broker.publish(&feed, SOURCE, &events(3)).await.unwrap();
    assert_eq!(
        outcomes,
        vec![Outcome::Refused(Refusal::TimedOut(timeout)); 3]
    );
}
