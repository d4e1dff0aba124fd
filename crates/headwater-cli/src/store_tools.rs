//! `headwater inspect` and `headwater verify`: thin wrappers over the embedded backend's own
//! inspection and verification, which own the knowledge of the on-disk layout.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;

#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// The store's directory (the one given to the service as its data directory).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    /// The store's directory (the one given to the service as its data directory).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

pub(crate) fn inspect(args: &InspectArgs) -> anyhow::Result<ExitCode> {
    check_store_dir(&args.dir)?;
    bail!(
        "`headwater inspect` is not available yet: it is a wrapper over \
         `headwater_embedded::inspect`, which has not landed"
    )
}

pub(crate) fn verify(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    check_store_dir(&args.dir)?;
    bail!(
        "`headwater verify` is not available yet: it is a wrapper over \
         `headwater_embedded::verify`, which has not landed"
    )
}

/// Refuses early, with a clear message, a path that cannot be a store.
fn check_store_dir(dir: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("cannot open the store directory {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    Ok(())
}
