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
//! work queue ──> source ──(1)──> transform (rayon) ──(1)──> sink ──> COMMIT
//!    (ranges)    keyset pages     decrypt/encrypt/verify     COPY + CAS UPDATE + checkpoint
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::checkpoint::RangeState;
use crate::db::Database;
use crate::job::Job;
use crate::progress::Progress;
use crate::sink::{self, Batch, Commit, Failure, Writer};
use crate::source::{self, Source};
use crate::stats::{Counts, LiveCounts};
use crate::transform::{self, Cell};
use crate::Error;

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
pub struct Stop(Arc<AtomicBool>);

impl Stop {
    /// Asks every pipeline holding this handle to stop.
    pub fn trigger(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether a stop was asked for.
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// How the pipeline runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Lanes (reader + writer connection pairs) working at once.
    pub lanes: usize,
    /// Rows per batch.
    pub batch_size: usize,
    /// Stops the run cleanly when triggered (signals, `--run-time`, `rekey bench --interrupt-at`).
    pub stop: Stop,
    /// Rows per second the sources may read, all lanes together (`--max-rows-per-sec`).
    pub max_rows_per_sec: Option<u32>,
}

/// Spaces pages out so all lanes together read at most `rate` rows per second.
#[derive(Debug)]
struct Throttle {
    /// Rows per second.
    rate: f64,
    /// When the next page may be read.
    next: Mutex<std::time::Instant>,
}

impl Throttle {
    /// Waits for the slot of a page of `rows` rows. Holds no transaction: the
    /// source reads autocommit, between pages.
    async fn wait(&self, rows: usize) {
        let slot = {
            let Ok(mut next) = self.next.lock() else { return };
            let now = std::time::Instant::now();
            let slot = (*next).max(now);
            *next = slot + std::time::Duration::from_secs_f64(rows as f64 / self.rate);
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
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

/// State every task of a run shares.
struct Shared {
    /// The job.
    job: Arc<Job>,
    /// Every range of the run (finished ones are not queued).
    ranges: Vec<RangeState>,
    /// Ranges not yet taken by a lane.
    queue: Mutex<VecDeque<usize>>,
    /// Set on the first error or on request: sources stop reading, sinks finish what is in flight.
    stop: Stop,
    /// Set when a stop left ranges unfinished.
    cut_short: AtomicBool,
    /// Live totals for the progress line.
    live: Arc<LiveCounts>,
    /// The progress line.
    progress: Progress,
    /// Pages hold this many rows.
    batch_size: usize,
    /// The rows/s limit, if any.
    throttle: Option<Throttle>,
}

impl Shared {
    fn next_range(&self) -> Option<usize> {
        let mut queue = self.queue.lock().ok()?;
        if self.stop.requested() {
            if !queue.is_empty() {
                self.cut_short.store(true, Ordering::Relaxed);
            }
            return None;
        }
        queue.pop_front()
    }
}

/// Runs the pipeline over `ranges` until every unfinished one is done or a
/// stage fails; on failure, batches already in flight still commit.
pub async fn run(db: &Database, job: Arc<Job>, ranges: Vec<RangeState>, mode: Mode, settings: Settings, live: Arc<LiveCounts>, progress: Progress) -> Result<Outcome, Error> {
    let queue: VecDeque<usize> = ranges.iter().enumerate().filter(|(_, r)| !r.done).map(|(i, _)| i).collect();
    let lanes = settings.lanes.clamp(1, queue.len().max(1));
    let shared = Arc::new(Shared {
        job,
        ranges,
        queue: Mutex::new(queue),
        stop: settings.stop.clone(),
        cut_short: AtomicBool::new(false),
        live,
        progress,
        batch_size: settings.batch_size.max(1),
        throttle: settings.max_rows_per_sec.map(|r| Throttle { rate: f64::from(r.max(1)), next: Mutex::new(std::time::Instant::now()) }),
    });

    let mut tasks: JoinSet<Result<Option<Outcome>, Error>> = JoinSet::new();
    for _ in 0..lanes {
        let (to_transform, from_source) = mpsc::channel::<Batch>(CHANNEL_DEPTH);
        let (to_sink, from_transform) = mpsc::channel::<Batch>(CHANNEL_DEPTH);
        let reader = Source::new(db.connect().await?, mode != Mode::Verify);
        let lookup = match mode {
            Mode::Rewrite { .. } => None,
            Mode::DryRun | Mode::Verify => Some(db.connect().await?),
        };
        let writer = match mode {
            Mode::Rewrite { job_id } => Some(Writer::connect(db, &shared.job, job_id).await?),
            Mode::DryRun | Mode::Verify => None,
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
    if let Some(e) = first_error {
        shared.progress.finish();
        return Err(e);
    }
    if shared.cut_short.load(Ordering::Relaxed) {
        outcome.stopped = true;
    } else if let Mode::Rewrite { job_id } = mode {
        let (retried, left) = retry_conflicts(db, &shared, job_id).await?;
        outcome.merge(retried);
        outcome.conflicts_left = left;
    }
    shared.progress.finish();
    Ok(outcome)
}

/// Source stage: reads each range it takes, page by page, in key order.
async fn read(shared: Arc<Shared>, mut source: Source, out: mpsc::Sender<Batch>) -> Result<Option<Outcome>, Error> {
    while let Some(ri) = shared.next_range() {
        let state = &shared.ranges[ri];
        let target = &shared.job.targets[state.target];
        let mut after = state.start().cloned();
        loop {
            if shared.stop.requested() {
                shared.cut_short.store(true, Ordering::Relaxed);
                return Ok(None);
            }
            if let Some(throttle) = &shared.throttle {
                throttle.wait(shared.batch_size).await;
                if shared.stop.requested() {
                    shared.cut_short.store(true, Ordering::Relaxed);
                    return Ok(None);
                }
            }
            let rows = source.page(target, after.as_ref(), state.range.upper.as_ref(), shared.batch_size).await?;
            let end = rows.len() < shared.batch_size;
            let last_key = rows.last().map(|r| source::row_key(target, r));
            if let Some(k) = &last_key {
                after = Some(k.clone());
            }
            let batch = Batch { range: ri, rows, cells: Vec::new(), last_key, end };
            if out.send(batch).await.is_err() {
                return Ok(None);
            }
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
        let target_index = shared.ranges[batch.range].target;
        let batch = on_pool(shared.job.clone(), target_index, mode, batch).await?;
        if out.send(batch).await.is_err() {
            break;
        }
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
    let mut reader = None;
    let mut writer = None;
    for round in 0..RETRY_ROUNDS {
        let mut any = false;
        for target in &shared.job.targets {
            loop {
                let keys = crate::checkpoint::pending_conflicts(&admin, job_id, target.index, RETRY_BATCH).await?;
                if keys.is_empty() {
                    break;
                }
                any = true;
                if reader.is_none() {
                    reader = Some(Source::new(db.connect().await?, false));
                    writer = Some(Writer::connect(db, &shared.job, job_id).await?);
                }
                let (Some(source), Some(sink)) = (reader.as_mut(), writer.as_mut()) else { break };
                let rows = source.rows_by_keys(target, &keys).await?;
                let batch = Batch { range: 0, rows, cells: Vec::new(), last_key: None, end: false };
                let batch = on_pool(shared.job.clone(), target.index, Mode::Rewrite { job_id }, batch).await?;
                let (counts, failures) = sink.write(target, Commit::Retry(&keys), &batch).await?;
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
        let started = std::time::Instant::now();
        let state = &shared.ranges[batch.range];
        let target = &shared.job.targets[state.target];
        let (counts, failures) = match (&mut writer, &lookup) {
            (Some(w), _) => w.write(target, Commit::Range(state), &batch).await?,
            (None, Some(client)) => (tally(target, &batch, &mut outcome), sink::describe_failures(client, target, &batch).await?),
            (None, None) => return Err(Error::Runtime("a sink has neither a writer nor a lookup connection".into())),
        };
        for f in &failures {
            eprintln!("rekey: cannot decrypt {}.{} at key {}: {}", f.table, f.column, f.key, f.error);
        }
        let _ = outcome.batch_micros.record(started.elapsed().as_micros().max(1) as u64);
        outcome.merge(Outcome { counts, failures, by_target: BTreeMap::from([(target.index, counts)]), ..Outcome::default() });
        shared.live.add(&counts);
        shared.progress.update(&shared.live.snapshot());
    }
    Ok(Some(outcome))
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
