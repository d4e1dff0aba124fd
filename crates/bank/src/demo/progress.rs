//! Progress on stderr: a bar on a terminal, a plain line every few seconds otherwise (a log, a
//! CI job), nothing at all when asked to be quiet (tests).

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::report::count;

/// How often the bar is redrawn.
const BAR_REFRESH: Duration = Duration::from_millis(100);
/// How often a plain progress line is written when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(2);

/// Where progress goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A bar (stderr is a terminal).
    Bar,
    /// Plain lines (stderr is a file or a pipe).
    Lines,
    /// Nothing.
    Silent,
}

impl Mode {
    /// A bar on a terminal, plain lines otherwise.
    pub fn detect() -> Mode {
        if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Lines
        }
    }
}

/// Counters the running parts move and the screen reads.
#[derive(Debug, Default)]
pub(super) struct Gauges {
    pub(super) commands_sent: AtomicU64,
    pub(super) commands_refused: AtomicU64,
    /// Events the link read from the feed.
    pub(super) feed_events: AtomicU64,
    pub(super) delivered: AtomicU64,
    pub(super) dropped: AtomicU64,
    pub(super) duplicated: AtomicU64,
    /// Events the consumer fetched from the producer to heal gaps.
    pub(super) healed: AtomicU64,
    /// `statements` is moving to another feed version (the link waits meanwhile).
    pub(super) moving: AtomicBool,
}

impl Gauges {
    fn line(&self) -> String {
        let get = |a: &AtomicU64| count(a.load(Ordering::Relaxed));
        if self.moving.load(Ordering::Relaxed) {
            return format!(
                "{} refused · statements builds v2 beside v1 (reads both itself meanwhile)",
                get(&self.commands_refused)
            );
        }
        format!(
            "{} refused · the link read {}, dropped {}, doubled {} · {} healed",
            get(&self.commands_refused),
            get(&self.feed_events),
            get(&self.dropped),
            get(&self.duplicated),
            get(&self.healed),
        )
    }
}

/// The screen: lines said between phases, and the running phase's progress.
#[derive(Debug)]
pub(super) struct Screen {
    mode: Mode,
    bar: Option<ProgressBar>,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Screen {
    pub(super) fn new(mode: Mode) -> Screen {
        Screen {
            mode,
            bar: None,
            ticker: None,
        }
    }

    /// Writes one line to stderr (above the bar when one is drawn).
    pub(super) fn say(&self, line: &str) {
        match (&self.bar, self.mode) {
            (_, Mode::Silent) => {}
            (Some(bar), _) => bar.println(line),
            (None, _) => eprintln!("{line}"),
        }
    }

    /// Shows the progress of `total` commands and of the link, from `gauges`, until
    /// [`Screen::finish`].
    pub(super) fn start(&mut self, what: &str, total: u64, gauges: Arc<Gauges>) {
        self.finish();
        match self.mode {
            Mode::Silent => {}
            Mode::Bar => {
                let bar = ProgressBar::new(total).with_prefix(what.to_owned());
                bar.set_style(
                    ProgressStyle::with_template("  {prefix} [{bar:20}] {pos}/{len} · {wide_msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                );
                let ticking = bar.clone();
                self.ticker = Some(tokio::spawn(async move {
                    loop {
                        ticking.set_message(gauges.line());
                        ticking.set_position(gauges.commands_sent.load(Ordering::Relaxed));
                        tokio::time::sleep(BAR_REFRESH).await;
                    }
                }));
                self.bar = Some(bar);
            }
            Mode::Lines => {
                let what = what.to_owned();
                self.ticker = Some(tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(LINE_EVERY).await;
                        eprintln!(
                            "  {what}: {}/{} commands · {}",
                            count(gauges.commands_sent.load(Ordering::Relaxed)),
                            count(total),
                            gauges.line()
                        );
                    }
                }));
            }
        }
    }

    /// Ends the running progress (the bar is cleared; the lines said stay).
    pub(super) fn finish(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
        }
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        self.finish();
    }
}
