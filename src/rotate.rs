//! `rekey rotate` and `rekey secrets ...`: the seeds' whole procedure as one
//! resumable command.
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

use crate::audit::{Audit, What};
use crate::checkpoint;
use crate::db::Database;
use crate::error::DbContext;
use crate::job::{Job, JobSpec, KeysSpec};
use crate::keyring::KeyId;
use crate::lifecycle::{now, KeyState};
use crate::pipeline::Settings;
use crate::secrets::Store;
use crate::stats::LiveCounts;
use crate::verify::{self, Depth};
use crate::Error;

use crate::commands::{EXIT_NOT_VERIFIED, EXIT_STOPPED};

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
}

/// One row of `rekey.rotations`.
#[derive(Debug, Clone)]
struct Rotation {
    id: i64,
    step: String,
    old_key: Option<KeyId>,
    new_key: KeyId,
    grace_s: i64,
    promoted_at_s: Option<i64>,
    new_fingerprint: Option<String>,
}

/// One lifecycle command per job at a time: two racing `rotate`s could
/// otherwise stage two different keys under one id. Held by `client`'s
/// session until it closes.
pub async fn lock_lifecycle(client: &Client, name: &str) -> Result<(), Error> {
    if checkpoint::advisory_lock(client, &format!("rekey.lifecycle:{name}")).await? {
        Ok(())
    } else {
        Err(Error::Runtime(format!("another rekey rotate or secrets command is working on job {name:?}; wait for it to finish")))
    }
}

/// The fingerprint of key `id` in the store, if it holds its material.
fn fingerprint_of(store: &Store, id: KeyId) -> Option<String> {
    store.table().entries.iter().find(|e| e.id == id).and_then(|e| e.key.as_ref()).map(crate::keyring::Key::fingerprint)
}

/// The job-level `[keys]` a rotation manages; targets with keys of their own are refused.
pub fn job_keys(spec: &JobSpec) -> Result<KeysSpec, Error> {
    if spec.targets.iter().any(|t| t.keys.is_some() || t.to_keys.is_some()) {
        return Err(Error::Config("rotate and secrets manage the job's [keys]; this job has targets with keys of their own: rotate those with a job per key source".into()));
    }
    spec.keys.clone().ok_or_else(|| Error::Config("rotate and secrets need a [keys] section".into()))
}

async fn open_rotation(client: &Client, name: &str) -> Result<Option<Rotation>, Error> {
    let row = client
        .query_opt(
            "SELECT rotation_id, step, old_key, new_key, grace_s, extract(epoch FROM promoted_at)::bigint, new_fingerprint
               FROM rekey.rotations WHERE job_name = $1 AND step NOT IN ('retired', 'rolled_back')",
            &[&name],
        )
        .await
        .ctx(|| "reading the rotation in progress".into())?;
    let Some(r) = row else { return Ok(None) };
    let key = |v: i64| KeyId::try_from(v).map_err(|_| Error::Runtime(format!("rekey.rotations holds key id {v}, which is not a key id")));
    Ok(Some(Rotation {
        id: r.get(0),
        step: r.get(1),
        old_key: r.get::<_, Option<i64>>(2).map(key).transpose()?,
        new_key: key(r.get(3))?,
        grace_s: r.get(4),
        promoted_at_s: r.get(5),
        new_fingerprint: r.get(6),
    }))
}

async fn set_step(client: &Client, id: i64, step: &str) -> Result<(), Error> {
    client
        .execute(
            "UPDATE rekey.rotations SET step = $2, updated_at = now(),
                    promoted_at = CASE WHEN $2 = 'promoted' THEN now() ELSE promoted_at END,
                    finished_at = CASE WHEN $2 IN ('retired', 'rolled_back') THEN now() ELSE finished_at END
              WHERE rotation_id = $1",
            &[&id, &step],
        )
        .await
        .ctx(|| format!("recording rotation step {step}"))?;
    Ok(())
}

/// What a rotate invocation did and where it stopped.
pub struct Progressed {
    /// Exit code.
    pub code: u8,
    /// Steps taken, and what is left, for the operator.
    pub lines: Vec<String>,
    /// Audit events written.
    pub events: Vec<String>,
    /// The `--json` object.
    pub json: serde_json::Value,
}

/// Runs the rotation from wherever it stands until it finishes, waits for
/// the operator (environment changes, grace period), or fails.
pub async fn rotate(spec: &JobSpec, db: &Database, client: &mut Client, opts: &RotateOptions) -> Result<Progressed, Error> {
    let keys = job_keys(spec)?;
    let name = spec.name.clone().unwrap_or_default();
    checkpoint::ensure_schema(client).await?;
    lock_lifecycle(client, &name).await?;
    let mut lines = Vec::new();
    let mut events = Vec::new();
    let done = |code: u8, lines: Vec<String>, events: Vec<String>, step: &str| Progressed {
        code,
        json: json!({ "job": name, "step": step, "events": events, "messages": lines }),
        lines,
        events,
    };

    loop {
        let rotation = open_rotation(client, &name).await?;
        let mut store = Store::open(&keys).await?;
        let secret_id = store.secret_id();
        let Some(rot) = rotation else {
            let old = store.table().id_in(KeyState::Current);
            let next = store.table().next_id().map_err(|e| Error::Config(e.to_string()))?;
            let new = store.new_key(next).await?;
            let (id, changed) = store.table_mut().stage(new, now()).map_err(|e| Error::Config(e.to_string()))?;
            let instructions = if changed { store.save(opts.reveal).await? } else { Vec::new() };
            // The environment's staged key is whatever the operator exports: known at the next step.
            let fingerprint = if store.writable() { fingerprint_of(&store, id) } else { None };
            client
                .execute(
                    "INSERT INTO rekey.rotations (job_name, step, reason, operator, secret_id, old_key, new_key, grace_s, new_fingerprint)
                     VALUES ($1, 'staged', $2, $3, $4, $5, $6, $7, $8)",
                    &[&name, &opts.audit.reason, &opts.audit.operator, &secret_id, &old.map(i64::from), &i64::from(id), &(opts.grace.as_secs() as i64), &fingerprint],
                )
                .await
                .ctx(|| "recording the rotation".into())?;
            opts.audit.record(client, What { event_type: "key_staged", secret_id: &format!("{secret_id}#{id}"), verification_status: "not_applicable", affected_records: None, notes: &format!("key {id} staged as pending"), job_id: None }).await?;
            events.push("key_staged".into());
            lines.push(format!("staged key {id} as pending"));
            if !instructions.is_empty() {
                lines.push("make these changes where the application's environment is set, then run `rekey rotate` again:".into());
                lines.extend(instructions.iter().map(|i| format!("  {i}")));
                return Ok(done(0, lines, events, "staged"));
            }
            continue;
        };
        let key_ref = format!("{secret_id}#{}", rot.new_key);
        if let Some(found) = fingerprint_of(&store, rot.new_key) {
            match &rot.new_fingerprint {
                Some(staged) if *staged != found => {
                    return Err(Error::Config(format!(
                        "key {} in {secret_id} is not the key this rotation staged (fingerprint {found}, staged {staged}): it was changed by hand; \
                         restore it, or roll back with `rekey secrets rollback`",
                        rot.new_key
                    )))
                }
                Some(_) => {}
                None => {
                    client
                        .execute("UPDATE rekey.rotations SET new_fingerprint = $2 WHERE rotation_id = $1", &[&rot.id, &found])
                        .await
                        .ctx(|| "recording the staged key's fingerprint".into())?;
                }
            }
        }
        match rot.step.as_str() {
            "staged" => {
                if store.table().id_in(KeyState::Pending) != Some(rot.new_key) && store.table().id_in(KeyState::Current) != Some(rot.new_key) {
                    return Err(Error::Config(format!(
                        "key {} is not staged in {secret_id} yet: make the changes `rekey rotate` printed (for the environment: {p}_KEY_V{n}=<key> and {p}_PENDING_VERSION={n}), then run it again",
                        rot.new_key,
                        p = keys.prefix,
                        n = rot.new_key
                    )));
                }
                let job = Arc::new(Job::resolve(spec, client).await?);
                verify::preflight(client, &job).await?;
                let (outcome, record) = crate::commands::rewrite(db, client, &job, opts.settings.clone(), crate::commands::RunControl { quiet: opts.quiet, ..Default::default() }, Arc::new(LiveCounts::default())).await?;
                if outcome.stopped {
                    lines.push("stopped during re-encryption; run `rekey rotate` again to resume".into());
                    return Ok(done(EXIT_STOPPED, lines, events, "staged"));
                }
                let totals = record.prior;
                checkpoint::finish_job(client, record.id, &json!({ "rotation": rot.id, "job_totals": totals })).await?;
                set_step(client, rot.id, "ran").await?;
                let notes = format!("{} values re-encrypted under key {}, {} quarantined", totals.values_rewritten, rot.new_key, totals.values_failed);
                opts.audit.record(client, What { event_type: "reencryption_completed", secret_id: &key_ref, verification_status: "pending", affected_records: Some(totals.values_rewritten), notes: &notes, job_id: Some(record.id) }).await?;
                events.push("reencryption_completed".into());
                lines.push(notes);
            }
            "ran" => {
                let job = Arc::new(Job::resolve(spec, client).await?);
                let depth = Depth { full: false, sample: 1000, lanes: opts.settings.lanes };
                let v = verify::verify(db, client, &job, depth, opts.quiet).await?;
                if !v.verified {
                    set_step(client, rot.id, "staged").await?;
                    let notes = format!("{} values on old keys, {} undecryptable", v.values_on_old_keys, v.values_undecryptable);
                    opts.audit.record(client, What { event_type: "verification_failed", secret_id: &key_ref, verification_status: "failed", affected_records: Some(v.values_total), notes: &notes, job_id: None }).await?;
                    events.push("verification_failed".into());
                    lines.push(format!("verification failed: {notes}; inspect rekey.quarantine, fix, and run `rekey rotate` again (it re-runs the re-encryption)"));
                    return Ok(done(EXIT_NOT_VERIFIED, lines, events, "staged"));
                }
                set_step(client, rot.id, "verified").await?;
                opts.audit.record(client, What { event_type: "verification_passed", secret_id: &key_ref, verification_status: "passed", affected_records: Some(v.values_total), notes: &format!("all {} values under key {}", v.values_total, rot.new_key), job_id: None }).await?;
                events.push("verification_passed".into());
                lines.push(format!("verified: all {} values under key {}", v.values_total, rot.new_key));
            }
            "verified" => {
                let changed = store.table_mut().promote(now()).map_err(|e| Error::Config(e.to_string()))?;
                let instructions = if changed { store.save(opts.reveal).await? } else { Vec::new() };
                set_step(client, rot.id, "promoted").await?;
                opts.audit.record(client, What { event_type: "key_promoted", secret_id: &key_ref, verification_status: "passed", affected_records: None, notes: &format!("key {} is current; key {} is previous", rot.new_key, rot.old_key.map_or("-".into(), |k| k.to_string())), job_id: None }).await?;
                events.push("key_promoted".into());
                lines.push(format!("promoted key {} to current", rot.new_key));
                if !instructions.is_empty() {
                    lines.push("make these changes where the application's environment is set:".into());
                    lines.extend(instructions.iter().map(|i| format!("  {i}")));
                    return Ok(done(0, lines, events, "promoted"));
                }
            }
            "promoted" => {
                if store.table().id_in(KeyState::Current) != Some(rot.new_key) {
                    return Err(Error::Config(format!(
                        "key {} is not current in {secret_id} yet: make the changes `rekey rotate` printed (for the environment: {}_CURRENT_VERSION={}), then run it again",
                        rot.new_key, keys.prefix, rot.new_key
                    )));
                }
                let Some(old) = rot.old_key else {
                    set_step(client, rot.id, "retired").await?;
                    return Ok(done(0, lines, events, "retired"));
                };
                // promoted_at is set with the step; if it were missing, the grace period starts now
                let due = rot.promoted_at_s.unwrap_or(now() as i64) + rot.grace_s;
                let now_s = now() as i64;
                if now_s < due {
                    lines.push(format!(
                        "key {old} stays as previous for the grace period; run `rekey rotate` again after {} to retire it",
                        crate::lifecycle::rfc3339(due as u64)
                    ));
                    return Ok(done(0, lines, events, "promoted"));
                }
                let job = Arc::new(Job::resolve(spec, client).await?);
                let outcome = retire(db, client, &job, &mut store, old, opts).await?;
                lines.extend(outcome.lines);
                events.extend(outcome.events);
                if outcome.code != 0 {
                    return Ok(done(outcome.code, lines, events, "promoted"));
                }
                set_step(client, rot.id, "retired").await?;
                return Ok(done(0, lines, events, "retired"));
            }
            other => return Err(Error::Runtime(format!("rotation {} is in an unknown step {other:?}", rot.id))),
        }
    }
}

/// Retires `old` after proving that no value still needs it.
pub async fn retire(db: &Database, client: &Client, job: &Arc<Job>, store: &mut Store, old: KeyId, opts: &RotateOptions) -> Result<Progressed, Error> {
    let secret_id = store.secret_id();
    let key_ref = format!("{secret_id}#{old}");
    if let Some(t) = job.targets.iter().find(|t| t.filter.is_some()) {
        return Err(Error::Config(format!(
            "target {} has a `where` filter, so verification cannot see every row; retire the key with a job that covers whole tables",
            t.table
        )));
    }
    // Old values may be labelled by either side's codec (a migration reads one format and writes another).
    let depth = Depth { full: false, sample: 1000, lanes: opts.settings.lanes };
    let v = verify::verify(db, client, job, depth, opts.quiet).await?;
    let labels: std::collections::BTreeSet<String> = job.targets.iter().flat_map(|t| [t.read.codec.key_label(old), t.write.codec.key_label(old)]).collect();
    let remaining: u64 = labels.iter().map(|l| v.values_under(l)).sum();
    if remaining > 0 || v.values_undecryptable > 0 {
        let notes = format!("{remaining} values still under key {old}, {} undecryptable; rotate them first (`rekey run`)", v.values_undecryptable);
        opts.audit.record(client, What { event_type: "retire_refused", secret_id: &key_ref, verification_status: "failed", affected_records: Some(remaining), notes: &notes, job_id: None }).await?;
        return Ok(Progressed { code: EXIT_NOT_VERIFIED, lines: vec![format!("refusing to retire key {old}: {notes}")], events: vec!["retire_refused".into()], json: json!({}) });
    }
    let changed = store.table_mut().retire(old, crate::lifecycle::now()).map_err(|e| Error::Config(e.to_string()))?;
    let instructions = if changed { store.save(false).await? } else { Vec::new() };
    opts.audit.record(client, What { event_type: "key_retired", secret_id: &key_ref, verification_status: "passed", affected_records: Some(v.values_total), notes: &format!("key {old} retired; no value needs it"), job_id: None }).await?;
    let mut lines = vec![format!("retired key {old}")];
    if !instructions.is_empty() {
        lines.push("make these changes where the application's environment is set:".into());
        lines.extend(instructions.iter().map(|i| format!("  {i}")));
    }
    Ok(Progressed { code: 0, lines, events: vec!["key_retired".into()], json: json!({}) })
}
