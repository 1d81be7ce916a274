//! `rekey bench`: rekey measured against PostgreSQL's own one-statement
//! rewrite, and the window a real table would need.

use std::collections::BTreeMap;

use crate::bench::{
    self, human_duration, BenchOptions, Cause, Checkpoint, LoadOptions, LoadReport, WalReport,
};
use crate::cli::args::{BenchArgs, JobArgs};
use crate::cli::out::out;
use crate::cli::run::settings_from;
use crate::cli::{default_lanes, open, print_json};
use crate::control::stop::Stop;
use crate::engine::plan;
use crate::job::Job;
use crate::observe::metrics;
use crate::Error;

/// `rekey bench`.
pub async fn bench(args: &BenchArgs) -> Result<u8, Error> {
    if let Some(addr) = args.online.metrics_addr {
        metrics::serve(addr)?;
    }
    let mut project =
        bench::parse_sizes(&args.project).map_err(|e| Error::Config(format!("--project: {e}")))?;
    let mut project_labels: Vec<String> = project.iter().map(|n| format!("{n} rows")).collect();
    if let Some(path) = &args.job {
        let opened = open(&JobArgs {
            job: path.clone(),
            database_url: None,
            json: false,
        })
        .await?;
        let job = Job::resolve(&opened.spec, &opened.client).await?;
        // what plan says is left to rewrite: rows with a value not on the
        // target key (at least the most of any one column), not the table's size
        let mut per_table: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for c in plan::count_by_key(&opened.client, &job).await? {
            let (left, rows) = per_table.entry(c.table.clone()).or_default();
            *left = (*left).max(c.to_rewrite);
            *rows = (*rows).max(c.rows);
        }
        project = per_table.values().map(|(left, _)| *left).collect();
        project_labels = per_table
            .iter()
            .map(|(t, (left, rows))| {
                format!("{t} ({left} of {rows} rows left to rewrite, as `rekey plan` counts them)")
            })
            .collect();
    }
    let opts = BenchOptions {
        rows: args.rows,
        database_url: args.database_url.clone(),
        lanes: args.workers.map_or_else(default_lanes, usize::from),
        batch_size: args.batch_size as usize,
        repeat: usize::from(args.repeat),
        interrupt_at: match args.interrupt_at {
            Some(f) if !(0.0..1.0).contains(&f) || f == 0.0 => {
                return Err(Error::Config(
                    "--interrupt-at must be a fraction between 0 and 1, e.g. 0.5".into(),
                ))
            }
            other => other,
        },
        project,
        report_dir: args.report_dir.clone(),
        quiet: args.quiet || args.json,
        settings: settings_from(
            args.workers.map_or_else(default_lanes, usize::from),
            args.batch_size,
            args.max_rows_per_sec,
            &args.online,
            Stop::default(),
        ),
        load: args.with_load.then(|| LoadOptions {
            clients: args.load_clients,
            threads: args.load_clients.min(2),
            scale: args.load_scale,
            baseline_s: f64::from(args.load_baseline_secs),
        }),
    };
    let r = bench::run(&opts).await?;
    if args.json {
        print_json(&serde_json::to_value(&r).unwrap_or_default());
        return Ok(0);
    }
    out!(
        "rekey bench: {} rows, {} lanes x {} rows per batch{}",
        r.rows,
        r.lanes,
        r.batch_size,
        if r.rounds > 1 {
            format!(", median of {} rounds", r.rounds)
        } else {
            String::new()
        }
    );
    out!(
        "  floor  UPDATE t SET a = a, b = b  {:>8.2}s  {:>10.0} rows/s",
        r.floor_s,
        r.floor_rows_per_s
    );
    out!(
        "  rekey  re-encrypt a and b        {:>8.2}s  {:>10.0} rows/s  ({:.2}x the floor)",
        r.rekey_s,
        r.rekey_rows_per_s,
        r.ratio
    );
    out!(
        "  before the first batch {:.2} s (checking the keys, planning ranges); whole command ~ {:.2} s, {:.2}x the floor",
        r.setup_s, r.whole_s, r.whole_ratio
    );
    out!(
        "  batch latency  p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        r.batch_ms_p50,
        r.batch_ms_p99,
        r.batch_ms_max
    );
    out!("  WAL            {}", wal_line(&r.wal));
    if let Some(c) = &r.checkpoints {
        out!("  checkpoints    {}", checkpoints_line(c));
    }
    if let Some(advice) = &r.checkpoint_advice {
        out!("  note: {advice}");
    }
    out!("  peak memory    {:.0} MiB", r.peak_rss_mib);
    if let Some(ratio) = r.last_tenth_rate_ratio {
        let resumed = r
            .resumed_last_tenth_rate_ratio
            .map(|x| format!(" (the resumed run's: {x:.2}x)"))
            .unwrap_or_default();
        out!("  last 10% of rows at {ratio:.2}x the run's median rate{resumed}");
    }
    if let (Some(total), Some(ratio)) = (r.resumed_total_s, r.resume_cost_ratio) {
        out!(
            "  killed at {:.0}% and resumed: {:.2}s in all ({:.2}x an uninterrupted run)",
            args.interrupt_at.unwrap_or_default() * 100.0,
            total,
            ratio
        );
    }
    if let Some(load) = &r.load {
        print_load(load);
    }
    for ((_, secs), label) in r.projections.iter().zip(&project_labels) {
        out!("  window for {label}: {}", human_duration(*secs));
    }
    if let Some(dir) = &args.report_dir {
        out!(
            "  report: {}, plot: {}",
            dir.join("report.json").display(),
            dir.join("throughput.svg").display()
        );
    }
    Ok(0)
}

/// The WAL line of the text summary: per row and per second, then the
/// busiest 10 s (when the run lasted that long) against the cap (when set).
fn wal_line(w: &WalReport) -> String {
    let mut line = format!(
        "{:.0} B/row, {:.1} MiB/s",
        w.wal_bytes_per_row,
        mib(w.wal_bytes_per_s)
    );
    match (w.wal_busiest_10s_bytes_per_s, w.wal_cap_bytes_per_s) {
        (Some(busiest), _) => {
            line += &format!("; busiest 10 s {:.1} MiB/s", mib(busiest));
            if let Some(over) = w.wal_busiest_10s_over_cap {
                line += &format!(" ({over:.2}x the --max-wal-rate cap)");
            }
        }
        (None, Some(cap)) => {
            line += &format!(
                " (a run under 10 s is too short to hold against the --max-wal-rate cap, {:.1} MiB/s)",
                mib(cap as f64)
            );
        }
        (None, None) => {}
    }
    line
}

/// The checkpoints line of the text summary: how many ran during the
/// run, and why.
fn checkpoints_line(c: &[Checkpoint]) -> String {
    let of = |cause: Cause| c.iter().filter(|c| c.cause == cause).count();
    let running = c.iter().filter(|c| c.ended_at_s.is_none()).count();
    format!(
        "{} during the run: {} requested (WAL or a command), {} timed, {} begun before it{}; {running} with no end seen",
        c.len(),
        of(Cause::Requested),
        of(Cause::Timed),
        of(Cause::BeforeTheRun),
        match of(Cause::Unread) {
            0 => String::new(),
            n => format!(", {n} not yet counted by the server (cause unread)"),
        },
    )
}

/// The `--with-load` lines of the text summary.
fn print_load(load: &LoadReport) {
    out!(
        "  under load: pgbench, {} clients, scale {}; the application before -> during the run",
        load.clients,
        load.scale
    );
    for run in &load.runs {
        let pace = run
            .max_rows_per_sec
            .map_or("full speed".to_string(), |n| format!("max {n} rows/s"));
        let (b, d) = (&run.baseline, &run.during);
        out!(
            "    {pace:<18} rekey {:>8.0} rows/s  app {:.0} -> {:.0} tps ({:.0}%)  p50 {:.1} -> {:.1} ms  p99 {:.1} -> {:.1} ms",
            run.rekey_rows_per_s,
            b.tps,
            d.tps,
            run.tps_ratio * 100.0,
            b.latency_ms_p50,
            d.latency_ms_p50,
            b.latency_ms_p99,
            d.latency_ms_p99
        );
        out!(
            "    {:<18} WAL: rekey {:.0} B/row, {:.1} MiB/s; the cluster {:.1} MiB/s",
            "",
            run.rekey_wal_bytes_per_row,
            mib(run.rekey_wal_bytes_per_s),
            mib(run.wal_bytes_per_s)
        );
        if let Some(c) = &run.checkpoints {
            out!("    {:<18} checkpoints: {}", "", checkpoints_line(c));
        }
    }
}

/// Bytes in MiB, as `--max-wal-rate` counts them.
fn mib(bytes: f64) -> f64 {
    bytes / f64::from(1u32 << 20)
}
