//! `headwater inspect URL` and `headwater verify URL` on a PostgreSQL store: thin wrappers over
//! [`headwater_postgres::inspect`] and [`headwater_postgres::verify`], which own the knowledge
//! of the tables. Both read one consistent snapshot and create nothing.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::Context;
use headwater_postgres::{Inspection, VerifyReport};

use crate::text::{bytes, count, utc};

/// Whether a STORE argument names a PostgreSQL server rather than a directory.
pub(crate) fn is_url(store: &str) -> bool {
    store.starts_with("postgres://") || store.starts_with("postgresql://")
}

/// The URL with its password, if any, replaced by `***` (for messages).
pub(crate) fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub(crate) fn inspect(url: &str, schema: &str) -> anyhow::Result<ExitCode> {
    let inspection = runtime()?
        .block_on(headwater_postgres::inspect(url, schema))
        .with_context(|| {
            format!(
                "cannot inspect the store in schema {schema} of {}",
                redacted(url)
            )
        })?;
    print!("{}", render_inspection(&redacted(url), &inspection));
    Ok(ExitCode::SUCCESS)
}

fn render_inspection(url: &str, i: &Inspection) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "store      {url}, schema {} (schema version {})",
        i.schema, i.schema_version
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
    let _ = writeln!(
        out,
        "on disk    {} (tables, indexes and TOAST)",
        bytes(i.total_bytes)
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

pub(crate) fn verify(url: &str, schema: &str) -> anyhow::Result<ExitCode> {
    let report = runtime()?
        .block_on(headwater_postgres::verify(url, schema, &mut |progress| {
            tracing::debug!(stage = %progress.stage, done = progress.done, "verify");
        }))
        .with_context(|| {
            format!(
                "cannot verify the store in schema {schema} of {}",
                redacted(url)
            )
        })?;
    print!("{}", render_report(&redacted(url), schema, &report));
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn render_report(url: &str, schema: &str, report: &VerifyReport) -> String {
    let mut out = String::new();
    let mut checked = format!(
        "{} events in {} streams",
        count(report.events_checked),
        count(report.streams_checked)
    );
    if report.feeds_checked > 0 {
        let _ = write!(
            checked,
            ", {} integration events in {} {}",
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
            "{url} schema {schema}: sound. Checked {checked}: positions contiguous, the log head \
             right, versions contiguous and in position order, stream heads right, names \
             valid{feeds}."
        );
        return out;
    }
    let _ = writeln!(
        out,
        "{url} schema {schema}: DAMAGED. {} {} found (checked {checked}):",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_passwords() {
        assert!(is_url("postgres://u@h/db"));
        assert!(is_url("postgresql://u@h/db"));
        assert!(!is_url("./data"));
        assert!(!is_url("/var/lib/postgres"));
        assert_eq!(
            redacted("postgres://u:secret@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        assert_eq!(redacted("postgres://u@h/db"), "postgres://u@h/db");
    }
}
