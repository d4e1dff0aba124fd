//! The one place where errors become HTTP: [`ApiError`] answers with an RFC 9457 problem+json
//! body whose `type` is one of the stable URIs of [`ProblemType`].

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use headwater_core::FeedId;
use headwater_store::FeedError;

/// The media type of every error body.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// The `WWW-Authenticate` challenge of a 401.
const BEARER_CHALLENGE: &str = "Bearer realm=\"headwater\"";

/// The kinds of problem the feed API answers with. Each `type` URI is stable: clients may branch
/// on it. The list is in `docs/design/feed-api.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProblemType {
    /// 400: a path segment or query parameter is malformed, out of range or unknown.
    BadParameter,
    /// 401: no bearer token, a malformed `Authorization` header, or a token that is not configured.
    Unauthorized,
    /// 403: the token may not read this feed.
    Forbidden,
    /// 404: no such feed.
    UnknownFeed,
    /// 404: no such route.
    NotFound,
    /// 405: the route exists, the method does not.
    MethodNotAllowed,
    /// 410: the feed version is retired; the body names the newest version still served.
    FeedRetired,
    /// 503: the feed store is closed or reported corrupt data (never served).
    Unavailable,
    /// 500: anything else; details are in the producer's logs, not in the answer.
    Internal,
}

impl ProblemType {
    /// The problem's `type` URI.
    pub const fn uri(self) -> &'static str {
        match self {
            ProblemType::BadParameter => "https://headwater.dev/problems/bad-parameter",
            ProblemType::Unauthorized => "https://headwater.dev/problems/unauthorized",
            ProblemType::Forbidden => "https://headwater.dev/problems/forbidden",
            ProblemType::UnknownFeed => "https://headwater.dev/problems/unknown-feed",
            ProblemType::NotFound => "https://headwater.dev/problems/not-found",
            ProblemType::MethodNotAllowed => "https://headwater.dev/problems/method-not-allowed",
            ProblemType::FeedRetired => "https://headwater.dev/problems/feed-retired",
            ProblemType::Unavailable => "https://headwater.dev/problems/unavailable",
            ProblemType::Internal => "https://headwater.dev/problems/internal",
        }
    }

    /// The problem's `title`: the same for every occurrence of the type.
    pub const fn title(self) -> &'static str {
        match self {
            ProblemType::BadParameter => "Bad parameter",
            ProblemType::Unauthorized => "Missing or invalid bearer token",
            ProblemType::Forbidden => "The token may not read this feed",
            ProblemType::UnknownFeed => "No such feed",
            ProblemType::NotFound => "No such route",
            ProblemType::MethodNotAllowed => "Method not allowed",
            ProblemType::FeedRetired => "Feed version retired",
            ProblemType::Unavailable => "Feed store unavailable",
            ProblemType::Internal => "Internal error",
        }
    }

    pub const fn status(self) -> StatusCode {
        match self {
            ProblemType::BadParameter => StatusCode::BAD_REQUEST,
            ProblemType::Unauthorized => StatusCode::UNAUTHORIZED,
            ProblemType::Forbidden => StatusCode::FORBIDDEN,
            ProblemType::UnknownFeed | ProblemType::NotFound => StatusCode::NOT_FOUND,
            ProblemType::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProblemType::FeedRetired => StatusCode::GONE,
            ProblemType::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProblemType::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Every problem type, for documentation checks.
    pub const ALL: [ProblemType; 9] = [
        ProblemType::BadParameter,
        ProblemType::Unauthorized,
        ProblemType::Forbidden,
        ProblemType::UnknownFeed,
        ProblemType::NotFound,
        ProblemType::MethodNotAllowed,
        ProblemType::FeedRetired,
        ProblemType::Unavailable,
        ProblemType::Internal,
    ];
}

/// A refused or failed request. It never carries a token.
#[derive(Debug, thiserror::Error)]
#[error("{kind:?}: {detail}")]
pub(crate) struct ApiError {
    kind: ProblemType,
    detail: String,
    /// For [`ProblemType::FeedRetired`]: the newest version of the feed's name still served.
    successor: Option<FeedId>,
    /// For 401: the `error` of the Bearer challenge (RFC 6750), when a token was presented.
    invalid_token: bool,
}

impl ApiError {
    pub(crate) fn new(kind: ProblemType, detail: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            detail: detail.into(),
            successor: None,
            invalid_token: false,
        }
    }

    pub(crate) fn bad_parameter(detail: impl Into<String>) -> ApiError {
        ApiError::new(ProblemType::BadParameter, detail)
    }

    pub(crate) fn unauthorized(detail: impl Into<String>, token_presented: bool) -> ApiError {
        let mut error = ApiError::new(ProblemType::Unauthorized, detail);
        error.invalid_token = token_presented;
        error
    }

    pub(crate) fn retired(feed: &FeedId, successor: Option<FeedId>) -> ApiError {
        let detail = match &successor {
            Some(newer) => format!("feed {feed} is retired: read {newer} instead"),
            None => format!("feed {feed} is retired and no version of it is served any more"),
        };
        let mut error = ApiError::new(ProblemType::FeedRetired, detail);
        error.successor = successor;
        error
    }

    pub(crate) fn store(error: FeedError) -> ApiError {
        match error {
            FeedError::UnknownFeed(feed) => {
                ApiError::new(ProblemType::UnknownFeed, format!("no feed {feed}"))
            }
            FeedError::Invalid(detail) => ApiError::bad_parameter(detail),
            error @ (FeedError::Closed | FeedError::Corrupt { .. }) => {
                tracing::error!(%error, "feed store unavailable");
                ApiError::new(ProblemType::Unavailable, error.to_string())
            }
            error => {
                tracing::error!(%error, "feed store failed");
                ApiError::new(ProblemType::Internal, "the feed store failed")
            }
        }
    }
}

/// Writes a problem+json body. By hand, so the wire format is what this function says.
pub(crate) fn problem_body(kind: ProblemType, detail: &str, successor: Option<&FeedId>) -> Vec<u8> {
    let mut body = serde_json::Map::new();
    body.insert("type".into(), kind.uri().into());
    body.insert("title".into(), kind.title().into());
    body.insert("status".into(), kind.status().as_u16().into());
    body.insert("detail".into(), detail.into());
    if let Some(newer) = successor {
        body.insert("successor".into(), newer.to_string().into());
        body.insert(
            "successor_url".into(),
            format!("/feeds/{}/{}", newer.name, newer.version).into(),
        );
    }
    serde_json::to_vec(&body).unwrap_or_default()
}

pub(crate) fn problem_response(
    kind: ProblemType,
    detail: &str,
    successor: Option<&FeedId>,
) -> Response {
    let mut response = (kind.status(), problem_body(kind, detail, successor)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
    );
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = problem_response(self.kind, &self.detail, self.successor.as_ref());
        if self.kind == ProblemType::Unauthorized {
            let challenge = if self.invalid_token {
                HeaderValue::from_static("Bearer realm=\"headwater\", error=\"invalid_token\"")
            } else {
                HeaderValue::from_static(BEARER_CHALLENGE)
            };
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        response
    }
}
