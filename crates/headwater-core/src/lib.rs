//! Headwater's core model.
//!
//! The words here are the words of the project's vocabulary (see `SPEC.md`): an **event** is an
//! immutable recorded fact, a **stream** is the ordered events of one aggregate instance
//! (`category-id`), numbered by **stream version** 1, 2, 3 …; every event of a store also has a
//! **position** in commit order.
//!
//! Architecture invariant: this crate does no I/O. It knows nothing of tokio, SQL, HTTP or the
//! file system; it has no wire or disk format. Backends and edges write their own encodings.

mod aggregate;
mod event;
mod feed;
mod ids;
pub mod limits;
mod stream;
pub mod testing;
mod upcast;

pub use aggregate::{Aggregate, DecodeError, DomainEvent, EncodeError};
pub use event::{
    EventType, EventTypeError, InvalidAppend, Metadata, NewEvent, RecordedEvent, Timestamp,
    validate_append,
};
pub use feed::{
    FeedId, FeedName, FeedPosition, FeedStatus, FeedVersion, FeedWordError,
    INTEGRATION_EVENT_ID_NAMESPACE, Sequence, Subject, integration_event_id,
};
pub use ids::{EventId, ExpectedVersion, Position, StreamVersion};
pub use stream::{StreamName, StreamNameError};
pub use upcast::Upcasters;

/// What a caller should do next with an error. Every error type of Headwater's library crates can
/// say which of these it is, so that edges (HTTP, CLI, command handling) branch on it instead of
/// matching on variants they do not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The input is wrong; retrying it unchanged fails the same way.
    BadRequest,
    /// An expected outcome of concurrency (wrong expected version): reload and retry.
    Conflict,
    /// The store refuses work until an operator acts (poisoned after a failed write, corrupt).
    Unavailable,
    /// Anything else: an I/O failure or a bug.
    Internal,
}
