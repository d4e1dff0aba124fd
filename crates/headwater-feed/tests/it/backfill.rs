//! G10: a new version is backfilled while appends go on; the old one keeps being served.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use headwater_core::{FeedPosition, FeedStatus, Position};
use headwater_feed::{ProjectorOptions, ProjectorState, Projectors, Stopped, build_feed};
use headwater_store::{EventStore, FeedStore, MemoryFeedStore, MemoryStore};

use crate::support::{
    Accounts, append, arc, assert_numbered, read_whole_feed, wait_caught_up, wait_status, workload,
};

/// Appenders running until stopped.
const APPENDERS: u64 = 4;
/// Each appender's pause between appends.
const APPEND_PAUSE: Duration = Duration::from_millis(2);

fn options() -> ProjectorOptions {
    let mut options = ProjectorOptions::default();
    // Small pages: the backfill takes many steps, so its progress can be seen.
    options.read_page_events = 500;
    options.progress_log_interval = Duration::from_millis(50);
    options
}

pub(crate) async fn backfill_while_appending<E, F>(
    events: Arc<E>,
    feeds: Arc<F>,
    initial_appends: u64,
) where
    E: EventStore + ?Sized,
    F: FeedStore + ?Sized,
{
    let v1 = Accounts::v1().feed_id();
    let v2 = Accounts::v2().feed_id();
    workload(&*events, initial_appends).await;

    // v1 live.
    let first = Projectors::builder()
        .projection(Accounts::v1())
        .options(options())
        .start(Arc::clone(&events), Arc::clone(&feeds))
        .await
        .unwrap();
    wait_caught_up(&mut first.watch(&v1).unwrap(), events.head_position()).await;

    // Appends from several tasks, continuously.
    let stop = Arc::new(AtomicBool::new(false));
    let appenders: Vec<_> = (0..APPENDERS)
        .map(|task| {
            let events = Arc::clone(&events);
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut n = 1_000_000 * (task + 1);
                let mut appends = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    append(&*events, 100 + task, n, 1 + n % 3).await;
                    n += 1 + n % 3;
                    appends += 1;
                    // Paced below the projectors' rate (in a debug build), or a backfill could
                    // never catch up: the point is appends going on, not a race.
                    tokio::time::sleep(APPEND_PAUSE).await;
                }
                appends
            })
        })
        .collect();

    // A reader of v1 throughout: always readable, only growing.
    let reading = Arc::new(AtomicBool::new(true));
    let reader = {
        let feeds = Arc::clone(&feeds);
        let reading = Arc::clone(&reading);
        let v1 = v1.clone();
        tokio::spawn(async move {
            let mut after = FeedPosition::START;
            let mut reads = 0u64;
            while reading.load(Ordering::Relaxed) {
                let page = feeds.read_feed(&v1, after, 1_000).await.unwrap();
                if let Some(last) = page.last() {
                    assert_eq!(page[0].position, after.next());
                    after = last.position;
                }
                reads += 1;
                tokio::task::yield_now().await;
            }
            (after, reads)
        })
    };

    // Redeploy with v2 added, as a live service would.
    let v1_before = feeds.feed(&v1).await.unwrap().unwrap().head;
    let outcomes = first.shutdown().await;
    assert!(
        outcomes
            .iter()
            .all(|(_, o)| matches!(o, Ok(Stopped::Shutdown))),
        "{outcomes:?}"
    );
    let second = Projectors::builder()
        .projection(Accounts::v1())
        .projection(Accounts::v2())
        .options(options())
        .start(Arc::clone(&events), Arc::clone(&feeds))
        .await
        .unwrap();
    let mut v2_status = second.watch(&v2).unwrap();
    let progress = wait_status(&mut v2_status, "backfill progress", |s| {
        s.state == ProjectorState::Running
            && s.feed_status == FeedStatus::Backfilling
            && s.backfill.is_some_and(|b| b.done > 0 && b.done < b.total)
    })
    .await;
    let backfill = progress.backfill.unwrap();
    assert!(backfill.events_per_second > 0.0, "{progress:?}");
    wait_status(&mut v2_status, "live", |s| {
        s.feed_status == FeedStatus::Live
    })
    .await;
    assert_eq!(
        feeds.feed(&v2).await.unwrap().unwrap().status,
        FeedStatus::Live
    );

    // Appends go on a little after v2 went live, then stop.
    let head_at_live = events.head_position();
    let mut head = events.watch_head();
    tokio::time::timeout(
        Duration::from_secs(30),
        head.wait_for(|h| h.0 > head_at_live.0 + 200),
    )
    .await
    .unwrap()
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut appended = 0;
    for appender in appenders {
        appended += appender.await.unwrap();
    }
    assert!(appended > 0);
    let final_head = events.head_position();
    wait_caught_up(&mut second.watch(&v1).unwrap(), final_head).await;
    wait_caught_up(&mut v2_status, final_head).await;
    reading.store(false, Ordering::Relaxed);
    let (read_up_to, reads) = reader.await.unwrap();
    assert!(reads > 1);
    assert!(
        read_up_to > v1_before,
        "v1 did not grow while v2 backfilled"
    );

    for (projection, feed) in [(Accounts::v1(), &v1), (Accounts::v2(), &v2)] {
        let offline = build_feed(&*events, &projection).await.unwrap();
        let projected = read_whole_feed(&*feeds, feed).await;
        assert_numbered(&projected);
        assert_eq!(projected.len(), offline.len(), "{feed}");
        assert!(
            projected == offline,
            "{feed} differs from the offline build"
        );
        assert_eq!(feeds.feed(feed).await.unwrap().unwrap().cursor, final_head);
    }
    let outcomes = second.shutdown().await;
    assert!(
        outcomes
            .iter()
            .all(|(_, o)| matches!(o, Ok(Stopped::Shutdown))),
        "{outcomes:?}"
    );
    let _ = Position::START;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_backfills_while_appends_go_on_memory() {
    backfill_while_appending(arc(MemoryStore::new()), arc(MemoryFeedStore::new()), 4_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_backfills_while_appends_go_on_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let events = headwater_embedded::EmbeddedStore::open(dir.path()).unwrap();
    let feeds = headwater_embedded::EmbeddedFeedStore::open(&events).unwrap();
    backfill_while_appending(arc(events), arc(feeds), 1_500).await;
}

/// Captures what tracing writes.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// A backfill logs its progress (done, total, rate), then that the feed is live.
#[test]
fn a_backfill_logs_its_progress() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    // A runtime on this thread only, so that the subscriber sees the projector's task.
    let _default = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let events = arc(MemoryStore::new());
        let feeds = arc(MemoryFeedStore::new());
        workload(&*events, 300).await;
        let mut options = ProjectorOptions::default();
        options.read_page_events = 10;
        options.progress_log_interval = Duration::ZERO;
        let projectors = Projectors::builder()
            .projection(Accounts::v1())
            .options(options)
            .start(events.clone(), feeds)
            .await
            .unwrap();
        wait_caught_up(
            &mut projectors.watch(&Accounts::v1().feed_id()).unwrap(),
            events.head_position(),
        )
        .await;
        projectors.shutdown().await;
    });
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let progress: Vec<_> = text.lines().filter(|l| l.contains("backfilling")).collect();
    assert!(progress.len() > 5, "{text}");
    for line in &progress {
        for field in ["feed=accounts.v1", "done=", "total=", "rate="] {
            assert!(line.contains(field), "{line}");
        }
    }
    assert!(text.contains("backfill done: the feed is live"), "{text}");
}
