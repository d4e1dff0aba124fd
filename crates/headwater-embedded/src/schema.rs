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

/// The columns every event read selects, in the order [`decode_event`] expects. The stream's
/// name is not joined in: readers resolve `stream_id` through a small cache (most rows of a page
/// share few streams), so a row costs no second B-tree search.
macro_rules! select_events {
    ($where:literal) => {
        concat!(
            "SELECT position, stream_id, version, event_id, event_type, schema_version, ",
            "correlation_id, causation_id, recorded_at, data, crc FROM events ",
            $where
        )
    };
}

/// The events after a position, in position order: `?1` after, `?2` limit.
pub(crate) const SELECT_ALL_AFTER: &str =
    select_events!("WHERE position > ?1 ORDER BY position LIMIT ?2");

/// One stream's events after a version, in version order: `?1` stream id, `?2` after, `?3` limit.
pub(crate) const SELECT_STREAM_AFTER: &str =
    select_events!("WHERE stream_id = ?1 AND version > ?2 ORDER BY version LIMIT ?3");

/// The event with an id: `?1` the id's 16 bytes.
pub(crate) const SELECT_BY_ID: &str = select_events!("WHERE event_id = ?1");

/// A stream's name by its row id: `?1` the id.
pub(crate) const SELECT_STREAM_NAME: &str = "SELECT name FROM streams WHERE id = ?1";

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
        let mut crc = Crc::default();
        crc.int(self.position);
        crc.bytes(self.stream);
        crc.int(self.version);
        crc.bytes(self.event_id);
        crc.bytes(self.event_type);
        crc.int(self.schema_version);
        crc.nullable(self.correlation_id);
        crc.nullable(self.causation_id);
        crc.int(self.recorded_at);
        crc.bytes(self.data);
        crc.finish()
    }
}

/// Computes a CRC-32C over the encoding fed to it, gathering small pieces in a buffer so that
/// the CRC runs over few long slices instead of many 8-byte ones.
pub(crate) struct Crc {
    crc: u32,
    buffer: [u8; CRC_BUFFER_BYTES],
    len: usize,
}

/// The buffer of [`Crc`], in bytes: room for every field of a valid event but its data.
const CRC_BUFFER_BYTES: usize = 512;

impl Default for Crc {
    fn default() -> Crc {
        Crc {
            crc: 0,
            buffer: [0; CRC_BUFFER_BYTES],
            len: 0,
        }
    }
}

impl Crc {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > CRC_BUFFER_BYTES {
            self.flush();
            if bytes.len() > CRC_BUFFER_BYTES {
                self.crc = crc32c::crc32c_append(self.crc, bytes);
                return;
            }
        }
        self.buffer[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn flush(&mut self) {
        self.crc = crc32c::crc32c_append(self.crc, &self.buffer[..self.len]);
        self.len = 0;
    }

    pub(crate) fn int(&mut self, value: i64) {
        self.put(&value.to_le_bytes());
    }

    pub(crate) fn bytes(&mut self, value: &[u8]) {
        self.put(&(value.len() as u64).to_le_bytes());
        self.put(value);
    }

    pub(crate) fn nullable(&mut self, value: Option<&[u8]>) {
        match value {
            None => self.put(&[0]),
            Some(value) => {
                self.put(&[1]);
                self.bytes(value);
            }
        }
    }

    pub(crate) fn nullable_int(&mut self, value: Option<i64>) {
        match value {
            None => self.put(&[0]),
            Some(value) => {
                self.put(&[1]);
                self.int(value);
            }
        }
    }

    pub(crate) fn finish(mut self) -> u32 {
        self.flush();
        self.crc
    }
}

/// Why a stored row is not a valid event.
#[derive(Debug)]
pub(crate) struct Corrupt {
    /// The position the row claims (0 when even that is unreadable).
    pub(crate) position: Position,
    pub(crate) detail: String,
}

/// The stream row id of a row selected with `select_events!` (column 1), to resolve its name
/// before [`decode_event`].
pub(crate) fn stream_id_of(row: &rusqlite::Row<'_>) -> Result<i64, Corrupt> {
    let position = row
        .get_ref(0)
        .ok()
        .and_then(|v| v.as_i64().ok())
        .and_then(|p| u64::try_from(p).ok())
        .map_or(Position::START, Position);
    row.get_ref(1)
        .map_err(|e| e.to_string())
        .and_then(|v| v.as_i64().map_err(|e| e.to_string()))
        .map_err(|e| Corrupt {
            position,
            detail: format!("the stream id is unreadable: {e}"),
        })
}

/// Decodes a row selected with `select_events!`, whose stream (column 1) is named `stream`,
/// checking its checksum first: a row whose checksum does not match is never turned into an
/// event. `previous_type` is the event type of the row decoded before, reused when equal (most
/// events of a page share a few types).
pub(crate) fn decode_event(
    row: &rusqlite::Row<'_>,
    stream: &StreamName,
    previous_type: Option<&EventType>,
) -> Result<RecordedEvent, Corrupt> {
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
                stream: stream.as_str().as_bytes(),
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
    let version = u64::try_from(fields.version)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| bad("the version is not positive"))?;
    let event_id = uuid(fields.event_id)
        .map(EventId::from_uuid)
        .ok_or_else(|| bad("the event id is not 16 bytes"))?;
    let event_type = match previous_type {
        Some(previous) if previous.as_str().as_bytes() == fields.event_type => previous.clone(),
        _ => std::str::from_utf8(fields.event_type)
            .ok()
            .and_then(|name| EventType::new(name).ok())
            .ok_or_else(|| bad("the event type is invalid"))?,
    };
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
        stream: stream.clone(),
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

    /// The encoding written out whole, the way the documentation states it.
    fn encoding(f: &EventFields<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        let bytes = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend_from_slice(&(b.len() as u64).to_le_bytes());
            out.extend_from_slice(b);
        };
        out.extend_from_slice(&f.position.to_le_bytes());
        bytes(&mut out, f.stream);
        out.extend_from_slice(&f.version.to_le_bytes());
        bytes(&mut out, f.event_id);
        bytes(&mut out, f.event_type);
        out.extend_from_slice(&f.schema_version.to_le_bytes());
        for id in [f.correlation_id, f.causation_id] {
            match id {
                None => out.push(0),
                Some(id) => {
                    out.push(1);
                    bytes(&mut out, id);
                }
            }
        }
        out.extend_from_slice(&f.recorded_at.to_le_bytes());
        bytes(&mut out, f.data);
        out
    }

    #[test]
    fn the_buffered_checksum_is_the_checksum_of_the_whole_encoding() {
        let long_name = vec![b'n'; CRC_BUFFER_BYTES + 17];
        let long_data = vec![b'd'; 3 * CRC_BUFFER_BYTES];
        let base = fields();
        for f in [
            base,
            EventFields {
                stream: &long_name,
                ..base
            },
            EventFields {
                data: &long_data,
                ..base
            },
            EventFields {
                event_type: &long_name[..CRC_BUFFER_BYTES - 40],
                data: &long_data[..CRC_BUFFER_BYTES - 3],
                ..base
            },
        ] {
            assert_eq!(f.crc(), crc32c::crc32c(&encoding(&f)));
        }
    }

    #[test]
    fn the_checksum_is_pinned() {
        // The format is a contract: this value changes only with FORMAT_VERSION.
        assert_eq!(fields().crc(), PINNED_CRC);
    }

    // Computed independently from the encoding described above (a bitwise CRC-32C in Python).
    const PINNED_CRC: u32 = 0x1202_b11c;
}
