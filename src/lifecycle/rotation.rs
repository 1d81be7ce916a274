//! `rekey rotate`: the procedures users follow by hand, as one resumable
//! command.
//!
//! stage -> run -> verify -> promote -> (after the grace period, on a later
//! invocation) retire. Where the rotation stands is kept in `rekey.rotations`,
//! so a second invocation continues from the step the first one reached;
//! every step is idempotent and writes one audit event. For the environment,
//! which rekey cannot write, a step that changes keys prints the variable
//! changes to make and stops; the next invocation checks they were made.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_postgres::Client;

use crate::crypto::keyring::{Key, KeyId};
use crate::crypto::keytable::{now, rfc3339, KeyState};
use crate::db::Database;
use crate::engine::pipeline::Settings;
use crate::engine::rewrite::{rewrite, RunControl};
use crate::engine::verify::{self, Depth};
use crate::job::{Job, JobSpec};
use crate::lifecycle::audit::{Audit, What};
use crate::lifecycle::steps;
use crate::observe::counts::LiveCounts;
use crate::secrets::{KeysSpec, Store};
use crate::state::rotations::{self, NewRotation, Rotation, Step};
use crate::state::{self, lock_lifecycle};
use crate::Error;

use super::retire::retire;

/// How a rotation runs.
#[derive(Debug, Clone)]
pub struct RotateOptions {
    /// Who, and why, for the audit trail.
    pub audit: Audit,
    /// How long the old key stays after promotion.
    pub grace: Duration,
    /// Print new key values for the environment (on a terminal only).
    pub reveal: bool,
    /// Pipeline settings for the re-encryption.
    pub settings: Settings,
    /// No progress line.
    pub quiet: bool,
    /// The key is retired because it was compromised: its material is
    /// destroyed at once (after the full verify), not archived.
    pub compromised: bool,
}

/// How an invocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The rotation is over, or went as far as it may for now.
    Done,
    /// Waiting for the operator: environment changes, or the grace period.
    Waiting,
    /// Stopped on request during the re-encryption; resumable.
    Stopped,
    /// Values are still on an old key, or undecryptable.
    NotVerified,
}

/// What a rotate invocation did and where it stopped.
pub struct Progressed {
    /// How it ended.
    pub ended: Ended,
    /// Steps taken, and what is left, for the operator.
    pub lines: Vec<String>,
    /// Audit events written.
    pub events: Vec<String>,
    /// The step the rotation stands at.
    pub step: Option<Step>,
}

impl Progressed {
    /// The `--json` object.
    pub fn json(&self, job: &str) -> serde_json::Value {
        json!({ "job": job, "step": self.step.map(Step::as_str), "events": self.events, "messages": self.lines })
    }
}

/// The fingerprint of key `id` in the store, if it holds its material.
fn fingerprint_of(store: &Store, id: KeyId) -> Option<String> {
    store
        .table()
        .entries
        .iter()
        .find(|e| e.id == id)
        .and_then(|e| e.key.as_ref())
        .map(Key::fingerprint)
}

/// The job-level `[keys]` a rotation manages; targets with keys of their own are refused.
pub fn job_keys(spec: &JobSpec) -> Result<KeysSpec, Error> {
    if spec
        .targets
        .iter()
        .any(|t| t.keys.is_some() || t.to_keys.is_some())
    {
        return Err(Error::Config("rotate and secrets manage the job's [keys]; this job has targets with keys of their own: rotate those with a job per key source".into()));
    }
    spec.keys
        .clone()
        .ok_or_else(|| Error::Config("rotate and secrets need a [keys] section".into()))
}

/// One invocation's record: lines for the operator and audit events written.
struct Log {
    lines: Vec<String>,
    events: Vec<String>,
}

impl Log {
    /// Ends the invocation at `step`.
    fn end(self, ended: Ended, step: Step) -> Progressed {
        Progressed {
            ended,
            lines: self.lines,
            events: self.events,
            step: Some(step),
        }
    }
}

/// What every step needs.
struct Ctx<'a> {
    spec: &'a JobSpec,
    keys: &'a KeysSpec,
    db: &'a Database,
    opts: &'a RotateOptions,
}

/// Runs the rotation from wherever it stands until it finishes, waits for
/// the operator (environment changes, grace period), or fails.
pub async fn rotate(
    spec: &JobSpec,
    db: &Database,
    client: &mut Client,
    opts: &RotateOptions,
) -> Result<Progressed, Error> {
    let keys = job_keys(spec)?;
    let name = spec.name.clone().unwrap_or_default();
    state::ensure_schema(client).await?;
    lock_lifecycle(client, &name).await?;
    let cx = Ctx {
        spec,
        keys: &keys,
        db,
        opts,
    };
    let mut log = Log {
        lines: Vec::new(),
        events: Vec::new(),
    };
    loop {
        let rotation = rotations::open_rotation(client, &name).await?;
        let mut store = Store::open(&keys).await?;
        let Some(rot) = rotation else {
            if !stage_new(&cx, client, &mut store, &name, &mut log).await? {
                return Ok(log.end(Ended::Waiting, Step::Staged));
            }
            continue;
        };
        check_staged_key(client, &store, &rot).await?;
        let next = match rot.step {
            Step::Staged => ran(&cx, client, &store, &rot, &mut log).await?,
            Step::Ran => verified(&cx, client, &store, &rot, &mut log).await?,
            Step::Verified => promoted(&cx, client, &mut store, &rot, &mut log).await?,
            Step::Promoted => return retired(&cx, client, &mut store, &rot, log).await,
            Step::Retired | Step::RolledBack => {
                return Err(Error::Runtime(format!(
                    "rotation {} is over but was read as in progress",
                    rot.id
                )))
            }
        };
        if let Some((ended, step)) = next {
            return Ok(log.end(ended, step));
        }
    }
}

/// Stages a new key and records the rotation; false when the operator must
/// first make the environment changes printed.
async fn stage_new(
    cx: &Ctx<'_>,
    client: &Client,
    store: &mut Store,
    name: &str,
    log: &mut Log,
) -> Result<bool, Error> {
    let secret_id = store.secret_id();
    let old = steps::current(store);
    let (id, applied) = steps::stage(store, cx.opts.reveal).await?;
    // The environment's staged key is whatever the operator exports: known at the next step.
    let fingerprint = if store.writable() {
        fingerprint_of(store, id)
    } else {
        None
    };
    let audit = &cx.opts.audit;
    rotations::start_rotation(
        client,
        &NewRotation {
            job_name: name,
            reason: &audit.reason,
            operator: &audit.operator,
            secret_id: &secret_id,
            old_key: old,
            new_key: id,
            grace_s: cx.opts.grace.as_secs() as i64,
            new_fingerprint: fingerprint.as_deref(),
        },
    )
    .await?;
    audit
        .record(
            client,
            What {
                event_type: "key_staged",
                secret_id: &format!("{secret_id}#{id}"),
                verification_status: "not_applicable",
                affected_records: None,
                notes: &format!("key {id} staged as pending"),
                job_id: None,
            },
        )
        .await?;
    log.events.push("key_staged".into());
    log.lines.push(format!("staged key {id} as pending"));
    applied.tell(&mut log.lines, "make these changes where the application's environment is set, then run `rekey rotate` again:");
    Ok(applied.instructions.is_empty())
}

/// Refuses a staged key that was changed by hand; records its fingerprint once known.
async fn check_staged_key(client: &Client, store: &Store, rot: &Rotation) -> Result<(), Error> {
    let Some(found) = fingerprint_of(store, rot.new_key) else {
        return Ok(());
    };
    match &rot.new_fingerprint {
        Some(staged) if *staged != found => Err(Error::Config(format!(
            "key {} in {} is not the key this rotation staged (fingerprint {found}, staged {staged}): it was changed by hand; \
             restore it, or roll back with `rekey secrets rollback`",
            rot.new_key,
            store.secret_id()
        ))),
        Some(_) => Ok(()),
        None => rotations::set_fingerprint(client, rot.id, &found).await,
    }
}

/// Staged -> ran (`None`: go on to the next step): re-encrypts every value under the staged key.
async fn ran(
    cx: &Ctx<'_>,
    client: &mut Client,
    store: &Store,
    rot: &Rotation,
    log: &mut Log,
) -> Result<Option<(Ended, Step)>, Error> {
    let secret_id = store.secret_id();
    if store.table().id_in(KeyState::Pending) != Some(rot.new_key)
        && store.table().id_in(KeyState::Current) != Some(rot.new_key)
    {
        return Err(Error::Config(format!(
            "key {} is not staged in {secret_id} yet: make the changes `rekey rotate` printed (for the environment: {p}_KEY_V{n}=<key> and {p}_PENDING_VERSION={n}), then run it again",
            rot.new_key,
            p = cx.keys.prefix,
            n = rot.new_key
        )));
    }
    let job = Arc::new(Job::resolve(cx.spec, client).await?);
    verify::preflight(client, &job).await?;
    let control = RunControl {
        quiet: cx.opts.quiet,
        ..Default::default()
    };
    let (outcome, record) = rewrite(
        cx.db,
        client,
        &job,
        cx.opts.settings.clone(),
        control,
        Arc::new(LiveCounts::default()),
    )
    .await?;
    if outcome.stopped {
        log.lines
            .push("stopped during re-encryption; run `rekey rotate` again to resume".into());
        return Ok(Some((Ended::Stopped, Step::Staged)));
    }
    let totals = record.prior;
    state::finish_job(
        client,
        record.id,
        &json!({ "rotation": rot.id, "job_totals": totals }),
    )
    .await?;
    rotations::set_step(client, rot.id, Step::Ran).await?;
    let notes = format!(
        "{} values re-encrypted under key {}, {} quarantined",
        totals.values_rewritten, rot.new_key, totals.values_failed
    );
    let key_ref = format!("{secret_id}#{}", rot.new_key);
    cx.opts
        .audit
        .record(
            client,
            What {
                event_type: "reencryption_completed",
                secret_id: &key_ref,
                verification_status: "pending",
                affected_records: Some(totals.values_rewritten),
                notes: &notes,
                job_id: Some(record.id),
            },
        )
        .await?;
    log.events.push("reencryption_completed".into());
    log.lines.push(notes);
    Ok(None)
}

/// Ran -> verified: proves no value is left on an old key (else back to staged).
async fn verified(
    cx: &Ctx<'_>,
    client: &Client,
    store: &Store,
    rot: &Rotation,
    log: &mut Log,
) -> Result<Option<(Ended, Step)>, Error> {
    let key_ref = format!("{}#{}", store.secret_id(), rot.new_key);
    let job = Arc::new(Job::resolve(cx.spec, client).await?);
    let depth = Depth {
        full: false,
        sample: 1000,
        lanes: cx.opts.settings.lanes,
    };
    let v = verify::verify(cx.db, client, &job, depth, cx.opts.quiet).await?;
    let audit = &cx.opts.audit;
    if !v.verified {
        rotations::set_step(client, rot.id, Step::Staged).await?;
        let notes = format!(
            "{} values on old keys, {} undecryptable",
            v.values_on_old_keys, v.values_undecryptable
        );
        audit
            .record(
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
        log.events.push("verification_failed".into());
        log.lines.push(format!("verification failed: {notes}; inspect rekey.quarantine, fix, and run `rekey rotate` again (it re-runs the re-encryption)"));
        return Ok(Some((Ended::NotVerified, Step::Staged)));
    }
    rotations::set_step(client, rot.id, Step::Verified).await?;
    let notes = format!("all {} values under key {}", v.values_total, rot.new_key);
    audit
        .record(
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
    log.events.push("verification_passed".into());
    log.lines.push(format!("verified: {notes}"));
    Ok(None)
}

/// Verified -> promoted: the new key becomes current.
async fn promoted(
    cx: &Ctx<'_>,
    client: &Client,
    store: &mut Store,
    rot: &Rotation,
    log: &mut Log,
) -> Result<Option<(Ended, Step)>, Error> {
    let key_ref = format!("{}#{}", store.secret_id(), rot.new_key);
    let applied = steps::promote(store, cx.opts.reveal).await?;
    rotations::set_step(client, rot.id, Step::Promoted).await?;
    let notes = format!(
        "key {} is current; key {} is previous",
        rot.new_key,
        rot.old_key.map_or("-".into(), |k| k.to_string())
    );
    cx.opts
        .audit
        .record(
            client,
            What {
                event_type: "key_promoted",
                secret_id: &key_ref,
                verification_status: "passed",
                affected_records: None,
                notes: &notes,
                job_id: None,
            },
        )
        .await?;
    log.events.push("key_promoted".into());
    log.lines
        .push(format!("promoted key {} to current", rot.new_key));
    applied.tell(
        &mut log.lines,
        "make these changes where the application's environment is set:",
    );
    Ok((!applied.instructions.is_empty()).then_some((Ended::Waiting, Step::Promoted)))
}

/// Promoted -> retired, once the grace period is over.
async fn retired(
    cx: &Ctx<'_>,
    client: &Client,
    store: &mut Store,
    rot: &Rotation,
    mut log: Log,
) -> Result<Progressed, Error> {
    if store.table().id_in(KeyState::Current) != Some(rot.new_key) {
        return Err(Error::Config(format!(
            "key {} is not current in {} yet: make the changes `rekey rotate` printed (for the environment: {}_CURRENT_VERSION={}), then run it again",
            rot.new_key,
            store.secret_id(),
            cx.keys.prefix,
            rot.new_key
        )));
    }
    let Some(old) = rot.old_key else {
        rotations::set_step(client, rot.id, Step::Retired).await?;
        return Ok(log.end(Ended::Done, Step::Retired));
    };
    // promoted_at is set with the step; if it were missing, the grace period starts now
    let due = rot.promoted_at_s.unwrap_or(now() as i64) + rot.grace_s;
    if (now() as i64) < due {
        log.lines.push(format!("key {old} stays as previous for the grace period; run `rekey rotate` again after {} to retire it", rfc3339(due as u64)));
        return Ok(log.end(Ended::Waiting, Step::Promoted));
    }
    let job = Arc::new(Job::resolve(cx.spec, client).await?);
    let outcome = retire(cx.db, client, &job, store, old, cx.opts).await?;
    log.lines.extend(outcome.lines);
    log.events.extend(outcome.events);
    if outcome.ended != Ended::Done {
        return Ok(log.end(outcome.ended, Step::Promoted));
    }
    rotations::set_step(client, rot.id, Step::Retired).await?;
    Ok(log.end(Ended::Done, Step::Retired))
}
