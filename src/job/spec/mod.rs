//! The job file as written: parsed and checked without I/O (unknown
//! fields, empty lists, names PostgreSQL cannot hold, duplicate columns, a
//! `where` that could escape its parentheses). [`super::Job`] is the same
//! job resolved against the database.

use std::collections::HashSet;
use std::path::Path;

use ring::digest::{digest, SHA256};
use serde::{Deserialize, Serialize};

use crate::crypto::codec::Format;
use crate::secrets::KeysSpec;
use crate::Error;

use super::condition::check_condition;

mod hash;
pub use hash::{HashSpec, Rewrite};

/// The longest name PostgreSQL keeps (NAMEDATALEN - 1 bytes).
const MAX_NAME_BYTES: usize = 63;

/// The job file as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Name of the job; defaults to the job file's stem. Identifies the job
    /// in `rekey.jobs`, so a re-run of the same file resumes it.
    pub name: Option<String>,
    /// Where the database is, when neither `--database-url` nor `DATABASE_URL` says.
    #[serde(default)]
    pub database: DatabaseSpec,
    /// Where the keys come from, for targets that do not say.
    pub keys: Option<KeysSpec>,
    /// The tables and columns to rotate.
    #[serde(rename = "target", default)]
    pub targets: Vec<TargetSpec>,
    /// The job file this was read from (absolute), when it was read from one.
    #[serde(skip)]
    pub file: Option<std::path::PathBuf>,
    /// Whether `name` was taken from the file's name rather than written.
    #[serde(skip)]
    pub name_from_file: bool,
}

/// `[database]` section.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSpec {
    /// libpq URL or key=value string.
    pub url: Option<String>,
}

/// The URL may carry a password: `Debug` never shows it.
impl std::fmt::Debug for DatabaseSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let DatabaseSpec { url } = self;
        f.debug_struct("DatabaseSpec")
            .field("url", &url.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// How ciphertext bytes are stored in a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encoding {
    /// The bytes as they are (`bytea`; or the token text of a text-native format such as Fernet).
    Raw,
    /// Standard base64 with padding (usually in a `text` column).
    Base64,
}

/// Associated data bound to each value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AadSpec {
    /// The same bytes (UTF-8) for every value.
    pub constant: Option<String>,
    /// The value of this column of the same row, as text (e.g. the primary key).
    pub column: Option<String>,
}

/// One `[[target]]`: a table, its key, the encrypted columns and their format.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    /// Table name, optionally `schema.table`.
    pub table: String,
    /// Schema, when the table name itself contains a dot.
    pub schema: Option<String>,
    /// Columns of the primary key (or of a unique, NOT NULL key); defaults to the table's primary key.
    pub primary_key: Option<Vec<String>>,
    /// Encrypted columns.
    pub columns: Vec<String>,
    /// Ciphertext format the values are in.
    pub format: Format,
    /// How they are stored; default: raw in `bytea`, base64 in `text` (Fernet tokens: raw).
    pub encoding: Option<Encoding>,
    /// Format to write instead (a migration, e.g. fernet -> versioned-gcm).
    pub to_format: Option<Format>,
    /// How to store the written format; default as for `encoding`.
    pub to_encoding: Option<Encoding>,
    /// Keys of this target, instead of the job's `[keys]`.
    pub keys: Option<KeysSpec>,
    /// Keys for `to_format`, when they differ from `keys`.
    pub to_keys: Option<KeysSpec>,
    /// Associated data the application binds to each value.
    pub aad: Option<AadSpec>,
    /// Only rows matching this SQL condition (written by the operator; checked by preparing it).
    #[serde(rename = "where")]
    pub filter: Option<String>,
    /// A search hash of one encrypted column's plaintext, rehashed in the
    /// same row update (left out of the spec hash when absent, as `rewrite`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<HashSpec>,
    /// What a run rewrites: `all` (default) or `hash` (only the search hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
}

impl JobSpec {
    /// Whether a target has keys of its own (`keys` or `to_keys`): then the
    /// job's `[keys]` are not all its keys, and `rotate` and `secrets`,
    /// which manage those, refuse it.
    pub fn targets_have_own_keys(&self) -> bool {
        self.targets
            .iter()
            .any(|t| t.keys.is_some() || t.to_keys.is_some())
    }

    /// Reads and checks a job file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read job file {}: {e}", path.display())))?;
        let mut spec = Self::parse(&text).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("job file {}: {msg}", path.display())),
            other => other,
        })?;
        if spec.name.is_none() {
            spec.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
            spec.name_from_file = true;
        }
        spec.file = Some(std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()));
        spec.check_relative_stores(path)?;
        Ok(spec)
    }

    /// Refuses a key store named by a relative path that names two files:
    /// one from the directory rekey runs in (the one it reads), another
    /// beside the job file. Run from another directory holding an older
    /// copy, a rotation would stage, promote and retire in that copy while
    /// the applications read the other, and every value would end under a
    /// key their copy lacks.
    fn check_relative_stores(&self, job: &Path) -> Result<(), Error> {
        let Some(beside) = std::path::absolute(job)
            .ok()
            .and_then(|j| j.parent().map(Path::to_path_buf))
        else {
            return Ok(());
        };
        let stores = self.keys.iter().chain(self.targets.iter().flat_map(|t| {
            t.keys
                .iter()
                .chain(t.to_keys.iter())
                .chain(t.hash.iter().map(|h| &h.keys))
        }));
        for store in stores.filter_map(|k| k.path.as_deref()) {
            if !store.is_relative() {
                continue;
            }
            let (Ok(read), Ok(other)) = (
                std::path::absolute(store).and_then(std::fs::canonicalize),
                std::fs::canonicalize(beside.join(store)),
            ) else {
                continue;
            };
            if read != other {
                return Err(Error::Config(format!(
                    "job file {}: keys path {:?} is relative, so rekey reads {} (from the directory it runs in), but \
                     another file of that name is beside the job file, {}: if the applications read that one, a rotation \
                     of this copy leaves every value under a key theirs lacks. Give the store's absolute path in the job \
                     file, or run rekey from the directory the path is meant from",
                    job.display(),
                    store.display(),
                    read.display(),
                    other.display()
                )));
            }
        }
        Ok(())
    }

    /// Parses job-file text and checks what can be checked without a database.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut spec: JobSpec = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        spec.check()?;
        let fernet_job = !spec.targets.is_empty()
            && spec
                .targets
                .iter()
                .all(|t| t.format == crate::crypto::codec::Format::Fernet);
        if let Some(keys) = spec.keys.as_mut() {
            keys.fernet_job = fernet_job;
        }
        Ok(spec)
    }

    fn check(&self) -> Result<(), Error> {
        if let Some(name) = &self.name {
            // The name also names the audit log beside the job file.
            if name.trim().is_empty()
                || name == "."
                || name == ".."
                || name.contains(['/', '\\', '\0'])
            {
                return Err(Error::Config(format!(
                    "name {name:?} cannot be used: it names the job's audit log beside the job file, so it must be non-empty, without '/', '\\' or NUL"
                )));
            }
        }
        if self.targets.is_empty() {
            return Err(Error::Config(
                "no [[target]] entries: add one with table, columns and format".into(),
            ));
        }
        let mut seen = HashSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            let at = format!("[[target]] #{} (table {:?})", i + 1, t.table);
            if t.table.trim().is_empty() {
                return Err(Error::Config(format!("{at}: table is empty")));
            }
            let (schema, table) = t.split_table();
            let names = schema.into_iter().chain([table]).chain(
                t.columns
                    .iter()
                    .chain(t.primary_key.iter().flatten())
                    .map(String::as_str),
            );
            let extra = t.aad.as_ref().and_then(|a| a.column.as_deref());
            let hashed = t.hash.as_ref().map(|h| h.column.as_str());
            for name in names.chain(extra).chain(hashed) {
                if name.contains('\0') {
                    return Err(Error::Config(format!("{at}: name {name:?} contains a NUL character, which no PostgreSQL name can hold")));
                }
                if name.len() > MAX_NAME_BYTES {
                    return Err(Error::Config(format!(
                        "{at}: name {name:?} is {} bytes, and PostgreSQL keeps only the first {MAX_NAME_BYTES} bytes of a name (cutting longer ones when a table is created): give the name as the catalog holds it",
                        name.len()
                    )));
                }
            }
            if t.columns.is_empty() {
                return Err(Error::Config(format!(
                    "{at}: columns is empty; list the encrypted columns"
                )));
            }
            if matches!(&t.primary_key, Some(k) if k.is_empty()) {
                return Err(Error::Config(format!("{at}: primary_key is empty; list its columns or leave it out to use the table's primary key")));
            }
            if t.keys.is_none() && self.keys.is_none() {
                return Err(Error::Config(format!("{at}: no keys: add a [keys] section, or keys = {{ source = \"env\" }} to the target")));
            }
            if let Some(aad) = &t.aad {
                if aad.constant.is_some() == aad.column.is_some() {
                    return Err(Error::Config(format!(
                        "{at}: aad needs exactly one of constant = \"...\" or column = \"...\""
                    )));
                }
            }
            if let Some(f) = &t.filter {
                check_condition(f).map_err(|why| Error::Config(format!("{at}: where {why}")))?;
            }
            hash::check(t, &at).map_err(Error::Config)?;
            for c in t.columns.iter().chain(t.hash.as_ref().map(|h| &h.column)) {
                let (schema, table) = t.split_table();
                if !seen.insert((schema.map(str::to_owned), table.to_owned(), c.clone())) {
                    return Err(Error::Config(format!("{at}: column {c:?} is listed twice in this job; each column may appear in one target only")));
                }
                if t.primary_key.iter().flatten().any(|k| k == c) {
                    return Err(Error::Config(format!(
                        "{at}: column {c:?} is both encrypted and part of primary_key"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Hash of everything that decides which values a run rewrites and how.
    /// A job resumed with a different hash is refused.
    pub fn spec_hash(&self) -> String {
        let canonical = serde_json::json!({ "keys": self.keys, "targets": self.targets });
        hex::encode(digest(&SHA256, canonical.to_string().as_bytes()))
    }
}

impl TargetSpec {
    /// `(schema, table)`, splitting `schema.table` when no `schema` is given.
    pub fn split_table(&self) -> (Option<&str>, &str) {
        match (&self.schema, self.table.split_once('.')) {
            (Some(s), _) => (Some(s.as_str()), self.table.as_str()),
            (None, Some((s, t))) => (Some(s), t),
            (None, None) => (None, self.table.as_str()),
        }
    }
}

#[cfg(test)]
mod tests;
