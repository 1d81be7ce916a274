//! `rekey run`: rotate (or, with `--dry-run`, try) every stale value of a
//! job, then report what was done as text or one JSON object.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use tokio_postgres::Client;

use crate::cli::args::{OnlineArgs, RunArgs};
use crate::cli::exit::{EXIT_LEFT_ON_OLD_KEYS, EXIT_QUARANTINED, EXIT_STOPPED, EXIT_WINDOW_ENDED};
use crate::cli::out::out;
use crate::cli::run_audit;
use crate::cli::{default_lanes, open, print_json, Opened};
use crate::control::monitor::{check_gate_sql, check_wal_signals, Signals};
use crate::control::signals::stop_on_signals;
use crate::control::stop::{Stop, StopBy};
use crate::db::session::Timeouts;
use crate::engine::pipeline::{self, Mode, Outcome, Settings};
use crate::engine::rewrite::{rewrite, stale_rows, RunControl};
use crate::engine::{plan, verify};
use crate::job::Job;
use crate::observe::counts::{Counts, LiveCounts};
use crate::observe::events::{self, RunState};
use crate::observe::metrics;
use crate::observe::progress::Progress;
use crate::state::{self, JobRecord};
use crate::Error;

/// Refuses online settings that cannot work together.
pub(crate) fn check_online(o: &OnlineArgs) -> Result<(), Error> {
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
pub(crate) fn settings_from(
    lanes: usize,
    batch_size: u32,
    max_rows_per_sec: Option<u32>,
    o: &OnlineArgs,
    stop: Stop,
) -> Settings {
    Settings {
        lanes,
        batch_size: batch_size as usize,
        batch_time: o.batch_time,
        max_batch_bytes: usize::try_from(o.max_batch_bytes).unwrap_or(usize::MAX),
        stop,
        max_rows_per_sec,
        timeouts: Timeouts {
            lock: Some(o.lock_timeout),
            statement: Some(o.statement_timeout),
            idle_in_transaction: Some((o.lease_ttl / 2).max(Duration::from_secs(1))),
        },
        attempts: o.attempts,
        signals: Signals {
            max_replica_lag: o.max_replica_lag,
            gate_sql: o.gate_sql.clone(),
            max_wal_rate: o.max_wal_rate,
            max_archive_lag: o.max_archive_lag,
            control_file: o.control_file.clone(),
            check_every: o.check_every,
        },
        lease_ttl: o.lease_ttl,
    }
}

/// When the run's window ends (`--run-time`, `--until`), if it has one.
fn deadline(args: &RunArgs) -> Result<Option<Instant>, Error> {
    if args.until.is_some_and(|at| at <= SystemTime::now()) {
        return Err(Error::Config(
            "--until names an instant already past; give a time still to come".into(),
        ));
    }
    Ok(args.run_time.map(|d| Instant::now() + d).or_else(|| {
        args.until
            .map(|at| Instant::now() + at.duration_since(SystemTime::now()).unwrap_or_default())
    }))
}

/// What a run did, for the report.
struct Ran {
    /// This process's pipeline outcome.
    outcome: Outcome,
    /// The job's totals, every process and run included (a dry run: this one).
    totals: Counts,
    /// The job, unless a dry run.
    job_id: Option<i64>,
    /// Whether an unfinished job was resumed.
    resumed: bool,
    /// Seconds the run took.
    elapsed: f64,
}

/// Refuses a run that would rewrite values to the key an abort of the
/// job's rotation takes away (the pending key still set where the
/// applications' environment is, say): it would undo the abort's work.
/// `name`: the job's, as its rotations record it. A run once that key is no
/// longer the target goes the abort's way, and is let through.
async fn refuse_against_an_abort(client: &Client, name: &str, job: &Job) -> Result<(), Error> {
    if !state::schema_exists(client).await? {
        return Ok(());
    }
    let Some(rot) = state::rotations::open_rotation(client, name).await? else {
        return Ok(());
    };
    if rot.step != state::rotations::Step::Aborting {
        return Ok(());
    }
    match job
        .targets
        .iter()
        .find(|t| t.write.keyring.target().id() == rot.new_key)
    {
        Some(t) => Err(Error::Config(format!(
            "rotation {} of this job is being aborted{}, and this run would rewrite the values of {} to key {}, \
             the key the abort takes away: make the changes `rekey rotate --abort` printed (key {} no longer pending), \
             then run `rekey rotate --abort` with this job file again. Nothing was written",
            rot.id,
            rot.old_key
                .map_or_else(String::new, |k| format!(" (back to key {k})")),
            t.table,
            rot.new_key,
            rot.new_key
        ))),
        None => Ok(()),
    }
}

/// `rekey run`.
pub async fn run(args: &RunArgs) -> Result<u8, Error> {
    if let Some(addr) = args.online.metrics_addr {
        metrics::serve(addr)?;
    }
    let Opened {
        spec,
        db,
        mut client,
    } = open(&args.common).await?;
    let mut job = Job::resolve(&spec, &client).await?;
    refuse_against_an_abort(&client, spec.name.as_deref().unwrap_or_default(), &job).await?;
    // said first, and again with the totals: the run itself is not refused
    let mut warnings = crate::job::newer_keys::newer_than_target(&job);
    warnings.extend(crate::job::visibility::old_row_copies(&client, &job.targets).await?);
    for line in &warnings {
        tracing::warn!("{line}");
    }
    // and what may refuse some writes, said when the job was read
    warnings.extend(job.targets.iter().flat_map(|t| t.cautions.iter().cloned()));
    let lanes = match args.workers {
        Some(w) => usize::from(w),
        None => plan::lanes_for_server(&client, default_lanes()).await?,
    };
    check_online(&args.online)?;
    let stop = Stop::default();
    let _signals = stop_on_signals(
        &stop,
        deadline(args)?,
        crate::cli::said_at_once(args.common.json),
    );
    let settings = settings_from(
        lanes,
        args.batch_size,
        args.max_rows_per_sec,
        &args.online,
        stop,
    );
    // every session of the run gets its limits, whatever the role or the database sets
    let db = db.with_session(&settings.timeouts);
    let quiet = args.quiet || args.common.json;
    let started = Instant::now();
    let live = Arc::new(LiveCounts::default());

    // a dry run refuses where the run would: one used as a gate must not say go
    let preflighted = if !args.force {
        verify::preflight(
            &client,
            &job,
            verify::TargetKey::Given,
            verify::Forcing::Flag,
            settings.timeouts.lock,
        )
        .await?
    } else {
        // --force lets values that do not open through, nothing else
        for t in &job.targets {
            verify::check_table(&client, t, settings.timeouts.lock).await?;
        }
        // and quarantines them, those labelled with the target key included
        verify::labelled_that_do_not_open(&client, &job).await?
    };
    for line in preflighted.apply(&mut job) {
        tracing::warn!("{line}");
        warnings.push(line);
    }
    let job = Arc::new(job);
    // throttles that cannot work are refused before the engine's state
    // (and a job to resume) is created; the pipeline checks them again
    if let Some(sql) = &settings.signals.gate_sql {
        check_gate_sql(&mut client, sql).await?;
    }
    check_wal_signals(&client, &settings.signals).await?;
    if args.dry_run {
        // the run would refuse to resume a job begun from another file
        state::jobs::check_resumable(&client, &job, args.restart).await?;
    }
    let audit = if args.dry_run {
        None
    } else {
        state::ensure_schema(&mut client).await?;
        Some(run_audit::run_audit(args, &spec, &job)?)
    };
    // the job whose `run_started` event the run recorded, and whether it
    // tried to record its end: a run that fails in between records its failure
    let begun = std::sync::OnceLock::new();
    let mut end_attempted = false;
    let result = async {
        let ran = if args.dry_run {
            let ranges = plan::job_ranges(&client, &job, lanes).await?;
            let progress = Progress::new(stale_rows(&client, &job).await?, "dry run", quiet);
            let outcome = pipeline::run(
                &db,
                job.clone(),
                ranges,
                Mode::DryRun,
                settings,
                live.clone(),
                progress,
            )
            .await?;
            Ran {
                totals: outcome.counts,
                outcome,
                job_id: None,
                resumed: false,
                elapsed: started.elapsed().as_secs_f64(),
            }
        } else {
            let (outcome, record) = rewrite(
                &db,
                &mut client,
                &job,
                settings,
                RunControl {
                    restart: args.restart,
                    quiet,
                },
                live.clone(),
                async |c: &Client, record: &JobRecord| match &audit {
                    Some(audit) => {
                        run_audit::started(audit, c, &job, record).await?;
                        let _ = begun.set(record.id);
                        Ok(())
                    }
                    None => Ok(()),
                },
            )
            .await?;
            Ran {
                outcome,
                totals: record.prior,
                job_id: Some(record.id),
                resumed: record.resumed,
                elapsed: started.elapsed().as_secs_f64(),
            }
        };
        // the store was written: recorded before anything below can fail
        if let Some(audit) = &audit {
            run_audit::keys_put_back(audit, &client, &ran.outcome, ran.job_id).await?;
        }
        let remaining_rows = if ran.outcome.stopped {
            Some(stale_rows(&client, &job).await?)
        } else {
            None
        };
        // a key put back into its store was said when it happened, and again here
        warnings.extend(ran.outcome.keys_put_back.iter().map(|p| p.said()));
        warnings.extend(ran.outcome.too_long.iter().map(|(column, (n, longest))| {
            format!(
                "{column}: {n} values the run would write are longer than the column's type allows (the longest {longest} \
                 characters): the run would stop at its first batch of them, writing none; widen the column first \
                 (ALTER TABLE ... ALTER COLUMN ... TYPE text, or a longer varchar)"
            )
        }));
        let mut summary = summary(args, &job, &ran, remaining_rows);
        summary["warnings"] = json!(warnings);
        summary["keys_put_back"] = json!(ran.outcome.keys_put_back);
        // values quarantined under a retired key: what brings the key back, if
        // anything (not looked up by a run stopped, which ends at once)
        let capped = ran.outcome.counts.values_failed > ran.outcome.failures.len() as u64;
        let named = if ran.outcome.stopped {
            Vec::new()
        } else {
            crate::engine::named_keys::named_keys(&job, &ran.outcome.failures, capped).await
        };
        summary["named_keys"] = json!(named);
        if let (Some(id), false) = (ran.job_id, ran.outcome.stopped) {
            state::finish_job(&client, id, &summary).await?;
        }
        if let Some(audit) = &audit {
            // attempted is enough: a record that failed may have written its line
            end_attempted = true;
            run_audit::ended(audit, &client, &job, &ran.outcome, &ran.totals, ran.job_id).await?;
        }
        if args.common.json {
            print_json(&summary);
        } else {
            print_text(args, &job, &ran, remaining_rows);
            for line in crate::engine::named_keys::advice(&named) {
                out!("{line}");
            }
            for line in &warnings {
                out!("warning: {line}");
            }
        }
        Ok(ended(args, &job, &ran))
    }
    .await;
    match (result, &audit, begun.get()) {
        (Err(e), Some(audit), Some(&id)) if !end_attempted => {
            run_audit::failed(audit, &client, &db, &job, id, &live.snapshot(), &e).await;
            Err(e)
        }
        (result, ..) => result,
    }
}

/// Rows per second over the whole run.
fn rate(ran: &Ran) -> f64 {
    ran.outcome.counts.rows_scanned as f64 / ran.elapsed.max(1e-9)
}

/// The `--json` object (also kept as the job's summary in `rekey.jobs`).
fn summary(args: &RunArgs, job: &Job, ran: &Ran, remaining_rows: Option<u64>) -> serde_json::Value {
    let (outcome, c) = (&ran.outcome, ran.outcome.counts);
    // no rate yet (held from the start): no projection, rather than a billion years
    let projected_s = remaining_rows
        .filter(|_| rate(ran) > 0.0)
        .map(|left| (left as f64 / rate(ran)).round());
    json!({
        "job": job.name,
        "job_id": ran.job_id,
        "dry_run": args.dry_run,
        "resumed": ran.resumed,
        "rows_scanned": c.rows_scanned,
        "rows_rewritten": c.rows_rewritten,
        "values_rewritten": c.values_rewritten,
        "values_skipped": c.values_skipped,
        "values_failed": c.values_failed,
        "conflicts": c.conflicts,
        "conflicts_left": outcome.conflicts_left,
        "values_not_rotated": ran.totals.values_not_rotated,
        "rows_written_behind": outcome.behind.iter().map(|b| b.rows).sum::<u64>(),
        "written_behind": outcome.behind,
        "stopped": outcome.stopped,
        "stopped_by": if outcome.stopped { Some(outcome.stopped_by.unwrap_or(StopBy::Signal)) } else { None },
        "retries": outcome.retries,
        "held": outcome.held.iter().map(|(k, h)| (k.to_string(), json!({
            "times": h.times,
            "seconds": (h.seconds * 1000.0).round() / 1000.0,
        }))).collect::<serde_json::Map<_, _>>(),
        "ranges_taken_over": outcome.taken_over,
        "batch_rows_min": (outcome.batch_rows.1 > 0).then_some(outcome.batch_rows.0),
        "batch_rows_max": (outcome.batch_rows.1 > 0).then_some(outcome.batch_rows.1),
        "remaining_rows": remaining_rows,
        "projected_s": projected_s,
        "elapsed_s": (ran.elapsed * 1000.0).round() / 1000.0,
        "rows_per_s": rate(ran).round(),
        "batch_ms_p50": outcome.batch_micros.value_at_quantile(0.5) as f64 / 1000.0,
        "batch_ms_p99": outcome.batch_micros.value_at_quantile(0.99) as f64 / 1000.0,
        "peak_rss_mib": (crate::bench::peak_rss_mib() * 10.0).round() / 10.0,
        "job_totals": ran.totals,
        "targets": job.targets.iter().map(|t| {
            let mut v = serde_json::to_value(outcome.by_target.get(&t.index).copied().unwrap_or_default()).unwrap_or_default();
            v["table"] = json!(t.table.to_string());
            v["columns"] = json!(t.columns.iter().map(|c| c.name.clone()).collect::<Vec<_>>());
            v["format"] = json!(t.read.format.name());
            v["to_format"] = json!(t.write.format.name());
            v
        }).collect::<Vec<_>>(),
        "failures": outcome.failures,
    })
}

/// The report for people.
fn print_text(args: &RunArgs, job: &Job, ran: &Ran, remaining_rows: Option<u64>) {
    let (outcome, c) = (&ran.outcome, ran.outcome.counts);
    let verb = if args.dry_run {
        "would rewrite"
    } else {
        "rewrote"
    };
    out!(
        "{}: {verb} {} values in {} rows ({} rows scanned, {} skipped, {} failed, {} conflicts) in {:.1}s, {:.0} rows/s",
        job.name,
        c.values_rewritten,
        c.rows_rewritten,
        c.rows_scanned,
        c.values_skipped,
        c.values_failed,
        c.conflicts,
        ran.elapsed,
        rate(ran)
    );
    if !outcome.held.is_empty() {
        let holds: Vec<String> = outcome
            .held
            .iter()
            .map(|(k, h)| format!("{k} {:.1}s ({} times)", h.seconds, h.times))
            .collect();
        out!("held by: {}", holds.join(", "));
    }
    if outcome.stopped {
        let by = match outcome.stopped_by {
            Some(StopBy::RunTime) => "at the end of its window (--run-time, --until)",
            Some(StopBy::RekeyStop) => "by `rekey stop`",
            Some(StopBy::ControlFile) => "by its control file",
            Some(StopBy::Signal) | None => "on a signal",
        };
        let left = match remaining_rows {
            Some(rows) if rate(ran) > 0.0 => format!(
                "; about {rows} rows left to rotate, about {} at this run's rate",
                humantime::format_duration(std::time::Duration::from_secs(
                    (rows as f64 / rate(ran)).ceil() as u64
                ))
            ),
            Some(rows) => format!("; about {rows} rows left to rotate"),
            None => String::new(),
        };
        out!("stopped {by} after the batches in flight committed{left}; run the same command again to resume");
    }
    if outcome.conflicts_left > 0 {
        out!("{} rows kept changing under the run and were left as the application wrote them; run again to rotate them", outcome.conflicts_left);
    }
    for b in &outcome.behind {
        let trigger = match b.triggers {
            true => ", or did a trigger that fires on rekey's own writes write them",
            false => "",
        };
        out!(
            "{} rows of {} hold a value on an old key that the run never read: written after it passed them \
             (is an application still writing under an old key, or were rows restored from a backup{trigger}?); \
             once the application writes under the target key, run again to rotate them",
            b.rows, b.table
        );
    }
    if ran.totals.values_not_rotated > 0 {
        out!(
            "{} values were NOT rotated and are still under their old key: the database refused, undid or held locked rekey's write, \
             on the first try and again on a re-read (a trigger, a constraint, a row-level security policy, a rule, or a long transaction); \
             `rekey status` and SELECT reason, detail, pk_text FROM rekey.not_rotated WHERE job_id = {} say which; \
             fix what refuses the write, or run as a role it does not apply to, then run again",
            ran.totals.values_not_rotated,
            ran.job_id.unwrap_or_default()
        );
    }
    if ran.resumed {
        out!(
            "resumed job {}: {} values rewritten in all",
            ran.job_id.unwrap_or_default(),
            ran.totals.values_rewritten
        );
    }
    if ran.totals.values_failed > 0 && !args.dry_run {
        out!(
            "{} values could not be decrypted and were left untouched; see: SELECT * FROM rekey.quarantine WHERE job_id = {}",
            ran.totals.values_failed,
            ran.job_id.unwrap_or_default()
        );
    }
}

/// Records how the run ended and picks its exit code.
fn ended(args: &RunArgs, job: &Job, ran: &Ran) -> u8 {
    let outcome = &ran.outcome;
    let window_ended = outcome.stopped && outcome.stopped_by == Some(StopBy::RunTime);
    let failed = if args.dry_run {
        outcome.counts.values_failed
    } else {
        ran.totals.values_failed
    };
    let (state, code) = if window_ended {
        (RunState::WindowEnded, EXIT_WINDOW_ENDED)
    } else if outcome.stopped {
        (RunState::Stopped, EXIT_STOPPED)
    } else if ran.totals.values_not_rotated > 0
        || outcome.conflicts_left > 0
        || !outcome.behind.is_empty()
        // a dry run writes nothing: what it would rewrite is still on an old key
        || (args.dry_run && outcome.counts.values_rewritten > 0)
    {
        (RunState::LeftOnOldKeys, EXIT_LEFT_ON_OLD_KEYS)
    } else if failed > 0 {
        (RunState::Done, EXIT_QUARANTINED)
    } else {
        (RunState::Done, 0)
    };
    events::RunFinished {
        job: &job.name,
        state,
        seconds: ran.elapsed,
    }
    .emit();
    code
}
