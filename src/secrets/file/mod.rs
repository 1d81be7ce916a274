//! A keyring file: the local encrypted key store the runbook uses in
//! development, written and read by rekey.
//!
//! JSON holding every key's id, state, timestamps and fingerprint, and its
//! material sealed with AES-256-GCM under a key-encryption key derived from a
//! passphrase with Argon2id (parameters and salt stored in the file). The
//! key's id is bound as associated data, so sealed blobs cannot be swapped
//! between ids. Saving is atomic: the new version is written to a temporary
//! file, synced, the old version copied to `<file>.bak`, then the temporary
//! file renamed over the old one and the directory synced; a crash at any
//! instant leaves a readable keyring.
//!
//! Retired keys are not in the file: their sealed material moves to an
//! archive beside it (`<file>.archive`, same format and passphrase) until
//! `rekey secrets purge` or the end of [`super::ARCHIVE_RETENTION`]. Material
//! is written to the archive before it leaves the file, and leaves the
//! archive only after the file holds what replaces it. The archive has a
//! backup too (`<file>.archive.bak`), which never holds a key the archive
//! does not, so a purged key leaves both.

mod atomic;
mod seal;

pub use atomic::{archive_path, backup_path, commit, save_with_archive, write_pending};

use std::fs::{self};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::aead::LessSafeKey;
use serde::{Deserialize, Serialize};

use crate::crypto::keyring::{Key, KeyId};
use crate::crypto::keytable::{KeyState, KeyTable, StoredKey};

use seal::{derive, open_key, seal_key, Kdf, Unopened};

/// Format tag written in every keyring file.
const FORMAT: &str = "rekey-keyring/1";

/// Why a keyring file could not be used. Never carries key material or the passphrase.
#[derive(Debug, thiserror::Error)]
pub enum FileKeyringError {
    /// Reading or writing failed.
    #[error("keyring file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Not a keyring file, or damaged so that it does not parse.
    #[error("keyring file {path} is damaged or not a rekey keyring: {problem}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Some sealed keys do not open with the passphrase that opens another:
    /// the file was damaged or altered (one passphrase seals them all).
    #[error("keyring file {path} is damaged: the sealed material of {} does not open with the passphrase that opens key {opened}, so it was corrupted or altered after rekey wrote it; nothing was changed: restore the file from a backup (a keyring file's .bak holds the version before its last save, which may lack the newest key)", key_list(keys))]
    Altered {
        /// The file holding the keys that do not open.
        path: PathBuf,
        /// The keys that do not open.
        keys: Vec<KeyId>,
        /// A key that opens.
        opened: KeyId,
    },
    /// No sealed key opens: a wrong passphrase, or an alteration of the
    /// sealed keys, salt or parameters, which AES-GCM cannot tell apart.
    #[error("keyring file {path} does not open: wrong passphrase in {var}, or its sealed keys or key derivation were altered after rekey wrote it (the format cannot tell the two apart); check {var}; nothing was changed")]
    WrongPassphrase {
        /// The file.
        path: PathBuf,
        /// The variable the passphrase came from.
        var: String,
    },
    /// Group or others may read or write the file (Unix): refused, as ssh
    /// refuses such a private key, before anything is read from it.
    #[error("keyring file {path} is open to group or others (mode {mode:03o}), and it holds sealed keys: make it its owner's alone with `chmod 600 {path}`, then run the command again; nothing was changed")]
    OpenToOthers {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// No passphrase given.
    #[error("keyring file {path} needs its passphrase in {var}")]
    NoPassphrase {
        /// The file.
        path: PathBuf,
        /// The variable to set.
        var: String,
    },
    /// Creating over an existing file.
    #[error("keyring file {0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
}

/// The file's JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    /// Always [`FORMAT`].
    format: String,
    /// How the key-encryption key is derived.
    kdf: Kdf,
    /// The keys; `material` is base64 of nonce | sealed key | tag.
    keys: Vec<StoredKey>,
}

/// An opened keyring file: its table of keys and the key that seals them.
pub struct KeyringFile {
    /// Where it lives.
    path: PathBuf,
    /// KDF parameters and salt (kept across saves).
    kdf: Kdf,
    /// The key-encryption key.
    kek: LessSafeKey,
    /// The keys, opened.
    pub table: KeyTable,
    /// Ids of the keys in the archive file as last read or written.
    archived_on_disk: Vec<StoredKey>,
}

impl std::fmt::Debug for KeyringFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyringFile")
            .field("path", &self.path)
            .field("table", &self.table)
            .finish()
    }
}

/// "key 2", "keys 2 and 3", "keys 2, 3 and 4".
fn key_list(ids: &[KeyId]) -> String {
    match ids {
        [one] => format!("key {one}"),
        [first @ .., last] => {
            let first: Vec<String> = first.iter().map(KeyId::to_string).collect();
            format!("keys {} and {last}", first.join(", "))
        }
        [] => "no key".into(),
    }
}

/// What opening a file's sealed keys (and its archive's) found.
#[derive(Default)]
struct Seen {
    /// The first key that opened.
    opened: Option<KeyId>,
    /// The keys the key-encryption key did not open, with the file each is in.
    refused: Vec<(PathBuf, KeyId)>,
}

impl Seen {
    /// Refused keys beside one that opened are damage; with none that
    /// opened, the passphrase (or an alteration it cannot be told from).
    fn verdict(&self, var: &str) -> Result<(), FileKeyringError> {
        let Some((at, _)) = self.refused.first() else {
            return Ok(());
        };
        Err(match self.opened {
            Some(opened) => FileKeyringError::Altered {
                path: at.clone(),
                keys: self
                    .refused
                    .iter()
                    .filter(|(p, _)| p == at)
                    .map(|(_, id)| *id)
                    .collect(),
                opened,
            },
            None => FileKeyringError::WrongPassphrase {
                path: at.clone(),
                var: var.to_string(),
            },
        })
    }
}

/// Refuses a file group or others may read or write (Unix only: elsewhere
/// nothing is checked). rekey writes its files for their owner alone
/// ([`write_pending`]).
fn refuse_open_to_others(path: &Path) -> Result<(), FileKeyringError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path).map_err(io(path))?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(FileKeyringError::OpenToOthers {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    Ok(())
}

/// Reads and parses a keyring file (or its archive), refusing one open to
/// others. Bytes that are not JSON, text included, are damage: they are
/// never quoted.
fn read_document(path: &Path) -> Result<Document, FileKeyringError> {
    refuse_open_to_others(path)?;
    let bytes = fs::read(path).map_err(io(path))?;
    // serde's messages can quote the input; say only where it broke.
    serde_json::from_slice(&bytes).map_err(|e| FileKeyringError::Malformed {
        path: path.to_path_buf(),
        problem: if e.is_eof() {
            format!(
                "it ends before its JSON does, at line {} column {} (truncated)",
                e.line(),
                e.column()
            )
        } else {
            format!("invalid JSON at line {} column {}", e.line(), e.column())
        },
    })
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> FileKeyringError + '_ {
    move |source| FileKeyringError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl KeyringFile {
    /// Creates a new keyring file holding `table`, sealed under `passphrase`.
    pub fn create(
        path: &Path,
        passphrase: &[u8],
        table: KeyTable,
    ) -> Result<Self, FileKeyringError> {
        if path.exists() {
            return Err(FileKeyringError::Exists(path.to_path_buf()));
        }
        let mut salt = [0u8; 16];
        crate::crypto::nonce::fill(&mut salt);
        let kdf = Kdf {
            salt: B64.encode(salt),
            m_cost: 19 * 1024,
            t_cost: 2,
            p_cost: 1,
        };
        let kek = derive(path, passphrase, &kdf)?;
        let mut file = KeyringFile {
            path: path.to_path_buf(),
            kdf,
            kek,
            table,
            archived_on_disk: Vec::new(),
        };
        file.save()?;
        Ok(file)
    }

    /// Opens a keyring file, with its archive. Every sealed key is tried
    /// before any is judged: a file that does not parse, or some of whose
    /// keys do not open where another does, is damaged; one none of whose
    /// keys opens has a wrong passphrase (or was altered).
    pub fn open(
        path: &Path,
        passphrase: &[u8],
        passphrase_var: &str,
    ) -> Result<Self, FileKeyringError> {
        let doc = read_document(path)?;
        if doc.format != FORMAT {
            return Err(FileKeyringError::Malformed {
                path: path.to_path_buf(),
                problem: format!("format is {:?}, expected {FORMAT:?}", doc.format),
            });
        }
        let kek = derive(path, passphrase, &doc.kdf)?;
        let mut seen = Seen::default();
        let mut open = |k: &StoredKey, at: &Path| -> Result<Option<Key>, FileKeyringError> {
            let Some(sealed) = &k.material else {
                return Ok(None);
            };
            match open_key(&kek, k.id, sealed) {
                Ok(key) => {
                    seen.opened.get_or_insert(k.id);
                    Ok(Some(key))
                }
                Err(Unopened::Damaged(problem)) => Err(FileKeyringError::Malformed {
                    path: at.to_path_buf(),
                    problem: format!("key {}: {problem}", k.id),
                }),
                Err(Unopened::Refused) => {
                    seen.refused.push((at.to_path_buf(), k.id));
                    Ok(None)
                }
            }
        };
        let mut table = KeyTable::default();
        for k in doc.keys {
            let key = open(&k, path)?;
            table.entries.push(k.into_entry(key));
        }
        let archive = archive_path(path);
        let mut archived_on_disk = Vec::new();
        if archive.exists() {
            for k in read_document(&archive)?.keys {
                let key = open(&k, &archive)?;
                if let Some(e) = table
                    .entries
                    .iter_mut()
                    .find(|e| e.id == k.id && e.state == KeyState::Retired && e.key.is_none())
                {
                    e.key = key;
                }
                archived_on_disk.push(k);
            }
        }
        seen.verdict(passphrase_var)?;
        Ok(KeyringFile {
            path: path.to_path_buf(),
            kdf: doc.kdf,
            kek,
            table,
            archived_on_disk,
        })
    }

    /// Where the file lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn document(&self) -> Result<Document, FileKeyringError> {
        let keys = self
            .table
            .entries
            .iter()
            .map(|e| StoredKey::from_entry(e, |k| seal_key(&self.kek, k, &self.path)))
            .collect::<Result<_, _>>()?;
        Ok(Document {
            format: FORMAT.into(),
            kdf: self.kdf.clone(),
            keys,
        })
    }

    /// Writes the new version next to the file and syncs it; returns the
    /// temporary path. Until [`KeyringFile::commit`] renames it, the old
    /// version is untouched: this is where a crash may leave things.
    pub fn write_pending(&self) -> Result<PathBuf, FileKeyringError> {
        let json = serde_json::to_string_pretty(&self.document()?).map_err(|e| {
            FileKeyringError::Malformed {
                path: self.path.clone(),
                problem: e.to_string(),
            }
        })?;
        write_pending(&self.path, json.as_bytes())
    }

    /// Keeps a backup of the old version and renames the new one into place.
    /// Once a key is retired, the backup is the new version too, so the
    /// retired material is gone from both.
    pub fn commit(&self, tmp: &Path) -> Result<(), FileKeyringError> {
        commit(
            &self.path,
            tmp,
            self.table
                .entries
                .iter()
                .any(|e| e.state == KeyState::Retired),
        )
    }

    /// Saves atomically (write, fsync, backup, rename, fsync the directory),
    /// with the archive of retired keys beside it: material being archived
    /// reaches the archive before it leaves the file, and leaves the archive
    /// only after the file is saved.
    pub fn save(&mut self) -> Result<(), FileKeyringError> {
        let mut archived = Vec::new();
        for e in &self.table.entries {
            archived.extend(StoredKey::archived(e, |k| {
                seal_key(&self.kek, k, &self.path)
            })?);
        }
        let render = |keys: &[StoredKey]| {
            serde_json::to_vec_pretty(&Document {
                format: FORMAT.into(),
                kdf: self.kdf.clone(),
                keys: keys.to_vec(),
            })
        };
        let main = || {
            let tmp = self.write_pending()?;
            self.commit(&tmp)
        };
        save_with_archive(
            &self.path,
            archived.clone(),
            &self.archived_on_disk,
            render,
            main,
        )?;
        self.archived_on_disk = archived;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
