//! Publishing with real processes: a producer (a child process of this binary, see `producer`)
//! appends, projects one feed, publishes it to a real broker and serves its feed API, while a
//! test kills it with SIGKILL, stops and starts the broker, or starts it with no broker at all;
//! at the end a checker consumes the broker and finds every integration event of the feed at
//! least once, and for each subject the first deliveries in sequence order (`checker`).
//!
//! The crash loops use the brokers `scripts/test` starts (HEADWATER_TEST_AMQP_URL,
//! HEADWATER_TEST_NATS_URL) with a feed of their own; the tests that stop or start a broker start
//! a private one (`headwater_testkit::broker`). Without the brokers these tests fail: they are
//! never skipped.
//!
//! `HEADWATER_CRASH_SEED=<u64>` replays a run's random choices; each test prints its seed first.

mod broker_restart;
mod checker;
mod crash;
mod no_broker;
mod producer;

use headwater_core::FeedId;
use headwater_store::FeedEvent;
use headwater_testkit::broker::BrokerKind;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::processes::checker::AmqpQueue;

/// Set by whoever runs the tests: the seed of a test's random choices.
const SEED_ENV: &str = "HEADWATER_CRASH_SEED";

/// The test's random generator, its seed printed (from [`SEED_ENV`] when set).
fn seeded() -> StdRng {
    let seed = std::env::var(SEED_ENV)
        .ok()
        .map_or_else(rand::random::<u64>, |s| s.parse().unwrap());
    eprintln!("{SEED_ENV}={seed}");
    StdRng::seed_from_u64(seed)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The shared broker of that kind `scripts/test` started.
fn shared_broker_url(kind: BrokerKind) -> String {
    let (var, script) = match kind {
        BrokerKind::RabbitMq => ("HEADWATER_TEST_AMQP_URL", "rabbitmq.sh && rabbitmq_start"),
        _ => ("HEADWATER_TEST_NATS_URL", "nats.sh && nats_start"),
    };
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run scripts/test, or `source scripts/lib/{script}` first")
    })
}

/// What the checker needs to prepare before anything is published: on RabbitMQ, the queue that
/// keeps the feed's messages.
#[derive(Debug)]
enum Checker {
    Amqp(AmqpQueue),
    Nats(String),
}

impl Checker {
    /// Prepares the broker at `url` (it must be running) for checking `feed`.
    async fn prepare(kind: BrokerKind, url: &str, feed: &FeedId) -> Checker {
        match kind {
            BrokerKind::RabbitMq => Checker::Amqp(checker::amqp_prepare(url, feed).await),
            _ => Checker::Nats(url.to_owned()),
        }
    }

    /// Consumes what the broker holds of `feed` and checks it against the whole feed.
    async fn check(self, feed: &FeedId, expected: &[FeedEvent]) {
        match self {
            Checker::Amqp(queue) => queue.check(expected).await,
            Checker::Nats(url) => checker::nats_check(&url, feed, expected).await,
        }
    }
}
