//! `rekey rotate`: the procedures users follow by hand, as one resumable
//! command, with a stop wherever the operator has something to do.
//!
//! stage -> (the operator redeploys so applications read both keys) -> run
//! -> verify -> promote -> (after the grace period) retire. Where the
//! rotation stands is kept in `rekey.rotations`, so a later invocation
//! continues from the step the last one reached; every step is idempotent
//! and writes one audit event. An invocation that stops for the operator
//! ends [`Ended::Waiting`] and says for what ([`Wait`]); only a rotation
//! that is over ends [`Ended::Done`]. A finished rotation is not followed
//! by another unless asked for ([`Intent::New`]); one not yet promoted can
//! be cancelled ([`Intent::Abort`], in `abort`).

use std::time::Duration;

use serde_json::json;
use tokio_postgres::Client;

use crate::crypto::keyring::{Key, KeyId};
use crate::crypto::keytable::rfc3339;
use crate::db::idle::keeping_alive;
use crate::db::Database;
use crate::engine::named_keys::{self, NamedKey};
use crate::engine::pipeline::Settings;
use crate::error::DbContext;
use crate::job::JobSpec;
use crate::lifecycle::audit::{Audit, What};
use crate::lifecycle::steps;
use crate::secrets::{KeysSpec, Store};
use crate::state::rotations::{self, Finished, NewRotation, Rotation, Step};
use crate::state::{self, lock_lifecycle};
use crate::Error;

use super::{abort, forward};

/// The grace period of a rotation started without `--grace`.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

/// What the operator asked `rekey rotate` to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Continue the rotation in progress; start one only if the job never had one.
    Continue,
    /// Start the next rotation (the last one is over).
    New,
    /// Cancel the rotation in progress (before promotion).
    Abort,
}

/// How a rotation runs.
#[derive(Debug, Clone)]
pub struct RotateOptions {
    /// Who, and why, for the audit trail.
    pub audit: Audit,
    /// How long the old key stays after promotion, when given (it then
    /// replaces what the rotation recorded, at any step).
    pub grace: Option<Duration>,
    /// Print new key values for the environment (on a terminal only).
    pub reveal: bool,
    /// Pipeline settings for the re-encryption.
    pub settings: Settings,
    /// No progress line.
    pub quiet: bool,
    /// The key is retired because it was compromised: no grace period, and
    /// its material is destroyed at once (after the full verify), not archived.
    pub compromised: bool,
    /// After staging, go on at once instead of stopping for the deployment
    /// (`--no-wait`: the applications already read the pending key).
    pub no_wait: bool,
    /// Continue, start the next rotation, or cancel.
    pub intent: Intent,
    /// Tables (`schema.table`) the job rotated earlier and its file no
    /// longer lists, which a retire goes on without on the operator's word
    /// (`--accept-unverified`), recording them in the audit trail.
    pub accept_unverified: Vec<String>,
    /// How long a retire waits for transactions still open that wrote to
    /// the job's tables before its verify; one still open then refuses it.
    pub wait_for_writers: Duration,
    /// How long a retire waits, after its verify, for the standbys to
    /// replay the rotation's writes; one still behind then refuses it.
    pub wait_for_replicas: Duration,
    /// The key retiring was staged and never current (an abort's): another
    /// job's tables can hold values under it only where a run of that job
    /// wrote under it, not where applications wrote under the current key.
    pub never_current: bool,
}

/// What an invocation stopped for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The new key is staged: redeploy so applications read both keys.
    Deploy,
    /// Rekey cannot write the environment: make the changes printed.
    Environment,
    /// The old key stays until the grace period ends (Unix seconds).
    Grace(u64),
    /// Nothing but the next `rekey rotate` (what `--dry-run` says of a
    /// rotation in progress).
    Rotate,
}

impl Wait {
    /// The word `--json` gives.
    pub fn as_str(self) -> &'static str {
        match self {
            Wait::Deploy => "deploy",
            Wait::Environment => "environment",
            Wait::Grace(_) => "grace_period",
            Wait::Rotate => "rotate",
        }
    }
}

/// How an invocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The rotation is over (or the step asked for is done).
    Done,
    /// Waiting for the operator, or for the grace period.
    Waiting(Wait),
    /// Stopped on request (a signal under `rotate`) during the
    /// re-encryption, a wait, or between steps; resumable.
    Stopped,
    /// Values are still on an old key, or undecryptable.
    NotVerified,
}

impl Ended {
    /// The word `--json` gives.
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::Done => "done",
            Ended::Waiting(_) => "waiting",
            Ended::Stopped => "stopped",
            Ended::NotVerified => "not_verified",
        }
    }
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
    /// The rotation, when there is one.
    pub rotation: Option<RotationInfo>,
    /// The keys that values no key given opens are under (those a retire
    /// or a step of the rotation was refused for, or found since it
    /// ended), with what brings each back (`named_keys` in `--json`, as
    /// verify's).
    pub named_keys: Vec<NamedKey>,
}

/// The rotation an invocation worked on, for `--json`.
#[derive(Debug, Clone, Copy)]
pub struct RotationInfo {
    /// `rotation_id`.
    pub id: i64,
    /// The key rotated from.
    pub old_key: Option<KeyId>,
    /// The key rotated to.
    pub new_key: KeyId,
    /// Seconds the old key stays after promotion.
    pub grace_s: i64,
    /// When the old key may be retired (Unix seconds): known once the new
    /// key is promoted, until the old one is retired.
    pub retire_after: Option<u64>,
}

impl RotationInfo {
    /// What `--json` says of `rot`.
    pub fn of(rot: &Rotation) -> RotationInfo {
        let retire_after = match (rot.step, rot.promoted_at_s) {
            (Step::Promoted, Some(at)) => u64::try_from(at.saturating_add(rot.grace_s)).ok(),
            _ => None,
        };
        RotationInfo {
            id: rot.id,
            old_key: rot.old_key,
            new_key: rot.new_key,
            grace_s: rot.grace_s,
            retire_after,
        }
    }
}

impl Progressed {
    /// The `--json` object.
    pub fn json(&self, job: &str) -> serde_json::Value {
        let (waiting_for, retire_after) = match self.ended {
            Ended::Waiting(w @ Wait::Grace(at)) => (Some(w.as_str()), Some(rfc3339(at))),
            Ended::Waiting(w) => (Some(w.as_str()), None),
            _ => (None, None),
        };
        // known from the rotation however this invocation ended
        let retire_after =
            retire_after.or_else(|| self.rotation.and_then(|r| r.retire_after).map(rfc3339));
        json!({
            "job": job,
            "step": self.step.map(Step::as_str),
            "ended": self.ended.as_str(),
            "waiting_for": waiting_for,
            "retire_after": retire_after,
            "rotation": self.rotation.map(|r| r.id),
            "old_key": self.rotation.and_then(|r| r.old_key),
            "new_key": self.rotation.map(|r| r.new_key),
            "grace_s": self.rotation.map(|r| r.grace_s),
            "events": self.events,
            "messages": self.lines,
            "named_keys": self.named_keys,
        })
    }
}

/// The fingerprint of key `id` in the store, if it holds its material.
pub(crate) fn fingerprint_of(store: &Store, id: KeyId) -> Option<String> {
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
    if spec.targets_have_own_keys() {
        return Err(Error::Config("rotate and secrets manage the job's [keys]; this job has targets with keys of their own: rotate those with a job per key source".into()));
    }
    spec.keys
        .clone()
        .ok_or_else(|| Error::Config("rotate and secrets need a [keys] section".into()))
}

/// One invocation's record: lines for the operator and audit events written.
#[derive(Default)]
pub(crate) struct Log {
    pub lines: Vec<String>,
    pub events: Vec<String>,
    pub rotation: Option<RotationInfo>,
    pub named_keys: Vec<NamedKey>,
}

impl Log {
    /// What this invocation changed so far, for a failure after it (none
    /// where it recorded no event).
    fn said(&self) -> Option<String> {
        (!self.events.is_empty()).then(|| self.lines.join("; "))
    }

    /// Ends the invocation at `step`.
    pub fn end(self, ended: Ended, step: Step) -> Progressed {
        Progressed {
            ended,
            lines: self.lines,
            events: self.events,
            step: Some(step),
            rotation: self.rotation,
            named_keys: self.named_keys,
        }
    }

    /// Records the audit event `what` and notes it.
    pub async fn record(
        &mut self,
        audit: &Audit,
        client: &Client,
        what: What<'_>,
    ) -> Result<(), Error> {
        audit.record(client, what).await?;
        self.events.push(what.event_type.into());
        Ok(())
    }
}

/// A step's answer: `None` to go on to the next step, else where the
/// invocation ends.
pub(crate) type Next = Option<(Ended, Step)>;

/// What every step needs.
pub(crate) struct Ctx<'a> {
    pub spec: &'a JobSpec,
    pub keys: &'a KeysSpec,
    pub db: &'a Database,
    pub opts: &'a RotateOptions,
    pub name: &'a str,
}

/// Runs the rotation from wherever it stands until it finishes, waits for
/// the operator (deployment, environment changes, grace period), or fails.
pub async fn rotate(
    spec: &JobSpec,
    db: &Database,
    client: &mut Client,
    opts: &RotateOptions,
) -> Result<Progressed, Error> {
    let keys = job_keys(spec)?;
    let name = spec.name.clone().unwrap_or_default();
    state::ensure_schema(client).await?;
    // where the rotation stood before this invocation waited for the lock:
    // one promoted meanwhile by another invocation is not retired by this one
    let seen = rotations::open_rotation(client, &name)
        .await?
        .map(|r| (r.id, r.step));
    lock_lifecycle(client, &name).await?;
    // a rotation started as a compromise one stays so, whether or not this
    // invocation says `--reason compromise` again
    let mut opts = opts.clone();
    opts.compromised |= compromise_in_progress(client, &name).await?;
    let opts = &opts;
    let cx = Ctx {
        spec,
        keys: &keys,
        db,
        opts,
        name: &name,
    };
    let mut log = Log::default();
    match run_steps(&cx, client, &mut log, seen).await {
        // a failure after this invocation changed something says what it
        // changed: the failure's own "nothing was written" is its step's
        Err(e) => Err(with_changes(e, log.said())),
        ended => ended,
    }
}

/// `e`, saying what the invocation changed before it (`said`), if anything.
fn with_changes(e: Error, said: Option<String>) -> Error {
    match said {
        Some(done) => e.after(&done),
        None => e,
    }
}

/// The rotation's steps from wherever it stands, noted in `log`.
/// `seen`: the rotation in progress (id, step) before the invocation waited
/// for the job's lifecycle lock.
async fn run_steps(
    cx: &Ctx<'_>,
    client: &mut Client,
    log: &mut Log,
    seen: Option<(i64, Step)>,
) -> Result<Progressed, Error> {
    let (name, keys, opts) = (cx.name, cx.keys, cx.opts);
    let mut intent = opts.intent;
    // whether this invocation verified the rotation (the step before promotion)
    let mut verified_now = false;
    // whether this invocation promoted it
    let mut promoted_now = false;
    loop {
        let rotation = rotations::open_rotation(client, name).await?;
        // the lock's session is kept from idling while the store works
        let mut store = keeping_alive(client, Store::open(keys)).await?;
        let Some(mut rot) = rotation else {
            if let Some(over) = nothing_open(cx, client, intent, log).await? {
                return Ok(over);
            }
            let wait = stage_new(cx, client, &mut store, log).await?;
            // the rotation asked for is started: what follows continues it
            intent = Intent::Continue;
            match wait {
                Some(w) => return Ok(std::mem::take(log).end(Ended::Waiting(w), Step::Staged)),
                None => continue,
            }
        };
        adjust(cx, client, &mut rot, log).await?;
        log.rotation = Some(RotationInfo::of(&rot));
        if intent == Intent::New {
            return Err(no_new_beside(&rot, name));
        }
        if intent == Intent::Abort || rot.step == Step::Aborting {
            let before = log.said();
            return abort::abort(cx, client, &mut store, &rot, std::mem::take(log))
                .await
                .map_err(|e| with_changes(e, before));
        }
        forward::check_staged_key(client, &store, &rot).await?;
        // a stop asked for during a step that does not watch for it (a
        // verify) ends the invocation before the next step changes anything
        if opts.settings.stop.requested() {
            log.lines.push(format!(
                "stopped at step {}: run the same command again to go on",
                rot.step.as_str()
            ));
            return Ok(std::mem::take(log).end(Ended::Stopped, rot.step));
        }
        let next = match rot.step {
            Step::Staged => forward::ran(cx, client, &store, &rot, log).await?,
            Step::Ran => {
                verified_now = true;
                forward::verified(cx, client, &store, &rot, log).await?
            }
            Step::Verified => {
                promoted_now = true;
                forward::promoted(cx, client, &mut store, &rot, verified_now, log).await?
            }
            Step::Promoted
                if !promoted_now && !opts.no_wait && seen != Some((rot.id, Step::Promoted)) =>
            {
                // Promoted by another invocation while this one waited for
                // it (two terminals, a retry): that one stopped for the
                // applications to be reloaded, and this one is not the
                // invocation after the reload.
                log.lines.push(format!(
                    "rotation {} was promoted by another `rekey rotate` while this one waited for it: reload or redeploy \
                     the applications so they encrypt with key {}, then run `rekey rotate` again",
                    rot.id, rot.new_key
                ));
                return Ok(std::mem::take(log).end(Ended::Waiting(Wait::Deploy), Step::Promoted));
            }
            Step::Promoted => {
                let before = log.said();
                return forward::retired(cx, client, &mut store, &rot, std::mem::take(log))
                    .await
                    .map_err(|e| with_changes(e, before));
            }
            Step::Retired | Step::RolledBack | Step::Aborting => {
                return Err(Error::Runtime(format!(
                    "rotation {} is at step {} but was read as going forward",
                    rot.id,
                    rot.step.as_str()
                )))
            }
        };
        if let Some((ended, step)) = next {
            return Ok(std::mem::take(log).end(ended, step));
        }
    }
}

/// Whether job `name`'s rotation in progress is a compromise one: its later
/// steps are, by `rotate` or `rekey secrets`, without `--reason compromise`
/// said again.
pub async fn compromise_in_progress(client: &Client, name: &str) -> Result<bool, Error> {
    Ok(rotations::open_rotation(client, name)
        .await?
        .is_some_and(|r| super::audit::is_compromise_reason(&r.reason)))
}

/// `rotate --new` refused beside rotation `rot` of job `name`, in progress.
pub(crate) fn no_new_beside(rot: &Rotation, name: &str) -> Error {
    Error::Config(format!(
        "rotation {} of job {name} is in progress (step {}): continue it with `rekey rotate`, or cancel it with `rekey rotate --abort`",
        rot.id,
        rot.step.as_str()
    ))
}

/// `rotate --abort` of job `name` with no rotation in progress, `last` the
/// last one over: done (what it says, and the step) where that one was
/// rolled back already (an abort run again after it finished), else refused.
pub(crate) fn nothing_to_abort(
    name: &str,
    last: Option<&Finished>,
) -> Result<(String, Step), Error> {
    if let Some(last) = last.filter(|l| l.step == Step::RolledBack) {
        return Ok((
            format!(
                "rotation {} was rolled back already (ended {}): nothing is left to abort",
                last.id, last.finished_at
            ),
            last.step,
        ));
    }
    Err(Error::Config(format!(
        "job {name} has no rotation in progress to abort{}",
        last.map_or(String::new(), |l| format!(
            " (rotation {} ended {} with its old key retired: a finished rotation is not undone; \
             `rekey rotate --new` starts the next one)",
            l.id, l.finished_at
        ))
    )))
}

/// With no rotation in progress: the answer, unless a new one should start.
async fn nothing_open(
    cx: &Ctx<'_>,
    client: &Client,
    intent: Intent,
    log: &mut Log,
) -> Result<Option<Progressed>, Error> {
    let last = rotations::last_finished(client, cx.name).await?;
    // `--json` names the rotation its lines are about
    log.rotation = last.as_ref().map(|l| RotationInfo {
        id: l.id,
        old_key: l.old_key,
        new_key: l.new_key,
        grace_s: l.grace_s,
        retire_after: None,
    });
    if intent == Intent::Abort {
        let (line, step) = nothing_to_abort(cx.name, last.as_ref())?;
        log.lines.push(line);
        return Ok(Some(std::mem::take(log).end(Ended::Done, step)));
    }
    let Some(last) = last else {
        // a job's first rotation starts without --new
        return Ok(None);
    };
    if intent == Intent::New {
        // the next rotation's, once it starts
        log.rotation = None;
        return Ok(None);
    }
    let (ended, line, named) = since_last(client, cx.spec, cx.keys, &last).await?;
    log.lines.push(line);
    log.named_keys.extend(named);
    Ok(Some(std::mem::take(log).end(ended, last.step)))
}

/// Where things stand since rotation `last` ended, as `rotate` and `rotate
/// --dry-run` both say it: complete (or rolled back) as it left things, or
/// what changed since and how to go on (not verified). What may change: the
/// store's keys (a stage or promote outside `rekey rotate`, a `rotate
/// --new` stopped before it recorded its rotation) and the values (a
/// rollback leaves values under the key it turned away from until a run,
/// values restored from a backup may be under a key retired since: the
/// keys they name, with what brings each back, are returned).
pub(super) async fn since_last(
    client: &Client,
    spec: &JobSpec,
    store_keys: &KeysSpec,
    last: &rotations::Finished,
) -> Result<(Ended, String, Vec<NamedKey>), Error> {
    let job = match crate::job::Job::resolve(spec, client).await {
        Ok(job) => job,
        Err(e) => {
            // keys that cannot be loaded as they stand (a key table's current key
            // marked compromised with nothing staged): the next rotation is the way on
            return Ok((
                Ended::NotVerified,
                format!(
                    "rotation {} ended ({}), and the job's keys cannot be used as they stand: {}; \
                     `rekey rotate --new` starts the next rotation",
                    last.id,
                    last.finished_at,
                    e.chain()
                ),
                Vec::new(),
            ));
        }
    };
    let plans = crate::engine::plan::count_by_key(client, &job).await?;
    let off_target: Vec<&crate::engine::plan::ColumnPlan> =
        crate::engine::plan::visibly_off_target(&job, &plans).collect();
    let left: u64 = off_target.iter().map(|c| c.to_rewrite).sum();
    // values under a key the job's keys do not hold (a key retired since,
    // values restored from a backup): no run rewrites them until it is back
    // counted by store: targets sharing one name its keys once
    let mut by_store = std::collections::BTreeMap::new();
    for target in &job.targets {
        let Some(spec) = target.read.source.as_ref() else {
            continue;
        };
        let (_, not_held) = by_store
            .entry(spec.store_label())
            .or_insert_with(|| (target, std::collections::BTreeMap::new()));
        for c in off_target.iter().filter(|c| c.target == target.index) {
            for (id, n) in &c.not_held {
                *not_held.entry(*id).or_default() += n;
            }
        }
    }
    let mut named = Vec::new();
    for (target, not_held) in by_store.values() {
        if !not_held.is_empty() {
            named.extend(named_keys::named_in_counts(&job, target, not_held).await);
        }
    }
    let not_held: u64 = named.iter().map(|n| n.values).sum();
    // the store the rotation is about: a target with keys of its own is another's
    let keys = job
        .targets
        .iter()
        .find(|t| t.write.source.as_ref() == Some(store_keys))
        .map(|t| &t.write.keyring);
    let (pending, target) = (
        keys.and_then(|k| k.pending_id()),
        keys.map(|k| k.target().id()),
    );
    let mut changed = Vec::new();
    if let Some(p) = pending {
        changed.push(format!(
            "key {p} is staged in the store, outside any rotation rekey recorded (a `rekey secrets stage`, or a \
             `rekey rotate --new` stopped before it recorded its rotation): `rekey rotate --new` takes it up as the \
             next rotation"
        ));
    } else if let (Some(t), Step::RolledBack, Some(old)) = (target, last.step, last.old_key) {
        if t != old {
            changed.push(format!(
                "key {t} is current in the store, not key {old}, which rotation {} was rolled back to: make key {old} \
                 current again (the changes `rekey secrets rollback` printed), or `rekey rotate --new` starts the next rotation",
                last.id
            ));
        }
    } else if let (Some(t), Step::Retired) = (target, last.step) {
        if t != last.new_key {
            changed.push(format!(
                "key {t} is current in the store, not key {} as rotation {} left it (promoted outside \
                 `rekey rotate`): `rekey run` and `rekey verify` finish what that promotion started; \
                 `rekey rotate --new` starts the next rotation",
                last.new_key, last.id
            ));
        }
    }
    if left > not_held {
        changed.push(format!(
            "{} values are not on key {}: `rekey run` rewrites them",
            left - not_held,
            target.map_or_else(|| "the target key".to_string(), |t| t.to_string())
        ));
    }
    changed.extend(named_keys::advice(&named));
    // values that do not show their key: no count tells whether a rollback's
    // rewrite back happened, so a run begun after it must have finished
    let hidden: Vec<String> = crate::engine::plan::keys_hidden(&job, &plans)
        .map(|c| format!("{}.{}", c.table, c.column))
        .collect();
    if last.step == Step::RolledBack
        && !hidden.is_empty()
        && rotations::rewrite_back_unproven(client, last.id, &job.name).await?
    {
        changed.push(format!(
            "the values of {} do not show their key without decrypting, and no run has finished since the rollback \
             writing every value under {}: those rewritten under key {} before it are still there until `rekey run` \
             rewrites them (`rekey verify --full` counts them)",
            hidden.join(", "),
            last.old_key.map_or_else(|| "the current key".to_string(), |k| format!("key {k}")),
            last.new_key,
        ));
    }
    if !changed.is_empty() {
        let how = match last.step {
            Step::RolledBack => "was rolled back",
            _ => "ended",
        };
        return Ok((
            Ended::NotVerified,
            format!(
                "rotation {} {how} ({}), but it is not where things stand now: {}",
                last.id,
                last.finished_at,
                changed.join("; ")
            ),
            named,
        ));
    }
    let how = match last.step {
        Step::RolledBack => "was rolled back".to_string(),
        _ => format!("is complete (key {} current)", last.new_key),
    };
    Ok((
        Ended::Done,
        format!(
            "rotation {} {how}, ended {}; start the next one with `rekey rotate --new`",
            last.id, last.finished_at
        ),
        Vec::new(),
    ))
}

/// A compromise rotation ends by destroying the old key on a full verify,
/// which no verify of a job with a `where` filter is: refused before any
/// change, so no key is staged and no value rewritten for a rotation that
/// could never end.
pub fn refuse_filtered_compromise(spec: &JobSpec, compromised: bool) -> Result<(), Error> {
    match spec.targets.iter().find(|t| t.filter.is_some()) {
        Some(t) if compromised => Err(Error::Config(format!(
            "target {} has a `where` filter, so no verify sees every row, and a compromise rotation ends by \
             destroying the compromised key once a full verify shows no value needs it: rotate with a job that \
             covers whole tables (a rotation of the filtered rows alone cannot retire the key)",
            t.table
        ))),
        _ => Ok(()),
    }
}

/// Refuses, before a key is staged, a job with a `where` filter where the
/// store's layout leaves the applications only the new key once it is
/// promoted: the promotion rests on a full verify of whole tables
/// ([`super::promotion::proof`]), so the rotation would rewrite the
/// filtered rows and then stop short of promoting.
fn refuse_filtered_where_promotion_needs_whole_tables(
    spec: &JobSpec,
    store: &Store,
) -> Result<(), Error> {
    if !super::promotion::old_key_unread_after_promotion(store) {
        return Ok(());
    }
    match spec.targets.iter().find(|t| t.filter.is_some()) {
        Some(t) => Err(Error::Config(format!(
            "target {} has a `where` filter, and once the new key is promoted the applications read only it ({} keeps \
             no place for the old key), so the promotion needs a full verify of whole tables, which no filtered job \
             gives: rotate with a job that covers whole tables (`rekey run` with this one rewrites the filtered rows \
             alone). Nothing was staged",
            t.table,
            store.secret_id()
        ))),
        None => Ok(()),
    }
}

/// Applies what this invocation changes in a rotation in progress: a
/// `--grace` given now, or the switch to compromise mode.
async fn adjust(
    cx: &Ctx<'_>,
    client: &Client,
    rot: &mut Rotation,
    log: &mut Log,
) -> Result<(), Error> {
    if cx.opts.compromised && !super::audit::is_compromise_reason(&rot.reason) {
        refuse_filtered_compromise(cx.spec, cx.opts.compromised)?;
        // the reason as said (`suspected_key_compromise`, ...), and the
        // incident and notes given with it, for the events that follow
        let audit = &cx.opts.audit;
        let reason = audit
            .reason
            .clone()
            .filter(|r| super::audit::is_compromise_reason(r))
            .unwrap_or_else(|| "compromise".into());
        rotations::set_compromised(
            client,
            rot.id,
            &reason,
            audit.incident_id.as_deref(),
            audit.operator_notes.as_deref(),
        )
        .await?;
        rot.reason = reason;
        rot.grace_s = 0;
        log.lines.push(format!(
            "rotation {} is now a compromise rotation: no grace period, and the old key's material is destroyed when it is retired",
            rot.id
        ));
    }
    if let Some(g) = cx.opts.grace {
        let g = grace_s(cx.opts.compromised, g)?;
        if g != rot.grace_s {
            rotations::set_grace(client, rot.id, g).await?;
            log.lines.push(format!(
                "grace period set to {} (was {})",
                human(g),
                human(rot.grace_s)
            ));
            rot.grace_s = g;
        }
    }
    Ok(())
}

/// The grace period in seconds; a compromise rotation has none.
pub(super) fn grace_s(compromised: bool, g: Duration) -> Result<i64, Error> {
    if compromised && !g.is_zero() {
        return Err(Error::Config(
            "a compromise rotation has no grace period: the compromised key is retired as soon as a full verify shows no value needs it; drop --grace".into(),
        ));
    }
    i64::try_from(g.as_secs()).map_err(|_| {
        Error::Config(format!(
            "--grace {} is too long",
            humantime::format_duration(g)
        ))
    })
}

/// Seconds as a duration an operator reads.
pub(crate) fn human(s: i64) -> String {
    humantime::format_duration(Duration::from_secs(s.max(0).unsigned_abs())).to_string()
}

/// Refuses to stage a second key in the environment while another job's
/// rotation on the same variables staged one that is not set there yet:
/// rekey cannot see it, so it would stage another beside it, and the two
/// rotations would each wait for the environment to make its own key
/// current. Once the first key is set, this job's rotation takes it up.
/// `name` is the job's (`""` for one without a name), `prefix` its
/// variables' prefix.
pub(crate) async fn refuse_beside_a_staged_key_not_yet_set(
    client: &Client,
    name: &str,
    prefix: &str,
    store: &Store,
) -> Result<(), Error> {
    if store.writable() {
        // a key staged there is in the store at once, and a stage takes it up
        return Ok(());
    }
    let others = rotations::others_staged(client, name, &store.secret_id()).await?;
    let pending = store
        .table()
        .id_in(crate::crypto::keytable::KeyState::Pending);
    let name = |job: &str| {
        if job.is_empty() {
            "a job without a name".to_string()
        } else {
            format!("job {job:?}")
        }
    };
    if let Some((job, rotation, n, _)) = others.iter().find(|o| o.3 == Step::Aborting) {
        return Err(Error::Config(format!(
            "{} is giving up its rotation {rotation} to key {n} in {} (aborting): a key staged now would be taken \
             away with it. Let that abort end first (`rekey rotate --abort` with its job file), then run `rekey \
             rotate` for this job again. Nothing was staged",
            name(job),
            store.secret_id()
        )));
    }
    let Some((job, rotation, n, _)) = others.into_iter().find(|o| Some(o.2) != pending) else {
        return Ok(());
    };
    let p = prefix;
    let set = if store.holds_unstaged_keys() {
        format!("{p}_KEY_V{n} and {p}_PENDING_VERSION={n}")
    } else {
        super::forward::dual_staging(store, p, n)
    };
    Err(Error::Config(format!(
        "{} staged key {n} in {} (rotation {rotation}), and the environment does not hold it as the pending key \
         yet: a second key staged beside it would leave the two rotations each waiting for its own key to be made \
         current. Make the changes that job's `rekey rotate` printed ({set}), then run `rekey rotate` for this job \
         again: it rotates to the same key. Or give that rotation up (`rekey rotate --abort` with its job file). \
         Nothing was staged",
        name(&job),
        store.secret_id()
    )))
}

/// What the checks before a stage found: the rotation's grace period, and
/// the job as its preflight resolved it (none where the current key is
/// marked compromised, and no preflight ran).
pub(super) struct StageChecked {
    pub grace_s: i64,
    pub job: Option<crate::job::Job>,
}

/// Every refusal a stage gives before it changes anything, for the stage
/// and for `rotate --dry-run` alike: the grace period asked for, a filtered
/// job where it cannot end, another job's key staged beside (read only
/// where the engine state exists: `recorded`), and the run's preflight (a
/// privilege, a table rekey may not see whole, values that do not open);
/// not the preflight where the current key is marked compromised, as no
/// keyring is loaded over it until a new key is staged (the run checks all
/// this then). `name`: the job's, as rotations record it.
pub(super) async fn refuse_stage(
    spec: &JobSpec,
    client: &Client,
    store: &Store,
    name: &str,
    opts: &RotateOptions,
    recorded: bool,
) -> Result<StageChecked, Error> {
    let grace_s = if opts.compromised {
        grace_s(true, opts.grace.unwrap_or_default())?
    } else {
        grace_s(false, opts.grace.unwrap_or(DEFAULT_GRACE))?
    };
    refuse_filtered_compromise(spec, opts.compromised)?;
    refuse_filtered_where_promotion_needs_whole_tables(spec, store)?;
    // one query, before the preflight's sampling
    if recorded {
        let prefix = &job_keys(spec)?.prefix;
        refuse_beside_a_staged_key_not_yet_set(client, name, prefix, store).await?;
    }
    let job = if store.table().compromised_current().is_none() {
        let job = crate::job::Job::resolve(spec, client).await?;
        // what the re-encryption reads besides is for its own preflight
        let _reads = crate::engine::verify::preflight(
            client,
            &job,
            crate::engine::verify::TargetKey::Given,
            crate::engine::verify::Forcing::NoFlag("rekey rotate"),
            opts.settings.timeouts.lock,
        )
        .await?;
        Some(job)
    } else {
        None
    };
    Ok(StageChecked { grace_s, job })
}

/// Stages a new key and records the rotation; says what it waits for,
/// if anything, before the rotation can go on. Where the store holds no
/// staged key until the operator sets it (the environment), one stage at a
/// time per store: two jobs' rotations racing past
/// [`refuse_beside_a_staged_key_not_yet_set`] would each stage a key.
async fn stage_new(
    cx: &Ctx<'_>,
    client: &Client,
    store: &mut Store,
    log: &mut Log,
) -> Result<Option<Wait>, Error> {
    if store.writable() {
        return stage_and_record(cx, client, store, log).await;
    }
    let lock = format!("rekey.stage:{}", store.secret_id());
    state::locks::wait_for(client, &lock).await.ctx(|| {
        format!(
            "waiting for other rotations staging a key in {}",
            store.secret_id()
        )
    })?;
    let staged = stage_and_record(cx, client, store, log).await;
    // the session's end frees it too: a failed release hides nothing staged
    if let Err(e) = state::locks::release(client, &lock).await {
        tracing::warn!("releasing the lock {lock:?}: {e}");
    }
    staged
}

/// [`stage_new`], once no other rotation is staging a key in the store.
async fn stage_and_record(
    cx: &Ctx<'_>,
    client: &Client,
    store: &mut Store,
    log: &mut Log,
) -> Result<Option<Wait>, Error> {
    let checked = refuse_stage(cx.spec, client, store, cx.name, cx.opts, true).await?;
    // The store's record of the databases using it: a run that cannot
    // write it stops before its first write, and found only then, the
    // rotation would have staged a key for nothing
    if let Some(job) = &checked.job {
        crate::engine::uses::starting(client, job).await?;
    }
    let grace = checked.grace_s;
    let secret_id = store.secret_id();
    let old = steps::current(store);
    let recorded = steps::recorded_key_id(client, store, cx.spec).await?;
    let (id, applied) = keeping_alive(
        client,
        steps::stage(store, cx.spec, cx.opts.reveal, recorded.as_ref()),
    )
    .await?;
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
            job_name: cx.name,
            reason: audit.reason.as_deref().unwrap_or("scheduled"),
            operator: &audit.operator,
            incident_id: audit.incident_id.as_deref(),
            notes: audit.operator_notes.as_deref(),
            secret_id: &secret_id,
            old_key: old,
            new_key: id,
            grace_s: grace,
            new_fingerprint: fingerprint.as_deref(),
        },
    )
    .await?;
    if let Some(rot) = rotations::open_rotation(client, cx.name).await? {
        log.rotation = Some(RotationInfo::of(&rot));
    }
    log.record(
        audit,
        client,
        What {
            event_type: "key_staged",
            secret_id: &format!("{secret_id}#{id}"),
            verification_status: "not_applicable",
            affected_records: None,
            notes: &match &applied.skipped {
                Some(why) => format!("key {id} staged as pending ({why})"),
                None => format!("key {id} staged as pending"),
            },
            job_id: None,
        },
    )
    .await?;
    log.lines.extend(applied.skipped.clone());
    log.lines.push(format!(
        "staged key {id} as pending in {secret_id} (grace period after promotion: {})",
        human(grace)
    ));
    if !applied.instructions.is_empty() {
        applied.tell(
            &mut log.lines,
            "make these changes where the application's environment is set, redeploy so applications read both keys, then run `rekey rotate` again:",
        );
        return Ok(Some(Wait::Environment));
    }
    if cx.opts.no_wait {
        return Ok(None);
    }
    log.lines.push(format!(
        "next: redeploy the applications so they read the pending key {id} as well as the current one, then run `rekey rotate` again to re-encrypt \
         (`--no-wait` goes on at once, for applications that already read the pending key)"
    ));
    Ok(Some(Wait::Deploy))
}
