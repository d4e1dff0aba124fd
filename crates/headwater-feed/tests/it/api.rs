//! The user's side: closures as projections, typed events through `decode` and upcasters.

use headwater_core::{
    DecodeError, DomainEvent, EncodeError, EventId, EventType, ExpectedVersion, NewEvent,
    StreamName, Upcasters,
};
use headwater_feed::{build_feed, decode, projection};
use headwater_store::{EventStore, MemoryStore};

/// A typed event with two schema versions: v1 `{"cents": n}`, v2 `{"amount": n}`.
#[derive(Debug, PartialEq)]
enum AccountEvent {
    Deposited { amount: u64 },
}

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> EventType {
        EventType::new("account.deposited").unwrap()
    }

    fn schema_version(&self) -> u32 {
        2
    }

    fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let AccountEvent::Deposited { amount } = self;
        Ok(format!("{{\"amount\":{amount}}}").into_bytes())
    }

    fn decode(event_type: &str, schema_version: u32, data: &[u8]) -> Result<Self, DecodeError> {
        if event_type != "account.deposited" {
            return Err(DecodeError::unknown_type(event_type, schema_version));
        }
        if schema_version != 2 {
            return Err(DecodeError::unknown_version(event_type, schema_version));
        }
        let value: serde_json::Value = serde_json::from_slice(data)
            .map_err(|e| DecodeError::new(event_type, schema_version, e))?;
        let amount = value["amount"]
            .as_u64()
            .ok_or_else(|| DecodeError::new(event_type, schema_version, "no amount"))?;
        Ok(AccountEvent::Deposited { amount })
    }
}

fn upcasters() -> Upcasters {
    Upcasters::new().with("account.deposited", 1, |data| {
        let value: serde_json::Value = serde_json::from_slice(data)
            .map_err(|e| DecodeError::new("account.deposited", 1, e))?;
        Ok(format!("{{\"amount\":{}}}", value["cents"]).into_bytes())
    })
}

#[tokio::test]
async fn a_closure_projection_over_typed_upcast_events() {
    let events = MemoryStore::new();
    let stream = StreamName::new("account-7").unwrap();
    let mut old = NewEvent::new(
        EventId::new_random(),
        EventType::new("account.deposited").unwrap(),
        b"{\"cents\":150}".to_vec(),
    );
    old.schema_version = 1;
    let mut new = NewEvent::new(
        EventId::new_random(),
        EventType::new("account.deposited").unwrap(),
        AccountEvent::Deposited { amount: 20 }.encode().unwrap(),
    );
    new.schema_version = 2;
    events
        .append(&stream, ExpectedVersion::Any, vec![old, new])
        .await
        .unwrap();

    let upcasters = upcasters();
    let accounts = projection("accounts.v1", move |event, out| {
        match decode::<AccountEvent>(event, &upcasters)? {
            AccountEvent::Deposited { amount } => out.emit(
                "accounts.deposited",
                event.stream.id(),
                &serde_json::json!({ "amount": amount }),
            ),
        }
    });
    let feed = build_feed(&events, &accounts).await.unwrap();
    let data: Vec<_> = feed
        .iter()
        .map(|e| String::from_utf8_lossy(&e.data).into_owned())
        .collect();
    assert_eq!(data, ["{\"amount\":150}", "{\"amount\":20}"]);
    assert!(feed.iter().all(|e| e.subject.as_str() == "7"));

    // Without the upcaster the old event is refused, naming the event.
    let bare = projection("accounts.v1", |event, out| {
        let AccountEvent::Deposited { amount } = decode(event, &Upcasters::new())?;
        out.emit("accounts.deposited", event.stream.id(), &amount)
    });
    let error = build_feed(&events, &bare).await.unwrap_err().to_string();
    assert!(
        error.contains("position 1") && error.contains("unknown schema version"),
        "{error}"
    );
}
