//! The walker's admin routes, for a consumer service to merge into its router:
//!
//! - `POST /reconstitute` asks for a walk: `202 Accepted` with `{"walk": N, "status": …}`,
//!   where `N` is the id of the walk that serves the request — the next one to start: at once
//!   when none runs, right after the running one otherwise (requests made during one walk share
//!   that next walk; never two walks at once, never a `409`). `503` when the walker's runner
//!   does not run.
//! - `GET /reconstitute` answers the walker's [`WalkerStatus`]: the running walk's progress,
//!   the last walk's result, whether one is requested.
//!
//! With a token, both need `Authorization: Bearer <token>` (compared in constant time; `401`
//! otherwise). Errors are RFC 9457 problem+json bodies of the feed API's shape.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use subtle::ConstantTimeEq;

use super::{Walker, WalkerStatus};
use crate::upstream::Upstream;
use crate::view::ViewStore;

/// The route of the walker's admin endpoints.
pub const RECONSTITUTE_ROUTE: &str = "/reconstitute";

const JSON_CONTENT_TYPE: &str = "application/json";
const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// On-demand walks need the runner ([`Walker::run`]), and none runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the walker's runner does not run: no walk can be started on demand")]
#[non_exhaustive]
pub struct WalkerNotRunning;

/// What the admin routes need of a walker, whatever its view store and upstream.
pub trait WalkControl: Send + Sync + 'static {
    /// [`Walker::request`].
    ///
    /// # Errors
    /// [`WalkerNotRunning`] when no runner runs.
    fn request_walk(&self) -> Result<u64, WalkerNotRunning>;

    /// [`Walker::status`].
    fn walker_status(&self) -> WalkerStatus;
}

impl<V: ViewStore, U: Upstream> WalkControl for Walker<V, U> {
    fn request_walk(&self) -> Result<u64, WalkerNotRunning> {
        self.request()
    }

    fn walker_status(&self) -> WalkerStatus {
        self.status()
    }
}

#[derive(Clone)]
struct AdminState {
    walker: Arc<dyn WalkControl>,
    token: Option<Arc<str>>,
}

/// The walker's admin routes (`POST`/`GET /reconstitute`, see the module docs); with `token`,
/// they need it as a bearer token.
pub fn walker_router(walker: Arc<dyn WalkControl>, token: Option<&str>) -> Router {
    let state = AdminState {
        walker,
        token: token.map(Arc::from),
    };
    Router::new().route(
        RECONSTITUTE_ROUTE,
        get(status)
            .post(request)
            .fallback(method_not_allowed)
            .with_state(state),
    )
}

async fn status(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(refused) = authorize(&state, &headers) {
        return *refused;
    }
    json(StatusCode::OK, &state.walker.walker_status())
}

async fn request(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Err(refused) = authorize(&state, &headers) {
        return *refused;
    }
    match state.walker.request_walk() {
        Ok(walk) => {
            let status = state.walker.walker_status();
            json(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "walk": walk, "status": status }),
            )
        }
        Err(error) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "walker-not-running",
            "No walker runs",
            &error.to_string(),
        ),
    }
}

async fn method_not_allowed() -> Response {
    let mut response = problem(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        "/reconstitute answers GET (the walker's status) and POST (start a walk)",
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
    response
}

/// Checks the bearer token, when one is configured.
fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(expected) = &state.token else {
        return Ok(());
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let valid = presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(expected.as_bytes())));
    if valid {
        return Ok(());
    }
    let mut response = problem(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Missing or invalid bearer token",
        "the walker's admin routes need the service's admin token as a bearer token",
    );
    let challenge = if presented.is_some() {
        "Bearer realm=\"headwater\", error=\"invalid_token\""
    } else {
        "Bearer realm=\"headwater\""
    };
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    Err(Box::new(response))
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => with_type(status, bytes, JSON_CONTENT_TYPE),
        Err(error) => {
            tracing::error!(%error, "the walker's status does not serialize");
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "the walker's status could not be written",
            )
        }
    }
}

/// A problem+json body (RFC 9457) of the feed API's shape, by hand.
fn problem(status: StatusCode, kind: &str, title: &str, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": format!("https://headwater.dev/problems/{kind}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    with_type(
        status,
        serde_json::to_vec(&body).unwrap_or_default(),
        PROBLEM_CONTENT_TYPE,
    )
}

fn with_type(status: StatusCode, body: Vec<u8>, content_type: &'static str) -> Response {
    let mut response = (status, Body::from(body)).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
