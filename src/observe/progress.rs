//! The progress display: a one-line bar on a terminal; off a terminal (ECS,
//! Kubernetes, `nohup`), a log line every `--progress-every` (10 s by
//! default) with rows done and total, percent, rows/s, ETA and the hold
//! reason, written by a ticker so a held or slow run still reports;
//! nothing with `--quiet`. A total counted while the run goes starts as an
//! estimate (`~` in the line) until [`Total::set`] gives the count; with no
//! estimate (a table never analyzed), or once the rows done pass it, the
//! total is shown as unknown (`?`, no percent or ETA), never as 100%. Always
//! on stderr; stdout is for results. Every update also sets the progress
//! gauges ([`ProgressSampled`]).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{HumanCount, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::observe::counts::Counts;
use crate::observe::events::ProgressSampled;
use crate::observe::logging::LogsAbove;

/// How often a non-terminal stderr gets a progress line unless
/// [`set_log_interval`] said otherwise.
const DEFAULT_EVERY: Duration = Duration::from_secs(10);

static EVERY: OnceLock<Duration> = OnceLock::new();

/// Sets, once per process, how often progress lines are logged off a
/// terminal (`--progress-every`).
pub fn set_log_interval(every: Duration) {
    let _ = EVERY.set(every.max(Duration::from_millis(100)));
}

fn log_interval() -> Duration {
    EVERY.get().copied().unwrap_or(DEFAULT_EVERY)
}

/// The longest hold reason the bar shows: the line must fit 80 columns.
const HOLD_WIDTH: usize = 22;

/// How far the display can trust its total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TotalIs {
    /// Counted: percent and ETA hold.
    Counted,
    /// An estimate: the catalogue's while the rows are found beside the
    /// work, or a sample's.
    Estimated,
    /// No estimate yet (a table never analyzed): only the rows done mean anything.
    Unknown,
}

/// What the rows shown are counted from: the run, or a later phase of it
/// (the conflict re-reads) with rows, rate and total of its own.
#[derive(Debug, Clone, Copy)]
struct Phase {
    /// What is being done ("rewriting", "re-reading changed rows").
    verb: &'static str,
    /// When the phase started.
    started: Instant,
    /// This process's rows scanned before the phase started.
    own_before: u64,
    /// 0 for the first phase, one more for each after it: a [`Total`] sets
    /// only the phase it was made for. Other processes' rows count in the
    /// first phase only (a later phase is this process's own work).
    number: u32,
}

/// What the display and the ticker share.
struct Shared {
    /// Rows expected in all (meaningless while `Unknown`), and whether they
    /// are counted, an estimate, or unknown: set together, read together.
    total: Mutex<(u64, TotalIs)>,
    /// What is being done, since when, and from which counts.
    phase: Mutex<Phase>,
    /// Why the run is paused, while a throttle holds it.
    hold: Mutex<Option<String>>,
    /// Rows this process has scanned so far.
    own: AtomicU64,
    /// Rows other processes sharing the job have scanned since this one
    /// started (0 for a process on its own).
    others: AtomicU64,
    /// Values rewritten and failed so far, for the log line.
    rewritten: AtomicU64,
    failed: AtomicU64,
}

impl Shared {
    /// The phase shown (as it was, should a panic have poisoned it).
    fn phase(&self) -> Phase {
        *self
            .phase
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Rows scanned so far in the phase: this process's, plus the others'
    /// in the first phase.
    fn done(&self) -> u64 {
        let phase = self.phase();
        let own = self
            .own
            .load(Ordering::Relaxed)
            .saturating_sub(phase.own_before);
        let others = match phase.number {
            0 => self.others.load(Ordering::Relaxed),
            _ => 0,
        };
        own + others
    }

    fn rate(&self) -> f64 {
        let secs = self.phase().started.elapsed().as_secs_f64();
        self.done() as f64 / secs.max(1e-9)
    }

    /// The total and its state (unknown, should a panic have poisoned it).
    fn total(&self) -> (u64, TotalIs) {
        self.total
            .lock()
            .map(|t| *t)
            .unwrap_or((0, TotalIs::Unknown))
    }

    /// The total to show beside `done` rows, and whether it is an estimate:
    /// `None` while unknown, or once `done` has passed an estimate (it was
    /// low, and 100% or an ETA of 0 would be false).
    fn shown_total(&self, done: u64) -> Option<(u64, bool)> {
        let (total, total_is) = self.total();
        match total_is {
            TotalIs::Counted => Some((total, false)),
            TotalIs::Estimated if done < total => Some((total, true)),
            TotalIs::Estimated | TotalIs::Unknown => None,
        }
    }

    fn hold(&self) -> Option<String> {
        self.hold.lock().ok().and_then(|h| h.clone())
    }

    /// One progress line for a log.
    fn log_line(&self) {
        let done = self.done();
        let rate = self.rate();
        let shown = self.shown_total(done);
        let eta = shown.and_then(|(total, _)| eta_seconds(done, total, rate));
        let percent = shown.map(|(total, _)| percent(done, total));
        let hold = self.hold();
        let paused = hold
            .as_deref()
            .map(|r| format!(" (paused: {r})"))
            .unwrap_or_default();
        let eta_text = eta.map_or_else(|| "-".to_string(), short_duration);
        let of = match shown {
            Some((total, estimated)) => format!(
                "{}{} rows ({}%)",
                if estimated { "~" } else { "" },
                HumanCount(total),
                percent.unwrap_or(0)
            ),
            None => "? rows".to_string(),
        };
        tracing::info!(
            rows_done = done,
            rows_total = shown.map(|(total, _)| total),
            rows_total_estimated = self.total().1 != TotalIs::Counted,
            percent,
            rows_per_second = rate.round() as u64,
            eta_seconds = eta.map(|s| s.ceil() as u64),
            held = hold.as_deref(),
            values_rewritten = self.rewritten.load(Ordering::Relaxed),
            values_failed = self.failed.load(Ordering::Relaxed),
            "{}{paused}: {}/{of}, {} rows/s, eta {eta_text}",
            self.phase().verb,
            HumanCount(done),
            HumanCount(rate.round() as u64),
        );
    }

    /// Draws the rows done so far on `bar`: its total, position and message.
    fn draw(&self, bar: &ProgressBar) {
        let done = self.done();
        follow_total(bar, self.shown_total(done).map(|(total, _)| total));
        bar.set_position(done);
        bar.set_message(self.bar_message());
    }

    /// The bar's message: percent, rate, ETA (or "-" until there is a rate).
    fn bar_message(&self) -> String {
        let done = self.done();
        let rate = self.rate();
        let eta = self
            .shown_total(done)
            .and_then(|(total, _)| eta_seconds(done, total, rate))
            .filter(|_| done > 0)
            .map_or_else(|| "-".to_string(), short_duration);
        format!("{}/s eta {eta}", HumanCount(rate.round() as u64))
    }
}

/// Shows how far a run is.
pub struct Progress {
    /// The bar, when stderr is a terminal.
    bar: Option<ProgressBar>,
    shared: Arc<Shared>,
    /// Keeps log lines above the bar while it is drawn.
    logs_above: Mutex<Option<LogsAbove>>,
    /// The log ticker off a terminal: dropping the sender stops it.
    ticker: Mutex<Option<(mpsc::Sender<()>, JoinHandle<()>)>>,
}

/// Sets the total of a [`Progress`] that started from an estimate, from
/// wherever the count runs.
#[derive(Clone)]
pub struct Total {
    shared: Arc<Shared>,
    bar: Option<ProgressBar>,
    /// The phase whose total this sets ([`Phase::number`]).
    phase: u32,
}

impl Total {
    /// The rows expected in all, now counted.
    pub fn set(&self, rows: u64) {
        self.store(rows, TotalIs::Counted);
    }

    /// A better estimate of the rows expected in all (from a sample): still
    /// shown as an estimate.
    pub fn set_estimate(&self, rows: u64) {
        self.store(rows, TotalIs::Estimated);
    }

    /// The rows done so far (by every process sharing the job since this
    /// one started).
    pub fn rows_done(&self) -> u64 {
        self.shared.done()
    }

    fn store(&self, rows: u64, total_is: TotalIs) {
        // a count or sample finishing after its phase has nothing to set
        let phase = self.shared.phase.lock();
        if phase.as_ref().map_or(true, |p| p.number != self.phase) {
            return;
        }
        if let Ok(mut t) = self.shared.total.lock() {
            *t = (rows, total_is);
        }
        drop(phase);
        if let Some(bar) = &self.bar {
            let done = self.shared.done();
            follow_total(bar, self.shared.shown_total(done).map(|(total, _)| total));
        }
    }
}

impl Progress {
    /// A progress display for `total` rows; `quiet` shows nothing.
    pub fn new(total: u64, verb: &'static str, quiet: bool) -> Self {
        Self::with_total(total, TotalIs::Counted, verb, quiet)
    }

    /// A progress display whose total is an `estimate` (`None`: unknown)
    /// until [`Total::set`] gives the count (log lines show `~` or `?`
    /// meanwhile).
    pub fn estimated(estimate: Option<u64>, verb: &'static str, quiet: bool) -> Self {
        match estimate {
            Some(rows) => Self::with_total(rows, TotalIs::Estimated, verb, quiet),
            None => Self::with_total(0, TotalIs::Unknown, verb, quiet),
        }
    }

    /// Where the counted total goes.
    pub fn total(&self) -> Total {
        Total {
            shared: self.shared.clone(),
            bar: self.bar.clone(),
            phase: self.shared.phase().number,
        }
    }

    /// Starts showing a later phase of the run, `verb`, of `total` rows
    /// (counted): its rows, rate and ETA count from now, and only this
    /// process's. A [`Total`] made before it sets nothing more.
    pub fn begin_phase(&self, verb: &'static str, total: u64) {
        let own = self.shared.own.load(Ordering::Relaxed);
        if let Ok(mut phase) = self.shared.phase.lock() {
            *phase = Phase {
                verb,
                started: Instant::now(),
                own_before: own,
                number: phase.number + 1,
            };
        }
        if let Some(bar) = &self.bar {
            if self.shared.hold().is_none() {
                bar.set_prefix(verb);
            }
            bar.reset_elapsed();
        }
        self.set_phase_total(total);
    }

    /// A new count of the current phase's rows in all (see [`Self::begin_phase`]).
    pub fn set_phase_total(&self, total: u64) {
        if let Ok(mut t) = self.shared.total.lock() {
            *t = (total, TotalIs::Counted);
        }
        if let Some(bar) = &self.bar {
            self.shared.draw(bar);
        }
    }

    fn with_total(total: u64, total_is: TotalIs, verb: &'static str, quiet: bool) -> Self {
        let shared = Arc::new(Shared {
            total: Mutex::new((total, total_is)),
            phase: Mutex::new(Phase {
                verb,
                started: Instant::now(),
                own_before: 0,
                number: 0,
            }),
            hold: Mutex::new(None),
            own: AtomicU64::new(0),
            others: AtomicU64::new(0),
            rewritten: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let mut p = Progress {
            bar: None,
            logs_above: Mutex::new(None),
            shared: shared.clone(),
            ticker: Mutex::new(None),
        };
        if quiet {
            return p;
        }
        if std::io::stderr().is_terminal() {
            let known = total_is != TotalIs::Unknown;
            let bar = ProgressBar::with_draw_target(
                Some(total).filter(|_| known),
                ProgressDrawTarget::stderr(),
            );
            bar.set_style(bar_style(known));
            bar.set_prefix(verb);
            bar.set_message(shared.bar_message());
            bar.enable_steady_tick(Duration::from_millis(250));
            p.logs_above = Mutex::new(Some(LogsAbove::bar(&bar)));
            p.bar = Some(bar);
        } else {
            let (tx, rx) = mpsc::channel::<()>();
            let every = log_interval();
            let ticker = std::thread::Builder::new()
                .name("rekey-progress".into())
                .spawn(move || loop {
                    match rx.recv_timeout(every) {
                        Err(RecvTimeoutError::Timeout) => shared.log_line(),
                        _ => return,
                    }
                });
            if let Ok(handle) = ticker {
                p.ticker = Mutex::new(Some((tx, handle)));
            }
        }
        p
    }

    /// Shows why the run is paused (`Some`), or that it is running again
    /// (`None`): `paused: replica lag 12s > 10s` in the bar's place of the verb.
    pub fn set_hold(&self, reason: Option<&str>) {
        if let Ok(mut hold) = self.shared.hold.lock() {
            *hold = reason.map(str::to_owned);
        }
        if let Some(bar) = &self.bar {
            match reason {
                Some(reason) => bar.set_prefix(format!("paused: {}", truncate(reason, HOLD_WIDTH))),
                None => bar.set_prefix(self.shared.phase().verb),
            }
        }
    }

    /// The rows other processes sharing the job have scanned since this one
    /// started, as last read: shown with this process's own at once (the
    /// bar's position, rate and ETA, and the next log line), so the
    /// rows done, the rate and the ETA are the job's, against a total of
    /// every process's rows left. It never goes down.
    pub fn others_done(&self, rows: u64) {
        let before = self.shared.others.fetch_max(rows, Ordering::Relaxed);
        if let (Some(bar), true) = (&self.bar, rows > before) {
            // a process on its own never moves the bar from here
            self.shared.draw(bar);
        }
    }

    /// Shows the counts so far (this process's) and sets the progress gauges.
    pub fn update(&self, c: &Counts) {
        let s = &self.shared;
        s.own.store(c.rows_scanned, Ordering::Relaxed);
        let done = s.done();
        s.rewritten.store(c.values_rewritten, Ordering::Relaxed);
        s.failed.store(c.values_failed, Ordering::Relaxed);
        let rate = s.rate();
        let total = s.shown_total(done).map(|(total, _)| total);
        ProgressSampled {
            rows_done: done,
            rows_total: total,
            rows_per_second: rate,
            eta_seconds: total.and_then(|total| eta_seconds(done, total, rate)),
        }
        .emit();
        if let Some(bar) = &self.bar {
            s.draw(bar);
        }
    }

    /// Removes the bar, or stops the log ticker.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if let Ok(mut above) = self.logs_above.lock() {
            above.take();
        }
        let ticker = self.ticker.lock().ok().and_then(|mut t| t.take());
        if let Some((tx, handle)) = ticker {
            drop(tx);
            let _ = handle.join();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The bar's look: with a bar and percent when the total is `known`, a
/// count of rows done otherwise.
fn bar_style(known: bool) -> ProgressStyle {
    let template = if known {
        "{prefix} [{wide_bar}] {percent:>3}% {human_pos}/{human_len} {msg}"
    } else {
        "{prefix} {human_pos}/? {msg}"
    };
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// Gives the bar the total it may show: with `None` (unknown, or an
/// estimate the rows done have passed) it counts rows instead of drawing a
/// bar and a percent.
fn follow_total(bar: &ProgressBar, total: Option<u64>) {
    if bar.length() == total {
        return;
    }
    match total {
        Some(rows) => {
            bar.set_style(bar_style(true));
            bar.set_length(rows);
        }
        None => {
            bar.set_style(bar_style(false));
            bar.unset_length();
        }
    }
}

/// Whole percent of `done` out of `total` (100 when there is nothing to do).
fn percent(done: u64, total: u64) -> u64 {
    (done.min(total) * 100).checked_div(total).unwrap_or(100)
}

/// `1h 2m`, `3m 4s`, `5s`: two units at most, for a narrow line.
fn short_duration(secs: f64) -> String {
    let s = secs.ceil() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

/// `reason` cut to `width` characters, with an ellipsis when cut.
fn truncate(reason: &str, width: usize) -> String {
    if reason.chars().count() <= width {
        return reason.to_string();
    }
    let cut: String = reason.chars().take(width.saturating_sub(1)).collect();
    format!("{cut}…")
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
    fn an_estimated_total_is_replaced_by_the_count() {
        let p = Progress::estimated(Some(3_000), "rewriting", true);
        assert_eq!(p.shared.shown_total(0), Some((3_000, true)));
        p.total().set(1_800);
        assert_eq!(p.shared.shown_total(0), Some((1_800, false)));
    }

    #[test]
    fn no_estimate_is_an_unknown_total_until_the_count() {
        let p = Progress::estimated(None, "rewriting", true);
        p.update(&Counts {
            rows_scanned: 500,
            ..Counts::default()
        });
        assert_eq!(p.shared.shown_total(500), None);
        assert!(p.shared.bar_message().ends_with("eta -"));
        p.total().set(2_000);
        assert_eq!(p.shared.shown_total(500), Some((2_000, false)));
    }

    #[test]
    fn an_estimate_the_rows_done_have_passed_is_unknown_not_finished() {
        let p = Progress::estimated(Some(1_000), "rewriting", true);
        assert_eq!(p.shared.shown_total(999), Some((1_000, true)));
        assert_eq!(p.shared.shown_total(1_000), None);
        // a counted total is kept whatever the rows done
        p.total().set(1_000);
        assert_eq!(p.shared.shown_total(1_200), Some((1_000, false)));
    }

    #[test]
    fn a_later_phase_counts_only_its_own_rows_against_its_own_total() {
        let p = Progress::estimated(Some(1_000), "rewriting", true);
        let counted_beside = p.total();
        p.others_done(400);
        p.update(&Counts {
            rows_scanned: 600,
            ..Counts::default()
        });
        assert_eq!(p.shared.done(), 1_000);
        p.begin_phase("re-reading changed rows", 30);
        assert_eq!(p.shared.phase().verb, "re-reading changed rows");
        assert_eq!(p.shared.done(), 0);
        assert_eq!(p.shared.shown_total(0), Some((30, false)));
        p.update(&Counts {
            rows_scanned: 610,
            ..Counts::default()
        });
        p.others_done(900);
        assert_eq!(p.shared.done(), 10, "the others' rows are not this phase's");
        // a sample of the table finishing now has nothing to set
        counted_beside.set_estimate(5_000);
        assert_eq!(p.shared.shown_total(10), Some((30, false)));
        p.set_phase_total(45);
        assert_eq!(p.shared.shown_total(10), Some((45, false)));
    }

    #[test]
    fn hold_is_kept_and_cleared() {
        let p = Progress::new(10, "rewriting", true);
        p.set_hold(Some("replica lag 12s > 10s"));
        assert_eq!(p.shared.hold().as_deref(), Some("replica lag 12s > 10s"));
        p.set_hold(None);
        assert_eq!(p.shared.hold(), None);
    }

    #[test]
    fn durations_and_reasons_stay_short() {
        assert_eq!(short_duration(4.2), "5s");
        assert_eq!(short_duration(125.0), "2m 5s");
        assert_eq!(short_duration(7384.0), "2h 3m");
        assert_eq!(
            truncate("replica lag 12s > 10s", 22),
            "replica lag 12s > 10s"
        );
        assert_eq!(
            truncate("WAL archive lag 1234 MB > 100 MB", 10)
                .chars()
                .count(),
            10
        );
        assert_eq!(percent(1, 3), 33);
        assert_eq!(percent(0, 0), 100);
    }

    #[test]
    fn the_bar_says_dash_until_there_is_a_rate_and_rounds_it() {
        let p = Progress::new(1_000_000, "rewriting", true);
        assert_eq!(p.shared.bar_message(), "0/s eta -");
        p.update(&Counts {
            rows_scanned: 10,
            ..Counts::default()
        });
        let m = p.shared.bar_message();
        assert!(!m.contains('.'), "{m}");
    }
}
