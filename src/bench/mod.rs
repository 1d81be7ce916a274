//! `rekey bench`: sizes a maintenance window.
//!
//! On a throwaway cluster (or a scratch schema of a given server) it loads a
//! patient-records-shaped table, times what PostgreSQL does on its own, with no crypto
//! (`UPDATE t SET a = a, b = b` in one statement: the floor), reloads the same
//! table, times `rekey run` re-encrypting both columns, and reports the ratio,
//! batch latencies, peak memory, the WAL written (against `--max-wal-rate`),
//! the time before the first batch and projected windows. Drives the engine
//! directly (one run: `timed`); only the command line uses it.

mod chart;
mod checkpoints;
mod load;
mod oltp;
mod pgbench;
mod report;
mod timed;
mod wal;

pub use chart::throughput_svg;
pub use checkpoints::{Cause, Checkpoint};
pub use oltp::{LoadOptions, LoadReport, LoadedRun};
pub use pgbench::AppWindow;
pub use report::{human_duration, parse_sizes, peak_rss_mib};
pub use wal::{busiest, WalReport};

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio_postgres::Client;

use crate::crypto::keyring::{generate_material, Key, Keyring};
use crate::db::cluster::{ClusterOptions, TempCluster};
use crate::db::{quote_ident, Database};
use crate::engine::pipeline::Settings;
use crate::error::DbContext;
use crate::job::{Job, JobSpec};
use crate::state;
use crate::Error;

use load::load;
use report::{median, write_report};
use timed::{rekey_once, Before, RekeyRun};

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Rows in the synthetic table.
    pub rows: u64,
    /// An existing server to use (in a scratch schema) instead of a throwaway cluster.
    pub database_url: Option<String>,
    /// Lanes for the rekey run.
    pub lanes: usize,
    /// Rows per batch.
    pub batch_size: usize,
    /// Rounds to measure; figures are medians.
    pub repeat: usize,
    /// Also time a run killed at this fraction of its rows and resumed.
    pub interrupt_at: Option<f64>,
    /// Table sizes to project a window for.
    pub project: Vec<u64>,
    /// Where to write `report.json` and `throughput.svg`, if anywhere.
    pub report_dir: Option<PathBuf>,
    /// No progress output.
    pub quiet: bool,
    /// The rekey runs' settings (throttles, timeouts, signals), as `rekey run` would use them.
    pub settings: Settings,
    /// `--with-load`: also measure rekey runs under a pgbench load.
    pub load: Option<LoadOptions>,
}

/// One bench run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Rows in the table.
    pub rows: u64,
    /// Lanes and batch size used.
    pub lanes: usize,
    /// Rows per batch.
    pub batch_size: usize,
    /// Rounds of (load, floor, reload, rekey) measured.
    pub rounds: usize,
    /// Seconds to load the table (last load).
    pub load_s: f64,
    /// Median seconds of the single-statement `UPDATE t SET a = a, b = b`.
    pub floor_s: f64,
    /// Rows per second of that statement (median round).
    pub floor_rows_per_s: f64,
    /// Every round's floor seconds.
    pub floor_runs_s: Vec<f64>,
    /// Median seconds of the rekey run: the pipeline, from its first batch to its last.
    pub rekey_s: f64,
    /// Rows per second of the rekey run (median round).
    pub rekey_rows_per_s: f64,
    /// Every round's rekey seconds.
    pub rekey_runs_s: Vec<f64>,
    /// rekey rows/s over floor rows/s.
    pub ratio: f64,
    /// Median seconds before the first batch that `rekey run` spends and the
    /// pipeline's time leaves out: checking the keys open the values,
    /// opening the job with its planned ranges (the rows to rotate are
    /// counted beside the run, not before it).
    pub setup_s: f64,
    /// Every round's seconds before the first batch.
    pub setup_runs_s: Vec<f64>,
    /// Median seconds of the whole command: before the first batch, then the pipeline.
    pub whole_s: f64,
    /// The whole command's rows/s over floor rows/s.
    pub whole_ratio: f64,
    /// Values rewritten by the run.
    pub values_rewritten: u64,
    /// Batch latency percentiles, milliseconds.
    pub batch_ms_p50: f64,
    /// 90th percentile.
    pub batch_ms_p90: f64,
    /// 99th percentile.
    pub batch_ms_p99: f64,
    /// 99.9th percentile.
    pub batch_ms_p999: f64,
    /// Slowest batch.
    pub batch_ms_max: f64,
    /// With `--interrupt-at`: seconds of the killed run plus its resume (median).
    pub resumed_total_s: Option<f64>,
    /// That over the uninterrupted run's seconds.
    pub resume_cost_ratio: Option<f64>,
    /// The rate of the median run's last tenth of its rows over the run's
    /// median rate (the chart's windows): near 1 where lanes kept working
    /// to the end; `None` for a run too short to tell.
    pub last_tenth_rate_ratio: Option<f64>,
    /// With `--interrupt-at`: the same for the resumed run's last tenth.
    pub resumed_last_tenth_rate_ratio: Option<f64>,
    /// Peak resident memory of this process during the rekey run, MiB.
    pub peak_rss_mib: f64,
    /// Projected window per table size: (rows, seconds).
    pub projections: Vec<(u64, f64)>,
    /// Rows/s over the run, about 60 intervals: (seconds since start at the interval's end, rows/s).
    pub throughput: Vec<(f64, f64)>,
    /// Rows done, sampled every 50 ms and at the end: (seconds since start, rows).
    pub progress: Vec<(f64, u64)>,
    /// With `--interrupt-at`: the same for the killed and resumed run.
    pub resumed_progress: Vec<(f64, u64)>,
    /// When that run was killed (seconds since its start).
    pub killed_at_s: Option<f64>,
    /// When its resume started.
    pub resumed_at_s: Option<f64>,
    /// The WAL the server wrote during the median run, and its busiest 10 s.
    #[serde(flatten)]
    pub wal: WalReport,
    /// With `--with-load`: the cost to an application on the same cluster.
    pub load: Option<LoadReport>,
    /// The checkpoints that ran during the median run (`None`: the
    /// server's counters were not readable).
    pub checkpoints: Option<Vec<checkpoints::Checkpoint>>,
    /// The server's `max_wal_size`, bytes (`None`: not readable).
    pub max_wal_size_bytes: Option<u64>,
    /// Where checkpoints were requested during the run: the `max_wal_size`
    /// that would let the run's WAL pass without one.
    pub checkpoint_advice: Option<String>,
}

/// Runs the benchmark.
pub async fn run(opts: &BenchOptions) -> Result<BenchReport, Error> {
    let (_cluster, url, schema) = match &opts.database_url {
        Some(url) => (
            None,
            url.clone(),
            format!("rekey_bench_{}", std::process::id()),
        ),
        None => {
            let cluster = tokio::task::spawn_blocking(|| {
                TempCluster::start(ClusterOptions { durable: true })
            })
            .await
            .map_err(|e| Error::Runtime(e.to_string()))?
            .map_err(|e| Error::Runtime(e.to_string()))?;
            let url = cluster.url("postgres");
            (Some(cluster), url, "bench".to_string())
        }
    };
    let db = Database::parse(&url).map_err(|e| Error::Config(e.to_string()))?;
    let mut client = db.connect().await?;
    // the engine's own schema, where the bench is the one to make it
    let engine_schema_before = state::schema_exists(&client).await?;
    let result = measure(opts, &db, &mut client, &schema, &url).await;
    // The scratch schema goes whatever happened; the throwaway cluster goes on drop.
    let _ = client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quote_ident(&schema)
        ))
        .await;
    let _ = client
        .execute(
            "DELETE FROM rekey.jobs WHERE name = $1",
            &[&bench_job_name(&schema)],
        )
        .await;
    if !engine_schema_before {
        // gone with the bench, unless a rekey command began to use it
        // meanwhile: what it writes is waited for (the locks) and then seen
        let _ = client
            .batch_execute(
                "DO $$ BEGIN
                     LOCK TABLE rekey.jobs, rekey.rotations, rekey.audit, rekey.audit_intents, rekey.key_table_keys
                         IN ACCESS EXCLUSIVE MODE;
                     IF NOT EXISTS (SELECT 1 FROM rekey.jobs) AND NOT EXISTS (SELECT 1 FROM rekey.rotations)
                        AND NOT EXISTS (SELECT 1 FROM rekey.audit) AND NOT EXISTS (SELECT 1 FROM rekey.audit_intents)
                        AND NOT EXISTS (SELECT 1 FROM rekey.key_table_keys) THEN
                         DROP SCHEMA rekey CASCADE;
                     END IF;
                 END $$",
            )
            .await;
    }
    result
}

fn bench_job_name(schema: &str) -> String {
    format!("rekey-bench-{schema}")
}

fn say(opts: &BenchOptions, msg: &str) {
    if !opts.quiet {
        // never panics on a closed stderr, as `eprintln!` would
        let _ = writeln!(std::io::stderr(), "rekey bench: {msg}");
    }
}

async fn measure(
    opts: &BenchOptions,
    db: &Database,
    client: &mut Client,
    schema: &str,
    conninfo: &str,
) -> Result<BenchReport, Error> {
    let v1 = Key::new(1, *generate_material());
    let v2 = Key::new(2, *generate_material());
    let old = Keyring::new(vec![v1.clone()], 1, None).map_err(|e| Error::Runtime(e.to_string()))?;
    let ring = Keyring::new(vec![v1, v2], 2, None).map_err(|e| Error::Runtime(e.to_string()))?;
    let table = format!("{}.patients", quote_ident(schema));
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(schema)
        ))
        .await
        .ctx(|| "creating the bench schema".into())?;
    let spec = JobSpec::parse(&format!(
        "name = {name:?}\n[keys]\nsource = \"env\"\n[[target]]\ntable = \"patients\"\nschema = {schema:?}\ncolumns = [\"a\", \"b\"]\nformat = \"versioned-gcm\"\n",
        name = bench_job_name(schema)
    ))?;
    state::ensure_schema(client).await?;

    let mut floors = Vec::new();
    let mut runs = Vec::new();
    let mut load_s = 0.0;
    let mut resumed = Vec::new();
    let mut interrupted_runs: Vec<RekeyRun> = Vec::new();
    for round in 1..=opts.repeat.max(1) {
        let of = if opts.repeat > 1 {
            format!(" (round {round} of {})", opts.repeat)
        } else {
            String::new()
        };
        say(opts, &format!("loading {} rows{of}", opts.rows));
        load_s = load(client, &table, opts.rows, &old).await?;
        say(
            opts,
            &format!("loaded in {load_s:.1}s; timing the floor: UPDATE t SET a = a, b = b"),
        );
        let t = Instant::now();
        client
            .batch_execute(&format!("UPDATE {table} SET a = a, b = b"))
            .await
            .ctx(|| "running the floor statement".into())?;
        floors.push(t.elapsed().as_secs_f64());
        say(
            opts,
            &format!(
                "floor {:.0} rows/s; reloading the table for rekey",
                opts.rows as f64 / floors[floors.len() - 1]
            ),
        );
        client
            .batch_execute(&format!("DROP TABLE {table}"))
            .await
            .ctx(|| "dropping the bench table".into())?;
        load(client, &table, opts.rows, &old).await?;

        let job = Arc::new(Job::resolve_with(&spec, client, Some(&ring)).await?);
        say(opts, "running rekey");
        runs.push(rekey_once(opts, db, client, job.clone(), Before::AsRun, None).await?);
        client
            .batch_execute(&format!("DROP TABLE {table}"))
            .await
            .ctx(|| "dropping the bench table".into())?;
        if let Some(fraction) = opts.interrupt_at {
            load(client, &table, opts.rows, &old).await?;
            // the table made again: the job resolved against this one
            let job = Arc::new(Job::resolve_with(&spec, client, Some(&ring)).await?);
            say(
                opts,
                &format!(
                    "running rekey, killing it at {:.0}% and resuming",
                    fraction * 100.0
                ),
            );
            let run = rekey_once(opts, db, client, job, Before::AsRun, Some(fraction)).await?;
            resumed.push(run.secs);
            interrupted_runs.push(run);
            client
                .batch_execute(&format!("DROP TABLE {table}"))
                .await
                .ctx(|| "dropping the bench table".into())?;
        }
    }

    let under_load = match &opts.load {
        Some(l) => {
            let scene = oltp::Scene {
                db,
                conninfo,
                schema,
                table: &table,
                spec: &spec,
                old: &old,
                ring: &ring,
            };
            Some(oltp::measure(opts, l, client, &scene).await?)
        }
        None => None,
    };
    let checkpoint_settings = match checkpoints::Settings::read(client).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::debug!("no checkpoint advice: {}", e.chain());
            None
        }
    };
    let floor_s = median(floors.clone());
    let rekey_s = median(runs.iter().map(|r| r.secs).collect());
    let setup_s = median(runs.iter().map(|r| r.setup_secs).collect());
    let whole_s = median(runs.iter().map(|r| r.setup_secs + r.secs).collect());
    // figures of the run closest to the median, so latencies and the plot match the headline
    let run = runs
        .iter()
        .min_by(|a, b| {
            (a.secs - rekey_s)
                .abs()
                .total_cmp(&(b.secs - rekey_s).abs())
        })
        .ok_or_else(|| Error::Runtime("no bench round ran".into()))?;
    let h = &run.outcome.batch_micros;
    // the interrupted run closest to the median, for the chart
    let resumed_median = (!resumed.is_empty()).then(|| median(resumed.clone()));
    let interrupted = resumed_median.and_then(|m| {
        interrupted_runs
            .iter()
            .min_by(|a, b| (a.secs - m).abs().total_cmp(&(b.secs - m).abs()))
    });
    let floor_rows_per_s = opts.rows as f64 / floor_s;
    let rows_scanned = run.outcome.counts.rows_scanned;
    let rekey_rows_per_s = rows_scanned as f64 / rekey_s;
    let wal = WalReport::new(
        run.wal.clone(),
        rows_scanned,
        run.secs,
        opts.settings.signals.max_wal_rate,
    );
    let checkpoint_advice = run
        .checkpoints
        .as_deref()
        .zip(checkpoint_settings.as_ref())
        .and_then(|(c, settings)| {
            checkpoints::advice(c, wal.wal_bytes, wal.wal_bytes_per_row, settings)
        });
    let report = BenchReport {
        rows: opts.rows,
        lanes: opts.lanes,
        batch_size: opts.batch_size,
        rounds: floors.len(),
        load_s,
        floor_s,
        floor_rows_per_s,
        floor_runs_s: floors,
        rekey_s,
        rekey_rows_per_s,
        rekey_runs_s: runs.iter().map(|r| r.secs).collect(),
        ratio: rekey_rows_per_s / floor_rows_per_s,
        setup_s,
        setup_runs_s: runs.iter().map(|r| r.setup_secs).collect(),
        whole_s,
        whole_ratio: rows_scanned as f64 / whole_s / floor_rows_per_s,
        values_rewritten: run.outcome.counts.values_rewritten,
        batch_ms_p50: h.value_at_quantile(0.5) as f64 / 1000.0,
        batch_ms_p90: h.value_at_quantile(0.9) as f64 / 1000.0,
        batch_ms_p99: h.value_at_quantile(0.99) as f64 / 1000.0,
        batch_ms_p999: h.value_at_quantile(0.999) as f64 / 1000.0,
        batch_ms_max: h.max() as f64 / 1000.0,
        resumed_total_s: (!resumed.is_empty()).then(|| median(resumed.clone())),
        resume_cost_ratio: (!resumed.is_empty()).then(|| median(resumed.clone()) / rekey_s),
        last_tenth_rate_ratio: chart::last_tenth_ratio(&run.progress),
        resumed_last_tenth_rate_ratio: interrupted
            .as_ref()
            .and_then(|r| chart::last_tenth_ratio(&r.progress)),
        peak_rss_mib: runs.iter().map(|r| r.peak_rss_mib).fold(0.0, f64::max),
        projections: opts
            .project
            .iter()
            .map(|&n| (n, n as f64 / rekey_rows_per_s))
            .collect(),
        throughput: chart::rates(&run.progress),
        progress: run.progress.clone(),
        resumed_progress: interrupted
            .as_ref()
            .map(|r| r.progress.clone())
            .unwrap_or_default(),
        killed_at_s: interrupted.as_ref().and_then(|r| r.killed_at_s),
        resumed_at_s: interrupted.as_ref().and_then(|r| r.resumed_at_s),
        wal,
        load: under_load,
        checkpoints: run.checkpoints.clone(),
        max_wal_size_bytes: checkpoint_settings.map(|s| s.max_wal_size),
        checkpoint_advice,
    };
    if let Some(dir) = &opts.report_dir {
        write_report(dir, &report)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_sizes_with_suffixes() {
        assert_eq!(
            super::parse_sizes("10M, 250k,1B,42").unwrap(),
            vec![10_000_000, 250_000, 1_000_000_000, 42]
        );
        assert!(super::parse_sizes("ten").is_err());
    }

    #[test]
    fn human_durations_read_naturally() {
        assert_eq!(super::human_duration(42.4), "42s");
        assert_eq!(super::human_duration(432.0), "7m 12s");
        assert_eq!(super::human_duration(11_100.0), "3h 05m");
    }
}
