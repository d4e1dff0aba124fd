//! Headwater: event-sourced microservices with consistency guarantees between services.
//!
//! This is the crate a service depends on. It holds:
//!
//! - the core model, re-exported from `headwater-core`: events ([`NewEvent`], [`RecordedEvent`]),
//!   [`StreamName`], [`StreamVersion`], [`Position`], [`ExpectedVersion`], named [`limits`];
//! - aggregates: [`Aggregate`] (pure `decide` and `evolve`), typed events with an explicit
//!   encoding ([`DomainEvent`]), [`Upcasters`] for older schema versions, and a given / when /
//!   then harness for their tests ([`testing::given`]);
//! - command handling: [`CommandHandler`] loads a stream, decides, appends at the version it
//!   loaded, retries on conflict with fresh state, and makes every command idempotent by its
//!   [`CommandId`];
//! - the event store interface and its backends, in [`store`];
//! - integration feeds, in [`feed`]: a [`feed::Projection`] per feed version (`accounts.v2`),
//!   run by [`feed::Projectors`], which backfills new versions and keeps the others live;
//! - the feed API, serving a producer's integration feeds over HTTP, in [`api`];
//! - publishing the feeds to RabbitMQ or NATS JetStream, in [`publish`];
//! - consuming a producer's feed into a view of one's own, exactly once per event, in
//!   [`consume`].
//!
//! A service writes its aggregate, tests it with [`testing::given`], and handles commands with a
//! [`CommandHandler`] over a store.

mod command;
mod error;
mod handler;

pub use command::{COMMAND_EVENT_ID_NAMESPACE, CommandContext, CommandId};
pub use error::CommandError;
pub use handler::{CommandHandler, Handled, Loaded};

pub use headwater_core::{
    Aggregate, DecodeError, DomainEvent, EncodeError, ErrorKind, EventId, EventType,
    EventTypeError, ExpectedVersion, InvalidAppend, Metadata, NewEvent, Position, RecordedEvent,
    StreamName, StreamNameError, StreamVersion, Timestamp, Upcasters, limits, testing,
};
/// The Prometheus client the services register their metrics with (a service passes one
/// `prometheus_client::registry::Registry` to every part, and serves it on `/metrics`).
pub use prometheus_client;
/// UUIDs, as used by event ids, command ids, correlation and causation ids.
pub use uuid::Uuid;

/// Event stores: the [`EventStore`](store::EventStore) interface, its errors and backends.
pub mod store {
    /// The embedded backend, the default: one directory per service, nothing to install.
    pub use headwater_embedded::{
        EmbeddedFeedStore, EmbeddedStore, OpenError as EmbeddedOpenError,
        Options as EmbeddedOptions,
    };
    pub use headwater_store::{
        AppendError, AppendOutcome, EventStore, MemoryStore, ReadError, read_all_pages,
        wait_for_position,
    };

    /// The PostgreSQL backend, for services with several replicas: a gap-free log for
    /// followers, leader election so one replica runs each follower (see `headwater-postgres`).
    pub mod postgres {
        pub use headwater_postgres::*;
    }
}

/// Integration feeds: projections of the internal log into versioned public feeds, and the
/// projectors that fill them (see `headwater-feed`).
pub mod feed {
    pub use headwater_core::{
        FeedId, FeedName, FeedPosition, FeedStatus, FeedVersion, FeedWordError, Sequence, Subject,
        integration_event_id,
    };
    pub use headwater_feed::{
        AlwaysLead, BackfillProgress, BuildError, COMMIT_BYTES_MAX, Emit, FnProjection, Leadership,
        Lease, LeaseHolder, ProjectFailure, Projection, ProjectionError, Projector, ProjectorError,
        ProjectorOptions, ProjectorState, ProjectorStatus, Projectors, ProjectorsBuilder,
        StartError, Stopped, build_feed, build_feed_until, decode, projection,
    };
    pub use headwater_store::{FeedError, FeedEvent, FeedState, FeedStore, MemoryFeedStore};
}

/// Publishing the feeds to a broker, at least once (G6): RabbitMQ or NATS JetStream, a durable
/// cursor per feed over what the broker confirmed (see `headwater-publish`).
pub mod publish {
    pub use headwater_publish::{
        AmqpBroker, BACKOFF_MAX_DEFAULT, BACKOFF_MIN_DEFAULT, BATCH_EVENTS_DEFAULT, Broker,
        BrokerArgs, BrokerError, CONFIRM_TIMEOUT_DEFAULT, IN_FLIGHT_BYTES_DEFAULT,
        IN_FLIGHT_EVENTS_DEFAULT, IN_FLIGHT_EVENTS_MAX, NatsBroker, Outcome,
        PUBLISH_BATCH_EVENTS_MAX, Pending, PublisherOptions, PublisherState, PublisherStatus,
        Publishers, PublishersBuilder, Refusal, SHUTDOWN_GRACE_DEFAULT, StartError, exchange_name,
        nats_subject, stream_name, stream_subjects,
    };
    pub use headwater_store::PublisherCursor;
}

/// The feed API: a producer's integration feeds over HTTP (CloudEvents, long polling, bearer
/// tokens), on a feed store.
pub mod api {
    pub use headwater_api::{
        ApiConfig, CLOUDEVENTS_BATCH_CONTENT_TYPE, ConfigError, FEED_PAGE_EVENTS_DEFAULT, FeedApi,
        FeedScope, LONG_POLL_TIMEOUT_MS_MAX, LONG_POLLS_WAITING_MAX, MetricsAccess, OPENAPI_JSON,
        PROBLEM_CONTENT_TYPE, ProblemType, READERS_FLUSH_INTERVAL, SUBJECT_PAGE_DEFAULT, Tokens,
        serve,
    };
}

/// Consuming a producer's feed (G7–G10): a view store whose per-subject cursors commit with the
/// view, gap healing and bootstrap on demand from the producer's feed API, reconstitution walks,
/// transports (the HTTP feed, RabbitMQ, NATS JetStream) and the operator's status and metrics
/// (see `headwater-consume`). Everything of that crate, re-exported whole.
pub mod consume {
    pub use headwater_consume::*;
    // Crates re-exported by name are not carried by the glob above.
    pub use headwater_consume::{rusqlite, tokio_postgres};
}
