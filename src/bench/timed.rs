//! One timed rekey run over the freshly loaded bench table: what `rekey run`
//! does before its first batch (checking the keys open the values, opening
//! the job with its planned ranges; under `--with-load`, only the opening,
//! as ever), timed on its own, then the pipeline with the rows to rotate
//! counted beside it as `rekey run` counts them, timed with its rows and the
//! server's WAL sampled every 50 ms. The pipeline's time is the bench's
//! headline, as it always was; the time before it is what a user's whole
//! command adds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::db::Database;
use crate::engine::left::counted_beside;
use crate::engine::pipeline::{self, Mode, Settings};
use crate::engine::{plan, verify};
use crate::job::Job;
use crate::observe::counts::{Counts, LiveCounts};
use crate::observe::progress::{Progress, Total};
use crate::state::{self, JobRecord};
use crate::Error;

use super::checkpoints::{Checkpoint, Watch};
use super::report::{peak_rss_mib, reset_peak_rss};
use super::wal::wal_position;
use super::BenchOptions;

/// How often the rows done and the WAL position are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// What a timed run does before its first batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Before {
    /// What `rekey run` does: check the keys open a sample of values, open
    /// the job with its planned ranges, then count the rows to rotate beside
    /// the pipeline, for its progress total.
    AsRun,
    /// Only open the job with its ranges: `--with-load` keeps the figures it
    /// has always taken, whose window (the application's "during") starts
    /// before this.
    OpenOnly,
}

/// One timed rekey run over the freshly loaded table.
pub(super) struct RekeyRun {
    /// Wall seconds of the pipeline.
    pub secs: f64,
    /// Wall seconds before the pipeline's first batch: what `before` asked for.
    pub setup_secs: f64,
    /// What the pipeline did.
    pub outcome: pipeline::Outcome,
    /// Rows done every 50 ms, and at the end: (seconds, rows).
    pub progress: Vec<(f64, u64)>,
    /// WAL the server wrote since the start, from (0, 0), every 50 ms and at
    /// the end: (seconds, bytes).
    pub wal: Vec<(f64, u64)>,
    /// With a kill: when it was killed, and when the resume started.
    pub killed_at_s: Option<f64>,
    /// See `killed_at_s`.
    pub resumed_at_s: Option<f64>,
    /// Peak RSS during the run, MiB.
    pub peak_rss_mib: f64,
    /// The checkpoints that ran during the run; `None` where the server's
    /// counters could not be read.
    pub checkpoints: Option<Vec<Checkpoint>>,
}

/// Times one run; with `kill_at`, the run is dropped mid-flight (as a killed
/// process would be: uncommitted batches roll back) once that fraction of the
/// rows is done, then resumed from its checkpoints, and the time is the sum.
pub(super) async fn rekey_once(
    opts: &BenchOptions,
    db: &Database,
    client: &mut Client,
    job: Arc<Job>,
    before: Before,
    kill_at: Option<f64>,
) -> Result<RekeyRun, Error> {
    // what `rekey run` does before its first batch, in its order
    let setup = Instant::now();
    if before == Before::AsRun {
        // the bench's own values, all under keys it made: nothing to read besides
        let _reads = verify::preflight(
            client,
            &job,
            verify::TargetKey::Given,
            verify::Forcing::NoFlag("rekey bench"),
            opts.settings.timeouts.lock,
        )
        .await?;
    }
    let mut record = state::open_job(client, &job, true, async |c: &Client| {
        plan::job_ranges(c, &job, opts.lanes).await
    })
    .await?;
    // `rekey run` counts the rows to rotate beside its run, not before it;
    // until then a pass shows the rows the passes before it left
    let setup_secs = setup.elapsed().as_secs_f64();

    let wal_client = db.connect().await?;
    let wal_base = wal_position(&wal_client).await?;
    // the checkpoints are reported where the server lets them be read
    let watch = Watch::start(&wal_client, wal_base).await;
    // each pass counts its own rows, as each `rekey run` process does; the
    // samples add the killed pass's rows to the resumed pass's
    let killed = Arc::new(LiveCounts::default());
    let last_pass = Arc::new(LiveCounts::default());
    let rows_so_far = || killed.snapshot().rows_scanned + last_pass.snapshot().rows_scanned;
    reset_peak_rss();
    let started = Instant::now();
    let done = AtomicBool::new(false);
    let sampler = async {
        let mut rows = Vec::new();
        let mut wal = vec![(0.0, 0)];
        let mut wal_error = None;
        let mut watch = watch;
        while !done.load(Ordering::Relaxed) {
            tokio::time::sleep(SAMPLE_EVERY).await;
            let t = started.elapsed().as_secs_f64();
            rows.push((t, rows_so_far()));
            if wal_error.is_none() {
                match wal_position(&wal_client).await {
                    Ok(at) => wal.push((t, at.saturating_sub(wal_base))),
                    Err(e) => wal_error = Some(e),
                }
            }
            watch = match watch {
                Ok(w) => w.sample(&wal_client, t, &wal).await,
                unread => unread,
            };
        }
        (rows, wal, wal_error, watch)
    };
    let marks = std::sync::Mutex::new((None, None));
    let settings = Settings {
        lanes: opts.lanes,
        batch_size: opts.batch_size,
        stop: Default::default(),
        ..opts.settings.clone()
    };
    let job_ref = &job;
    // one pass of the pipeline over the job's ranges, as `rekey run` makes it
    let pass = |record: &JobRecord, settings: Settings, live: &Arc<LiveCounts>, quiet: bool| {
        let left = opts.rows.saturating_sub(killed.snapshot().rows_scanned);
        let progress = Progress::estimated(Some(left), "bench", quiet);
        let total = progress.total();
        let pipeline = pipeline::run(
            db,
            job_ref.clone(),
            record.ranges.clone(),
            Mode::Rewrite { job_id: record.id },
            settings,
            live.clone(),
            progress,
        );
        async move { as_run(before, db, job_ref, &total, pipeline).await }
    };
    let passes = async {
        if let Some(fraction) = kill_at {
            let threshold = (opts.rows as f64 * fraction) as u64;
            let first = pass(&record, settings.clone(), &killed, true);
            let reached = async {
                while killed.snapshot().rows_scanned < threshold {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            };
            tokio::select! {
                r = first => { r?; }
                _ = reached => {}
            }
            let killed_at = started.elapsed().as_secs_f64();
            // a batch that committed just before the drop never added its
            // rows to the pass's counters, and the resumed pass finds them
            // rotated: its checkpoint counts them
            let committed = state::job_totals(client, record.id).await?.rows_scanned;
            let counted = killed.snapshot().rows_scanned;
            if committed > counted {
                killed.add(&Counts {
                    rows_scanned: committed - counted,
                    ..Counts::default()
                });
            }
            record = state::open_job(client, &job, false, async |c: &Client| {
                plan::job_ranges(c, &job, opts.lanes).await
            })
            .await?;
            if let Ok(mut m) = marks.lock() {
                *m = (Some(killed_at), Some(started.elapsed().as_secs_f64()));
            }
        }
        let r = pass(&record, settings, &last_pass, opts.quiet).await;
        // timed here, not after the sampler's next tick
        let secs = started.elapsed().as_secs_f64();
        r.map(|o| (o, secs, rows_so_far()))
    };
    // the sampler stops however the passes end: a pass or the resume that
    // failed left it sampling, and the bench waiting, for ever
    let run = async {
        let r = passes.await;
        done.store(true, Ordering::Relaxed);
        r
    };
    let (outcome, (mut progress, mut wal, wal_error, watch)) = tokio::join!(run, sampler);
    let (outcome, secs, rows) = outcome?;
    if let Some(e) = wal_error {
        return Err(e);
    }
    // the exact end, not the sampler's next tick after it; nothing else
    // writes between the run's end and this read
    let wal_end = wal_position(&wal_client).await?.saturating_sub(wal_base);
    progress.retain(|&(t, _)| t < secs);
    progress.push((secs, rows));
    wal.retain(|&(t, _)| t < secs);
    wal.push((secs, wal_end));
    // a checkpoint that ended since the last sample, at the exact end
    let watch = match watch {
        Ok(w) => w.sample(&wal_client, secs, &wal).await,
        unread => unread,
    };
    let checkpoints = match watch {
        Ok(w) => Some(w.finish(secs)),
        Err(e) => {
            tracing::debug!("the server's checkpoints are not reported: {}", e.chain());
            None
        }
    };
    let (killed_at_s, resumed_at_s) = marks.lock().map(|m| *m).unwrap_or((None, None));
    let peak_rss_mib = peak_rss_mib();
    state::finish_job(client, record.id, &serde_json::json!({ "bench": true })).await?;
    Ok(RekeyRun {
        secs,
        setup_secs,
        outcome,
        progress,
        wal,
        killed_at_s,
        resumed_at_s,
        peak_rss_mib,
        checkpoints,
    })
}

/// Runs a pipeline as `rekey run` does (`Before::AsRun`: with the rows to
/// rotate counted beside it, so its figures carry the count's cost too), or
/// on its own.
async fn as_run(
    before: Before,
    db: &Database,
    job: &Job,
    total: &Total,
    pipeline: impl std::future::Future<Output = Result<pipeline::Outcome, Error>>,
) -> Result<pipeline::Outcome, Error> {
    match before {
        Before::AsRun => counted_beside(db, job, total, pipeline).await?,
        Before::OpenOnly => pipeline.await,
    }
}
