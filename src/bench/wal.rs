//! The WAL a bench rekey run writes: the server's WAL position
//! (`pg_current_wal_lsn()`), read on a connection of its own at every
//! sample tick, and what the report makes of the series: bytes per row and
//! per second, and the busiest 10 s, which is what `--max-wal-rate`
//! promises to keep near its cap. The position is the whole cluster's: on the
//! bench's own cluster that is rekey's WAL alone; with `--database-url` it
//! includes whatever else the server does.

use serde::Serialize;
use tokio_postgres::Client;

use crate::error::DbContext;
use crate::Error;

/// The span `busiest` rates are measured over, seconds.
pub(super) const BUSIEST_WINDOW_S: f64 = 10.0;

/// The server's WAL position, in bytes from 0/0.
pub(super) async fn wal_position(client: &Client) -> Result<u64, Error> {
    let what = || "reading the WAL position (pg_current_wal_lsn)".to_string();
    let row = client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
            &[],
        )
        .await
        .ctx(what)?;
    let bytes: i64 = row.try_get(0).ctx(what)?;
    u64::try_from(bytes)
        .map_err(|_| Error::Runtime(format!("the server gave a negative WAL position: {bytes}")))
}

/// The highest WAL rate, bytes per second, over any `window_s` of a
/// cumulative `(seconds, bytes)` series: for each sample, the rate to the
/// first later sample at least `window_s` after it. `None` when the series
/// spans less than `window_s`. Samples must be in time order.
pub fn busiest(series: &[(f64, u64)], window_s: f64) -> Option<f64> {
    let mut best: Option<f64> = None;
    let mut j = 0;
    for (i, &(t_i, b_i)) in series.iter().enumerate() {
        j = j.max(i);
        while series.get(j).is_some_and(|&(t_j, _)| t_j - t_i < window_s) {
            j += 1;
        }
        let Some(&(t_j, b_j)) = series.get(j) else {
            // no later sample is far enough: nor will one be for later starts
            break;
        };
        let rate = b_j.saturating_sub(b_i) as f64 / (t_j - t_i);
        best = Some(best.map_or(rate, |b| b.max(rate)));
    }
    best
}

/// What the report says of one run's WAL.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WalReport {
    /// WAL the server wrote over the whole run, bytes.
    pub wal_bytes: u64,
    /// That per row scanned.
    pub wal_bytes_per_row: f64,
    /// That per second of the run.
    pub wal_bytes_per_s: f64,
    /// WAL written since the start, sampled with the rows: (seconds, bytes).
    pub wal_progress: Vec<(f64, u64)>,
    /// `--max-wal-rate` in force, bytes per second.
    pub wal_cap_bytes_per_s: Option<u64>,
    /// The highest WAL rate over any 10 s of the run; none when it lasted under 10 s.
    pub wal_busiest_10s_bytes_per_s: Option<f64>,
    /// That over the cap, when one is set.
    pub wal_busiest_10s_over_cap: Option<f64>,
}

impl WalReport {
    /// The figures of a run that scanned `rows` in `secs`, from its WAL
    /// series (ending with the whole run's bytes), under `cap`.
    pub fn new(progress: Vec<(f64, u64)>, rows: u64, secs: f64, cap: Option<u64>) -> Self {
        let wal_bytes = progress.last().map_or(0, |&(_, b)| b);
        let busiest = busiest(&progress, BUSIEST_WINDOW_S);
        WalReport {
            wal_bytes,
            wal_bytes_per_row: wal_bytes as f64 / rows.max(1) as f64,
            wal_bytes_per_s: wal_bytes as f64 / secs.max(1e-9),
            wal_progress: progress,
            wal_cap_bytes_per_s: cap,
            wal_busiest_10s_bytes_per_s: busiest,
            wal_busiest_10s_over_cap: busiest.zip(cap).map(|(rate, cap)| rate / cap.max(1) as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples every 50 ms for `secs`, writing `rate(t)` bytes per second.
    fn series(secs: f64, rate: impl Fn(f64) -> f64) -> Vec<(f64, u64)> {
        let mut bytes = 0.0;
        let mut out = vec![(0.0, 0)];
        for i in 1..=(secs * 20.0).round() as u32 {
            let t = f64::from(i) * 0.05;
            bytes += rate(t) * 0.05;
            out.push((t, bytes as u64));
        }
        out
    }

    #[test]
    fn a_steady_rate_is_its_own_busiest_window() {
        let rate = busiest(&series(30.0, |_| 20e6), 10.0).unwrap();
        assert!((rate - 20e6).abs() < 20e6 * 1e-6, "{rate}");
    }

    #[test]
    fn a_burst_inside_one_window_shows_as_that_windows_rate() {
        // 10 MB/s, but 100 MB/s for one second at t = 14-15 s: the 10 s
        // holding it averages (9 s x 10 + 1 s x 100) / 10 = 19 MB/s
        let s = series(40.0, |t| if t > 14.0 && t <= 15.0 { 100e6 } else { 10e6 });
        let rate = busiest(&s, 10.0).unwrap();
        assert!((rate - 19e6).abs() < 0.2e6, "{rate}");
        let whole = s[s.len() - 1].1 as f64 / 40.0;
        assert!(
            rate > whole * 1.5,
            "the burst is not averaged away: {rate} vs {whole}"
        );
    }

    #[test]
    fn a_run_shorter_than_the_window_has_no_busiest_window() {
        assert_eq!(busiest(&series(9.9, |_| 20e6), 10.0), None);
        assert_eq!(busiest(&[], 10.0), None);
        assert_eq!(busiest(&[(0.0, 0)], 10.0), None);
        assert!(busiest(&series(10.0, |_| 20e6), 10.0).is_some());
    }

    #[test]
    fn the_report_compares_the_busiest_window_with_the_cap() {
        let r = WalReport::new(series(20.0, |_| 22e6), 1000, 20.0, Some(20_000_000));
        assert_eq!(r.wal_bytes, r.wal_progress[r.wal_progress.len() - 1].1);
        assert!((r.wal_bytes_per_row - r.wal_bytes as f64 / 1000.0).abs() < 1e-9);
        let over = r.wal_busiest_10s_over_cap.unwrap();
        assert!((over - 1.1).abs() < 1e-3, "{over}");
        let uncapped = WalReport::new(series(20.0, |_| 22e6), 1000, 20.0, None);
        assert!(uncapped.wal_busiest_10s_bytes_per_s.is_some());
        assert_eq!(uncapped.wal_busiest_10s_over_cap, None);
    }
}
