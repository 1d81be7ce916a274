//! The key transitions both `rekey rotate` and `rekey secrets` make on a
//! store: stage a new key, promote it, roll back. Each applies the
//! transition to the store's key table and saves it; for the environment,
//! which rekey cannot write, saving returns the variable changes to make.

use tokio_postgres::Client;

use crate::crypto::keyring::{Key, KeyId};
use crate::crypto::keytable::{now, KeyState};
use crate::job::JobSpec;
use crate::secrets::Store;
use crate::state::key_ids::{self, RecordedId, RecordedStore};
use crate::Error;

/// What a transition did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Whether the store's keys changed (a repeated step changes nothing).
    pub changed: bool,
    /// Changes the operator must make where the application's environment is set.
    pub instructions: Vec<String>,
    /// Why a new key's id is not the store's next one: the database records
    /// a key of that id the store no longer holds (see [`new_key_id`]).
    pub skipped: Option<String>,
}

impl Applied {
    /// Adds the instructions, if any, to `lines` under `lead`.
    pub fn tell(&self, lines: &mut Vec<String>, lead: &str) {
        if !self.instructions.is_empty() {
            lines.push(lead.into());
            lines.extend(self.instructions.iter().map(|i| format!("  {i}")));
        }
    }
}

/// Saves the store when `changed`.
async fn saved(store: &mut Store, changed: bool, reveal: bool) -> Result<Applied, Error> {
    let instructions = if changed {
        store.save(reveal).await?
    } else {
        Vec::new()
    };
    Ok(Applied {
        changed,
        instructions,
        skipped: None,
    })
}

/// Refuses a new key id a format the job writes or reads with the job's
/// keys cannot name in its values, before anything is staged (targets with
/// keys of their own use another store).
pub fn refuse_unnameable(spec: &JobSpec, id: KeyId) -> Result<(), Error> {
    let formats = spec
        .targets
        .iter()
        .filter(|t| t.keys.is_none())
        .flat_map(|t| {
            let to = t.to_format.filter(|_| t.to_keys.is_none());
            std::iter::once(t.format).chain(to).map(move |f| (t, f))
        });
    for (t, f) in formats {
        if id > f.max_key_id() {
            return Err(Error::Config(format!(
                "the next key id {id} does not fit format {} of target {} (it names keys 1 to {}): the key \
                 store's ids have reached what the format can name, so no new key can be written in it; \
                 nothing was staged",
                f.name(),
                t.table,
                f.max_key_id()
            )));
        }
    }
    Ok(())
}

/// The highest key id the database records for `store` (the job's
/// `[keys]` in `spec`): earlier rotations' keys and the keys every job's
/// runs read and wrote under ([`key_ids::highest_recorded`]).
pub async fn recorded_key_id(
    client: &Client,
    store: &Store,
    spec: &JobSpec,
) -> Result<Option<RecordedId>, Error> {
    let secret_id = store.secret_id();
    let label = spec
        .keys
        .as_ref()
        .map(|k| k.store_label())
        .unwrap_or_default();
    let fingerprints: Vec<String> = store
        .table()
        .entries
        .iter()
        .filter_map(|e| e.key.as_ref().map(Key::fingerprint))
        .collect();
    key_ids::highest_recorded(
        client,
        &RecordedStore {
            secret_id: &secret_id,
            label: &label,
            fingerprints: &fingerprints,
        },
    )
    .await
}

/// The id a new key of `store` takes: the store's next, or one above
/// `recorded` ([`recorded_key_id`]) where the database records a key of
/// that id or above, which the store no longer holds: values may be under
/// it, and a new key of its id would leave them unreadable by their id.
/// With the second, one line saying why the id skipped.
pub fn new_key_id(
    store: &Store,
    recorded: Option<&RecordedId>,
) -> Result<(KeyId, Option<String>), Error> {
    let next = store.next_id()?;
    let Some(recorded) = recorded.filter(|r| r.id >= i64::from(next)) else {
        return Ok((next, None));
    };
    let above = recorded.id.saturating_add(1);
    let id = KeyId::try_from(above).map_err(|_| {
        Error::Config(format!(
            "no key id is left above {} for {} ({})",
            recorded.id,
            store.secret_id(),
            recorded.by
        ))
    })?;
    let why = format!(
        "the new key takes id {id}, not {next}: {} under {}, which no longer holds it, and values may \
         be under that key",
        recorded.by,
        store.secret_id()
    );
    Ok((id, Some(why)))
}

/// Stages a new key as pending ([`new_key_id`]: above every id
/// `recorded`); returns its id. Refused where a format of `spec` cannot
/// name the new id. Idempotent: with a key pending, that key's id, and
/// nothing changes.
pub async fn stage(
    store: &mut Store,
    spec: &JobSpec,
    reveal: bool,
    recorded: Option<&RecordedId>,
) -> Result<(KeyId, Applied), Error> {
    if let Some(pending) = store.table().id_in(KeyState::Pending) {
        return Ok((pending, Applied::default()));
    }
    // the store's: a key table's versions are shared with other purposes;
    // and above every id the database records for the store
    let (next, skipped) = new_key_id(store, recorded)?;
    refuse_unnameable(spec, next)?;
    let key = store.new_key(next).await?;
    let (id, changed) = store
        .table_mut()
        .stage(key, now())
        .map_err(|e| Error::Config(e.to_string()))?;
    let applied = saved(store, changed, reveal).await?;
    Ok((id, Applied { skipped, ..applied }))
}

/// Promotes the pending key to current (the current one becomes previous).
/// With `compromised` (a compromise rotation), a key table marks the key
/// it demotes `COMPROMISED` in the same transaction, as the key hierarchy
/// procedure does at once; other stores mark it when it is retired.
pub async fn promote(store: &mut Store, reveal: bool, compromised: bool) -> Result<Applied, Error> {
    let pending = store.table().id_in(KeyState::Pending);
    if let (true, Some(_), Some(current), Store::Table(_)) = (
        compromised,
        pending,
        store.table().id_in(KeyState::Current),
        &store,
    ) {
        store
            .table_mut()
            .mark_compromised(current)
            .map_err(|e| Error::Config(e.to_string()))?;
    }
    let promoted = store
        .table_mut()
        .promote(now())
        .map_err(|e| Error::Config(e.to_string()))?;
    // a promote stopped part way is finished now: the step happens here
    let changed = promoted || store.promote_unfinished();
    saved(store, changed, reveal).await
}

/// Refuses to un-stage the pending key where the store keeps it only
/// where applications read the new key (the dual convention): that would
/// delete the only copy of a key values may already be under.
pub fn refuse_unstaging(store: &Store) -> Result<(), Error> {
    match store.table().id_in(KeyState::Pending) {
        Some(pending) if !store.holds_unstaged_keys() => Err(Error::Config(format!(
            "{} keeps the staged key {pending} only where applications read the new key ({}): un-staging it would \
             delete the only copy of a key values may already be under. Finish the rotation instead (`rekey rotate`); \
             if `rekey verify --full` (which decrypts every value: a plan cannot see the key of a Fernet or raw-gcm value) \
             shows no value under key {pending}, remove the new key yourself",
            store.secret_id(),
            store.new_key_place()
        ))),
        _ => Ok(()),
    }
}

/// Makes the previous key current again (or un-stages the pending key,
/// where the store can keep it readable: values may be under it).
/// `promoted_by_rekey`: a rotation of the job promoted the current key.
pub async fn rollback(
    store: &mut Store,
    reveal: bool,
    promoted_by_rekey: bool,
) -> Result<Applied, Error> {
    refuse_unstaging(store)?;
    let back = store.table().rollback_target().map(|e| e.id);
    if let (Some(back), None, false, true) = (
        back,
        store.table().id_in(KeyState::Pending),
        store.holds_unstaged_keys(),
        promoted_by_rekey,
    ) {
        // the promotion rested on a full verify: every value is under the
        // current key, which the applications would no longer read
        let current = current(store).map_or("the current key".into(), |c| format!("key {c}"));
        return Err(Error::Config(format!(
            "{} keeps no place where applications read a previous key (they read the current key and {}): \
             making key {back} current again would leave every value, now under {current}, unreadable to them. \
             To move away from {current}, rotate to a new key (`rekey rotate --new`), which rewrites the values \
             before it is promoted. Nothing was changed",
            store.secret_id(),
            store.new_key_place()
        )));
    }
    // the key that becomes current must be one rekey holds: else every value is unreadable
    if let (Some(back), None) = (back, store.table().id_in(KeyState::Pending)) {
        if !store.fetch_archived(back).await? {
            return Err(Error::Config(format!(
                "{} does not hold key {back}'s material any more, so it cannot be made current again; \
                 to move away from the current key, rotate to a new one (`rekey rotate --new`)",
                store.secret_id()
            )));
        }
    }
    let changed = store
        .table_mut()
        .rollback(now())
        .map_err(|e| Error::Config(e.to_string()))?;
    saved(store, changed, reveal).await
}

/// Takes key `id` out of what applications read, into the store's archive
/// (callers prove first that no value needs it); with `destroy` (a
/// compromised key) its material is destroyed at once instead.
pub async fn retire(store: &mut Store, id: KeyId, destroy: bool) -> Result<Applied, Error> {
    if destroy && !store.can_purge() && store.writable() {
        return Err(Error::Config(format!(
            "{} cannot destroy a key's material (Secrets Manager keeps a secret's former versions and cannot delete one): \
             retire key {id} without the compromise reason, then move the keys to a new secret and delete this one",
            store.secret_id()
        )));
    }
    if destroy && !store.fetch_archived(id).await? {
        // held nowhere rekey can see (e.g. removed from the environment)
        tracing::warn!(
            "key {id}'s material is not in {}: rekey cannot destroy copies it does not hold; destroy them where they are",
            store.secret_id()
        );
    }
    let mut changed = store
        .table_mut()
        .retire(id, now())
        .map_err(|e| Error::Config(e.to_string()))?;
    if destroy {
        // the store says so (`secrets show`: COMPROMISED), then the material goes
        changed |= store
            .table_mut()
            .mark_compromised(id)
            .map_err(|e| Error::Config(e.to_string()))?;
        changed |= store
            .table_mut()
            .purge(id)
            .map_err(|e| Error::Config(e.to_string()))?;
    }
    saved(store, changed, false).await
}

/// Destroys the archived material of retired key `id`, or of every retired
/// key with `None`; returns the ids purged.
pub async fn purge(store: &mut Store, id: Option<KeyId>) -> Result<(Vec<KeyId>, Applied), Error> {
    if !store.can_purge() {
        return Err(Error::Config(format!(
            "{} keeps no archive rekey can purge: Secrets Manager keeps a secret's former versions and cannot delete one, \
             and environment keys are archived by whoever holds them",
            store.secret_id()
        )));
    }
    let ids = match id {
        Some(id) => vec![id],
        None => store.table().archived_ids(),
    };
    let mut purged = Vec::new();
    for id in ids {
        if store
            .table_mut()
            .purge(id)
            .map_err(|e| Error::Config(e.to_string()))?
        {
            purged.push(id);
        }
    }
    let applied = saved(store, !purged.is_empty(), false).await?;
    Ok((purged, applied))
}

/// Brings retired key `id` back from the store's archive as previous.
pub async fn restore(store: &mut Store, id: KeyId, reveal: bool) -> Result<Applied, Error> {
    store.fetch_archived(id).await?;
    let changed = store
        .table_mut()
        .restore(id, now())
        .map_err(|e| Error::Config(e.to_string()))?;
    saved(store, changed, reveal).await
}

/// The current key's id, for messages.
pub fn current(store: &Store) -> Option<KeyId> {
    store.table().id_in(KeyState::Current)
}
