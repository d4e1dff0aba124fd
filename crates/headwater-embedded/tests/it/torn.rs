//! Torn and damaged files.
//!
//! (a) The WAL of a killed writer, cut or garbled at many places: the store opens, shows exactly
//! the appends whose commit frame lies wholly before the first damaged byte (SQLite's WAL frame
//! checksums and salts end the log there), each whole, and `verify` finds nothing.
//!
//! (b) A damaged database file (cut short, garbage in a page): opening or reading fails with a
//! clear error or returns the right events, never wrong ones, and `verify` reports the damage.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use headwater_core::limits::READ_PAGE_EVENTS_MAX;
use headwater_core::{
    EventId, ExpectedVersion, Position, RecordedEvent, StreamName, StreamVersion,
};
use headwater_embedded::{EmbeddedStore, OpenError, inspect, verify};
use headwater_store::conformance::event;
use headwater_store::{EventStore, ReadError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::crash::{Ack, Said, append_events, parse_line, seed};
use headwater_testkit::process::{ChildProcess, say};

/// Set in the child: the store directory. Marks the process as a child.
const CHILD_ENV: &str = "HEADWATER_TORN_CHILD";
/// Set by whoever runs the tests: the seed of the random offsets and garbage.
const SEED_ENV: &str = "HEADWATER_TORN_SEED";
/// Appends the child makes, one at a time: one transaction, so one commit frame, each.
const APPENDS: usize = 40;
/// Streams the child's appends go to, in turn.
const STREAMS: usize = 3;
/// Random cut offsets tried, besides the frame boundaries.
const RANDOM_CUTS: usize = 24;
/// How long the parent waits for the child, in seconds.
const CHILD_TIMEOUT_SECS: u64 = 60;

const DATABASE: &str = "events.sqlite3";
const WAL: &str = "events.sqlite3-wal";
const WAL_HEADER_BYTES: u64 = 32;
const WAL_FRAME_HEADER_BYTES: u64 = 24;

fn stream_name(i: usize) -> StreamName {
    StreamName::new(format!("torn-{}", i % STREAMS)).unwrap()
}

/// The child: [`APPENDS`] appends, one after the other, each acknowledged on stdout, then it
/// waits to be killed. Does nothing in a normal test run.
#[test]
fn child_writer() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = EmbeddedStore::open(&dir).unwrap();
        for i in 0..APPENDS {
            let first = EventId::new_random();
            let n = 1 + i % 3;
            let outcome = store
                .append(
                    &stream_name(i),
                    ExpectedVersion::Any,
                    append_events(first, n),
                )
                .await
                .unwrap();
            say(&format!(
                "ACK {first} {} {} {} 0",
                outcome.first_position.0, outcome.last_position.0, outcome.stream_version.0
            ));
        }
        say("DONE");
        // Killed here, with the store open: nothing was checkpointed.
        loop {
            std::thread::park();
        }
    });
}

/// Runs the child in `dir` and kills it once it is done; its acknowledged appends, in order.
fn killed_writer(dir: &Path) -> Vec<Ack> {
    let mut child = ChildProcess::spawn(
        "torn::child_writer",
        &[(CHILD_ENV, dir.display().to_string())],
    );
    let mut acks = Vec::new();
    child.wait_for(
        "DONE",
        Duration::from_secs(CHILD_TIMEOUT_SECS),
        |line| match parse_line(line) {
            Said::Ack(ack) => acks.push(ack),
            other => panic!("{other:?}"),
        },
    );
    assert!(child.kill().is_empty());
    assert_eq!(acks.len(), APPENDS);
    acks
}

/// The end offsets of the WAL's commit frames, in order.
fn commit_ends(wal: &[u8]) -> Vec<u64> {
    let page_bytes = u64::from(u32::from_be_bytes(wal[8..12].try_into().unwrap()));
    let frame_bytes = WAL_FRAME_HEADER_BYTES + page_bytes;
    let mut ends = Vec::new();
    let mut at = WAL_HEADER_BYTES;
    while at + frame_bytes <= wal.len() as u64 {
        let header = &wal[at as usize..][..WAL_FRAME_HEADER_BYTES as usize];
        let database_pages = u32::from_be_bytes(header[4..8].try_into().unwrap());
        at += frame_bytes;
        if database_pages != 0 {
            ends.push(at);
        }
    }
    ends
}

/// Copies the store's files (not its LOCK) from `from` into a new directory `to`.
fn copy_store(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(DATABASE) {
            fs::copy(entry.path(), to.join(name)).unwrap();
        }
    }
}

async fn whole_log(store: &EmbeddedStore) -> Result<Vec<RecordedEvent>, ReadError> {
    let mut log = Vec::new();
    headwater_store::read_all_pages(store, Position::START, READ_PAGE_EVENTS_MAX, |page| {
        log.extend_from_slice(page)
    })
    .await?;
    Ok(log)
}

/// Opens the damaged copy in `dir` and checks it shows exactly the first `visible` of `acks`,
/// whole, that `verify` is clean, and that appends go on after them.
async fn assert_shows_prefix(dir: &Path, acks: &[Ack], visible: usize, case: &str) {
    let head = acks[..visible].last().map_or(0, |a| a.last_position);
    // Read-only first, as an operator would look at the files left by a crash: `inspect` and
    // `verify` see what the store's open will see, and change neither file.
    let files = || {
        (
            fs::read(dir.join(DATABASE)).unwrap(),
            fs::read(dir.join(WAL)).unwrap(),
        )
    };
    let before = files();
    let inspection = inspect(dir).unwrap();
    assert_eq!(
        (inspection.events, inspection.head),
        (head, Position(head)),
        "{case}"
    );
    let report = verify(dir, &mut |_| {}).unwrap();
    assert!(report.is_clean(), "{case}: {report:#?}");
    assert_eq!(report.events_checked, head, "{case}");
    assert!(
        files() == before,
        "{case}: inspect or verify wrote to the files"
    );

    let store = EmbeddedStore::open(dir).unwrap_or_else(|e| panic!("{case}: open failed: {e}"));
    let log = whole_log(&store).await.unwrap();
    assert_eq!(store.head_position(), Position(head), "{case}");
    assert_eq!(
        log.len() as u64,
        head,
        "{case}: the first {visible} appends"
    );
    for (i, ack) in acks[..visible].iter().enumerate() {
        let n = (ack.last_position - ack.first_position + 1) as usize;
        let events = &log[ack.first_position as usize - 1..ack.last_position as usize];
        for (recorded, new) in events.iter().zip(append_events(ack.first, n)) {
            assert!(recorded.records(&new), "{case}: {recorded:?}");
            assert_eq!(recorded.stream, stream_name(i), "{case}");
        }
        assert_eq!(events.last().unwrap().stream_version.0, ack.version);
    }
    let report = verify(dir, &mut |_| {}).unwrap();
    assert!(report.is_clean(), "{case}: {report:#?}");
    assert_eq!(report.events_checked, head, "{case}");
    // The store goes on from there, durably.
    let outcome = store
        .append(
            &stream_name(0),
            ExpectedVersion::Any,
            vec![event(b"after".to_vec())],
        )
        .await
        .unwrap();
    assert_eq!(outcome.first_position, Position(head + 1), "{case}");
    drop(store);
    let store = EmbeddedStore::open(dir).unwrap();
    assert_eq!(store.head_position(), Position(head + 1), "{case}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_wal_tail_is_cut_at_the_last_whole_commit() {
    let seed = seed(SEED_ENV);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("original");
    let acks = killed_writer(&original);

    // The premise: every append is in the WAL only, one commit frame each.
    let wal = fs::read(original.join(WAL)).unwrap();
    let ends = commit_ends(&wal);
    assert_eq!(ends.len(), APPENDS, "one commit frame per append");
    assert_eq!(
        *ends.last().unwrap(),
        wal.len() as u64,
        "the WAL ends with the last commit"
    );
    {
        let alone = dir.path().join("database-alone");
        fs::create_dir(&alone).unwrap();
        fs::copy(original.join(DATABASE), alone.join(DATABASE)).unwrap();
        let conn = rusqlite::Connection::open(alone.join(DATABASE)).unwrap();
        let events: i64 = conn
            .query_row("SELECT count(*) FROM events", [], |row| row.get(0))
            .unwrap();
        assert_eq!(events, 0, "nothing was checkpointed into the database file");
    }
    let visible_before = |damage_at: u64| ends.iter().filter(|end| **end <= damage_at).count();

    let started = Instant::now();
    let mut cuts: Vec<u64> = vec![0, 1, WAL_HEADER_BYTES - 1, WAL_HEADER_BYTES];
    for end in &ends[..3] {
        cuts.extend([end - 1, *end, end + 1]);
    }
    cuts.extend((0..RANDOM_CUTS).map(|_| rng.random_range(0..wal.len() as u64)));
    cuts.push(wal.len() as u64);
    let mut case = 0;
    for cut in cuts {
        case += 1;
        let copy = dir.path().join(format!("cut-{case}"));
        copy_store(&original, &copy);
        fs::OpenOptions::new()
            .write(true)
            .open(copy.join(WAL))
            .unwrap()
            .set_len(cut)
            .unwrap();
        let expected = visible_before(cut);
        assert_shows_prefix(&copy, &acks, expected, &format!("WAL cut at {cut}")).await;
    }

    // Garbage instead of the last bytes, or in the middle of a frame: every commit from the
    // first damaged frame on is gone, as if the WAL were cut there.
    let mut garbles: Vec<(u64, u64)> = [1, 100, 5_000, 20_000]
        .into_iter()
        .map(|n| (wal.len() as u64 - n, n))
        .collect();
    garbles.extend((0..8).map(|_| (rng.random_range(0..wal.len() as u64 - 16), 16)));
    for (at, n) in garbles {
        case += 1;
        let copy = dir.path().join(format!("garbled-{case}"));
        copy_store(&original, &copy);
        let mut bytes = fs::read(copy.join(WAL)).unwrap();
        for b in &mut bytes[at as usize..(at + n) as usize] {
            *b ^= rng.random_range(1..=255u8);
        }
        fs::write(copy.join(WAL), &bytes).unwrap();
        let expected = visible_before(at);
        let what = format!("{n} garbled WAL bytes at {at}");
        assert_shows_prefix(&copy, &acks, expected, &what).await;
    }
    println!("{case} damaged WALs checked in {:?}", started.elapsed());
}

/// A closed store of `EVENTS` events over three streams, everything in the database file.
const EVENTS: usize = 1_500;

async fn closed_store(dir: &Path) -> Vec<RecordedEvent> {
    let store = EmbeddedStore::open(dir).unwrap();
    for i in 0..EVENTS / 10 {
        let events: Vec<_> = (0..10)
            .map(|k| {
                event(
                    format!("{{\"i\":{i},\"k\":{k},\"pad\":\"{}\"}}", "x".repeat(150)).into_bytes(),
                )
            })
            .collect();
        store
            .append(&stream_name(i), ExpectedVersion::Any, events)
            .await
            .unwrap();
    }
    let log = whole_log(&store).await.unwrap();
    assert_eq!(log.len(), EVENTS);
    drop(store);
    assert!(!dir.join(WAL).exists(), "the store was checkpointed");
    log
}

/// How a damaged store behaved.
#[derive(Debug, Default)]
struct Observed {
    open_error: Option<String>,
    read_errors: usize,
    events_read: usize,
    verify_error: Option<String>,
    problems: u64,
    first_problem: Option<String>,
}

impl Observed {
    fn damage_seen(&self) -> bool {
        self.open_error.is_some()
            || self.read_errors > 0
            || self.verify_error.is_some()
            || self.problems > 0
    }
}

/// Opens and reads the damaged store in `dir`: every event read must be the original at its
/// position; errors must be clear ones.
async fn observe(dir: &Path, original: &[RecordedEvent], case: &str) -> Observed {
    let mut seen = Observed::default();
    match verify(dir, &mut |_| {}) {
        Ok(report) => {
            seen.problems = report.problems_found;
            seen.first_problem = report.problems.first().map(|p| p.to_string());
        }
        Err(e) => {
            assert!(
                matches!(e, OpenError::Corrupt { .. } | OpenError::NotAStore { .. }),
                "{case}: verify: {e:?}"
            );
            seen.verify_error = Some(e.to_string());
        }
    }
    let store = match EmbeddedStore::open(dir) {
        Ok(store) => store,
        Err(e) => {
            assert!(
                matches!(e, OpenError::Corrupt { .. } | OpenError::NotAStore { .. }),
                "{case}: open: {e:?}"
            );
            seen.open_error = Some(e.to_string());
            return seen;
        }
    };
    let check = |event: &RecordedEvent| {
        let at = event.position.0 as usize;
        assert!(
            at >= 1 && at <= original.len() && *event == original[at - 1],
            "{case}: WRONG DATA served: {event:?}"
        );
    };
    // The whole log in small pages, skipping a page that fails.
    const PAGE: u64 = 50;
    let mut after = 0;
    while after < original.len() as u64 {
        match store.read_all(Position(after), PAGE).await {
            Ok(page) => {
                page.iter().for_each(check);
                seen.events_read += page.len();
                match page.last() {
                    Some(last) => after = last.position.0,
                    None => break,
                }
            }
            Err(ReadError::Corrupt { .. }) => {
                seen.read_errors += 1;
                after += PAGE;
            }
            Err(e) => panic!("{case}: a read failed without saying it is corruption: {e:?}"),
        }
    }
    let mut streams: HashMap<&StreamName, ()> = HashMap::new();
    for e in original {
        streams.insert(&e.stream, ());
    }
    for stream in streams.keys() {
        match store
            .read_stream(stream, StreamVersion::START, 10_000)
            .await
        {
            Ok(events) => events.iter().for_each(check),
            Err(ReadError::Corrupt { .. }) => seen.read_errors += 1,
            Err(e) => panic!("{case}: a read failed without saying it is corruption: {e:?}"),
        }
    }
    seen
}

fn page_bytes(database: &Path) -> u64 {
    let header = fs::read(database).unwrap();
    match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        n => u64::from(n),
    }
}

fn fresh_copy(original: &Path, root: &Path, name: &str) -> PathBuf {
    let copy = root.join(name);
    copy_store(original, &copy);
    copy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_database_file_is_an_error_not_wrong_data() {
    let dir = tempfile::tempdir().unwrap();
    let original_dir = dir.path().join("original");
    let original = closed_store(&original_dir).await;
    let file_bytes = fs::metadata(original_dir.join(DATABASE)).unwrap().len();
    let page = page_bytes(&original_dir.join(DATABASE));
    let pages = file_bytes / page;
    assert!(pages > 20, "the store spans {pages} pages");
    let cuts = [
        50,
        page,
        page * 3 + 100,
        file_bytes / 2,
        file_bytes - page,
        file_bytes - 1,
    ];
    for cut in cuts {
        let copy = fresh_copy(&original_dir, dir.path(), &format!("cut-{cut}"));
        fs::OpenOptions::new()
            .write(true)
            .open(copy.join(DATABASE))
            .unwrap()
            .set_len(cut)
            .unwrap();
        let case = format!("database cut to {cut} of {file_bytes} bytes");
        let seen = observe(&copy, &original, &case).await;
        assert!(seen.damage_seen(), "{case}: {seen:?}");
        assert!(
            seen.verify_error.is_some() || seen.problems > 0,
            "{case}: verify reports it: {seen:?}"
        );
        println!("{case}: {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_a_database_page_is_an_error_not_wrong_data() {
    let seed = seed(SEED_ENV);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let original_dir = dir.path().join("original");
    let original = closed_store(&original_dir).await;
    let database = fs::read(original_dir.join(DATABASE)).unwrap();
    let page = page_bytes(&original_dir.join(DATABASE));
    let pages = database.len() as u64 / page;
    // Whole pages of garbage: every page of the file is in use, so verify must see each.
    let mut whole: Vec<u64> = vec![1, 2, pages / 2, pages];
    whole.extend((0..6).map(|_| rng.random_range(1..=pages)));
    for number in whole {
        let copy = fresh_copy(
            &original_dir,
            dir.path(),
            &format!("page-{number}-{}", rng.random::<u32>()),
        );
        let mut bytes = database.clone();
        let start = ((number - 1) * page) as usize;
        rng.fill(&mut bytes[start..start + page as usize]);
        fs::write(copy.join(DATABASE), &bytes).unwrap();
        let case = format!("page {number} of {pages} overwritten with garbage");
        let seen = observe(&copy, &original, &case).await;
        assert!(
            seen.verify_error.is_some() || seen.problems > 0,
            "{case}: verify reports it: {seen:?}"
        );
        println!("{case}: {seen:?}");
    }
    // A few garbled bytes somewhere: either harmless (free space in a page), and then everything
    // reads right, or reported.
    for _ in 0..16 {
        let at = rng.random_range(100..database.len() - 8);
        let copy = fresh_copy(&original_dir, dir.path(), &format!("bytes-{at}"));
        let mut bytes = database.clone();
        for b in &mut bytes[at..at + 8] {
            *b ^= rng.random_range(1..=255u8);
        }
        fs::write(copy.join(DATABASE), &bytes).unwrap();
        let case = format!("8 bytes garbled at {at} (page {})", at as u64 / page + 1);
        let seen = observe(&copy, &original, &case).await;
        if seen.verify_error.is_none() && seen.problems == 0 {
            assert!(
                seen.open_error.is_none()
                    && seen.read_errors == 0
                    && seen.events_read == original.len(),
                "{case}: verify is clean, so everything reads: {seen:?}"
            );
        }
        println!("{case}: {seen:?}");
    }
}
