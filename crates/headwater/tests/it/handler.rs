//! The command handler against the in-memory store.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use async_trait::async_trait;
use headwater::store::{AppendError, AppendOutcome, EventStore, MemoryStore, ReadError};
use headwater::{
    CommandContext, CommandError, CommandHandler, CommandId, DomainEvent, EventId, EventType,
    ExpectedVersion, Handled, NewEvent, Position, RecordedEvent, StreamName, StreamVersion, Uuid,
};
use tokio::sync::watch;

use crate::account::{self, Account, Command, Event, Refusal};

pub(crate) fn handler<S: EventStore + ?Sized>(store: Arc<S>) -> CommandHandler<Account, S> {
    CommandHandler::from_arc(store).with_upcasters(account::upcasters())
}

pub(crate) fn command_id(n: u128) -> CommandId {
    CommandId::from_uuid(Uuid::from_u128(n))
}

fn stream(id: &str) -> StreamName {
    StreamName::from_parts("account", id).unwrap()
}

fn open(initial: u64) -> Command {
    Command::Open {
        owner: "ann".to_owned(),
        initial,
    }
}

/// What a command recorded, without `replayed`: a replay must answer the same.
pub(crate) fn recorded(
    handled: &Handled,
) -> (
    Option<StreamVersion>,
    Option<Position>,
    Option<Position>,
    usize,
) {
    (
        handled.stream_version,
        handled.first_position,
        handled.last_position,
        handled.events,
    )
}

async fn all_events(store: &MemoryStore) -> Vec<RecordedEvent> {
    store.read_all(Position::START, 10_000).await.unwrap()
}

fn new_event(event: &Event) -> NewEvent {
    let mut new = NewEvent::new(
        EventId::new_random(),
        event.event_type(),
        event.encode().unwrap(),
    );
    new.schema_version = event.schema_version();
    new
}

#[tokio::test]
async fn records_a_command_with_derived_ids_and_metadata() {
    let store = MemoryStore::new();
    let handler = handler(Arc::new(store.clone()));
    let id = command_id(1);
    let handled = handler.handle("1", open(100), id).await.unwrap();
    assert!(!handled.replayed);
    assert_eq!(
        recorded(&handled),
        (
            Some(StreamVersion(2)),
            Some(Position(1)),
            Some(Position(2)),
            2
        )
    );
    let events = all_events(&store).await;
    assert_eq!(events.len(), 2);
    for (index, event) in events.iter().enumerate() {
        assert_eq!(event.stream, stream("1"));
        assert_eq!(event.event_id, id.event_id(index as u64));
        assert_eq!(event.metadata.correlation_id, Some(*id.as_uuid()));
        assert_eq!(event.metadata.causation_id, Some(*id.as_uuid()));
    }
    assert_eq!(events[0].event_type.as_str(), account::OPENED);
    assert_eq!(events[0].metadata.schema_version, 2);
    assert_eq!(events[0].data, br#"{"owner":"ann"}"#);
    assert_eq!(events[1].data, br#"{"amount":100}"#);
}

#[tokio::test]
async fn context_sets_correlation_and_causation() {
    let store = MemoryStore::new();
    let handler = handler(Arc::new(store.clone()));
    let (correlation, causation) = (Uuid::from_u128(77), Uuid::from_u128(78));
    let context = CommandContext::new()
        .correlation_id(correlation)
        .causation_id(causation);
    handler
        .handle_with("1", open(0), command_id(1), context)
        .await
        .unwrap();
    let event = &all_events(&store).await[0];
    assert_eq!(event.metadata.correlation_id, Some(correlation));
    assert_eq!(event.metadata.causation_id, Some(causation));
}

#[tokio::test]
async fn load_after_several_commands() {
    let handler = handler(Arc::new(MemoryStore::new()));
    let empty = handler.load("1").await.unwrap();
    assert_eq!((empty.state, empty.version), (Account::default(), None));

    let commands = [
        open(0),
        Command::Deposit { amount: 100 },
        Command::Withdraw { amount: 30 },
        Command::Deposit { amount: 5 },
    ];
    for (n, command) in (1..).zip(commands) {
        handler.handle("1", command, command_id(n)).await.unwrap();
    }
    let loaded = handler.load("1").await.unwrap();
    assert_eq!(loaded.stream, stream("1"));
    assert_eq!(loaded.version, Some(StreamVersion(4)));
    assert_eq!(
        loaded.state,
        Account {
            owner: Some("ann".to_owned()),
            balance: 75
        }
    );
    // Another aggregate's stream is its own.
    assert_eq!(handler.load("2").await.unwrap().version, None);
}

#[tokio::test]
async fn loads_streams_longer_than_a_page() {
    let store = MemoryStore::new();
    let handler = handler(Arc::new(store.clone()));
    handler.handle("1", open(0), command_id(0)).await.unwrap();
    // 2,500 deposits, in appends of up to 1,000 events, written straight to the store.
    for chunk in [1_000, 1_000, 500] {
        let events = (0..chunk)
            .map(|_| new_event(&Event::Deposited { amount: 2 }))
            .collect();
        store
            .append(&stream("1"), ExpectedVersion::Any, events)
            .await
            .unwrap();
    }
    let loaded = handler.load("1").await.unwrap();
    assert_eq!(loaded.version, Some(StreamVersion(2_501)));
    assert_eq!(loaded.state.balance, 5_000);
}

#[tokio::test]
async fn an_invalid_id_is_refused() {
    let handler = handler(Arc::new(MemoryStore::new()));
    for id in ["", "a b", "x/y", &"9".repeat(300)] {
        let error = handler
            .handle(id, open(0), command_id(1))
            .await
            .unwrap_err();
        assert!(
            matches!(error, CommandError::InvalidId(_)),
            "{id:?} gave {error}"
        );
        assert_eq!(error.kind(), headwater::ErrorKind::BadRequest);
        let error = handler.load(id).await.unwrap_err();
        assert!(matches!(error, CommandError::InvalidId(_)), "{id:?}");
    }
}

#[tokio::test]
async fn a_rejected_command_records_nothing_and_is_decided_again_on_retry() {
    let store = MemoryStore::new();
    let handler = handler(Arc::new(store.clone()));
    handler.handle("1", open(50), command_id(1)).await.unwrap();
    let withdrawal = command_id(2);
    let error = handler
        .handle("1", Command::Withdraw { amount: 80 }, withdrawal)
        .await
        .unwrap_err();
    assert_eq!(
        error.rejection(),
        Some(&Refusal::InsufficientFunds {
            balance: 50,
            amount: 80
        })
    );
    assert_eq!(error.kind(), headwater::ErrorKind::BadRequest);
    assert_eq!(all_events(&store).await.len(), 2);

    // A refusal leaves no trace, so a retry is decided on the state at that time.
    handler
        .handle("1", Command::Deposit { amount: 40 }, command_id(3))
        .await
        .unwrap();
    let handled = handler
        .handle("1", Command::Withdraw { amount: 80 }, withdrawal)
        .await
        .unwrap();
    assert!(!handled.replayed);
    assert_eq!(handler.load("1").await.unwrap().state.balance, 10);
}

#[tokio::test]
async fn a_decision_without_events_records_nothing() {
    let store = MemoryStore::new();
    let handler = handler(Arc::new(store.clone()));
    handler.handle("1", open(0), command_id(1)).await.unwrap();
    let nothing = command_id(2);
    let handled = handler
        .handle("1", Command::Deposit { amount: 0 }, nothing)
        .await
        .unwrap();
    assert_eq!(recorded(&handled), (Some(StreamVersion(1)), None, None, 0));
    assert!(!handled.replayed);
    assert_eq!(all_events(&store).await.len(), 1);
    // Nothing was recorded under that command id, so it is decided again.
    let handled = handler
        .handle("1", Command::Deposit { amount: 5 }, nothing)
        .await
        .unwrap();
    assert_eq!((handled.events, handled.replayed), (1, false));
}

#[tokio::test]
async fn a_retried_command_is_replayed() {
    let store = MemoryStore::new();
    let handler = handler(Arc::new(store.clone()));
    let first = handler.handle("1", open(100), command_id(1)).await.unwrap();
    let deposit = command_id(2);
    let original = handler
        .handle("1", Command::Deposit { amount: 10 }, deposit)
        .await
        .unwrap();
    let before = all_events(&store).await;

    let counting = Arc::new(Meddling::over(&store));
    let retry = crate::handler::handler(Arc::clone(&counting))
        .handle("1", Command::Deposit { amount: 10 }, deposit)
        .await
        .unwrap();
    assert!(retry.replayed);
    assert_eq!(recorded(&retry), recorded(&original));
    assert_eq!(all_events(&store).await, before, "a replay writes nothing");
    assert_eq!(
        counting.appends(),
        0,
        "a replay does not even try to append"
    );

    // Interleaved with other commands, the replay still answers the original outcome, not the
    // stream's current head, and a multi-event command is replayed whole.
    handler
        .handle("1", Command::Withdraw { amount: 60 }, command_id(3))
        .await
        .unwrap();
    let again = handler
        .handle("1", Command::Deposit { amount: 10 }, deposit)
        .await
        .unwrap();
    assert_eq!(
        (recorded(&again), again.replayed),
        (recorded(&original), true)
    );
    let first_again = handler.handle("1", open(100), command_id(1)).await.unwrap();
    assert_eq!(
        (recorded(&first_again), first_again.replayed),
        (recorded(&first), true)
    );
    assert_eq!(handler.load("1").await.unwrap().state.balance, 50);
    assert_eq!(all_events(&store).await.len(), 4);
}

#[tokio::test]
async fn a_retry_is_replayed_even_when_the_state_would_now_refuse_it() {
    let handler = handler(Arc::new(MemoryStore::new()));
    let opening = command_id(1);
    let original = handler.handle("1", open(0), opening).await.unwrap();
    // Deciding `open` again would be refused (already open): the retry must not be decided.
    let retry = handler.handle("1", open(0), opening).await.unwrap();
    assert_eq!(
        (recorded(&retry), retry.replayed),
        (recorded(&original), true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_record_a_command_once() {
    let store = MemoryStore::new();
    let handler = handler(Arc::new(store.clone()));
    for round in 0..20u128 {
        let id = round.to_string();
        handler
            .handle(&id, open(0), command_id(1_000 + round))
            .await
            .unwrap();
        let deposit = command_id(round);
        let barrier = Arc::new(tokio::sync::Barrier::new(8));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (handler, barrier, id) = (handler.clone(), Arc::clone(&barrier), id.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    handler
                        .handle(&id, Command::Deposit { amount: 7 }, deposit)
                        .await
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.unwrap().unwrap());
        }
        let fresh = outcomes.iter().filter(|h| !h.replayed).count();
        assert_eq!(fresh, 1, "round {round}: {outcomes:?}");
        assert!(
            outcomes
                .iter()
                .all(|h| recorded(h) == recorded(&outcomes[0])),
            "round {round}: {outcomes:?}"
        );
        let loaded = handler.load(&id).await.unwrap();
        assert_eq!(loaded.state.balance, 7, "round {round}");
        assert_eq!(loaded.version, Some(StreamVersion(2)), "round {round}");
    }
}

#[tokio::test]
async fn a_command_id_reused_on_another_aggregate_is_refused() {
    let store = MemoryStore::new();
    let handler = handler(Arc::new(store.clone()));
    let id = command_id(1);
    handler.handle("1", open(0), id).await.unwrap();
    let error = handler.handle("2", open(0), id).await.unwrap_err();
    match &error {
        CommandError::CommandIdReused { command_id, stream } => {
            assert_eq!((*command_id, stream.as_str()), (id, "account-1"));
        }
        other => panic!("expected CommandIdReused, got {other:?}"),
    }
    assert_eq!(error.kind(), headwater::ErrorKind::BadRequest);
    assert_eq!(handler.load("2").await.unwrap().version, None);
    assert_eq!(all_events(&store).await.len(), 1);
}

#[tokio::test]
async fn an_event_that_does_not_decode_is_reported_with_its_position() {
    let store = MemoryStore::new();
    let handler = handler(Arc::new(store.clone()));
    handler.handle("0", open(0), command_id(1)).await.unwrap();
    handler.handle("9", open(0), command_id(2)).await.unwrap();
    let garbage = NewEvent::new(
        EventId::new_random(),
        EventType::new(account::DEPOSITED).unwrap(),
        b"not json".to_vec(),
    );
    store
        .append(&stream("9"), ExpectedVersion::Any, vec![garbage])
        .await
        .unwrap();
    for error in [
        handler.load("9").await.unwrap_err(),
        handler
            .handle("9", Command::Deposit { amount: 1 }, command_id(3))
            .await
            .unwrap_err(),
    ] {
        match &error {
            CommandError::Decode {
                stream: s,
                stream_version,
                position,
                source,
            } => {
                assert_eq!(s, &stream("9"));
                assert_eq!(
                    (*stream_version, *position),
                    (StreamVersion(2), Position(3))
                );
                assert_eq!(source.event_type(), account::DEPOSITED);
            }
            other => panic!("expected Decode, got {other:?}"),
        }
        assert_eq!(error.kind(), headwater::ErrorKind::Internal);
        assert!(error.to_string().contains("position 3"), "{error}");
    }
    assert_eq!(all_events(&store).await.len(), 3);
}

#[tokio::test]
async fn events_of_an_older_schema_are_upcast_on_load() {
    let store = MemoryStore::new();
    let mut v1 = NewEvent::new(
        EventId::new_random(),
        EventType::new(account::OPENED).unwrap(),
        br#"{"name":"bob"}"#.to_vec(),
    );
    v1.schema_version = 1;
    store
        .append(&stream("1"), ExpectedVersion::NoStream, vec![v1])
        .await
        .unwrap();
    let handler = handler(Arc::new(store.clone()));
    let loaded = handler.load("1").await.unwrap();
    assert_eq!(loaded.state.owner.as_deref(), Some("bob"));
    // Decisions see the upcast state too.
    handler
        .handle("1", Command::Deposit { amount: 3 }, command_id(1))
        .await
        .unwrap();

    // Without the upcaster, version 1 is refused, not misread.
    let bare = CommandHandler::<Account, _>::new(store);
    let error = bare.load("1").await.unwrap_err();
    assert!(
        matches!(&error, CommandError::Decode { source, .. } if source.schema_version() == 1),
        "{error:?}"
    );
}

/// A store over a [`MemoryStore`] that misbehaves on purpose, and counts appends.
#[derive(Default)]
struct Meddling {
    inner: MemoryStore,
    /// Appended (by "another writer") just before each of the next `interfere` appends, so
    /// that each of them conflicts.
    competitor: Option<Event>,
    interfere: AtomicU32,
    /// The next `hide` lookups of an event id find nothing, as if the event were recorded
    /// just after them (by a concurrent retry).
    hide: AtomicU32,
    /// Stream reads ignore `after` and start from the beginning (a broken backend).
    ignore_after: bool,
    appends: AtomicU32,
    /// Events returned by `read_stream`, all reads together.
    events_read: AtomicU64,
}

impl Meddling {
    fn over(inner: &MemoryStore) -> Meddling {
        Meddling {
            inner: inner.clone(),
            ..Meddling::default()
        }
    }

    fn interfering(inner: &MemoryStore, competitor: Event, times: u32) -> Meddling {
        Meddling {
            competitor: Some(competitor),
            interfere: AtomicU32::new(times),
            ..Meddling::over(inner)
        }
    }

    fn hiding(inner: &MemoryStore, times: u32) -> Meddling {
        Meddling {
            hide: AtomicU32::new(times),
            ..Meddling::over(inner)
        }
    }

    fn appends(&self) -> u32 {
        self.appends.load(Ordering::SeqCst)
    }

    fn events_read(&self) -> u64 {
        self.events_read.load(Ordering::SeqCst)
    }
}

/// Takes one from `counter` if it is not 0.
fn take_one(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait]
impl EventStore for Meddling {
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, AppendError> {
        self.appends.fetch_add(1, Ordering::SeqCst);
        if let Some(competitor) = &self.competitor
            && take_one(&self.interfere)
        {
            let competing = vec![new_event(competitor)];
            self.inner
                .append(stream, ExpectedVersion::Any, competing)
                .await
                .unwrap();
        }
        self.inner.append(stream, expected, events).await
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        after: StreamVersion,
        limit: u64,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        let after = if self.ignore_after {
            StreamVersion::START
        } else {
            after
        };
        let page = self.inner.read_stream(stream, after, limit).await?;
        self.events_read
            .fetch_add(page.len() as u64, Ordering::SeqCst);
        Ok(page)
    }

    async fn read_all(&self, after: Position, limit: u64) -> Result<Vec<RecordedEvent>, ReadError> {
        self.inner.read_all(after, limit).await
    }

    async fn stream_head(&self, stream: &StreamName) -> Result<Option<StreamVersion>, ReadError> {
        self.inner.stream_head(stream).await
    }

    async fn find_event(&self, event_id: EventId) -> Result<Option<RecordedEvent>, ReadError> {
        if take_one(&self.hide) {
            return Ok(None);
        }
        self.inner.find_event(event_id).await
    }

    fn head_position(&self) -> Position {
        self.inner.head_position()
    }

    fn watch_head(&self) -> watch::Receiver<Position> {
        self.inner.watch_head()
    }
}

#[tokio::test]
async fn a_conflict_is_decided_again_on_fresh_state() {
    let store = MemoryStore::new();
    handler(Arc::new(store.clone()))
        .handle("1", open(100), command_id(1))
        .await
        .unwrap();

    // A competing deposit lands between load and append: the deposit is decided again and
    // recorded after it.
    let interfering = Arc::new(Meddling::interfering(
        &store,
        Event::Deposited { amount: 1 },
        1,
    ));
    let handled = handler(Arc::clone(&interfering))
        .handle("1", Command::Deposit { amount: 10 }, command_id(2))
        .await
        .unwrap();
    assert_eq!(interfering.appends(), 2);
    assert_eq!(handled.stream_version, Some(StreamVersion(4)));
    assert_eq!(
        handler(Arc::new(store.clone()))
            .load("1")
            .await
            .unwrap()
            .state
            .balance,
        111
    );

    // A competing withdrawal makes the fresh state refuse what the stale state allowed.
    let interfering = Arc::new(Meddling::interfering(
        &store,
        Event::Withdrew { amount: 100 },
        1,
    ));
    let error = handler(Arc::clone(&interfering))
        .handle("1", Command::Withdraw { amount: 50 }, command_id(3))
        .await
        .unwrap_err();
    assert_eq!(
        error.rejection(),
        Some(&Refusal::InsufficientFunds {
            balance: 11,
            amount: 50
        })
    );
    assert_eq!(interfering.appends(), 1);
}

#[tokio::test]
async fn retries_are_bounded() {
    let store = MemoryStore::new();
    handler(Arc::new(store.clone()))
        .handle("1", open(0), command_id(1))
        .await
        .unwrap();
    for attempts in [1, 3] {
        let interfering = Arc::new(Meddling::interfering(
            &store,
            Event::Deposited { amount: 1 },
            u32::MAX,
        ));
        let error = handler(Arc::clone(&interfering))
            .with_attempts_max(attempts)
            .handle("1", Command::Deposit { amount: 5 }, command_id(2))
            .await
            .unwrap_err();
        assert!(
            matches!(error, CommandError::Conflict { attempts: a } if a == attempts),
            "{error:?}"
        );
        assert_eq!(error.kind(), headwater::ErrorKind::Conflict);
        assert_eq!(interfering.appends(), attempts);
    }
    // Only the competitors were recorded: 1 + 3 deposits of 1.
    let loaded = handler(Arc::new(store)).load("1").await.unwrap();
    assert_eq!(loaded.state.balance, 4);

    // The default is the named limit.
    let interfering = Arc::new(Meddling::interfering(
        &MemoryStore::new(),
        Event::Deposited { amount: 1 },
        u32::MAX,
    ));
    let error = handler(Arc::clone(&interfering))
        .handle("1", open(0), command_id(1))
        .await
        .unwrap_err();
    assert!(matches!(
        error,
        CommandError::Conflict { attempts } if attempts == headwater::limits::COMMAND_ATTEMPTS_MAX
    ));
}

#[tokio::test]
async fn works_over_a_store_chosen_at_run_time() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let handler: CommandHandler<Account, dyn EventStore> = handler(store);
    handler.handle("1", open(5), command_id(1)).await.unwrap();
    assert_eq!(handler.load("1").await.unwrap().state.balance, 5);
}

#[tokio::test]
async fn a_command_recorded_by_a_concurrent_retry_after_the_check_is_replayed() {
    let store = MemoryStore::new();
    let opening = command_id(1);
    let original = handler(Arc::new(store.clone()))
        .handle("1", open(10), opening)
        .await
        .unwrap();
    let deposit = command_id(2);
    let deposited = handler(Arc::new(store.clone()))
        .handle("1", Command::Deposit { amount: 5 }, deposit)
        .await
        .unwrap();
    let before = all_events(&store).await;

    // The retry's check finds nothing, then loads a state that holds the command: deciding
    // `open` again is refused, which must not be the answer.
    let racing = Arc::new(Meddling::hiding(&store, 1));
    let retry = handler(Arc::clone(&racing))
        .handle("1", open(10), opening)
        .await
        .unwrap();
    assert_eq!(
        (recorded(&retry), retry.replayed),
        (recorded(&original), true)
    );
    assert_eq!(racing.appends(), 0);

    // Deciding the deposit again gives the same derived ids, which the store refuses at the new
    // version; the next attempt finds the recorded command.
    let racing = Arc::new(Meddling::hiding(&store, 1));
    let retry = handler(Arc::clone(&racing))
        .handle("1", Command::Deposit { amount: 5 }, deposit)
        .await
        .unwrap();
    assert_eq!(
        (recorded(&retry), retry.replayed),
        (recorded(&deposited), true)
    );
    assert_eq!(racing.appends(), 1);
    assert_eq!(all_events(&store).await, before);
}

#[tokio::test]
async fn a_reused_command_id_is_refused_when_the_append_finds_it() {
    let store = MemoryStore::new();
    let id = command_id(1);
    handler(Arc::new(store.clone()))
        .handle("1", open(0), id)
        .await
        .unwrap();
    // The check misses the earlier use; the store's append refuses the duplicate event id.
    let racing = Arc::new(Meddling::hiding(&store, 1));
    let error = handler(Arc::clone(&racing))
        .handle("2", open(0), id)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, CommandError::CommandIdReused { stream, .. } if stream.as_str() == "account-1"),
        "{error:?}"
    );
    assert_eq!(racing.appends(), 1);
    assert_eq!(all_events(&store).await.len(), 1);
}

#[tokio::test]
async fn a_store_that_repeats_versions_is_reported_not_looped_on() {
    let store = MemoryStore::new();
    handler(Arc::new(store.clone()))
        .handle("1", open(5), command_id(1))
        .await
        .unwrap();
    let broken = Meddling {
        ignore_after: true,
        ..Meddling::over(&store)
    };
    let error = handler(Arc::new(broken)).load("1").await.unwrap_err();
    assert!(
        matches!(&error, CommandError::Read(ReadError::Corrupt { position, .. }) if *position == Position(1)),
        "{error:?}"
    );
}

fn cached<S: EventStore + ?Sized>(store: Arc<S>, streams: usize) -> CommandHandler<Account, S> {
    handler(store).with_state_cache(NonZeroUsize::new(streams).unwrap())
}

#[tokio::test]
async fn with_a_state_cache_a_command_reads_only_the_events_since_the_last() {
    let store = MemoryStore::new();
    let counting = Arc::new(Meddling::over(&store));
    for (with_cache, most_read) in [(false, 201), (true, 1)] {
        let id = if with_cache { "cached" } else { "uncached" };
        let commands = if with_cache {
            cached(Arc::clone(&counting), 16)
        } else {
            handler(Arc::clone(&counting))
        };
        commands
            .handle(id, open(0), command_id(u128::from(with_cache) << 64))
            .await
            .unwrap();
        for n in 1..=200u128 {
            let id_n = (u128::from(with_cache) << 64) | n;
            commands
                .handle(id, Command::Deposit { amount: 1 }, command_id(id_n))
                .await
                .unwrap();
        }
        let before = counting.events_read();
        let handled = commands
            .handle(
                id,
                Command::Deposit { amount: 1 },
                command_id((u128::from(with_cache) << 64) | 999),
            )
            .await
            .unwrap();
        assert_eq!(handled.stream_version, Some(StreamVersion(202)));
        let read = counting.events_read() - before;
        assert!(
            read <= most_read,
            "cache {with_cache}: the command read {read} events (at most {most_read} expected)"
        );
        assert_eq!(commands.load(id).await.unwrap().state.balance, 201);
    }
}

#[tokio::test]
async fn a_cached_state_catches_up_with_what_other_writers_appended() {
    let store = Arc::new(MemoryStore::new());
    let cached_handler = cached(Arc::clone(&store), 16);
    let other = handler(Arc::clone(&store));
    cached_handler
        .handle("1", open(10), command_id(1))
        .await
        .unwrap();
    // Another writer (another task, another replica) deposits behind the cache's back.
    for n in 2..5 {
        other
            .handle("1", Command::Deposit { amount: 30 }, command_id(n))
            .await
            .unwrap();
    }
    // Only the deposits it did not see make this withdrawal possible.
    let handled = cached_handler
        .handle("1", Command::Withdraw { amount: 100 }, command_id(5))
        .await
        .unwrap();
    assert_eq!(handled.stream_version, Some(StreamVersion(6)));
    assert_eq!(cached_handler.load("1").await.unwrap().state.balance, 0);
    assert_eq!(other.load("1").await.unwrap().state.balance, 0);

    // A competitor between our (cached) load and our append: the append conflicts, and the
    // command is decided again on the state read on from the cached version.
    let interfering = Arc::new(Meddling::interfering(
        &store,
        Event::Deposited { amount: 7 },
        1,
    ));
    let cached_interfered = cached(Arc::clone(&interfering), 16);
    cached_interfered.load("1").await.unwrap();
    let handled = cached_interfered
        .handle("1", Command::Deposit { amount: 5 }, command_id(6))
        .await
        .unwrap();
    assert_eq!(interfering.appends(), 2);
    assert_eq!(handled.stream_version, Some(StreamVersion(8)));
    assert_eq!(cached_interfered.load("1").await.unwrap().state.balance, 12);
}

#[tokio::test]
async fn the_state_cache_is_bounded_and_evicted_states_load_whole() {
    let store = Arc::new(Meddling::over(&MemoryStore::new()));
    let commands = cached(Arc::clone(&store), 2);
    for account in 0..5u128 {
        commands
            .handle(
                &account.to_string(),
                open(account as u64),
                command_id(account + 1),
            )
            .await
            .unwrap();
    }
    // "0" was evicted by the later ones: it loads from the store, whole and right.
    for account in 0..5u64 {
        assert_eq!(
            commands
                .load(&account.to_string())
                .await
                .unwrap()
                .state
                .balance,
            account
        );
    }
}
