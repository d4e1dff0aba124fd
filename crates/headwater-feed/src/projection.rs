//! What a user writes: a [`Projection`] from internal events to integration events, and the
//! [`Emit`] sink it writes them to.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};

use headwater_core::limits::{INTEGRATION_DATA_BYTES_MAX, PROJECTED_EVENTS_PER_EVENT_MAX};
use headwater_core::{
    DecodeError, DomainEvent, EventType, FeedId, RecordedEvent, Subject, Upcasters,
    integration_event_id,
};
use headwater_store::ProjectedEvent;
use serde::Serialize;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One version of a projection: it makes the integration events of one feed (`accounts.v2`) out
/// of the internal log, one internal event at a time.
///
/// `project` must be a function of the event alone (and of the projection's own fixed
/// configuration): no clock, no randomness, no I/O, no state carried from one event to the next.
/// That is what makes a feed rebuildable byte for byte from the log (G5), whatever the page or
/// batch sizes, and whatever crashes.
///
/// ```
/// use headwater_feed::{Emit, Projection, ProjectionError};
/// use headwater_core::{FeedId, RecordedEvent};
///
/// struct AccountsV1;
///
/// impl Projection for AccountsV1 {
///     fn feed(&self) -> FeedId {
///         FeedId::parse("accounts.v1").unwrap()
///     }
///
///     fn project(&self, event: &RecordedEvent, out: &mut Emit) -> Result<(), ProjectionError> {
///         if event.stream.category() != "account" {
///             return Ok(()); // not ours: nothing in this feed
///         }
///         let data: serde_json::Value = serde_json::from_slice(&event.data)?;
///         out.emit("accounts.changed", event.stream.id(), &data)?;
///         Ok(())
///     }
/// }
/// ```
pub trait Projection: Send + Sync + 'static {
    /// The feed this projection fills. Must return the same value every time.
    fn feed(&self) -> FeedId;

    /// Makes the integration events of one internal event: zero (the feed skips it) to
    /// [`PROJECTED_EVENTS_PER_EVENT_MAX`] calls of [`Emit::emit`].
    ///
    /// An `Err` stops this feed's projector with the error in its status (the other feeds go on):
    /// an event the projection cannot handle is a bug to fix and redeploy, never something to
    /// skip silently. A panic is caught and treated the same way.
    fn project(&self, event: &RecordedEvent, out: &mut Emit) -> Result<(), ProjectionError>;
}

/// A [`Projection`] from a name, version and function: `projection("accounts.v1", |event, out|
/// …)`. Panics if `feed` is not a valid feed id (a programming error).
pub fn projection<F>(feed: &str, project: F) -> FnProjection<F>
where
    F: Fn(&RecordedEvent, &mut Emit) -> Result<(), ProjectionError> + Send + Sync + 'static,
{
    let feed = FeedId::parse(feed).unwrap_or_else(|e| panic!("projection({feed:?}): {e}"));
    FnProjection { feed, project }
}

/// See [`projection`].
pub struct FnProjection<F> {
    feed: FeedId,
    project: F,
}

impl<F> fmt::Debug for FnProjection<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnProjection")
            .field("feed", &self.feed)
            .finish_non_exhaustive()
    }
}

impl<F> Projection for FnProjection<F>
where
    F: Fn(&RecordedEvent, &mut Emit) -> Result<(), ProjectionError> + Send + Sync + 'static,
{
    fn feed(&self) -> FeedId {
        self.feed.clone()
    }

    fn project(&self, event: &RecordedEvent, out: &mut Emit) -> Result<(), ProjectionError> {
        (self.project)(event, out)
    }
}

/// Upcasts and decodes a recorded event into the user's [`DomainEvent`] type, for projections
/// written over typed events.
pub fn decode<E: DomainEvent>(
    event: &RecordedEvent,
    upcasters: &Upcasters,
) -> Result<E, ProjectionError> {
    let event_type = event.event_type.as_str();
    let (schema_version, data) =
        upcasters.apply(event_type, event.metadata.schema_version, &event.data)?;
    Ok(E::decode(event_type, schema_version, &data)?)
}

/// Where a projection writes the integration events it makes of one internal event. Each
/// [`Emit::emit`] checks its input, so a projection that uses `?` stops at the first bad one.
#[derive(Debug)]
pub struct Emit {
    feed: FeedId,
    events: Vec<Emitted>,
}

#[derive(Debug)]
struct Emitted {
    event_type: EventType,
    subject: Subject,
    data: Vec<u8>,
}

impl Emit {
    pub(crate) fn new(feed: FeedId) -> Emit {
        Emit {
            feed,
            events: Vec::new(),
        }
    }

    /// The feed being projected (the same as [`Projection::feed`]).
    pub fn feed(&self) -> &FeedId {
        &self.feed
    }

    /// Emits one integration event: its CloudEvents `type` (`accounts.deposited`), its subject
    /// (`42`: the key consumers order by) and its `data`, serialized to JSON here.
    ///
    /// Refused: an invalid type or subject, data that does not serialize or is larger than
    /// [`INTEGRATION_DATA_BYTES_MAX`] once serialized, more than
    /// [`PROJECTED_EVENTS_PER_EVENT_MAX`] events for one internal event.
    pub fn emit<D: Serialize + ?Sized>(
        &mut self,
        event_type: &str,
        subject: &str,
        data: &D,
    ) -> Result<(), ProjectionError> {
        self.check_count()?;
        let event_type = EventType::new(event_type).map_err(|e| ProjectionError::Invalid {
            what: "event type",
            detail: e.to_string(),
        })?;
        let subject = Subject::new(subject).map_err(|e| ProjectionError::Invalid {
            what: "subject",
            detail: e.to_string(),
        })?;
        let data = serde_json::to_vec(data).map_err(|e| ProjectionError::Invalid {
            what: "data",
            detail: format!("does not serialize to JSON: {e}"),
        })?;
        self.push(event_type, subject, data)
    }

    /// Emits one integration event whose `data` is already serialized JSON. The bytes are
    /// checked to be one JSON value (the feed API serves them as JSON).
    pub fn emit_json_bytes(
        &mut self,
        event_type: EventType,
        subject: Subject,
        data: Vec<u8>,
    ) -> Result<(), ProjectionError> {
        self.check_count()?;
        if data.len() <= INTEGRATION_DATA_BYTES_MAX {
            serde_json::from_slice::<serde::de::IgnoredAny>(&data).map_err(|e| {
                ProjectionError::Invalid {
                    what: "data",
                    detail: format!("is not JSON: {e}"),
                }
            })?;
        }
        self.push(event_type, subject, data)
    }

    /// How many events were emitted so far for this internal event.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    fn check_count(&self) -> Result<(), ProjectionError> {
        if self.events.len() >= PROJECTED_EVENTS_PER_EVENT_MAX {
            return Err(ProjectionError::Invalid {
                what: "event count",
                detail: format!(
                    "more than {PROJECTED_EVENTS_PER_EVENT_MAX} integration events for one internal event"
                ),
            });
        }
        Ok(())
    }

    fn push(
        &mut self,
        event_type: EventType,
        subject: Subject,
        data: Vec<u8>,
    ) -> Result<(), ProjectionError> {
        if data.len() > INTEGRATION_DATA_BYTES_MAX {
            return Err(ProjectionError::Invalid {
                what: "data",
                detail: format!(
                    "{} bytes of JSON, more than {INTEGRATION_DATA_BYTES_MAX}",
                    data.len()
                ),
            });
        }
        self.events.push(Emitted {
            event_type,
            subject,
            data,
        });
        Ok(())
    }

    fn clear(&mut self) {
        self.events.clear();
    }
}

/// Why a projection could not project an event. It stops that feed's projector; the status says
/// which event and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// The projection emitted something the feed cannot hold.
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    /// The internal event could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The internal event's data is not the JSON the projection expected.
    #[error("the event's data is not the JSON expected: {0}")]
    Json(#[from] serde_json::Error),
    /// Anything else the user's code refused.
    #[error("{0}")]
    Failed(BoxError),
}

impl ProjectionError {
    /// An error of the user's own.
    pub fn failed(error: impl Into<BoxError>) -> ProjectionError {
        ProjectionError::Failed(error.into())
    }
}

/// A projection's failure on one internal event, as the projector reports it.
#[derive(Debug, thiserror::Error)]
#[error(
    "projection {feed} failed on the event at position {position} (id {event_id}, type {event_type}): {error}"
)]
pub struct ProjectFailure {
    pub feed: FeedId,
    pub position: headwater_core::Position,
    pub event_id: headwater_core::EventId,
    pub event_type: String,
    #[source]
    pub error: ProjectionError,
}

/// Runs the projection on one event, catching panics, and turns what it emitted into
/// [`ProjectedEvent`]s (ids from [`integration_event_id`], time = the event's `recorded_at`),
/// appended to `out`. `emit` is reused between events to spare allocations.
pub(crate) fn project_one<P: Projection + ?Sized>(
    projection: &P,
    feed: &FeedId,
    event: &RecordedEvent,
    emit: &mut Emit,
    out: &mut Vec<ProjectedEvent>,
) -> Result<(), Box<ProjectFailure>> {
    emit.clear();
    let result = catch_unwind(AssertUnwindSafe(|| projection.project(event, emit))).unwrap_or_else(
        |panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            Err(ProjectionError::failed(format!("panicked: {message}")))
        },
    );
    if let Err(error) = result {
        emit.clear();
        return Err(Box::new(ProjectFailure {
            feed: feed.clone(),
            position: event.position,
            event_id: event.event_id,
            event_type: event.event_type.as_str().to_owned(),
            error,
        }));
    }
    for (index, emitted) in emit.events.drain(..).enumerate() {
        // At most PROJECTED_EVENTS_PER_EVENT_MAX (64) events: the index fits.
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        out.push(ProjectedEvent {
            id: integration_event_id(event.event_id, feed, index),
            event_type: emitted.event_type,
            subject: emitted.subject,
            time: event.metadata.recorded_at,
            data: emitted.data,
            source_position: event.position,
        });
    }
    Ok(())
}
