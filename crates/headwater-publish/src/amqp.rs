//! RabbitMQ over AMQP 0-9-1 (`lapin`): a durable topic exchange per feed, persistent messages,
//! publisher confirms, `mandatory` (a returned message is a refusal).

use std::time::Duration;

use async_trait::async_trait;
use headwater_core::FeedId;
use headwater_store::FeedEvent;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use lapin::{ErrorKind, ExchangeKind};
use tokio::sync::Mutex;
use tokio::time::{Instant, timeout_at};

use crate::{Broker, BrokerError, CONFIRM_TIMEOUT_DEFAULT, Outcome, Pending, Refusal, check_batch};

/// AMQP `delivery_mode` of a persistent message.
const DELIVERY_MODE_PERSISTENT: u8 = 2;
/// AMQP reply code of a channel closed because the exchange does not exist.
const REPLY_NOT_FOUND: u16 = 404;

/// A RabbitMQ broker, reached at an `amqp://` URL.
///
/// Holds one connection and one publishing channel in confirm mode, opened by
/// [`AmqpBroker::connect`] or [`Broker::declare`]. A channel or connection the broker closed (a
/// channel error, a lost connection) is not resumed by a send — the confirmations pending on it
/// are lost, and later events sent on a new channel would be delivered before the lost ones —
/// sends fail with [`BrokerError::Connect`] until `declare` opens them anew (the follower declares
/// at the start of each run, and publishes again from its cursor, in order).
pub struct AmqpBroker {
    url: String,
    confirm_timeout: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    connection: Option<Connection>,
    channel: Option<Channel>,
}

impl std::fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("AmqpBroker")
            .field("confirm_timeout", &self.confirm_timeout)
            .finish_non_exhaustive()
    }
}

impl AmqpBroker {
    /// Connects to the broker at `url` (`amqp://user:password@host:port/vhost`).
    ///
    /// # Errors
    ///
    /// [`BrokerError::Url`] for a URL that is not `amqp://`, [`BrokerError::Connect`] when the
    /// broker cannot be reached or refuses the login.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is kept from a connection cut short.
    pub async fn connect(url: &str) -> Result<AmqpBroker, BrokerError> {
        let broker = AmqpBroker::lazy(url)?;
        {
            let mut state = broker.state.lock().await;
            broker.channel(&mut state).await?;
        }
        Ok(broker)
    }

    /// A broker at `url` that connects on first use (and again after each lost connection): a
    /// service starts whether RabbitMQ is up or not.
    ///
    /// # Errors
    ///
    /// [`BrokerError::Url`] for a URL that is not a valid `amqp://` URL.
    pub fn lazy(url: &str) -> Result<AmqpBroker, BrokerError> {
        if !url.starts_with("amqp://") {
            return Err(BrokerError::Url(
                "an AMQP URL starts with amqp:// (TLS is not built in)".into(),
            ));
        }
        // Checked now, so that a typo is reported at startup, not at the first publish. The
        // parser's message never repeats the URL (it may hold a password).
        url.parse::<lapin::uri::AMQPUri>()
            .map_err(|e| BrokerError::Url(format!("not a valid AMQP URL: {e}")))?;
        Ok(AmqpBroker {
            url: url.to_owned(),
            confirm_timeout: CONFIRM_TIMEOUT_DEFAULT,
            state: Mutex::new(State::default()),
        })
    }

    /// How long a publish waits for the confirmations of its batch (default
    /// [`CONFIRM_TIMEOUT_DEFAULT`]).
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> AmqpBroker {
        self.confirm_timeout = timeout;
        self
    }

    async fn connection<'s>(&self, state: &'s mut State) -> Result<&'s Connection, BrokerError> {
        let alive = state
            .connection
            .as_ref()
            .is_some_and(|c| c.status().connected());
        if !alive {
            state.channel = None;
            if let Some(old) = state.connection.take() {
                // Best effort: the connection is already failing.
                let _ = old.close(200, "reconnecting".into()).await;
            }
            let connection = Connection::connect(&self.url, ConnectionProperties::default())
                .await
                .map_err(|e| BrokerError::Connect(e.to_string()))?;
            tracing::debug!("connected to RabbitMQ");
            state.connection = Some(connection);
        }
        state
            .connection
            .as_ref()
            .ok_or_else(|| BrokerError::Connect("no connection".into()))
    }

    /// The publishing channel, in confirm mode; a new one if the broker closed the last.
    async fn channel(&self, state: &mut State) -> Result<Channel, BrokerError> {
        if let Some(channel) = &state.channel
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let channel = self
            .connection(state)
            .await?
            .create_channel()
            .await
            .map_err(|e| BrokerError::Connect(e.to_string()))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| BrokerError::Connect(e.to_string()))?;
        state.channel = Some(channel.clone());
        Ok(channel)
    }
}

fn refusal(error: &lapin::Error) -> Refusal {
    match error.kind() {
        ErrorKind::ProtocolError(e) if e.get_id() == REPLY_NOT_FOUND => Refusal::NotDeclared,
        _ => Refusal::Failed(error.to_string()),
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    async fn declare(&self, feed: &FeedId) -> Result<(), BrokerError> {
        let exchange = crate::exchange_name(feed);
        let channel = {
            let mut state = self.state.lock().await;
            // The publishing channel, opened anew if it was lost.
            self.channel(&mut state).await?;
            // A channel of its own: a refused declaration closes it, not the publishing one.
            self.connection(&mut state)
                .await?
                .create_channel()
                .await
                .map_err(|e| BrokerError::Connect(e.to_string()))?
        };
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| BrokerError::Declare {
                what: format!("the durable topic exchange {exchange}"),
                reason: e.to_string(),
            })?;
        // Best effort: the broker closes the channel with the connection anyway.
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "rabbitmq"
    }

    async fn send(
        &self,
        feed: &FeedId,
        source: &str,
        events: &[FeedEvent],
    ) -> Result<Pending, BrokerError> {
        check_batch(events)?;
        let exchange = crate::exchange_name(feed);
        // One batch at a time on the channel: the messages of a batch go out in feed order.
        let state = self.state.lock().await;
        // Never a new channel or connection here: the sends pending on a lost one are lost with
        // it, and sending later events on a new one would deliver them first. `declare` opens
        // them anew.
        let channel = match &state.channel {
            Some(channel) if channel.status().connected() => channel.clone(),
            _ => {
                return Err(BrokerError::Connect(
                    "no open channel to RabbitMQ (a lost channel is not resumed: declare opens \
                     one anew)"
                        .into(),
                ));
            }
        };
        // Sending is bounded too: a blocked connection (a RabbitMQ memory alarm) holds writes.
        let deadline = Instant::now() + self.confirm_timeout;
        let mut outcomes: Vec<Option<Outcome>> = vec![None; events.len()];
        let mut confirms = Vec::with_capacity(events.len());
        for (index, event) in events.iter().enumerate() {
            let body = match headwater_api::cloud_event_json(feed, source, event) {
                Ok(body) => body,
                Err(_) => {
                    outcomes[index] = Some(Outcome::Refused(Refusal::NotJson));
                    break;
                }
            };
            let properties = BasicProperties::default()
                .with_message_id(event.id.to_string().into())
                .with_delivery_mode(DELIVERY_MODE_PERSISTENT)
                .with_content_type("application/cloudevents+json".into());
            let sent = channel.basic_publish(
                exchange.as_str().into(),
                event.subject.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            );
            match timeout_at(deadline, sent).await {
                Ok(Ok(confirm)) => confirms.push((index, confirm)),
                Ok(Err(e)) => {
                    outcomes[index] = Some(Outcome::Refused(refusal(&e)));
                    break;
                }
                Err(_) => {
                    outcomes[index] =
                        Some(Outcome::Refused(Refusal::TimedOut(self.confirm_timeout)));
                    break;
                }
            }
        }
        drop(state);
        let confirm_timeout = self.confirm_timeout;
        let feed = feed.clone();
        Ok(Pending::new(async move {
            confirmed(feed, deadline, confirm_timeout, outcomes, confirms).await
        }))
    }
}

/// Waits for the confirmations of one send.
async fn confirmed(
    feed: FeedId,
    deadline: Instant,
    confirm_timeout: Duration,
    mut outcomes: Vec<Option<Outcome>>,
    confirms: Vec<(usize, lapin::PublisherConfirm)>,
) -> Vec<Outcome> {
    for (index, confirm) in confirms {
        let outcome = match timeout_at(deadline, confirm).await {
            Err(_) => Outcome::Refused(Refusal::TimedOut(confirm_timeout)),
            Ok(Err(e)) => Outcome::Refused(refusal(&e)),
            Ok(Ok(Confirmation::Ack(None))) => Outcome::Confirmed { duplicate: false },
            Ok(Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)))) => {
                Outcome::Refused(Refusal::Returned {
                    code: returned.reply_code,
                    text: returned.reply_text.to_string(),
                })
            }
            Ok(Ok(Confirmation::Nack(None))) => Outcome::Refused(Refusal::Nacked),
            Ok(Ok(Confirmation::NotRequested)) => {
                Outcome::Refused(Refusal::Failed("the channel is not in confirm mode".into()))
            }
        };
        outcomes[index] = Some(outcome);
    }
    let outcomes: Vec<Outcome> = outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Outcome::Refused(Refusal::NotSent)))
        .collect();
    let refused = outcomes.iter().filter(|o| !o.is_confirmed()).count();
    if refused > 0 {
        tracing::debug!(feed = %feed, events = outcomes.len(), refused, "publish to RabbitMQ: some refused");
    }
    outcomes
}
