//! Secret stores: where a job's keys live, read and written for the lifecycle.
//!
//! A [`Store`] loads the keys of a `[keys]` source as a [`KeyTable`] and saves
//! it back after a transition. A keyring file is rewritten atomically. The
//! environment cannot be written by rekey: saving returns the exact variable
//! changes the operator must make (key values only with `--reveal` on a
//! terminal), and the next step checks that they were made.
//! A key table ([`table`]) is the application's own table of KMS-wrapped
//! data keys, written back in one transaction; [`rewrap`] moves every
//! KMS-wrapped data key under a new master key.
//! [`load_keyring`] is the one dispatch from a `[keys]` section to its keys.
//! Uses the crypto and database layers only.

pub mod archived;
#[cfg(feature = "aws")]
pub mod aws;
pub mod file;
pub mod held;
#[cfg(feature = "aws")]
pub mod kms;
pub mod layout;
#[cfg(feature = "aws")]
pub mod rewrap;
pub mod spec;
pub mod table;
pub mod uses;
#[cfg(not(feature = "aws"))]
mod without_aws;
#[cfg(feature = "aws")]
pub mod wrap;

pub use spec::{KeySource, KeysSpec, Layout};
#[cfg(not(feature = "aws"))]
pub use without_aws::{aws, kms, rewrap};

use std::io::IsTerminal;

use crate::crypto::keyring::{encode_key, env, tink, Key, KeyEncoding, KeyId, Keyring};
use crate::crypto::keytable::{now, rfc3339, Entry, KeyState, KeyTable};
use crate::Error;
use file::KeyringFile;

/// Keys from the environment, as a table, with the table they were read as.
#[derive(Debug)]
pub struct EnvStore {
    /// Variable prefix (`ENCRYPTION`).
    prefix: String,
    /// The dual convention (`<P>_KEY` + `<P>_KEY_NEW`), else the versioned one.
    dual: bool,
    /// How keys are written in instructions.
    encoding: KeyEncoding,
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
    /// A table of data keys wrapped by AWS KMS, in the target database.
    Table(Box<table::KeyTableStore>),
}

/// Opens the keyring file a `[keys]` section names.
pub fn open_file(keys: &KeysSpec) -> Result<KeyringFile, Error> {
    let path = keys.path.as_ref().ok_or_else(|| {
        Error::Config("keys source \"file\" needs path = \"keyring.json\"".into())
    })?;
    let var = keys.passphrase_var();
    let pass = std::env::var(var).map_err(|_| {
        Error::Config(format!(
            "keyring file {} needs its passphrase in {var}",
            path.display()
        ))
    })?;
    KeyringFile::open(path, pass.as_bytes(), var).map_err(|e| Error::Config(e.to_string()))
}

/// A keyring file's record that could not be read or written: the disk
/// (exit 1, run again once fixed) or the configuration (exit 2).
fn uses_error(e: file::FileKeyringError) -> Error {
    match e {
        file::FileKeyringError::Io { .. } => Error::Runtime(e.to_string()),
        other => Error::Config(other.to_string()),
    }
}

/// How long a retired key's material stays in its store's archive before a
/// save destroys it (`rekey secrets purge` destroys it sooner; a retire for
/// a compromised key, at once).
pub const ARCHIVE_RETENTION: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Loads the keyring a `[keys]` section names, for a run: every source,
/// and both environment conventions (versioned, and current + new).
pub async fn load_keyring(keys: &KeysSpec) -> Result<Keyring, Error> {
    match keys.source {
        KeySource::Env => {
            env::from_process_env(&keys.prefix).map_err(|e| Error::Config(e.to_string()))
        }
        KeySource::TinkKeyset => {
            let path = keys.path.as_ref().ok_or_else(|| {
                Error::Config("keys source \"tink-keyset\" needs path = \"keyset.json\"".into())
            })?;
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::Config(format!("cannot read Tink keyset {}: {e}", path.display()))
            })?;
            tink::parse_json(&text)
                .map_err(|e| Error::Config(format!("Tink keyset {}: {e}", path.display())))
        }
        KeySource::File | KeySource::AwsSecretsManager | KeySource::AwsKms | KeySource::Table => {
            let mut store = Store::open(keys).await?;
            // A previous key the content no longer holds (the value layout and
            // the dual convention keep only the current key after promotion)
            // is read from the store's former versions: values written late
            // under it must still be rewritten, and verified.
            let previous: Vec<KeyId> = store
                .table()
                .entries
                .iter()
                .filter(|e| e.state == KeyState::Previous && e.key.is_none())
                .map(|e| e.id)
                .collect();
            for id in previous {
                store.fetch_archived(id).await?;
            }
            let table = store.table();
            // with nothing staged, a run's target is the current key: one
            // marked compromised (a key table's COMPROMISED row read as
            // current) must never receive values
            if let (None, Some(c)) = (table.id_in(KeyState::Pending), table.compromised_current()) {
                return Err(Error::Config(format!(
                    "{}: the current key {c} is marked compromised and no new key is staged, so a run would \
                     rewrite values under the compromised key: stage one first (`rekey rotate --reason compromise`)",
                    store.secret_id(),
                )));
            }
            table
                .keyring()
                .map_err(|e| Error::Config(format!("{}: {e}", store.kind())))
        }
    }
}

impl Store {
    /// Creates the store `keys` names, holding `table`; says what it created.
    pub async fn create(keys: &KeysSpec, table: KeyTable) -> Result<String, Error> {
        match keys.source {
            KeySource::File => {
                let path = keys.path.clone().ok_or_else(|| Error::Config("keys source \"file\" needs path".into()))?;
                let var = keys.passphrase_var();
                let pass = std::env::var(var).map_err(|_| Error::Config(format!("set the new keyring's passphrase in {var}")))?;
                KeyringFile::create(&path, pass.as_bytes(), table).map_err(|e| Error::Config(e.to_string()))?;
                Ok(format!("keyring file {}", path.display()))
            }
            KeySource::AwsSecretsManager => {
                aws::SecretsManagerStore::create(keys, &table).await?;
                Ok(format!("secret {:?}", keys.secret_id.clone().unwrap_or_default()))
            }
            KeySource::AwsKms => {
                kms::KmsKeyring::create(keys, table).await?;
                Ok(format!("KMS-wrapped keyring {}", keys.path.clone().unwrap_or_default().display()))
            }
            KeySource::Table => Err(Error::Config(
                "a key table is the application's own: create it and its first data key as the application does, then adopt it with `rekey secrets init --adopt`".into(),
            )),
            KeySource::Env | KeySource::TinkKeyset => Err(Error::Config(
                "secrets init creates a keyring file or an AWS Secrets Manager secret: set [keys] source to \"file\" or \"aws-secrets-manager\"".into(),
            )),
        }
    }

    /// What kind of store this is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Env(_) => "environment keys",
            Store::File(_) => "keyring file",
            Store::Aws(_) => "AWS Secrets Manager keyring",
            Store::Kms(_) => "KMS keyring",
            Store::Table(_) => "key table",
        }
    }

    /// Opens the store of `keys`.
    pub async fn open(keys: &KeysSpec) -> Result<Store, Error> {
        match keys.source {
            KeySource::AwsSecretsManager => Ok(Store::Aws(Box::new(aws::SecretsManagerStore::open(keys).await?))),
            KeySource::AwsKms => Ok(Store::Kms(Box::new(kms::KmsKeyring::open(keys).await?))),
            KeySource::Table => Ok(Store::Table(Box::new(table::KeyTableStore::open(keys, true).await?))),
            KeySource::File => Ok(Store::File(Box::new(open_file(keys)?))),
            KeySource::Env => Ok(Store::Env(EnvStore::open(keys)?)),
            KeySource::TinkKeyset => Err(Error::Config(
                "a Tink keyset is managed with Tink's own tools (tinkey add-key / promote-key); rekey rotates the data under it with `rekey run`".into(),
            )),
        }
    }

    /// Opens the store of `keys` to look at it during a run: as
    /// [`Store::open`], but a Secrets Manager secret a stopped purge left
    /// missing is not put back from its backup (the purge may still run).
    pub async fn open_to_look(keys: &KeysSpec) -> Result<Store, Error> {
        match keys.source {
            KeySource::AwsSecretsManager => Ok(Store::Aws(Box::new(
                aws::SecretsManagerStore::open_as(keys, false).await?,
            ))),
            _ => Store::open(keys).await,
        }
    }

    /// Saves the table as [`Store::save`] does, destroying no archived key
    /// whatever its age: for a run putting back a key it writes under, which
    /// is no place to destroy key material (that is `secrets purge`'s, after
    /// its verify).
    pub async fn save_keeping_archive(&mut self) -> Result<(), Error> {
        match self {
            Store::Aws(a) => a.save().await,
            Store::Kms(k) => k.save().await,
            Store::Table(t) => t.save().await,
            Store::File(f) => f.save().map_err(|e| Error::Runtime(e.to_string())),
            Store::Env(_) => Err(Error::Runtime(
                "environment keys are not written by rekey".into(),
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
            Store::Table(t) => &t.table,
        }
    }

    /// The keys, to apply a transition.
    pub fn table_mut(&mut self) -> &mut KeyTable {
        match self {
            Store::Env(e) => &mut e.table,
            Store::File(f) => &mut f.table,
            Store::Aws(a) => &mut a.table,
            Store::Kms(k) => &mut k.table,
            Store::Table(t) => &mut t.table,
        }
    }

    /// The databases the store records its keys encrypt values in
    /// ([`uses`]), read now (another database's run may have recorded one
    /// since the store was opened); `None` for a store that keeps no such
    /// record.
    pub async fn uses_now(&self) -> Result<Option<Vec<uses::StoreUse>>, Error> {
        match self {
            Store::File(f) => f.uses_now().map(Some).map_err(uses_error),
            Store::Kms(k) => k.uses_now().map(Some).map_err(uses_error),
            Store::Aws(a) => a.uses_now().await.map(Some),
            Store::Env(_) | Store::Table(_) => Ok(None),
        }
    }

    /// Applies `change` to the records the store keeps ([`uses`]), read
    /// again under the store's guard against a concurrent update, and
    /// writes them where `change` says they changed (it may be called
    /// again, on records read again, where another process wrote between).
    /// Whether they changed; `None` for a store that keeps no such record.
    pub async fn update_uses(
        &mut self,
        mut change: impl FnMut(&mut Vec<uses::StoreUse>) -> bool + Send,
    ) -> Result<Option<bool>, Error> {
        match self {
            Store::File(f) => f.update_uses(change).map(Some).map_err(uses_error),
            Store::Kms(k) => k.update_uses(change).map(Some).map_err(uses_error),
            Store::Aws(a) => a.update_uses(&mut change).await.map(Some),
            Store::Env(_) | Store::Table(_) => Ok(None),
        }
    }

    /// Names the store for the audit trail (never a value).
    pub fn secret_id(&self) -> String {
        match self {
            Store::Env(e) => format!("env:{}", e.prefix),
            Store::File(f) => format!("file:{}", f.path().display()),
            Store::Aws(a) => a.secret_id(),
            Store::Kms(k) => k.secret_id(),
            Store::Table(t) => t.secret_id(),
        }
    }

    /// The id a new key takes: one more than the largest the store's table
    /// ever held; for a key table, above every version of the table, any
    /// purpose's (applications may look a key up by version alone).
    pub fn next_id(&self) -> Result<KeyId, Error> {
        match self {
            Store::Table(t) => t.next_id(),
            other => other
                .table()
                .next_id()
                .map_err(|e| Error::Config(e.to_string())),
        }
    }

    /// A new key with this id: generated by KMS for the KMS store, else from the OS CSPRNG.
    pub async fn new_key(&mut self, id: KeyId) -> Result<Key, Error> {
        match self {
            Store::Kms(k) => k.new_key(id).await,
            Store::Table(t) => t.new_key(id).await,
            _ => Ok(Key::new(id, *crate::crypto::keyring::generate_material())),
        }
    }

    /// Fetches a retired key's material from the store's archive into the
    /// table where the table does not hold it (Secrets Manager keeps it in
    /// former versions); false when the archive does not have it either.
    pub async fn fetch_archived(&mut self, id: KeyId) -> Result<bool, Error> {
        let held = self
            .table()
            .entries
            .iter()
            .any(|e| e.id == id && e.key.is_some());
        if held {
            return Ok(true);
        }
        let found = match self {
            Store::Aws(a) => a.archived_key(id).await?,
            Store::Env(_) | Store::File(_) | Store::Kms(_) | Store::Table(_) => None,
        };
        let Some(key) = found else { return Ok(false) };
        if let Store::Aws(a) = self {
            // held since opening: destroying it now must reach the former versions
            a.hold_archived(&key);
        }
        if let Some(e) = self.table_mut().entries.iter_mut().find(|e| e.id == id) {
            e.key = Some(key);
        }
        Ok(true)
    }

    /// Whether the store's archive can destroy a retired key's material (a
    /// Secrets Manager secret does it by being recreated: see `aws::purge`).
    pub fn can_purge(&self) -> bool {
        matches!(
            self,
            Store::File(_) | Store::Kms(_) | Store::Aws(_) | Store::Table(_)
        )
    }

    /// The layout and key encoding, for `secrets init --adopt`.
    pub fn describe_layout(&self) -> String {
        match self {
            Store::Aws(a) => a.describe_layout(),
            Store::Env(e) => format!(
                "{} convention, prefix {}, keys in {}",
                if e.dual { "dual" } else { "versioned" },
                e.prefix,
                e.encoding
            ),
            Store::File(_) | Store::Kms(_) => "rekey keyring".into(),
            Store::Table(t) => format!("key table {}", t.secret_id()),
        }
    }

    /// Whether the store can keep a key that is neither current nor pending
    /// (an un-staged key that values may still be under); the dual
    /// convention and the value layout cannot: their only place for the new
    /// key is where applications read `<P>_KEY_NEW`.
    pub fn holds_unstaged_keys(&self) -> bool {
        match self {
            Store::Env(e) => !e.dual,
            Store::File(_) | Store::Kms(_) | Store::Table(_) => true,
            Store::Aws(a) => a.holds_unstaged_keys(),
        }
    }

    /// Whether a promote was stopped before it took the now current key away
    /// from where applications read the new one (a promote run again finishes it).
    pub fn promote_unfinished(&self) -> bool {
        matches!(self, Store::Aws(a) if a.promote_unfinished())
    }

    /// Where applications read the new key, for messages.
    pub fn new_key_place(&self) -> String {
        match self {
            Store::Env(e) => format!("{}_KEY_NEW", e.prefix),
            Store::Aws(a) => a.new_key_place(),
            Store::File(_) | Store::Kms(_) => "the keyring".into(),
            Store::Table(_) => "the key table (INACTIVE until promoted)".into(),
        }
    }

    /// Where a key the store no longer holds (a version of the store from
    /// before the key was staged was put back, say) may be found again,
    /// for messages: `restore key 2 from ...`.
    pub fn former_versions(&self) -> String {
        match self {
            Store::File(f) => format!(
                "the file's backup {} (its version before its last save) or a copy of your own",
                f.backup().display()
            ),
            Store::Kms(k) => format!(
                "the file's backup {} (its version before its last save) or a copy of your own",
                k.backup().display()
            ),
            Store::Aws(_) => "the secret's former versions or a copy of your own".into(),
            Store::Table(_) => "a backup of the key table".into(),
            Store::Env(_) => "where you keep the environment's values".into(),
        }
    }

    /// Whether rekey itself can write this store.
    pub fn writable(&self) -> bool {
        matches!(
            self,
            Store::File(_) | Store::Aws(_) | Store::Kms(_) | Store::Table(_)
        )
    }

    /// Persists the table. For the environment, returns the variable changes
    /// the operator must make instead (empty when nothing is left to do).
    /// Key values are shown only with `reveal` and stdout on a terminal.
    pub async fn save(&mut self, reveal: bool) -> Result<Vec<String>, Error> {
        let cutoff = now().saturating_sub(ARCHIVE_RETENTION.as_secs());
        let expired = self.table_mut().purge_retired_before(cutoff);
        if !expired.is_empty() {
            tracing::info!(
                "destroyed the archived material of keys {expired:?}: retired more than {} ago",
                humantime::format_duration(ARCHIVE_RETENTION)
            );
        }
        match self {
            Store::Env(e) => {
                let terminal = std::io::stdout().is_terminal();
                if reveal && !terminal {
                    tracing::warn!(
                        "--reveal prints key values only when stdout is a terminal (it is not: they would land in a log or a pipe); \
                         the changes name `rekey keygen` instead: run it where you set the variables"
                    );
                }
                Ok(e.instructions(reveal && terminal))
            }
            _ => {
                self.save_keeping_archive().await?;
                Ok(Vec::new())
            }
        }
    }
}

impl EnvStore {
    /// Reads the environment's keys as a table, in either convention. The
    /// dual convention's ids come from `<P>_KEY_VERSION` (default 1) and
    /// `<P>_KEY_NEW_VERSION` (default the next); once a promotion moved NEW
    /// into `<P>_KEY` (and its id into `<P>_KEY_VERSION`), the key before it
    /// is no longer in the environment: it is listed as previous without
    /// material, so the lifecycle can still retire it by id.
    fn open(keys: &KeysSpec) -> Result<EnvStore, Error> {
        let ring = env::from_process_env(&keys.prefix).map_err(|e| Error::Config(e.to_string()))?;
        let versioned_prefix = format!("{}_KEY_V", keys.prefix);
        let dual = !std::env::vars().any(|(k, _)| {
            k.strip_prefix(&versioned_prefix)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        });
        let mut entries: Vec<Entry> = ring
            .keys()
            .map(|k| {
                let state = if k.id() == ring.current_id() {
                    KeyState::Current
                } else if Some(k.id()) == ring.pending_id() {
                    KeyState::Pending
                } else {
                    KeyState::Previous
                };
                Entry {
                    id: k.id(),
                    state,
                    created_at: 0,
                    changed_at: 0,
                    key: Some(k.clone()),
                    compromised: false,
                }
            })
            .collect();
        let current = ring.current_id();
        if dual && ring.pending_id().is_none() && current > 1 {
            entries.insert(
                0,
                Entry {
                    id: current - 1,
                    state: KeyState::Previous,
                    created_at: 0,
                    changed_at: 0,
                    key: None,
                    compromised: false,
                },
            );
        }
        let encoding = keys.key_encoding.unwrap_or_else(|| {
            let var = if dual {
                format!("{}_KEY", keys.prefix)
            } else {
                format!("{versioned_prefix}{current}")
            };
            std::env::var(var).map_or(KeyEncoding::Hex, |t| {
                layout::detect_encoding(&t, keys.fernet_job)
            })
        });
        let table = KeyTable { entries };
        Ok(EnvStore {
            prefix: keys.prefix.clone(),
            dual,
            encoding,
            before: table.clone(),
            table,
        })
    }

    fn instructions(&self, reveal: bool) -> Vec<String> {
        let p = &self.prefix;
        let mut out = Vec::new();
        let value = |e: &Entry| {
            match (&e.key, reveal) {
            (Some(k), true) => encode_key(k.material(), self.encoding).to_string(),
            _ => format!("<a new key from `rekey keygen --format {}` (or run rekey with --reveal, stdout on a terminal, to have it print one)>", self.encoding),
        }
        };
        if self.dual {
            return self.dual_instructions(&value, reveal);
        }
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
                (Some(b), KeyState::Retired) if b != KeyState::Retired => out.push(format!(
                    "unset {p}_KEY_V{}   # rekey cannot archive environment keys: keep its value where you keep secrets until {}, in case a value under it turns up",
                    e.id,
                    rfc3339(now() + ARCHIVE_RETENTION.as_secs())
                )),
                (Some(KeyState::Pending), KeyState::Previous) => out.push(format!("unset {p}_PENDING_VERSION   # key {} stays, to read what was rewritten under it", e.id)),
                _ => {}
            }
        }
        out
    }

    /// The dual convention's steps, as the healthprep policy writes them:
    /// stage sets NEW; promote copies NEW into the key and deletes NEW.
    fn dual_instructions(&self, value: &dyn Fn(&Entry) -> String, reveal: bool) -> Vec<String> {
        let p = &self.prefix;
        let mut out = Vec::new();
        for e in &self.table.entries {
            let before = self
                .before
                .entries
                .iter()
                .find(|b| b.id == e.id)
                .map(|b| b.state);
            match (before, e.state) {
                (None, KeyState::Pending) => {
                    out.push(format!("export {p}_KEY_NEW={}", value(e)));
                    let current = self.table.id_in(KeyState::Current).unwrap_or(1);
                    if e.id != env::dual_new_id(current) {
                        out.push(format!("export {p}_KEY_NEW_VERSION={}", e.id));
                    }
                }
                (Some(b), KeyState::Current) if b != KeyState::Current => {
                    // the key the applications already hold in NEW: never a new one
                    out.push(if reveal && e.key.is_some() {
                        format!("export {p}_KEY={}   # the value of {p}_KEY_NEW", value(e))
                    } else {
                        format!("export {p}_KEY=<the value of {p}_KEY_NEW>")
                    });
                    out.push(format!("export {p}_KEY_VERSION={}", e.id));
                    out.push(format!("unset {p}_KEY_NEW {p}_KEY_NEW_VERSION"));
                }
                (Some(KeyState::Pending), KeyState::Previous) => {
                    out.push(format!("unset {p}_KEY_NEW {p}_KEY_NEW_VERSION   # only once no value is under key {}", e.id));
                }
                _ => {}
            }
        }
        out
    }
}
