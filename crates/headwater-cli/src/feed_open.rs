//! Opens a producer's feed store for reading: an embedded store's directory (read-only, without
//! its lock, so it works beside the running service) or a PostgreSQL store.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use headwater_embedded::EmbeddedFeedStore;

use crate::feed_tools::Opened;
use crate::pg_tools::redacted;
use crate::store_arg::{StoreArgs, Target, check_store_dir};

/// Which store the arguments name, a directory checked to be one.
fn target(args: &StoreArgs) -> anyhow::Result<Target<'_>> {
    let target = args.target()?;
    if let Target::Dir(dir) = target {
        check_store_dir(dir)?;
    }
    Ok(target)
}

/// Opens the store named for reading.
pub(crate) async fn open(args: &StoreArgs) -> anyhow::Result<Opened> {
    match target(args)? {
        Target::Postgres(url) => open_postgres(url, &args.schema).await,
        Target::Dir(dir) => open_dir(dir),
    }
}

/// Opens the store named for writing (`headwater retire`). An embedded store is opened with its
/// lock, so this fails while its service runs: the service owns its directory.
pub(crate) async fn open_writable(args: &StoreArgs) -> anyhow::Result<Opened> {
    let dir = match target(args)? {
        Target::Postgres(url) => return open_postgres(url, &args.schema).await,
        Target::Dir(dir) => dir,
    };
    let store = match headwater_embedded::EmbeddedStore::open(dir) {
        Ok(store) => store,
        Err(headwater_embedded::OpenError::Locked { .. }) => bail!(
            "the store in {} is open in its service (locked): stop the service to retire a feed \
             of an embedded store, then start it again",
            dir.display()
        ),
        Err(error) => {
            return Err(error)
                .with_context(|| format!("cannot open the store in {}", dir.display()));
        }
    };
    let feeds = store
        .feeds()
        .with_context(|| format!("cannot open the feeds of the store in {}", dir.display()))?;
    Ok(Opened {
        feeds: Arc::new(feeds),
        log_head: Box::new(move || Ok(headwater_store::EventStore::head_position(&store))),
        name: dir.display().to_string(),
    })
}

fn open_dir(dir: &Path) -> anyhow::Result<Opened> {
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
