//! An integration event as a consumer receives it.

use headwater_core::{EventId, FeedId, Sequence, Subject};
use serde::Deserialize;
use serde_json::value::RawValue;

/// One integration event, decoded from a CloudEvent (the feed API's element of a page, a
/// broker's message body: byte for byte the same JSON).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct IntegrationEvent {
    pub id: EventId,
    /// The producer's CloudEvents `source`.
    pub source: String,
    /// The CloudEvents `type`, e.g. `accounts.deposited`.
    pub event_type: String,
    pub subject: Subject,
    /// Position of the event in its subject: 1, 2, 3 … without gaps.
    pub sequence: Sequence,
    /// Position of the event in its feed.
    pub position: u64,
    pub feed: FeedId,
    /// RFC 3339, as the producer wrote it.
    pub time: String,
    /// The CloudEvents `data`: JSON text, as the producer wrote it.
    pub data: String,
}

/// Why a message is not an integration event. The message is refused, never applied.
#[derive(Debug, thiserror::Error)]
#[error("not an integration event: {0}")]
pub struct DecodeError(String);

#[derive(Deserialize)]
struct Wire {
    specversion: String,
    id: String,
    source: String,
    #[serde(rename = "type")]
    event_type: String,
    subject: String,
    time: String,
    data: Box<RawValue>,
    sequence: u64,
    position: u64,
    feed: String,
}

impl IntegrationEvent {
    /// The event's `data` as a `T`.
    ///
    /// # Errors
    /// The JSON error when the data does not fit `T`.
    pub fn data_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.data)
    }

    /// Decodes one CloudEvent in JSON.
    ///
    /// # Errors
    /// [`DecodeError`] for anything that is not a CloudEvent 1.0 of a Headwater feed: bad JSON,
    /// a missing field, an id that is not a UUID, a subject or feed that is not valid, a
    /// sequence of 0.
    pub fn from_cloud_event(bytes: &[u8]) -> Result<IntegrationEvent, DecodeError> {
        let wire: Wire = serde_json::from_slice(bytes).map_err(|e| DecodeError(e.to_string()))?;
        IntegrationEvent::from_wire(wire)
    }

    /// Decodes a page of the feed API (a JSON array of CloudEvents).
    ///
    /// # Errors
    /// [`DecodeError`] as [`IntegrationEvent::from_cloud_event`], for the page or any element.
    pub fn from_cloud_event_batch(bytes: &[u8]) -> Result<Vec<IntegrationEvent>, DecodeError> {
        let wires: Vec<Wire> =
            serde_json::from_slice(bytes).map_err(|e| DecodeError(e.to_string()))?;
        wires.into_iter().map(IntegrationEvent::from_wire).collect()
    }

    fn from_wire(wire: Wire) -> Result<IntegrationEvent, DecodeError> {
        if wire.specversion != "1.0" {
            return Err(DecodeError(format!(
                "specversion {:?}, not \"1.0\"",
                wire.specversion
            )));
        }
        let id = uuid::Uuid::parse_str(&wire.id)
            .map_err(|e| DecodeError(format!("id {:?}: {e}", wire.id)))?;
        let subject = Subject::new(wire.subject.clone())
            .map_err(|e| DecodeError(format!("subject {:?}: {e}", wire.subject)))?;
        let feed = FeedId::parse(&wire.feed)
            .map_err(|e| DecodeError(format!("feed {:?}: {e}", wire.feed)))?;
        if wire.sequence == 0 {
            return Err(DecodeError("sequence 0 (sequences start at 1)".into()));
        }
        Ok(IntegrationEvent {
            id: EventId::from_uuid(id),
            source: wire.source,
            event_type: wire.event_type,
            subject,
            sequence: Sequence(wire.sequence),
            position: wire.position,
            feed,
            time: wire.time,
            data: wire.data.get().to_owned(),
        })
    }
}
