//! `bank statements` (being written).

use std::process::ExitCode;

/// The flags of `bank statements`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `bank statements`.
///
/// # Errors
/// Not written yet.
pub async fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("bank statements is not written yet")
}
