use std::time::Duration;

use async_trait::async_trait;
use headwater_core::limits::READ_PAGE_EVENTS_MAX;
use headwater_core::{
    EventId, ExpectedVersion, NewEvent, Position, RecordedEvent, StreamName, StreamVersion,
};
use tokio::sync::watch;

use crate::error::{AppendError, ReadError};

/// What an append recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendOutcome {
    /// The version of the stream's last event after the append (the last appended event).
    pub stream_version: StreamVersion,
    /// The position of the first appended event.
    pub first_position: Position,
    /// The position of the last appended event.
    pub last_position: Position,
    /// `true` when the events were already recorded by an earlier identical append: this is that
    /// append's result, and nothing was written now (G3).
    pub replayed: bool,
}

/// An event store: the only way a service changes its state.
///
/// Every backend passes the conformance suite (`headwater_store::conformance`, feature
/// `conformance`) unchanged. The guarantees it pins:
///
/// - **G1** an append of N events to one stream becomes visible whole or not at all; once it
///   returns `Ok` it is durable (for durable backends: see each backend's `# Durability`).
/// - **G2** the expected version is checked atomically with the write; a mismatch is
///   [`AppendError::Conflict`] and writes nothing.
/// - **G3** appending events whose ids are already recorded, as that same append at that place in
///   the stream, returns the original [`AppendOutcome`] (with `replayed`) and writes nothing.
/// - **G4** positions are 1, 2, 3 … without gaps, in commit order: a reader of positions never
///   misses an event that becomes visible later.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` to `stream` if it is at `expected`.
    ///
    /// # Durability
    /// On `Ok`, the events are visible to every reader of this store and durable as the backend
    /// documents it.
    ///
    /// # Cancel safety
    /// Dropping the future after it was first polled may still append the events: the caller then
    /// does not know. Retrying the same append (same event ids) tells it, without duplicating
    /// anything (G3).
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, AppendError>;

    /// The events of `stream` with versions after `after`, in version order, at most `limit` of
    /// them (1 ..= [`READ_PAGE_EVENTS_MAX`]); fewer when the page reaches
    /// `limits::READ_PAGE_BYTES_MAX`. An empty page means there is nothing after `after` (an
    /// unknown stream gives an empty page).
    ///
    /// # Cancel safety
    /// Cancel safe: reads change nothing.
    async fn read_stream(
        &self,
        stream: &StreamName,
        after: StreamVersion,
        limit: u64,
    ) -> Result<Vec<RecordedEvent>, ReadError>;

    /// The events of the whole store with positions after `after`, in position order, at most
    /// `limit` of them (1 ..= [`READ_PAGE_EVENTS_MAX`]); fewer when the page reaches
    /// `limits::READ_PAGE_BYTES_MAX`.
    ///
    /// # Cancel safety
    /// Cancel safe: reads change nothing.
    async fn read_all(&self, after: Position, limit: u64) -> Result<Vec<RecordedEvent>, ReadError>;

    /// The version of the stream's last event, `None` when the stream has none.
    async fn stream_head(&self, stream: &StreamName) -> Result<Option<StreamVersion>, ReadError>;

    /// The recorded event with this id, if any.
    async fn find_event(&self, event_id: EventId) -> Result<Option<RecordedEvent>, ReadError>;

    /// The position of the last event this handle knows to be committed (`Position::START` for
    /// an empty store).
    fn head_position(&self) -> Position;

    /// A watch of [`EventStore::head_position`]: followers wait on it for new events instead of
    /// polling.
    fn watch_head(&self) -> watch::Receiver<Position>;
}

/// Checks a read's page limit.
pub fn validate_limit(limit: u64) -> Result<u64, ReadError> {
    if limit == 0 || limit > READ_PAGE_EVENTS_MAX {
        return Err(ReadError::Invalid(format!(
            "page limit {limit} is outside 1..={READ_PAGE_EVENTS_MAX}"
        )));
    }
    Ok(limit)
}

/// Waits until the store's head is past `after`, or `timeout` passes. Returns the head then.
///
/// # Cancel safety
/// Cancel safe.
pub async fn wait_for_position<S: EventStore + ?Sized>(
    store: &S,
    after: Position,
    timeout: Duration,
) -> Position {
    let mut watch = store.watch_head();
    let wait = watch.wait_for(|head| *head > after);
    match tokio::time::timeout(timeout, wait).await {
        Ok(Ok(head)) => *head,
        // Timed out, or the store was dropped: report what is known.
        Ok(Err(_)) | Err(_) => store.head_position(),
    }
}

/// Reads every event after `after`, page by page, handing each page to `visit`. For tools and
/// tests; followers read page by page themselves so they can checkpoint.
pub async fn read_all_pages<S, F>(
    store: &S,
    after: Position,
    page: u64,
    mut visit: F,
) -> Result<Position, ReadError>
where
    S: EventStore + ?Sized,
    F: FnMut(&[RecordedEvent]) + Send,
{
    let mut cursor = after;
    loop {
        let events = store.read_all(cursor, page).await?;
        let Some(last) = events.last() else {
            return Ok(cursor);
        };
        cursor = last.position;
        visit(&events);
    }
}
