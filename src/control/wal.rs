//! The WAL rate throttle's arithmetic: the budget and the pace behind
//! `--max-wal-rate` (the archiver's lag is in [`super::archive`]). Pure
//! state; [`super::monitor`] reads the positions from the server.
//!
//! The rate is a budget, not a bare moving average: the run earns
//! `cap x seconds` of WAL as time passes and spends whatever the server
//! writes (the application's WAL included: the cap is on what the archive
//! and the replicas receive). The run holds while the budget is spent and
//! reads again once one check interval's worth has been earned back, so a
//! burst between two checks is paid back instead of forgotten, and the run
//! does not flap at every check. What the server writes beyond the budget
//! is owed for at most [`DEBT_WINDOW`] (or two rate windows): a busy
//! application does not keep the run waiting long after it calms down.
//!
//! Held and let go once a check, a run would still write in bursts (a
//! check's worth at full speed, then the batches in flight): over 10 s it
//! could pass the cap by a third. So the budget also gives a pace
//! ([`WalBudget::pace`]): the rows per second at which the WAL a row costs
//! fills the cap, which the engine reads at; the hold is the backstop.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The longest stretch of WAL above the cap that is paid back later.
pub const DEBT_WINDOW: Duration = Duration::from_secs(60);

/// Checks the shown rate is averaged over.
const RATE_WINDOW_CHECKS: u32 = 5;

/// What the WAL budget says after a sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WalRate {
    /// Within the cap (or not measured yet: one position is not a rate).
    Go,
    /// Over the cap: the WAL rate over the last `window`, in bytes per second.
    Hold {
        /// Bytes per second over `window`.
        rate: f64,
        /// The span the rate was measured over.
        window: Duration,
    },
}

/// The WAL budget of `--max-wal-rate`, fed the server's WAL position at every check.
#[derive(Debug)]
pub struct WalBudget {
    /// The cap, bytes per second.
    cap: f64,
    /// Most credit kept: one check at the cap (a run paced at the cap
    /// does not save up for a burst).
    most: f64,
    /// Most debt kept.
    least: f64,
    /// Credit earned back before a held run reads again: one check at the cap.
    release: f64,
    /// Bytes the run may still let the server write; negative: owed.
    credit: f64,
    /// Whether the budget holds the run now.
    held: bool,
    /// The span the shown rate is averaged over.
    window: Duration,
    /// (when, WAL position, rows the run had read) within `window`, oldest first.
    samples: VecDeque<(Instant, u64, u64)>,
}

impl WalBudget {
    /// A budget of `cap` bytes per second, checked every `every`.
    pub fn new(cap: u64, every: Duration) -> Self {
        let cap = cap.max(1) as f64;
        let every = every.max(Duration::from_millis(10));
        let window = every * RATE_WINDOW_CHECKS;
        let most = cap * every.as_secs_f64();
        WalBudget {
            cap,
            most,
            least: -cap * DEBT_WINDOW.max(window * 2).as_secs_f64(),
            release: cap * every.as_secs_f64(),
            // one check's credit to start: the page a run reads before its
            // first check, which may come as soon as that page commits
            credit: most,
            held: false,
            window,
            samples: VecDeque::new(),
        }
    }

    /// Forgets the positions sampled so far (the credit stays): the run was
    /// held by something else meanwhile, and a window across that gap would
    /// charge the rows read after it with the WAL the application wrote in it.
    pub fn restart(&mut self) {
        self.samples.clear();
    }

    /// Records the server's WAL position `lsn` seen at `at`, when the run
    /// had read `rows` rows, and decides.
    pub fn sample(&mut self, at: Instant, lsn: u64, rows: u64) -> WalRate {
        if let Some(&(then, before, _)) = self.samples.back() {
            let secs = at.saturating_duration_since(then).as_secs_f64();
            // a position that went back (another server behind the same
            // address) is a fresh start, not negative WAL
            let written = lsn.saturating_sub(before) as f64;
            self.credit = (self.credit + self.cap * secs - written).clamp(self.least, self.most);
        }
        self.samples.push_back((at, lsn, rows));
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _, _)| at.saturating_duration_since(*t) >= self.window)
        {
            self.samples.pop_front();
        }
        if self.samples.len() < 2 {
            return WalRate::Go;
        }
        let was_held = self.held;
        self.held = if self.held {
            self.credit < self.release.min(self.most)
        } else {
            self.credit < 0.0
        };
        if !self.held {
            if was_held {
                // the pace is measured again from here: rows read while held are none
                self.samples.drain(..self.samples.len() - 1);
            }
            return WalRate::Go;
        }
        let (first, last) = (self.samples.front(), self.samples.back());
        let (rate, window) = match (first, last) {
            (Some(&(t0, l0, _)), Some(&(t1, l1, _))) => {
                let span = t1.saturating_duration_since(t0);
                (
                    l1.saturating_sub(l0) as f64 / span.as_secs_f64().max(1e-3),
                    span,
                )
            }
            _ => (0.0, Duration::ZERO),
        };
        WalRate::Hold { rate, window }
    }
}

impl WalBudget {
    /// The rows per second that keep the server's WAL at the cap, from the
    /// WAL each row read cost over the last `window` (the application's WAL
    /// counted in, so the run slows while the application writes); `None`
    /// until the run has read rows under a rising WAL position. Paced at
    /// this rate the run writes evenly instead of in bursts between holds.
    pub fn pace(&self) -> Option<f64> {
        if self.held {
            return None;
        }
        let (&(_, l0, r0), &(_, l1, r1)) = (self.samples.front()?, self.samples.back()?);
        let (wal, rows) = (l1.saturating_sub(l0), r1.saturating_sub(r0));
        (wal > 0 && rows > 0).then(|| self.cap * rows as f64 / wal as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::throttle::Pace;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_run_under_the_cap_goes_and_a_burst_over_it_holds_until_paid_back() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut b = WalBudget::new(MIB, Duration::from_secs(1));
        assert_eq!(b.sample(s(0), 0, 0), WalRate::Go, "one position is no rate");
        assert_eq!(b.sample(s(1), MIB / 2, 0), WalRate::Go);
        // 4 MiB in one second: 3 MiB owed (one check's credit was kept),
        // paid back at 1 MiB/s
        assert!(matches!(
            b.sample(s(2), 4 * MIB + MIB / 2, 0),
            WalRate::Hold { .. }
        ));
        let mut held = 0;
        for n in 3..20 {
            if b.sample(s(n), 4 * MIB + MIB / 2, 0) == WalRate::Go {
                break;
            }
            held += 1;
        }
        assert!(
            (2..=4).contains(&held),
            "held while the debt and one check's credit are earned: {held}s"
        );
    }

    #[test]
    fn a_run_s_first_page_checked_as_soon_as_it_commits_is_not_held_and_gives_the_pace() {
        let t0 = Instant::now();
        let mut b = WalBudget::new(20 * MIB, Duration::from_secs(1));
        assert_eq!(b.sample(t0, 0, 0), WalRate::Go);
        // 5,000 rows of 700 B each, committed 50 ms in
        let first_page = 5_000 * 700;
        assert_eq!(
            b.sample(t0 + Duration::from_millis(50), first_page, 5_000),
            WalRate::Go
        );
        let pace = b.pace().expect("measured from the first page");
        assert!((pace - 20.0 * MIB as f64 / 700.0).abs() < 1.0, "{pace}");
    }

    #[test]
    fn the_shown_rate_is_the_average_over_the_last_checks() {
        let t0 = Instant::now();
        let mut b = WalBudget::new(MIB, Duration::from_secs(1));
        for n in 0..10 {
            b.sample(t0 + Duration::from_secs(n), n * 3 * MIB, 0);
        }
        match b.sample(t0 + Duration::from_secs(10), 30 * MIB, 0) {
            WalRate::Hold { rate, window } => {
                assert!((rate - 3.0 * MIB as f64).abs() < 1.0, "{rate}");
                assert_eq!(window, Duration::from_secs(5));
            }
            WalRate::Go => panic!("3 MiB/s is over a 1 MiB/s cap"),
        }
    }

    #[test]
    fn a_long_busy_spell_is_owed_for_at_most_the_debt_window() {
        let t0 = Instant::now();
        let mut b = WalBudget::new(MIB, Duration::from_secs(1));
        for n in 0..3600 {
            b.sample(t0 + Duration::from_secs(n), n * 10 * MIB, 0);
        }
        let quiet = 3599 * 10 * MIB;
        let back = (3600..4000)
            .find(|n| b.sample(t0 + Duration::from_secs(*n), quiet, 0) == WalRate::Go)
            .expect("goes on once the application calms down");
        assert!(
            back - 3600 <= 62,
            "held {}s after the busy hour",
            back - 3600
        );
    }

    #[test]
    fn over_a_long_run_the_budget_lets_through_about_the_cap() {
        // a run that writes 8 MiB/s whenever it is let go
        let t0 = Instant::now();
        let mut b = WalBudget::new(2 * MIB, Duration::from_secs(1));
        let mut lsn = 0;
        for n in 0..600 {
            if b.sample(t0 + Duration::from_secs(n), lsn, 0) == WalRate::Go {
                lsn += 8 * MIB;
            }
        }
        let rate = lsn as f64 / 600.0 / (2 * MIB) as f64;
        assert!((0.9..=1.1).contains(&rate), "{rate}x the cap");
    }

    #[test]
    fn no_pace_is_measured_while_held_nor_across_a_gap() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut b = WalBudget::new(MIB, Duration::from_secs(1));
        b.sample(s(0), 0, 0);
        b.sample(s(1), MIB / 2, 1_000);
        assert_eq!(
            b.pace(),
            Some(2_000.0),
            "half a MiB for 1,000 rows: 2,000 rows/s"
        );
        // the application writes 8 MiB while the run is held by something else
        b.restart();
        b.sample(s(9), 8 * MIB + MIB / 2, 1_000);
        b.sample(s(10), 9 * MIB, 2_000);
        assert_eq!(b.pace(), Some(2_000.0), "measured after the gap only");
        // a burst the budget holds for: no pace while held
        assert!(matches!(
            b.sample(s(11), 20 * MIB, 2_000),
            WalRate::Hold { .. }
        ));
        assert_eq!(b.pace(), None);
    }

    /// WAL positions every 10 ms of a simulated run paced by the budget as
    /// the engine paces it: pages of 5,000 rows read when the pace and the
    /// hold allow (at most `capacity` rows/s), each committing 300 ms later
    /// with `per_row(t)` bytes of WAL a row, beside an application writing
    /// `app(t)` bytes/s; the signals are read every second.
    fn simulated_wal(
        cap: u64,
        capacity: f64,
        per_row: impl Fn(f64) -> f64,
        app: impl Fn(f64) -> f64,
    ) -> Vec<(f64, f64)> {
        let (page, tick, every) = (5_000.0, 0.01, 1.0);
        let t0 = Instant::now();
        let mut b = WalBudget::new(cap, Duration::from_secs(1));
        let pace = Pace::of(page / every);
        let (mut next, mut free) = (0.0f64, 0.0f64);
        let (mut held, mut wal, mut rows) = (false, 0.0f64, 0u64);
        let mut in_flight: VecDeque<f64> = VecDeque::new();
        let mut out = Vec::new();
        for i in 0..=18_000u32 {
            let now = f64::from(i) * tick;
            wal += app(now) * tick;
            while in_flight.front().is_some_and(|&at| at <= now) {
                in_flight.pop_front();
                wal += page * per_row(now);
                rows += page as u64;
            }
            if !held && now >= next.max(free) {
                next = next.max(now) + page / pace.rate();
                free = now + page / capacity;
                in_flight.push_back(now + 0.3);
            }
            if i % (every / tick) as u32 == 0 {
                let at = t0 + Duration::from_secs_f64(now);
                held = b.sample(at, wal as u64, rows) != WalRate::Go;
                if let Some(r) = b.pace() {
                    pace.follow(r, page / every, None);
                }
            }
            out.push((now, wal));
        }
        out
    }

    /// The highest and lowest WAL rate over any `span` seconds from `from` on.
    fn extremes(series: &[(f64, f64)], span: f64, from: f64) -> (f64, f64) {
        let (mut most, mut least) = (0.0f64, f64::INFINITY);
        for (i, &(t0, w0)) in series.iter().enumerate().filter(|(_, p)| p.0 >= from) {
            if let Some(&(t1, w1)) = series[i..].iter().find(|p| p.0 - t0 >= span - 1e-9) {
                let r = (w1 - w0) / (t1 - t0);
                most = most.max(r);
                least = least.min(r);
            }
        }
        (most, least)
    }

    #[test]
    fn paced_from_the_wal_a_row_costs_every_10_s_stays_within_10_percent_of_the_cap() {
        let cap = 20 * MIB;
        for app in [0.0, 2.0 * MIB as f64] {
            // the run alone could write 2.6x the cap
            let wal = simulated_wal(cap, 75_000.0, |_| 700.0, |_| app);
            let (most, least) = extremes(&wal, 10.0, 0.0);
            assert!(
                most <= 1.1 * cap as f64,
                "{:.2}x the cap",
                most / cap as f64
            );
            let (_, settled) = extremes(&wal, 10.0, 5.0);
            assert!(
                settled >= 0.9 * cap as f64,
                "{:.2}x the cap",
                settled / cap as f64
            );
            assert!(least > 0.0);
        }
    }

    #[test]
    fn after_an_application_burst_over_the_cap_is_paid_back_the_pace_is_back_within_10_s() {
        let cap = 20 * MIB;
        // the application alone writes 3x the cap for 20 s, then nothing
        let burst = |t: f64| {
            if (40.0..60.0).contains(&t) {
                3.0 * cap as f64
            } else {
                0.0
            }
        };
        let wal = simulated_wal(cap, 75_000.0, |_| 700.0, burst);
        // what it wrote over the cap (40 s worth) is owed, then the run goes on at the cap
        let (most, least) = extremes(&wal, 10.0, 110.0);
        assert!(
            most <= 1.1 * cap as f64,
            "{:.2}x the cap",
            most / cap as f64
        );
        assert!(
            least >= 0.9 * cap as f64,
            "{:.2}x the cap",
            least / cap as f64
        );
    }

    #[test]
    fn when_a_row_suddenly_costs_twice_the_wal_the_cap_holds_within_15_percent_over_10_s() {
        let cap = 20 * MIB;
        // wider values from the middle of the table on: the pace learns it
        // a check late, and the budget keeps only a check's worth of credit
        let wal = simulated_wal(
            cap,
            75_000.0,
            |t| if t < 60.0 { 700.0 } else { 1_400.0 },
            |_| 0.0,
        );
        let (most, _) = extremes(&wal, 10.0, 0.0);
        assert!(
            most <= 1.15 * cap as f64,
            "{:.2}x the cap",
            most / cap as f64
        );
    }
}
