//! A whole Headwater system in one file: a producer service (an aggregate, a projection into a
//! public feed, the feed API) and a consumer service (a view kept from that feed over HTTP).
//! `crates/bank` is the full example; this is the shape of it.
//!
//! ```sh
//! cargo run --example service
//! ```

use std::sync::Arc;

use headwater::api::{ApiConfig, FeedApi, Tokens};
use headwater::consume::{Consumer, ConsumerOptions, EmbeddedView, FeedClient};
use headwater::feed::Subject;
use headwater::feed::{Projectors, decode, projection};
use headwater::prometheus_client::registry::Registry;
use headwater::store::{EmbeddedFeedStore, EmbeddedStore, EventStore};
use headwater::{
    Aggregate, CommandHandler, CommandId, DecodeError, DomainEvent, EncodeError, EventType,
};
use serde_json::{Value, json};

// 1. The aggregate: decide (pure: command + state → events or a refusal), evolve (event → state).
#[derive(Default)]
struct Wallet {
    cents: u64,
}

enum Command {
    Deposit(u64),
    Withdraw(u64),
}

enum Event {
    Deposited(u64),
    Withdrew(u64),
}

#[derive(Debug, thiserror::Error)]
#[error("insufficient funds")]
struct InsufficientFunds;

impl Aggregate for Wallet {
    const CATEGORY: &'static str = "wallet";
    type Command = Command;
    type Event = Event;
    type Error = InsufficientFunds;

    fn decide(&self, command: &Command) -> Result<Vec<Event>, InsufficientFunds> {
        match *command {
            Command::Deposit(cents) => Ok(vec![Event::Deposited(cents)]),
            Command::Withdraw(cents) if cents > self.cents => Err(InsufficientFunds),
            Command::Withdraw(cents) => Ok(vec![Event::Withdrew(cents)]),
        }
    }

    fn evolve(&mut self, event: &Event) {
        match *event {
            Event::Deposited(cents) => self.cents += cents,
            Event::Withdrew(cents) => self.cents -= cents,
        }
    }
}

// The stored form of an event is a contract: written explicitly, never derived from Rust types.
impl DomainEvent for Event {
    fn event_type(&self) -> EventType {
        let name = match self {
            Event::Deposited(_) => "wallet.deposited",
            Event::Withdrew(_) => "wallet.withdrew",
        };
        EventType::new(name).expect("a valid event type")
    }

    fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let (Event::Deposited(cents) | Event::Withdrew(cents)) = self;
        serde_json::to_vec(&json!({ "cents": cents })).map_err(EncodeError::new)
    }

    fn decode(event_type: &str, version: u32, data: &[u8]) -> Result<Event, DecodeError> {
        let data: Value =
            serde_json::from_slice(data).map_err(|e| DecodeError::new(event_type, version, e))?;
        let cents = data["cents"].as_u64();
        match (event_type, cents) {
            ("wallet.deposited", Some(cents)) => Ok(Event::Deposited(cents)),
            ("wallet.withdrew", Some(cents)) => Ok(Event::Withdrew(cents)),
            _ => Err(DecodeError::unknown_type(event_type, version)),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;

    // 2. The producer: commands append to its own store (idempotent by command id)…
    let store = Arc::new(EmbeddedStore::open(dir.path().join("wallets"))?);
    let wallets = CommandHandler::<Wallet, _>::from_arc(Arc::clone(&store));
    wallets
        .handle("ada", Command::Deposit(500), CommandId::new_random())
        .await?;
    wallets
        .handle("ada", Command::Withdraw(200), CommandId::new_random())
        .await?;

    // …a projection turns private events into a public, versioned feed (`wallets.v1`)…
    let wallets_v1 = projection("wallets.v1", |event, out| {
        if event.stream.category() == "wallet" {
            let (public_type, cents) = match decode::<Event>(event, &Default::default())? {
                Event::Deposited(cents) => ("wallets.deposited", cents),
                Event::Withdrew(cents) => ("wallets.withdrew", cents),
            };
            out.emit(public_type, event.stream.id(), &json!({ "cents": cents }))?;
        }
        Ok(())
    });
    let feeds = Arc::new(EmbeddedFeedStore::open(&store)?);
    let mut registry = Registry::default();
    let projectors = Projectors::builder()
        .projection(wallets_v1)
        .start(Arc::clone(&store), Arc::clone(&feeds))
        .await?;
    // (The projector runs in the background; here we wait until it has projected both events.)
    let head = store.head_position();
    let mut projector = projectors
        .watch(&"wallets.v1".parse()?)
        .expect("started above");
    projector.wait_for(|status| status.cursor >= head).await?;

    // …and the feed API serves it over HTTP to whoever holds a token for it.
    let tokens = Tokens::one_for_all("statements", "a-secret-token")?;
    let api = FeedApi::new(feeds, ApiConfig::new("wallets", tokens)?, &mut registry);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let producer = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        api.serve(listener, Arc::new(registry), std::future::pending())
            .await
    });

    // 3. The consumer: a view of its own; the library commits each event's change with the
    // subject's cursor, skips duplicates, heals gaps and bootstraps on demand.
    let view = Arc::new(EmbeddedView::open(
        dir.path().join("view.sqlite3"),
        |tx| tx.execute_batch("CREATE TABLE balances (id TEXT PRIMARY KEY, cents INTEGER)"),
        |tx, event| {
            let cents = event.data_as::<Value>()?["cents"]
                .as_i64()
                .ok_or("no cents")?;
            let change = match event.event_type.as_str() {
                "wallets.withdrew" => -cents,
                _ => cents,
            };
            tx.execute(
                "INSERT INTO balances VALUES (?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET cents = cents + ?2",
                (event.subject.as_str(), change),
            )?;
            Ok(())
        },
    )?);
    let upstream = Arc::new(FeedClient::new(&producer, Some("a-secret-token".into()))?);
    let consumer = Consumer::new(
        "wallets.v1".parse()?,
        view.clone(),
        upstream,
        ConsumerOptions::default(),
    );

    // Bootstrap on demand: the view has never seen `ada`; one call fetches her events.
    let sequence = consumer.ensure(&Subject::new("ada")?).await?;
    let cents: i64 = view
        .read(|db| {
            db.query_row("SELECT cents FROM balances WHERE id = 'ada'", [], |row| {
                row.get(0)
            })
        })
        .await?;
    println!("ada: {cents} cents after {sequence} events"); // ada: 300 cents after 2 events

    // A real service follows the feed instead (or a broker: AmqpSource, NatsSource):
    // consumer.follow_feed(FEED_WAIT_DEFAULT, shutdown).await?;
    Ok(())
}
