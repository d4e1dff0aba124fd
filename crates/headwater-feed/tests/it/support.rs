//! What the tests share: a workload on the internal log, projections of it, and waits with a
//! deadline.

use std::sync::Arc;
use std::time::Duration;

use headwater_core::limits::FEED_PAGE_EVENTS_MAX;
use headwater_core::{
    EventId, EventType, ExpectedVersion, FeedId, FeedPosition, NewEvent, Position, RecordedEvent,
    StreamName,
};
use headwater_feed::{Emit, Projection, ProjectionError, ProjectorStatus};
use headwater_store::{EventStore, FeedEvent, FeedStore};
use tokio::sync::watch;

/// The internal event type of the workload.
pub(crate) const EVENT_TYPE: &str = "acct.changed";

/// Appends `count` events to `acct-{account}`, numbered from `first`: data `{"n": …}`.
pub(crate) async fn append<E: EventStore + ?Sized>(
    events: &E,
    account: u64,
    first: u64,
    count: u64,
) {
    let stream = StreamName::new(format!("acct-{account}")).unwrap();
    let batch = (first..first + count)
        .map(|n| {
            NewEvent::new(
                EventId::new_random(),
                EventType::new(EVENT_TYPE).unwrap(),
                format!("{{\"n\":{n},\"account\":{account}}}").into_bytes(),
            )
        })
        .collect();
    events
        .append(&stream, ExpectedVersion::Any, batch)
        .await
        .unwrap();
}

/// Appends an event of another category, which the projections skip.
pub(crate) async fn append_other<E: EventStore + ?Sized>(events: &E, n: u64) {
    let stream = StreamName::new("other-1").unwrap();
    let event = NewEvent::new(
        EventId::new_random(),
        EventType::new("other.thing").unwrap(),
        format!("{{\"n\":{n}}}").into_bytes(),
    );
    events
        .append(&stream, ExpectedVersion::Any, vec![event])
        .await
        .unwrap();
}

/// A log of `appends` appends of 1..=5 events over 13 accounts, with some other events between.
pub(crate) async fn workload<E: EventStore + ?Sized>(events: &E, appends: u64) {
    let mut n = 0;
    for i in 0..appends {
        let count = 1 + i % 5;
        append(events, i % 13, n, count).await;
        n += count;
        if i % 9 == 0 {
            append_other(events, i).await;
        }
    }
}

/// The workload's projection: version 1 skips every event whose `n` is a multiple of 5 and the
/// other category, makes two events (one on subject `all`) of multiples of 7, one of the rest;
/// version 2 has other types and data, and makes one event of every account event.
#[derive(Debug)]
pub(crate) struct Accounts {
    pub(crate) version: u32,
}

impl Accounts {
    pub(crate) fn v1() -> Accounts {
        Accounts { version: 1 }
    }

    pub(crate) fn v2() -> Accounts {
        Accounts { version: 2 }
    }

    pub(crate) fn feed_id(&self) -> FeedId {
        Projection::feed(self)
    }
}

#[derive(serde::Deserialize)]
pub(crate) struct Data {
    pub(crate) n: u64,
    pub(crate) account: u64,
}

impl Projection for Accounts {
    fn feed(&self) -> FeedId {
        FeedId::parse(&format!("accounts.v{}", self.version)).unwrap()
    }

    fn project(&self, event: &RecordedEvent, out: &mut Emit) -> Result<(), ProjectionError> {
        if event.stream.category() != "acct" {
            return Ok(());
        }
        let data: Data = serde_json::from_slice(&event.data)?;
        let subject = event.stream.id();
        if self.version == 2 {
            return out.emit(
                "accounts.changed",
                subject,
                &serde_json::json!({"number": data.n, "account": subject, "v": 2}),
            );
        }
        if data.n.is_multiple_of(5) {
            return Ok(());
        }
        out.emit(
            "accounts.counted",
            subject,
            &serde_json::json!({"n": data.n}),
        )?;
        if data.n.is_multiple_of(7) {
            out.emit(
                "accounts.sevens",
                "all",
                &serde_json::json!({"n": data.n, "account": data.account}),
            )?;
        }
        Ok(())
    }
}

/// Every event of a feed, by pages.
pub(crate) async fn read_whole_feed<F: FeedStore + ?Sized>(
    feeds: &F,
    feed: &FeedId,
) -> Vec<FeedEvent> {
    let mut out = Vec::new();
    let mut after = FeedPosition::START;
    loop {
        let page = feeds
            .read_feed(feed, after, FEED_PAGE_EVENTS_MAX)
            .await
            .unwrap();
        let Some(last) = page.last() else {
            return out;
        };
        after = last.position;
        out.extend(page);
    }
}

/// The longest a test waits for a projector to reach a state.
pub(crate) const WAIT: Duration = Duration::from_secs(60);

/// Waits (with a deadline) until the status satisfies `done`; panics with the last status on
/// timeout.
pub(crate) async fn wait_status(
    status: &mut watch::Receiver<ProjectorStatus>,
    what: &str,
    done: impl FnMut(&ProjectorStatus) -> bool,
) -> ProjectorStatus {
    let outcome = match tokio::time::timeout(WAIT, status.wait_for(done)).await {
        Ok(Ok(status)) => Ok(status.clone()),
        Ok(Err(_)) => Err("the projector's status ended"),
        Err(_) => Err("timed out"),
    };
    outcome.unwrap_or_else(|why| panic!("{what}: {why} ({WAIT:?}): {:?}", *status.borrow()))
}

/// Waits until the projector has projected everything up to `head` and the feed is live.
pub(crate) async fn wait_caught_up(status: &mut watch::Receiver<ProjectorStatus>, head: Position) {
    wait_status(status, "caught up", |s| {
        s.cursor >= head && s.feed_status == headwater_core::FeedStatus::Live
    })
    .await;
}

/// Checks a feed's numbering: positions 1, 2, 3 …; per subject, sequences 1, 2, 3 ….
pub(crate) fn assert_numbered(feed: &[FeedEvent]) {
    let mut sequences = std::collections::HashMap::new();
    for (i, event) in feed.iter().enumerate() {
        assert_eq!(event.position.0, i as u64 + 1, "{event:?}");
        let sequence = sequences.entry(event.subject.clone()).or_insert(0u64);
        *sequence += 1;
        assert_eq!(event.sequence.0, *sequence, "{event:?}");
    }
}

pub(crate) fn arc<T>(value: T) -> Arc<T> {
    Arc::new(value)
}
