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
    let text = match encode_metrics(&registry) {
        Ok(text) => text,
        Err(error) => {
            tracing::error!(%error, "could not encode the metrics");
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not encode the metrics",
            )
                .into_response();
        }
    };
    let mut response = (StatusCode::OK, text).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// The OpenMetrics text of `registry`, with the families of one name merged into one.
///
/// Each consumer (and its walker, its transport, a switch's two versions) registers its metrics
/// labelled with its feed in a sub-registry of its own, so two consumers in one registry give two
/// families of the same name — which Prometheus refuses to scrape ("second TYPE line"). This
/// keeps each family's first `HELP`/`TYPE`/`UNIT` and puts all its samples under it, in the
/// order first seen. Serve this, not `prometheus_client`'s `encode` alone, when one registry
/// holds several consumers.
///
/// # Errors
/// A metric that cannot be encoded.
pub fn encode_metrics(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(merge_families(&text))
}

/// One family of the text format: its metadata lines and its samples.
#[derive(Default)]
struct Family<'a> {
    metadata: Vec<&'a str>,
    samples: Vec<&'a str>,
}

fn merge_families(text: &str) -> String {
    let mut order: Vec<&str> = Vec::new();
    let mut families: std::collections::HashMap<&str, Family<'_>> =
        std::collections::HashMap::new();
    let mut current: Option<&str> = None;
    for line in text.lines() {
        if line.is_empty() || line == "# EOF" {
            continue;
        }
        let metadata = ["# HELP ", "# TYPE ", "# UNIT "]
            .into_iter()
            .find_map(|kind| line.strip_prefix(kind).map(|rest| (&kind[..6], rest)));
        match metadata {
            Some((kind, rest)) => {
                let name = rest.split(' ').next().unwrap_or_default();
                let family = families.entry(name).or_insert_with(|| {
                    order.push(name);
                    Family::default()
                });
                if !family.metadata.iter().any(|l| l.starts_with(kind)) {
                    family.metadata.push(line);
                }
                current = Some(name);
            }
            None => {
                let name = current.unwrap_or_default();
                families
                    .entry(name)
                    .or_insert_with(|| {
                        order.push(name);
                        Family::default()
                    })
                    .samples
                    .push(line);
            }
        }
    }
    let mut merged = String::with_capacity(text.len());
    for name in order {
        let family = &families[name];
        for line in family.metadata.iter().chain(&family.samples) {
            merged.push_str(line);
            merged.push('\n');
        }
    }
    merged.push_str("# EOF\n");
    merged
}
