//! Building a feed offline, without a feed store: the reference that tests and tools compare a
//! projected feed with.

use std::collections::HashMap;

use headwater_core::limits::READ_PAGE_EVENTS_MAX;
use headwater_core::{FeedPosition, Position, Sequence, Subject};
use headwater_store::{EventStore, FeedEvent, ReadError};

use crate::projection::{Emit, ProjectFailure, Projection, project_one};

/// Why an offline build failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    #[error("reading the internal log: {0}")]
    Read(#[from] ReadError),
    #[error(transparent)]
    Projection(#[from] Box<ProjectFailure>),
}

/// The whole feed `projection` makes of the internal log as it is now: every internal event
/// projected in log order, numbered as a feed store numbers a feed (positions 1, 2, 3 …;
/// sequences 1, 2, 3 … per subject). Independent of any feed store and of batching, so a feed
/// built by a projector must equal it (G5).
///
/// # Cancel safety
/// Cancel safe: it only reads.
pub async fn build_feed<E, P>(events: &E, projection: &P) -> Result<Vec<FeedEvent>, BuildError>
where
    E: EventStore + ?Sized,
    P: Projection + ?Sized,
{
    build_feed_until(events, projection, None).await
}

/// [`build_feed`] of the internal log up to `until` (included), or all of it for `None`.
///
/// # Cancel safety
/// Cancel safe: it only reads.
pub async fn build_feed_until<E, P>(
    events: &E,
    projection: &P,
    until: Option<Position>,
) -> Result<Vec<FeedEvent>, BuildError>
where
    E: EventStore + ?Sized,
    P: Projection + ?Sized,
{
    let feed = projection.feed();
    let mut emit = Emit::new(feed.clone());
    let mut projected = Vec::new();
    let mut sequences: HashMap<Subject, Sequence> = HashMap::new();
    let mut out = Vec::new();
    let mut position = FeedPosition::START;
    let mut cursor = Position::START;
    'pages: loop {
        let page = events.read_all(cursor, READ_PAGE_EVENTS_MAX).await?;
        if page.is_empty() {
            break;
        }
        for event in &page {
            if until.is_some_and(|until| event.position > until) {
                break 'pages;
            }
            cursor = event.position;
            projected.clear();
            project_one(projection, &feed, event, &mut emit, &mut projected)?;
            for p in projected.drain(..) {
                position = position.next();
                let sequence = sequences.entry(p.subject.clone()).or_default();
                *sequence = sequence.next();
                out.push(FeedEvent {
                    position,
                    sequence: *sequence,
                    id: p.id,
                    event_type: p.event_type,
                    subject: p.subject,
                    time: p.time,
                    data: p.data,
                    source_position: p.source_position,
                });
            }
        }
    }
    Ok(out)
}
