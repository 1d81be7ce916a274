//! One function per subcommand: resolve the job, drive the engine, print the
//! result (text, or one JSON object with `--json`), and choose the exit code:
//! 0 done; 1 runtime failure; 2 bad usage or configuration; 3 done but values
//! were quarantined; 4 verify found values not on the target key.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use tokio_postgres::Client;

use crate::audit::What;
use crate::checkpoint::{self, RangeState};
use crate::cli::{BenchArgs, Command, JobArgs, KeygenArgs, LifecycleArgs, RotateArgs, RunArgs, SecretsCommand, StatusArgs, VerifyArgs};
use crate::db::Database;
use crate::error::DbContext;
use crate::job::{Job, JobSpec};
use crate::pipeline::{self, Mode, Settings, Stop};
use crate::progress::Progress;
use crate::stats::{Counts, LiveCounts};
use crate::{keyring, plan, sql, Error};

/// Exit code: done, but some values were quarantined.
pub const EXIT_QUARANTINED: u8 = 3;
/// Exit code: verify found values not on the target key (or undecryptable).
pub const EXIT_NOT_VERIFIED: u8 = 4;

/// Exit code: stopped on request (SIGINT/SIGTERM) before finishing; resumable.
pub const EXIT_STOPPED: u8 = 130;
/// Exit code: stopped at the end of its `--run-time` window; resumable.
pub const EXIT_WINDOW_ENDED: u8 = 5;

/// Drives `work` to completion; the first SIGINT or SIGTERM asks it to stop
/// cleanly (in-flight batches commit), a second one exits at once, which is
/// still safe: every committed batch is checkpointed.
async fn until_signalled<T>(work: impl std::future::Future<Output = T>, stop: &Stop, deadline: Option<Instant>) -> T {
    tokio::pin!(work);
    if let Some(deadline) = deadline {
        tokio::select! {
            done = &mut work => return done,
            _ = tokio::time::sleep_until(deadline.into()) => {
                tracing::info!("the run's window is over; stopping after the batches in flight commit");
                stop.trigger_by("run-time");
            }
        }
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut signals = 0;
    loop {
        let terminated = async {
            match term.as_mut() {
                Some(t) => t.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            done = &mut work => return done,
            _ = tokio::signal::ctrl_c() => {}
            _ = terminated => {}
        }
        signals += 1;
        if signals == 1 {
            tracing::info!("stopping after the batches in flight commit (signal again to stop at once; both are safe to resume)");
            stop.trigger_by("signal");
        } else {
            tracing::warn!("stopping now; run the same command again to resume");
            std::process::exit(i32::from(EXIT_STOPPED));
        }
    }
}

/// Runs one subcommand and returns its exit code.
pub async fn dispatch(command: Command) -> Result<u8, Error> {
    match command {
        Command::Run(a) => run(&a).await,
        Command::Verify(a) => verify(&a).await,
        Command::Status(a) => status(&a).await,
        Command::Pause(a) => control(&a, "pause").await,
        Command::Resume(a) => control(&a, "run").await,
        Command::Stop(a) => control(&a, "stop").await,
        Command::Plan(a) => plan_cmd(&a).await,
        Command::Keygen(a) => keygen(&a),
        Command::Bench(a) => bench(&a).await,
        Command::Secrets(a) => secrets(a.command).await,
        Command::Rotate(a) => rotate(&a).await,
    }
}

/// The job file, the database it names, and a first connection.
struct Opened {
    spec: JobSpec,
    db: Database,
    client: Client,
}

async fn open(args: &JobArgs) -> Result<Opened, Error> {
    let spec = JobSpec::load(&args.job)?;
    let url = args
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()))
        .or_else(|| spec.database.url.clone())
        .ok_or_else(|| Error::Config("no database given: pass --database-url, set DATABASE_URL, or add [database] url to the job file".into()))?;
    let db = Database::parse(&url).map_err(|e| Error::Config(e.to_string()))?;
    let client = db.connect().await?;
    Ok(Opened { spec, db, client })
}

/// Lanes when `--workers` is not given: the CPU count, at least 2.
pub fn default_lanes() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).max(2)
}

/// Rows of `t` holding at least one value not visibly on the target key.
async fn stale_rows_of(client: &Client, t: &crate::job::Target) -> Result<u64, Error> {
    let (filter, cols) = sql::stale_filter(t, "", 1);
    let prefixes: Vec<Vec<u8>> = cols.iter().filter_map(|&c| t.stale_prefix(c)).collect();
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = prefixes.iter().map(|p| p as _).collect();
    let n: i64 = client
        .query_one(&format!("SELECT count(*) FROM {} WHERE {filter}{}", t.qualified(), sql::target_filter(t)), &params)
        .await
        .ctx(|| format!("counting rows to rotate in {}", t.table))?
        .get(0);
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Rows holding at least one value not visibly on the target key, all targets.
async fn stale_rows(client: &Client, job: &Job) -> Result<u64, Error> {
    let mut total = 0u64;
    for t in &job.targets {
        total += stale_rows_of(client, t).await?;
    }
    Ok(total)
}

/// Key ranges for a run that keeps no state (dry run, verify).
pub async fn ephemeral_ranges(client: &Client, job: &Job, lanes: usize) -> Result<Vec<RangeState>, Error> {
    let mut ranges = Vec::new();
    for t in &job.targets {
        for (no, range) in plan::split_ranges(client, t, lanes * 4).await?.into_iter().enumerate() {
            ranges.push(RangeState { target: t.index, range_no: no as i32, range, last: None, done: false });
        }
    }
    Ok(ranges)
}

fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

/// How a rewrite starts and ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunControl {
    /// Abandon an unfinished job of this name and start a new one.
    pub restart: bool,
    /// No progress line.
    pub quiet: bool,
    /// Stop cleanly at this instant (`--run-time`).
    pub deadline: Option<Instant>,
}

/// Rewrites every stale value of `job` under its job lock, resuming an
/// unfinished job of the same name; stops cleanly on SIGINT/SIGTERM.
pub async fn rewrite(
    db: &Database,
    client: &mut Client,
    job: &Arc<Job>,
    settings: Settings,
    control: RunControl,
    live: Arc<LiveCounts>,
) -> Result<(pipeline::Outcome, checkpoint::JobRecord), Error> {
    let RunControl { restart, quiet, deadline } = control;
    checkpoint::ensure_schema(client).await?;
    checkpoint::lock_job(client, &job.name, restart).await?;
    check_nonce_budget(client, job).await?;
    let mut record = checkpoint::open_job(client, job, settings.lanes, restart).await?;
    if restart {
        checkpoint::share_job_lock(client, &job.name).await?;
    }
    let progress = Progress::new(stale_rows(client, job).await?, "rewriting", quiet);
    let stop = settings.stop.clone();
    let ranges = std::mem::take(&mut record.ranges);
    let outcome = until_signalled(pipeline::run(db, job.clone(), ranges, Mode::Rewrite { job_id: record.id }, settings, live, progress), &stop, deadline).await?;
    if client.is_closed() {
        // this session sat idle through the run (an idle_session_timeout, a restart): the work is committed, carry on
        *client = db.connect().await?;
    }
    // what every process sharing the job has done, not only this one
    record.prior = checkpoint::job_totals(client, record.id).await?;
    Ok((outcome, record))
}

/// Refuses a run that would take a key past 2^32 random-nonce encryptions
/// (invariant 7), before any write; the sink enforces it per batch too.
async fn check_nonce_budget(client: &Client, job: &Job) -> Result<(), Error> {
    for t in job.targets.iter().filter(|t| t.write.format.random_nonces()) {
        let used = checkpoint::encryptions_so_far(client, &t.write.keyring.target().fingerprint()).await?;
        let rows = i64::try_from(stale_rows_of(client, t).await?).unwrap_or(i64::MAX);
        let most = used.saturating_add(rows.saturating_mul(t.columns.len() as i64));
        if most > checkpoint::NONCE_BUDGET {
            return Err(crate::sink::nonce_budget_spent(t, used, "this run (nothing written)"));
        }
    }
    Ok(())
}

/// Refuses online settings that cannot work together.
fn check_online(o: &crate::cli::OnlineArgs) -> Result<(), Error> {
    if o.check_every * 3 > o.lease_ttl {
        return Err(Error::Config(format!(
            "--check-every {} must be at most a third of --lease-ttl {}: leases are renewed on that beat",
            humantime::format_duration(o.check_every),
            humantime::format_duration(o.lease_ttl)
        )));
    }
    Ok(())
}

/// The run's settings from the command line.
fn settings_from(lanes: usize, batch_size: u32, max_rows_per_sec: Option<u32>, o: &crate::cli::OnlineArgs, stop: Stop) -> Settings {
    Settings {
        lanes,
        batch_size: batch_size as usize,
        batch_time: o.batch_time,
        max_batch_bytes: usize::try_from(o.max_batch_bytes).unwrap_or(usize::MAX),
        stop,
        max_rows_per_sec,
        timeouts: crate::sink::Timeouts {
            lock: Some(o.lock_timeout),
            statement: Some(o.statement_timeout),
            idle_in_transaction: Some((o.lease_ttl / 2).max(std::time::Duration::from_secs(1))),
        },
        attempts: o.attempts,
        signals: crate::monitor::Signals {
            max_replica_lag: o.max_replica_lag,
            gate_sql: o.gate_sql.clone(),
            control_file: o.control_file.clone(),
            check_every: o.check_every,
        },
        lease_ttl: o.lease_ttl,
    }
}

/// `rekey run`.
pub async fn run(args: &RunArgs) -> Result<u8, Error> {
    if let Some(addr) = args.online.metrics_addr {
        crate::metrics::serve(addr)?;
    }
    let Opened { spec, db, mut client } = open(&args.common).await?;
    let job = Arc::new(Job::resolve(&spec, &client).await?);
    let lanes = args.workers.map_or_else(default_lanes, usize::from);
    let stop = Stop::default();
    check_online(&args.online)?;
    if args.until.is_some_and(|at| at <= std::time::SystemTime::now()) {
        return Err(Error::Config("--until names an instant already past; give a time still to come".into()));
    }
    let settings = settings_from(lanes, args.batch_size, args.max_rows_per_sec, &args.online, stop.clone());
    let deadline = args.run_time.map(|d| Instant::now() + d).or_else(|| {
        args.until.map(|at| Instant::now() + at.duration_since(std::time::SystemTime::now()).unwrap_or_default())
    });
    let started = Instant::now();
    let live = Arc::new(LiveCounts::default());

    if !args.dry_run && !args.force {
        crate::verify::preflight(&client, &job).await?;
    }
    let (outcome, prior, job_id, resumed) = if args.dry_run {
        let ranges = ephemeral_ranges(&client, &job, lanes).await?;
        let progress = Progress::new(stale_rows(&client, &job).await?, "dry run", args.quiet || args.common.json);
        let outcome = until_signalled(pipeline::run(&db, job.clone(), ranges, Mode::DryRun, settings, live, progress), &stop, deadline).await?;
        (outcome, Counts::default(), None, false)
    } else {
        let control = RunControl { restart: args.restart, quiet: args.quiet || args.common.json, deadline };
        let (outcome, record) = rewrite(&db, &mut client, &job, settings, control, live).await?;
        (outcome, record.prior, Some(record.id), record.resumed)
    };

    let elapsed = started.elapsed().as_secs_f64();
    let c = outcome.counts;
    let window_ended = outcome.stopped && outcome.stopped_by == Some("run-time");
    let (remaining_rows, projected_s) = if outcome.stopped {
        let left = stale_rows(&client, &job).await?;
        (Some(left), Some((left as f64 / (c.rows_scanned as f64 / elapsed.max(1e-9)).max(1e-9)).round()))
    } else {
        (None, None)
    };
    let job_totals = if job_id.is_some() {
        prior
    } else {
        let mut t = prior;
        t += c;
        t
    };
    let summary = json!({
        "job": job.name,
        "job_id": job_id,
        "dry_run": args.dry_run,
        "resumed": resumed,
        "rows_scanned": c.rows_scanned,
        "rows_rewritten": c.rows_rewritten,
        "values_rewritten": c.values_rewritten,
        "values_skipped": c.values_skipped,
        "values_failed": c.values_failed,
        "conflicts": c.conflicts,
        "conflicts_left": outcome.conflicts_left,
        "stopped": outcome.stopped,
        "stopped_by": if outcome.stopped { Some(outcome.stopped_by.unwrap_or("signal")) } else { None },
        "retries": outcome.retries,
        "ranges_taken_over": outcome.taken_over,
        "batch_rows_min": (outcome.batch_rows.1 > 0).then_some(outcome.batch_rows.0),
        "batch_rows_max": (outcome.batch_rows.1 > 0).then_some(outcome.batch_rows.1),
        "remaining_rows": remaining_rows,
        "projected_s": projected_s,
        "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
        "rows_per_s": (c.rows_scanned as f64 / elapsed.max(1e-9)).round(),
        "batch_ms_p50": outcome.batch_micros.value_at_quantile(0.5) as f64 / 1000.0,
        "batch_ms_p99": outcome.batch_micros.value_at_quantile(0.99) as f64 / 1000.0,
        "peak_rss_mib": (crate::bench::peak_rss_mib() * 10.0).round() / 10.0,
        "job_totals": job_totals,
        "targets": job.targets.iter().map(|t| {
            let mut v = serde_json::to_value(outcome.by_target.get(&t.index).copied().unwrap_or_default()).unwrap_or_default();
            v["table"] = json!(t.table.to_string());
            v["columns"] = json!(t.columns.iter().map(|c| c.name.clone()).collect::<Vec<_>>());
            v["format"] = json!(t.read.format.name());
            v["to_format"] = json!(t.write.format.name());
            v
        }).collect::<Vec<_>>(),
        "failures": outcome.failures,
    });
    if let (Some(id), false) = (job_id, outcome.stopped) {
        checkpoint::finish_job(&client, id, &summary).await?;
    }
    if args.common.json {
        print_json(&summary);
    } else {
        let verb = if args.dry_run { "would rewrite" } else { "rewrote" };
        println!(
            "{}: {verb} {} values in {} rows ({} rows scanned, {} skipped, {} failed, {} conflicts) in {:.1}s, {:.0} rows/s",
            job.name,
            c.values_rewritten,
            c.rows_rewritten,
            c.rows_scanned,
            c.values_skipped,
            c.values_failed,
            c.conflicts,
            elapsed,
            c.rows_scanned as f64 / elapsed.max(1e-9)
        );
        if outcome.stopped {
            println!("stopped on request after the batches in flight committed; run the same command again to resume");
        }
        if outcome.conflicts_left > 0 {
            println!("{} rows kept changing under the run and were left as the application wrote them; run again to rotate them", outcome.conflicts_left);
        }
        if resumed {
            println!("resumed job {}: {} values rewritten in all", job_id.unwrap_or_default(), job_totals.values_rewritten);
        }
        if job_totals.values_failed > 0 && !args.dry_run {
            println!(
                "{} values could not be decrypted and were left untouched; see: SELECT * FROM rekey.quarantine WHERE job_id = {}",
                job_totals.values_failed,
                job_id.unwrap_or_default()
            );
        }
    }
    let failed = if args.dry_run { c.values_failed } else { job_totals.values_failed };
    let state = if window_ended {
        "window_ended"
    } else if outcome.stopped {
        "stopped"
    } else {
        "done"
    };
    crate::metrics::RunFinished { job: &job.name, state, seconds: elapsed }.emit();
    Ok(if window_ended {
        EXIT_WINDOW_ENDED
    } else if outcome.stopped {
        EXIT_STOPPED
    } else if failed > 0 {
        EXIT_QUARANTINED
    } else {
        0
    })
}

/// `rekey verify`.
pub async fn verify(args: &VerifyArgs) -> Result<u8, Error> {
    let Opened { spec, db, client } = open(&args.common).await?;
    let job = Arc::new(Job::resolve(&spec, &client).await?);
    let v = crate::verify::verify(&db, &client, &job, crate::verify::Depth { full: args.full, sample: args.sample, lanes: default_lanes() }, args.quiet || args.common.json).await?;
    if args.common.json {
        print_json(&serde_json::to_value(&v).unwrap_or_default());
    } else {
        println!(
            "{}: {} values: {} on the target key, {} on old keys, {} undecryptable ({})",
            job.name,
            v.values_total,
            v.values_on_target_key,
            v.values_on_old_keys,
            v.values_undecryptable,
            if v.mode == "full" { "every value decrypted".to_string() } else { format!("key versions counted for every value, {} sampled values decrypted", v.values_sampled) }
        );
        for (col, keys) in &v.by_column {
            let list = keys.iter().map(|(k, n)| format!("{k}={n}")).collect::<Vec<_>>().join(" ");
            println!("  {col}: {list}");
        }
        for f in v.failures.iter().take(20) {
            println!("  cannot decrypt {}.{} at key {}: {}", f.table, f.column, f.key, f.error);
        }
        println!("{}", if v.verified { "verified: nothing left on an old key" } else { "NOT verified: run `rekey run` again, and inspect rekey.quarantine" });
    }
    Ok(if v.verified { 0 } else { EXIT_NOT_VERIFIED })
}

/// `rekey pause`, `rekey resume`, `rekey stop`: sets the running job's control,
/// which every process running it reads after each batch.
pub async fn control(args: &StatusArgs, to: &str) -> Result<u8, Error> {
    let Opened { spec, client, .. } = open(&args.common).await?;
    let name = spec.name.clone().unwrap_or_else(|| "rekey".into());
    if !checkpoint::schema_exists(&client).await? || !checkpoint::set_control(&client, &name, to).await? {
        return Err(Error::Config(format!("no job named {name:?} is running on this database; `rekey status --job ...` shows its state")));
    }
    let said = match to {
        "pause" => "pausing: every process running it stops reading after its current batch; `rekey resume` goes on",
        "stop" => "stopping: every process running it stops after its current batch, checkpointed; `rekey run` resumes it",
        _ => "resuming",
    };
    if args.common.json {
        print_json(&json!({ "job": name, "control": to }));
    } else {
        println!("{name}: {said}");
    }
    Ok(0)
}

/// `rekey status`.
pub async fn status(args: &StatusArgs) -> Result<u8, Error> {
    let Opened { spec, client, .. } = open(&args.common).await?;
    let name = spec.name.clone().unwrap_or_else(|| "rekey".into());
    let found = if checkpoint::schema_exists(&client).await? { checkpoint::job_status(&client, &name).await? } else { None };
    let Some(s) = found else {
        if args.common.json {
            print_json(&json!({ "job": name, "state": "never run" }));
        } else {
            println!("{name}: never run on this database");
        }
        return Ok(0);
    };
    if args.common.json {
        print_json(&serde_json::to_value(&s).unwrap_or_default());
    } else {
        println!(
            "{} (job {}): {}, {}/{} ranges done, {} rows scanned, {} values rewritten, {} failed (quarantined: {}), {} conflicts; started {}, last checkpoint {}{}",
            s.name,
            s.job_id,
            s.state,
            s.ranges_done,
            s.ranges_total,
            s.counts.rows_scanned,
            s.counts.values_rewritten,
            s.counts.values_failed,
            s.quarantined,
            s.counts.conflicts,
            s.started_at,
            s.updated_at,
            s.finished_at.as_ref().map(|f| format!(", finished {f}")).unwrap_or_default()
        );
        if s.state == "running" {
            let control = match s.control.as_str() {
                "pause" => " (paused by `rekey pause`)",
                "stop" => " (stop requested)",
                _ => "",
            };
            println!("  being run by {} process(es){control}: {}", s.workers.len(), s.workers.join(", "));
        }
    }
    Ok(0)
}

/// `rekey plan`.
pub async fn plan_cmd(args: &StatusArgs) -> Result<u8, Error> {
    let Opened { spec, client, .. } = open(&args.common).await?;
    let job = Job::resolve(&spec, &client).await?;
    let columns = plan::count_by_key(&client, &job).await?;
    let to_rewrite: u64 = columns.iter().map(|c| c.to_rewrite).sum();
    if args.common.json {
        let target_keys: Vec<String> = job.targets.iter().map(|t| t.target_label()).collect();
        print_json(&json!({ "job": job.name, "target_keys": target_keys, "values_to_rewrite": to_rewrite, "columns": columns }));
    } else {
        println!("{}: {} values to rewrite", job.name, to_rewrite);
        for t in &job.targets {
            println!("  {}: target key {}", t.table, t.target_label());
        }
        for c in &columns {
            let keys = c
                .by_key
                .as_ref()
                .map(|m| m.iter().map(|(k, n)| format!("{k}={n}")).collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|| "key not visible without decrypting".into());
            println!("  {}.{}: {} rows, {} NULL, {}; {} to rewrite", c.table, c.column, c.rows, c.nulls, keys, c.to_rewrite);
        }
    }
    Ok(0)
}

/// `rekey keygen`.
pub fn keygen(args: &KeygenArgs) -> Result<u8, Error> {
    let material = keyring::generate_material();
    println!("{}", keyring::encode_key(&material, args.format).as_str());
    Ok(0)
}

/// `rekey bench`.
pub async fn bench(args: &BenchArgs) -> Result<u8, Error> {
    if let Some(addr) = args.online.metrics_addr {
        crate::metrics::serve(addr)?;
    }
    let mut project = crate::bench::parse_sizes(&args.project).map_err(|e| Error::Config(format!("--project: {e}")))?;
    let mut project_labels: Vec<String> = project.iter().map(|n| format!("{n} rows")).collect();
    if let Some(path) = &args.job {
        let opened = open(&JobArgs { job: path.clone(), database_url: None, json: false }).await?;
        let job = Job::resolve(&opened.spec, &opened.client).await?;
        let mut per_table: BTreeMap<String, u64> = BTreeMap::new();
        for c in plan::count_by_key(&opened.client, &job).await? {
            let rows = per_table.entry(c.table.clone()).or_default();
            *rows = (*rows).max(c.rows);
        }
        project = per_table.values().copied().collect();
        project_labels = per_table.iter().map(|(t, n)| format!("{t} ({n} rows)")).collect();
    }
    let opts = crate::bench::BenchOptions {
        rows: args.rows,
        database_url: args.database_url.clone(),
        lanes: args.workers.map_or_else(default_lanes, usize::from),
        batch_size: args.batch_size as usize,
        repeat: usize::from(args.repeat),
        interrupt_at: match args.interrupt_at {
            Some(f) if !(0.0..1.0).contains(&f) || f == 0.0 => return Err(Error::Config("--interrupt-at must be a fraction between 0 and 1, e.g. 0.5".into())),
            other => other,
        },
        project,
        report_dir: args.report_dir.clone(),
        quiet: args.quiet || args.json,
        settings: settings_from(args.workers.map_or_else(default_lanes, usize::from), args.batch_size, args.max_rows_per_sec, &args.online, Stop::default()),
    };
    let r = crate::bench::run(&opts).await?;
    if args.json {
        print_json(&serde_json::to_value(&r).unwrap_or_default());
        return Ok(0);
    }
    use crate::bench::human_duration as d;
    println!(
        "rekey bench: {} rows, {} lanes x {} rows per batch{}",
        r.rows,
        r.lanes,
        r.batch_size,
        if r.rounds > 1 { format!(", median of {} rounds", r.rounds) } else { String::new() }
    );
    println!("  floor  UPDATE t SET a = a, b = b  {:>8.2}s  {:>10.0} rows/s", r.floor_s, r.floor_rows_per_s);
    println!("  rekey  re-encrypt a and b        {:>8.2}s  {:>10.0} rows/s  ({:.2}x the floor)", r.rekey_s, r.rekey_rows_per_s, r.ratio);
    println!("  batch latency  p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms", r.batch_ms_p50, r.batch_ms_p99, r.batch_ms_max);
    println!("  peak memory    {:.0} MiB", r.peak_rss_mib);
    if let (Some(total), Some(ratio)) = (r.resumed_total_s, r.resume_cost_ratio) {
        println!("  killed at {:.0}% and resumed: {:.2}s in all ({:.2}x an uninterrupted run)", args.interrupt_at.unwrap_or_default() * 100.0, total, ratio);
    }
    for ((_, secs), label) in r.projections.iter().zip(&project_labels) {
        println!("  window for {label}: {}", d(*secs));
    }
    if let Some(dir) = &args.report_dir {
        println!("  report: {}, plot: {}", dir.join("report.json").display(), dir.join("throughput.svg").display());
    }
    Ok(0)
}

/// The audit settings of a lifecycle command.
fn audit_for(args: &LifecycleArgs, spec: &JobSpec) -> crate::audit::Audit {
    let name = spec.name.clone().unwrap_or_else(|| "rekey".into());
    let path = args.audit_log.clone().unwrap_or_else(|| args.common.job.with_file_name(format!("{name}.audit.jsonl")));
    crate::audit::Audit { path, operator: args.operator.clone().unwrap_or_else(crate::audit::os_user), reason: args.reason.name().into() }
}

fn rotate_options(life: &LifecycleArgs, spec: &JobSpec, lanes: usize, batch_size: usize, grace: std::time::Duration, quiet: bool) -> crate::rotate::RotateOptions {
    crate::rotate::RotateOptions {
        audit: audit_for(life, spec),
        grace,
        reveal: life.reveal,
        settings: Settings { lanes, batch_size, ..Settings::default() },
        quiet: quiet || life.common.json,
    }
}

fn print_progressed(json_out: bool, p: &crate::rotate::Progressed) {
    if json_out {
        print_json(&p.json);
    } else {
        for l in &p.lines {
            println!("{l}");
        }
    }
}

/// `rekey rotate`.
pub async fn rotate(args: &RotateArgs) -> Result<u8, Error> {
    if let Some(addr) = args.metrics_addr {
        crate::metrics::serve(addr)?;
    }
    let Opened { spec, db, mut client } = open(&args.life.common).await?;
    let lanes = args.workers.map_or_else(default_lanes, usize::from);
    let opts = rotate_options(&args.life, &spec, lanes, args.batch_size as usize, args.grace, args.quiet);
    let p = crate::rotate::rotate(&spec, &db, &mut client, &opts).await?;
    print_progressed(args.life.common.json, &p);
    Ok(p.code)
}

/// `rekey secrets ...`.
pub async fn secrets(command: SecretsCommand) -> Result<u8, Error> {
    use crate::lifecycle::{now, KeyState};
    use crate::secrets::Store;
    let life = match &command {
        SecretsCommand::Show(a) | SecretsCommand::Stage(a) | SecretsCommand::Promote(a) | SecretsCommand::Rollback(a) => a,
        SecretsCommand::Init(a) => &a.life,
        SecretsCommand::Retire(a) => &a.life,
    };
    let spec = JobSpec::load(&life.common.job)?;
    let keys = crate::rotate::job_keys(&spec)?;

    if let SecretsCommand::Init(a) = &command {
        let table = match &a.import_env {
            Some(prefix) => {
                let env_keys = crate::job::KeysSpec { source: crate::job::KeySource::Env, prefix: prefix.clone(), path: None, passphrase_env: None, secret_id: None, region: None, endpoint: None, kms_key_id: None };
                Store::open(&env_keys).await?.table().clone()
            }
            None => {
                let mut t = crate::lifecycle::KeyTable::default();
                let at = now();
                t.entries.push(crate::lifecycle::Entry { id: 1, state: KeyState::Current, created_at: at, changed_at: at, key: Some(crate::keyring::Key::new(1, *keyring::generate_material())) });
                t
            }
        };
        let ids: Vec<_> = table.entries.iter().map(|e| e.id).collect();
        match keys.source {
            crate::job::KeySource::File => {
                let path = keys.path.clone().ok_or_else(|| Error::Config("keys source \"file\" needs path".into()))?;
                let var = keys.passphrase_var();
                let pass = std::env::var(var).map_err(|_| Error::Config(format!("set the new keyring's passphrase in {var}")))?;
                crate::keyring::file::KeyringFile::create(&path, pass.as_bytes(), table).map_err(|e| Error::Config(e.to_string()))?;
                println!("created keyring file {} with keys {ids:?}", path.display());
            }
            crate::job::KeySource::AwsSecretsManager => {
                crate::secrets::aws::SecretsManagerStore::create(&keys, &table).await?;
                println!("created secret {:?} with keys {ids:?}", keys.secret_id.clone().unwrap_or_default());
            }
            crate::job::KeySource::AwsKms => {
                crate::secrets::kms::KmsKeyring::create(&keys, table).await?;
                println!("created KMS-wrapped keyring {} with keys {ids:?}", keys.path.clone().unwrap_or_default().display());
            }
            _ => return Err(Error::Config("secrets init creates a keyring file or an AWS Secrets Manager secret: set [keys] source to \"file\" or \"aws-secrets-manager\"".into())),
        }
        return Ok(0);
    }

    let store = Store::open(&keys).await?;
    if let SecretsCommand::Show(_) = &command {
        let info = store.table().info();
        if life.common.json {
            print_json(&json!({ "secret_id": store.secret_id(), "keys": info }));
        } else {
            println!("{}", store.secret_id());
            for k in &info {
                println!("  key {:>3}  {:<8}  fingerprint {:<8}  created {}  state since {}", k.id, k.state.to_string(), k.fingerprint, k.created_at, k.changed_at);
            }
        }
        return Ok(0);
    }

    let Opened { db, mut client, .. } = open(&life.common).await?;
    checkpoint::ensure_schema(&mut client).await?;
    crate::rotate::lock_lifecycle(&client, spec.name.as_deref().unwrap_or_default()).await?;
    // reopened under the lock: another command may have changed the store meanwhile
    let mut store = Store::open(&keys).await?;
    let opts = rotate_options(life, &spec, default_lanes(), 5000, std::time::Duration::ZERO, false);
    let secret_id = store.secret_id();
    let (event, changed, note) = match &command {
        SecretsCommand::Stage(_) => {
            let next = store.table().next_id().map_err(|e| Error::Config(e.to_string()))?;
            let key = store.new_key(next).await?;
            let (id, changed) = store.table_mut().stage(key, now()).map_err(|e| Error::Config(e.to_string()))?;
            ("key_staged", changed, format!("key {id} pending"))
        }
        SecretsCommand::Promote(_) => {
            let changed = store.table_mut().promote(now()).map_err(|e| Error::Config(e.to_string()))?;
            ("key_promoted", changed, format!("key {} current", store.table().id_in(KeyState::Current).unwrap_or_default()))
        }
        SecretsCommand::Rollback(_) => {
            let changed = store.table_mut().rollback(now()).map_err(|e| Error::Config(e.to_string()))?;
            ("key_rolled_back", changed, format!("key {} current", store.table().id_in(KeyState::Current).unwrap_or_default()))
        }
        SecretsCommand::Retire(a) => {
            let previous = store.table().previous_ids();
            let id = match (a.key_id, previous.as_slice()) {
                (Some(id), _) => id,
                (None, [one]) => *one,
                (None, []) => return Err(Error::Config("no previous key to retire".into())),
                (None, many) => return Err(Error::Config(format!("several previous keys ({many:?}): say which with --key-id"))),
            };
            let job = Arc::new(Job::resolve(&spec, &client).await?);
            let p = crate::rotate::retire(&db, &client, &job, &mut store, id, &opts).await?;
            print_progressed(life.common.json, &p);
            return Ok(p.code);
        }
        SecretsCommand::Show(_) | SecretsCommand::Init(_) => return Ok(0),
    };
    let instructions = if changed { store.save(life.reveal).await? } else { Vec::new() };
    if let SecretsCommand::Rollback(_) = &command {
        client
            .execute("UPDATE rekey.rotations SET step = 'rolled_back', finished_at = now(), updated_at = now() WHERE job_name = $1 AND step NOT IN ('retired', 'rolled_back')", &[&spec.name])
            .await
            .ctx(|| "recording the rollback".into())?;
    }
    opts.audit.record(&client, What { event_type: event, secret_id: &secret_id, verification_status: "not_applicable", affected_records: None, notes: &note, job_id: None }).await?;
    if life.common.json {
        print_json(&json!({ "event": event, "changed": changed, "note": note, "instructions": instructions }));
    } else {
        println!("{note}{}", if changed { "" } else { " (nothing to change)" });
        for i in &instructions {
            println!("  {i}");
        }
    }
    Ok(0)
}
