//! The projections of the private log into the public feeds `accounts.v1` and `accounts.v2`
//! (their model is in [`crate::model`]). Each is a function of one event alone, so either feed
//! can be rebuilt byte for byte from the log (G5) and both run side by side (G10).

use std::sync::Arc;

use headwater::feed::{Emit, Projection, ProjectionError, decode, projection};
use headwater::{RecordedEvent, Upcasters};

use crate::accounts::account::{CATEGORY, Event};
use crate::model::{self, CURRENCY, Money, v1, v2};

/// The versions of the feed this service can project.
pub const VERSIONS: [u32; 2] = [1, 2];

/// The projection of feed version `version` (1 or 2), `None` for another.
pub fn for_version(version: u32) -> Option<Arc<dyn Projection>> {
    match version {
        1 => Some(Arc::new(projection(model::FEED_V1, project_v1))),
        2 => Some(Arc::new(projection(model::FEED_V2, project_v2))),
        _ => None,
    }
}

/// The account's private event, or `None` for an event of another aggregate.
fn account_event(event: &RecordedEvent) -> Result<Option<Event>, ProjectionError> {
    if event.stream.category() != CATEGORY {
        return Ok(None);
    }
    decode::<Event>(event, &Upcasters::new()).map(Some)
}

/// v1: opened, deposited, withdrew; a refused withdrawal is not in v1.
fn project_v1(event: &RecordedEvent, out: &mut Emit) -> Result<(), ProjectionError> {
    let Some(private) = account_event(event)? else {
        return Ok(());
    };
    let subject = event.stream.id();
    match private {
        Event::Opened { owner } => out.emit(v1::OPENED, subject, &v1::Opened { owner }),
        Event::Deposited { amount, .. } => out.emit(v1::DEPOSITED, subject, &v1::Moved { amount }),
        Event::Withdrew { amount, .. } => out.emit(v1::WITHDREW, subject, &v1::Moved { amount }),
        Event::WithdrawalRefused { .. } => Ok(()),
    }
}

/// v2: money with its currency, the balance after every change, refused withdrawals public.
fn project_v2(event: &RecordedEvent, out: &mut Emit) -> Result<(), ProjectionError> {
    let Some(private) = account_event(event)? else {
        return Ok(());
    };
    let subject = event.stream.id();
    let changed = |cents: u64, balance: u64| v2::Changed {
        amount: Money {
            cents,
            currency: CURRENCY.to_owned(),
        },
        balance,
    };
    match private {
        Event::Opened { owner } => out.emit(
            v2::ACCOUNT_OPENED,
            subject,
            &v2::AccountOpened {
                owner,
                currency: CURRENCY.to_owned(),
                balance: 0,
            },
        ),
        Event::Deposited { amount, balance } => {
            out.emit(v2::CREDITED, subject, &changed(amount, balance))
        }
        Event::Withdrew { amount, balance } => {
            out.emit(v2::DEBITED, subject, &changed(amount, balance))
        }
        Event::WithdrawalRefused { amount, balance } => {
            out.emit(v2::WITHDRAWAL_REFUSED, subject, &changed(amount, balance))
        }
    }
}
