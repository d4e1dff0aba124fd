//! The fsync bound: how many `write + fdatasync` of one record this disk does per second.
//!
//! A store that acknowledges each append only once it is durable cannot beat this with one
//! waiting writer; group commit (many writers sharing one fsync) and batches are the ways past
//! it. Two loops are measured: appending to a growing file (each fdatasync also commits the new
//! file size: what an append-only log pays), and overwriting space that was allocated and synced
//! beforehand (no metadata to commit: what a store that reuses its files, such as a SQLite WAL,
//! can reach).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;

use super::report::Rate;
use super::{Plan, progress_bar};

/// The size of the pre-allocated file of the overwrite loop, in bytes. Large enough that the
/// loop cycles over many blocks, small enough to allocate in a moment.
const OVERWRITE_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Both fsync loops.
#[derive(Clone, Debug)]
pub(crate) struct FsyncFigures {
    /// Appending to a growing file: the bound.
    pub(crate) growing: Rate,
    /// Overwriting pre-allocated, synced space.
    pub(crate) overwrite: Rate,
}

pub(crate) fn measure(dir: &Path, plan: &Plan) -> anyhow::Result<FsyncFigures> {
    let record = record(plan.record_bytes);
    let growing = growing(dir, &record, plan)?;
    tracing::info!(
        ops_per_sec = format_args!("{:.0}", growing.per_second()),
        "fsync bound (growing file)"
    );
    let overwrite = overwrite(dir, &record, plan)?;
    tracing::info!(
        ops_per_sec = format_args!("{:.0}", overwrite.per_second()),
        "fsync on pre-allocated space"
    );
    Ok(FsyncFigures { growing, overwrite })
}

/// A record that does not compress or deduplicate to nothing.
fn record(bytes: u64) -> Vec<u8> {
    let len = usize::try_from(bytes).unwrap_or(usize::MAX);
    (0..len)
        .map(|i| u8::try_from((i * 131 + 7) % 251).unwrap_or(0))
        .collect()
}

fn growing(dir: &Path, record: &[u8], plan: &Plan) -> anyhow::Result<Rate> {
    let path = dir.join("growing");
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    sync_dir(dir)?;
    let bar = progress_bar(
        "fsync bound: write + fdatasync, growing file",
        millis(plan),
        "ms",
    );
    let mut rate = Rate::new();
    let start = Instant::now();
    while start.elapsed() < plan.phase {
        let op = Instant::now();
        file.write_all(record)
            .with_context(|| format!("write to {}", path.display()))?;
        file.sync_data()
            .with_context(|| format!("fdatasync of {}", path.display()))?;
        rate.record(op.elapsed(), 1);
        bar.set_position(elapsed_millis(start));
    }
    rate.finish(start.elapsed());
    bar.finish_and_clear();
    drop(file);
    std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    Ok(rate)
}

fn overwrite(dir: &Path, record: &[u8], plan: &Plan) -> anyhow::Result<Rate> {
    let path = dir.join("overwrite");
    let file = preallocate(&path, record.len())?;
    sync_dir(dir)?;
    let slots = (OVERWRITE_FILE_BYTES / record.len() as u64).max(1);
    let bar = progress_bar("write + fdatasync, pre-allocated space", millis(plan), "ms");
    let mut rate = Rate::new();
    let mut slot = 0u64;
    let start = Instant::now();
    while start.elapsed() < plan.phase {
        let op = Instant::now();
        file.write_all_at(record, slot * record.len() as u64)
            .with_context(|| format!("write to {}", path.display()))?;
        file.sync_data()
            .with_context(|| format!("fdatasync of {}", path.display()))?;
        rate.record(op.elapsed(), 1);
        slot = (slot + 1) % slots;
        bar.set_position(elapsed_millis(start));
    }
    rate.finish(start.elapsed());
    bar.finish_and_clear();
    drop(file);
    std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    Ok(rate)
}

/// A file of at least [`OVERWRITE_FILE_BYTES`] (at least one record), written and synced, so
/// that overwriting it changes no metadata that fdatasync must commit.
fn preallocate(path: &Path, record_len: usize) -> anyhow::Result<File> {
    let mut file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let total = OVERWRITE_FILE_BYTES.max(record_len as u64);
    let chunk = vec![0u8; 1024 * 1024];
    let mut written = 0u64;
    while written < total {
        let len = chunk
            .len()
            .min(usize::try_from(total - written).unwrap_or(usize::MAX));
        file.write_all(&chunk[..len])
            .with_context(|| format!("cannot pre-allocate {}", path.display()))?;
        written += len as u64;
    }
    file.sync_all()
        .with_context(|| format!("fsync of {}", path.display()))?;
    Ok(file)
}

/// Makes the new file's directory entry durable, as a store does when it creates a file.
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync of the directory {}", dir.display()))
}

fn millis(plan: &Plan) -> u64 {
    u64::try_from(plan.phase.as_millis()).unwrap_or(u64::MAX)
}

fn elapsed_millis(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}
