//! `bank accounts` (being written).

use std::process::ExitCode;

/// The flags of `bank accounts`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `bank accounts`.
///
/// # Errors
/// Not written yet.
pub async fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("bank accounts is not written yet")
}
