//! The bound of the command figures: the raw event store's durable append rate with as many
//! writers as the benchmark has clients, each on a stream of its own, 1 event per append, on
//! the same disk (embedded) or the same PostgreSQL server as the service.
//!
//! A command through `accounts` is that append plus what the service adds around it: HTTP,
//! JSON, loading the account, deciding, the command-id check, the projection into the feeds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use headwater::store::EventStore;
use headwater::{EventId, EventType, ExpectedVersion, NewEvent, StreamName, Uuid};
use tokio::task::JoinSet;

use super::report::{Throughput, cpu_since, cpu_time};
use super::{Plan, progress_bar};

/// The type of the raw appends: the shape of `accounts`' own deposit events.
const EVENT_TYPE: &str = "account.deposited";

/// `plan.clients` writers append to `store` for `plan.phase`, each waiting for its append to be
/// durable before the next.
pub(crate) async fn appends<S: EventStore>(
    store: Arc<S>,
    plan: &Plan,
    label: &str,
) -> anyhow::Result<Throughput> {
    let event_type = EventType::new(EVENT_TYPE)?;
    let bar = progress_bar(label, millis(plan.phase), "ms");
    let cpu_before = cpu_time();
    let start = Instant::now();
    let deadline = start + plan.phase;
    let mut writers = JoinSet::new();
    for writer in 0..plan.clients {
        let store = Arc::clone(&store);
        let event_type = event_type.clone();
        let bar = bar.clone();
        let stream = StreamName::new(format!("raw-{}-{writer}", Uuid::new_v4().simple()))?;
        writers.spawn(async move {
            let mut done = Throughput::new();
            let mut expected = ExpectedVersion::NoStream;
            let mut balance = 0u64;
            while Instant::now() < deadline {
                balance += 1_000;
                let command_id = Uuid::new_v4();
                let data = format!(r#"{{"amount":1000,"balance":{balance}}}"#);
                let mut event =
                    NewEvent::new(EventId::new_random(), event_type.clone(), data.into_bytes());
                event.correlation_id = Some(command_id);
                event.causation_id = Some(command_id);
                let op = Instant::now();
                let outcome = store
                    .append(&stream, expected, vec![event])
                    .await
                    .with_context(|| format!("raw append to {stream}"))?;
                done.record(op.elapsed());
                expected = ExpectedVersion::Exact(outcome.stream_version);
                bar.set_position(millis(start.elapsed()));
            }
            anyhow::Ok(done)
        });
    }
    let mut total = Throughput::new();
    while let Some(joined) = writers.join_next().await {
        total.merge(&joined.context("a raw writer panicked")??);
    }
    total.finish(start.elapsed());
    total.set_cpu(cpu_since(cpu_before));
    bar.finish_and_clear();
    tracing::info!(
        figure = label,
        events_per_sec = format_args!("{:.0}", total.per_second()),
        "raw store bound"
    );
    Ok(total)
}

pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
