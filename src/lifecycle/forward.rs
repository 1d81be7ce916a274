//! The steps of a rotation going forward, each from the step before it:
//! staged -> ran (every value rewritten under the new key) -> verified ->
//! promoted -> retired (after the grace period, on a full verify). The runs
//! and verifies they share are in `reencrypt`; the catch-up run an early
//! promotion owes, in `catch_up`.

use std::sync::Arc;

use tokio_postgres::Client;

use crate::crypto::keytable::{now, rfc3339, KeyState};
use crate::db::idle::keeping_alive;
use crate::job::Job;
use crate::lifecycle::audit::What;
use crate::lifecycle::steps;
use crate::secrets::Store;
use crate::state::rotations::{self, Rotation, Step};
use crate::Error;

use super::catch_up;
use super::promotion;
use super::reencrypt::{full_verify, record_verify, rewrite_all, sample_verify};
use super::retire::retire;
use super::rotation::{fingerprint_of, Ctx, Ended, Log, Next, Progressed, Wait};
use crate::engine::named_keys::{restore_command, rewrites_the_others, said_after};

/// Refuses a staged key that was changed by hand; records its fingerprint once known.
pub(crate) async fn check_staged_key(
    client: &Client,
    store: &Store,
    rot: &Rotation,
) -> Result<(), Error> {
    let Some(found) = fingerprint_of(store, rot.new_key) else {
        return Ok(());
    };
    match &rot.new_fingerprint {
        Some(staged) if *staged != found => Err(Error::Config(format!(
            "key {} in {} is not the key this rotation staged (fingerprint {found}, staged {staged}): it was changed by hand; \
             restore it{}",
            rot.new_key,
            store.secret_id(),
            // once promoted, values are under it and applications write under it: no going back
            if rot.step == Step::Promoted {
                " (values are under it: the rotation is promoted, so it cannot be aborted)"
            } else {
                ", or cancel the rotation with `rekey rotate --abort`"
            }
        ))),
        Some(_) => Ok(()),
        None => rotations::set_fingerprint(client, rot.id, &found).await,
    }
}

/// What to say while the environment, which rekey cannot write, lacks the
/// changes `rekey rotate` printed: `versioned` or `dual`, by convention.
fn environment_not_yet(store: &Store, what: &str, versioned: String, dual: String) -> String {
    let set = if store.holds_unstaged_keys() {
        versioned
    } else {
        dual
    };
    format!(
        "{what} in {} yet: make the changes `rekey rotate` printed ({set} where the application's environment \
         is set, and redeploy), then run it again",
        store.secret_id()
    )
}

/// The dual convention's variables that stage key `n`: `<P>_KEY_NEW`, and
/// its version where it is not the one after the current key's.
pub(crate) fn dual_staging(store: &Store, p: &str, n: crate::crypto::keyring::KeyId) -> String {
    match store.table().id_in(KeyState::Current) {
        Some(c) if crate::crypto::keyring::env::dual_new_id(c) == n => {
            format!("{p}_KEY_NEW=<the new key>")
        }
        _ => format!("{p}_KEY_NEW=<the new key> and {p}_KEY_NEW_VERSION={n}"),
    }
}

/// Staged -> ran: re-encrypts every value under the staged key.
pub(crate) async fn ran(
    cx: &Ctx<'_>,
    client: &mut Client,
    store: &Store,
    rot: &Rotation,
    log: &mut Log,
) -> Result<Next, Error> {
    if store.table().id_in(KeyState::Pending) != Some(rot.new_key)
        && store.table().id_in(KeyState::Current) != Some(rot.new_key)
    {
        if !store.writable() {
            let (p, n) = (&cx.keys.prefix, rot.new_key);
            log.lines.push(environment_not_yet(
                store,
                &format!("key {n} is not staged"),
                format!("{p}_KEY_V{n}=<the new key> and {p}_PENDING_VERSION={n}"),
                dual_staging(store, p, n),
            ));
            return Ok(Some((Ended::Waiting(Wait::Environment), Step::Staged)));
        }
        // rekey wrote the key there itself: the store lost it since (a
        // version from before the stage put back), or it was un-staged
        let n = rot.new_key;
        let now = match store.table().entries.iter().find(|e| e.id == n) {
            Some(e) if e.key.is_some() => format!("holds key {n} as {}, not pending", e.state),
            _ => format!("no longer holds key {n}"),
        };
        return Err(Error::Config(format!(
            "{} {now}, the key rotation {} staged: restore key {n} as pending from {}, then run `rekey rotate` again; \
             or give the rotation up with `rekey rotate --abort` (values already rewritten under key {n} cannot be read without it)",
            store.secret_id(),
            rot.id,
            store.former_versions()
        )));
    }
    let secret_id = store.secret_id();
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
        return Ok(Some((Ended::Stopped, Step::Staged)));
    }
    rotations::set_step(client, rot.id, Step::Ran).await?;
    Ok(None)
}

/// Ran -> verified: proves no value is left on an old key (else back to
/// staged), or that those left were written behind the run (promoted over,
/// with a catch-up run due: `catch_up`).
pub(crate) async fn verified(
    cx: &Ctx<'_>,
    client: &Client,
    store: &Store,
    rot: &Rotation,
    log: &mut Log,
) -> Result<Next, Error> {
    let key_ref = format!("{}#{}", store.secret_id(), rot.new_key);
    // where the applications read only the new key once it is promoted,
    // every value must be under it first: a full verify, and no promotion
    // over values written behind the run
    let only_new_key_read = promotion::old_key_unread_after_promotion(store);
    let v = if only_new_key_read {
        match promotion_proof(cx, client).await? {
            Ok(v) => v,
            Err(why) => {
                log.lines.push(why);
                return Ok(Some((not_proven(cx), Step::Ran)));
            }
        }
    } else {
        sample_verify(cx, client).await?
    };
    if !v.verified && catch_up::only_written_behind(cx, client, store, rot, &v).await? {
        if !only_new_key_read {
            return catch_up::promote_over(cx, client, rot, &key_ref, &v, log).await;
        }
        rotations::set_step(client, rot.id, Step::Staged).await?;
        record_verify(
            cx,
            client,
            &key_ref,
            rot.new_key,
            &v,
            " (written behind the run)",
            log,
        )
        .await?;
        log.lines.push(format!(
            "{}. Values under key {} written behind the run come from an application that does not read {} yet: \
             redeploy it, then run `rekey rotate` again (it rotates them, and promotes on a full verify)",
            promotion::refusal(store, rot.new_key, &v),
            rot.old_key.map_or("-".into(), |k| k.to_string()),
            store.new_key_place()
        ));
        return Ok(Some((Ended::Waiting(Wait::Deploy), Step::Staged)));
    }
    if !v.verified {
        rotations::set_step(client, rot.id, Step::Staged).await?;
        let notes = record_verify(cx, client, &key_ref, rot.new_key, &v, "", log).await?;
        let recorded = crate::state::job_status(client, cx.name)
            .await?
            .map_or(0, |s| s.quarantined + s.values_not_rotated);
        log.lines.push(if v.values_unreadable() == 0 && recorded == 0 {
            // nothing refused, nothing quarantined: written under an old key behind the run
            format!(
                "verification failed: {notes}; none of them was refused or quarantined: they were written under an old key \
                 behind the run (an application not yet reading the new key, another rekey process on the same tables, \
                 a restore): run `rekey rotate` again (it re-runs the re-encryption over them)"
            )
        } else {
            format!(
                "verification failed: {notes}; values that do not open are in rekey.quarantine, and writes the database refused \
                 or undid (a trigger, a constraint, a policy) in rekey.not_rotated with their reason (`rekey status` counts both): \
                 fix what they name, and run `rekey rotate` again (it re-runs the re-encryption)"
            )
        });
        return Ok(Some((Ended::NotVerified, Step::Staged)));
    }
    rotations::set_step(client, rot.id, Step::Verified).await?;
    let notes = record_verify(cx, client, &key_ref, rot.new_key, &v, "", log).await?;
    log.lines.push(format!("verified: {notes}"));
    Ok(None)
}

/// How an invocation whose promotion proof refused ends: stopped where a
/// stop was asked for during it (its wait ended early), else not verified.
fn not_proven(cx: &Ctx<'_>) -> Ended {
    if cx.opts.settings.stop.requested() {
        Ended::Stopped
    } else {
        Ended::NotVerified
    }
}

/// The proof a promotion needs where the applications read only the new
/// key after it ([`promotion::proof`]), for this rotation.
async fn promotion_proof(
    cx: &Ctx<'_>,
    client: &Client,
) -> Result<Result<crate::engine::verify::Verification, String>, Error> {
    let job = Arc::new(Job::resolve(cx.spec, client).await?);
    promotion::proof(
        cx.db,
        client,
        &job,
        cx.opts.settings.lanes,
        cx.opts.quiet,
        cx.opts.wait_for_writers,
        &cx.opts.settings.stop,
    )
    .await
}

/// Verified -> promoted: the new key becomes current. Where the
/// applications read only the new key after it, a rotation found at
/// `verified` (the invocation that verified was killed, or failed after)
/// proves again first: values may have arrived under the old key since.
pub(crate) async fn promoted(
    cx: &Ctx<'_>,
    client: &Client,
    store: &mut Store,
    rot: &Rotation,
    verified_now: bool,
    log: &mut Log,
) -> Result<Next, Error> {
    let key_ref = format!("{}#{}", store.secret_id(), rot.new_key);
    if promotion::old_key_unread_after_promotion(store) && !verified_now {
        match promotion_proof(cx, client).await? {
            Err(why) => {
                log.lines.push(why);
                return Ok(Some((not_proven(cx), Step::Verified)));
            }
            Ok(v) if !v.verified => {
                // back to the run, which rotates what arrived since
                rotations::set_step(client, rot.id, Step::Staged).await?;
                let notes = record_verify(cx, client, &key_ref, rot.new_key, &v, "", log).await?;
                log.lines.push(format!(
                    "verification failed: {notes}. {}",
                    promotion::refusal(store, rot.new_key, &v)
                ));
                return Ok(Some((Ended::NotVerified, Step::Staged)));
            }
            Ok(_) => {}
        }
    }
    let applied = keeping_alive(
        client,
        steps::promote(store, cx.opts.reveal, cx.opts.compromised),
    )
    .await?;
    rotations::set_step(client, rot.id, Step::Promoted).await?;
    let mut notes = format!(
        "key {} is current; key {} is previous",
        rot.new_key,
        rot.old_key.map_or("-".into(), |k| k.to_string())
    );
    if rot.catch_up_due {
        notes.push_str("; a catch-up run is due for values written behind the run");
    }
    log.record(
        &cx.opts.audit,
        client,
        What {
            event_type: "key_promoted",
            secret_id: &key_ref,
            verification_status: if rot.catch_up_due {
                "partial"
            } else {
                "passed"
            },
            affected_records: None,
            notes: &notes,
            job_id: None,
        },
    )
    .await?;
    log.lines
        .push(format!("promoted key {} to current", rot.new_key));
    if applied.instructions.is_empty() {
        if rot.catch_up_due && !cx.opts.no_wait {
            // the catch-up is for after the applications encrypt with the new key
            log.lines.push(format!(
                "next: reload or redeploy the applications so they encrypt with key {}, then run `rekey rotate` again: \
                 it rotates what they wrote under key {} until then (the catch-up run) \
                 (`--no-wait` goes on at once, for applications that read the store live)",
                rot.new_key,
                rot.old_key.map_or("-".into(), |k| k.to_string())
            ));
            return Ok(Some((Ended::Waiting(Wait::Deploy), Step::Promoted)));
        }
        if rot.grace_s <= 0 && !cx.opts.no_wait {
            // No grace period (a compromise rotation, or `--grace 0s`): the
            // retire would follow at once, while applications not yet
            // reloaded still encrypt with the old key, and what they wrote
            // after its full verify would be left under a key no longer kept.
            log.lines.push(format!(
                "next: reload or redeploy the applications so they encrypt with key {}, then run `rekey rotate` again \
                 to retire key {} (after a full verify) (`--no-wait` goes on at once, for applications that read the store live)",
                rot.new_key,
                rot.old_key.map_or("-".into(), |k| k.to_string())
            ));
            return Ok(Some((Ended::Waiting(Wait::Deploy), Step::Promoted)));
        }
        return Ok(None);
    }
    applied.tell(
        &mut log.lines,
        "make these changes where the application's environment is set, then run `rekey rotate` again:",
    );
    Ok(Some((Ended::Waiting(Wait::Environment), Step::Promoted)))
}

/// Where the key rotation `rot` promoted is not current in the store: in
/// the environment, what is still to be set (`Some`, a wait); elsewhere it
/// was changed by hand since (a refusal). `prefix`: the variables' prefix.
pub(crate) fn promoted_key_not_current(
    store: &Store,
    prefix: &str,
    rot: &Rotation,
) -> Result<Option<String>, Error> {
    let current = store.table().id_in(KeyState::Current);
    if current == Some(rot.new_key) {
        return Ok(None);
    }
    let n = rot.new_key;
    if !store.writable() {
        let p = prefix;
        return Ok(Some(environment_not_yet(
            store,
            &format!("key {n} is not current"),
            format!("{p}_CURRENT_VERSION={n}, {p}_PENDING_VERSION unset"),
            format!("{p}_KEY=<key {n}> and {p}_KEY_VERSION={n}, {p}_KEY_NEW unset"),
        )));
    }
    let meant = match current {
        Some(c) if Some(c) == rot.old_key => format!(
            "; or, if going back to key {c} was meant, `rekey secrets rollback` records it (the store is left as it \
             is), and `rekey run` then rewrites the values under key {n} to key {c}"
        ),
        _ => String::new(),
    };
    Err(Error::Config(format!(
        "key {n} is not current in {} yet: it was changed by hand. Make it current again, then run `rekey rotate`{meant}",
        store.secret_id(),
    )))
}

/// Promoted -> retired, once the grace period is over (at once for a
/// compromise rotation), or once the old key was retired by hand.
pub(crate) async fn retired(
    cx: &Ctx<'_>,
    client: &mut Client,
    store: &mut Store,
    rot: &Rotation,
    mut log: Log,
) -> Result<Progressed, Error> {
    if let Some(line) = promoted_key_not_current(store, &cx.keys.prefix, rot)? {
        log.lines.push(line);
        return Ok(log.end(Ended::Waiting(Wait::Environment), Step::Promoted));
    }
    let Some(old) = rot.old_key else {
        rotations::set_step(client, rot.id, Step::Retired).await?;
        log.lines.push(format!("rotation {} complete", rot.id));
        return Ok(log.end(Ended::Done, Step::Retired));
    };
    let gone = store
        .table()
        .entries
        .iter()
        .find(|e| e.id == old)
        .is_none_or(|e| e.state == KeyState::Retired);
    if gone {
        // retired (or removed) outside rotate: complete only on a full proof
        // that no value is left without its key
        let (v, job) = full_verify(cx, client).await?;
        if !v.verified {
            let (said, named) = said_after(
                &job,
                &v,
                &format!(
                    "put key {old} back (`{}`, or its variable)",
                    restore_command(&job, old)
                ),
            )
            .await;
            log.lines.push(format!(
                "key {old} is gone from {} but {} values are on other keys and {} do not decrypt with the keys there{said}{}; \
                 then run `rekey rotate` again",
                store.secret_id(),
                v.values_on_old_keys,
                v.values_unreadable(),
                rewrites_the_others(&v)
            ));
            log.named_keys.extend(named);
            return Ok(log.end(Ended::NotVerified, Step::Promoted));
        }
        rotations::set_step(client, rot.id, Step::Retired).await?;
        log.lines.push(format!(
            "key {old} was already retired (`rekey secrets retire`), and a full verify finds every value under the keys there; \
             rotation {} complete",
            rot.id
        ));
        return Ok(log.end(Ended::Done, Step::Retired));
    }
    if rot.catch_up_due {
        if let Some((ended, step)) = catch_up::catch_up(cx, client, store, rot, &mut log).await? {
            return Ok(log.end(ended, step));
        }
    }
    // promoted_at is set with the step; if it were missing, the grace period starts now
    let due = rot.promoted_at_s.unwrap_or(now() as i64) + rot.grace_s;
    if (now() as i64) < due {
        let due = due.max(0).unsigned_abs();
        log.lines.push(format!(
            "key {old} stays as previous for the grace period ({}); run `rekey rotate` again after {} to retire it \
             (`--grace` shortens or lengthens it)",
            super::rotation::human(rot.grace_s),
            rfc3339(due)
        ));
        return Ok(log.end(Ended::Waiting(Wait::Grace(due)), Step::Promoted));
    }
    let job = Arc::new(Job::resolve(cx.spec, client).await?);
    let mut opts = cx.opts.clone();
    opts.compromised |= super::audit::is_compromise_reason(&rot.reason);
    // boxed: the retire's future (a full verify's inside) off the stack that polls it
    let outcome = Box::pin(retire(cx.db, client, &job, store, old, &opts)).await?;
    log.lines.extend(outcome.lines);
    log.events.extend(outcome.events);
    log.named_keys.extend(outcome.named_keys);
    if outcome.ended != Ended::Done {
        return Ok(log.end(outcome.ended, Step::Promoted));
    }
    rotations::set_step(client, rot.id, Step::Retired).await?;
    log.lines.push(format!("rotation {} complete", rot.id));
    Ok(log.end(Ended::Done, Step::Retired))
}
