//! The consumer's operator endpoints, as an `axum::Router` a service merges into its own:
//! `GET /status` (JSON: counters and open gaps, [`crate::ConsumerStatus`]) and `GET /metrics`
//! (OpenMetrics text of a registry the service filled — the consumer's metrics and its own).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;

use crate::{Consumer, Upstream, ViewStore};

/// `GET /status` and `GET /metrics` for `consumer`, the metrics from `registry` (register the
/// consumer's with [`Consumer::register_metrics`] first). No authentication: serve it on an
/// address only operators reach, or put it behind the service's own.
pub fn router<V: ViewStore, U: Upstream>(
    consumer: Arc<Consumer<V, U>>,
    registry: Arc<Registry>,
) -> Router {
    Router::new()
        .route("/status", get(status::<V, U>))
        .with_state(consumer)
        .merge(
            Router::new()
                .route("/metrics", get(metrics))
                .with_state(registry),
        )
}

async fn status<V: ViewStore, U: Upstream>(
    State(consumer): State<Arc<Consumer<V, U>>>,
) -> Response {
    match serde_json::to_vec(&consumer.status()) {
        Ok(body) => {
            let mut response = (StatusCode::OK, body).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(error) => {
            tracing::error!(%error, "could not encode the status");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not encode the status",
            )
                .into_response()
        }
    }
}

async fn metrics(State(registry): State<Arc<Registry>>) -> Response {
    let mut text = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        tracing::error!(%error, "could not encode the metrics");
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not encode the metrics",
        )
            .into_response();
    }
    let mut response = (StatusCode::OK, text).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}
