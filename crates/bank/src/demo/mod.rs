//! `bank demo` (being written).

pub mod link;
mod progress;
mod relay;
mod report;

use std::process::ExitCode;

/// The flags of `bank demo`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `bank demo`.
///
/// # Errors
/// Not written yet.
pub async fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("bank demo is not written yet")
}
