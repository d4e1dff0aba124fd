//! The tables, their versioned migrations, and every SQL statement the store runs, written for
//! one schema.
//!
//! A store lives in one PostgreSQL schema (`headwater` by default). `connect` creates and
//! migrates it under a session advisory lock, so replicas that start at once take turns: the
//! first applies the missing migrations, the others find them applied.

use tokio_postgres::Client;
use uuid::Uuid;

use crate::ConnectError;

/// One step of the schema's history. Applied in order, each in its own transaction together with
/// its row in `schema_migrations`; never edited once released (add a new one instead).
#[derive(Debug)]
pub(crate) struct Migration {
    pub(crate) version: i32,
    pub(crate) description: &'static str,
    /// The statements; `{schema}` stands for the quoted schema name.
    pub(crate) sql: &'static str,
}

/// The schema's history. The last version is what this build reads and writes.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "events, streams, the log head, leader terms",
        sql: r#"
CREATE TABLE {schema}.events (
    position        bigint      PRIMARY KEY CHECK (position > 0),
    stream          text        NOT NULL,
    stream_version  bigint      NOT NULL CHECK (stream_version > 0),
    event_id        uuid        NOT NULL,
    event_type      text        NOT NULL,
    schema_version  bigint      NOT NULL CHECK (schema_version > 0),
    correlation_id  uuid,
    causation_id    uuid,
    recorded_at     timestamptz NOT NULL,
    data            bytea       NOT NULL,
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_version_key UNIQUE (stream, stream_version)
);
CREATE TABLE {schema}.streams (
    name  text   PRIMARY KEY,
    head  bigint NOT NULL CHECK (head > 0)
);
CREATE TABLE {schema}.log_head (
    only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    position  bigint  NOT NULL CHECK (position >= 0)
);
INSERT INTO {schema}.log_head (position) VALUES (0);
CREATE TABLE {schema}.leader_terms (
    name  text   PRIMARY KEY,
    term  bigint NOT NULL
);
"#,
    },
    Migration {
        version: 2,
        description: "append_group: a group's fast path in one statement",
        sql: APPEND_GROUP,
    },
    Migration {
        version: 3,
        description: "integration feeds: feeds, feed_events, feed_subjects, feed_readers, feed_commit",
        sql: FEEDS,
    },
    Migration {
        version: 4,
        description: "feed_publishers: each feed's publishers' cursors",
        sql: FEED_PUBLISHERS,
    },
];

/// Each publisher's cursor of each feed: the last feed position its broker confirmed, moved by
/// compare-and-set (`FeedSql::advance_publisher`). Publisher names use the `"C"` collation, as
/// subjects and readers do: listed in byte order. No foreign key, as for the other feed tables.
const FEED_PUBLISHERS: &str = r#"
CREATE TABLE {schema}.feed_publishers (
    feed        integer     NOT NULL,
    publisher   text        COLLATE "C" NOT NULL,
    position    bigint      NOT NULL CHECK (position >= 0),
    updated_at  timestamptz NOT NULL,
    CONSTRAINT feed_publishers_pkey PRIMARY KEY (feed, publisher)
);
"#;

/// The feed tables (`docs/design/postgres.md`, "Feeds") and `feed_commit`, the one statement of
/// a projector's commit.
///
/// A feed is known by a small integer `id` everywhere but in `feeds`, to keep the event rows and
/// their indexes narrow. No foreign keys: the store never deletes a feed, and a per-row RI check
/// would cost the backfill about as much as the insert. Subjects (and reader names) use the
/// `"C"` collation: listings are in byte order, whatever the database's default collation.
/// `feed_subjects` lists each feed's subjects (written once, when a subject first appears); a
/// subject's head is read from the end of its range in `feed_events`' `(feed, subject, sequence)`
/// index, so a commit writes nothing per known subject.
///
/// `feed_commit(name, version, from, to, events as parallel arrays, channel)` locks the feed's
/// row (`FOR UPDATE`: the serialisation point of one feed's commits, held until `COMMIT`),
/// checks the cursor (else raises `HW412` with the actual cursor as the error's detail, writing
/// nothing; an unknown feed raises `HW404`), numbers the events — positions after the head in
/// array order, sequences after each subject's head by the rank the client gave — inserts them in one
/// statement, lists the new subjects in `feed_subjects`, moves the feed's head and cursor, notifies
/// `<channel>` with `<feed> <new head>` when the head moved, and returns the new head.
const FEEDS: &str = r#"
CREATE TABLE {schema}.feeds (
    id             integer     GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name           text        COLLATE "C" NOT NULL,
    version        bigint      NOT NULL CHECK (version > 0),
    status         text        NOT NULL CHECK (status IN ('backfilling', 'live', 'retired')),
    head           bigint      NOT NULL DEFAULT 0 CHECK (head >= 0),
    cursor         bigint      NOT NULL DEFAULT 0 CHECK (cursor >= 0),
    registered_at  timestamptz NOT NULL,
    live_at        timestamptz,
    CONSTRAINT feeds_name_version_key UNIQUE (name, version)
);
CREATE TABLE {schema}.feed_events (
    feed             integer     NOT NULL,
    position         bigint      NOT NULL CHECK (position > 0),
    subject          text        COLLATE "C" NOT NULL,
    sequence         bigint      NOT NULL CHECK (sequence > 0),
    event_id         uuid        NOT NULL,
    event_type       text        NOT NULL,
    time             timestamptz NOT NULL,
    data             bytea       NOT NULL,
    source_position  bigint      NOT NULL CHECK (source_position > 0),
    CONSTRAINT feed_events_pkey PRIMARY KEY (feed, position),
    CONSTRAINT feed_events_subject_sequence_key UNIQUE (feed, subject, sequence)
);
CREATE TABLE {schema}.feed_subjects (
    feed      integer NOT NULL,
    subject   text    COLLATE "C" NOT NULL,
    CONSTRAINT feed_subjects_pkey PRIMARY KEY (feed, subject)
);
CREATE TABLE {schema}.feed_readers (
    feed           integer     NOT NULL,
    reader         text        COLLATE "C" NOT NULL,
    first_read_at  timestamptz NOT NULL,
    last_read_at   timestamptz NOT NULL,
    reads          bigint      NOT NULL CHECK (reads >= 0),
    CONSTRAINT feed_readers_pkey PRIMARY KEY (feed, reader)
);
CREATE FUNCTION {schema}.feed_commit(
    p_name text, p_version bigint, p_from bigint, p_to bigint,
    p_ids uuid[], p_types text[], p_subjects text[], p_subject_indexes integer[],
    p_ranks bigint[], p_times timestamptz[], p_data bytea[], p_sources bigint[],
    p_distinct_subjects text[], p_channel text
) RETURNS bigint LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_feed integer;
    v_head bigint;
    v_cursor bigint;
    v_count bigint;
    v_priors bigint[];
BEGIN
    SELECT id, head, cursor INTO v_feed, v_head, v_cursor FROM {schema}.feeds
     WHERE name = p_name AND version = p_version FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'headwater: no feed %.v%', p_name, p_version USING ERRCODE = 'HW404';
    END IF;
    IF v_cursor <> p_from THEN
        RAISE EXCEPTION 'headwater: the cursor of feed %.v% moved', p_name, p_version
            USING ERRCODE = 'HW412', DETAIL = v_cursor::text;
    END IF;
    v_count := coalesce(cardinality(p_ids), 0);
    IF v_count > 0 THEN
        -- The heads of the batch's distinct subjects before it: one probe each of the end of
        -- the subject's range in the (feed, subject, sequence) index, however many subjects the
        -- feed has (a LATERAL aggregate: the planner cannot turn the probes into a scan of
        -- every subject of the feed joined by hash).
        SELECT array_agg(coalesce(h.sequence, 0) ORDER BY d.i)
          INTO v_priors
          FROM unnest(p_distinct_subjects) WITH ORDINALITY AS d(subject, i)
          LEFT JOIN LATERAL (SELECT max(fe.sequence) AS sequence FROM {schema}.feed_events fe
                              WHERE fe.feed = v_feed AND fe.subject = d.subject) h
            ON true;
        -- The client numbered each event within the batch (its subject's index in the distinct
        -- subjects, its rank among the batch's events of that subject): a sequence is the
        -- subject's head plus the rank, with no join and no sort here.
        INSERT INTO {schema}.feed_events (feed, position, subject, sequence, event_id, event_type,
                                          time, data, source_position)
        SELECT v_feed, v_head + e.ord, e.subject, v_priors[e.si] + e.rank,
               e.id, e.typ, e.tim, e.dat, e.src
          FROM unnest(p_ids, p_types, p_subjects, p_subject_indexes, p_ranks, p_times, p_data,
                      p_sources)
               WITH ORDINALITY AS e(id, typ, subject, si, rank, tim, dat, src, ord);
        -- Only new subjects are written (a subject's head is read from the events' index).
        INSERT INTO {schema}.feed_subjects (feed, subject)
        SELECT v_feed, p.subject
          FROM unnest(p_distinct_subjects, v_priors) AS p(subject, prior)
         WHERE p.prior = 0;
        PERFORM pg_notify(p_channel, p_name || '.v' || p_version || ' ' || (v_head + v_count));
    END IF;
    UPDATE {schema}.feeds SET head = v_head + v_count, cursor = p_to WHERE id = v_feed;
    RETURN v_head + v_count;
END
$fn$;
"#;

/// The SQLSTATE `feed_commit` raises when the feed's cursor is not the batch's start.
pub(crate) const CURSOR_MOVED_SQLSTATE: &str = "HW412";
/// The SQLSTATE `feed_commit` raises for a feed that is not registered.
pub(crate) const UNKNOWN_FEED_SQLSTATE: &str = "HW404";

/// The fast path of a group commit, run by the writer as `BEGIN; SELECT append_group(…);
/// COMMIT` in one flight. It takes the log head lock first; every statement after that runs in a
/// fresh snapshot (a VOLATILE PL/pgSQL function takes one per statement), which includes every
/// group committed before. The appends are given as parallel arrays (stream, expected version
/// encoded as -1 any / -2 no stream / -3 stream exists / v exact, event count), their events
/// as parallel arrays in order. Returns `[head before, prior version of append 1, …]`. When an
/// expectation fails it raises SQLSTATE `HW409` (writing nothing; an error, so that the
/// transaction rolls back instead of committing, which would flush the WAL for nothing); a
/// recorded event id raises the unique violation of `events_event_id_key`. Either way the writer
/// decides the group again, append by append.
const APPEND_GROUP: &str = r#"
CREATE FUNCTION {schema}.append_group(
    p_streams text[], p_expected bigint[], p_counts bigint[],
    p_event_ids uuid[], p_event_types text[], p_schema_versions bigint[],
    p_correlation_ids uuid[], p_causation_ids uuid[], p_data bytea[],
    p_recorded_at timestamptz, p_channel text
) RETURNS bigint[] LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_start bigint;
    v_priors bigint[];
    v_refused boolean;
    v_total bigint;
BEGIN
    SELECT position INTO v_start FROM {schema}.log_head FOR UPDATE;
    SELECT array_agg(a.prior ORDER BY a.idx),
           coalesce(bool_or(NOT CASE
               WHEN a.exp = -1 THEN true
               WHEN a.exp = -2 THEN a.prior = 0
               WHEN a.exp = -3 THEN a.prior > 0
               ELSE a.prior = a.exp END), false)
      INTO v_priors, v_refused
      FROM (SELECT u.idx, u.exp,
                   coalesce(s.head, 0) + coalesce((sum(u.cnt) OVER (PARTITION BY u.stream
                       ORDER BY u.idx ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING))::bigint,
                       0) AS prior
              FROM unnest(p_streams, p_expected, p_counts) WITH ORDINALITY AS u(stream, exp, cnt, idx)
              LEFT JOIN {schema}.streams s ON s.name = u.stream) a;
    IF v_refused THEN
        -- An error rolls back without the WAL flush a COMMIT would cost.
        RAISE EXCEPTION 'headwater: an expected version does not hold' USING ERRCODE = 'HW409';
    END IF;
    INSERT INTO {schema}.events (position, stream, stream_version, event_id, event_type,
                                 schema_version, correlation_id, causation_id, recorded_at, data)
    SELECT v_start + e.ord, a.stream, a.prior + g.k, e.id, e.typ, e.sv, e.corr, e.caus,
           p_recorded_at, e.dat
      FROM (SELECT u.stream, u.cnt, u.prior,
                   (sum(u.cnt) OVER (ORDER BY u.idx))::bigint - u.cnt AS before
              FROM unnest(p_streams, p_counts, v_priors) WITH ORDINALITY AS u(stream, cnt, prior, idx)) a
     CROSS JOIN LATERAL generate_series(1::bigint, a.cnt) AS g(k)
      JOIN unnest(p_event_ids, p_event_types, p_schema_versions, p_correlation_ids, p_causation_ids, p_data)
           WITH ORDINALITY AS e(id, typ, sv, corr, caus, dat, ord)
        ON e.ord = a.before + g.k;
    INSERT INTO {schema}.streams (name, head)
    SELECT u.stream, max(u.prior + u.cnt)
      FROM unnest(p_streams, p_counts, v_priors) AS u(stream, cnt, prior)
     GROUP BY u.stream
    ON CONFLICT (name) DO UPDATE SET head = EXCLUDED.head;
    v_total := (SELECT sum(c)::bigint FROM unnest(p_counts) AS c);
    UPDATE {schema}.log_head SET position = v_start + v_total;
    PERFORM pg_notify(p_channel, (v_start + v_total)::text);
    RETURN v_start || v_priors;
END
$fn$;
"#;

/// The SQLSTATE `append_group` raises when an expected version does not hold.
pub(crate) const REFUSED_SQLSTATE: &str = "HW409";

/// The newest schema version this build knows.
pub(crate) fn current_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Whether `name` is a schema name the store accepts: lower-case ASCII letters, digits and `_`,
/// starting with a letter or `_`, at most [`crate::SCHEMA_NAME_BYTES_MAX`] bytes. (Kept simple so
/// that it is also a valid `LISTEN` channel and never needs escaping.)
pub(crate) fn valid_schema_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    let Some(first) = bytes.next() else {
        return false;
    };
    name.len() <= crate::SCHEMA_NAME_BYTES_MAX
        && (first.is_ascii_lowercase() || first == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.starts_with("pg_")
}

/// A 64-bit advisory lock key for `purpose` in `schema`: stable across builds and processes.
pub(crate) fn lock_key(schema: &str, purpose: &str) -> i64 {
    let namespace = Uuid::from_u128(0x6865_6164_7761_7465_725f_6c6f_636b_7321);
    let uuid = Uuid::new_v5(&namespace, format!("{schema}/{purpose}").as_bytes());
    let bytes = uuid.as_bytes();
    i64::from_be_bytes([
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
    ])
}

/// Creates the schema if needed and applies the missing migrations, under a session advisory
/// lock held on `client` for the duration (other replicas wait for it).
pub(crate) async fn migrate(client: &Client, schema: &str) -> Result<(), ConnectError> {
    let key = lock_key(schema, "migrate");
    client
        .execute("SELECT pg_advisory_lock($1)", &[&key])
        .await
        .map_err(ConnectError::Migrate)?;
    let result = migrate_locked(client, schema).await;
    // If unlocking fails the connection is gone, and with it the lock.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await;
    result
}

async fn migrate_locked(client: &Client, schema: &str) -> Result<(), ConnectError> {
    let q = quote(schema);
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {q};
             CREATE TABLE IF NOT EXISTS {q}.schema_migrations (
                 version     integer     PRIMARY KEY,
                 description text        NOT NULL,
                 applied_at  timestamptz NOT NULL DEFAULT now()
             );"
        ))
        .await
        .map_err(ConnectError::Migrate)?;
    let row = client
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM {q}.schema_migrations"),
            &[],
        )
        .await
        .map_err(ConnectError::Migrate)?;
    let applied: i32 = row.get(0);
    if applied > current_version() {
        return Err(ConnectError::NewerSchema {
            found: applied,
            known: current_version(),
        });
    }
    for migration in MIGRATIONS.iter().filter(|m| m.version > applied) {
        let sql = migration.sql.replace("{schema}", &q);
        let record = format!(
            "INSERT INTO {q}.schema_migrations (version, description) VALUES ({}, '{}')",
            migration.version,
            migration.description.replace('\'', "''"),
        );
        client
            .batch_execute(&format!("BEGIN;\n{sql};\n{record};\nCOMMIT;"))
            .await
            .map_err(ConnectError::Migrate)?;
        tracing::info!(schema, version = migration.version, "applied migration");
    }
    Ok(())
}

/// The schema name as a quoted identifier. Schema names are checked by [`valid_schema_name`], so
/// there is nothing to escape; quoting keeps reserved words usable.
pub(crate) fn quote(schema: &str) -> String {
    debug_assert!(valid_schema_name(schema));
    format!("\"{schema}\"")
}

/// The columns of an event, in the order [`crate::reader::event_from_row`] reads them.
pub(crate) const EVENT_COLUMNS: &str = "position, stream, stream_version, event_id, event_type, \
     schema_version, correlation_id, causation_id, recorded_at, data";

/// The columns of a feed event, in the order `crate::feed::event_from_row` reads them.
pub(crate) const FEED_EVENT_COLUMNS: &str =
    "position, sequence, event_id, event_type, subject, time, data, source_position";

/// The columns of a feed's state, in the order `crate::feed::state_from_row` reads them.
pub(crate) const FEED_COLUMNS: &str = "name, version, status, head, cursor, registered_at, live_at";

/// A page of rows of `table` whose `key` is contiguous within `filter`: the rows after `after`,
/// at most `limit`, stopping once their data reach `bytes` (but always holding the first).
/// The page is the key range after `after` of the length that fits: usually the whole limit,
/// checked by one sum over the page's lengths; only a page over the byte limit pays for a
/// running sum.
fn page_query(
    q: &str,
    table: &str,
    columns: &str,
    filter: &str,
    [key, after, limit, bytes]: [&str; 4],
) -> String {
    let lengths = |what: &str| {
        format!(
            "SELECT {what} FROM {q}.{table} WHERE {filter} AND {key} > {after}
             ORDER BY {key} LIMIT {limit}"
        )
    };
    format!(
        "SELECT {columns} FROM {q}.{table}
         WHERE {filter} AND {key} > {after} AND {key} <= {after} + (
             SELECT CASE WHEN coalesce(sum(page.len), 0) <= {bytes} THEN count(*)
                    ELSE (SELECT greatest(1, count(*) FILTER (WHERE sized.upto <= {bytes}))
                            FROM (SELECT sum(octet_length(w.data)) OVER (ORDER BY w.{key}
                                         ROWS UNBOUNDED PRECEDING) AS upto
                                    FROM ({window}) w) sized)
                    END
               FROM ({sizes}) page)
         ORDER BY {key}",
        window = lengths(&format!("{key}, data")),
        sizes = lengths("octet_length(data) AS len"),
    )
}

/// Every statement of the feed store, for one schema.
#[derive(Debug)]
pub(crate) struct FeedSql {
    pub(crate) register: String,
    pub(crate) feed: String,
    pub(crate) feeds: String,
    pub(crate) feed_id: String,
    pub(crate) set_status: String,
    pub(crate) commit: String,
    pub(crate) read_feed: String,
    pub(crate) subjects: String,
    pub(crate) read_subject: String,
    pub(crate) record_readers: String,
    pub(crate) readers: String,
    pub(crate) advance_publisher: String,
    pub(crate) publisher: String,
    pub(crate) publishers: String,
    /// Every feed's head, for the listener's poll.
    pub(crate) heads: String,
    /// The `NOTIFY` channel of feed heads (`<schema>.feeds`).
    pub(crate) channel: String,
}

impl FeedSql {
    fn new(schema: &str) -> FeedSql {
        let q = quote(schema);
        FeedSql {
            register: format!(
                "INSERT INTO {q}.feeds (name, version, status, registered_at)
                 VALUES ($1, $2, 'backfilling', now())
                 ON CONFLICT (name, version) DO NOTHING"
            ),
            feed: format!(
                "SELECT id, {FEED_COLUMNS} FROM {q}.feeds WHERE name = $1 AND version = $2"
            ),
            feeds: format!("SELECT id, {FEED_COLUMNS} FROM {q}.feeds ORDER BY name, version"),
            feed_id: format!("SELECT id FROM {q}.feeds WHERE name = $1 AND version = $2"),
            set_status: format!(
                "UPDATE {q}.feeds
                    SET status = $3::text,
                        live_at = CASE WHEN $3::text = 'live' THEN coalesce(live_at, now())
                                       ELSE live_at END
                  WHERE name = $1 AND version = $2
                 RETURNING id, {FEED_COLUMNS}"
            ),
            commit: format!(
                "SELECT {q}.feed_commit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
            ),
            // (feed, after, event limit, byte limit)
            read_feed: page_query(
                &q,
                "feed_events",
                FEED_EVENT_COLUMNS,
                "feed = $1",
                ["position", "$2", "$3", "$4"],
            ),
            // Each head is the end of the subject's range in the events' index; in one
            // statement, so the heads are those of one snapshot.
            subjects: format!(
                "SELECT s.subject, (SELECT max(e.sequence) FROM {q}.feed_events e
                                     WHERE e.feed = s.feed AND e.subject = s.subject)
                   FROM {q}.feed_subjects s
                  WHERE s.feed = $1 AND s.subject > $2 ORDER BY s.subject LIMIT $3"
            ),
            // (feed, subject, after, event limit, byte limit)
            read_subject: page_query(
                &q,
                "feed_events",
                FEED_EVENT_COLUMNS,
                "feed = $1 AND subject = $2",
                ["sequence", "$3", "$4", "$5"],
            ),
            // Several sightings of one reader of one feed are folded first: an upsert may touch
            // a row once per statement.
            record_readers: format!(
                "INSERT INTO {q}.feed_readers (feed, reader, first_read_at, last_read_at, reads)
                 SELECT f.id, s.reader, min(s.at), max(s.at),
                        least(sum(s.reads), 9223372036854775807)::bigint
                   FROM unnest($1::text[], $2::bigint[], $3::text[], $4::timestamptz[],
                               $5::bigint[]) AS s(name, version, reader, at, reads)
                   JOIN {q}.feeds f ON f.name = s.name AND f.version = s.version
                  GROUP BY f.id, s.reader
                 ON CONFLICT (feed, reader) DO UPDATE
                    SET first_read_at = least({q}.feed_readers.first_read_at, EXCLUDED.first_read_at),
                        last_read_at = greatest({q}.feed_readers.last_read_at, EXCLUDED.last_read_at),
                        reads = least({q}.feed_readers.reads::numeric + EXCLUDED.reads,
                                      9223372036854775807)::bigint"
            ),
            readers: format!(
                "SELECT reader, first_read_at, last_read_at, reads FROM {q}.feed_readers
                  WHERE feed = $1 ORDER BY reader"
            ),
            // (name, version, publisher, from, to) → one row (the feed's head, the cursor in
            // the statement's snapshot, and the moved cursor's position and time, NULL when it
            // did not move), or none for an unknown feed. The compare-and-set is the upsert's
            // `WHERE`: it sees the row's latest version (a concurrent advance committed first
            // makes it false). A cursor is created only from START. `to <= head` is checked in
            // the same statement; `to >= from` and the name by the client.
            advance_publisher: format!(
                "WITH f AS (SELECT id, head FROM {q}.feeds WHERE name = $1::text AND version = $2::bigint),
                      cur AS (SELECT p.position FROM {q}.feed_publishers p, f
                               WHERE p.feed = f.id AND p.publisher = $3::text),
                      moved AS (
                        INSERT INTO {q}.feed_publishers AS p (feed, publisher, position, updated_at)
                        SELECT f.id, $3::text, $5::bigint, now() FROM f
                         WHERE $5::bigint <= f.head
                           AND ($4::bigint = 0 OR EXISTS (SELECT 1 FROM cur))
                        ON CONFLICT (feed, publisher) DO UPDATE
                           SET position = EXCLUDED.position, updated_at = EXCLUDED.updated_at
                         WHERE p.position = $4::bigint
                        RETURNING p.position, p.updated_at)
                 SELECT f.head, (SELECT position FROM cur), m.position, m.updated_at
                   FROM f LEFT JOIN moved m ON true"
            ),
            // (feed, publisher): the cursor now, for a refused advance whose snapshot saw the
            // cursor at its `from` (a concurrent advance won).
            publisher: format!(
                "SELECT position FROM {q}.feed_publishers WHERE feed = $1 AND publisher = $2"
            ),
            publishers: format!(
                "SELECT publisher, position, updated_at FROM {q}.feed_publishers
                  WHERE feed = $1 ORDER BY publisher"
            ),
            heads: format!("SELECT name, version, head FROM {q}.feeds"),
            channel: format!("{schema}.feeds"),
        }
    }
}

/// Every statement the store runs, for one schema.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) lock_head: String,
    pub(crate) read_head: String,
    pub(crate) set_head: String,
    pub(crate) stream_head: String,
    /// Skips rows whose event id is recorded (the slow path counts the rows it wrote).
    pub(crate) insert_events_or_skip: String,
    pub(crate) upsert_streams: String,
    pub(crate) delete_from: String,
    pub(crate) find_id: String,
    pub(crate) find_ids: String,
    pub(crate) stream_run: String,
    pub(crate) read_all: String,
    pub(crate) read_stream: String,
    pub(crate) find_event: String,
    pub(crate) next_term: String,
    pub(crate) append_group: String,
    /// The `NOTIFY` channel of this store (the schema's name).
    pub(crate) channel: String,
    pub(crate) feeds: FeedSql,
}

impl Sql {
    pub(crate) fn new(schema: &str) -> Sql {
        let q = quote(schema);
        let page = |filter: &str, key: &str, after: &str, limit: &str, bytes: &str| {
            page_query(
                &q,
                "events",
                EVENT_COLUMNS,
                filter,
                [key, after, limit, bytes],
            )
        };
        let insert = format!(
            "INSERT INTO {q}.events ({EVENT_COLUMNS})
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::uuid[],
                                  $5::text[], $6::bigint[], $7::uuid[], $8::uuid[],
                                  $9::timestamptz[], $10::bytea[])"
        );
        Sql {
            lock_head: format!("SELECT position FROM {q}.log_head FOR UPDATE"),
            read_head: format!("SELECT position FROM {q}.log_head"),
            set_head: format!(
                "WITH moved AS (UPDATE {q}.log_head SET position = $1)
                 SELECT pg_notify($2, $1::text)"
            ),
            stream_head: format!("SELECT head FROM {q}.streams WHERE name = $1"),
            insert_events_or_skip: format!("{insert} ON CONFLICT (event_id) DO NOTHING"),
            upsert_streams: format!(
                "INSERT INTO {q}.streams (name, head)
                 SELECT * FROM unnest($1::text[], $2::bigint[])
                 ON CONFLICT (name) DO UPDATE SET head = EXCLUDED.head"
            ),
            delete_from: format!("DELETE FROM {q}.events WHERE position >= $1"),
            find_id: format!(
                "SELECT stream, stream_version, position FROM {q}.events WHERE event_id = $1"
            ),
            find_ids: format!(
                "SELECT event_id, stream, stream_version FROM {q}.events WHERE event_id = ANY($1)"
            ),
            stream_run: format!(
                "SELECT event_id, position, stream_version FROM {q}.events
                 WHERE stream = $1 AND stream_version >= $2 ORDER BY stream_version LIMIT $3"
            ),
            // (after, event limit, byte limit)
            read_all: page("true", "position", "$1", "$2", "$3"),
            // (stream, after, event limit, byte limit)
            read_stream: page("stream = $1", "stream_version", "$2", "$3", "$4"),
            find_event: format!("SELECT {EVENT_COLUMNS} FROM {q}.events WHERE event_id = $1"),
            next_term: format!(
                "INSERT INTO {q}.leader_terms (name, term) VALUES ($1, 1)
                 ON CONFLICT (name) DO UPDATE SET term = {q}.leader_terms.term + 1
                 RETURNING term"
            ),
            append_group: format!(
                "SELECT {q}.append_group($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            ),
            channel: schema.to_owned(),
            feeds: FeedSql::new(schema),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        for good in ["headwater", "_x", "hw_test_0123abcd", &"a".repeat(48)] {
            assert!(valid_schema_name(good), "{good}");
        }
        for bad in [
            "",
            "Headwater",
            "1abc",
            "a-b",
            "a\"b",
            "a b",
            "pg_catalog",
            &"a".repeat(49),
        ] {
            assert!(!valid_schema_name(bad), "{bad}");
        }
    }

    #[test]
    fn lock_keys_differ_by_schema_and_purpose() {
        let keys = [
            lock_key("a", "migrate"),
            lock_key("b", "migrate"),
            lock_key("a", "leader/x"),
            lock_key("a", "leader/y"),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(lock_key("a", "migrate"), lock_key("a", "migrate"));
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1);
        }
        assert_eq!(current_version(), crate::SCHEMA_VERSION);
    }
}
