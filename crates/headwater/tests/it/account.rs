//! An example aggregate: a bank account holding integer cents.
//!
//! Events are encoded by hand as JSON: the stored form is a contract, written explicitly, never
//! derived from the Rust types. `account.opened` is at schema version 2; version 1 named the owner
//! `name`, and [`upcasters`] reads it.

use headwater::{Aggregate, DecodeError, DomainEvent, EncodeError, EventType, Upcasters};
use serde_json::{Value, json};

pub(crate) const OPENED: &str = "account.opened";
pub(crate) const DEPOSITED: &str = "account.deposited";
pub(crate) const WITHDREW: &str = "account.withdrew";

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Account {
    /// `None` until the account is opened.
    pub owner: Option<String>,
    pub balance: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    /// Opens the account, with a first deposit when `initial` is not 0.
    Open { owner: String, initial: u64 },
    /// A deposit of 0 changes nothing and records nothing.
    Deposit { amount: u64 },
    /// A withdrawal of 0 changes nothing and records nothing.
    Withdraw { amount: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    Opened { owner: String },
    Deposited { amount: u64 },
    Withdrew { amount: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    #[error("the account is already open")]
    AlreadyOpen,
    #[error("the account is not open")]
    NotOpen,
    #[error("a withdrawal of {amount} would overdraw a balance of {balance}")]
    InsufficientFunds { balance: u64, amount: u64 },
    #[error("the balance would exceed the largest amount an account can hold")]
    BalanceTooLarge,
}

impl Aggregate for Account {
    const CATEGORY: &'static str = "account";
    type Command = Command;
    type Event = Event;
    type Error = Refusal;

    fn decide(&self, command: &Command) -> Result<Vec<Event>, Refusal> {
        match command {
            Command::Open { owner, initial } => {
                if self.owner.is_some() {
                    return Err(Refusal::AlreadyOpen);
                }
                let mut events = vec![Event::Opened {
                    owner: owner.clone(),
                }];
                if *initial > 0 {
                    events.push(Event::Deposited { amount: *initial });
                }
                Ok(events)
            }
            Command::Deposit { amount } => {
                if self.owner.is_none() {
                    return Err(Refusal::NotOpen);
                }
                if self.balance.checked_add(*amount).is_none() {
                    return Err(Refusal::BalanceTooLarge);
                }
                Ok(nonzero(*amount, |amount| Event::Deposited { amount }))
            }
            Command::Withdraw { amount } => {
                if self.owner.is_none() {
                    return Err(Refusal::NotOpen);
                }
                if *amount > self.balance {
                    return Err(Refusal::InsufficientFunds {
                        balance: self.balance,
                        amount: *amount,
                    });
                }
                Ok(nonzero(*amount, |amount| Event::Withdrew { amount }))
            }
        }
    }

    fn evolve(&mut self, event: &Event) {
        match event {
            Event::Opened { owner } => self.owner = Some(owner.clone()),
            // `decide` refused whatever would overflow or go below zero; saturating keeps
            // `evolve` total for events written by someone else.
            Event::Deposited { amount } => self.balance = self.balance.saturating_add(*amount),
            Event::Withdrew { amount } => self.balance = self.balance.saturating_sub(*amount),
        }
    }
}

fn nonzero(amount: u64, event: impl FnOnce(u64) -> Event) -> Vec<Event> {
    if amount == 0 {
        Vec::new()
    } else {
        vec![event(amount)]
    }
}

impl DomainEvent for Event {
    fn event_type(&self) -> EventType {
        let name = match self {
            Event::Opened { .. } => OPENED,
            Event::Deposited { .. } => DEPOSITED,
            Event::Withdrew { .. } => WITHDREW,
        };
        EventType::new(name).expect("the event type constants are valid")
    }

    fn schema_version(&self) -> u32 {
        match self {
            Event::Opened { .. } => 2,
            Event::Deposited { .. } | Event::Withdrew { .. } => 1,
        }
    }

    fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let value = match self {
            Event::Opened { owner } => json!({ "owner": owner }),
            Event::Deposited { amount } | Event::Withdrew { amount } => json!({ "amount": amount }),
        };
        serde_json::to_vec(&value).map_err(EncodeError::new)
    }

    fn decode(event_type: &str, schema_version: u32, data: &[u8]) -> Result<Event, DecodeError> {
        let invalid = |why: &str| DecodeError::new(event_type, schema_version, why.to_owned());
        let value: Value = serde_json::from_slice(data)
            .map_err(|e| DecodeError::new(event_type, schema_version, e))?;
        let amount = || {
            value["amount"]
                .as_u64()
                .ok_or_else(|| invalid("no integer `amount`"))
        };
        match (event_type, schema_version) {
            (OPENED, 2) => {
                let owner = value["owner"]
                    .as_str()
                    .ok_or_else(|| invalid("no `owner`"))?;
                Ok(Event::Opened {
                    owner: owner.to_owned(),
                })
            }
            (DEPOSITED, 1) => Ok(Event::Deposited { amount: amount()? }),
            (WITHDREW, 1) => Ok(Event::Withdrew { amount: amount()? }),
            (OPENED | DEPOSITED | WITHDREW, _) => {
                Err(DecodeError::unknown_version(event_type, schema_version))
            }
            _ => Err(DecodeError::unknown_type(event_type, schema_version)),
        }
    }
}

/// Reads `account.opened` v1 (`{"name": …}`) as v2 (`{"owner": …}`).
pub(crate) fn upcasters() -> Upcasters {
    Upcasters::new().with(OPENED, 1, |data| {
        let invalid = |why: String| DecodeError::new(OPENED, 1, why);
        let value: Value = serde_json::from_slice(data).map_err(|e| invalid(e.to_string()))?;
        let name = value["name"]
            .as_str()
            .ok_or_else(|| invalid("no `name`".to_owned()))?;
        serde_json::to_vec(&json!({ "owner": name })).map_err(|e| invalid(e.to_string()))
    })
}
