//! Opens a producer's feed store for reading: an embedded store's directory or PostgreSQL.

use std::path::Path;

use crate::feed_tools::Opened;

pub(crate) async fn open(
    dir: Option<&Path>,
    postgres: Option<&str>,
    schema: &str,
) -> anyhow::Result<Opened> {
    let _ = (dir, postgres, schema);
    anyhow::bail!("not yet")
}
