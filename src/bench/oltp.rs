//! `rekey bench --with-load`: what a rotation costs an application on the same
//! cluster. A pgbench load (TPC-B-like, see `pgbench`) runs for a baseline
//! window, then through a rekey run of a freshly loaded bench table, at full
//! speed and, with `--max-rows-per-sec`, once more at that pace. Each run
//! reports the application's TPS and latency before and during, rekey's rows/s
//! under the load, and the WAL written (`pg_current_wal_lsn()` before and
//! after, `pg_wal_lsn_diff`): the cluster's whole rate, which is what
//! archiving and replicas must keep up with, and rekey's own share (the
//! cluster's WAL less the application's, at its baseline WAL per transaction).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio_postgres::Client;

use crate::crypto::keyring::Keyring;
use crate::db::Database;
use crate::error::DbContext;
use crate::job::{Job, JobSpec};
use crate::Error;

use super::checkpoints::Checkpoint;
use super::pgbench::{self, AppWindow, Running};
use super::timed::{rekey_once, Before};
use super::wal::wal_position;
use super::{load::load, say, BenchOptions};

/// The load `--with-load` runs.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// pgbench clients (`-c`).
    pub clients: u32,
    /// pgbench threads (`-j`), at most the clients.
    pub threads: u32,
    /// pgbench scale (`-s`): 100,000 accounts each.
    pub scale: u32,
    /// Seconds of load measured before the rekey run starts.
    pub baseline_s: f64,
}

/// The cost to the application, per rekey run under load.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// pgbench clients.
    pub clients: u32,
    /// pgbench threads.
    pub threads: u32,
    /// pgbench scale.
    pub scale: u32,
    /// Seconds of the baseline window.
    pub baseline_s: f64,
    /// The run at full speed first, then the throttled one when asked for.
    pub runs: Vec<LoadedRun>,
}

/// One rekey run under the load.
#[derive(Debug, Clone, Serialize)]
pub struct LoadedRun {
    /// `--max-rows-per-sec` of this run; none: full speed.
    pub max_rows_per_sec: Option<u32>,
    /// Seconds of the rekey run.
    pub rekey_s: f64,
    /// Its rows/s under the load.
    pub rekey_rows_per_s: f64,
    /// The application before the run (the baseline window).
    pub baseline: AppWindow,
    /// The application during the run.
    pub during: AppWindow,
    /// TPS during over TPS before.
    pub tps_ratio: f64,
    /// WAL the whole cluster wrote per second during the run (application and rekey).
    pub wal_bytes_per_s: f64,
    /// WAL per application transaction in the baseline window.
    pub app_wal_bytes_per_txn: f64,
    /// WAL rekey wrote: the cluster's less the application's transactions at their baseline cost.
    pub rekey_wal_bytes: f64,
    /// That per row rewritten.
    pub rekey_wal_bytes_per_row: f64,
    /// That per second of the run.
    pub rekey_wal_bytes_per_s: f64,
    /// Application TPS each second: (seconds since the baseline window opened, tps).
    pub app_tps: Vec<(f64, f64)>,
    /// When the rekey run started and ended, on the same clock.
    pub rekey_from_s: f64,
    /// See `rekey_from_s`.
    pub rekey_to_s: f64,
    /// The checkpoints that ran during the rekey run, in seconds since it
    /// started (`None`: the server's counters were not readable): an
    /// application's latency spike may be one, not the rotation's rows.
    pub checkpoints: Option<Vec<Checkpoint>>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Where the bench's pieces live, as `bench::measure` has them.
pub(super) struct Scene<'a> {
    /// The bench's connection target.
    pub db: &'a Database,
    /// Its libpq string, for pgbench.
    pub conninfo: &'a str,
    /// The scratch schema.
    pub schema: &'a str,
    /// The bench table, qualified.
    pub table: &'a str,
    /// The bench job.
    pub spec: &'a JobSpec,
    /// Keys the table is loaded under.
    pub old: &'a Keyring,
    /// Keys the run rotates to.
    pub ring: &'a Keyring,
}

/// Runs the load and a rekey run under it, at full speed and at the
/// options' `--max-rows-per-sec` when one is set.
pub(super) async fn measure(
    opts: &BenchOptions,
    load_opts: &LoadOptions,
    client: &mut Client,
    scene: &Scene<'_>,
) -> Result<LoadReport, Error> {
    let runtime = |e: pgbench::PgbenchError| match e {
        e @ pgbench::PgbenchError::NotFound => Error::Config(e.to_string()),
        e => Error::Runtime(e.to_string()),
    };
    let exe = pgbench::find().map_err(runtime)?;
    say(
        opts,
        &format!("initializing pgbench (scale {})", load_opts.scale),
    );
    let (init_exe, conninfo, schema, scale) = (
        exe.clone(),
        scene.conninfo.to_string(),
        scene.schema.to_string(),
        load_opts.scale,
    );
    tokio::task::spawn_blocking(move || pgbench::init(&init_exe, &conninfo, &schema, scale))
        .await
        .map_err(|e| Error::Runtime(e.to_string()))?
        .map_err(runtime)?;
    let paces = std::iter::once(None)
        .chain(opts.settings.max_rows_per_sec.map(Some))
        .collect::<Vec<_>>();
    let mut runs = Vec::new();
    for pace in paces {
        let mut paced = opts.clone();
        paced.settings.max_rows_per_sec = pace;
        load(client, scene.table, opts.rows, scene.old).await?;
        let job = Arc::new(Job::resolve_with(scene.spec, client, Some(scene.ring)).await?);
        let what = pace.map_or("full speed".to_string(), |n| format!("{n} rows/s"));
        say(
            opts,
            &format!(
                "pgbench: {} clients, {:.0}s baseline, then rekey at {what}",
                load_opts.clients, load_opts.baseline_s
            ),
        );
        let mut running = Running::start(
            &exe,
            scene.conninfo,
            scene.schema,
            load_opts.clients,
            load_opts.threads,
        )
        .map_err(runtime)?;
        // connections up and the first transactions through before the window opens
        tokio::time::sleep(Duration::from_secs(1)).await;
        running.check().map_err(runtime)?;
        let (t0, wal0) = (now(), wal_position(client).await? as f64);
        tokio::time::sleep(Duration::from_secs_f64(load_opts.baseline_s)).await;
        running.check().map_err(runtime)?;
        let (t1, wal1) = (now(), wal_position(client).await? as f64);
        let run = rekey_once(&paced, scene.db, client, job, Before::OpenOnly, None).await?;
        let (t2, wal2) = (now(), wal_position(client).await? as f64);
        // the newest log lines reach the files a little after they happen
        tokio::time::sleep(Duration::from_secs(1)).await;
        let logs = running.stop().map_err(runtime)?;
        client
            .batch_execute(&format!("DROP TABLE {}", scene.table))
            .await
            .ctx(|| "dropping the bench table".into())?;

        let baseline = logs.window(t0, t1);
        let during = logs.window(t1, t2);
        let rows = run.outcome.counts.rows_scanned as f64;
        let app_wal_bytes_per_txn = if baseline.transactions > 0 {
            (wal1 - wal0) / baseline.transactions as f64
        } else {
            0.0
        };
        // the application's transactions over the whole run, at the rate the logs show
        let app_txns = during.tps * (t2 - t1);
        let rekey_wal_bytes = (wal2 - wal1 - app_txns * app_wal_bytes_per_txn).max(0.0);
        runs.push(LoadedRun {
            max_rows_per_sec: pace,
            rekey_s: run.secs,
            rekey_rows_per_s: rows / run.secs.max(1e-9),
            tps_ratio: if baseline.tps > 0.0 {
                during.tps / baseline.tps
            } else {
                0.0
            },
            baseline,
            during,
            wal_bytes_per_s: (wal2 - wal1) / (t2 - t1).max(1e-9),
            app_wal_bytes_per_txn,
            rekey_wal_bytes,
            rekey_wal_bytes_per_row: rekey_wal_bytes / rows.max(1.0),
            rekey_wal_bytes_per_s: rekey_wal_bytes / run.secs.max(1e-9),
            app_tps: logs.per_second(t0),
            rekey_from_s: t1 - t0,
            rekey_to_s: t2 - t0,
            checkpoints: run.checkpoints,
        });
    }
    Ok(LoadReport {
        clients: load_opts.clients,
        threads: load_opts.threads.clamp(1, load_opts.clients),
        scale: load_opts.scale,
        baseline_s: load_opts.baseline_s,
        runs,
    })
}
