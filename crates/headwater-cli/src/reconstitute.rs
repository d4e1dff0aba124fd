//! `headwater reconstitute URL`: asks a running consumer service's walker for a reconstitution
//! walk (`POST URL/reconstitute`) and follows it (`GET URL/reconstitute`) with a progress line
//! until it ends.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::body::Body;
use axum::http::{Method, StatusCode};
use clap::Args;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

use crate::text::count;

/// The route of the walker's admin endpoints on a consumer service.
const ROUTE: &str = "/reconstitute";
/// How often the walk's progress is asked for.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// The longest one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed progress requests in a row after which following gives up (the service went away).
const POLL_FAILURES_MAX: u32 = 20;
/// The most of an answer read.
const ANSWER_BYTES_MAX: usize = 1 << 20;

#[derive(Debug, Args)]
pub(crate) struct ReconstituteArgs {
    /// The consumer service's admin address, `http://HOST:PORT` (where it serves
    /// `/reconstitute`).
    #[arg(value_name = "URL")]
    url: String,
    /// The service's admin bearer token, if it asks for one.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "HEADWATER_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Ask for the walk and return at once, without following it.
    #[arg(long)]
    no_wait: bool,
    /// Print the walk's result as JSON (the service's own record of it) instead of text.
    #[arg(long)]
    json: bool,
}

/// One walk as the service shows it (`WalkProgress`).
#[derive(Debug, Deserialize)]
struct Walk {
    id: u64,
    state: String,
    #[serde(default)]
    resumed_after: Option<String>,
    listed: u64,
    behind: u64,
    applied: u64,
    failed: u64,
    requests: u64,
    #[serde(default)]
    current: Option<String>,
    elapsed_seconds: f64,
    subjects_per_second: f64,
    #[serde(default)]
    error: Option<String>,
}

/// The walker's state as the service shows it (`WalkerStatus`).
#[derive(Debug, Deserialize)]
struct Status {
    feed: String,
    running: Option<Walk>,
    last: Option<serde_json::Value>,
    requested: bool,
    walks: u64,
    runner: bool,
}

#[derive(Debug, Deserialize)]
struct Accepted {
    walk: u64,
    status: Status,
}

pub(crate) fn reconstitute(args: &ReconstituteArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(run(args))
}

async fn run(args: &ReconstituteArgs) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(&args.url, args.token.as_deref())?;
    let body = client.call(Method::POST, StatusCode::ACCEPTED).await?;
    let accepted: Accepted = serde_json::from_slice(&body).with_context(|| {
        format!(
            "POST {}: the answer is not a walk request's — is this a consumer service's admin \
             address?",
            client.url
        )
    })?;
    let walk = accepted.walk;
    let feed = &accepted.status.feed;
    if args.no_wait {
        match &accepted.status.running {
            Some(running) if running.id < walk => println!(
                "{feed}: walk #{walk} requested; it starts when walk #{} ends",
                running.id
            ),
            _ => println!("{feed}: walk #{walk} requested"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(100));
    let outcome = follow(&client, walk, &bar).await;
    bar.finish_and_clear();
    let (feed, last) = outcome?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&last)?);
    }
    let done: Walk = serde_json::from_value(last).context("the walk's record is not understood")?;
    if !args.json {
        println!("{feed}: {}", summary(&done));
    }
    let clean = done.state == "finished" && done.failed == 0;
    if !clean {
        if done.failed > 0 {
            eprintln!(
                "{} subjects could not be caught up (the service's log names them); the next walk \
                 tries them again",
                count(done.failed)
            );
        }
        if let Some(error) = &done.error {
            eprintln!("the walk was interrupted: {error}; the next walk resumes where it stopped");
        }
    }
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Follows the walker until walk `walk` (or a later one, which serves the request too) ends;
/// returns the feed and that walk's record.
async fn follow(
    client: &AdminClient,
    walk: u64,
    bar: &ProgressBar,
) -> anyhow::Result<(String, serde_json::Value)> {
    let mut failures = 0;
    loop {
        let status = match client.call(Method::GET, StatusCode::OK).await {
            Ok(body) => {
                failures = 0;
                serde_json::from_slice::<Status>(&body).with_context(|| {
                    format!("GET {}: the answer is not a walker's status", client.url)
                })?
            }
            Err(error) => {
                failures += 1;
                if failures >= POLL_FAILURES_MAX {
                    return Err(error.context(format!(
                        "lost the service while following walk #{walk} (it may still run there)"
                    )));
                }
                bar.set_message(format!(
                    "walk #{walk}: the service does not answer ({error:#})"
                ));
                tokio::time::sleep(POLL_INTERVAL).await;
                continue;
            }
        };
        if let Some(last) = &status.last
            && last.get("id").and_then(serde_json::Value::as_u64) >= Some(walk)
        {
            return Ok((status.feed, last.clone()));
        }
        match &status.running {
            Some(running) if running.id >= walk => bar.set_message(progress(running)),
            Some(running) => bar.set_message(format!(
                "walk #{walk} starts when walk #{} ends ({} subjects listed so far)",
                running.id,
                count(running.listed)
            )),
            None if !status.runner => bail!(
                "the service's walker stopped before walk #{walk} started (is the service \
                 shutting down?)"
            ),
            None if !status.requested && status.walks < walk => {
                bail!("the service no longer knows of walk #{walk} (it restarted?); ask again")
            }
            None => bar.set_message(format!("walk #{walk} is about to start")),
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The progress line of a running walk.
fn progress(walk: &Walk) -> String {
    let mut line = format!(
        "walk #{}: {} subjects listed, {} behind, {} events applied, {} failed — {} subjects/s",
        walk.id,
        count(walk.listed),
        count(walk.behind),
        count(walk.applied),
        count(walk.failed),
        crate::text::group(walk.subjects_per_second)
    );
    if let Some(current) = &walk.current {
        line.push_str(&format!(" — at {current}"));
    }
    line
}

/// The last line about an ended walk.
fn summary(walk: &Walk) -> String {
    let resumed = walk
        .resumed_after
        .as_ref()
        .map(|s| format!(", resumed after {s}"))
        .unwrap_or_default();
    format!(
        "walk #{} {} in {:.1} s{resumed}: {} subjects listed, {} behind, {} events applied, {} \
         failed ({} subjects/s, {} requests to the producer)",
        walk.id,
        walk.state,
        walk.elapsed_seconds,
        count(walk.listed),
        count(walk.behind),
        count(walk.applied),
        count(walk.failed),
        crate::text::group(walk.subjects_per_second),
        count(walk.requests)
    )
}

/// A client of one consumer service's walker routes.
struct AdminClient {
    base: String,
    url: String,
    token: Option<String>,
    client: Client<HttpConnector, Body>,
}

impl AdminClient {
    fn new(base: &str, token: Option<&str>) -> anyhow::Result<AdminClient> {
        if base.starts_with("https://") {
            bail!(
                "https is not supported by this build: reach the service's admin address over \
                 http on a private network"
            );
        }
        if !base.starts_with("http://") {
            bail!(
                "{base} is not an http:// URL (give the service's admin address, e.g. http://127.0.0.1:8081)"
            );
        }
        let base = base.trim_end_matches('/').to_owned();
        Ok(AdminClient {
            url: format!("{base}{ROUTE}"),
            base,
            token: token.map(str::to_owned),
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// Sends `method` to the walker's route; an answer other than `expected` is an error that
    /// says what the service said.
    async fn call(&self, method: Method, expected: StatusCode) -> anyhow::Result<Vec<u8>> {
        let url = &self.url;
        let mut request = axum::http::Request::builder()
            .method(method.clone())
            .uri(url)
            .header("accept", "application/json");
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request
            .body(Body::empty())
            .with_context(|| format!("{url} is not a valid URL"))?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(request))
            .await
            .with_context(|| format!("{method} {url}: no answer within {REQUEST_TIMEOUT:?}"))?
            .map_err(|error| {
                let reason = causes(&error);
                if error.is_connect() {
                    anyhow::anyhow!(
                        "cannot reach the consumer service at {}: {reason} (is it running, and is \
                         this its admin address?)",
                        self.base
                    )
                } else {
                    anyhow::anyhow!("{method} {url}: {reason}")
                }
            })?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), ANSWER_BYTES_MAX)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("{method} {url}: reading the answer: {e}"))?
            .to_bytes()
            .to_vec();
        if status != expected {
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
            let hint = match status {
                StatusCode::UNAUTHORIZED => {
                    " (give the service's admin token with --token or HEADWATER_ADMIN_TOKEN)"
                }
                StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => {
                    " (is this a consumer service's admin address, with its walker's routes?)"
                }
                _ => "",
            };
            bail!("{method} {url}: {status} {said}{hint}");
        }
        Ok(body)
    }
}

/// What an error and its causes say, once each: `tcp connect error: Connection refused (os
/// error 111)`.
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut said: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(error) = next {
        let text = error.to_string();
        if !said.iter().any(|s| s.contains(&text)) {
            said.push(text);
        }
        next = error.source();
    }
    // The client's own outermost words ("client error (Connect)") say nothing more.
    if said.len() > 1 {
        said.remove(0);
    }
    said.join(": ")
}
