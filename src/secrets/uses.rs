//! The databases a store's keys encrypt values in, as the store itself
//! records them: what a retire reads before it destroys a key, whatever
//! database it runs against.
//!
//! A retire proves from its own database's records (`rekey.jobs`,
//! `rekey.progress`) that no table there needs the key. A keyring file
//! shared by jobs in two databases (staging and production, two services)
//! holds values in the other database too, which the retire cannot read:
//! without a record the store carries, it destroyed a key the other
//! database's 5,000 values were under. Each run records its database and
//! job in the store before its first write, with every key its values may
//! be under; a run that ends with every value on its target narrows that to
//! the target and the store's current key (applications keep writing under
//! the current one until a promotion). A retire refuses a key another
//! database's record names, until a run there narrows it, or the operator
//! says that database no longer uses the store (`rekey secrets forget`).
//!
//! Where a store keeps its records: beside a keyring file, passphrase or
//! KMS sealed, in `<file>.uses` ([`crate::secrets::file::uses_beside`]);
//! beside a Secrets Manager keyring, in a secret of its own,
//! `<name>.rekey-uses` (`secrets::aws::uses_secret`). The environment and
//! a key table keep none.

use serde::{Deserialize, Serialize};

use crate::crypto::keyring::KeyId;
use crate::crypto::keytable::{KeyState, KeyTable};
use crate::secrets::{KeySource, KeysSpec, Store};
use crate::Error;

/// Format tag of every record, wherever the store keeps it.
pub const FORMAT: &str = "rekey-keyring-uses/1";

/// A store's records as JSON: `<file>.uses` beside a keyring file (a KMS
/// one too), the companion secret of a Secrets Manager keyring. No key
/// material: ids, names and times.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// Always [`FORMAT`].
    pub format: String,
    /// One record per database and job.
    pub uses: Vec<StoreUse>,
}

impl Document {
    /// The document of `uses`.
    pub fn of(uses: &[StoreUse]) -> Self {
        Document {
            format: FORMAT.into(),
            uses: uses.to_vec(),
        }
    }

    /// Its records, or what is wrong with it (a format rekey does not write).
    pub fn into_uses(self) -> Result<Vec<StoreUse>, String> {
        if self.format != FORMAT {
            return Err(format!("format is {:?}, expected {FORMAT:?}", self.format));
        }
        Ok(self.uses)
    }
}

/// Whether stores of `source` record the databases using them: the keyring
/// files (sealed by a passphrase or by KMS) and Secrets Manager secrets.
/// The environment is each deployment's own; a key table lives in the
/// database it serves.
pub fn recorded_by(source: KeySource) -> bool {
    matches!(
        source,
        KeySource::File | KeySource::AwsKms | KeySource::AwsSecretsManager
    )
}

/// Where the store `keys` names keeps its records, and what rekey needs to
/// write them there, for the message of a run that could not.
pub fn where_recorded(keys: &KeysSpec) -> String {
    match keys.source {
        KeySource::AwsSecretsManager => format!(
            "let rekey create and write the secret {} beside it, where it keeps the record (the caller needs \
             secretsmanager:GetSecretValue, secretsmanager:CreateSecret, secretsmanager:PutSecretValue and \
             secretsmanager:UpdateSecretVersionStage on it, and the use of the KMS key the keyring secret is \
             encrypted under)",
            crate::secrets::spec::uses_secret_name(keys.secret_id.as_deref().unwrap_or_default())
        ),
        _ => format!(
            "let rekey write beside the file (it keeps the record in {})",
            keys.path.as_ref().map_or_else(String::new, |p| {
                crate::secrets::file::uses_beside::path_of(p)
                    .display()
                    .to_string()
            })
        ),
    }
}

/// One database's use of a store, by one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreUse {
    /// The database's identity (`rekey.identity`): a random id made with
    /// rekey's schema there.
    pub database_id: String,
    /// The database as an operator knows it (its name and server), for
    /// messages only.
    pub database: String,
    /// The job that ran there.
    pub job: String,
    /// The keys (ids in this store) values of that job's tables may be under.
    pub keys: Vec<KeyId>,
    /// The largest key id the file held when the record last changed: a key
    /// staged since may be under that database's values too (its
    /// applications follow the file), so it counts as named.
    pub through: KeyId,
    /// When the record last changed (RFC 3339).
    pub at: String,
}

impl StoreUse {
    /// "job \"j\" in database s2 on 127.0.0.1:5432 (rekey database id 3f..)".
    pub fn describe(&self) -> String {
        format!(
            "job {:?} in database {} (rekey database id {}, recorded {})",
            self.job, self.database, self.database_id, self.at
        )
    }
}

/// Which database and job a record is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// `rekey.identity`'s id.
    pub database_id: String,
    /// Name and server, for messages.
    pub database: String,
    /// The job's name.
    pub job: String,
}

/// How long after a key stopped being current a database's applications
/// may still write under it (one not yet reloaded): a run's record made
/// within it keeps the key. The default grace period of a rotation.
pub const STALE_WRITERS: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Records that `user`'s values may be under `keys` as well as what it
/// recorded before (a run starting: nothing it wrote before is proven
/// moved yet), the file holding keys up to `through`; true where the
/// record changed.
pub fn widen(uses: &mut Vec<StoreUse>, user: &User, keys: &[KeyId], through: KeyId) -> bool {
    let mut keys = keys.to_vec();
    if let Some(u) = find(uses, user) {
        keys.extend(&u.keys);
    }
    set(uses, user, keys, through)
}

/// Records that `user`'s values are under `keys` alone (a run that ended
/// with every value on its target), the file holding keys up to `through`;
/// true where the record changed.
pub fn narrow(uses: &mut Vec<StoreUse>, user: &User, keys: &[KeyId], through: KeyId) -> bool {
    set(uses, user, keys.to_vec(), through)
}

/// The keys of `table` a database's values may be under once a run left
/// every value on `written`: those, the current and pending keys (what
/// applications write under), and keys that stopped being current less
/// than [`STALE_WRITERS`] before `now` (Unix seconds).
pub fn after_a_full_run(table: &KeyTable, written: &[KeyId], now: u64) -> Vec<KeyId> {
    let recent = now.saturating_sub(STALE_WRITERS.as_secs());
    let mut keys = written.to_vec();
    keys.extend(table.entries.iter().filter_map(|e| match e.state {
        KeyState::Current | KeyState::Pending => Some(e.id),
        KeyState::Previous if e.changed_at >= recent => Some(e.id),
        _ => None,
    }));
    keys
}

/// The largest key id `table` holds (retired ones too).
pub fn largest_id(table: &KeyTable) -> KeyId {
    table.entries.iter().map(|e| e.id).max().unwrap_or(0)
}

/// Drops every record of database `database_id`; the records dropped.
pub fn forget(uses: &mut Vec<StoreUse>, database_id: &str) -> Vec<StoreUse> {
    let (gone, kept) = std::mem::take(uses)
        .into_iter()
        .partition(|u| u.database_id == database_id);
    *uses = kept;
    gone
}

/// The records of databases other than `own` (the retiring job's) whose
/// values may be under `key`: one their record names, or one staged since
/// it was made.
pub fn needing<'a>(uses: &'a [StoreUse], key: KeyId, own: &str) -> Vec<&'a StoreUse> {
    uses.iter()
        .filter(|u| u.database_id != own && (u.keys.contains(&key) || key > u.through))
        .collect()
}

/// Applies `change` to the records of the store `keys` names (given the
/// keys it holds), read again under the store's guard (a keyring file's
/// lock, a secret's label moved only from the version read), and writes
/// them where `change` says they changed ([`Store::update_uses`]). True
/// where they did.
pub async fn record_in_store(
    keys: &KeysSpec,
    mut change: impl FnMut(&mut Vec<StoreUse>, &KeyTable) -> bool + Send,
) -> Result<bool, Error> {
    let mut store = Store::open_to_look(keys).await?;
    let table = store.table().clone();
    let changed = store.update_uses(|records| change(records, &table)).await?;
    changed.ok_or_else(|| {
        Error::Config(format!(
            "{} keeps no record of the databases using it",
            store.secret_id()
        ))
    })
}

fn find<'a>(uses: &'a [StoreUse], user: &User) -> Option<&'a StoreUse> {
    uses.iter()
        .find(|u| u.database_id == user.database_id && u.job == user.job)
}

fn set(uses: &mut Vec<StoreUse>, user: &User, mut keys: Vec<KeyId>, through: KeyId) -> bool {
    keys.sort();
    keys.dedup();
    if find(uses, user)
        .is_some_and(|u| u.keys == keys && u.database == user.database && u.through == through)
    {
        return false;
    }
    let at = crate::crypto::keytable::rfc3339(crate::crypto::keytable::now());
    uses.retain(|u| !(u.database_id == user.database_id && u.job == user.job));
    uses.push(StoreUse {
        database_id: user.database_id.clone(),
        database: user.database.clone(),
        job: user.job.clone(),
        keys,
        through,
        at,
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(db: &str, job: &str) -> User {
        User {
            database_id: db.into(),
            database: format!("{db} on a server"),
            job: job.into(),
        }
    }

    fn ids(n: &[KeyId]) -> Vec<KeyId> {
        n.to_vec()
    }

    #[test]
    fn a_run_starting_keeps_the_keys_recorded_before_and_adds_its_own() {
        let mut uses = Vec::new();
        assert!(widen(&mut uses, &user("a", "j"), &ids(&[1]), 2));
        assert!(widen(&mut uses, &user("a", "j"), &ids(&[2]), 2));
        assert_eq!(uses[0].keys, ids(&[1, 2]));
        assert!(!widen(&mut uses, &user("a", "j"), &ids(&[2, 1]), 2));
    }

    #[test]
    fn a_finished_run_narrows_its_record_and_leaves_other_jobs_alone() {
        let mut uses = Vec::new();
        widen(&mut uses, &user("a", "j"), &ids(&[1, 2]), 2);
        widen(&mut uses, &user("a", "k"), &ids(&[1]), 2);
        assert!(narrow(&mut uses, &user("a", "j"), &ids(&[2]), 2));
        assert_eq!(needing(&uses, 1, "b").len(), 1);
        assert_eq!(needing(&uses, 1, "b")[0].job, "k");
    }

    #[test]
    fn the_retiring_database_own_records_are_not_counted() {
        let mut uses = Vec::new();
        widen(&mut uses, &user("a", "j"), &ids(&[1]), 2);
        widen(&mut uses, &user("b", "j"), &ids(&[1]), 1);
        let other: Vec<&str> = needing(&uses, 1, "a")
            .iter()
            .map(|u| u.database_id.as_str())
            .collect();
        assert_eq!(other, ["b"]);
        assert_eq!(forget(&mut uses, "b").len(), 1);
        assert!(needing(&uses, 1, "a").is_empty());
    }

    #[test]
    fn a_key_staged_after_the_record_counts_as_named() {
        let mut uses = Vec::new();
        widen(&mut uses, &user("b", "j"), &ids(&[1]), 1);
        assert!(needing(&uses, 1, "a").len() == 1);
        assert!(needing(&uses, 2, "a").len() == 1);
        narrow(&mut uses, &user("b", "j"), &ids(&[2]), 2);
        assert!(needing(&uses, 1, "a").is_empty());
        assert!(needing(&uses, 3, "a").len() == 1);
    }

    #[test]
    fn a_full_run_keeps_the_keys_applications_may_still_write_under() {
        use crate::crypto::keytable::Entry;
        let entry = |id, state, changed_at| Entry {
            id,
            state,
            created_at: 1,
            changed_at,
            key: None,
            compromised: false,
        };
        let now = 10 * STALE_WRITERS.as_secs();
        let table = KeyTable {
            entries: vec![
                entry(1, KeyState::Previous, 1),
                entry(2, KeyState::Previous, now - 60),
                entry(3, KeyState::Current, now - 60),
                entry(4, KeyState::Pending, now - 30),
            ],
        };
        let mut keys = after_a_full_run(&table, &ids(&[4]), now);
        keys.sort();
        keys.dedup();
        assert_eq!(keys, ids(&[2, 3, 4]));
        assert_eq!(largest_id(&table), 4);
    }
}
