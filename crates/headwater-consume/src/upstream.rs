//! What a consumer asks its producer: the feed API's per-subject endpoints.

use std::time::Duration;

use async_trait::async_trait;
use headwater_core::{FeedId, FeedStatus, Sequence, Subject};

use crate::IntegrationEvent;

/// The head of one subject at the producer: its last sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectHead {
    pub subject: Subject,
    pub sequence: Sequence,
}

/// Why the producer could not answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The producer is unreachable, timed out or failed (5xx): worth retrying later.
    #[error("the producer is unavailable: {0}")]
    Unavailable(String),
    /// The producer refused the request (a bad token, an unknown or retired feed, a bad
    /// parameter): retrying the same request will not help. The [`Refusal`] holds the
    /// producer's problem in structured form — a retired feed names its successor.
    #[error("the producer refused: {0}")]
    Refused(Box<Refusal>),
    /// The producer answered something that is not a page of integration events.
    #[error("the producer's answer is not understood: {0}")]
    Malformed(String),
}

impl UpstreamError {
    /// Whether asking again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, UpstreamError::Unavailable(_))
    }

    /// The refusal, when the producer refused.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            UpstreamError::Refused(refusal) => Some(&**refusal),
            _ => None,
        }
    }

    /// The feed that replaces the one asked for, when the producer refused because that one is
    /// retired (410 with a `successor`).
    pub fn successor(&self) -> Option<&FeedId> {
        self.refusal().and_then(|r| r.successor.as_ref())
    }
}

/// The problem type of a retired feed (`410 Gone`), after `https://headwater.dev/problems/`.
pub const PROBLEM_FEED_RETIRED: &str = "feed-retired";

/// Why the producer refused, as its RFC 9457 problem said it (every text part bounded, control
/// characters replaced, the token never quoted), so that a consumer — or its operator — can act
/// on it: a `410` with a `successor` says which feed to move to (G10).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Refusal {
    /// The HTTP status (401, 403, 404, 410, 400 …); `None` when the request was refused before
    /// it was sent (a URL that cannot be made).
    pub status: Option<u16>,
    /// The problem's `type` (`https://headwater.dev/problems/feed-retired`), when the answer was
    /// a problem.
    pub problem_type: Option<String>,
    /// The problem's `title` and `detail`.
    pub title: Option<String>,
    pub detail: Option<String>,
    /// For a retired feed: the newest version of the same projection still served
    /// (`accounts.v2`), when the producer named one that is a valid feed id.
    pub successor: Option<FeedId>,
    /// The whole story for people: the request, the status and the problem's parts.
    pub message: String,
}

impl Refusal {
    /// A refusal known only by its message (no status, no problem).
    pub fn new(message: impl Into<String>) -> Refusal {
        Refusal {
            status: None,
            problem_type: None,
            title: None,
            detail: None,
            successor: None,
            message: message.into(),
        }
    }

    /// Whether the feed asked for is retired (status 410 or the problem type `feed-retired`).
    pub fn is_retired(&self) -> bool {
        self.status == Some(410)
            || self
                .problem_type
                .as_deref()
                .is_some_and(|t| t.rsplit('/').next() == Some(PROBLEM_FEED_RETIRED))
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<Refusal> for UpstreamError {
    fn from(refusal: Refusal) -> UpstreamError {
        UpstreamError::Refused(Box::new(refusal))
    }
}

/// One feed as the producer lists it (`GET /feeds`): whether a new version is live yet, how far
/// its head is, and who reads it (G10).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FeedListing {
    pub feed: FeedId,
    pub status: FeedStatus,
    /// The feed's last position.
    pub head: u64,
    /// Who read the feed, by token name (as recorded by the producer, a few seconds late).
    pub readers: Vec<FeedReader>,
}

/// A reader of a feed as the producer records it: its token's name, how many reads, when last.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FeedReader {
    /// The token's name (`statements`).
    pub reader: String,
    pub reads: u64,
    /// RFC 3339, by the producer's clock.
    pub last_read_at: String,
}

/// The producer's feed, as a consumer reads it (implemented over HTTP by the feed API client;
/// by [`crate::MemoryUpstream`] in tests).
#[async_trait]
pub trait Upstream: Send + Sync + 'static {
    /// The events of `subject` after sequence `after`, in sequence order, at most `limit`
    /// (`GET /feeds/{name}/v{version}/subjects/{subject}?after=&limit=`). Empty: nothing after.
    async fn read_subject(
        &self,
        feed: &FeedId,
        subject: &Subject,
        after: Sequence,
        limit: u64,
    ) -> Result<Vec<IntegrationEvent>, UpstreamError>;

    /// The heads of the feed's subjects after `after` (all when `None`), in byte order of the
    /// subject, at most `limit` (`GET /feeds/{name}/v{version}/subjects?after=&limit=`).
    async fn subjects(
        &self,
        feed: &FeedId,
        after: Option<&Subject>,
        limit: u64,
    ) -> Result<Vec<SubjectHead>, UpstreamError>;

    /// The feed's events after position `after`, at most `limit`, waiting up to `wait` for the
    /// first one when there is none yet (long polling: `GET /feeds/{name}/v{version}?after=
    /// &limit=&timeout_ms=`).
    async fn read_feed(
        &self,
        feed: &FeedId,
        after: u64,
        limit: u64,
        wait: Duration,
    ) -> Result<Vec<IntegrationEvent>, UpstreamError>;

    // --- The producer's feed listing (the v1 → v2 switch, G10) ---

    /// The feed as the producer lists it (`GET /feeds`): its status and head. `None` when the
    /// producer does not list it, or this upstream cannot list feeds (the default): the switch
    /// then neither waits for the feed to be live nor starts following it at its head.
    ///
    /// # Errors
    /// As the other calls.
    ///
    /// # Cancel safety
    /// Cancel safe (a read).
    async fn feed_listing(&self, feed: &FeedId) -> Result<Option<FeedListing>, UpstreamError> {
        let _ = feed;
        Ok(None)
    }
}
