//! The event store interface ([`EventStore`]), the feed store interface ([`FeedStore`]), their errors, the in-memory reference backend
//! ([`MemoryStore`]) and, behind the `conformance` feature, the suite every backend passes
//! unchanged.
//!
//! **API Boundary**: projections, publishers, consumers and command handling are written against
//! [`EventStore`] only; they never know which backend they run on.
//!
//! Architecture invariant: nothing here does file or network I/O. Backends live in their own
//! crates (`headwater-embedded`, later `headwater-postgres`).

#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
mod feed;
mod feed_memory;
mod leader;
mod memory;
mod store;

pub use error::{AppendError, ReadError};
pub use feed::{
    COMMIT_EVENTS_MAX, FeedCommit, FeedError, FeedEvent, FeedReader, FeedState, FeedStore,
    ProjectedEvent, ProjectorBatch, PublisherCursor, PublisherLag, ReaderSeen, SubjectHead,
    publisher_lag, validate_batch, validate_feed_limit, validate_publisher_advance,
    validate_publisher_name, validate_subject_limit, wait_for_feed_position,
};
pub use feed_memory::MemoryFeedStore;
pub use leader::{AlwaysLead, Leadership, Lease, LeaseHolder};
pub use memory::MemoryStore;
pub use store::{AppendOutcome, EventStore, read_all_pages, validate_limit, wait_for_position};
