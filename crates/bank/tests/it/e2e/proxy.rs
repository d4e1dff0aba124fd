//! The lossy HTTP link between `statements` and `accounts`: a proxy on loopback that
//! `statements --upstream` points at. It forwards every request to an `accounts` replica (the
//! next one when a replica does not answer) and, on the feed's pages
//! (`GET /feeds/accounts/v1?after=…`) only, loses and duplicates events:
//!
//! - an event is dropped from the page;
//! - an event is replaced by a copy of an event delivered earlier (a duplicate, carrying the
//!   position of the slot it takes, so that the page's positions still increase, as the
//!   consumer's client checks; the replaced event is lost);
//! - now and then the request asks for events after a later position than the consumer did (the
//!   events in between are lost).
//!
//! And the events it is told to lose ([`FeedProxy::lose_from`]) are dropped from every page,
//! always: the test makes them the last events of their accounts.
//!
//! A lost event is found by the consumer when a later event of its subject arrives (a gap,
//! healed through `/feeds/accounts/v1/subjects/{id}`, which the proxy passes untouched), or, for
//! the last event of a subject, only by reconstitution (the subject list, untouched too).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::http::Http;

/// The feed whose pages the proxy garbles.
pub(crate) const FEED_PATH: &str = "/feeds/accounts/v1";
/// The longest a forwarded request may take (a long poll included), in seconds.
const FORWARD_SECS_MAX: u64 = 60;
/// How many recently delivered events a duplicate is copied from.
const RECENT_EVENTS: usize = 64;
/// The largest jump of a page request's `after`, in positions.
const SKIP_POSITIONS_MAX: u64 = 3;

/// How lossy the link is: probabilities per event (drop, duplicate) and per page (skip).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lossiness {
    pub(crate) drop: f64,
    pub(crate) duplicate: f64,
    pub(crate) skip: f64,
}

/// What the proxy did.
#[derive(Debug, Default)]
pub(crate) struct ProxyStats {
    pub(crate) requests: AtomicU64,
    pub(crate) pages: AtomicU64,
    pub(crate) events: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) duplicated: AtomicU64,
    pub(crate) skips: AtomicU64,
    /// Events dropped because they were to be lost.
    pub(crate) lost: AtomicU64,
    pub(crate) upstream_errors: AtomicU64,
    /// The highest `after` a page request asked for (before a skip): the consumer has read the
    /// feed up to there.
    pub(crate) highest_after: AtomicU64,
}

impl std::fmt::Display for ProxyStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        write!(
            f,
            "proxy: {} requests, {} feed pages with {} events, {} events dropped, {} replaced by \
             duplicates, {} skips of `after`, {} events lost on purpose, {} upstream errors",
            get(&self.requests),
            get(&self.pages),
            get(&self.events),
            get(&self.dropped),
            get(&self.duplicated),
            get(&self.skips),
            get(&self.lost),
            get(&self.upstream_errors),
        )
    }
}

struct Shared {
    upstreams: Vec<SocketAddr>,
    http: Http,
    lossiness: Option<Lossiness>,
    /// Garbling is on (the final checks turn it off: nothing is lost after the run).
    lossy: AtomicBool,
    rng: Mutex<StdRng>,
    /// Per subject, the first sequence to lose (that one and every later one).
    doomed: Mutex<BTreeMap<String, u64>>,
    recent: Mutex<VecDeque<serde_json::Value>>,
    next_upstream: AtomicU64,
    stats: Arc<ProxyStats>,
}

/// The running proxy (stopped when dropped).
pub(crate) struct FeedProxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FeedProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedProxy")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl FeedProxy {
    /// Starts a proxy to `upstreams` on a free loopback port; `lossiness: None` passes
    /// everything untouched.
    pub(crate) async fn start(
        upstreams: Vec<SocketAddr>,
        lossiness: Option<Lossiness>,
        seed: u64,
    ) -> FeedProxy {
        let shared = Arc::new(Shared {
            upstreams,
            http: Http::new(),
            lossiness,
            lossy: AtomicBool::new(lossiness.is_some()),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            doomed: Mutex::default(),
            recent: Mutex::new(VecDeque::new()),
            next_upstream: AtomicU64::new(0),
            stats: Arc::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = Router::new()
            .fallback(forward)
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FeedProxy {
            address,
            shared,
            task,
        }
    }

    /// `http://127.0.0.1:{port}`: the `--upstream` of `statements`.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub(crate) fn stats(&self) -> &ProxyStats {
        &self.shared.stats
    }

    /// Loses every event of `subject` from `sequence` on, from every page, from now on.
    pub(crate) fn lose_from(&self, subject: &str, sequence: u64) {
        self.shared
            .doomed
            .lock()
            .unwrap()
            .insert(subject.to_owned(), sequence);
    }

    /// Stops losing and duplicating at random (the events to lose are still lost).
    pub(crate) fn heal(&self) {
        self.shared.lossy.store(false, Ordering::SeqCst);
    }
}

impl Drop for FeedProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Headers that belong to one connection, not to the message.
fn hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::HOST,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
    ]
    .contains(name)
}

async fn forward(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    shared.stats.requests.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = request.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let lossiness = shared
        .lossiness
        .filter(|_| shared.lossy.load(Ordering::SeqCst));
    let is_page = parts.uri.path() == FEED_PATH;
    let mut query = parts.uri.query().unwrap_or("").to_owned();
    if is_page {
        let after = query
            .split('&')
            .find_map(|pair| pair.strip_prefix("after="))
            .and_then(|after| after.parse().ok())
            .unwrap_or(0);
        shared
            .stats
            .highest_after
            .fetch_max(after, Ordering::SeqCst);
    }
    if let (Some(lossiness), true) = (lossiness, is_page) {
        let skip = {
            let mut rng = shared.rng.lock().unwrap();
            rng.random_bool(lossiness.skip)
                .then(|| rng.random_range(1..=SKIP_POSITIONS_MAX))
        };
        if let Some(skip) = skip {
            query = skip_after(&query, skip);
            shared.stats.skips.fetch_add(1, Ordering::Relaxed);
        }
    }
    let path_and_query = if query.is_empty() {
        parts.uri.path().to_owned()
    } else {
        format!("{}?{query}", parts.uri.path())
    };
    let count = shared.upstreams.len() as u64;
    let first = shared.next_upstream.fetch_add(1, Ordering::Relaxed);
    let mut last_error = String::new();
    for attempt in 0..count {
        let upstream = shared.upstreams[((first + attempt) % count) as usize];
        let mut outgoing = axum::http::Request::builder()
            .method(parts.method.clone())
            .uri(format!("http://{upstream}{path_and_query}"));
        for (name, value) in &parts.headers {
            if !hop_by_hop(name) {
                outgoing = outgoing.header(name, value);
            }
        }
        let outgoing = outgoing.body(Body::from(body.clone())).unwrap();
        match shared
            .http
            .forward(outgoing, Duration::from_secs(FORWARD_SECS_MAX))
            .await
        {
            Ok(reply) => {
                let mut body = reply.body;
                if is_page && reply.status == 200 {
                    body = garble(&shared, lossiness, body);
                }
                let mut response = Response::builder().status(reply.status);
                for (name, value) in &reply.headers {
                    if !hop_by_hop(name) {
                        response = response.header(name, value);
                    }
                }
                return response.body(Body::from(body)).unwrap();
            }
            Err(error) => {
                shared.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                last_error = error;
            }
        }
    }
    (StatusCode::BAD_GATEWAY, last_error).into_response()
}

/// The query with `after` moved `skip` positions on.
fn skip_after(query: &str, skip: u64) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some(("after", value)) => match value.parse::<u64>() {
                Ok(after) => format!("after={}", after + skip),
                Err(_) => pair.to_owned(),
            },
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Drops events of a page and replaces some by duplicates of earlier ones.
fn garble(shared: &Shared, lossiness: Option<Lossiness>, body: Bytes) -> Bytes {
    let Ok(serde_json::Value::Array(events)) = serde_json::from_slice::<serde_json::Value>(&body)
    else {
        return body;
    };
    shared.stats.pages.fetch_add(1, Ordering::Relaxed);
    shared
        .stats
        .events
        .fetch_add(events.len() as u64, Ordering::Relaxed);
    let doomed = shared.doomed.lock().unwrap().clone();
    let mut rng = shared.rng.lock().unwrap();
    let mut recent = shared.recent.lock().unwrap();
    let mut out = Vec::with_capacity(events.len());
    for event in events {
        let subject = event["subject"].as_str().unwrap_or_default();
        if doomed
            .get(subject)
            .is_some_and(|from| event["sequence"].as_u64() >= Some(*from))
        {
            shared.stats.lost.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let Some(lossiness) = lossiness else {
            out.push(event);
            continue;
        };
        let roll: f64 = rng.random();
        if roll < lossiness.drop {
            shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
        } else if roll < lossiness.drop + lossiness.duplicate && !recent.is_empty() {
            let mut copy = recent[rng.random_range(0..recent.len())].clone();
            copy["position"] = event["position"].clone();
            out.push(copy);
            shared.stats.duplicated.fetch_add(1, Ordering::Relaxed);
        } else {
            out.push(event.clone());
        }
        if recent.len() == RECENT_EVENTS {
            recent.pop_front();
        }
        recent.push_back(event);
    }
    Bytes::from(serde_json::Value::Array(out).to_string())
}

#[test]
fn the_proxy_moves_after_on() {
    assert_eq!(
        skip_after("after=10&limit=100&timeout_ms=1000", 2),
        "after=12&limit=100&timeout_ms=1000"
    );
    assert_eq!(skip_after("limit=1", 2), "limit=1");
}
