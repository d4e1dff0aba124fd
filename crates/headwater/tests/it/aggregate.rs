//! Given / when / then tests of the example aggregate: each command, each refusal.

use headwater::DomainEvent;
use headwater::testing::given;

use crate::account::{Account, Command, Event, OPENED, Refusal, upcasters};

fn opened() -> Event {
    Event::Opened {
        owner: "ann".to_owned(),
    }
}

fn open(initial: u64) -> Command {
    Command::Open {
        owner: "ann".to_owned(),
        initial,
    }
}

#[test]
fn open_an_account() {
    let state = given::<Account>([]).when(open(0)).then([opened()]);
    assert_eq!(
        state,
        Account {
            owner: Some("ann".to_owned()),
            balance: 0
        }
    );
}

#[test]
fn open_with_a_first_deposit() {
    let state = given::<Account>([])
        .when(open(250))
        .then([opened(), Event::Deposited { amount: 250 }]);
    assert_eq!(state.balance, 250);
}

#[test]
fn open_twice_is_refused() {
    given::<Account>([opened()])
        .when(open(0))
        .then_error(Refusal::AlreadyOpen);
}

#[test]
fn deposit() {
    let state = given::<Account>([opened(), Event::Deposited { amount: 100 }])
        .when(Command::Deposit { amount: 50 })
        .then([Event::Deposited { amount: 50 }]);
    assert_eq!(state.balance, 150);
}

#[test]
fn deposit_of_nothing_records_nothing() {
    given::<Account>([opened()])
        .when(Command::Deposit { amount: 0 })
        .then([]);
}

#[test]
fn deposit_before_opening_is_refused() {
    given::<Account>([])
        .when(Command::Deposit { amount: 1 })
        .then_error(Refusal::NotOpen);
}

#[test]
fn deposit_beyond_the_largest_balance_is_refused() {
    given::<Account>([opened(), Event::Deposited { amount: u64::MAX }])
        .when(Command::Deposit { amount: 1 })
        .then_error(Refusal::BalanceTooLarge);
}

#[test]
fn withdraw_down_to_zero() {
    let state = given::<Account>([opened(), Event::Deposited { amount: 100 }])
        .when(Command::Withdraw { amount: 100 })
        .then([Event::Withdrew { amount: 100 }]);
    assert_eq!(state.balance, 0);
}

#[test]
fn withdraw_below_zero_is_refused() {
    given::<Account>([
        opened(),
        Event::Deposited { amount: 100 },
        Event::Withdrew { amount: 30 },
    ])
    .when(Command::Withdraw { amount: 71 })
    .then_error(Refusal::InsufficientFunds {
        balance: 70,
        amount: 71,
    });
}

#[test]
fn withdraw_before_opening_is_refused() {
    given::<Account>([])
        .when(Command::Withdraw { amount: 0 })
        .then_error(Refusal::NotOpen);
}

#[test]
fn opened_v1_is_upcast_to_v2() {
    let v1 = br#"{"name":"ann"}"#;
    assert!(
        Event::decode(OPENED, 1, v1).is_err(),
        "v1 is not readable without the upcaster"
    );
    let (version, data) = upcasters().apply(OPENED, 1, v1).unwrap();
    assert_eq!(version, 2);
    assert_eq!(Event::decode(OPENED, version, &data).unwrap(), opened());
}

#[test]
fn malformed_events_do_not_decode() {
    let table: [(&str, u32, &[u8]); 5] = [
        (OPENED, 2, b"not json"),
        (OPENED, 2, br#"{"name":"ann"}"#),
        (OPENED, 3, br#"{"owner":"ann"}"#),
        ("account.closed", 1, b"{}"),
        (crate::account::DEPOSITED, 1, br#"{"amount":-1}"#),
    ];
    for (event_type, version, data) in table {
        assert!(
            Event::decode(event_type, version, data).is_err(),
            "{event_type} v{version} {:?}",
            String::from_utf8_lossy(data)
        );
    }
}
