//! A property test of any feed store against a trivial model: random schedules of registrations,
//! status changes, commits (valid, stale, invalid), publishers' advances (valid, stale, invalid),
//! reads of every kind and reopens; after each step the backend must answer exactly as the model
//! says.

use std::collections::BTreeMap;

use headwater_core::{EventId, FeedId, FeedPosition, FeedStatus, Position, Sequence, Subject};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::feed::{FeedHarness, SOURCE_POSITIONS_MAX, feed_id, projected, subject};
use crate::feed::{FeedError, FeedStore, ProjectorBatch};

const FEEDS: [&str; 3] = ["accounts.v1", "accounts.v2", "ledger.v1"];
const SUBJECTS: [&str; 6] = ["a", "A", "a-b", "a.b", "Z~", "B"];
const PUBLISHERS: [&str; 2] = ["rabbitmq", "nats"];

/// One step of a random schedule.
#[derive(Clone, Debug)]
enum Op {
    Register {
        feed: u8,
    },
    SetStatus {
        feed: u8,
        status: u8,
    },
    /// Commit events of these (subject, source offset) from the cursor (or a stale one) to
    /// `advance` positions further. Offsets outside `1..=advance` or out of order make the batch
    /// invalid.
    Commit {
        feed: u8,
        stale: bool,
        advance: u8,
        events: Vec<(u8, u8)>,
        sorted: bool,
    },
    ReadFeed {
        feed: u8,
        after: u8,
        limit: u8,
    },
    Subjects {
        feed: u8,
        after: Option<u8>,
        limit: u8,
    },
    ReadSubject {
        feed: u8,
        subject: u8,
        after: u8,
        limit: u8,
    },
    /// Advance a publisher's cursor from where it is (or a stale position) by `advance`
    /// positions (or back by one), maybe past the head.
    AdvancePublisher {
        feed: u8,
        publisher: u8,
        stale: bool,
        back: bool,
        advance: u8,
    },
    /// Drop every handle and open the store again.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let feed = || 0u8..FEEDS.len() as u8;
    let subject = || 0u8..5;
    prop_oneof![
        2 => feed().prop_map(|feed| Op::Register { feed }),
        1 => (feed(), 0u8..3).prop_map(|(feed, status)| Op::SetStatus { feed, status }),
        8 => (
            feed(),
            prop::bool::weighted(0.1),
            0u8..6,
            prop::collection::vec((subject(), 0u8..7), 0..6),
            prop::bool::weighted(0.9),
        )
            .prop_map(|(feed, stale, advance, events, sorted)| Op::Commit {
                feed,
                stale,
                advance,
                events,
                sorted,
            }),
        2 => (feed(), 0u8..30, 0u8..12).prop_map(|(feed, after, limit)| Op::ReadFeed { feed, after, limit }),
        2 => (feed(), prop::option::of(0u8..SUBJECTS.len() as u8), 0u8..5)
            .prop_map(|(feed, after, limit)| Op::Subjects { feed, after, limit }),
        2 => (feed(), subject(), 0u8..8, 0u8..6)
            .prop_map(|(feed, subject, after, limit)| Op::ReadSubject { feed, subject, after, limit }),
        3 => (
            feed(),
            0u8..PUBLISHERS.len() as u8,
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.05),
            0u8..5,
        )
            .prop_map(|(feed, publisher, stale, back, advance)| Op::AdvancePublisher {
                feed,
                publisher,
                stale,
                back,
                advance,
            }),
        1 => Just(Op::Reopen),
    ]
}

/// The trivial model of one feed: its events as (subject, id), nothing else.
#[derive(Debug)]
struct ModelFeed {
    status: FeedStatus,
    live: bool,
    cursor: u64,
    events: Vec<(Subject, EventId)>,
    /// Each publisher's cursor, once it has one.
    publishers: BTreeMap<&'static str, u64>,
}

impl ModelFeed {
    /// (position, sequence, id) of every event of `subject`, in order.
    fn subject(&self, subject: &Subject) -> Vec<(u64, u64, EventId)> {
        let mut sequence = 0;
        let mut out = Vec::new();
        for (i, (s, id)) in self.events.iter().enumerate() {
            if s == subject {
                sequence += 1;
                out.push((i as u64 + 1, sequence, *id));
            }
        }
        out
    }

    /// Every subject with its head, in byte order.
    fn heads(&self) -> BTreeMap<Subject, u64> {
        let mut heads = BTreeMap::new();
        for (s, _) in &self.events {
            *heads.entry(s.clone()).or_default() += 1;
        }
        heads
    }
}

/// What an operation gave, in a comparable form.
#[derive(Debug, PartialEq, Eq)]
enum Answer<T> {
    Ok(T),
    Invalid,
    Unknown,
    CursorMoved {
        expected: Position,
        actual: Position,
    },
    PublisherMoved {
        expected: FeedPosition,
        actual: FeedPosition,
    },
}

fn answer<T>(result: Result<T, FeedError>) -> Result<Answer<T>, TestCaseError> {
    match result {
        Ok(value) => Ok(Answer::Ok(value)),
        Err(FeedError::Invalid(_)) => Ok(Answer::Invalid),
        Err(FeedError::UnknownFeed(_)) => Ok(Answer::Unknown),
        Err(FeedError::CursorMoved {
            expected, actual, ..
        }) => Ok(Answer::CursorMoved { expected, actual }),
        Err(FeedError::PublisherMoved {
            expected, actual, ..
        }) => Ok(Answer::PublisherMoved { expected, actual }),
        Err(other) => Err(TestCaseError::fail(format!("the store failed: {other}"))),
    }
}

fn status(n: u8) -> FeedStatus {
    match n {
        0 => FeedStatus::Backfilling,
        1 => FeedStatus::Live,
        _ => FeedStatus::Retired,
    }
}

async fn run_schedule<H: FeedHarness>(harness: &H, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut store = harness.open().await;
    let mut model: BTreeMap<FeedId, ModelFeed> = BTreeMap::new();
    let feeds: Vec<FeedId> = FEEDS.iter().map(|f| feed_id(f)).collect();
    let subjects: Vec<Subject> = SUBJECTS.iter().map(|s| subject(s)).collect();
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Register { feed } => {
                let feed = &feeds[usize::from(*feed)];
                let entry = model.entry(feed.clone()).or_insert(ModelFeed {
                    status: FeedStatus::Backfilling,
                    live: false,
                    cursor: 0,
                    events: Vec::new(),
                    publishers: BTreeMap::new(),
                });
                let state = store
                    .register(feed)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(state.status, entry.status, "step {}: {:?}", step, op);
                prop_assert_eq!(state.cursor, Position(entry.cursor));
                prop_assert_eq!(state.head, FeedPosition(entry.events.len() as u64));
            }
            Op::SetStatus { feed, status: s } => {
                let feed = &feeds[usize::from(*feed)];
                let got = answer(store.set_status(feed, status(*s)).await)?;
                let want = match model.get_mut(feed) {
                    None => Answer::Unknown,
                    Some(entry) => {
                        entry.status = status(*s);
                        entry.live |= entry.status == FeedStatus::Live;
                        Answer::Ok((entry.status, entry.live))
                    }
                };
                let got = match got {
                    Answer::Ok(state) => Answer::Ok((state.status, state.live_at.is_some())),
                    Answer::Invalid => Answer::Invalid,
                    Answer::Unknown => Answer::Unknown,
                    Answer::CursorMoved { expected, actual } => {
                        Answer::CursorMoved { expected, actual }
                    }
                    Answer::PublisherMoved { .. } => {
                        return Err(TestCaseError::fail("a feed write said PublisherMoved"));
                    }
                };
                prop_assert_eq!(got, want, "step {}: {:?}", step, op);
            }
            Op::Commit {
                feed,
                stale,
                advance,
                events,
                sorted,
            } => {
                let feed = &feeds[usize::from(*feed)];
                let cursor = model.get(feed).map_or(0, |f| f.cursor);
                let from = match (*stale, cursor) {
                    (false, c) => c,
                    (true, 0) => 1,
                    (true, c) => c - 1,
                };
                let to = from + u64::from(*advance);
                prop_assert!(to <= SOURCE_POSITIONS_MAX);
                let mut offsets: Vec<(u8, u8)> = events.clone();
                if *sorted {
                    offsets.sort_by_key(|(_, offset)| *offset);
                }
                let batch = ProjectorBatch {
                    from: Position(from),
                    to: Position(to),
                    events: offsets
                        .iter()
                        .map(|(s, offset)| {
                            projected(SUBJECTS[usize::from(*s)], from + u64::from(*offset))
                        })
                        .collect(),
                };
                let valid = offsets.iter().all(|(_, o)| *o >= 1 && o <= advance)
                    && offsets.windows(2).all(|w| w[0].1 <= w[1].1);
                let want = if !valid {
                    Answer::Invalid
                } else {
                    match model.get_mut(feed) {
                        None => Answer::Unknown,
                        Some(entry) if entry.cursor != from => Answer::CursorMoved {
                            expected: Position(from),
                            actual: Position(entry.cursor),
                        },
                        Some(entry) => {
                            entry.cursor = to;
                            entry
                                .events
                                .extend(batch.events.iter().map(|e| (e.subject.clone(), e.id)));
                            Answer::Ok((FeedPosition(entry.events.len() as u64), Position(to)))
                        }
                    }
                };
                let got = match answer(store.commit(feed, batch).await)? {
                    Answer::Ok(commit) => Answer::Ok((commit.head, commit.cursor)),
                    Answer::Invalid => Answer::Invalid,
                    Answer::Unknown => Answer::Unknown,
                    Answer::CursorMoved { expected, actual } => {
                        Answer::CursorMoved { expected, actual }
                    }
                    Answer::PublisherMoved { .. } => {
                        return Err(TestCaseError::fail("a feed write said PublisherMoved"));
                    }
                };
                prop_assert_eq!(got, want, "step {}: {:?}", step, op);
            }
            Op::ReadFeed { feed, after, limit } => {
                let feed = &feeds[usize::from(*feed)];
                let got = answer(
                    store
                        .read_feed(feed, FeedPosition(u64::from(*after)), u64::from(*limit))
                        .await,
                )?;
                let got = match got {
                    Answer::Ok(page) => Answer::Ok(
                        page.into_iter()
                            .map(|e| (e.position.get(), e.subject, e.sequence.get(), e.id))
                            .collect::<Vec<_>>(),
                    ),
                    Answer::Invalid => Answer::Invalid,
                    Answer::Unknown => Answer::Unknown,
                    Answer::CursorMoved { .. } | Answer::PublisherMoved { .. } => {
                        return Err(TestCaseError::fail("a read said it moved"));
                    }
                };
                let want = match model.get(feed) {
                    _ if *limit == 0 => Answer::Invalid,
                    None => Answer::Unknown,
                    Some(entry) => {
                        let mut sequences: BTreeMap<&Subject, u64> = BTreeMap::new();
                        let all: Vec<_> = entry
                            .events
                            .iter()
                            .enumerate()
                            .map(|(i, (s, id))| {
                                let sequence = sequences.entry(s).or_default();
                                *sequence += 1;
                                (i as u64 + 1, s.clone(), *sequence, *id)
                            })
                            .collect();
                        Answer::Ok(
                            all.into_iter()
                                .skip(usize::from(*after))
                                .take(usize::from(*limit))
                                .collect(),
                        )
                    }
                };
                prop_assert_eq!(got, want, "step {}: {:?}", step, op);
            }
            Op::Subjects { feed, after, limit } => {
                let feed = &feeds[usize::from(*feed)];
                let after = after.map(|a| subjects[usize::from(a)].clone());
                let got = match answer(
                    store
                        .subjects(feed, after.as_ref(), u64::from(*limit))
                        .await,
                )? {
                    Answer::Ok(page) => Answer::Ok(
                        page.into_iter()
                            .map(|h| (h.subject, h.sequence.get()))
                            .collect::<Vec<_>>(),
                    ),
                    Answer::Invalid => Answer::Invalid,
                    Answer::Unknown => Answer::Unknown,
                    Answer::CursorMoved { .. } | Answer::PublisherMoved { .. } => {
                        return Err(TestCaseError::fail("a read said it moved"));
                    }
                };
                let want = match model.get(feed) {
                    _ if *limit == 0 => Answer::Invalid,
                    None => Answer::Unknown,
                    Some(entry) => Answer::Ok(
                        entry
                            .heads()
                            .into_iter()
                            .filter(|(s, _)| {
                                after
                                    .as_ref()
                                    .is_none_or(|a| s.as_str().as_bytes() > a.as_str().as_bytes())
                            })
                            .take(usize::from(*limit))
                            .collect(),
                    ),
                };
                prop_assert_eq!(got, want, "step {}: {:?}", step, op);
            }
            Op::ReadSubject {
                feed,
                subject,
                after,
                limit,
            } => {
                let feed = &feeds[usize::from(*feed)];
                let subject = &subjects[usize::from(*subject)];
                let got = match answer(
                    store
                        .read_subject(
                            feed,
                            subject,
                            Sequence(u64::from(*after)),
                            u64::from(*limit),
                        )
                        .await,
                )? {
                    Answer::Ok(page) => Answer::Ok(
                        page.into_iter()
                            .map(|e| (e.position.get(), e.sequence.get(), e.id))
                            .collect::<Vec<_>>(),
                    ),
                    Answer::Invalid => Answer::Invalid,
                    Answer::Unknown => Answer::Unknown,
                    Answer::CursorMoved { .. } | Answer::PublisherMoved { .. } => {
                        return Err(TestCaseError::fail("a read said it moved"));
                    }
                };
                let want = match model.get(feed) {
                    _ if *limit == 0 => Answer::Invalid,
                    None => Answer::Unknown,
                    Some(entry) => Answer::Ok(
                        entry
                            .subject(subject)
                            .into_iter()
                            .skip(usize::from(*after))
                            .take(usize::from(*limit))
                            .collect(),
                    ),
                };
                prop_assert_eq!(got, want, "step {}: {:?}", step, op);
            }
            Op::AdvancePublisher {
                feed,
                publisher,
                stale,
                back,
                advance,
            } => {
                let feed = &feeds[usize::from(*feed)];
                let publisher = PUBLISHERS[usize::from(*publisher)];
                let cursor = model
                    .get(feed)
                    .and_then(|f| f.publishers.get(publisher).copied())
                    .unwrap_or(0);
                let from = if *stale { cursor + 1 } else { cursor };
                let to = if *back {
                    from.saturating_sub(1)
                } else {
                    from + u64::from(*advance)
                };
                let want = match model.get_mut(feed) {
                    None => Answer::Unknown,
                    Some(entry) if to < from || to > entry.events.len() as u64 => Answer::Invalid,
                    Some(_) if cursor != from => Answer::PublisherMoved {
                        expected: FeedPosition(from),
                        actual: FeedPosition(cursor),
                    },
                    Some(entry) => {
                        entry.publishers.insert(publisher, to);
                        Answer::Ok((publisher.to_owned(), FeedPosition(to)))
                    }
                };
                let got = match answer(
                    store
                        .advance_publisher(feed, publisher, FeedPosition(from), FeedPosition(to))
                        .await,
                )? {
                    Answer::Ok(cursor) => Answer::Ok((cursor.publisher, cursor.position)),
                    Answer::Invalid => Answer::Invalid,
                    Answer::Unknown => Answer::Unknown,
                    Answer::PublisherMoved { expected, actual } => {
                        Answer::PublisherMoved { expected, actual }
                    }
                    Answer::CursorMoved { .. } => {
                        return Err(TestCaseError::fail("an advance said CursorMoved"));
                    }
                };
                prop_assert_eq!(got, want, "step {}: {:?}", step, op);
            }
            Op::Reopen => {
                drop(store);
                store = harness.open().await;
            }
        }
        let states = store
            .feeds()
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let got: Vec<_> = states
            .into_iter()
            .map(|s| (s.feed, s.status, s.live_at.is_some(), s.head, s.cursor))
            .collect();
        let want: Vec<_> = model
            .iter()
            .map(|(feed, m)| {
                (
                    feed.clone(),
                    m.status,
                    m.live,
                    FeedPosition(m.events.len() as u64),
                    Position(m.cursor),
                )
            })
            .collect();
        prop_assert_eq!(got, want, "step {}: the feeds after {:?}", step, op);
        for (feed, m) in &model {
            let got: Vec<(String, FeedPosition)> = store
                .publishers(feed)
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?
                .into_iter()
                .map(|p| (p.publisher, p.position))
                .collect();
            let want: Vec<(String, FeedPosition)> = m
                .publishers
                .iter()
                .map(|(p, c)| ((*p).to_owned(), FeedPosition(*c)))
                .collect();
            prop_assert_eq!(
                got,
                want,
                "step {}: {}'s publishers after {:?}",
                step,
                feed,
                op
            );
        }
    }
    Ok(())
}

/// Runs `cases` random schedules of up to 60 steps, each on a fresh harness from `make`.
/// Failures shrink to a minimal schedule.
pub fn random_feed_operations_match_the_model<H: FeedHarness>(make: impl Fn() -> H, cases: u32) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(op(), 1..60), |ops| {
        let harness = make();
        runtime.block_on(run_schedule(&harness, &ops))
    });
    if let Err(error) = result {
        panic!("{error}");
    }
}
