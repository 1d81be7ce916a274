//! The pace a run reads at: `--max-rows-per-sec`, and for a rewrite under
//! `--max-wal-rate` the rows/s that fill the cap with the WAL a row costs,
//! as the monitor measures it at each check. A dry run or a verify writes
//! no WAL: only the user's rows/s paces it.

use crate::control::throttle::Pace;

use super::pipeline::Settings;
use super::work::{Shared, Work};

/// How a rewrite's pace follows `--max-wal-rate`.
#[derive(Debug, Clone, Copy)]
pub(super) struct WalPace {
    /// The least it goes down to: one page per check (the budget's hold
    /// keeps the cap when even that writes too much).
    least: f64,
    /// `--max-rows-per-sec`, the most it goes up to.
    most: Option<f64>,
}

impl WalPace {
    /// With `--max-wal-rate`, for a rewrite.
    pub(super) fn of(settings: &Settings, work: &Work) -> Option<WalPace> {
        (settings.signals.max_wal_rate.is_some() && matches!(work, Work::Leased { .. })).then(
            || WalPace {
                least: one_page_per_check(settings),
                most: settings.max_rows_per_sec.map(f64::from),
            },
        )
    }
}

/// Rows per second of one page per check of the signals.
fn one_page_per_check(settings: &Settings) -> f64 {
    settings.batch_size as f64 / settings.signals.check_every.as_secs_f64().max(0.05)
}

/// The pace a run starts at: `--max-rows-per-sec`; under `--max-wal-rate`
/// alone, one page per check until the monitor has measured the WAL a row
/// costs (then [`Shared::pace_wal`] sets it).
pub(super) fn initial_pace(settings: &Settings, wal: Option<WalPace>) -> Option<Pace> {
    match (settings.max_rows_per_sec, wal) {
        (Some(rows), _) => Some(Pace::new(rows)),
        (None, Some(_)) => Some(Pace::of(one_page_per_check(settings))),
        (None, None) => None,
    }
}

impl Shared {
    /// Follows the pace `--max-wal-rate` measured (`None`: not measured
    /// yet, the pace stays).
    pub(super) fn pace_wal(&self, rows_per_sec: Option<f64>) {
        if let (Some(pace), Some(wal), Some(rate)) = (&self.pace, self.wal_pace, rows_per_sec) {
            pace.follow(rate, wal.least, wal.most);
        }
    }
}
