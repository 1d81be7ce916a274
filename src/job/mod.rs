//! The job: what to rotate, resolved once.
//!
//! Two stages, as in ripgrep: [`spec::JobSpec`] is the job file checked
//! without I/O; [`Job`] is the spec resolved against the database catalog
//! ([`catalog`]) and the keys, built once and handed down as `&Job`. Uses
//! the secret stores, the codecs and the database plumbing.

pub mod catalog;
pub mod condition;
pub mod hash;
pub mod newer_keys;
pub mod shared_keys;
pub mod spec;
pub mod table_locks;
pub mod visibility;

pub use hash::SearchHash;
pub use spec::{AadSpec, DatabaseSpec, Encoding, HashSpec, JobSpec, Rewrite, TargetSpec};

use std::collections::HashMap;
use std::sync::Arc;

use crate::crypto::codec::{Codec, Format};
use crate::crypto::keyring::Keyring;
use crate::db::idle::{ping_interval, pinging};
use crate::db::quote_ident;
use crate::db::raw::{KeyBytes, RawParam};
use crate::db::PageRow;
use crate::secrets::KeysSpec;
use crate::Error;
use tokio_postgres::error::SqlState;

use catalog::{TableColumn, TableRef};

/// A column of a target table as rekey reads and writes it.
#[derive(Debug, Clone)]
pub struct Column {
    /// Column name, unquoted.
    pub name: String,
    /// Type as `format_type` prints it (already quoted where needed).
    pub type_name: String,
    /// How values are stored when read.
    pub read: Encoding,
    /// How values are stored when written.
    pub write: Encoding,
}

impl Column {
    /// The most characters the column's type holds (`varchar(n)`, a
    /// domain over one), where it caps them: a format or encoding written
    /// longer than the one read may not fit.
    pub fn max_chars(&self) -> Option<usize> {
        self.type_name
            .strip_prefix("character varying(")?
            .strip_suffix(')')?
            .parse()
            .ok()
    }
}

/// One side of a target: the format values are read in, or written in.
pub struct Side {
    /// The format.
    pub format: Format,
    /// Its codec, over `keyring`.
    pub codec: Arc<dyn Codec>,
    /// The keys.
    pub keyring: Keyring,
    /// Where they came from (`None`: handed in whole, as `rekey bench` does).
    pub source: Option<KeysSpec>,
}

/// Where a value's associated data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Aad {
    /// None (empty).
    None,
    /// The same bytes for every value.
    Constant(Vec<u8>),
    /// A column of the row, as text; the source selects it after the encrypted columns.
    Column(String),
}

/// A target resolved against the catalog, with its codecs ready.
pub struct Target {
    /// Position in the job file, from 0; identifies the target in engine tables.
    pub index: usize,
    /// The table.
    pub table: TableRef,
    /// The table's oid when the job was resolved: a table renamed or made
    /// again while a run went on answers to the name under another.
    pub oid: u32,
    /// Key columns, in keyset order.
    pub key: Vec<TableColumn>,
    /// Encrypted columns, then the search hash column when there is one.
    pub columns: Vec<Column>,
    /// The search hash, if the target has one (its column is the last of `columns`).
    pub hash: Option<SearchHash>,
    /// How values are read.
    pub read: Side,
    /// How values are written (the same format and keys unless migrating).
    pub write: Side,
    /// Whether `read` and `write` differ: in format, or in key store (`to_keys`).
    pub migrating: bool,
    /// Associated data.
    pub aad: Aad,
    /// Operator-written row condition, if any.
    pub filter: Option<String>,
    /// An AFTER UPDATE trigger on the table (or a partition or child), a
    /// deferred constraint trigger included, may change a row after
    /// rekey's UPDATE returned it: each batch fires the deferred ones and
    /// reads back what is stored before it counts a value rotated.
    pub after_triggers: bool,
    /// An UPDATE trigger of any kind on the table (or a partition or child)
    /// fires on rekey's writes: it may write other rows of the job's
    /// targets inside the batch's own transaction (a history table filled
    /// with the old values), so each batch counts what it wrote beside its
    /// own rows ([`crate::engine::behind`]).
    pub update_triggers: bool,
    /// A run reads the values already labelled with the target key too
    /// (decrypting each: one that opens is left as it is, one that does not
    /// is quarantined): set where the preflight's sample found such values
    /// that do not open (damaged, or sealed under another key of that id),
    /// which a run reading only values on old keys would pass over as done.
    pub reads_labelled: bool,
    /// What the catalogue shows that may refuse or undo some of rekey's
    /// writes here (a BEFORE UPDATE trigger, row security with an UPDATE
    /// policy): said when the job is read, and again with a run's totals.
    pub cautions: Vec<String>,
}

impl Target {
    /// `"schema"."table"`.
    pub fn qualified(&self) -> String {
        self.table.qualified()
    }

    /// Key columns as `alias."k1", alias."k2"` (alias may be empty).
    pub fn key_list(&self, alias: &str) -> String {
        self.key
            .iter()
            .map(|c| format!("{alias}{}", quote_ident(&c.name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The key of a row read from this target (key columns first), owned.
    pub fn row_key(&self, row: PageRow<'_>) -> KeyBytes {
        row.key(self.key.len())
    }

    /// The key of a row read from this target, as statement parameters.
    pub fn key_params<'a>(&self, row: PageRow<'a>) -> Vec<RawParam<'a>> {
        row.leading(self.key.len()).map(RawParam).collect()
    }

    /// A readable `table.column` label.
    pub fn label(&self, column: usize) -> String {
        format!("{}.{}", self.table, self.columns[column].name)
    }

    /// The byte prefix of values already written in the target format under
    /// the target key, where SQL can see it.
    /// None during a migration: a value of the old format may start with the
    /// same bytes by chance (or by design), and must still be read.
    /// None for a search hash, which only its plaintext can place under a
    /// key, and for every column of a hash-only target (each row is read).
    pub fn stale_prefix(&self, column: usize) -> Option<Vec<u8>> {
        if self.migrating || self.is_hash_column(column) || self.hash_only() {
            return None;
        }
        self.write.codec.key_prefix(self.write.codec.target())
    }

    /// Whether column `column` is the search hash, not a ciphertext.
    pub fn is_hash_column(&self, column: usize) -> bool {
        self.hash.as_ref().is_some_and(|h| h.column == column)
    }

    /// Whether a run rewrites only the search hash (`rewrite = "hash"`).
    pub fn hash_only(&self) -> bool {
        self.hash.as_ref().is_some_and(|h| h.only)
    }

    /// The number of encrypted columns (the search hash column comes after them).
    pub fn sealed_columns(&self) -> usize {
        self.columns.len() - usize::from(self.hash.is_some())
    }

    /// Label of the key new values are written under.
    pub fn target_label(&self) -> String {
        self.write.codec.key_label(self.write.codec.target())
    }
}

/// A job resolved once: targets checked against the database, keys loaded.
pub struct Job {
    /// Job name (identity in `rekey.jobs`).
    pub name: String,
    /// See [`JobSpec::spec_hash`].
    pub spec_hash: String,
    /// The job file it was read from, if any.
    pub file: Option<String>,
    /// Whether its keys are the job-level `[keys]` alone (no target with
    /// keys of its own): what `rotate` and `secrets` manage.
    pub keys_managed: bool,
    /// The resolved targets.
    pub targets: Vec<Target>,
}

impl Job {
    /// Loads the keyrings and resolves every target against the catalog.
    /// Refuses, before any row is touched, what cannot be rotated safely.
    pub async fn resolve(spec: &JobSpec, client: &tokio_postgres::Client) -> Result<Job, Error> {
        Self::resolve_with(spec, client, None).await
    }

    /// As [`Job::resolve`]; with `keyring`, every target uses it instead of its key source (`rekey bench`).
    pub async fn resolve_with(
        spec: &JobSpec,
        client: &tokio_postgres::Client,
        keyring: Option<&Keyring>,
    ) -> Result<Job, Error> {
        let keyring_given = keyring;
        let load = |keys: &KeysSpec| {
            let keys = keys.clone();
            async move {
                match keyring {
                    Some(k) => Ok(k.clone()),
                    None => crate::secrets::load_keyring(&keys).await,
                }
            }
        };
        // `client` is used again after each load of keys: kept from idling
        // while a key table unwraps its keys through KMS
        let every = ping_interval(client).await;
        let mut targets = Vec::with_capacity(spec.targets.len());
        // Which target each column of the database belongs to: the job
        // file's check sees names as written, and `t`, `public.t` and
        // `schema = "public"` are one table once resolved.
        let mut claimed: HashMap<(String, String, String), usize> = HashMap::new();
        for (index, t) in spec.targets.iter().enumerate() {
            let at = || format!("[[target]] #{} (table {:?})", index + 1, t.table);
            let keys = t
                .keys
                .as_ref()
                .or(spec.keys.as_ref())
                .ok_or_else(|| Error::Config(format!("{}: no keys", at())))?;
            let read_ring = pinging(client, every, load(keys)).await?;
            let write_ring = match &t.to_keys {
                Some(k) => pinging(client, every, load(k)).await?,
                None => read_ring.clone(),
            };
            let to_format = t.to_format.unwrap_or(t.format);
            let side =
                |format: Format, keyring: Keyring, source: &KeysSpec| -> Result<Side, Error> {
                    let codec = format
                        .codec(&keyring)
                        .map_err(|e| Error::Config(format!("{}: {e}", at())))?;
                    Ok(Side {
                        format,
                        codec,
                        keyring,
                        source: keyring_given.is_none().then(|| source.clone()),
                    })
                };
            let read = side(t.format, read_ring, keys)?;
            let write = side(to_format, write_ring, t.to_keys.as_ref().unwrap_or(keys))?;
            let aad = match &t.aad {
                None => Aad::None,
                Some(AadSpec {
                    constant: Some(c), ..
                }) => Aad::Constant(c.as_bytes().to_vec()),
                Some(AadSpec {
                    column: Some(c), ..
                }) => Aad::Column(c.clone()),
                Some(_) => Aad::None,
            };
            if aad != Aad::None && !(read.codec.supports_aad() && write.codec.supports_aad()) {
                return Err(Error::Config(format!(
                    "{}: format {} cannot bind associated data; remove aad",
                    at(),
                    if read.codec.supports_aad() {
                        to_format.name()
                    } else {
                        t.format.name()
                    }
                )));
            }
            let resolved = catalog::resolve_target(client, t).await?;
            for col in &resolved.columns {
                let column = (
                    resolved.table.schema.clone(),
                    resolved.table.name.clone(),
                    col.name.clone(),
                );
                if let Some(first) = claimed.insert(column, index) {
                    return Err(Error::Config(format!(
                        "{}: column {}.{} is also rotated by [[target]] #{}; each column may appear in one target only",
                        at(),
                        resolved.table,
                        col.name,
                        first + 1
                    )));
                }
            }
            let written_as = t.to_encoding.or(if t.to_format.is_none() {
                t.encoding
            } else {
                None
            });
            let encrypted: Vec<String> = resolved.columns.iter().map(|c| c.name.clone()).collect();
            let hashed = hash::resolve(
                client,
                t,
                &resolved.table,
                &encrypted,
                &at(),
                |k| async move { pinging(client, every, crate::secrets::load_keyring(&k)).await },
            )
            .await?;
            if let Some((col, _)) = &hashed {
                let column = (
                    resolved.table.schema.clone(),
                    resolved.table.name.clone(),
                    col.name.clone(),
                );
                if let Some(first) = claimed.insert(column, index) {
                    return Err(Error::Config(format!(
                        "{}: hash column {}.{} is also rewritten by [[target]] #{}; each column may appear in one target only",
                        at(),
                        resolved.table,
                        col.name,
                        first + 1
                    )));
                }
            }
            let (hash_column, hash) = hashed.unzip();
            if let Some(h) = &hash {
                hash::warn_shared_keys(&at(), h, [&read.keyring, &write.keyring]);
            }
            let mut columns = resolved
                .columns
                .into_iter()
                .map(|c| {
                    let read = encoding_for(t.encoding, t.format, &c, &resolved.table)?;
                    let write = encoding_for(written_as, to_format, &c, &resolved.table)?;
                    Ok(Column {
                        name: c.name,
                        type_name: c.type_name,
                        read,
                        write,
                    })
                })
                .collect::<Result<Vec<_>, Error>>()?;
            // the hash is stored as it is (hex, base64 text or raw bytes): no ciphertext encoding
            columns.extend(hash_column.map(|c| Column {
                name: c.name,
                type_name: c.type_name,
                read: Encoding::Raw,
                write: Encoding::Raw,
            }));
            if let Aad::Column(c) = &aad {
                catalog::check_column_exists(client, &resolved.table, c).await?;
            }
            let target = Target {
                index,
                table: resolved.table,
                oid: resolved.oid,
                key: resolved.key,
                columns,
                hash,
                // another format, or the same one under another store's keys:
                // every value is read, whatever key id it names
                migrating: t.format != to_format || t.to_keys.is_some(),
                read,
                write,
                aad,
                filter: t.filter.clone(),
                after_triggers: false,
                update_triggers: false,
                reads_labelled: false,
                cautions: Vec::new(),
            };
            if let Some(f) = &target.filter {
                let checked = client
                    .prepare(&format!(
                        "SELECT 1 FROM {} WHERE ({f}) LIMIT 0",
                        target.qualified()
                    ))
                    .await;
                match checked {
                    Ok(_) => {}
                    // reading the table waited on a lock another session holds or awaits
                    Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                        let stalled =
                            table_locks::Stalled::Read(session_lock_timeout(client).await);
                        return Err(table_locks::refusal(client, &target, &stalled, e).await);
                    }
                    Err(e) => {
                        return Err(Error::Config(format!(
                            "{}: where = {f:?} is not a valid condition on {}: {}",
                            at(),
                            target.table,
                            e.as_db_error()
                                .map_or_else(|| e.to_string(), |d| d.message().to_string())
                        )))
                    }
                }
            }
            targets.push(target);
        }
        // Associated data read from a column the job rewrites would change
        // under the values bound to it: they would no longer open.
        for t in &targets {
            if let Aad::Column(c) = &t.aad {
                if let Some(other) =
                    claimed.get(&(t.table.schema.clone(), t.table.name.clone(), c.clone()))
                {
                    return Err(Error::Config(format!(
                        "[[target]] #{}: aad column {}.{c} is itself re-encrypted by [[target]] #{}; associated data must come from a column the job does not rewrite",
                        t.index + 1,
                        t.table,
                        other + 1
                    )));
                }
            }
        }
        refuse_nested_targets(client, &targets).await?;
        visibility::check(client, &mut targets).await?;
        Ok(Job {
            name: spec.name.clone().unwrap_or_else(|| "rekey".into()),
            spec_hash: spec.spec_hash(),
            file: spec.file.as_ref().map(|f| f.display().to_string()),
            keys_managed: spec.keys.is_some() && !spec.targets_have_own_keys(),
            targets,
        })
    }

    /// The first target with a `where` filter: no verify of the job sees
    /// every row, so it can prove nothing a key's end rests on.
    pub fn filtered_target(&self) -> Option<&Target> {
        self.targets.iter().find(|t| t.filter.is_some())
    }

    /// Key ids and fingerprints of every target, never material: what the
    /// engine stores to detect a key set that changed under an unfinished job.
    pub fn describe_keys(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.targets
                .iter()
                .map(|t| {
                    let mut keys = serde_json::json!({ "read": t.read.keyring.describe(), "write": t.write.keyring.describe() });
                    if let Some(h) = &t.hash {
                        keys["hash"] = h.keyring.describe();
                    }
                    keys
                })
                .collect(),
        )
    }
}

/// Refuses two targets whose tables nest (a partition or inheritance child
/// and its parent) and share a column: reading the parent reads the child's
/// rows too, so both targets would rotate the same values, racing each other.
async fn refuse_nested_targets(
    client: &tokio_postgres::Client,
    targets: &[Target],
) -> Result<(), Error> {
    for (i, a) in targets.iter().enumerate() {
        for b in &targets[i + 1..] {
            if a.table == b.table
                || !a
                    .columns
                    .iter()
                    .any(|c| b.columns.iter().any(|d| d.name == c.name))
            {
                continue;
            }
            for (child, parent) in [(a, b), (b, a)] {
                let nested: bool = client
                    .query_one(
                        "WITH RECURSIVE up(relid) AS (
                            SELECT to_regclass($1)::oid
                            UNION SELECT i.inhparent FROM pg_inherits i JOIN up ON i.inhrelid = up.relid)
                         SELECT EXISTS (SELECT 1 FROM up WHERE relid = to_regclass($2)::oid)",
                        &[&child.qualified(), &parent.qualified()],
                    )
                    .await
                    .map_err(|e| Error::Db { context: format!("checking whether {} is part of {}", child.table, parent.table), source: e, statement: crate::error::Statement::Other, })?
                    .get(0);
                if nested {
                    return Err(Error::Config(format!(
                        "[[target]] #{} ({}) is a partition or child of [[target]] #{} ({}), and both rotate the same column: \
                         reading {} reads its rows too; list only one of them",
                        child.index + 1,
                        child.table,
                        parent.index + 1,
                        parent.table,
                        parent.table
                    )));
                }
            }
        }
    }
    Ok(())
}

/// The encoding of one column on one side: as given, else from the column's type.
fn encoding_for(
    given: Option<Encoding>,
    format: Format,
    col: &TableColumn,
    table: &TableRef,
) -> Result<Encoding, Error> {
    let is_text = col.type_name != "bytea";
    let enc = given.unwrap_or(if is_text && !format.is_text() {
        Encoding::Base64
    } else {
        Encoding::Raw
    });
    if is_text && enc == Encoding::Raw && !format.is_text() {
        return Err(Error::Config(format!(
            "column {table}.{} is {}, but {} values are binary: set encoding = \"base64\" (or use a bytea column)",
            col.name,
            col.type_name,
            format.name()
        )));
    }
    Ok(enc)
}

/// The session's `lock_timeout`, for a refusal ("5s"); what could not be
/// read is said as such.
async fn session_lock_timeout(client: &tokio_postgres::Client) -> String {
    match client.query_one("SHOW lock_timeout", &[]).await {
        Ok(r) => r.try_get(0).unwrap_or_else(|_| "its limit".to_string()),
        Err(_) => "its limit".to_string(),
    }
}
