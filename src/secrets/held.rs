//! Whether the key a run writes under is still in its store, read again
//! while the run goes and at its end. A store that loses the key (a keyring
//! file put back from an older copy by a deployment, a hand edit, another
//! tool) while values are written under it leaves those values readable
//! only through this process's memory: once it exits they are lost.
//!
//! A key the run found staged (pending) and the store no longer holds,
//! with nothing staged in its place and its id free, is put back as the
//! pending key: it is the only copy. Otherwise (the id holds another key,
//! the key was retired, the store cannot be written) the key is lost to
//! the store and the run must stop and say so. The environment is read
//! once per process and cannot change under it: not watched.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use crate::crypto::keyring::{tink, Key, Keyring};
use crate::crypto::keytable::{now, KeyState};
use crate::Error;

use super::{KeySource, KeysSpec, Store};

/// What a look at the store found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// The key is there, with the same material.
    Present,
    /// The key was missing; rekey put it back as the pending key.
    PutBack {
        /// What the store had become, for the warning.
        why: String,
        /// The store as the audit trail names it (`Store::secret_id`).
        secret_id: String,
    },
    /// The key is in the store, but no longer the one values go to.
    Demoted {
        /// What the store had become.
        why: String,
    },
    /// The key is not in the store and could not be put back.
    Lost {
        /// What the store holds instead, and why it was not put back.
        why: String,
    },
}

/// One store a run writes under, and the key it writes with.
pub struct KeyWatch {
    /// The store.
    keys: KeysSpec,
    /// The key the run writes under.
    key: Key,
    /// Whether the run found it staged (pending), not current.
    pending: bool,
    /// The file's length and time last read, where the store is a file:
    /// a file unchanged since is not read again (its passphrase's KDF costs).
    seen: Option<(u64, Option<SystemTime>)>,
    /// How the store is named in messages.
    name: String,
    /// When a store that is not a file was last read: read at most once per
    /// [`REMOTE_EVERY`] during a run (each read calls AWS, or opens a session).
    read_at: Option<Instant>,
}

/// The least time between two looks at a store that is not a file (a
/// Secrets Manager secret, a key table) during a run.
pub const REMOTE_EVERY: Duration = Duration::from_secs(60);

impl std::fmt::Debug for KeyWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyWatch")
            .field("store", &self.name)
            .field("key", &self.key.id())
            .field("pending", &self.pending)
            .finish()
    }
}

impl KeyWatch {
    /// Watches the target key of `keyring`, loaded from `keys`; `None` for
    /// the environment, which cannot change under a running process.
    pub fn new(keys: &KeysSpec, keyring: &Keyring) -> Option<KeyWatch> {
        if keys.source == KeySource::Env {
            return None;
        }
        let name = match (&keys.source, &keys.path, &keys.secret_id) {
            (KeySource::AwsSecretsManager, _, Some(id)) => format!("secret {id}"),
            (KeySource::TinkKeyset, Some(p), _) => format!("Tink keyset {}", p.display()),
            (KeySource::AwsKms, Some(p), _) => format!("KMS keyring {}", p.display()),
            (KeySource::File, Some(p), _) => format!("keyring file {}", p.display()),
            (KeySource::Table, _, _) => "the key table".into(),
            _ => "the key store".into(),
        };
        let mut watch = KeyWatch {
            keys: keys.clone(),
            key: keyring.target().clone(),
            pending: keyring.pending_id().is_some(),
            seen: None,
            name,
            read_at: Some(Instant::now()),
        };
        // the file as the run loaded it: a later look reads it only once changed
        watch.seen = watch.stat();
        Some(watch)
    }

    /// The store, for messages.
    pub fn store(&self) -> &str {
        &self.name
    }

    /// The key watched: its id and fingerprint, never its material.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// Whether the store is a file on this machine (a failure to read it is
    /// no network's passing fault).
    pub fn is_file(&self) -> bool {
        self.path().is_some()
    }

    /// Seals the key watched into a keyring file of its own beside the
    /// store's file (`<file>.key-<id>-<fingerprint>.json`, the store's
    /// passphrase, mode 600), where the store is a keyring file: the copy
    /// a lost key leaves when the run must stop. Its path, or `None`.
    pub fn save_copy(&self) -> Option<PathBuf> {
        if self.keys.source != KeySource::File {
            return None;
        }
        let path = self.path()?;
        let pass = std::env::var(self.keys.passphrase_var()).ok()?;
        let copy = PathBuf::from(format!(
            "{}.key-{}-{}.json",
            path.display(),
            self.key.id(),
            self.key.fingerprint()
        ));
        if copy.exists() {
            return Some(copy);
        }
        let table = crate::crypto::keytable::KeyTable {
            entries: vec![crate::crypto::keytable::Entry {
                id: self.key.id(),
                state: KeyState::Current,
                created_at: now(),
                changed_at: now(),
                key: Some(self.key.clone()),
                compromised: false,
            }],
        };
        super::file::KeyringFile::create(&copy, pass.as_bytes(), table)
            .ok()
            .map(|_| copy)
    }

    /// The path of a store kept in a file.
    fn path(&self) -> Option<&PathBuf> {
        match self.keys.source {
            KeySource::File | KeySource::AwsKms | KeySource::TinkKeyset => self.keys.path.as_ref(),
            _ => None,
        }
    }

    /// The file's length and modification time (`None`: not a file, or unreadable).
    fn stat(&self) -> Option<(u64, Option<SystemTime>)> {
        let meta = std::fs::metadata(self.path()?).ok()?;
        Some((meta.len(), meta.modified().ok()))
    }

    /// Looks at the store: the key there, put back, or lost. With `always`
    /// false, a file unchanged since the last look is not read again.
    pub async fn check(&mut self, always: bool) -> Result<Held, Error> {
        let stat = self.stat();
        if !always && stat.is_some() && stat == self.seen {
            return Ok(Held::Present);
        }
        let recent = self.read_at.is_some_and(|at| at.elapsed() < REMOTE_EVERY);
        if !always && self.path().is_none() && recent {
            return Ok(Held::Present);
        }
        self.read_at = Some(Instant::now());
        let held = self.look().await?;
        // a file rekey rewrote (the key put back) is read again next time
        self.seen = if held == Held::Present { stat } else { None };
        Ok(held)
    }

    /// Reads the store and finds the key in it.
    async fn look(&self) -> Result<Held, Error> {
        let (id, fingerprint) = (self.key.id(), self.key.fingerprint());
        if self.keys.source == KeySource::TinkKeyset {
            let path = self.path().cloned().unwrap_or_default();
            let text = std::fs::read_to_string(&path).map_err(|e| {
                Error::Runtime(format!("cannot read Tink keyset {}: {e}", path.display()))
            })?;
            let ring = tink::parse_json(&text)
                .map_err(|e| Error::Runtime(format!("Tink keyset {}: {e}", path.display())))?;
            return Ok(match ring.get(id) {
                Some(k) if k.fingerprint() == fingerprint => Held::Present,
                Some(_) => Held::Lost {
                    why: format!("its key {id} is another key now (Tink keysets are changed with Tink's own tools)"),
                },
                None => Held::Lost {
                    why: format!("it no longer holds key {id} (Tink keysets are changed with Tink's own tools)"),
                },
            });
        }
        if let Some(path) = self.path() {
            if !path.exists() {
                // gone whole: nothing to put the key back into
                return Ok(lost(format!("{} no longer exists", path.display())));
            }
        }
        let mut store = Store::open_to_look(&self.keys).await?;
        // a layout that keeps a previous key's material in the secret's
        // former version: read there, as a run's load does
        let archived = store
            .table()
            .entries
            .iter()
            .any(|e| e.id == id && e.key.is_none() && e.state != KeyState::Retired);
        if archived {
            store.fetch_archived(id).await?;
        }
        let table = store.table();
        let why = match table.entries.iter().find(|e| e.id == id) {
            Some(e) => match (&e.key, e.state) {
                (Some(k), KeyState::Previous) if k.fingerprint() == fingerprint && self.pending => {
                    // un-staged (an abort, a rollback): still held, but values
                    // under it are on an old key now, whatever the run wrote
                    return Ok(Held::Demoted {
                        why: format!("key {id} is no longer staged in it but previous (an abort or a rollback ran)"),
                    });
                }
                (Some(k), KeyState::Pending | KeyState::Current | KeyState::Previous)
                    if k.fingerprint() == fingerprint =>
                {
                    return Ok(Held::Present)
                }
                (_, KeyState::Retired) => return Ok(lost(format!("key {id} is retired in it"))),
                (Some(_), _) => return Ok(lost(format!("its key {id} is another key now"))),
                (None, _) => return Ok(lost(format!("it holds key {id} without its material"))),
            },
            None => format!("it no longer holds key {id}"),
        };
        if !self.pending {
            return Ok(lost(format!(
                "{why}; it was the current key, which rekey does not put back"
            )));
        }
        if let Some(other) = table.id_in(KeyState::Pending) {
            return Ok(lost(format!(
                "{why}, and key {other} is staged in its place"
            )));
        }
        if !store.writable() {
            return Ok(lost(format!("{why}, and rekey cannot write this store")));
        }
        if let Err(e) = store.table_mut().stage(self.key.clone(), now()) {
            return Ok(lost(format!("{why}, and it cannot take the key back: {e}")));
        }
        match store.save_keeping_archive().await {
            Ok(()) => Ok(Held::PutBack {
                why,
                secret_id: store.secret_id(),
            }),
            Err(e) => Ok(lost(format!(
                "{why}, and putting the key back failed: {}",
                e.chain()
            ))),
        }
    }
}

/// A key lost to its store.
fn lost(why: String) -> Held {
    Held::Lost { why }
}
