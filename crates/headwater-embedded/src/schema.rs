//! The on-disk format: file names, the SQL schema, the format markers and the per-event checksum.
//!
//! `docs/design/storage.md` describes the same things for readers of the files; keep the two in
//! step.

use headwater_core::{
    EventId, EventType, Metadata, Position, RecordedEvent, StreamName, StreamVersion, Timestamp,
};
use uuid::Uuid;

/// The SQLite database file inside a store directory.
pub(crate) const DATABASE_FILE: &str = "events.sqlite3";
/// The file a process holds an exclusive advisory lock on while it has the store open.
pub(crate) const LOCK_FILE: &str = "LOCK";

/// `PRAGMA application_id` of a Headwater store: the ASCII bytes `HWES`.
pub(crate) const APPLICATION_ID: i32 = 0x4857_4553;
/// `PRAGMA user_version`: the version of the format described here. A store with a newer version
/// is refused, never "upgraded" by a program that does not know it.
pub(crate) const FORMAT_VERSION: i32 = 1;

/// The schema, created in one transaction together with the two format markers.
pub(crate) const CREATE_SCHEMA: &str = "
CREATE TABLE streams (
    id   INTEGER PRIMARY KEY,
    name TEXT    NOT NULL UNIQUE,
    head INTEGER NOT NULL
);
CREATE TABLE events (
    position       INTEGER PRIMARY KEY,
    stream_id      INTEGER NOT NULL,
    version        INTEGER NOT NULL,
    event_id       BLOB    NOT NULL,
    event_type     TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    correlation_id BLOB,
    causation_id   BLOB,
    recorded_at    INTEGER NOT NULL,
    data           BLOB    NOT NULL,
    crc            INTEGER NOT NULL
);
CREATE UNIQUE INDEX events_by_stream ON events(stream_id, version);
CREATE UNIQUE INDEX events_by_id ON events(event_id);
";

/// The columns every event read selects, in the order [`decode_event`] expects, from `events`
/// (as `e`) joined with `streams` (as `s`). `CROSS JOIN` keeps `events` the outer loop.
macro_rules! select_events {
    ($where:literal) => {
        concat!(
            "SELECT e.position, s.name, e.version, e.event_id, e.event_type, e.schema_version, ",
            "e.correlation_id, e.causation_id, e.recorded_at, e.data, e.crc ",
            "FROM events AS e CROSS JOIN streams AS s ON s.id = e.stream_id ",
            $where
        )
    };
}

/// The events after a position, in position order: `?1` after, `?2` limit.
pub(crate) const SELECT_ALL_AFTER: &str =
    select_events!("WHERE e.position > ?1 ORDER BY e.position LIMIT ?2");

/// One stream's events after a version, in version order: `?1` stream id, `?2` after, `?3` limit.
pub(crate) const SELECT_STREAM_AFTER: &str =
    select_events!("WHERE e.stream_id = ?1 AND e.version > ?2 ORDER BY e.version LIMIT ?3");

/// The event with an id: `?1` the id's 16 bytes.
pub(crate) const SELECT_BY_ID: &str = select_events!("WHERE e.event_id = ?1");

/// Appends one event row: the columns in table order, `crc` last.
pub(crate) const INSERT_EVENT: &str = "INSERT INTO events (position, stream_id, version, \
     event_id, event_type, schema_version, correlation_id, causation_id, recorded_at, data, crc) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

/// Every field of an event row as stored, in the order the checksum covers them.
///
/// The checksum (`crc` column) is CRC-32C over this canonical encoding, each field in turn:
/// - an integer (`position`, `version`, `schema_version`, `recorded_at`): its SQLite value as 8
///   bytes, little-endian two's complement;
/// - a byte string (`stream` name, `event_id`, `event_type`, `data`): its length as 8 bytes
///   little-endian, then its bytes;
/// - a nullable byte string (`correlation_id`, `causation_id`): one byte `0` for NULL, or one byte
///   `1` followed by the byte string's encoding.
///
/// The stream's *name* is covered (not the row id of the `streams` table), so a row moved to
/// another stream by a damaged index or table is caught.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EventFields<'a> {
    pub(crate) position: i64,
    pub(crate) stream: &'a [u8],
    pub(crate) version: i64,
    pub(crate) event_id: &'a [u8],
    pub(crate) event_type: &'a [u8],
    pub(crate) schema_version: i64,
    pub(crate) correlation_id: Option<&'a [u8]>,
    pub(crate) causation_id: Option<&'a [u8]>,
    pub(crate) recorded_at: i64,
    pub(crate) data: &'a [u8],
}

impl EventFields<'_> {
    /// The CRC-32C of the canonical encoding (see the type's documentation).
    pub(crate) fn crc(&self) -> u32 {
        fn int(crc: u32, value: i64) -> u32 {
            crc32c::crc32c_append(crc, &value.to_le_bytes())
        }
        fn bytes(crc: u32, value: &[u8]) -> u32 {
            let crc = crc32c::crc32c_append(crc, &(value.len() as u64).to_le_bytes());
            crc32c::crc32c_append(crc, value)
        }
        fn nullable(crc: u32, value: Option<&[u8]>) -> u32 {
            match value {
                None => crc32c::crc32c_append(crc, &[0]),
                Some(value) => bytes(crc32c::crc32c_append(crc, &[1]), value),
            }
        }
        let mut crc = int(0, self.position);
        crc = bytes(crc, self.stream);
        crc = int(crc, self.version);
        crc = bytes(crc, self.event_id);
        crc = bytes(crc, self.event_type);
        crc = int(crc, self.schema_version);
        crc = nullable(crc, self.correlation_id);
        crc = nullable(crc, self.causation_id);
        crc = int(crc, self.recorded_at);
        bytes(crc, self.data)
    }
}

/// Why a stored row is not a valid event.
#[derive(Debug)]
pub(crate) struct Corrupt {
    /// The position the row claims (0 when even that is unreadable).
    pub(crate) position: Position,
    pub(crate) detail: String,
}

/// Decodes a row selected with `select_events!`, checking its checksum first: a row whose
/// checksum does not match is never turned into an event.
pub(crate) fn decode_event(row: &rusqlite::Row<'_>) -> Result<RecordedEvent, Corrupt> {
    let mut position = Position::START;
    let corrupt = |position: Position, detail: String| Corrupt { position, detail };
    let column = |i: usize| {
        row.get_ref(i)
            .map_err(|e| format!("column {i} unreadable: {e}"))
    };
    let fields = (|| -> Result<(EventFields<'_>, i64), String> {
        let int = |i: usize| {
            column(i)?
                .as_i64()
                .map_err(|e| format!("column {i} is not an integer: {e}"))
        };
        let text_or_blob = |i: usize| {
            column(i)?
                .as_bytes()
                .map_err(|e| format!("column {i} is not text or blob: {e}"))
        };
        let nullable = |i: usize| {
            column(i)?
                .as_bytes_or_null()
                .map_err(|e| format!("column {i} is not a blob: {e}"))
        };
        Ok((
            EventFields {
                position: int(0)?,
                stream: text_or_blob(1)?,
                version: int(2)?,
                event_id: text_or_blob(3)?,
                event_type: text_or_blob(4)?,
                schema_version: int(5)?,
                correlation_id: nullable(6)?,
                causation_id: nullable(7)?,
                recorded_at: int(8)?,
                data: text_or_blob(9)?,
            },
            int(10)?,
        ))
    })();
    let (fields, stored_crc) = fields.map_err(|detail| corrupt(position, detail))?;
    if let Ok(p) = u64::try_from(fields.position) {
        position = Position(p);
    }
    let crc = fields.crc();
    if i64::from(crc) != stored_crc {
        return Err(corrupt(
            position,
            format!("checksum mismatch: stored {stored_crc:#x}, computed {crc:#x}"),
        ));
    }
    let bad = |what: &str| corrupt(position, format!("checksum matches but {what}"));
    let uuid = |bytes: &[u8]| <[u8; 16]>::try_from(bytes).ok().map(Uuid::from_bytes);
    let optional_uuid = |bytes: Option<&[u8]>| match bytes {
        None => Some(None),
        Some(bytes) => uuid(bytes).map(Some),
    };
    if fields.position <= 0 {
        return Err(bad("the position is not positive"));
    }
    let stream = std::str::from_utf8(fields.stream)
        .ok()
        .and_then(|name| StreamName::new(name).ok())
        .ok_or_else(|| bad("the stream name is invalid"))?;
    let version = u64::try_from(fields.version)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| bad("the version is not positive"))?;
    let event_id = uuid(fields.event_id)
        .map(EventId::from_uuid)
        .ok_or_else(|| bad("the event id is not 16 bytes"))?;
    let event_type = std::str::from_utf8(fields.event_type)
        .ok()
        .and_then(|name| EventType::new(name).ok())
        .ok_or_else(|| bad("the event type is invalid"))?;
    let schema_version = u32::try_from(fields.schema_version)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| bad("the schema version is out of range"))?;
    let correlation_id =
        optional_uuid(fields.correlation_id).ok_or_else(|| bad("the correlation id is invalid"))?;
    let causation_id =
        optional_uuid(fields.causation_id).ok_or_else(|| bad("the causation id is invalid"))?;
    let recorded_at =
        u64::try_from(fields.recorded_at).map_err(|_| bad("the recording time is negative"))?;
    Ok(RecordedEvent {
        event_id,
        stream,
        stream_version: StreamVersion(version),
        position,
        event_type,
        data: fields.data.to_vec(),
        metadata: Metadata {
            correlation_id,
            causation_id,
            recorded_at: Timestamp::from_unix_micros(recorded_at),
            schema_version,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> EventFields<'static> {
        EventFields {
            position: 7,
            stream: b"account-1",
            version: 3,
            event_id: &[9; 16],
            event_type: b"account.opened",
            schema_version: 1,
            correlation_id: None,
            causation_id: Some(&[4; 16]),
            recorded_at: 1_700_000_000_000_000,
            data: b"{}",
        }
    }

    #[test]
    fn every_field_is_covered_by_the_checksum() {
        let base = fields();
        let changed = [
            EventFields {
                position: 8,
                ..base
            },
            EventFields {
                stream: b"account-2",
                ..base
            },
            EventFields { version: 4, ..base },
            EventFields {
                event_id: &[8; 16],
                ..base
            },
            EventFields {
                event_type: b"account.closed",
                ..base
            },
            EventFields {
                schema_version: 2,
                ..base
            },
            EventFields {
                correlation_id: Some(&[4; 16]),
                ..base
            },
            EventFields {
                causation_id: None,
                ..base
            },
            EventFields {
                recorded_at: 1,
                ..base
            },
            EventFields {
                data: b"{ }",
                ..base
            },
            // Moving bytes between adjacent fields changes the checksum too.
            EventFields {
                stream: b"account-1a",
                event_type: b"ccount.opened",
                ..base
            },
        ];
        for other in changed {
            assert_ne!(base.crc(), other.crc(), "{other:?}");
        }
        assert_eq!(base.crc(), fields().crc(), "deterministic");
    }

    #[test]
    fn the_checksum_is_pinned() {
        // The format is a contract: this value changes only with FORMAT_VERSION.
        assert_eq!(fields().crc(), PINNED_CRC);
    }

    // Computed independently from the encoding described above (a bitwise CRC-32C in Python).
    const PINNED_CRC: u32 = 0x1202_b11c;
}
