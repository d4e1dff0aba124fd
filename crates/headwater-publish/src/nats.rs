//! NATS JetStream (`async-nats`): a stream per feed, acked publishes carrying `Nats-Msg-Id`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_trait::async_trait;
use headwater_core::FeedId;
use headwater_store::FeedEvent;
use tokio::sync::{Mutex, watch};
use tokio::time::{Instant, timeout_at};

use crate::{
    Broker, BrokerError, CONFIRM_TIMEOUT_DEFAULT, NATS_MSG_ID_HEADER, Outcome, Pending, Refusal,
    check_batch,
};

/// A NATS server with JetStream, reached at a `nats://` URL.
///
/// Holds one client, connected by [`NatsBroker::connect`] or [`Broker::declare`]. A client whose
/// connection dropped is never resumed: `async-nats` would send the messages still queued in it
/// after reconnecting, behind the ones lost with the connection, and so deliver later events of a
/// subject before earlier ones. Such a client is dropped with everything queued in it; sends fail
/// with [`BrokerError::Connect`] until `declare` connects anew (the follower declares at the start
/// of each run, and publishes again from its cursor, in order).
pub struct NatsBroker {
    address: async_nats::ServerAddr,
    confirm_timeout: Duration,
    /// The current client; the lock is held while a batch is sent, so that the messages of a
    /// batch go out in feed order, after those of the batch before.
    session: Mutex<Option<Session>>,
}

struct Session {
    jetstream: jetstream::Context,
    /// Turns true when the client's connection dropped.
    lost: watch::Receiver<bool>,
}

impl std::fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The address may carry credentials.
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
        let broker = NatsBroker::lazy(url).await?;
        broker.jetstream().await?;
        Ok(broker)
    }

    /// A server at `url` that is connected to on first use, and anew after a lost connection: a
    /// service starts whether NATS is up or not.
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
        Ok(NatsBroker {
            address,
            confirm_timeout: CONFIRM_TIMEOUT_DEFAULT,
            session: Mutex::new(None),
        })
    }

    /// How long a publish waits for the acks of its batch (default
    /// [`CONFIRM_TIMEOUT_DEFAULT`]).
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> NatsBroker {
        self.confirm_timeout = timeout;
        self
    }

    /// The JetStream context of the current client (connecting if there is none), for what this
    /// crate does not cover (reading a stream back).
    ///
    /// # Errors
    ///
    /// [`BrokerError::Connect`] when the server cannot be reached.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn jetstream(&self) -> Result<jetstream::Context, BrokerError> {
        let mut session = self.session.lock().await;
        self.session(&mut session).await
    }

    /// The live client's context, or a new client's.
    async fn session(
        &self,
        session: &mut Option<Session>,
    ) -> Result<jetstream::Context, BrokerError> {
        if let Some(live) = session.as_ref()
            && !*live.lost.borrow()
        {
            return Ok(live.jetstream.clone());
        }
        // Dropping the last handle of a lost client ends it with what is queued in it.
        *session = None;
        let (lost_tx, lost) = watch::channel(false);
        let lost_tx = Arc::new(lost_tx);
        let credentials = credentials(&self.address);
        let connected = Arc::new(AtomicBool::new(false));
        // Called at each connection: the first goes through, a reconnection is refused, so the
        // lost client stops and drops what it queued (see the type's documentation).
        let options = async_nats::ConnectOptions::with_auth_callback({
            let lost = Arc::clone(&lost_tx);
            move |_nonce| {
                let reconnecting = connected.swap(true, Ordering::SeqCst);
                let answer = if reconnecting {
                    lost.send_replace(true);
                    Err(async_nats::AuthError::new(
                        "headwater does not resume a lost NATS connection: it connects anew and \
                         publishes again from its cursor",
                    ))
                } else {
                    Ok(credentials.clone())
                };
                std::future::ready(answer)
            }
        })
        .connection_timeout(CONNECT_TIMEOUT)
        // The refused reconnection above, then the client gives up and ends.
        .max_reconnects(1)
        .event_callback({
            let lost = Arc::clone(&lost_tx);
            move |event| {
                if matches!(
                    event,
                    async_nats::Event::Disconnected | async_nats::Event::Closed
                ) {
                    lost.send_replace(true);
                }
                std::future::ready(())
            }
        });
        let client = options
            .connect(self.address.clone())
            .await
            .map_err(|e| BrokerError::Connect(e.to_string()))?;
        tracing::debug!("connected to NATS");
        // async-nats holds at most 5,000 unacked publishes per context by default; one more
        // waits for a permit that only awaiting an older ack gives back. The publisher sends its
        // whole window before it awaits the oldest send, so the context must hold that window,
        // and the acks of a window dropped after a refusal (the client waits for them a while).
        let mut jetstream = jetstream::context::ContextBuilder::new()
            .max_ack_inflight(ACKS_PENDING_MAX)
            .build(client);
        jetstream.set_timeout(self.confirm_timeout);
        *session = Some(Session {
            jetstream: jetstream.clone(),
            lost,
        });
        Ok(jetstream)
    }
}

fn lost_connection() -> BrokerError {
    BrokerError::Connect(
        "not connected to NATS (a lost connection is not resumed: declare connects anew)".into(),
    )
}

/// The unacked publishes a JetStream context may hold: twice the publisher's largest window.
const ACKS_PENDING_MAX: usize = 2 * crate::publisher::IN_FLIGHT_EVENTS_MAX;

/// How long connecting to the server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The credentials of a URL (`nats://user:password@host`, `nats://token@host`), handed to the
/// server by the auth callback (which replaces the client's own).
fn credentials(address: &async_nats::ServerAddr) -> async_nats::Auth {
    let mut auth = async_nats::Auth::new();
    match (address.username(), address.password()) {
        (Some(user), Some(password)) if !password.is_empty() => {
            auth.username = Some(user.to_owned());
            auth.password = Some(password.to_owned());
        }
        (Some(token), _) if !token.is_empty() => auth.token = Some(token.to_owned()),
        _ => {}
    }
    auth
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
        let jetstream = self.jetstream().await?;
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![subjects.clone()],
            storage: stream::StorageType::File,
            ..stream::Config::default()
        };
        let stream =
            jetstream
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
        let session = self.session.lock().await;
        // Never a new connection here: the sends pending on a lost one are lost with it, and
        // sending later events on a new one would deliver them first. `declare` connects anew.
        let (jetstream, lost) = match session.as_ref() {
            Some(live) if !*live.lost.borrow() => (live.jetstream.clone(), live.lost.clone()),
            _ => return Err(lost_connection()),
        };
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
            let sent = jetstream.publish_with_headers(
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
        drop(session);
        let confirm_timeout = self.confirm_timeout;
        let feed = feed.clone();
        Ok(Pending::new(async move {
            acked(feed, deadline, confirm_timeout, lost, outcomes, acks).await
        }))
    }
}

/// Waits for the acks of one send.
async fn acked(
    feed: FeedId,
    deadline: Instant,
    confirm_timeout: Duration,
    mut lost: watch::Receiver<bool>,
    mut outcomes: Vec<Option<Outcome>>,
    acks: Vec<(usize, jetstream::context::PublishAckFuture)>,
) -> Vec<Outcome> {
    for (index, ack) in acks {
        let answer = tokio::select! {
            biased;
            answer = timeout_at(deadline, ack.into_future()) => answer,
            // An ack not received by now will never come: fail fast, not at the deadline.
            _ = lost.wait_for(|lost| *lost) => {
                outcomes[index] = Some(Outcome::Refused(Refusal::Failed(
                    "the connection to NATS dropped before the ack".into(),
                )));
                continue;
            }
        };
        let outcome = match answer {
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
