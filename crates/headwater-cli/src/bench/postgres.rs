//! `headwater bench --backend postgres`: the same workloads on a [`PostgresStore`], each run in a
//! fresh schema of its own, dropped at the end of the run unless `--keep`.

use std::path::Path;

use anyhow::Context;
use headwater_postgres::{Options, PostgresStore};

use super::{Plan, Results};

/// The prefix of the benchmark's schemas.
const SCHEMA_PREFIX: &str = "headwater_bench_";

pub(crate) async fn measure(
    url: &str,
    keep: bool,
    store_dir: &Path,
    fsync_dir: &Path,
    plan: &Plan,
) -> anyhow::Result<Results> {
    let schema = format!("{SCHEMA_PREFIX}{:016x}", rand::random::<u64>());
    let store = PostgresStore::connect(url, Options::with_schema(&schema))
        .await
        .context("cannot connect the PostgreSQL store (--postgres)")?;
    tracing::info!(schema = %schema, "PostgreSQL store connected");
    let results = super::measure(store, store_dir, fsync_dir, plan).await;
    if keep {
        tracing::info!(schema = %schema, "kept the PostgreSQL schema");
    } else if let Err(error) = drop_schema(url, &schema).await {
        // The figures are still worth printing: say what is left behind.
        tracing::warn!(schema = %schema, "could not drop the benchmark's schema: {error:#}");
    }
    results
}

/// The feeds suite on a fresh schema of its own.
pub(crate) async fn measure_feeds(
    url: &str,
    keep: bool,
    plan: &Plan,
) -> anyhow::Result<super::feeds::FeedFigures> {
    let schema = format!("{SCHEMA_PREFIX}{:016x}", rand::random::<u64>());
    let store = PostgresStore::connect(url, Options::with_schema(&schema))
        .await
        .context("cannot connect the PostgreSQL store (--postgres)")?;
    tracing::info!(schema = %schema, "PostgreSQL store connected (feeds)");
    let feeds = std::sync::Arc::new(store.feed_store());
    let results = super::feeds::measure(std::sync::Arc::new(store), feeds, plan).await;
    if keep {
        tracing::info!(schema = %schema, "kept the PostgreSQL schema");
    } else if let Err(error) = drop_schema(url, &schema).await {
        tracing::warn!(schema = %schema, "could not drop the benchmark's schema: {error:#}");
    }
    results
}

pub(crate) async fn drop_schema(url: &str, schema: &str) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("cannot connect to PostgreSQL")?;
    let connection = tokio::spawn(connection);
    // The schema name is ours, made of a constant prefix and hex digits: no quoting needed.
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .with_context(|| format!("DROP SCHEMA {schema}"))?;
    drop(client);
    let _ = connection.await;
    Ok(())
}
