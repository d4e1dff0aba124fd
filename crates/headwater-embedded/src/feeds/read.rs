//! Feed reads, on a read connection: every row's checksum is checked before it is served.

use headwater_core::limits::READ_PAGE_BYTES_MAX;
use headwater_core::{FeedId, FeedPosition, Sequence, Subject};
use headwater_store::{FeedError, FeedEvent, FeedReader, FeedState, PublisherCursor, SubjectHead};
use rusqlite::{Connection, ErrorCode, OptionalExtension};

use super::schema::{
    FEED_POSITION_MAX, FeedRow, SELECT_FEED_AFTER, SELECT_FEEDS, SELECT_PUBLISHERS,
    SELECT_SUBJECT_AFTER, SELECT_SUBJECTS_AFTER, corrupt, decode_event, decode_feed,
    decode_publisher, decode_reader, decode_subject, event_key, subject_crc,
};

/// Maps a SQLite error met reading `feed`: damage is [`FeedError::Corrupt`].
fn sqlite(feed: &FeedId) -> impl Fn(rusqlite::Error) -> FeedError + '_ {
    move |e| match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => corrupt(feed, e.to_string()),
        _ => FeedError::backend(e),
    }
}

fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A damaged feed row, reported under the feed it names when that can be read.
fn feed_row_damage(row: &rusqlite::Row<'_>, detail: String) -> FeedError {
    let name: Option<String> = row.get(1).ok();
    let version: Option<i64> = row.get(2).ok();
    let feed = name
        .zip(version)
        .and_then(|(n, v)| FeedId::parse(&format!("{n}.v{v}")).ok());
    match feed {
        Some(feed) => corrupt(&feed, detail),
        None => FeedError::backend(format!("a feed row is corrupt: {detail}")),
    }
}

pub(super) fn feeds(conn: &Connection) -> Result<Vec<FeedState>, FeedError> {
    let mut statement = conn
        .prepare_cached(SELECT_FEEDS)
        .map_err(FeedError::backend)?;
    let mut rows = statement.query([]).map_err(FeedError::backend)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(FeedError::backend)? {
        out.push(
            decode_feed(row)
                .map_err(|detail| feed_row_damage(row, detail))?
                .state,
        );
    }
    Ok(out)
}

pub(super) fn feed_row(conn: &Connection, feed: &FeedId) -> Result<Option<FeedRow>, FeedError> {
    let mut statement = conn
        .prepare_cached(
            "SELECT id, name, version, status, head, cursor, registered_at, live_at, crc \
             FROM feeds WHERE name = ?1 AND version = ?2",
        )
        .map_err(sqlite(feed))?;
    let mut rows = statement
        .query((feed.name.as_str(), i64::from(feed.version.get())))
        .map_err(sqlite(feed))?;
    let Some(row) = rows.next().map_err(sqlite(feed))? else {
        return Ok(None);
    };
    let decoded = decode_feed(row).map_err(|detail| corrupt(feed, detail))?;
    if &decoded.state.feed != feed {
        return Err(corrupt(
            feed,
            format!("the row found for it is {}'s", decoded.state.feed),
        ));
    }
    Ok(Some(decoded))
}

/// Reads event rows into a page: at most `limit` (the statement's LIMIT), stopping before the
/// event whose data would take the page past `READ_PAGE_BYTES_MAX` (at least one event).
fn page(
    feed: &FeedId,
    mut rows: rusqlite::Rows<'_>,
    limit: u64,
) -> Result<Vec<FeedEvent>, FeedError> {
    let mut out: Vec<FeedEvent> = Vec::with_capacity(limit.min(1_024) as usize);
    let mut bytes = 0usize;
    while let Some(row) = rows.next().map_err(sqlite(feed))? {
        let event = decode_event(row, out.last()).map_err(|detail| corrupt(feed, detail))?;
        if !out.is_empty() && bytes + event.data.len() > READ_PAGE_BYTES_MAX {
            break;
        }
        bytes += event.data.len();
        out.push(event);
    }
    Ok(out)
}

pub(super) fn read_feed(
    conn: &Connection,
    feed: &FeedId,
    id: i64,
    after: FeedPosition,
    limit: u64,
) -> Result<Vec<FeedEvent>, FeedError> {
    if after.get() >= FEED_POSITION_MAX {
        return Ok(Vec::new());
    }
    let mut statement = conn
        .prepare_cached(SELECT_FEED_AFTER)
        .map_err(sqlite(feed))?;
    let rows = statement
        .query((
            event_key(id, after.get()),
            event_key(id, FEED_POSITION_MAX),
            to_sql(limit),
        ))
        .map_err(sqlite(feed))?;
    let events = page(feed, rows, limit)?;
    // The checksum covers the key; check that the rows are the ones asked for.
    for (i, event) in events.iter().enumerate() {
        if event.position.get() != after.get() + 1 + i as u64 {
            return Err(corrupt(
                feed,
                format!(
                    "position {} follows position {} (a hole in the feed)",
                    event.position,
                    after.get() + i as u64
                ),
            ));
        }
    }
    Ok(events)
}

pub(super) fn subjects(
    conn: &Connection,
    feed: &FeedId,
    id: i64,
    after: Option<&Subject>,
    limit: u64,
) -> Result<Vec<SubjectHead>, FeedError> {
    let mut statement = conn
        .prepare_cached(SELECT_SUBJECTS_AFTER)
        .map_err(sqlite(feed))?;
    let mut rows = statement
        .query((id, after.map_or("", |s| s.as_str()), to_sql(limit)))
        .map_err(sqlite(feed))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(sqlite(feed))? {
        let (_, feed_id, subject) = decode_subject(row).map_err(|detail| corrupt(feed, detail))?;
        if feed_id != id {
            return Err(corrupt(
                feed,
                format!("subject {subject} belongs to feed row {feed_id}"),
            ));
        }
        let head: Option<i64> = row.get(4).map_err(sqlite(feed))?;
        let Some(head) = head.and_then(|h| u64::try_from(h).ok()).filter(|h| *h > 0) else {
            return Err(corrupt(feed, format!("subject {subject} has no events")));
        };
        out.push(SubjectHead {
            subject,
            sequence: Sequence(head),
        });
    }
    Ok(out)
}

/// The subject's row id, its checksum checked; `None` for a subject without events.
pub(super) fn subject_id(
    conn: &Connection,
    feed: &FeedId,
    id: i64,
    subject: &Subject,
) -> Result<Option<i64>, FeedError> {
    let row: Option<(i64, i64)> = conn
        .prepare_cached("SELECT id, crc FROM subjects WHERE feed_id = ?1 AND subject = ?2")
        .and_then(|mut s| {
            s.query_row((id, subject.as_str()), |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(sqlite(feed))?;
    let Some((subject_id, stored)) = row else {
        return Ok(None);
    };
    if stored != i64::from(subject_crc(subject_id, id, subject.as_str().as_bytes())) {
        return Err(corrupt(
            feed,
            format!("subject row {subject_id} ({subject}): checksum mismatch"),
        ));
    }
    Ok(Some(subject_id))
}

pub(super) fn read_subject(
    conn: &Connection,
    feed: &FeedId,
    id: i64,
    subject: &Subject,
    after: Sequence,
    limit: u64,
) -> Result<Vec<FeedEvent>, FeedError> {
    let Some(subject_id) = subject_id(conn, feed, id, subject)? else {
        return Ok(Vec::new());
    };
    let mut statement = conn
        .prepare_cached(SELECT_SUBJECT_AFTER)
        .map_err(sqlite(feed))?;
    let rows = statement
        .query((subject_id, to_sql(after.get()), to_sql(limit)))
        .map_err(sqlite(feed))?;
    let events = page(feed, rows, limit)?;
    for (i, event) in events.iter().enumerate() {
        if &event.subject != subject || event.sequence.get() != after.get() + 1 + i as u64 {
            return Err(corrupt(
                feed,
                format!(
                    "subject {subject}: sequence {} of {} found where {} was expected",
                    event.sequence,
                    event.subject,
                    after.get() + 1 + i as u64
                ),
            ));
        }
    }
    Ok(events)
}

pub(super) fn readers(
    conn: &Connection,
    feed: &FeedId,
    id: i64,
) -> Result<Vec<FeedReader>, FeedError> {
    let mut statement = conn
        .prepare_cached(
            "SELECT reader, first_read_at, last_read_at, reads, crc FROM readers \
             WHERE feed_id = ?1 ORDER BY reader",
        )
        .map_err(sqlite(feed))?;
    let mut rows = statement.query([id]).map_err(sqlite(feed))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(sqlite(feed))? {
        out.push(decode_reader(row, id).map_err(|detail| corrupt(feed, detail))?);
    }
    Ok(out)
}

pub(super) fn publishers(
    conn: &Connection,
    feed: &FeedId,
    id: i64,
) -> Result<Vec<PublisherCursor>, FeedError> {
    let mut statement = conn
        .prepare_cached(SELECT_PUBLISHERS)
        .map_err(sqlite(feed))?;
    let mut rows = statement.query([id]).map_err(sqlite(feed))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(sqlite(feed))? {
        out.push(decode_publisher(row, id).map_err(|detail| corrupt(feed, detail))?);
    }
    Ok(out)
}
