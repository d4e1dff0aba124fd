//! The routes and their handlers. Every answer that is not a 200 is an [`ApiError`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use headwater_core::limits::{FEED_PAGE_EVENTS_MAX, SUBJECT_PAGE_MAX};
use headwater_core::{FeedId, FeedName, FeedPosition, FeedStatus, FeedVersion, Sequence, Subject};
use headwater_store::FeedEvent;
use prometheus_client::registry::Registry;
use tower_http::catch_panic::CatchPanicLayer;

use crate::auth::Reader;
use crate::metrics::{FeedLabels, RequestLabels, RouteLabels};
use crate::problem::{ApiError, ProblemType, problem_response};
use crate::wire;
use crate::{
    AppState, FEED_PAGE_EVENTS_DEFAULT, LONG_POLL_TIMEOUT_MS_MAX, MetricsAccess, OPENAPI_JSON,
    SUBJECT_PAGE_DEFAULT,
};

/// The largest `after` (a feed position or a sequence) a request may give: positions and
/// sequences are signed 64-bit integers in both backends' tables, as the OpenAPI document says
/// (`int64`).
const AFTER_MAX: u64 = i64::MAX as u64;

/// The route templates (also the `route` label of the request metrics).
pub(crate) const ROUTE_FEEDS: &str = "/feeds";
pub(crate) const ROUTE_FEED: &str = "/feeds/{name}/{version}";
pub(crate) const ROUTE_SUBJECTS: &str = "/feeds/{name}/{version}/subjects";
pub(crate) const ROUTE_SUBJECT: &str = "/feeds/{name}/{version}/subjects/{subject}";
pub(crate) const ROUTE_OPENAPI: &str = "/openapi.json";
pub(crate) const ROUTE_METRICS: &str = "/metrics";

/// Error details quote at most this much of a refused value.
const QUOTED_BYTES_MAX: usize = 64;
/// The most query parameters a request may carry (each route takes at most three).
const QUERY_PAIRS_MAX: usize = 8;

#[derive(Clone)]
struct RouterState {
    app: Arc<AppState>,
    registry: Arc<Registry>,
}

pub(crate) fn router(app: Arc<AppState>, registry: Arc<Registry>) -> Router {
    let state = RouterState { app, registry };
    Router::new()
        .route(ROUTE_FEEDS, get(list_feeds))
        .route(ROUTE_FEED, get(read_feed))
        .route(ROUTE_SUBJECTS, get(list_subjects))
        .route(ROUTE_SUBJECT, get(read_subject))
        .route(ROUTE_OPENAPI, get(openapi))
        .route(ROUTE_METRICS, get(render_metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CatchPanicLayer::custom(|_| {
            tracing::error!("a feed API handler panicked");
            problem_response(
                ProblemType::Internal,
                "the request failed; the producer's logs say why",
                None,
            )
        }))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Counts and times every request by route template and status. Logs neither headers nor the
/// query string.
async fn observe(State(state): State<RouterState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_owned();
    let method = request.method().clone();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    let metrics = &state.app.metrics;
    metrics
        .requests
        .get_or_create(&RequestLabels {
            route: route.clone(),
            status,
        })
        .inc();
    metrics
        .latency
        .get_or_create(&RouteLabels {
            route: route.clone(),
        })
        .observe(elapsed.as_secs_f64());
    tracing::debug!(%method, route, status, elapsed_us = elapsed.as_micros() as u64, "feed API request");
    response
}

async fn not_found() -> ApiError {
    ApiError::new(ProblemType::NotFound, "no such route; see /openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ProblemType::MethodNotAllowed,
        "the feed API only answers GET (and HEAD)",
    )
}

fn quote(text: &str) -> String {
    let mut end = text.len().min(QUOTED_BYTES_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if end < text.len() {
        format!("{:?}…", &text[..end])
    } else {
        format!("{text:?}")
    }
}

/// The query parameters of one request, checked against the names the route takes.
struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    fn parse(raw: Option<&str>, allowed: &[&'static str]) -> Result<Query, ApiError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (key, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            if !allowed.contains(&key.as_ref()) {
                let takes = if allowed.is_empty() {
                    "no parameters".to_owned()
                } else {
                    allowed.join(", ")
                };
                return Err(ApiError::bad_parameter(format!(
                    "unknown query parameter {}: this route takes {takes}",
                    quote(&key)
                )));
            }
            if pairs.iter().any(|(k, _)| *k == key) {
                return Err(ApiError::bad_parameter(format!(
                    "query parameter {key} is given more than once"
                )));
            }
            if pairs.len() >= QUERY_PAIRS_MAX {
                return Err(ApiError::bad_parameter("too many query parameters"));
            }
            pairs.push((key.into_owned(), value.into_owned()));
        }
        Ok(Query { pairs })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// An unsigned integer in `min..=max`, `default` when absent.
    fn integer(&self, name: &str, default: u64, min: u64, max: u64) -> Result<u64, ApiError> {
        let Some(text) = self.get(name) else {
            return Ok(default);
        };
        let refuse = || {
            ApiError::bad_parameter(format!(
                "{name} must be an integer from {min} to {max}, not {}",
                quote(text)
            ))
        };
        if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(refuse());
        }
        let value: u64 = text.parse().map_err(|_| refuse())?;
        if value < min || value > max {
            return Err(refuse());
        }
        Ok(value)
    }
}

fn feed_from_path(name: &str, version: &str) -> Result<FeedId, ApiError> {
    let name = FeedName::new(name).map_err(|e| ApiError::bad_parameter(e.to_string()))?;
    let version =
        FeedVersion::parse(version).map_err(|e| ApiError::bad_parameter(e.to_string()))?;
    Ok(FeedId::new(name, version))
}

fn path_error(rejection: PathRejection) -> ApiError {
    // axum's text may quote the whole segment: log it, answer a bounded detail.
    tracing::debug!(rejection = %quote(&rejection.body_text()), "refused a path");
    ApiError::bad_parameter("a path segment is not valid percent-encoded UTF-8")
}

/// Authenticates, checks the token's scope, then the feed's existence and status.
async fn open_feed(
    app: &AppState,
    headers: &HeaderMap,
    path: Result<Path<Vec<String>>, PathRejection>,
) -> Result<(Reader, FeedId, Vec<String>), ApiError> {
    let reader = app.tokens.authenticate(headers)?;
    let Path(segments) = path.map_err(path_error)?;
    let [name, version, rest @ ..] = segments.as_slice() else {
        return Err(ApiError::bad_parameter("bad path"));
    };
    let feed = feed_from_path(name, version)?;
    if !app.tokens.may_read(&reader, &feed) {
        return Err(ApiError::new(
            ProblemType::Forbidden,
            format!("the token named {:?} may not read {feed}", reader.name),
        ));
    }
    Ok((reader, feed, rest.to_vec()))
}

/// Refuses a feed that does not exist (404) or is retired (410, naming its successor).
async fn check_feed_served(app: &AppState, feed: &FeedId) -> Result<(), ApiError> {
    let state = app
        .store
        .feed(feed)
        .await
        .map_err(ApiError::store)?
        .ok_or_else(|| ApiError::new(ProblemType::UnknownFeed, format!("no feed {feed}")))?;
    if state.status == FeedStatus::Retired {
        let successor = app
            .store
            .feeds()
            .await
            .map_err(ApiError::store)?
            .into_iter()
            .filter(|f| f.feed.name == feed.name && f.status != FeedStatus::Retired)
            .map(|f| f.feed)
            .max_by_key(|f| f.version);
        return Err(ApiError::retired(feed, successor));
    }
    Ok(())
}

fn json_response(content_type: &'static str, body: Vec<u8>) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn events_response(app: &AppState, feed: &FeedId, events: &[FeedEvent]) -> Response {
    match wire::events_page(&app.source, feed, events) {
        Ok(body) => {
            app.metrics.events_served.inc_by(events.len() as u64);
            json_response(wire::CLOUDEVENTS_BATCH_CONTENT_TYPE, body)
        }
        Err(error) => {
            tracing::error!(%error, %feed, "refusing to serve an event whose data is not JSON");
            ApiError::new(
                ProblemType::Unavailable,
                format!("feed {feed} holds an event that is not valid JSON: {error}"),
            )
            .into_response()
        }
    }
}

async fn list_feeds(
    State(state): State<RouterState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let app = &state.app;
    let reader = app.tokens.authenticate(&headers)?;
    Query::parse(query.as_deref(), &[])?;
    let mut listing = Vec::new();
    for feed in app.store.feeds().await.map_err(ApiError::store)? {
        if !app.tokens.may_read(&reader, &feed.feed) {
            continue;
        }
        let readers = app
            .store
            .readers(&feed.feed)
            .await
            .map_err(ApiError::store)?;
        let mut publishers = Vec::new();
        for cursor in app
            .store
            .publishers(&feed.feed)
            .await
            .map_err(ApiError::store)?
        {
            let lag = headwater_store::publisher_lag(
                app.store.as_ref(),
                &feed.feed,
                feed.head,
                cursor.position,
                crate::readers::now(),
            )
            .await
            .map_err(ApiError::store)?;
            publishers.push((cursor, lag));
        }
        listing.push(wire::FeedListing {
            state: feed,
            readers,
            publishers,
        });
    }
    Ok(json_response(
        "application/json",
        wire::feeds_listing(&listing),
    ))
}

/// One waiting read, counted while it waits however the wait ends (also when cancelled).
struct Waiting<'a>(&'a AppState);

impl<'a> Waiting<'a> {
    /// `None` when `long_polls_max` reads wait already: this one answers without waiting.
    fn start(app: &'a AppState) -> Option<Waiting<'a>> {
        let admitted = app
            .long_polls
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < app.long_polls_max).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            tracing::debug!("too many reads waiting; answering at once");
            return None;
        }
        app.metrics.long_polls.inc();
        Some(Waiting(app))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.long_polls.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.long_polls.dec();
    }
}

async fn read_feed(
    State(state): State<RouterState>,
    headers: HeaderMap,
    path: Result<Path<Vec<String>>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let app = &state.app;
    let (reader, feed, _) = open_feed(app, &headers, path).await?;
    let query = Query::parse(query.as_deref(), &["after", "limit", "timeout_ms"])?;
    let after = FeedPosition(query.integer("after", 0, 0, AFTER_MAX)?);
    let limit = query.integer("limit", FEED_PAGE_EVENTS_DEFAULT, 1, FEED_PAGE_EVENTS_MAX)?;
    let timeout_ms = query.integer("timeout_ms", 0, 0, LONG_POLL_TIMEOUT_MS_MAX)?;
    check_feed_served(app, &feed).await?;
    app.readers.seen(&feed, &reader.name);
    let mut events = app
        .store
        .read_feed(&feed, after, limit)
        .await
        .map_err(ApiError::store)?;
    let waiting = (events.is_empty() && timeout_ms > 0)
        .then(|| Waiting::start(app))
        .flatten();
    if let Some(waiting) = waiting {
        let mut heads = app.store.watch_head(&feed);
        let mut draining = app.draining.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(timeout_ms)) => {}
            _ = heads.wait_for(|head| *head > after) => {}
            _ = draining.wait_for(|draining| *draining) => {}
        }
        drop(waiting);
        if *heads.borrow() > after {
            events = app
                .store
                .read_feed(&feed, after, limit)
                .await
                .map_err(ApiError::store)?;
        }
    }
    tracing::debug!(%feed, reader = %reader.name, events = events.len(), "feed page");
    Ok(events_response(app, &feed, &events))
}

async fn list_subjects(
    State(state): State<RouterState>,
    headers: HeaderMap,
    path: Result<Path<Vec<String>>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let app = &state.app;
    let (reader, feed, _) = open_feed(app, &headers, path).await?;
    let query = Query::parse(query.as_deref(), &["after", "limit"])?;
    let after = query
        .get("after")
        .map(|s| Subject::new(s).map_err(|e| ApiError::bad_parameter(format!("after: {e}"))))
        .transpose()?;
    let limit = query.integer("limit", SUBJECT_PAGE_DEFAULT, 1, SUBJECT_PAGE_MAX)?;
    check_feed_served(app, &feed).await?;
    app.readers.seen(&feed, &reader.name);
    let heads = app
        .store
        .subjects(&feed, after.as_ref(), limit)
        .await
        .map_err(ApiError::store)?;
    Ok(json_response(
        "application/json",
        wire::subjects_page(&heads),
    ))
}

async fn read_subject(
    State(state): State<RouterState>,
    headers: HeaderMap,
    path: Result<Path<Vec<String>>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let app = &state.app;
    let (reader, feed, rest) = open_feed(app, &headers, path).await?;
    let subject = rest
        .first()
        .ok_or_else(|| ApiError::bad_parameter("bad path"))
        .and_then(|s| {
            Subject::new(s.as_str()).map_err(|e| ApiError::bad_parameter(e.to_string()))
        })?;
    let query = Query::parse(query.as_deref(), &["after", "limit"])?;
    let after = Sequence(query.integer("after", 0, 0, AFTER_MAX)?);
    let limit = query.integer("limit", FEED_PAGE_EVENTS_DEFAULT, 1, FEED_PAGE_EVENTS_MAX)?;
    check_feed_served(app, &feed).await?;
    app.readers.seen(&feed, &reader.name);
    let events = app
        .store
        .read_subject(&feed, &subject, after, limit)
        .await
        .map_err(ApiError::store)?;
    Ok(events_response(app, &feed, &events))
}

async fn openapi(RawQuery(query): RawQuery) -> Result<Response, ApiError> {
    Query::parse(query.as_deref(), &[])?;
    Ok(json_response(
        "application/json",
        OPENAPI_JSON.as_bytes().to_vec(),
    ))
}

async fn render_metrics(
    State(state): State<RouterState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let app = &state.app;
    if app.metrics_access == MetricsAccess::AnyToken {
        app.tokens.authenticate(&headers)?;
    }
    Query::parse(query.as_deref(), &[])?;
    for feed in app.store.feeds().await.map_err(ApiError::store)? {
        let head = i64::try_from(feed.head.get()).unwrap_or(i64::MAX);
        app.metrics
            .feed_head
            .get_or_create(&FeedLabels {
                feed: feed.feed.to_string(),
            })
            .set(head);
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &state.registry).map_err(|error| {
        tracing::error!(%error, "could not encode the metrics");
        ApiError::new(ProblemType::Internal, "could not encode the metrics")
    })?;
    let mut response = (StatusCode::OK, Body::from(text)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(response)
}
