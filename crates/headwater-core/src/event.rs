//! Events: what a writer appends ([`NewEvent`]) and what a reader gets back ([`RecordedEvent`]).

use std::collections::HashSet;
use std::fmt;

use uuid::Uuid;

use crate::ids::{EventId, ExpectedVersion, Position, StreamVersion};
use crate::limits::{
    APPEND_BYTES_MAX, APPEND_EVENTS_MAX, EVENT_DATA_BYTES_MAX, EVENT_TYPE_BYTES_MAX,
};
use crate::stream::StreamName;

/// The type of an event (`account.deposited`): 1 to [`EVENT_TYPE_BYTES_MAX`] bytes of ASCII
/// letters, digits and `.` `_` `-` `:`, starting with a letter.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventType(String);

/// Why an event type was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventTypeError {
    #[error("event type is empty")]
    Empty,
    #[error("event type is {len} bytes, more than the {max}-byte limit")]
    TooLong { len: usize, max: usize },
    #[error(
        "event type {0:?} must start with an ASCII letter and hold only ASCII letters, digits and `.` `_` `-` `:`"
    )]
    InvalidCharacters(String),
}

impl EventType {
    pub fn new(name: impl Into<String>) -> Result<EventType, EventTypeError> {
        let name = name.into();
        if name.is_empty() {
            return Err(EventTypeError::Empty);
        }
        if name.len() > EVENT_TYPE_BYTES_MAX {
            return Err(EventTypeError::TooLong {
                len: name.len(),
                max: EVENT_TYPE_BYTES_MAX,
            });
        }
        let ok = name.as_bytes()[0].is_ascii_alphabetic()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
        if !ok {
            return Err(EventTypeError::InvalidCharacters(name));
        }
        Ok(EventType(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventType({:?})", self.0)
    }
}

/// A point in time: microseconds since the Unix epoch, UTC. The store sets `recorded_at` when it
/// commits; this crate never reads a clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub const fn from_unix_micros(micros: u64) -> Timestamp {
        Timestamp(micros)
    }

    pub const fn unix_micros(self) -> u64 {
        self.0
    }
}

/// An event to append. The store gives it its stream, stream version, position and
/// `recorded_at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    pub event_id: EventId,
    pub event_type: EventType,
    /// The schema version of `data` for this event type, 1 for the first. Readers upcast older
    /// versions (see [`crate::Upcasters`]).
    pub schema_version: u32,
    /// The payload; JSON by convention. At most [`EVENT_DATA_BYTES_MAX`] bytes.
    pub data: Vec<u8>,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
}

impl NewEvent {
    /// An event with schema version 1 and no correlation or causation.
    pub fn new(event_id: EventId, event_type: EventType, data: Vec<u8>) -> NewEvent {
        NewEvent {
            event_id,
            event_type,
            schema_version: 1,
            data,
            correlation_id: None,
            causation_id: None,
        }
    }
}

/// What a store records beside an event's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metadata {
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    /// When the store committed the event (its clock, not the writer's).
    pub recorded_at: Timestamp,
    pub schema_version: u32,
}

/// An event as recorded in a store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedEvent {
    pub event_id: EventId,
    pub stream: StreamName,
    pub stream_version: StreamVersion,
    pub position: Position,
    pub event_type: EventType,
    pub data: Vec<u8>,
    pub metadata: Metadata,
}

impl RecordedEvent {
    /// Whether this recorded event is what `new` asked to record (ignoring where it landed).
    pub fn records(&self, new: &NewEvent) -> bool {
        self.event_id == new.event_id
            && self.event_type == new.event_type
            && self.data == new.data
            && self.metadata.schema_version == new.schema_version
            && self.metadata.correlation_id == new.correlation_id
            && self.metadata.causation_id == new.causation_id
    }
}

/// Why an append was refused before anything was written. Each is the writer's mistake:
/// retrying the same append fails the same way.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidAppend {
    #[error("an append needs at least one event")]
    NoEvents,
    #[error("an append holds {count} events, more than the limit of {max}")]
    TooManyEvents { count: usize, max: usize },
    #[error("event {event_id} has {len} bytes of data, more than the {max}-byte limit")]
    EventTooLarge {
        event_id: EventId,
        len: usize,
        max: usize,
    },
    #[error("an append holds {len} bytes of data, more than the {max}-byte limit")]
    AppendTooLarge { len: usize, max: usize },
    #[error("event id {0} appears twice in one append")]
    RepeatedEventId(EventId),
    #[error("schema version 0 of event {0}: schema versions start at 1")]
    ZeroSchemaVersion(EventId),
    #[error("expected version 0 names no event: use `NoStream` to expect an empty stream")]
    ExpectedVersionZero,
}

/// Checks an append against the named limits. Every backend calls this first, so that bad input
/// is refused identically everywhere and before any I/O.
pub fn validate_append(
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<(), InvalidAppend> {
    if events.is_empty() {
        return Err(InvalidAppend::NoEvents);
    }
    if events.len() > APPEND_EVENTS_MAX {
        return Err(InvalidAppend::TooManyEvents {
            count: events.len(),
            max: APPEND_EVENTS_MAX,
        });
    }
    if expected == ExpectedVersion::Exact(StreamVersion::START) {
        return Err(InvalidAppend::ExpectedVersionZero);
    }
    let mut total = 0usize;
    let mut seen = HashSet::with_capacity(events.len());
    for event in events {
        if event.data.len() > EVENT_DATA_BYTES_MAX {
            return Err(InvalidAppend::EventTooLarge {
                event_id: event.event_id,
                len: event.data.len(),
                max: EVENT_DATA_BYTES_MAX,
            });
        }
        if event.schema_version == 0 {
            return Err(InvalidAppend::ZeroSchemaVersion(event.event_id));
        }
        total += event.data.len();
        if !seen.insert(event.event_id) {
            return Err(InvalidAppend::RepeatedEventId(event.event_id));
        }
    }
    if total > APPEND_BYTES_MAX {
        return Err(InvalidAppend::AppendTooLarge {
            len: total,
            max: APPEND_BYTES_MAX,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(len: usize) -> NewEvent {
        NewEvent::new(
            EventId::new_random(),
            EventType::new("thing.happened").unwrap(),
            vec![0; len],
        )
    }

    #[test]
    fn event_types() {
        for ok in ["a", "account.deposited", "A-b_c:d.e1"] {
            assert!(EventType::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(EventType::new(""), Err(EventTypeError::Empty));
        for bad in ["1a", ".a", "a b", "a/b", "é"] {
            assert!(
                matches!(
                    EventType::new(bad),
                    Err(EventTypeError::InvalidCharacters(_))
                ),
                "{bad}"
            );
        }
        let long = "a".repeat(EVENT_TYPE_BYTES_MAX + 1);
        assert!(matches!(
            EventType::new(long),
            Err(EventTypeError::TooLong { .. })
        ));
    }

    #[test]
    fn append_validation() {
        let any = ExpectedVersion::Any;
        assert_eq!(validate_append(any, &[]), Err(InvalidAppend::NoEvents));
        assert!(validate_append(any, &[event(EVENT_DATA_BYTES_MAX)]).is_ok());
        assert!(matches!(
            validate_append(any, &[event(EVENT_DATA_BYTES_MAX + 1)]),
            Err(InvalidAppend::EventTooLarge { .. })
        ));
        let many: Vec<_> = (0..=APPEND_EVENTS_MAX).map(|_| event(1)).collect();
        assert!(matches!(
            validate_append(any, &many),
            Err(InvalidAppend::TooManyEvents { .. })
        ));
        assert!(validate_append(any, &many[..APPEND_EVENTS_MAX]).is_ok());
        let big: Vec<_> = (0..17).map(|_| event(EVENT_DATA_BYTES_MAX)).collect();
        assert!(matches!(
            validate_append(any, &big),
            Err(InvalidAppend::AppendTooLarge { .. })
        ));
        let one = event(1);
        assert_eq!(
            validate_append(any, &[one.clone(), one.clone()]),
            Err(InvalidAppend::RepeatedEventId(one.event_id))
        );
        let mut zero = event(1);
        zero.schema_version = 0;
        assert!(matches!(
            validate_append(any, &[zero]),
            Err(InvalidAppend::ZeroSchemaVersion(_))
        ));
        assert_eq!(
            validate_append(ExpectedVersion::Exact(StreamVersion::START), &[event(1)]),
            Err(InvalidAppend::ExpectedVersionZero)
        );
    }
}
