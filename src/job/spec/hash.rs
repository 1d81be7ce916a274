//! A target's search hash as written (`hash = { column = ..., keys = ... }`)
//! and what the job file alone can tell about it: which encrypted column it
//! hashes, names PostgreSQL can hold, a column not claimed twice, and a
//! hash-only rewrite that has a hash to rewrite.

use serde::{Deserialize, Serialize};

use crate::crypto::search_hash::{HashAlgorithm, HashOutput, HMAC_SHA256_LEN};
use crate::secrets::KeysSpec;

use super::TargetSpec;

/// `hash = { ... }` of a `[[target]]`: a column holding a keyed hash (blind
/// index) of one encrypted column's plaintext.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashSpec {
    /// The column holding the hash.
    pub column: String,
    /// The encrypted column whose plaintext is hashed; default: the target's one column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub of: Option<String>,
    /// The keyed hash function.
    pub algorithm: HashAlgorithm,
    /// Where the hash keys come from: any key source, as `[keys]`; new
    /// hashes are written under its target key (pending, else current).
    pub keys: KeysSpec,
    /// How the hash is stored (default `hex`).
    #[serde(default)]
    pub output: HashOutput,
    /// Keep only the first N bytes of the MAC, before encoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<usize>,
}

/// What a run of a target rewrites.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rewrite {
    /// Ciphertexts and the search hash (the default).
    #[default]
    All,
    /// Only the search hash: ciphertexts are decrypted, never rewritten.
    Hash,
}

impl TargetSpec {
    /// The encrypted column the search hash is of, once checked.
    pub fn hashed_column(&self) -> Option<&str> {
        let hash = self.hash.as_ref()?;
        match &hash.of {
            Some(of) => Some(of.as_str()),
            None => self.columns.first().map(String::as_str),
        }
    }

    /// Whether a run rewrites only the search hash.
    pub fn hash_only(&self) -> bool {
        self.rewrite == Some(Rewrite::Hash)
    }
}

/// Checks a target's `hash` and `rewrite`; `at` names the target for messages.
pub(super) fn check(t: &TargetSpec, at: &str) -> Result<(), String> {
    let Some(h) = &t.hash else {
        if t.hash_only() {
            return Err(format!(
                "{at}: rewrite = \"hash\" rewrites only a search hash, and this target has none: add hash = {{ column = ..., algorithm = \"hmac-sha256\", keys = {{ ... }} }}, or remove rewrite"
            ));
        }
        return Ok(());
    };
    if h.column.trim().is_empty() {
        return Err(format!("{at}: hash column is empty"));
    }
    if t.columns.contains(&h.column) {
        return Err(format!(
            "{at}: hash column {:?} is also listed in columns: a search hash is not a ciphertext; list it only in hash",
            h.column
        ));
    }
    if t.primary_key.iter().flatten().any(|k| *k == h.column) {
        return Err(format!(
            "{at}: hash column {:?} is part of primary_key, and a key is never rewritten",
            h.column
        ));
    }
    if t.aad.as_ref().and_then(|a| a.column.as_ref()) == Some(&h.column) {
        return Err(format!(
            "{at}: hash column {:?} is also the aad column: the values bound to it would no longer open once it is rehashed",
            h.column
        ));
    }
    match &h.of {
        Some(of) if !t.columns.contains(of) => {
            return Err(format!(
                "{at}: hash of = {of:?} is not one of this target's columns ({})",
                t.columns.join(", ")
            ))
        }
        None if t.columns.len() > 1 => {
            return Err(format!(
                "{at}: this target has {} encrypted columns: say which one the hash is of, with hash = {{ of = \"column\", ... }}",
                t.columns.len()
            ))
        }
        _ => {}
    }
    if let Some(n) = h.truncate {
        if n == 0 || n > HMAC_SHA256_LEN {
            return Err(format!(
                "{at}: hash truncate = {n}: an HMAC-SHA256 has {HMAC_SHA256_LEN} bytes, so truncate must be 1 to {HMAC_SHA256_LEN}"
            ));
        }
    }
    if t.hash_only() && t.to_format.is_some() {
        return Err(format!(
            "{at}: rewrite = \"hash\" leaves ciphertexts as they are, so it cannot migrate them to_format; run the migration first, or remove rewrite"
        ));
    }
    Ok(())
}
