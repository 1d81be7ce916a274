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

use serde::{Deserialize, Serialize};

use crate::crypto::keyring::KeyId;
use crate::crypto::keytable::KeyTable;
use crate::secrets::KeysSpec;
use crate::Error;

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

/// Records that `user`'s values may be under `keys` as well as what it
/// recorded before (a run starting: nothing it wrote before is proven
/// moved yet); true where the record changed.
pub fn widen(uses: &mut Vec<StoreUse>, user: &User, keys: &[KeyId]) -> bool {
    let mut keys = keys.to_vec();
    if let Some(u) = find(uses, user) {
        keys.extend(&u.keys);
    }
    set(uses, user, keys)
}

/// Records that `user`'s values are under `keys` alone (a run that ended
/// with every value on its target); true where the record changed.
pub fn narrow(uses: &mut Vec<StoreUse>, user: &User, keys: &[KeyId]) -> bool {
    set(uses, user, keys.to_vec())
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
/// values may be under `key`.
pub fn needing<'a>(uses: &'a [StoreUse], key: KeyId, own: &str) -> Vec<&'a StoreUse> {
    uses.iter()
        .filter(|u| u.database_id != own && u.keys.contains(&key))
        .collect()
}

/// Applies `change` to the records of the keyring file `keys` names (given
/// the keys it holds), read again under the file's lock, and writes them
/// beside the file where `change` says they changed
/// ([`crate::secrets::file::uses_beside`]). True where they did.
pub fn record_in_file(
    keys: &KeysSpec,
    change: impl FnOnce(&mut Vec<StoreUse>, &KeyTable) -> bool,
) -> Result<bool, Error> {
    let mut file = super::open_file(keys)?;
    let table = file.table.clone();
    file.update_uses(|records| change(records, &table))
        .map_err(|e| Error::Config(e.to_string()))
}

fn find<'a>(uses: &'a [StoreUse], user: &User) -> Option<&'a StoreUse> {
    uses.iter()
        .find(|u| u.database_id == user.database_id && u.job == user.job)
}

fn set(uses: &mut Vec<StoreUse>, user: &User, mut keys: Vec<KeyId>) -> bool {
    keys.sort();
    keys.dedup();
    if find(uses, user).is_some_and(|u| u.keys == keys && u.database == user.database) {
        return false;
    }
    let at = crate::crypto::keytable::rfc3339(crate::crypto::keytable::now());
    uses.retain(|u| !(u.database_id == user.database_id && u.job == user.job));
    uses.push(StoreUse {
        database_id: user.database_id.clone(),
        database: user.database.clone(),
        job: user.job.clone(),
        keys,
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
        assert!(widen(&mut uses, &user("a", "j"), &ids(&[1])));
        assert!(widen(&mut uses, &user("a", "j"), &ids(&[2])));
        assert_eq!(uses[0].keys, ids(&[1, 2]));
        assert!(!widen(&mut uses, &user("a", "j"), &ids(&[2, 1])));
    }

    #[test]
    fn a_finished_run_narrows_its_record_and_leaves_other_jobs_alone() {
        let mut uses = Vec::new();
        widen(&mut uses, &user("a", "j"), &ids(&[1, 2]));
        widen(&mut uses, &user("a", "k"), &ids(&[1]));
        assert!(narrow(&mut uses, &user("a", "j"), &ids(&[2])));
        assert_eq!(needing(&uses, 1, "b").len(), 1);
        assert_eq!(needing(&uses, 1, "b")[0].job, "k");
    }

    #[test]
    fn the_retiring_database_own_records_are_not_counted() {
        let mut uses = Vec::new();
        widen(&mut uses, &user("a", "j"), &ids(&[1]));
        widen(&mut uses, &user("b", "j"), &ids(&[1]));
        let other: Vec<&str> = needing(&uses, 1, "a")
            .iter()
            .map(|u| u.database_id.as_str())
            .collect();
        assert_eq!(other, ["b"]);
        assert_eq!(forget(&mut uses, "b").len(), 1);
        assert!(needing(&uses, 1, "a").is_empty());
    }
}
