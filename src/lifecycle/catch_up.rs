//! Values an application wrote behind a rotation's run. Applications that
//! read the pending key but encrypt with the current one (the quarterly
//! procedure's) write under the old key until the new one is promoted, so
//! under a steady write load the verify before promotion always finds their
//! latest writes and a rotation that waited for a clean one would never
//! promote. Where everything left on an old key is readable and none of it
//! was refused by the database, the rotation promotes over it and owes a
//! catch-up run: after promotion (the applications now write under the new
//! key) it rewrites what was written behind and verifies again; the retire
//! (after the grace period, counted from the promotion, and on a full
//! verify) waits for a catch-up that passed.

use tokio_postgres::Client;

use crate::crypto::keytable::KeyState;
use crate::engine::verify::Verification;
use crate::job::Job;
use crate::lifecycle::audit::What;
use crate::secrets::Store;
use crate::state;
use crate::state::rotations::{self, Rotation, Step};
use crate::Error;

use super::reencrypt::{record_verify, rewrite_all, sample_verify};
use super::rotation::{Ctx, Ended, Log, Next};

/// Whether a verify that failed before promotion found only values written
/// behind the run: the new key still pending, the verify's values off it all
/// under the key that was current when the rotation began (the one the
/// applications encrypt with) and readable, and the latest run of the job
/// this rotation's own, finished under the job file and keys verified now,
/// having left nothing knowingly (a value quarantined, or not rotated
/// because the database refused, undid or held locked the write: those
/// need a fix first, and the rotation stays staged for it).
pub(crate) async fn only_written_behind(
    cx: &Ctx<'_>,
    client: &Client,
    store: &Store,
    rot: &Rotation,
    v: &Verification,
) -> Result<bool, Error> {
    let Some(old) = rot.old_key else {
        return Ok(false);
    };
    let only_the_old_key = v.by_key_id.keys().all(|&k| k == rot.new_key || k == old)
        && v.values_under_key(old) == v.values_on_old_keys;
    if store.table().id_in(KeyState::Pending) != Some(rot.new_key)
        || v.values_on_old_keys == 0
        || v.values_unreadable() > 0
        || !only_the_old_key
    {
        return Ok(false);
    }
    let job = Job::resolve(cx.spec, client).await?;
    let run = state::jobs::finished_rotation_run(
        client,
        cx.name,
        rot.id,
        &job.spec_hash,
        &job.describe_keys(),
    )
    .await?;
    let Some(job_id) = run else {
        return Ok(false);
    };
    let left = state::job_totals(client, job_id).await?;
    Ok(left.values_not_rotated == 0 && left.values_failed == 0)
}

/// Ran -> verified over values written behind the run: the verify is
/// recorded as failed (`partial`), with what was found, and a catch-up run
/// is due after promotion.
pub(crate) async fn promote_over(
    cx: &Ctx<'_>,
    client: &Client,
    rot: &Rotation,
    key_ref: &str,
    v: &Verification,
    log: &mut Log,
) -> Result<Next, Error> {
    rotations::verified_with_catch_up_due(client, rot.id).await?;
    let notes = format!(
        "{} values on key {}, the current key, all readable, none quarantined or refused by the database: taken for \
         values applications wrote behind the run (they encrypt with the current key until key {} is promoted); \
         promoting, then a catch-up run rotates them",
        v.values_on_old_keys,
        rot.old_key.map_or("-".into(), |k| k.to_string()),
        rot.new_key
    );
    log.record(
        &cx.opts.audit,
        client,
        What {
            event_type: "verification_failed",
            secret_id: key_ref,
            verification_status: "partial",
            affected_records: Some(v.values_on_old_keys),
            notes: &notes,
            job_id: None,
        },
    )
    .await?;
    log.lines
        .push(format!("not verified, promoting over them: {notes}"));
    Ok(None)
}

/// The catch-up run a rotation promoted over written-behind values owes,
/// and its verify; `None` when nothing is left on an old key (the
/// rotation goes on to its grace period), else where the invocation ends.
pub(crate) async fn catch_up(
    cx: &Ctx<'_>,
    client: &mut Client,
    store: &Store,
    rot: &Rotation,
    log: &mut Log,
) -> Result<Next, Error> {
    let secret_id = store.secret_id();
    log.lines.push(format!(
        "catch-up run: rotating what applications wrote under an old key before key {} was promoted",
        rot.new_key
    ));
    if !rewrite_all(
        cx,
        client,
        rot,
        &secret_id,
        rot.new_key,
        "reencryption_completed",
        log,
    )
    .await?
    {
        return Ok(Some((Ended::Stopped, Step::Promoted)));
    }
    let key_ref = format!("{secret_id}#{}", rot.new_key);
    let v = sample_verify(cx, client).await?;
    let after = " after the catch-up run";
    if !v.verified {
        let notes = record_verify(cx, client, &key_ref, rot.new_key, &v, after, log).await?;
        log.lines.push(format!(
            "verification failed: {notes}: an application still encrypts with an old key (redeploy it so it writes under key {}, \
             the current key), or see rekey.quarantine and rekey.not_rotated; then run `rekey rotate` again (it runs the catch-up again)",
            rot.new_key
        ));
        return Ok(Some((Ended::NotVerified, Step::Promoted)));
    }
    rotations::caught_up(client, rot.id).await?;
    let notes = record_verify(cx, client, &key_ref, rot.new_key, &v, after, log).await?;
    log.lines.push(format!("verified: {notes}"));
    Ok(None)
}
