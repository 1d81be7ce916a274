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

#[cfg(test)]
mod tests {
    use super::super::JobSpec;
    use super::*;

    const JOB: &str = r#"
        [keys]
        source = "env"
        [[target]]
        table = "people"
        columns = ["ssn_encrypted"]
        format = "versioned-gcm"
    "#;

    fn with(extra: &str) -> Result<JobSpec, String> {
        JobSpec::parse(&format!("{JOB}{extra}\n")).map_err(|e| e.to_string())
    }

    const HASH: &str = r#"hash = { column = "ssn_bidx", algorithm = "hmac-sha256", keys = { source = "env", prefix = "SSN_HASH" } }"#;

    #[test]
    fn a_hash_parses_with_hex_output_of_the_one_column() {
        let spec = with(HASH).unwrap();
        let t = &spec.targets[0];
        let h = t.hash.as_ref().unwrap();
        assert_eq!((h.output, h.truncate), (HashOutput::Hex, None));
        assert_eq!(h.keys.prefix, "SSN_HASH");
        assert_eq!(t.hashed_column(), Some("ssn_encrypted"));
        assert!(!t.hash_only());
        let only = with(&format!("{HASH}\nrewrite = \"hash\"")).unwrap();
        assert!(only.targets[0].hash_only());
    }

    #[test]
    fn a_spec_without_a_hash_hashes_as_before() {
        // resuming a job started before search hashes existed must not be refused
        let spec = with("").unwrap();
        assert!(!serde_json::to_string(&spec.targets)
            .unwrap()
            .contains("hash"));
        assert!(!serde_json::to_string(&spec.targets)
            .unwrap()
            .contains("rewrite"));
    }

    #[test]
    fn what_cannot_be_a_search_hash_is_refused_with_the_fix() {
        let hash = |fields: &str| {
            format!(
                r#"hash = {{ column = "ssn_bidx", algorithm = "hmac-sha256", keys = {{ source = "env" }}{fields} }}"#
            )
        };
        for (extra, says) in [
            ("rewrite = \"hash\"".to_string(), "has none"),
            (hash(", truncate = 0"), "truncate must be 1 to 32"),
            (hash(", truncate = 33"), "truncate must be 1 to 32"),
            (
                hash(", of = \"ssn\""),
                "is not one of this target's columns",
            ),
            (hash(", output = \"octal\""), "unknown variant"),
            (hash(", salt = \"x\""), "unknown field"),
            (hash("").replace("hmac-sha256", "md5"), "unknown variant"),
            (
                hash("").replace("ssn_bidx", "ssn_encrypted"),
                "also listed in columns",
            ),
            (
                hash("").replace("ssn_bidx", "id") + "\nprimary_key = [\"id\"]",
                "part of primary_key",
            ),
            (
                hash("") + "\naad = { column = \"ssn_bidx\" }",
                "also the aad column",
            ),
            (
                hash("") + "\nrewrite = \"hash\"\nto_format = \"fernet\"",
                "cannot migrate",
            ),
        ] {
            let err = with(&extra).unwrap_err();
            assert!(err.contains(says), "{extra}: {err}");
        }
        let two = JOB.replace(
            "[\"ssn_encrypted\"]",
            "[\"ssn_encrypted\", \"dob_encrypted\"]",
        );
        let err = JobSpec::parse(&format!("{two}{}\n", hash("")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("say which one the hash is of"), "{err}");
        assert!(JobSpec::parse(&format!("{two}{}\n", hash(", of = \"dob_encrypted\""))).is_ok());
    }

    #[test]
    fn a_hash_column_rotated_by_two_targets_is_refused() {
        let second = format!("{HASH}\n[[target]]\ntable = \"people\"\ncolumns = [\"ssn_bidx\"]\nformat = \"versioned-gcm\"");
        assert!(with(&second).unwrap_err().contains("listed twice"));
    }
}
