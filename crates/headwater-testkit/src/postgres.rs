//! The PostgreSQL server the tests run against (`HEADWATER_TEST_POSTGRES_URL`, set by
//! `scripts/test`), and schemas of their own that are dropped when the test ends.

/// The variable that names the test server.
pub const URL_ENV: &str = "HEADWATER_TEST_POSTGRES_URL";

/// The test server's URL. Fails the test when it is not set: these tests are never skipped.
pub fn url() -> String {
    std::env::var(URL_ENV).unwrap_or_else(|_| {
        panic!(
            "{URL_ENV} is not set: run ./scripts/test (it starts a private PostgreSQL), or set \
             {URL_ENV}=postgres://USER@HOST:PORT/DB to a PostgreSQL 15+ where tests may create \
             and drop schemas"
        )
    })
}

/// A fresh schema name, `hw_test_<random>`.
pub fn fresh_schema() -> String {
    format!("hw_test_{:016x}", rand::random::<u64>())
}

/// Drops `schema` on the server at `url` with everything in it. Best effort (a test that ends
/// leaves no schema behind unless the server is gone), on a thread of its own so that it works
/// from a `Drop` inside a runtime.
pub fn drop_schema(url: &str, schema: &str) {
    execute_blocking(
        url,
        format!("SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"),
    );
}

/// Runs `sql` on the server at `url` and waits for it, on a thread of its own. Best effort:
/// errors are ignored.
pub fn execute_blocking(url: &str, sql: String) {
    let url = url.to_owned();
    let cleanup = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async move {
            let Ok((client, connection)) =
                tokio_postgres::connect(&url, tokio_postgres::NoTls).await
            else {
                return;
            };
            tokio::spawn(connection);
            let _ = client.batch_execute(&sql).await;
        });
    });
    let _ = cleanup.join();
}
