//! Projections of the internal log into versioned integration feeds (`accounts.v1`,
//! `accounts.v2`), and the projector that fills each feed and backfills new versions.
//!
//! - A [`Projection`] maps one internal event ([`RecordedEvent`](headwater_core::RecordedEvent))
//!   to zero or more integration events, written to an [`Emit`]: a type, a subject and JSON data.
//! - A [`Projector`] follows the internal log from its feed's cursor and commits what the
//!   projection makes in batches that move the cursor with a compare-and-set
//!   ([`FeedStore::commit`](headwater_store::FeedStore::commit)). A new feed is filled from the
//!   start of the log (backfill, status `backfilling`) and turns `live` once it has caught up.
//! - [`Projectors`] registers a service's projections and runs one projector task per feed,
//!   with statuses, metrics and a clean shutdown; [`Leadership`] keeps each projector on one
//!   replica at a time when several share a PostgreSQL store.
//! - [`build_feed`] builds a feed offline, the reference a projected feed must equal (G5).
//!
//! Architecture invariant: a projector never writes a feed except through
//! `FeedStore::commit` from the cursor it read, so whatever crashes, restarts or second
//! projector happen, a feed is exactly the projection of the log up to its cursor.

mod metrics;
mod offline;
mod projection;
mod projector;
mod runtime;

pub use headwater_store::{AlwaysLead, Leadership, Lease, LeaseHolder};
pub use offline::{BuildError, build_feed, build_feed_until};
pub use projection::{
    Emit, FnProjection, ProjectFailure, Projection, ProjectionError, decode, projection,
};
pub use projector::{
    BackfillProgress, COMMIT_BYTES_MAX, Projector, ProjectorError, ProjectorOptions,
    ProjectorState, ProjectorStatus, Stopped,
};
pub use runtime::{Projectors, ProjectorsBuilder, StartError};
