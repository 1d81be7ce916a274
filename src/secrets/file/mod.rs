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
//! instant leaves a readable keyring. A file named through a symbolic link
//! is written where the link points, keeping the link
//! ([`atomic::resolve`]).
//!
//! Retired keys are not in the file: their sealed material moves to an
//! archive beside it (`<file>.archive`, same format and passphrase) until
//! `rekey secrets purge` or the end of [`super::ARCHIVE_RETENTION`]. Material
//! is written to the archive before it leaves the file, and leaves the
//! archive only after the file holds what replaces it. The archive has a
//! backup too (`<file>.archive.bak`), which never holds a key the archive
//! does not, so a purged key leaves both.
//!
//! A save never overwrites a file (or archive) another process wrote since
//! this one read it ([`guard`]): two jobs sharing one keyring file take
//! turns, and the later one is refused, nothing written, to run again on
//! what the earlier one saved.

mod atomic;
mod guard;
mod seal;
pub mod uses_beside;

pub use atomic::{archive_path, backup_path, commit, resolve, save_with_archive, write_pending};
pub use guard::{digest_of, save_unless_changed, AsRead, Digest};

use std::fs::{self};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::aead::LessSafeKey;
use serde::{Deserialize, Serialize};

use crate::crypto::keyring::{Key, KeyId};
use crate::crypto::keytable::{KeyState, KeyTable, StoredKey};
use crate::secrets::uses::StoreUse;

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
    /// A relative path naming no file: says where rekey looked, and what the
    /// path is relative to (the directory rekey runs in, not the job file's).
    #[error("keyring file {path}: {source}: rekey looked for {} (a relative path is relative to the directory rekey runs in, {}, not to the job file's directory)", dir.join(path).display(), dir.display())]
    NotFound {
        /// The file, as named.
        path: PathBuf,
        /// The directory rekey runs in.
        dir: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Not a keyring file, or damaged so that it does not parse.
    #[error("keyring file {path} is damaged or not a rekey keyring: {problem}{}", backup.as_ref().map(|b| format!("; nothing was changed: {b}")).unwrap_or_default())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
        /// What its backup holds, when it was read from disk.
        backup: Option<InBackup>,
    },
    /// `<file>.uses` ([`uses_beside`]) does not read as one.
    #[error("{path}, the record of the databases whose values this keyring file's keys encrypt, is damaged: {problem}. Nothing was changed. Put it back from a copy; remove it only where no other database uses the keyring file (a retire would no longer know of their values, and each database's next run records it again)")]
    UsesDamaged {
        /// The record's file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Some sealed keys do not open with the passphrase that opens another:
    /// the file was damaged or altered (one passphrase seals them all).
    #[error("keyring file {path} is damaged: the sealed material of {} does not open with the passphrase that opens key {opened}, so it was corrupted or altered after rekey wrote it; nothing was changed: {}", key_list(keys), backup.as_ref().map_or("restore the file from a backup".to_string(), InBackup::to_string))]
    Altered {
        /// The file holding the keys that do not open.
        path: PathBuf,
        /// The keys that do not open.
        keys: Vec<KeyId>,
        /// A key that opens.
        opened: KeyId,
        /// What its backup holds.
        backup: Option<InBackup>,
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
    /// The file or its archive changed on disk since this process read it:
    /// another process saved it, and saving now would replace what it wrote.
    #[error("keyring file {path} changed since rekey read it (another rekey job sharing it?): nothing was written; run the command again")]
    Changed {
        /// The file.
        path: PathBuf,
    },
}

/// What the backup of a damaged file holds, named in its error: the
/// backup is the version before the file's last save, so restoring it
/// blindly would lose a key that save added. Never any material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InBackup {
    /// There is no backup.
    Nothing {
        /// Where it would be.
        backup: PathBuf,
    },
    /// The backup does not open either.
    Unusable {
        /// The backup.
        backup: PathBuf,
        /// Why, in a few words.
        why: String,
    },
    /// The backup opens and holds these keys' material.
    Keys {
        /// The backup.
        backup: PathBuf,
        /// Each key whose material it holds, with its state there.
        holds: Vec<(KeyId, KeyState)>,
        /// The keys whose material the damaged file lists and the backup
        /// lacks; `None` when the damaged file does not parse enough to tell.
        lacks: Option<Vec<KeyId>>,
    },
}

impl std::fmt::Display for InBackup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InBackup::Nothing { backup } => write!(
                f,
                "there is no backup {}: restore the file from a copy of your own",
                backup.display()
            ),
            InBackup::Unusable { backup, why } => write!(
                f,
                "its backup {} is no use either ({why}): restore the file from a copy of your own",
                backup.display()
            ),
            InBackup::Keys {
                backup,
                holds,
                lacks: Some(lacks),
            } if lacks.is_empty() => write!(
                f,
                "its backup {} holds {}, every key whose material the damaged file lists: restore the file from it",
                backup.display(),
                key_states(holds)
            ),
            InBackup::Keys {
                backup,
                holds,
                lacks: Some(lacks),
            } => write!(
                f,
                "its backup {} holds {} but not {lacking}, which the damaged file lists (the backup is the version before the file's last save): restoring it alone would lose {lacking}, so recover {lacking} from where it came from first",
                backup.display(),
                key_states(holds),
                lacking = key_list(lacks),
            ),
            InBackup::Keys {
                backup,
                holds,
                lacks: None,
            } => write!(
                f,
                "its backup {} holds {}, as they were before the file's last save: a key that save added is not in it, so make sure every key the applications use is among these before restoring the file from it",
                backup.display(),
                key_states(holds)
            ),
        }
    }
}

/// "key 1 (current)", "keys 1 (current) and 2 (pending)".
fn key_states(keys: &[(KeyId, KeyState)]) -> String {
    keys_named(
        &keys
            .iter()
            .map(|(id, state)| format!("{id} ({state})"))
            .collect::<Vec<_>>(),
    )
}

/// What the backup of the damaged file `damaged` holds, `open` giving the
/// keys whose material a backup holds (or why it does not open). The
/// damaged file is read only for the ids of the keys it lists with
/// material, if it parses that far.
pub fn in_backup(
    damaged: &Path,
    open: impl FnOnce(&Path) -> Result<Vec<(KeyId, KeyState)>, String>,
) -> InBackup {
    let backup = backup_path(damaged);
    if !backup.exists() {
        return InBackup::Nothing { backup };
    }
    match open(&backup) {
        Err(why) => InBackup::Unusable { backup, why },
        Ok(holds) => {
            let lacks = listed_with_material(damaged).map(|listed| {
                listed
                    .into_iter()
                    .filter(|id| !holds.iter().any(|(held, _)| held == id))
                    .collect()
            });
            InBackup::Keys {
                backup,
                holds,
                lacks,
            }
        }
    }
}

/// The ids of the keys a store file lists with material, if it parses as
/// JSON with a list of keys.
fn listed_with_material(path: &Path) -> Option<Vec<KeyId>> {
    let doc: serde_json::Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    doc.get("keys")?
        .as_array()?
        .iter()
        .filter(|k| k.get("material").is_some_and(serde_json::Value::is_string))
        .map(|k| KeyId::try_from(k.get("id")?.as_u64()?).ok())
        .collect()
}

impl FileKeyringError {
    /// A damaged file's error, with what its backup holds (`examine`).
    pub fn with_backup(self, examine: impl FnOnce(&Path) -> InBackup) -> Self {
        match self {
            FileKeyringError::Malformed {
                path,
                problem,
                backup: None,
            } => FileKeyringError::Malformed {
                backup: Some(examine(&path)),
                path,
                problem,
            },
            FileKeyringError::Altered {
                path,
                keys,
                opened,
                backup: None,
            } => FileKeyringError::Altered {
                backup: Some(examine(&path)),
                path,
                keys,
                opened,
            },
            other => other,
        }
    }

    /// Why a backup did not open, in a few words.
    pub fn as_backup_problem(&self) -> String {
        match self {
            FileKeyringError::WrongPassphrase { var, .. } => {
                format!("it does not open with the passphrase in {var}")
            }
            FileKeyringError::OpenToOthers { .. } => "group or others may read it".into(),
            FileKeyringError::Io { source, .. } | FileKeyringError::NotFound { source, .. } => {
                format!("it cannot be read: {source}")
            }
            FileKeyringError::Malformed { .. }
            | FileKeyringError::Altered { .. }
            | FileKeyringError::UsesDamaged { .. } => "it is damaged too".into(),
            FileKeyringError::NoPassphrase { .. }
            | FileKeyringError::Exists(_)
            | FileKeyringError::Changed { .. } => "it does not open".into(),
        }
    }
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
    /// The name the job gives it.
    path: PathBuf,
    /// Where it is: `path`, or the file a symbolic link `path` points to.
    /// Saves replace this file; its backup and archive are beside it.
    real: PathBuf,
    /// KDF parameters and salt (kept across saves).
    kdf: Kdf,
    /// The key-encryption key.
    kek: LessSafeKey,
    /// The keys, opened.
    pub table: KeyTable,
    /// The databases the keys encrypt values in, as `<file>.uses` recorded
    /// them when the file was opened ([`uses_beside`]).
    pub uses: Vec<StoreUse>,
    /// Ids of the keys in the archive file as last read or written.
    archived_on_disk: Vec<StoredKey>,
    /// The file and its archive as last read or written: a save refuses to
    /// replace them once another process changed them.
    as_read: AsRead,
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
    keys_named(&ids.iter().map(KeyId::to_string).collect::<Vec<_>>())
}

/// "key a", "keys a and b", "keys a, b and c".
fn keys_named(names: &[String]) -> String {
    match names {
        [one] => format!("key {one}"),
        [first @ .., last] => format!("keys {} and {last}", first.join(", ")),
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
                backup: None,
            },
            None => FileKeyringError::WrongPassphrase {
                path: at.clone(),
                var: var.to_string(),
            },
        })
    }
}

/// The fingerprints of the keys whose material the keyring file at `path`
/// holds and that are not retired, read without its passphrase (the file
/// lists each key's fingerprint beside its sealed material); `None` where
/// no keyring file is there, or it does not read. What another store still
/// holds of a key is not lost when a retire destroys this store's copy.
pub fn fingerprints_held(path: &Path) -> Option<Vec<String>> {
    let doc: Document = read_json(path).ok()?;
    if doc.format != FORMAT {
        return None;
    }
    Some(
        doc.keys
            .into_iter()
            .filter(|k| k.material.is_some() && k.state != KeyState::Retired)
            .map(|k| k.fingerprint.clone())
            .filter(|f| !f.is_empty())
            .collect(),
    )
}

/// Refuses a store file that marks more than one key current, or more than
/// one pending, as malformed: which of them a run targets, and which one
/// applications encrypt with, would depend on their order in the file.
/// rekey never writes such a file; a hand edit or a merge can.
pub fn one_current_one_pending(path: &Path, keys: &[StoredKey]) -> Result<(), FileKeyringError> {
    for (state, fix) in [
        (
            KeyState::Current,
            "keep \"current\" on the key the applications encrypt with and set the other's state to \"previous\" (it stays readable), or restore the file from its backup",
        ),
        (
            KeyState::Pending,
            "keep \"pending\" on the key the rotation in progress staged and set the other's state to \"previous\" (it stays readable), or restore the file from its backup",
        ),
    ] {
        let ids: Vec<KeyId> = keys
            .iter()
            .filter(|k| k.state == state)
            .map(|k| k.id)
            .collect();
        if ids.len() > 1 {
            return Err(FileKeyringError::Malformed {
                path: path.to_path_buf(),
                problem: format!(
                    "{} are {} {state}, and a keyring has one {state} key at most (which one is the target would depend on their order in the file): {fix}",
                    key_list(&ids),
                    if ids.len() == 2 { "both" } else { "all" },
                ),
                backup: None,
            });
        }
    }
    Ok(())
}

/// Refuses a file group or others may read or write (Unix only: elsewhere
/// nothing is checked). rekey writes its files for their owner alone
/// ([`write_pending`]).
fn refuse_open_to_others(path: &Path) -> Result<(), FileKeyringError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path)
            .map_err(unreadable(path))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(FileKeyringError::OpenToOthers {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    Ok(())
}

/// Reads and parses a store file (a keyring file, a KMS keyring file, or
/// an archive or backup of one), refusing one open to others. Bytes that
/// are not the JSON of `T`, text included, are damage: they are never
/// quoted (serde's messages can quote the input), only where it broke.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, FileKeyringError> {
    read_json_as_read(path).map(|(doc, _)| doc)
}

/// [`read_json`], with the digest of the bytes it parsed: what a later save
/// compares the file with ([`save_unless_changed`]).
pub fn read_json_as_read<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<(T, Digest), FileKeyringError> {
    refuse_open_to_others(path)?;
    let bytes = fs::read(path).map_err(unreadable(path))?;
    let read = digest_of(&bytes);
    let doc = serde_json::from_slice(&bytes).map_err(|e| FileKeyringError::Malformed {
        path: path.to_path_buf(),
        problem: json_problem(&e),
        backup: None,
    })?;
    Ok((doc, read))
}

/// Where JSON that is not a store's document broke, never quoting it
/// (serde's messages can quote the input, which may hold key material).
pub fn json_problem(e: &serde_json::Error) -> String {
    let (line, column) = (e.line(), e.column());
    match e.classify() {
        serde_json::error::Category::Eof => {
            format!("it ends before its JSON does, at line {line} column {column} (truncated)")
        }
        serde_json::error::Category::Data => {
            format!("its JSON does not have the fields of one, at line {line} column {column}")
        }
        serde_json::error::Category::Syntax | serde_json::error::Category::Io => {
            format!("invalid JSON at line {line} column {column}")
        }
    }
}

/// Why a store file could not be read: a relative path naming no file says
/// where rekey looked ([`FileKeyringError::NotFound`]).
fn unreadable(path: &Path) -> impl Fn(std::io::Error) -> FileKeyringError + '_ {
    move |source| match std::env::current_dir() {
        Ok(dir) if source.kind() == std::io::ErrorKind::NotFound && path.is_relative() => {
            FileKeyringError::NotFound {
                path: path.to_path_buf(),
                dir,
                source,
            }
        }
        _ => io(path)(source),
    }
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
        let real = resolve(path)?;
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
            as_read: AsRead::before_create(&real)?,
            real,
            kdf,
            kek,
            table,
            uses: Vec::new(),
            archived_on_disk: Vec::new(),
        };
        match file.save() {
            Err(FileKeyringError::Changed { path }) => Err(FileKeyringError::Exists(path)),
            saved => saved.map(|()| file),
        }
    }

    /// Opens a keyring file, with its archive. Every sealed key is tried
    /// before any is judged: a file that does not parse, or some of whose
    /// keys do not open where another does, is damaged; one none of whose
    /// keys opens has a wrong passphrase (or was altered). A damaged file's
    /// error says what its backup holds ([`InBackup`]).
    pub fn open(
        path: &Path,
        passphrase: &[u8],
        passphrase_var: &str,
    ) -> Result<Self, FileKeyringError> {
        Self::open_as_is(path, passphrase, passphrase_var).map_err(|e| {
            e.with_backup(|damaged| {
                in_backup(damaged, |backup| {
                    let file = Self::open_as_is(backup, passphrase, passphrase_var)
                        .map_err(|e| e.as_backup_problem())?;
                    Ok(file
                        .table
                        .entries
                        .iter()
                        .filter(|e| e.key.is_some())
                        .map(|e| (e.id, e.state))
                        .collect())
                })
            })
        })
    }

    /// [`KeyringFile::open`], without looking at backups. Errors name the
    /// file where it is (through any symbolic link `named` is).
    fn open_as_is(
        named: &Path,
        passphrase: &[u8],
        passphrase_var: &str,
    ) -> Result<Self, FileKeyringError> {
        let real = resolve(named)?;
        let path = real.as_path();
        let (doc, file_read) = read_json_as_read::<Document>(path)?;
        if doc.format != FORMAT {
            return Err(FileKeyringError::Malformed {
                path: path.to_path_buf(),
                problem: format!("format is {:?}, expected {FORMAT:?}", doc.format),
                backup: None,
            });
        }
        one_current_one_pending(path, &doc.keys)?;
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
                    backup: None,
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
        let mut archive_read = None;
        if archive.exists() {
            let (archived, read) = read_json_as_read::<Document>(&archive)?;
            archive_read = Some(read);
            for k in archived.keys {
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
        let uses = uses_beside::read(&real)?;
        Ok(KeyringFile {
            path: named.to_path_buf(),
            real,
            kdf: doc.kdf,
            kek,
            table,
            uses,
            archived_on_disk,
            as_read: AsRead::new(Some(file_read), archive_read),
        })
    }

    /// The databases `<file>.uses` records now (another process may have
    /// recorded one since the file was opened).
    pub fn uses_now(&self) -> Result<Vec<StoreUse>, FileKeyringError> {
        uses_beside::read(&self.real)
    }

    /// Applies `change` to the databases `<file>.uses` records, read again
    /// under the file's lock, and writes them where `change` says they
    /// changed; true where it did. The keyring file itself is not written.
    pub fn update_uses(
        &mut self,
        change: impl FnOnce(&mut Vec<StoreUse>) -> bool,
    ) -> Result<bool, FileKeyringError> {
        let (uses, changed) = uses_beside::update(&self.real, change)?;
        self.uses = uses;
        Ok(changed)
    }

    /// The file's name, as the job gives it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the file's version before its last save is kept (beside the
    /// file itself, through any symbolic link).
    pub fn backup(&self) -> PathBuf {
        backup_path(&self.real)
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
                backup: None,
            }
        })?;
        write_pending(&self.real, json.as_bytes())
    }

    /// Keeps a backup of the old version and renames the new one into place.
    /// Once a key is retired, the backup is the new version too, so the
    /// retired material is gone from both.
    pub fn commit(&self, tmp: &Path) -> Result<(), FileKeyringError> {
        commit(
            &self.real,
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
    /// only after the file is saved. All under the lock beside the file, and
    /// only while the file and its archive are as this process read them
    /// (else [`FileKeyringError::Changed`], nothing written).
    pub fn save(&mut self) -> Result<(), FileKeyringError> {
        let mut as_read = std::mem::take(&mut self.as_read);
        let path = self.real.clone();
        let saved = save_unless_changed(&path, &mut as_read, || self.save_now());
        self.as_read = as_read;
        saved
    }

    /// [`KeyringFile::save`], without the lock or the comparison.
    fn save_now(&mut self) -> Result<(), FileKeyringError> {
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
            &self.real,
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
