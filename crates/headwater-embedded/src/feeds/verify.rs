//! `verify`'s checks of the feeds file: SQLite's integrity check, every feed row, every feed
//! event in position order, every subject with its events in sequence order, every reader row,
//! every publisher's cursor.
//! Each is a scan in index order keeping one row of state (plus one entry per feed).

use std::collections::HashMap;

use headwater_core::Position;
use rusqlite::Connection;

use super::schema::{
    SELECT_FEEDS, decode_event, decode_feed, decode_publisher, decode_subject, event_fields, int,
    reader_crc, split_key,
};
use crate::verify::{Findings, Problem, StageError, damage};

/// The feeds' columns of the key-order scan.
const SELECT_ALL_FEED_EVENTS: &str = "SELECT key, subject_id, sequence, event_id, event_type, \
     subject, time, data, source_position, crc FROM feed_events ORDER BY key";

/// What the feed scan learnt of one feed row.
struct Feed {
    name: String,
    head: u64,
    cursor: u64,
    /// The last position and source position seen in the scan.
    last: u64,
    last_source: u64,
}

/// Checks the feeds file opened on `conn` (inside a read transaction) against the log's head.
/// Returns (feeds, feed events) checked.
pub(crate) fn check_feeds(
    conn: &Connection,
    log_head: Position,
    findings: &mut Findings,
    tick: &mut dyn FnMut(u64),
) -> Result<(u64, u64), StageError> {
    let integrity = format!(
        "PRAGMA integrity_check({})",
        crate::verify::PROBLEMS_RECORDED_MAX
    );
    let mut statement = conn.prepare(&integrity).map_err(damage)?;
    let mut rows = statement.query([]).map_err(damage)?;
    while let Some(row) = rows.next().map_err(damage)? {
        let line: String = row.get(0).map_err(damage)?;
        if line != "ok" {
            findings.push(Problem::FeedIntegrity { detail: line });
        }
    }
    drop(rows);
    drop(statement);

    let mut feeds: HashMap<i64, Feed> = HashMap::new();
    let mut statement = conn.prepare(SELECT_FEEDS).map_err(damage)?;
    let mut rows = statement.query([]).map_err(damage)?;
    while let Some(row) = rows.next().map_err(damage)? {
        match decode_feed(row) {
            Err(detail) => findings.push(Problem::FeedDamage {
                feed: row
                    .get::<_, String>(1)
                    .unwrap_or_else(|_| "(unreadable)".to_owned()),
                detail,
            }),
            Ok(feed) => {
                let name = feed.state.feed.to_string();
                if feed.state.cursor > log_head {
                    findings.push(Problem::FeedAheadOfLog {
                        feed: name.clone(),
                        cursor: feed.state.cursor,
                        head: log_head,
                    });
                }
                feeds.insert(
                    feed.id,
                    Feed {
                        name,
                        head: feed.state.head.get(),
                        cursor: feed.state.cursor.0,
                        last: 0,
                        last_source: 0,
                    },
                );
            }
        }
    }
    drop(rows);
    drop(statement);

    let mut events = 0u64;
    let mut statement = conn.prepare(SELECT_ALL_FEED_EVENTS).map_err(damage)?;
    let mut rows = statement.query([]).map_err(damage)?;
    while let Some(row) = rows.next().map_err(damage)? {
        events += 1;
        if events.is_multiple_of(crate::verify::PROGRESS_INTERVAL_EVENTS) {
            tick(events);
        }
        let key = int(row, 0).unwrap_or(0);
        let (feed_id, position) = split_key(key);
        let Some(feed) = feeds.get_mut(&feed_id) else {
            findings.push(Problem::FeedDamage {
                feed: format!("feed row {feed_id}"),
                detail: format!("an event (key {key}) belongs to a feed row that does not exist"),
            });
            continue;
        };
        if let Err(detail) = decode_event(row, None) {
            findings.push(Problem::FeedDamage {
                feed: feed.name.clone(),
                detail,
            });
        }
        if position != feed.last + 1 {
            findings.push(Problem::FeedPositionGap {
                feed: feed.name.clone(),
                after: feed.last,
                next: position,
            });
        }
        feed.last = position;
        if let Ok((fields, _)) = event_fields(row) {
            let source = u64::try_from(fields.source_position).unwrap_or(0);
            if source < feed.last_source || source > feed.cursor {
                findings.push(Problem::FeedDamage {
                    feed: feed.name.clone(),
                    detail: format!(
                        "the event at position {position} is made of log position {source}, \
                         out of order or past the cursor {}",
                        feed.cursor
                    ),
                });
            }
            feed.last_source = source;
        }
    }
    drop(rows);
    drop(statement);
    let mut by_id: Vec<_> = feeds.iter().collect();
    by_id.sort_by_key(|(id, _)| **id);
    for (_, feed) in by_id {
        if feed.last != feed.head {
            findings.push(Problem::FeedHeadMismatch {
                feed: feed.name.clone(),
                head: feed.head,
                last: feed.last,
            });
        }
    }

    check_subjects(conn, &feeds, findings)?;
    let indexed: i64 = conn
        .query_row("SELECT count(*) FROM subject_events", [], |row| row.get(0))
        .map_err(damage)?;
    if u64::try_from(indexed).ok() != Some(events) {
        findings.push(Problem::FeedDamage {
            feed: "(all)".to_owned(),
            detail: format!("the subject index holds {indexed} entries for {events} feed events"),
        });
    }

    let mut statement = conn
        .prepare("SELECT feed_id, reader, first_read_at, last_read_at, reads, crc FROM readers")
        .map_err(damage)?;
    let mut rows = statement.query([]).map_err(damage)?;
    while let Some(row) = rows.next().map_err(damage)? {
        let fields = (|| -> Result<_, String> {
            Ok((
                int(row, 0)?,
                super::schema::bytes(row, 1)?.to_vec(),
                int(row, 2)?,
                int(row, 3)?,
                int(row, 4)?,
                int(row, 5)?,
            ))
        })();
        let ok = fields.as_ref().is_ok_and(|(feed, reader, a, b, n, crc)| {
            *crc == i64::from(reader_crc(*feed, reader, *a, *b, *n))
        });
        if !ok {
            let feed = fields.as_ref().map_or(0, |f| f.0);
            findings.push(Problem::FeedDamage {
                feed: feeds
                    .get(&feed)
                    .map_or_else(|| format!("feed row {feed}"), |f| f.name.clone()),
                detail: "a reader row's checksum does not match".to_owned(),
            });
        }
    }
    check_publishers(conn, &feeds, findings)?;
    Ok((feeds.len() as u64, events))
}

/// Every publisher row (a file of format 1 has none): its checksum and name, its feed, its
/// cursor at most the feed's head.
fn check_publishers(
    conn: &Connection,
    feeds: &HashMap<i64, Feed>,
    findings: &mut Findings,
) -> Result<(), StageError> {
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'publishers'",
            [],
            |row| row.get(0),
        )
        .map_err(damage)?;
    if tables == 0 {
        return Ok(());
    }
    let mut statement = conn
        .prepare(
            "SELECT publisher, position, updated_at, crc, feed_id FROM publishers \
             ORDER BY feed_id, publisher",
        )
        .map_err(damage)?;
    let mut rows = statement.query([]).map_err(damage)?;
    while let Some(row) = rows.next().map_err(damage)? {
        let feed_id = int(row, 4).unwrap_or(0);
        let Some(feed) = feeds.get(&feed_id) else {
            findings.push(Problem::FeedDamage {
                feed: format!("feed row {feed_id}"),
                detail: "a publisher's cursor belongs to a feed row that does not exist".to_owned(),
            });
            continue;
        };
        match decode_publisher(row, feed_id) {
            Err(detail) => findings.push(Problem::FeedDamage {
                feed: feed.name.clone(),
                detail,
            }),
            Ok(cursor) if cursor.position.get() > feed.head => {
                findings.push(Problem::FeedDamage {
                    feed: feed.name.clone(),
                    detail: format!(
                        "publisher {}'s cursor {} is past the feed's head {}",
                        cursor.publisher, cursor.position, feed.head
                    ),
                });
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

/// Every subject row (checksum, feed) and its events in sequence order: sequences contiguous
/// from 1, at least one, the events' subject the row's.
fn check_subjects(
    conn: &Connection,
    feeds: &HashMap<i64, Feed>,
    findings: &mut Findings,
) -> Result<(), StageError> {
    let mut subjects = conn
        .prepare("SELECT id, feed_id, subject, crc FROM subjects ORDER BY id")
        .map_err(damage)?;
    let mut events = conn
        .prepare(
            "SELECT se.subject_id, se.sequence, e.subject, e.subject_id, e.sequence, se.key \
             FROM subject_events AS se LEFT JOIN feed_events AS e ON e.key = se.key \
             ORDER BY se.subject_id, se.sequence",
        )
        .map_err(damage)?;
    let mut subject_rows = subjects.query([]).map_err(damage)?;
    let mut event_rows = events.query([]).map_err(damage)?;
    // The next event of the (subject id, sequence) scan, one ahead.
    let mut next_event = read_event(event_rows.next().map_err(damage)?)?;
    while let Some(row) = subject_rows.next().map_err(damage)? {
        let id = int(row, 0).unwrap_or(0);
        let (name, feed, text) = match decode_subject(row) {
            Ok((_, feed_id, subject)) => {
                let feed = feeds
                    .get(&feed_id)
                    .map_or_else(|| format!("feed row {feed_id}"), |f| f.name.clone());
                let text = subject.as_str().to_owned();
                (text.clone(), feed, Some(text))
            }
            Err(detail) => {
                findings.push(Problem::FeedDamage {
                    feed: "(a subject row)".to_owned(),
                    detail,
                });
                (format!("subject row {id}"), String::new(), None)
            }
        };
        // Events of subject ids without a row, before this one.
        while let Some((subject_id, _, _)) = &next_event
            && *subject_id < id
        {
            findings.push(Problem::FeedDamage {
                feed: "(unknown)".to_owned(),
                detail: format!("events belong to subject row {subject_id}, which does not exist"),
            });
            next_event = skip_subject(&mut event_rows, *subject_id)?;
        }
        let mut last = 0u64;
        while let Some((subject_id, sequence, subject)) = &next_event
            && *subject_id == id
        {
            if *sequence != last + 1 {
                findings.push(Problem::SequenceGap {
                    feed: feed.clone(),
                    subject: name.clone(),
                    after: last,
                    next: *sequence,
                });
            }
            if text.as_deref().is_some_and(|t| t != subject) {
                findings.push(Problem::FeedDamage {
                    feed: feed.clone(),
                    detail: format!(
                        "an event of subject {name} (sequence {sequence}) names subject {subject}"
                    ),
                });
            }
            last = *sequence;
            next_event = read_event(event_rows.next().map_err(damage)?)?;
        }
        if text.is_some() && last == 0 {
            findings.push(Problem::FeedDamage {
                feed,
                detail: format!("subject {name} has no events"),
            });
        }
    }
    if let Some((subject_id, _, _)) = next_event {
        findings.push(Problem::FeedDamage {
            feed: "(unknown)".to_owned(),
            detail: format!("events belong to subject row {subject_id}, which does not exist"),
        });
    }
    Ok(())
}

type EventKey = Option<(i64, u64, String)>;

fn read_event(row: Option<&rusqlite::Row<'_>>) -> Result<EventKey, StageError> {
    let Some(row) = row else { return Ok(None) };
    let subject_id: i64 = row.get(0).map_err(damage)?;
    let sequence: i64 = row.get(1).map_err(damage)?;
    let event: (Option<i64>, Option<i64>) =
        (row.get(3).map_err(damage)?, row.get(4).map_err(damage)?);
    let subject = if event == (Some(subject_id), Some(sequence)) {
        String::from_utf8_lossy(super::schema::bytes(row, 2).unwrap_or(b"?")).into_owned()
    } else {
        // The index entry points at no event, or at another subject's: the caller reports a
        // subject mismatch.
        let key: i64 = row.get(5).map_err(damage)?;
        format!("(the index entry points at key {key}, whose event is {event:?})")
    };
    Ok(Some((
        subject_id,
        u64::try_from(sequence).unwrap_or(0),
        subject,
    )))
}

fn skip_subject(rows: &mut rusqlite::Rows<'_>, subject_id: i64) -> Result<EventKey, StageError> {
    loop {
        let next = read_event(rows.next().map_err(damage)?)?;
        match &next {
            Some((id, _, _)) if *id == subject_id => continue,
            _ => return Ok(next),
        }
    }
}

#[cfg(test)]
mod tests {
    use headwater_core::FeedId;
    use headwater_store::FeedStore;

    use super::super::schema::publisher_crc;
    use crate::verify::Problem;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publisher_past_its_feeds_head_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = crate::EmbeddedStore::open(dir.path()).unwrap();
            let feeds = store.feeds().unwrap();
            feeds
                .register(&FeedId::parse("accounts.v1").unwrap())
                .await
                .unwrap();
        }
        let clean = crate::verify(dir.path(), &mut |_| {}).unwrap();
        assert!(clean.problems.is_empty(), "{clean:#?}");
        {
            // A sound row (its checksum matches) whose cursor is past the empty feed's head.
            let conn = rusqlite::Connection::open(dir.path().join("feeds.sqlite3")).unwrap();
            let crc = publisher_crc(1, b"nats", 3, 42);
            conn.execute(
                "INSERT INTO publishers (feed_id, publisher, position, updated_at, crc) \
                 VALUES (1, 'nats', 3, 42, ?1)",
                [i64::from(crc)],
            )
            .unwrap();
        }
        let report = crate::verify(dir.path(), &mut |_| {}).unwrap();
        assert_eq!(report.problems.len(), 1, "{report:#?}");
        assert!(
            report.problems.iter().any(|p| matches!(
                p,
                Problem::FeedDamage { feed, detail }
                    if feed == "accounts.v1" && detail.contains("past the feed's head")
            )),
            "{report:#?}"
        );
    }
}
