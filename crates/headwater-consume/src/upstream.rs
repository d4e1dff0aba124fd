//! What a consumer asks its producer: the feed API's per-subject endpoints.

use std::time::Duration;

use async_trait::async_trait;
use headwater_core::{FeedId, Sequence, Subject};

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
    /// parameter): retrying the same request will not help.
    #[error("the producer refused: {0}")]
    Refused(String),
    /// The producer answered something that is not a page of integration events.
    #[error("the producer's answer is not understood: {0}")]
    Malformed(String),
}

impl UpstreamError {
    /// Whether asking again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, UpstreamError::Unavailable(_))
    }
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
}
