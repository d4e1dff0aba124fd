//! A plain HTTP client for the test's own requests (the watchers, the final checks, the proxy's
//! forwarding), independent of `bank::client`, with a timeout on every request.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, header};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// An answer: status, headers, the whole body.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Reply {
    /// The body as JSON.
    pub(crate) fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_slice(&self.body).map_err(|e| {
            format!(
                "{} answered a body that is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// A pooled HTTP/1.1 client.
#[derive(Clone, Debug)]
pub(crate) struct Http {
    client: Client<HttpConnector, Body>,
}

impl Http {
    pub(crate) fn new() -> Http {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.set_nodelay(true);
        Http {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(5))
                .build(connector),
        }
    }

    /// `method url` with an optional bearer `token` and JSON `body`, bounded by `timeout`.
    /// Errors are transport errors and timeouts, described.
    pub(crate) async fn send(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        body: Option<&serde_json::Value>,
        timeout: Duration,
    ) -> Result<Reply, String> {
        let mut request = Request::builder().method(method.clone()).uri(url);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match body {
            Some(json) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(json.to_string())
            }
            None => Body::empty(),
        };
        let request = request
            .body(body)
            .map_err(|e| format!("{method} {url}: {e}"))?;
        self.forward(request, timeout)
            .await
            .map_err(|e| format!("{method} {url}: {e}"))
    }

    /// Sends `request` as it is, bounded by `timeout`.
    pub(crate) async fn forward(
        &self,
        request: Request<Body>,
        timeout: Duration,
    ) -> Result<Reply, String> {
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("reading the body: {e}"))?
                .to_bytes();
            Ok(Reply {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    pub(crate) async fn get(
        &self,
        url: &str,
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<Reply, String> {
        self.send(Method::GET, url, token, None, timeout).await
    }
}
