//! `<file>.uses`: the databases a keyring file's keys encrypt values in
//! ([`crate::secrets::uses`]), beside the file rather than in it. A run
//! records its database there while commands holding the keyring file
//! open (an abort turning values back, a rotation between its steps) save
//! it later: the keyring's bytes, and the guard that refuses a save over
//! another process's write, are not touched by a record. Owner-only JSON,
//! replaced atomically under the keyring file's lock; no key material.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::atomic::{beside, sync_dir, write_pending};
use super::{io, read_json, FileKeyringError};
use crate::secrets::uses::StoreUse;

/// Format tag written in every uses file.
const FORMAT: &str = "rekey-keyring-uses/1";

/// The file's JSON.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    /// Always [`FORMAT`].
    format: String,
    /// One record per database and job.
    uses: Vec<StoreUse>,
}

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
    if doc.format != FORMAT {
        return Err(FileKeyringError::UsesDamaged {
            path: at,
            problem: format!("format is {:?}, expected {FORMAT:?}", doc.format),
        });
    }
    Ok(doc.uses)
}

/// Replaces the records beside the keyring file at `path` (the caller holds
/// the file's lock): written beside, synced, renamed into place.
pub fn write(path: &Path, uses: &[StoreUse]) -> Result<(), FileKeyringError> {
    let at = path_of(path);
    let doc = Document {
        format: FORMAT.into(),
        uses: uses.to_vec(),
    };
    let json = serde_json::to_vec_pretty(&doc).map_err(|e| FileKeyringError::Malformed {
        path: at.clone(),
        problem: e.to_string(),
        backup: None,
    })?;
    let tmp = write_pending(&at, &json)?;
    fs::rename(&tmp, &at).map_err(io(&at))?;
    sync_dir(&at)
}
