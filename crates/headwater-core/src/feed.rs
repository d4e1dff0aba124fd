//! The words of the producer's public side: feeds (`accounts.v2`), subjects, sequences and feed
//! positions. Validation only; no I/O.

use std::fmt;
use std::num::NonZeroU32;

use crate::EventId;
use crate::limits::{FEED_NAME_BYTES_MAX, SUBJECT_BYTES_MAX};
use crate::stream::is_id_byte;

/// The name of a projection and of its feeds: `accounts`.
///
/// 1 to [`FEED_NAME_BYTES_MAX`] bytes of lowercase ASCII letters, digits and `_`, starting with a
/// letter, so that it is a URL path segment, an AMQP exchange name part and (uppercased) a NATS
/// stream name part without escaping.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FeedName(String);

/// A projection version: 1, 2, 3 …
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FeedVersion(NonZeroU32);

/// One feed: a projection name and version, written `accounts.v2` (and `/feeds/accounts/v2` in
/// the feed API).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FeedId {
    pub name: FeedName,
    pub version: FeedVersion,
}

/// The key of one integration stream within a feed (an account id).
///
/// 1 to [`SUBJECT_BYTES_MAX`] bytes of ASCII letters, digits and `-` `_` `.` `~` (the URL
/// "unreserved" set, the same as a stream id, so a stream id is always a valid subject).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subject(String);

/// The number of an integration event within its subject: 1, 2, 3 … contiguous.
/// `Sequence::START` (0) is the cursor "before the subject's first event".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sequence(pub u64);

/// The order of the integration events of one feed: 1, 2, 3 … contiguous.
/// `FeedPosition::START` (0) is the cursor "before the feed's first event".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FeedPosition(pub u64);

/// The life of a feed. New versions start `Backfilling`, become `Live` when the projector has
/// caught up with the log, and are `Retired` by an operator once no consumer reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FeedStatus {
    Backfilling,
    Live,
    Retired,
}

/// Why a feed name, version, feed id or subject was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FeedWordError {
    #[error("feed name must be 1 to {max} bytes, not {len}")]
    FeedNameLength { len: usize, max: usize },
    #[error(
        "feed name {0:?} must start with a lowercase ASCII letter and hold only lowercase ASCII letters, digits and `_`"
    )]
    FeedNameCharacters(String),
    #[error("feed version {0:?} is not `v` followed by an integer from 1 to {max}", max = u32::MAX)]
    FeedVersion(String),
    #[error("feed {0:?} is not `name.vN` (e.g. `accounts.v2`)")]
    FeedId(String),
    #[error("subject must be 1 to {max} bytes, not {len}")]
    SubjectLength { len: usize, max: usize },
    #[error("subject {0:?} may hold only ASCII letters, digits and `-` `_` `.` `~`")]
    SubjectCharacters(String),
    #[error("feed status {0:?} is not `backfilling`, `live` or `retired`")]
    FeedStatus(String),
}

impl FeedName {
    pub fn new(name: impl Into<String>) -> Result<FeedName, FeedWordError> {
        let name = name.into();
        if name.is_empty() || name.len() > FEED_NAME_BYTES_MAX {
            return Err(FeedWordError::FeedNameLength {
                len: name.len(),
                max: FEED_NAME_BYTES_MAX,
            });
        }
        let ok = name.as_bytes()[0].is_ascii_lowercase()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !ok {
            return Err(FeedWordError::FeedNameCharacters(name));
        }
        Ok(FeedName(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FeedVersion {
    /// The first version of every projection.
    pub const FIRST: FeedVersion = FeedVersion(NonZeroU32::MIN);

    /// `None` for 0.
    pub const fn new(version: u32) -> Option<FeedVersion> {
        match NonZeroU32::new(version) {
            Some(version) => Some(FeedVersion(version)),
            None => None,
        }
    }

    pub const fn get(self) -> u32 {
        self.0.get()
    }

    /// Parses `v2` (the form in feed ids and URLs). No sign, no leading zeros beyond `v0…`
    /// refusal, no whitespace.
    pub fn parse(text: &str) -> Result<FeedVersion, FeedWordError> {
        let refuse = || FeedWordError::FeedVersion(truncate(text));
        let digits = text.strip_prefix('v').ok_or_else(refuse)?;
        if digits.is_empty() || digits.len() > 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(refuse());
        }
        if digits.starts_with('0') {
            return Err(refuse());
        }
        let number: u32 = digits.parse().map_err(|_| refuse())?;
        FeedVersion::new(number).ok_or_else(refuse)
    }
}

impl FeedId {
    pub fn new(name: FeedName, version: FeedVersion) -> FeedId {
        FeedId { name, version }
    }

    /// Parses `accounts.v2`.
    pub fn parse(text: &str) -> Result<FeedId, FeedWordError> {
        let (name, version) = text
            .rsplit_once('.')
            .ok_or_else(|| FeedWordError::FeedId(truncate(text)))?;
        Ok(FeedId {
            name: FeedName::new(name)?,
            version: FeedVersion::parse(version)?,
        })
    }
}

impl Subject {
    pub fn new(subject: impl Into<String>) -> Result<Subject, FeedWordError> {
        let subject = subject.into();
        if subject.is_empty() || subject.len() > SUBJECT_BYTES_MAX {
            return Err(FeedWordError::SubjectLength {
                len: subject.len(),
                max: SUBJECT_BYTES_MAX,
            });
        }
        if !subject.bytes().all(is_id_byte) {
            return Err(FeedWordError::SubjectCharacters(subject));
        }
        Ok(Subject(subject))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Sequence {
    /// Before the subject's first event.
    pub const START: Sequence = Sequence(0);

    pub const fn get(self) -> u64 {
        self.0
    }

    /// The next sequence. Panics on overflow, which 2^64 events cannot reach.
    #[must_use]
    pub fn next(self) -> Sequence {
        Sequence(self.0.checked_add(1).expect("sequence overflow"))
    }
}

impl FeedPosition {
    /// Before the feed's first event.
    pub const START: FeedPosition = FeedPosition(0);

    pub const fn get(self) -> u64 {
        self.0
    }

    /// The next feed position. Panics on overflow, which 2^64 events cannot reach.
    #[must_use]
    pub fn next(self) -> FeedPosition {
        FeedPosition(self.0.checked_add(1).expect("feed position overflow"))
    }
}

impl FeedStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            FeedStatus::Backfilling => "backfilling",
            FeedStatus::Live => "live",
            FeedStatus::Retired => "retired",
        }
    }

    pub fn parse(text: &str) -> Result<FeedStatus, FeedWordError> {
        match text {
            "backfilling" => Ok(FeedStatus::Backfilling),
            "live" => Ok(FeedStatus::Live),
            "retired" => Ok(FeedStatus::Retired),
            other => Err(FeedWordError::FeedStatus(truncate(other))),
        }
    }
}

/// The namespace of integration event ids (UUID v5). Never change it: consumers recognise
/// redelivered events by these ids.
pub const INTEGRATION_EVENT_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6a1e_5f0e_3c41_4d8e_9b57_2f0c_8e11_d4a3);

/// The id of the `index`-th (from 0) integration event that projection `feed` makes of the
/// internal event `source` (G5): the same log always yields the same ids, so a redelivered event
/// is recognisable, and two versions of one projection never share an id.
pub fn integration_event_id(source: EventId, feed: &FeedId, index: u32) -> EventId {
    let mut name = Vec::with_capacity(16 + feed.name.as_str().len() + 8);
    name.extend_from_slice(source.as_bytes());
    name.extend_from_slice(&feed.version.get().to_be_bytes());
    name.extend_from_slice(&index.to_be_bytes());
    name.extend_from_slice(feed.name.as_str().as_bytes());
    EventId::derived(&INTEGRATION_EVENT_ID_NAMESPACE, &name)
}

/// Error messages quote at most this much of a refused input.
const QUOTED_BYTES_MAX: usize = 80;

fn truncate(text: &str) -> String {
    if text.len() <= QUOTED_BYTES_MAX {
        return text.to_owned();
    }
    let mut end = QUOTED_BYTES_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

macro_rules! display_as_str {
    ($($ty:ty),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($ty), self.as_str())
            }
        }
        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }
    )*};
}
display_as_str!(FeedName, Subject);

impl fmt::Display for FeedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

impl fmt::Display for FeedId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.version)
    }
}

impl fmt::Debug for FeedId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FeedId({self})")
    }
}

impl fmt::Display for FeedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Sequence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Display for FeedPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::str::FromStr for FeedId {
    type Err = FeedWordError;

    fn from_str(s: &str) -> Result<FeedId, FeedWordError> {
        FeedId::parse(s)
    }
}

impl std::str::FromStr for Subject {
    type Err = FeedWordError;

    fn from_str(s: &str) -> Result<Subject, FeedWordError> {
        Subject::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feed_ids_round_trip() {
        for text in ["accounts.v1", "accounts.v2", "a.v4294967295", "bank_2.v10"] {
            let feed = FeedId::parse(text).unwrap();
            assert_eq!(feed.to_string(), text);
        }
        let feed = FeedId::parse("accounts.v2").unwrap();
        assert_eq!(feed.name.as_str(), "accounts");
        assert_eq!(feed.version.get(), 2);
    }

    #[test]
    fn bad_feed_ids_are_refused() {
        for text in [
            "",
            "accounts",
            "accounts.",
            "accounts.2",
            "accounts.v",
            "accounts.v0",
            "accounts.v01",
            "accounts.v+1",
            "accounts.v-1",
            "accounts.v4294967296",
            "accounts.v99999999999",
            "Accounts.v1",
            "1accounts.v1",
            "acc-ounts.v1",
            ".v1",
            "accounts.v1 ",
            "accounts.V1",
        ] {
            assert!(FeedId::parse(text).is_err(), "{text:?} was accepted");
        }
        let long = format!("{}.v1", "a".repeat(FEED_NAME_BYTES_MAX + 1));
        assert!(FeedId::parse(&long).is_err());
    }

    #[test]
    fn subjects() {
        for text in ["42", "a-b_c.d~e", &"x".repeat(SUBJECT_BYTES_MAX)] {
            assert_eq!(Subject::new(text).unwrap().as_str(), text);
        }
        for text in [
            "",
            "a b",
            "a/b",
            "é",
            "a\0",
            "%2F",
            &"x".repeat(SUBJECT_BYTES_MAX + 1),
        ] {
            assert!(Subject::new(text).is_err(), "{text:?} was accepted");
        }
    }

    #[test]
    fn statuses_round_trip() {
        for status in [
            FeedStatus::Backfilling,
            FeedStatus::Live,
            FeedStatus::Retired,
        ] {
            assert_eq!(FeedStatus::parse(status.as_str()), Ok(status));
        }
        assert!(FeedStatus::parse("LIVE").is_err());
    }

    #[test]
    fn error_messages_quote_a_bounded_input() {
        let huge = "é".repeat(10_000);
        let message = FeedId::parse(&huge).unwrap_err().to_string();
        assert!(message.len() < 300, "{message}");
    }

    #[test]
    fn integration_event_ids_are_derived_and_distinct() {
        let source = EventId::from_uuid(uuid::Uuid::from_u128(7));
        let v1 = FeedId::parse("accounts.v1").unwrap();
        let v2 = FeedId::parse("accounts.v2").unwrap();
        let id = integration_event_id(source, &v1, 0);
        assert_eq!(id, integration_event_id(source, &v1, 0));
        assert_ne!(id, integration_event_id(source, &v1, 1));
        assert_ne!(id, integration_event_id(source, &v2, 0));
        assert_ne!(
            id,
            integration_event_id(EventId::from_uuid(uuid::Uuid::from_u128(8)), &v1, 0)
        );
        // Pinned: a change of derivation would make every consumer see redelivered events as new.
        assert_eq!(id.to_string(), PINNED_ID);
    }

    const PINNED_ID: &str = "e7b23afc-d543-584c-acf0-5990b9e4e014";

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(text in "\\PC{0,80}") {
            if let Ok(feed) = FeedId::parse(&text) {
                proptest::prop_assert_eq!(feed.to_string(), text.clone());
            }
            if let Ok(subject) = Subject::new(text.clone()) {
                proptest::prop_assert_eq!(subject.as_str(), text.as_str());
            }
        }
    }
}
