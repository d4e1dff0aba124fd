//! The HTTP API of `statements`:
//!
//! - `GET /balances/{id}` → `200 {"balance": 500, "sequence": 7}` from the active version's view;
//!   an account the view does not hold is bootstrapped from the producer first (G9); `404`
//!   problem+json when the producer has no such account either, `400` for an id outside
//!   `[A-Za-z0-9_-]{1,64}`, `503` when the producer cannot be reached for a bootstrap;
//! - `GET /status` → [`super::Status`] (JSON);
//! - `GET /metrics` → OpenMetrics text;
//! - `POST /reconstitute` / `GET /reconstitute`: the library's walker routes.
//!
//! No authentication: serve it where only the bank's own services and operators reach.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use headwater::consume::{encode_metrics, walker_router};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::{ActiveWalker, LookupError, Shared};

const JSON: &str = "application/json";
const PROBLEM: &str = "application/problem+json";
/// The longest account id (the feed subject is the id).
const ACCOUNT_ID_BYTES_MAX: usize = 64;

pub(super) fn router(shared: Arc<Shared>) -> Router {
    let walker = walker_router(Arc::new(ActiveWalker(Arc::clone(&shared))), None);
    Router::new()
        .route("/balances/{id}", get(balance))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(shared)
        .merge(walker)
        .fallback(not_found)
}

/// `[A-Za-z0-9_-]{1,64}`, as `accounts` accepts them.
/// `bank_balance_requests_total{outcome}`: what `GET /balances/{id}` answered — `view` (from the
/// view as it was), `bootstrapped` (fetched from the producer first), `not_found`,
/// `bad_request`, `unavailable`.
#[derive(Clone, Debug, Default)]
pub(super) struct Metrics {
    requests: Family<Outcome, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

impl Metrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "bank_balance_requests",
            "GET /balances/{id} answers, by outcome",
            self.requests.clone(),
        );
    }

    fn count(&self, outcome: &'static str) {
        self.requests.get_or_create(&Outcome { outcome }).inc();
    }
}

fn valid_id(id: &str) -> bool {
    (1..=ACCOUNT_ID_BYTES_MAX).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

async fn balance(
    State(shared): State<Arc<Shared>>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let (outcome, response) = answer_balance(&shared, id).await;
    shared.metrics.count(outcome);
    response
}

async fn answer_balance(
    shared: &Shared,
    id: Result<Path<String>, PathRejection>,
) -> (&'static str, Response) {
    let Ok(Path(id)) = id else {
        return ("bad_request", bad_id());
    };
    if !valid_id(&id) {
        return ("bad_request", bad_id());
    }
    match shared.balance(&id).await {
        Ok((Some(balance), bootstrapped)) => (
            if bootstrapped { "bootstrapped" } else { "view" },
            json(StatusCode::OK, &balance),
        ),
        Ok((None, _)) => (
            "not_found",
            problem(
                StatusCode::NOT_FOUND,
                "account-not-found",
                "No such account",
                &format!("the producer has no account {id}"),
            ),
        ),
        Err(LookupError::BadId) => ("bad_request", bad_id()),
        Err(error @ LookupError::Bootstrap(_)) => {
            tracing::warn!(account = %id, %error, "a bootstrap on demand failed");
            (
                "unavailable",
                problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream-unavailable",
                    "The producer cannot be read",
                    &format!("account {id} is not in the view yet and {error}"),
                ),
            )
        }
        Err(error @ LookupError::View(_)) => {
            tracing::error!(account = %id, %error, "a read of the view failed");
            (
                "unavailable",
                problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "The view is unavailable",
                    "the view could not be read; see the service's logs",
                ),
            )
        }
    }
}

fn bad_id() -> Response {
    problem(
        StatusCode::BAD_REQUEST,
        "bad-request",
        "Bad request",
        "an account id is 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'",
    )
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    match shared.status().await {
        Ok(status) => json(StatusCode::OK, &status),
        Err(error) => {
            tracing::error!(%error, "the status could not be read");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "The view is unavailable",
                "the status could not be read; see the service's logs",
            )
        }
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let text = {
        let registry = shared.registry.lock().unwrap_or_else(|e| e.into_inner());
        encode_metrics(&registry)
    };
    match text {
        Ok(text) => with_type(
            StatusCode::OK,
            text.into_bytes(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        Err(error) => {
            tracing::error!(%error, "the metrics could not be encoded");
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "the metrics could not be encoded",
            )
        }
    }
}

async fn not_found() -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "not-found",
        "No such route",
        "statements serves GET /balances/{id}, GET /status, GET /metrics and /reconstitute",
    )
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => with_type(status, bytes, JSON),
        Err(error) => {
            tracing::error!(%error, "an answer could not be encoded");
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "the answer could not be encoded",
            )
        }
    }
}

/// An RFC 9457 problem+json body, of the shape the feed API and `accounts` answer.
fn problem(status: StatusCode, kind: &str, title: &str, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": format!("https://headwater.dev/problems/{kind}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    with_type(status, body.to_string().into_bytes(), PROBLEM)
}

fn with_type(status: StatusCode, body: Vec<u8>, content_type: &'static str) -> Response {
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
