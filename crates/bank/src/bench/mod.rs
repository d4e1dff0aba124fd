//! `bank bench` (being written).

use std::process::ExitCode;

/// The flags of `bank bench`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `bank bench`.
///
/// # Errors
/// Not written yet.
pub async fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("bank bench is not written yet")
}
