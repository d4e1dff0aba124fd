//! A projection that fails stops its own projector with a visible error; the others go on.

use headwater_core::{FeedId, FeedStatus, Position, RecordedEvent};
use headwater_feed::{
    Emit, Projection, ProjectionError, ProjectorError, ProjectorState, Projectors, Stopped,
    build_feed, build_feed_until,
};
use headwater_store::{EventStore, FeedStore, MemoryFeedStore, MemoryStore};

use crate::support::{
    Accounts, Data, append, arc, read_whole_feed, wait_caught_up, wait_status, workload,
};

/// How a broken projection breaks on the event whose `n` is [`BREAK_AT`].
#[derive(Clone, Copy, Debug)]
enum Breakage {
    Error,
    Panic,
    BadSubject,
    TooMany,
    TooBig,
}

const BREAK_AT: u64 = 300;

#[derive(Debug)]
struct Broken {
    feed: &'static str,
    how: Breakage,
}

impl Projection for Broken {
    fn feed(&self) -> FeedId {
        FeedId::parse(self.feed).unwrap()
    }

    fn project(&self, event: &RecordedEvent, out: &mut Emit) -> Result<(), ProjectionError> {
        if event.stream.category() != "acct" {
            return Ok(());
        }
        let data: Data = serde_json::from_slice(&event.data)?;
        out.emit("broken.seen", event.stream.id(), &data.n)?;
        if data.n != BREAK_AT {
            return Ok(());
        }
        match self.how {
            Breakage::Error => Err(ProjectionError::failed("the projection refuses n = 300")),
            Breakage::Panic => panic!("the projection panics on n = 300"),
            Breakage::BadSubject => out.emit("broken.seen", "not a subject!", &1),
            Breakage::TooMany => {
                for _ in 0..100 {
                    out.emit("broken.seen", "s", &1)?;
                }
                Ok(())
            }
            Breakage::TooBig => out.emit("broken.seen", "s", &"x".repeat(2 * 1024 * 1024)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_projection_stops_only_its_own_projector() {
    let events = arc(MemoryStore::new());
    let feeds = arc(MemoryFeedStore::new());
    workload(&*events, 200).await;
    let broken = [
        ("error.v1", Breakage::Error, "refuses n = 300"),
        (
            "panic.v1",
            Breakage::Panic,
            "panicked: the projection panics",
        ),
        ("subject.v1", Breakage::BadSubject, "invalid subject"),
        ("many.v1", Breakage::TooMany, "invalid event count"),
        ("big.v1", Breakage::TooBig, "invalid data"),
    ];
    let mut builder = Projectors::builder().projection(Accounts::v1());
    for (feed, how, _) in broken {
        builder = builder.projection(Broken { feed, how });
    }
    let projectors = builder
        .start(arc_dyn(&events), feeds.clone())
        .await
        .unwrap();

    // The event with n = 300.
    let failing = find_n(&*events, BREAK_AT).await;
    for (feed, how, message) in broken {
        let feed = FeedId::parse(feed).unwrap();
        let status = wait_status(&mut projectors.watch(&feed).unwrap(), "failed", |s| {
            s.state == ProjectorState::Failed
        })
        .await;
        let error = status.last_error.clone().unwrap();
        assert!(error.contains(message), "{how:?}: {error}");
        assert!(
            error.contains(&format!("position {}", failing.0)),
            "{how:?}: {error}"
        );
        // The feed holds everything before the failing event, nothing of it or after.
        let state = feeds.feed(&feed).await.unwrap().unwrap();
        assert!(state.cursor < failing, "{how:?}: {state:?}");
        let projection = Broken {
            feed: leak(&feed),
            how,
        };
        let expected = build_feed_until(&*events, &projection, Some(state.cursor))
            .await
            .unwrap();
        assert!(read_whole_feed(&*feeds, &feed).await == expected, "{how:?}");
    }

    // The healthy projector went on, and goes on.
    let v1 = Accounts::v1().feed_id();
    wait_caught_up(&mut projectors.watch(&v1).unwrap(), events.head_position()).await;
    append(&*events, 1, 10_000, 3).await;
    wait_caught_up(&mut projectors.watch(&v1).unwrap(), events.head_position()).await;
    let offline = build_feed(&*events, &Accounts::v1()).await.unwrap();
    assert!(read_whole_feed(&*feeds, &v1).await == offline);
    assert_eq!(
        feeds.feed(&v1).await.unwrap().unwrap().status,
        FeedStatus::Live
    );

    for (feed, outcome) in projectors.shutdown().await {
        if feed == v1 {
            assert!(matches!(outcome, Ok(Stopped::Shutdown)), "{outcome:?}");
        } else {
            assert!(
                matches!(outcome, Err(ProjectorError::Projection(_))),
                "{feed}: {outcome:?}"
            );
        }
    }
}

fn arc_dyn(events: &std::sync::Arc<MemoryStore>) -> std::sync::Arc<dyn EventStore> {
    events.clone()
}

fn leak(feed: &FeedId) -> &'static str {
    Box::leak(feed.to_string().into_boxed_str())
}

async fn find_n<E: EventStore + ?Sized>(events: &E, n: u64) -> Position {
    let mut found = None;
    headwater_store::read_all_pages(events, Position::START, 1_000, |page| {
        for event in page {
            if let Ok(data) = serde_json::from_slice::<Data>(&event.data)
                && data.n == n
                && event.stream.category() == "acct"
            {
                found = Some(event.position);
            }
        }
    })
    .await
    .unwrap();
    found.unwrap()
}
