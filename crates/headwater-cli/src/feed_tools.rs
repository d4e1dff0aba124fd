//! `headwater feeds` and `headwater tail`: what a producer's integration feeds hold, who reads
//! them, and their events as they come. Both work on any [`FeedStore`]; the embedded and
//! PostgreSQL backends open one read-only (see [`open`]).

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use headwater_core::{FeedId, FeedPosition, FeedStatus, Position, Sequence, Subject};
use headwater_store::{
    FeedEvent, FeedReader, FeedState, FeedStore, PublisherCursor, PublisherLag, publisher_lag,
};
use serde_json::json;

use crate::store_arg::StoreArgs;
use crate::text::{count, rfc3339, utc};

/// How long `tail --follow` waits for new events before it asks again (a store opened by another
/// process does not always wake this one).
const FOLLOW_POLL: Duration = Duration::from_millis(250);
/// The events one read of `tail` asks for.
const TAIL_PAGE_EVENTS: u64 = 1_000;

#[derive(Debug, Args)]
pub(crate) struct FeedsArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// With a feed API URL (`http://HOST:PORT`): the bearer token [default: $HEADWATER_TOKEN].
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// Print JSON (one object with every feed) instead of text.
    #[arg(long)]
    json: bool,
    /// When a feed is backfilling, read the store again after this many seconds to show the
    /// backfill's rate and the time left (0: do not wait).
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = parse_sample_secs)]
    sample_secs: f64,
}

/// The longest `--sample-secs`.
const SAMPLE_SECS_MAX: f64 = 60.0;

fn parse_sample_secs(text: &str) -> Result<f64, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(0.0..=SAMPLE_SECS_MAX).contains(&secs) {
        return Err(format!("{text} is outside 0..={SAMPLE_SECS_MAX} seconds"));
    }
    Ok(secs)
}

#[derive(Debug, Args)]
pub(crate) struct TailArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// With a feed API URL (`http://HOST:PORT`): the bearer token [default: $HEADWATER_TOKEN].
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// The feed: `name.vN`, e.g. `accounts.v2`.
    #[arg(long, value_name = "FEED")]
    feed: FeedId,
    /// Only this subject's events (by sequence).
    #[arg(long, value_name = "SUBJECT")]
    subject: Option<Subject>,
    /// Start after this feed position (or, with `--subject`, this sequence). Without it: the last
    /// `--last` events of the feed, or the whole subject.
    #[arg(long, value_name = "N")]
    after: Option<u64>,
    /// How many of the last events of the feed to show first (without `--after`).
    #[arg(long, value_name = "N", default_value_t = 10)]
    last: u64,
    /// Keep waiting for new events (stop with Ctrl-C).
    #[arg(long, short = 'f')]
    follow: bool,
    /// Print each event as one line of CloudEvents JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// How long a reader must have been silent before `retire` lets a version go without `--force`.
const RETIRE_IDLE_SECS_DEFAULT: u64 = 24 * 3_600;

#[derive(Debug, Args)]
pub(crate) struct RetireArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The feed version to retire: `name.vN`, e.g. `accounts.v1`.
    #[arg(long, value_name = "FEED")]
    feed: FeedId,
    /// A reader that read the feed within this many seconds still counts as reading it.
    #[arg(long, value_name = "SECS", default_value_t = RETIRE_IDLE_SECS_DEFAULT)]
    idle_secs: u64,
    /// Retire even though a reader read it recently, or no newer live version exists.
    #[arg(long)]
    force: bool,
}

/// A feed store opened for reading, with the internal log's head (for backfill progress).
pub(crate) struct Opened {
    pub(crate) feeds: Arc<dyn FeedStore>,
    pub(crate) log_head: Box<dyn Fn() -> anyhow::Result<Position> + Send + Sync>,
    pub(crate) name: String,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub(crate) fn feeds(args: &FeedsArgs) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    if let Some(url) = args.store.api_url() {
        return rt.block_on(async {
            let client = crate::feed_http::FeedApiClient::new(url, args.token.as_deref())?;
            print!("{}", crate::feed_http::feeds(&client, args.json).await?);
            Ok(ExitCode::SUCCESS)
        });
    }
    rt.block_on(async {
        let opened = open(&args.store).await?;
        let mut log_head = (opened.log_head)()?;
        let mut report = report(opened.feeds.as_ref(), now()).await?;
        let backfilling = report
            .iter()
            .any(|row| row.state.status == FeedStatus::Backfilling);
        if backfilling && args.sample_secs > 0.0 {
            let first = std::time::Instant::now();
            tokio::time::sleep(Duration::from_secs_f64(args.sample_secs)).await;
            let later = self::report(opened.feeds.as_ref(), now()).await?;
            log_head = (opened.log_head)()?;
            report = with_rates(&report, later, first.elapsed());
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report_json(&report))?);
        } else {
            print!("{}", render_report(&opened.name, log_head, &report));
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub(crate) fn tail(args: &TailArgs) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    rt.block_on(async {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let stop = async {
            // Ctrl-C ends `--follow` cleanly; without a signal handler, follow forever.
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        if let Some(url) = args.store.api_url() {
            let client = crate::feed_http::FeedApiClient::new(url, args.token.as_deref())?;
            let run = crate::feed_http::tail(
                &client,
                &args.feed,
                args.subject.as_ref(),
                args.after,
                args.last,
                args.follow,
                args.json,
                &mut out,
            );
            tokio::select! {
                result = run => result?,
                () = stop => {}
            }
            return Ok(ExitCode::SUCCESS);
        }
        let opened = open(&args.store).await?;
        tokio::select! {
            result = run_tail(opened.feeds.as_ref(), args, &mut out) => result?,
            () = stop => {}
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub(crate) fn retire(args: &RetireArgs) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    rt.block_on(async {
        let opened = crate::feed_open::open_writable(&args.store).await?;
        let now = headwater_core::Timestamp::from_unix_micros(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
        );
        let said = retire_feed(opened.feeds.as_ref(), args, now).await?;
        println!("{said}");
        Ok(ExitCode::SUCCESS)
    })
}

/// Retires `args.feed` after the checks that keep consumers from being cut off: a newer version
/// of the same name is live, and no reader read this one within `args.idle_secs`. Returns what
/// it did.
pub(crate) async fn retire_feed(
    feeds: &dyn FeedStore,
    args: &RetireArgs,
    now: headwater_core::Timestamp,
) -> anyhow::Result<String> {
    let feed = &args.feed;
    let all = feeds.feeds().await.context("cannot list the feeds")?;
    let Some(state) = all.iter().find(|s| &s.feed == feed) else {
        bail!("no feed {feed} in this store");
    };
    if state.status == FeedStatus::Retired {
        return Ok(format!("{feed} is already retired; nothing changed"));
    }
    let successor = all
        .iter()
        .filter(|s| s.feed.name == feed.name && s.feed.version > feed.version)
        .filter(|s| s.status == FeedStatus::Live)
        .map(|s| s.feed.to_string())
        .next_back();
    if successor.is_none() && !args.force {
        bail!(
            "{feed} has no newer live version for its readers to move to; retire it anyway with \
             --force"
        );
    }
    let idle_micros = args.idle_secs.saturating_mul(1_000_000);
    let recent: Vec<String> = feeds
        .readers(feed)
        .await
        .with_context(|| format!("cannot list the readers of {feed}"))?
        .into_iter()
        .filter(|r| {
            now.unix_micros()
                .saturating_sub(r.last_read_at.unix_micros())
                < idle_micros
        })
        .map(|r| format!("{} (last read {})", r.reader, utc(r.last_read_at)))
        .collect();
    if !recent.is_empty() && !args.force {
        bail!(
            "{feed} is still read: {}; move them to {} first, or retire it anyway with --force",
            recent.join(", "),
            successor.as_deref().unwrap_or("a newer version")
        );
    }
    feeds
        .set_status(feed, FeedStatus::Retired)
        .await
        .with_context(|| format!("cannot retire {feed}"))?;
    Ok(match successor {
        Some(successor) => format!(
            "{feed} retired: the feed API answers 410 Gone for it, naming {successor}; its \
             projector stops within seconds"
        ),
        None => format!("{feed} retired (no newer live version): the feed API answers 410 Gone"),
    })
}

/// Opens the store named by `args` for reading.
async fn open(args: &StoreArgs) -> anyhow::Result<Opened> {
    crate::feed_open::open(args).await
}

/// One feed, as `headwater feeds` shows it.
#[derive(Debug)]
pub(crate) struct FeedRow {
    pub(crate) state: FeedState,
    pub(crate) readers: Vec<FeedReader>,
    /// Each publisher's cursor, and how far behind the feed it is when the report was made.
    pub(crate) publishers: Vec<(PublisherCursor, PublisherLag)>,
    /// How fast the projector's cursor moved between two looks, in internal events per second
    /// (backfilling feeds, when sampled).
    pub(crate) rate: Option<f64>,
}

/// The `later` rows, with the rate each backfilling feed's cursor moved at since `earlier`.
fn with_rates(earlier: &[FeedRow], later: Vec<FeedRow>, elapsed: Duration) -> Vec<FeedRow> {
    later
        .into_iter()
        .map(|mut row| {
            let before = earlier.iter().find(|e| e.state.feed == row.state.feed);
            if let Some(before) = before
                && before.state.status == FeedStatus::Backfilling
            {
                let moved = row
                    .state
                    .cursor
                    .get()
                    .saturating_sub(before.state.cursor.get());
                row.rate = Some(moved as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE));
            }
            row
        })
        .collect()
}

/// The feeds of `feeds`, with their readers and publishers; publishers' lags as of `now`.
pub(crate) async fn report(
    feeds: &dyn FeedStore,
    now: headwater_core::Timestamp,
) -> anyhow::Result<Vec<FeedRow>> {
    let mut rows = Vec::new();
    for state in feeds.feeds().await.context("cannot list the feeds")? {
        let readers = feeds
            .readers(&state.feed)
            .await
            .with_context(|| format!("cannot list the readers of {}", state.feed))?;
        let mut publishers = Vec::new();
        for cursor in feeds
            .publishers(&state.feed)
            .await
            .with_context(|| format!("cannot list the publishers of {}", state.feed))?
        {
            let lag = publisher_lag(feeds, &state.feed, state.head, cursor.position, now)
                .await
                .with_context(|| {
                    format!("cannot read {}'s lag in {}", cursor.publisher, state.feed)
                })?;
            publishers.push((cursor, lag));
        }
        rows.push(FeedRow {
            state,
            readers,
            publishers,
            rate: None,
        });
    }
    Ok(rows)
}

/// The current time, as the stores record it.
pub(crate) fn now() -> headwater_core::Timestamp {
    headwater_core::Timestamp::from_unix_micros(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
    )
}

/// One line of the publishers' table, from a store or from the feed API.
#[derive(Debug)]
pub(crate) struct PublisherLine {
    pub(crate) feed: String,
    pub(crate) publisher: String,
    pub(crate) cursor: u64,
    pub(crate) lag: u64,
    pub(crate) lag_seconds: f64,
    pub(crate) updated_at: String,
}

/// The publishers' table (each feed's publishers to brokers: cursor, lag in positions and in
/// seconds, when the cursor last moved), or a line saying there is none.
pub(crate) fn render_publishers(lines: &[PublisherLine]) -> String {
    let mut out = String::new();
    if lines.is_empty() {
        let _ = writeln!(
            out,
            "
publishers: none"
        );
        return out;
    }
    out.push_str(
        "
| feed | publisher | cursor | lag | lag (s) | last moved |\n| --- | --- | ---: | ---: | ---: | --- |\n",
    );
    for line in lines {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.1} | {} |",
            line.feed,
            line.publisher,
            count(line.cursor),
            count(line.lag),
            line.lag_seconds,
            line.updated_at
        );
    }
    out
}

fn publisher_lines(rows: &[FeedRow]) -> Vec<PublisherLine> {
    rows.iter()
        .flat_map(|row| {
            row.publishers.iter().map(|(cursor, lag)| PublisherLine {
                feed: row.state.feed.to_string(),
                publisher: cursor.publisher.clone(),
                cursor: cursor.position.get(),
                lag: lag.positions,
                lag_seconds: lag.behind.as_secs_f64(),
                updated_at: utc(cursor.updated_at),
            })
        })
        .collect()
}

/// How far a feed's projector is through the log, in percent.
fn progress(cursor: Position, log_head: Position) -> f64 {
    if log_head.get() == 0 {
        return 100.0;
    }
    (cursor.get() as f64 / log_head.get() as f64 * 100.0).min(100.0)
}

pub(crate) fn render_report(name: &str, log_head: Position, rows: &[FeedRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "store      {name}");
    let _ = writeln!(out, "log head   position {}", count(log_head.get()));
    if rows.is_empty() {
        let _ = writeln!(out, "\nno feeds registered");
        return out;
    }
    out.push_str(
        "\n| feed | status | head | projected | lag | readers |\n| --- | --- | ---: | ---: | ---: | --- |\n",
    );
    for row in rows {
        let s = &row.state;
        let lag = log_head.get().saturating_sub(s.cursor.get());
        let projected = format!(
            "{} ({:.1} %)",
            count(s.cursor.get()),
            progress(s.cursor, log_head)
        );
        let readers = if row.readers.is_empty() {
            "none".to_owned()
        } else {
            row.readers
                .iter()
                .map(|r| {
                    format!(
                        "{} ({} reads, last {})",
                        r.reader,
                        count(r.reads),
                        utc(r.last_read_at)
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            s.feed,
            s.status,
            count(s.head.get()),
            projected,
            count(lag),
            readers
        );
    }
    let backfilling: Vec<String> = rows
        .iter()
        .filter(|r| r.state.status == FeedStatus::Backfilling)
        .map(|r| {
            let s = &r.state;
            let done = format!("{:.1} %", progress(s.cursor, log_head));
            match r.rate {
                Some(rate) if rate > 0.0 => {
                    let left = log_head.get().saturating_sub(s.cursor.get()) as f64 / rate;
                    format!(
                        "{}: {done} at {} events/s, about {left:.0} s left",
                        s.feed,
                        crate::text::group(rate)
                    )
                }
                Some(_) => format!("{}: {done}, not moving (is its service running?)", s.feed),
                None => format!("{}: {done}", s.feed),
            }
        })
        .collect();
    if !backfilling.is_empty() {
        let _ = writeln!(out, "\nbackfilling: {}", backfilling.join("; "));
    }
    out.push_str(&render_publishers(&publisher_lines(rows)));
    out
}

pub(crate) fn report_json(rows: &[FeedRow]) -> serde_json::Value {
    let feeds: Vec<_> = rows
        .iter()
        .map(|row| {
            let s = &row.state;
            json!({
                "name": s.feed.name.as_str(),
                "version": s.feed.version.get(),
                "status": s.status.as_str(),
                "head": s.head.get(),
                "cursor": s.cursor.get(),
                "registered_at": utc(s.registered_at),
                "live_at": s.live_at.map(utc),
                "backfill_rate_per_sec": row.rate,
                "readers": row.readers.iter().map(|r| json!({
                    "reader": r.reader,
                    "reads": r.reads,
                    "first_read_at": utc(r.first_read_at),
                    "last_read_at": utc(r.last_read_at),
                })).collect::<Vec<_>>(),
                "publishers": row.publishers.iter().map(|(p, lag)| json!({
                    "publisher": p.publisher,
                    "cursor": p.position.get(),
                    "lag": lag.positions,
                    "lag_seconds": lag.behind.as_secs_f64(),
                    "updated_at": utc(p.updated_at),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "feeds": feeds })
}

/// Prints the events `args` asks for to `out`; with `--follow`, waits for more until cancelled.
pub(crate) async fn run_tail(
    feeds: &dyn FeedStore,
    args: &TailArgs,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    let Some(state) = feeds.feed(&args.feed).await? else {
        let known: Vec<String> = feeds
            .feeds()
            .await?
            .iter()
            .map(|s| s.feed.to_string())
            .collect();
        bail!(
            "no feed {} in this store (feeds: {})",
            args.feed,
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    };
    let mut cursor = match (&args.subject, args.after) {
        (_, Some(after)) => after,
        (Some(_), None) => 0,
        (None, None) => state.head.get().saturating_sub(args.last),
    };
    let mut watch = feeds.watch_head(&args.feed);
    loop {
        let page = match &args.subject {
            Some(subject) => {
                feeds
                    .read_subject(&args.feed, subject, Sequence(cursor), TAIL_PAGE_EVENTS)
                    .await?
            }
            None => {
                feeds
                    .read_feed(&args.feed, FeedPosition(cursor), TAIL_PAGE_EVENTS)
                    .await?
            }
        };
        for event in &page {
            writeln!(out, "{}", render_event(&args.feed, event, args.json))?;
        }
        if let Some(last) = page.last() {
            cursor = match &args.subject {
                Some(_) => last.sequence.get(),
                None => last.position.get(),
            };
            continue;
        }
        if !args.follow {
            return Ok(());
        }
        out.flush()?;
        // Woken by this process's commits, or asks again after a while for other processes'.
        let _ = tokio::time::timeout(FOLLOW_POLL, watch.changed()).await;
    }
}

fn render_event(feed: &FeedId, event: &FeedEvent, as_json: bool) -> String {
    let data = String::from_utf8_lossy(&event.data);
    if as_json {
        let data: serde_json::Value =
            serde_json::from_slice(&event.data).unwrap_or(serde_json::Value::Null);
        return json!({
            "specversion": "1.0",
            "id": event.id.to_string(),
            "type": event.event_type.as_str(),
            "subject": event.subject.as_str(),
            "time": rfc3339(event.time),
            "datacontenttype": "application/json",
            "data": data,
            "sequence": event.sequence.get(),
            "position": event.position.get(),
            "feed": feed.to_string(),
        })
        .to_string();
    }
    format!(
        "#{} {} {} seq {} {} {}",
        event.position,
        utc(event.time),
        event.subject,
        event.sequence,
        event.event_type,
        data
    )
}

#[cfg(test)]
mod tests {
    use headwater_core::{EventId, EventType, Timestamp};
    use headwater_store::{MemoryFeedStore, ProjectedEvent, ProjectorBatch};

    use super::*;

    fn projected(subject: &str, source: u64) -> ProjectedEvent {
        ProjectedEvent {
            id: EventId::new_random(),
            event_type: EventType::new("accounts.deposited").unwrap(),
            subject: Subject::new(subject).unwrap(),
            time: Timestamp::from_unix_micros(1_795_780_524_123_456),
            data: br#"{"amount":100}"#.to_vec(),
            source_position: Position(source),
        }
    }

    async fn store() -> (MemoryFeedStore, FeedId) {
        let store = MemoryFeedStore::new();
        let feed = FeedId::parse("accounts.v1").unwrap();
        store.register(&feed).await.unwrap();
        let events = (1..=5)
            .map(|i| projected(if i % 2 == 0 { "a" } else { "b" }, i))
            .collect();
        store
            .commit(
                &feed,
                ProjectorBatch {
                    from: Position(0),
                    to: Position(6),
                    events,
                },
            )
            .await
            .unwrap();
        (store, feed)
    }

    fn tail_args(extra: &[&str]) -> TailArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            tail: TailArgs,
        }
        let mut argv = vec!["tail", "/nonexistent", "--feed", "accounts.v1"];
        argv.extend_from_slice(extra);
        Wrapper::try_parse_from(argv).unwrap().tail
    }

    #[tokio::test]
    async fn report_shows_progress_lag_and_readers() {
        let (store, feed) = store().await;
        store
            .record_readers(vec![headwater_store::ReaderSeen {
                feed: feed.clone(),
                reader: "statements".to_owned(),
                at: Timestamp::from_unix_micros(1_795_780_524_000_000),
                reads: 3,
            }])
            .await
            .unwrap();
        let rows = report(&store, now()).await.unwrap();
        let text = render_report("memory", Position(12), &rows);
        assert!(
            text.contains("| accounts.v1 | backfilling | 5 | 6 (50.0 %) | 6 | statements (3 reads"),
            "{text}"
        );
        let json = report_json(&rows);
        assert_eq!(json["feeds"][0]["readers"][0]["reads"], 3);
        assert_eq!(json["feeds"][0]["cursor"], 6);
    }

    #[tokio::test]
    async fn report_shows_each_publishers_cursor_and_lag() {
        let (store, feed) = store().await;
        let rows = report(&store, now()).await.unwrap();
        let text = render_report("memory", Position(6), &rows);
        assert!(text.contains("publishers: none"), "{text}");
        assert_eq!(report_json(&rows)["feeds"][0]["publishers"], json!([]));

        store
            .advance_publisher(&feed, "rabbitmq", FeedPosition(0), FeedPosition(2))
            .await
            .unwrap();
        store
            .advance_publisher(&feed, "nats", FeedPosition(0), FeedPosition(5))
            .await
            .unwrap();
        // 90 s after the events' time (all of them have the same).
        let at = Timestamp::from_unix_micros(1_795_780_524_123_456 + 90_000_000);
        let rows = report(&store, at).await.unwrap();
        let text = render_report("memory", Position(6), &rows);
        assert!(
            text.contains("| feed | publisher | cursor | lag | lag (s) | last moved |"),
            "{text}"
        );
        assert!(
            text.contains("| accounts.v1 | nats | 5 | 0 | 0.0 | "),
            "{text}"
        );
        assert!(
            text.contains("| accounts.v1 | rabbitmq | 2 | 3 | 90.0 | "),
            "{text}"
        );
        let json = report_json(&rows);
        let publishers = &json["feeds"][0]["publishers"];
        assert_eq!(publishers[1]["publisher"], "rabbitmq");
        assert_eq!(publishers[1]["cursor"], 2);
        assert_eq!(publishers[1]["lag"], 3);
        assert_eq!(publishers[1]["lag_seconds"], 90.0);
        assert_eq!(publishers[0]["lag_seconds"], 0.0);
        assert!(publishers[0]["updated_at"].is_string());
    }

    #[tokio::test]
    async fn a_sampled_backfill_shows_its_rate_and_time_left() {
        let (store, feed) = store().await;
        let earlier = report(&store, now()).await.unwrap();
        store
            .commit(
                &feed,
                ProjectorBatch {
                    from: Position(6),
                    to: Position(1_006),
                    events: vec![projected("a", 7)],
                },
            )
            .await
            .unwrap();
        let later = report(&store, now()).await.unwrap();
        let rows = with_rates(&earlier, later, Duration::from_secs(2));
        assert_eq!(rows[0].rate, Some(500.0));
        let text = render_report("memory", Position(2_006), &rows);
        assert!(
            text.contains("backfilling: accounts.v1: 50.1 % at 500 events/s, about 2 s left"),
            "{text}"
        );
        let still = with_rates(
            &rows,
            report(&store, now()).await.unwrap(),
            Duration::from_secs(1),
        );
        let text = render_report("memory", Position(2_006), &still);
        assert!(text.contains("not moving"), "{text}");
    }

    #[tokio::test]
    async fn tail_prints_the_last_events_or_a_subject() {
        let (store, _) = store().await;
        let mut out = Vec::new();
        run_tail(&store, &tail_args(&["--last", "2"]), &mut out)
            .await
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("#4 "), "{text}");

        let mut out = Vec::new();
        run_tail(&store, &tail_args(&["--subject", "a", "--json"]), &mut out)
            .await
            .unwrap();
        let events: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let sequences: Vec<_> = events.iter().map(|e| e["sequence"].clone()).collect();
        assert_eq!(sequences, [json!(1), json!(2)]);
        assert_eq!(events[1]["position"], 4);
        assert_eq!(events[0]["feed"], "accounts.v1");
    }

    fn retire_args(extra: &[&str]) -> RetireArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            retire: RetireArgs,
        }
        let mut argv = vec!["retire", "/nonexistent", "--feed", "accounts.v1"];
        argv.extend_from_slice(extra);
        Wrapper::try_parse_from(argv).unwrap().retire
    }

    #[tokio::test]
    async fn retire_needs_a_live_successor_and_no_recent_reader() {
        let (store, v1) = store().await;
        let now = Timestamp::from_unix_micros(1_795_780_524_000_000);
        let hour = 3_600_000_000;
        // No newer version: refused, nothing changed.
        let error = retire_feed(&store, &retire_args(&[]), now)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("no newer live version"),
            "{error}"
        );
        let v2 = FeedId::parse("accounts.v2").unwrap();
        store.register(&v2).await.unwrap();
        // v2 still backfilling: still refused.
        assert!(retire_feed(&store, &retire_args(&[]), now).await.is_err());
        store.set_status(&v2, FeedStatus::Live).await.unwrap();
        // A reader an hour ago: refused with the default idle time, named in the message.
        let seen = headwater_store::ReaderSeen {
            feed: v1.clone(),
            reader: "statements".to_owned(),
            at: Timestamp::from_unix_micros(now.unix_micros() - hour),
            reads: 1,
        };
        store.record_readers(vec![seen]).await.unwrap();
        let error = retire_feed(&store, &retire_args(&[]), now)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("still read: statements"),
            "{error}"
        );
        assert_eq!(
            store.feed(&v1).await.unwrap().unwrap().status,
            FeedStatus::Backfilling
        );
        // Silent for longer than --idle-secs: retired.
        let said = retire_feed(&store, &retire_args(&["--idle-secs", "60"]), now)
            .await
            .unwrap();
        assert!(said.contains("naming accounts.v2"), "{said}");
        assert_eq!(
            store.feed(&v1).await.unwrap().unwrap().status,
            FeedStatus::Retired
        );
        let said = retire_feed(&store, &retire_args(&[]), now).await.unwrap();
        assert!(said.contains("already retired"), "{said}");
    }

    #[tokio::test]
    async fn retire_with_force_skips_the_checks() {
        let (store, v1) = store().await;
        let now = Timestamp::from_unix_micros(1_795_780_524_000_000);
        retire_feed(&store, &retire_args(&["--force"]), now)
            .await
            .unwrap();
        assert_eq!(
            store.feed(&v1).await.unwrap().unwrap().status,
            FeedStatus::Retired
        );
    }

    #[tokio::test]
    async fn tail_of_an_unknown_feed_names_the_known_ones() {
        let (store, _) = store().await;
        let mut args = tail_args(&[]);
        args.feed = FeedId::parse("accounts.v9").unwrap();
        let error = run_tail(&store, &args, &mut Vec::new()).await.unwrap_err();
        assert!(error.to_string().contains("feeds: accounts.v1"), "{error}");
    }
}
