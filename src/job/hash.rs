//! A target's search hash resolved: its column found in the catalog with a
//! type its output fits, its keys loaded from their store, the hasher ready.
//! The hash column rides at the end of the target's columns, so the source
//! reads it, the stage table holds its old and new value, and the
//! compare-and-swap UPDATE checks it like any rewritten column.

use tokio_postgres::Client;

use crate::crypto::keyring::Keyring;
use crate::crypto::search_hash::{HashOutput, SearchHasher};
use crate::error::DbContext;
use crate::secrets::KeysSpec;
use crate::Error;

use super::catalog::{TableColumn, TableRef};
use super::spec::TargetSpec;

/// A search hash of a target, ready to compute.
#[derive(Debug)]
pub struct SearchHash {
    /// Index of the hash column in the target's columns (the last one).
    pub column: usize,
    /// Index of the encrypted column whose plaintext is hashed.
    pub of: usize,
    /// Computes and recognises hashes under every hash key.
    pub hasher: SearchHasher,
    /// The hash keys.
    pub keyring: Keyring,
    /// Where they came from.
    pub source: KeysSpec,
    /// Whether a run rewrites only the hash (`rewrite = "hash"`).
    pub only: bool,
}

impl SearchHash {
    /// A label for people: `hash v2`.
    pub fn key_label(&self, id: crate::crypto::keyring::KeyId) -> String {
        format!("hash v{id}")
    }
}

/// Resolves `t.hash` (if any): the column's catalog entry and the hash.
/// `encrypted` are the target's encrypted column names, in order; `load`
/// reads a key store.
pub async fn resolve<F, Fut>(
    client: &Client,
    t: &TargetSpec,
    table: &TableRef,
    encrypted: &[String],
    at: &str,
    load: F,
) -> Result<Option<(TableColumn, SearchHash)>, Error>
where
    F: FnOnce(KeysSpec) -> Fut,
    Fut: std::future::Future<Output = Result<Keyring, Error>>,
{
    let Some(spec) = &t.hash else {
        return Ok(None);
    };
    let of_name = t.hashed_column().unwrap_or_default();
    let of = encrypted.iter().position(|c| c == of_name).ok_or_else(|| {
        Error::Config(format!(
            "{at}: hash of = {of_name:?} is not an encrypted column of this target"
        ))
    })?;
    let type_name: Option<String> = client
        .query_opt(
            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = $3 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table.schema, &table.name, &spec.column],
        )
        .await
        .ctx(|| format!("looking up hash column {:?} of {table}", spec.column))?
        .map(|r| r.get(0));
    let Some(type_name) = type_name else {
        return Err(Error::Config(format!(
            "{at}: hash column {:?} does not exist in {table}",
            spec.column
        )));
    };
    let textual = type_name == "text" || type_name.starts_with("character varying");
    let fits = match spec.output {
        HashOutput::Raw => type_name == "bytea",
        HashOutput::Hex | HashOutput::Base64 => textual,
    };
    if !fits {
        let want = match spec.output {
            HashOutput::Raw => "bytea (or output = \"hex\" / \"base64\" for a text column)",
            HashOutput::Hex | HashOutput::Base64 => {
                "text or varchar (or output = \"raw\" for a bytea column)"
            }
        };
        return Err(Error::Config(format!(
            "{at}: hash column {table}.{} is {type_name}, and output = \"{}\" needs {want}",
            spec.column,
            spec.output.name()
        )));
    }
    let keyring = load(spec.keys.clone()).await?;
    let hasher = SearchHasher::new(&keyring, spec.output, spec.truncate)
        .map_err(|e| Error::Config(format!("{at}: hash: {e}")))?;
    Ok(Some((
        TableColumn {
            name: spec.column.clone(),
            type_name,
        },
        SearchHash {
            column: encrypted.len(),
            of,
            hasher,
            keyring,
            source: spec.keys.clone(),
            only: t.hash_only(),
        },
    )))
}
