//! The services under measurement, started in this process: `accounts` (on the embedded store
//! in a directory of the run, or on PostgreSQL in a fresh schema) and, for the latency figures,
//! `statements` following it through the HTTP feed or RabbitMQ.

use std::path::Path;

use anyhow::Context;
use headwater::publish::BrokerArgs;

use crate::{accounts, statements};

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
    accounts: accounts::Accounts,
    statements: Option<statements::Statements>,
    /// The PostgreSQL schema of `accounts`, dropped at shutdown.
    schema: Option<(String, String)>,
}

impl System {
    /// Starts `accounts` with its data in `dir` (or in a fresh schema on `postgres`), and
    /// `statements` following it through `transport` when given (its view in `dir` too).
    pub(crate) async fn start(
        dir: &Path,
        postgres: Option<&str>,
        transport: Option<&Transport>,
    ) -> anyhow::Result<System> {
        let mut config = accounts::Config::new(dir.join("accounts"));
        config.token = Some(TOKEN.to_owned());
        let mut schema = None;
        if let Some(url) = postgres {
            let name = format!("{}{:016x}", super::SCHEMA_PREFIX, rand::random::<u64>());
            config.postgres = Some(url.to_owned());
            config.postgres_schema = name.clone();
            schema = Some((url.to_owned(), name));
        }
        if transport.is_some() {
            // Only the feed `statements` reads: with a broker, a feed nobody's queue is bound to
            // would have its publisher refused (unroutable) and retrying all along.
            config.versions = vec![1];
        }
        if let Some(Transport::Amqp(url)) = transport {
            let mut broker = BrokerArgs::default();
            broker.amqp = Some(url.clone());
            config.broker = broker;
        }
        let accounts = accounts::start(config)
            .await
            .context("cannot start accounts")?;
        let statements = match transport {
            None => None,
            Some(transport) => {
                let mut config = statements::Config::new(dir.join("statements"), &accounts.url());
                config.token = Some(TOKEN.to_owned());
                // No walks during a measurement: nothing is lost on the way.
                config.reconstitute_every = None;
                config.transport = match transport {
                    Transport::HttpFeed => statements::Transport::Http,
                    Transport::Amqp(url) => statements::Transport::Amqp(url.clone()),
                };
                // A queue of its own per run: the broker outlives the runs.
                config.name = format!("bench-{:08x}", rand::random::<u32>());
                match statements::start(config).await {
                    Ok(statements) => Some(statements),
                    Err(error) => {
                        accounts.shutdown().await;
                        return Err(error.context("cannot start statements"));
                    }
                }
            }
        };
        Ok(System {
            accounts,
            statements,
            schema,
        })
    }

    /// `http://127.0.0.1:PORT` of `accounts`.
    pub(crate) fn accounts_url(&self) -> String {
        self.accounts.url()
    }

    /// Events `statements` applied so far (0 without `statements`).
    pub(crate) fn applied(&self) -> u64 {
        (self.applied_counter())()
    }

    /// A reader of [`System::applied`] for another thread: the consumer's counter (an atomic).
    pub(crate) fn applied_counter(&self) -> impl Fn() -> u64 + Send + 'static {
        let consumer = self.statements.as_ref().map(|s| s.consumer());
        move || consumer.as_ref().map_or(0, |c| c.stats().applied)
    }

    /// Stops both services (in-flight commands finish) and drops the schema.
    pub(crate) async fn shutdown(self) {
        if let Some(statements) = self.statements
            && let Err(error) = statements.shutdown().await
        {
            tracing::warn!("statements stopped with an error: {error:#}");
        }
        self.accounts.shutdown().await;
        if let Some((url, schema)) = self.schema {
            super::drop_schema(&url, &schema).await;
        }
    }
}
