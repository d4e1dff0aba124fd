//! [`FeedClient`]: the feed API's HTTP client (docs/design/feed-api.md), the [`Upstream`] of a
//! consumer whose producer serves its feeds over HTTP.
//!
//! One client per producer: it holds a pool of keep-alive connections (hyper-util's client) and
//! is cheap to clone. Every request has a deadline (the request timeout, plus the wait of a long
//! poll), every answer a size bound, and every answer is checked before it is returned: a page
//! must hold the feed's events in order after the cursor asked for, so a consumer never applies
//! what a confused or hostile server sent. A request that fails on a kept-alive connection the
//! server closed under it is asked once more on a new connection (every request is an
//! idempotent GET); a refused connection is final and left to the caller's backoff.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use headwater_core::limits::{FEED_PAGE_EVENTS_MAX, SUBJECT_PAGE_MAX};
use headwater_core::{FeedId, FeedName, FeedStatus, FeedVersion, Sequence, Subject};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, HeaderValue, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::upstream::{FeedListing, FeedReader, Refusal};
use crate::{IntegrationEvent, SubjectHead, Upstream, UpstreamError};

/// How long one request may take by default, connecting and reading the whole answer included
/// (a long poll may take its wait on top of it).
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// The largest answer read by default: a page holds at most 16 MiB of data
/// (`READ_PAGE_BYTES_MAX`) plus the CloudEvent envelopes of up to 10,000 events.
pub const RESPONSE_BYTES_MAX_DEFAULT: usize = 64 * 1024 * 1024;
/// The longest wait of one long poll: the feed API refuses a longer `timeout_ms`
/// (`LONG_POLL_TIMEOUT_MS_MAX`), so a longer wait is cut to it (the caller asks again).
pub const LONG_POLL_WAIT_MAX: Duration = Duration::from_secs(30);
/// The longest token sent (the feed API's `TOKEN_BYTES_MAX`).
pub const TOKEN_BYTES_MAX: usize = 4096;
/// At most this much of a problem's `type`, `title` or `detail`, or of a base URL, is quoted in
/// an error.
const QUOTE_BYTES_MAX: usize = 256;

/// Why a [`FeedClient`] could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The base URL is not `http://host[:port][/prefix]`.
    #[error("the feed API's URL {url:?} is not usable: {reason}")]
    Url { url: String, reason: String },
    /// The token is empty, too long or not visible ASCII (it is not quoted).
    #[error("the token is not usable: it must be 1 to {TOKEN_BYTES_MAX} bytes of visible ASCII")]
    Token,
}

/// A client of one producer's feed API (`http://host:port`), implementing [`Upstream`].
///
/// Its `Debug` shows the base URL and the options, never the token; the token is sent only in
/// the `Authorization` header and never quoted in an error, even when the server echoes it.
#[derive(Clone)]
pub struct FeedClient {
    /// Scheme and authority plus any path prefix, without a trailing slash.
    base: String,
    token: Option<String>,
    authorization: Option<HeaderValue>,
    timeout: Duration,
    response_bytes_max: usize,
    http: Client<HttpConnector, Empty<Bytes>>,
}

impl fmt::Debug for FeedClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FeedClient")
            .field("base", &self.base)
            .field(
                "token",
                &if self.token.is_some() {
                    "<hidden>"
                } else {
                    "<none>"
                },
            )
            .field("timeout", &self.timeout)
            .field("response_bytes_max", &self.response_bytes_max)
            .finish_non_exhaustive()
    }
}

impl FeedClient {
    /// A client of the feed API at `base_url` (`http://host:port`, optionally with a path prefix
    /// when a proxy serves the API under one), sending `token` as a bearer token (`None`: no
    /// `Authorization` header; the API then refuses every read).
    ///
    /// Connects lazily: a producer that is down now is no error here.
    ///
    /// # Errors
    /// [`ClientError::Url`] for a URL that does not parse, is not `http://` (https is not
    /// supported by this build: reach the API on a private network), has no host, carries user
    /// info (`user:password@`: give the token instead), a query or a fragment;
    /// [`ClientError::Token`] for a token that is empty, longer than [`TOKEN_BYTES_MAX`] or not
    /// visible ASCII.
    pub fn new(base_url: &str, token: Option<String>) -> Result<FeedClient, ClientError> {
        let base = parse_base(base_url)?;
        let authorization = match &token {
            None => None,
            Some(token) => {
                if token.is_empty()
                    || token.len() > TOKEN_BYTES_MAX
                    || !token.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(ClientError::Token);
                }
                let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| ClientError::Token)?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.enforce_http(true);
        Ok(FeedClient {
            base,
            token,
            authorization,
            timeout: REQUEST_TIMEOUT_DEFAULT,
            response_bytes_max: RESPONSE_BYTES_MAX_DEFAULT,
            http: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// Sets how long one request may take, connecting and reading the whole answer included
    /// (default [`REQUEST_TIMEOUT_DEFAULT`]); a long poll may take its wait on top of it.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> FeedClient {
        self.timeout = timeout;
        self
    }

    /// Sets the largest answer read (default [`RESPONSE_BYTES_MAX_DEFAULT`]); a larger one is
    /// [`UpstreamError::Malformed`].
    #[must_use]
    pub fn with_response_bytes_max(mut self, bytes: usize) -> FeedClient {
        self.response_bytes_max = bytes;
        self
    }

    /// The base URL requests go to (without a trailing slash).
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// `GET /feeds`: the feeds the token may read, with their status, head and readers, in the
    /// API's order (by name, then version).
    ///
    /// # Errors
    /// As [`FeedClient::read_subject`]; [`UpstreamError::Malformed`] also for a listing whose
    /// names, versions or statuses are not valid.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future drops the request; nothing is consumed.
    pub async fn feeds(&self) -> Result<Vec<FeedListing>, UpstreamError> {
        #[derive(Deserialize)]
        struct WireFeed {
            name: String,
            version: u32,
            status: String,
            head: u64,
            #[serde(default)]
            readers: Vec<WireReader>,
        }
        #[derive(Deserialize)]
        struct WireReader {
            reader: String,
            #[serde(default)]
            reads: u64,
            #[serde(default)]
            last_read_at: String,
        }
        let path = "/feeds";
        let body = self.get(path, "application/json", self.timeout).await?;
        let wire: Vec<WireFeed> = serde_json::from_slice(&body).map_err(|e| {
            UpstreamError::Malformed(format!("GET {path}: not a feed listing: {e}"))
        })?;
        wire.into_iter()
            .map(|f| {
                let bad = |what: String| UpstreamError::Malformed(format!("GET {path}: {what}"));
                let name = FeedName::new(f.name).map_err(|e| bad(e.to_string()))?;
                let version = FeedVersion::new(f.version)
                    .ok_or_else(|| bad(format!("feed {name} has version 0")))?;
                let status = FeedStatus::parse(&f.status).map_err(|e| bad(e.to_string()))?;
                let readers = f
                    .readers
                    .into_iter()
                    .map(|r| FeedReader {
                        reader: quote(&r.reader),
                        reads: r.reads,
                        last_read_at: quote(&r.last_read_at),
                    })
                    .collect();
                Ok(FeedListing {
                    feed: FeedId::new(name, version),
                    status,
                    head: f.head,
                    readers,
                })
            })
            .collect()
    }

    /// GETs `path_and_query` (which starts with `/`) within `timeout` and returns the body of a
    /// 200; anything else is an [`UpstreamError`] naming the request (never the token).
    async fn get(
        &self,
        path_and_query: &str,
        accept: &'static str,
        timeout: Duration,
    ) -> Result<Bytes, UpstreamError> {
        match tokio::time::timeout(timeout, self.get_unbounded(path_and_query, accept)).await {
            Ok(answer) => answer,
            Err(_) => Err(UpstreamError::Unavailable(format!(
                "GET {path_and_query}: no complete answer within {timeout:?}"
            ))),
        }
    }

    async fn get_unbounded(
        &self,
        path_and_query: &str,
        accept: &'static str,
    ) -> Result<Bytes, UpstreamError> {
        let uri: Uri = format!("{}{path_and_query}", self.base)
            .parse()
            .map_err(|e| {
                UpstreamError::from(Refusal::new(format!(
                    "GET {path_and_query}: not a valid URL: {e}"
                )))
            })?;
        let mut retried = false;
        let response = loop {
            let mut request = Request::get(uri.clone()).header(ACCEPT, accept).header(
                USER_AGENT,
                concat!("headwater-consume/", env!("CARGO_PKG_VERSION")),
            );
            if let Some(authorization) = &self.authorization {
                request = request.header(AUTHORIZATION, authorization.clone());
            }
            let request = request.body(Empty::new()).map_err(|e| {
                UpstreamError::from(Refusal::new(format!(
                    "GET {path_and_query}: not a valid request: {e}"
                )))
            })?;
            match self.http.request(request).await {
                Ok(response) => break response,
                // A kept-alive connection that the server (or a proxy) closed as the request went
                // out: every request here is an idempotent GET, so once more, on a new
                // connection. A refused connection or an answer that is not HTTP is final.
                Err(e) if !retried && !e.is_connect() && !is_parse_error(&e) => {
                    tracing::debug!(path = path_and_query, error = %self.scrub(error_chain(&e)), "asking again on a new connection");
                    retried = true;
                }
                Err(e) => return Err(self.request_error(path_and_query, &e)),
            }
        };
        let status = response.status();
        let announced = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|n| n > self.response_bytes_max as u64) {
            return Err(UpstreamError::Malformed(format!(
                "GET {path_and_query}: {status}, an answer of {} bytes (more than {})",
                announced.unwrap_or_default(),
                self.response_bytes_max
            )));
        }
        let body = Limited::new(response.into_body(), self.response_bytes_max)
            .collect()
            .await
            .map(http_body_util::Collected::to_bytes);
        let body = match body {
            Ok(body) => body,
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(UpstreamError::Malformed(format!(
                    "GET {path_and_query}: {status}, an answer of more than {} bytes",
                    self.response_bytes_max
                )));
            }
            Err(e) => {
                return Err(UpstreamError::Unavailable(self.scrub(format!(
                    "GET {path_and_query}: {status}, reading the answer failed: {}",
                    error_chain(&*e)
                ))));
            }
        };
        if status == StatusCode::OK {
            return Ok(body);
        }
        let problem = Problem::parse(&body).map(|p| p.scrubbed(|t| self.scrub(t)));
        let text = format!(
            "GET {path_and_query}: {status}{}",
            problem.as_ref().map(Problem::text).unwrap_or_default()
        );
        let text = self.scrub(text);
        Err(match status.as_u16() {
            408 | 429 | 500..=599 => UpstreamError::Unavailable(text),
            400..=499 => {
                let problem = problem.unwrap_or_default();
                UpstreamError::from(Refusal {
                    status: Some(status.as_u16()),
                    successor: problem
                        .successor
                        .as_deref()
                        .and_then(|s| FeedId::parse(s).ok()),
                    problem_type: problem.problem_type,
                    title: problem.title,
                    detail: problem.detail,
                    message: text,
                })
            }
            _ => UpstreamError::Malformed(format!("{text} (not an answer of the feed API)")),
        })
    }

    fn request_error(
        &self,
        path_and_query: &str,
        error: &hyper_util::client::legacy::Error,
    ) -> UpstreamError {
        let text = self.scrub(format!("GET {path_and_query}: {}", error_chain(error)));
        // An answer that is not HTTP is not understood; anything else (refused or lost
        // connection, a reset) may go away by itself.
        if is_parse_error(error) {
            UpstreamError::Malformed(text)
        } else {
            UpstreamError::Unavailable(text)
        }
    }

    /// `text` with the token, should a server have echoed it, replaced.
    fn scrub(&self, text: String) -> String {
        match &self.token {
            Some(token) if text.contains(token.as_str()) => text.replace(token.as_str(), "<token>"),
            _ => text,
        }
    }

    fn feed_path(feed: &FeedId) -> String {
        format!(
            "/feeds/{}/v{}",
            encode_segment(feed.name.as_str()),
            feed.version.get()
        )
    }
}

#[async_trait]
impl Upstream for FeedClient {
    /// `GET /feeds/{name}/v{version}/subjects/{subject}?after=&limit=`, with `limit` lowered to
    /// `FEED_PAGE_EVENTS_MAX` (a limit of 0 asks nothing and gives `[]`).
    ///
    /// # Errors
    /// [`UpstreamError::Unavailable`] when the producer cannot be reached, does not answer within
    /// the request timeout, or answers 408, 429 or 5xx; [`UpstreamError::Refused`] for a 4xx
    /// (401 bad token, 403 feed outside the token's scope, 404 unknown feed, 410 retired feed,
    /// 400 bad parameter), with the problem in structured form ([`Refusal`]: status, type,
    /// title, detail, and for a retired feed its `successor`);
    /// [`UpstreamError::Malformed`] for an answer that is not HTTP, too large, not a page of
    /// CloudEvents, or not this subject's events `after + 1, after + 2, …` of this feed.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future drops the request; nothing is consumed.
    async fn read_subject(
        &self,
        feed: &FeedId,
        subject: &Subject,
        after: Sequence,
        limit: u64,
    ) -> Result<Vec<IntegrationEvent>, UpstreamError> {
        let limit = limit.min(FEED_PAGE_EVENTS_MAX);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let path = format!(
            "{}/subjects/{}?after={}&limit={limit}",
            FeedClient::feed_path(feed),
            encode_segment(subject.as_str()),
            after.get()
        );
        let body = self
            .get(&path, "application/cloudevents-batch+json", self.timeout)
            .await?;
        let events = decode_page(&path, &body, limit)?;
        let mut expected = after.get();
        for event in &events {
            expected = expected.saturating_add(1);
            if event.feed != *feed || event.subject != *subject || event.sequence.get() != expected
            {
                return Err(UpstreamError::Malformed(format!(
                    "GET {path}: event {} is {} of {} at sequence {}, not {subject} of {feed} at \
                     sequence {expected}",
                    event.id, event.subject, event.feed, event.sequence
                )));
            }
        }
        Ok(events)
    }

    /// `GET /feeds/{name}/v{version}/subjects?after=&limit=`, with `limit` lowered to
    /// `SUBJECT_PAGE_MAX` (a limit of 0 asks nothing and gives `[]`).
    ///
    /// # Errors
    /// As [`FeedClient::read_subject`]; [`UpstreamError::Malformed`] also for a listing whose
    /// subjects are not valid, not after `after` in increasing byte order, or have a head of 0.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future drops the request; nothing is consumed.
    async fn subjects(
        &self,
        feed: &FeedId,
        after: Option<&Subject>,
        limit: u64,
    ) -> Result<Vec<SubjectHead>, UpstreamError> {
        #[derive(Deserialize)]
        struct WireHead {
            subject: String,
            sequence: u64,
        }
        let limit = limit.min(SUBJECT_PAGE_MAX);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut path = format!("{}/subjects?limit={limit}", FeedClient::feed_path(feed));
        if let Some(after) = after {
            path.push_str("&after=");
            path.push_str(&encode_segment(after.as_str()));
        }
        let body = self.get(&path, "application/json", self.timeout).await?;
        let wire: Vec<WireHead> = serde_json::from_slice(&body).map_err(|e| {
            UpstreamError::Malformed(format!("GET {path}: not a subject listing: {e}"))
        })?;
        if wire.len() as u64 > limit {
            return Err(UpstreamError::Malformed(format!(
                "GET {path}: {} subjects, more than the limit",
                wire.len()
            )));
        }
        let mut heads: Vec<SubjectHead> = Vec::with_capacity(wire.len());
        for head in wire {
            let subject = Subject::new(head.subject).map_err(|e| {
                UpstreamError::Malformed(format!("GET {path}: a listed subject: {e}"))
            })?;
            let previous = heads.last().map(|h| &h.subject).or(after);
            if previous.is_some_and(|p| p.as_str().as_bytes() >= subject.as_str().as_bytes()) {
                return Err(UpstreamError::Malformed(format!(
                    "GET {path}: subject {subject} is out of order"
                )));
            }
            if head.sequence == 0 {
                return Err(UpstreamError::Malformed(format!(
                    "GET {path}: subject {subject} is listed with no event (sequence 0)"
                )));
            }
            heads.push(SubjectHead {
                subject,
                sequence: Sequence(head.sequence),
            });
        }
        Ok(heads)
    }

    /// `GET /feeds/{name}/v{version}?after=&limit=&timeout_ms=`, with `limit` lowered to
    /// `FEED_PAGE_EVENTS_MAX` (a limit of 0 asks nothing and gives `[]`) and `wait` to
    /// [`LONG_POLL_WAIT_MAX`]; the request may take `wait` plus the request timeout.
    ///
    /// # Errors
    /// As [`FeedClient::read_subject`]; [`UpstreamError::Malformed`] also for a page whose events
    /// are not of this feed, or not at increasing positions after `after`.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future drops the request (the server ends its wait when the
    /// connection closes); nothing is consumed.
    async fn read_feed(
        &self,
        feed: &FeedId,
        after: u64,
        limit: u64,
        wait: Duration,
    ) -> Result<Vec<IntegrationEvent>, UpstreamError> {
        let limit = limit.min(FEED_PAGE_EVENTS_MAX);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let wait = wait.min(LONG_POLL_WAIT_MAX);
        let path = format!(
            "{}?after={after}&limit={limit}&timeout_ms={}",
            FeedClient::feed_path(feed),
            wait.as_millis()
        );
        let body = self
            .get(
                &path,
                "application/cloudevents-batch+json",
                self.timeout.saturating_add(wait),
            )
            .await?;
        let events = decode_page(&path, &body, limit)?;
        let mut previous = after;
        for event in &events {
            if event.feed != *feed || event.position <= previous {
                return Err(UpstreamError::Malformed(format!(
                    "GET {path}: event {} is of {} at position {}, not of {feed} after position \
                     {previous}",
                    event.id, event.feed, event.position
                )));
            }
            previous = event.position;
        }
        Ok(events)
    }

    // --- The producer's feed listing (the v1 → v2 switch, G10) ---

    /// `GET /feeds`, the entry of `feed` (`None` when the token's scope does not list it).
    ///
    /// # Errors
    /// As [`FeedClient::feeds`].
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future drops the request; nothing is consumed.
    async fn feed_listing(&self, feed: &FeedId) -> Result<Option<FeedListing>, UpstreamError> {
        Ok(self.feeds().await?.into_iter().find(|f| f.feed == *feed))
    }
}

fn decode_page(
    path: &str,
    body: &[u8],
    limit: u64,
) -> Result<Vec<IntegrationEvent>, UpstreamError> {
    let events = IntegrationEvent::from_cloud_event_batch(body)
        .map_err(|e| UpstreamError::Malformed(format!("GET {path}: {e}")))?;
    if events.len() as u64 > limit {
        return Err(UpstreamError::Malformed(format!(
            "GET {path}: {} events, more than the limit",
            events.len()
        )));
    }
    Ok(events)
}

/// Parses and checks a base URL; returns it without a trailing slash.
fn parse_base(base_url: &str) -> Result<String, ClientError> {
    let refuse = |reason: &str| ClientError::Url {
        url: quote(base_url),
        reason: reason.to_owned(),
    };
    if base_url.contains('@') {
        // Do not quote it: the user info may hold a password.
        return Err(ClientError::Url {
            url: "(not quoted: it holds user info)".to_owned(),
            reason: "user info (`user:password@`) is not supported: give the token instead"
                .to_owned(),
        });
    }
    if base_url.contains(['?', '#']) {
        return Err(refuse("a base URL has no query or fragment"));
    }
    let uri: Uri = base_url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| refuse(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(refuse(
                "https is not supported by this build: reach the feed API over http on a \
                 private network",
            ));
        }
        _ => return Err(refuse("the URL must start with http://")),
    }
    let Some(authority) = uri.authority() else {
        return Err(refuse("the URL names no host"));
    };
    if authority.host().is_empty() {
        return Err(refuse("the URL names no host"));
    }
    let prefix = uri.path().trim_end_matches('/');
    Ok(format!("http://{authority}{prefix}"))
}

/// Percent-encodes a path segment or query value: every byte but the URL's "unreserved" set
/// (letters, digits, `-` `_` `.` `~`), and the dots of a segment `.` or `..` (which a path
/// normaliser would take as "here" or "up").
fn encode_segment(text: &str) -> String {
    let dots_only = !text.is_empty() && text.bytes().all(|b| b == b'.');
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        let keep = byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'~');
        if keep || (byte == b'.' && !dots_only) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The parts of an RFC 9457 problem body a consumer uses, each bounded and without control
/// characters ([`quote`]).
#[derive(Debug, Default, PartialEq, Eq)]
struct Problem {
    problem_type: Option<String>,
    title: Option<String>,
    detail: Option<String>,
    successor: Option<String>,
}

impl Problem {
    /// `None` when the body is not a JSON object.
    fn parse(body: &[u8]) -> Option<Problem> {
        #[derive(Deserialize)]
        struct Wire {
            #[serde(rename = "type")]
            problem_type: Option<String>,
            title: Option<String>,
            detail: Option<String>,
            successor: Option<String>,
        }
        let wire: Wire = serde_json::from_slice(body).ok()?;
        let bounded = |part: Option<String>| part.map(|p| quote(&p));
        Some(Problem {
            problem_type: bounded(wire.problem_type),
            title: bounded(wire.title),
            detail: bounded(wire.detail),
            successor: bounded(wire.successor),
        })
    }

    /// Each part passed through `scrub` (a server that echoed the token).
    fn scrubbed(self, scrub: impl Fn(String) -> String) -> Problem {
        Problem {
            problem_type: self.problem_type.map(&scrub),
            title: self.title.map(&scrub),
            detail: self.detail.map(&scrub),
            successor: self.successor.map(&scrub),
        }
    }

    /// `: type: title: detail (successor: …)`.
    fn text(&self) -> String {
        let mut text = String::new();
        for part in [&self.problem_type, &self.title, &self.detail]
            .into_iter()
            .flatten()
        {
            text.push_str(": ");
            text.push_str(part);
        }
        if let Some(successor) = &self.successor {
            text.push_str(" (successor: ");
            text.push_str(successor);
            text.push(')');
        }
        text
    }
}

/// At most [`QUOTE_BYTES_MAX`] bytes of `text` (cut at a character boundary), control
/// characters replaced.
fn quote(text: &str) -> String {
    let mut end = text.len().min(QUOTE_BYTES_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out: String = text[..end]
        .chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect();
    if end < text.len() {
        out.push('…');
    }
    out
}

/// Whether hyper found the answer not to be HTTP.
fn is_parse_error(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse)
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// An error and its sources, `: `-separated (hyper's own texts are terse: the cause is below).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(encode_segment("a-b_c.d~e9"), "a-b_c.d~e9");
        assert_eq!(encode_segment("."), "%2E");
        assert_eq!(encode_segment(".."), "%2E%2E");
        assert_eq!(encode_segment("..a"), "..a");
        assert_eq!(encode_segment("a/b c?%"), "a%2Fb%20c%3F%25");
        assert_eq!(encode_segment("é"), "%C3%A9");
    }

    #[test]
    fn base_urls_are_checked() {
        for (url, base) in [
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
            ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
            ("http://host/prefix/", "http://host/prefix"),
            ("http://[::1]:1", "http://[::1]:1"),
        ] {
            assert_eq!(parse_base(url).unwrap(), base, "{url}");
        }
        for url in [
            "",
            "127.0.0.1:8080",
            "https://host",
            "ftp://host",
            "http://",
            "http://host?x=1",
            "http://host/#f",
            "/feeds",
            "http://ho st",
        ] {
            assert!(parse_base(url).is_err(), "{url:?} was accepted");
        }
        let error = parse_base("http://user:secret@host")
            .unwrap_err()
            .to_string();
        assert!(!error.contains("secret"), "{error}");
    }

    #[test]
    fn tokens_are_checked_and_never_shown() {
        for token in [
            "",
            "with space",
            "tab\t",
            "é",
            &"x".repeat(TOKEN_BYTES_MAX + 1),
        ] {
            let error = FeedClient::new("http://h", Some(token.to_owned())).unwrap_err();
            assert!(matches!(error, ClientError::Token), "{token:?}");
        }
        let client = FeedClient::new("http://h", Some("s3cret-token".to_owned())).unwrap();
        let shown = format!("{client:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("http://h"), "{shown}");
        assert_eq!(
            client.scrub("said s3cret-token twice: s3cret-token".to_owned()),
            "said <token> twice: <token>"
        );
    }

    #[test]
    fn problems_are_quoted_bounded() {
        let body = br#"{"type":"https://headwater.dev/problems/feed-retired","title":"Feed retired","status":410,"detail":"a\nb","successor":"accounts.v2"}"#;
        let problem = Problem::parse(body).unwrap();
        assert_eq!(
            problem.text(),
            ": https://headwater.dev/problems/feed-retired: Feed retired: a\u{fffd}b (successor: accounts.v2)"
        );
        assert_eq!(problem.successor.as_deref(), Some("accounts.v2"));
        assert_eq!(Problem::parse(b"<html>"), None);
        let long = format!(r#"{{"detail":"{}"}}"#, "é".repeat(QUOTE_BYTES_MAX));
        let text = Problem::parse(long.as_bytes()).unwrap().text();
        assert!(text.len() <= QUOTE_BYTES_MAX + 8, "{}", text.len());
    }
}
