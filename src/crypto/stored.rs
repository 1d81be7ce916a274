//! A key table as stores write it: one [`StoredKey`] per key (material in the
//! store's own encoding, never beside a retired key), and what `rekey
//! secrets show` prints ([`KeyInfo`]): never material.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::crypto::keyring::{Key, KeyId};

use crate::crypto::keytable::{now, Entry, KeyState, KeyTable};

/// One key as the stores write it (keyring file, Secrets Manager, KMS
/// keyring): `material` is the store's own encoding of the key (sealed,
/// hex, or KMS-wrapped). What applications read never holds a retired
/// key's material ([`StoredKey::from_entry`]); a store's archive does
/// ([`StoredKey::archived`]).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredKey {
    /// Key id.
    pub id: KeyId,
    /// Lifecycle state.
    pub state: KeyState,
    /// Created, RFC 3339.
    pub created_at: String,
    /// Last state change, RFC 3339.
    pub changed_at: String,
    /// Fingerprint of the key, to recognise it without opening the store.
    #[serde(default)]
    pub fingerprint: String,
    /// The key in the store's encoding; absent once retired.
    pub material: Option<String>,
    /// Marked compromised (absent in keyrings written before the marker).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub compromised: bool,
}

impl std::fmt::Debug for StoredKey {
    /// Everything but the material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("id", &self.id)
            .field("state", &self.state)
            .field("fingerprint", &self.fingerprint)
            .field("material", &self.material.as_ref().map(|_| "<redacted>"))
            .field("compromised", &self.compromised)
            .finish()
    }
}

impl Drop for StoredKey {
    fn drop(&mut self) {
        if let Some(m) = self.material.as_mut() {
            zeroize::Zeroize::zeroize(m);
        }
    }
}

impl StoredKey {
    /// An entry as applications read it, with its material encoded by
    /// `encode`; a retired key without material.
    pub fn from_entry<E>(
        e: &Entry,
        encode: impl FnOnce(&Key) -> Result<String, E>,
    ) -> Result<StoredKey, E> {
        let live = e.key.as_ref().filter(|_| e.state != KeyState::Retired);
        let mut stored = Self::bare(e);
        stored.material = live.map(encode).transpose()?;
        Ok(stored)
    }

    /// A retired entry as the archive keeps it, material included; `None`
    /// for any other entry, or one already purged.
    pub fn archived<E>(
        e: &Entry,
        encode: impl FnOnce(&Key) -> Result<String, E>,
    ) -> Result<Option<StoredKey>, E> {
        let Some(key) = e.key.as_ref().filter(|_| e.state == KeyState::Retired) else {
            return Ok(None);
        };
        let mut stored = Self::bare(e);
        stored.material = Some(encode(key)?);
        Ok(Some(stored))
    }

    fn bare(e: &Entry) -> StoredKey {
        StoredKey {
            id: e.id,
            state: e.state,
            created_at: rfc3339_or_unknown(e.created_at),
            changed_at: rfc3339_or_unknown(e.changed_at),
            fingerprint: e.key.as_ref().map(Key::fingerprint).unwrap_or_default(),
            material: None,
            compromised: e.compromised,
        }
    }

    /// Back to an entry, with the key the caller decoded from `material`.
    pub fn into_entry(self, key: Option<Key>) -> Entry {
        let at = |t: &str| {
            humantime::parse_rfc3339(t)
                .ok()
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs())
        };
        Entry {
            id: self.id,
            state: self.state,
            created_at: at(&self.created_at),
            changed_at: at(&self.changed_at),
            key,
            compromised: self.compromised,
        }
    }
}

/// What `rekey secrets show` prints for one key: never material.
#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    /// The id.
    pub id: KeyId,
    /// The state.
    pub state: KeyState,
    /// Fingerprint of the material (empty once retired).
    pub fingerprint: String,
    /// Created, RFC 3339, or "unknown" (a key imported or adopted without a date).
    pub created_at: String,
    /// Seconds since creation; `null` when unknown.
    pub age_s: Option<u64>,
    /// Last state change, RFC 3339.
    pub changed_at: String,
    /// A retired key whose material is still in the store's archive.
    pub archived: bool,
    /// Marked compromised.
    pub compromised: bool,
}

/// RFC 3339 (UTC, seconds) for Unix seconds.
pub fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

/// [`rfc3339`], or "unknown" for 0 (a time never recorded, not 1970).
pub fn rfc3339_or_unknown(secs: u64) -> String {
    if secs == 0 {
        "unknown".into()
    } else {
        rfc3339(secs)
    }
}

impl KeyTable {
    /// Ids, states, fingerprints and ages.
    pub fn info(&self) -> Vec<KeyInfo> {
        let t = now();
        self.entries
            .iter()
            .map(|e| KeyInfo {
                id: e.id,
                state: e.state,
                fingerprint: e.key.as_ref().map(Key::fingerprint).unwrap_or_default(),
                created_at: rfc3339_or_unknown(e.created_at),
                age_s: (e.created_at != 0).then(|| t.saturating_sub(e.created_at)),
                changed_at: rfc3339_or_unknown(e.changed_at),
                archived: e.state == KeyState::Retired && e.key.is_some(),
                compromised: e.compromised,
            })
            .collect()
    }
}

#[cfg(test)]
mod debug_tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_material() {
        let e = Entry {
            id: 1,
            state: KeyState::Current,
            created_at: 0,
            changed_at: 0,
            key: Some(Key::new(1, [0xab; 32])),
            compromised: false,
        };
        let stored = StoredKey::from_entry(&e, |k| Ok::<_, ()>(hex::encode(k.material()))).unwrap();
        let shown = format!("{stored:?}");
        assert!(!shown.contains("abab"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
