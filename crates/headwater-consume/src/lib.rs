//! The self-healing consumer (SPEC.md G7–G10; docs/design/consumer.md): a downstream service
//! keeps its own view of a producer's feed, applying each integration event exactly once, in
//! sequence order per subject, whatever the transport lost, duplicated or reordered.
//!
//! - [`IntegrationEvent`]: an event as a consumer receives it, decoded from the CloudEvent JSON the
//!   feed API serves and the publishers send (`IntegrationEvent::from_cloud_event`).
//! - [`ViewStore`]: where the consumer's view and its per-subject cursors live. Applying events
//!   and moving the subject's cursor is one transaction of the view store, done by the library:
//!   the user's handler only changes the view, so the cursor cannot be forgotten.
//!   [`MemoryView`] keeps it in memory (tests, examples), [`EmbeddedView`] in a SQLite file, [`PgView`] in a PostgreSQL
//!   schema.
//! - [`Upstream`]: what the consumer asks the producer when it sees a gap, bootstraps a subject or
//!   walks for lost last events: the feed API's `subjects` endpoints.
//! - [`Consumer`]: the rules — a duplicate (sequence ≤ cursor) is skipped, a gap (sequence >
//!   cursor + 1) is healed from upstream before the event is applied, `ensure(subject)` bootstraps
//!   a subject once however many callers ask, `reconstitute()` finds what no delivery brought.
//! - [`Walker`]: reconstitution as a service runs it — paced, resumable, one walk at a time,
//!   periodic and on demand ([`walker_router`]: `POST`/`GET /reconstitute`), with progress and
//!   metrics.
//! - [`VersionedConsumer`]: the consumer of one projection across its versions (G10): builds a
//!   new version's view beside the active one while that one keeps serving, flips atomically and
//!   durably, then stops reading the old version; readers read through [`ActiveFeed`].
//! - Transports: [`Consumer::follow_feed`] (the HTTP feed, long polling), [`AmqpSource`]
//!   (RabbitMQ) and [`NatsSource`] (NATS JetStream), each acking a message only after its commit;
//!   what cannot be applied goes to the view store's dead letters ([`DeadLetter`]) and parks only
//!   its own subject.
//! - Operators: [`Consumer::status`], [`Consumer::register_metrics`], [`admin::router`]
//!   (`GET /status`, `GET /metrics`).

pub mod admin;
mod amqp;
mod client;
mod consumer;
mod dead;
mod embedded;
mod event;
mod memory;
mod metrics;
mod nats;
mod postgres;
mod switch;
mod transport;
mod upstream;
mod view;
mod walker;

pub use admin::encode_metrics;
pub use client::{
    ClientError, FeedClient, LONG_POLL_WAIT_MAX, REQUEST_TIMEOUT_DEFAULT,
    RESPONSE_BYTES_MAX_DEFAULT, TOKEN_BYTES_MAX,
};
pub use consumer::{
    ConsumeError, Consumer, ConsumerOptions, ConsumerStats, ConsumerStatus, Delivery,
    FEED_WAIT_DEFAULT, HEAL_ATTEMPTS_DEFAULT, PAGE_EVENTS_DEFAULT, Reconstitution, STATUS_GAPS_MAX,
};
pub use embedded::EmbeddedView;
pub use event::{DecodeError, IntegrationEvent};
pub use memory::{MemoryUpstream, MemoryView};
pub use metrics::{OPEN_GAPS_TRACKED_MAX, OpenGap};
pub use postgres::{PgHandler, PgView};
/// The SQLite binding [`EmbeddedView`]'s handlers write with (its `Transaction`): use this one, so
/// the versions agree.
pub use rusqlite;
pub use switch::{
    ACTIVE_MARK_PREFIX, ActiveFeed, CONSUMER_NAME_BYTES_MAX, SWITCH_POLL_INTERVAL_DEFAULT,
    SWITCH_RETRY_INTERVAL_DEFAULT, SwitchError, SwitchOptions, SwitchPhase, SwitchStatus,
    VersionedConsumer,
};
/// The PostgreSQL client [`PgView`]'s handlers write with (its `Transaction`).
pub use tokio_postgres;
pub use upstream::{
    FeedListing, FeedReader, PROBLEM_FEED_RETIRED, Refusal, SubjectHead, Upstream, UpstreamError,
};
pub use view::{
    Applied, MARK_KEY_BYTES_MAX, MARK_VALUE_BYTES_MAX, ViewError, ViewStore, apply_each,
    check_contiguous, check_mark,
};
pub use walker::{
    RECONSTITUTE_ROUTE, WALK_BATCH_EVENTS_MAX, WALK_BATCH_LINGER, WALK_BURST_REQUESTS_DEFAULT,
    WALK_FETCHES_AT_ONCE_DEFAULT, WALK_FETCHES_AT_ONCE_MAX, WALK_PAGE_SUBJECTS_DEFAULT,
    WALK_PAGE_SUBJECTS_MAX, WALK_REQUESTS_PER_SECOND_DEFAULT, WALK_RETRY_AFTER_INTERRUPTION,
    WalkControl, WalkProgress, WalkState, WalkTrigger, Walker, WalkerNotRunning, WalkerOptions,
    WalkerStatus, walker_router,
};

pub use amqp::{AmqpSource, amqp_exchange, amqp_queue};
pub use dead::{
    DEAD_LETTER_ATTEMPTS_DEFAULT, DEAD_LETTER_BODY_BYTES_MAX, DEAD_LETTER_REASON_BYTES_MAX,
    DEAD_LETTERS_MAX, DeadLetter, DeadLetterKind, DeadLetterStatus, Handled, NewDeadLetter,
};
pub use nats::{ACK_WAIT_DEFAULT, NatsSource, nats_stream, nats_stream_subjects};
pub use transport::{
    LANES_DEFAULT, LANES_MAX, PREFETCH_DEFAULT, SOURCE_NAME_BYTES_MAX, TransportError,
    TransportOptions, TransportStats,
};
