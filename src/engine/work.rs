//! The work queue of one pipeline run and what its tasks share: ranges come
//! from memory (dry runs, verify) or are leased from `rekey.progress` (a
//! rewrite, shared with other processes); lanes take one range at a time,
//! give it up when its lease is lost, and retry reads that can be retried.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;

use crate::control::stop::Stop;
use crate::control::throttle::{BatchSizer, Hold, Pace};

use super::pacing::{initial_pace, WalPace};
use crate::db::session::Timeouts;
use crate::db::KeyBytes;
use crate::engine::pipeline::{Held, Settings};
use crate::engine::sink::Failure;
use crate::engine::source::Source;
use crate::error::Retry;
use crate::job::Job;
use crate::observe::counts::LiveCounts;
use crate::observe::events::{self, LeaseChange};
use crate::observe::progress::Progress;
use crate::state::{self, Claim, RangeState};
use crate::Error;

/// Quarantined values are summed up by table, column and error kind.
type QuarantineGroup = (String, String, &'static str);

/// Keys named in the warning about quarantined values of one column.
const QUARANTINE_EXAMPLES: usize = 5;

/// Batches waiting in the channels between stages, and pages held, all
/// lanes together.
#[derive(Debug, Default)]
pub(super) struct Queued {
    /// Read, waiting for the transform.
    pub(super) to_transform: AtomicI64,
    /// Transformed, waiting for the sink.
    pub(super) to_sink: AtomicI64,
    /// Pages held: read and not yet written or dropped.
    pub(super) pages: Arc<AtomicI64>,
}

/// A lane's page slot, held by a batch from the read of its page until the
/// batch is dropped, and counted meanwhile in the pages the run holds.
pub struct PageSlot {
    /// The lane's permit: it goes back to the lane on drop.
    _permit: OwnedSemaphorePermit,
    /// The run's count of pages held.
    held: Arc<AtomicI64>,
}

impl PageSlot {
    /// Counts a page read under `permit` as held.
    pub(super) fn new(permit: OwnedSemaphorePermit, held: Arc<AtomicI64>) -> Self {
        held.fetch_add(1, Ordering::Relaxed);
        PageSlot {
            _permit: permit,
            held,
        }
    }
}

impl Drop for PageSlot {
    fn drop(&mut self) {
        self.held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where ranges come from.
pub(super) enum Work {
    /// Dry runs and verify: every range, in memory, for this process alone.
    Local(Mutex<VecDeque<usize>>),
    /// A rewrite: ranges leased from `rekey.progress`, shared with other processes.
    Leased {
        /// The job.
        job_id: i64,
        /// This process's name in the leases.
        owner: String,
        /// Backend pid of the monitor's connection: while it lives, the leases are ours.
        monitor_pid: AtomicI32,
        /// How long a lease lasts without a heartbeat.
        ttl: Duration,
    },
}

/// State every task of a run shares.
pub(super) struct Shared {
    /// The job.
    pub(super) job: Arc<Job>,
    /// Every range of the run; grows when a lane splits its range for an
    /// idle one (or claims a range another process split off).
    ranges: RwLock<Vec<Arc<RangeState>>>,
    /// Lanes of this process waiting for a range while others still work:
    /// a lane that sees this splits what is left of its range.
    pub(super) hungry: AtomicUsize,
    /// Where the next range comes from.
    pub(super) work: Work,
    /// Set on the first error or on request: sources stop reading, sinks finish what is in flight.
    pub(super) stop: Stop,
    /// Set when a stop left ranges unfinished.
    pub(super) cut_short: AtomicBool,
    /// Live totals for the progress line.
    pub(super) live: Arc<LiveCounts>,
    /// The progress line.
    pub(super) progress: Progress,
    /// Rows per page.
    pub(super) sizer: BatchSizer,
    /// The rows/s limit, if any: `--max-rows-per-sec`, or the pace
    /// `--max-wal-rate` keeps (never above the former).
    pub(super) pace: Option<Pace>,
    /// How a rewrite's pace follows `--max-wal-rate`, with one.
    pub(super) wal_pace: Option<WalPace>,
    /// Why sources wait, if they do.
    pub(super) hold: Hold,
    /// The hold's stable reason label, for the metrics of the next change,
    /// and when that hold began.
    pub(super) hold_kind: Mutex<Option<(&'static str, Instant)>>,
    /// Holds that ended, by reason: how often and how long.
    pub(super) held: Mutex<BTreeMap<&'static str, Held>>,
    /// Tries of one batch or page.
    pub(super) attempts: u32,
    /// Lock and statement timeouts of every session.
    pub(super) timeouts: Timeouts,
    /// Ranges taken over from dead owners.
    pub(super) taken_over: AtomicU64,
    /// Batches waiting in the channels, all lanes together.
    pub(super) queued: Queued,
    /// (target, range_no) of the ranges this process's lanes are working on,
    /// with the lease generation: only their leases are renewed, and only
    /// the others may be claimed back.
    pub(super) working: Mutex<BTreeMap<(i32, i32), i64>>,
    /// (range index, generation) of leases lost while a lane worked them:
    /// its source leaves the range, its sink drops what is still in flight.
    pub(super) lost: Mutex<BTreeSet<(usize, i64)>>,
    /// One claim at a time in this process, so a range just claimed is in `working` before the next claim looks.
    pub(super) claiming: tokio::sync::Mutex<()>,
    /// Woken when a range is finished here: lanes waiting for work look again at once.
    pub(super) range_done: tokio::sync::Notify,
    /// Values quarantined so far, by (table, column, error): how many, and the first few keys.
    pub(super) quarantined: Mutex<BTreeMap<QuarantineGroup, (u64, Vec<String>)>>,
    /// Whether waiting on other processes' ranges was logged already.
    pub(super) said_waiting: AtomicBool,
}

impl Shared {
    /// What the tasks of a run over `ranges` share.
    pub(super) fn new(
        job: Arc<Job>,
        ranges: Vec<RangeState>,
        work: Work,
        settings: &Settings,
        live: Arc<LiveCounts>,
        progress: Progress,
    ) -> Self {
        let wal_pace = WalPace::of(settings, &work);
        Shared {
            job,
            ranges: RwLock::new(ranges.into_iter().map(Arc::new).collect()),
            hungry: AtomicUsize::new(0),
            work,
            stop: settings.stop.clone(),
            cut_short: AtomicBool::new(false),
            live,
            progress,
            sizer: BatchSizer::new(
                settings.batch_size,
                settings.batch_time,
                settings.max_batch_bytes,
            ),
            pace: initial_pace(settings, wal_pace),
            wal_pace,
            hold: Hold::default(),
            hold_kind: Mutex::new(None),
            held: Mutex::new(BTreeMap::new()),
            attempts: settings.attempts.max(1),
            timeouts: settings.timeouts,
            taken_over: AtomicU64::new(0),
            queued: Queued::default(),
            working: Mutex::new(BTreeMap::new()),
            lost: Mutex::new(BTreeSet::new()),
            claiming: tokio::sync::Mutex::new(()),
            range_done: tokio::sync::Notify::new(),
            said_waiting: AtomicBool::new(false),
            quarantined: Mutex::new(BTreeMap::new()),
        }
    }

    /// Counts values that did not decrypt, warning once for each column and
    /// error kind (each value is logged at `debug` only).
    pub(super) fn note_quarantined(&self, failures: &[Failure]) {
        let Ok(mut seen) = self.quarantined.lock() else {
            return;
        };
        for f in failures {
            events::ValueQuarantined {
                table: &f.table,
                column: &f.column,
                key: &f.key,
                error: f.error,
            }
            .emit();
            let (count, keys) = seen
                .entry((f.table.clone(), f.column.clone(), f.error))
                .or_default();
            *count += 1;
            if keys.len() < QUARANTINE_EXAMPLES {
                keys.push(f.key.clone());
            }
            if *count == 1 {
                events::QuarantineSummary {
                    table: &f.table,
                    column: &f.column,
                    error: f.error,
                    count: 1,
                    first_keys: keys,
                    finished: false,
                    recorded: self.records(),
                }
                .emit();
            }
        }
    }

    /// Whether this run writes (a rewrite's ranges are leased): dry runs and
    /// verify only count what they find.
    fn records(&self) -> bool {
        matches!(self.work, Work::Leased { .. })
    }

    /// One line per column and error kind with the values quarantined by this run.
    pub(super) fn sum_up_quarantine(&self) {
        let Ok(seen) = self.quarantined.lock() else {
            return;
        };
        for ((table, column, error), (count, keys)) in seen.iter() {
            events::QuarantineSummary {
                table,
                column,
                error,
                count: *count,
                first_keys: keys,
                finished: true,
                recorded: self.records(),
            }
            .emit();
        }
    }

    /// Records that the sources are now held for `kind` (`None`: released);
    /// returns the reason of the hold that ended, if one did.
    pub(super) fn note_hold(&self, kind: Option<&'static str>) -> Option<&'static str> {
        let now = Instant::now();
        let ended = self
            .hold_kind
            .lock()
            .ok()
            .and_then(|mut last| std::mem::replace(&mut *last, kind.map(|k| (k, now))));
        if let Ok(mut held) = self.held.lock() {
            if let Some((previous, since)) = ended {
                held.entry(previous).or_default().seconds += (now - since).as_secs_f64();
            }
            if let Some(k) = kind {
                held.entry(k).or_default().times += 1;
            }
        }
        ended.map(|(k, _)| k)
    }

    /// How often and how long the run was held so far, by reason (a hold
    /// still on counts up to now).
    pub(super) fn held(&self) -> BTreeMap<&'static str, Held> {
        let mut held = self.held.lock().map(|h| h.clone()).unwrap_or_default();
        if let Some(Some((kind, since))) = self.hold_kind.lock().ok().map(|k| *k) {
            held.entry(kind).or_default().seconds += since.elapsed().as_secs_f64();
        }
        held
    }

    /// The range at `index`.
    pub(super) fn range(&self, index: usize) -> Arc<RangeState> {
        match self.ranges.read() {
            Ok(r) => r[index].clone(),
            Err(poisoned) => poisoned.into_inner()[index].clone(),
        }
    }

    /// The index of the range `state` names, adding it when this run has
    /// not seen it yet (split off by a lane of this or another process).
    fn find_or_add(&self, state: RangeState) -> usize {
        let mut ranges = self.ranges.write().unwrap_or_else(|p| p.into_inner());
        match ranges
            .iter()
            .position(|r| r.target == state.target && r.range_no == state.range_no)
        {
            Some(i) => {
                // its bounds as the claim read them (a split may have moved its upper bound)
                ranges[i] = Arc::new(state);
                i
            }
            None => {
                ranges.push(Arc::new(state));
                ranges.len() - 1
            }
        }
    }

    /// Records that the range at `index` now ends at `upper`, and that
    /// `rest` (split off it) waits for a lane; wakes lanes waiting for work.
    pub(super) fn split(&self, index: usize, upper: KeyBytes, rest: RangeState) {
        {
            let mut ranges = self.ranges.write().unwrap_or_else(|p| p.into_inner());
            let mut shrunk = (*ranges[index]).clone();
            shrunk.bounds.upper = Some(upper);
            ranges[index] = Arc::new(shrunk);
        }
        self.find_or_add(rest);
        self.range_done.notify_waiters();
    }

    /// The ranges lanes work on now.
    pub(super) fn working(&self) -> Vec<(i32, i32)> {
        self.working
            .lock()
            .map(|w| w.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The next range to read, the key to start after and the lease's
    /// generation; `None` when there is no more work (or a stop was asked for).
    pub(super) async fn next_range(
        &self,
        source: &mut Source,
    ) -> Result<Option<(usize, Option<KeyBytes>, Option<i64>)>, Error> {
        let (job_id, owner, monitor_pid, ttl) = match &self.work {
            Work::Local(queue) => {
                let Ok(mut queue) = queue.lock() else {
                    return Ok(None);
                };
                if self.stop.requested() {
                    if !queue.is_empty() {
                        self.cut_short.store(true, Ordering::Relaxed);
                    }
                    return Ok(None);
                }
                return Ok(queue
                    .pop_front()
                    .map(|i| (i, self.range(i).start().cloned(), None)));
            }
            Work::Leased {
                job_id,
                owner,
                monitor_pid,
                ttl,
            } => (*job_id, owner.as_str(), monitor_pid, *ttl),
        };
        loop {
            if self.stop.requested() {
                self.cut_short.store(true, Ordering::Relaxed);
                return Ok(None);
            }
            let pid = monitor_pid.load(Ordering::Relaxed);
            let targets = self.job.targets.len();
            let claimed = {
                let _one_at_a_time = self.claiming.lock().await;
                let mut failed = 0;
                let claim = loop {
                    match state::claim_range(
                        source.client(),
                        job_id,
                        owner,
                        pid,
                        ttl,
                        &self.working(),
                        targets,
                    )
                    .await
                    {
                        Ok(c) => break c,
                        Err(e) => {
                            self.recover(source, "leasing a range", &mut failed, e)
                                .await?
                        }
                    }
                };
                if let Claim::Leased {
                    state, generation, ..
                } = &claim
                {
                    if let Ok(mut w) = self.working.lock() {
                        w.insert((state.target as i32, state.range_no), *generation);
                    }
                }
                claim
            };
            match claimed {
                Claim::Leased {
                    state,
                    generation,
                    from,
                } => {
                    let start = state.start().cloned();
                    let i = self.find_or_add(state);
                    let range = self.range(i);
                    let table = self.job.targets[range.target].table.to_string();
                    if let Some(from) = from {
                        self.taken_over.fetch_add(1, Ordering::Relaxed);
                        events::LeaseChanged {
                            kind: LeaseChange::TakenOver,
                            table: &table,
                            range_no: range.range_no,
                            owner: &from,
                        }
                        .emit();
                    } else {
                        events::LeaseChanged {
                            kind: LeaseChange::Taken,
                            table: &table,
                            range_no: range.range_no,
                            owner,
                        }
                        .emit();
                    }
                    return Ok(Some((i, start, Some(generation))));
                }
                Claim::Finished => return Ok(None),
                // other processes (or lanes) hold the rest: look again when a
                // range is finished here, and now and then in case an owner died
                Claim::Busy => {
                    if self.working().is_empty() && !self.said_waiting.swap(true, Ordering::Relaxed)
                    {
                        tracing::info!("the job's unfinished ranges are leased to other processes; waiting to take over any whose owner stops");
                    }
                    // lanes still working here split their ranges for this one;
                    // with none, a lane of another process is asked to
                    if self.working().is_empty() {
                        if let Err(e) = state::ask_for_split(source.client(), job_id, owner).await {
                            tracing::debug!("asking for a range to be split failed: {}", e.chain());
                        }
                    }
                    self.hungry.fetch_add(1, Ordering::Relaxed);
                    let _ = tokio::time::timeout(
                        Duration::from_millis(250),
                        self.range_done.notified(),
                    )
                    .await;
                    let _ = self
                        .hungry
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| h.checked_sub(1));
                }
            }
        }
    }

    /// A lane is done with a range (finished, or its lease lost).
    pub(super) fn leave(&self, range: &RangeState, generation: Option<i64>) {
        if let Ok(mut w) = self.working.lock() {
            let key = (range.target as i32, range.range_no);
            if generation.is_none() || w.get(&key).copied() == generation {
                w.remove(&key);
            }
        }
        self.range_done.notify_waiters();
    }

    /// Whether the lease a batch was read under was lost meanwhile.
    pub(super) fn is_lost(&self, range: usize, generation: Option<i64>) -> bool {
        generation.is_some_and(|g| {
            self.lost
                .lock()
                .map(|l| l.contains(&(range, g)))
                .unwrap_or(false)
        })
    }

    /// After a read on `source` failed with `error` (the `failed`-th time):
    /// waits and reconnects (or shrinks pages) so the caller can try again,
    /// or returns the error when it cannot be retried or keeps coming.
    pub(super) async fn recover(
        &self,
        source: &mut Source,
        what: &str,
        failed: &mut u32,
        error: Error,
    ) -> Result<(), Error> {
        *failed += 1;
        let how = error.retry();
        if matches!(how, Retry::Never | Retry::Refused)
            || *failed >= self.attempts
            || self.stop.requested()
        {
            return Err(error);
        }
        let wait = backoff(*failed);
        tracing::warn!(
            attempt = *failed,
            "{what} failed (try {failed} of {}), again in {:.1}s: {}",
            self.attempts,
            wait.as_secs_f64(),
            error.chain()
        );
        tokio::time::sleep(wait).await;
        match how {
            Retry::Reconnect => {
                if let Err(e) = source.reconnect().await {
                    tracing::warn!("reconnecting failed: {}", e.chain());
                }
            }
            Retry::Smaller => self.sizer.shrink(),
            Retry::Wait | Retry::Never | Retry::Refused => {}
        }
        Ok(())
    }
}

/// Waits before try `failed + 1`: 0.25 s, doubling, at most 8 s.
pub(super) fn backoff(failed: u32) -> Duration {
    Duration::from_millis(250u64 << failed.saturating_sub(1).min(5))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;

    use tokio::sync::Semaphore;

    use super::PageSlot;

    #[test]
    fn a_page_slot_counts_itself_held_until_it_is_dropped_and_gives_its_permit_back() {
        let permits = Arc::new(Semaphore::new(2));
        let held = Arc::new(AtomicI64::new(0));
        let take = || {
            let permit = permits.clone().try_acquire_owned().expect("a free slot");
            PageSlot::new(permit, held.clone())
        };
        let (first, second) = (take(), take());
        assert_eq!(held.load(Ordering::Relaxed), 2);
        assert_eq!(permits.available_permits(), 0);
        drop(first);
        assert_eq!(held.load(Ordering::Relaxed), 1);
        assert_eq!(permits.available_permits(), 1);
        drop(second);
        assert_eq!(held.load(Ordering::Relaxed), 0);
        assert_eq!(permits.available_permits(), 2);
    }
}
