//! For the operator's tool: [`inspect`] a store's schema and [`verify`] its integrity, both
//! read-only (one `REPEATABLE READ READ ONLY` transaction each, so they see one consistent state
//! while appends go on), neither creating nor migrating anything.
//!
//! PostgreSQL already keeps the pages, the indexes and the constraints (unique positions, ids and
//! stream versions; positive counters) sound; `verify` checks what the constraints cannot say:
//! positions without holes, each stream's versions without holes and in position order, the
//! streams' heads and the log head agreeing with the events, names and types that parse; and for
//! the feeds: each feed's positions without holes and its head on its last event, each
//! subject's sequences without holes and in position order, the subject listing agreeing with
//! the events, every cursor at most the log head and at least its events' source positions,
//! every publisher's cursor of a registered feed and at most its head.
//! Every check runs in the server and sends back only what it finds, at most
//! [`PROBLEMS_RECORDED_MAX`] of each kind, so memory stays bounded whatever the store's size.

use std::fmt;
use std::time::SystemTime;

use headwater_core::{
    EventType, FeedPosition, Position, Sequence, StreamName, StreamVersion, Timestamp,
};
use tokio_postgres::Client;

use crate::reader::{micros_since_epoch, to_u64};
use crate::schema::{quote, valid_schema_name};
use crate::{ConnectError, Target};

/// The most problems of one kind a report records (all are counted).
pub const PROBLEMS_RECORDED_MAX: usize = 100;
/// The most distinct event types [`verify`] checks.
pub const EVENT_TYPES_CHECKED_MAX: i64 = 100_000;
/// The most categories [`inspect`] lists, the largest first.
pub const TOP_CATEGORIES_MAX: usize = 10;

/// What [`inspect`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Inspection {
    pub schema: String,
    /// The last migration applied (`schema_migrations`).
    pub schema_version: i32,
    pub streams: u64,
    pub events: u64,
    /// The log head (`log_head`).
    pub head: Position,
    pub first_recorded_at: Option<Timestamp>,
    pub last_recorded_at: Option<Timestamp>,
    /// The size of the schema's tables with their indexes and TOAST, in bytes.
    pub total_bytes: u64,
    pub categories: u64,
    /// The largest categories by events, at most [`TOP_CATEGORIES_MAX`].
    pub top_categories: Vec<CategoryCount>,
}

/// Streams and events of one category.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CategoryCount {
    pub category: String,
    pub streams: u64,
    pub events: u64,
}

/// Where [`verify`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerifyStage {
    /// Positions 1, 2, 3 … and the log head.
    Positions,
    /// Each stream's versions 1, 2, 3 … in position order.
    Versions,
    /// The streams' heads against their events; stream names and event types.
    Streams,
    /// The feeds: positions, sequences, heads and cursors (`total` is the feed events' count).
    Feeds,
}

impl fmt::Display for VerifyStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VerifyStage::Positions => "positions",
            VerifyStage::Versions => "stream versions",
            VerifyStage::Streams => "streams",
            VerifyStage::Feeds => "feeds",
        })
    }
}

/// [`verify`]'s progress: each stage is reported when it starts (`done` 0) and ends (`done` =
/// `total`, the event count); the work runs inside the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyProgress {
    pub stage: VerifyStage,
    pub done: u64,
    pub total: u64,
}

/// What [`verify`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    pub events_checked: u64,
    pub streams_checked: u64,
    pub feeds_checked: u64,
    pub feed_events_checked: u64,
    /// Problems in the order found, at most [`PROBLEMS_RECORDED_MAX`] of each kind.
    pub problems: Vec<Problem>,
    /// How many problems were found, recorded or not.
    pub problems_found: u64,
}

impl VerifyReport {
    /// Whether no problem was found.
    pub fn is_clean(&self) -> bool {
        self.problems_found == 0
    }
}

/// One kind of damage [`verify`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// No event has the positions from `after + 1` up to `next - 1`.
    PositionGap { after: Position, next: Position },
    /// `log_head` is not the last event's position.
    LogHead { log_head: i64, last: Position },
    /// The stream's versions, in version order, skip from `expected - 1` to `found`.
    VersionGap {
        stream: String,
        expected: StreamVersion,
        found: StreamVersion,
        position: Position,
    },
    /// Version `version` of the stream sits at a position before the previous version's.
    VersionOrder {
        stream: String,
        version: StreamVersion,
        position: Position,
        previous: Position,
    },
    /// The stream's recorded head (`None`: no row in `streams`) is not its last version
    /// (`None`: no events).
    HeadMismatch {
        stream: String,
        head: Option<i64>,
        last_version: Option<StreamVersion>,
    },
    /// A stream name, an event type or a subject that does not parse.
    InvalidName { what: &'static str, name: String },
    /// No event of the feed has the feed positions from `after + 1` up to `next - 1`.
    FeedPositionGap {
        feed: String,
        after: FeedPosition,
        next: FeedPosition,
    },
    /// The feed's recorded head is not its last event's position (`None`: the feed has events
    /// but no row in `feeds`).
    FeedHead {
        feed: String,
        head: Option<i64>,
        last: FeedPosition,
    },
    /// The subject's sequences, in sequence order, skip from `expected - 1` to `found`.
    SequenceGap {
        feed: String,
        subject: String,
        expected: Sequence,
        found: Sequence,
        position: FeedPosition,
    },
    /// Sequence `sequence` of the subject sits at a feed position before the previous one's.
    SequenceOrder {
        feed: String,
        subject: String,
        sequence: Sequence,
        position: FeedPosition,
        previous: FeedPosition,
    },
    /// The subject is listed in `feed_subjects` but has no events (`last` is `None`), or has
    /// events up to `last` but is not listed (`listed` is false).
    SubjectListing {
        feed: String,
        subject: String,
        listed: bool,
        last: Option<Sequence>,
    },
    /// The feed's projector cursor is past the log head: the feed holds events of a log that is
    /// not this one.
    CursorAhead {
        feed: String,
        cursor: i64,
        log_head: i64,
    },
    /// An event of the feed was made of an internal event after the feed's cursor.
    SourceAfterCursor {
        feed: String,
        source: Position,
        cursor: i64,
    },
    /// A publisher's cursor is past its feed's head (`None`: the feed has no row in `feeds`).
    PublisherAhead {
        feed: String,
        publisher: String,
        position: i64,
        head: Option<i64>,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::PositionGap { after, next } if next.0 == after.0 + 2 => {
                write!(f, "position {} is missing", after.0 + 1)
            }
            Problem::PositionGap { after, next } => {
                write!(f, "positions {} to {} are missing", after.0 + 1, next.0 - 1)
            }
            Problem::LogHead { log_head, last } => {
                write!(f, "the log head is {log_head}, the last event is at {last}")
            }
            Problem::VersionGap {
                stream,
                expected,
                found,
                position,
            } => write!(
                f,
                "{stream}: version {found} at position {position} follows version {}",
                expected.0 - 1
            ),
            Problem::VersionOrder {
                stream,
                version,
                position,
                previous,
            } => write!(
                f,
                "{stream}: version {version} at position {position} comes before the previous version's position {previous}"
            ),
            Problem::HeadMismatch {
                stream,
                head,
                last_version,
            } => write!(
                f,
                "{stream}: the recorded head is {}, the last event's version {}",
                head.map_or("missing".to_owned(), |h| h.to_string()),
                last_version.map_or("none".to_owned(), |v| v.to_string()),
            ),
            Problem::InvalidName { what, name } => write!(f, "an invalid {what}: {name:?}"),
            Problem::FeedPositionGap { feed, after, next } if next.0 == after.0 + 2 => {
                write!(f, "feed {feed}: position {} is missing", after.0 + 1)
            }
            Problem::FeedPositionGap { feed, after, next } => write!(
                f,
                "feed {feed}: positions {} to {} are missing",
                after.0 + 1,
                next.0 - 1
            ),
            Problem::FeedHead { feed, head, last } => write!(
                f,
                "feed {feed}: the recorded head is {}, the last event is at {last}",
                head.map_or("missing".to_owned(), |h| h.to_string()),
            ),
            Problem::SequenceGap {
                feed,
                subject,
                expected,
                found,
                position,
            } => write!(
                f,
                "feed {feed}, subject {subject}: sequence {found} at position {position} follows sequence {}",
                expected.0 - 1
            ),
            Problem::SequenceOrder {
                feed,
                subject,
                sequence,
                position,
                previous,
            } => write!(
                f,
                "feed {feed}, subject {subject}: sequence {sequence} at position {position} comes before the previous sequence's position {previous}"
            ),
            Problem::SubjectListing {
                feed,
                subject,
                listed: true,
                ..
            } => write!(
                f,
                "feed {feed}: subject {subject} is listed but has no events"
            ),
            Problem::SubjectListing {
                feed,
                subject,
                last,
                ..
            } => write!(
                f,
                "feed {feed}: subject {subject} has events (up to sequence {}) but is not listed",
                last.map_or("none".to_owned(), |v| v.to_string()),
            ),
            Problem::CursorAhead {
                feed,
                cursor,
                log_head,
            } => write!(
                f,
                "feed {feed}: the projector cursor {cursor} is past the log head {log_head}"
            ),
            Problem::SourceAfterCursor {
                feed,
                source,
                cursor,
            } => write!(
                f,
                "feed {feed}: an event made of position {source}, after the cursor {cursor}"
            ),
            Problem::PublisherAhead {
                feed,
                publisher,
                position,
                head: Some(head),
            } => write!(
                f,
                "feed {feed}: publisher {publisher}'s cursor {position} is past the head {head}"
            ),
            Problem::PublisherAhead {
                feed,
                publisher,
                position,
                head: None,
            } => write!(
                f,
                "feed {feed}: publisher {publisher} has a cursor ({position}) but the feed has no row"
            ),
        }
    }
}

/// A read-only transaction on the store's schema, after checking that it is a store this build
/// can read.
async fn open(url: &str, schema: &str) -> Result<(Client, i32), ConnectError> {
    if !valid_schema_name(schema) {
        return Err(ConnectError::InvalidSchema(schema.to_owned()));
    }
    let config: tokio_postgres::Config = url.parse().map_err(ConnectError::InvalidUrl)?;
    let target = Target {
        config,
        schema: schema.to_owned(),
        sql: std::sync::Arc::new(crate::schema::Sql::new(schema)),
    };
    let client = target.connect().await.map_err(ConnectError::Connect)?;
    let found: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("{}.schema_migrations", quote(schema))],
        )
        .await
        .map_err(ConnectError::Connect)?
        .get(0);
    if !found {
        return Err(ConnectError::NoStore {
            schema: schema.to_owned(),
        });
    }
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(ConnectError::Connect)?;
    let version: i32 = client
        .query_one(
            &format!(
                "SELECT coalesce(max(version), 0) FROM {}.schema_migrations",
                quote(schema)
            ),
            &[],
        )
        .await
        .map_err(ConnectError::Connect)?
        .get(0);
    if version > crate::SCHEMA_VERSION {
        return Err(ConnectError::NewerSchema {
            found: version,
            known: crate::SCHEMA_VERSION,
        });
    }
    Ok((client, version))
}

fn count(value: i64) -> u64 {
    to_u64(value).unwrap_or(0)
}

/// Counts and sizes of the store in `schema` at `url`. Reads only.
///
/// # Cancel safety
/// Cancel safe.
pub async fn inspect(url: &str, schema: &str) -> Result<Inspection, ConnectError> {
    let (client, schema_version) = open(url, schema).await?;
    let q = quote(schema);
    let e = ConnectError::Connect;
    let row = client
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {q}.streams),
                        (SELECT count(*) FROM {q}.events),
                        (SELECT position FROM {q}.log_head),
                        (SELECT recorded_at FROM {q}.events ORDER BY position LIMIT 1),
                        (SELECT recorded_at FROM {q}.events ORDER BY position DESC LIMIT 1),
                        (SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
                           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                          WHERE n.nspname = $1 AND c.relkind = 'r'),
                        (SELECT count(DISTINCT split_part(name, '-', 1)) FROM {q}.streams)"
            ),
            &[&schema],
        )
        .await
        .map_err(e)?;
    let timestamp =
        |t: Option<SystemTime>| t.map(|t| Timestamp::from_unix_micros(micros_since_epoch(t)));
    let rows = client
        .query(
            &format!(
                "SELECT split_part(name, '-', 1) AS category, count(*), sum(head)::bigint
                   FROM {q}.streams GROUP BY 1 ORDER BY 3 DESC, 1 LIMIT $1"
            ),
            &[&(TOP_CATEGORIES_MAX as i64)],
        )
        .await
        .map_err(e)?;
    Ok(Inspection {
        schema: schema.to_owned(),
        schema_version,
        streams: count(row.get(0)),
        events: count(row.get(1)),
        head: Position(count(row.get(2))),
        first_recorded_at: timestamp(row.get(3)),
        last_recorded_at: timestamp(row.get(4)),
        total_bytes: count(row.get(5)),
        categories: count(row.get(6)),
        top_categories: rows
            .iter()
            .map(|r| CategoryCount {
                category: r.get(0),
                streams: count(r.get(1)),
                events: count(r.get(2)),
            })
            .collect(),
    })
}

/// Checks the integrity of the store in `schema` at `url` (see the module docs). Reads only.
///
/// `Err` means the store could not be checked at all; what is wrong inside it is in the report.
///
/// # Cancel safety
/// Cancel safe.
pub async fn verify(
    url: &str,
    schema: &str,
    progress: &mut (dyn FnMut(VerifyProgress) + Send),
) -> Result<VerifyReport, ConnectError> {
    let (client, version) = open(url, schema).await?;
    let q = quote(schema);
    let e = ConnectError::Connect;
    let limit = PROBLEMS_RECORDED_MAX as i64;
    let mut problems = Vec::new();
    let mut found = 0u64;
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(max(position), 0), (SELECT position FROM {q}.log_head),
                        (SELECT count(*) FROM {q}.streams)
                   FROM {q}.events"
            ),
            &[],
        )
        .await
        .map_err(e)?;
    let total = count(row.get(0));
    let last = Position(count(row.get(1)));
    let log_head: i64 = row.get(2);
    let streams_checked = count(row.get(3));

    progress(VerifyProgress {
        stage: VerifyStage::Positions,
        done: 0,
        total,
    });
    if log_head != i64::try_from(last.0).unwrap_or(i64::MAX) {
        found += 1;
        problems.push(Problem::LogHead { log_head, last });
    }
    let gaps = format!(
        "FROM (SELECT position, lag(position, 1, 0::bigint) OVER (ORDER BY position) AS prev
                 FROM {q}.events) x
         WHERE position <> prev + 1"
    );
    found += count(
        client
            .query_one(&format!("SELECT count(*) {gaps}"), &[])
            .await
            .map_err(e)?
            .get(0),
    );
    for r in client
        .query(
            &format!("SELECT prev, position {gaps} ORDER BY position LIMIT $1"),
            &[&limit],
        )
        .await
        .map_err(e)?
    {
        problems.push(Problem::PositionGap {
            after: Position(count(r.get(0))),
            next: Position(count(r.get(1))),
        });
    }
    progress(VerifyProgress {
        stage: VerifyStage::Positions,
        done: total,
        total,
    });

    progress(VerifyProgress {
        stage: VerifyStage::Versions,
        done: 0,
        total,
    });
    let versions = format!(
        "FROM (SELECT stream, stream_version, position,
                      lag(stream_version, 1, 0::bigint) OVER w AS prev_version,
                      lag(position, 1, 0::bigint) OVER w AS prev_position
                 FROM {q}.events WINDOW w AS (PARTITION BY stream ORDER BY stream_version)) x
         WHERE stream_version <> prev_version + 1 OR position < prev_position"
    );
    found += count(
        client
            .query_one(&format!("SELECT count(*) {versions}"), &[])
            .await
            .map_err(e)?
            .get(0),
    );
    for r in client
        .query(
            &format!(
                "SELECT stream, stream_version, prev_version, position, prev_position {versions}
                 ORDER BY stream, stream_version LIMIT $1"
            ),
            &[&limit],
        )
        .await
        .map_err(e)?
    {
        let stream: String = r.get(0);
        let version = StreamVersion(count(r.get(1)));
        let prev_version: i64 = r.get(2);
        let position = Position(count(r.get(3)));
        let previous = Position(count(r.get(4)));
        if version.0 != count(prev_version) + 1 {
            problems.push(Problem::VersionGap {
                stream,
                expected: StreamVersion(count(prev_version) + 1),
                found: version,
                position,
            });
        } else {
            problems.push(Problem::VersionOrder {
                stream,
                version,
                position,
                previous,
            });
        }
    }
    progress(VerifyProgress {
        stage: VerifyStage::Versions,
        done: total,
        total,
    });

    progress(VerifyProgress {
        stage: VerifyStage::Streams,
        done: 0,
        total,
    });
    let heads = format!(
        "FROM {q}.streams s
         FULL JOIN (SELECT stream, max(stream_version) AS last FROM {q}.events GROUP BY stream) e
           ON s.name = e.stream
         WHERE s.head IS DISTINCT FROM e.last"
    );
    found += count(
        client
            .query_one(&format!("SELECT count(*) {heads}"), &[])
            .await
            .map_err(e)?
            .get(0),
    );
    for r in client
        .query(
            &format!(
                "SELECT coalesce(s.name, e.stream), s.head, e.last {heads} ORDER BY 1 LIMIT $1"
            ),
            &[&limit],
        )
        .await
        .map_err(e)?
    {
        problems.push(Problem::HeadMismatch {
            stream: r.get(0),
            head: r.get(1),
            last_version: r.get::<_, Option<i64>>(2).map(|v| StreamVersion(count(v))),
        });
    }
    // Names and types are checked here, in pages of names in order (bounded memory).
    let mut after = String::new();
    let mut bad_names = 0usize;
    loop {
        let rows = client
            .query(
                &format!("SELECT name FROM {q}.streams WHERE name > $1 ORDER BY name LIMIT 10000"),
                &[&after],
            )
            .await
            .map_err(e)?;
        let Some(last) = rows.last() else { break };
        after = last.get(0);
        for r in &rows {
            let name: String = r.get(0);
            if StreamName::new(name.as_str()).is_err() {
                found += 1;
                bad_names += 1;
                if bad_names <= PROBLEMS_RECORDED_MAX {
                    problems.push(Problem::InvalidName {
                        what: "stream name",
                        name,
                    });
                }
            }
        }
    }
    for r in client
        .query(
            &format!("SELECT DISTINCT event_type FROM {q}.events LIMIT $1"),
            &[&EVENT_TYPES_CHECKED_MAX],
        )
        .await
        .map_err(e)?
    {
        let name: String = r.get(0);
        if EventType::new(name.as_str()).is_err() {
            found += 1;
            problems.push(Problem::InvalidName {
                what: "event type",
                name,
            });
        }
    }
    progress(VerifyProgress {
        stage: VerifyStage::Streams,
        done: total,
        total,
    });
    let (feeds_checked, feed_events_checked) = if version >= FEEDS_SCHEMA_VERSION {
        verify_feeds(
            &client,
            schema,
            version,
            progress,
            &mut problems,
            &mut found,
        )
        .await?
    } else {
        (0, 0)
    };
    let _ = client.batch_execute("COMMIT").await;
    Ok(VerifyReport {
        events_checked: total,
        streams_checked,
        feeds_checked,
        feed_events_checked,
        problems,
        problems_found: found,
    })
}

/// The schema version that added the feed tables.
const FEEDS_SCHEMA_VERSION: i32 = 3;
/// The schema version that added `feed_publishers`.
const PUBLISHERS_SCHEMA_VERSION: i32 = 4;

/// Counts the rows a check finds (`FROM … WHERE …` in `from`) and fetches the first
/// [`PROBLEMS_RECORDED_MAX`] of them (`select`, ordered by `order`).
async fn check(
    client: &Client,
    from: &str,
    select: &str,
    order: &str,
    found: &mut u64,
) -> Result<Vec<tokio_postgres::Row>, ConnectError> {
    let e = ConnectError::Connect;
    *found += count(
        client
            .query_one(&format!("SELECT count(*) {from}"), &[])
            .await
            .map_err(e)?
            .get(0),
    );
    client
        .query(
            &format!("SELECT {select} {from} ORDER BY {order} LIMIT $1"),
            &[&(PROBLEMS_RECORDED_MAX as i64)],
        )
        .await
        .map_err(e)
}

/// The feed checks of [`verify`]; returns (feeds, feed events) checked.
async fn verify_feeds(
    client: &Client,
    schema: &str,
    version: i32,
    progress: &mut (dyn FnMut(VerifyProgress) + Send),
    problems: &mut Vec<Problem>,
    found: &mut u64,
) -> Result<(u64, u64), ConnectError> {
    let q = quote(schema);
    let e = ConnectError::Connect;
    let row = client
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {q}.feeds), (SELECT count(*) FROM {q}.feed_events)"
            ),
            &[],
        )
        .await
        .map_err(e)?;
    let (feeds, total) = (count(row.get(0)), count(row.get(1)));
    progress(VerifyProgress {
        stage: VerifyStage::Feeds,
        done: 0,
        total,
    });
    // A feed's name as `accounts.v2`, or `#<id>` for rows of no registered feed.
    let name = |alias: &str| {
        format!(
            "coalesce((SELECT f.name || '.v' || f.version FROM {q}.feeds f WHERE f.id = {alias}.feed),
                      '#' || {alias}.feed)"
        )
    };
    let position = |v: i64| FeedPosition(count(v));
    let sequence = |v: i64| Sequence(count(v));

    let gaps = format!(
        "FROM (SELECT feed, position,
                      lag(position, 1, 0::bigint) OVER (PARTITION BY feed ORDER BY position) AS prev
                 FROM {q}.feed_events) x
         WHERE position <> prev + 1"
    );
    let select = format!("{}, prev, position", name("x"));
    for r in check(client, &gaps, &select, "feed, position", found).await? {
        problems.push(Problem::FeedPositionGap {
            feed: r.get(0),
            after: position(r.get(1)),
            next: position(r.get(2)),
        });
    }

    let heads = format!(
        "FROM (SELECT feed, max(position) AS last FROM {q}.feed_events GROUP BY feed) x
         FULL JOIN {q}.feeds f ON f.id = x.feed
         WHERE f.head IS DISTINCT FROM coalesce(x.last, 0)"
    );
    let select =
        "coalesce(f.name || '.v' || f.version, '#' || x.feed), f.head, coalesce(x.last, 0)";
    for r in check(client, &heads, select, "1", found).await? {
        problems.push(Problem::FeedHead {
            feed: r.get(0),
            head: r.get(1),
            last: position(r.get(2)),
        });
    }

    let sequences = format!(
        "FROM (SELECT feed, subject, sequence, position,
                      lag(sequence, 1, 0::bigint) OVER w AS prev_sequence,
                      lag(position, 1, 0::bigint) OVER w AS prev_position
                 FROM {q}.feed_events WINDOW w AS (PARTITION BY feed, subject ORDER BY sequence)) x
         WHERE sequence <> prev_sequence + 1 OR position < prev_position"
    );
    let select = format!(
        "{}, subject, sequence, prev_sequence, position, prev_position",
        name("x")
    );
    for r in check(
        client,
        &sequences,
        &select,
        "feed, subject, sequence",
        found,
    )
    .await?
    {
        let (feed, subject): (String, String) = (r.get(0), r.get(1));
        let found_sequence = sequence(r.get(2));
        let prev: i64 = r.get(3);
        let at = position(r.get(4));
        if found_sequence.0 != count(prev) + 1 {
            problems.push(Problem::SequenceGap {
                feed,
                subject,
                expected: Sequence(count(prev) + 1),
                found: found_sequence,
                position: at,
            });
        } else {
            problems.push(Problem::SequenceOrder {
                feed,
                subject,
                sequence: found_sequence,
                position: at,
                previous: position(r.get(5)),
            });
        }
    }

    let listing = format!(
        "FROM {q}.feed_subjects s
         FULL JOIN (SELECT feed, subject, max(sequence) AS last FROM {q}.feed_events
                     GROUP BY feed, subject) x
           ON s.feed = x.feed AND s.subject = x.subject
         WHERE s.subject IS NULL OR x.subject IS NULL"
    );
    let select = format!(
        "coalesce((SELECT f.name || '.v' || f.version FROM {q}.feeds f
                    WHERE f.id = coalesce(s.feed, x.feed)), '#' || coalesce(s.feed, x.feed)),
         coalesce(s.subject, x.subject), s.subject IS NOT NULL, x.last"
    );
    for r in check(client, &listing, &select, "1, 2", found).await? {
        problems.push(Problem::SubjectListing {
            feed: r.get(0),
            subject: r.get(1),
            listed: r.get(2),
            last: r.get::<_, Option<i64>>(3).map(sequence),
        });
    }

    let ahead = format!("FROM {q}.feeds f, {q}.log_head l WHERE f.cursor > l.position");
    for r in check(
        client,
        &ahead,
        "f.name || '.v' || f.version, f.cursor, l.position",
        "1",
        found,
    )
    .await?
    {
        problems.push(Problem::CursorAhead {
            feed: r.get(0),
            cursor: r.get(1),
            log_head: r.get(2),
        });
    }

    let sources = format!(
        "FROM (SELECT feed, max(source_position) AS source FROM {q}.feed_events GROUP BY feed) x
         JOIN {q}.feeds f ON f.id = x.feed
         WHERE x.source > f.cursor"
    );
    for r in check(
        client,
        &sources,
        "f.name || '.v' || f.version, x.source, f.cursor",
        "1",
        found,
    )
    .await?
    {
        problems.push(Problem::SourceAfterCursor {
            feed: r.get(0),
            source: Position(count(r.get(1))),
            cursor: r.get(2),
        });
    }

    // Subjects (in the server, by the charset and length of `Subject`) and event types.
    let bad_subjects = format!(
        "FROM {q}.feed_subjects WHERE octet_length(subject) NOT BETWEEN 1 AND {max}
                                   OR subject !~ '^[A-Za-z0-9._~-]*$'",
        max = headwater_core::limits::SUBJECT_BYTES_MAX
    );
    for r in check(client, &bad_subjects, "subject", "1", found).await? {
        let name: String = r.get(0);
        problems.push(Problem::InvalidName {
            what: "subject",
            name,
        });
    }
    for r in client
        .query(
            &format!("SELECT DISTINCT event_type FROM {q}.feed_events LIMIT $1"),
            &[&EVENT_TYPES_CHECKED_MAX],
        )
        .await
        .map_err(e)?
    {
        let name: String = r.get(0);
        if EventType::new(name.as_str()).is_err() {
            *found += 1;
            problems.push(Problem::InvalidName {
                what: "integration event type",
                name,
            });
        }
    }
    if version >= PUBLISHERS_SCHEMA_VERSION {
        verify_publishers(client, &q, problems, found).await?;
    }
    progress(VerifyProgress {
        stage: VerifyStage::Feeds,
        done: total,
        total,
    });
    Ok((feeds, total))
}

/// The publishers' cursors: each of a registered feed and at most its head, each name valid.
async fn verify_publishers(
    client: &Client,
    q: &str,
    problems: &mut Vec<Problem>,
    found: &mut u64,
) -> Result<(), ConnectError> {
    let ahead = format!(
        "FROM {q}.feed_publishers p LEFT JOIN {q}.feeds f ON f.id = p.feed
         WHERE f.id IS NULL OR p.position > f.head"
    );
    for r in check(
        client,
        &ahead,
        "coalesce(f.name || '.v' || f.version, '#' || p.feed), p.publisher, p.position, f.head",
        "1, 2",
        found,
    )
    .await?
    {
        problems.push(Problem::PublisherAhead {
            feed: r.get(0),
            publisher: r.get(1),
            position: r.get(2),
            head: r.get(3),
        });
    }
    let bad_names = format!(
        "FROM {q}.feed_publishers WHERE octet_length(publisher) NOT BETWEEN 1 AND {max}
                                     OR publisher !~ '^[a-z0-9_-]*$'",
        max = headwater_core::limits::PUBLISHER_NAME_BYTES_MAX
    );
    for r in check(client, &bad_names, "publisher", "1", found).await? {
        problems.push(Problem::InvalidName {
            what: "publisher name",
            name: r.get(0),
        });
    }
    Ok(())
}
