//! Named limits. Every input from outside is checked against one of these before anything is
//! written; every read page and queue is bounded by one of these. Units come last in the name.

/// The longest stream name, in bytes (`category-id`).
pub const STREAM_NAME_BYTES_MAX: usize = 200;
/// The longest category (the part of a stream name before the first `-`), in bytes.
pub const CATEGORY_BYTES_MAX: usize = 64;
/// The longest event type, in bytes.
pub const EVENT_TYPE_BYTES_MAX: usize = 128;
/// The largest `data` of one event, in bytes.
pub const EVENT_DATA_BYTES_MAX: usize = 1024 * 1024;
/// The most events in one append.
pub const APPEND_EVENTS_MAX: usize = 1_000;
/// The largest append, summing the `data` of its events, in bytes.
pub const APPEND_BYTES_MAX: usize = 16 * 1024 * 1024;
/// The most events one read returns.
pub const READ_PAGE_EVENTS_MAX: u64 = 10_000;
/// A read page stops early once its events' `data` reach this many bytes (a page always holds at
/// least one event, so a single large event is still readable).
pub const READ_PAGE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// The most times a command is decided again on fresh state after a conflict.
pub const COMMAND_ATTEMPTS_MAX: u32 = 8;
/// The longest feed (projection) name, in bytes.
pub const FEED_NAME_BYTES_MAX: usize = 64;
/// The longest name of a feed's publisher (`rabbitmq`, `nats`), in bytes.
pub const PUBLISHER_NAME_BYTES_MAX: usize = 64;
/// The longest subject of an integration event, in bytes.
pub const SUBJECT_BYTES_MAX: usize = 200;
/// The largest `data` of one integration event, in bytes (serialized JSON).
pub const INTEGRATION_DATA_BYTES_MAX: usize = 1024 * 1024;
/// The most integration events one projection may make of one internal event.
pub const PROJECTED_EVENTS_PER_EVENT_MAX: usize = 64;
/// The most integration events one feed read returns.
pub const FEED_PAGE_EVENTS_MAX: u64 = 10_000;
/// The most subjects one subject listing returns.
pub const SUBJECT_PAGE_MAX: u64 = 10_000;
