//! The public model: what `accounts` publishes and `statements` reads. This is the contract
//! between the two services; the private events of the `Account` aggregate are not part of it
//! (they live in [`crate::accounts`] and may change freely).
//!
//! Every integration event's subject is the account id; sequences run 1, 2, 3 … per account.
//! Amounts are integer cents.
//!
//! ## `accounts.v1`
//!
//! | type | data |
//! | --- | --- |
//! | `accounts.opened` | `{"owner": "Ada"}` |
//! | `accounts.deposited` | `{"amount": 100}` |
//! | `accounts.withdrew` | `{"amount": 40}` |
//!
//! A refused withdrawal is not in v1.
//!
//! ## `accounts.v2`
//!
//! v2 is what v1's readers asked for: money with its currency, the balance after every change (a
//! reader can check its arithmetic, or take the balance as it is), and refused withdrawals as
//! public facts. Types are renamed after what happened to the account:
//!
//! | type | data |
//! | --- | --- |
//! | `accounts.account_opened` | `{"owner": "Ada", "currency": "EUR", "balance": 0}` |
//! | `accounts.credited` | `{"amount": {"cents": 100, "currency": "EUR"}, "balance": 100}` |
//! | `accounts.debited` | `{"amount": {"cents": 40, "currency": "EUR"}, "balance": 60}` |
//! | `accounts.withdrawal_refused` | `{"amount": {"cents": 500, "currency": "EUR"}, "balance": 60}` |
//!
//! Both versions are projected from the same private log (G5), side by side (G10).

use serde::{Deserialize, Serialize};

/// The feeds' name.
pub const FEED_NAME: &str = "accounts";
/// Version 1 of the feed (`--feed accounts.v1`).
pub const FEED_V1: &str = "accounts.v1";
/// Version 2 of the feed (`--feed accounts.v2`).
pub const FEED_V2: &str = "accounts.v2";
/// The CloudEvents `source` of every event `accounts` publishes.
pub const SOURCE: &str = "accounts";
/// The currency of every account (the model carries it from v2 on).
pub const CURRENCY: &str = "EUR";

/// v1 event types.
pub mod v1 {
    use serde::{Deserialize, Serialize};

    /// `accounts.opened`.
    pub const OPENED: &str = "accounts.opened";
    /// `accounts.deposited`.
    pub const DEPOSITED: &str = "accounts.deposited";
    /// `accounts.withdrew`.
    pub const WITHDREW: &str = "accounts.withdrew";

    /// The data of `accounts.opened`.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Opened {
        pub owner: String,
    }

    /// The data of `accounts.deposited` and `accounts.withdrew`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Moved {
        /// Cents, more than 0.
        pub amount: u64,
    }
}

/// v2 event types.
pub mod v2 {
    use serde::{Deserialize, Serialize};

    use super::Money;

    /// `accounts.account_opened`.
    pub const ACCOUNT_OPENED: &str = "accounts.account_opened";
    /// `accounts.credited`.
    pub const CREDITED: &str = "accounts.credited";
    /// `accounts.debited`.
    pub const DEBITED: &str = "accounts.debited";
    /// `accounts.withdrawal_refused`.
    pub const WITHDRAWAL_REFUSED: &str = "accounts.withdrawal_refused";

    /// The data of `accounts.account_opened`.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct AccountOpened {
        pub owner: String,
        pub currency: String,
        /// Cents after the opening (0).
        pub balance: u64,
    }

    /// The data of `accounts.credited`, `accounts.debited` and `accounts.withdrawal_refused`.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Changed {
        pub amount: Money,
        /// Cents after this event (unchanged by a refusal).
        pub balance: u64,
    }
}

/// An amount of money in v2.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    pub cents: u64,
    pub currency: String,
}
