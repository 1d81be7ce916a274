//! Keys from environment variables, in the two conventions applications use:
//! versioned keys with a current version, and a current key with a new one.
//!
//! - versioned: `ENCRYPTION_KEY_V1` .. `ENCRYPTION_KEY_Vn` and
//!   `ENCRYPTION_CURRENT_VERSION` (optionally `ENCRYPTION_PENDING_VERSION`);
//! - dual: `ENCRYPTION_KEY` (current) and `ENCRYPTION_KEY_NEW` (pending), with
//!   ids from `ENCRYPTION_KEY_VERSION` (default 1) and
//!   `ENCRYPTION_KEY_NEW_VERSION` (default current + 1).
//!
//! The prefix (`ENCRYPTION` by default) is configurable per job. Every error
//! names the variable to fix and never contains its value.

use super::{Key, KeyId, Keyring, KeyringError};

/// Why the environment did not give a usable keyring.
#[derive(Debug, thiserror::Error)]
pub enum EnvKeyError {
    /// A key variable holds something that is not a 32-byte key.
    #[error("{var} {source}")]
    BadKey {
        /// The variable at fault.
        var: String,
        /// What is wrong with it.
        source: super::KeyParseError,
    },
    /// A version variable is not a number in range.
    #[error("{var} must be a key version between 1 and 255 (e.g. {var}=2)")]
    BadVersion {
        /// The variable at fault.
        var: String,
    },
    /// A key variable's version (the number after `_KEY_V`) is out of range
    /// or written with a leading zero.
    #[error(
        "{var}: the number after _KEY_V is the key's version, 1 to 255 without leading zeros; \
         rename the variable (e.g. {prefix}_KEY_V1) and set {prefix}_CURRENT_VERSION to the version applications encrypt with"
    )]
    BadKeyVersion {
        /// The variable at fault.
        var: String,
        /// The convention's prefix, for the example.
        prefix: String,
    },
    /// Keys are present but the variable naming the current one is not.
    #[error(
        "{var} is not set: set it to the version applications encrypt with today (e.g. {var}=2)"
    )]
    MissingCurrent {
        /// The variable to set.
        var: String,
    },
    /// The current (or pending) version names a key that is not set.
    #[error(
        "{version_var}={version} but {key_var} is not set: export the key for version {version}"
    )]
    VersionWithoutKey {
        /// The variable naming the version.
        version_var: String,
        /// Its value.
        version: KeyId,
        /// The key variable that should exist.
        key_var: String,
    },
    /// The pending version names a key older than the current one: a
    /// leftover of an earlier rotation (a run would rewrite every value back
    /// under it), never a key staged since (new keys take higher versions).
    #[error(
        "{pending_var}={pending} names a key older than the current one ({current_var}={current}): a pending key is \
         the next key, staged after the current one, and a run would rewrite every value back under key {pending}. \
         If it was left from an earlier rotation, unset {pending_var}; if key {pending} is the key applications \
         should encrypt with, set {current_var}={pending} instead"
    )]
    PendingOlderThanCurrent {
        /// The variable naming the pending version.
        pending_var: String,
        /// Its value.
        pending: KeyId,
        /// The variable naming the current version.
        current_var: String,
        /// Its value.
        current: KeyId,
    },
    /// No key variables at all.
    #[error("no encryption keys in the environment: set {prefix}_KEY_V1.. with {prefix}_CURRENT_VERSION, or {prefix}_KEY (and {prefix}_KEY_NEW)")]
    NoKeys {
        /// The prefix searched.
        prefix: String,
    },
    /// A variable's value is not text (not valid UTF-8).
    #[error("{var} is not valid text: a key is 64 hex characters or base64")]
    NotText {
        /// The variable at fault.
        var: String,
    },
    /// The keys do not form a valid keyring.
    #[error("environment keys: {0}")]
    Keyring(#[from] KeyringError),
}

/// Reads a keyring from the process environment.
pub fn from_process_env(prefix: &str) -> Result<Keyring, EnvKeyError> {
    let mut vars = Vec::new();
    for (k, v) in std::env::vars_os() {
        let Ok(name) = k.into_string() else { continue };
        if !name.starts_with(prefix) {
            continue;
        }
        let value = v
            .into_string()
            .map_err(|_| EnvKeyError::NotText { var: name.clone() })?;
        vars.push((name, value));
    }
    from_vars(prefix, &vars)
}

/// Reads the versioned keys of the environment to count values per key
/// version before a target is chosen (`rekey plan`): with no
/// `<PREFIX>_CURRENT_VERSION`, the highest version stands in as current, and
/// the answer says no target was chosen (`false`).
pub fn for_counting(prefix: &str) -> Result<(Keyring, bool), EnvKeyError> {
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with(prefix))
        .collect();
    let current_var = format!("{prefix}_CURRENT_VERSION");
    if vars.iter().any(|(k, _)| *k == current_var) {
        return from_vars(prefix, &vars).map(|ring| (ring, true));
    }
    let versioned_prefix = format!("{prefix}_KEY_V");
    let highest = vars
        .iter()
        .filter_map(|(k, _)| k.strip_prefix(&versioned_prefix)?.parse::<KeyId>().ok())
        .max();
    match highest {
        Some(id) => {
            vars.push((current_var, id.to_string()));
            vars.retain(|(k, _)| *k != format!("{prefix}_PENDING_VERSION"));
            from_vars(prefix, &vars).map(|ring| (ring, false))
        }
        None => from_vars(prefix, &vars).map(|ring| (ring, true)),
    }
}

/// The id the dual convention gives `<P>_KEY_NEW` where
/// `<P>_KEY_NEW_VERSION` is not set: the one after the current key's (255
/// wraps to 1).
pub fn dual_new_id(current: KeyId) -> KeyId {
    current % 255 + 1
}

/// Reads a keyring from `(name, value)` pairs, as if they were the environment.
pub fn from_vars(prefix: &str, vars: &[(String, String)]) -> Result<Keyring, EnvKeyError> {
    let get = |name: &str| {
        vars.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let version = |var: String| -> Result<Option<KeyId>, EnvKeyError> {
        match get(&var) {
            None => Ok(None),
            Some(v) => match v.trim().parse::<KeyId>() {
                Ok(n) if (1..=255).contains(&n) => Ok(Some(n)),
                _ => Err(EnvKeyError::BadVersion { var }),
            },
        }
    };
    let key = |var: String, id: KeyId| -> Result<Option<Key>, EnvKeyError> {
        get(&var)
            .map(|v| Key::parse(id, v).map_err(|source| EnvKeyError::BadKey { var, source }))
            .transpose()
    };

    let versioned_prefix = format!("{prefix}_KEY_V");
    let mut keys = Vec::new();
    for (name, _) in vars {
        // `_KEY_V<digits>` only: `_KEY_VERSION` belongs to the dual convention
        if let Some(n) = name
            .strip_prefix(&versioned_prefix)
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            let id: KeyId = match n.parse() {
                Ok(id) if (1..=255).contains(&id) && !n.starts_with('0') => id,
                _ => {
                    return Err(EnvKeyError::BadKeyVersion {
                        var: name.clone(),
                        prefix: prefix.to_string(),
                    })
                }
            };
            keys.extend(key(name.clone(), id)?);
        }
    }
    keys.sort_by_key(|k| k.id());

    if !keys.is_empty() {
        let current_var = format!("{prefix}_CURRENT_VERSION");
        let current = version(current_var.clone())?.ok_or(EnvKeyError::MissingCurrent {
            var: current_var.clone(),
        })?;
        let pending_var = format!("{prefix}_PENDING_VERSION");
        let pending = version(pending_var.clone())?;
        // before the keys' own check: a leftover whose key is gone since
        // is still a leftover, not a key to bring back
        if let Some(pending) = pending.filter(|p| *p < current) {
            return Err(EnvKeyError::PendingOlderThanCurrent {
                pending_var,
                pending,
                current_var,
                current,
            });
        }
        for (var, id) in [
            (current_var.clone(), Some(current)),
            (pending_var.clone(), pending),
        ] {
            if let Some(id) = id {
                if !keys.iter().any(|k| k.id() == id) {
                    return Err(EnvKeyError::VersionWithoutKey {
                        version_var: var,
                        version: id,
                        key_var: format!("{versioned_prefix}{id}"),
                    });
                }
            }
        }
        // equal: a promotion whose `unset` is still to come; nothing is pending
        return Ok(Keyring::new(
            keys,
            current,
            pending.filter(|p| *p != current),
        )?);
    }

    let current_id = version(format!("{prefix}_KEY_VERSION"))?.unwrap_or(1);
    let Some(current) = key(format!("{prefix}_KEY"), current_id)? else {
        return Err(EnvKeyError::NoKeys {
            prefix: prefix.to_string(),
        });
    };
    let new_version_var = format!("{prefix}_KEY_NEW_VERSION");
    let new_id = version(new_version_var.clone())?.unwrap_or(dual_new_id(current_id));
    if new_id == current_id {
        return Err(EnvKeyError::BadVersion {
            var: new_version_var,
        });
    }
    let new = key(format!("{prefix}_KEY_NEW"), new_id)?;
    let pending = new.as_ref().map(|k| k.id());
    Ok(Keyring::new(
        std::iter::once(current).chain(new).collect(),
        current_id,
        pending,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const K1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const K2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn versioned_convention_targets_the_current_version() {
        let ring = from_vars(
            "ENCRYPTION",
            &vars(&[
                ("ENCRYPTION_KEY_V1", K1),
                ("ENCRYPTION_KEY_V2", K2),
                ("ENCRYPTION_CURRENT_VERSION", "2"),
            ]),
        )
        .unwrap();
        assert_eq!(ring.target().id(), 2);
        assert!(ring.get(1).is_some());
    }

    #[test]
    fn dual_convention_targets_the_new_key() {
        let ring = from_vars(
            "ENCRYPTION",
            &vars(&[("ENCRYPTION_KEY", K1), ("ENCRYPTION_KEY_NEW", K2)]),
        )
        .unwrap();
        assert_eq!((ring.current_id(), ring.target().id()), (1, 2));
    }

    #[test]
    fn dual_convention_takes_explicit_versions() {
        let ring = from_vars(
            "ENCRYPTION",
            &vars(&[
                ("ENCRYPTION_KEY", K1),
                ("ENCRYPTION_KEY_VERSION", "4"),
                ("ENCRYPTION_KEY_NEW", K2),
                ("ENCRYPTION_KEY_NEW_VERSION", "5"),
            ]),
        )
        .unwrap();
        assert_eq!((ring.current_id(), ring.target().id()), (4, 5));
    }

    #[test]
    fn missing_current_version_names_the_variable() {
        let err = from_vars("ENCRYPTION", &vars(&[("ENCRYPTION_KEY_V1", K1)])).unwrap_err();
        assert!(
            err.to_string().contains("ENCRYPTION_CURRENT_VERSION"),
            "{err}"
        );
    }

    #[test]
    fn current_version_without_key_names_both_variables() {
        let err = from_vars(
            "ENCRYPTION",
            &vars(&[
                ("ENCRYPTION_KEY_V1", K1),
                ("ENCRYPTION_CURRENT_VERSION", "3"),
            ]),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("ENCRYPTION_CURRENT_VERSION=3") && msg.contains("ENCRYPTION_KEY_V3"),
            "{msg}"
        );
    }

    #[test]
    fn a_key_variable_numbered_0_is_told_to_be_renamed_not_set_to_a_version() {
        for name in [
            "ENCRYPTION_KEY_V0",
            "ENCRYPTION_KEY_V01",
            "ENCRYPTION_KEY_V256",
        ] {
            let err = from_vars(
                "ENCRYPTION",
                &vars(&[(name, K1), ("ENCRYPTION_CURRENT_VERSION", "1")]),
            )
            .unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("{name}: "))
                    && msg.contains("rename the variable (e.g. ENCRYPTION_KEY_V1)"),
                "{msg}"
            );
            assert!(!msg.contains(&format!("{name}=2")), "{msg}");
        }
    }

    // Today: a PENDING_VERSION left from the last rotation, below the
    // current version set since, made the keyring target the older key:
    // `run` rewrote every value back under it and exited 0.
    #[test]
    fn a_pending_version_below_the_current_one_is_refused_naming_both_and_the_fix() {
        let err = from_vars(
            "ENCRYPTION",
            &vars(&[
                ("ENCRYPTION_KEY_V1", K1),
                ("ENCRYPTION_KEY_V2", K2),
                ("ENCRYPTION_CURRENT_VERSION", "2"),
                ("ENCRYPTION_PENDING_VERSION", "1"),
            ]),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("ENCRYPTION_PENDING_VERSION=1 names a key older than the current one (ENCRYPTION_CURRENT_VERSION=2)")
                && msg.contains("unset ENCRYPTION_PENDING_VERSION"),
            "{msg}"
        );
    }

    #[test]
    fn a_pending_version_below_the_current_one_whose_key_is_gone_is_still_a_leftover() {
        let err = from_vars(
            "ENCRYPTION",
            &vars(&[
                ("ENCRYPTION_KEY_V3", K1),
                ("ENCRYPTION_CURRENT_VERSION", "3"),
                ("ENCRYPTION_PENDING_VERSION", "2"),
            ]),
        )
        .unwrap_err();
        assert!(
            matches!(err, EnvKeyError::PendingOlderThanCurrent { .. }),
            "{err}"
        );
    }

    #[test]
    fn a_pending_version_equal_to_the_current_one_leaves_nothing_pending() {
        let ring = from_vars(
            "ENCRYPTION",
            &vars(&[
                ("ENCRYPTION_KEY_V1", K1),
                ("ENCRYPTION_KEY_V2", K2),
                ("ENCRYPTION_CURRENT_VERSION", "2"),
                ("ENCRYPTION_PENDING_VERSION", "2"),
            ]),
        )
        .unwrap();
        assert_eq!((ring.current_id(), ring.target().id()), (2, 2));
    }

    /// Names the conventions read, some near misses, and a stranger.
    const NAMES: [&str; 14] = [
        "ENCRYPTION_KEY_V1",
        "ENCRYPTION_KEY_V2",
        "ENCRYPTION_KEY_V255",
        "ENCRYPTION_KEY_V256",
        "ENCRYPTION_KEY_V01",
        "ENCRYPTION_KEY_V",
        "ENCRYPTION_CURRENT_VERSION",
        "ENCRYPTION_PENDING_VERSION",
        "ENCRYPTION_KEY",
        "ENCRYPTION_KEY_NEW",
        "ENCRYPTION_KEY_VERSION",
        "ENCRYPTION_KEY_NEW_VERSION",
        "ENCRYPTION_KEY_VERSIONS",
        "OTHER_KEY",
    ];

    /// A value as an operator might set it: a good key, a damaged one, a
    /// version number (good or not), or anything at all.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<[u8; 32]>().prop_map(hex::encode),
            Just(K1.to_string()),
            "[0-9a-fA-F]{0,70}",
            "[A-Za-z0-9+/=_-]{0,50}",
            "-?[0-9]{1,4}",
            " ?[0-9]{1,3} ?",
            "\\PC{0,40}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn any_environment_gives_a_keyring_or_an_error_naming_a_variable(vars in proptest::collection::vec((prop::sample::select(NAMES.to_vec()), value()), 0..8)) {
            let vars: Vec<(String, String)> = vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            match from_vars("ENCRYPTION", &vars) {
                Ok(ring) => {
                    prop_assert!(ring.keys().count() >= 1);
                    prop_assert!(ring.get(ring.target().id()).is_some());
                }
                Err(err) => {
                    let shown = format!("{err} {err:?}");
                    prop_assert!(shown.contains("ENCRYPTION") || shown.starts_with("environment keys: "), "{}", shown);
                    // Key material (long values) is never repeated.
                    for (_, v) in vars.iter().filter(|(_, v)| v.trim().len() >= 8) {
                        prop_assert!(!shown.contains(v.trim()), "{} repeats a value", shown);
                    }
                }
            }
        }

        #[test]
        fn any_prefix_and_names_never_panic(prefix in "\\PC{0,12}", vars in proptest::collection::vec(("\\PC{0,30}", value()), 0..6)) {
            let _ = from_vars(&prefix, &vars);
        }
    }

    #[test]
    fn a_hex_key_of_the_wrong_length_names_the_variable_and_its_length() {
        for bad in [&K2[..62], &K2[..63], &format!("{K2}22")[..]] {
            let err = from_vars(
                "ENCRYPTION",
                &vars(&[
                    ("ENCRYPTION_KEY_V1", K1),
                    ("ENCRYPTION_KEY_V2", bad),
                    ("ENCRYPTION_CURRENT_VERSION", "2"),
                ]),
            )
            .unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "ENCRYPTION_KEY_V2 looks like hex but is {} characters; a key is 64 hex characters",
                    bad.len()
                )
            );
        }
    }

    #[test]
    fn bad_hex_names_the_variable_and_hides_the_value() {
        let bad = &K2[..63];
        let err = from_vars(
            "ENCRYPTION",
            &vars(&[
                ("ENCRYPTION_KEY_V1", K1),
                ("ENCRYPTION_KEY_V2", bad),
                ("ENCRYPTION_CURRENT_VERSION", "2"),
            ]),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("ENCRYPTION_KEY_V2 "), "{msg}");
        assert!(!msg.contains(bad));
    }
}
