//! The final checks of the bank test, once the clients, the killer and the lossy path stopped:
//!
//! 1. the producer: every account's balance (GET /accounts/{id}) is the sum of its acknowledged
//!    deposits minus its acknowledged withdrawals (each counted once, refusals not at all); its
//!    version counts the opening, every acknowledged command and every refused withdrawal once;
//!    the answers chain up (each acknowledged command's balance is the previous one's plus or
//!    minus its amount);
//! 2. the feed: each subject's events (`/feeds/accounts/v1/subjects/{id}`) have the sequences
//!    1 ..= n, open the account first, and add up to the producer's balance; in feed v2 (one
//!    event per command recorded, refusals included) the sequences are 1 ..= the account's
//!    version and every event states the balance after it, chaining up to the producer's;
//! 3. the consumer, after one reconstitution: its balance and sequence of every account are the
//!    producer's; every balance it answered during the run was the feed's sum at that sequence.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use axum::http::Method;

use super::clients::{Ledger, Op, Watched};
use super::http::Http;

/// A read of the final checks may take this long, in seconds.
const READ_SECS_MAX: u64 = 10;
/// The producer's feed must have projected every command this long after the last one, in
/// seconds.
const FEED_CATCH_UP_SECS_MAX: u64 = 30;
/// A reconstitution must end within this long, in seconds.
const WALK_SECS_MAX: u64 = 60;
/// How often a wait checks again, in milliseconds.
const POLL_MILLIS: u64 = 50;
/// Events per read of a subject's feed.
const SUBJECT_PAGE_EVENTS: u64 = 500;

/// Where the services are, for the checks.
#[derive(Debug)]
pub(crate) struct Targets<'a> {
    pub(crate) http: &'a Http,
    /// The `accounts` replicas' URLs.
    pub(crate) producers: &'a [String],
    pub(crate) statements: &'a str,
    pub(crate) token: &'a str,
    pub(crate) accounts: &'a [String],
}

/// One event of a subject's feed, as the checks need it.
#[derive(Clone, Debug)]
struct FeedEvent {
    sequence: u64,
    kind: String,
    /// Signed change of the balance.
    change: i128,
}

/// The checks' findings: empty when the run was right.
#[derive(Debug, Default)]
pub(crate) struct Findings {
    pub(crate) violations: Vec<String>,
    /// The consumer's balance differs from the producer's (a subset of the violations, for the
    /// test that shows the checks catch a consumer that does not reconstitute).
    pub(crate) consumer_mismatches: usize,
    /// The producer's balance differs from the ledger's sum.
    pub(crate) ledger_mismatches: usize,
    pub(crate) feed_events: u64,
    pub(crate) v2_events: u64,
    pub(crate) walks: Vec<serde_json::Value>,
}

impl Findings {
    fn violation(&mut self, message: String) {
        self.violations.push(message);
    }
}

async fn get_json(http: &Http, url: &str, token: &str) -> Result<serde_json::Value, String> {
    let reply = http
        .get(url, Some(token), Duration::from_secs(READ_SECS_MAX))
        .await?;
    if reply.status != 200 {
        return Err(format!(
            "GET {url}: {} {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        ));
    }
    reply.json().map_err(|e| format!("GET {url}: {e}"))
}

/// A subject's whole feed (`v1` or `v2`), page by page, as the feed API serves it.
async fn read_subject_raw(
    targets: &Targets<'_>,
    producer: &str,
    version: u32,
    account: &str,
) -> Result<Vec<serde_json::Value>, String> {
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let url = format!(
            "{producer}/feeds/accounts/v{version}/subjects/{account}?after={after}&limit={SUBJECT_PAGE_EVENTS}"
        );
        let page = get_json(targets.http, &url, targets.token).await?;
        let serde_json::Value::Array(page) = page else {
            return Err(format!("GET {url}: not an array: {page}"));
        };
        let Some(last) = page.last() else {
            return Ok(events);
        };
        after = last["sequence"]
            .as_u64()
            .ok_or_else(|| format!("GET {url}: an event without a sequence: {last}"))?;
        for event in &page {
            if event["subject"].as_str() != Some(account) {
                return Err(format!("GET {url}: an event of another subject: {event}"));
            }
        }
        events.extend(page);
    }
}

/// A subject's whole feed v1.
async fn read_subject(
    targets: &Targets<'_>,
    producer: &str,
    account: &str,
) -> Result<Vec<FeedEvent>, String> {
    let events = read_subject_raw(targets, producer, 1, account).await?;
    Ok(events
        .iter()
        .map(|event| {
            let kind = event["type"].as_str().unwrap_or("").to_owned();
            let amount = i128::from(event["data"]["amount"].as_u64().unwrap_or(0));
            let change = match kind.as_str() {
                "accounts.deposited" => amount,
                "accounts.withdrew" => -amount,
                _ => 0,
            };
            FeedEvent {
                sequence: event["sequence"].as_u64().unwrap_or(0),
                kind,
                change,
            }
        })
        .collect())
}

/// Feed v2 of `account` (one event per private event: the opening, every acknowledged move,
/// every refused withdrawal): sequences 1 ..= the producer's version, each stating the balance
/// after it, and the balances chain up to the producer's. Its findings.
fn check_v2(
    account: &str,
    events: &[serde_json::Value],
    balance: u64,
    version: u64,
    refused: u64,
) -> Vec<String> {
    let mut found = Vec::new();
    let sequences: Vec<u64> = events
        .iter()
        .map(|e| e["sequence"].as_u64().unwrap_or(0))
        .collect();
    if sequences != (1..=version).collect::<Vec<_>>() {
        found.push(format!(
            "{account}: its feed v2's sequences are not 1 ..= {version} (its version): \
             {sequences:?}"
        ));
    }
    let mut running: u64 = 0;
    let mut refusals = 0;
    for (index, event) in events.iter().enumerate() {
        let kind = event["type"].as_str().unwrap_or("");
        let data = &event["data"];
        let stated = data["balance"].as_u64();
        let cents = data["amount"]["cents"].as_u64().unwrap_or(0);
        let currency_ok = if index == 0 {
            data["currency"] == "EUR"
        } else {
            data["amount"]["currency"] == "EUR"
        };
        let want = match (index, kind) {
            (0, "accounts.account_opened") => Some(0),
            (1.., "accounts.credited") if cents > 0 => running.checked_add(cents),
            (1.., "accounts.debited") if cents > 0 => running.checked_sub(cents),
            (1.., "accounts.withdrawal_refused") if cents > running => {
                refusals += 1;
                Some(running)
            }
            _ => None,
        };
        if want.is_none() || stated != want || !currency_ok {
            found.push(format!(
                "{account}: feed v2 event {} ({kind}) states {event}, after balance {running}",
                index + 1
            ));
            return found;
        }
        running = want.unwrap_or(running);
    }
    if running != balance {
        found.push(format!(
            "{account}: its feed v2 ends at balance {running}, the producer's is {balance}"
        ));
    }
    if refusals != refused {
        found.push(format!(
            "{account}: its feed v2 has {refusals} refused withdrawals, the clients were refused \
             {refused}"
        ));
    }
    found
}

/// Producer balance and version of `account` from the replica `producer`.
async fn producer_balance(
    targets: &Targets<'_>,
    producer: &str,
    account: &str,
) -> Result<(u64, u64), String> {
    let url = format!("{producer}/accounts/{account}");
    let json = get_json(targets.http, &url, targets.token).await?;
    match (json["balance"].as_u64(), json["version"].as_u64()) {
        (Some(balance), Some(version)) => Ok((balance, version)),
        _ => Err(format!(
            "GET {url}: not a balance ≥ 0 and a version: {json}"
        )),
    }
}

/// Asks `statements` for a reconstitution and waits until a walk over every subject that
/// started after the request ended.
pub(crate) async fn reconstitute(targets: &Targets<'_>, findings: &mut Findings) {
    let url = format!("{}/reconstitute", targets.statements);
    // An interrupted walk's successor resumes where it stopped: walk until one went through every
    // subject from the start (at most twice more).
    for _ in 0..3 {
        let reply = targets
            .http
            .send(
                Method::POST,
                &url,
                Some(targets.token),
                None,
                Duration::from_secs(READ_SECS_MAX),
            )
            .await;
        let walk = match reply.as_ref().map(|r| (r.status, r.json())) {
            Ok((202, Ok(json))) if json["walk"].as_u64().is_some() => json["walk"].as_u64(),
            other => {
                findings.violation(format!("POST {url}: {other:?}"));
                return;
            }
        };
        let deadline = Instant::now() + Duration::from_secs(WALK_SECS_MAX);
        let last = loop {
            if let Ok(status) = get_json(targets.http, &url, targets.token).await {
                let last = &status["last"];
                if last["id"].as_u64() >= walk && last["state"].as_str() != Some("running") {
                    break last.clone();
                }
            }
            if Instant::now() > deadline {
                findings.violation(format!(
                    "walk {walk:?} did not end within {WALK_SECS_MAX} s"
                ));
                return;
            }
            tokio::time::sleep(Duration::from_millis(POLL_MILLIS)).await;
        };
        findings.walks.push(last.clone());
        if last["state"].as_str() == Some("finished") && last["resumed_after"].is_null() {
            return;
        }
    }
    findings.violation(format!(
        "no reconstitution went through every subject: {:?}",
        findings.walks
    ));
}

/// Checks 1 and 2 (the producer and its feed), then 3 (the consumer) unless
/// `consumer: false`; reconstitutes first when `reconstitute`.
pub(crate) async fn check(
    targets: &Targets<'_>,
    ledger: &Ledger,
    watched: &Watched,
    count_retried_twice: bool,
    reconstitute_first: bool,
) -> Findings {
    let mut findings = Findings::default();
    let mut producer: BTreeMap<&str, u64> = BTreeMap::new();
    let mut versions: BTreeMap<&str, u64> = BTreeMap::new();
    // 1. The producer, on every replica.
    for account in targets.accounts {
        let acked = ledger.acked.get(account).cloned().unwrap_or_default();
        let refused = ledger.refused.get(account).copied().unwrap_or(0);
        let expected = ledger.expected_balance(account, count_retried_twice);
        let mut answers = BTreeSet::new();
        for replica in targets.producers {
            match producer_balance(targets, replica, account).await {
                Ok(answer) => {
                    answers.insert(answer);
                }
                Err(error) => findings.violation(error),
            }
        }
        if answers.len() > 1 {
            findings.violation(format!(
                "the replicas disagree about {account}: {answers:?}"
            ));
        }
        let Some(&(balance, version)) = answers.iter().next() else {
            continue;
        };
        producer.insert(account, balance);
        versions.insert(account, version);
        if i128::from(balance) != expected {
            findings.ledger_mismatches += 1;
            findings.violation(format!(
                "{account}: the producer's balance is {balance}, the acknowledged commands add \
                 up to {expected}"
            ));
        }
        let commands = 1 + acked.len() as u64 + refused;
        if version != commands {
            findings.violation(format!(
                "{account}: version {version}, but the opening, {} acknowledged commands and \
                 {refused} refused withdrawals make {commands}",
                acked.len()
            ));
        }
        // The answers chain up: ordered by version, each balance is the previous one's ± amount.
        let mut chain = acked.clone();
        chain.sort_by_key(|a| a.version);
        let mut previous = (0_u64, 1_u64);
        for a in &chain {
            let want = match a.op {
                Op::Deposit => previous.0.checked_add(a.amount),
                Op::Withdraw => previous.0.checked_sub(a.amount),
                Op::Open => None,
            };
            if a.version <= previous.1 || Some(a.balance) != want {
                findings.violation(format!(
                    "{account}: {:?} of {} ({}) answered balance {} at version {}, after \
                     balance {} at version {}",
                    a.op, a.amount, a.command_id, a.balance, a.version, previous.0, previous.1
                ));
            }
            previous = (a.balance, a.version);
        }
        if previous.0 != balance && answers.len() == 1 {
            findings.violation(format!(
                "{account}: the last acknowledged command answered balance {}, the producer \
                 says {balance}",
                previous.0
            ));
        }
    }

    // 2. The feed: caught up with the commands (its projection runs behind them), contiguous,
    // adding up to the producer's balance.
    let producer_url = &targets.producers[0];
    let mut feeds: BTreeMap<&str, Vec<FeedEvent>> = BTreeMap::new();
    // One deadline for all: a producer that never gets there makes the check wait once.
    let deadline = Instant::now() + Duration::from_secs(FEED_CATCH_UP_SECS_MAX);
    for account in targets.accounts {
        let Some(&balance) = producer.get(account.as_str()) else {
            continue;
        };
        let moves = ledger.acked.get(account).map_or(0, Vec::len);
        let events = loop {
            match read_subject(targets, producer_url, account).await {
                Ok(events) if events.len() == 1 + moves => break Some(events),
                Ok(events) if Instant::now() > deadline => {
                    findings.violation(format!(
                        "{account}: its feed holds {} events {FEED_CATCH_UP_SECS_MAX} s after \
                         the last command, not the opening and {moves} moves",
                        events.len()
                    ));
                    break Some(events);
                }
                Err(error) if Instant::now() > deadline => {
                    findings.violation(error);
                    break None;
                }
                _ => tokio::time::sleep(Duration::from_millis(POLL_MILLIS)).await,
            }
        };
        let Some(events) = events else { continue };
        findings.feed_events += events.len() as u64;
        let sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
        if sequences != (1..=events.len() as u64).collect::<Vec<_>>() {
            findings.violation(format!(
                "{account}: its feed's sequences are not 1 ..= {}: {sequences:?}",
                events.len()
            ));
        }
        if events.first().map(|e| e.kind.as_str()) != Some("accounts.opened") {
            findings.violation(format!(
                "{account}: its feed does not start with accounts.opened: {:?}",
                events.first()
            ));
        }
        let unknown: Vec<_> = events
            .iter()
            .skip(1)
            .filter(|e| e.change == 0)
            .map(|e| (e.sequence, e.kind.clone()))
            .collect();
        if !unknown.is_empty() {
            findings.violation(format!(
                "{account}: feed events that are not moves of money: {unknown:?}"
            ));
        }
        let sum: i128 = events.iter().map(|e| e.change).sum();
        if sum != i128::from(balance) {
            findings.violation(format!(
                "{account}: its feed adds up to {sum}, the producer's balance is {balance}"
            ));
        }
        feeds.insert(account, events);
        // Feed v2, projected beside v1 from the same log.
        let version = versions.get(account.as_str()).copied().unwrap_or(0);
        let refused = ledger.refused.get(account).copied().unwrap_or(0);
        let v2 = loop {
            match read_subject_raw(targets, producer_url, 2, account).await {
                Ok(events) if events.len() as u64 == version || Instant::now() > deadline => {
                    break Ok(events);
                }
                Err(error) if Instant::now() > deadline => break Err(error),
                _ => tokio::time::sleep(Duration::from_millis(POLL_MILLIS)).await,
            }
        };
        match v2 {
            Ok(events) => {
                findings.v2_events += events.len() as u64;
                findings
                    .violations
                    .extend(check_v2(account, &events, balance, version, refused));
            }
            Err(error) => findings.violation(error),
        }
    }

    // 3. The consumer.
    if reconstitute_first {
        reconstitute(targets, &mut findings).await;
    }
    for account in targets.accounts {
        let (Some(&balance), Some(events)) =
            (producer.get(account.as_str()), feeds.get(account.as_str()))
        else {
            continue;
        };
        let url = format!("{}/balances/{account}", targets.statements);
        match get_json(targets.http, &url, targets.token).await {
            Ok(json) => {
                let answer = (json["balance"].as_u64(), json["sequence"].as_u64());
                if answer != (Some(balance), Some(events.len() as u64)) {
                    findings.consumer_mismatches += 1;
                    findings.violation(format!(
                        "{account}: statements answers {json}, the producer balance {balance} \
                         at sequence {}",
                        events.len()
                    ));
                }
            }
            Err(error) => {
                findings.consumer_mismatches += 1;
                findings.violation(error);
            }
        }
        // Every balance statements answered during the run: the feed's sum at that sequence.
        for seen in watched.statements.get(account).into_iter().flatten() {
            let prefix: i128 = events
                .iter()
                .take_while(|e| e.sequence <= seen.sequence)
                .map(|e| e.change)
                .sum();
            if seen.sequence > events.len() as u64 || prefix != i128::from(seen.balance) {
                findings.violation(format!(
                    "{account}: statements answered balance {} at sequence {} during the run; \
                     the feed's sum there is {prefix}",
                    seen.balance, seen.sequence
                ));
            }
        }
    }
    findings
}
