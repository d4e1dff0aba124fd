//! `headwater feeds URL` and `headwater tail URL` over a running producer's feed API
//! (`http://HOST:PORT`), as a consumer sees it: with a bearer token, through long polling.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::body::Body;
use headwater_core::{FeedId, Subject};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::feed_tools::{PublisherLine, render_publishers};
use crate::text::count;

/// The environment variable that holds the bearer token when `--token` is not given.
pub(crate) const TOKEN_ENV: &str = "HEADWATER_TOKEN";
/// How long one long poll of `tail --follow` waits, in milliseconds.
const LONG_POLL_MS: u64 = 20_000;
/// How often `tail --follow --subject` asks again (the subject endpoint does not long-poll).
const SUBJECT_POLL: Duration = Duration::from_secs(1);
/// The longest one request may take (a long poll plus slack).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Events per page of `tail`.
const PAGE_EVENTS: u64 = 1_000;

/// Whether a STORE argument names a feed API rather than a store.
pub(crate) fn is_http(target: &str) -> bool {
    target.starts_with("http://") || target.starts_with("https://")
}

/// A client of one producer's feed API.
pub(crate) struct FeedApiClient {
    base: String,
    token: String,
    client: Client<HttpConnector, Body>,
}

impl FeedApiClient {
    pub(crate) fn new(base: &str, token: Option<&str>) -> anyhow::Result<FeedApiClient> {
        if base.starts_with("https://") {
            bail!(
                "https is not supported by this build: reach the feed API over http on a private network"
            );
        }
        let token = match token {
            Some(token) => token.to_owned(),
            None => std::env::var(TOKEN_ENV).with_context(|| {
                format!("the feed API needs a bearer token: give --token or set {TOKEN_ENV}")
            })?,
        };
        Ok(FeedApiClient {
            base: base.trim_end_matches('/').to_owned(),
            token,
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// GETs `path_and_query`; a non-200 answer is an error carrying its problem's title and
    /// detail.
    async fn get(&self, path_and_query: &str) -> anyhow::Result<Vec<u8>> {
        let url = format!("{}{path_and_query}", self.base);
        let request = axum::http::Request::get(&url)
            .header("authorization", format!("Bearer {}", self.token))
            .header("accept", "application/json")
            .body(Body::empty())
            .with_context(|| format!("{url} is not a valid URL"))?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(request))
            .await
            .with_context(|| format!("GET {url}: no answer within {REQUEST_TIMEOUT:?}"))?
            .with_context(|| format!("GET {url}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .with_context(|| format!("GET {url}: reading the answer"))?
            .to_bytes()
            .to_vec();
        if status != 200 {
            #[derive(Deserialize)]
            struct Problem {
                title: Option<String>,
                detail: Option<String>,
            }
            let said = match serde_json::from_slice::<Problem>(&body) {
                Ok(p) => [p.title, p.detail]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(": "),
                Err(_) => String::from_utf8_lossy(&body).chars().take(200).collect(),
            };
            bail!("GET {url}: {status} {said}");
        }
        Ok(body)
    }
}

#[derive(Debug, Deserialize)]
struct FeedEntry {
    name: String,
    version: u32,
    status: String,
    head: u64,
    #[serde(default)]
    readers: Vec<ReaderEntry>,
    /// Absent from a feed API older than publishers.
    #[serde(default)]
    publishers: Vec<PublisherEntry>,
}

#[derive(Debug, Deserialize)]
struct PublisherEntry {
    publisher: String,
    cursor: u64,
    lag: u64,
    lag_seconds: f64,
    updated_at: String,
}

#[derive(Debug, Deserialize)]
struct ReaderEntry {
    reader: String,
    last_read_at: String,
    reads: u64,
}

async fn feed_list(client: &FeedApiClient) -> anyhow::Result<Vec<FeedEntry>> {
    let body = client.get("/feeds").await?;
    serde_json::from_slice(&body).context("GET /feeds: not a feed listing")
}

/// `headwater feeds http://…`: the feeds the token may read, as the API lists them.
pub(crate) async fn feeds(client: &FeedApiClient, as_json: bool) -> anyhow::Result<String> {
    if as_json {
        let body = client.get("/feeds").await?;
        let value: serde_json::Value =
            serde_json::from_slice(&body).context("GET /feeds: not JSON")?;
        return Ok(format!("{}\n", serde_json::to_string_pretty(&value)?));
    }
    let feeds = feed_list(client).await?;
    let mut out = String::new();
    let _ = writeln!(out, "feed API   {}", client.base);
    if feeds.is_empty() {
        let _ = writeln!(out, "\nno feeds this token may read");
        return Ok(out);
    }
    out.push_str("\n| feed | status | head | readers |\n| --- | --- | ---: | --- |\n");
    let mut publishers = Vec::new();
    for feed in feeds {
        publishers.extend(feed.publishers.iter().map(|p| PublisherLine {
            feed: format!("{}.v{}", feed.name, feed.version),
            publisher: p.publisher.clone(),
            cursor: p.cursor,
            lag: p.lag,
            lag_seconds: p.lag_seconds,
            updated_at: p.updated_at.clone(),
        }));
        let readers = if feed.readers.is_empty() {
            "none".to_owned()
        } else {
            feed.readers
                .iter()
                .map(|r| {
                    format!(
                        "{} ({} reads, last {})",
                        r.reader,
                        count(r.reads),
                        r.last_read_at
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let _ = writeln!(
            out,
            "| {}.v{} | {} | {} | {readers} |",
            feed.name,
            feed.version,
            feed.status,
            count(feed.head)
        );
    }
    out.push_str(&render_publishers(&publishers));
    Ok(out)
}

#[derive(Debug, Deserialize)]
struct WireEvent {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    subject: String,
    time: String,
    data: Box<serde_json::value::RawValue>,
    sequence: u64,
    position: u64,
}

/// `headwater tail http://…`: the feed's (or a subject's) events, and with `follow` the new ones
/// by long polling, printed to `out`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn tail(
    client: &FeedApiClient,
    feed: &FeedId,
    subject: Option<&Subject>,
    after: Option<u64>,
    last: u64,
    follow: bool,
    as_json: bool,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    let base = format!("/feeds/{}/{}", feed.name, feed.version);
    let mut cursor = match (subject, after) {
        (_, Some(after)) => after,
        (Some(_), None) => 0,
        (None, None) => {
            let feeds = feed_list(client).await?;
            let Some(entry) = feeds
                .iter()
                .find(|f| f.name == feed.name.as_str() && f.version == feed.version.get())
            else {
                bail!("the feed API lists no feed {feed} for this token");
            };
            entry.head.saturating_sub(last)
        }
    };
    loop {
        let wait = if follow && subject.is_none() {
            LONG_POLL_MS
        } else {
            0
        };
        let path = match subject {
            Some(subject) => {
                format!("{base}/subjects/{subject}?after={cursor}&limit={PAGE_EVENTS}")
            }
            None => format!("{base}?after={cursor}&limit={PAGE_EVENTS}&timeout_ms={wait}"),
        };
        let body = client.get(&path).await?;
        let events: Vec<&serde_json::value::RawValue> =
            serde_json::from_slice(&body).with_context(|| format!("GET {path}: not a page"))?;
        for raw in &events {
            let event: WireEvent = serde_json::from_str(raw.get())
                .with_context(|| format!("GET {path}: not a CloudEvent of a feed"))?;
            if as_json {
                writeln!(out, "{}", raw.get())?;
            } else {
                writeln!(
                    out,
                    "#{} {} {} seq {} {} {} {}",
                    event.position,
                    event.time,
                    event.subject,
                    event.sequence,
                    event.event_type,
                    event.data.get(),
                    event.id
                )?;
            }
            cursor = if subject.is_some() {
                event.sequence
            } else {
                event.position
            };
        }
        if !events.is_empty() {
            continue;
        }
        if !follow {
            return Ok(());
        }
        out.flush()?;
        if subject.is_some() {
            tokio::time::sleep(SUBJECT_POLL).await;
        }
    }
}
