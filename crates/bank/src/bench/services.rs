//! The services under measurement, started in this process: `accounts` (on the embedded store
//! in a directory of the run, or on PostgreSQL in fresh schemas) and, for the latency figures,
//! `statements` following it through the HTTP feed or RabbitMQ.

use std::path::Path;
use std::sync::Arc;

/// The feed API token both services (and the bound's long poll) use.
pub(crate) const TOKEN: &str = "bench-token";

/// How `statements` receives the feed.
#[derive(Clone, Debug)]
pub(crate) enum Transport {
    /// Long polls of `accounts`' feed API.
    HttpFeed,
    /// A queue on this RabbitMQ broker, fed by `accounts`' publisher.
    Amqp(String),
}

impl Transport {
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Transport::HttpFeed => "HTTP feed",
            Transport::Amqp(_) => "RabbitMQ",
        }
    }
}

/// `accounts`, and `statements` when asked.
#[derive(Debug)]
pub(crate) struct System {
    accounts_url: String,
}

impl System {
    /// Starts `accounts` with its data in `dir` (or on `postgres`), and `statements` following
    /// it through `transport` when given.
    pub(crate) async fn start(
        dir: &Path,
        postgres: Option<&str>,
        transport: Option<&Transport>,
    ) -> anyhow::Result<System> {
        let _ = (dir, postgres, transport);
        anyhow::bail!("the services have not landed yet")
    }

    /// `http://127.0.0.1:PORT` of `accounts`.
    pub(crate) fn accounts_url(&self) -> String {
        self.accounts_url.clone()
    }

    /// Events `statements` applied so far (0 without `statements`).
    pub(crate) fn applied(&self) -> u64 {
        (self.applied_counter())()
    }

    /// A reader of [`System::applied`] for another thread.
    pub(crate) fn applied_counter(&self) -> impl Fn() -> u64 + Send + 'static {
        let counter = Arc::new(());
        move || {
            let _ = &counter;
            0
        }
    }

    /// Stops both services (in-flight commands finish).
    pub(crate) async fn shutdown(self) {}
}
