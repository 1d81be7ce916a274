//! `rekey rotate --dry-run`: where a rotation stands and what the next
//! invocation would do, read without a lock and without changing anything
//! (no engine schema is created, no key is staged, no value is written).

use tokio_postgres::Client;

use crate::crypto::keytable::{now, rfc3339, KeyState};
use crate::db::idle::keeping_alive;
use crate::engine::plan;
use crate::job::{Job, JobSpec};
use crate::secrets::Store;
use crate::state;
use crate::state::rotations::{self, Step};
use crate::Error;

use super::rotation::{
    human, job_keys, Ended, Intent, Log, Progressed, RotateOptions, RotationInfo, Wait,
};

/// What `rekey rotate` (with `opts`) would do next.
pub async fn preview(
    spec: &JobSpec,
    client: &Client,
    opts: &RotateOptions,
) -> Result<Progressed, Error> {
    let keys = job_keys(spec)?;
    let name = spec.name.clone().unwrap_or_default();
    // `client` is read after the store opens: kept from idling meanwhile
    let store = keeping_alive(client, Store::open(&keys)).await?;
    let mut log = Log::default();
    let say = |log: &mut Log, line: String| log.lines.push(format!("dry run: {line}"));
    let exists = state::schema_exists(client).await?;
    let rotation = if exists {
        rotations::open_rotation(client, &name).await?
    } else {
        None
    };
    let Some(rot) = rotation else {
        let last = if exists {
            rotations::last_finished(client, &name).await?
        } else {
            None
        };
        if opts.intent == Intent::Abort {
            let (line, step) = super::rotation::nothing_to_abort(&name, last.as_ref())?;
            say(&mut log, line);
            return Ok(log.end(Ended::Done, step));
        }
        if let (Some(last), Intent::Continue) = (&last, opts.intent) {
            // what `rotate` would say of it: complete, or what changed since
            let (ended, line, named) =
                super::rotation::since_last(client, spec, &keys, last).await?;
            say(&mut log, line);
            log.named_keys.extend(named);
            return Ok(log.end(ended, last.step));
        }
        // what would refuse the stage refuses the dry run with the same words
        super::rotation::refuse_stage(spec, client, &store, &name, opts, exists).await?;
        let next = match store.table().id_in(KeyState::Pending) {
            Some(pending) => pending,
            None => {
                // the id the stage would take: above every one the database records
                let recorded = super::steps::recorded_key_id(client, &store, spec).await?;
                let (next, skipped) = super::steps::new_key_id(&store, recorded.as_ref())?;
                super::steps::refuse_unnameable(spec, next)?;
                if let Some(why) = skipped {
                    say(&mut log, why);
                }
                next
            }
        };
        say(
            &mut log,
            format!(
                "would stage key {next} as pending in {}, then {}",
                store.secret_id(),
                if opts.no_wait {
                    "re-encrypt, verify and promote in the same invocation"
                } else {
                    "stop (exit 6) while the applications are redeployed to read it"
                }
            ),
        );
        return Ok(log.end(Ended::Done, Step::Staged));
    };
    let mut rot = rot;
    // a `--grace` (or a switch to compromise mode) given now replaces the
    // rotation's grace period, as the invocation itself would
    let compromise_now = super::audit::is_compromise_reason(&rot.reason);
    if opts.compromised && !compromise_now {
        super::rotation::refuse_filtered_compromise(spec, true)?;
    }
    let compromised = opts.compromised || compromise_now;
    if compromised {
        rot.grace_s = 0;
    }
    if let Some(g) = opts.grace {
        rot.grace_s = super::rotation::grace_s(compromised, g)?;
    }
    log.rotation = Some(RotationInfo::of(&rot));
    if opts.intent == Intent::New {
        return Err(super::rotation::no_new_beside(&rot, &name));
    }
    if opts.intent == Intent::Abort || rot.step == Step::Aborting {
        // the abort's refusals, in its words
        let job_name = spec.name.clone().unwrap_or_else(|| "rekey".into());
        let old = super::abort::refuse_abort(client, &store, &rot, &job_name).await?;
        if rot.step != Step::Aborting {
            let then = if store.writable() {
                format!(
                    "rewrite every value under key {} back to key {old}, verify every value and retire key {}",
                    rot.new_key, rot.new_key
                )
            } else {
                format!(
                    "stop (exit 6) for the changes to the application's environment it prints; the next \
                     `rekey rotate --abort` rewrites every value under key {} back to key {old} and retires it",
                    rot.new_key
                )
            };
            say(
                &mut log,
                format!(
                    "would abort rotation {} (step {}): un-stage key {} in {} (key {old} stays current), then {then}",
                    rot.id,
                    rot.step.as_str(),
                    rot.new_key,
                    store.secret_id()
                ),
            );
            return Ok(log.end(Ended::Waiting(Wait::Rotate), rot.step));
        }
    }
    if rot.step == Step::Promoted {
        // as the next invocation checks first: the promoted key still current
        // (then what follows once it is)
        if let Some(line) = super::forward::promoted_key_not_current(&store, &keys.prefix, &rot)? {
            say(&mut log, line);
        }
    }
    let grace_s = rot.grace_s;
    let to_rewrite = || async {
        let job = Job::resolve(spec, client).await?;
        plan::values_to_rewrite(client, &job).await
    };
    let line = match rot.step {
        Step::Staged => format!(
            "rotation {} is staged: would re-encrypt {} values under key {}, verify, and promote it",
            rot.id,
            to_rewrite().await?,
            rot.new_key
        ),
        Step::Ran | Step::Verified => format!(
            "rotation {} has re-encrypted its values: would verify and promote key {}",
            rot.id, rot.new_key
        ),
        Step::Promoted => {
            let due = rot.promoted_at_s.unwrap_or(now() as i64) + grace_s;
            match rot.old_key {
                Some(old) if (now() as i64) < due => format!(
                    "rotation {} is promoted; key {old} stays for the grace period ({}), until {}; then a full verify and its retirement",
                    rot.id,
                    human(grace_s),
                    rfc3339(due.max(0).unsigned_abs())
                ),
                Some(old) => format!(
                    "rotation {} is promoted and its grace period is over: would verify every value and retire key {old}",
                    rot.id
                ),
                None => format!("rotation {} is promoted: would mark it complete", rot.id),
            }
        }
        Step::Aborting => format!(
            "rotation {} is being aborted: would rewrite {} values back to key {}, then retire key {}",
            rot.id,
            to_rewrite().await?,
            rot.old_key.map_or("-".into(), |k| k.to_string()),
            rot.new_key
        ),
        Step::Retired | Step::RolledBack => format!("rotation {} is over", rot.id),
    };
    say(&mut log, line);
    match (rot.step, rot.catch_up_due) {
        (Step::Promoted, true) => say(
            &mut log,
            format!(
                "it was promoted over values written behind its run: would first run the catch-up ({} values to re-encrypt under key {}) and verify it",
                to_rewrite().await?,
                rot.new_key
            ),
        ),
        (Step::Verified, true) => say(
            &mut log,
            format!(
                "its verify found values written behind its run: after promoting key {}, would stop for the applications to be redeployed \
                 (unless --no-wait), then run the catch-up",
                rot.new_key
            ),
        ),
        _ => {}
    }
    if store.table().id_in(KeyState::Pending).is_none() && rot.step == Step::Staged {
        say(
            &mut log,
            format!(
                "key {} is not staged in {} yet: make the changes the staging printed first",
                rot.new_key,
                store.secret_id()
            ),
        );
    }
    let table = store.table();
    if rot.step == Step::Aborting
        && !store.writable()
        && (table.id_in(KeyState::Pending) == Some(rot.new_key)
            || table.id_in(KeyState::Current) != rot.old_key)
    {
        say(
            &mut log,
            format!(
                "key {} is still pending, or key {} is not current, in {}: make the changes the abort printed first",
                rot.new_key,
                rot.old_key.map_or("-".into(), |k| k.to_string()),
                store.secret_id()
            ),
        );
    }
    // exit 0 only where nothing in scope is left on an old key: a rotation in
    // progress waits for the next `rekey rotate`
    Ok(log.end(Ended::Waiting(Wait::Rotate), rot.step))
}
