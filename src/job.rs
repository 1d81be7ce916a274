//! The job: what to rotate, parsed from the job file and resolved once.
//!
//! Two stages, as in ripgrep: [`JobSpec`] is the TOML file checked without
//! I/O (unknown fields, empty lists, duplicate columns); [`Job`] is the spec
//! resolved against the database catalog and the keyring, built once and
//! handed down as `&Job`.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::catalog::{self, Column, Storage, TableRef};
use crate::codec::{Codec, Format};
use crate::db::quote_ident;
use crate::keyring::{env, Keyring};
use crate::Error;

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
    /// Where the keys come from.
    pub keys: KeysSpec,
    /// The tables and columns to rotate.
    #[serde(rename = "target", default)]
    pub targets: Vec<TargetSpec>,
}

/// `[database]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSpec {
    /// libpq URL or key=value string.
    pub url: Option<String>,
}

/// `[keys]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysSpec {
    /// Which key source to read.
    pub source: KeySource,
    /// Environment variable prefix for the `env` source (default `ENCRYPTION`).
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

fn default_prefix() -> String {
    "ENCRYPTION".into()
}

/// The key sources rekey reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeySource {
    /// `ENCRYPTION_KEY_V<n>` + `ENCRYPTION_CURRENT_VERSION`, or `ENCRYPTION_KEY` + `ENCRYPTION_KEY_NEW`.
    Env,
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
    /// Encrypted columns, `bytea` or base64 `text`.
    pub columns: Vec<String>,
    /// Ciphertext format of every column of this target.
    pub format: Format,
}

impl JobSpec {
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
        }
        Ok(spec)
    }

    /// Parses job-file text and checks what can be checked without a database.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let spec: JobSpec = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        spec.check()?;
        Ok(spec)
    }

    fn check(&self) -> Result<(), Error> {
        if self.targets.is_empty() {
            return Err(Error::Config("no [[target]] entries: add one with table, columns and format".into()));
        }
        let mut seen = HashSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            let at = format!("[[target]] #{} (table {:?})", i + 1, t.table);
            if t.table.trim().is_empty() {
                return Err(Error::Config(format!("{at}: table is empty")));
            }
            if t.columns.is_empty() {
                return Err(Error::Config(format!("{at}: columns is empty; list the encrypted columns")));
            }
            if matches!(&t.primary_key, Some(k) if k.is_empty()) {
                return Err(Error::Config(format!("{at}: primary_key is empty; list its columns or leave it out to use the table's primary key")));
            }
            for c in &t.columns {
                let (schema, table) = t.split_table();
                if !seen.insert((schema.map(str::to_owned), table.to_owned(), c.clone())) {
                    return Err(Error::Config(format!("{at}: column {c:?} is listed twice in this job; each column may appear in one target only")));
                }
                if t.primary_key.iter().flatten().any(|k| k == c) {
                    return Err(Error::Config(format!("{at}: column {c:?} is both encrypted and part of primary_key")));
                }
            }
        }
        Ok(())
    }

    /// Hash of everything that decides which values a run rewrites and how.
    /// A job resumed with a different hash is refused.
    pub fn spec_hash(&self) -> String {
        let canonical = serde_json::json!({ "keys": self.keys, "targets": self.targets });
        hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
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

/// A target resolved against the catalog, with its codec ready.
pub struct Target {
    /// Position in the job file, from 0; identifies the target in engine tables.
    pub index: usize,
    /// The table.
    pub table: TableRef,
    /// Key columns, in keyset order.
    pub key: Vec<Column>,
    /// Encrypted columns.
    pub columns: Vec<Column>,
    /// The format every column is in.
    pub format: Format,
    /// Codec over the job's keyring.
    pub codec: Arc<dyn Codec>,
}

impl Target {
    /// `"schema"."table"`.
    pub fn qualified(&self) -> String {
        self.table.qualified()
    }

    /// Key columns as `alias."k1", alias."k2"` (alias may be empty).
    pub fn key_list(&self, alias: &str) -> String {
        self.key.iter().map(|c| format!("{alias}{}", quote_ident(&c.name))).collect::<Vec<_>>().join(", ")
    }

    /// A readable `table.column` label.
    pub fn label(&self, column: usize) -> String {
        format!("{}.{}", self.table, self.columns[column].name)
    }

    /// The byte prefix of values already on the target key, where SQL can see it.
    pub fn stale_prefix(&self, column: usize) -> Option<Vec<u8>> {
        match self.columns[column].storage {
            Storage::Bytea => self.codec.key_prefix(self.codec.target()),
            Storage::Base64Text => None,
        }
    }
}

/// A job resolved once: targets checked against the database, keys loaded.
pub struct Job {
    /// Job name (identity in `rekey.jobs`).
    pub name: String,
    /// See [`JobSpec::spec_hash`].
    pub spec_hash: String,
    /// The resolved targets.
    pub targets: Vec<Target>,
    /// The keys.
    pub keyring: Keyring,
}

impl Job {
    /// Loads the keyring and resolves every target against the catalog.
    /// Refuses, before any row is touched, what cannot be rotated safely.
    pub async fn resolve(spec: &JobSpec, client: &tokio_postgres::Client) -> Result<Job, Error> {
        Self::resolve_with_keyring(spec, client, load_keyring(spec)?).await
    }

    /// As [`Job::resolve`], with a keyring the caller already holds (`rekey bench`).
    pub async fn resolve_with_keyring(spec: &JobSpec, client: &tokio_postgres::Client, keyring: Keyring) -> Result<Job, Error> {
        let mut targets = Vec::with_capacity(spec.targets.len());
        for (index, t) in spec.targets.iter().enumerate() {
            let resolved = catalog::resolve_target(client, t).await?;
            let codec = t.format.codec(&keyring).map_err(|e| Error::Config(e.to_string()))?;
            targets.push(Target {
                index,
                table: resolved.table,
                key: resolved.key,
                columns: resolved.columns,
                format: t.format,
                codec,
            });
        }
        Ok(Job { name: spec.name.clone().unwrap_or_else(|| "rekey".into()), spec_hash: spec.spec_hash(), targets, keyring })
    }
}

/// Loads the keyring named by the job's `[keys]` section.
pub fn load_keyring(spec: &JobSpec) -> Result<Keyring, Error> {
    match spec.keys.source {
        KeySource::Env => env::from_process_env(&spec.keys.prefix).map_err(|e| Error::Config(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [keys]
        source = "env"
        [[target]]
        table = "patient_persons"
        primary_key = ["id"]
        columns = ["phone_encrypted"]
        format = "versioned-gcm"
    "#;

    #[test]
    fn parses_the_design_example() {
        let spec = JobSpec::parse(MINIMAL).unwrap();
        assert_eq!(spec.targets[0].columns, ["phone_encrypted"]);
    }

    #[test]
    fn unknown_field_is_refused() {
        let err = JobSpec::parse(&MINIMAL.replace("format =", "formt = \"x\"\nformat =")).unwrap_err();
        assert!(err.to_string().contains("formt"), "{err}");
    }

    #[test]
    fn duplicate_column_is_refused() {
        let twice = format!("{MINIMAL}\n[[target]]\ntable = \"patient_persons\"\ncolumns = [\"phone_encrypted\"]\nformat = \"versioned-gcm\"\n");
        assert!(JobSpec::parse(&twice).unwrap_err().to_string().contains("listed twice"));
    }

    #[test]
    fn schema_qualified_table_splits() {
        let spec = JobSpec::parse(&MINIMAL.replace("\"patient_persons\"", "\"phi.patient_persons\"")).unwrap();
        assert_eq!(spec.targets[0].split_table(), (Some("phi"), "patient_persons"));
    }

    #[test]
    fn spec_hash_ignores_the_database_url() {
        let a = JobSpec::parse(MINIMAL).unwrap();
        let b = JobSpec::parse(&format!("[database]\nurl = \"postgres://x\"\n{MINIMAL}")).unwrap();
        assert_eq!(a.spec_hash(), b.spec_hash());
    }
}
