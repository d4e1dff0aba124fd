//! The consumer's rules against a producer in memory: duplicates skipped, gaps healed, lost last
//! events found by reconstitution, bootstraps shared, a producer that is down waited for.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use headwater_consume::{
    ConsumeError, Consumer, ConsumerOptions, Delivery, IntegrationEvent, MemoryUpstream,
    MemoryView, UpstreamError, ViewError, ViewStore,
};
use headwater_core::{FeedId, Sequence, Subject};
use proptest::prelude::*;

pub(crate) type State = BTreeMap<String, Vec<u64>>;
pub(crate) type TestConsumer = Consumer<MemoryView<State>, MemoryUpstream>;

pub(crate) fn feed() -> FeedId {
    FeedId::parse("accounts.v1").unwrap()
}

/// A CloudEvent as the feed API writes it, decoded.
pub(crate) fn event(position: u64, subject: &str, sequence: u64) -> IntegrationEvent {
    let json = format!(
        r#"{{"specversion":"1.0","id":"{}","source":"accounts","type":"accounts.deposited",
        "subject":"{subject}","time":"2026-11-27T18:00:00.000000Z","datacontenttype":"application/json",
        "data":{{"amount":{position}}},"sequence":{sequence},"position":{position},"feed":"accounts.v1"}}"#,
        uuid::Uuid::new_v4()
    );
    IntegrationEvent::from_cloud_event(json.as_bytes()).unwrap()
}

/// The view: per subject, the sequences applied, in order; the handler refuses any event that
/// is not the next (so a wrong order would fail the apply, not pass silently).
pub(crate) fn view() -> Arc<MemoryView<State>> {
    Arc::new(MemoryView::new(
        State::new(),
        |state: &mut State, e: &IntegrationEvent| {
            let applied = state.entry(e.subject.to_string()).or_default();
            let next = applied.len() as u64 + 1;
            if e.sequence.get() != next {
                return Err(format!(
                    "{} #{} applied where #{next} was due",
                    e.subject,
                    e.sequence.get()
                )
                .into());
            }
            applied.push(e.sequence.get());
            Ok(())
        },
    ))
}

/// A producer's feed: `subjects[i]` is the subject of the event at position `i + 1`.
pub(crate) fn produce(upstream: &MemoryUpstream, subjects: &[u8]) -> Vec<IntegrationEvent> {
    let mut sequences = BTreeMap::new();
    subjects
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let subject = format!("acc-{s}");
            let sequence = sequences.entry(subject.clone()).or_insert(0u64);
            *sequence += 1;
            let e = event(i as u64 + 1, &subject, *sequence);
            upstream.push(e.clone());
            e
        })
        .collect()
}

pub(crate) fn consumer(
    view: &Arc<MemoryView<State>>,
    upstream: &Arc<MemoryUpstream>,
) -> TestConsumer {
    Consumer::new(
        feed(),
        Arc::clone(view),
        Arc::clone(upstream),
        ConsumerOptions::default()
            .with_backoff(Duration::from_millis(1), Duration::from_millis(5))
            .with_page_events(7),
    )
}

fn expected(events: &[IntegrationEvent]) -> State {
    let mut state = State::new();
    for e in events {
        state
            .entry(e.subject.to_string())
            .or_default()
            .push(e.sequence.get());
    }
    state
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[tokio::test]
async fn next_events_apply_duplicates_skip_gaps_heal() {
    let upstream = Arc::new(MemoryUpstream::new());
    let events = produce(&upstream, &[1, 1, 1, 1, 1, 2]);
    let view = view();
    let consumer = consumer(&view, &upstream);
    assert_eq!(
        consumer.deliver(events[0].clone()).await.unwrap(),
        Delivery::Applied { healed: 0 }
    );
    assert_eq!(
        consumer.deliver(events[0].clone()).await.unwrap(),
        Delivery::Duplicate
    );
    // #2 and #3 lost: #4 heals them first.
    assert_eq!(
        consumer.deliver(events[3].clone()).await.unwrap(),
        Delivery::Applied { healed: 2 }
    );
    assert_eq!(
        consumer.deliver(events[2].clone()).await.unwrap(),
        Delivery::Duplicate
    );
    assert_eq!(
        view.cursor(&feed(), &Subject::new("acc-1").unwrap())
            .await
            .unwrap(),
        Sequence(4)
    );
    // acc-2 never seen, its only event delivered: applied.
    assert_eq!(
        consumer.deliver(events[5].clone()).await.unwrap(),
        Delivery::Applied { healed: 0 }
    );
    // acc-1's last event (#5) lost: only reconstitution finds it.
    let report = consumer.reconstitute().await.unwrap();
    assert_eq!((report.subjects, report.behind, report.applied), (2, 1, 1));
    assert_eq!(view.read(Clone::clone), expected(&events));
    let again = consumer.reconstitute().await.unwrap();
    assert_eq!((again.behind, again.applied), (0, 0));
}

#[tokio::test]
async fn an_event_of_another_feed_is_refused() {
    let upstream = Arc::new(MemoryUpstream::new());
    let view = view();
    let consumer = Consumer::new(
        FeedId::parse("accounts.v2").unwrap(),
        view.clone(),
        upstream,
        ConsumerOptions::default(),
    );
    let error = consumer.deliver(event(1, "acc-1", 1)).await.unwrap_err();
    assert!(matches!(error, ConsumeError::WrongFeed { .. }), "{error}");
    assert!(view.read(State::is_empty));
}

#[tokio::test]
async fn a_producer_that_is_down_is_waited_for_and_the_view_keeps_what_it_has() {
    let upstream = Arc::new(MemoryUpstream::new());
    let events = produce(&upstream, &[1, 1, 1]);
    let view = view();
    let consumer = consumer(&view, &upstream);
    consumer.deliver(events[0].clone()).await.unwrap();
    upstream.set_down(true);
    let calls = upstream.calls();
    let error = consumer.deliver(events[2].clone()).await.unwrap_err();
    assert!(
        matches!(error, ConsumeError::Upstream(UpstreamError::Unavailable(_))),
        "{error}"
    );
    assert_eq!(
        upstream.calls() - calls,
        u64::from(ConsumerOptions::default().heal_attempts),
        "bounded retries"
    );
    // The view still serves what it had; #3 was not applied over the gap.
    assert_eq!(view.read(Clone::clone), expected(&events[..1]));
    upstream.set_down(false);
    assert_eq!(
        consumer.deliver(events[2].clone()).await.unwrap(),
        Delivery::Applied { healed: 1 }
    );
    assert_eq!(view.read(Clone::clone), expected(&events));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bootstraps_of_a_subject_fetch_once() {
    let upstream = Arc::new(MemoryUpstream::new());
    let events = produce(&upstream, &[3; 5]);
    // Long enough that all eight callers arrive while the first one fetches, even on a busy
    // machine.
    upstream.set_delay(Duration::from_millis(250));
    let view = view();
    let consumer = Arc::new(consumer(&view, &upstream));
    let subject = Subject::new("acc-3").unwrap();
    let calls = upstream.calls();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let consumer = Arc::clone(&consumer);
            let subject = subject.clone();
            tokio::spawn(async move { consumer.ensure(&subject).await.unwrap() })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), Sequence(5));
    }
    // One bootstrap: one page of 5 (page size 7) and the empty page that ends it.
    assert_eq!(upstream.calls() - calls, 2);
    assert_eq!(view.read(Clone::clone), expected(&events));
}

/// Delivers `events` as a lossy link would — dropping those whose `drops` entry is below 3,
/// reordering by `swaps` — then reconstitutes; returns what the view must then hold: every
/// (subject, sequence) once, sorted.
pub(crate) async fn deliver_lossy_then_reconstitute<V: ViewStore>(
    view: Arc<V>,
    upstream: Arc<MemoryUpstream>,
    events: &[IntegrationEvent],
    drops: &[u8],
    swaps: &[(usize, usize)],
) -> Vec<(String, i64)> {
    let consumer = Consumer::new(
        feed(),
        view,
        upstream,
        ConsumerOptions::default().with_backoff(Duration::from_millis(1), Duration::from_millis(5)),
    );
    let mut schedule: Vec<_> = events
        .iter()
        .zip(drops)
        .filter(|(_, d)| **d >= 3)
        .map(|(e, _)| e.clone())
        .collect();
    if !schedule.is_empty() {
        for (a, b) in swaps {
            let (a, b) = (a % schedule.len(), b % schedule.len());
            schedule.swap(a, b);
        }
    }
    for e in schedule {
        consumer.deliver(e).await.unwrap();
    }
    consumer.reconstitute().await.unwrap();
    let mut expected: Vec<(String, i64)> = events
        .iter()
        .map(|e| (e.subject.to_string(), e.sequence.get() as i64))
        .collect();
    expected.sort();
    expected
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// G7 + G8: whatever the delivery schedule — events dropped (the last of some subjects
    /// among them), duplicated, reordered — the view after one reconstitution equals applying
    /// each subject's whole stream once, in order.
    #[test]
    fn any_delivery_schedule_converges_after_reconstitution(
        subjects in proptest::collection::vec(0u8..6, 1..120),
        fates in proptest::collection::vec((0u8..10, 0u8..10), 120),
        swaps in proptest::collection::vec((0usize..240, 0usize..240), 0..60),
    ) {
        runtime().block_on(async {
            let upstream = Arc::new(MemoryUpstream::new());
            let events = produce(&upstream, &subjects);
            let view = view();
            let consumer = consumer(&view, &upstream);
            // Each event: dropped (30 %), delivered once, or twice (20 %); then shuffled a bit.
            let mut schedule = Vec::new();
            for (event, (drop, dup)) in events.iter().zip(&fates) {
                if *drop < 3 {
                    continue;
                }
                schedule.push(event.clone());
                if *dup < 2 {
                    schedule.push(event.clone());
                }
            }
            if !schedule.is_empty() {
                for (a, b) in &swaps {
                    let (a, b) = (a % schedule.len(), b % schedule.len());
                    schedule.swap(a, b);
                }
            }
            for event in schedule {
                consumer.deliver(event).await.unwrap();
            }
            consumer.reconstitute().await.unwrap();
            prop_assert_eq!(view.read(Clone::clone), expected(&events));
            Ok(())
        })?;
    }
}

/// The HTTP feed transport over a producer that loses nothing but goes down for a while: every
/// event applied once, the feed position saved, a restarted follower re-reading nothing applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_the_feed_applies_everything_and_survives_a_producer_outage() {
    let upstream = Arc::new(MemoryUpstream::new());
    let first = produce(&upstream, &[1, 2, 1, 3, 2, 1]);
    let view = view();
    let consumer = Arc::new(consumer(&view, &upstream));
    let stop = Arc::new(tokio::sync::Notify::new());
    let follower = {
        let consumer = Arc::clone(&consumer);
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            consumer
                .follow_feed(Duration::from_millis(200), stop.notified())
                .await
        })
    };
    wait_until(|| view.read(Clone::clone) == expected(&first)).await;
    // The producer goes down; events keep coming once it is back.
    upstream.set_down(true);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut all = first.clone();
    let mut sequences: BTreeMap<String, u64> = BTreeMap::new();
    for e in &first {
        sequences.insert(e.subject.to_string(), e.sequence.get());
    }
    for (i, s) in [3u8, 3, 1, 2].iter().enumerate() {
        let subject = format!("acc-{s}");
        let sequence = sequences.entry(subject.clone()).or_insert(0);
        *sequence += 1;
        let e = event(first.len() as u64 + i as u64 + 1, &subject, *sequence);
        upstream.push(e.clone());
        all.push(e);
    }
    upstream.set_down(false);
    wait_until(|| view.read(Clone::clone) == expected(&all)).await;
    stop.notify_one();
    follower.await.unwrap().unwrap();
    assert_eq!(view.feed_position(&feed()).await.unwrap(), all.len() as u64);
    let stats = consumer.stats();
    assert_eq!(
        (stats.applied, stats.duplicates, stats.gaps),
        (all.len() as u64, 0, 0)
    );
}

async fn wait_until(done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Marks on any view store: unset is `None`, set/overwrite/clear work, bad keys and values are
/// refused and write nothing. Returns with the mark `walk/accounts.v1` set to `"acc-7"`, for the
/// caller to check it survives a reopen.
pub(crate) async fn marks_behave<V: ViewStore>(view: &V) {
    let key = "walk/accounts.v1";
    assert_eq!(view.mark(key).await.unwrap(), None);
    view.set_mark(key, Some("acc-1")).await.unwrap();
    view.set_mark(key, Some("acc-7")).await.unwrap();
    view.set_mark("active/statements", Some("accounts.v2"))
        .await
        .unwrap();
    view.set_mark("active/statements", None).await.unwrap();
    view.set_mark("active/statements", None).await.unwrap();
    assert_eq!(view.mark("active/statements").await.unwrap(), None);
    let too_long_key = "k".repeat(headwater_consume::MARK_KEY_BYTES_MAX + 1);
    let too_long_value = "v".repeat(headwater_consume::MARK_VALUE_BYTES_MAX + 1);
    for (bad_key, value) in [
        ("", Some("x")),
        (too_long_key.as_str(), Some("x")),
        ("a\nb", Some("x")),
        (key, Some(too_long_value.as_str())),
        (key, Some("nul\0byte")),
        (key, None::<&str>),
    ] {
        if bad_key == key && value.is_none() {
            continue;
        }
        let error = view.set_mark(bad_key, value).await.unwrap_err();
        assert!(matches!(error, ViewError::Invalid(_)), "{error}");
    }
    assert!(matches!(view.mark("").await, Err(ViewError::Invalid(_))));
    assert_eq!(view.mark(key).await.unwrap().as_deref(), Some("acc-7"));
    // The longest value is kept whole.
    let longest = "v".repeat(headwater_consume::MARK_VALUE_BYTES_MAX);
    view.set_mark("big", Some(&longest)).await.unwrap();
    assert_eq!(view.mark("big").await.unwrap(), Some(longest));
}

#[tokio::test]
async fn marks_on_the_memory_view() {
    marks_behave(&*view()).await;
}

/// `apply_many` on a view store that applies a batch in one transaction: the answers come in the
/// caller's order, leading duplicates are counted, and when the handler refuses one subject's
/// event nothing of the batch is written (no cursor moves). `failing` makes an event the
/// store's handler refuses. Leaves acc-1 at 2, acc-2 at 1, acc-3 at 1 (3 + 1 rows).
pub(crate) async fn apply_many_is_one_transaction<V: ViewStore>(
    view: &V,
    failing: fn(&str, u64) -> IntegrationEvent,
) {
    let s = |name: &str| Subject::new(name).unwrap();
    let applied = view
        .apply_many(
            &feed(),
            &[
                (s("acc-2"), vec![event(2, "acc-2", 1)]),
                (s("acc-1"), vec![event(1, "acc-1", 1), event(3, "acc-1", 2)]),
            ],
        )
        .await
        .unwrap();
    let got: Vec<_> = applied.iter().map(|a| (a.cursor, a.applied)).collect();
    assert_eq!(got, vec![(Sequence(1), 1), (Sequence(2), 2)]);
    // acc-3 fine, acc-1's next refused by the handler: nothing of the batch is written.
    let error = view
        .apply_many(
            &feed(),
            &[
                (s("acc-3"), vec![event(4, "acc-3", 1)]),
                (s("acc-1"), vec![event(3, "acc-1", 2), failing("acc-1", 3)]),
            ],
        )
        .await
        .unwrap_err();
    assert!(matches!(error, ViewError::Handler { .. }), "{error}");
    assert_eq!(
        view.cursor(&feed(), &s("acc-3")).await.unwrap(),
        Sequence(0)
    );
    assert_eq!(
        view.cursor(&feed(), &s("acc-1")).await.unwrap(),
        Sequence(2)
    );
    // Not contiguous: refused, nothing written either.
    let error = view
        .apply_many(
            &feed(),
            &[
                (s("acc-3"), vec![event(4, "acc-3", 1)]),
                (s("acc-2"), vec![event(5, "acc-2", 3)]),
            ],
        )
        .await
        .unwrap_err();
    assert!(matches!(error, ViewError::NotContiguous { .. }), "{error}");
    assert_eq!(
        view.cursor(&feed(), &s("acc-3")).await.unwrap(),
        Sequence(0)
    );
    // A batch of duplicates and one new event.
    let applied = view
        .apply_many(
            &feed(),
            &[
                (s("acc-1"), vec![event(3, "acc-1", 2)]),
                (s("acc-3"), vec![event(4, "acc-3", 1)]),
            ],
        )
        .await
        .unwrap();
    let got: Vec<_> = applied
        .iter()
        .map(|a| (a.cursor, a.applied, a.duplicates))
        .collect();
    assert_eq!(got, vec![(Sequence(2), 0, 1), (Sequence(1), 1, 0)]);
}

/// An upstream whose feed answers scripted pages (then nothing); subjects from a memory producer.
struct ScriptedFeed {
    producer: Arc<MemoryUpstream>,
    pages: std::sync::Mutex<Vec<Vec<IntegrationEvent>>>,
}

#[async_trait::async_trait]
impl headwater_consume::Upstream for ScriptedFeed {
    async fn read_subject(
        &self,
        feed: &FeedId,
        subject: &Subject,
        after: Sequence,
        limit: u64,
    ) -> Result<Vec<IntegrationEvent>, UpstreamError> {
        self.producer
            .read_subject(feed, subject, after, limit)
            .await
    }

    async fn subjects(
        &self,
        feed: &FeedId,
        after: Option<&Subject>,
        limit: u64,
    ) -> Result<Vec<headwater_consume::SubjectHead>, UpstreamError> {
        self.producer.subjects(feed, after, limit).await
    }

    async fn read_feed(
        &self,
        _: &FeedId,
        _: u64,
        _: u64,
        wait: Duration,
    ) -> Result<Vec<IntegrationEvent>, UpstreamError> {
        let page = self.pages.lock().unwrap().pop();
        if page.is_none() {
            tokio::time::sleep(wait).await;
        }
        Ok(page.unwrap_or_default())
    }
}

/// The page path of `follow_feed` (what continues its subject in one `apply_many`, the rest one by
/// one) applies a mixed page exactly once, in order. That the page is one commit is checked by the
/// stores' `apply_many_is_one_transaction_*` tests and seen in the bench's commits per event.
#[tokio::test]
async fn a_feed_page_of_continuing_runs_gaps_and_duplicates_is_applied_once_in_order() {
    // The page holds runs that continue (acc-1 from #2, acc-2), a gap (acc-3 from #2, its #1
    // lost on the way) and duplicates (acc-1 #1, which the consumer has, and acc-2 #2 twice).
    let producer = Arc::new(MemoryUpstream::new());
    let events = produce(&producer, &[1, 2, 1, 3, 3, 2, 1]);
    let mut page: Vec<_> = events.iter().filter(|e| e.position != 4).cloned().collect();
    page.push(events[5].clone());
    let upstream = Arc::new(ScriptedFeed {
        producer: Arc::clone(&producer),
        pages: std::sync::Mutex::new(vec![page]),
    });
    let view = view();
    let consumer = Consumer::new(
        feed(),
        Arc::clone(&view),
        upstream,
        ConsumerOptions::default().with_backoff(Duration::from_millis(1), Duration::from_millis(5)),
    );
    consumer.deliver(events[0].clone()).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let following = consumer.follow_feed(Duration::from_millis(10), async {
        let _ = stopped.await;
    });
    let checker = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while view.read(|s| s.values().map(Vec::len).sum::<usize>()) < events.len() {
            assert!(tokio::time::Instant::now() < deadline, "not all applied");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = stop.send(());
    };
    let (followed, ()) = tokio::join!(following, checker);
    followed.unwrap();
    assert_eq!(view.read(Clone::clone), expected(&events));
    let stats = consumer.stats();
    assert_eq!((stats.applied, stats.gaps, stats.healed), (7, 1, 1));
    assert_eq!(stats.duplicates, 2, "acc-1 #1 and acc-2 #2 delivered twice");
}
