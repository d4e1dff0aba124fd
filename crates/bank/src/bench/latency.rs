//! Append → applied in `statements`' view, and its bound, the feed API's long-poll wake-up.
//!
//! `accounts` and `statements` run in this process, `statements` following `accounts` through
//! the HTTP feed or through RabbitMQ. After opening [`PROBE_ACCOUNTS`] accounts, deposits go out
//! at a fixed rate (`--probe-rate`, each on the next account in turn, sent whatever the answers
//! of earlier ones: the rate does not drop when the system slows down, so a stall shows in the
//! figures instead of being skipped). Each deposit makes one event of `accounts.v1`.
//!
//! - **The origin** of both figures is the event's time at the producer: its CloudEvents
//!   `time`, the time its append was recorded (microseconds, the same clock as this process).
//! - **Applied**: a sampler thread reads `statements`' count of applied events every
//!   [`SAMPLE_INTERVAL`] (an atomic counter: a few nanoseconds) and notes when it moved. The
//!   consumer applies a feed's events in feed order, so the n-th event of the feed after the
//!   start is applied when the count first reaches n. The sampler's resolution (its interval
//!   plus the kernel's timer slack, about 0.1 ms) is added to each figure on average by half.
//! - **The bound**: a client of the feed API long-polls the same feed (`timeout_ms`) and notes
//!   when each page arrives: append → projected into the feed → committed → the long poll woken
//!   → the page on the wire and parsed. What the consumer adds to that is its own share.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use headwater::Uuid;
use headwater::consume::{FeedClient, IntegrationEvent, Upstream};
use headwater::feed::FeedId;
use tokio::task::JoinSet;

use super::load::answered;
use super::raw::millis;
use super::report::{Latencies, Throughput};
use super::services::{self, Transport};
use super::{Plan, progress_bar};
use crate::client::{Answer, Client};

/// Accounts the probes go to, in turn.
const PROBE_ACCOUNTS: usize = 64;
/// Cents of each probe deposit.
const PROBE_CENTS: u64 = 100;
/// How often the sampler reads the applied count.
const SAMPLE_INTERVAL: Duration = Duration::from_micros(20);
/// How long the long poll of the bound waits for an event per request.
const LONG_POLL_WAIT: Duration = Duration::from_secs(5);
/// Events per page of the bound's long poll.
const PAGE_EVENTS: u64 = 1_000;
/// How long the probes' events may take to be applied after the last is sent.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an opening may take to reach the view before the next one is tried.
const READY_WAIT: Duration = Duration::from_secs(1);
/// How long the opened accounts may take to reach the view before the probes start.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Measures append → applied through `transport`, with stores in `dir`.
pub(crate) async fn applied(
    dir: &Path,
    amqp: Option<&str>,
    plan: &Plan,
) -> anyhow::Result<Latencies> {
    let transport = match amqp {
        None => Transport::HttpFeed,
        Some(url) => Transport::Amqp(url.to_owned()),
    };
    let label = transport.label();
    let system = services::System::start(dir, None, Some(&transport)).await?;
    let result = measure(&system, plan, label).await;
    system.shutdown().await;
    result
}

async fn measure(system: &services::System, plan: &Plan, label: &str) -> anyhow::Result<Latencies> {
    let base = system.accounts_url();
    let client = Client::new(&base).context("cannot make an HTTP client")?;
    let feed: FeedId = crate::model::FEED_V1.parse().context("the v1 feed's id")?;
    let feed_client = FeedClient::new(&base, Some(services::TOKEN.to_owned()))
        .context("cannot make a feed client")?;

    // The path is open end to end before anything is timed; then the probe accounts, opened
    // and applied.
    let run = Uuid::new_v4().simple().to_string();
    ready(system, &client, &run[..8]).await?;
    let accounts: Vec<String> = (0..PROBE_ACCOUNTS)
        .map(|n| format!("probe-{}-{n}", &run[..8]))
        .collect();
    let opened_before = system.applied();
    for id in &accounts {
        open(&client, id).await?;
    }
    wait_applied(
        system,
        opened_before + PROBE_ACCOUNTS as u64,
        SETTLE_TIMEOUT,
    )
    .await
    .context("the probe accounts did not reach statements' view")?;
    let head = feed_client
        .feeds()
        .await
        .context("GET /feeds")?
        .into_iter()
        .find(|f| f.feed == feed)
        .map_or(0, |f| f.head);
    let applied_before = system.applied();

    // The sampler: when the applied count moved.
    let samples = Arc::new(Mutex::new(Vec::<(u64, SystemTime)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let samples = Arc::clone(&samples);
        let stop = Arc::clone(&stop);
        let count = system.applied_counter();
        std::thread::Builder::new()
            .name("bench-sampler".to_owned())
            .spawn(move || {
                let mut last = count();
                while !stop.load(Ordering::Relaxed) {
                    let now = count();
                    if now != last {
                        let at = SystemTime::now();
                        last = now;
                        samples
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((now, at));
                    }
                    std::thread::sleep(SAMPLE_INTERVAL);
                }
            })
            .context("cannot start the sampler thread")?
    };

    // The bound: a long poll of the feed from its head, noting when each page arrives.
    let arrivals = Arc::new(Mutex::new(Vec::<(IntegrationEvent, SystemTime)>::new()));
    let poller = {
        let arrivals = Arc::clone(&arrivals);
        let feed = feed.clone();
        let feed_client = feed_client.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut after = head;
            while !stop.load(Ordering::Relaxed) {
                let page = feed_client
                    .read_feed(&feed, after, PAGE_EVENTS, LONG_POLL_WAIT)
                    .await
                    .context("the bound's long poll")?;
                let at = SystemTime::now();
                if let Some(last) = page.last() {
                    after = last.position;
                }
                arrivals
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(page.into_iter().map(|event| (event, at)));
            }
            anyhow::Ok(())
        })
    };

    // The probes, paced.
    let sent = probes(&base, &accounts, plan, label).await;
    let outcome = match sent {
        Ok(sent) => drain(system, applied_before, sent, &arrivals)
            .await
            .map(|()| sent),
        Err(error) => Err(error),
    };
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    poller.abort();
    let (sent, rate) = outcome?;

    let arrivals = std::mem::take(&mut *arrivals.lock().unwrap_or_else(|e| e.into_inner()));
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    let (applied, bound) = latencies(&arrivals, &samples, applied_before)?;
    if applied.ops() < sent {
        bail!(
            "{label}: {} of {sent} events were matched with their application",
            applied.ops()
        );
    }
    tracing::info!(
        figure = label,
        p50_ms = applied.summary().p50_ms,
        p99_ms = applied.summary().p99_ms,
        "append → applied"
    );
    Ok(Latencies {
        applied: applied.summary(),
        bound: bound.summary(),
        commands_per_second: rate,
        load: None,
    })
}

/// Opens accounts until one reaches `statements`' view through the transport.
///
/// With a broker, `statements`' queue is bound to the feed's exchange once its consumer has
/// started, a moment after `statements::start` returns: an event published before reaches no
/// queue (the publisher then waits and retries, up to its backoff of seconds) or only the queue
/// of an earlier run, and only a reconstitution would find it. Once an opening arrives, the
/// queue is bound and the publisher is past any backoff.
async fn ready(system: &services::System, client: &Client, run: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    for n in 0.. {
        let before = system.applied();
        open(client, &format!("ready-{run}-{n}")).await?;
        if wait_applied(system, before + 1, READY_WAIT).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            break;
        }
    }
    bail!("no event reached statements' view within {SETTLE_TIMEOUT:?}")
}

async fn open(client: &Client, id: &str) -> anyhow::Result<()> {
    match client
        .open(id, "Probe", Uuid::new_v4())
        .await
        .with_context(|| format!("open {id}"))?
    {
        Answer::Done(_) => Ok(()),
        Answer::Refused(problem) => bail!("open {id} refused: {problem:?}"),
    }
}

/// Waits until `statements` applied `count` events since it started.
async fn wait_applied(
    system: &services::System,
    count: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let applied = system.applied();
        if applied >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("after {timeout:?}, {applied} events applied of {count}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `plan.probe_rate` deposits per second for `plan.probe`; returns how many, and the
/// rate achieved.
async fn probes(
    base: &str,
    accounts: &[String],
    plan: &Plan,
    label: &str,
) -> anyhow::Result<(u64, f64)> {
    // One connection per account: a slow answer does not hold up the next deposit.
    let clients = accounts
        .iter()
        .map(|_| Client::new(base).map(Arc::new))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bar = progress_bar(
        &format!("append → applied, {label}"),
        millis(plan.probe),
        "ms",
    );
    let period = Duration::from_secs_f64(1.0 / f64::from(plan.probe_rate));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut tasks = JoinSet::new();
    while start.elapsed() < plan.probe {
        ticks.tick().await;
        let n = usize::try_from(sent).unwrap_or(0) % accounts.len();
        let client = Arc::clone(&clients[n]);
        let id = accounts[n].clone();
        tasks.spawn(async move {
            let command_id = Uuid::new_v4();
            let what = format!("a deposit on {id}");
            match answered(&what, || client.deposit(&id, PROBE_CENTS, command_id)).await? {
                Answer::Done(_) => Ok(()),
                Answer::Refused(problem) => bail!("{what} refused: {problem:?}"),
            }
        });
        sent += 1;
        bar.set_position(millis(start.elapsed()));
        // Reap the finished ones as we go (their errors end the figure).
        while let Some(done) = tasks.try_join_next() {
            done.context("a probe panicked")??;
        }
    }
    let elapsed = start.elapsed();
    while let Some(done) = tasks.join_next().await {
        done.context("a probe panicked")??;
    }
    bar.finish_and_clear();
    Ok((sent, sent as f64 / elapsed.as_secs_f64()))
}

/// Waits until `sent` more events are applied and the bound's poller has seen them all.
async fn drain(
    system: &services::System,
    applied_before: u64,
    (sent, _): (u64, f64),
    arrivals: &Mutex<Vec<(IntegrationEvent, SystemTime)>>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let applied = system.applied().saturating_sub(applied_before);
        let arrived = arrivals.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
        if applied >= sent && arrived >= sent {
            // One more sampler round, so that its last sample is taken.
            tokio::time::sleep(Duration::from_millis(2)).await;
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "after {DRAIN_TIMEOUT:?}, {applied} of {sent} events applied, {arrived} long-polled"
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Matches each event (in feed order) with the sample at which the applied count first reached
/// it; both figures from the event's time.
fn latencies(
    arrivals: &[(IntegrationEvent, SystemTime)],
    samples: &[(u64, SystemTime)],
    applied_before: u64,
) -> anyhow::Result<(Throughput, Throughput)> {
    let mut applied = Throughput::new();
    let mut bound = Throughput::new();
    let mut samples: VecDeque<&(u64, SystemTime)> = samples.iter().collect();
    for (n, (event, arrived)) in arrivals.iter().enumerate() {
        let time = humantime::parse_rfc3339(&event.time)
            .with_context(|| format!("the time {:?} of event {}", event.time, event.id))?;
        bound.record(arrived.duration_since(time).unwrap_or_default());
        let needed = applied_before + n as u64 + 1;
        while samples.front().is_some_and(|(count, _)| *count < needed) {
            samples.pop_front();
        }
        if let Some((_, at)) = samples.front() {
            applied.record(at.duration_since(time).unwrap_or_default());
        }
    }
    Ok((applied, bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(position: u64, time: &str) -> IntegrationEvent {
        let json = format!(
            r#"{{"specversion":"1.0","id":"{}","source":"accounts","type":"accounts.deposited",
                "subject":"a","time":"{time}","datacontenttype":"application/json",
                "data":{{"amount":1}},"sequence":{position},"position":{position},
                "feed":"accounts.v1"}}"#,
            Uuid::new_v4()
        );
        IntegrationEvent::from_cloud_event(json.as_bytes()).unwrap()
    }

    fn at(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).unwrap()
    }

    #[test]
    fn each_event_is_matched_with_the_sample_that_reached_it() {
        let arrivals = [
            (
                event(11, "2026-11-27T22:00:00.000000Z"),
                at("2026-11-27T22:00:00.001Z"),
            ),
            (
                event(12, "2026-11-27T22:00:00.010000Z"),
                at("2026-11-27T22:00:00.012Z"),
            ),
            (
                event(13, "2026-11-27T22:00:00.011000Z"),
                at("2026-11-27T22:00:00.012Z"),
            ),
        ];
        // 10 applied before; the count reaches 11 at +3 ms, then 13 (two at once) at +15 ms.
        let samples = [
            (11, at("2026-11-27T22:00:00.003Z")),
            (13, at("2026-11-27T22:00:00.015Z")),
        ];
        let (applied, bound) = latencies(&arrivals, &samples, 10).unwrap();
        assert_eq!((applied.ops(), bound.ops()), (3, 3));
        let applied = applied.summary();
        assert!((applied.p50_ms.unwrap() - 4.0).abs() < 0.01, "{applied:?}");
        assert!((applied.max_ms.unwrap() - 5.0).abs() < 0.01, "{applied:?}");
        let bound = bound.summary();
        assert!((bound.max_ms.unwrap() - 2.0).abs() < 0.01, "{bound:?}");
    }

    #[test]
    fn an_event_never_applied_is_not_counted() {
        let arrivals = [(
            event(1, "2026-11-27T22:00:00Z"),
            at("2026-11-27T22:00:00.001Z"),
        )];
        let (applied, bound) = latencies(&arrivals, &[], 0).unwrap();
        assert_eq!((applied.ops(), bound.ops()), (0, 1));
    }
}
