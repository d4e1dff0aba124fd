//! The `headwater` binary, run as an operator runs it. No timing is asserted anywhere: the
//! benchmark's figures are checked for presence and shape only.

mod reconstitute;

use std::path::Path;
use std::process::{Command, Output};

use headwater_core::{EventId, EventType, ExpectedVersion, NewEvent, StreamName};
use headwater_embedded::EmbeddedStore;
use headwater_store::EventStore;

fn headwater(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_headwater"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the headwater binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const BENCH_FLAGS: &[&str] = &[
    "--dir",
    "--keep",
    "--backend",
    "--postgres",
    "--quick",
    "--phase-secs",
    "--record-bytes",
    "--events",
    "--stream-events",
    "--writers",
    "--batch-events",
    "--batch-writers",
    "--event-ids",
    "--suite",
    "--amqp",
    "--nats",
    "--publish-events",
    "--walk-subjects",
    "--runs",
    "--json",
];

#[test]
fn help_for_every_verb_exits_0_and_names_each_flag() {
    let table: &[(&[&str], &[&str])] = &[
        (
            &["--help"],
            &["inspect", "verify", "bench", "feeds", "tail"],
        ),
        (
            &["feeds", "--help"],
            &[
                "DIR",
                "--postgres",
                "--schema",
                "--json",
                "--sample-secs",
                "--token",
            ],
        ),
        (
            &["tail", "--help"],
            &[
                "--feed",
                "--subject",
                "--after",
                "--last",
                "--follow",
                "--json",
            ],
        ),
        (&["inspect", "--help"], &["DIR", "--help"]),
        (&["verify", "--help"], &["DIR", "--help", "Exits 0"]),
        (&["bench", "--help"], BENCH_FLAGS),
        (&["help", "bench"], BENCH_FLAGS),
    ];
    for (args, expected) in table {
        let out = headwater(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        let stdout = text(&out.stdout);
        for word in *expected {
            assert!(
                stdout.contains(word),
                "{args:?} does not mention {word}:\n{stdout}"
            );
        }
    }
}

/// Every row of the human report, by the words that start it.
const FIGURE_ROWS: &[&str] = &[
    "| fsync bound: write 256 B + fdatasync, growing file |",
    "| write 256 B + fdatasync, pre-allocated space |",
    "| durable append, 1 writer, 1 event per append |",
    "| durable append, 64 writers on distinct streams, 1 event each |",
    "| durable append, batches of 100, 1 writer |",
    "| durable append, batches of 100, 8 writers |",
    "| read one stream forward (5,000 events) |",
    "| read the whole log forward (",
    "| peak memory (VmHWM) |",
    "| RSS at the end (",
];

const FEED_ROWS: &[&str] = &[
    "| backfill of a new version, appends going on |",
    "| backfill, nothing else running |",
    "| appends during that backfill |",
    "| feed read over HTTP, 1 client |",
    "| feed read over HTTP, 16 clients |",
    "| long-poll wake-up, append → answer, p50 / p99 |",
];

const JSON_KEYS: &[&str] = &[
    "fsync_growing",
    "fsync_overwrite",
    "append_one_writer",
    "append_many_writers",
    "append_batch_one_writer",
    "append_batch_many_writers",
    "read_stream",
    "read_all",
];

#[test]
fn quick_bench_prints_every_figure_and_cleans_up() {
    let parent = tempfile::tempdir().unwrap();
    let json = parent.path().join("results.json");
    let dir = parent.path().to_str().unwrap();
    let out = headwater(&[
        "bench",
        "--quick",
        "--dir",
        dir,
        "--json",
        json.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{stdout}",
        text(&out.stderr)
    );

    for row in FIGURE_ROWS {
        let line = stdout
            .lines()
            .find(|line| line.starts_with(row))
            .unwrap_or_else(|| panic!("no row {row:?} in:\n{stdout}"));
        // figure, rate, p50, p99, compared to, aim, verdict.
        assert_eq!(line.matches(" | ").count(), 6, "{line}");
    }
    for verdict_row in &FIGURE_ROWS[2..8] {
        let line = stdout.lines().find(|l| l.starts_with(verdict_row)).unwrap();
        assert!(
            line.ends_with("| PASS |") || line.ends_with("| SHORT |"),
            "no verdict: {line}"
        );
    }
    for heading in [
        "- command: `",
        "- machine: ",
        "- disk: ",
        "Memory as the store grows",
    ] {
        assert!(stdout.contains(heading), "no {heading:?} in:\n{stdout}");
    }
    // What the store wrote per event, for each append figure (from /proc/self/io).
    let written = stdout
        .split("Bytes written per appended event")
        .nth(1)
        .unwrap_or_else(|| panic!("no bytes-written table in:\n{stdout}"));
    for row in &FIGURE_ROWS[2..6] {
        let line = written.lines().find(|l| l.starts_with(row)).unwrap();
        let bytes: u64 = line
            .trim_end_matches(" |")
            .rsplit("| ")
            .next()
            .unwrap()
            .replace(',', "")
            .parse()
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(bytes > 0, "{line}");
    }
    assert!(
        stdout.contains("a `--quick` run (a smoke test)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("bench --quick --dir"),
        "the command line:\n{stdout}"
    );

    for row in FEED_ROWS {
        let line = stdout
            .lines()
            .find(|line| line.starts_with(row))
            .unwrap_or_else(|| panic!("no feeds row {row:?} in:\n{stdout}"));
        assert_eq!(line.matches(" | ").count(), 3, "{line}");
    }

    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let feeds = &results["feeds"]["median"];
    for key in [
        "backfill_alone_per_sec",
        "backfill_with_appends_per_sec",
        "http_read_1_client_per_sec",
        "http_read_n_clients_per_sec",
    ] {
        let rate = feeds[key].as_f64().unwrap_or_default();
        assert!(rate > 0.0, "{key} in {results}");
    }
    assert!(
        feeds["wake_p99_us"].as_u64().unwrap_or_default() > 0,
        "{results}"
    );
    let figures = results["figures"].as_array().unwrap();
    for key in JSON_KEYS {
        let figure = figures
            .iter()
            .find(|f| f["key"] == *key)
            .unwrap_or_else(|| panic!("no figure {key} in {results}"));
        let rate = figure["per_second"].as_f64().unwrap();
        assert!(rate > 0.0, "{key}: {figure}");
    }
    let runs = results["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(
        runs[0]["memory"]["checkpoints"].as_array().unwrap().len(),
        3
    );
    assert!(results["peak_kib"].as_u64().unwrap() > 0);

    // The working directory is gone; only the JSON file is left.
    let left: Vec<_> = std::fs::read_dir(parent.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("results.json")]);
}

#[test]
fn bench_keep_leaves_the_working_directory() {
    let parent = tempfile::tempdir().unwrap();
    let out = headwater(&[
        "bench",
        "--quick",
        "--keep",
        "--phase-secs",
        "0.05",
        "--events",
        "300",
        "--stream-events",
        "100",
        "--writers",
        "4",
        "--dir",
        parent.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let kept: Vec<_> = std::fs::read_dir(parent.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].starts_with("headwater-bench-"), "{kept:?}");
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("| durable append, 4 writers on distinct streams"),
        "{stdout}"
    );
    assert!(stdout.contains("embedded backend"), "{stdout}");
    // The embedded store is left in the working directory, where `headwater inspect` can read it.
    let store = parent.path().join(&kept[0]).join("run-1").join("store");
    let files: Vec<_> = std::fs::read_dir(&store)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!files.is_empty(), "{files:?}");
}

#[test]
fn bench_runs_against_the_memory_backend() {
    let parent = tempfile::tempdir().unwrap();
    let out = headwater(&[
        "bench",
        "--quick",
        "--backend",
        "memory",
        "--phase-secs",
        "0.05",
        "--events",
        "500",
        "--runs",
        "3",
        "--dir",
        parent.path().to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(stdout.contains("memory backend"), "{stdout}");
    assert!(stdout.contains("keeps nothing on disk"), "{stdout}");
    assert!(stdout.contains("3 runs, each on a fresh store"), "{stdout}");
    for row in FIGURE_ROWS {
        let line = stdout
            .lines()
            .find(|line| line.starts_with(row))
            .unwrap_or_else(|| panic!("no row {row:?} in:\n{stdout}"));
        // figure, rate, p50, p99, compared to, aim, verdict, runs.
        assert_eq!(line.matches(" | ").count(), 7, "{line}");
    }
    // Each run's figure, in the last column.
    let one_writer = stdout
        .lines()
        .find(|line| line.starts_with(FIGURE_ROWS[2]))
        .unwrap();
    let runs_cell = one_writer.rsplit(" | ").next().unwrap();
    assert_eq!(runs_cell.matches(" / ").count(), 2, "{one_writer}");
    // The memory table: each run's checkpoints (here the large stream alone exceeds the sizes
    // asked for, so one), then its end.
    for run in 1..=3 {
        let rows: Vec<_> = stdout
            .lines()
            .filter(|line| line.starts_with(&format!("| {run} | ")))
            .collect();
        assert_eq!(rows.len(), 2, "run {run}: {rows:?}");
        assert!(
            rows[0].starts_with(&format!("| {run} | 5,000 | ")),
            "{rows:?}"
        );
        assert!(rows[1].contains(" (end) | "), "{rows:?}");
    }
}

/// The variable that names the PostgreSQL server of the tests (`scripts/test` starts one).
const POSTGRES_URL_ENV: &str = "HEADWATER_TEST_POSTGRES_URL";

#[test]
fn bench_runs_against_postgres_in_a_schema_it_drops() {
    let url = std::env::var(POSTGRES_URL_ENV).unwrap_or_else(|_| {
        panic!(
            "{POSTGRES_URL_ENV} is not set: run ./scripts/test (it starts a private PostgreSQL), \
             or set it to a PostgreSQL 15+ where tests may create and drop schemas"
        )
    });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let bench_schemas = || -> Vec<String> {
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            client
                .query(
                    "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'headwater\\_bench\\_%' \
                     ORDER BY nspname",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|row| row.get(0))
                .collect()
        })
    };
    let before = bench_schemas();
    let parent = tempfile::tempdir().unwrap();
    let out = headwater(&[
        "bench",
        "--quick",
        "--backend",
        "postgres",
        "--postgres",
        &url,
        "--phase-secs",
        "0.1",
        "--events",
        "2000",
        "--stream-events",
        "1000",
        "--writers",
        "16",
        "--dir",
        parent.path().to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}\n{stdout}");
    assert!(stdout.contains("postgres backend"), "{stdout}");
    for row in &FIGURE_ROWS[..6] {
        assert!(
            stdout.contains(row.replace("64 writers", "16 writers").as_str()),
            "{row}: {stdout}"
        );
    }
    // No bytes-written table: the server writes, not this process.
    assert!(
        !stdout.contains("Bytes written per appended event"),
        "{stdout}"
    );
    assert!(!stderr.contains("could not drop"), "{stderr}");

    // The run's schema is gone.
    assert_eq!(bench_schemas(), before, "a schema was left behind");
}

/// The rows of the consume suite, by the words that start them.
const CONSUME_ROWS: &[&str] = &[
    "| EmbeddedView: raw bound, SQLite single-row commits",
    "| EmbeddedView: 1 event per apply (`Consumer::deliver`)",
    "| EmbeddedView: pages of 100 per apply",
    "| PgView: raw bound, PostgreSQL single-row INSERT commits",
    "| PgView: 1 event per apply (`Consumer::deliver`)",
    "| PgView: pages of 100 per apply",
    "| heal a gap of 1 ",
    "| heal a gap of 100 ",
    "| append → applied in the view, HTTP feed, p50 / p99 (max) |",
    "| reconstitution walk over 300 subjects, view caught up |",
    "| reconstitution walk over 300 subjects, 1 % missing from the view |",
];

/// The consume suite at tiny sizes, twice, with its `PgView` figures on the tests' PostgreSQL
/// (which it must leave without its schemas): every row, each run's figure, the JSON medians.
#[test]
fn quick_consume_bench_measures_every_figure() {
    let url = std::env::var(POSTGRES_URL_ENV).unwrap_or_else(|_| {
        panic!(
            "{POSTGRES_URL_ENV} is not set: run ./scripts/test (it starts a private PostgreSQL), \
             or set it to a PostgreSQL 15+ where tests may create and drop schemas"
        )
    });
    let parent = tempfile::tempdir().unwrap();
    let json = parent.path().join("consume.json");
    let out = headwater(&[
        "bench",
        "--suite",
        "consume",
        "--quick",
        "--phase-secs",
        "0.05",
        "--walk-subjects",
        "300",
        "--runs",
        "2",
        "--postgres",
        &url,
        "--dir",
        parent.path().to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}\n{stdout}");
    assert!(stdout.contains("#### Consuming"), "{stdout}");
    for row in CONSUME_ROWS {
        let line = stdout
            .lines()
            .find(|line| line.starts_with(row))
            .unwrap_or_else(|| panic!("no row {row:?} in:\n{stdout}"));
        // figure, measured, compared to, load, runs.
        assert_eq!(line.matches(" | ").count(), 4, "{line}");
        // Each run's figure, in the last column (latencies: each run's p50 / p99, apart by "; ").
        let runs_cell = line.trim_end_matches(" |").rsplit(" | ").next().unwrap();
        let apart = if runs_cell.contains("; ") {
            "; "
        } else {
            " / "
        };
        assert_eq!(runs_cell.matches(apart).count(), 1, "{line}");
    }
    assert!(!stderr.contains("could not drop"), "{stderr}");

    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let consume = &results["consume"];
    assert_eq!(consume["runs"].as_array().unwrap().len(), 2, "{results}");
    let median = &consume["median"];
    for pointer in [
        "/embedded/raw_per_sec",
        "/embedded/deliver_per_sec",
        "/embedded/batch_per_sec",
        "/postgres/raw_per_sec",
        "/postgres/deliver_per_sec",
        "/postgres/batch_per_sec",
        "/heal_one/p99_us",
        "/heal_large/p99_us",
        "/applied/latency/p99_us",
        "/walk/caught_up_per_sec",
        "/walk/behind_per_sec",
    ] {
        let value = median.pointer(pointer).and_then(serde_json::Value::as_f64);
        assert!(value.is_some_and(|v| v > 0.0), "{pointer} in {median}");
    }
    assert_eq!(
        median.pointer("/walk/behind"),
        Some(&serde_json::json!(3.0))
    );

    // Nothing of the consume suite's PostgreSQL schemas is left.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let left: i64 = runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
            .query_one(
                "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'headwater\\_consume\\_bench\\_%'",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    });
    assert_eq!(left, 0, "a consume bench schema was left behind");
}

/// The rows of the publish suite, per broker label.
const PUBLISH_ROWS: &[&str] = &[
    ": raw client (",
    ": through `Broker::publish` (",
    ": through the publisher",
    ": append → consumer arrival",
];

/// Against the brokers `scripts/test` starts (HEADWATER_TEST_AMQP_URL, HEADWATER_TEST_NATS_URL):
/// fails when they are missing.
#[test]
fn quick_publish_bench_measures_each_broker() {
    let amqp = std::env::var("HEADWATER_TEST_AMQP_URL").expect(
        "HEADWATER_TEST_AMQP_URL is not set: run scripts/test, or \
         `source scripts/lib/rabbitmq.sh && rabbitmq_start` first",
    );
    let nats = std::env::var("HEADWATER_TEST_NATS_URL").expect(
        "HEADWATER_TEST_NATS_URL is not set: run scripts/test, or \
         `source scripts/lib/nats.sh && nats_start` first",
    );
    let parent = tempfile::tempdir().unwrap();
    let json = parent.path().join("publish.json");
    let out = headwater(&[
        "bench",
        "--quick",
        "--suite",
        "publish",
        "--publish-events",
        "2000",
        "--amqp",
        &amqp,
        "--nats",
        &nats,
        "--dir",
        parent.path().to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{stdout}",
        text(&out.stderr)
    );
    for label in ["RabbitMQ", "NATS JetStream"] {
        for row in PUBLISH_ROWS {
            let start = format!("| {label}{row}");
            let line = stdout
                .lines()
                .find(|line| line.starts_with(&start))
                .unwrap_or_else(|| panic!("no row {start:?} in:\n{stdout}"));
            assert_eq!(line.matches(" | ").count(), 3, "{line}");
        }
    }
    assert!(stdout.contains("- fsync bound ("), "{stdout}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let brokers = results["publish"]["median"]["brokers"].as_array().unwrap();
    let keys: Vec<&str> = brokers
        .iter()
        .map(|b| b["broker"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["rabbitmq", "nats"], "{results}");
    for broker in brokers {
        for key in [
            "raw_per_sec",
            "broker_layer_per_sec",
            "publisher_per_sec",
            "ratio",
            "fill_per_sec",
        ] {
            let rate = broker[key].as_f64().unwrap_or_default();
            assert!(rate > 0.0, "{key} in {broker}");
        }
        let latency = &broker["latency"];
        assert_eq!(latency["events"].as_u64(), Some(100), "{broker}");
        let p50 = latency["p50_us"].as_u64().unwrap_or_default();
        let p99 = latency["p99_us"].as_u64().unwrap_or_default();
        assert!(0 < p50 && p50 <= p99, "{broker}");
    }
    // Only the JSON file is left of the working directory.
    assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 1);
}

#[test]
fn bad_arguments_exit_2_with_a_clear_message() {
    let table: &[(&[&str], &str)] = &[
        (&["frobnicate"], "frobnicate"),
        (&["inspect"], "DIR"),
        (&["verify"], "DIR"),
        (&["bench", "--writers", "0"], "--writers"),
        (&["bench", "--batch-events", "1001"], "--batch-events"),
        (&["bench", "--record-bytes", "0"], "--record-bytes"),
        (
            &["bench", "--phase-secs", "soon"],
            "not a number of seconds",
        ),
        (&["bench", "--phase-secs", "0"], "outside the range"),
        (&["bench", "--backend", "floppy"], "--backend"),
        (&["bench", "--backend", "postgres"], "--postgres <URL>"),
        (&["bench", "--events=0"], "--events"),
        (
            &["bench", "--suite", "publish"],
            "needs a broker: --amqp URL",
        ),
        (
            &["bench", "--amqp", "amqp://127.0.0.1:1/%2f"],
            "are for --suite publish",
        ),
        (
            &[
                "bench",
                "--suite",
                "publish",
                "--nats",
                "nats://127.0.0.1:1",
                "--backend",
                "postgres",
                "--postgres",
                "postgres://127.0.0.1:1/x",
            ],
            "not --backend postgres",
        ),
    ];
    for (args, expected) in table {
        let out = headwater(args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// A closed store in `dir` with 3 streams: `account-1` (3 events), `account-2` (1 event),
/// `order-1` (1 event); positions 1 to 5.
fn small_store(dir: &Path) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = EmbeddedStore::open(dir).unwrap();
        let event = |n: u32| {
            NewEvent::new(
                EventId::new_random(),
                EventType::new("account.deposited").unwrap(),
                format!(r#"{{"amount_cents":{n}}}"#).into_bytes(),
            )
        };
        for (stream, events) in [
            ("account-1", vec![event(1), event(2)]),
            ("account-2", vec![event(3)]),
            ("account-1", vec![event(4)]),
            ("order-1", vec![event(5)]),
        ] {
            let stream = StreamName::new(stream).unwrap();
            store
                .append(&stream, ExpectedVersion::Any, events)
                .await
                .unwrap();
        }
    });
}

#[test]
fn inspect_summarises_a_store() {
    let dir = tempfile::tempdir().unwrap();
    small_store(dir.path());
    let out = headwater(&["inspect", dir.path().to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for expected in [
        "events     5\n",
        "streams    3 in 2 categories\n",
        "head       position 5\n",
        "| account | 2 | 4 |",
        "| order | 1 | 1 |",
        "on disk    ",
        " UTC … ",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
}

#[test]
fn verify_passes_a_sound_store_and_fails_a_damaged_one() {
    let dir = tempfile::tempdir().unwrap();
    small_store(dir.path());
    let path = dir.path().to_str().unwrap();

    let out = headwater(&["verify", path]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("sound. Checked 5 events in 3 streams"),
        "{stdout}"
    );

    // Damage it as a bad disk or a stray tool would: data changed under its checksum, and a
    // stream head that disagrees with its events.
    let db = rusqlite::Connection::open(dir.path().join("events.sqlite3")).unwrap();
    db.execute("UPDATE events SET data = x'7b7d' WHERE position = 2", [])
        .unwrap();
    db.execute("UPDATE streams SET head = 7 WHERE name = 'account-2'", [])
        .unwrap();
    drop(db);

    let out = headwater(&["verify", path]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    for expected in [
        "DAMAGED. 2 problems found",
        "- event at position 2: checksum mismatch",
        "- stream account-2: head is 7 but the last version is 1",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
}

#[test]
fn inspect_and_verify_refuse_a_directory_without_a_store() {
    let dir = tempfile::tempdir().unwrap();
    for verb in ["inspect", "verify"] {
        let out = headwater(&[verb, dir.path().to_str().unwrap()]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{verb}: {stderr}");
        assert!(stderr.contains("events.sqlite3"), "{verb}: {stderr}");
        assert!(stderr.contains("caused by: "), "{verb}: {stderr}");
    }
}

#[test]
fn a_missing_directory_is_a_clear_error() {
    let parent = tempfile::tempdir().unwrap();
    let missing = parent.path().join("no-such-dir");
    let missing = missing.to_str().unwrap();
    for args in [
        vec!["bench", "--quick", "--dir", missing],
        vec!["inspect", missing],
        vec!["verify", missing],
    ] {
        let out = headwater(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("error: "), "{args:?}: {stderr}");
        assert!(stderr.contains("no-such-dir"), "{args:?}: {stderr}");
        assert!(!Path::new(missing).exists());
    }
}

// ---------------------------------------------------------------------------------------------
// A PostgreSQL store: `--postgres URL` (or the URL in place of DIR) and `--schema`.

/// The PostgreSQL server of the tests. Fails the test when it is not set: never skipped.
fn postgres_url() -> String {
    std::env::var("HEADWATER_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "HEADWATER_TEST_POSTGRES_URL is not set: run ./scripts/test (it starts a private \
             PostgreSQL), or set it to a PostgreSQL 15+ where tests may create schemas"
        )
    })
}

/// A schema of its own on the test server, dropped at the end of the test.
struct PgSchema {
    url: String,
    schema: String,
}

impl PgSchema {
    fn new() -> PgSchema {
        PgSchema {
            url: postgres_url(),
            schema: format!("hw_cli_test_{:016x}", rand::random::<u64>()),
        }
    }

    fn sql(&self, sql: &str) {
        let (url, sql) = (self.url.clone(), sql.to_owned());
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(connection);
                client.batch_execute(&sql).await.unwrap();
            });
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let (url, schema) = (self.url.clone(), self.schema.clone());
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(async move {
                    if let Ok((client, connection)) =
                        tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                    {
                        tokio::spawn(connection);
                        let _ = client
                            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                            .await;
                    }
                });
        })
        .join();
    }
}

/// The events of [`small_store`], in a PostgreSQL store.
fn small_pg_store() -> PgSchema {
    let pg = PgSchema::new();
    let (url, schema) = (pg.url.clone(), pg.schema.clone());
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let store = headwater_postgres::PostgresStore::connect(
                &url,
                headwater_postgres::Options::with_schema(schema),
            )
            .await
            .unwrap();
            let event = |n: u32| {
                NewEvent::new(
                    EventId::new_random(),
                    EventType::new("account.deposited").unwrap(),
                    format!(r#"{{"amount_cents":{n}}}"#).into_bytes(),
                )
            };
            for (stream, events) in [
                ("account-1", vec![event(1), event(2)]),
                ("account-2", vec![event(3)]),
                ("account-1", vec![event(4)]),
                ("order-1", vec![event(5)]),
            ] {
                let stream = StreamName::new(stream).unwrap();
                store
                    .append(&stream, ExpectedVersion::Any, events)
                    .await
                    .unwrap();
            }
        });
    pg
}

#[test]
fn inspect_summarises_a_postgres_store() {
    let pg = small_pg_store();
    // As a flag, and as the URL in place of the directory.
    for args in [
        vec!["inspect", "--postgres", &pg.url, "--schema", &pg.schema],
        vec!["inspect", &pg.url, "--schema", &pg.schema],
    ] {
        let out = headwater(&args);
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        for expected in [
            "events     5\n",
            "streams    3 in 2 categories\n",
            "head       position 5\n",
            "| account | 2 | 4 |",
            "| order | 1 | 1 |",
            "on disk    ",
            " UTC … ",
            &format!("schema {}", pg.schema),
        ] {
            assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
        }
    }
}

#[test]
fn verify_passes_a_sound_postgres_store_and_fails_a_damaged_one() {
    let pg = small_pg_store();
    let args = ["verify", "--postgres", &pg.url, "--schema", &pg.schema];
    let out = headwater(&args);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("sound. Checked 5 events in 3 streams"),
        "{stdout}"
    );

    pg.sql(&format!(
        "DELETE FROM {s}.events WHERE position = 2; UPDATE {s}.streams SET head = 7 WHERE name = 'account-2'",
        s = pg.schema
    ));
    let out = headwater(&args);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    for expected in [
        "DAMAGED.",
        "position 2 is missing",
        "account-2: the recorded head is 7, the last event's version 1",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
}

#[test]
fn verify_checks_the_feeds_of_a_postgres_store() {
    use headwater_core::{FeedId, Position, Subject, Timestamp};
    use headwater_store::{FeedStore, ProjectedEvent, ProjectorBatch};

    let pg = small_pg_store();
    let (url, schema) = (pg.url.clone(), pg.schema.clone());
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let store = headwater_postgres::PostgresStore::connect(
                &url,
                headwater_postgres::Options::with_schema(schema),
            )
            .await
            .unwrap();
            let feeds = store.feed_store();
            let feed = FeedId::parse("accounts.v1").unwrap();
            feeds.register(&feed).await.unwrap();
            let events = [(1, "1"), (2, "2"), (4, "1")]
                .into_iter()
                .map(|(source, subject)| ProjectedEvent {
                    id: EventId::new_random(),
                    event_type: EventType::new("accounts.deposited").unwrap(),
                    subject: Subject::new(subject).unwrap(),
                    time: Timestamp::from_unix_micros(1_700_000_000_000_000),
                    data: b"{}".to_vec(),
                    source_position: Position(source),
                })
                .collect();
            let batch = ProjectorBatch {
                from: Position(0),
                to: Position(5),
                events,
            };
            feeds.commit(&feed, batch).await.unwrap();
        });
    let args = ["verify", "--postgres", &pg.url, "--schema", &pg.schema];
    let out = headwater(&args);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    for expected in [
        "sound. Checked 5 events in 3 streams, 3 integration events in 1 feed",
        "feed positions and sequences contiguous",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }

    pg.sql(&format!(
        "DELETE FROM {s}.feed_events WHERE position = 2; UPDATE {s}.feeds SET cursor = 9",
        s = pg.schema
    ));
    let out = headwater(&args);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    for expected in [
        "DAMAGED.",
        "feed accounts.v1: position 2 is missing",
        "feed accounts.v1: the projector cursor 9 is past the log head 5",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
}

#[test]
fn a_schema_without_a_store_is_a_clear_error() {
    let pg = PgSchema::new();
    for verb in ["inspect", "verify"] {
        let out = headwater(&[verb, "--postgres", &pg.url, "--schema", &pg.schema]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{verb}: {stderr}");
        assert!(
            stderr.contains("holds no Headwater store"),
            "{verb}: {stderr}"
        );
    }
}

/// A batch from cursor 0 to `to`: one `accounts.deposited` event of `{"amount": i}` for each
/// source position `i` in 1..=`count`, its subject `subject_of(i)`.
fn deposits(
    count: u64,
    to: u64,
    subject_of: fn(u64) -> &'static str,
) -> headwater_store::ProjectorBatch {
    use headwater_core::{Position, Subject, Timestamp};
    let events = (1..=count)
        .map(|i| headwater_store::ProjectedEvent {
            id: EventId::new_random(),
            event_type: EventType::new("accounts.deposited").unwrap(),
            subject: Subject::new(subject_of(i)).unwrap(),
            time: Timestamp::from_unix_micros(1_795_780_524_000_000 + i),
            data: format!("{{\"amount\":{i}}}").into_bytes(),
            source_position: Position(i),
        })
        .collect();
    headwater_store::ProjectorBatch {
        from: Position(0),
        to: Position(to),
        events,
    }
}

/// Alternates subjects `b`, `a`, `b` … by source position.
fn a_or_b(i: u64) -> &'static str {
    if i.is_multiple_of(2) { "a" } else { "b" }
}

/// A store with a log of 5 events and one feed `accounts.v1` projected from its first 4, two
/// subjects, one reader recorded, and its publisher `rabbitmq` at position 2.
fn store_with_a_feed(dir: &Path) {
    use headwater_core::{FeedId, FeedPosition, Timestamp};
    use headwater_store::{FeedStore, ReaderSeen};

    small_store(dir);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = EmbeddedStore::open(dir).unwrap();
        let feeds = store.feeds().unwrap();
        let feed = FeedId::parse("accounts.v1").unwrap();
        feeds.register(&feed).await.unwrap();
        let batch = deposits(4, 4, a_or_b);
        feeds.commit(&feed, batch).await.unwrap();
        feeds
            .advance_publisher(&feed, "rabbitmq", FeedPosition(0), FeedPosition(2))
            .await
            .unwrap();
        feeds
            .record_readers(vec![ReaderSeen {
                feed,
                reader: "statements".to_owned(),
                at: Timestamp::from_unix_micros(1_795_780_524_000_000),
                reads: 7,
            }])
            .await
            .unwrap();
    });
}

#[test]
fn feeds_shows_status_progress_and_readers() {
    let dir = tempfile::tempdir().unwrap();
    store_with_a_feed(dir.path());
    let path = dir.path().to_str().unwrap();

    let out = headwater(&["feeds", path]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("| accounts.v1 | backfilling | 4 | 4 (")
            && stdout.contains("statements (7 reads"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| feed | publisher | cursor | lag | lag (s) | last moved |")
            && stdout.contains("| accounts.v1 | rabbitmq | 2 | 2 | "),
        "{stdout}"
    );

    let out = headwater(&["feeds", path, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let feed = &json["feeds"][0];
    assert_eq!(
        (
            &feed["name"],
            &feed["version"],
            &feed["head"],
            &feed["cursor"]
        ),
        (&"accounts".into(), &1.into(), &4.into(), &4.into()),
        "{json}"
    );
    assert_eq!(feed["readers"][0]["reader"], "statements");
    let publisher = &feed["publishers"][0];
    assert_eq!(
        (
            &publisher["publisher"],
            &publisher["cursor"],
            &publisher["lag"]
        ),
        (&"rabbitmq".into(), &2.into(), &2.into()),
        "{json}"
    );
    // Its next event's time is 2026-11-27 09:55:24 UTC: long enough ago.
    assert!(publisher["lag_seconds"].as_f64().unwrap() > 0.0, "{json}");
    assert!(publisher["updated_at"].is_string(), "{json}");
}

#[test]
fn tail_prints_a_feed_and_a_subject() {
    let dir = tempfile::tempdir().unwrap();
    store_with_a_feed(dir.path());
    let path = dir.path().to_str().unwrap();

    let out = headwater(&["tail", path, "--feed", "accounts.v1", "--last", "3"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = text(&out.stdout);
    let lines: Vec<_> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(
        lines[0].starts_with("#2 ") && lines[2].starts_with("#4 "),
        "{stdout}"
    );

    let args = [
        "tail",
        path,
        "--feed",
        "accounts.v1",
        "--subject",
        "b",
        "--json",
    ];
    let out = headwater(&args);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let events: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let seen: Vec<_> = events
        .iter()
        .map(|e| (e["sequence"].as_u64(), e["position"].as_u64()))
        .collect();
    assert_eq!(seen, [(Some(1), Some(1)), (Some(2), Some(3))]);
    assert_eq!(events[0]["time"], "2026-11-27T11:55:24.000001Z");
    assert_eq!(events[0]["data"]["amount"], 1);
}

#[test]
fn feed_tools_refuse_unknown_feeds_and_stores_without_feeds() {
    let dir = tempfile::tempdir().unwrap();
    store_with_a_feed(dir.path());
    let path = dir.path().to_str().unwrap();
    let out = headwater(&["tail", path, "--feed", "accounts.v9"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("feeds: accounts.v1"), "{out:?}");

    let out = headwater(&["tail", path, "--feed", "Accounts"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    let bare = tempfile::tempdir().unwrap();
    small_store(bare.path());
    let out = headwater(&["feeds", bare.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("cannot open the feeds"),
        "{out:?}"
    );
}

#[test]
fn retire_checks_readers_and_successor_and_refuses_a_store_in_use() {
    let dir = tempfile::tempdir().unwrap();
    store_with_a_feed(dir.path());
    let path = dir.path().to_str().unwrap();

    // No newer live version: refused, and nothing changed.
    let out = headwater(&["retire", path, "--feed", "accounts.v1"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("no newer live version"),
        "{out:?}"
    );

    // A store open in its service (this process holds its lock): refused with the reason.
    {
        let _service = EmbeddedStore::open(dir.path()).unwrap();
        let out = headwater(&["retire", path, "--feed", "accounts.v1", "--force"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(text(&out.stderr).contains("open in its service"), "{out:?}");
    }

    let out = headwater(&["retire", path, "--feed", "accounts.v1", "--force"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(text(&out.stdout).contains("accounts.v1 retired"), "{out:?}");
    let out = headwater(&["feeds", path, "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["feeds"][0]["status"], "retired", "{json}");
}

#[test]
fn feeds_tail_and_retire_work_on_a_postgres_store() {
    use headwater_core::{FeedId, FeedPosition, FeedStatus, Timestamp};
    use headwater_store::{FeedStore, ReaderSeen};

    let pg = small_pg_store();
    let (url, schema) = (pg.url.clone(), pg.schema.clone());
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let store = headwater_postgres::PostgresStore::connect(
                &url,
                headwater_postgres::Options::with_schema(schema),
            )
            .await
            .unwrap();
            let feeds = store.feed_store();
            for version in ["accounts.v1", "accounts.v2"] {
                let feed = FeedId::parse(version).unwrap();
                feeds.register(&feed).await.unwrap();
                let batch = deposits(3, 5, |_| "a");
                feeds.commit(&feed, batch).await.unwrap();
                feeds.set_status(&feed, FeedStatus::Live).await.unwrap();
            }
            let v2 = FeedId::parse("accounts.v2").unwrap();
            feeds
                .advance_publisher(&v2, "nats", FeedPosition(0), FeedPosition(3))
                .await
                .unwrap();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros() as u64;
            feeds
                .record_readers(vec![ReaderSeen {
                    feed: FeedId::parse("accounts.v1").unwrap(),
                    reader: "statements".to_owned(),
                    at: Timestamp::from_unix_micros(now),
                    reads: 2,
                }])
                .await
                .unwrap();
        });
    let target = [
        "--postgres",
        pg.url.as_str(),
        "--schema",
        pg.schema.as_str(),
    ];
    let run = |verb: &[&str]| {
        let mut args = verb.to_vec();
        args.extend_from_slice(&target);
        headwater(&args)
    };

    let out = run(&["feeds", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["feeds"].as_array().map(Vec::len), Some(2), "{json}");
    assert_eq!(json["feeds"][0]["readers"][0]["reader"], "statements");
    assert_eq!(
        json["feeds"][0]["publishers"],
        serde_json::json!([]),
        "{json}"
    );
    let publisher = &json["feeds"][1]["publishers"][0];
    assert_eq!(publisher["publisher"], "nats", "{json}");
    assert_eq!(publisher["cursor"], 3, "{json}");
    assert_eq!(publisher["lag"], 0, "{json}");
    assert_eq!(publisher["lag_seconds"], 0.0, "{json}");
    let out = run(&["feeds"]);
    assert!(
        text(&out.stdout).contains("| accounts.v2 | nats | 3 | 0 | 0.0 | "),
        "{out:?}"
    );

    let out = run(&["tail", "--feed", "accounts.v2", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(text(&out.stdout).lines().count(), 3, "{out:?}");

    // Read a moment ago: refused, naming the reader.
    let out = run(&["retire", "--feed", "accounts.v1"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("still read: statements"),
        "{out:?}"
    );
    let out = run(&["retire", "--feed", "accounts.v1", "--idle-secs", "0"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(text(&out.stdout).contains("naming accounts.v2"), "{out:?}");
    let out = run(&["feeds", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["feeds"][0]["status"], "retired", "{json}");
}

/// A feed API on 127.0.0.1 over a memory feed store holding `accounts.v1` (5 events, subjects
/// `a` and `b`; its publisher `rabbitmq` at position 3), served from a thread of its own until the test ends.
fn feed_api_server() -> (
    String,
    std::sync::mpsc::Sender<()>,
    headwater_store::MemoryFeedStore,
) {
    use headwater_core::{FeedId, FeedPosition};
    use headwater_store::{FeedStore, MemoryFeedStore};

    let (address_tx, address_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let store = MemoryFeedStore::new();
    let served = store.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let feeds = std::sync::Arc::new(served);
            let feed = FeedId::parse("accounts.v1").unwrap();
            feeds.register(&feed).await.unwrap();
            let batch = deposits(5, 5, a_or_b);
            feeds.commit(&feed, batch).await.unwrap();
            feeds
                .advance_publisher(&feed, "rabbitmq", FeedPosition(0), FeedPosition(3))
                .await
                .unwrap();
            let mut registry = prometheus_client::registry::Registry::default();
            let tokens = headwater_api::Tokens::one_for_all("cli", "secret-token").unwrap();
            let config = headwater_api::ApiConfig::new("test", tokens).unwrap();
            let api = headwater_api::FeedApi::new(feeds, config, &mut registry);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            address_tx
                .send(format!("http://{}", listener.local_addr().unwrap()))
                .unwrap();
            let stop = async move {
                let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
            };
            api.serve(listener, std::sync::Arc::new(registry), stop)
                .await
                .unwrap();
        });
    });
    (address_rx.recv().unwrap(), stop_tx, store)
}

#[test]
fn feeds_and_tail_read_a_running_feed_api_with_a_token() {
    let (url, _stop, _store) = feed_api_server();
    let out = headwater(&["feeds", &url, "--token", "secret-token"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        text(&out.stdout).contains("| accounts.v1 | backfilling | 5 |"),
        "{out:?}"
    );
    assert!(
        text(&out.stdout).contains("| accounts.v1 | rabbitmq | 3 | 2 | "),
        "{out:?}"
    );
    let out = headwater(&["feeds", &url, "--token", "secret-token", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let publisher = &json[0]["publishers"][0];
    assert_eq!(
        (
            &publisher["publisher"],
            &publisher["cursor"],
            &publisher["lag"]
        ),
        (&"rabbitmq".into(), &3.into(), &2.into()),
        "{json}"
    );
    assert!(publisher["lag_seconds"].as_f64().unwrap() > 0.0, "{json}");

    let out = headwater(&[
        "tail",
        &url,
        "--token",
        "secret-token",
        "--feed",
        "accounts.v1",
        "--last",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = text(&out.stdout);
    let lines: Vec<_> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with("#4 ") && lines[1].starts_with("#5 "),
        "{stdout}"
    );

    let args = [
        "tail",
        &url,
        "--token",
        "secret-token",
        "--feed",
        "accounts.v1",
        "--subject",
        "b",
        "--json",
    ];
    let out = headwater(&args);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let sequences: Vec<u64> = text(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["sequence"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(sequences, [1, 2, 3]);

    // A wrong token: the API's refusal, said clearly; the token itself never printed.
    let out = headwater(&["feeds", &url, "--token", "wrong-token-value"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("401"), "{stderr}");
    assert!(!stderr.contains("wrong-token-value"), "{stderr}");
    // No token at all.
    let out = Command::new(env!("CARGO_BIN_EXE_headwater"))
        .args(["feeds", &url])
        .env_remove("HEADWATER_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("HEADWATER_TOKEN"), "{out:?}");
}

#[test]
fn tail_follow_over_http_prints_new_events_as_they_are_committed() {
    use std::io::BufRead;

    use headwater_core::FeedId;
    use headwater_store::FeedStore;

    let (url, _stop, store) = feed_api_server();
    let mut child = Command::new(env!("CARGO_BIN_EXE_headwater"))
        .args([
            "tail",
            &url,
            "--feed",
            "accounts.v1",
            "--after",
            "5",
            "--follow",
            "--json",
        ])
        .env("HEADWATER_TOKEN", "secret-token")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    // Nothing after position 5 yet: the follower waits (long polling) and prints nothing.
    assert!(
        lines_rx
            .recv_timeout(std::time::Duration::from_millis(300))
            .is_err()
    );
    let mut batch = deposits(1, 6, |_| "c");
    batch.from = headwater_core::Position(5);
    batch.events[0].source_position = headwater_core::Position(6);
    let feed = FeedId::parse("accounts.v1").unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(store.commit(&feed, batch))
        .unwrap();
    let line = lines_rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the new event is printed")
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (&event["position"], &event["subject"], &event["sequence"]),
        (&6.into(), &"c".into(), &1.into()),
        "{line}"
    );
}
