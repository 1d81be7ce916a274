//! Secret stores: where a job's keys live, read and written for the lifecycle.
//!
//! A [`Store`] loads the keys of a `[keys]` source as a [`KeyTable`] and saves
//! it back after a transition. A keyring file is rewritten atomically. The
//! environment cannot be written by rekey: saving returns the exact variable
//! changes the operator must make (key values only with `--reveal` on a
//! terminal), and the next step checks that they were made.

#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "aws")]
pub mod kms;
#[cfg(not(feature = "aws"))]
mod without_aws;
#[cfg(not(feature = "aws"))]
pub use without_aws::{aws, kms};

use std::io::IsTerminal;

use crate::job::{KeySource, KeysSpec};
use crate::keyring::file::KeyringFile;
use crate::keyring::{encode_key, env, KeyEncoding};
use crate::lifecycle::{Entry, KeyState, KeyTable};
use crate::Error;

/// Keys from the environment, as a table, with the table they were read as.
#[derive(Debug)]
pub struct EnvStore {
    /// Variable prefix (`ENCRYPTION`).
    prefix: String,
    /// The keys as the environment holds them now.
    before: KeyTable,
    /// The keys after the transitions applied so far.
    pub table: KeyTable,
}

/// A writable (or, for the environment, instructable) key store.
#[derive(Debug)]
pub enum Store {
    /// Environment variables.
    Env(EnvStore),
    /// A keyring file.
    File(Box<KeyringFile>),
    /// An AWS Secrets Manager secret.
    Aws(Box<aws::SecretsManagerStore>),
    /// A keyring file of data keys wrapped by AWS KMS.
    Kms(Box<kms::KmsKeyring>),
}

/// Opens the keyring file a `[keys]` section names.
pub fn open_file(keys: &KeysSpec) -> Result<KeyringFile, Error> {
    let path = keys.path.as_ref().ok_or_else(|| Error::Config("keys source \"file\" needs path = \"keyring.json\"".into()))?;
    let var = keys.passphrase_var();
    let pass = std::env::var(var).map_err(|_| Error::Config(format!("keyring file {} needs its passphrase in {var}", path.display())))?;
    KeyringFile::open(path, pass.as_bytes(), var).map_err(|e| Error::Config(e.to_string()))
}

impl Store {
    /// Opens the store of `keys`.
    pub async fn open(keys: &KeysSpec) -> Result<Store, Error> {
        match keys.source {
            KeySource::AwsSecretsManager => Ok(Store::Aws(Box::new(aws::SecretsManagerStore::open(keys).await?))),
            KeySource::AwsKms => Ok(Store::Kms(Box::new(kms::KmsKeyring::open(keys).await?))),
            KeySource::File => Ok(Store::File(Box::new(open_file(keys)?))),
            KeySource::Env => {
                let ring = env::from_process_env(&keys.prefix).map_err(|e| Error::Config(e.to_string()))?;
                let versioned_prefix = format!("{}_KEY_V", keys.prefix);
                let versioned = std::env::vars().any(|(k, _)| k.strip_prefix(&versioned_prefix).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())));
                if !versioned {
                    return Err(Error::Config(format!(
                        "the lifecycle commands manage versioned environment keys ({p}_KEY_V<n> with {p}_CURRENT_VERSION); \
                         with {p}_KEY / {p}_KEY_NEW, re-encrypt with `rekey run`, then move {p}_KEY_NEW to {p}_KEY yourself",
                        p = keys.prefix
                    )));
                }
                let entries = ring
                    .keys()
                    .map(|k| {
                        let state = if k.id() == ring.current_id() {
                            KeyState::Current
                        } else if Some(k.id()) == ring.pending_id() {
                            KeyState::Pending
                        } else {
                            KeyState::Previous
                        };
                        Entry { id: k.id(), state, created_at: 0, changed_at: 0, key: Some(k.clone()) }
                    })
                    .collect();
                let table = KeyTable { entries };
                Ok(Store::Env(EnvStore { prefix: keys.prefix.clone(), before: table.clone(), table }))
            }
            KeySource::TinkKeyset => Err(Error::Config(
                "a Tink keyset is managed with Tink's own tools (tinkey add-key / promote-key); rekey rotates the data under it with `rekey run`".into(),
            )),
        }
    }

    /// The keys and their states.
    pub fn table(&self) -> &KeyTable {
        match self {
            Store::Env(e) => &e.table,
            Store::File(f) => &f.table,
            Store::Aws(a) => &a.table,
            Store::Kms(k) => &k.table,
        }
    }

    /// The keys, to apply a transition.
    pub fn table_mut(&mut self) -> &mut KeyTable {
        match self {
            Store::Env(e) => &mut e.table,
            Store::File(f) => &mut f.table,
            Store::Aws(a) => &mut a.table,
            Store::Kms(k) => &mut k.table,
        }
    }

    /// Names the store for the audit trail (never a value).
    pub fn secret_id(&self) -> String {
        match self {
            Store::Env(e) => format!("env:{}", e.prefix),
            Store::File(f) => format!("file:{}", f.path().display()),
            Store::Aws(a) => a.secret_id(),
            Store::Kms(k) => k.secret_id(),
        }
    }

    /// A new key with this id: generated by KMS for the KMS store, else from the OS CSPRNG.
    pub async fn new_key(&mut self, id: crate::keyring::KeyId) -> Result<crate::keyring::Key, Error> {
        match self {
            Store::Kms(k) => k.new_key(id).await,
            _ => Ok(crate::keyring::Key::new(id, *crate::keyring::generate_material())),
        }
    }

    /// Whether rekey itself can write this store.
    pub fn writable(&self) -> bool {
        matches!(self, Store::File(_) | Store::Aws(_) | Store::Kms(_))
    }

    /// Persists the table. For the environment, returns the variable changes
    /// the operator must make instead (empty when nothing is left to do).
    /// Key values are shown only with `reveal` and stdout on a terminal.
    pub async fn save(&mut self, reveal: bool) -> Result<Vec<String>, Error> {
        match self {
            Store::Aws(a) => {
                a.save().await?;
                Ok(Vec::new())
            }
            Store::Kms(k) => {
                k.save().await?;
                Ok(Vec::new())
            }
            Store::File(f) => {
                f.save().map_err(|e| Error::Runtime(e.to_string()))?;
                Ok(Vec::new())
            }
            Store::Env(e) => Ok(e.instructions(reveal && std::io::stdout().is_terminal())),
        }
    }
}

impl EnvStore {
    fn instructions(&self, reveal: bool) -> Vec<String> {
        let p = &self.prefix;
        let mut out = Vec::new();
        let value = |e: &Entry| match (&e.key, reveal) {
            (Some(k), true) => encode_key(k.material(), KeyEncoding::Hex).to_string(),
            _ => "<a new key from `rekey keygen` (or run with --reveal on a terminal to have rekey print one)>".into(),
        };
        for e in &self.table.entries {
            let before = self.before.entries.iter().find(|b| b.id == e.id);
            match (before.map(|b| b.state), e.state) {
                (None, KeyState::Pending) => {
                    out.push(format!("export {p}_KEY_V{}={}", e.id, value(e)));
                    out.push(format!("export {p}_PENDING_VERSION={}", e.id));
                }
                (Some(KeyState::Pending), KeyState::Current) => {
                    out.push(format!("export {p}_CURRENT_VERSION={}", e.id));
                    out.push(format!("unset {p}_PENDING_VERSION"));
                }
                (Some(b), KeyState::Current) if b != KeyState::Current => out.push(format!("export {p}_CURRENT_VERSION={}", e.id)),
                (Some(b), KeyState::Retired) if b != KeyState::Retired => out.push(format!("unset {p}_KEY_V{}", e.id)),
                (Some(KeyState::Pending), KeyState::Previous) => out.push(format!("unset {p}_PENDING_VERSION   # key {} stays, to read what was rewritten under it", e.id)),
                _ => {}
            }
        }
        out
    }
}
