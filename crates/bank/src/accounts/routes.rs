//! The command API over HTTP (SPEC.md, "The reference system: bank"):
//!
//! - `POST /accounts/{id}` `{"owner": "Ada", "command_id": "<uuid>"}` → 201 `{"balance": 0,
//!   "version": 1}`;
//! - `POST /accounts/{id}/deposits`, `POST /accounts/{id}/withdrawals` `{"amount": 100,
//!   "command_id": "<uuid>"}` → 200 `{"balance": …, "version": …}` (after the command);
//! - `GET /accounts/{id}` → 200 `{"balance": 500, "version": 7}`.
//!
//! Every command answers after its event is durable. A retry with the same `command_id` answers
//! the original outcome and records nothing: the answer is always read back from the event the
//! command recorded (which carries the balance after it), whether it was recorded now or before.
//! Refusals are problem+json (RFC 9457) with a stable `type` URI.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use headwater::store::EventStore;
use headwater::{CommandError, CommandHandler, CommandId, DomainEvent, ErrorKind};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::json;

use crate::accounts::account::{
    AMOUNT_CENTS_MAX, Account, BALANCE_CENTS_MAX, Command, Event, ID_BYTES_MAX, OWNER_BYTES_MAX,
    Refusal, valid_amount, valid_id, valid_owner,
};

/// The media type of every refusal.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";
/// The prefix of every problem `type` (the same as the feed API's).
pub const PROBLEM_TYPE_PREFIX: &str = "https://headwater.dev/problems/";

/// The refusals of the command API: each a `type` (`{PROBLEM_TYPE_PREFIX}{slug}`), a title and
/// a status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// 400: bad JSON, a missing or invalid field, a bad account id.
    BadRequest,
    /// 404: the account was never opened.
    AccountNotFound,
    /// 409: the account is open already.
    AlreadyOpen,
    /// 409: a withdrawal over the balance (recorded: its retry answers this again).
    InsufficientFunds,
    /// 409: a deposit that would take the balance past [`BALANCE_CENTS_MAX`].
    BalanceLimit,
    /// 409: the command id was used for a command on another account.
    CommandIdReused,
    /// 503: the store is unavailable (closed, failed, unreachable), or the account changed under
    /// the command too often; send the command again with the same `command_id`.
    Unavailable,
    /// 500: a bug (an event that cannot be encoded or decoded); the logs say which. Sending the
    /// command again with the same `command_id` is safe.
    Internal,
}

impl Problem {
    /// The last segment of the problem's `type` URI.
    pub const fn slug(self) -> &'static str {
        match self {
            Problem::BadRequest => "bad-request",
            Problem::AccountNotFound => "account-not-found",
            Problem::AlreadyOpen => "already-open",
            Problem::InsufficientFunds => "insufficient-funds",
            Problem::BalanceLimit => "balance-limit",
            Problem::CommandIdReused => "command-id-reused",
            Problem::Unavailable => "unavailable",
            Problem::Internal => "internal",
        }
    }

    pub const fn title(self) -> &'static str {
        match self {
            Problem::BadRequest => "Bad request",
            Problem::AccountNotFound => "No such account",
            Problem::AlreadyOpen => "The account is already open",
            Problem::InsufficientFunds => "Insufficient funds",
            Problem::BalanceLimit => "The balance would exceed its limit",
            Problem::CommandIdReused => "The command id was used for another account",
            Problem::Unavailable => "The store is unavailable",
            Problem::Internal => "Internal error",
        }
    }

    pub const fn status(self) -> StatusCode {
        match self {
            Problem::BadRequest => StatusCode::BAD_REQUEST,
            Problem::AccountNotFound => StatusCode::NOT_FOUND,
            Problem::AlreadyOpen
            | Problem::InsufficientFunds
            | Problem::BalanceLimit
            | Problem::CommandIdReused => StatusCode::CONFLICT,
            Problem::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Problem::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The answer: `{"type", "title", "status", "detail"}` plus `extra` members.
    fn answer(self, detail: &str, extra: Option<serde_json::Value>) -> Response {
        let mut body = json!({
            "type": format!("{PROBLEM_TYPE_PREFIX}{}", self.slug()),
            "title": self.title(),
            "status": self.status().as_u16(),
            "detail": detail,
        });
        if let (Some(serde_json::Value::Object(extra)), Some(body)) = (extra, body.as_object_mut())
        {
            body.extend(extra);
        }
        json_answer(self.status(), PROBLEM_CONTENT_TYPE, &body)
    }
}

fn json_answer(
    status: StatusCode,
    content_type: &'static str,
    body: &serde_json::Value,
) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = (status, bytes).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A command refused without recording anything: the problem, its detail and extra members.
struct Refused {
    problem: Problem,
    detail: String,
    extra: Option<serde_json::Value>,
}

impl Refused {
    fn new(problem: Problem, detail: impl Into<String>) -> Refused {
        Refused {
            problem,
            detail: detail.into(),
            extra: None,
        }
    }

    fn bad(detail: impl Into<String>) -> Refused {
        Refused::new(Problem::BadRequest, detail)
    }
}

/// The command API's metrics.
#[derive(Clone, Debug)]
pub(crate) struct CommandMetrics {
    commands: Family<CommandLabels, Counter>,
    duration: Family<KindLabel, Histogram, fn() -> Histogram>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    command: &'static str,
}

fn duration_histogram() -> Histogram {
    // 0.25 ms … ~4 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 15))
}

impl CommandMetrics {
    /// `bank_commands_total{command, outcome}` and `bank_command_duration_seconds{command}`.
    pub(crate) fn register(registry: &mut Registry) -> CommandMetrics {
        let metrics = CommandMetrics {
            commands: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
        };
        registry.register(
            "bank_commands",
            "Commands answered, by command and outcome (done, replayed, or the problem's type)",
            metrics.commands.clone(),
        );
        registry.register(
            "bank_command_duration_seconds",
            "Time to answer a command, by command",
            metrics.duration.clone(),
        );
        metrics
    }

    fn observe(&self, command: &'static str, outcome: &'static str, started: Instant) {
        self.commands
            .get_or_create(&CommandLabels { command, outcome })
            .inc();
        self.duration
            .get_or_create(&KindLabel { command })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// What the routes share.
#[derive(Clone)]
pub(crate) struct Commands {
    pub(crate) handler: CommandHandler<Account, dyn EventStore>,
    pub(crate) metrics: CommandMetrics,
}

/// The command routes (no fallback: the feed API's router, merged with this one, answers the
/// unknown paths).
pub(crate) fn router(commands: Commands) -> Router {
    Router::new()
        .route("/accounts/{id}", post(open).get(balance))
        .route("/accounts/{id}/deposits", post(deposit))
        .route("/accounts/{id}/withdrawals", post(withdraw))
        .with_state(Arc::new(commands))
}

#[derive(Deserialize)]
struct OpenBody {
    owner: Option<String>,
    command_id: Option<String>,
}

#[derive(Deserialize)]
struct MoveBody {
    amount: Option<u64>,
    command_id: Option<String>,
}

fn account_id(path: Result<Path<String>, PathRejection>) -> Result<String, Refused> {
    let Path(id) = path.map_err(|e| Refused::bad(format!("bad path: {e}")))?;
    if valid_id(&id) {
        Ok(id)
    } else {
        Err(Refused::bad(format!(
            "an account id is 1 to {ID_BYTES_MAX} characters of A-Z, a-z, 0-9, '_' and '-'"
        )))
    }
}

fn body<T: for<'de> Deserialize<'de>>(bytes: Result<Bytes, BytesRejection>) -> Result<T, Refused> {
    let bytes = bytes.map_err(|e| Refused::bad(format!("cannot read the body: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Refused::bad(format!("the body is not the JSON expected: {e}")))
}

fn command_id(text: Option<String>) -> Result<CommandId, Refused> {
    let text = text.ok_or_else(|| Refused::bad("`command_id` is missing"))?;
    CommandId::parse(&text).ok_or_else(|| Refused::bad("`command_id` is not a UUID"))
}

fn amount(amount: Option<u64>) -> Result<u64, Refused> {
    match amount {
        Some(amount) if valid_amount(amount) => Ok(amount),
        Some(amount) => Err(Refused::bad(format!(
            "`amount` is 1 to {AMOUNT_CENTS_MAX} cents, not {amount}"
        ))),
        None => Err(Refused::bad("`amount` is missing")),
    }
}

async fn open(
    State(commands): State<Arc<Commands>>,
    path: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let outcome = async {
        let id = account_id(path)?;
        let body: OpenBody = body(bytes)?;
        let command_id = command_id(body.command_id)?;
        let owner = body
            .owner
            .ok_or_else(|| Refused::bad("`owner` is missing"))?;
        if !valid_owner(&owner) {
            return Err(Refused::bad(format!(
                "`owner` is 1 to {OWNER_BYTES_MAX} bytes without control characters"
            )));
        }
        commands
            .handle(&id, Command::Open { owner }, command_id)
            .await
    }
    .await;
    commands.answer("open", outcome, started)
}

async fn deposit(
    State(commands): State<Arc<Commands>>,
    path: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    move_money(&commands, path, bytes, "deposit", |amount| {
        Command::Deposit { amount }
    })
    .await
}

async fn withdraw(
    State(commands): State<Arc<Commands>>,
    path: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    move_money(&commands, path, bytes, "withdraw", |amount| {
        Command::Withdraw { amount }
    })
    .await
}

/// A deposit or a withdrawal (`{"amount", "command_id"}`): `command` makes the command from the
/// amount; `name` labels its metrics.
async fn move_money(
    commands: &Commands,
    path: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, BytesRejection>,
    name: &'static str,
    command: impl FnOnce(u64) -> Command,
) -> Response {
    let started = Instant::now();
    let outcome = async {
        let id = account_id(path)?;
        let body: MoveBody = body(bytes)?;
        let command_id = command_id(body.command_id)?;
        let amount = amount(body.amount)?;
        commands.handle(&id, command(amount), command_id).await
    }
    .await;
    commands.answer(name, outcome, started)
}

/// `GET /accounts/{id}`: the balance and the stream's version.
async fn balance(
    State(commands): State<Arc<Commands>>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match account_id(path) {
        Ok(id) => id,
        Err(refused) => return refused.problem.answer(&refused.detail, None),
    };
    match commands.handler.load(&id).await {
        Ok(loaded) => match (loaded.state.owner, loaded.version) {
            (Some(_), Some(version)) => json_answer(
                StatusCode::OK,
                "application/json",
                &json!({ "balance": loaded.state.balance, "version": version.0 }),
            ),
            _ => Problem::AccountNotFound.answer(&format!("no account {id}"), None),
        },
        Err(error) => {
            let refused = refusal_of(&error);
            refused.problem.answer(&refused.detail, None)
        }
    }
}

/// The event a command recorded (now, or before: `replayed`), at stream version `version`, and
/// the status of a successful answer (201 for an opening).
struct Recorded {
    status: StatusCode,
    event: Event,
    version: u64,
    replayed: bool,
}

impl Commands {
    /// Handles the command, then reads back the one event it recorded (now, or before: a retry).
    async fn handle(
        &self,
        id: &str,
        command: Command,
        command_id: CommandId,
    ) -> Result<Recorded, Refused> {
        let handled = self
            .handler
            .handle(id, command, command_id)
            .await
            .map_err(|error| refusal_of(&error))?;
        let recorded = self
            .handler
            .store()
            .find_event(command_id.event_id(0))
            .await
            .map_err(|error| {
                tracing::warn!(%error, "cannot read back a command's event");
                Refused::new(
                    Problem::Unavailable,
                    format!("cannot read the outcome: {error}"),
                )
            })?
            .ok_or_else(|| {
                tracing::error!(%command_id, "a handled command's event is not found");
                Refused::new(Problem::Internal, "the command's event is not found")
            })?;
        let event = Event::decode(
            recorded.event_type.as_str(),
            recorded.metadata.schema_version,
            &recorded.data,
        )
        .map_err(|error| {
            tracing::error!(%error, "cannot decode a command's event");
            Refused::new(Problem::Internal, "the command's event cannot be read")
        })?;
        let status = match event {
            Event::Opened { .. } => StatusCode::CREATED,
            _ => StatusCode::OK,
        };
        Ok(Recorded {
            status,
            event,
            version: recorded.stream_version.0,
            replayed: handled.replayed,
        })
    }

    fn answer(
        &self,
        command: &'static str,
        outcome: Result<Recorded, Refused>,
        started: Instant,
    ) -> Response {
        match outcome {
            Ok(Recorded {
                event: Event::WithdrawalRefused { amount, balance },
                version,
                replayed,
                ..
            }) => {
                let problem = Problem::InsufficientFunds;
                self.metrics.observe(
                    command,
                    if replayed { "replayed" } else { problem.slug() },
                    started,
                );
                problem.answer(
                    &format!("a withdrawal of {amount} cents is over the balance of {balance}"),
                    Some(json!({ "balance": balance, "version": version })),
                )
            }
            Ok(recorded) => {
                self.metrics.observe(
                    command,
                    if recorded.replayed {
                        "replayed"
                    } else {
                        "done"
                    },
                    started,
                );
                json_answer(
                    recorded.status,
                    "application/json",
                    &json!({ "balance": recorded.event.balance(), "version": recorded.version }),
                )
            }
            Err(refused) => {
                self.metrics
                    .observe(command, refused.problem.slug(), started);
                refused.problem.answer(&refused.detail, refused.extra)
            }
        }
    }
}

/// The answer to a command that recorded nothing.
fn refusal_of(error: &CommandError<Refusal>) -> Refused {
    match error {
        CommandError::Rejected(refusal) => {
            let problem = match refusal {
                Refusal::AlreadyOpen => Problem::AlreadyOpen,
                Refusal::NotOpen => Problem::AccountNotFound,
                Refusal::BalanceLimit { .. } => Problem::BalanceLimit,
                Refusal::InvalidAmount(_) | Refusal::InvalidOwner => Problem::BadRequest,
            };
            let mut refused = Refused::new(problem, refusal.to_string());
            if let Refusal::BalanceLimit { balance, .. } = refusal {
                refused.extra = Some(json!({ "balance": balance, "limit": BALANCE_CENTS_MAX }));
            }
            refused
        }
        CommandError::CommandIdReused { .. } => {
            Refused::new(Problem::CommandIdReused, error.to_string())
        }
        CommandError::InvalidId(_) => Refused::bad(error.to_string()),
        CommandError::Conflict { .. } => {
            Refused::new(Problem::Unavailable, format!("{error}; send it again"))
        }
        other => match other.kind() {
            ErrorKind::BadRequest => Refused::bad(other.to_string()),
            // The store could not be read or written: closed, poisoned, or its backend failed
            // (PostgreSQL unreachable, an I/O error). Nothing was recorded by this try, or the
            // retry will tell: 503, send it again with the same command id.
            _ if matches!(other, CommandError::Store(_) | CommandError::Read(_)) => {
                tracing::warn!(error = %other, "a command failed on the store");
                Refused::new(Problem::Unavailable, other.to_string())
            }
            ErrorKind::Conflict | ErrorKind::Unavailable => {
                tracing::warn!(error = %other, "a command failed");
                Refused::new(Problem::Unavailable, other.to_string())
            }
            _ => {
                tracing::error!(error = %other, "a command failed");
                Refused::new(
                    Problem::Internal,
                    "the command failed; the service's logs say why",
                )
            }
        },
    }
}
