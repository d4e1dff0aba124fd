//! Identifiers and counters: event ids, stream versions, positions, expected versions.

use std::fmt;

use uuid::Uuid;

/// The identity of an event, chosen by the writer. Appending an event whose id is already
/// recorded at that place in the stream is an idempotent no-op (G3).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId(Uuid);

impl EventId {
    /// A fresh random id (UUID v4).
    pub fn new_random() -> EventId {
        EventId(Uuid::new_v4())
    }

    /// A fresh time-ordered id (UUID v7): index-friendly when ids are not derived from anything.
    pub fn new_time_ordered() -> EventId {
        EventId(Uuid::now_v7())
    }

    /// A deterministic id derived from a namespace and a name (UUID v5). The same inputs always
    /// give the same id; this is how a retried command produces the same event ids.
    pub fn derived(namespace: &Uuid, name: &[u8]) -> EventId {
        EventId(Uuid::new_v5(namespace, name))
    }

    pub const fn from_uuid(uuid: Uuid) -> EventId {
        EventId(uuid)
    }

    pub const fn from_bytes(bytes: [u8; 16]) -> EventId {
        EventId(Uuid::from_bytes(bytes))
    }

    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    pub const fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// Parses the hyphenated form (`67e55044-10b1-426f-9247-bb680e5fe0c8`).
    pub fn parse(text: &str) -> Option<EventId> {
        Uuid::try_parse(text).ok().map(EventId)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({})", self.0.hyphenated())
    }
}

/// The number of an event within its stream: 1, 2, 3 … contiguous.
///
/// `StreamVersion::START` (0) is not the version of any event: it is the cursor "before the first
/// event", used as the `after` argument of a read that starts at the beginning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamVersion(pub u64);

impl StreamVersion {
    /// Before the first event of a stream.
    pub const START: StreamVersion = StreamVersion(0);
    /// The version of a stream's first event.
    pub const FIRST: StreamVersion = StreamVersion(1);

    pub const fn get(self) -> u64 {
        self.0
    }

    /// The next version. Panics on overflow, which 2^64 events in one stream cannot reach.
    #[must_use]
    pub fn next(self) -> StreamVersion {
        StreamVersion(self.0.checked_add(1).expect("stream version overflow"))
    }
}

impl fmt::Display for StreamVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The order of all events of one store, in commit order: 1, 2, 3 … without gaps. A follower that
/// has finished with position `p` asks for the events after `p` and never misses one (G4).
///
/// `Position::START` (0) is not the position of any event: it is the cursor "before everything".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position(pub u64);

impl Position {
    /// Before the first event of the store.
    pub const START: Position = Position(0);

    pub const fn get(self) -> u64 {
        self.0
    }

    /// The next position. Panics on overflow, which 2^64 events cannot reach.
    #[must_use]
    pub fn next(self) -> Position {
        Position(self.0.checked_add(1).expect("position overflow"))
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// What the writer believes about a stream before appending to it (optimistic concurrency, G2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExpectedVersion {
    /// Append whatever the stream's state.
    Any,
    /// The stream must not exist yet (no event recorded in it).
    NoStream,
    /// The stream must have at least one event.
    StreamExists,
    /// The stream's last event must have exactly this version. `Exact(StreamVersion::START)` is
    /// refused as bad input: say `NoStream`.
    Exact(StreamVersion),
}

impl ExpectedVersion {
    /// Whether a stream whose head is `head` (`None`: no stream) satisfies this expectation.
    pub fn admits(self, head: Option<StreamVersion>) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => head.is_none(),
            ExpectedVersion::StreamExists => head.is_some(),
            ExpectedVersion::Exact(version) => head == Some(version),
        }
    }

    /// The version the first appended event would get if this expectation holds, when the
    /// expectation alone determines it.
    pub fn first_version(self) -> Option<StreamVersion> {
        match self {
            ExpectedVersion::NoStream => Some(StreamVersion::FIRST),
            ExpectedVersion::Exact(version) => Some(version.next()),
            ExpectedVersion::Any | ExpectedVersion::StreamExists => None,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::StreamExists => f.write_str("stream exists"),
            ExpectedVersion::Exact(version) => write!(f, "version {version}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_version_admits() {
        let none = None;
        let two = Some(StreamVersion(2));
        let table = [
            (ExpectedVersion::Any, none, true),
            (ExpectedVersion::Any, two, true),
            (ExpectedVersion::NoStream, none, true),
            (ExpectedVersion::NoStream, two, false),
            (ExpectedVersion::StreamExists, none, false),
            (ExpectedVersion::StreamExists, two, true),
            (ExpectedVersion::Exact(StreamVersion(2)), two, true),
            (ExpectedVersion::Exact(StreamVersion(1)), two, false),
            (ExpectedVersion::Exact(StreamVersion(2)), none, false),
        ];
        for (expected, head, admits) in table {
            assert_eq!(
                expected.admits(head),
                admits,
                "{expected} with head {head:?}"
            );
        }
    }

    #[test]
    fn derived_ids_are_deterministic() {
        let ns = Uuid::from_u128(7);
        assert_eq!(EventId::derived(&ns, b"a"), EventId::derived(&ns, b"a"));
        assert_ne!(EventId::derived(&ns, b"a"), EventId::derived(&ns, b"b"));
    }

    #[test]
    fn event_id_round_trips_through_text() {
        let id = EventId::new_random();
        assert_eq!(EventId::parse(&id.to_string()), Some(id));
        assert_eq!(EventId::parse("not-a-uuid"), None);
    }
}
