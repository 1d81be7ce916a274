//! The key transitions both `rekey rotate` and `rekey secrets` make on a
//! store: stage a new key, promote it, roll back. Each applies the
//! transition to the store's key table and saves it; for the environment,
//! which rekey cannot write, saving returns the variable changes to make.

use crate::crypto::keyring::KeyId;
use crate::crypto::keytable::{now, KeyState};
use crate::secrets::Store;
use crate::Error;

/// What a transition did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Whether the store's keys changed (a repeated step changes nothing).
    pub changed: bool,
    /// Changes the operator must make where the application's environment is set.
    pub instructions: Vec<String>,
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
    let instructions = if changed { store.save(reveal).await? } else { Vec::new() };
    Ok(Applied { changed, instructions })
}

/// Stages a new key (the next id) as pending; returns its id.
pub async fn stage(store: &mut Store, reveal: bool) -> Result<(KeyId, Applied), Error> {
    let next = store.table().next_id().map_err(|e| Error::Config(e.to_string()))?;
    let key = store.new_key(next).await?;
    let (id, changed) = store.table_mut().stage(key, now()).map_err(|e| Error::Config(e.to_string()))?;
    Ok((id, saved(store, changed, reveal).await?))
}

/// Promotes the pending key to current (the current one becomes previous).
pub async fn promote(store: &mut Store, reveal: bool) -> Result<Applied, Error> {
    let changed = store.table_mut().promote(now()).map_err(|e| Error::Config(e.to_string()))?;
    saved(store, changed, reveal).await
}

/// Makes the previous key current again.
pub async fn rollback(store: &mut Store, reveal: bool) -> Result<Applied, Error> {
    let changed = store.table_mut().rollback(now()).map_err(|e| Error::Config(e.to_string()))?;
    saved(store, changed, reveal).await
}

/// Removes key `id` from the store (callers prove first that no value needs it).
pub async fn retire(store: &mut Store, id: KeyId) -> Result<Applied, Error> {
    let changed = store.table_mut().retire(id, now()).map_err(|e| Error::Config(e.to_string()))?;
    saved(store, changed, false).await
}

/// The current key's id, for messages.
pub fn current(store: &Store) -> Option<KeyId> {
    store.table().id_in(KeyState::Current)
}
