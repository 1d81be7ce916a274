//! `<file>.uses`: the databases a keyring file's keys encrypt values in
//! ([`crate::secrets::uses`]), beside the file rather than in it; the same
//! for a passphrase keyring file and a KMS one ([`crate::secrets::kms`]). A run
//! records its database there while commands holding the keyring file
//! open (an abort turning values back, a rotation between its steps) save
//! it later: the keyring's bytes, and the guard that refuses a save over
//! another process's write, are not touched by a record. Owner-only JSON,
//! replaced atomically under the keyring file's lock; no key material.

use std::fs;
use std::path::{Path, PathBuf};

use super::atomic::{beside, sync_dir, write_pending};
use super::{guard, io, read_json, FileKeyringError};
use crate::secrets::uses::{Document, StoreUse};

/// Where the keyring file at `path` (resolved) keeps its records.
pub fn path_of(path: &Path) -> PathBuf {
    beside(path, ".uses")
}

/// The records beside the keyring file at `path`; none where there is no
/// such file yet.
pub fn read(path: &Path) -> Result<Vec<StoreUse>, FileKeyringError> {
    let at = path_of(path);
    // a file that cannot be looked at is not taken for no records
    if !at.try_exists().map_err(io(&at))? {
        return Ok(Vec::new());
    }
    let doc: Document = read_json(&at).map_err(|e| match e {
        FileKeyringError::Malformed { path, problem, .. } => {
            FileKeyringError::UsesDamaged { path, problem }
        }
        other => other,
    })?;
    doc.into_uses()
        .map_err(|problem| FileKeyringError::UsesDamaged { path: at, problem })
}

/// Applies `change` to the records beside the keyring file at `path`
/// (resolved: a passphrase keyring file or a KMS one), read again under the
/// lock its saves take, and writes them where `change` says they changed.
/// The keyring file itself is not written. The records now, and whether
/// they changed.
pub fn update(
    path: &Path,
    change: impl FnOnce(&mut Vec<StoreUse>) -> bool,
) -> Result<(Vec<StoreUse>, bool), FileKeyringError> {
    let _lock = guard::lock(path)?;
    let mut uses = read(path)?;
    let changed = change(&mut uses);
    if changed {
        write(path, &uses)?;
    }
    Ok((uses, changed))
}

/// Replaces the records beside the keyring file at `path` (the caller holds
/// the file's lock): written beside, synced, renamed into place.
fn write(path: &Path, uses: &[StoreUse]) -> Result<(), FileKeyringError> {
    let at = path_of(path);
    let json = serde_json::to_vec_pretty(&Document::of(uses)).map_err(|e| {
        FileKeyringError::Malformed {
            path: at.clone(),
            problem: e.to_string(),
            backup: None,
        }
    })?;
    let tmp = write_pending(&at, &json)?;
    fs::rename(&tmp, &at).map_err(io(&at))?;
    sync_dir(&at)
}
