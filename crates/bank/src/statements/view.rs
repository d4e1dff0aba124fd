//! The view of `statements`: every account's balance, in one SQLite file, one table per feed
//! version (`balances_v1`, `balances_v2`) so that a v2 view can be built beside the v1 one while
//! v1 keeps serving (G10). The consumer library keeps the cursors in the same file and commits
//! them with the rows: the handlers below only change the rows.

use std::collections::BTreeMap;

use headwater::consume::rusqlite::{self, OptionalExtension, Transaction, params};
use headwater::consume::{EmbeddedView, IntegrationEvent, ViewError};
use headwater::feed::FeedId;
use serde::{Deserialize, Serialize};

use crate::model::{self, CURRENCY, v1, v2};

/// The view's file in `--data DIR`.
pub const VIEW_FILE: &str = "statements.sqlite3";

/// One account as `statements` knows it: `GET /balances/{id}` answers this.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    /// Cents.
    pub balance: u64,
    /// The last event of the account applied, in the active feed version's numbering (v2
    /// counts refused withdrawals, v1 does not).
    pub sequence: u64,
}

/// The tables, created when the view is opened (idempotent).
pub(crate) fn setup(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS balances_v1 (
            account TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            balance INTEGER NOT NULL CHECK (balance >= 0),
            sequence INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS balances_v2 (
            account TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            currency TEXT NOT NULL,
            balance INTEGER NOT NULL CHECK (balance >= 0),
            refused INTEGER NOT NULL,
            sequence INTEGER NOT NULL
        ) WITHOUT ROWID;",
    )
}

/// The table of a feed version, `None` for a version this service does not know.
pub(crate) fn table(feed: &FeedId) -> Option<&'static str> {
    if feed.name.as_str() != model::FEED_NAME {
        return None;
    }
    match feed.version.get() {
        1 => Some("balances_v1"),
        2 => Some("balances_v2"),
        _ => None,
    }
}

/// Why the handler refuses an event. The consumer library then writes nothing for it (nor its
/// cursor), dead-letters it and parks the account: nothing after it is applied until it is
/// fixed (see docs/design/consumer.md, "Dead letters").
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{feed} has no event type {event_type:?}")]
    UnknownType { feed: String, event_type: String },
    #[error("the data of {event_type} does not fit the model: {reason}")]
    BadData { event_type: String, reason: String },
    #[error("an amount of 0 cents")]
    ZeroAmount,
    #[error("an event of an account that was never opened")]
    NotOpened,
    #[error("the account is opened a second time")]
    AlreadyOpened,
    #[error("a withdrawal of {amount} cents from a balance of {balance}")]
    Overdrawn { balance: u64, amount: u64 },
    #[error("the balance would pass the largest amount this view holds")]
    Overflow,
    #[error("the event says the balance is {stated} cents, but the arithmetic gives {computed}")]
    Mismatch { stated: u64, computed: u64 },
    #[error("an amount in {got}, the account is in {account}")]
    Currency { account: String, got: String },
    #[error("the view's database: {0}")]
    Database(#[from] rusqlite::Error),
}

/// The view's handler: applies one event of `accounts.v1` or `accounts.v2` to that version's
/// table, inside the transaction in which the library also moves the account's cursor.
pub(crate) fn apply(tx: &Transaction<'_>, event: &IntegrationEvent) -> Result<(), Refused> {
    match event.feed.version.get() {
        1 if table(&event.feed).is_some() => apply_v1(tx, event),
        2 if table(&event.feed).is_some() => apply_v2(tx, event),
        _ => Err(Refused::UnknownType {
            feed: event.feed.to_string(),
            event_type: event.event_type.clone(),
        }),
    }
}

/// v1 carries amounts only: the view does the arithmetic.
fn apply_v1(tx: &Transaction<'_>, event: &IntegrationEvent) -> Result<(), Refused> {
    let account = event.subject.as_str();
    let sequence = to_sql(event.sequence.get())?;
    match event.event_type.as_str() {
        v1::OPENED => {
            let opened: v1::Opened = data(event)?;
            if current_v1(tx, account)?.is_some() {
                return Err(Refused::AlreadyOpened);
            }
            tx.execute(
                "INSERT INTO balances_v1 (account, owner, balance, sequence) VALUES (?1, ?2, 0, ?3)",
                params![account, opened.owner, sequence],
            )?;
        }
        v1::DEPOSITED | v1::WITHDREW => {
            let moved: v1::Moved = data(event)?;
            if moved.amount == 0 {
                return Err(Refused::ZeroAmount);
            }
            let balance = current_v1(tx, account)?.ok_or(Refused::NotOpened)?;
            let balance = if event.event_type == v1::DEPOSITED {
                balance.checked_add(moved.amount).ok_or(Refused::Overflow)?
            } else {
                balance
                    .checked_sub(moved.amount)
                    .ok_or(Refused::Overdrawn {
                        balance,
                        amount: moved.amount,
                    })?
            };
            tx.execute(
                "UPDATE balances_v1 SET balance = ?2, sequence = ?3 WHERE account = ?1",
                params![account, to_sql(balance)?, sequence],
            )?;
        }
        other => {
            return Err(Refused::UnknownType {
                feed: event.feed.to_string(),
                event_type: other.to_owned(),
            });
        }
    }
    Ok(())
}

/// v2 carries the balance after every change: the view checks it against its own arithmetic and
/// refuses (dead-letters) an event where they differ — a reader that trusted the producer's
/// balance blindly would never notice a bug on either side.
fn apply_v2(tx: &Transaction<'_>, event: &IntegrationEvent) -> Result<(), Refused> {
    let account = event.subject.as_str();
    let sequence = to_sql(event.sequence.get())?;
    if event.event_type == v2::ACCOUNT_OPENED {
        let opened: v2::AccountOpened = data(event)?;
        if current_v2(tx, account)?.is_some() {
            return Err(Refused::AlreadyOpened);
        }
        if opened.balance != 0 {
            return Err(Refused::Mismatch {
                stated: opened.balance,
                computed: 0,
            });
        }
        if opened.currency != CURRENCY {
            return Err(Refused::Currency {
                account: CURRENCY.to_owned(),
                got: opened.currency,
            });
        }
        tx.execute(
            "INSERT INTO balances_v2 (account, owner, currency, balance, refused, sequence)
             VALUES (?1, ?2, ?3, 0, 0, ?4)",
            params![account, opened.owner, opened.currency, sequence],
        )?;
        return Ok(());
    }
    let refusal = match event.event_type.as_str() {
        v2::CREDITED | v2::DEBITED => 0,
        v2::WITHDRAWAL_REFUSED => 1,
        other => {
            return Err(Refused::UnknownType {
                feed: event.feed.to_string(),
                event_type: other.to_owned(),
            });
        }
    };
    let changed: v2::Changed = data(event)?;
    let (balance, currency) = current_v2(tx, account)?.ok_or(Refused::NotOpened)?;
    if changed.amount.currency != currency {
        return Err(Refused::Currency {
            account: currency,
            got: changed.amount.currency,
        });
    }
    let cents = changed.amount.cents;
    if cents == 0 {
        return Err(Refused::ZeroAmount);
    }
    let computed = match event.event_type.as_str() {
        v2::CREDITED => balance.checked_add(cents).ok_or(Refused::Overflow)?,
        v2::DEBITED => balance.checked_sub(cents).ok_or(Refused::Overdrawn {
            balance,
            amount: cents,
        })?,
        // A refusal changes nothing.
        _ => balance,
    };
    if computed != changed.balance {
        return Err(Refused::Mismatch {
            stated: changed.balance,
            computed,
        });
    }
    tx.execute(
        "UPDATE balances_v2 SET balance = ?2, refused = refused + ?3, sequence = ?4
         WHERE account = ?1",
        params![account, to_sql(computed)?, refusal, sequence],
    )?;
    Ok(())
}

fn data<T: serde::de::DeserializeOwned>(event: &IntegrationEvent) -> Result<T, Refused> {
    event.data_as().map_err(|e| Refused::BadData {
        event_type: event.event_type.clone(),
        reason: e.to_string(),
    })
}

fn to_sql(value: u64) -> Result<i64, Refused> {
    i64::try_from(value).map_err(|_| Refused::Overflow)
}

fn from_sql(value: i64) -> u64 {
    // The tables' CHECKs keep balances ≥ 0; sequences are ≥ 1.
    u64::try_from(value).unwrap_or(0)
}

fn current_v1(tx: &Transaction<'_>, account: &str) -> Result<Option<u64>, Refused> {
    Ok(tx
        .query_row(
            "SELECT balance FROM balances_v1 WHERE account = ?1",
            params![account],
            |row| row.get::<_, i64>(0),
        )
        .optional()?
        .map(from_sql))
}

fn current_v2(tx: &Transaction<'_>, account: &str) -> Result<Option<(u64, String)>, Refused> {
    Ok(tx
        .query_row(
            "SELECT balance, currency FROM balances_v2 WHERE account = ?1",
            params![account],
            |row| Ok((from_sql(row.get(0)?), row.get(1)?)),
        )
        .optional()?)
}

// ---- Reads ----

/// One account's balance in `feed`'s table, `None` when the view does not hold it.
pub(crate) async fn balance(
    view: &EmbeddedView,
    feed: &FeedId,
    account: &str,
) -> Result<Option<Balance>, ViewError> {
    let Some(table) = table(feed) else {
        return Ok(None);
    };
    let account = account.to_owned();
    view.read(move |connection| {
        connection
            .query_row(
                &format!("SELECT balance, sequence FROM {table} WHERE account = ?1"),
                params![account],
                |row| {
                    Ok(Balance {
                        balance: from_sql(row.get(0)?),
                        sequence: from_sql(row.get(1)?),
                    })
                },
            )
            .optional()
    })
    .await
}

/// Every account's balance in `feed`'s table, by account id.
pub(crate) async fn balances(
    view: &EmbeddedView,
    feed: &FeedId,
) -> Result<BTreeMap<String, Balance>, ViewError> {
    let Some(table) = table(feed) else {
        return Ok(BTreeMap::new());
    };
    view.read(move |connection| {
        let mut statement =
            connection.prepare(&format!("SELECT account, balance, sequence FROM {table}"))?;
        let rows = statement.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                Balance {
                    balance: from_sql(row.get(1)?),
                    sequence: from_sql(row.get(2)?),
                },
            ))
        })?;
        rows.collect()
    })
    .await
}

/// How many accounts `feed`'s table holds, and how many subjects have a cursor in `feed`.
pub(crate) async fn counts(view: &EmbeddedView, feed: &FeedId) -> Result<(u64, u64), ViewError> {
    let Some(table) = table(feed) else {
        return Ok((0, 0));
    };
    let feed = feed.to_string();
    view.read(move |connection| {
        let accounts: i64 =
            connection.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| {
                row.get(0)
            })?;
        let cursors: i64 = connection.query_row(
            "SELECT COUNT(*) FROM headwater_cursors WHERE feed = ?1",
            params![feed],
            |row| row.get(0),
        )?;
        Ok((from_sql(accounts), from_sql(cursors)))
    })
    .await
}

#[cfg(test)]
mod tests {
    use headwater::consume::rusqlite::Connection;
    use serde_json::json;

    use super::*;

    /// An event of `feed` as the wire carries it.
    fn event(
        feed: &str,
        sequence: u64,
        event_type: &str,
        data: serde_json::Value,
    ) -> IntegrationEvent {
        let body = json!({
            "specversion": "1.0",
            "id": headwater::Uuid::new_v4().to_string(),
            "source": "accounts",
            "type": event_type,
            "subject": "acc",
            "time": "2026-11-27T00:00:00Z",
            "data": data,
            "sequence": sequence,
            "position": sequence,
            "feed": feed,
        });
        IntegrationEvent::from_cloud_event(body.to_string().as_bytes()).unwrap()
    }

    fn money(cents: u64, balance: u64) -> serde_json::Value {
        json!({"amount": {"cents": cents, "currency": "EUR"}, "balance": balance})
    }

    /// Applies `events` in one transaction each, as the library does; the outcome of each.
    fn run(events: &[IntegrationEvent]) -> (Vec<Result<(), String>>, Connection) {
        let mut connection = Connection::open_in_memory().unwrap();
        let tx = connection.transaction().unwrap();
        setup(&tx).unwrap();
        tx.commit().unwrap();
        let outcomes = events
            .iter()
            .map(|e| {
                let tx = connection.transaction().unwrap();
                let outcome = apply(&tx, e).map_err(|e| e.to_string());
                if outcome.is_ok() {
                    tx.commit().unwrap();
                }
                outcome
            })
            .collect();
        (outcomes, connection)
    }

    fn balance(connection: &Connection, table: &str) -> (i64, i64) {
        connection
            .query_row(&format!("SELECT balance, sequence FROM {table}"), [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap()
    }

    #[test]
    fn v1_does_the_arithmetic_and_refuses_what_does_not_fit() {
        let v1 = "accounts.v1";
        let (outcomes, connection) = run(&[
            event(v1, 1, v1::DEPOSITED, json!({"amount": 5})), // not opened
            event(v1, 1, v1::OPENED, json!({"owner": "Ada"})),
            event(v1, 2, v1::OPENED, json!({"owner": "Ada"})), // twice
            event(v1, 2, v1::DEPOSITED, json!({"amount": 500})),
            event(v1, 3, v1::WITHDREW, json!({"amount": 501})), // overdrawn
            event(v1, 3, v1::WITHDREW, json!({"amount": 0})),
            event(v1, 3, v1::WITHDREW, json!({"amount": "ten"})),
            event(v1, 3, "accounts.credited", json!({})),
            event(v1, 3, v1::WITHDREW, json!({"amount": 200})),
        ]);
        let refused: Vec<bool> = outcomes.iter().map(Result::is_err).collect();
        assert_eq!(
            refused,
            [true, false, true, false, true, true, true, true, false],
            "{outcomes:?}"
        );
        assert!(
            outcomes[4]
                .as_ref()
                .unwrap_err()
                .contains("withdrawal of 501")
        );
        assert_eq!(balance(&connection, "balances_v1"), (300, 3));
    }

    #[test]
    fn v2_checks_the_stated_balance_and_the_currency() {
        let v2 = "accounts.v2";
        let opened = json!({"owner": "Ada", "currency": "EUR", "balance": 0});
        let (outcomes, connection) = run(&[
            event(
                v2,
                1,
                v2::ACCOUNT_OPENED,
                json!({"owner": "Ada", "currency": "EUR", "balance": 3}),
            ),
            event(
                v2,
                1,
                v2::ACCOUNT_OPENED,
                json!({"owner": "Ada", "currency": "USD", "balance": 0}),
            ),
            event(v2, 1, v2::ACCOUNT_OPENED, opened),
            event(v2, 2, v2::CREDITED, money(100, 101)), // off by one
            event(
                v2,
                2,
                v2::CREDITED,
                json!({"amount": {"cents": 100, "currency": "USD"}, "balance": 100}),
            ),
            event(v2, 2, v2::CREDITED, money(100, 100)),
            event(v2, 3, v2::DEBITED, money(40, 40)), // should be 60
            event(v2, 3, v2::DEBITED, money(400, 0)), // overdrawn
            event(v2, 3, v2::WITHDRAWAL_REFUSED, money(400, 99)), // a refusal changes nothing
            event(v2, 3, v2::WITHDRAWAL_REFUSED, money(400, 100)),
            event(v2, 4, v2::DEBITED, money(40, 60)),
        ]);
        let refused: Vec<bool> = outcomes.iter().map(Result::is_err).collect();
        assert_eq!(
            refused,
            [
                true, true, false, true, true, false, true, true, true, false, false
            ],
            "{outcomes:?}"
        );
        assert!(
            outcomes[3]
                .as_ref()
                .unwrap_err()
                .contains("arithmetic gives 100")
        );
        assert_eq!(balance(&connection, "balances_v2"), (60, 4));
        let refusals: i64 = connection
            .query_row("SELECT refused FROM balances_v2", [], |r| r.get(0))
            .unwrap();
        assert_eq!(refusals, 1);
    }

    #[test]
    fn only_accounts_v1_and_v2_have_tables() {
        for (feed, table_name) in [
            ("accounts.v1", Some("balances_v1")),
            ("accounts.v2", Some("balances_v2")),
            ("accounts.v3", None),
            ("orders.v1", None),
        ] {
            assert_eq!(table(&FeedId::parse(feed).unwrap()), table_name, "{feed}");
        }
    }
}
