//! What a store holds of keys that values name but the keys given do not:
//! most often a key retired and archived, its values come back (a row
//! restored from a backup taken before the rotation, a standby promoted
//! before it replayed it). One look at the store for all of them, bounded
//! in time, since it only informs a refusal or a report.

use std::time::Duration;

use serde::Serialize;

use crate::crypto::keyring::KeyId;
use crate::crypto::keytable::KeyState;
use crate::Error;

use super::{KeySource, KeysSpec, Store};

/// How long the look at a store may take (a Secrets Manager secret with
/// many former versions, a KMS decrypt per key), before it is given up.
const LOOK_LIMIT: Duration = Duration::from_secs(30);

/// What a store holds of a key that values name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Held {
    /// Retired, its material in the store's archive: `rekey secrets
    /// restore` brings it back.
    Archived,
    /// Retired, its material destroyed (purged, or a compromised key).
    Destroyed,
    /// Not a key of the store (never given, or a store that keeps no
    /// retired keys: the environment, a Tink keyset).
    NotInStore,
    /// The store could not be read now: whether it holds the key is not known.
    Unknown,
}

/// What the store of `spec` holds of each key of `ids`, read with one
/// opening of the store; what could not be read is [`Held::Unknown`], with
/// the reason.
pub async fn held(spec: &KeysSpec, ids: &[KeyId]) -> (Vec<(KeyId, Held)>, Option<String>) {
    // environment variables and Tink keysets keep no retired keys
    if matches!(spec.source, KeySource::Env | KeySource::TinkKeyset) {
        return (ids.iter().map(|id| (*id, Held::NotInStore)).collect(), None);
    }
    match tokio::time::timeout(LOOK_LIMIT, look(spec, ids)).await {
        Ok(Ok(held)) => (held, None),
        Ok(Err(e)) => (unknown(ids), Some(e.to_string())),
        Err(_) => (
            unknown(ids),
            Some(format!(
                "it did not answer within {}",
                humantime::format_duration(LOOK_LIMIT)
            )),
        ),
    }
}

fn unknown(ids: &[KeyId]) -> Vec<(KeyId, Held)> {
    ids.iter().map(|id| (*id, Held::Unknown)).collect()
}

async fn look(spec: &KeysSpec, ids: &[KeyId]) -> Result<Vec<(KeyId, Held)>, Error> {
    let mut store = Store::open_to_look(spec).await?;
    let mut held = Vec::with_capacity(ids.len());
    for &id in ids {
        let retired = store
            .table()
            .entries
            .iter()
            .any(|e| e.id == id && e.state == KeyState::Retired);
        let h = if !retired {
            Held::NotInStore
        } else if store.fetch_archived(id).await? {
            Held::Archived
        } else {
            Held::Destroyed
        };
        held.push((id, h));
    }
    Ok(held)
}
