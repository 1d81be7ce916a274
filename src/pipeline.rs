//! The pipeline: source -> transform -> sink, joined by bounded channels.
//!
//! This is the one file that spawns. The job's ranges go into a shared work
//! queue; each of `lanes` lanes is a reader task, a transform task (which
//! hands each batch to the rayon pool) and a sink task, with channels of one
//! batch between them, so memory is bounded by lanes x 5 batches whatever
//! the table's size (one deep is as fast as two here, and loses less work to
//! a kill). A lane works one range at a time, in key order, so its
//! checkpoints only move forward; lanes write disjoint ranges side by side.
//!
//! ```text
//! work ──> source ──(1)──> transform (rayon) ──(1)──> sink ──> COMMIT
//! (ranges)  keyset pages     decrypt/encrypt/verify     COPY + CAS UPDATE + checkpoint
//!   ^          ^ hold / pace / batch size                  | time per batch, job control
//!   |          |                                           v
//! leases <── monitor (own connection): heartbeats, rekey pause|resume|stop,
//!            control file, replica lag, SQL gate
//! ```
//!
//! A rewrite leases its ranges from `rekey.progress` (`FOR UPDATE SKIP
//! LOCKED`), so several processes, on one host or several, share one job;
//! a range whose owner died is taken over. Dry runs and verify keep their
//! ranges in memory. Sources read nothing while the monitor holds the run,
//! with no transaction open. A batch that times out is retried in halves, a
//! lost connection is reopened with backoff, and a batch that keeps failing
//! stops the run with its error (resumable).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::checkpoint::{self, Claim, RangeState};
use crate::db::Database;
use crate::error::Retry;
use crate::job::Job;
use crate::monitor::{Monitor, Signals, Verdict};
use crate::plan::KeyBytes;
use crate::progress::Progress;
use crate::sink::{self, AfterReconnect, Batch, Commit, Failure, Timeouts, Writer, Written};
use crate::source::{self, Source};
use crate::stats::{Counts, LiveCounts};
use crate::throttle::{BatchSizer, Hold, Pace};
use crate::transform::{self, Cell};
use crate::{metrics, Error};

/// Batches in flight between two stages of a lane.
const CHANNEL_DEPTH: usize = 1;

/// Failures kept in memory for the report; the count beyond is exact.
pub const MAX_REPORTED_FAILURES: usize = 10_000;

/// What the pipeline does with what it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Re-encrypt stale values and commit them with checkpoints in this job.
    Rewrite {
        /// `rekey.jobs.job_id`.
        job_id: i64,
    },
    /// Read, decrypt and re-encrypt everything stale; write nothing.
    DryRun,
    /// Open every value and count it by key; write nothing.
    Verify,
}

/// A request to stop cleanly: sources read no further page, and batches
/// already read still commit. Cloned handles share one flag.
#[derive(Debug, Clone, Default)]
pub struct Stop(Arc<(AtomicBool, Mutex<Option<&'static str>>)>);

impl Stop {
    /// Asks every pipeline holding this handle to stop.
    pub fn trigger(&self) {
        self.0 .0.store(true, Ordering::Relaxed);
    }

    /// Asks to stop, saying who asked ("signal", "run-time", "rekey stop", "control file").
    pub fn trigger_by(&self, who: &'static str) {
        if let Ok(mut by) = self.0 .1.lock() {
            by.get_or_insert(who);
        }
        self.trigger();
    }

    /// Whether a stop was asked for.
    pub fn requested(&self) -> bool {
        self.0 .0.load(Ordering::Relaxed)
    }

    /// Who asked first, if they said.
    pub fn by(&self) -> Option<&'static str> {
        self.0 .1.lock().ok().and_then(|b| *b)
    }
}

/// How the pipeline runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Lanes (reader + writer connection pairs) working at once.
    pub lanes: usize,
    /// Rows per batch (the most, when batches adapt to `batch_time`).
    pub batch_size: usize,
    /// Adapt the batch size so one batch takes about this long to commit.
    pub batch_time: Option<Duration>,
    /// Most bytes of values per batch.
    pub max_batch_bytes: usize,
    /// Stops the run cleanly when triggered (signals, `--run-time`, `rekey bench --interrupt-at`).
    pub stop: Stop,
    /// Rows per second the sources may read, all lanes together (`--max-rows-per-sec`).
    pub max_rows_per_sec: Option<u32>,
    /// Lock and statement timeouts of every batch.
    pub timeouts: Timeouts,
    /// Tries of one batch (or page) before the run stops with its error.
    pub attempts: u32,
    /// What the monitor watches.
    pub signals: Signals,
    /// How long a lease on a range lasts without a heartbeat.
    pub lease_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            lanes: 2,
            batch_size: 5000,
            batch_time: None,
            max_batch_bytes: 64 << 20,
            stop: Stop::default(),
            max_rows_per_sec: None,
            timeouts: Timeouts::default(),
            attempts: 6,
            signals: Signals::default(),
            lease_ttl: Duration::from_secs(30),
        }
    }
}

/// What a whole pipeline run did.
#[derive(Debug)]
pub struct Outcome {
    /// Totals.
    pub counts: Counts,
    /// Time each batch took in the sink, in microseconds.
    pub batch_micros: hdrhistogram::Histogram<u64>,
    /// Failed values, up to [`MAX_REPORTED_FAILURES`].
    pub failures: Vec<Failure>,
    /// Verify: values per `table.column` and key label.
    pub by_key: BTreeMap<String, BTreeMap<String, u64>>,
    /// Verify: values that opened under the target key (in the target format).
    pub on_target: u64,
    /// Verify: values that opened under an old key (or in the old format).
    pub on_old: u64,
    /// Totals per target index.
    pub by_target: BTreeMap<usize, Counts>,
    /// Rows still changing under the run after every conflict re-read.
    pub conflicts_left: u64,
    /// Whether the run stopped on request before finishing every range.
    pub stopped: bool,
    /// Who asked it to stop, when it did.
    pub stopped_by: Option<&'static str>,
    /// Batches retried after a timeout or a lost connection.
    pub retries: u64,
    /// Ranges taken over from a process that stopped renewing its leases.
    pub taken_over: u64,
    /// Smallest and largest batch committed, in rows.
    pub batch_rows: (usize, usize),
}

impl Default for Outcome {
    fn default() -> Self {
        Outcome {
            counts: Counts::default(),
            batch_micros: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid"),
            failures: Vec::new(),
            by_key: BTreeMap::new(),
            on_target: 0,
            on_old: 0,
            by_target: BTreeMap::new(),
            conflicts_left: 0,
            stopped: false,
            stopped_by: None,
            retries: 0,
            taken_over: 0,
            batch_rows: (usize::MAX, 0),
        }
    }
}

impl Outcome {
    fn merge(&mut self, other: Outcome) {
        self.counts += other.counts;
        let _ = self.batch_micros.add(&other.batch_micros);
        let room = MAX_REPORTED_FAILURES.saturating_sub(self.failures.len());
        self.failures.extend(other.failures.into_iter().take(room));
        self.on_target += other.on_target;
        self.on_old += other.on_old;
        self.retries += other.retries;
        self.taken_over += other.taken_over;
        self.batch_rows = (self.batch_rows.0.min(other.batch_rows.0), self.batch_rows.1.max(other.batch_rows.1));
        for (t, c) in other.by_target {
            *self.by_target.entry(t).or_default() += c;
        }
        for (col, keys) in other.by_key {
            let mine = self.by_key.entry(col).or_default();
            for (k, n) in keys {
                *mine.entry(k).or_default() += n;
            }
        }
    }
}

/// Where ranges come from.
enum Work {
    /// Dry runs and verify: every range, in memory, for this process alone.
    Local(Mutex<VecDeque<usize>>),
    /// A rewrite: ranges leased from `rekey.progress`, shared with other processes.
    Leased {
        /// The job.
        job_id: i64,
        /// This process's name in the leases.
        owner: String,
        /// Backend pid of the monitor's connection: while it lives, the leases are ours.
        home_pid: AtomicI32,
        /// How long a lease lasts without a heartbeat.
        ttl: Duration,
    },
}

/// State every task of a run shares.
struct Shared {
    /// The job.
    job: Arc<Job>,
    /// Every range of the run.
    ranges: Vec<RangeState>,
    /// Where the next range comes from.
    work: Work,
    /// Set on the first error or on request: sources stop reading, sinks finish what is in flight.
    stop: Stop,
    /// Set when a stop left ranges unfinished.
    cut_short: AtomicBool,
    /// Live totals for the progress line.
    live: Arc<LiveCounts>,
    /// The progress line.
    progress: Progress,
    /// Rows per page.
    sizer: BatchSizer,
    /// The rows/s limit, if any.
    pace: Option<Pace>,
    /// Why sources wait, if they do.
    hold: Hold,
    /// Tries of one batch or page.
    attempts: u32,
    /// Lock and statement timeouts of every session.
    timeouts: Timeouts,
    /// Ranges taken over from dead owners.
    taken_over: AtomicU64,
    /// Batches waiting in the channels: source -> transform, transform -> sink (all lanes).
    queued: [AtomicI64; 2],
    /// (target, range_no) of the ranges this process's lanes are working on,
    /// with the lease generation: only their leases are renewed, and only
    /// the others may be claimed back.
    working: Mutex<BTreeMap<(i32, i32), i64>>,
    /// (range index, generation) of leases lost while a lane worked them:
    /// its source leaves the range, its sink drops what is still in flight.
    lost: Mutex<BTreeSet<(usize, i64)>>,
    /// One claim at a time in this process, so a range just claimed is in `working` before the next claim looks.
    claiming: tokio::sync::Mutex<()>,
    /// Woken when a range is finished here: lanes waiting for work look again at once.
    range_done: tokio::sync::Notify,
    /// Whether waiting on other processes' ranges was logged already.
    said_waiting: AtomicBool,
}

impl Shared {
    /// The ranges lanes work on now.
    fn working(&self) -> Vec<(i32, i32)> {
        self.working.lock().map(|w| w.keys().copied().collect()).unwrap_or_default()
    }

    /// The next range to read, the key to start after and the lease's
    /// generation; `None` when there is no more work (or a stop was asked for).
    async fn next_range(&self, source: &mut Source) -> Result<Option<(usize, Option<KeyBytes>, Option<i64>)>, Error> {
        let (job_id, owner, home_pid, ttl) = match &self.work {
            Work::Local(queue) => {
                let Ok(mut queue) = queue.lock() else { return Ok(None) };
                if self.stop.requested() {
                    if !queue.is_empty() {
                        self.cut_short.store(true, Ordering::Relaxed);
                    }
                    return Ok(None);
                }
                return Ok(queue.pop_front().map(|i| (i, self.ranges[i].start().cloned(), None)));
            }
            Work::Leased { job_id, owner, home_pid, ttl } => (*job_id, owner.as_str(), home_pid, *ttl),
        };
        loop {
            if self.stop.requested() {
                self.cut_short.store(true, Ordering::Relaxed);
                return Ok(None);
            }
            let pid = home_pid.load(Ordering::Relaxed);
            let targets = self.job.targets.len();
            let claimed = {
                let _one_at_a_time = self.claiming.lock().await;
                let mut failed = 0;
                let claim = loop {
                    match checkpoint::claim_range(source.client(), job_id, owner, pid, ttl, &self.working(), targets).await {
                        Ok(c) => break c,
                        Err(e) => self.recover(source, "leasing a range", &mut failed, e).await?,
                    }
                };
                if let Claim::Leased { state, generation, .. } = &claim {
                    if let Ok(mut w) = self.working.lock() {
                        w.insert((state.target as i32, state.range_no), *generation);
                    }
                }
                claim
            };
            match claimed {
                Claim::Leased { state, generation, from } => {
                    let Some(i) = self.ranges.iter().position(|r| r.target == state.target && r.range_no == state.range_no) else {
                        return Err(Error::Runtime(format!("rekey.progress of job {job_id} has a range this run did not load; the engine state was edited by hand")));
                    };
                    let table = self.job.targets[state.target].table.to_string();
                    if let Some(from) = from {
                        self.taken_over.fetch_add(1, Ordering::Relaxed);
                        metrics::LeaseChanged { kind: "taken_over", table: &table, range_no: state.range_no, owner: &from }.emit();
                    } else {
                        metrics::LeaseChanged { kind: "taken", table: &table, range_no: state.range_no, owner }.emit();
                    }
                    return Ok(Some((i, state.start().cloned(), Some(generation))));
                }
                Claim::Finished => return Ok(None),
                // other processes (or lanes) hold the rest: look again when a
                // range is finished here, and now and then in case an owner died
                Claim::Busy => {
                    if self.working().is_empty() && !self.said_waiting.swap(true, Ordering::Relaxed) {
                        tracing::info!("the job's unfinished ranges are leased to other processes; waiting to take over any whose owner stops");
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(250), self.range_done.notified()).await;
                }
            }
        }
    }

    /// A lane is done with a range (finished, or its lease lost).
    fn leave(&self, range: &RangeState, generation: Option<i64>) {
        if let Ok(mut w) = self.working.lock() {
            let key = (range.target as i32, range.range_no);
            if generation.is_none() || w.get(&key).copied() == generation {
                w.remove(&key);
            }
        }
        self.range_done.notify_waiters();
    }

    /// Whether the lease a batch was read under was lost meanwhile.
    fn is_lost(&self, range: usize, generation: Option<i64>) -> bool {
        generation.is_some_and(|g| self.lost.lock().map(|l| l.contains(&(range, g))).unwrap_or(false))
    }

    /// After a read on `source` failed with `error` (the `failed`-th time):
    /// waits and reconnects (or shrinks pages) so the caller can try again,
    /// or returns the error when it cannot be retried or keeps coming.
    async fn recover(&self, source: &mut Source, what: &str, failed: &mut u32, error: Error) -> Result<(), Error> {
        *failed += 1;
        let how = error.retry();
        if how == Retry::Never || *failed >= self.attempts || self.stop.requested() {
            return Err(error);
        }
        let wait = backoff(*failed);
        tracing::warn!(attempt = *failed, "{what} failed (try {failed} of {}), again in {:.1}s: {}", self.attempts, wait.as_secs_f64(), error.chain());
        tokio::time::sleep(wait).await;
        match how {
            Retry::Reconnect => {
                if let Err(e) = source.reconnect().await {
                    tracing::warn!("reconnecting failed: {}", e.chain());
                }
            }
            Retry::Smaller => self.sizer.shrink(),
            Retry::Wait | Retry::Never => {}
        }
        Ok(())
    }
}

/// Waits before try `failed + 1`: 0.25 s, doubling, at most 8 s.
fn backoff(failed: u32) -> Duration {
    Duration::from_millis(250u64 << failed.saturating_sub(1).min(5))
}

/// Runs the pipeline over `ranges` until every unfinished one is done or a
/// stage fails; on failure, batches already in flight still commit.
pub async fn run(db: &Database, job: Arc<Job>, ranges: Vec<RangeState>, mode: Mode, settings: Settings, live: Arc<LiveCounts>, progress: Progress) -> Result<Outcome, Error> {
    let mut home = db.connect().await?;
    let job_id = match mode {
        Mode::Rewrite { job_id } => Some(job_id),
        Mode::DryRun | Mode::Verify => None,
    };
    let work = match job_id {
        Some(job_id) => {
            let pid: i32 = home
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .map_err(|e| Error::Db { context: "opening the run's monitor connection".into(), source: e })?
                .get(0);
            Work::Leased { job_id, owner: owner_name(), home_pid: AtomicI32::new(pid), ttl: settings.lease_ttl.max(Duration::from_secs(1)) }
        }
        None => Work::Local(Mutex::new(ranges.iter().enumerate().filter(|(_, r)| !r.done).map(|(i, _)| i).collect())),
    };
    let unfinished = ranges.iter().filter(|r| !r.done).count();
    let lanes = settings.lanes.clamp(1, unfinished.max(1));
    let shared = Arc::new(Shared {
        job,
        ranges,
        work,
        stop: settings.stop.clone(),
        cut_short: AtomicBool::new(false),
        live,
        progress,
        sizer: BatchSizer::new(settings.batch_size, settings.batch_time, settings.max_batch_bytes),
        pace: settings.max_rows_per_sec.map(Pace::new),
        hold: Hold::default(),
        attempts: settings.attempts.max(1),
        timeouts: settings.timeouts,
        taken_over: AtomicU64::new(0),
        queued: [AtomicI64::new(0), AtomicI64::new(0)],
        working: Mutex::new(BTreeMap::new()),
        lost: Mutex::new(BTreeSet::new()),
        claiming: tokio::sync::Mutex::new(()),
        range_done: tokio::sync::Notify::new(),
        said_waiting: AtomicBool::new(false),
    });
    if let Some(sql) = &settings.signals.gate_sql {
        crate::monitor::check_gate_sql(&mut home, sql).await?;
    }

    // the signals are read once before any source reads a page
    let mut monitor = Monitor::new(settings.signals.clone());
    apply(&shared, read_signals(&mut monitor, &mut home, job_id).await);
    // in a JoinSet so that it ends with this future even when the future is dropped
    let mut watcher = JoinSet::new();
    watcher.spawn(watch(shared.clone(), db.clone(), home, monitor, settings.signals.check_every, job_id));

    let mut tasks: JoinSet<Result<Option<Outcome>, Error>> = JoinSet::new();
    for _ in 0..lanes {
        let (to_transform, from_source) = mpsc::channel::<Batch>(CHANNEL_DEPTH);
        let (to_sink, from_transform) = mpsc::channel::<Batch>(CHANNEL_DEPTH);
        let reader = Source::connect(db, mode != Mode::Verify, settings.timeouts).await?;
        let lookup = match mode {
            Mode::Rewrite { .. } => None,
            Mode::DryRun | Mode::Verify => Some(db.connect().await?),
        };
        let writer = match (mode, &shared.work) {
            (Mode::Rewrite { job_id }, Work::Leased { owner, .. }) => Some(Writer::connect_as(db, &shared.job, job_id, Some(owner.clone()), settings.timeouts).await?),
            _ => None,
        };
        tasks.spawn(read(shared.clone(), reader, to_transform));
        tasks.spawn(transform_stage(shared.clone(), mode, from_source, to_sink));
        tasks.spawn(write(shared.clone(), writer, lookup, from_transform));
    }

    let mut outcome = Outcome::default();
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let result = joined.unwrap_or_else(|e| Err(Error::Runtime(format!("a pipeline task stopped unexpectedly: {e}"))));
        match result {
            Ok(Some(lane)) => outcome.merge(lane),
            Ok(None) => {}
            Err(e) => {
                shared.stop.trigger();
                first_error.get_or_insert(e);
            }
        }
    }
    watcher.abort_all();
    if let Work::Leased { job_id, owner, .. } = &shared.work {
        // give unfinished ranges back now rather than when their leases run out
        if let Ok(client) = db.connect().await {
            let _ = checkpoint::release_ranges(&client, *job_id, owner).await;
        }
    }
    outcome.taken_over = shared.taken_over.load(Ordering::Relaxed);
    if let Some(e) = first_error {
        shared.progress.finish();
        return Err(e);
    }
    if shared.cut_short.load(Ordering::Relaxed) {
        outcome.stopped = true;
        outcome.stopped_by = shared.stop.by();
    } else if let Some(job_id) = job_id {
        let (retried, left) = retry_conflicts(db, &shared, job_id).await?;
        outcome.merge(retried);
        outcome.conflicts_left = left;
        if shared.stop.requested() {
            // stopped during the re-reads: the job stays open, the next run re-reads what is left
            outcome.stopped = true;
            outcome.stopped_by = shared.stop.by();
        }
    }
    shared.progress.finish();
    Ok(outcome)
}

/// This process's name in leases: host, pid and a random tag.
fn owner_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "host".into());
    let tag = crate::keyring::generate_material();
    format!("{host}:{}:{}", std::process::id(), hex::encode(&tag[..3]))
}

/// Reads the job's control and every signal once.
async fn read_signals(monitor: &mut Monitor, home: &mut tokio_postgres::Client, job_id: Option<i64>) -> Verdict {
    let control = match job_id {
        Some(id) => match checkpoint::job_control(home, id).await {
            Ok(c) => Some(c),
            Err(e) => return Verdict::Hold("unreadable", format!("the job's control is unreadable, holding: {}", e.chain())),
        },
        None => None,
    };
    monitor.check(home, control.as_deref()).await
}

/// Acts on a verdict: stop, hold or release the sources.
fn apply(shared: &Shared, verdict: Verdict) {
    let (kind, reason) = match verdict {
        Verdict::Go => (None, None),
        Verdict::Hold(kind, reason) => (Some(kind), Some(reason)),
        Verdict::Stop(who) => {
            if !shared.stop.requested() {
                tracing::info!(by = who, "stop asked by {who}; stopping after the batches in flight commit");
            }
            shared.stop.trigger_by(who);
            (None, None)
        }
    };
    if shared.hold.set(reason.clone()) {
        shared.progress.set_hold(reason.as_deref());
        metrics::ThrottleChanged { reason: kind, detail: reason.as_deref() }.emit();
    }
}

/// The monitor task: renews leases and reads the signals every `every`, on
/// a connection of its own (reopened when lost; meanwhile the run holds).
async fn watch(shared: Arc<Shared>, db: Database, mut home: tokio_postgres::Client, mut monitor: Monitor, every: Duration, job_id: Option<i64>) {
    let every = every.max(Duration::from_millis(50));
    let mut last_beat = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        if home.is_closed() {
            apply(&shared, Verdict::Hold("unreadable", "the monitor's connection was lost; reconnecting".into()));
            let Some(c) = reopen_home(&shared, &db).await else { continue };
            home = c;
            last_beat = Instant::now().checked_sub(Duration::from_secs(3600)).unwrap_or(last_beat);
        }
        if let Work::Leased { job_id, owner, ttl, .. } = &shared.work {
            if last_beat.elapsed() >= *ttl / 3 {
                match checkpoint::heartbeat(&home, *job_id, owner, *ttl, &shared.working()).await {
                    Ok(_) => last_beat = Instant::now(),
                    Err(e) => tracing::warn!("renewing leases failed (they lapse after --lease-ttl): {}", e.chain()),
                }
            }
        }
        // a round that hangs (a half-open socket) holds the run and reconnects
        let limit = (every * 10).clamp(Duration::from_secs(5), Duration::from_secs(30));
        let verdict = match tokio::time::timeout(limit, read_signals(&mut monitor, &mut home, job_id)).await {
            Ok(v) => v,
            Err(_) => {
                if let Some(c) = reopen_home(&shared, &db).await {
                    home = c;
                }
                Verdict::Hold("unreadable", format!("reading the throttle signals took over {}s; holding", limit.as_secs()))
            }
        };
        apply(&shared, verdict);
        for (stage, n) in [("to_transform", &shared.queued[0]), ("to_sink", &shared.queued[1])] {
            metrics::QueueDepth { stage, depth: usize::try_from(n.load(Ordering::Relaxed)).unwrap_or(0) }.emit();
        }
    }
}

/// A new monitor connection; its backend pid becomes the one leases name.
async fn reopen_home(shared: &Shared, db: &Database) -> Option<tokio_postgres::Client> {
    let home = db.connect().await.ok()?;
    if let (Work::Leased { home_pid, .. }, Ok(row)) = (&shared.work, home.query_one("SELECT pg_backend_pid()", &[]).await) {
        home_pid.store(row.get(0), Ordering::Relaxed);
    }
    Some(home)
}

/// Source stage: reads each range it takes, page by page, in key order.
async fn read(shared: Arc<Shared>, mut source: Source, out: mpsc::Sender<Batch>) -> Result<Option<Outcome>, Error> {
    while let Some((ri, start, lease)) = shared.next_range(&mut source).await? {
        let state = &shared.ranges[ri];
        let target = &shared.job.targets[state.target];
        let mut after = start;
        loop {
            if !shared.hold.wait(&shared.stop).await {
                shared.cut_short.store(true, Ordering::Relaxed);
                return Ok(None);
            }
            if shared.is_lost(ri, lease) {
                // another process has the range now; its checkpoint, not ours, says where it stands
                break;
            }
            let limit = shared.sizer.rows();
            if let Some(pace) = &shared.pace {
                pace.wait(limit).await;
                // a hold or stop may have come while waiting for the slot
                if !shared.hold.wait(&shared.stop).await {
                    shared.cut_short.store(true, Ordering::Relaxed);
                    return Ok(None);
                }
            }
            let upper = state.range.upper.as_ref();
            let mut failed = 0;
            let rows = loop {
                match source.page(target, after.as_ref(), upper, limit).await {
                    Ok(rows) => break rows,
                    Err(e) => shared.recover(&mut source, &format!("reading a page of {}", target.table), &mut failed, e).await?,
                }
            };
            shared.sizer.read(rows.len(), rows.iter().map(|r| source::value_bytes(target, r)).sum());
            let end = rows.len() < limit;
            let last_key = rows.last().map(|r| source::row_key(target, r));
            if let Some(k) = &last_key {
                after = Some(k.clone());
            }
            let batch = Batch { range: ri, rows, cells: Vec::new(), last_key, end, lease };
            if out.send(batch).await.is_err() {
                return Ok(None);
            }
            shared.queued[0].fetch_add(1, Ordering::Relaxed);
            if end {
                break;
            }
        }
    }
    Ok(None)
}

/// Transform stage: runs each batch on the rayon pool and passes it on.
async fn transform_stage(shared: Arc<Shared>, mode: Mode, mut input: mpsc::Receiver<Batch>, out: mpsc::Sender<Batch>) -> Result<Option<Outcome>, Error> {
    while let Some(batch) = input.recv().await {
        shared.queued[0].fetch_sub(1, Ordering::Relaxed);
        let target_index = shared.ranges[batch.range].target;
        let batch = on_pool(shared.job.clone(), target_index, mode, batch).await?;
        if out.send(batch).await.is_err() {
            break;
        }
        shared.queued[1].fetch_add(1, Ordering::Relaxed);
    }
    Ok(None)
}

/// Runs the transform of one batch on the rayon pool.
async fn on_pool(job: Arc<Job>, target_index: usize, mode: Mode, mut batch: Batch) -> Result<Batch, Error> {
    let (done, result) = oneshot::channel();
    rayon::spawn(move || {
        let target = &job.targets[target_index];
        match mode {
            Mode::Verify => transform::classify(target, &batch.rows, &mut batch.cells),
            Mode::Rewrite { .. } | Mode::DryRun => transform::rewrite(target, &batch.rows, &mut batch.cells),
        }
        let _ = done.send(batch);
    });
    result.await.map_err(|_| Error::Runtime("the transform pool dropped a batch".into()))
}

/// Rounds of conflict re-reads before the run reports rows still changing.
const RETRY_ROUNDS: u32 = 10;
/// Keys re-read per batch.
const RETRY_BATCH: i64 = 1000;

/// Re-reads rows the application changed under a batch, until none remain
/// or [`RETRY_ROUNDS`] rounds have passed; returns the outcome and how many
/// keys are still waiting.
async fn retry_conflicts(db: &Database, shared: &Shared, job_id: i64) -> Result<(Outcome, u64), Error> {
    let mut outcome = Outcome::default();
    let admin = db.connect().await?;
    // processes sharing the job take turns: the next finds what the first left
    admin
        .execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[&format!("rekey.conflicts:{job_id}")])
        .await
        .map_err(|e| Error::Db { context: "waiting for another process's conflict re-reads".into(), source: e })?;
    let mut reader = None;
    let mut writer = None;
    'rounds: for round in 0..RETRY_ROUNDS {
        let mut any = false;
        for target in &shared.job.targets {
            loop {
                let keys = crate::checkpoint::pending_conflicts(&admin, job_id, target.index, RETRY_BATCH).await?;
                if keys.is_empty() {
                    break;
                }
                any = true;
                // throttles and live control hold re-reads too; a stop leaves
                // the keys in rekey.conflicts for the next run
                if !shared.hold.wait(&shared.stop).await {
                    break 'rounds;
                }
                if let Some(pace) = &shared.pace {
                    pace.wait(keys.len()).await;
                }
                if reader.is_none() {
                    reader = Some(Source::connect(db, false, shared.timeouts).await?);
                    writer = Some(Writer::connect_as(db, &shared.job, job_id, None, shared.timeouts).await?);
                }
                let (Some(source), Some(sink)) = (reader.as_mut(), writer.as_mut()) else { break };
                let rows = source.rows_by_keys(target, &keys).await?;
                let batch = Batch { range: 0, rows, cells: Vec::new(), last_key: None, end: false, lease: None };
                let batch = on_pool(shared.job.clone(), target.index, Mode::Rewrite { job_id }, batch).await?;
                let Written { counts, failures, .. } = sink.write(target, Commit::Retry(&keys), &batch).await?;
                shared.live.add(&counts);
                outcome.merge(Outcome { counts, failures, by_target: BTreeMap::from([(target.index, counts)]), ..Outcome::default() });
                if counts.conflicts > 0 {
                    // still changing: give the application's transactions time before the next round
                    break;
                }
            }
        }
        if !any {
            return Ok((outcome, 0));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50 * u64::from(round + 1))).await;
    }
    let left: i64 = admin
        .query_one("SELECT count(*) FROM rekey.conflicts WHERE job_id = $1", &[&job_id])
        .await
        .map_err(|e| Error::Db { context: "counting conflicts left".into(), source: e })?
        .get(0);
    Ok((outcome, left as u64))
}

/// Sink stage: commits batches (rewrite) or tallies them (dry run, verify).
async fn write(shared: Arc<Shared>, mut writer: Option<Writer>, lookup: Option<tokio_postgres::Client>, mut input: mpsc::Receiver<Batch>) -> Result<Option<Outcome>, Error> {
    let mut outcome = Outcome::default();
    while let Some(batch) = input.recv().await {
        shared.queued[1].fetch_sub(1, Ordering::Relaxed);
        let started = Instant::now();
        let rows = batch.rows.len();
        let state = &shared.ranges[batch.range];
        let target = &shared.job.targets[state.target];
        let (end, lease) = (batch.end, batch.lease);
        if shared.is_lost(batch.range, lease) {
            continue;
        }
        let (counts, failures) = match (&mut writer, &lookup) {
            (Some(w), _) => {
                let range = batch.range;
                let (written, retries) = match commit(&shared, w, state, batch).await {
                    Ok(done) => done,
                    Err(Error::LeaseLost(why)) => {
                        // nothing of the batch was written; the range goes on elsewhere
                        tracing::warn!("{why}; this process goes on with other ranges");
                        if let (Ok(mut lost), Some(g)) = (shared.lost.lock(), lease) {
                            lost.insert((range, g));
                        }
                        shared.leave(state, lease);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if end {
                    shared.leave(state, lease);
                }
                outcome.retries += retries;
                // the job's control as of this commit: honoured before the next page
                match written.control.as_str() {
                    "stop" => apply(&shared, Verdict::Stop("rekey stop")),
                    "pause" => apply(&shared, Verdict::Hold("paused", crate::monitor::PAUSED.into())),
                    _ => {}
                }
                (written.counts, written.failures)
            }
            (None, Some(client)) => (tally(target, &batch, &mut outcome), sink::describe_failures(client, target, &batch).await?),
            (None, None) => return Err(Error::Runtime("a sink has neither a writer nor a lookup connection".into())),
        };
        for f in &failures {
            metrics::ValueQuarantined { table: &f.table, column: &f.column, key: &f.key, error: f.error }.emit();
        }
        let took = started.elapsed();
        metrics::BatchCommitted { table: &target.table.to_string(), target: target.index, counts: &counts, seconds: took.as_secs_f64(), rows }.emit();
        shared.sizer.committed(rows, took);
        let _ = outcome.batch_micros.record(took.as_micros().max(1) as u64);
        if rows > 0 {
            outcome.batch_rows = (outcome.batch_rows.0.min(rows), outcome.batch_rows.1.max(rows));
        }
        outcome.merge(Outcome { counts, failures, by_target: BTreeMap::from([(target.index, counts)]), ..Outcome::default() });
        shared.live.add(&counts);
        shared.progress.update(&shared.live.snapshot());
    }
    Ok(Some(outcome))
}

/// Commits one batch, retrying what can be retried: a lock or statement
/// timeout splits it in halves, a lost connection is reopened (and a batch
/// whose COMMIT did land is not redone), a transient error waits. After
/// `attempts` failed tries the last error stops the run, which resumes
/// from the last committed batch. Returns what was written and the retries.
async fn commit(shared: &Shared, writer: &mut Writer, state: &RangeState, batch: Batch) -> Result<(Written, u64), Error> {
    let target = &shared.job.targets[state.target];
    let mut total = Written { counts: Counts::default(), failures: Vec::new(), control: String::from("run") };
    let mut pending = VecDeque::from([batch]);
    let mut failed = 0u32;
    let mut retries = 0u64;
    // after a reconnect, nothing is written before the checkpoints are checked
    let mut unchecked = false;
    while let Some(b) = pending.pop_front() {
        let attempt = if unchecked {
            // the COMMIT may have landed before the connection broke, and a
            // crash may have lost commits the server had acknowledged
            match writer.after_reconnect(state, b.last_key.as_ref()).await {
                Ok(AfterReconnect::Committed) => {
                    unchecked = false;
                    continue;
                }
                Ok(AfterReconnect::NotCommitted) => {
                    unchecked = false;
                    writer.write(target, Commit::Range(state), &b).await
                }
                Ok(AfterReconnect::Lost) => {
                    return Err(Error::Runtime(format!(
                        "the server lost batches of {} it had acknowledged before it went down (rekey commits asynchronously; \
                         each batch's checkpoint was lost with it); stopping so they are redone: run the same command again to resume",
                        target.table
                    )))
                }
                Err(e) => Err(e),
            }
        } else {
            writer.write(target, Commit::Range(state), &b).await
        };
        let error = match attempt {
            Ok(w) => {
                total.counts += w.counts;
                total.failures.extend(w.failures);
                total.control = w.control;
                continue;
            }
            Err(e) => e,
        };
        let how = error.retry();
        if how == Retry::Never {
            return Err(error);
        }
        retries += 1;
        // halving is bounded by log2(rows); only other retries use up tries
        let halves = how == Retry::Smaller && b.rows.len() > 1;
        if !halves {
            failed += 1;
        }
        if failed >= shared.attempts {
            return Err(Error::Runtime(format!(
                "a batch of {} rows of {} failed {failed} times, the last time with: {}; the batch was not written; run the same command again to resume",
                b.rows.len(),
                target.table,
                error.chain()
            )));
        }
        let wait = backoff(failed.max(1));
        let message = format!("{}{}", error.chain(), if halves { "; retrying in halves" } else { "" });
        metrics::BatchRetried { table: &target.table.to_string(), attempt: failed, error: &message, rows: b.rows.len(), wait_seconds: if halves { 0.0 } else { wait.as_secs_f64() } }.emit();
        match how {
            Retry::Smaller if halves => {
                shared.sizer.shrink();
                let (first, second) = split(target, b);
                pending.push_front(second);
                pending.push_front(first);
            }
            Retry::Reconnect => {
                tokio::time::sleep(wait).await;
                unchecked = true;
                if let Err(e) = writer.reconnect(&shared.job).await {
                    tracing::warn!("reconnecting failed: {}", e.chain());
                }
                pending.push_front(b);
            }
            Retry::Smaller | Retry::Wait | Retry::Never => {
                tokio::time::sleep(wait).await;
                pending.push_front(b);
            }
        }
    }
    Ok((total, retries))
}

/// Splits a batch into two contiguous halves; the first ends at its own last row.
fn split(target: &crate::job::Target, mut b: Batch) -> (Batch, Batch) {
    let mid = b.rows.len() / 2;
    let ncols = target.columns.len();
    let rows = b.rows.split_off(mid);
    let cells = b.cells.split_off(mid * ncols);
    let first_last = b.rows.last().map(|r| source::row_key(target, r));
    let second = Batch { range: b.range, rows, cells, last_key: b.last_key, end: b.end, lease: b.lease };
    let first = Batch { range: b.range, rows: b.rows, cells: b.cells, last_key: first_last, end: false, lease: b.lease };
    (first, second)
}

/// Counts a batch that is not written: what a run would do, and which keys hold the values.
fn tally(target: &crate::job::Target, batch: &Batch, verified: &mut Outcome) -> Counts {
    let ncols = target.columns.len();
    let mut c = Counts { rows_scanned: batch.rows.len() as u64, ..Counts::default() };
    for (i, cell) in batch.cells.iter().enumerate() {
        match cell {
            Cell::Null | Cell::Current => c.values_skipped += 1,
            Cell::Rewritten(_) => c.values_rewritten += 1,
            Cell::Failed(_) => c.values_failed += 1,
            Cell::Opened(label, on_target) => {
                *verified.by_key.entry(target.label(i % ncols)).or_default().entry(label.clone()).or_default() += 1;
                if *on_target {
                    verified.on_target += 1;
                } else {
                    verified.on_old += 1;
                }
            }
        }
    }
    if batch.cells.iter().any(|c| matches!(c, Cell::Rewritten(_))) {
        c.rows_rewritten = (0..batch.rows.len()).filter(|r| batch.cells[r * ncols..(r + 1) * ncols].iter().any(|c| matches!(c, Cell::Rewritten(_)))).count() as u64;
    }
    c
}
