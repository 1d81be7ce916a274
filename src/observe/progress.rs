//! The progress line: a bar on a terminal, a plain log line every few seconds
//! otherwise, nothing with `--quiet`. Always on stderr; stdout is for results.
//! Every update also sets the progress gauges ([`ProgressSampled`]).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::observe::counts::Counts;
use crate::observe::events::ProgressSampled;

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
    /// Why the run is paused, while a throttle holds it.
    hold: Mutex<Option<String>>,
}

impl Progress {
    /// A progress display for `total` rows; `quiet` shows nothing.
    pub fn new(total: u64, verb: &'static str, quiet: bool) -> Self {
        let started = Instant::now();
        if quiet {
            return Progress {
                bar: None,
                plain: None,
                total,
                started,
                verb,
                hold: Mutex::new(None),
            };
        }
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {human_pos}/{human_len} rows  {per_sec}  eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(verb);
            bar.enable_steady_tick(Duration::from_millis(250));
            Progress {
                bar: Some(bar),
                plain: None,
                total,
                started,
                verb,
                hold: Mutex::new(None),
            }
        } else {
            Progress {
                bar: None,
                plain: Some(Mutex::new(started)),
                total,
                started,
                verb,
                hold: Mutex::new(None),
            }
        }
    }

    /// Shows why the run is paused (`Some`), or that it is running again
    /// (`None`): `rewriting (paused: replica lag 12s > 10s)`.
    pub fn set_hold(&self, reason: Option<&str>) {
        if let Ok(mut hold) = self.hold.lock() {
            *hold = reason.map(str::to_owned);
        }
        if let Some(bar) = &self.bar {
            match reason {
                Some(reason) => bar.set_message(format!("{} (paused: {reason})", self.verb)),
                None => bar.set_message(self.verb),
            }
        }
    }

    /// Shows the counts so far and sets the progress gauges.
    pub fn update(&self, c: &Counts) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = c.rows_scanned as f64 / secs;
        let eta = eta_seconds(c.rows_scanned, self.total, rate);
        ProgressSampled {
            rows_done: c.rows_scanned,
            rows_total: self.total,
            rows_per_second: rate,
            eta_seconds: eta,
        }
        .emit();
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
        let hold = self.hold.lock().ok().and_then(|h| h.clone());
        let paused = hold
            .map(|reason| format!(" (paused: {reason})"))
            .unwrap_or_default();
        let eta = eta
            .map(|s| {
                format!(
                    ", eta {}",
                    humantime::format_duration(Duration::from_secs(s.ceil() as u64))
                )
            })
            .unwrap_or_default();
        tracing::info!(
            values_rewritten = c.values_rewritten,
            values_failed = c.values_failed,
            conflicts = c.conflicts,
            "{}{paused} {}/{} rows ({:.0} rows/s{eta})",
            self.verb,
            c.rows_scanned,
            self.total,
            rate,
        );
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Seconds left at `rate` rows/s with `done` of `total` rows done; `None`
/// until there is a rate. A total that was an estimate may be passed: then 0.
fn eta_seconds(done: u64, total: u64, rate: f64) -> Option<f64> {
    if done >= total {
        return Some(0.0);
    }
    if !rate.is_finite() || rate <= 0.0 {
        return None;
    }
    Some((total - done) as f64 / rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_needs_a_rate_and_stops_at_zero() {
        assert_eq!(eta_seconds(0, 100, 0.0), None);
        assert_eq!(eta_seconds(50, 100, 10.0), Some(5.0));
        assert_eq!(eta_seconds(120, 100, 10.0), Some(0.0));
    }

    #[test]
    fn hold_is_kept_and_cleared() {
        let p = Progress::new(10, "rewriting", true);
        p.set_hold(Some("replica lag 12s > 10s"));
        assert_eq!(
            p.hold.lock().expect("hold").as_deref(),
            Some("replica lag 12s > 10s")
        );
        p.set_hold(None);
        assert_eq!(p.hold.lock().expect("hold").as_deref(), None);
    }
}
