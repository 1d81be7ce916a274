//! `rekey rotate --abort`: cancels a rotation before promotion. The staged
//! key is un-staged (it stays readable, as values may be under it), every
//! value is rewritten back to the old key, and once a full verify shows no
//! value needs the staged key it is retired. The rotation holds step
//! `aborting` meanwhile, so a killed or stopped abort resumes.

use std::sync::Arc;

use tokio_postgres::Client;

use crate::crypto::keyring::KeyId;
use crate::crypto::keytable::KeyState;
use crate::db::idle::keeping_alive;
use crate::job::Job;
use crate::lifecycle::audit::What;
use crate::lifecycle::steps;
use crate::secrets::Store;
use crate::state::rotations::{self, Rotation, Step};
use crate::Error;

use super::reencrypt::{full_verify, rewrite_all};
use super::retire::retire;
use super::rotation::{Ctx, Ended, Log, Progressed, Wait};
use crate::engine::named_keys::{rewrites_the_others, said_after};

/// Cancels rotation `rot`, or continues cancelling it.
pub(crate) async fn abort(
    cx: &Ctx<'_>,
    client: &mut Client,
    store: &mut Store,
    rot: &Rotation,
    mut log: Log,
) -> Result<Progressed, Error> {
    let new = rot.new_key;
    let job_name = cx.spec.name.clone().unwrap_or_else(|| "rekey".into());
    let old = refuse_abort(client, store, rot, &job_name).await?;
    let secret_id = store.secret_id();
    let first = rot.step != Step::Aborting;
    if first {
        // the step before the store: an abort killed between the two
        // resumes as an abort (with `rekey rotate`), never as a rotation
        // whose staged key is gone
        rotations::set_step(client, rot.id, Step::Aborting).await?;
    }
    // un-staged now, or again where an abort stopped before its save (the
    // environment's changes are the operator's: said once, then checked)
    let applied =
        if store.table().id_in(KeyState::Pending) == Some(new) && (first || store.writable()) {
            keeping_alive(client, steps::rollback(store, cx.opts.reveal, false)).await?
        } else {
            steps::Applied::default()
        };
    let started = cx
        .opts
        .audit
        .has_rotation_event(client, "rotation_abort_started", rot.id)
        .await?;
    if first || !started {
        if !started {
            log.record(
                &cx.opts.audit,
                client,
                What {
                    event_type: "rotation_abort_started",
                    secret_id: &format!("{secret_id}#{new}"),
                    verification_status: "not_applicable",
                    affected_records: None,
                    notes: &format!("key {new} un-staged; values go back to key {old}"),
                    job_id: None,
                },
            )
            .await?;
        }
        log.lines.push(format!(
            "aborting rotation {}: key {new} is no longer pending (it stays readable until no value needs it); key {old} stays current",
            rot.id
        ));
        if !applied.instructions.is_empty() {
            applied.tell(
                &mut log.lines,
                "make these changes where the application's environment is set, then run `rekey rotate --abort` again:",
            );
            return Ok(log.end(Ended::Waiting(Wait::Environment), Step::Aborting));
        }
    }
    let table = store.table();
    if table.id_in(KeyState::Pending) == Some(new) || table.id_in(KeyState::Current) != Some(old) {
        if !store.writable() {
            // the environment: the operator has not made the changes yet
            log.lines.push(format!(
                "key {new} is still pending, or key {old} is not current, in {secret_id}: make the changes printed \
                 ({}, where the application's environment is set), then run `rekey rotate --abort` again",
                if store.holds_unstaged_keys() {
                    format!(
                        "unset {p}_PENDING_VERSION and keep {p}_CURRENT_VERSION={old}",
                        p = cx.keys.prefix
                    )
                } else {
                    format!("unset {}_KEY_NEW", cx.keys.prefix)
                }
            ));
            return Ok(log.end(Ended::Waiting(Wait::Environment), Step::Aborting));
        }
        // rekey un-staged it there itself: the store changed since (a
        // version from before the abort put back, say)
        return Err(Error::Config(format!(
            "key {new} is pending in {secret_id} again, or key {old} is no longer current, after this abort un-staged key {new}: \
             the store changed since; make key {old} current and key {new} not pending (`rekey secrets rollback` un-stages a pending key), \
             then run `rekey rotate --abort` again"
        )));
    }
    let staged = table
        .entries
        .iter()
        .any(|e| e.id == new && e.state != KeyState::Retired && e.key.is_some());
    if staged {
        if !rewrite_all(
            cx,
            client,
            rot,
            &secret_id,
            old,
            "reencryption_reverted",
            &mut log,
        )
        .await?
        {
            return Ok(log.end(Ended::Stopped, Step::Aborting));
        }
        // a full verify proves no value needs the staged key, then retires it
        let job = Arc::new(Job::resolve(cx.spec, client).await?);
        let mut opts = cx.opts.clone();
        opts.compromised = false;
        opts.never_current = true;
        // boxed: the retire's future (a full verify's inside) off the stack that polls it
        let outcome = Box::pin(retire(cx.db, client, &job, store, new, &opts)).await?;
        log.lines.extend(outcome.lines);
        log.events.extend(outcome.events);
        log.named_keys.extend(outcome.named_keys);
        if outcome.ended != Ended::Done {
            return Ok(log.end(outcome.ended, Step::Aborting));
        }
    } else {
        // The store does not hold the staged key (never set, or removed by
        // hand): no value may be under it. A full verify with the keys there
        // are proves it: a value under the missing key does not decrypt.
        let (v, job) = full_verify(cx, client).await?;
        if !v.verified {
            let (said, named) =
                said_after(&job, &v, &format!("put key {new} back where it was")).await;
            log.lines.push(format!(
                "cannot end the abort: {} values are on other keys and {} do not decrypt with the keys the store holds \
                 (key {new} is not there){said}{}; then run `rekey rotate --abort` again",
                v.values_on_old_keys,
                v.values_unreadable(),
                rewrites_the_others(&v)
            ));
            log.named_keys.extend(named);
            return Ok(log.end(Ended::NotVerified, Step::Aborting));
        }
    }
    // recorded first: an event records the rotation still open, and this
    // one belongs to it; once only, though the close below failed after it
    if !cx
        .opts
        .audit
        .has_rotation_event(client, "rotation_aborted", rot.id)
        .await?
    {
        log.record(
            &cx.opts.audit,
            client,
            What {
                event_type: "rotation_aborted",
                secret_id: &format!("{secret_id}#{new}"),
                verification_status: "passed",
                affected_records: None,
                notes: &format!(
                    "rotation {} aborted: key {old} is current, key {new} retired",
                    rot.id
                ),
                job_id: None,
            },
        )
        .await?;
    }
    rotations::set_step(client, rot.id, Step::RolledBack).await?;
    log.lines.push(format!(
        "rotation {} aborted: every value is under key {old}, which stays current",
        rot.id
    ));
    Ok(log.end(Ended::Done, Step::RolledBack))
}

/// What refuses an abort of rotation `rot` of job `job_name` before it
/// changes anything (its dry run says the same): a rotation with no key to
/// go back to, or promoted already; the job run meanwhile; and, at its first
/// invocation, an old key compromised or no longer current, or a staged key
/// the store cannot take back. The key the abort goes back to.
pub(crate) async fn refuse_abort(
    client: &Client,
    store: &Store,
    rot: &Rotation,
    job_name: &str,
) -> Result<KeyId, Error> {
    let new = rot.new_key;
    let Some(old) = rot.old_key else {
        return Err(Error::Config(format!(
            "rotation {} started with no current key, so there is no key to go back to; finish it with `rekey rotate`",
            rot.id
        )));
    };
    if rot.step == Step::Promoted {
        let back = if store.holds_unstaged_keys() {
            format!(
                "To go back, make key {old} current with `rekey secrets rollback`, then rewrite the values with `rekey run`"
            )
        } else {
            format!(
                "{} keeps no place where applications read a previous key, so there is no going back to key {old}: \
                 to move away from key {new}, rotate to a new key (`rekey rotate --new`)",
                store.secret_id()
            )
        };
        return Err(Error::Config(format!(
            "rotation {} is already promoted: key {new} is the key applications are given to write under, so it \
             cannot be aborted. {back}",
            rot.id
        )));
    }
    let secret_id = store.secret_id();
    // the abort rewrites every value back, which needs the job to itself:
    // refused while a run shares it, before anything changes
    if crate::state::locks::job_in_use(client, job_name).await? {
        return Err(Error::Runtime(format!(
            "job {job_name:?} is being run by other rekey processes on this database, and an abort rewrites every value \
             back, which needs the job to itself: stop them first (`rekey stop --job ...`), then run `rekey rotate --abort` \
             again; nothing was changed by this abort"
        )));
    }
    if rot.step != Step::Aborting {
        if store.table().is_compromised(old) {
            // going back would rewrite every value under a compromised key
            return Err(Error::Config(format!(
                "key {old} is marked compromised, so rotation {} is not aborted: that would rewrite every value \
                 back under it. Finish the rotation instead (`rekey rotate`); nothing was changed",
                rot.id
            )));
        }
        if store.table().id_in(KeyState::Current) != Some(old) {
            // e.g. a promote saved in the store but not yet recorded here
            return Err(Error::Config(format!(
                "key {old} is not current in {secret_id} (key {} is): the store has moved past what rotation {} recorded; \
                 run `rekey rotate` to continue it",
                store.table().id_in(KeyState::Current).map_or("none".into(), |k| k.to_string()),
                rot.id
            )));
        }
        if store.table().id_in(KeyState::Pending) == Some(new) {
            steps::refuse_unstaging(store)?;
        }
    }
    Ok(old)
}
