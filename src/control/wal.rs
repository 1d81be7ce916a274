//! The WAL throttles' arithmetic: the WAL rate budget behind
//! `--max-wal-rate` and the archiver's lag behind `--max-archive-lag`.
//! Pure state; [`super::monitor`] reads the positions from the server.
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
    /// Most credit kept: half a rate window at the cap.
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
        WalBudget {
            cap,
            most: cap * window.as_secs_f64() / 2.0,
            least: -cap * DEBT_WINDOW.max(window * 2).as_secs_f64(),
            release: cap * every.as_secs_f64(),
            credit: 0.0,
            held: false,
            window,
            samples: VecDeque::new(),
        }
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
        self.held = if self.held {
            self.credit < self.release.min(self.most)
        } else {
            self.credit < 0.0
        };
        if !self.held {
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
        let (&(_, l0, r0), &(_, l1, r1)) = (self.samples.front()?, self.samples.back()?);
        let (wal, rows) = (l1.saturating_sub(l0), r1.saturating_sub(r0));
        (wal > 0 && rows > 0).then(|| self.cap * rows as f64 / wal as f64)
    }
}

/// The segment number a WAL file name stands for (`000000010000000A000000FF`
/// and names that begin with one, as `.partial` and `.backup` files do);
/// `None` for a timeline history file or anything else.
pub fn segment_of(file: &str, segment_size: u64) -> Option<u64> {
    let name = file.get(..24)?;
    if !name.bytes().all(|b| b.is_ascii_hexdigit()) || segment_size == 0 {
        return None;
    }
    let log = u64::from_str_radix(name.get(8..16)?, 16).ok()?;
    let seg = u64::from_str_radix(name.get(16..24)?, 16).ok()?;
    let per_log = 0x1_0000_0000_u64 / segment_size;
    log.checked_mul(per_log)?.checked_add(seg)
}

/// What `pg_stat_archiver` says, read once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiverState {
    /// `pg_walfile_name(pg_current_wal_lsn())`.
    pub current_wal: String,
    /// The last WAL file archived, if any since the statistics were reset.
    pub last_archived_wal: Option<String>,
    /// The last WAL file whose archiving failed.
    pub last_failed_wal: Option<String>,
    /// When it failed, as the server prints it.
    pub last_failed_time: Option<String>,
    /// Failures since the statistics were reset.
    pub failed_count: i64,
    /// Whether the last failure came after the last success: the archiver
    /// retries a failed file until it succeeds, so this means it still fails.
    pub failing: bool,
}

/// Why the archiver holds the run, if it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveLag {
    /// Caught up within the cap.
    Go,
    /// `archive_command` fails: nothing archived since the last failure.
    Failing(String),
    /// This many complete segments wait to be archived, more than the cap allows.
    Behind {
        /// Segments ready and not archived.
        segments: u64,
        /// The same in bytes.
        bytes: u64,
    },
}

/// Judges the archiver against `cap` bytes of complete segments waiting.
/// `base` is the segment the run started in: when the archiver has archived
/// nothing since its statistics were reset (or last archived a history
/// file), the lag counts from there.
pub fn archive_lag(s: &ArchiverState, segment_size: u64, base: u64, cap: u64) -> ArchiveLag {
    if s.failing {
        return ArchiveLag::Failing(format!(
            "archiving is failing: {} could not be archived (last failure {}, {} failures counted), \
             nothing archived since; holding until archive_command succeeds (see the server log)",
            s.last_failed_wal.as_deref().unwrap_or("a WAL file"),
            s.last_failed_time.as_deref().unwrap_or("unknown"),
            s.failed_count
        ));
    }
    let Some(current) = segment_of(&s.current_wal, segment_size) else {
        return ArchiveLag::Failing(format!(
            "the current WAL file name {:?} is not one rekey can read; holding",
            s.current_wal
        ));
    };
    let archived = s
        .last_archived_wal
        .as_deref()
        .and_then(|w| segment_of(w, segment_size))
        .unwrap_or_else(|| base.saturating_sub(1));
    // the current segment is still being written: only those before it can be archived
    let segments = current.saturating_sub(archived).saturating_sub(1);
    let bytes = segments.saturating_mul(segment_size);
    if bytes > cap {
        ArchiveLag::Behind { segments, bytes }
    } else {
        ArchiveLag::Go
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_run_under_the_cap_goes_and_a_burst_over_it_holds_until_paid_back() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut b = WalBudget::new(MIB, Duration::from_secs(1));
        assert_eq!(b.sample(s(0), 0, 0), WalRate::Go, "one position is no rate");
        assert_eq!(b.sample(s(1), MIB / 2, 0), WalRate::Go);
        // 4 MiB in one second: 3.5 MiB owed, paid back at 1 MiB/s
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
            (3..=5).contains(&held),
            "held while the debt and one check's credit are earned: {held}s"
        );
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

    /// WAL positions every 10 ms of a simulated run paced by the budget as
    /// the engine paces it: pages of 5,000 rows read when the pace and the
    /// hold allow (at most `capacity` rows/s), each committing 300 ms later
    /// with 700 bytes of WAL a row, beside an application writing
    /// `app` bytes/s; the signals are read every second.
    fn simulated_wal(cap: u64, capacity: f64, app: f64) -> Vec<(f64, f64)> {
        let (page, per_row, tick, every) = (5_000.0, 700.0, 0.01, 1.0);
        let t0 = Instant::now();
        let mut b = WalBudget::new(cap, Duration::from_secs(1));
        let (mut rate, mut next, mut free) = (page / every, 0.0f64, 0.0f64);
        let (mut held, mut wal, mut rows) = (false, 0.0f64, 0u64);
        let mut in_flight: VecDeque<f64> = VecDeque::new();
        let mut out = Vec::new();
        for i in 0..=12_000u32 {
            let now = f64::from(i) * tick;
            wal += app * tick;
            while in_flight.front().is_some_and(|&at| at <= now) {
                in_flight.pop_front();
                wal += page * per_row;
                rows += page as u64;
            }
            if !held && now >= next.max(free) {
                next = next.max(now) + page / rate;
                free = now + page / capacity;
                in_flight.push_back(now + 0.3);
            }
            if i % (every / tick) as u32 == 0 {
                let at = t0 + Duration::from_secs_f64(now);
                held = b.sample(at, wal as u64, rows) != WalRate::Go;
                if let Some(r) = b.pace() {
                    rate = r;
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
            let wal = simulated_wal(cap, 75_000.0, app);
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
    fn wal_file_names_give_their_segment_number() {
        let mib16 = 16 * MIB;
        assert_eq!(segment_of("000000010000000000000003", mib16), Some(3));
        assert_eq!(
            segment_of("00000001000000010000000A", mib16),
            Some(256 + 10)
        );
        assert_eq!(
            segment_of("000000010000000000000003.00000028.backup", mib16),
            Some(3)
        );
        assert_eq!(segment_of("00000002.history", mib16), None);
        assert_eq!(segment_of("", mib16), None);
        assert_eq!(segment_of("0000000100000000000000ZZ", mib16), None);
    }

    fn state(current: &str, archived: Option<&str>) -> ArchiverState {
        ArchiverState {
            current_wal: current.into(),
            last_archived_wal: archived.map(Into::into),
            ..ArchiverState::default()
        }
    }

    #[test]
    fn the_archiver_is_behind_by_the_complete_segments_not_yet_archived() {
        let seg = 16 * MIB;
        let s = state("000000010000000000000010", Some("00000001000000000000000F"));
        assert_eq!(archive_lag(&s, seg, 0, seg), ArchiveLag::Go, "caught up");
        let s = state("000000010000000000000010", Some("00000001000000000000000A"));
        assert_eq!(
            archive_lag(&s, seg, 0, 64 * MIB),
            ArchiveLag::Behind {
                segments: 5,
                bytes: 5 * seg
            }
        );
        assert_eq!(archive_lag(&s, seg, 0, 80 * MIB), ArchiveLag::Go);
        assert!(matches!(
            archive_lag(&s, seg, 0, 1),
            ArchiveLag::Behind { .. }
        ));
    }

    #[test]
    fn nothing_archived_yet_counts_from_where_the_run_started() {
        let seg = 16 * MIB;
        let s = state("000000010000000000000010", None);
        assert_eq!(archive_lag(&s, seg, 0x10, seg), ArchiveLag::Go);
        assert_eq!(
            archive_lag(&s, seg, 0x0E, seg),
            ArchiveLag::Behind {
                segments: 2,
                bytes: 2 * seg
            }
        );
    }

    #[test]
    fn a_failing_archiver_holds_whatever_the_lag() {
        let mut s = state("000000010000000000000010", Some("00000001000000000000000F"));
        s.failing = true;
        s.failed_count = 3;
        s.last_failed_wal = Some("000000010000000000000010".into());
        match archive_lag(&s, 16 * MIB, 0, u64::MAX) {
            ArchiveLag::Failing(why) => assert!(why.contains("archiving is failing"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
