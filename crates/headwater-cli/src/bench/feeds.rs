//! The feeds suite of `headwater bench`: what issue 4's figures are, on any pair of stores.
//!
//! 1. Fill the log with `events` internal events over many streams.
//! 2. **Backfill alone**: a first projection version (`bench.v1`) fills from the whole log.
//! 3. **Appends alone**: `writers` concurrent writers, 1 event per append, for one phase.
//! 4. **Backfill while appends go on**: the same writers again while a second version
//!    (`bench.v2`) backfills from the log (v1 keeps projecting the new events, as in a live
//!    service). The backfill rate is the log as it stood when v2 was added over the time v2 took
//!    to get through it; the append rate beside it shows what the backfill cost the writers.
//! 5. **Feed reads over HTTP** on loopback, 1 client then `http_clients` clients, each reading
//!    `http_read_events` events of v1 from the start in pages of 1,000.
//! 6. **Long-poll wake-up**: a client long-polls at v1's head; one internal event is appended;
//!    the time from the start of that append to the client's complete answer (projector, feed
//!    commit, wake-up, HTTP), `wake_rounds` times.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use headwater_api::bench::{BenchError, ReadRate, WakeLatency, read_rate_bounded, wake_latency};
use headwater_core::{
    EventId, EventType, ExpectedVersion, FeedId, FeedStatus, NewEvent, StreamName, Subject,
};
use headwater_feed::{Emit, Projection, ProjectionError, ProjectorState, Projectors};
use headwater_store::{EventStore, FeedStore};
use serde::Serialize;

use super::Plan;
use crate::text::group;

/// SPEC's aim for a backfill while appends go on, in internal events per second.
const AIM_BACKFILL_EVENTS_PER_SEC: f64 = 200_000.0;
/// Streams the filled log spreads its events over (each a feed subject).
const FILL_STREAMS: u64 = 10_000;
/// Events per append while filling (all of one stream).
pub(crate) const FILL_BATCH_EVENTS: u64 = 100;
/// Concurrent appenders while filling.
const FILL_WRITERS: u64 = 8;
/// The page of the HTTP read figures, in events.
const HTTP_PAGE_EVENTS: u64 = 1_000;
/// The longest a backfill may take before the benchmark gives up.
const BACKFILL_TIMEOUT: Duration = Duration::from_secs(600);

/// The feeds suite's sizes, from the plan.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct FeedPlan {
    pub(crate) events: u64,
    pub(crate) writers: u32,
    pub(crate) http_clients: usize,
    pub(crate) http_read_events: u64,
    pub(crate) wake_rounds: usize,
    /// The writers' combined append rate is kept below this, in events per second: durable
    /// stores stay far below it anyway, and it keeps the memory store's writers from outrunning
    /// every projector (a backfill that can never catch up measures nothing).
    pub(crate) append_rate_max: u32,
}

impl FeedPlan {
    pub(crate) fn from_plan(plan: &Plan) -> FeedPlan {
        FeedPlan {
            events: plan.events,
            writers: plan.writers.min(64),
            http_clients: 16,
            http_read_events: if plan.quick { 5_000 } else { 200_000 },
            wake_rounds: if plan.quick { 20 } else { 300 },
            append_rate_max: if plan.quick { 5_000 } else { 50_000 },
        }
    }
}

/// Everything one run of the feeds suite measured.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct FeedFigures {
    pub(crate) events: u64,
    pub(crate) backfill_alone_per_sec: f64,
    pub(crate) backfill_with_appends_per_sec: f64,
    pub(crate) appends_alone_per_sec: f64,
    pub(crate) appends_during_backfill_per_sec: f64,
    pub(crate) http_read_1_client_per_sec: f64,
    pub(crate) http_read_clients: usize,
    pub(crate) http_read_n_clients_per_sec: f64,
    pub(crate) wake_rounds: usize,
    pub(crate) wake_p50_us: u64,
    pub(crate) wake_p99_us: u64,
    pub(crate) wake_max_us: u64,
}

/// Every internal event becomes one integration event of its stream's id.
#[derive(Debug)]
pub(crate) struct BenchProjection {
    feed: FeedId,
}

impl BenchProjection {
    pub(crate) fn new(feed: FeedId) -> BenchProjection {
        BenchProjection { feed }
    }
}

impl Projection for BenchProjection {
    fn feed(&self) -> FeedId {
        self.feed.clone()
    }

    fn project(
        &self,
        event: &headwater_core::RecordedEvent,
        out: &mut Emit,
    ) -> Result<(), ProjectionError> {
        let subject = Subject::new(event.stream.id()).map_err(ProjectionError::failed)?;
        let event_type = EventType::new("bench.changed").map_err(ProjectionError::failed)?;
        out.emit_json_bytes(event_type, subject, event.data.clone())
    }
}

fn feed(version: &str) -> FeedId {
    FeedId::parse(&format!("bench.{version}")).expect("a valid constant feed id")
}

fn event(data: &[u8]) -> NewEvent {
    NewEvent::new(
        EventId::new_random(),
        EventType::new("account.deposited").expect("a valid constant event type"),
        data.to_vec(),
    )
}

/// The whole feeds suite against one pair of stores.
pub(crate) async fn measure<E: EventStore, F: FeedStore>(
    events: Arc<E>,
    feeds: Arc<F>,
    plan: &Plan,
) -> anyhow::Result<FeedFigures> {
    let p = FeedPlan::from_plan(plan);
    fill(events.as_ref(), p.events, "feeds: fill the log").await?;

    // Backfill alone.
    let v1 = feed("v1");
    let started = Instant::now();
    let running_v1 = Projectors::builder()
        .projection(BenchProjection { feed: v1.clone() })
        .start(Arc::clone(&events), Arc::clone(&feeds))
        .await
        .context("cannot start the projector of bench.v1")?;
    let done = wait_live(
        feeds.as_ref(),
        &running_v1,
        &v1,
        "backfill bench.v1 (alone)",
        p.events,
    )
    .await?;
    let backfill_alone_per_sec = done as f64 / started.elapsed().as_secs_f64();

    // Appends alone, then the same appends while v2 backfills.
    let appends_alone_per_sec = appends(events.as_ref(), &p, plan.phase).await?;
    let v2 = feed("v2");
    let stop = AtomicBool::new(false);
    let appended = AtomicU64::new(0);
    let writers = appends_until(events.as_ref(), &p, &stop, &appended);
    let backfill = async {
        // The log as it stands when v2 is added: the backfill is timed until v2's cursor reaches
        // it, while the writers go on appending; then the writers stop and v2 catches up with
        // what they added and turns live. (Timing until live instead would measure a chase whose
        // length depends on how fast the writers are, unbounded on the memory store.)
        let target = events.head_position().get();
        let started = Instant::now();
        let running = Projectors::builder()
            .projection(BenchProjection { feed: v2.clone() })
            .start(Arc::clone(&events), Arc::clone(&feeds))
            .await
            .context("cannot start the projector of bench.v2")?;
        let reached = wait_caught_up(
            feeds.as_ref(),
            &running,
            &v2,
            target,
            "backfill bench.v2 (appends going on)",
        )
        .await;
        let elapsed = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        let live = match reached {
            Ok(()) => wait_live(feeds.as_ref(), &running, &v2, "bench.v2 catches up", target).await,
            Err(error) => Err(error),
        };
        running.shutdown().await;
        live?;
        anyhow::Ok((target, elapsed))
    };
    let (writers, backfill) = tokio::join!(writers, backfill);
    let appends_elapsed = writers?;
    let (done, elapsed) = backfill?;
    let backfill_with_appends_per_sec = done as f64 / elapsed.as_secs_f64();
    let appends_during_backfill_per_sec =
        appended.load(Ordering::Relaxed) as f64 / appends_elapsed.as_secs_f64();

    // v1 catches up with what the writers appended, so that each wake-up round below waits for
    // its own event. (The log's head as this handle knows it may lag the log: PostgreSQL learns
    // of commits by notification. Nothing left to read after v1's cursor is the sure sign.)
    loop {
        let head = events.head_position().get();
        wait_caught_up(
            feeds.as_ref(),
            &running_v1,
            &v1,
            head,
            "bench.v1 catches up",
        )
        .await?;
        let cursor = feeds
            .feed(&v1)
            .await?
            .context("bench.v1 is not registered")?
            .cursor;
        if events.read_all(cursor, 1).await?.is_empty() {
            break;
        }
    }

    // Reads over HTTP, and the long-poll wake-up through the live v1 projector.
    let dyn_feeds: Arc<dyn FeedStore> = feeds.clone();
    let read_1 = http_read(&dyn_feeds, &v1, 1, p.http_read_events).await?;
    let read_n = http_read(&dyn_feeds, &v1, p.http_clients, p.http_read_events).await?;
    let wake = wake(&dyn_feeds, events.as_ref(), &v1, p.wake_rounds).await?;
    running_v1.shutdown().await;

    Ok(FeedFigures {
        events: p.events,
        backfill_alone_per_sec,
        backfill_with_appends_per_sec,
        appends_alone_per_sec,
        appends_during_backfill_per_sec,
        http_read_1_client_per_sec: read_1.events_per_second(),
        http_read_clients: read_n.clients,
        http_read_n_clients_per_sec: read_n.events_per_second(),
        wake_rounds: wake.rounds,
        wake_p50_us: wake.p50_us,
        wake_p99_us: wake.p99_us,
        wake_max_us: wake.max_us,
    })
}

/// Appends `total` events in batches over [`FILL_STREAMS`] streams.
pub(crate) async fn fill<E: EventStore>(events: &E, total: u64, label: &str) -> anyhow::Result<()> {
    let bar = super::progress_bar(label, total, "events");
    let data = br#"{"amount_cents":12345,"currency":"EUR","reference":"bench"}"#;
    let next = AtomicU64::new(0);
    let writer = || async {
        loop {
            let first = next.fetch_add(FILL_BATCH_EVENTS, Ordering::Relaxed);
            if first >= total {
                return anyhow::Ok(());
            }
            let count = FILL_BATCH_EVENTS.min(total - first);
            let stream = StreamName::new(format!("account-{}", first / 100 % FILL_STREAMS))?;
            let batch = (0..count).map(|_| event(data)).collect();
            events
                .append(&stream, ExpectedVersion::Any, batch)
                .await
                .context("fill the log")?;
            bar.inc(count);
        }
    };
    let results = futures_util::future::join_all((0..FILL_WRITERS).map(|_| writer())).await;
    bar.finish_and_clear();
    results.into_iter().collect()
}

/// Fails when the projector of `feed` stopped for good.
fn check_running(projectors: &Projectors, feed: &FeedId) -> anyhow::Result<()> {
    let failed = projectors
        .statuses()
        .into_iter()
        .find(|s| &s.feed == feed && matches!(s.state, ProjectorState::Failed));
    if let Some(status) = failed {
        bail!(
            "the projector of {feed} failed: {}",
            status.last_error.as_deref().unwrap_or("no error recorded")
        );
    }
    Ok(())
}

/// Waits until `feed` is live; returns the internal events it went through.
pub(crate) async fn wait_live<F: FeedStore>(
    feeds: &F,
    projectors: &Projectors,
    feed: &FeedId,
    label: &str,
    total: u64,
) -> anyhow::Result<u64> {
    let until = Until {
        label,
        total,
        what: "turn live",
    };
    let state = wait_until(feeds, projectors, feed, until, |s| {
        s.status == FeedStatus::Live
    })
    .await?;
    Ok(state.cursor.get())
}

/// Waits until `feed`'s cursor reaches `position`.
async fn wait_caught_up<F: FeedStore>(
    feeds: &F,
    projectors: &Projectors,
    feed: &FeedId,
    position: u64,
    label: &str,
) -> anyhow::Result<()> {
    let until = Until {
        label,
        total: position,
        what: "catch up",
    };
    wait_until(feeds, projectors, feed, until, |s| {
        s.cursor.get() >= position
    })
    .await?;
    Ok(())
}

/// What [`wait_until`] shows and says.
struct Until<'a> {
    label: &'a str,
    /// The progress bar's length, in internal events.
    total: u64,
    /// For the timeout's message: "did not … within".
    what: &'a str,
}

/// Polls `feed`'s state until `done`, with a progress bar of its cursor; fails when its
/// projector failed or after [`BACKFILL_TIMEOUT`].
async fn wait_until<F: FeedStore>(
    feeds: &F,
    projectors: &Projectors,
    feed: &FeedId,
    until: Until<'_>,
    done: impl Fn(&headwater_store::FeedState) -> bool,
) -> anyhow::Result<headwater_store::FeedState> {
    let bar = super::progress_bar(until.label, until.total, "events");
    let deadline = Instant::now() + BACKFILL_TIMEOUT;
    loop {
        let state = feeds
            .feed(feed)
            .await?
            .with_context(|| format!("{feed} is not registered"))?;
        bar.set_position(state.cursor.get().min(until.total));
        if done(&state) {
            bar.finish_and_clear();
            return Ok(state);
        }
        check_running(projectors, feed)?;
        if Instant::now() > deadline {
            bail!("{feed} did not {} within {BACKFILL_TIMEOUT:?}", until.what);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The plan's writers, 1 event per append, each on its own stream, for `phase`; returns events
/// per second.
async fn appends<E: EventStore>(
    events: &E,
    plan: &FeedPlan,
    phase: Duration,
) -> anyhow::Result<f64> {
    let stop = AtomicBool::new(false);
    let appended = AtomicU64::new(0);
    let timer = async {
        tokio::time::sleep(phase).await;
        stop.store(true, Ordering::Relaxed);
    };
    let (result, ()) = tokio::join!(appends_until(events, plan, &stop, &appended), timer);
    let elapsed = result?;
    Ok(appended.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64())
}

/// Runs the plan's writers until `stop`; returns the time they ran.
async fn appends_until<E: EventStore>(
    events: &E,
    plan: &FeedPlan,
    stop: &AtomicBool,
    appended: &AtomicU64,
) -> anyhow::Result<Duration> {
    let writers = plan.writers.max(1);
    // Each writer appends at most once per `pace`.
    let pace = Duration::from_secs_f64(f64::from(writers) / f64::from(plan.append_rate_max));
    let started = Instant::now();
    let data = br#"{"amount_cents":100,"currency":"EUR","reference":"bench-live"}"#;
    let writer = |w: u32| async move {
        let stream = StreamName::new(format!("writer-{w}-{}", EventId::new_random()))?;
        let mut ticks = tokio::time::interval(pace);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(Ordering::Relaxed) {
            ticks.tick().await;
            events
                .append(&stream, ExpectedVersion::Any, vec![event(data)])
                .await
                .context("append while measuring")?;
            appended.fetch_add(1, Ordering::Relaxed);
        }
        anyhow::Ok(())
    };
    let results = futures_util::future::join_all((0..writers).map(writer)).await;
    results.into_iter().collect::<anyhow::Result<()>>()?;
    Ok(started.elapsed())
}

async fn http_read(
    feeds: &Arc<dyn FeedStore>,
    feed: &FeedId,
    clients: usize,
    events: u64,
) -> anyhow::Result<ReadRate> {
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!("feeds: read over HTTP, {clients} client(s)"));
    spinner.enable_steady_tick(Duration::from_millis(200));
    let rate = read_rate_bounded(Arc::clone(feeds), feed, clients, HTTP_PAGE_EVENTS, events)
        .await
        .context("read the feed over HTTP")?;
    spinner.finish_and_clear();
    Ok(rate)
}

async fn wake<E: EventStore>(
    feeds: &Arc<dyn FeedStore>,
    events: &E,
    feed: &FeedId,
    rounds: usize,
) -> anyhow::Result<WakeLatency> {
    let bar = super::progress_bar("feeds: long-poll wake-up", rounds as u64, "rounds");
    let stream = StreamName::new(format!("wake-{}", EventId::new_random()))?;
    let latency = wake_latency(Arc::clone(feeds), feed, rounds, |_head| {
        let stream = stream.clone();
        let bar = bar.clone();
        async move {
            events
                .append(&stream, ExpectedVersion::Any, vec![event(b"{}")])
                .await
                .map_err(|e| BenchError::Request(e.to_string()))?;
            bar.inc(1);
            Ok(())
        }
    })
    .await
    .context("long-poll wake-up")?;
    bar.finish_and_clear();
    Ok(latency)
}

/// The median of each figure over the runs.
pub(crate) fn median(runs: &[FeedFigures]) -> Option<FeedFigures> {
    fn med(mut values: Vec<f64>) -> f64 {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    }
    let first = runs.first()?;
    let f = |get: fn(&FeedFigures) -> f64| med(runs.iter().map(get).collect());
    let u = |get: fn(&FeedFigures) -> u64| med(runs.iter().map(|r| get(r) as f64).collect()) as u64;
    Some(FeedFigures {
        events: first.events,
        backfill_alone_per_sec: f(|r| r.backfill_alone_per_sec),
        backfill_with_appends_per_sec: f(|r| r.backfill_with_appends_per_sec),
        appends_alone_per_sec: f(|r| r.appends_alone_per_sec),
        appends_during_backfill_per_sec: f(|r| r.appends_during_backfill_per_sec),
        http_read_1_client_per_sec: f(|r| r.http_read_1_client_per_sec),
        http_read_clients: first.http_read_clients,
        http_read_n_clients_per_sec: f(|r| r.http_read_n_clients_per_sec),
        wake_rounds: first.wake_rounds,
        wake_p50_us: u(|r| r.wake_p50_us),
        wake_p99_us: u(|r| r.wake_p99_us),
        wake_max_us: u(|r| r.wake_max_us),
    })
}

/// The feeds section of the report, for BENCHMARKS.md.
pub(crate) fn markdown(
    backend: &str,
    plan: &Plan,
    machine: &super::system::Machine,
    runs: &[FeedFigures],
) -> String {
    use std::fmt::Write as _;
    let Some(m) = median(runs) else {
        return String::new();
    };
    let p = FeedPlan::from_plan(plan);
    let each = |get: fn(&FeedFigures) -> f64| {
        if runs.len() < 2 {
            return String::new();
        }
        runs.iter()
            .map(|r| group(get(r)))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let mut out = String::new();
    let _ = writeln!(out, "\n#### Feeds ({backend} store)\n");
    let _ = writeln!(out, "- command: `{}`", super::report::command_line());
    let _ = writeln!(
        out,
        "- machine: {}, {} cores, {}; disk: {}",
        machine.cpu, machine.cores, machine.kernel, machine.filesystem
    );
    let _ = writeln!(
        out,
        "- workload: a log of {} internal events over {} streams; projection `bench` makes one \
         integration event per internal event; {} writers (1 event per append) during the \
         append phases (together at most {} events/s); HTTP reads of {} events per client in pages of {}; {} long-poll rounds",
        group(m.events as f64),
        group(FILL_STREAMS as f64),
        p.writers,
        group(f64::from(p.append_rate_max)),
        group(p.http_read_events as f64),
        HTTP_PAGE_EVENTS,
        m.wake_rounds
    );
    if runs.len() > 1 {
        let _ = writeln!(
            out,
            "- {} runs: each figure is the median (each run's figure in the last column)",
            runs.len()
        );
    }
    let _ = writeln!(
        out,
        "\n| figure | measured | compared to | runs |\n| --- | ---: | --- | --- |"
    );
    let verdict = if m.backfill_with_appends_per_sec >= AIM_BACKFILL_EVENTS_PER_SEC {
        "met"
    } else {
        "SHORT"
    };
    let rows = [
        (
            "backfill of a new version, appends going on".to_owned(),
            format!("{} events/s", group(m.backfill_with_appends_per_sec)),
            format!(
                "aim ≥ {} events/s: {verdict}",
                group(AIM_BACKFILL_EVENTS_PER_SEC)
            ),
            each(|r| r.backfill_with_appends_per_sec),
        ),
        (
            "backfill, nothing else running".to_owned(),
            format!("{} events/s", group(m.backfill_alone_per_sec)),
            String::new(),
            each(|r| r.backfill_alone_per_sec),
        ),
        (
            "appends during that backfill".to_owned(),
            format!("{} events/s", group(m.appends_during_backfill_per_sec)),
            format!(
                "{:.0} % of the same writers without backfill ({} events/s)",
                m.appends_during_backfill_per_sec / m.appends_alone_per_sec.max(f64::MIN_POSITIVE)
                    * 100.0,
                group(m.appends_alone_per_sec)
            ),
            each(|r| r.appends_during_backfill_per_sec),
        ),
        (
            "feed read over HTTP, 1 client".to_owned(),
            format!("{} events/s", group(m.http_read_1_client_per_sec)),
            String::new(),
            each(|r| r.http_read_1_client_per_sec),
        ),
        (
            format!("feed read over HTTP, {} clients", m.http_read_clients),
            format!("{} events/s", group(m.http_read_n_clients_per_sec)),
            format!(
                "{:.1}× one client",
                m.http_read_n_clients_per_sec / m.http_read_1_client_per_sec.max(f64::MIN_POSITIVE)
            ),
            each(|r| r.http_read_n_clients_per_sec),
        ),
        (
            "long-poll wake-up, append → answer, p50 / p99".to_owned(),
            format!(
                "{:.2} / {:.2} ms",
                m.wake_p50_us as f64 / 1_000.0,
                m.wake_p99_us as f64 / 1_000.0
            ),
            "SPEC's end-to-end aim: p99 ≤ 10 ms (this is the producer's share)".to_owned(),
            if runs.len() < 2 {
                String::new()
            } else {
                runs.iter()
                    .map(|r| {
                        format!(
                            "{:.2} / {:.2}",
                            r.wake_p50_us as f64 / 1_000.0,
                            r.wake_p99_us as f64 / 1_000.0
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            },
        ),
    ];
    for (figure, measured, compared, each) in rows {
        let _ = writeln!(out, "| {figure} | {measured} | {compared} | {each} |");
    }
    out
}
