//! A property test: random sequences of commands, with retried and reused command ids, against a
//! trivial model of accounts. Every answer, the final states and the recorded events must be what
//! the model says; every command id is recorded at most once.

use std::collections::HashMap;
use std::sync::Arc;

use headwater::store::{EmbeddedStore, EventStore, MemoryStore};
use headwater::{CommandError, Handled, Position, StreamVersion};
use proptest::prelude::*;
use proptest::sample::Index;

use crate::account::{Account, Command, Refusal};
use crate::handler::{command_id, handler, recorded};

const ACCOUNTS: u8 = 3;

#[derive(Debug, Clone)]
enum Op {
    /// A new command with a new command id.
    Fresh { account: u8, command: Command },
    /// A retry: an earlier op's account, command and command id, sent again.
    Retry { of: Index },
    /// A client's mistake: an earlier op's command id, with another account and command.
    Reuse {
        of: Index,
        account: u8,
        command: Command,
    },
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (prop::sample::select(&["ann", "bob"][..]), 0..100u64).prop_map(|(owner, initial)| {
            Command::Open {
                owner: owner.to_owned(),
                initial,
            }
        }),
        (0..100u64).prop_map(|amount| Command::Deposit { amount }),
        (0..150u64).prop_map(|amount| Command::Withdraw { amount }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..ACCOUNTS, command()).prop_map(|(account, command)| Op::Fresh { account, command }),
        2 => any::<Index>().prop_map(|of| Op::Retry { of }),
        1 => (any::<Index>(), 0..ACCOUNTS, command())
            .prop_map(|(of, account, command)| Op::Reuse { of, account, command }),
    ]
}

/// One account as the model sees it.
#[derive(Debug, Default, Clone)]
struct Model {
    owner: Option<String>,
    balance: u64,
    /// The stream version: how many events the account's stream holds.
    version: u64,
}

impl Model {
    /// How many events `command` records, or why it is refused; applies it.
    fn apply(&mut self, command: &Command) -> Result<u64, Refusal> {
        let open = self.owner.is_some();
        let events = match command {
            Command::Open { .. } if open => return Err(Refusal::AlreadyOpen),
            Command::Deposit { .. } | Command::Withdraw { .. } if !open => {
                return Err(Refusal::NotOpen);
            }
            Command::Withdraw { amount } if *amount > self.balance => {
                return Err(Refusal::InsufficientFunds {
                    balance: self.balance,
                    amount: *amount,
                });
            }
            Command::Open { owner, initial } => {
                self.owner = Some(owner.clone());
                self.balance += initial;
                1 + u64::from(*initial > 0)
            }
            Command::Deposit { amount } => {
                self.balance += amount;
                u64::from(*amount > 0)
            }
            Command::Withdraw { amount } => {
                self.balance -= amount;
                u64::from(*amount > 0)
            }
        };
        self.version += events;
        Ok(events)
    }
}

async fn run<S: EventStore + Clone>(store: S, ops: Vec<Op>) {
    run_with(store, ops, None).await;
}

/// `run`, with a state cache of `cache` streams when given (fewer than the accounts: states are
/// evicted and loaded whole again along the way).
async fn run_with<S: EventStore + Clone>(store: S, ops: Vec<Op>, cache: Option<usize>) {
    let mut handler = handler(Arc::new(store.clone()));
    if let Some(streams) = cache {
        handler = handler.with_state_cache(std::num::NonZeroUsize::new(streams).unwrap());
    }
    let mut accounts = vec![Model::default(); usize::from(ACCOUNTS)];
    let mut position = 0u64;
    // Per recorded command id: its account and what it recorded.
    let mut recorded_by: HashMap<u128, (u8, Handled)> = HashMap::new();
    // Per op: the account, command and command id it sent.
    let mut sent: Vec<(u8, Command, u128)> = Vec::new();

    for (i, op) in ops.into_iter().enumerate() {
        let fresh_id = i as u128 + 1;
        let (account, command, id) = match op {
            Op::Fresh { account, command } => (account, command, fresh_id),
            Op::Retry { of } if !sent.is_empty() => sent[of.index(sent.len())].clone(),
            Op::Reuse {
                of,
                account,
                command,
            } if !sent.is_empty() => (account, command, sent[of.index(sent.len())].2),
            Op::Retry { .. } => (0, Command::Deposit { amount: 1 }, fresh_id),
            Op::Reuse {
                account, command, ..
            } => (account, command, fresh_id),
        };
        sent.push((account, command.clone(), id));
        let step = format!("step {i}: {command:?} on account {account}, command id {id}");

        let result = handler
            .handle(&account.to_string(), command.clone(), command_id(id))
            .await;
        match recorded_by.get(&id) {
            Some((original_account, original)) if *original_account == account => {
                let handled = result.unwrap_or_else(|e| panic!("{step}: {e}"));
                assert!(handled.replayed, "{step}");
                assert_eq!(recorded(&handled), recorded(original), "{step}");
            }
            Some((original_account, _)) => match result {
                Err(CommandError::CommandIdReused { stream, .. }) => {
                    assert_eq!(stream.id(), original_account.to_string(), "{step}");
                }
                other => panic!("{step}: expected CommandIdReused, got {other:?}"),
            },
            None => {
                let model = &mut accounts[usize::from(account)];
                match model.apply(&command) {
                    Err(refusal) => match result {
                        Err(CommandError::Rejected(actual)) => {
                            assert_eq!(actual, refusal, "{step}");
                        }
                        other => panic!("{step}: expected {refusal:?}, got {other:?}"),
                    },
                    Ok(events) => {
                        let handled = result.unwrap_or_else(|e| panic!("{step}: {e}"));
                        assert!(!handled.replayed, "{step}");
                        assert_eq!(handled.events as u64, events, "{step}");
                        let version = (model.version > 0).then_some(StreamVersion(model.version));
                        assert_eq!(handled.stream_version, version, "{step}");
                        if events > 0 {
                            assert_eq!(
                                (handled.first_position, handled.last_position),
                                (
                                    Some(Position(position + 1)),
                                    Some(Position(position + events))
                                ),
                                "{step}"
                            );
                            position += events;
                            recorded_by.insert(id, (account, handled));
                        } else {
                            assert_eq!(
                                (handled.first_position, handled.last_position),
                                (None, None)
                            );
                        }
                    }
                }
            }
        }
    }

    for (account, model) in (0..).zip(&accounts) {
        let loaded = handler.load(&account.to_string()).await.unwrap();
        let expected = Account {
            owner: model.owner.clone(),
            balance: model.balance,
        };
        assert_eq!(loaded.state, expected, "account {account}");
        let version = (model.version > 0).then_some(StreamVersion(model.version));
        assert_eq!(loaded.version, version, "account {account}");
    }

    // The log holds exactly the recorded commands, each once, its events contiguous and with ids
    // derived from its command id.
    let log = store.read_all(Position::START, 10_000).await.unwrap();
    assert_eq!(log.len() as u64, position);
    let mut seen: HashMap<u128, u64> = HashMap::new();
    let mut previous: Option<u128> = None;
    for event in &log {
        let id = event
            .metadata
            .causation_id
            .expect("causation is set")
            .as_u128();
        let index = seen.entry(id).or_default();
        if *index > 0 {
            assert_eq!(
                previous,
                Some(id),
                "the events of command {id} are not contiguous"
            );
        }
        assert_eq!(event.event_id, command_id(id).event_id(*index));
        *index += 1;
        previous = Some(id);
    }
    let expected: HashMap<u128, u64> = recorded_by
        .iter()
        .map(|(id, (_, handled))| (*id, handled.events as u64))
        .collect();
    assert_eq!(seen, expected);
}

proptest! {
    #[test]
    fn commands_match_the_model(ops in prop::collection::vec(op(), 1..40)) {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(run(MemoryStore::new(), ops));
    }
}

proptest! {
    /// With a state cache smaller than the accounts: the same answers as without.
    #[test]
    fn commands_match_the_model_with_a_state_cache(
        ops in prop::collection::vec(op(), 1..40),
        streams in 1..=usize::from(ACCOUNTS) + 1,
    ) {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(run_with(MemoryStore::new(), ops, Some(streams)));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// The same schedules on the embedded store, where every append is a real, durable commit.
    #[test]
    fn commands_match_the_model_on_the_embedded_store(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(store, ops));
    }
}
