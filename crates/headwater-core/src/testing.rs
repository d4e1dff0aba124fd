//! A given / when / then harness for aggregates, for Headwater's tests and for users' own.
//!
//! ```
//! # use headwater_core::testing::given;
//! # use headwater_core::{Aggregate, DomainEvent, DecodeError, EncodeError, EventType};
//! # #[derive(Default)] struct Counter(u64);
//! # #[derive(Debug, PartialEq)] struct Added(u64);
//! # #[derive(Debug, PartialEq, thiserror::Error)] #[error("zero")] struct Zero;
//! # impl DomainEvent for Added {
//! #     fn event_type(&self) -> EventType { EventType::new("counter.added").unwrap() }
//! #     fn encode(&self) -> Result<Vec<u8>, EncodeError> { Ok(self.0.to_string().into_bytes()) }
//! #     fn decode(_: &str, _: u32, d: &[u8]) -> Result<Self, DecodeError> {
//! #         std::str::from_utf8(d).ok().and_then(|s| s.parse().ok()).map(Added)
//! #             .ok_or_else(|| DecodeError::new("counter.added", 1, "not a number"))
//! #     }
//! # }
//! # impl Aggregate for Counter {
//! #     const CATEGORY: &'static str = "counter";
//! #     type Command = u64; type Event = Added; type Error = Zero;
//! #     fn decide(&self, n: &u64) -> Result<Vec<Added>, Zero> { if *n == 0 { Err(Zero) } else { Ok(vec![Added(*n)]) } }
//! #     fn evolve(&mut self, e: &Added) { self.0 += e.0 }
//! # }
//! given::<Counter>([Added(1)]).when(2).then([Added(2)]);
//! given::<Counter>([]).when(0).then_error(Zero);
//! ```
//!
//! `then` also checks that every produced event survives its own encoding: what `decide` returns
//! is what a reader will decode later.

use std::fmt::Debug;

use crate::aggregate::{Aggregate, DomainEvent};

/// Starts a test from the events already in the stream.
pub fn given<A: Aggregate>(events: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let mut state = A::default();
    for event in events {
        state.evolve(&event);
    }
    Given { state }
}

/// The state built from the given events.
#[derive(Debug)]
pub struct Given<A> {
    state: A,
}

impl<A: Aggregate> Given<A> {
    /// Decides `command` on the given state.
    pub fn when(self, command: A::Command) -> Then<A> {
        let outcome = self.state.decide(&command);
        Then {
            state: self.state,
            outcome,
        }
    }

    /// The state, for assertions the outcome alone cannot express.
    pub fn state(&self) -> &A {
        &self.state
    }
}

/// The outcome of one decision.
pub struct Then<A: Aggregate> {
    state: A,
    outcome: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> Debug for Then<A>
where
    A::Event: Debug,
    A::Error: Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Then")
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

impl<A: Aggregate> Then<A>
where
    A::Event: Debug + PartialEq,
    A::Error: Debug,
{
    /// Asserts that the command produced exactly these events, and that each of them round-trips
    /// through its encoding. Returns the state after applying them.
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = A::Event>) -> A {
        let expected: Vec<_> = expected.into_iter().collect();
        let events = match self.outcome {
            Ok(events) => events,
            Err(error) => {
                panic!("expected events {expected:?}, the command was refused: {error:?}")
            }
        };
        assert_eq!(
            events, expected,
            "the command produced other events than expected"
        );
        let mut state = self.state;
        for event in &events {
            let data = event
                .encode()
                .unwrap_or_else(|e| panic!("{event:?} does not encode: {e}"));
            let event_type = event.event_type();
            let decoded = A::Event::decode(event_type.as_str(), event.schema_version(), &data)
                .unwrap_or_else(|e| panic!("{event:?} does not decode from its own encoding: {e}"));
            assert_eq!(&decoded, event, "{event_type} changes through its encoding");
            state.evolve(event);
        }
        state
    }

    /// Asserts that the command was refused with this error.
    #[track_caller]
    pub fn then_error(self, expected: A::Error)
    where
        A::Error: PartialEq,
    {
        match self.outcome {
            Ok(events) => panic!("expected refusal {expected:?}, the command produced {events:?}"),
            Err(error) => assert_eq!(
                error, expected,
                "the command was refused for another reason"
            ),
        }
    }

    /// Asserts that the command was refused, and returns the error for further checks.
    #[track_caller]
    pub fn then_refused(self) -> A::Error {
        match self.outcome {
            Ok(events) => panic!("expected a refusal, the command produced {events:?}"),
            Err(error) => error,
        }
    }
}
