//! Dead letters: kept by every view store (idempotent per subject and sequence, bounded, listed,
//! resolved, discarded, durable), and the consumer's rules — a refused subject is parked with
//! its reason while the others go on (HTTP feed, walks, `ensure`), and a later success of that
//! subject resolves its letters.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use headwater_consume::{
    DEAD_LETTER_BODY_BYTES_MAX, DEAD_LETTER_REASON_BYTES_MAX, DEAD_LETTERS_MAX, DeadLetterKind,
    Handled, NewDeadLetter, ViewStore,
};
use headwater_core::{FeedId, Sequence, Subject};

use crate::broker_kit::{Refused, consumer, expected, produce, round_robin, view, wait_until};

fn feed() -> FeedId {
    FeedId::parse("accounts.v1").unwrap()
}

fn subject(s: &str) -> Subject {
    Subject::new(s).unwrap()
}

/// Dead letters on any view store. Returns with one letter left (`acc-2` #4, kind `view`), for
/// the caller to check it survives a reopen.
pub(crate) async fn dead_letters_behave<V: ViewStore>(view: &V) {
    let feed = feed();
    let other = FeedId::parse("accounts.v2").unwrap();
    assert!(view.dead_letters(&feed, 0, 10).await.unwrap().is_empty());
    let garbage = NewDeadLetter::new(
        feed.clone(),
        DeadLetterKind::Undecodable,
        "not an integration event",
        "rabbitmq",
        1_000,
    )
    .with_body(b"\xff\x00garbage");
    let first = view.record_dead_letter(&garbage).await.unwrap();
    let refused = NewDeadLetter::new(
        feed.clone(),
        DeadLetterKind::Handler,
        "the handler refuses",
        "nats",
        2_000,
    )
    .at(subject("acc-1"), Sequence(3));
    let second = view.record_dead_letter(&refused).await.unwrap();
    assert!(second > first);
    // The same subject and sequence again: the letter is updated, not added.
    let mut again = refused.clone();
    again.reason = "refused again".into();
    again.at_ms = 3_000;
    assert_eq!(view.record_dead_letter(&again).await.unwrap(), second);
    // Undecodable ones are never merged.
    let third = view.record_dead_letter(&garbage).await.unwrap();
    assert!(third > second);
    let parked = NewDeadLetter::new(
        feed.clone(),
        DeadLetterKind::Parked,
        "behind #3",
        "http",
        4_000,
    )
    .at(subject("acc-1"), Sequence(5));
    let fourth = view.record_dead_letter(&parked).await.unwrap();
    let kept = NewDeadLetter::new(
        feed.clone(),
        DeadLetterKind::View,
        "not contiguous",
        "walk",
        5,
    )
    .at(subject("acc-2"), Sequence(4));
    let fifth = view.record_dead_letter(&kept).await.unwrap();
    // Another feed's letters are its own.
    view.record_dead_letter(
        &NewDeadLetter::new(other.clone(), DeadLetterKind::Handler, "x", "nats", 1)
            .at(subject("acc-1"), Sequence(3)),
    )
    .await
    .unwrap();

    let letters = view.dead_letters(&feed, 0, 100).await.unwrap();
    let ids: Vec<u64> = letters.iter().map(|l| l.id).collect();
    assert_eq!(ids, [first, second, third, fourth, fifth]);
    assert_eq!(letters[0].kind, DeadLetterKind::Undecodable);
    assert_eq!(letters[0].body.as_deref(), Some(&b"\xff\x00garbage"[..]));
    assert_eq!(letters[0].subject, None);
    assert_eq!(letters[0].transport, "rabbitmq");
    let merged = &letters[1];
    assert_eq!(merged.kind, DeadLetterKind::Handler);
    assert_eq!(merged.reason, "refused again");
    assert_eq!(
        (merged.first_at_ms, merged.last_at_ms, merged.count),
        (2_000, 3_000, 2)
    );
    assert_eq!(merged.subject, Some(subject("acc-1")));
    assert_eq!(merged.sequence, Some(Sequence(3)));
    // Paging.
    let page = view.dead_letters(&feed, second, 2).await.unwrap();
    assert_eq!(
        page.iter().map(|l| l.id).collect::<Vec<_>>(),
        [third, fourth]
    );

    // Resolving acc-1 through #4 removes #3, not #5; through #5 the rest.
    assert_eq!(
        view.resolve_dead_letters(&feed, &subject("acc-1"), Sequence(4))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        view.resolve_dead_letters(&feed, &subject("acc-1"), Sequence(5))
            .await
            .unwrap(),
        1
    );
    assert!(view.discard_dead_letter(&feed, first).await.unwrap());
    assert!(!view.discard_dead_letter(&feed, first).await.unwrap());
    assert!(!view.discard_dead_letter(&other, third).await.unwrap());
    assert!(view.discard_dead_letter(&feed, third).await.unwrap());
    let left = view.dead_letters(&feed, 0, 100).await.unwrap();
    assert_eq!(left.iter().map(|l| l.id).collect::<Vec<_>>(), [fifth]);
    assert_eq!(view.dead_letters(&other, 0, 100).await.unwrap().len(), 1);
}

/// A feed keeps at most `DEAD_LETTERS_MAX` letters: the oldest go. `fill` records
/// `DEAD_LETTERS_MAX` letters of the feed `bounded.v1` (kind undecodable) the quickest way.
async fn dead_letters_are_bounded<V: ViewStore>(view: &V) {
    let feed = FeedId::parse("bounded.v1").unwrap();
    let ids = all_ids(view, &feed).await;
    assert_eq!(ids.len() as u64, DEAD_LETTERS_MAX, "filled");
    let letter = NewDeadLetter::new(feed.clone(), DeadLetterKind::Undecodable, "x", "nats", 1);
    for _ in 0..3 {
        view.record_dead_letter(&letter).await.unwrap();
    }
    let after = all_ids(view, &feed).await;
    assert_eq!(after.len() as u64, DEAD_LETTERS_MAX);
    assert_eq!(after[0], ids[3], "the three oldest went");
}

async fn all_ids<V: ViewStore>(view: &V, feed: &FeedId) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut after = 0;
    loop {
        let page = view.dead_letters(feed, after, 1_000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.id;
        ids.extend(page.iter().map(|l| l.id));
    }
    ids
}

#[tokio::test]
async fn dead_letters_in_memory() {
    let view = view(&Refused::default());
    dead_letters_behave(&view).await;
    let feed = FeedId::parse("bounded.v1").unwrap();
    let letter = NewDeadLetter::new(feed, DeadLetterKind::Undecodable, "x", "nats", 1);
    for _ in 0..DEAD_LETTERS_MAX {
        view.record_dead_letter(&letter).await.unwrap();
    }
    dead_letters_are_bounded(&view).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_durable_in_the_embedded_view() {
    let dir = tempfile::tempdir().unwrap();
    dead_letters_behave(&crate::embedded::open(dir.path())).await;
    let view = crate::embedded::open(dir.path());
    let left = view.dead_letters(&feed(), 0, 10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].kind, DeadLetterKind::View);
    assert_eq!(left[0].subject, Some(subject("acc-2")));
    // Filled in one transaction (one apiece would take seconds of fsyncs).
    view.read(|c| {
        c.execute_batch("BEGIN")?;
        for _ in 0..DEAD_LETTERS_MAX {
            c.execute(
                "INSERT INTO headwater_dead_letters (feed, kind, reason, transport, first_at_ms,
                     last_at_ms, count) VALUES ('bounded.v1', 'undecodable', 'x', 'nats', 1, 1, 1)",
                [],
            )?;
        }
        c.execute_batch("COMMIT")
    })
    .await
    .unwrap();
    dead_letters_are_bounded(&view).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_durable_in_the_postgres_view() {
    let schema = crate::postgres::Schema::new();
    dead_letters_behave(&schema.open().await).await;
    let view = schema.open().await;
    let left = view.dead_letters(&feed(), 0, 10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].kind, DeadLetterKind::View);
    assert_eq!(left[0].sequence, Some(Sequence(4)));
}

#[tokio::test]
async fn a_letter_keeps_the_start_of_a_long_body_and_reason() {
    let produced = produce(&feed(), &round_robin(1, 1));
    let view = Arc::new(view(&Refused::default()));
    let consumer = consumer(&produced, &view);
    let body = "é".repeat(DEAD_LETTER_BODY_BYTES_MAX);
    let handled = consumer.handle(body.as_bytes(), "nats").await.unwrap();
    assert!(
        matches!(
            handled,
            Handled::DeadLettered {
                kind: DeadLetterKind::Undecodable,
                ..
            }
        ),
        "{handled:?}"
    );
    let letter = &consumer.dead_letters(0, 10).await.unwrap()[0];
    assert_eq!(
        letter.body.as_deref(),
        Some(&body.as_bytes()[..DEAD_LETTER_BODY_BYTES_MAX])
    );
    let long = NewDeadLetter::new(feed(), DeadLetterKind::Handler, &"ü".repeat(1_000), "x", 0);
    assert!(long.reason.len() <= DEAD_LETTER_REASON_BYTES_MAX);
    assert!(long.reason.len() > DEAD_LETTER_REASON_BYTES_MAX - 2);
    assert_eq!(consumer.dead_letter_status().undecodable, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_feed_parks_a_refused_subject_and_goes_on() {
    let produced = produce(&feed(), &round_robin(12, 3));
    let refused: Refused = Arc::new(Mutex::new(BTreeSet::from(["acc-1".to_owned()])));
    let view = Arc::new(view(&refused));
    let consumer = consumer(&produced, &view);
    let others: Vec<_> = produced
        .events
        .iter()
        .filter(|e| e.subject.as_str() != "acc-1")
        .cloned()
        .collect();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let follow = consumer.follow_feed(Duration::from_millis(50), async {
        let _ = stop_rx.await;
    });
    let wait = async {
        wait_until(
            "the other subjects applied",
            Duration::from_secs(10),
            || view.read(Clone::clone) == expected(&others),
        )
        .await;
        // And the whole feed read: the position saved past acc-1's last event.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while view.feed_position(&feed()).await.unwrap() < 12 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the feed was not read to its end"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop_tx.send(()).unwrap();
    };
    let (followed, ()) = tokio::join!(follow, wait);
    followed.unwrap();
    let letters = consumer.dead_letters(0, 100).await.unwrap();
    let summary: Vec<(DeadLetterKind, u64, &str)> = letters
        .iter()
        .map(|l| (l.kind, l.sequence.unwrap().get(), l.transport.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (DeadLetterKind::Handler, 1, "http"),
            (DeadLetterKind::Parked, 2, "http"),
            (DeadLetterKind::Parked, 3, "http"),
            (DeadLetterKind::Parked, 4, "http"),
        ]
    );
    assert!(letters[1].reason.contains("the handler refuses acc-1"));
    assert_eq!(consumer.dead_letter_status().parked_subjects, 1);
    // The handler fixed, a bootstrap of the subject catches it up and resolves its letters.
    refused.lock().unwrap().clear();
    assert_eq!(
        consumer.ensure(&subject("acc-1")).await.unwrap(),
        Sequence(4)
    );
    assert!(consumer.dead_letters(0, 100).await.unwrap().is_empty());
    assert_eq!(consumer.dead_letter_status().parked_subjects, 0);
    assert_eq!(view.read(Clone::clone), expected(&produced.events));
}

#[tokio::test]
async fn walks_and_bootstraps_park_a_refused_subject() {
    let produced = produce(&feed(), &round_robin(9, 3));
    let refused: Refused = Arc::new(Mutex::new(BTreeSet::from(["acc-2".to_owned()])));
    let view = Arc::new(view(&refused));
    let consumer = consumer(&produced, &view);
    // The walk goes past acc-2 (and says so), catching the others up.
    let error = consumer.reconstitute().await.unwrap_err();
    assert!(
        error.to_string().contains("the handler refuses acc-2"),
        "{error}"
    );
    let others: Vec<_> = produced
        .events
        .iter()
        .filter(|e| e.subject.as_str() != "acc-2")
        .cloned()
        .collect();
    assert_eq!(view.read(Clone::clone), expected(&others));
    let letters = consumer.dead_letters(0, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(
        (
            letters[0].kind,
            letters[0].sequence,
            letters[0].transport.as_str()
        ),
        (DeadLetterKind::Handler, Some(Sequence(1)), "walk")
    );
    // Another walk and a bootstrap fail the same way: the same letter, counted.
    assert!(consumer.reconstitute().await.is_err());
    assert!(consumer.ensure(&subject("acc-2")).await.is_err());
    let letters = consumer.dead_letters(0, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(
        (letters[0].count, letters[0].transport.as_str()),
        (3, "ensure")
    );
    // A delivery of the parked subject is tried once and parked too.
    let body = &produced.bodies[8];
    let handled = consumer.handle(body, "nats").await.unwrap();
    assert!(
        matches!(
            handled,
            Handled::DeadLettered {
                kind: DeadLetterKind::Parked,
                ..
            }
        ),
        "{handled:?}"
    );
    // Fixed: the next walk resolves everything.
    refused.lock().unwrap().clear();
    let walk = consumer.reconstitute().await.unwrap();
    assert_eq!((walk.behind, walk.applied, walk.failed), (1, 3, 0));
    assert!(consumer.dead_letters(0, 10).await.unwrap().is_empty());
    assert_eq!(view.read(Clone::clone), expected(&produced.events));
    let status = consumer.dead_letter_status();
    assert_eq!(
        (status.parked_subjects, status.recorded, status.resolved),
        (0, 4, 2)
    );
}
