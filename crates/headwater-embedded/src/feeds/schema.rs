//! The feeds file's format: its name, the SQL schema, the format markers, the row checksums and
//! how a stored row becomes a feed event. `docs/design/storage.md` ("Feeds") describes the same
//! for readers of the files; keep the two in step.

use headwater_core::{
    EventId, EventType, FeedId, FeedName, FeedPosition, FeedStatus, FeedVersion, Position,
    Sequence, Subject, Timestamp,
};
use headwater_store::{
    FeedError, FeedEvent, FeedReader, FeedState, PublisherCursor, validate_publisher_name,
};
use rusqlite::types::ValueRef;
use uuid::Uuid;

use crate::open::Format;
use crate::schema::Crc;

/// The feeds' SQLite database file inside a store directory, beside the log's.
pub(crate) const FEEDS_FILE: &str = "feeds.sqlite3";

/// `PRAGMA application_id` of a feeds file: the ASCII bytes `HWFD`.
pub(crate) const FEEDS_APPLICATION_ID: i32 = 0x4857_4644;
/// `PRAGMA user_version` of the format described here. Version 1 had no `publishers` table
/// ([`FEEDS_UPGRADES`]).
pub(crate) const FEEDS_FORMAT_VERSION: i32 = 2;
/// The first version with the `publishers` table.
pub(crate) const PUBLISHERS_FORMAT_VERSION: i32 = 2;

/// A feed event's row id is `feed id << POSITION_BITS | position`: the events of one feed are
/// one contiguous run of the table's B-tree, in position order, with no second index.
pub(crate) const POSITION_BITS: u32 = 40;
/// The last feed position an embedded feed holds (2^40 − 1, about 1.1 × 10^12).
pub const FEED_POSITION_MAX: u64 = (1 << POSITION_BITS) - 1;
/// The most feeds one store registers (2^23 − 1, so that row ids stay below 2^63).
pub const FEEDS_MAX: i64 = (1 << (63 - POSITION_BITS)) - 1;

pub(crate) const FEEDS_SCHEMA: &str = "
CREATE TABLE feeds (
    id            INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL,
    version       INTEGER NOT NULL,
    status        TEXT    NOT NULL,
    head          INTEGER NOT NULL,
    cursor        INTEGER NOT NULL,
    registered_at INTEGER NOT NULL,
    live_at       INTEGER,
    crc           INTEGER NOT NULL,
    UNIQUE (name, version)
);
CREATE TABLE subjects (
    id      INTEGER PRIMARY KEY,
    feed_id INTEGER NOT NULL,
    subject TEXT    NOT NULL,
    crc     INTEGER NOT NULL,
    UNIQUE (feed_id, subject)
);
CREATE TABLE feed_events (
    key             INTEGER PRIMARY KEY,
    subject_id      INTEGER NOT NULL,
    sequence        INTEGER NOT NULL,
    event_id        BLOB    NOT NULL,
    event_type      TEXT    NOT NULL,
    subject         TEXT    NOT NULL,
    time            INTEGER NOT NULL,
    data            BLOB    NOT NULL,
    source_position INTEGER NOT NULL,
    crc             INTEGER NOT NULL
);
CREATE TABLE subject_events (
    subject_id INTEGER NOT NULL,
    sequence   INTEGER NOT NULL,
    key        INTEGER NOT NULL,
    PRIMARY KEY (subject_id, sequence)
) WITHOUT ROWID;
CREATE TABLE readers (
    feed_id       INTEGER NOT NULL,
    reader        TEXT    NOT NULL,
    first_read_at INTEGER NOT NULL,
    last_read_at  INTEGER NOT NULL,
    reads         INTEGER NOT NULL,
    crc           INTEGER NOT NULL,
    PRIMARY KEY (feed_id, reader)
) WITHOUT ROWID;
CREATE TABLE publishers (
    feed_id    INTEGER NOT NULL,
    publisher  TEXT    NOT NULL,
    position   INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    crc        INTEGER NOT NULL,
    PRIMARY KEY (feed_id, publisher)
) WITHOUT ROWID;
";

/// The steps from older versions (see `Format::upgrades`): 1 → 2 adds `publishers`.
pub(crate) const FEEDS_UPGRADES: &[&str] = &["
CREATE TABLE publishers (
    feed_id    INTEGER NOT NULL,
    publisher  TEXT    NOT NULL,
    position   INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    crc        INTEGER NOT NULL,
    PRIMARY KEY (feed_id, publisher)
) WITHOUT ROWID;
"];

pub(crate) const FEEDS_FORMAT: Format = Format {
    file: FEEDS_FILE,
    application_id: FEEDS_APPLICATION_ID,
    version: FEEDS_FORMAT_VERSION,
    schema: FEEDS_SCHEMA,
    upgrades: FEEDS_UPGRADES,
};

/// The columns of a feed event read, in the order [`decode_event`] expects.
macro_rules! select_feed_events {
    ($where:literal) => {
        concat!(
            "SELECT key, subject_id, sequence, event_id, event_type, subject, time, data, ",
            "source_position, crc FROM feed_events ",
            $where
        )
    };
}

/// A feed's events in a key range: `?1` after (exclusive), `?2` last (inclusive), `?3` limit.
pub(crate) const SELECT_FEED_AFTER: &str =
    select_feed_events!("WHERE key > ?1 AND key <= ?2 ORDER BY key LIMIT ?3");
/// A subject's events after a sequence, through the subject index: `?1` subject id, `?2` after,
/// `?3` limit.
pub(crate) const SELECT_SUBJECT_AFTER: &str = "SELECT e.key, e.subject_id, e.sequence, \
     e.event_id, e.event_type, e.subject, e.time, e.data, e.source_position, e.crc \
     FROM subject_events AS se JOIN feed_events AS e ON e.key = se.key \
     WHERE se.subject_id = ?1 AND se.sequence > ?2 ORDER BY se.sequence LIMIT ?3";

/// Adds an entry to the subject index: `?1` subject id, `?2` sequence, `?3` event key.
pub(crate) const INSERT_SUBJECT_EVENT: &str =
    "INSERT INTO subject_events (subject_id, sequence, key) VALUES (?1, ?2, ?3)";

pub(crate) const INSERT_FEED_EVENT: &str = "INSERT INTO feed_events (key, subject_id, sequence, \
     event_id, event_type, subject, time, data, source_position, crc) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

pub(crate) const SELECT_FEEDS: &str = "SELECT id, name, version, status, head, cursor, \
     registered_at, live_at, crc FROM feeds ORDER BY name, version";

/// The key of feed `feed`'s event at `position`.
pub(crate) fn event_key(feed: i64, position: u64) -> i64 {
    (feed << POSITION_BITS) | (position & FEED_POSITION_MAX) as i64
}

/// The (feed id, position) of an event key.
pub(crate) fn split_key(key: i64) -> (i64, u64) {
    (key >> POSITION_BITS, (key as u64) & FEED_POSITION_MAX)
}

/// A `feeds` row. The checksum covers, in this order: `id`, `name`, `version`, `status`, `head`,
/// `cursor`, `registered_at`, `live_at` (integers as 8 bytes little-endian, byte strings as their
/// length as 8 bytes little-endian then their bytes, a nullable integer as a byte `0` for NULL or
/// `1` followed by the integer) — the same encoding as the log's events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FeedRow {
    pub(crate) id: i64,
    pub(crate) state: FeedState,
}

impl FeedRow {
    pub(crate) fn crc(&self) -> u32 {
        let s = &self.state;
        let mut crc = Crc::default();
        crc.int(self.id);
        crc.bytes(s.feed.name.as_str().as_bytes());
        crc.int(i64::from(s.feed.version.get()));
        crc.bytes(s.status.as_str().as_bytes());
        crc.int(s.head.get() as i64);
        crc.int(s.cursor.0 as i64);
        crc.int(s.registered_at.unix_micros() as i64);
        crc.nullable_int(s.live_at.map(|t| t.unix_micros() as i64));
        crc.finish()
    }
}

/// A `subjects` row's checksum: `id`, `feed_id`, `subject`. (A subject's head is not stored in
/// its row, which a commit would then rewrite for every subject it touches: it is the last
/// sequence of the subject index, `subject_events`.)
pub(crate) fn subject_crc(id: i64, feed_id: i64, subject: &[u8]) -> u32 {
    let mut crc = Crc::default();
    crc.int(id);
    crc.int(feed_id);
    crc.bytes(subject);
    crc.finish()
}

/// A feed's subjects after a subject, in byte order, each with its head: `?1` feed id, `?2`
/// after (`''` for all), `?3` limit.
pub(crate) const SELECT_SUBJECTS_AFTER: &str = "SELECT s.id, s.feed_id, s.subject, s.crc, \
     (SELECT max(sequence) FROM subject_events WHERE subject_id = s.id) FROM subjects AS s \
     WHERE s.feed_id = ?1 AND s.subject > ?2 ORDER BY s.subject LIMIT ?3";

/// A subject's head: `?1` subject id.
pub(crate) const SELECT_SUBJECT_HEAD: &str =
    "SELECT max(sequence) FROM subject_events WHERE subject_id = ?1";

/// A `readers` row's checksum: `feed_id`, `reader`, `first_read_at`, `last_read_at`, `reads`.
pub(crate) fn reader_crc(feed_id: i64, reader: &[u8], first: i64, last: i64, reads: i64) -> u32 {
    let mut crc = Crc::default();
    crc.int(feed_id);
    crc.bytes(reader);
    crc.int(first);
    crc.int(last);
    crc.int(reads);
    crc.finish()
}

/// A `publishers` row's checksum: `feed_id`, `publisher`, `position`, `updated_at`.
pub(crate) fn publisher_crc(feed_id: i64, publisher: &[u8], position: i64, updated_at: i64) -> u32 {
    let mut crc = Crc::default();
    crc.int(feed_id);
    crc.bytes(publisher);
    crc.int(position);
    crc.int(updated_at);
    crc.finish()
}

/// A feed's publishers' cursors, by name: `?1` feed id. Decoded by [`decode_publisher`].
pub(crate) const SELECT_PUBLISHERS: &str = "SELECT publisher, position, updated_at, crc \
     FROM publishers WHERE feed_id = ?1 ORDER BY publisher";

/// Every field of a `feed_events` row, in the order its checksum covers them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FeedEventFields<'a> {
    pub(crate) key: i64,
    pub(crate) subject_id: i64,
    pub(crate) sequence: i64,
    pub(crate) event_id: &'a [u8],
    pub(crate) event_type: &'a [u8],
    pub(crate) subject: &'a [u8],
    pub(crate) time: i64,
    pub(crate) data: &'a [u8],
    pub(crate) source_position: i64,
}

impl FeedEventFields<'_> {
    pub(crate) fn crc(&self) -> u32 {
        let mut crc = Crc::default();
        crc.int(self.key);
        crc.int(self.subject_id);
        crc.int(self.sequence);
        crc.bytes(self.event_id);
        crc.bytes(self.event_type);
        crc.bytes(self.subject);
        crc.int(self.time);
        crc.bytes(self.data);
        crc.int(self.source_position);
        crc.finish()
    }
}

/// A stored value that is not what it should be: a detail for [`FeedError::Corrupt`].
pub(crate) type Damage = String;

fn column<'r>(row: &'r rusqlite::Row<'_>, i: usize) -> Result<ValueRef<'r>, Damage> {
    row.get_ref(i)
        .map_err(|e| format!("column {i} unreadable: {e}"))
}

pub(crate) fn int(row: &rusqlite::Row<'_>, i: usize) -> Result<i64, Damage> {
    column(row, i)?
        .as_i64()
        .map_err(|e| format!("column {i} is not an integer: {e}"))
}

pub(crate) fn bytes<'r>(row: &'r rusqlite::Row<'_>, i: usize) -> Result<&'r [u8], Damage> {
    column(row, i)?
        .as_bytes()
        .map_err(|e| format!("column {i} is not text or blob: {e}"))
}

fn nullable_int(row: &rusqlite::Row<'_>, i: usize) -> Result<Option<i64>, Damage> {
    column(row, i)?
        .as_i64_or_null()
        .map_err(|e| format!("column {i} is not an integer: {e}"))
}

fn checked(stored: i64, computed: u32, what: &str) -> Result<(), Damage> {
    if stored == i64::from(computed) {
        Ok(())
    } else {
        Err(format!(
            "{what}: checksum mismatch (stored {stored:#x}, computed {computed:#x})"
        ))
    }
}

fn unsigned(value: i64, what: &str) -> Result<u64, Damage> {
    u64::try_from(value).map_err(|_| format!("{what} is negative ({value})"))
}

/// Decodes a row of [`SELECT_FEEDS`], checking its checksum first.
pub(crate) fn decode_feed(row: &rusqlite::Row<'_>) -> Result<FeedRow, Damage> {
    let id = int(row, 0)?;
    let name = bytes(row, 1)?;
    let version = int(row, 2)?;
    let status = bytes(row, 3)?;
    let head = int(row, 4)?;
    let cursor = int(row, 5)?;
    let registered_at = int(row, 6)?;
    let live_at = nullable_int(row, 7)?;
    let stored = int(row, 8)?;
    let mut crc = Crc::default();
    crc.int(id);
    crc.bytes(name);
    crc.int(version);
    crc.bytes(status);
    crc.int(head);
    crc.int(cursor);
    crc.int(registered_at);
    crc.nullable_int(live_at);
    checked(stored, crc.finish(), &format!("feed row {id}"))?;
    let bad = |what: &str| format!("feed row {id}: checksum matches but {what}");
    let name = std::str::from_utf8(name)
        .ok()
        .and_then(|n| FeedName::new(n).ok())
        .ok_or_else(|| bad("the name is invalid"))?;
    let version = u32::try_from(version)
        .ok()
        .and_then(FeedVersion::new)
        .ok_or_else(|| bad("the version is invalid"))?;
    let status = std::str::from_utf8(status)
        .ok()
        .and_then(|s| FeedStatus::parse(s).ok())
        .ok_or_else(|| bad("the status is invalid"))?;
    Ok(FeedRow {
        id,
        state: FeedState {
            feed: FeedId::new(name, version),
            status,
            head: FeedPosition(unsigned(head, "the head")?),
            cursor: Position(unsigned(cursor, "the cursor")?),
            registered_at: Timestamp::from_unix_micros(unsigned(registered_at, "registered_at")?),
            live_at: live_at
                .map(|t| unsigned(t, "live_at").map(Timestamp::from_unix_micros))
                .transpose()?,
        },
    })
}

/// Decodes a row of `SELECT id, feed_id, subject, crc FROM subjects`, checking its checksum
/// first: (id, feed id, subject).
pub(crate) fn decode_subject(row: &rusqlite::Row<'_>) -> Result<(i64, i64, Subject), Damage> {
    let id = int(row, 0)?;
    let feed_id = int(row, 1)?;
    let subject = bytes(row, 2)?;
    checked(
        int(row, 3)?,
        subject_crc(id, feed_id, subject),
        &format!("subject row {id}"),
    )?;
    let subject = std::str::from_utf8(subject)
        .ok()
        .and_then(|s| Subject::new(s).ok())
        .ok_or_else(|| format!("subject row {id}: checksum matches but the subject is invalid"))?;
    Ok((id, feed_id, subject))
}

/// Decodes a row of `SELECT reader, first_read_at, last_read_at, reads, crc FROM readers` of
/// feed `feed_id`, checking its checksum first.
pub(crate) fn decode_reader(row: &rusqlite::Row<'_>, feed_id: i64) -> Result<FeedReader, Damage> {
    let reader = bytes(row, 0)?;
    let first = int(row, 1)?;
    let last = int(row, 2)?;
    let reads = int(row, 3)?;
    checked(
        int(row, 4)?,
        reader_crc(feed_id, reader, first, last, reads),
        "a reader row",
    )?;
    Ok(FeedReader {
        reader: String::from_utf8(reader.to_vec())
            .map_err(|_| "a reader row: checksum matches but the name is not UTF-8".to_owned())?,
        first_read_at: Timestamp::from_unix_micros(unsigned(first, "first_read_at")?),
        last_read_at: Timestamp::from_unix_micros(unsigned(last, "last_read_at")?),
        reads: unsigned(reads, "reads")?,
    })
}

/// Decodes a row of [`SELECT_PUBLISHERS`] of feed `feed_id`, checking its checksum first.
pub(crate) fn decode_publisher(
    row: &rusqlite::Row<'_>,
    feed_id: i64,
) -> Result<PublisherCursor, Damage> {
    let publisher = bytes(row, 0)?;
    let position = int(row, 1)?;
    let updated_at = int(row, 2)?;
    checked(
        int(row, 3)?,
        publisher_crc(feed_id, publisher, position, updated_at),
        "a publisher row",
    )?;
    let name = std::str::from_utf8(publisher)
        .ok()
        .filter(|name| validate_publisher_name(name).is_ok())
        .ok_or_else(|| "a publisher row: checksum matches but the name is invalid".to_owned())?;
    Ok(PublisherCursor {
        publisher: name.to_owned(),
        position: FeedPosition(unsigned(position, "a publisher's position")?),
        updated_at: Timestamp::from_unix_micros(unsigned(updated_at, "a publisher's updated_at")?),
    })
}

/// The fields of a row selected with `select_feed_events!`, before any check.
pub(crate) fn event_fields<'r>(
    row: &'r rusqlite::Row<'_>,
) -> Result<(FeedEventFields<'r>, i64), Damage> {
    Ok((
        FeedEventFields {
            key: int(row, 0)?,
            subject_id: int(row, 1)?,
            sequence: int(row, 2)?,
            event_id: bytes(row, 3)?,
            event_type: bytes(row, 4)?,
            subject: bytes(row, 5)?,
            time: int(row, 6)?,
            data: bytes(row, 7)?,
            source_position: int(row, 8)?,
        },
        int(row, 9)?,
    ))
}

/// Decodes a row selected with `select_feed_events!`, checking its checksum first: a row whose
/// checksum does not match is never turned into an event. `previous` is the event decoded
/// before, whose type and subject are reused when equal.
pub(crate) fn decode_event(
    row: &rusqlite::Row<'_>,
    previous: Option<&FeedEvent>,
) -> Result<FeedEvent, Damage> {
    let (f, stored) = event_fields(row)?;
    let (_, position) = split_key(f.key);
    checked(
        stored,
        f.crc(),
        &format!("feed event at position {position}"),
    )?;
    let bad =
        |what: &str| format!("feed event at position {position}: checksum matches but {what}");
    if position == 0 {
        return Err(bad("the position is 0"));
    }
    let sequence = u64::try_from(f.sequence)
        .ok()
        .filter(|s| *s > 0)
        .ok_or_else(|| bad("the sequence is not positive"))?;
    let id = <[u8; 16]>::try_from(f.event_id)
        .map(|b| EventId::from_uuid(Uuid::from_bytes(b)))
        .map_err(|_| bad("the event id is not 16 bytes"))?;
    let event_type = match previous {
        Some(p) if p.event_type.as_str().as_bytes() == f.event_type => p.event_type.clone(),
        _ => std::str::from_utf8(f.event_type)
            .ok()
            .and_then(|t| EventType::new(t).ok())
            .ok_or_else(|| bad("the event type is invalid"))?,
    };
    let subject = match previous {
        Some(p) if p.subject.as_str().as_bytes() == f.subject => p.subject.clone(),
        _ => std::str::from_utf8(f.subject)
            .ok()
            .and_then(|s| Subject::new(s).ok())
            .ok_or_else(|| bad("the subject is invalid"))?,
    };
    Ok(FeedEvent {
        position: FeedPosition(position),
        sequence: Sequence(sequence),
        id,
        event_type,
        subject,
        time: Timestamp::from_unix_micros(
            u64::try_from(f.time).map_err(|_| bad("the time is negative"))?,
        ),
        data: f.data.to_vec(),
        source_position: Position(
            u64::try_from(f.source_position).map_err(|_| bad("the source position is negative"))?,
        ),
    })
}

/// A damaged row of `feed`, as the error reads report.
pub(crate) fn corrupt(feed: &FeedId, detail: Damage) -> FeedError {
    FeedError::Corrupt {
        feed: feed.clone(),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_back() {
        for (feed, position) in [(1, 1), (7, FEED_POSITION_MAX), (FEEDS_MAX, 12345)] {
            let key = event_key(feed, position);
            assert!(key > 0);
            assert_eq!(split_key(key), (feed, position));
        }
        assert!(event_key(1, FEED_POSITION_MAX) < event_key(2, 1));
    }

    #[test]
    fn every_event_field_is_covered_by_the_checksum() {
        let base = FeedEventFields {
            key: event_key(1, 5),
            subject_id: 3,
            sequence: 2,
            event_id: &[1; 16],
            event_type: b"accounts.opened",
            subject: b"a",
            time: 10,
            data: b"{}",
            source_position: 9,
        };
        let changed = [
            FeedEventFields {
                key: event_key(2, 5),
                ..base
            },
            FeedEventFields {
                subject_id: 4,
                ..base
            },
            FeedEventFields {
                sequence: 3,
                ..base
            },
            FeedEventFields {
                event_id: &[2; 16],
                ..base
            },
            FeedEventFields {
                event_type: b"accounts.closed",
                ..base
            },
            FeedEventFields {
                subject: b"b",
                ..base
            },
            FeedEventFields { time: 11, ..base },
            FeedEventFields {
                data: b"{ }",
                ..base
            },
            FeedEventFields {
                source_position: 8,
                ..base
            },
        ];
        for other in changed {
            assert_ne!(base.crc(), other.crc(), "{other:?}");
        }
    }
}
