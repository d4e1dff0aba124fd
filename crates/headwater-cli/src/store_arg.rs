//! The store argument every verb takes: a directory, `--postgres URL` (or the URL in place of
//! the directory), and `--schema`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;

#[derive(Debug, Args)]
pub(crate) struct StoreArgs {
    /// The store's directory (the one given to the service as its data directory), or a
    /// PostgreSQL URL (as `--postgres`).
    #[arg(
        value_name = "DIR",
        required_unless_present = "postgres",
        conflicts_with = "postgres"
    )]
    pub(crate) dir: Option<PathBuf>,
    /// A PostgreSQL store instead: the server (`postgres://USER@HOST:PORT/DB`).
    #[arg(long, value_name = "URL")]
    pub(crate) postgres: Option<String>,
    /// The PostgreSQL store's schema.
    #[arg(long, value_name = "NAME", default_value = headwater_postgres::SCHEMA_DEFAULT)]
    pub(crate) schema: String,
}

/// The store a command names.
pub(crate) enum Target<'a> {
    Dir(&'a Path),
    Postgres(&'a str),
}

impl StoreArgs {
    /// Which store the arguments name; a directory is not checked yet (see [`check_store_dir`]).
    pub(crate) fn target(&self) -> anyhow::Result<Target<'_>> {
        if let Some(url) = &self.postgres {
            return Ok(Target::Postgres(url));
        }
        let Some(dir) = &self.dir else {
            bail!("name the store: a directory, or --postgres URL");
        };
        match dir.to_str() {
            Some(text) if crate::pg_tools::is_url(text) => Ok(Target::Postgres(text)),
            _ => Ok(Target::Dir(dir)),
        }
    }

    /// The feed API URL (`http://…`) given in place of the directory, if any.
    pub(crate) fn api_url(&self) -> Option<&str> {
        self.dir
            .as_deref()
            .and_then(Path::to_str)
            .filter(|d| crate::feed_http::is_http(d))
    }
}

/// Refuses early, with a clear message, a path that cannot be a store.
pub(crate) fn check_store_dir(dir: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("cannot open the store directory {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    Ok(())
}
