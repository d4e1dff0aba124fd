//! G5: a feed rebuilt from the same log is byte-identical, whatever the page and batch sizes.

use std::sync::Arc;

use headwater_feed::{AlwaysLead, Projector, ProjectorOptions, build_feed};
use headwater_store::{EventStore, FeedStore, MemoryFeedStore, MemoryStore};
use tokio_util::sync::CancellationToken;

use crate::support::{Accounts, arc, assert_numbered, read_whole_feed, wait_caught_up, workload};

/// Projects the whole log of `events` into a fresh feed store with these sizes; returns the feed.
async fn project_fresh(
    events: &Arc<MemoryStore>,
    projection: Accounts,
    read_page_events: u64,
    commit_events_max: usize,
    commit_bytes_max: usize,
) -> Vec<headwater_store::FeedEvent> {
    let feeds = arc(MemoryFeedStore::new());
    let feed = headwater_feed::Projection::feed(&projection);
    let mut options = ProjectorOptions::default();
    options.read_page_events = read_page_events;
    options.commit_events_max = commit_events_max;
    options.commit_bytes_max = commit_bytes_max;
    let projector = Projector::new(
        Arc::clone(events),
        Arc::clone(&feeds),
        Arc::new(projection),
        options,
    );
    let mut status = projector.status();
    let shutdown = CancellationToken::new();
    let run = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move { projector.run(&AlwaysLead, &shutdown).await })
    };
    wait_caught_up(&mut status, events.head_position()).await;
    shutdown.cancel();
    run.await.unwrap().unwrap();
    let state = feeds.feed(&feed).await.unwrap().unwrap();
    assert_eq!(state.cursor, events.head_position());
    read_whole_feed(&*feeds, &feed).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_feed_is_identical_whatever_the_page_and_batch_sizes() {
    let events = arc(MemoryStore::new());
    workload(&*events, 600).await;
    let reference = build_feed(&*events, &Accounts::v1()).await.unwrap();
    assert_numbered(&reference);

    // The projection skips events and makes two of some: the feed shows both.
    let internal = events.head_position().0;
    let sevens = reference
        .iter()
        .filter(|e| e.subject.as_str() == "all")
        .count();
    assert!(sevens > 10, "{sevens}");
    assert!((reference.len() as u64) < internal, "nothing skipped");

    for (page, commit_events, commit_bytes) in [
        (10_000, 50_000, usize::MAX),
        (1, 50_000, usize::MAX),
        (7, 3, usize::MAX),
        (100, 1, usize::MAX),
        (333, 50_000, 200),
    ] {
        let feed = project_fresh(&events, Accounts::v1(), page, commit_events, commit_bytes).await;
        assert_numbered(&feed);
        assert_eq!(
            feed.len(),
            reference.len(),
            "page {page}, commit {commit_events}"
        );
        for (got, want) in feed.iter().zip(&reference) {
            assert_eq!(got, want, "page {page}, commit {commit_events}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_versions_never_share_an_id() {
    let events = arc(MemoryStore::new());
    workload(&*events, 50).await;
    let v1 = build_feed(&*events, &Accounts::v1()).await.unwrap();
    let v2 = build_feed(&*events, &Accounts::v2()).await.unwrap();
    let ids: std::collections::HashSet<_> = v1.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), v1.len());
    assert!(v2.iter().all(|e| !ids.contains(&e.id)));
    // Every event's time is its source's recorded_at.
    for event in &v2 {
        let source = events
            .read_all(headwater_core::Position(event.source_position.0 - 1), 1)
            .await
            .unwrap();
        assert_eq!(event.time, source[0].metadata.recorded_at);
    }
}

/// Copies a closed store directory (the log and nothing else).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_feeds_rebuilt_from_one_log_are_identical() {
    use headwater_embedded::{EmbeddedFeedStore, EmbeddedStore};
    let root = tempfile::tempdir().unwrap();
    let original = root.path().join("original");
    {
        let events = EmbeddedStore::open(&original).unwrap();
        workload(&events, 150).await;
    }
    let mut feeds = Vec::new();
    for (i, (page, commit)) in [(10_000, 50_000), (3, 2), (64, 7)].into_iter().enumerate() {
        let dir = root.path().join(format!("copy{i}"));
        copy_dir(&original, &dir);
        let events = Arc::new(EmbeddedStore::open(&dir).unwrap());
        let store = Arc::new(EmbeddedFeedStore::open(&events).unwrap());
        let mut options = ProjectorOptions::default();
        options.read_page_events = page;
        options.commit_events_max = commit;
        let projector = Projector::new(
            Arc::clone(&events),
            Arc::clone(&store),
            Arc::new(Accounts::v1()),
            options,
        );
        let mut status = projector.status();
        let shutdown = CancellationToken::new();
        let run = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move { projector.run(&AlwaysLead, &shutdown).await })
        };
        wait_caught_up(&mut status, events.head_position()).await;
        shutdown.cancel();
        run.await.unwrap().unwrap();
        let feed = read_whole_feed(&*store, &Accounts::v1().feed_id()).await;
        assert!(feed == build_feed(&*events, &Accounts::v1()).await.unwrap());
        feeds.push(feed);
    }
    assert!(!feeds[0].is_empty());
    assert!(feeds.iter().all(|f| *f == feeds[0]));
}
