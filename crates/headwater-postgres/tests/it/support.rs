//! A schema of its own per test, on the server named by `HEADWATER_TEST_POSTGRES_URL`.

use headwater_postgres::{Options, PgFeedStore, PostgresStore};
use headwater_store::conformance::Harness;
use headwater_store::conformance::feed::FeedHarness;

pub(crate) use headwater_testkit::postgres::{fresh_schema, url};

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
        headwater_testkit::postgres::drop_schema(&self.url, &self.schema);
    }
}
