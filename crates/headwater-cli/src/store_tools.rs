//! `headwater inspect` and `headwater verify`: thin wrappers over the embedded backend's own
//! [`headwater_embedded::inspect`] and [`headwater_embedded::verify`], which own the knowledge of
//! the on-disk layout. This module only presents what they return.
//!
//! Both read a consistent snapshot without taking the store's lock, so they work on a live store.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use headwater_embedded::{Inspection, VerifyProgress, VerifyReport, VerifyStage};
use indicatif::ProgressBar;

use crate::store_arg::{StoreArgs, Target, check_store_dir};
use crate::text::{bytes, count, utc};

#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    #[command(flatten)]
    store: StoreArgs,
}

pub(crate) fn inspect(args: &InspectArgs) -> anyhow::Result<ExitCode> {
    let dir = match args.store.target()? {
        Target::Postgres(url) => return crate::pg_tools::inspect(url, &args.store.schema),
        Target::Dir(dir) => dir,
    };
    check_store_dir(dir)?;
    let inspection = headwater_embedded::inspect(dir)
        .with_context(|| format!("cannot inspect the store in {}", dir.display()))?;
    print!("{}", render_inspection(&inspection));
    Ok(ExitCode::SUCCESS)
}

fn render_inspection(i: &Inspection) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "store      {} (format version {})",
        i.path.display(),
        i.format_version
    );
    let _ = writeln!(out, "events     {}", count(i.events));
    let _ = writeln!(
        out,
        "streams    {} in {} {}",
        count(i.streams),
        count(i.categories),
        if i.categories == 1 {
            "category"
        } else {
            "categories"
        }
    );
    let _ = writeln!(out, "head       position {}", i.head);
    match (i.first_recorded_at, i.last_recorded_at) {
        (Some(first), Some(last)) => {
            let _ = writeln!(out, "recorded   {} … {}", utc(first), utc(last));
        }
        _ => {
            let _ = writeln!(out, "recorded   nothing yet");
        }
    }
    let f = &i.files;
    let _ = writeln!(
        out,
        "on disk    {} (database {}, WAL {}, WAL index {})",
        bytes(f.total_bytes),
        bytes(f.database_bytes),
        bytes(f.wal_bytes),
        bytes(f.shm_bytes)
    );
    if !i.top_categories.is_empty() {
        let shown = i.top_categories.len() as u64;
        let title = if shown < i.categories {
            format!(
                "\nthe {shown} largest categories of {}:\n\n",
                count(i.categories)
            )
        } else {
            "\ncategories:\n\n".to_owned()
        };
        out.push_str(&title);
        out.push_str("| category | streams | events |\n| --- | ---: | ---: |\n");
        for c in &i.top_categories {
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                c.category,
                count(c.streams),
                count(c.events)
            );
        }
    }
    out
}

pub(crate) fn verify(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let dir = match args.store.target()? {
        Target::Postgres(url) => return crate::pg_tools::verify(url, &args.store.schema),
        Target::Dir(dir) => dir,
    };
    check_store_dir(dir)?;
    let mut bars = StageBars::default();
    let report = headwater_embedded::verify(dir, &mut |progress| bars.update(progress));
    bars.finish();
    let report = report.with_context(|| format!("cannot verify the store in {}", dir.display()))?;
    print!("{}", render_report(dir, &report));
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One progress bar per stage of `verify` (hidden when stderr is not a terminal).
#[derive(Debug, Default)]
struct StageBars {
    current: Option<(VerifyStage, ProgressBar)>,
}

impl StageBars {
    fn update(&mut self, progress: VerifyProgress) {
        let same_stage = matches!(&self.current, Some((stage, _)) if *stage == progress.stage);
        if !same_stage {
            self.finish();
            let label = format!("verify: {}", progress.stage);
            let bar = if progress.stage == VerifyStage::IntegrityCheck {
                let bar = ProgressBar::new_spinner();
                bar.set_message(label);
                bar.enable_steady_tick(std::time::Duration::from_millis(200));
                bar
            } else {
                crate::bench::progress_bar(&label, progress.total, "events")
            };
            self.current = Some((progress.stage, bar));
        }
        if let Some((_, bar)) = &self.current {
            bar.set_position(progress.done);
        }
    }

    fn finish(&mut self) {
        if let Some((_, bar)) = self.current.take() {
            bar.finish_and_clear();
        }
    }
}

fn render_report(dir: &Path, report: &VerifyReport) -> String {
    let mut out = String::new();
    let mut checked = format!(
        "{} events in {} streams",
        count(report.events_checked),
        count(report.streams_checked)
    );
    if report.feeds_checked > 0 {
        let _ = write!(
            checked,
            ", {} feed events in {} {}",
            count(report.feed_events_checked),
            count(report.feeds_checked),
            if report.feeds_checked == 1 {
                "feed"
            } else {
                "feeds"
            }
        );
    }
    if report.is_clean() {
        let feeds = if report.feeds_checked > 0 {
            "; feed positions and sequences contiguous, feed and subject heads right, cursors \
             within the log"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "{}: sound. Checked {checked}: positions contiguous, checksums match, versions \
             contiguous, stream heads right, event ids unique{feeds}.",
            dir.display()
        );
        return out;
    }
    let _ = writeln!(
        out,
        "{}: DAMAGED. {} {} found (checked {checked}):",
        dir.display(),
        count(report.problems_found),
        if report.problems_found == 1 {
            "problem"
        } else {
            "problems"
        }
    );
    for problem in &report.problems {
        let _ = writeln!(out, "- {problem}");
    }
    let unlisted = report
        .problems_found
        .saturating_sub(report.problems.len() as u64);
    if unlisted > 0 {
        let _ = writeln!(out, "- … and {} more", count(unlisted));
    }
    out
}
