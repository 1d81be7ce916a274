//! Values an application wrote behind a rotation's run. Applications that
//! read the pending key but encrypt with the current one (the quarterly
//! procedure's) write under the old key until the new one is promoted, so
//! under a steady write load the verify before promotion always finds their
//! latest writes and a rotation that waited for a clean one would never
//! promote. Where everything left on an old key is readable and none of it
//! was refused by the database, the rotation promotes over it and owes a
//! catch-up run: after promotion (the applications now write under the new
//! key) it rewrites what was written behind and verifies again, before the
//! grace period counts and long before the full verify of the retire.

use tokio_postgres::Client;

use crate::crypto::keytable::KeyState;
use crate::engine::verify::Verification;
use crate::lifecycle::audit::What;
use crate::secrets::Store;
use crate::state;
use crate::state::rotations::{self, Rotation, Step};
use crate::Error;

use super::forward::{rewrite_all, sample_verify, Next};
use super::rotation::{Ctx, Ended, Log};

/// Whether a verify that failed before promotion found only values written
/// behind the run: the new key still pending, every value left on an old
/// key readable with the keys the store holds, and nothing the job's runs
/// left knowingly (a value quarantined, or not rotated because the
/// database refused, undid or held locked the write: those need a fix
/// first, and the rotation stays staged for it).
pub(crate) async fn only_written_behind(
    cx: &Ctx<'_>,
    client: &Client,
    store: &Store,
    rot: &Rotation,
    v: &Verification,
) -> Result<bool, Error> {
    if store.table().id_in(KeyState::Pending) != Some(rot.new_key)
        || v.values_on_old_keys == 0
        || v.values_unreadable() > 0
    {
        return Ok(false);
    }
    let Some((job_id, _, _)) = state::jobs::last_job_keys(client, cx.name).await? else {
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
    rotations::set_catch_up_due(client, rot.id, true).await?;
    rotations::set_step(client, rot.id, Step::Verified).await?;
    let notes = format!(
        "{} values on old keys, all readable and none refused by the database: written behind the run by applications \
         that encrypt with the current key until key {} is promoted; promoting, then a catch-up run rotates them",
        v.values_on_old_keys, rot.new_key
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
    log.lines.push(format!("verified in part: {notes}"));
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
    if !v.verified {
        let notes = format!(
            "{} values on old keys and {} undecryptable after the catch-up run",
            v.values_on_old_keys,
            v.values_unreadable()
        );
        log.record(
            &cx.opts.audit,
            client,
            What {
                event_type: "verification_failed",
                secret_id: &key_ref,
                verification_status: "failed",
                affected_records: Some(v.values_total),
                notes: &notes,
                job_id: None,
            },
        )
        .await?;
        log.lines.push(format!(
            "verification failed: {notes}: an application still encrypts with an old key (redeploy it so it writes under key {}, \
             the current key), or see rekey.quarantine and rekey.not_rotated; then run `rekey rotate` again (it runs the catch-up again)",
            rot.new_key
        ));
        return Ok(Some((Ended::NotVerified, Step::Promoted)));
    }
    rotations::set_catch_up_due(client, rot.id, false).await?;
    let notes = format!(
        "all {} values under key {} after the catch-up run",
        v.values_total, rot.new_key
    );
    log.record(
        &cx.opts.audit,
        client,
        What {
            event_type: "verification_passed",
            secret_id: &key_ref,
            verification_status: "passed",
            affected_records: Some(v.values_total),
            notes: &notes,
            job_id: None,
        },
    )
    .await?;
    log.lines.push(format!("verified: {notes}"));
    Ok(None)
}
