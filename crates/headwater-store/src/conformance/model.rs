//! A property test of any backend against a trivial model: random sequences of appends (fresh,
//! retried, conflicting, invalid), reads and reopens; after each step the backend must answer
//! exactly as the model says.

use headwater_core::{
    EventId, EventType, ExpectedVersion, NewEvent, Position, StreamName, StreamVersion,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::{Harness, stream};
use crate::{AppendError, AppendOutcome, EventStore};

/// One step of a random schedule.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    /// Append `count` fresh events (`count` 0 is bad input) to stream `stream`.
    Append {
        stream: u8,
        expected: Expect,
        count: u8,
    },
    /// Send again the `nth` successful append (modulo their number), with another expectation.
    Retry {
        nth: u16,
        expected: Expect,
    },
    /// Append fresh events plus one event id already recorded.
    ReuseId {
        stream: u8,
        nth: u16,
    },
    ReadStream {
        stream: u8,
        after: u8,
        limit: u8,
    },
    ReadAll {
        after: u16,
        limit: u8,
    },
    /// Drop every handle and open the store again.
    Reopen,
}

/// An expectation, drawn so that every variant (and `Exact(0)`, which is bad input) occurs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Expect {
    Any,
    NoStream,
    StreamExists,
    Exact(u8),
}

impl Expect {
    fn get(self) -> ExpectedVersion {
        match self {
            Expect::Any => ExpectedVersion::Any,
            Expect::NoStream => ExpectedVersion::NoStream,
            Expect::StreamExists => ExpectedVersion::StreamExists,
            Expect::Exact(v) => ExpectedVersion::Exact(StreamVersion(u64::from(v))),
        }
    }
}

fn expect() -> impl Strategy<Value = Expect> {
    prop_oneof![
        Just(Expect::Any),
        Just(Expect::NoStream),
        Just(Expect::StreamExists),
        (0u8..8).prop_map(Expect::Exact),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..4, expect(), 0u8..5).prop_map(|(stream, expected, count)| Op::Append { stream, expected, count }),
        3 => (any::<u16>(), expect()).prop_map(|(nth, expected)| Op::Retry { nth, expected }),
        1 => (0u8..4, any::<u16>()).prop_map(|(stream, nth)| Op::ReuseId { stream, nth }),
        2 => (0u8..4, 0u8..10, 0u8..6).prop_map(|(stream, after, limit)| Op::ReadStream { stream, after, limit }),
        2 => (0u16..40, 0u8..12).prop_map(|(after, limit)| Op::ReadAll { after, limit }),
        1 => Just(Op::Reopen),
    ]
}

/// The trivial model: a list of (stream, event id), nothing else.
#[derive(Default)]
struct Model {
    log: Vec<(StreamName, EventId)>,
}

/// What the model says an append must give.
#[derive(Debug, PartialEq)]
enum Expected {
    Ok(AppendOutcome),
    Conflict,
    Duplicate,
    Invalid,
}

impl Model {
    fn head(&self, name: &StreamName) -> Option<StreamVersion> {
        let n = self.log.iter().filter(|(s, _)| s == name).count() as u64;
        (n > 0).then_some(StreamVersion(n))
    }

    /// (position, version) of every event of `name`, in order.
    fn stream(&self, name: &StreamName) -> Vec<(Position, StreamVersion, EventId)> {
        let mut version = 0;
        let mut out = Vec::new();
        for (i, (s, id)) in self.log.iter().enumerate() {
            if s == name {
                version += 1;
                out.push((Position(i as u64 + 1), StreamVersion(version), *id));
            }
        }
        out
    }

    fn append(
        &mut self,
        name: &StreamName,
        expected: ExpectedVersion,
        ids: &[EventId],
    ) -> Expected {
        if ids.is_empty() || expected == ExpectedVersion::Exact(StreamVersion(0)) {
            return Expected::Invalid;
        }
        let recorded = |id: &EventId| self.log.iter().position(|(_, r)| r == id);
        if let Some(first) = recorded(&ids[0]) {
            if self.log[first].0 != *name {
                return Expected::Duplicate;
            }
            let events = self.stream(name);
            let start = events
                .iter()
                .position(|(_, _, id)| *id == ids[0])
                .expect("recorded");
            let Some(run) = events.get(start..start + ids.len()) else {
                return Expected::Duplicate;
            };
            if run.iter().zip(ids).any(|((_, _, a), b)| a != b) {
                return Expected::Duplicate;
            }
            if expected.first_version().is_some_and(|v| v != run[0].1) {
                return Expected::Conflict;
            }
            let last = run.last().expect("not empty");
            return Expected::Ok(AppendOutcome {
                stream_version: last.1,
                first_position: run[0].0,
                last_position: last.0,
                replayed: true,
            });
        }
        if ids.iter().any(|id| recorded(id).is_some()) {
            return Expected::Duplicate;
        }
        let head = self.head(name);
        if !expected.admits(head) {
            return Expected::Conflict;
        }
        let first_position = Position(self.log.len() as u64 + 1);
        self.log.extend(ids.iter().map(|id| (name.clone(), *id)));
        Expected::Ok(AppendOutcome {
            stream_version: StreamVersion(head.map_or(0, |v| v.0) + ids.len() as u64),
            first_position,
            last_position: Position(self.log.len() as u64),
            replayed: false,
        })
    }
}

fn new_events(ids: &[EventId]) -> Vec<NewEvent> {
    ids.iter()
        .map(|id| {
            NewEvent::new(
                *id,
                EventType::new("model.step").unwrap(),
                id.as_bytes().to_vec(),
            )
        })
        .collect()
}

fn outcome_of(result: Result<AppendOutcome, AppendError>) -> Result<Expected, String> {
    match result {
        Ok(outcome) => Ok(Expected::Ok(outcome)),
        Err(AppendError::Conflict { .. }) => Ok(Expected::Conflict),
        Err(AppendError::DuplicateEventId { .. }) => Ok(Expected::Duplicate),
        Err(AppendError::Invalid(_)) => Ok(Expected::Invalid),
        Err(other) => Err(format!("the store failed: {other}")),
    }
}

async fn run_schedule<H: Harness>(harness: &H, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut store = harness.open().await;
    let mut model = Model::default();
    // Successful appends, for retries: (stream, ids).
    let mut appended: Vec<(StreamName, Vec<EventId>)> = Vec::new();
    let streams: Vec<_> = (0..4).map(|i| stream(&format!("m{i}"))).collect();
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Append {
                stream,
                expected,
                count,
            } => {
                let name = &streams[usize::from(*stream)];
                let ids: Vec<_> = (0..*count).map(|_| EventId::new_random()).collect();
                let want = model.append(name, expected.get(), &ids);
                let got = outcome_of(store.append(name, expected.get(), new_events(&ids)).await)
                    .map_err(TestCaseError::fail)?;
                prop_assert_eq!(&got, &want, "step {}: {:?}", step, op);
                if matches!(got, Expected::Ok(_)) {
                    appended.push((name.clone(), ids));
                }
            }
            Op::Retry { nth, expected } => {
                if appended.is_empty() {
                    continue;
                }
                let (name, ids) = appended[usize::from(*nth) % appended.len()].clone();
                let want = model.append(&name, expected.get(), &ids);
                let got = outcome_of(store.append(&name, expected.get(), new_events(&ids)).await)
                    .map_err(TestCaseError::fail)?;
                prop_assert_eq!(&got, &want, "step {}: {:?}", step, op);
            }
            Op::ReuseId { stream, nth } => {
                if model.log.is_empty() {
                    continue;
                }
                let name = &streams[usize::from(*stream)];
                let reused = model.log[usize::from(*nth) % model.log.len()].1;
                let ids = vec![EventId::new_random(), reused];
                let want = model.append(name, ExpectedVersion::Any, &ids);
                let got = outcome_of(
                    store
                        .append(name, ExpectedVersion::Any, new_events(&ids))
                        .await,
                )
                .map_err(TestCaseError::fail)?;
                prop_assert_eq!(&got, &want, "step {}: {:?}", step, op);
            }
            Op::ReadStream {
                stream,
                after,
                limit,
            } => {
                let name = &streams[usize::from(*stream)];
                let got = store
                    .read_stream(name, StreamVersion(u64::from(*after)), u64::from(*limit))
                    .await;
                if *limit == 0 {
                    prop_assert!(got.is_err(), "step {}: a page limit of 0 is refused", step);
                    continue;
                }
                let got: Vec<_> = got
                    .map_err(|e| TestCaseError::fail(e.to_string()))?
                    .into_iter()
                    .map(|e| (e.position, e.stream_version, e.event_id))
                    .collect();
                let want: Vec<_> = model
                    .stream(name)
                    .into_iter()
                    .filter(|(_, v, _)| v.0 > u64::from(*after))
                    .take(usize::from(*limit))
                    .collect();
                prop_assert_eq!(got, want, "step {}: {:?}", step, op);
            }
            Op::ReadAll { after, limit } => {
                let got = store
                    .read_all(Position(u64::from(*after)), u64::from(*limit))
                    .await;
                if *limit == 0 {
                    prop_assert!(got.is_err(), "step {}: a page limit of 0 is refused", step);
                    continue;
                }
                let got: Vec<_> = got
                    .map_err(|e| TestCaseError::fail(e.to_string()))?
                    .into_iter()
                    .map(|e| (e.position, e.stream, e.event_id))
                    .collect();
                let want: Vec<_> = model
                    .log
                    .iter()
                    .enumerate()
                    .skip(usize::from(*after))
                    .take(usize::from(*limit))
                    .map(|(i, (s, id))| (Position(i as u64 + 1), s.clone(), *id))
                    .collect();
                prop_assert_eq!(got, want, "step {}: {:?}", step, op);
            }
            Op::Reopen => {
                drop(store);
                store = harness.open().await;
            }
        }
        prop_assert_eq!(
            store.head_position(),
            Position(model.log.len() as u64),
            "step {}",
            step
        );
    }
    for name in &streams {
        prop_assert_eq!(
            store
                .stream_head(name)
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?,
            model.head(name)
        );
    }
    Ok(())
}

/// Runs `cases` random schedules of up to 60 steps, each on a fresh harness from `make`.
/// Failures shrink to a minimal schedule, printed with the seed proptest persists.
pub fn random_operations_match_the_model<H: Harness>(make: impl Fn() -> H, cases: u32) {
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
