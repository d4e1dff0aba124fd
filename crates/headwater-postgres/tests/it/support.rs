//! A schema of its own per test, on the server named by `HEADWATER_TEST_POSTGRES_URL`.

use headwater_postgres::{Options, PgFeedStore, PostgresStore};
use headwater_store::conformance::Harness;
use headwater_store::conformance::feed::FeedHarness;

/// The variable that names the test server.
pub(crate) const URL_ENV: &str = "HEADWATER_TEST_POSTGRES_URL";

/// The test server's URL. Fails the test when it is not set: these tests are never skipped.
pub(crate) fn url() -> String {
    std::env::var(URL_ENV).unwrap_or_else(|_| {
        panic!(
            "{URL_ENV} is not set: run ./scripts/test (it starts a private PostgreSQL), or set \
             {URL_ENV}=postgres://USER@HOST:PORT/DB to a PostgreSQL 15+ where tests may create \
             and drop schemas"
        )
    })
}

/// A fresh schema name, `hw_test_<random>`.
pub(crate) fn fresh_schema() -> String {
    format!("hw_test_{:016x}", rand::random::<u64>())
}

/// A store in a schema of its own, dropped with the harness.
#[derive(Debug)]
pub(crate) struct Fresh {
    pub(crate) url: String,
    pub(crate) schema: String,
}

impl Fresh {
    pub(crate) fn new() -> Fresh {
        Fresh {
            url: url(),
            schema: fresh_schema(),
        }
    }

    pub(crate) fn options(&self) -> Options {
        Options::with_schema(&self.schema)
    }

    pub(crate) async fn connect(&self, options: Options) -> PostgresStore {
        PostgresStore::connect(&self.url, options)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url))
    }

    /// A plain client on the test server, for looking behind the store's back.
    pub(crate) async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }
}

impl Harness for Fresh {
    type Store = PostgresStore;

    async fn open(&self) -> PostgresStore {
        self.connect(self.options()).await
    }
}

impl FeedHarness for Fresh {
    type Store = PgFeedStore;

    async fn open(&self) -> PgFeedStore {
        self.connect(self.options()).await.feed_store()
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        // Best effort, on a thread of its own (this may run inside a runtime).
        let url = self.url.clone();
        let schema = self.schema.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let Ok((client, connection)) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                else {
                    return;
                };
                tokio::spawn(connection);
                let _ = client
                    .batch_execute(&format!(
                        "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                    ))
                    .await;
            });
        });
        let _ = cleanup.join();
    }
}
