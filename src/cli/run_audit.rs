//! The audit events of `rekey run`: its file checked before anything
//! changes, one event when a run starts (after one for
//! an unfinished job `--restart` gave up), one when it ends
//! (completed, stopped, its window ended, or failed) with the values re-encrypted,
//! quarantined and not rotated, the job, and the keys (the job's target
//! key, and its old key when there is exactly one).

use std::collections::BTreeSet;

use tokio_postgres::Client;

use crate::cli::args::RunArgs;
use crate::cli::rotate::audit_of;
use crate::control::stop::StopBy;
use crate::db::Database;
use crate::engine::pipeline::Outcome;
use crate::error::Retry;
use crate::job::{Job, JobSpec};
use crate::lifecycle::audit::{Audit, AuditKeys, What};
use crate::observe::counts::Counts;
use crate::state::{self, JobRecord};
use crate::Error;

/// The one element of `set`, if it has exactly one.
fn only<T: Copy + Ord>(set: &BTreeSet<T>) -> Option<T> {
    (set.len() == 1).then(|| set.first().copied()).flatten()
}

/// The audit settings of a run: who and why from the command line, the
/// keys from the job. Refused, before anything changes, when the file
/// cannot be opened for append: a `--restart` gives up the unfinished job
/// before its first event, which would be lost with it.
pub(crate) fn run_audit(args: &RunArgs, spec: &JobSpec, job: &Job) -> Result<Audit, Error> {
    let mut audit = audit_of(&args.audit.who(), &args.common.job, spec);
    let targets: BTreeSet<_> = job
        .targets
        .iter()
        .map(|t| t.write.keyring.target().id())
        .collect();
    let new = only(&targets);
    let old: BTreeSet<_> = job
        .targets
        .iter()
        .flat_map(|t| t.read.keyring.keys().map(|k| k.id()))
        .filter(|id| Some(*id) != new)
        .collect();
    if new.is_some() {
        audit.keys = Some(AuditKeys {
            old: only(&old),
            new,
        });
    }
    audit.check_writable()?;
    Ok(audit)
}

/// The store a run's keys come from and its target key, named for the
/// audit trail (never a value).
fn secret_ref(job: &Job, audit: &Audit) -> String {
    let store = match job.targets.first().and_then(|t| t.write.source.as_ref()) {
        Some(k) => match (&k.secret_id, &k.path, &k.kms_key_id) {
            (Some(id), _, _) => id.clone(),
            (None, Some(path), _) => format!("file:{}", path.display()),
            (None, None, Some(kms)) => format!("kms:{kms}"),
            (None, None, None) => format!("env:{}", k.prefix),
        },
        None => format!("job:{}", job.name),
    };
    match audit.keys.and_then(|k| k.new) {
        Some(id) => format!("{store}#{id}"),
        None => store,
    }
}

/// Records that a run starts, once its job is joined or made (so the
/// event names it): first, where `--restart` gave up an unfinished job,
/// that job's end with what it had re-encrypted.
pub(crate) async fn started(
    audit: &Audit,
    client: &Client,
    job: &Job,
    record: &JobRecord,
) -> Result<(), Error> {
    let secret = secret_ref(job, audit);
    if let Some(old) = record.abandoned {
        let done = state::job_totals(client, old).await?;
        let notes = format!(
            "job {old}, unfinished, is given up by `rekey run --restart` for job {}: it had re-encrypted {} values \
             ({} quarantined, {} not rotated); they stay rotated, and the new job rewrites what is left",
            record.id, done.values_rewritten, done.values_failed, done.values_not_rotated
        );
        let what = What {
            event_type: "reencryption_abandoned",
            secret_id: &secret,
            verification_status: "not_applicable",
            affected_records: Some(done.values_rewritten),
            notes: &notes,
            job_id: Some(old),
        };
        audit.record(client, what).await?;
    }
    let notes = if record.resumed {
        format!("re-encryption resumed (job {})", record.id)
    } else {
        format!("re-encryption started (job {})", record.id)
    };
    let what = What {
        event_type: "run_started",
        secret_id: &secret,
        verification_status: "not_applicable",
        affected_records: None,
        notes: &notes,
        job_id: Some(record.id),
    };
    audit.record(client, what).await?;
    Ok(())
}

/// Records each key a store lost during the run and rekey put back: a
/// write into the store, which the trail holds like a stage (named as the
/// stage named it; the notes say when).
pub(crate) async fn keys_put_back(
    audit: &Audit,
    client: &Client,
    outcome: &Outcome,
    job_id: Option<i64>,
) -> Result<(), Error> {
    for back in &outcome.keys_put_back {
        let notes = back.said();
        let what = What {
            event_type: "key_put_back",
            secret_id: &back.secret_id,
            verification_status: "not_applicable",
            affected_records: None,
            notes: &notes,
            job_id,
        };
        audit.record(client, what).await?;
    }
    Ok(())
}

/// Records how a run ended: this run's values re-encrypted (the event's
/// `affected_records`), quarantined and not rotated, and the job's totals.
pub(crate) async fn ended(
    audit: &Audit,
    client: &Client,
    job: &Job,
    outcome: &Outcome,
    totals: &Counts,
    job_id: Option<i64>,
) -> Result<(), Error> {
    let c = outcome.counts;
    let event_type = match (outcome.stopped, outcome.stopped_by) {
        (false, _) => "run_completed",
        (true, Some(StopBy::RunTime)) => "run_window_ended",
        (true, _) => "run_stopped",
    };
    let detail = format!(
        "{} values re-encrypted in {} rows ({} rows scanned, {} values already on the target key or NULL), \
         {} quarantined, {} not rotated, {} rows left changing; job totals: {} re-encrypted, {} quarantined, {} not rotated",
        c.values_rewritten,
        c.rows_rewritten,
        c.rows_scanned,
        c.values_skipped,
        c.values_failed,
        c.values_not_rotated,
        outcome.conflicts_left,
        totals.values_rewritten,
        totals.values_failed,
        totals.values_not_rotated,
    );
    let behind: u64 = outcome.behind.iter().map(|b| b.rows).sum();
    let detail = if behind > 0 {
        format!("{detail}; {behind} rows written behind the run under an old key, left for the next run")
    } else {
        detail
    };
    let left = totals.values_failed + totals.values_not_rotated + outcome.conflicts_left + behind;
    let status = if outcome.stopped {
        "pending"
    } else if left > 0 {
        "failed"
    } else {
        "not_applicable"
    };
    let what = What {
        event_type,
        secret_id: &secret_ref(job, audit),
        verification_status: status,
        affected_records: Some(c.values_rewritten),
        notes: &detail,
        job_id,
    };
    audit.record(client, what).await?;
    Ok(())
}

/// Records that the run of job `job_id` failed with `error` once its start
/// was recorded, with what it had committed (`counts`, this run's): the
/// trail otherwise shows a run started and never ended. On the run's
/// session, or a new one where the failure broke it; where it cannot be
/// recorded, said as a warning: the run's own error is the one it exits
/// with.
pub(crate) async fn failed(
    audit: &Audit,
    client: &Client,
    db: &Database,
    job: &Job,
    job_id: i64,
    counts: &Counts,
    error: &Error,
) {
    let notes = format!(
        "the run failed after re-encrypting {} values in {} rows ({} quarantined, {} not rotated), each batch \
         committed whole: {}",
        counts.values_rewritten,
        counts.rows_rewritten,
        counts.values_failed,
        counts.values_not_rotated,
        // kept for good: never a refused row's DETAIL
        error.without_detail()
    );
    let secret = secret_ref(job, audit);
    let what = || What {
        event_type: "run_failed",
        secret_id: &secret,
        verification_status: "pending",
        affected_records: Some(counts.values_rewritten),
        notes: &notes,
        job_id: Some(job_id),
    };
    let on_a_new_session = async || match db.connect().await {
        Ok(fresh) => audit.record(&fresh, what()).await,
        Err(e) => Err(Error::Connect(e)),
    };
    let recorded = if client.is_closed() {
        // the failure broke the run's session
        on_a_new_session().await
    } else {
        // a transaction the failure left open on the run's session ends first
        let _ = client.batch_execute("ROLLBACK").await;
        match audit.record(client, what()).await {
            // broken, and not seen to be until now
            Err(e) if e.retry() == Retry::Reconnect => on_a_new_session().await,
            other => other,
        }
    };
    if let Err(e) = recorded {
        tracing::warn!(
            "the audit trail could not record the run's failure (run_failed): {}",
            e.chain()
        );
    }
}
