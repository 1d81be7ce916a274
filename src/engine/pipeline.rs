//! The pipeline: source -> transform -> sink, joined by bounded channels.
//!
//! This is the one file that spawns ([`super::work`] holds what its tasks
//! share, [`super::stages`] the stages, [`super::watch`] the monitor task). The job's ranges go into a shared work
//! queue; each of `lanes` lanes is a reader task, a transform task (which
//! hands each batch to the rayon pool) and a sink task, with channels of one
//! batch between them, and a lane holds at most [`LANE_PAGES`] pages at once,
//! so memory is bounded by lanes x 2 batches whatever the table's size (one
//! deep is as fast as two here, and loses less work to a kill). A lane works one range at a time, in key order, so its
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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crate::control::monitor::{check_gate_sql, check_wal_signals, Monitor, Signals};
use crate::control::stop::{Stop, StopBy};
use crate::crypto::keyring::KeyId;
use crate::db::session::Timeouts;
use crate::db::Database;
use crate::engine::sink::{Batch, Failure, Writer};
use crate::engine::source::Source;
use crate::job::Job;
use crate::observe::counts::{Counts, LiveCounts};
use crate::observe::progress::Progress;
use crate::state::{self, RangeState};
use crate::Error;

use super::conflicts::retry_conflicts;
use super::others::OthersDone;
use super::stages::{read, transform_stage, write};
use super::watch::{apply, read_signals, watch};
use super::work::{Shared, Work};

/// Batches in flight between two stages of a lane.
const CHANNEL_DEPTH: usize = 1;

/// Pages a lane holds at once, from the read of one until its batch is
/// written: one being written, and the next, being read, sealed or ready for
/// the sink. The stages and their channels alone would hold five (one in
/// each stage, one in each channel); the sink sets a lane's pace, and the
/// next page is read and sealed in less time than a batch takes to write,
/// so the three more only waited, taking memory (three pages ran no faster).
const LANE_PAGES: usize = 2;

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
            max_batch_bytes: 16 << 20,
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
    /// Verify: values per key id that opened them, all columns and formats.
    pub by_key_id: BTreeMap<KeyId, u64>,
    /// Verify: values that opened under the target key (in the target format).
    pub on_target: u64,
    /// Verify: values that opened under an old key (or in the old format).
    pub on_old: u64,
    /// Totals per target index.
    pub by_target: BTreeMap<usize, Counts>,
    /// Rows still changing under the run after every conflict re-read.
    pub conflicts_left: u64,
    /// Rows on an old key written behind the run, by table, counted once
    /// every range was done ([`super::behind`]).
    pub behind: Vec<super::behind::Behind>,
    /// Whether the run stopped on request before finishing every range.
    pub stopped: bool,
    /// Whether the caller's own session was lost during the run and
    /// reopened ([`super::rewrite::rewrite`]): the session-level locks it
    /// held are gone, but the job's share, taken again.
    pub session_reopened: bool,
    /// Who asked it to stop, when it did.
    pub stopped_by: Option<StopBy>,
    /// Batches retried after a timeout or a lost connection.
    pub retries: u64,
    /// Ranges taken over from a process that stopped renewing its leases.
    pub taken_over: u64,
    /// Smallest and largest batch committed, in rows.
    pub batch_rows: (usize, usize),
    /// How often, and how long, the throttles held the sources, by reason.
    pub held: BTreeMap<&'static str, Held>,
    /// Dry run: values it would write longer than their column allows
    /// ([`crate::job::Column::max_chars`]), by `table.column`: how many,
    /// and the longest.
    pub too_long: BTreeMap<String, (u64, usize)>,
    /// Keys their stores lost during the run and rekey put back
    /// ([`super::held`]).
    pub keys_put_back: Vec<super::held::PutBack>,
}

/// How often and how long one throttle held a run.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Held {
    /// Holds begun for this reason.
    pub times: u64,
    /// Seconds held, all holds together.
    pub seconds: f64,
}

impl Default for Outcome {
    fn default() -> Self {
        Outcome {
            counts: Counts::default(),
            batch_micros: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("constant histogram bounds are valid"),
            failures: Vec::new(),
            by_key: BTreeMap::new(),
            by_key_id: BTreeMap::new(),
            on_target: 0,
            on_old: 0,
            by_target: BTreeMap::new(),
            conflicts_left: 0,
            behind: Vec::new(),
            stopped: false,
            session_reopened: false,
            stopped_by: None,
            retries: 0,
            taken_over: 0,
            batch_rows: (usize::MAX, 0),
            held: BTreeMap::new(),
            too_long: BTreeMap::new(),
            keys_put_back: Vec::new(),
        }
    }
}

impl Outcome {
    pub(super) fn merge(&mut self, other: Outcome) {
        self.counts += other.counts;
        let _ = self.batch_micros.add(&other.batch_micros);
        let room = MAX_REPORTED_FAILURES.saturating_sub(self.failures.len());
        self.failures.extend(other.failures.into_iter().take(room));
        self.on_target += other.on_target;
        self.on_old += other.on_old;
        self.retries += other.retries;
        self.taken_over += other.taken_over;
        self.batch_rows = (
            self.batch_rows.0.min(other.batch_rows.0),
            self.batch_rows.1.max(other.batch_rows.1),
        );
        for (t, c) in other.by_target {
            *self.by_target.entry(t).or_default() += c;
        }
        for (col, (n, longest)) in other.too_long {
            let mine = self.too_long.entry(col).or_default();
            *mine = (mine.0 + n, mine.1.max(longest));
        }
        for (k, n) in other.by_key_id {
            *self.by_key_id.entry(k).or_default() += n;
        }
        for (col, keys) in other.by_key {
            let mine = self.by_key.entry(col).or_default();
            for (k, n) in keys {
                *mine.entry(k).or_default() += n;
            }
        }
    }
}

/// Runs the pipeline over `ranges` until every unfinished one is done or a
/// stage fails; on failure, batches already in flight still commit.
pub async fn run(
    db: &Database,
    job: Arc<Job>,
    ranges: Vec<RangeState>,
    mode: Mode,
    settings: Settings,
    live: Arc<LiveCounts>,
    progress: Progress,
) -> Result<Outcome, Error> {
    let mut monitor_conn = monitor_connection(db).await?;
    let job_id = match mode {
        Mode::Rewrite { job_id } => Some(job_id),
        Mode::DryRun | Mode::Verify => None,
    };
    let work = match job_id {
        Some(job_id) => {
            let pid = backend_pid(&monitor_conn).await?;
            Work::Leased {
                job_id,
                owner: owner_name(),
                monitor_pid: AtomicI32::new(pid),
                ttl: settings.lease_ttl.max(Duration::from_secs(1)),
            }
        }
        None => Work::Local(Mutex::new(
            ranges
                .iter()
                .enumerate()
                .filter(|(_, r)| !r.done)
                .map(|(i, _)| i)
                .collect(),
        )),
    };
    let unfinished = ranges.iter().filter(|r| !r.done).count();
    // a rewrite's lanes split ranges for each other, so fewer ranges than
    // lanes still keep every lane busy; in memory, a lane takes whole ranges
    let lanes = match job_id {
        Some(_) if unfinished > 0 => settings.lanes.max(1),
        _ => settings.lanes.clamp(1, unfinished.max(1)),
    };
    let shared = Arc::new(Shared::new(job, ranges, work, &settings, live, progress));
    if let Some(sql) = &settings.signals.gate_sql {
        check_gate_sql(&mut monitor_conn, sql).await?;
    }
    check_wal_signals(&monitor_conn, &settings.signals).await?;

    // the signals, and the job's rows so far, are read once before any source reads a page
    let others = match job_id {
        Some(id) => OthersDone::start(&monitor_conn, id).await,
        None => OthersDone::default(),
    };
    let mut monitor = Monitor::new(settings.signals.clone());
    apply(
        &shared,
        read_signals(
            &mut monitor,
            &mut monitor_conn,
            job_id,
            shared.live.snapshot().rows_scanned,
        )
        .await,
    );
    // in a JoinSet so that it ends with this future even when the future is dropped
    let mut watcher = JoinSet::new();
    watcher.spawn(watch(
        shared.clone(),
        db.clone(),
        monitor_conn,
        monitor,
        others,
        settings.signals.check_every,
        job_id,
    ));

    let mut tasks: JoinSet<Result<Option<Outcome>, Error>> = JoinSet::new();
    for lane in 0..lanes {
        let (reader, writer, lookup) = match lane_connections(db, &shared, mode, &settings).await {
            Ok(c) => c,
            // the server has no connection slot left: run with the lanes it gave
            Err(e) if lane > 0 && e.is_too_many_connections() => {
                tracing::warn!(
                    "the server took only {lane} of {lanes} lanes ({}); going on with {lane}",
                    e.chain()
                );
                break;
            }
            Err(e) => return Err(e),
        };
        let (to_transform, from_source) = mpsc::channel::<Batch>(CHANNEL_DEPTH);
        let (to_sink, from_transform) = mpsc::channel::<Batch>(CHANNEL_DEPTH);
        let slots = Arc::new(Semaphore::new(LANE_PAGES));
        tasks.spawn(read(shared.clone(), reader, slots, to_transform));
        tasks.spawn(transform_stage(shared.clone(), mode, from_source, to_sink));
        tasks.spawn(write(shared.clone(), writer, lookup, from_transform));
    }

    let mut outcome = Outcome::default();
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let result = joined.unwrap_or_else(|e| {
            Err(Error::Runtime(format!(
                "a pipeline task stopped unexpectedly: {e}"
            )))
        });
        match result {
            Ok(Some(lane)) => outcome.merge(lane),
            Ok(None) => {}
            Err(e) => {
                shared.stop.trigger();
                first_error.get_or_insert(e);
            }
        }
    }
    // the watcher reads the signals through the conflict pass too: a hold
    // that began as the last batches committed is lifted, a stop is heard
    let finished = finish(db, &shared, job_id, outcome, first_error).await;
    watcher.abort_all();
    finished
}

/// One lane's connections: a reader, and a writer (a rewrite) or a lookup
/// connection for failed values' keys (dry run, verify).
async fn lane_connections(
    db: &Database,
    shared: &Shared,
    mode: Mode,
    settings: &Settings,
) -> Result<(Source, Option<Writer>, Option<tokio_postgres::Client>), Error> {
    let reader = Source::connect(db, mode != Mode::Verify, settings.timeouts).await?;
    let lookup = match mode {
        Mode::Rewrite { .. } => None,
        Mode::DryRun | Mode::Verify => Some(db.connect().await?),
    };
    let writer = match (mode, &shared.work) {
        (Mode::Rewrite { job_id }, Work::Leased { owner, .. }) => Some(
            Writer::connect_as(
                db,
                &shared.job,
                job_id,
                Some(owner.clone()),
                settings.timeouts,
            )
            .await?,
        ),
        _ => None,
    };
    Ok((reader, writer, lookup))
}

/// After the lanes: gives leases back, then (a rewrite that was not cut
/// short) re-reads the rows that conflicted.
async fn finish(
    db: &Database,
    shared: &Shared,
    job_id: Option<i64>,
    mut outcome: Outcome,
    first_error: Option<Error>,
) -> Result<Outcome, Error> {
    if let Work::Leased { job_id, owner, .. } = &shared.work {
        // give unfinished ranges back now rather than when their leases run out
        if let Ok(client) = db.connect().await {
            let _ = state::release_ranges(&client, *job_id, owner).await;
        }
    }
    outcome.taken_over = shared.taken_over.load(Ordering::Relaxed);
    outcome.held = shared.held();
    if let Some(e) = first_error {
        shared.sum_up_quarantine();
        shared.progress.finish();
        return Err(e);
    }
    if shared.cut_short.load(Ordering::Relaxed) {
        outcome.stopped = true;
        outcome.stopped_by = shared.stop.by();
    } else if let Some(job_id) = job_id {
        let (retried, left) = retry_conflicts(db, shared, job_id).await?;
        outcome.merge(retried);
        outcome.conflicts_left = left;
        if shared.stop.requested() {
            // stopped during the re-reads: the job stays open, the next run re-reads what is left
            outcome.stopped = true;
            outcome.stopped_by = shared.stop.by();
        }
    }
    shared.sum_up_quarantine();
    shared.progress.finish();
    Ok(outcome)
}

/// The monitor's connection: its lease renewals wait on a range row for as
/// long as a batch holds it, not `--lock-timeout`.
pub(super) async fn monitor_connection(db: &Database) -> Result<tokio_postgres::Client, Error> {
    let conn = db.connect().await?;
    conn.batch_execute("SET lock_timeout = 0")
        .await
        .map_err(|e| Error::Db {
            context: "opening the run's monitor connection".into(),
            source: e,
            statement: crate::error::Statement::Other,
        })?;
    Ok(conn)
}

/// The server process behind a connection: while it lives, the leases naming it are held.
pub(super) async fn backend_pid(client: &tokio_postgres::Client) -> Result<i32, Error> {
    Ok(client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(|e| Error::Db {
            context: "opening the run's monitor connection".into(),
            source: e,
            statement: crate::error::Statement::Other,
        })?
        .get(0))
}

/// This process's name in leases: host, pid and a random tag.
fn owner_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    let tag = crate::crypto::keyring::generate_material();
    format!("{host}:{}:{}", std::process::id(), hex::encode(&tag[..3]))
}
