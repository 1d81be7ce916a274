//! AWS KMS as a key store (a key hierarchy: a master key wraps data keys): data keys are generated
//! by KMS under a master key, and only their wrapped form (KMS ciphertext
//! blobs) is stored, in a keyring file written atomically like the
//! passphrase-sealed one, and read like it ([`file::read_json`]): refused
//! when group or others may read it, damaged when it does not parse.
//! Reading a key is a KMS Decrypt; nothing unwrapped ever touches the disk.
//! A save never overwrites a file another process wrote since this one read
//! it ([`file::save_unless_changed`]), nor replaces a symbolic link to the
//! file with a file ([`file::resolve`]). The databases its keys encrypt
//! values in are recorded beside it as for a passphrase keyring file
//! ([`file::uses_beside`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::Client;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::spec::KeysSpec;
use crate::crypto::keyring::{Key, KeyId, KEY_LEN};
use crate::crypto::keytable::{Entry, KeyState, KeyTable, StoredKey};
use crate::secrets::file::{self, FileKeyringError};
use crate::secrets::rewrap::Rewrapped;
use crate::secrets::uses::StoreUse;
use crate::secrets::wrap;
use crate::Error;

/// Format tag of a KMS-wrapped keyring file.
const FORMAT: &str = "rekey-keyring-kms/1";

/// The file's JSON.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    /// Always [`FORMAT`].
    format: String,
    /// The master key the data keys are wrapped under.
    kms_key_id: String,
    /// The keys; `material` is base64 of the KMS ciphertext blob.
    keys: Vec<StoredKey>,
}

/// A KMS-wrapped keyring file, opened.
pub struct KmsKeyring {
    /// The file, as the job names it.
    path: PathBuf,
    /// Where it is: `path`, or the file a symbolic link `path` points to.
    real: PathBuf,
    /// The master key.
    kms_key_id: String,
    /// KMS client.
    client: Client,
    /// Wrapped blobs by key id.
    wrapped: HashMap<KeyId, Vec<u8>>,
    /// The keys, unwrapped.
    pub table: KeyTable,
    /// The keys in the archive file as last read or written.
    archived_on_disk: Vec<StoredKey>,
    /// The file and its archive as last read or written.
    as_read: file::AsRead,
}

impl std::fmt::Debug for KmsKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsKeyring")
            .field("path", &self.path)
            .field("kms_key_id", &self.kms_key_id)
            .field("table", &self.table)
            .finish()
    }
}

/// Reads a KMS keyring file or its archive as the passphrase keyring reads
/// its own ([`file::read_json`]): refused when group or others may read it,
/// damaged (saying what its backup holds) when it is not one.
fn read_document(path: &Path) -> Result<(Document, file::Digest), Error> {
    let (doc, read): (Document, _) = file::read_json_as_read(path).map_err(damaged)?;
    if doc.format != FORMAT {
        return Err(damaged(FileKeyringError::Malformed {
            path: path.to_path_buf(),
            problem: format!("format is {:?}, expected {FORMAT:?}", doc.format),
            backup: None,
        }));
    }
    file::one_current_one_pending(path, &doc.keys).map_err(damaged)?;
    Ok((doc, read))
}

/// A KMS keyring file's error; a damaged one says what its backup holds
/// (the keys it lists wrapped: unwrapping them is left to the restore).
fn damaged(e: FileKeyringError) -> Error {
    let listed = |backup: &Path| {
        let doc: Document = file::read_json(backup).map_err(|e| e.as_backup_problem())?;
        if doc.format != FORMAT {
            return Err("it is not a KMS keyring file".to_string());
        }
        Ok(doc
            .keys
            .iter()
            .filter(|k| k.material.is_some())
            .map(|k| (k.id, k.state))
            .collect())
    };
    Error::Config(e.with_backup(|at| file::in_backup(at, listed)).to_string())
}

fn settings(keys: &KeysSpec) -> Result<(PathBuf, String), Error> {
    let path = keys.path.clone().ok_or_else(|| Error::Config("keys source \"aws-kms\" needs path = \"keyring.json\" (where the wrapped keys are kept)".into()))?;
    let id = keys.kms_key_id.clone().ok_or_else(|| {
        Error::Config("keys source \"aws-kms\" needs kms_key_id = \"alias/... or key ARN\"".into())
    })?;
    Ok((path, id))
}

/// Unwraps one stored key through KMS (none once purged), keeping its blob.
async fn unwrap_key(
    client: &Client,
    kms_key_id: &str,
    path: &std::path::Path,
    k: &StoredKey,
    wrapped: &mut HashMap<KeyId, Vec<u8>>,
) -> Result<Option<Key>, Error> {
    let Some(b64) = &k.material else {
        return Ok(None);
    };
    let blob = B64.decode(b64).map_err(|_| {
        damaged(FileKeyringError::Malformed {
            path: path.to_path_buf(),
            problem: format!("key {}: material is not base64", k.id),
            backup: None,
        })
    })?;
    let out = client
        .decrypt()
        .ciphertext_blob(Blob::new(blob.clone()))
        .key_id(kms_key_id)
        .send()
        .await
        .map_err(|e| wrap::kms_error(&format!("unwrapping key {}", k.id), e))?;
    let plain = Zeroizing::new(
        out.plaintext()
            .map(|p| p.as_ref().to_vec())
            .unwrap_or_default(),
    );
    let material: [u8; KEY_LEN] = plain.as_slice().try_into().map_err(|_| {
        Error::Config(format!(
            "KMS unwrapped key {} to {} bytes, not 32",
            k.id,
            plain.len()
        ))
    })?;
    wrapped.insert(k.id, blob);
    Ok(Some(Key::new(k.id, material)))
}

impl KmsKeyring {
    /// Opens the file and unwraps every key, retired ones from its archive.
    pub async fn open(keys: &KeysSpec) -> Result<Self, Error> {
        Self::open_with(keys, false).await
    }

    /// As [`KmsKeyring::open`]; with `any_master` (a master key rewrap), the
    /// master key the file names is used even where the job names another.
    pub async fn open_with(keys: &KeysSpec, any_master: bool) -> Result<Self, Error> {
        let (path, kms_key_id) = settings(keys)?;
        let real = file::resolve(&path).map_err(damaged)?;
        let (doc, file_read) = read_document(&real)?;
        let archive = file::archive_path(&real);
        let (archived, archive_read) = if archive.exists() {
            let (doc, read) = read_document(&archive)?;
            (Some(doc), Some(read))
        } else {
            (None, None)
        };
        let client = Client::new(&super::aws::sdk_config(keys).await);
        if doc.kms_key_id != kms_key_id && !any_master {
            return Err(Error::Config(format!(
                "keyring file {} is wrapped under KMS key {:?}, but the job names {kms_key_id:?}: name the file's key in [keys] kms_key_id \
                 (after `rekey secrets rewrap --to-kms-key`, the new one), or finish the rewrap to the job's key",
                path.display(),
                doc.kms_key_id
            )));
        }
        let kms_key_id = doc.kms_key_id.clone();
        let mut table = KeyTable::default();
        let mut wrapped = HashMap::new();
        for k in doc.keys {
            let key = unwrap_key(&client, &doc.kms_key_id, &real, &k, &mut wrapped).await?;
            table.entries.push(k.into_entry(key));
        }
        // retired keys' wrapped material, kept in the archive until purged
        let mut archived_on_disk = Vec::new();
        if let Some(doc) = archived {
            for k in doc.keys {
                let key = unwrap_key(&client, &kms_key_id, &archive, &k, &mut wrapped).await?;
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
        Ok(KmsKeyring {
            path,
            real,
            kms_key_id: doc.kms_key_id,
            client,
            wrapped,
            table,
            archived_on_disk,
            as_read: file::AsRead::new(Some(file_read), archive_read),
        })
    }

    /// Creates the file with `table`, wrapping each key with KMS.
    pub async fn create(keys: &KeysSpec, table: KeyTable) -> Result<(), Error> {
        let (path, kms_key_id) = settings(keys)?;
        if path.exists() {
            return Err(Error::Config(format!(
                "keyring file {} already exists; refusing to overwrite it",
                path.display()
            )));
        }
        let client = Client::new(&super::aws::sdk_config(keys).await);
        let real = file::resolve(&path).map_err(|e| Error::Runtime(e.to_string()))?;
        let as_read =
            file::AsRead::before_create(&real).map_err(|e| Error::Runtime(e.to_string()))?;
        let mut ring = KmsKeyring {
            path,
            real,
            kms_key_id,
            client,
            wrapped: HashMap::new(),
            table,
            archived_on_disk: Vec::new(),
            as_read,
        };
        ring.save().await
    }

    /// A new data key from KMS (GenerateDataKey), wrapped under the master key.
    pub async fn new_key(&mut self, id: KeyId) -> Result<Key, Error> {
        let out = self
            .client
            .generate_data_key()
            .key_id(&self.kms_key_id)
            .key_spec(aws_sdk_kms::types::DataKeySpec::Aes256)
            .send()
            .await
            .map_err(|e| wrap::kms_error("generating a data key", e))?;
        let plain = Zeroizing::new(
            out.plaintext()
                .map(|p| p.as_ref().to_vec())
                .unwrap_or_default(),
        );
        let material: [u8; KEY_LEN] = plain
            .as_slice()
            .try_into()
            .map_err(|_| Error::Runtime("KMS returned a data key that is not 32 bytes".into()))?;
        let blob = out.ciphertext_blob().ok_or_else(|| {
            Error::Runtime("AWS KMS generated a data key but returned no wrapped form of it".into())
        })?;
        self.wrapped.insert(id, blob.as_ref().to_vec());
        Ok(Key::new(id, material))
    }

    /// The databases `<file>.uses` beside the file records now
    /// ([`file::uses_beside`], as for a passphrase keyring file).
    pub fn uses_now(&self) -> Result<Vec<StoreUse>, FileKeyringError> {
        file::uses_beside::read(&self.real)
    }

    /// Applies `change` to the records beside the file, read again under
    /// the lock its saves take, written where `change` says they changed;
    /// true where they did. The keyring file itself is not written.
    pub fn update_uses(
        &mut self,
        change: impl FnOnce(&mut Vec<StoreUse>) -> bool,
    ) -> Result<bool, FileKeyringError> {
        file::uses_beside::update(&self.real, change).map(|(_, changed)| changed)
    }

    /// Where the file's version before its last save is kept.
    pub fn backup(&self) -> PathBuf {
        file::backup_path(&self.real)
    }

    /// Names the store for the audit trail.
    pub fn secret_id(&self) -> String {
        format!("aws-kms:{}:{}", self.kms_key_id, self.path.display())
    }

    /// Master key rewrap of the file: every data key (archive included)
    /// re-wrapped under `to` inside KMS and checked to unwrap to the same
    /// key under `to` alone, then the file (and its archive) rewritten
    /// naming `to`. Killed before the write, the file is as it was.
    pub async fn rewrap_to(&mut self, to: &str) -> Result<Rewrapped, Error> {
        let target = wrap::usable_master(&self.client, to)
            .await
            .map_err(|e| Error::Config(format!("{e}; nothing was re-wrapped")))?;
        let mut out = Rewrapped {
            target: target.clone(),
            ..Rewrapped::default()
        };
        let mut ids: Vec<KeyId> = self.wrapped.keys().copied().collect();
        ids.sort_unstable();
        let mut rewrapped = HashMap::new();
        for id in ids {
            let Some(old) = self.wrapped.get(&id) else {
                continue;
            };
            out.total += 1;
            let (key, under) = wrap::unwrap(&self.client, id, old, None).await?;
            if under == target {
                out.already += 1;
                rewrapped.insert(id, old.clone());
                continue;
            }
            out.from.insert(under);
            let new = wrap::rewrap(&self.client, id, old, &target).await?;
            let (again, _) = wrap::unwrap(&self.client, id, &new, Some(&target)).await?;
            if again.fingerprint() != key.fingerprint() {
                return Err(Error::Runtime(format!(
                    "data key {id} re-wrapped under {target} unwraps to another key; nothing was replaced"
                )));
            }
            rewrapped.insert(id, new);
            out.rewrapped += 1;
        }
        self.wrapped = rewrapped;
        self.kms_key_id = to.to_string();
        self.save().await?;
        Ok(out)
    }

    /// Wraps any key not wrapped yet and writes the file atomically.
    pub async fn save(&mut self) -> Result<(), Error> {
        for e in &self.table.entries {
            if let (Some(k), false) = (&e.key, self.wrapped.contains_key(&e.id)) {
                let out = self
                    .client
                    .encrypt()
                    .key_id(&self.kms_key_id)
                    .plaintext(Blob::new(k.material().to_vec()))
                    .send()
                    .await
                    .map_err(|err| wrap::kms_error(&format!("wrapping key {}", e.id), err))?;
                let blob = out.ciphertext_blob().ok_or_else(|| {
                    Error::Runtime(format!(
                        "AWS KMS wrapped key {} but returned no ciphertext; nothing was saved",
                        e.id
                    ))
                })?;
                self.wrapped.insert(e.id, blob.as_ref().to_vec());
            }
        }
        let wrapped = |e: &Entry| {
            self.wrapped
                .get(&e.id)
                .map(|b| B64.encode(b))
                .ok_or_else(|| {
                    Error::Runtime(format!(
                        "key {} has no KMS-wrapped form; nothing was saved",
                        e.id
                    ))
                })
        };
        let keys = self
            .table
            .entries
            .iter()
            .map(|e| StoredKey::from_entry(e, |_| wrapped(e)))
            .collect::<Result<_, _>>()?;
        let mut archived = Vec::new();
        for e in &self.table.entries {
            archived.extend(StoredKey::archived(e, |_| wrapped(e))?);
        }
        let doc = |keys: Vec<StoredKey>| Document {
            format: FORMAT.into(),
            kms_key_id: self.kms_key_id.clone(),
            keys,
        };
        let json =
            serde_json::to_string_pretty(&doc(keys)).map_err(|e| Error::Runtime(e.to_string()))?;
        let main = || {
            let tmp = file::write_pending(&self.real, json.as_bytes())?;
            file::commit(
                &self.real,
                &tmp,
                self.table
                    .entries
                    .iter()
                    .any(|e| e.state == KeyState::Retired),
            )
        };
        let render = |keys: &[StoredKey]| serde_json::to_vec_pretty(&doc(keys.to_vec()));
        let mut as_read = self.as_read.clone();
        file::save_unless_changed(&self.real, &mut as_read, || {
            file::save_with_archive(
                &self.real,
                archived.clone(),
                &self.archived_on_disk,
                render,
                main,
            )
        })
        .map_err(|e| Error::Runtime(e.to_string()))?;
        self.as_read = as_read;
        self.archived_on_disk = archived;
        Ok(())
    }
}
