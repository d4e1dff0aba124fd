//! Aggregates: the pure decision-making half of a service.

use std::error::Error as StdError;
use std::fmt;

use crate::event::EventType;

/// One aggregate type: the events of one stream decide what a command does.
///
/// `decide` and `evolve` do no I/O and read no clock: everything a decision needs is in the state
/// or the command. That is what makes command handling retryable on fresh state and aggregates
/// testable with [`crate::testing::given`].
pub trait Aggregate: Default {
    /// The stream category of this aggregate's streams (`account` for `account-42`).
    const CATEGORY: &'static str;
    type Command;
    type Event: DomainEvent;
    /// Why a command is refused (a business rule, not a failure).
    type Error: StdError;

    /// Decides what a command does, given the current state: the events to record (possibly
    /// none), or why the command is refused.
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Applies one recorded event to the state. Must not fail: the event already happened.
    fn evolve(&mut self, event: &Self::Event);
}

/// A typed event with an explicit encoding. The stored form is written by hand (usually JSON
/// with `serde_json` in the implementing crate), never derived from the in-memory layout, so
/// that the type can change while the stored events stay readable.
pub trait DomainEvent: Sized {
    /// The stored event type (`account.deposited`).
    fn event_type(&self) -> EventType;

    /// The schema version of the form `encode` writes for this event's type. Start at 1; bump it
    /// when the stored form changes, and register an upcaster from the old version.
    fn schema_version(&self) -> u32 {
        1
    }

    fn encode(&self) -> Result<Vec<u8>, EncodeError>;

    /// Decodes a stored event. `schema_version` is the version after upcasting, so it is the
    /// current one unless an upcaster is missing: refuse versions you do not know.
    fn decode(event_type: &str, schema_version: u32, data: &[u8]) -> Result<Self, DecodeError>;
}

type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// An event could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode event: {source}")]
pub struct EncodeError {
    #[source]
    source: BoxError,
}

impl EncodeError {
    pub fn new(source: impl Into<BoxError>) -> EncodeError {
        EncodeError {
            source: source.into(),
        }
    }
}

/// A stored event could not be decoded (unknown type, unknown schema version, malformed data).
#[derive(Debug, thiserror::Error)]
pub struct DecodeError {
    event_type: String,
    schema_version: u32,
    source: BoxError,
}

impl DecodeError {
    pub fn new(event_type: &str, schema_version: u32, source: impl Into<BoxError>) -> DecodeError {
        DecodeError {
            event_type: event_type.to_owned(),
            schema_version,
            source: source.into(),
        }
    }

    /// The event type is not one this decoder knows.
    pub fn unknown_type(event_type: &str, schema_version: u32) -> DecodeError {
        DecodeError::new(event_type, schema_version, "unknown event type")
    }

    /// The schema version is not one this decoder knows (an upcaster is missing).
    pub fn unknown_version(event_type: &str, schema_version: u32) -> DecodeError {
        DecodeError::new(event_type, schema_version, "unknown schema version")
    }

    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    pub fn schema_version(&self) -> u32 {
        self.schema_version
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot decode event of type {:?}, schema version {}: {}",
            self.event_type, self.schema_version, self.source
        )
    }
}
