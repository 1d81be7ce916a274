//! Keeping a run off a live primary's back: the rows/s pace, the hold that
//! pauses every source while a signal says so, the adaptive batch size, and
//! the replica-lag estimate. Pure state and arithmetic; the checks that read
//! the database live in [`super::monitor`], the tasks in the engine.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::stop::Stop;

/// Spaces pages out so all lanes together read at most `rate` rows per
/// second. The rate may change while the run goes (`--max-wal-rate` sets it
/// from the WAL each row costs) and applies to the page being waited for.
#[derive(Debug)]
pub struct Pace {
    /// Rows per second, as `f64` bits.
    rate: AtomicU64,
    /// The last page let through: when, and its rows.
    last: Mutex<Option<(Instant, f64)>>,
}

/// How often a wait looks at the rate again.
const PACE_LOOK: Duration = Duration::from_millis(100);

/// The most a measured pace may fall at one check (a window that held an
/// application's burst says less than it seems).
const PACE_FALL: f64 = 0.5;

impl Pace {
    /// A pace of `rows_per_sec` (at least 1).
    pub fn new(rows_per_sec: u32) -> Self {
        Self::of(f64::from(rows_per_sec))
    }

    /// A pace of `rows_per_sec` (at least 1), a fraction allowed.
    pub fn of(rows_per_sec: f64) -> Self {
        let p = Pace {
            rate: AtomicU64::new(1.0f64.to_bits()),
            last: Mutex::new(None),
        };
        p.set_rate(rows_per_sec);
        p
    }

    /// Rows per second now.
    pub fn rate(&self) -> f64 {
        f64::from_bits(self.rate.load(Ordering::Relaxed))
    }

    /// Changes the pace to `rows_per_sec` (at least 1).
    pub fn set_rate(&self, rows_per_sec: f64) {
        let rate = if rows_per_sec.is_nan() {
            1.0
        } else {
            rows_per_sec.max(1.0)
        };
        self.rate.store(rate.to_bits(), Ordering::Relaxed);
    }

    /// Follows a measured pace: `measured` rows/s, falling by at most half
    /// at a time, never under `least` nor over `most`.
    pub fn follow(&self, measured: f64, least: f64, most: Option<f64>) {
        let rate = measured.max(self.rate() * PACE_FALL).max(least);
        self.set_rate(most.map_or(rate, |most| rate.min(most)));
    }

    /// Waits for the turn of a page of `rows` rows: the previous page's rows
    /// at the current rate after it. Holds no transaction (the source reads
    /// autocommit, between pages); returns false when `stop` is asked meanwhile.
    pub async fn wait(&self, rows: usize, stop: &Stop) -> bool {
        loop {
            let wait = {
                let Ok(mut last) = self.last.lock() else {
                    return true;
                };
                let now = Instant::now();
                let due = last.map_or(now, |(at, n)| at + Duration::from_secs_f64(n / self.rate()));
                if due <= now {
                    *last = Some((now, rows as f64));
                    return true;
                }
                (due - now).min(PACE_LOOK)
            };
            if !stop.sleep(wait).await {
                return false;
            }
        }
    }
}

/// Why sources are held, if they are: one value every source waits on.
#[derive(Debug)]
pub struct Hold {
    /// The current reason; `None` lets sources read.
    tx: watch::Sender<Option<String>>,
}

impl Default for Hold {
    fn default() -> Self {
        Hold {
            tx: watch::channel(None).0,
        }
    }
}

impl Hold {
    /// Sets the reason (`None` releases); returns whether it changed.
    pub fn set(&self, reason: Option<String>) -> bool {
        self.tx.send_if_modified(|current| {
            if *current == reason {
                return false;
            }
            *current = reason;
            true
        })
    }

    /// The current reason.
    pub fn reason(&self) -> Option<String> {
        self.tx.borrow().clone()
    }

    /// Waits while held; returns false when `stop` was asked for meanwhile.
    /// Sources call this between pages, with no transaction open.
    pub async fn wait(&self, stop: &Stop) -> bool {
        let mut rx = self.tx.subscribe();
        loop {
            if stop.requested() {
                return false;
            }
            if rx.borrow_and_update().is_none() {
                return true;
            }
            tokio::select! {
                _ = rx.changed() => {}
                () = stop.asked() => return false,
            }
        }
    }
}

/// Rows per page: fixed, or adapted so a batch takes about `target` to
/// commit (an EWMA of the time per row, slow to grow and fast to shrink),
/// clamped to `[min, max]` rows and capped so a page holds at most
/// `max_bytes` of values.
#[derive(Debug)]
pub struct BatchSizer {
    /// The time a batch should take; `None` keeps the size fixed at `max`.
    target: Option<Duration>,
    /// Fewest rows per page.
    min: usize,
    /// Most rows per page.
    max: usize,
    /// Most bytes of values per page.
    max_bytes: usize,
    /// The adapted state.
    state: Mutex<SizerState>,
}

#[derive(Debug)]
struct SizerState {
    /// Rows per page now.
    rows: f64,
    /// EWMA of seconds per row committed.
    secs_per_row: Option<f64>,
    /// EWMA of value bytes per row read.
    bytes_per_row: Option<f64>,
}

/// Rows of a page read before the size of the values is known.
pub const FIRST_PAGE_ROWS: usize = 100;

/// Weight of a new observation in the averages.
const EWMA_ALPHA: f64 = 0.3;
/// Most a page may grow from one batch to the next (slow to grow).
const GROW: f64 = 1.2;
/// Most a page may shrink from one batch to the next (fast to shrink).
const SHRINK: f64 = 0.5;

impl BatchSizer {
    /// A sizer starting at `max` rows.
    pub fn new(max: usize, target: Option<Duration>, max_bytes: usize) -> Self {
        let max = max.max(1);
        BatchSizer {
            target,
            min: max.min(50),
            max,
            max_bytes: max_bytes.max(1),
            state: Mutex::new(SizerState {
                rows: max as f64,
                secs_per_row: None,
                bytes_per_row: None,
            }),
        }
    }

    /// Rows the next page should hold. Until a page has shown how large the
    /// values are, at most [`FIRST_PAGE_ROWS`]: a table of 1 MiB values must
    /// not fill its first page with thousands of them.
    pub fn rows(&self) -> usize {
        let Ok(s) = self.state.lock() else {
            return self.max.min(FIRST_PAGE_ROWS);
        };
        let by_bytes = s.bytes_per_row.map_or(FIRST_PAGE_ROWS, |b| {
            (self.max_bytes as f64 / b.max(1.0)) as usize
        });
        (s.rows as usize).min(by_bytes).clamp(1, self.max)
    }

    /// Records a page read: `rows` rows holding `bytes` bytes of values.
    pub fn read(&self, rows: usize, bytes: usize) {
        if rows == 0 {
            return;
        }
        let Ok(mut s) = self.state.lock() else { return };
        let b = bytes as f64 / rows as f64;
        s.bytes_per_row = Some(
            s.bytes_per_row
                .map_or(b, |old| old + EWMA_ALPHA * (b - old)),
        );
    }

    /// Records a batch of `rows` rows that took `took` to commit, and adapts.
    pub fn committed(&self, rows: usize, took: Duration) {
        if rows == 0 {
            return;
        }
        let Ok(mut s) = self.state.lock() else { return };
        let Some(target) = self.target else {
            // fixed size: grow back (slowly) after a timeout shrank it
            s.rows = (s.rows * GROW).min(self.max as f64);
            return;
        };
        let per_row = took.as_secs_f64() / rows as f64;
        let avg = s
            .secs_per_row
            .map_or(per_row, |old| old + EWMA_ALPHA * (per_row - old));
        s.secs_per_row = Some(avg);
        let ideal = target.as_secs_f64() / avg.max(1e-9);
        s.rows = ideal
            .clamp(s.rows * SHRINK, s.rows * GROW)
            .clamp(self.min as f64, self.max as f64);
    }

    /// Halves the page size at once (a batch timed out), down to the floor;
    /// clean commits grow it back.
    pub fn shrink(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.rows = (s.rows * SHRINK).max(self.min as f64);
        }
    }
}

/// Estimates how far behind (in time) each replica's replay is, from the
/// primary's WAL position sampled over time: a replica that has replayed up
/// to `r` lags by the time since the primary's position first passed `r`.
/// Unlike `pg_stat_replication.replay_lag`, this keeps growing while a
/// replica's replay is stalled.
#[derive(Debug, Default)]
pub struct LagTracker {
    /// (when, primary's WAL position), oldest first.
    samples: VecDeque<(Instant, u64)>,
}

/// Samples kept: enough for lags of several minutes at one check a second.
const LAG_SAMPLES: usize = 4096;

impl LagTracker {
    /// Records the primary's WAL position now.
    pub fn sample(&mut self, at: Instant, lsn: u64) {
        if self.samples.back().is_some_and(|(_, l)| *l == lsn) && self.samples.len() > 1 {
            // no WAL written since: the newest sample stands for this one too
            return;
        }
        self.samples.push_back((at, lsn));
        while self.samples.len() > LAG_SAMPLES {
            self.samples.pop_front();
        }
    }

    /// How long ago the primary first wrote WAL past `replayed`.
    pub fn lag(&self, now: Instant, replayed: u64) -> Duration {
        match self.samples.iter().find(|(_, lsn)| *lsn > replayed) {
            Some((at, _)) => now.saturating_duration_since(*at),
            None => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_ends_a_wait_for_a_page_s_turn() {
        let pace = Pace::of(1.0);
        let stop = Stop::default();
        assert!(pace.wait(1_000, &stop).await, "the first page goes at once");
        let waiting = pace.wait(1_000, &stop);
        let asked = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            stop.trigger();
        };
        let (went, ()) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(waiting, asked)
        })
        .await
        .expect("the wait ends with the stop, not 1,000 s later");
        assert!(!went);
    }

    #[tokio::test]
    async fn a_new_rate_applies_to_the_page_waiting_for_its_turn() {
        let pace = Pace::of(1.0);
        let stop = Stop::default();
        assert!(pace.wait(1_000, &stop).await);
        let faster = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            pace.set_rate(1e9);
        };
        let (went, ()) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(pace.wait(1_000, &stop), faster)
        })
        .await
        .expect("due soon after the rate rose, not 1,000 s after the first page");
        assert!(went);
    }

    #[test]
    fn a_followed_pace_falls_by_half_at_most_and_stays_between_its_bounds() {
        let pace = Pace::of(10_000.0);
        pace.follow(100.0, 50.0, None);
        assert_eq!(pace.rate(), 5_000.0, "half at most");
        pace.follow(100.0, 4_000.0, None);
        assert_eq!(pace.rate(), 4_000.0, "never under the least");
        pace.follow(90_000.0, 50.0, Some(20_000.0));
        assert_eq!(pace.rate(), 20_000.0, "never over the most");
        pace.follow(30_000.0, 50.0, None);
        assert_eq!(pace.rate(), 30_000.0, "up at once");
    }

    #[test]
    fn the_first_page_is_small_until_the_size_of_the_values_is_known() {
        let s = BatchSizer::new(5000, None, 8 << 20);
        assert_eq!(s.rows(), FIRST_PAGE_ROWS);
        s.read(FIRST_PAGE_ROWS, FIRST_PAGE_ROWS * 40_000); // 40 KB values
        assert_eq!(s.rows(), (8 << 20) / 40_000);
    }

    #[test]
    fn a_fixed_sizer_keeps_its_size_whatever_batches_take() {
        let s = BatchSizer::new(5000, None, usize::MAX);
        s.read(1, 100);
        s.committed(5000, Duration::from_secs(10));
        assert_eq!(s.rows(), 5000);
    }

    #[test]
    fn slow_batches_shrink_the_page_fast_and_fast_ones_grow_it_slowly() {
        let s = BatchSizer::new(10_000, Some(Duration::from_millis(100)), usize::MAX);
        s.read(1, 100);
        s.committed(10_000, Duration::from_secs(1)); // 10x too slow
        assert_eq!(s.rows(), 5000, "at most halves per batch");
        for _ in 0..20 {
            s.committed(s.rows(), Duration::from_secs_f64(s.rows() as f64 * 1e-4));
        }
        let settled = s.rows();
        assert!(
            (900..=1100).contains(&settled),
            "settles near 1000 rows per 100 ms, got {settled}"
        );
        let before = s.rows();
        s.committed(before, Duration::from_micros(1)); // suddenly very fast
        assert!(
            s.rows() <= (before as f64 * GROW) as usize + 1,
            "grows by at most 20% per batch"
        );
    }

    #[test]
    fn the_sizer_stays_within_its_bounds() {
        let s = BatchSizer::new(1000, Some(Duration::from_millis(1)), usize::MAX);
        s.read(1, 100);
        for _ in 0..50 {
            s.committed(s.rows(), Duration::from_secs(5));
        }
        assert_eq!(s.rows(), 50);
        for _ in 0..200 {
            s.committed(s.rows(), Duration::from_nanos(1));
        }
        assert_eq!(s.rows(), 1000);
    }

    #[test]
    fn pages_of_large_values_are_capped_by_bytes() {
        let s = BatchSizer::new(5000, None, 64 << 20);
        s.read(10, 10 << 20); // 1 MiB per row
        assert_eq!(s.rows(), 64);
    }

    #[test]
    fn a_timed_out_batch_halves_the_next_page_and_clean_commits_grow_it_back() {
        let s = BatchSizer::new(5000, None, usize::MAX);
        s.read(1, 100);
        s.shrink();
        assert_eq!(s.rows(), 2500);
        for _ in 0..20 {
            s.shrink();
        }
        assert_eq!(s.rows(), 50, "never below the floor");
        for _ in 0..40 {
            s.committed(s.rows(), Duration::from_millis(10));
        }
        assert_eq!(s.rows(), 5000, "back to the fixed size");
    }

    #[test]
    fn a_stalled_replica_lags_by_the_time_since_the_primary_passed_its_position() {
        let t0 = Instant::now();
        let mut l = LagTracker::default();
        l.sample(t0, 100);
        l.sample(t0 + Duration::from_secs(1), 200);
        l.sample(t0 + Duration::from_secs(2), 300);
        let now = t0 + Duration::from_secs(12);
        assert_eq!(l.lag(now, 300), Duration::ZERO, "caught up");
        assert_eq!(l.lag(now, 250), Duration::from_secs(10));
        assert_eq!(l.lag(now, 150), Duration::from_secs(11));
    }

    #[test]
    fn an_idle_primary_does_not_make_a_caught_up_replica_look_behind() {
        let t0 = Instant::now();
        let mut l = LagTracker::default();
        for s in 0..100 {
            l.sample(t0 + Duration::from_secs(s), 500);
        }
        assert_eq!(l.lag(t0 + Duration::from_secs(100), 500), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_hold_keeps_sources_waiting_until_released_or_stopped() {
        let hold = std::sync::Arc::new(Hold::default());
        let stop = Stop::default();
        assert!(hold.wait(&stop).await, "not held: goes at once");
        assert!(hold.set(Some("gate".into())));
        assert!(!hold.set(Some("gate".into())), "same reason: no change");
        let (h, s) = (hold.clone(), stop.clone());
        let waiter = tokio::spawn(async move { h.wait(&s).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        hold.set(None);
        assert!(waiter.await.unwrap());
        hold.set(Some("lag".into()));
        stop.trigger();
        assert!(!hold.wait(&stop).await, "a stop ends the wait");
    }
}
