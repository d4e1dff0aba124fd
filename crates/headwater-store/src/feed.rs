//! The feed store interface ([`FeedStore`]): where a producer keeps its integration feeds, their
//! projector cursors and who reads them.
//!
//! A **feed** is all integration events of one projection version (`accounts.v2`), numbered by
//! feed position 1, 2, 3 …; within a feed each **subject** numbers its events by **sequence**
//! 1, 2, 3 … The projector (crate `headwater-feed`) reads the internal log and hands the store
//! one [`ProjectorBatch`] at a time; the store numbers the batch's events and moves the feed's
//! cursor in one transaction, so a feed is always exactly the projection of the internal log up to
//! its cursor: no hole, no duplicate, whatever crashes.

use std::time::Duration;

use async_trait::async_trait;
use headwater_core::limits::{FEED_PAGE_EVENTS_MAX, SUBJECT_PAGE_MAX};
use headwater_core::{
    ErrorKind, EventId, EventType, FeedId, FeedPosition, FeedStatus, Position, Sequence, Subject,
    Timestamp,
};
use tokio::sync::watch;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The most integration events one [`FeedStore::commit`] takes.
pub const COMMIT_EVENTS_MAX: usize = 50_000;

/// An integration event as a projection made it, before the feed numbers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectedEvent {
    /// Derived from the source event (G5): `headwater_core::integration_event_id`.
    pub id: EventId,
    /// The CloudEvents `type`, e.g. `accounts.deposited`.
    pub event_type: EventType,
    pub subject: Subject,
    /// The source event's `recorded_at` (never a clock read, so a rebuild is byte-identical).
    pub time: Timestamp,
    /// The CloudEvents `data`: a serialized JSON value, at most
    /// `limits::INTEGRATION_DATA_BYTES_MAX` bytes.
    pub data: Vec<u8>,
    /// The position of the internal event this was made of.
    pub source_position: Position,
}

/// An integration event in a feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedEvent {
    pub position: FeedPosition,
    pub sequence: Sequence,
    pub id: EventId,
    pub event_type: EventType,
    pub subject: Subject,
    pub time: Timestamp,
    pub data: Vec<u8>,
    pub source_position: Position,
}

/// The head of one subject: its last sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectHead {
    pub subject: Subject,
    pub sequence: Sequence,
}

/// What the store knows of one feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedState {
    pub feed: FeedId,
    pub status: FeedStatus,
    /// The feed's last position (`FeedPosition::START` when empty).
    pub head: FeedPosition,
    /// The projector's cursor: the last internal position the feed includes.
    pub cursor: Position,
    pub registered_at: Timestamp,
    /// When the feed first became live.
    pub live_at: Option<Timestamp>,
}

/// One step of a projector: the integration events made of the internal events at positions
/// `from + 1 ..= to`, in log order, and the cursor to move from `from` to `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectorBatch {
    /// The feed's cursor the projector started from; the commit is refused if it moved.
    pub from: Position,
    /// The cursor after this batch (≥ `from`).
    pub to: Position,
    /// In log order; every `source_position` in `from + 1 ..= to`. May be empty (the internal
    /// events made nothing), the cursor still moves.
    pub events: Vec<ProjectedEvent>,
}

/// What a commit recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeedCommit {
    /// The feed's head after the commit.
    pub head: FeedPosition,
    /// The feed's cursor after the commit (the batch's `to`).
    pub cursor: Position,
}

/// A reader of a feed seen by the feed API: the name of the token it used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReaderSeen {
    pub feed: FeedId,
    /// The token's name (never the token).
    pub reader: String,
    pub at: Timestamp,
    /// Requests counted since the last record.
    pub reads: u64,
}

/// Who read a feed, and when last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedReader {
    pub reader: String,
    pub first_read_at: Timestamp,
    pub last_read_at: Timestamp,
    pub reads: u64,
}

/// How far one publisher of a feed got: every event up to `position` was confirmed by its broker
/// (G6). A feed may have several publishers (one per destination), each with its own cursor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublisherCursor {
    /// The publisher's name (`rabbitmq`, `nats`): 1 ..= `limits::PUBLISHER_NAME_BYTES_MAX` bytes
    /// of `[a-z0-9_-]`.
    pub publisher: String,
    /// The last feed position the broker confirmed, with every position before it.
    pub position: FeedPosition,
    /// When the cursor last moved (the store's clock).
    pub updated_at: Timestamp,
}

/// How far one publisher is behind its feed: [`publisher_lag`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublisherLag {
    /// `head − cursor`: the feed's events its broker has not confirmed yet.
    pub positions: u64,
    /// How long ago the oldest of them happened: `now −` the `time` of the event at `cursor + 1`
    /// (zero when caught up, or when that time is after `now`).
    pub behind: Duration,
}

/// Why a feed store operation failed. In every case nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FeedError {
    /// The arguments break a limit or a rule (a page limit out of range, a batch whose events are
    /// out of its range or order, oversized data).
    #[error("invalid feed operation: {0}")]
    Invalid(String),
    /// No such feed is registered.
    #[error("no feed {0}")]
    UnknownFeed(FeedId),
    /// The feed's cursor is not where the batch started: another projector moved it. The
    /// projector that gets this must stop (it lost its leadership) or reload the cursor.
    #[error("feed {feed}: the projector cursor is at {actual}, not {expected}")]
    CursorMoved {
        feed: FeedId,
        expected: Position,
        actual: Position,
    },
    /// A publisher's cursor is not where the caller said it was: another publisher of the same
    /// name moved it (a replica that lost its leadership, a second process).
    #[error("feed {feed}: publisher {publisher}'s cursor is at {actual}, not {expected}")]
    PublisherMoved {
        feed: FeedId,
        publisher: String,
        expected: FeedPosition,
        actual: FeedPosition,
    },
    /// Stored data failed its integrity check. It is reported, never served (G11).
    #[error("feed {feed} is corrupt: {detail}")]
    Corrupt { feed: FeedId, detail: String },
    /// The store is closed.
    #[error("the feed store is closed")]
    Closed,
    /// The backend failed.
    #[error("the feed store failed: {0}")]
    Backend(#[source] BoxError),
}

impl FeedError {
    pub fn backend(error: impl Into<BoxError>) -> FeedError {
        FeedError::Backend(error.into())
    }

    /// What the caller should do next.
    pub fn kind(&self) -> ErrorKind {
        match self {
            FeedError::Invalid(_) | FeedError::UnknownFeed(_) => ErrorKind::BadRequest,
            FeedError::CursorMoved { .. } | FeedError::PublisherMoved { .. } => ErrorKind::Conflict,
            FeedError::Corrupt { .. } | FeedError::Closed => ErrorKind::Unavailable,
            FeedError::Backend(_) => ErrorKind::Internal,
        }
    }
}

/// A producer's feeds. Every backend passes the feed conformance suite
/// (`headwater_store::conformance`, feature `conformance`) unchanged.
///
/// The guarantees it pins:
/// - a [`FeedStore::commit`] is atomic: the batch's events and the cursor move together, or
///   nothing is written; a commit from a stale cursor is [`FeedError::CursorMoved`];
/// - feed positions are 1, 2, 3 … without gaps, in commit order; per subject, sequences are
///   1, 2, 3 … without gaps, in feed order;
/// - the numbering depends only on the batches' contents, so the same batches give byte-identical
///   feeds (G5).
#[async_trait]
pub trait FeedStore: Send + Sync + 'static {
    /// Registers `feed` if it is new (status `Backfilling`, empty, cursor at `Position::START`)
    /// and returns its state. Registering a known feed changes nothing.
    async fn register(&self, feed: &FeedId) -> Result<FeedState, FeedError>;

    /// Every registered feed, ordered by name then version.
    async fn feeds(&self) -> Result<Vec<FeedState>, FeedError>;

    /// One feed's state, `None` if it is not registered.
    async fn feed(&self, feed: &FeedId) -> Result<Option<FeedState>, FeedError>;

    /// Sets a feed's status (and `live_at`, the first time it becomes `Live`).
    async fn set_status(&self, feed: &FeedId, status: FeedStatus) -> Result<FeedState, FeedError>;

    /// Appends the batch's events to the feed, numbering them, and moves its cursor from
    /// `batch.from` to `batch.to`, in one transaction.
    ///
    /// # Durability
    /// On `Ok`, the events and the cursor are durable as the backend documents it, and visible to
    /// every reader.
    ///
    /// # Cancel safety
    /// Dropping the future after it was first polled may still commit the batch; the next commit
    /// from the same `from` then fails with [`FeedError::CursorMoved`] and the projector reloads.
    async fn commit(&self, feed: &FeedId, batch: ProjectorBatch) -> Result<FeedCommit, FeedError>;

    /// The events after feed position `after`, in order, at most `limit` (1 ..=
    /// [`FEED_PAGE_EVENTS_MAX`]); fewer when the page's data reaches
    /// `limits::READ_PAGE_BYTES_MAX`. Empty: nothing after `after`.
    async fn read_feed(
        &self,
        feed: &FeedId,
        after: FeedPosition,
        limit: u64,
    ) -> Result<Vec<FeedEvent>, FeedError>;

    /// The heads of the feed's subjects after `after` (all when `None`), in byte order of the
    /// subject, at most `limit` (1 ..= [`SUBJECT_PAGE_MAX`]).
    async fn subjects(
        &self,
        feed: &FeedId,
        after: Option<&Subject>,
        limit: u64,
    ) -> Result<Vec<SubjectHead>, FeedError>;

    /// The events of one subject after `after`, in sequence order, at most `limit` (1 ..=
    /// [`FEED_PAGE_EVENTS_MAX`]); an unknown subject gives an empty page.
    async fn read_subject(
        &self,
        feed: &FeedId,
        subject: &Subject,
        after: Sequence,
        limit: u64,
    ) -> Result<Vec<FeedEvent>, FeedError>;

    /// A watch of the feed's head, for long polling: it changes whenever the feed grows, also when
    /// another process (another replica) committed. For a feed that is not registered yet the
    /// watch starts at `FeedPosition::START` and moves once it is.
    fn watch_head(&self, feed: &FeedId) -> watch::Receiver<FeedPosition>;

    /// Records that these readers read these feeds (the feed API batches them). Unknown feeds are
    /// ignored.
    async fn record_readers(&self, seen: Vec<ReaderSeen>) -> Result<(), FeedError>;

    /// Who read the feed, by reader name.
    async fn readers(&self, feed: &FeedId) -> Result<Vec<FeedReader>, FeedError>;

    /// Moves the cursor of `publisher` of `feed` from `from` to `to`: the broker confirmed every
    /// event up to `to`. A publisher without a cursor is at `FeedPosition::START`; its first
    /// advance creates it. Moving to where it is (`to == from`) only stamps `updated_at`.
    ///
    /// # Errors
    /// [`FeedError::UnknownFeed`]; [`FeedError::Invalid`] for a publisher name that breaks
    /// [`validate_publisher_name`], `to < from`, or `to` past the feed's head;
    /// [`FeedError::PublisherMoved`] when the cursor is not at `from` (nothing is written).
    ///
    /// # Durability
    /// As a commit. Losing the last advance in a crash is harmless (the publisher publishes those
    /// events again: at least once), but a cursor never moves back once read.
    ///
    /// # Cancel safety
    /// Dropping the future after it was first polled may still move the cursor; the next advance
    /// from the old `from` then fails with [`FeedError::PublisherMoved`] and the publisher
    /// reloads.
    async fn advance_publisher(
        &self,
        feed: &FeedId,
        publisher: &str,
        from: FeedPosition,
        to: FeedPosition,
    ) -> Result<PublisherCursor, FeedError>;

    /// The cursors of the feed's publishers, by name (none until a first advance).
    async fn publishers(&self, feed: &FeedId) -> Result<Vec<PublisherCursor>, FeedError>;
}

/// Checks a publisher's name: 1 ..= `limits::PUBLISHER_NAME_BYTES_MAX` bytes of `[a-z0-9_-]`.
pub fn validate_publisher_name(name: &str) -> Result<&str, FeedError> {
    let max = headwater_core::limits::PUBLISHER_NAME_BYTES_MAX;
    if name.is_empty() || name.len() > max {
        return Err(FeedError::Invalid(format!(
            "a publisher name is 1 to {max} bytes, not {}",
            name.len()
        )));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err(FeedError::Invalid(format!(
            "a publisher name is made of a-z, 0-9, '_' and '-': {name:?}"
        )));
    }
    Ok(name)
}

/// Checks an advance of a publisher's cursor against the feed's head, before the compare-and-set.
pub fn validate_publisher_advance(
    feed: &FeedId,
    publisher: &str,
    from: FeedPosition,
    to: FeedPosition,
    head: FeedPosition,
) -> Result<(), FeedError> {
    validate_publisher_name(publisher)?;
    if to < from {
        return Err(FeedError::Invalid(format!(
            "feed {feed}: publisher {publisher}'s cursor cannot move back from {from} to {to}"
        )));
    }
    if to > head {
        return Err(FeedError::Invalid(format!(
            "feed {feed}: publisher {publisher}'s cursor cannot move to {to}, past the head {head}"
        )));
    }
    Ok(())
}

/// Checks a feed read's page limit.
pub fn validate_feed_limit(limit: u64) -> Result<u64, FeedError> {
    if limit == 0 || limit > FEED_PAGE_EVENTS_MAX {
        return Err(FeedError::Invalid(format!(
            "page limit {limit} is outside 1..={FEED_PAGE_EVENTS_MAX}"
        )));
    }
    Ok(limit)
}

/// Checks a subject listing's page limit.
pub fn validate_subject_limit(limit: u64) -> Result<u64, FeedError> {
    if limit == 0 || limit > SUBJECT_PAGE_MAX {
        return Err(FeedError::Invalid(format!(
            "page limit {limit} is outside 1..={SUBJECT_PAGE_MAX}"
        )));
    }
    Ok(limit)
}

/// Checks a batch before anything is written: range, order, sizes. Every backend calls it first.
pub fn validate_batch(batch: &ProjectorBatch) -> Result<(), FeedError> {
    use headwater_core::limits::INTEGRATION_DATA_BYTES_MAX;
    if batch.to < batch.from {
        return Err(FeedError::Invalid(format!(
            "batch moves the cursor backwards, from {} to {}",
            batch.from, batch.to
        )));
    }
    if batch.events.len() > COMMIT_EVENTS_MAX {
        return Err(FeedError::Invalid(format!(
            "batch holds {} events, more than {COMMIT_EVENTS_MAX}",
            batch.events.len()
        )));
    }
    let mut previous = batch.from;
    for event in &batch.events {
        let source = event.source_position;
        if source <= batch.from || source > batch.to || source < previous {
            return Err(FeedError::Invalid(format!(
                "event {} has source position {source}, outside {}..={} or out of order",
                event.id,
                batch.from.next(),
                batch.to
            )));
        }
        previous = source;
        if event.data.len() > INTEGRATION_DATA_BYTES_MAX {
            return Err(FeedError::Invalid(format!(
                "event {} has {} bytes of data, more than {INTEGRATION_DATA_BYTES_MAX}",
                event.id,
                event.data.len()
            )));
        }
    }
    Ok(())
}

/// Waits until the feed's head is past `after`, or `timeout` passes; returns the head then. The
/// feed API's long polling.
///
/// # Cancel safety
/// Cancel safe.
pub async fn wait_for_feed_position<S: FeedStore + ?Sized>(
    store: &S,
    feed: &FeedId,
    after: FeedPosition,
    timeout: Duration,
) -> FeedPosition {
    let mut watch = store.watch_head(feed);
    let wait = watch.wait_for(|head| *head > after);
    let reached = match tokio::time::timeout(timeout, wait).await {
        Ok(Ok(head)) => Some(*head),
        Ok(Err(_)) | Err(_) => None,
    };
    reached.unwrap_or_else(|| *watch.borrow())
}

/// How far a publisher whose cursor is at `cursor` is behind `feed`, whose head is `head`, at
/// `now`: one read of the event at `cursor + 1` when it is behind, none when it is caught up.
///
/// # Cancel safety
/// Cancel safe (a read).
pub async fn publisher_lag<S: FeedStore + ?Sized>(
    store: &S,
    feed: &FeedId,
    head: FeedPosition,
    cursor: FeedPosition,
    now: Timestamp,
) -> Result<PublisherLag, FeedError> {
    let positions = head.get().saturating_sub(cursor.get());
    if positions == 0 {
        return Ok(PublisherLag {
            positions,
            behind: Duration::ZERO,
        });
    }
    let next = store.read_feed(feed, cursor, 1).await?;
    let behind = next.first().map_or(Duration::ZERO, |event| {
        Duration::from_micros(now.unix_micros().saturating_sub(event.time.unix_micros()))
    });
    Ok(PublisherLag { positions, behind })
}
