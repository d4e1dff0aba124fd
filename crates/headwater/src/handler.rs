//! Command handling: load a stream, decide, append with the expected version, retry on conflict.
//!
//! # Idempotent commands, and the races between retries
//!
//! The events of a command get ids derived from its command id (index 0, 1, …), so "was this
//! command recorded?" is "is the id of its first event recorded?" (`EventStore::find_event`), and
//! the store's own idempotency (G3) holds for commands too. Each attempt of
//! [`CommandHandler::handle_with`] checks first, then loads, decides and appends at the version it
//! loaded. Between two concurrent retries of one command (a client that timed out and sent it
//! again), every interleaving ends in one recording:
//!
//! - the other retry recorded it before our check: the check finds it, we replay its outcome;
//! - it recorded it between our check and our load: our state holds the command. Deciding again
//!   either refuses (a refusal re-checks and finds it) or produces the same derived ids, which
//!   the store refuses at our later version as a conflict or a duplicate id; we check again and
//!   replay;
//! - it recorded it after our load: if it had loaded the same version, it decided the same
//!   events (`decide` is pure), so our append of the same ids at the same version is answered
//!   as a replay (G3); if it had loaded a later version, our append conflicts and the next check
//!   finds the command.
//!
//! A command id whose first event is recorded in another stream is refused
//! ([`CommandError::CommandIdReused`]); so is one the store finds elsewhere during the append.
//!
//! # The state cache
//!
//! Loading a stream from its start costs a read of every event it holds, so a command on an
//! account with 10,000 events reads 10,000 events. [`CommandHandler::with_state_cache`] keeps the
//! states of the streams used last, each with the version it was folded up to; a load then reads
//! only the events after that version. A stream's events never change once recorded, so a state
//! folded up to version v is the same whoever appended since (another task, another replica):
//! reading on from v gives the state at the head. A cached state is never trusted beyond what the
//! store says: the append still expects the version the load ended at (G2).

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use headwater_core::limits::{APPEND_EVENTS_MAX, COMMAND_ATTEMPTS_MAX};
use headwater_core::{
    Aggregate, DomainEvent, ExpectedVersion, NewEvent, Position, RecordedEvent, StreamName,
    StreamVersion, Upcasters,
};
use headwater_store::{AppendError, AppendOutcome, EventStore, ReadError};

use crate::command::{CommandContext, CommandId};
use crate::error::CommandError;

/// The events one read of a stream returns while loading it. Each page is also bounded in bytes
/// by the store (`limits::READ_PAGE_BYTES_MAX`).
const LOAD_PAGE_EVENTS: u64 = 1_000;
/// The events one read returns while collecting a recorded command's events (most commands
/// record one to a few).
const REPLAY_PAGE_EVENTS: u64 = 16;

/// An aggregate's state, loaded from its stream.
#[derive(Debug)]
#[non_exhaustive]
pub struct Loaded<A> {
    pub stream: StreamName,
    /// The state after every event of the stream.
    pub state: A,
    /// The version of the stream's last event; `None` when the stream has none.
    pub version: Option<StreamVersion>,
}

/// What a handled command recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Handled {
    /// The version of the command's last event; when it recorded nothing, the version of the
    /// stream it was decided on (`None`: an empty stream).
    pub stream_version: Option<StreamVersion>,
    /// The position of the command's first event; `None` when it recorded nothing.
    pub first_position: Option<Position>,
    /// The position of the command's last event; `None` when it recorded nothing.
    pub last_position: Option<Position>,
    /// How many events the command recorded.
    pub events: usize,
    /// `true` when the command had been recorded before (same command id): this is that
    /// recording's outcome, and nothing was recorded now.
    pub replayed: bool,
}

impl Handled {
    fn appended(outcome: AppendOutcome, events: usize) -> Handled {
        Handled {
            stream_version: Some(outcome.stream_version),
            first_position: Some(outcome.first_position),
            last_position: Some(outcome.last_position),
            events,
            replayed: outcome.replayed,
        }
    }
}

/// Handles the commands of one aggregate type `A` against a store `S`.
///
/// Cheap to clone (clones share the store and the upcasters). `S` may be unsized, so a service
/// that picks its backend at run time can use `CommandHandler<A, dyn EventStore>`
/// ([`CommandHandler::from_arc`]).
///
/// ```
/// # use headwater::{Aggregate, DecodeError, DomainEvent, EncodeError, EventType};
/// # #[derive(Default)] struct Counter(u64);
/// # #[derive(Debug, PartialEq)] struct Added(u64);
/// # #[derive(Debug, thiserror::Error)] #[error("zero")] struct Zero;
/// # impl DomainEvent for Added {
/// #     fn event_type(&self) -> EventType { EventType::new("counter.added").unwrap() }
/// #     fn encode(&self) -> Result<Vec<u8>, EncodeError> { Ok(self.0.to_string().into_bytes()) }
/// #     fn decode(_: &str, _: u32, d: &[u8]) -> Result<Self, DecodeError> {
/// #         std::str::from_utf8(d).ok().and_then(|s| s.parse().ok()).map(Added)
/// #             .ok_or_else(|| DecodeError::new("counter.added", 1, "not a number"))
/// #     }
/// # }
/// # impl Aggregate for Counter {
/// #     const CATEGORY: &'static str = "counter";
/// #     type Command = u64; type Event = Added; type Error = Zero;
/// #     fn decide(&self, n: &u64) -> Result<Vec<Added>, Zero> { if *n == 0 { Err(Zero) } else { Ok(vec![Added(*n)]) } }
/// #     fn evolve(&mut self, e: &Added) { self.0 += e.0 }
/// # }
/// use headwater::{CommandError, CommandHandler, CommandId};
/// use headwater::store::MemoryStore;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let handler = CommandHandler::<Counter, _>::new(MemoryStore::new());
/// let command_id = CommandId::new_random(); // chosen by the client, sent again on retries
/// let handled = handler.handle("7", 5, command_id).await?;
/// assert_eq!((handled.events, handled.replayed), (1, false));
///
/// // A retry of the same command records nothing and answers what was recorded.
/// let again = handler.handle("7", 5, command_id).await?;
/// assert_eq!((again.stream_version, again.replayed), (handled.stream_version, true));
///
/// let loaded = handler.load("7").await?;
/// assert_eq!(loaded.state.0, 5);
///
/// let refused = handler.handle("7", 0, CommandId::new_random()).await;
/// assert!(matches!(refused, Err(CommandError::Rejected(Zero))));
/// # Ok::<_, CommandError<Zero>>(())
/// # }).unwrap();
/// ```
pub struct CommandHandler<A, S: ?Sized> {
    store: Arc<S>,
    upcasters: Arc<Upcasters>,
    attempts_max: u32,
    /// States of recently used streams (`with_state_cache`), shared by clones.
    cache: Option<Arc<dyn StateCache<A>>>,
    aggregate: PhantomData<fn() -> A>,
}

impl<A, S: ?Sized> Clone for CommandHandler<A, S> {
    fn clone(&self) -> Self {
        CommandHandler {
            store: Arc::clone(&self.store),
            upcasters: Arc::clone(&self.upcasters),
            attempts_max: self.attempts_max,
            cache: self.cache.clone(),
            aggregate: PhantomData,
        }
    }
}

/// The state cache, behind a trait object so that only [`CommandHandler::with_state_cache`]
/// needs `A: Clone`.
trait StateCache<A>: Send + Sync {
    /// A copy of the state of `stream` and the version it was folded up to.
    fn get(&self, stream: &StreamName) -> Option<(StreamVersion, A)>;
    /// Keeps `state` as the state of `stream` up to `version`, unless a later one is kept.
    fn put(&self, stream: &StreamName, version: StreamVersion, state: &A);
}

/// A least-recently-used map of states, bounded in streams.
struct LruStates<A> {
    states: std::sync::Mutex<lru::LruCache<StreamName, (StreamVersion, A)>>,
}

impl<A: Clone + Send> StateCache<A> for LruStates<A> {
    fn get(&self, stream: &StreamName) -> Option<(StreamVersion, A)> {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states.get(stream).cloned()
    }

    fn put(&self, stream: &StreamName, version: StreamVersion, state: &A) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        match states.get_mut(stream) {
            // Two loads of one stream can finish in either order: keep the later state.
            Some(kept) if kept.0 >= version => {}
            Some(kept) => *kept = (version, state.clone()),
            None => {
                states.put(stream.clone(), (version, state.clone()));
            }
        }
    }
}

impl<A, S: ?Sized> fmt::Debug for CommandHandler<A, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandHandler")
            .field("aggregate", &std::any::type_name::<A>())
            .field("upcasters", &self.upcasters)
            .field("attempts_max", &self.attempts_max)
            .finish_non_exhaustive()
    }
}

impl<A: Aggregate, S: EventStore> CommandHandler<A, S> {
    /// A handler over `store` with no upcasters that decides a command at most
    /// [`COMMAND_ATTEMPTS_MAX`] times.
    pub fn new(store: S) -> Self {
        CommandHandler::from_arc(Arc::new(store))
    }
}

impl<A: Aggregate, S: EventStore + ?Sized> CommandHandler<A, S> {
    /// A handler over a shared store, possibly unsized (`Arc<dyn EventStore>`); otherwise as
    /// [`CommandHandler::new`].
    pub fn from_arc(store: Arc<S>) -> Self {
        CommandHandler {
            store,
            upcasters: Arc::new(Upcasters::new()),
            attempts_max: COMMAND_ATTEMPTS_MAX,
            cache: None,
            aggregate: PhantomData,
        }
    }

    /// Keeps the states of the `streams` streams used last in memory, each with the version it
    /// was folded up to, so that loading one reads only the events recorded since (see the
    /// module's "The state cache"). Without it every command reads its stream from the start.
    /// Clones of the handler share the cache. Memory: `streams` states of `A` at most.
    ///
    /// Correct with other writers on the same store (tasks, replicas): a load always reads on
    /// to the stream's head, and the append expects the version it read up to.
    #[must_use]
    pub fn with_state_cache(mut self, streams: std::num::NonZeroUsize) -> Self
    where
        A: Clone + Send + 'static,
    {
        self.cache = Some(Arc::new(LruStates {
            states: std::sync::Mutex::new(lru::LruCache::new(streams)),
        }));
        self
    }

    /// Applies these upcasters to every stored event before decoding it.
    #[must_use]
    pub fn with_upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = Arc::new(upcasters);
        self
    }

    /// Decides a command at most `attempts` times (loading fresh state each time) before giving
    /// up with [`CommandError::Conflict`]. Panics if `attempts` is 0.
    #[must_use]
    pub fn with_attempts_max(mut self, attempts: u32) -> Self {
        assert!(attempts >= 1, "a command needs at least one attempt");
        self.attempts_max = attempts;
        self
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// The stream of the aggregate `id`: `A::CATEGORY-id`.
    pub fn stream_name(&self, id: &str) -> Result<StreamName, CommandError<A::Error>> {
        StreamName::from_parts(A::CATEGORY, id).map_err(CommandError::InvalidId)
    }

    /// Loads the aggregate `id`: reads its stream page by page, upcasts and decodes each event
    /// and applies it to the state.
    ///
    /// # Cancel safety
    /// Cancel safe: loading changes nothing.
    pub async fn load(&self, id: &str) -> Result<Loaded<A>, CommandError<A::Error>> {
        let stream = self.stream_name(id)?;
        self.load_stream(stream).await
    }

    /// Handles `command` for the aggregate `id`, with the default [`CommandContext`]. See
    /// [`CommandHandler::handle_with`].
    ///
    /// # Durability
    /// On `Ok`, the command's events are as durable as the store's append makes them.
    ///
    /// # Cancel safety
    /// Dropping the future after it was first polled may still record the command. Handling it
    /// again with the same `command_id` tells, without recording it twice.
    pub async fn handle(
        &self,
        id: &str,
        command: A::Command,
        command_id: CommandId,
    ) -> Result<Handled, CommandError<A::Error>> {
        self.handle_with(id, command, command_id, CommandContext::new())
            .await
    }

    /// Handles `command` for the aggregate `id`: loads the stream, decides, and appends the
    /// events at the version it loaded. When another writer appended in between, it loads the
    /// fresh state and decides again, at most `attempts_max` times in all.
    ///
    /// **Idempotent** (G3 for commands): the events get ids derived from `command_id`
    /// ([`CommandId::event_id`]). A command whose events are already recorded in this stream is
    /// not decided again: the answer is the original outcome with `replayed: true`, and nothing
    /// is recorded. This holds for concurrent retries too: the store records the derived ids
    /// once. A `command_id` already recorded in another stream is refused with
    /// [`CommandError::CommandIdReused`].
    ///
    /// The command id identifies the command: another command sent to the same aggregate with a
    /// recorded command id is answered as the recorded one, unread. A command that records nothing
    /// (refused, or decided to no events) leaves no trace, so a retry of it is decided again, on
    /// the state at that time.
    ///
    /// The events' correlation and causation ids come from `context` (both default to the
    /// command id).
    ///
    /// # Durability
    /// On `Ok`, the command's events are as durable as the store's append makes them.
    ///
    /// # Cancel safety
    /// Dropping the future after it was first polled may still record the command. Handling it
    /// again with the same `command_id` tells, without recording it twice.
    pub async fn handle_with(
        &self,
        id: &str,
        command: A::Command,
        command_id: CommandId,
        context: CommandContext,
    ) -> Result<Handled, CommandError<A::Error>> {
        let stream = self.stream_name(id)?;
        for _ in 0..self.attempts_max {
            if let Some(handled) = self.recorded(&stream, command_id).await? {
                return Ok(handled);
            }
            let loaded = self.load_stream(stream.clone()).await?;
            let events = match loaded.state.decide(&command) {
                Ok(events) => events,
                Err(refusal) => {
                    // A concurrent retry of this command may have recorded it since the check
                    // above (so our state did not show it): its outcome is the answer.
                    if let Some(handled) = self.recorded(&stream, command_id).await? {
                        return Ok(handled);
                    }
                    return Err(CommandError::Rejected(refusal));
                }
            };
            if events.is_empty() {
                return Ok(Handled {
                    stream_version: loaded.version,
                    first_position: None,
                    last_position: None,
                    events: 0,
                    replayed: false,
                });
            }
            let count = events.len();
            let events = encode::<A>(&events, command_id, context)?;
            let expected = loaded
                .version
                .map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
            match self.store.append(&stream, expected, events).await {
                // `replayed` here: a concurrent retry appended the same events at this same place.
                // The cache is not updated from `events`: the next load reads them back as the
                // store recorded them, so the state is always the fold of what was stored.
                Ok(outcome) => return Ok(Handled::appended(outcome, count)),
                // Another writer went first. If it was a concurrent retry of this command, the
                // check at the top of the next attempt finds it.
                Err(AppendError::Conflict { .. }) => {}
                // One of our derived ids is recorded, elsewhere than where we appended: a
                // concurrent retry recorded the command (at another version), or the command id
                // was used on another stream.
                Err(error @ AppendError::DuplicateEventId { .. }) => {
                    return match self.recorded(&stream, command_id).await? {
                        Some(handled) => Ok(handled),
                        None => Err(CommandError::Store(error)),
                    };
                }
                Err(error) => return Err(CommandError::Store(error)),
            }
        }
        // The last conflict may have been a concurrent retry of this very command.
        if let Some(handled) = self.recorded(&stream, command_id).await? {
            return Ok(handled);
        }
        Err(CommandError::Conflict {
            attempts: self.attempts_max,
        })
    }

    async fn load_stream(&self, stream: StreamName) -> Result<Loaded<A>, CommandError<A::Error>> {
        let (mut version, mut state) = self
            .cache
            .as_ref()
            .and_then(|cache| cache.get(&stream))
            .unwrap_or((StreamVersion::START, A::default()));
        let cached_version = version;
        loop {
            let page = self
                .store
                .read_stream(&stream, version, LOAD_PAGE_EVENTS)
                .await
                .map_err(CommandError::Read)?;
            if page.is_empty() {
                break;
            }
            for recorded in &page {
                // A store that skipped or repeated a version would make the state wrong and the
                // expected version meaningless; refuse rather than decide on it.
                if recorded.stream_version != version.next() {
                    return Err(CommandError::Read(ReadError::Corrupt {
                        position: recorded.position,
                        detail: format!(
                            "{stream}: version {} follows version {version}",
                            recorded.stream_version
                        ),
                    }));
                }
                state.evolve(&self.decode(recorded)?);
                version = recorded.stream_version;
            }
        }
        if let Some(cache) = &self.cache
            && version != cached_version
        {
            cache.put(&stream, version, &state);
        }
        Ok(Loaded {
            stream,
            state,
            version: (version != StreamVersion::START).then_some(version),
        })
    }

    fn decode(&self, recorded: &RecordedEvent) -> Result<A::Event, CommandError<A::Error>> {
        let event_type = recorded.event_type.as_str();
        self.upcasters
            .apply(event_type, recorded.metadata.schema_version, &recorded.data)
            .and_then(|(schema_version, data)| A::Event::decode(event_type, schema_version, &data))
            .map_err(|source| CommandError::Decode {
                stream: recorded.stream.clone(),
                stream_version: recorded.stream_version,
                position: recorded.position,
                source,
            })
    }

    /// If `command_id` was recorded, what it recorded: its first event (looked up by id) and the
    /// events after it whose ids are derived from it.
    async fn recorded(
        &self,
        stream: &StreamName,
        command_id: CommandId,
    ) -> Result<Option<Handled>, CommandError<A::Error>> {
        let first = self
            .store
            .find_event(command_id.event_id(0))
            .await
            .map_err(CommandError::Read)?;
        let Some(first) = first else {
            return Ok(None);
        };
        if first.stream != *stream {
            return Err(CommandError::CommandIdReused {
                command_id,
                stream: first.stream,
            });
        }
        // One append holds at most APPEND_EVENTS_MAX events, so this reads a bounded number.
        let (mut last_version, mut last_position) = (first.stream_version, first.position);
        let mut events = 1;
        'pages: while events < APPEND_EVENTS_MAX {
            let page = self
                .store
                .read_stream(stream, last_version, REPLAY_PAGE_EVENTS)
                .await
                .map_err(CommandError::Read)?;
            if page.is_empty() {
                break;
            }
            for event in page {
                if event.event_id != command_id.event_id(events as u64) {
                    break 'pages;
                }
                (last_version, last_position) = (event.stream_version, event.position);
                events += 1;
            }
        }
        Ok(Some(Handled {
            stream_version: Some(last_version),
            first_position: Some(first.position),
            last_position: Some(last_position),
            events,
            replayed: true,
        }))
    }
}

fn encode<A: Aggregate>(
    events: &[A::Event],
    command_id: CommandId,
    context: CommandContext,
) -> Result<Vec<NewEvent>, CommandError<A::Error>> {
    let (correlation_id, causation_id) = context.ids_for(command_id);
    (0u64..)
        .zip(events)
        .map(|(index, event)| {
            Ok(NewEvent {
                event_id: command_id.event_id(index),
                event_type: event.event_type(),
                schema_version: event.schema_version(),
                data: event.encode().map_err(CommandError::Encode)?,
                correlation_id: Some(correlation_id),
                causation_id: Some(causation_id),
            })
        })
        .collect()
}
