//! Rows to events, and the integer conversions between Rust's `u64` and PostgreSQL's `bigint`.

use std::time::{SystemTime, UNIX_EPOCH};

use headwater_core::{
    EventId, EventType, Metadata, Position, RecordedEvent, StreamName, StreamVersion, Timestamp,
};
use headwater_store::ReadError;
use tokio_postgres::Row;
use uuid::Uuid;

/// A counter as a `bigint`. Every counter the store keeps (positions, versions, limits) stays far
/// below `i64::MAX`; one that does not is clamped, which makes a query find nothing.
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A stored `bigint` counter as a `u64`; `None` when negative (the table's checks forbid that).
pub(crate) fn to_u64(value: i64) -> Option<u64> {
    u64::try_from(value).ok()
}

pub(crate) fn micros_since_epoch(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Reads an event from a row with the columns of [`crate::schema::EVENT_COLUMNS`].
pub(crate) fn event_from_row(row: &Row) -> Result<RecordedEvent, ReadError> {
    let position: i64 = row.try_get(0).map_err(ReadError::backend)?;
    let corrupt = |detail: String| ReadError::Corrupt {
        position: Position(to_u64(position).unwrap_or(0)),
        detail,
    };
    let position = to_u64(position).ok_or_else(|| corrupt("negative position".to_owned()))?;
    let stream: String = row.try_get(1).map_err(ReadError::backend)?;
    let stream = StreamName::new(stream).map_err(|e| corrupt(format!("stream name: {e}")))?;
    let version: i64 = row.try_get(2).map_err(ReadError::backend)?;
    let version = to_u64(version).ok_or_else(|| corrupt("negative stream version".to_owned()))?;
    let event_id: Uuid = row.try_get(3).map_err(ReadError::backend)?;
    let event_type: String = row.try_get(4).map_err(ReadError::backend)?;
    let event_type = EventType::new(event_type).map_err(|e| corrupt(format!("event type: {e}")))?;
    let schema_version: i64 = row.try_get(5).map_err(ReadError::backend)?;
    let schema_version = u32::try_from(schema_version)
        .map_err(|_| corrupt(format!("schema version {schema_version}")))?;
    let correlation_id: Option<Uuid> = row.try_get(6).map_err(ReadError::backend)?;
    let causation_id: Option<Uuid> = row.try_get(7).map_err(ReadError::backend)?;
    let recorded_at: SystemTime = row.try_get(8).map_err(ReadError::backend)?;
    let data: Vec<u8> = row.try_get(9).map_err(ReadError::backend)?;
    Ok(RecordedEvent {
        event_id: EventId::from_uuid(event_id),
        stream,
        stream_version: StreamVersion(version),
        position: Position(position),
        event_type,
        data,
        metadata: Metadata {
            correlation_id,
            causation_id,
            recorded_at: Timestamp::from_unix_micros(micros_since_epoch(recorded_at)),
            schema_version,
        },
    })
}
