//! The aggregate `Account`: its commands, its private events and its rules.
//!
//! The private events are this service's own business (the public model is in
//! [`crate::model`]). Each carries the balance after it, so that answering a retried command and
//! projecting the balance into feed v2 need no state beyond the event itself. A withdrawal that
//! would overdraw is *recorded* (`account.withdrawal_refused`): its retry then answers the same
//! refusal, whatever happened to the account since (G3).
//!
//! The stored form of each event is written by hand (`encode` / `decode`): it is a contract with
//! every event already stored, never derived from the Rust types.

use headwater::{Aggregate, DecodeError, DomainEvent, EncodeError, EventType};
use serde_json::{Value, json};

/// The category of the account streams: `account-{id}`.
pub const CATEGORY: &str = "account";
/// The largest amount of one deposit or withdrawal, in cents.
pub const AMOUNT_CENTS_MAX: u64 = 1_000_000_000_000_000;
/// The largest balance an account may hold, in cents.
pub const BALANCE_CENTS_MAX: u64 = 1_000_000_000_000_000;
/// The longest account id, in bytes (`[A-Za-z0-9_-]`; the feed subject is the id).
pub const ID_BYTES_MAX: usize = 64;
/// The longest owner name, in bytes.
pub const OWNER_BYTES_MAX: usize = 256;

/// `account.opened {owner}`.
pub const OPENED: &str = "account.opened";
/// `account.deposited {amount, balance}`.
pub const DEPOSITED: &str = "account.deposited";
/// `account.withdrew {amount, balance}`.
pub const WITHDREW: &str = "account.withdrew";
/// `account.withdrawal_refused {amount, balance}`: a withdrawal over the balance, recorded.
pub const WITHDRAWAL_REFUSED: &str = "account.withdrawal_refused";

/// Whether `id` is a valid account id: 1 to [`ID_BYTES_MAX`] bytes of `[A-Za-z0-9_-]`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= ID_BYTES_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `owner` is a valid owner name: 1 to [`OWNER_BYTES_MAX`] bytes, no control character.
pub fn valid_owner(owner: &str) -> bool {
    !owner.trim().is_empty()
        && owner.len() <= OWNER_BYTES_MAX
        && !owner.chars().any(char::is_control)
}

/// Whether `amount` is a valid amount: 1 ..= [`AMOUNT_CENTS_MAX`] cents.
pub fn valid_amount(amount: u64) -> bool {
    (1..=AMOUNT_CENTS_MAX).contains(&amount)
}

/// An account as its events left it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Account {
    /// `None` until the account is opened.
    pub owner: Option<String>,
    /// Cents.
    pub balance: u64,
}

/// What a client asks of an account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Open { owner: String },
    Deposit { amount: u64 },
    Withdraw { amount: u64 },
}

/// The private events of an account. Every one but `Opened` carries the balance after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Opened {
        owner: String,
    },
    Deposited {
        amount: u64,
        balance: u64,
    },
    Withdrew {
        amount: u64,
        balance: u64,
    },
    /// A withdrawal over the balance: refused, and recorded so that its retry is refused again.
    WithdrawalRefused {
        amount: u64,
        balance: u64,
    },
}

impl Event {
    /// The balance after this event, in cents.
    pub fn balance(&self) -> u64 {
        match self {
            Event::Opened { .. } => 0,
            Event::Deposited { balance, .. }
            | Event::Withdrew { balance, .. }
            | Event::WithdrawalRefused { balance, .. } => *balance,
        }
    }
}

/// The refusals that record nothing (a retry of them is decided again, on the state then).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the account is already open")]
    AlreadyOpen,
    #[error("the account is not open")]
    NotOpen,
    #[error("a deposit of {amount} would take the balance of {balance} past {BALANCE_CENTS_MAX}")]
    BalanceLimit { balance: u64, amount: u64 },
    /// Checked at the edge first; the aggregate refuses it too, whoever sends the command.
    #[error("an amount is 1 to {AMOUNT_CENTS_MAX} cents, not {0}")]
    InvalidAmount(u64),
    #[error("an owner is 1 to {OWNER_BYTES_MAX} bytes without control characters")]
    InvalidOwner,
}

impl Aggregate for Account {
    const CATEGORY: &'static str = CATEGORY;
    type Command = Command;
    type Event = Event;
    type Error = Refusal;

    fn decide(&self, command: &Command) -> Result<Vec<Event>, Refusal> {
        match command {
            Command::Open { owner } => {
                if self.owner.is_some() {
                    return Err(Refusal::AlreadyOpen);
                }
                if !valid_owner(owner) {
                    return Err(Refusal::InvalidOwner);
                }
                Ok(vec![Event::Opened {
                    owner: owner.clone(),
                }])
            }
            Command::Deposit { amount } => {
                let amount = self.movable(*amount)?;
                let balance = self
                    .balance
                    .checked_add(amount)
                    .filter(|b| *b <= BALANCE_CENTS_MAX)
                    .ok_or(Refusal::BalanceLimit {
                        balance: self.balance,
                        amount,
                    })?;
                Ok(vec![Event::Deposited { amount, balance }])
            }
            Command::Withdraw { amount } => {
                let amount = self.movable(*amount)?;
                let balance = self.balance;
                Ok(vec![match balance.checked_sub(amount) {
                    Some(balance) => Event::Withdrew { amount, balance },
                    None => Event::WithdrawalRefused { amount, balance },
                }])
            }
        }
    }

    fn evolve(&mut self, event: &Event) {
        match event {
            Event::Opened { owner } => self.owner = Some(owner.clone()),
            other => self.balance = other.balance(),
        }
    }
}

impl Account {
    /// Checks that money may move on this account: it is open and the amount is valid.
    fn movable(&self, amount: u64) -> Result<u64, Refusal> {
        if self.owner.is_none() {
            return Err(Refusal::NotOpen);
        }
        if !valid_amount(amount) {
            return Err(Refusal::InvalidAmount(amount));
        }
        Ok(amount)
    }
}

impl DomainEvent for Event {
    fn event_type(&self) -> EventType {
        let name = match self {
            Event::Opened { .. } => OPENED,
            Event::Deposited { .. } => DEPOSITED,
            Event::Withdrew { .. } => WITHDREW,
            Event::WithdrawalRefused { .. } => WITHDRAWAL_REFUSED,
        };
        EventType::new(name).expect("the event type constants are valid")
    }

    fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let value = match self {
            Event::Opened { owner } => json!({ "owner": owner }),
            Event::Deposited { amount, balance }
            | Event::Withdrew { amount, balance }
            | Event::WithdrawalRefused { amount, balance } => {
                json!({ "amount": amount, "balance": balance })
            }
        };
        serde_json::to_vec(&value).map_err(EncodeError::new)
    }

    fn decode(event_type: &str, schema_version: u32, data: &[u8]) -> Result<Event, DecodeError> {
        let invalid = |why: &str| DecodeError::new(event_type, schema_version, why.to_owned());
        let value: Value = serde_json::from_slice(data)
            .map_err(|e| DecodeError::new(event_type, schema_version, e))?;
        let number = |field: &str| {
            value[field]
                .as_u64()
                .ok_or_else(|| invalid(&format!("no integer `{field}`")))
        };
        match (event_type, schema_version) {
            (OPENED, 1) => {
                let owner = value["owner"]
                    .as_str()
                    .ok_or_else(|| invalid("no `owner`"))?;
                Ok(Event::Opened {
                    owner: owner.to_owned(),
                })
            }
            (DEPOSITED, 1) => Ok(Event::Deposited {
                amount: number("amount")?,
                balance: number("balance")?,
            }),
            (WITHDREW, 1) => Ok(Event::Withdrew {
                amount: number("amount")?,
                balance: number("balance")?,
            }),
            (WITHDRAWAL_REFUSED, 1) => Ok(Event::WithdrawalRefused {
                amount: number("amount")?,
                balance: number("balance")?,
            }),
            (OPENED | DEPOSITED | WITHDREW | WITHDRAWAL_REFUSED, _) => {
                Err(DecodeError::unknown_version(event_type, schema_version))
            }
            _ => Err(DecodeError::unknown_type(event_type, schema_version)),
        }
    }
}

#[cfg(test)]
mod tests {
    use headwater::testing::given;

    use super::*;

    fn opened() -> Event {
        Event::Opened {
            owner: "Ada".into(),
        }
    }

    #[test]
    fn a_withdrawal_over_the_balance_is_recorded_as_refused() {
        given::<Account>([
            opened(),
            Event::Deposited {
                amount: 100,
                balance: 100,
            },
        ])
        .when(Command::Withdraw { amount: 101 })
        .then([Event::WithdrawalRefused {
            amount: 101,
            balance: 100,
        }]);
        given::<Account>([
            opened(),
            Event::Deposited {
                amount: 100,
                balance: 100,
            },
        ])
        .when(Command::Withdraw { amount: 100 })
        .then([Event::Withdrew {
            amount: 100,
            balance: 0,
        }]);
    }

    #[test]
    fn refusals_that_record_nothing() {
        given::<Account>([opened()])
            .when(Command::Open {
                owner: "Bob".into(),
            })
            .then_error(Refusal::AlreadyOpen);
        given::<Account>([])
            .when(Command::Deposit { amount: 1 })
            .then_error(Refusal::NotOpen);
        given::<Account>([opened()])
            .when(Command::Deposit { amount: 0 })
            .then_error(Refusal::InvalidAmount(0));
        given::<Account>([
            opened(),
            Event::Deposited {
                amount: BALANCE_CENTS_MAX,
                balance: BALANCE_CENTS_MAX,
            },
        ])
        .when(Command::Deposit { amount: 1 })
        .then_error(Refusal::BalanceLimit {
            balance: BALANCE_CENTS_MAX,
            amount: 1,
        });
    }

    #[test]
    fn events_round_trip_through_their_stored_form() {
        for event in [
            opened(),
            Event::Deposited {
                amount: 5,
                balance: 7,
            },
            Event::Withdrew {
                amount: 5,
                balance: 2,
            },
            Event::WithdrawalRefused {
                amount: 9,
                balance: 2,
            },
        ] {
            let data = event.encode().unwrap();
            let back = Event::decode(event.event_type().as_str(), 1, &data).unwrap();
            assert_eq!(back, event);
        }
    }

    #[test]
    fn ids() {
        assert!(valid_id("a-B_9"));
        assert!(valid_id(&"x".repeat(ID_BYTES_MAX)));
        for bad in ["", "a b", "a.b", "é", &"x".repeat(ID_BYTES_MAX + 1)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
