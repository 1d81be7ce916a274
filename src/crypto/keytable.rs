//! The key lifecycle every rotation procedure walks by hand: stage a new key as
//! pending, re-encrypt, verify, promote it to current (the old current becomes
//! previous), retire the previous key after a grace period, or roll back.
//!
//! [`KeyTable`] holds the keys and their states and applies the transitions;
//! each transition is idempotent (applying it twice changes nothing the second
//! time) and says whether it changed anything. Stores (environment, keyring
//! file, AWS) load a table and save it back; this module does no I/O.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::crypto::keyring::{Key, KeyId, Keyring, KeyringError};

pub use crate::crypto::stored::{rfc3339, KeyInfo, StoredKey};

/// Where a key is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Staged: new values will be written under it once a run targets it.
    Pending,
    /// What applications encrypt with today.
    Current,
    /// A former current key, still needed to read values not yet rotated.
    Previous,
    /// Removed: its material is gone.
    Retired,
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyState::Pending => "pending",
            KeyState::Current => "current",
            KeyState::Previous => "previous",
            KeyState::Retired => "retired",
        })
    }
}

/// One key of a table: its id, state, timestamps and (unless retired) material.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The key's id.
    pub id: KeyId,
    /// Its state.
    pub state: KeyState,
    /// When it was created (Unix seconds).
    pub created_at: u64,
    /// When its state last changed (Unix seconds).
    pub changed_at: u64,
    /// The key. A retired key keeps its material in the store's archive
    /// (never beside the keys applications read) until purged: `None` then.
    pub key: Option<Key>,
    /// Marked compromised (`--reason compromise`): its material must be
    /// destroyed, not archived, once no value needs it.
    pub compromised: bool,
}

/// Why a transition was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LifecycleError {
    /// Promote with nothing staged and nothing to promote.
    #[error("no pending key to promote: stage one first (`rekey secrets stage`)")]
    NothingToPromote,
    /// Rollback with no previous key.
    #[error("no previous key to roll back to")]
    NothingToRollBack,
    /// Retire of the pending key.
    #[error("key {0} is {1}; only a previous key can be retired (promote or roll back first)")]
    NotRetirable(KeyId, KeyState),
    /// Retire of the current key.
    #[error("key {0} is current: applications encrypt under it, and a run keeps every value under it; only a previous key can be retired: stage and promote a new key (`rekey rotate`), run, then retire key {0}")]
    CurrentNotRetirable(KeyId),
    /// Retire of an id the table does not hold.
    #[error("there is no key {0}")]
    NoSuchKey(KeyId),
    /// A new key's id collides or its material repeats an existing key.
    #[error("the new key cannot be staged: {0}")]
    BadNewKey(String),
    /// Restore of a key that is not retired.
    #[error("key {0} is {1}, not retired; only a retired key can be restored")]
    NotRetired(KeyId, KeyState),
    /// Restore of a retired key whose material was purged.
    #[error("key {0} was purged: its material is gone from the store and its archive")]
    Purged(KeyId),
    /// Promote of a pending key marked compromised.
    #[error("key {0} is staged but marked compromised: it must never become the key applications encrypt with; un-stage it (`rekey secrets rollback`), then stage a fresh key (`rekey rotate --new`)")]
    CompromisedPending(KeyId),
    /// Rollback to a previous key marked compromised.
    #[error("key {0} is marked compromised: rolling back to it would have applications encrypt with it again; to move away from the current key, rotate to a fresh key (`rekey rotate --new`)")]
    CompromisedPrevious(KeyId),
    /// The table does not form a keyring.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
}

/// The keys of one store, with their states.
#[derive(Debug, Clone, Default)]
pub struct KeyTable {
    /// Every key ever held.
    pub entries: Vec<Entry>,
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl KeyTable {
    fn with_state(&self, state: KeyState) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(move |e| e.state == state)
    }

    /// Whether key `id` is marked compromised.
    pub fn is_compromised(&self, id: KeyId) -> bool {
        self.entries.iter().any(|e| e.id == id && e.compromised)
    }

    /// The current key's id where it is marked compromised: no value may be
    /// written under it, and no keyring loads over it until a key is staged.
    pub fn compromised_current(&self) -> Option<KeyId> {
        self.id_in(KeyState::Current)
            .filter(|&id| self.is_compromised(id))
    }

    /// The id in `state`, if exactly one key has it (current, pending).
    pub fn id_in(&self, state: KeyState) -> Option<KeyId> {
        self.with_state(state).map(|e| e.id).next()
    }

    /// The next free id (one more than the largest ever used).
    pub fn next_id(&self) -> Result<KeyId, LifecycleError> {
        self.entries
            .iter()
            .map(|e| e.id)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or(LifecycleError::BadNewKey("no key id left".into()))
    }

    /// The keyring of every key applications may use: retired keys are not
    /// in it, archived or not.
    pub fn keyring(&self) -> Result<Keyring, LifecycleError> {
        let current = self.id_in(KeyState::Current).ok_or(KeyringError::Empty)?;
        let keys: Vec<Key> = self
            .entries
            .iter()
            .filter(|e| e.state != KeyState::Retired)
            .filter_map(|e| e.key.clone())
            .collect();
        Ok(Keyring::new(keys, current, self.id_in(KeyState::Pending))?)
    }

    /// Stages `key` as pending. Idempotent: with a key already pending,
    /// nothing changes and that key's id is returned.
    pub fn stage(&mut self, key: Key, at: u64) -> Result<(KeyId, bool), LifecycleError> {
        if let Some(id) = self.id_in(KeyState::Pending) {
            return Ok((id, false));
        }
        if self.entries.iter().any(|e| e.id == key.id()) {
            return Err(LifecycleError::BadNewKey(format!(
                "id {} is already used",
                key.id()
            )));
        }
        if self
            .entries
            .iter()
            .filter_map(|e| e.key.as_ref())
            .any(|k| k.material() == key.material())
        {
            return Err(LifecycleError::BadNewKey(
                "its material equals an existing key".into(),
            ));
        }
        let id = key.id();
        self.entries.push(Entry {
            id,
            state: KeyState::Pending,
            created_at: at,
            changed_at: at,
            key: Some(key),
            compromised: false,
        });
        Ok((id, true))
    }

    /// Pending becomes current; the old current becomes previous. Idempotent:
    /// with nothing pending, a table whose current key was promoted already
    /// (has a previous key) is left as it is.
    pub fn promote(&mut self, at: u64) -> Result<bool, LifecycleError> {
        let Some(pending) = self.id_in(KeyState::Pending) else {
            return if self.id_in(KeyState::Previous).is_some() {
                Ok(false)
            } else {
                Err(LifecycleError::NothingToPromote)
            };
        };
        if self.is_compromised(pending) {
            return Err(LifecycleError::CompromisedPending(pending));
        }
        self.make_current(pending, at);
        Ok(true)
    }

    /// The key a rollback makes current again: the previous key with the
    /// highest id below the current one (ids only grow: a new key takes the
    /// next one). `None` when a previous key is newer than the current one:
    /// that key was un-staged or rolled back from, so the rollback was made
    /// already and a second one must not go back a further key.
    pub fn rollback_target(&self) -> Option<&Entry> {
        let current = self.id_in(KeyState::Current)?;
        if self.with_state(KeyState::Previous).any(|e| e.id > current) {
            return None;
        }
        self.with_state(KeyState::Previous).max_by_key(|e| e.id)
    }

    /// Makes the previous key before the current one ([`Self::rollback_target`])
    /// current again; the current key becomes previous (both stay readable).
    /// With a key pending, rollback un-stages it instead: it becomes
    /// previous, and keeps its material, since values may already have been
    /// rewritten under it. Idempotent: run again, it changes nothing.
    pub fn rollback(&mut self, at: u64) -> Result<bool, LifecycleError> {
        if let Some(pending) = self.id_in(KeyState::Pending) {
            for e in self.entries.iter_mut().filter(|e| e.id == pending) {
                e.state = KeyState::Previous;
                e.changed_at = at;
            }
            return Ok(true);
        }
        let Some(previous) = self.rollback_target() else {
            // only newer keys are previous: rolled back already
            return if self.with_state(KeyState::Previous).next().is_some() {
                Ok(false)
            } else {
                Err(LifecycleError::NothingToRollBack)
            };
        };
        if previous.compromised {
            return Err(LifecycleError::CompromisedPrevious(previous.id));
        }
        let previous = previous.id;
        self.make_current(previous, at);
        Ok(true)
    }

    /// Key `id` becomes current; the current key becomes previous.
    fn make_current(&mut self, id: KeyId, at: u64) {
        for e in &mut self.entries {
            if e.state == KeyState::Current {
                e.state = KeyState::Previous;
                e.changed_at = at;
            } else if e.id == id {
                e.state = KeyState::Current;
                e.changed_at = at;
            }
        }
    }

    /// Retires a previous key: out of the keyring applications read, its
    /// material archived until [`KeyTable::purge`]. Idempotent for a retired
    /// key. The caller must first prove no value still needs it.
    pub fn retire(&mut self, id: KeyId, at: u64) -> Result<bool, LifecycleError> {
        self.retirable(id)?;
        let e = self.entry_mut(id)?;
        if e.state == KeyState::Retired {
            return Ok(false);
        }
        e.state = KeyState::Retired;
        e.changed_at = at;
        Ok(true)
    }

    /// Whether key `id` may be retired (previous, or retired already), asked
    /// before the full verify a retire rests on.
    pub fn retirable(&self, id: KeyId) -> Result<(), LifecycleError> {
        let e = self
            .entries
            .iter()
            .find(|e| e.id == id)
            .ok_or(LifecycleError::NoSuchKey(id))?;
        match e.state {
            KeyState::Previous | KeyState::Retired => Ok(()),
            KeyState::Current => Err(LifecycleError::CurrentNotRetirable(id)),
            other => Err(LifecycleError::NotRetirable(id, other)),
        }
    }

    /// Destroys a retired key's archived material. Idempotent.
    pub fn purge(&mut self, id: KeyId) -> Result<bool, LifecycleError> {
        let e = self.entry_mut(id)?;
        match e.state {
            KeyState::Retired => Ok(e.key.take().is_some()),
            other => Err(LifecycleError::NotRetired(id, other)),
        }
    }

    /// Destroys the archived material of keys retired before `before` (Unix
    /// seconds); returns their ids.
    pub fn purge_retired_before(&mut self, before: u64) -> Vec<KeyId> {
        let mut purged = Vec::new();
        for e in self
            .entries
            .iter_mut()
            .filter(|e| e.state == KeyState::Retired && e.changed_at < before)
        {
            if e.key.take().is_some() {
                purged.push(e.id);
            }
        }
        purged
    }

    /// Brings a retired key back from the archive as previous, so values
    /// still under it open again. Idempotent for a previous key.
    pub fn restore(&mut self, id: KeyId, at: u64) -> Result<bool, LifecycleError> {
        let e = self.entry_mut(id)?;
        match (e.state, &e.key) {
            (KeyState::Previous, _) => Ok(false),
            (KeyState::Retired, Some(_)) => {
                e.state = KeyState::Previous;
                e.changed_at = at;
                Ok(true)
            }
            (KeyState::Retired, None) => Err(LifecycleError::Purged(id)),
            (other, _) => Err(LifecycleError::NotRetired(id, other)),
        }
    }

    /// Ids of retired keys whose material is still archived.
    pub fn archived_ids(&self) -> Vec<KeyId> {
        self.with_state(KeyState::Retired)
            .filter(|e| e.key.is_some())
            .map(|e| e.id)
            .collect()
    }

    fn entry_mut(&mut self, id: KeyId) -> Result<&mut Entry, LifecycleError> {
        self.entries
            .iter_mut()
            .find(|e| e.id == id)
            .ok_or(LifecycleError::NoSuchKey(id))
    }

    /// Marks key `id` compromised. Idempotent.
    pub fn mark_compromised(&mut self, id: KeyId) -> Result<bool, LifecycleError> {
        let e = self.entry_mut(id)?;
        Ok(!std::mem::replace(&mut e.compromised, true))
    }

    /// Ids of previous keys (retire candidates).
    pub fn previous_ids(&self) -> Vec<KeyId> {
        self.with_state(KeyState::Previous).map(|e| e.id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> KeyTable {
        let mut t = KeyTable::default();
        t.entries.push(Entry {
            id: 1,
            state: KeyState::Current,
            created_at: 10,
            changed_at: 10,
            key: Some(Key::new(1, [1; 32])),
            compromised: false,
        });
        t
    }

    #[test]
    fn a_key_is_marked_compromised_once() {
        let mut t = table();
        assert!(t.mark_compromised(1).unwrap());
        assert!(!t.mark_compromised(1).unwrap());
        assert!(t.entries[0].compromised);
        assert_eq!(
            t.mark_compromised(9).unwrap_err(),
            LifecycleError::NoSuchKey(9)
        );
    }

    #[test]
    fn stage_then_promote_moves_current_to_previous() {
        let mut t = table();
        assert_eq!(t.stage(Key::new(2, [2; 32]), 20).unwrap(), (2, true));
        assert_eq!(t.keyring().unwrap().target().id(), 2);
        assert!(t.promote(30).unwrap());
        assert_eq!(
            (t.id_in(KeyState::Current), t.previous_ids()),
            (Some(2), vec![1])
        );
    }

    #[test]
    fn stage_twice_keeps_the_first_pending_key() {
        let mut t = table();
        t.stage(Key::new(2, [2; 32]), 20).unwrap();
        assert_eq!(t.stage(Key::new(3, [3; 32]), 21).unwrap(), (2, false));
    }

    #[test]
    fn promote_twice_changes_nothing_the_second_time() {
        let mut t = table();
        t.stage(Key::new(2, [2; 32]), 20).unwrap();
        assert!(t.promote(30).unwrap());
        assert!(!t.promote(31).unwrap());
        assert_eq!(t.id_in(KeyState::Current), Some(2));
    }

    // Before: with two previous keys, a second rollback went back a further
    // key (to one the applications had stopped using), whatever the dates.
    #[test]
    fn a_rollback_run_again_with_several_previous_keys_changes_nothing() {
        let mut t = table();
        for (id, at) in [(2, 20), (3, 30)] {
            t.stage(Key::new(id, [id as u8; 32]), at).unwrap();
            t.promote(at + 1).unwrap();
        }
        assert!(t.rollback(40).unwrap());
        assert_eq!(t.id_in(KeyState::Current), Some(2));
        assert!(!t.rollback(41).unwrap());
        assert_eq!(t.id_in(KeyState::Current), Some(2));
        assert_eq!(t.previous_ids(), vec![1, 3]);
    }

    #[test]
    fn rollback_restores_the_previous_current() {
        let mut t = table();
        t.stage(Key::new(2, [2; 32]), 20).unwrap();
        t.promote(30).unwrap();
        assert!(t.rollback(40).unwrap());
        assert_eq!(
            (t.id_in(KeyState::Current), t.previous_ids()),
            (Some(1), vec![2])
        );
    }

    #[test]
    fn a_compromised_key_is_never_made_current_by_promote_or_rollback() {
        let mut t = table();
        t.stage(Key::new(2, [2; 32]), 20).unwrap();
        t.mark_compromised(1).unwrap();
        t.promote(30).unwrap();
        let e = t.rollback(40).unwrap_err();
        assert_eq!(e, LifecycleError::CompromisedPrevious(1));
        assert!(e.to_string().contains("rekey rotate --new"), "{e}");
        assert_eq!(t.id_in(KeyState::Current), Some(2), "nothing changed");
        t.stage(Key::new(3, [3; 32]), 50).unwrap();
        t.mark_compromised(3).unwrap();
        assert_eq!(t.promote(60), Err(LifecycleError::CompromisedPending(3)));
        assert_eq!(t.id_in(KeyState::Pending), Some(3), "nothing changed");
        assert!(t.rollback(70).unwrap(), "un-staging it stays possible");
    }

    #[test]
    fn rollback_before_promotion_keeps_the_staged_keys_material() {
        let mut t = table();
        t.stage(Key::new(2, [2; 32]), 20).unwrap();
        assert!(t.rollback(30).unwrap());
        assert_eq!(
            (t.id_in(KeyState::Current), t.previous_ids()),
            (Some(1), vec![2])
        );
        assert!(
            t.keyring().unwrap().get(2).is_some(),
            "values rewritten under key 2 stay readable"
        );
    }

    #[test]
    fn retire_refuses_the_current_key_and_takes_a_previous_key_out_of_the_keyring_into_the_archive()
    {
        let mut t = table();
        t.stage(Key::new(2, [2; 32]), 20).unwrap();
        assert_eq!(
            t.retire(2, 21).unwrap_err(),
            LifecycleError::NotRetirable(2, KeyState::Pending)
        );
        t.promote(30).unwrap();
        assert_eq!(
            t.retire(2, 31).unwrap_err(),
            LifecycleError::CurrentNotRetirable(2)
        );
        assert!(t.retire(1, 40).unwrap());
        assert!(!t.retire(1, 41).unwrap());
        assert!(t.keyring().unwrap().get(1).is_none());
        assert_eq!(t.archived_ids(), vec![1]);
        let applications_read =
            StoredKey::from_entry(&t.entries[0], |_| Ok::<_, ()>("sealed".into())).unwrap();
        assert_eq!(
            applications_read.material, None,
            "what applications read holds no retired material"
        );
        assert_eq!(
            StoredKey::archived(&t.entries[0], |_| Ok::<_, ()>("sealed".into()))
                .unwrap()
                .and_then(|mut k| k.material.take())
                .as_deref(),
            Some("sealed")
        );
    }

    #[test]
    fn a_retired_key_is_restored_as_previous_until_it_is_purged() {
        let mut t = table();
        t.stage(Key::new(2, [2; 32]), 20).unwrap();
        t.promote(30).unwrap();
        t.retire(1, 40).unwrap();
        assert!(t.restore(1, 50).unwrap());
        assert_eq!(
            t.keyring().unwrap().get(1).map(Key::fingerprint),
            Some(Key::new(1, [1; 32]).fingerprint())
        );
        assert_eq!(
            t.restore(2, 51).unwrap_err(),
            LifecycleError::NotRetired(2, KeyState::Current)
        );
        t.retire(1, 60).unwrap();
        assert_eq!(
            t.purge_retired_before(60),
            Vec::<KeyId>::new(),
            "retired at 60: not before 60"
        );
        assert_eq!(t.purge_retired_before(61), vec![1]);
        assert_eq!(t.restore(1, 70).unwrap_err(), LifecycleError::Purged(1));
        assert!(!t.purge(1).unwrap());
    }

    #[test]
    fn staging_a_copy_of_an_existing_key_is_refused() {
        let mut t = table();
        assert!(matches!(
            t.stage(Key::new(2, [1; 32]), 20),
            Err(LifecycleError::BadNewKey(_))
        ));
    }
}
