//! The re-encryption and the verifies the steps of a rotation share: going
//! forward, in the catch-up run after an early promotion, and turning back
//! (`--abort`). Each run finishes its job recording the rotation, and
//! writes one audit event: completed, or stopped with what it did so far;
//! a run it gives up (the forward run an abort turns back, killed or
//! stopped) gets one too, with what that run had re-encrypted.

use std::sync::Arc;

use serde_json::json;
use tokio_postgres::Client;

use crate::crypto::keyring::KeyId;
use crate::engine::rewrite::{rewrite, RunControl};
use crate::engine::verify::{self, Depth};
use crate::job::Job;
use crate::lifecycle::audit::What;
use crate::observe::counts::LiveCounts;
use crate::state;
use crate::state::rotations::Rotation;
use crate::Error;

use super::rotation::{Ctx, Log};

/// Rewrites every value not under the store's target key (the pending key,
/// else the current one); false when stopped on request.
pub(crate) async fn rewrite_all(
    cx: &Ctx<'_>,
    client: &mut Client,
    rot: &Rotation,
    secret_id: &str,
    to: KeyId,
    event_type: &str,
    log: &mut Log,
) -> Result<bool, Error> {
    let mut job = Job::resolve(cx.spec, client).await?;
    // an abort turns values back to the key its rotation read them under
    let target = if to == rot.new_key {
        verify::TargetKey::Given
    } else {
        verify::TargetKey::ReadBefore
    };
    let preflighted = verify::preflight(
        client,
        &job,
        target,
        verify::Forcing::NoFlag("rekey rotate"),
        cx.opts.settings.timeouts.lock,
    )
    .await?;
    for line in preflighted.apply(&mut job) {
        tracing::warn!("{line}");
        log.lines.push(format!("warning: {line}"));
    }
    let job = Arc::new(job);
    // said before the run writes, and kept with the invocation's lines
    for line in crate::job::visibility::old_row_copies(client, &job.targets).await? {
        tracing::warn!("{line}");
        log.lines.push(format!("warning: {line}"));
    }
    // A run left unfinished under another key set (the forward run an abort
    // turns back) is given up: its values are rewritten by this one.
    let given_up = state::jobs::unfinished_job_keys(client, &job.name)
        .await?
        .filter(|(_, keys)| *keys != job.describe_keys())
        .map(|(id, _)| id);
    if let Some(id) = given_up {
        give_up(cx, client, secret_id, to, id, log).await?;
    }
    let control = RunControl {
        quiet: cx.opts.quiet,
        restart: given_up.is_some(),
    };
    let (outcome, record) = rewrite(
        cx.db,
        client,
        &job,
        cx.opts.settings.clone(),
        control,
        Arc::new(LiveCounts::default()),
        // given up and started are recorded by the rotation's own events
        async |_: &Client, _: &state::JobRecord| Ok(()),
    )
    .await?;
    if outcome.session_reopened {
        // the session was lost during the run and reopened, without this
        // command's lock: taken again (or refused, if another took it since)
        state::lock_lifecycle(client, cx.name).await?;
    }
    let totals = record.prior;
    let (event_type, notes) = if outcome.stopped {
        let notes = format!(
            "stopped during the re-encryption under key {to}: job {} has re-encrypted {} values so far, {} quarantined; \
             `rekey rotate` resumes it",
            record.id, totals.values_rewritten, totals.values_failed
        );
        ("reencryption_stopped", notes)
    } else {
        state::finish_job(
            client,
            record.id,
            &json!({
                "rotation": rot.id,
                "job_totals": totals,
                "rows_written_behind": outcome.behind.iter().map(|b| b.rows).sum::<u64>(),
            }),
        )
        .await?;
        let notes = format!(
            "{} values re-encrypted under key {to}, {} quarantined",
            totals.values_rewritten, totals.values_failed
        );
        (event_type, notes)
    };
    log.record(
        &cx.opts.audit,
        client,
        What {
            event_type,
            secret_id: &format!("{secret_id}#{to}"),
            verification_status: "pending",
            affected_records: Some(totals.values_rewritten),
            notes: &notes,
            job_id: Some(record.id),
        },
    )
    .await?;
    log.lines.push(notes);
    Ok(!outcome.stopped)
}

/// Records that job `id`, left unfinished under another key set, is given
/// up for this run: what it had re-encrypted (read from its progress, as a
/// killed run wrote no event of its own) is rewritten under key `to`.
async fn give_up(
    cx: &Ctx<'_>,
    client: &Client,
    secret_id: &str,
    to: KeyId,
    id: i64,
    log: &mut Log,
) -> Result<(), Error> {
    // once per job: an invocation that recorded it may have failed before the run gave it up
    if cx
        .opts
        .audit
        .has_event(client, "reencryption_abandoned", id)
        .await?
    {
        return Ok(());
    }
    let done = state::job_totals(client, id).await?;
    let notes = format!(
        "job {id}, left unfinished under another key set, is given up: its {} values re-encrypted ({} quarantined) \
         are rewritten under key {to} by this run",
        done.values_rewritten, done.values_failed
    );
    log.record(
        &cx.opts.audit,
        client,
        What {
            event_type: "reencryption_abandoned",
            secret_id: &format!("{secret_id}#{to}"),
            verification_status: "not_applicable",
            affected_records: Some(done.values_rewritten),
            notes: &notes,
            job_id: Some(id),
        },
    )
    .await?;
    log.lines.push(notes);
    Ok(())
}

/// A full verify of the job, every value decrypted with the keys the store
/// holds now; with the job it resolved, for what a refusal resting on it
/// says of the keys the values name.
pub(crate) async fn full_verify(
    cx: &Ctx<'_>,
    client: &Client,
) -> Result<(verify::Verification, Arc<Job>), Error> {
    let job = Arc::new(Job::resolve(cx.spec, client).await?);
    let v = verify::verify(
        cx.db,
        client,
        &job,
        Depth::full(cx.opts.settings.lanes),
        cx.opts.quiet,
    )
    .await?;
    Ok((v, job))
}

/// The verify between the run and promotion: every value's key counted
/// where it shows, a sample decrypted.
pub(crate) async fn sample_verify(
    cx: &Ctx<'_>,
    client: &Client,
) -> Result<verify::Verification, Error> {
    let job = Arc::new(Job::resolve(cx.spec, client).await?);
    let depth = Depth {
        full: false,
        sample: 1000,
        lanes: cx.opts.settings.lanes,
    };
    verify::verify(cx.db, client, &job, depth, cx.opts.quiet).await
}

/// Records a verify's outcome as one audit event, `verification_passed` or
/// `verification_failed`, its notes ending with `after` (what the verify
/// followed, or nothing); returns the notes, for the invocation's lines.
pub(crate) async fn record_verify(
    cx: &Ctx<'_>,
    client: &Client,
    key_ref: &str,
    new_key: KeyId,
    v: &verify::Verification,
    after: &str,
    log: &mut Log,
) -> Result<String, Error> {
    // a filtered job's verify reads the rows its filters select, no others
    let after = if cx.spec.targets.iter().any(|t| t.filter.is_some()) {
        format!("{after} (in the rows the job's `where` filters select)")
    } else {
        after.to_string()
    };
    let (event_type, verification_status, notes) = if v.verified {
        (
            "verification_passed",
            "passed",
            format!("all {} values under key {new_key}{after}", v.values_total),
        )
    } else {
        (
            "verification_failed",
            "failed",
            format!(
                "{} values on old keys, {} undecryptable{after}",
                v.values_on_old_keys,
                v.values_unreadable()
            ),
        )
    };
    log.record(
        &cx.opts.audit,
        client,
        What {
            event_type,
            secret_id: key_ref,
            verification_status,
            affected_records: Some(v.values_total),
            notes: &notes,
            job_id: None,
        },
    )
    .await?;
    Ok(notes)
}
