//! NATS JetStream (`async-nats`): a stream per feed, acked publishes carrying `Nats-Msg-Id`.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_trait::async_trait;
use headwater_core::FeedId;
use headwater_store::FeedEvent;
use tokio::sync::Mutex;
use tokio::time::{Instant, timeout_at};

use crate::{
    Broker, BrokerError, CONFIRM_TIMEOUT_DEFAULT, NATS_MSG_ID_HEADER, Outcome, Pending, Refusal,
    check_batch,
};

/// A NATS server with JetStream, reached at a `nats://` URL.
///
/// The client reconnects by itself; a publish while it is disconnected times out
/// ([`Refusal::TimedOut`]).
pub struct NatsBroker {
    jetstream: jetstream::Context,
    confirm_timeout: Duration,
    /// One batch at a time: the messages of a batch go out in feed order.
    publishing: Mutex<()>,
}

impl std::fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBroker")
            .field("confirm_timeout", &self.confirm_timeout)
            .finish_non_exhaustive()
    }
}

impl NatsBroker {
    /// Connects to the server at `url` (`nats://host:port`).
    ///
    /// # Errors
    ///
    /// [`BrokerError::Url`] for a URL that is not `nats://`, [`BrokerError::Connect`] when the
    /// server cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is kept from a connection cut short.
    pub async fn connect(url: &str) -> Result<NatsBroker, BrokerError> {
        if !url.starts_with("nats://") {
            return Err(BrokerError::Url(
                "a NATS URL starts with nats:// (TLS is not built in)".into(),
            ));
        }
        let client = async_nats::connect(url)
            .await
            .map_err(|e| BrokerError::Connect(e.to_string()))?;
        Ok(NatsBroker::with_client(client))
    }

    /// A server at `url` that the client connects to in the background, and again after each
    /// lost connection: a service starts whether NATS is up or not. Publishes made while it is
    /// away time out ([`Refusal::TimedOut`]).
    ///
    /// # Errors
    ///
    /// [`BrokerError::Url`] for a URL that is not a valid `nats://` URL.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn lazy(url: &str) -> Result<NatsBroker, BrokerError> {
        if !url.starts_with("nats://") {
            return Err(BrokerError::Url(
                "a NATS URL starts with nats:// (TLS is not built in)".into(),
            ));
        }
        let address: async_nats::ServerAddr = url
            .parse()
            .map_err(|e| BrokerError::Url(format!("not a valid NATS URL: {e}")))?;
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(address)
            .await
            .map_err(|e| BrokerError::Connect(e.to_string()))?;
        Ok(NatsBroker::with_client(client))
    }

    fn with_client(client: async_nats::Client) -> NatsBroker {
        let mut jetstream = jetstream::new(client);
        jetstream.set_timeout(CONFIRM_TIMEOUT_DEFAULT);
        NatsBroker {
            jetstream,
            confirm_timeout: CONFIRM_TIMEOUT_DEFAULT,
            publishing: Mutex::new(()),
        }
    }

    /// How long a publish waits for the acks of its batch (default
    /// [`CONFIRM_TIMEOUT_DEFAULT`]).
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> NatsBroker {
        self.confirm_timeout = timeout;
        self.jetstream.set_timeout(timeout);
        self
    }

    /// The JetStream context, for what this crate does not cover (reading a stream back).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }
}

fn refusal(error: &jetstream::context::PublishError) -> Refusal {
    match error.kind() {
        PublishErrorKind::StreamNotFound => Refusal::NotDeclared,
        _ => Refusal::Failed(error.to_string()),
    }
}

#[async_trait]
impl Broker for NatsBroker {
    async fn declare(&self, feed: &FeedId) -> Result<(), BrokerError> {
        let name = crate::stream_name(feed);
        let subjects = crate::stream_subjects(feed);
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![subjects.clone()],
            storage: stream::StorageType::File,
            ..stream::Config::default()
        };
        let stream = self
            .jetstream
            .get_or_create_stream(config)
            .await
            .map_err(|e| BrokerError::Declare {
                what: format!("the JetStream stream {name}"),
                reason: e.to_string(),
            })?;
        // A stream of that name made by someone else for other subjects would take none of ours.
        let info = stream.cached_info();
        if !info.config.subjects.contains(&subjects) {
            return Err(BrokerError::Declare {
                what: format!("the JetStream stream {name}"),
                reason: format!(
                    "it exists with the subjects {:?}, not {subjects:?}",
                    info.config.subjects
                ),
            });
        }
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "nats"
    }

    async fn send(
        &self,
        feed: &FeedId,
        source: &str,
        events: &[FeedEvent],
    ) -> Result<Pending, BrokerError> {
        check_batch(events)?;
        let publishing = self.publishing.lock().await;
        // Sending is bounded too: a disconnected client's buffer fills up.
        let deadline = Instant::now() + self.confirm_timeout;
        let mut outcomes: Vec<Option<Outcome>> = vec![None; events.len()];
        let mut acks = Vec::with_capacity(events.len());
        for (index, event) in events.iter().enumerate() {
            let body = match headwater_api::cloud_event_json(feed, source, event) {
                Ok(body) => body,
                Err(_) => {
                    outcomes[index] = Some(Outcome::Refused(Refusal::NotJson));
                    break;
                }
            };
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(NATS_MSG_ID_HEADER, event.id.to_string().as_str());
            let sent = self.jetstream.publish_with_headers(
                crate::nats_subject(feed, event.subject.as_str()),
                headers,
                body.into(),
            );
            match timeout_at(deadline, sent).await {
                Ok(Ok(ack)) => acks.push((index, ack)),
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
        drop(publishing);
        let confirm_timeout = self.confirm_timeout;
        let feed = feed.clone();
        Ok(Pending::new(async move {
            acked(feed, deadline, confirm_timeout, outcomes, acks).await
        }))
    }
}

/// Waits for the acks of one send.
async fn acked(
    feed: FeedId,
    deadline: Instant,
    confirm_timeout: Duration,
    mut outcomes: Vec<Option<Outcome>>,
    acks: Vec<(usize, jetstream::context::PublishAckFuture)>,
) -> Vec<Outcome> {
    for (index, ack) in acks {
        let outcome = match timeout_at(deadline, ack.into_future()).await {
            Err(_) => Outcome::Refused(Refusal::TimedOut(confirm_timeout)),
            Ok(Err(e)) if e.kind() == PublishErrorKind::TimedOut => {
                Outcome::Refused(Refusal::TimedOut(confirm_timeout))
            }
            Ok(Err(e)) => Outcome::Refused(refusal(&e)),
            Ok(Ok(ack)) => Outcome::Confirmed {
                duplicate: ack.duplicate,
            },
        };
        outcomes[index] = Some(outcome);
    }
    let outcomes: Vec<Outcome> = outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Outcome::Refused(Refusal::NotSent)))
        .collect();
    let refused = outcomes.iter().filter(|o| !o.is_confirmed()).count();
    if refused > 0 {
        tracing::debug!(feed = %feed, events = outcomes.len(), refused, "publish to JetStream: some refused");
    }
    outcomes
}
