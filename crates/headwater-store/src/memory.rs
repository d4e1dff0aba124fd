//! The in-memory reference backend: the simplest correct [`EventStore`], for tests and examples.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use headwater_core::limits::READ_PAGE_BYTES_MAX;
use headwater_core::{
    EventId, ExpectedVersion, Metadata, NewEvent, Position, RecordedEvent, StreamName,
    StreamVersion, Timestamp, validate_append,
};
use tokio::sync::watch;

use crate::error::{AppendError, ReadError};
use crate::store::{AppendOutcome, EventStore, validate_limit};

/// An [`EventStore`] in memory. Clones share the same events.
///
/// # Durability
/// None: the events live as long as the last clone.
#[derive(Clone, Debug)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    head: watch::Sender<Position>,
}

#[derive(Debug, Default)]
struct State {
    /// Every event; the event at index `i` has position `i + 1`.
    log: Vec<RecordedEvent>,
    /// Per stream, the log indexes of its events; the event at index `v - 1` has version `v`.
    streams: HashMap<StreamName, Vec<usize>>,
    /// Every recorded event id and its log index.
    ids: HashMap<EventId, usize>,
}

impl Default for MemoryStore {
    fn default() -> MemoryStore {
        MemoryStore::new()
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        let (head, _) = watch::channel(Position::START);
        MemoryStore {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                head,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` half-updated: `append` mutates it
        // only after every check passed, with infallible pushes.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub(crate) fn now() -> Timestamp {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    Timestamp::from_unix_micros(u64::try_from(micros).unwrap_or(u64::MAX))
}

impl State {
    fn head(&self, stream: &StreamName) -> Option<StreamVersion> {
        self.streams
            .get(stream)
            .map(|events| StreamVersion(events.len() as u64))
    }

    /// G3: if `events` were recorded before by an identical append, its outcome.
    fn replay(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Option<Result<AppendOutcome, AppendError>> {
        let &first = self.ids.get(&events[0].event_id)?;
        let first = &self.log[first];
        let duplicate = || AppendError::DuplicateEventId {
            event_id: first.event_id,
            stream: first.stream.clone(),
            stream_version: first.stream_version,
        };
        if &first.stream != stream {
            return Some(Err(duplicate()));
        }
        let indexes = &self.streams[stream];
        let start = (first.stream_version.0 - 1) as usize;
        let Some(recorded) = indexes.get(start..start + events.len()) else {
            return Some(Err(duplicate()));
        };
        let same = recorded
            .iter()
            .zip(events)
            .all(|(&i, new)| self.log[i].event_id == new.event_id);
        if !same {
            return Some(Err(duplicate()));
        }
        let at_place = expected
            .first_version()
            .is_none_or(|v| v == first.stream_version);
        if !at_place {
            return Some(Err(AppendError::Conflict {
                stream: stream.clone(),
                expected,
                actual: self.head(stream),
            }));
        }
        let last = &self.log[*recorded.last().expect("events is not empty")];
        Some(Ok(AppendOutcome {
            stream_version: last.stream_version,
            first_position: first.position,
            last_position: last.position,
            replayed: true,
        }))
    }
}

#[async_trait]
impl EventStore for MemoryStore {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, AppendError> {
        validate_append(expected, &events)?;
        let mut state = self.state();
        if let Some(outcome) = state.replay(stream, expected, &events) {
            return outcome;
        }
        if let Some(&i) = events.iter().find_map(|e| state.ids.get(&e.event_id)) {
            let recorded = &state.log[i];
            return Err(AppendError::DuplicateEventId {
                event_id: recorded.event_id,
                stream: recorded.stream.clone(),
                stream_version: recorded.stream_version,
            });
        }
        let head = state.head(stream);
        if !expected.admits(head) {
            return Err(AppendError::Conflict {
                stream: stream.clone(),
                expected,
                actual: head,
            });
        }
        let recorded_at = now();
        let first_position = Position(state.log.len() as u64 + 1);
        let mut version = head.unwrap_or(StreamVersion::START);
        let State { log, streams, ids } = &mut *state;
        let indexes = streams.entry(stream.clone()).or_default();
        for event in events {
            version = version.next();
            let index = log.len();
            ids.insert(event.event_id, index);
            indexes.push(index);
            log.push(RecordedEvent {
                event_id: event.event_id,
                stream: stream.clone(),
                stream_version: version,
                position: Position(index as u64 + 1),
                event_type: event.event_type,
                data: event.data,
                metadata: Metadata {
                    correlation_id: event.correlation_id,
                    causation_id: event.causation_id,
                    recorded_at,
                    schema_version: event.schema_version,
                },
            });
        }
        let last_position = Position(log.len() as u64);
        self.inner.head.send_replace(last_position);
        Ok(AppendOutcome {
            stream_version: version,
            first_position,
            last_position,
            replayed: false,
        })
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        after: StreamVersion,
        limit: u64,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        let limit = validate_limit(limit)?;
        let state = self.state();
        let Some(indexes) = state.streams.get(stream) else {
            return Ok(Vec::new());
        };
        let start = usize::try_from(after.0)
            .unwrap_or(usize::MAX)
            .min(indexes.len());
        Ok(page(indexes[start..].iter().map(|&i| &state.log[i]), limit))
    }

    async fn read_all(&self, after: Position, limit: u64) -> Result<Vec<RecordedEvent>, ReadError> {
        let limit = validate_limit(limit)?;
        let state = self.state();
        let start = usize::try_from(after.0)
            .unwrap_or(usize::MAX)
            .min(state.log.len());
        Ok(page(state.log[start..].iter(), limit))
    }

    async fn stream_head(&self, stream: &StreamName) -> Result<Option<StreamVersion>, ReadError> {
        Ok(self.state().head(stream))
    }

    async fn find_event(&self, event_id: EventId) -> Result<Option<RecordedEvent>, ReadError> {
        let state = self.state();
        Ok(state.ids.get(&event_id).map(|&i| state.log[i].clone()))
    }

    fn head_position(&self) -> Position {
        *self.inner.head.borrow()
    }

    fn watch_head(&self) -> watch::Receiver<Position> {
        self.inner.head.subscribe()
    }
}

/// Takes events for one page: at most `limit`, and stops once the page's data reaches
/// `READ_PAGE_BYTES_MAX` (always at least one event).
fn page<'a>(events: impl Iterator<Item = &'a RecordedEvent>, limit: u64) -> Vec<RecordedEvent> {
    let mut bytes = 0usize;
    let mut out = Vec::new();
    for event in events.take(limit as usize) {
        if !out.is_empty() && bytes + event.data.len() > READ_PAGE_BYTES_MAX {
            break;
        }
        bytes += event.data.len();
        out.push(event.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::MemoryStore;
    use crate::conformance::Harness;

    /// The memory store's "storage" is the shared state: reopening hands out another clone.
    struct Memory(MemoryStore);

    impl Harness for Memory {
        type Store = MemoryStore;

        async fn open(&self) -> MemoryStore {
            self.0.clone()
        }
    }

    crate::conformance_suite!(Memory(MemoryStore::new()));
}
