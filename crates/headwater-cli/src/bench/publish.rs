//! The publish suite of `headwater bench`: issue 5's figures, per broker, in one run.
//!
//! For each broker given (`--amqp`, `--nats`):
//!
//! 1. Raw rate: the broker's own publish-with-confirm rate through the client library the
//!    publisher uses (lapin with publisher confirms, persistent and mandatory, to a durable topic
//!    exchange with a durable queue bound; async-nats JetStream publishes with acks and
//!    `Nats-Msg-Id`, to a file-backed stream), pipelined as the publisher pipelines (its batch
//!    size, its in-flight window). The message is the CloudEvent the publisher would send.
//! 2. Through `Broker::publish`: the feed's events, read beforehand, through the publisher's
//!    broker layer with the same batches and window: our encoding and broker code alone.
//! 3. Through the publisher: a feed of the embedded feed store, projected beforehand (not
//!    timed), then `Publishers` started on it; events per second until the publisher's cursor
//!    reaches the feed's head. Compared with the raw rate of the same run as a ratio.
//! 4. Append → broker latency: one internal event per append, at a steady rate, to a fresh
//!    embedded event store, with a projector and the publisher running and a consumer on the
//!    broker (RabbitMQ: `basic.consume` on a durable queue, no ack; NATS: a pull consumer
//!    without acks); the time from the start of the append to the consumer's arrival.
//!
//! Every queue and stream the suite declares is removed at the end of its figure, after checking
//! that it held every message confirmed to it.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use headwater_core::limits::FEED_PAGE_EVENTS_MAX;
use headwater_core::{
    EventId, EventType, ExpectedVersion, FeedId, FeedPosition, NewEvent, Position, Sequence,
    StreamName, Subject, Timestamp,
};
use headwater_feed::Projectors;
use headwater_publish::{PublisherOptions, Publishers};
use headwater_store::{EventStore, FeedEvent, FeedStore};
use serde::{Deserialize, Serialize};

use super::Plan;
use super::feeds::BenchProjection;
use super::publish_broker::{Raw, Target};
use crate::text::group;

/// The CloudEvents `source` of the benchmark's feeds.
const SOURCE: &str = "headwater-bench";
/// Subjects the pre-filled feed spreads its events over: the feeds suite's streams.
const FILL_SUBJECTS: u64 = 10_000;
/// Streams the latency appends rotate over (each a subject of the feed).
const LATENCY_STREAMS: u64 = 100;
/// Appends of the latency figure that may wait for the store at once (the appends are paced,
/// not closed-loop: a slow append does not delay the next one).
const LATENCY_APPENDS_IN_FLIGHT_MAX: usize = 256;
/// How long the publisher may take to reach the head of the pre-filled feed, and the latency
/// consumer to see the last event after the last append, before the benchmark gives up.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the publisher's cursor may stay still before the benchmark gives up on it.
const PUBLISH_STALL_TIMEOUT: Duration = Duration::from_secs(60);
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(60);
/// The slowest append → arrival the latency histogram tells apart, in microseconds (fixed
/// bounds: a slower one counts as this, and is seen as such in the maximum).
const LATENCY_MICROS_MAX: u64 = 60_000_000;
/// The fsync context of the suite: each of the two loops runs this long at most.
const FSYNC_PHASE_MAX: Duration = Duration::from_secs(2);
/// The integration event's data, as in the feeds suite.
const FILL_DATA: &[u8] = br#"{"amount_cents":12345,"currency":"EUR","reference":"bench"}"#;

/// The publish suite's sizes.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct PublishPlan {
    /// Events of the pre-filled feed, and messages of the raw figure.
    pub(crate) events: u64,
    pub(crate) subjects: u64,
    /// The publisher's window of events sent and not yet confirmed (its default); the raw and
    /// the broker-layer figures use the same.
    pub(crate) window: usize,
    /// Events per `Broker::publish` of the publisher (its default).
    pub(crate) batch: usize,
    pub(crate) latency_events: u64,
    /// Appends per second of the latency figure.
    pub(crate) latency_rate: u32,
}

impl PublishPlan {
    pub(crate) fn from_plan(plan: &Plan) -> PublishPlan {
        let publisher = PublisherOptions::default();
        PublishPlan {
            events: plan
                .publish_events
                .unwrap_or(if plan.quick { 5_000 } else { 200_000 }),
            subjects: FILL_SUBJECTS,
            window: publisher.in_flight_events_max,
            batch: publisher.batch_events_max,
            latency_events: if plan.quick { 100 } else { 3_000 },
            latency_rate: if plan.quick { 200 } else { 500 },
        }
    }
}

/// Everything one run of the publish suite measured.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct PublishFigures {
    /// write + fdatasync of one record on a growing file, on the disk of the stores.
    pub(crate) fsync_per_sec: f64,
    pub(crate) brokers: Vec<BrokerFigures>,
}

/// One broker's figures in one run.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct BrokerFigures {
    pub(crate) broker: &'static str,
    pub(crate) label: &'static str,
    pub(crate) server: String,
    pub(crate) raw_per_sec: f64,
    /// Through `Broker::publish` alone (events read beforehand).
    pub(crate) broker_layer_per_sec: f64,
    /// That over raw, in this run.
    pub(crate) broker_layer_ratio: f64,
    /// Projecting the log into the pre-filled feed (not part of the publish figure).
    pub(crate) fill_per_sec: f64,
    pub(crate) publisher_per_sec: f64,
    /// Through the publisher over raw, in this run.
    pub(crate) ratio: f64,
    pub(crate) latency: Latency,
}

/// Append → consumer arrival.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Latency {
    pub(crate) events: u64,
    /// The appends' achieved rate, per second.
    pub(crate) append_rate: f64,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) max_us: u64,
}

/// The fsync context of one run, on the disk of the stores.
pub(crate) fn fsync_bound(dir: &Path, plan: &Plan) -> anyhow::Result<f64> {
    let mut short = plan.clone();
    short.phase = short.phase.min(FSYNC_PHASE_MAX);
    std::fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let figures = super::fsync::measure(dir, &short).context("the fsync bound")?;
    std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    Ok(figures.growing.per_second())
}

/// A fresh event store and its feed store.
pub(crate) struct Stores<E, F> {
    pub(crate) events: Arc<E>,
    pub(crate) feeds: Arc<F>,
}

/// One broker's figures: raw, through the publisher (on `filled`), latency (on `live`, which
/// must be empty: its projector starts from the beginning of the log).
pub(crate) async fn measure<E: EventStore + 'static, F: FeedStore>(
    target: &Target,
    filled: Stores<E, F>,
    live: Stores<E, F>,
    plan: &Plan,
) -> anyhow::Result<BrokerFigures> {
    let p = PublishPlan::from_plan(plan);
    let server = target.server().await;
    let body = sample_body()?;
    let raw = target
        .raw(p.events, (p.window, p.batch), &body, p.subjects)
        .await?;
    let through = through_publisher(target, &filled.events, &filled.feeds, &p).await?;
    drop(filled);
    let latency = latency(target, live.events, live.feeds, &p).await?;
    let (fill_rate, broker_layer, published) = through;
    let publisher_per_sec = published.per_second();
    Ok(BrokerFigures {
        broker: target.key(),
        label: target.label(),
        server,
        raw_per_sec: raw.per_second(),
        fill_per_sec: fill_rate,
        broker_layer_per_sec: broker_layer.per_second(),
        broker_layer_ratio: broker_layer.per_second() / raw.per_second().max(f64::MIN_POSITIVE),
        publisher_per_sec,
        ratio: publisher_per_sec / raw.per_second().max(f64::MIN_POSITIVE),
        latency,
    })
}

/// The CloudEvent the publisher sends for a pre-filled event: the raw figure's message.
fn sample_body() -> anyhow::Result<Vec<u8>> {
    let feed = FeedId::parse("bench_publish.v1").context("a constant feed id")?;
    let event = FeedEvent {
        position: FeedPosition(123_456),
        sequence: Sequence(12),
        id: EventId::new_random(),
        event_type: EventType::new("bench.changed")?,
        subject: Subject::new("account-1234")?,
        time: now(),
        data: FILL_DATA.to_vec(),
        source_position: Position(123_456),
    };
    headwater_api::cloud_event_json(&feed, SOURCE, &event).context("the sample CloudEvent")
}

fn now() -> Timestamp {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    Timestamp::from_unix_micros(micros)
}

/// A feed nobody else uses on a shared broker: `{prefix}_{random}.v1`.
fn unique_feed(prefix: &str) -> anyhow::Result<FeedId> {
    FeedId::parse(&format!("{prefix}_{:08x}.v1", rand::random::<u32>()))
        .context("the benchmark's feed name")
}

/// Fills the log with `total` internal events over the feeds suite's 10,000 streams, then
/// projects them into `feed` (one integration event each, subject = the stream) and stops the
/// projector once the feed is live: the feed a projector makes, ready to publish. Returns the
/// projection's rate, in events per second.
async fn fill<E: EventStore + 'static, F: FeedStore>(
    events: &Arc<E>,
    feeds: &Arc<F>,
    feed: &FeedId,
    total: u64,
) -> anyhow::Result<f64> {
    super::feeds::fill(events.as_ref(), total, "publish: fill the log").await?;
    let started = Instant::now();
    let projectors = Projectors::builder()
        .projection(BenchProjection::new(feed.clone()))
        .start(Arc::clone(events), Arc::clone(feeds))
        .await
        .with_context(|| format!("cannot start the projector of {feed}"))?;
    let projected = super::feeds::wait_live(
        feeds.as_ref(),
        &projectors,
        feed,
        "publish: project the feed",
        total,
    )
    .await;
    projectors.shutdown().await;
    projected?;
    Ok(total as f64 / started.elapsed().as_secs_f64().max(f64::MIN_POSITIVE))
}

/// The broker layer and the publisher through a pre-filled feed: `(fill rate, through
/// `Broker::publish`, through the publisher)`.
async fn through_publisher<E: EventStore + 'static, F: FeedStore>(
    target: &Target,
    events: &Arc<E>,
    feeds: &Arc<F>,
    p: &PublishPlan,
) -> anyhow::Result<(f64, Raw, Raw)> {
    let feed = unique_feed("bench_publish")?;
    let fill_rate = fill(events, feeds, &feed, p.events).await?;
    tracing::info!(
        events_per_sec = format_args!("{}", group(fill_rate)),
        "feed projected"
    );
    let broker_layer = through_broker(target, feeds.as_ref(), &feed, p).await?;
    let published = through_the_publisher(target, feeds, &feed, p).await?;
    Ok((fill_rate, broker_layer, published))
}

/// `Publishers` started on the pre-filled feed (cursor at the start): the time until its cursor
/// reaches the feed's head. Checks that the broker holds every event, and removes the queue or
/// stream.
async fn through_the_publisher<F: FeedStore>(
    target: &Target,
    feeds: &Arc<F>,
    feed: &FeedId,
    p: &PublishPlan,
) -> anyhow::Result<Raw> {
    target.prepare(feed).await?;
    let broker = target.broker().await?;
    let bar = super::progress_bar(
        &format!("publish: {} through the publisher", target.key()),
        p.events,
        "events",
    );
    let started = Instant::now();
    let publishers = Publishers::builder(broker, SOURCE)
        .feed(feed.clone())
        .options(PublisherOptions::default())
        .start(Arc::clone(feeds))
        .context("cannot start the publisher")?;
    let reached = wait_published(&publishers, feed, FeedPosition(p.events), &bar).await;
    let elapsed = started.elapsed();
    publishers.shutdown().await;
    bar.finish_and_clear();
    reached?;
    let held = target.remove(feed).await?;
    if held < p.events {
        bail!(
            "the publisher's cursor reached {}, {}'s queue or stream held {held} events",
            p.events,
            target.label()
        );
    }
    let raw = Raw {
        messages: p.events,
        elapsed,
    };
    tracing::info!(
        broker = target.key(),
        events_per_sec = format_args!("{}", group(raw.per_second())),
        "through the publisher"
    );
    Ok(raw)
}

/// Polls the publisher of `feed` until its cursor reaches `head`; fails when it made no
/// progress for [`PUBLISH_STALL_TIMEOUT`] (with its last error) or after [`PUBLISH_TIMEOUT`].
async fn wait_published(
    publishers: &Publishers,
    feed: &FeedId,
    head: FeedPosition,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last = (FeedPosition::START, Instant::now());
    loop {
        let status = publishers.statuses().into_iter().find(|s| &s.feed == feed);
        let cursor = status.as_ref().map_or(FeedPosition::START, |s| s.cursor);
        bar.set_position(cursor.get());
        if cursor >= head {
            return Ok(());
        }
        if cursor > last.0 {
            last = (cursor, Instant::now());
        }
        let error = || {
            status
                .as_ref()
                .and_then(|s| s.last_error.clone())
                .unwrap_or_else(|| "no error recorded".to_owned())
        };
        if last.1.elapsed() > PUBLISH_STALL_TIMEOUT {
            bail!(
                "the publisher of {feed} stayed at {cursor} for {PUBLISH_STALL_TIMEOUT:?}: {}",
                error()
            );
        }
        if started.elapsed() > PUBLISH_TIMEOUT {
            bail!("the publisher of {feed} did not reach {head} within {PUBLISH_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The feed's events, read from the store beforehand (not timed), published through the
/// publisher's [`Broker`] (CloudEvent encoding, batches of the publisher's size) with the
/// publisher's window: the broker layer alone, without feed reads or cursors. Removes the
/// feed's queue or stream afterwards (so that the publisher's figure starts on an empty one,
/// and JetStream's duplicate window does not drop its messages).
async fn through_broker<F: FeedStore>(
    target: &Target,
    feeds: &F,
    feed: &FeedId,
    p: &PublishPlan,
) -> anyhow::Result<Raw> {
    let mut all = Vec::new();
    while (all.len() as u64) < p.events {
        let after = all
            .last()
            .map_or(FeedPosition::START, |e: &FeedEvent| e.position);
        let page = feeds
            .read_feed(feed, after, FEED_PAGE_EVENTS_MAX)
            .await
            .context("read the feed")?;
        if page.is_empty() {
            bail!("{feed} holds {} events, not {}", all.len(), p.events);
        }
        all.extend(page);
    }
    let broker = target.broker().await?;
    target.prepare(feed).await?;
    broker.declare(feed).await?;
    let bar = super::progress_bar(
        &format!("publish: {} through Broker::publish", target.key()),
        p.events,
        "events",
    );
    let batches_in_flight = (p.window / p.batch).max(1);
    let started = Instant::now();
    let mut publishes = futures_util::stream::iter(all.chunks(p.batch))
        .map(|batch| {
            let broker = Arc::clone(&broker);
            async move { broker.publish(feed, SOURCE, batch).await }
        })
        .buffered(batches_in_flight);
    while let Some(outcomes) = publishes.next().await {
        let outcomes = outcomes.context("Broker::publish")?;
        if let Some(refused) = outcomes.iter().find(|o| !o.is_confirmed()) {
            bail!("the broker refused an event: {refused:?}");
        }
        bar.inc(outcomes.len() as u64);
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    drop(publishes);
    let held = target.remove(feed).await?;
    if held < p.events {
        bail!(
            "{} confirmed {} events, its queue or stream held {held}",
            target.label(),
            p.events
        );
    }
    let raw = Raw {
        messages: p.events,
        elapsed,
    };
    tracing::info!(
        broker = target.key(),
        events_per_sec = format_args!("{}", group(raw.per_second())),
        "through Broker::publish"
    );
    Ok(raw)
}

/// The latency figure: a fresh feed on an empty log, its projector and publisher running, a
/// consumer on the broker; appends paced at the plan's rate.
async fn latency<E: EventStore + 'static, F: FeedStore>(
    target: &Target,
    events: Arc<E>,
    feeds: Arc<F>,
    p: &PublishPlan,
) -> anyhow::Result<Latency> {
    let feed = unique_feed("bench_latency")?;
    target.prepare(&feed).await?;
    let arrivals = target.consume(&feed).await?;
    // The publisher first: it waits for the feed until the projector registers it.
    let publishers = Publishers::builder(target.broker().await?, SOURCE)
        .feed(feed.clone())
        .options(PublisherOptions::default())
        .start(Arc::clone(&feeds))
        .context("cannot start the publisher")?;
    let projectors = match Projectors::builder()
        .projection(BenchProjection::new(feed.clone()))
        .start(Arc::clone(&events), Arc::clone(&feeds))
        .await
    {
        Ok(projectors) => projectors,
        Err(error) => {
            publishers.shutdown().await;
            return Err(error).with_context(|| format!("cannot start the projector of {feed}"));
        }
    };
    let measured = async {
        super::feeds::wait_live(
            feeds.as_ref(),
            &projectors,
            &feed,
            "publish: the latency feed turns live",
            0,
        )
        .await?;
        let epoch = Instant::now();
        let appends_take =
            Duration::from_secs_f64(p.latency_events as f64 / f64::from(p.latency_rate.max(1)));
        let deadline = tokio::time::Instant::now() + appends_take + ARRIVAL_TIMEOUT;
        let collector = tokio::spawn(collect(arrivals, epoch, p.latency_events, deadline));
        let append_rate =
            paced_appends(Arc::clone(&events), epoch, p.latency_events, p.latency_rate).await;
        let histogram = collector.await.context("the latency consumer")??;
        anyhow::Ok((append_rate?, histogram))
    }
    .await;
    publishers.shutdown().await;
    projectors.shutdown().await;
    let removed = target.remove(&feed).await;
    let (append_rate, histogram) = measured?;
    removed?;
    let latency = Latency {
        events: p.latency_events,
        append_rate,
        p50_us: histogram.value_at_quantile(0.50),
        p99_us: histogram.value_at_quantile(0.99),
        max_us: histogram.max(),
    };
    tracing::info!(
        broker = target.key(),
        p50_ms = latency.p50_us as f64 / 1_000.0,
        p99_ms = latency.p99_us as f64 / 1_000.0,
        "append → broker latency"
    );
    Ok(latency)
}

/// What the latency consumer reads of each message: the append instant the event carries.
#[derive(Deserialize)]
struct LatencyBody {
    data: LatencyData,
}

#[derive(Deserialize)]
struct LatencyData {
    /// Nanoseconds from the benchmark's epoch to the start of the append.
    sent_ns: u64,
}

/// Reads arrivals until `total` distinct events arrived (duplicates count once); the latency of
/// each from its append (its `sent_ns` after `epoch`) to its first arrival.
async fn collect(
    mut arrivals: tokio::sync::mpsc::Receiver<super::publish_broker::Arrival>,
    epoch: Instant,
    total: u64,
    deadline: tokio::time::Instant,
) -> anyhow::Result<Histogram<u64>> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, LATENCY_MICROS_MAX, 3)
        .context("the latency histogram's bounds")?;
    let mut seen = HashSet::new();
    while (seen.len() as u64) < total {
        let arrival = match tokio::time::timeout_at(deadline, arrivals.recv()).await {
            Ok(Some(arrival)) => arrival,
            Ok(None) => bail!(
                "the consumer stopped after {} of {total} events",
                seen.len()
            ),
            Err(_) => bail!(
                "{} of {total} events reached the broker's consumer in time",
                seen.len()
            ),
        };
        let body: LatencyBody = serde_json::from_slice(&arrival.body)
            .context("a message that is not the benchmark's CloudEvent")?;
        if !seen.insert(body.data.sent_ns) {
            continue;
        }
        let arrived_ns =
            u64::try_from(arrival.at.duration_since(epoch).as_nanos()).unwrap_or(u64::MAX);
        let micros = arrived_ns.saturating_sub(body.data.sent_ns) / 1_000;
        histogram.saturating_record(micros.max(1));
    }
    Ok(histogram)
}

/// Appends `total` events, one per append, at `rate` per second (paced: each append starts on
/// its tick, whatever earlier ones take), each carrying the instant its append started.
async fn paced_appends<E: EventStore + 'static>(
    events: Arc<E>,
    epoch: Instant,
    total: u64,
    rate: u32,
) -> anyhow::Result<f64> {
    let bar = super::progress_bar("publish: append → broker latency", total, "events");
    let streams: Vec<StreamName> = (0..LATENCY_STREAMS)
        .map(|s| StreamName::new(format!("latency-{s}")))
        .collect::<Result<_, _>>()?;
    let event_type = EventType::new("account.deposited")?;
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let slots = Arc::new(tokio::sync::Semaphore::new(LATENCY_APPENDS_IN_FLIGHT_MAX));
    let mut appends = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 0..total {
        ticks.tick().await;
        let slot = Arc::clone(&slots).acquire_owned().await?;
        let events = Arc::clone(&events);
        let stream = streams[usize::try_from(i % LATENCY_STREAMS).unwrap_or(0)].clone();
        let event_type = event_type.clone();
        let bar = bar.clone();
        appends.spawn(async move {
            let sent_ns = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let data = format!(r#"{{"sent_ns":{sent_ns},"currency":"EUR","reference":"bench"}}"#);
            let event = NewEvent::new(EventId::new_random(), event_type, data.into_bytes());
            let appended = events
                .append(&stream, ExpectedVersion::Any, vec![event])
                .await
                .context("append while measuring the latency");
            drop(slot);
            bar.inc(1);
            appended.map(|_| ())
        });
        while let Some(done) = appends.try_join_next() {
            done??;
        }
    }
    while let Some(done) = appends.join_next().await {
        done??;
    }
    bar.finish_and_clear();
    Ok(total as f64 / started.elapsed().as_secs_f64().max(f64::MIN_POSITIVE))
}

/// The median of each figure over the runs, per broker.
pub(crate) fn median(runs: &[PublishFigures]) -> Option<PublishFigures> {
    fn med(mut values: Vec<f64>) -> Option<f64> {
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied()
    }
    let first = runs.first()?;
    let brokers = first
        .brokers
        .iter()
        .map(|b| {
            let each: Vec<&BrokerFigures> = runs
                .iter()
                .filter_map(|r| r.brokers.iter().find(|x| x.broker == b.broker))
                .collect();
            let f = |get: fn(&BrokerFigures) -> f64| {
                med(each.iter().map(|r| get(r)).collect()).unwrap_or(0.0)
            };
            let lat = |get: fn(&Latency) -> f64| {
                med(each.iter().map(|r| get(&r.latency)).collect()).unwrap_or(0.0)
            };
            BrokerFigures {
                broker: b.broker,
                label: b.label,
                server: b.server.clone(),
                raw_per_sec: f(|r| r.raw_per_sec),
                broker_layer_per_sec: f(|r| r.broker_layer_per_sec),
                broker_layer_ratio: f(|r| r.broker_layer_ratio),
                fill_per_sec: f(|r| r.fill_per_sec),
                publisher_per_sec: f(|r| r.publisher_per_sec),
                ratio: f(|r| r.ratio),
                latency: Latency {
                    events: b.latency.events,
                    append_rate: lat(|l| l.append_rate),
                    p50_us: lat(|l| l.p50_us as f64) as u64,
                    p99_us: lat(|l| l.p99_us as f64) as u64,
                    max_us: each.iter().map(|r| r.latency.max_us).max().unwrap_or(0),
                },
            }
        })
        .collect();
    Some(PublishFigures {
        fsync_per_sec: med(runs.iter().map(|r| r.fsync_per_sec).collect()).unwrap_or(0.0),
        brokers,
    })
}

/// The publishing section of the report, for BENCHMARKS.md.
pub(crate) fn markdown(
    backend: &str,
    plan: &Plan,
    machine: &super::system::Machine,
    runs: &[PublishFigures],
) -> String {
    use std::fmt::Write as _;
    let Some(m) = median(runs) else {
        return String::new();
    };
    let p = PublishPlan::from_plan(plan);
    let several = runs.len() > 1;
    let each = |values: Vec<String>, separator: &str| {
        if several {
            values.join(separator)
        } else {
            String::new()
        }
    };
    let mut out = String::new();
    let _ = writeln!(out, "\n#### Publishing ({backend} store)\n");
    let _ = writeln!(out, "- command: `{}`", super::report::command_line());
    let _ = writeln!(
        out,
        "- machine: {}, {} cores, {}; disk: {}",
        machine.cpu, machine.cores, machine.kernel, machine.filesystem
    );
    let _ = writeln!(
        out,
        "- fsync bound (write {} B + fdatasync, growing file) in this run: {} ops/s",
        plan.record_bytes,
        if several {
            runs.iter()
                .map(|r| group(r.fsync_per_sec))
                .collect::<Vec<_>>()
                .join(" / ")
        } else {
            group(m.fsync_per_sec)
        }
    );
    let servers: Vec<String> = m.brokers.iter().map(|b| b.server.clone()).collect();
    let _ = writeln!(out, "- brokers: {}", servers.join(", "));
    let _ = writeln!(
        out,
        "- workload: raw and through the publisher: {} events over {} subjects in runs of {} \
         (the feed's order), the CloudEvent of a ~{}-byte JSON payload, batches of {}, at most \
         {} unconfirmed; latency: {} events appended one per append at {} appends/s, projector \
         and publisher running, a consumer on the broker",
        group(p.events as f64),
        group(p.subjects as f64),
        super::feeds::FILL_BATCH_EVENTS,
        FILL_DATA.len(),
        p.batch,
        group(p.window as f64),
        group(p.latency_events as f64),
        p.latency_rate,
    );
    if several {
        let _ = writeln!(
            out,
            "- {} runs: each figure is the median (each run's figure in the last column); a \
             ratio is the median of each run's ratio",
            runs.len()
        );
    }
    if plan.quick {
        let _ = writeln!(
            out,
            "- note: a `--quick` run (a smoke test): figures that mean little"
        );
    }
    let _ = writeln!(
        out,
        "\n| figure | measured | compared to, same run | runs |\n| --- | ---: | --- | --- |"
    );
    for b in &m.brokers {
        let mine =
            |run: &PublishFigures| run.brokers.iter().find(|x| x.broker == b.broker).cloned();
        let per_run_with = |separator: &str, get: &dyn Fn(&BrokerFigures) -> String| {
            each(
                runs.iter().filter_map(mine).map(|r| get(&r)).collect(),
                separator,
            )
        };
        let per_run = |get: &dyn Fn(&BrokerFigures) -> String| per_run_with(" / ", get);
        let _ = writeln!(
            out,
            "| {}: raw client ({}), batches of {}, window {} | {} events/s | the client library \
             alone | {} |",
            b.label,
            target_client(b.broker),
            p.batch,
            group(p.window as f64),
            group(b.raw_per_sec),
            per_run(&|r| group(r.raw_per_sec)),
        );
        let _ = writeln!(
            out,
            "| {}: through `Broker::publish` (CloudEvent encoding, batches of {}), events read \
             beforehand | {} events/s | {:.0} % of the raw rate | {} |",
            b.label,
            p.batch,
            group(b.broker_layer_per_sec),
            b.broker_layer_ratio * 100.0,
            per_run(&|r| group(r.broker_layer_per_sec)),
        );
        let _ = writeln!(
            out,
            "| {}: through the publisher, {} events from the feed store | {} events/s | \
             {:.0} % of the raw rate | {} |",
            b.label,
            group(p.events as f64),
            group(b.publisher_per_sec),
            b.ratio * 100.0,
            per_run(&|r| group(r.publisher_per_sec)),
        );
        let l = &b.latency;
        let _ = writeln!(
            out,
            "| {}: append → consumer arrival, p50 / p99 (max) | {:.2} / {:.2} ms ({:.1} \
             ms) | {} appends/s achieved | {} |",
            b.label,
            l.p50_us as f64 / 1_000.0,
            l.p99_us as f64 / 1_000.0,
            l.max_us as f64 / 1_000.0,
            group(l.append_rate),
            // Each run's p50 / p99, runs apart by "; ".
            per_run_with("; ", &|r| {
                format!(
                    "{:.2} / {:.2}",
                    r.latency.p50_us as f64 / 1_000.0,
                    r.latency.p99_us as f64 / 1_000.0
                )
            }),
        );
    }
    let fills: Vec<String> = runs
        .iter()
        .flat_map(|r| r.brokers.iter().map(|b| group(b.fill_per_sec)))
        .collect();
    let _ = writeln!(
        out,
        "\nProjecting the log into the feed before publishing (not timed in the figures): {} \
         events/s.",
        fills.join(" / ")
    );
    out
}

fn target_client(key: &str) -> &'static str {
    match key {
        "rabbitmq" => Target::Amqp(String::new()).client(),
        _ => Target::Nats(String::new()).client(),
    }
}
