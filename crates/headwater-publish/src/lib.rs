//! Publishing integration feeds to brokers: the broker side of the publisher (SPEC.md, "Broker
//! mapping"; docs/design/publishing.md).
//!
//! A [`Broker`] declares a feed's topology ([`Broker::declare`], idempotent) and publishes a
//! batch of the feed's events pipelined — every message of the batch in flight at once, in feed
//! order — reporting for each event whether the broker confirmed it ([`Outcome`]). Two
//! implementations:
//!
//! - [`AmqpBroker`] (RabbitMQ, `lapin`): a durable topic exchange `headwater.{name}.v{version}`;
//!   persistent messages with routing key = the subject and `message_id` = the event id, published
//!   `mandatory` on a channel in confirm mode. A nack, a returned (unroutable) message or a
//!   channel closed by the broker is a refusal.
//! - [`NatsBroker`] (NATS JetStream, `async-nats`): a stream `HEADWATER_{NAME}_V{version}` over
//!   the subjects `headwater.{name}.v{version}.>`; each event is published to
//!   `headwater.{name}.v{version}.{subject}` with the header `Nats-Msg-Id` = the event id, and
//!   counts once JetStream acked it.
//!
//! The message body is the event as a CloudEvent in JSON, byte for byte what the feed API serves
//! for it ([`headwater_api::cloud_event_json`]).
//!
//! The follower that reads a feed, publishes and moves a cursor over the confirmed prefix is built
//! on this; nothing here keeps a cursor or retries.

mod amqp;
#[cfg(feature = "clap")]
mod args;
mod metrics;
mod nats;
mod publisher;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use headwater_core::FeedId;
use headwater_store::FeedEvent;

pub use amqp::AmqpBroker;
#[cfg(feature = "clap")]
pub use args::BrokerArgs;
pub use nats::NatsBroker;
pub use publisher::{
    BACKOFF_MAX_DEFAULT, BACKOFF_MIN_DEFAULT, BATCH_EVENTS_DEFAULT, IN_FLIGHT_BYTES_DEFAULT,
    IN_FLIGHT_EVENTS_DEFAULT, IN_FLIGHT_EVENTS_MAX, PublisherOptions, PublisherState,
    PublisherStatus, Publishers, PublishersBuilder, SHUTDOWN_GRACE_DEFAULT, StartError,
};

/// The most events one [`Broker::publish`] takes: all of them are in flight at once.
pub const PUBLISH_BATCH_EVENTS_MAX: usize = 4096;

/// How long a publish waits for the broker's confirmation of a batch, by default.
pub const CONFIRM_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// The header that carries the event id to JetStream, which drops a second message with the same
/// id within the stream's duplicate window.
pub const NATS_MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// A broker a feed is published to.
#[async_trait]
pub trait Broker: Send + Sync {
    /// Connects (anew, if the connection or channel was lost) and declares what the feed's
    /// messages need on the broker (an exchange, a stream). Idempotent: declaring what exists is a
    /// no-op.
    ///
    /// # Errors
    ///
    /// [`BrokerError::Connect`] when the broker cannot be reached, [`BrokerError::Declare`] when
    /// the broker refuses the declaration (e.g. an exchange or a stream of that name exists with
    /// another type or other subjects).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a declaration cut short leaves either nothing or the declared topology,
    /// and declaring again completes it.
    async fn declare(&self, feed: &FeedId) -> Result<(), BrokerError>;

    /// Sends `events` (of `feed`, in feed order) as CloudEvents with the given `source`, and
    /// returns once every message is handed to the connection, in order; the [`Pending`] it
    /// returns resolves to the broker's answer to each event ([`Outcome`], in the order of
    /// `events`) within the broker's confirm timeout, counted from the start of the send.
    ///
    /// Several sends may be pending at once (a pipeline): the messages of one send go out after
    /// those of the sends that returned before it. A send never opens a connection or channel:
    /// once the one it uses is lost (and with it the answers pending on it), sends fail with
    /// [`BrokerError::Connect`] until [`Broker::declare`] opens a new one — so events sent after a
    /// loss can never be delivered before those lost with it. Once an event is refused before it is sent
    /// (its data is not JSON, the channel is gone), the events after it are not sent
    /// ([`Refusal::NotSent`]), so that a retry from the first unconfirmed event keeps each
    /// subject's first deliveries in order.
    ///
    /// # Errors
    ///
    /// [`BrokerError::Connect`] when nothing could be sent (the broker cannot be reached),
    /// [`BrokerError::BatchTooLarge`] above [`PUBLISH_BATCH_EVENTS_MAX`] events.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe in the sense that the messages already sent may or may not be on the
    /// broker; nothing is lost either way as long as the caller counts only outcomes it received
    /// (at least once: publishing again is harmless).
    async fn send(
        &self,
        feed: &FeedId,
        source: &str,
        events: &[FeedEvent],
    ) -> Result<Pending, BrokerError>;

    /// [`Broker::send`], then waits for the outcomes.
    ///
    /// # Errors
    ///
    /// As [`Broker::send`].
    ///
    /// # Cancel safety
    ///
    /// As [`Broker::send`].
    async fn publish(
        &self,
        feed: &FeedId,
        source: &str,
        events: &[FeedEvent],
    ) -> Result<Vec<Outcome>, BrokerError> {
        Ok(self.send(feed, source, events).await?.outcomes().await)
    }

    /// What kind of broker this is (`rabbitmq`, `nats`): the default name of a publisher's
    /// cursor.
    fn kind(&self) -> &'static str;
}

/// The broker's answers to one [`Broker::send`], to come.
#[must_use = "the outcomes are what moves a publisher's cursor"]
pub struct Pending(Pin<Box<dyn Future<Output = Vec<Outcome>> + Send + 'static>>);

impl Pending {
    /// Wraps the future of a send's outcomes (one per event, in order).
    pub fn new(outcomes: impl Future<Output = Vec<Outcome>> + Send + 'static) -> Pending {
        Pending(Box::pin(outcomes))
    }

    /// Outcomes known already: every event refused, or every event confirmed.
    pub fn ready(outcomes: Vec<Outcome>) -> Pending {
        Pending::new(std::future::ready(outcomes))
    }

    /// Waits for the outcomes.
    ///
    /// # Cancel safety
    ///
    /// Dropping it forgets the answers; the messages stay sent.
    pub async fn outcomes(self) -> Vec<Outcome> {
        self.0.await
    }
}

impl Future for Pending {
    type Output = Vec<Outcome>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<Outcome>> {
        self.0.as_mut().poll(cx)
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pending")
    }
}

/// The broker's answer to one published event.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The broker took responsibility for the message. `duplicate`: JetStream already had a
    /// message with this id (never set by RabbitMQ, which does not deduplicate).
    Confirmed { duplicate: bool },
    /// The broker did not confirm the message: it must be published again.
    Refused(Refusal),
}

impl Outcome {
    pub fn is_confirmed(&self) -> bool {
        matches!(self, Outcome::Confirmed { .. })
    }
}

/// Why an event was not confirmed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The exchange or stream does not exist ([`Broker::declare`] was not called, or it was
    /// deleted).
    #[error("the feed's exchange or stream is not declared on the broker")]
    NotDeclared,
    /// RabbitMQ nacked the message.
    #[error("the broker nacked the message")]
    Nacked,
    /// RabbitMQ returned the message: no queue is bound for its routing key.
    #[error("the broker returned the message as unroutable: {code} {text}")]
    Returned { code: u16, text: String },
    /// No answer within the confirm timeout.
    #[error("no confirmation within {0:?}")]
    TimedOut(Duration),
    /// The event's stored data is not JSON: it cannot be written as a CloudEvent.
    #[error("the event's data is not JSON")]
    NotJson,
    /// An earlier event of the batch was refused before being sent; this one was not sent.
    #[error("not sent: an earlier event of the batch was refused")]
    NotSent,
    /// The channel or connection failed, or the broker answered with an error.
    #[error("{0}")]
    Failed(String),
}

/// Why a broker operation failed as a whole.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The URL is not a broker URL this client understands.
    #[error("invalid broker URL: {0}")]
    Url(String),
    /// The broker could not be reached, or the connection or channel could not be opened.
    #[error("cannot connect to the broker: {0}")]
    Connect(String),
    /// The broker refused to declare the feed's topology.
    #[error("the broker refused to declare {what}: {reason}")]
    Declare { what: String, reason: String },
    /// More events than [`PUBLISH_BATCH_EVENTS_MAX`] in one publish.
    #[error("a publish takes at most {max} events, not {len}")]
    BatchTooLarge { len: usize, max: usize },
}

/// The RabbitMQ exchange of a feed: `headwater.accounts.v2`.
pub fn exchange_name(feed: &FeedId) -> String {
    format!("headwater.{}.v{}", feed.name.as_str(), feed.version.get())
}

/// The JetStream stream of a feed: `HEADWATER_ACCOUNTS_V2`.
pub fn stream_name(feed: &FeedId) -> String {
    format!(
        "HEADWATER_{}_V{}",
        feed.name.as_str().to_ascii_uppercase(),
        feed.version.get()
    )
}

/// The NATS subject of an event of a feed: `headwater.accounts.v2.{subject}`.
///
/// A feed subject may contain dots (`eu.acc-42`), which NATS reads as token separators; one that
/// would make an empty token (`.a`, `a..b`, `a.`) has each empty token written as `~`, which
/// NATS accepts. Only routing sees this: the message body carries the subject as it is.
pub fn nats_subject(feed: &FeedId, subject: &str) -> String {
    let mut out = exchange_name(feed);
    for token in subject.split('.') {
        out.push('.');
        out.push_str(if token.is_empty() { "~" } else { token });
    }
    out
}

/// The subjects of a feed's JetStream stream: `headwater.accounts.v2.>`.
pub fn stream_subjects(feed: &FeedId) -> String {
    format!("{}.>", exchange_name(feed))
}

fn check_batch(events: &[FeedEvent]) -> Result<(), BrokerError> {
    if events.len() > PUBLISH_BATCH_EVENTS_MAX {
        return Err(BrokerError::BatchTooLarge {
            len: events.len(),
            max: PUBLISH_BATCH_EVENTS_MAX,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_broker_mapping() {
        let feed = FeedId::parse("bank_accounts.v12").unwrap();
        assert_eq!(exchange_name(&feed), "headwater.bank_accounts.v12");
        assert_eq!(stream_name(&feed), "HEADWATER_BANK_ACCOUNTS_V12");
        assert_eq!(stream_subjects(&feed), "headwater.bank_accounts.v12.>");
        assert_eq!(
            nats_subject(&feed, "acc-42"),
            "headwater.bank_accounts.v12.acc-42"
        );
        assert_eq!(
            nats_subject(&feed, "eu.acc-42"),
            "headwater.bank_accounts.v12.eu.acc-42"
        );
        assert_eq!(
            nats_subject(&feed, ".a..b."),
            "headwater.bank_accounts.v12.~.a.~.b.~"
        );
    }
}
