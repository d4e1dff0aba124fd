//! The store workloads, generic over [`EventStore`]: every backend runs the same ones.
//!
//! A run, in order ([`StoreBench`]'s methods, called by the orchestration in `bench/mod.rs`):
//! 1. `prepare`: write the one large stream; fill the store to 10 %, 50 % and 100 % of
//!    `--events`, reading the whole log and sampling memory and size on disk at each;
//! 2. `appends`: on that full store, the four timed append figures;
//! 3. `reads`: read the large stream forward, then the whole log.
//!
//! Writers behave as clients do: random v4 event ids, each writer on its own `account-{n}`
//! stream, each append expecting the version it last saw (`NoStream` first).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use headwater_core::limits::{APPEND_EVENTS_MAX, READ_PAGE_EVENTS_MAX};
use headwater_core::{
    EventId, EventType, ExpectedVersion, NewEvent, Position, StreamName, StreamVersion,
};
use headwater_store::EventStore;
use rand::Rng;
use tokio::task::JoinSet;
use uuid::Uuid;

use super::report::Rate;
use super::system::{Memory, disk_bytes, written_bytes};
use super::{EventIds, Plan, progress_bar};

/// The event type of every benchmark event.
const EVENT_TYPE: &str = "account.deposited";
/// The longest a read figure keeps re-reading the large stream.
const STREAM_READ_DURATION_MAX: Duration = Duration::from_secs(3);

/// The store at one size: how fast its whole log reads, what the process holds, what the store
/// takes on disk.
#[derive(Debug)]
pub(crate) struct Checkpoint {
    pub(crate) events: u64,
    pub(crate) read_all: Rate,
    pub(crate) memory: Memory,
    pub(crate) disk_bytes: u64,
}

/// What `prepare` measured.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// Filling the store (batches, several writers): for context only.
    pub(crate) fill: Rate,
    pub(crate) checkpoints: Vec<Checkpoint>,
}

/// The four append figures.
#[derive(Debug)]
pub(crate) struct Appends {
    pub(crate) one_writer: Rate,
    pub(crate) many_writers: Rate,
    pub(crate) batch_one_writer: Rate,
    pub(crate) batch_many_writers: Rate,
}

/// The read figures and the state at the end of the run.
#[derive(Debug)]
pub(crate) struct Reads {
    pub(crate) read_stream: Rate,
    pub(crate) read_all: Rate,
    /// The store's size at the end, in events.
    pub(crate) events_end: u64,
    /// The store's size at the end on disk, in bytes.
    pub(crate) disk_bytes_end: u64,
    /// Memory at the end of the run.
    pub(crate) memory_end: Memory,
}

/// One run of the workloads against one store.
#[derive(Debug)]
pub(crate) struct StoreBench<S> {
    store: Arc<S>,
    /// The store's files (empty for a store in memory).
    dir: PathBuf,
    plan: Plan,
    streams: Arc<Streams>,
    large_stream: Option<StreamName>,
}

impl<S: EventStore> StoreBench<S> {
    pub(crate) fn new(store: S, dir: &Path, plan: &Plan) -> StoreBench<S> {
        StoreBench {
            store: Arc::new(store),
            dir: dir.to_path_buf(),
            plan: plan.clone(),
            streams: Arc::new(Streams::default()),
            large_stream: None,
        }
    }

    pub(crate) async fn prepare(&mut self) -> anyhow::Result<Prepared> {
        let large_stream = self.streams.next()?;
        write_large_stream(
            &self.store,
            &large_stream,
            self.plan.stream_events,
            self.plan.event_ids,
        )
        .await?;
        self.large_stream = Some(large_stream);

        let mut fill_rate = Rate::new();
        let mut checkpoints = Vec::new();
        for target in self.plan.checkpoints() {
            fill(
                &self.store,
                &self.streams,
                target,
                &self.plan,
                &mut fill_rate,
            )
            .await?;
            let events = self.store.head_position().get();
            if checkpoints
                .last()
                .is_some_and(|c: &Checkpoint| c.events == events)
            {
                // The store already held this much (the large stream alone may).
                continue;
            }
            let read_all = read_whole_log(
                &self.store,
                &format!("read the whole log ({events} events)"),
            )
            .await?;
            let memory = Memory::sample();
            let disk_bytes = disk_bytes(&self.dir);
            tracing::info!(
                events,
                read_events_per_sec = format_args!("{:.0}", read_all.per_second()),
                rss_kib = memory.rss_kib,
                disk_bytes,
                "store size checkpoint"
            );
            checkpoints.push(Checkpoint {
                events,
                read_all,
                memory,
                disk_bytes,
            });
        }
        Ok(Prepared {
            fill: fill_rate,
            checkpoints,
        })
    }

    pub(crate) async fn appends(&self) -> anyhow::Result<Appends> {
        let (store, streams, plan) = (&self.store, &self.streams, &self.plan);
        let ids = plan.event_ids;
        let one_writer = append_phase(
            store,
            streams,
            ids,
            1,
            1,
            plan.phase,
            "durable append, 1 writer",
        )
        .await?;
        let many_writers = append_phase(
            store,
            streams,
            ids,
            plan.writers,
            1,
            plan.phase,
            &format!("durable append, {} writers", plan.writers),
        )
        .await?;
        let batch_one_writer = append_phase(
            store,
            streams,
            ids,
            1,
            plan.batch_events,
            plan.phase,
            &format!("batches of {}, 1 writer", plan.batch_events),
        )
        .await?;
        let batch_many_writers = append_phase(
            store,
            streams,
            ids,
            plan.batch_writers,
            plan.batch_events,
            plan.phase,
            &format!(
                "batches of {}, {} writers",
                plan.batch_events, plan.batch_writers
            ),
        )
        .await?;
        Ok(Appends {
            one_writer,
            many_writers,
            batch_one_writer,
            batch_many_writers,
        })
    }

    pub(crate) async fn reads(&self) -> anyhow::Result<Reads> {
        let large_stream = self
            .large_stream
            .as_ref()
            .context("the large stream is written by `prepare`, which did not run")?;
        let read_stream = read_large_stream(
            &self.store,
            large_stream,
            self.plan.stream_events,
            self.plan.phase.min(STREAM_READ_DURATION_MAX),
        )
        .await?;
        let events_end = self.store.head_position().get();
        let read_all = read_whole_log(
            &self.store,
            &format!("read the whole log ({events_end} events)"),
        )
        .await?;
        tracing::info!(
            events = events_end,
            events_per_sec = format_args!("{:.0}", read_all.per_second()),
            "read the whole log"
        );
        Ok(Reads {
            read_stream,
            read_all,
            events_end,
            disk_bytes_end: disk_bytes(&self.dir),
            memory_end: Memory::sample(),
        })
    }
}

/// Hands out fresh stream names `account-1`, `account-2` …
#[derive(Debug, Default)]
struct Streams {
    next: AtomicU64,
}

impl Streams {
    fn next(&self) -> anyhow::Result<StreamName> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        StreamName::new(format!("account-{n}")).context("a benchmark stream name")
    }
}

/// `count` deposits to `stream`, as a client builds them: random ids, ~150 bytes of JSON.
fn deposits(stream: &StreamName, count: u32, ids: EventIds) -> anyhow::Result<Vec<NewEvent>> {
    let event_type = EventType::new(EVENT_TYPE).context("the benchmark's event type")?;
    // The thread's fast generator rather than the OS for each id (`Uuid::new_v4` makes a
    // system call per id, which would cost more than an in-memory append).
    let mut rng = rand::rng();
    Ok((0..count)
        .map(|_| deposit(stream, &event_type, ids, &mut rng))
        .collect())
}

/// A random (v4) UUID from `rng`.
fn random_uuid(rng: &mut impl Rng) -> Uuid {
    uuid::Builder::from_random_bytes(rng.random()).into_uuid()
}

fn deposit(
    stream: &StreamName,
    event_type: &EventType,
    ids: EventIds,
    rng: &mut impl Rng,
) -> NewEvent {
    let command_id = random_uuid(rng);
    // The amount comes from the command id's random bits: varied, and no extra RNG state.
    let amount_cents = command_id.as_u128() % 1_000_000 + 1;
    let data = format!(
        r#"{{"account_id":"{}","amount_cents":{amount_cents},"currency":"EUR","command_id":"{command_id}","channel":"sepa-instant","reference":"invoice 2026-{:05}"}}"#,
        stream.id(),
        amount_cents % 100_000,
    );
    let event_id = match ids {
        EventIds::Random => EventId::from_uuid(random_uuid(rng)),
        EventIds::TimeOrdered => EventId::new_time_ordered(),
    };
    let mut event = NewEvent::new(event_id, event_type.clone(), data.into_bytes());
    event.correlation_id = Some(command_id);
    event.causation_id = Some(command_id);
    event
}

fn expected(head: Option<StreamVersion>) -> ExpectedVersion {
    match head {
        None => ExpectedVersion::NoStream,
        Some(version) => ExpectedVersion::Exact(version),
    }
}

/// `writers` tasks, each appending `events_per_append` events at a time to its own stream and
/// waiting for each append, until `duration` has passed.
async fn append_phase<S: EventStore>(
    store: &Arc<S>,
    streams: &Arc<Streams>,
    ids: EventIds,
    writers: u32,
    events_per_append: u32,
    duration: Duration,
    label: &str,
) -> anyhow::Result<Rate> {
    let bar = progress_bar(label, millis(duration), "ms");
    let written_before = written_bytes();
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for _ in 0..writers {
        let store = Arc::clone(store);
        let stream = streams.next()?;
        let bar = bar.clone();
        tasks.spawn(async move {
            let mut rate = Rate::new();
            let mut head = None;
            while Instant::now() < deadline {
                let events = deposits(&stream, events_per_append, ids)?;
                let op = Instant::now();
                let outcome = store
                    .append(&stream, expected(head), events)
                    .await
                    .with_context(|| format!("append to {stream}"))?;
                rate.record(op.elapsed(), u64::from(events_per_append));
                if outcome.replayed {
                    bail!(
                        "append to {stream} was taken for a retry (replayed): fresh ids expected"
                    );
                }
                head = Some(outcome.stream_version);
                bar.set_position(millis(start.elapsed()));
            }
            Ok(rate)
        });
    }
    let mut total = Rate::new();
    while let Some(joined) = tasks.join_next().await {
        let rate = joined.context("a writer task failed")??;
        total.merge(&rate);
    }
    total.finish(start.elapsed());
    total.add_written_bytes(written_since(written_before));
    bar.finish_and_clear();
    tracing::info!(
        figure = label,
        events_per_sec = format_args!("{:.0}", total.per_second()),
        "append figure"
    );
    Ok(total)
}

async fn write_large_stream<S: EventStore>(
    store: &Arc<S>,
    stream: &StreamName,
    count: u64,
    ids: EventIds,
) -> anyhow::Result<()> {
    let bar = progress_bar(&format!("write the large stream {stream}"), count, "events");
    let mut head = None;
    let mut written = 0u64;
    while written < count {
        let n = (count - written).min(APPEND_EVENTS_MAX as u64);
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let outcome = store
            .append(stream, expected(head), deposits(stream, n, ids)?)
            .await
            .with_context(|| format!("append to {stream}"))?;
        head = Some(outcome.stream_version);
        written += u64::from(n);
        bar.set_position(written);
    }
    bar.finish_and_clear();
    Ok(())
}

/// Appends batches to fresh streams with `plan.batch_writers` writers until the store holds
/// `target` events.
async fn fill<S: EventStore>(
    store: &Arc<S>,
    streams: &Arc<Streams>,
    target: u64,
    plan: &Plan,
    rate: &mut Rate,
) -> anyhow::Result<()> {
    let current = store.head_position().get();
    if current >= target {
        return Ok(());
    }
    let bar = progress_bar(
        &format!("fill the store to {target} events"),
        target,
        "events",
    );
    bar.set_position(current);
    let remaining = Arc::new(AtomicU64::new(target - current));
    let batch = u64::from(plan.batch_events);
    let written_before = written_bytes();
    let ids = plan.event_ids;
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..plan.batch_writers {
        let store = Arc::clone(store);
        let streams = Arc::clone(streams);
        let remaining = Arc::clone(&remaining);
        let bar = bar.clone();
        tasks.spawn(async move {
            let mut rate = Rate::new();
            loop {
                let claimed = remaining
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                        (left > 0).then(|| left - left.min(batch))
                    })
                    .map_or(0, |left| left.min(batch));
                if claimed == 0 {
                    return Ok::<Rate, anyhow::Error>(rate);
                }
                let stream = streams.next()?;
                let n = u32::try_from(claimed).unwrap_or(u32::MAX);
                let op = Instant::now();
                store
                    .append(
                        &stream,
                        ExpectedVersion::NoStream,
                        deposits(&stream, n, ids)?,
                    )
                    .await
                    .with_context(|| format!("append to {stream}"))?;
                rate.record(op.elapsed(), claimed);
                bar.inc(claimed);
            }
        });
    }
    let mut filled = Rate::new();
    while let Some(joined) = tasks.join_next().await {
        filled.merge(&joined.context("a writer task failed")??);
    }
    filled.finish(start.elapsed());
    filled.add_written_bytes(written_since(written_before));
    bar.finish_and_clear();
    rate.merge(&filled);
    rate.add_elapsed(filled.elapsed());
    rate.add_written_bytes(filled.written_bytes());
    Ok(())
}

/// One pass over the whole log, checking that positions run 1, 2, 3 … up to the head.
async fn read_whole_log<S: EventStore>(store: &Arc<S>, label: &str) -> anyhow::Result<Rate> {
    let head = store.head_position();
    let bar = progress_bar(label, head.get(), "events");
    let mut rate = Rate::new();
    let mut cursor = Position::START;
    let start = Instant::now();
    loop {
        let page = store
            .read_all(cursor, READ_PAGE_EVENTS_MAX)
            .await
            .with_context(|| format!("read the log after position {cursor}"))?;
        if page.is_empty() {
            break;
        }
        for event in &page {
            if event.position != cursor.next() {
                bail!(
                    "the log jumps from position {cursor} to {}: the store is not gap-free",
                    event.position
                );
            }
            cursor = event.position;
        }
        rate.add_events(page.len() as u64);
        bar.set_position(cursor.get());
    }
    rate.finish(start.elapsed());
    bar.finish_and_clear();
    if cursor < head {
        bail!("the whole log read ended at position {cursor}, before the head {head}");
    }
    Ok(rate)
}

/// Reads `stream` forward from its start, again and again until `duration` has passed (at least
/// once), checking that its versions run 1 ..= `count`.
async fn read_large_stream<S: EventStore>(
    store: &Arc<S>,
    stream: &StreamName,
    count: u64,
    duration: Duration,
) -> anyhow::Result<Rate> {
    let bar = progress_bar(
        &format!("read the stream {stream} ({count} events)"),
        millis(duration),
        "ms",
    );
    let mut rate = Rate::new();
    let start = Instant::now();
    loop {
        let mut cursor = StreamVersion::START;
        loop {
            let page = store
                .read_stream(stream, cursor, READ_PAGE_EVENTS_MAX)
                .await
                .with_context(|| format!("read {stream} after version {cursor}"))?;
            if page.is_empty() {
                break;
            }
            for event in &page {
                if event.stream_version != cursor.next() {
                    bail!(
                        "{stream} jumps from version {cursor} to {}",
                        event.stream_version
                    );
                }
                cursor = event.stream_version;
            }
            rate.add_events(page.len() as u64);
        }
        if cursor.get() != count {
            bail!("{stream} holds {cursor} events, {count} were written");
        }
        bar.set_position(millis(start.elapsed()));
        if start.elapsed() >= duration {
            break;
        }
    }
    rate.finish(start.elapsed());
    bar.finish_and_clear();
    tracing::info!(
        events_per_sec = format_args!("{:.0}", rate.per_second()),
        "read one stream forward"
    );
    Ok(rate)
}

/// Bytes written since `before` was sampled.
fn written_since(before: Option<u64>) -> Option<u64> {
    Some(written_bytes()?.saturating_sub(before?))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The size of one benchmark event's data, in bytes (for the report).
pub(crate) fn sample_data_bytes() -> usize {
    EventType::new(EVENT_TYPE)
        .map(|event_type| {
            let stream = StreamName::new("account-1000").ok();
            stream.map_or(0, |stream| {
                deposit(&stream, &event_type, EventIds::Random, &mut rand::rng())
                    .data
                    .len()
            })
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deposits_are_realistic_events() {
        let stream = StreamName::new("account-42").unwrap();
        let events = deposits(&stream, 3, EventIds::Random).unwrap();
        assert_eq!(events.len(), 3);
        for event in &events {
            assert_eq!(event.event_id.as_uuid().get_version_num(), 4);
            assert_eq!(event.event_type.as_str(), EVENT_TYPE);
            assert!(
                (100..=200).contains(&event.data.len()),
                "{}",
                event.data.len()
            );
            serde_json::from_slice::<serde_json::Value>(&event.data).unwrap();
            let data = std::str::from_utf8(&event.data).unwrap();
            assert!(data.starts_with(r#"{"account_id":"42","#), "{data}");
        }
        assert_ne!(events[0].event_id, events[1].event_id);
        headwater_core::validate_append(ExpectedVersion::NoStream, &events).unwrap();
    }
}
