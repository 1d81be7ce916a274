//! Values no key given opens that name their key (a version byte, a Tink
//! key id): most often a value under a retired key come back (a row
//! restored from a backup taken before the rotation, a standby promoted
//! before it replayed it, a late writer). Where the job's store retired
//! that key, its archive may still hold it, and one command brings it back
//! for a run to rewrite the values; where its material was destroyed, no
//! key opens them any more. Told by `rekey verify` and `rekey run`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::crypto::keyring::KeyId;
use crate::crypto::keytable::KeyState;
use crate::engine::sink::Failure;
use crate::job::Job;
use crate::secrets::{KeySource, KeysSpec, Store};
use crate::Error;

/// What the job's store holds of a key that values name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Held {
    /// Retired, its material in the store's archive: restorable.
    Archived,
    /// Retired, its material destroyed (purged, or a compromised key).
    Destroyed,
    /// Not a key of the store (never given, or a store with no archive).
    NotInStore,
}

/// A key that values no key given opens name.
#[derive(Debug, Clone, Serialize)]
pub struct NamedKey {
    /// The key's id.
    pub key_id: KeyId,
    /// Where the job looks for it.
    #[serde(rename = "where")]
    pub where_key: String,
    /// What its store holds of it.
    pub held: Held,
    /// Values among those reported that name it.
    pub values: u64,
    /// The first of them, `table.column at key (…)`.
    pub first: String,
}

/// The keys that `failures` name, with what each target's store holds of
/// them. A store that cannot be read now is said in a warning, and its
/// keys told as not in the store.
pub async fn named_keys(job: &Job, failures: &[Failure]) -> Vec<NamedKey> {
    let mut named: BTreeMap<(String, KeyId), NamedKey> = BTreeMap::new();
    let mut specs: BTreeMap<String, &KeysSpec> = BTreeMap::new();
    for f in failures {
        let Some(id) = f.named_key else { continue };
        let target = job.targets.iter().find(|t| t.table.to_string() == f.table);
        let Some(spec) = target.and_then(|t| t.read.source.as_ref()) else {
            continue;
        };
        let where_key = spec.where_key(id);
        specs.entry(where_key.clone()).or_insert(spec);
        named
            .entry((where_key.clone(), id))
            .or_insert_with(|| NamedKey {
                key_id: id,
                where_key,
                held: Held::NotInStore,
                values: 0,
                first: format!("{}.{} at key {}", f.table, f.column, f.key),
            })
            .values += 1;
    }
    for ((where_key, id), n) in named.iter_mut() {
        let Some(spec) = specs.get(where_key) else {
            continue;
        };
        match held(spec, *id).await {
            Ok(h) => n.held = h,
            Err(e) => tracing::warn!(
                "cannot look for key {id} in the job's store, to tell whether its archive holds it: {e}"
            ),
        }
    }
    named.into_values().collect()
}

/// What the store of `spec` holds of key `id`.
async fn held(spec: &KeysSpec, id: KeyId) -> Result<Held, Error> {
    // environment variables and Tink keysets keep no retired keys
    if matches!(spec.source, KeySource::Env | KeySource::TinkKeyset) {
        return Ok(Held::NotInStore);
    }
    let mut store = Store::open_to_look(spec).await?;
    let retired = store
        .table()
        .entries
        .iter()
        .any(|e| e.id == id && e.state == KeyState::Retired);
    if !retired {
        return Ok(Held::NotInStore);
    }
    Ok(if store.fetch_archived(id).await? {
        Held::Archived
    } else {
        Held::Destroyed
    })
}

/// What to do about the values that name each key, for people; `job_file`
/// is the job file as given.
pub fn advice(named: &[NamedKey], job_file: &Path) -> Vec<String> {
    named
        .iter()
        .map(|n| {
            let id = n.key_id;
            let them = format!(
                "{} values (the first {}) are under {}",
                n.values, n.first, n.where_key
            );
            match n.held {
                Held::Archived => format!(
                    "{them}, retired and still in the store's archive (were they restored from a backup?): \
                     `rekey secrets restore --job {} --key-id {id}` brings it back as a previous key, `rekey run` then \
                     rewrites them under the current key, and a retire retires it again",
                    job_file.display()
                ),
                Held::Destroyed => format!(
                    "{them}, retired and its material destroyed (purged, or compromised): no key opens them any \
                     more; restore them from a backup taken after the rotation, or write them again from their source"
                ),
                Held::NotInStore => {
                    format!("{them}, which the keys given do not hold: give the job that key")
                }
            }
        })
        .collect()
}
