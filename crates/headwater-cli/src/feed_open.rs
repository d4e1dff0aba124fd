//! Opens a producer's feed store for reading: an embedded store's directory (read-only, without
//! its lock, so it works beside the running service) or a PostgreSQL store.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use headwater_embedded::EmbeddedFeedStore;

use crate::feed_tools::Opened;
use crate::pg_tools::{is_url, redacted};

pub(crate) async fn open(
    dir: Option<&Path>,
    postgres: Option<&str>,
    schema: &str,
) -> anyhow::Result<Opened> {
    let url = match (dir, postgres) {
        (_, Some(url)) => Some(url.to_owned()),
        (Some(dir), None) => dir.to_str().filter(|d| is_url(d)).map(str::to_owned),
        (None, None) => bail!("name the store: a directory, or --postgres URL"),
    };
    match (url, dir) {
        (Some(url), _) => open_postgres(&url, schema).await,
        (None, Some(dir)) => open_dir(dir),
        (None, None) => bail!("name the store: a directory, or --postgres URL"),
    }
}

fn open_dir(dir: &Path) -> anyhow::Result<Opened> {
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("cannot open the store directory {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let feeds = EmbeddedFeedStore::open_read_only(dir).with_context(|| {
        format!(
            "cannot open the feeds of the store in {} (a store whose service never registered \
             a projection has none)",
            dir.display()
        )
    })?;
    let log_dir = dir.to_path_buf();
    Ok(Opened {
        feeds: Arc::new(feeds),
        log_head: Box::new(move || {
            let inspection = headwater_embedded::inspect(&log_dir)
                .with_context(|| format!("cannot read the log in {}", log_dir.display()))?;
            Ok(inspection.head)
        }),
        name: dir.display().to_string(),
    })
}

async fn open_postgres(url: &str, schema: &str) -> anyhow::Result<Opened> {
    let name = format!("{}, schema {schema}", redacted(url));
    // The read-only inspection first: it refuses a schema that holds no store, creating nothing.
    headwater_postgres::inspect(url, schema)
        .await
        .with_context(|| format!("cannot read the store in {name}"))?;
    let mut options = headwater_postgres::Options::default();
    options.schema = schema.to_owned();
    let store = headwater_postgres::PostgresStore::connect(url, options)
        .await
        .with_context(|| format!("cannot connect to the store in {name}"))?;
    let log_store = store.clone();
    Ok(Opened {
        feeds: Arc::new(store.feed_store()),
        log_head: Box::new(move || Ok(headwater_store::EventStore::head_position(&log_store))),
        name,
    })
}
