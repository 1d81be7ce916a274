//! The progress line: a bar on a terminal, a plain line every few seconds
//! otherwise, nothing with `--quiet`. Always on stderr; stdout is for results.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::stats::Counts;

/// How often a non-terminal stderr gets a progress line.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// Shows how far a run is.
pub struct Progress {
    /// The bar, when stderr is a terminal.
    bar: Option<ProgressBar>,
    /// When the last plain line was printed, when it is not.
    plain: Option<Mutex<Instant>>,
    /// Rows expected in all.
    total: u64,
    /// When the run started.
    started: Instant,
    /// What is being done ("rewriting", "verifying").
    verb: &'static str,
}

impl Progress {
    /// A progress display for `total` rows; `quiet` shows nothing.
    pub fn new(total: u64, verb: &'static str, quiet: bool) -> Self {
        let started = Instant::now();
        if quiet {
            return Progress { bar: None, plain: None, total, started, verb };
        }
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {human_pos}/{human_len} rows  {per_sec}  eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_message(verb);
            bar.enable_steady_tick(Duration::from_millis(250));
            Progress { bar: Some(bar), plain: None, total, started, verb }
        } else {
            Progress { bar: None, plain: Some(Mutex::new(started)), total, started, verb }
        }
    }

    /// Shows the counts so far.
    pub fn update(&self, c: &Counts) {
        if let Some(bar) = &self.bar {
            bar.set_position(c.rows_scanned);
            return;
        }
        let Some(plain) = &self.plain else { return };
        let Ok(mut last) = plain.lock() else { return };
        if last.elapsed() < PLAIN_EVERY {
            return;
        }
        *last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        eprintln!(
            "rekey: {} {}/{} rows ({:.0} rows/s), {} values rewritten, {} failed, {} conflicts",
            self.verb,
            c.rows_scanned,
            self.total,
            c.rows_scanned as f64 / secs,
            c.values_rewritten,
            c.values_failed,
            c.conflicts
        );
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
