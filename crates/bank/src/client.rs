//! [`Client`]: the HTTP client of the `accounts` command API (and of `statements`' balances),
//! for the demo, the bench and the tests.
//!
//! A command either gets an answer — [`Answer::Done`] or [`Answer::Refused`] with the problem —
//! or fails with a [`ClientError`]. After a transport error, a timeout or a 5xx the command may or
//! may not have been recorded: send it again **with the same command id** until it gets an
//! answer; the service answers a retry with the original outcome and records it once.

use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Method, Request, StatusCode, Uri, header};
use headwater::Uuid;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::json;

/// How long one request may take by default (connecting and reading the answer included).
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// The largest answer read, in bytes (answers are a few hundred bytes).
pub const RESPONSE_BYTES_MAX: usize = 64 * 1024;
/// At most this much of an unexpected answer is quoted in an error, in bytes.
const QUOTE_BYTES_MAX: usize = 512;

/// A balance: `{"balance": …, "version": …}` from `accounts`, `{"balance": …, "sequence": …}`
/// from `statements`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Balance {
    /// Cents.
    pub balance: u64,
    /// The account stream's version (`accounts`) or the last sequence applied (`statements`):
    /// the same number for the same account once the consumer caught up (one feed event per
    /// private event, v2; v1 skips refused withdrawals).
    pub version_or_sequence: u64,
}

impl Balance {
    /// The stream version, for an answer of `accounts`.
    pub fn version(&self) -> u64 {
        self.version_or_sequence
    }

    /// The sequence, for an answer of `statements`.
    pub fn sequence(&self) -> u64 {
        self.version_or_sequence
    }
}

/// A refusal: an RFC 9457 problem.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Problem {
    /// The problem's type URI (`https://headwater.dev/problems/insufficient-funds`).
    #[serde(rename = "type")]
    pub problem_type: String,
    #[serde(default)]
    pub title: String,
    pub status: u16,
    #[serde(default)]
    pub detail: String,
}

impl Problem {
    /// The last segment of the type URI: `insufficient-funds`, `already-open`,
    /// `account-not-found`, `command-id-reused`, `balance-limit`, `bad-request`.
    pub fn kind(&self) -> &str {
        self.problem_type
            .rsplit('/')
            .next()
            .unwrap_or(&self.problem_type)
    }
}

/// The outcome of a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Recorded: the balance and version after it (201 for an opening, 200 otherwise).
    Done(Balance),
    /// Refused (4xx): nothing changed, except a refused withdrawal, which is recorded (its
    /// retry is refused again).
    Refused(Problem),
}

/// A request that got no answer of the API: whether the command was recorded is unknown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No connection, a connection lost, an answer cut: send it again with the same command id.
    #[error("{request}: {detail}")]
    Transport { request: String, detail: String },
    /// No complete answer in time: send it again with the same command id.
    #[error("{request}: no answer within {timeout:?}")]
    Timeout { request: String, timeout: Duration },
    /// 5xx (the store is unavailable, a bug): send it again with the same command id.
    #[error("{request}: {status}: {body}")]
    Server {
        request: String,
        status: u16,
        body: String,
    },
    /// An answer that is not what the API answers (not JSON, an unknown status).
    #[error("{request}: unexpected answer {status}: {body}")]
    Unexpected {
        request: String,
        status: u16,
        body: String,
    },
}

impl ClientError {
    /// Whether sending the same command again (same command id) may succeed: transport errors,
    /// timeouts and 5xx.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ClientError::Transport { .. }
                | ClientError::Timeout { .. }
                | ClientError::Server { .. }
        )
    }
}

/// A client of one service (`http://host:port`). Cheap to clone: clones share the connection
/// pool.
#[derive(Clone, Debug)]
pub struct Client {
    http: HttpClient<HttpConnector, Full<Bytes>>,
    base: String,
    timeout: Duration,
}

#[derive(Deserialize)]
struct BalanceBody {
    balance: u64,
    #[serde(alias = "sequence")]
    version: u64,
}

impl Client {
    /// A client of the service at `base_url` (`http://127.0.0.1:8080`), with
    /// [`REQUEST_TIMEOUT_DEFAULT`].
    ///
    /// # Errors
    /// The URL is not `http://host[:port]`.
    pub fn new(base_url: &str) -> anyhow::Result<Client> {
        let base = base_url.trim_end_matches('/').to_owned();
        let uri: Uri = base
            .parse()
            .map_err(|e| anyhow::anyhow!("{base_url:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            anyhow::bail!("{base_url:?} is not an http://host[:port] URL");
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http = HttpClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Client {
            http,
            base,
            timeout: REQUEST_TIMEOUT_DEFAULT,
        })
    }

    /// The same client with another request timeout.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// `POST /accounts/{id}`: opens the account.
    ///
    /// # Cancel safety
    /// Dropped midway, the command may or may not be recorded: send it again with the same
    /// `command_id`.
    pub async fn open(
        &self,
        id: &str,
        owner: &str,
        command_id: Uuid,
    ) -> Result<Answer, ClientError> {
        let body = json!({ "owner": owner, "command_id": command_id.to_string() });
        self.command(&format!("/accounts/{}", segment(id)), &body)
            .await
    }

    /// `POST /accounts/{id}/deposits`.
    ///
    /// # Cancel safety
    /// As [`Client::open`].
    pub async fn deposit(
        &self,
        id: &str,
        amount: u64,
        command_id: Uuid,
    ) -> Result<Answer, ClientError> {
        let body = json!({ "amount": amount, "command_id": command_id.to_string() });
        self.command(&format!("/accounts/{}/deposits", segment(id)), &body)
            .await
    }

    /// `POST /accounts/{id}/withdrawals`.
    ///
    /// # Cancel safety
    /// As [`Client::open`].
    pub async fn withdraw(
        &self,
        id: &str,
        amount: u64,
        command_id: Uuid,
    ) -> Result<Answer, ClientError> {
        let body = json!({ "amount": amount, "command_id": command_id.to_string() });
        self.command(&format!("/accounts/{}/withdrawals", segment(id)), &body)
            .await
    }

    /// `GET /accounts/{id}` on `accounts`: the balance and version, `None` for an account never
    /// opened.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn account(&self, id: &str) -> Result<Option<Balance>, ClientError> {
        self.balance(&format!("/accounts/{}", segment(id))).await
    }

    /// `GET /balances/{id}` on `statements`: the balance and sequence, `None` for an account
    /// the producer does not have either.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn statement(&self, id: &str) -> Result<Option<Balance>, ClientError> {
        self.balance(&format!("/balances/{}", segment(id))).await
    }

    async fn command(&self, path: &str, body: &serde_json::Value) -> Result<Answer, ClientError> {
        let request = format!("POST {path}");
        let (status, bytes) = self
            .send(&request, Method::POST, path, Some(body.to_string()))
            .await?;
        match status {
            StatusCode::OK | StatusCode::CREATED => {
                parse_balance(&request, status, &bytes).map(Answer::Done)
            }
            _ if status.is_client_error() => match serde_json::from_slice::<Problem>(&bytes) {
                Ok(problem) => Ok(Answer::Refused(problem)),
                Err(_) => Err(unexpected(&request, status, &bytes)),
            },
            _ => Err(other_status(&request, status, &bytes)),
        }
    }

    async fn balance(&self, path: &str) -> Result<Option<Balance>, ClientError> {
        let request = format!("GET {path}");
        let (status, bytes) = self.send(&request, Method::GET, path, None).await?;
        match status {
            StatusCode::OK => parse_balance(&request, status, &bytes).map(Some),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(other_status(&request, status, &bytes)),
        }
    }

    async fn send(
        &self,
        request: &str,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let exchange = async {
            let transport = |detail: String| ClientError::Transport {
                request: request.to_owned(),
                detail,
            };
            let mut builder = Request::builder()
                .method(method)
                .uri(format!("{}{path}", self.base))
                .header(header::ACCEPT, "application/json");
            if body.is_some() {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
            }
            let http_request = builder
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| transport(format!("not a valid request: {e}")))?;
            let response = self
                .http
                .request(http_request)
                .await
                .map_err(|e| transport(error_chain(&e)))?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), RESPONSE_BYTES_MAX)
                .collect()
                .await
                .map_err(|e| transport(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Timeout {
                    request: request.to_owned(),
                    timeout: self.timeout,
                })
            })
    }
}

/// `text` as one path segment: every byte but `A-Z a-z 0-9 - . _ ~` percent-encoded, so that
/// any id reaches the service, which decides whether it is valid.
fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn parse_balance(request: &str, status: StatusCode, bytes: &[u8]) -> Result<Balance, ClientError> {
    serde_json::from_slice::<BalanceBody>(bytes)
        .map(|b| Balance {
            balance: b.balance,
            version_or_sequence: b.version,
        })
        .map_err(|_| unexpected(request, status, bytes))
}

fn quote(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.chars().take(QUOTE_BYTES_MAX).collect()
}

fn unexpected(request: &str, status: StatusCode, bytes: &[u8]) -> ClientError {
    ClientError::Unexpected {
        request: request.to_owned(),
        status: status.as_u16(),
        body: quote(bytes),
    }
}

fn other_status(request: &str, status: StatusCode, bytes: &[u8]) -> ClientError {
    if status.is_server_error() {
        ClientError::Server {
            request: request.to_owned(),
            status: status.as_u16(),
            body: quote(bytes),
        }
    } else {
        unexpected(request, status, bytes)
    }
}

/// An error and its sources, `: `-separated.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
