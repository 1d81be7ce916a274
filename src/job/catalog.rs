//! What the database says about a target: its table, key and column types.
//!
//! Everything a job file names is checked here before any row is read: the
//! table exists, the columns exist and are `bytea` or `text`, and the key is
//! the table's primary key or a unique key of NOT NULL columns.

use std::fmt;

use tokio_postgres::Client;

use super::spec::TargetSpec;
use crate::db::quote_ident;
use crate::error::DbContext;
use crate::Error;

/// A table, by schema and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRef {
    /// Schema name, unquoted.
    pub schema: String,
    /// Table name, unquoted.
    pub name: String,
}

impl TableRef {
    /// `"schema"."name"`, quoted for SQL.
    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// A column of a table as the catalog has it.
#[derive(Debug, Clone)]
pub struct TableColumn {
    /// Column name, unquoted.
    pub name: String,
    /// Type as `format_type` prints it (already quoted where needed).
    pub type_name: String,
}

/// A target's table, key and columns as found in the catalog.
pub struct ResolvedTarget {
    /// The table.
    pub table: TableRef,
    /// Its oid, as the catalog had it when the job was resolved.
    pub oid: u32,
    /// Key columns in order.
    pub key: Vec<TableColumn>,
    /// Encrypted columns in job-file order.
    pub columns: Vec<TableColumn>,
}

struct CatalogColumn {
    name: String,
    /// Its values' type: under the domains where its type is one.
    type_name: String,
    /// Its type as declared (a domain's name), for people.
    declared: String,
    not_null: bool,
    /// A generated column (`GENERATED ALWAYS AS (...) STORED`): the
    /// server computes it, and refuses any other value.
    generated: bool,
}

/// Resolves and checks one `[[target]]` against the catalog.
pub async fn resolve_target(client: &Client, spec: &TargetSpec) -> Result<ResolvedTarget, Error> {
    let (oid, table) = find_table(client, spec).await?;
    let cols = table_columns(client, oid, &table).await?;
    let columns = encrypted_columns(spec, &table, &cols)?;
    let key_names = key_columns(client, spec, oid, &table, &cols).await?;
    let find = |c: &str| cols.iter().find(|col| col.name == c);
    let key = key_names
        .iter()
        .filter_map(|k| find(k))
        .map(|c| TableColumn {
            name: c.name.clone(),
            type_name: c.type_name.clone(),
        })
        .collect::<Vec<_>>();
    if let Some(c) = columns
        .iter()
        .find(|c| key.iter().any(|k| k.name == c.name))
    {
        return Err(Error::Config(format!(
            "column {table}.{} is part of the key and cannot be re-encrypted in place",
            c.name
        )));
    }
    Ok(ResolvedTarget {
        table,
        oid,
        key,
        columns,
    })
}

/// The table a target names: its oid and name, or why there is none.
async fn find_table(client: &Client, spec: &TargetSpec) -> Result<(u32, TableRef), Error> {
    let (schema, name) = spec.split_table();
    let what = || format!("looking up table {:?}", spec.table);
    let found = client
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relname = $2 AND c.relkind IN ('r', 'p')
                AND (n.nspname = $1 OR ($1 IS NULL AND n.nspname = ANY (current_schemas(false))))
              ORDER BY array_position(current_schemas(false), n.nspname::name) NULLS LAST",
            &[&schema, &name],
        )
        .await
        .ctx(what)?;
    if found.len() > 1 {
        return Err(shadowed(client, spec, &found).await?);
    }
    let Some(row) = found.first() else {
        let searched = schema.map_or_else(
            || "the search_path".to_string(),
            |s| format!("schema {s:?}"),
        );
        let dotted = if spec.schema.is_none() && schema.is_some() {
            format!("; a table whose own name holds a dot needs its schema given apart: schema = \"public\", table = {:?}", spec.table)
        } else {
            String::new()
        };
        // Something else by that name (a view, a sequence...) is worth naming.
        let other: Option<String> = client
            .query_opt(
                "SELECT CASE c.relkind WHEN 'v' THEN 'a view' WHEN 'm' THEN 'a materialized view' WHEN 'f' THEN 'a foreign table'
                                       WHEN 'S' THEN 'a sequence' WHEN 'i' THEN 'an index' WHEN 'I' THEN 'an index' WHEN 'c' THEN 'a composite type'
                                       ELSE 'not a table' END
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relname = $2 AND (n.nspname = $1 OR ($1 IS NULL AND n.nspname = ANY (current_schemas(false))))
                  ORDER BY array_position(current_schemas(false), n.nspname::name) NULLS LAST
                  LIMIT 1",
                &[&schema, &name],
            )
            .await
            .ctx(what)?
            .map(|r| r.get(0));
        if let Some(kind) = other {
            return Err(Error::Config(format!(
                "{:?} in {searched} is {kind}, not a table: rekey rewrites values in tables (or partitioned tables); name the table the values are stored in",
                spec.table
            )));
        }
        return Err(Error::Config(format!(
            "table {:?} not found in {searched}: check [[target]] table (use \"schema.table\" for other schemas; names are case-sensitive{dotted})",
            spec.table
        )));
    };
    Ok((
        row.get(0),
        TableRef {
            schema: row.get(1),
            name: row.get(2),
        },
    ))
}

/// The refusal of a table named without its schema that tables in several
/// schemas of rekey's `search_path` answer to (`found`, the first being
/// the one the name reaches): the applications, under another role or
/// `search_path`, may read another one than rekey would rotate, and a
/// rotation that says done over a scratch copy goes on to retire the key
/// the real table is under.
async fn shadowed(
    client: &Client,
    spec: &TargetSpec,
    found: &[tokio_postgres::Row],
) -> Result<Error, Error> {
    let path: String = client
        .query_one("SHOW search_path", &[])
        .await
        .ctx(|| "reading the search_path".into())?
        .get(0);
    let tables: Vec<String> = found
        .iter()
        .map(|r| {
            TableRef {
                schema: r.get(1),
                name: r.get(2),
            }
            .to_string()
        })
        .collect();
    Ok(Error::Config(format!(
        "table {:?} is found in {} schemas of rekey's search_path ({path}): {}; the name reaches {} for rekey, but an \
         application connecting as another role or with another search_path may read another one, and rekey would \
         rotate the wrong one and go on to retire the key the other is under: name the schema in the job file \
         (table = {:?}, or schema = \"...\" beside it)",
        spec.table,
        tables.len(),
        tables.join(", "),
        tables[0],
        tables[0]
    )))
}

/// Every column of a table, in order.
async fn table_columns(
    client: &Client,
    oid: u32,
    table: &TableRef,
) -> Result<Vec<CatalogColumn>, Error> {
    Ok(client
        .query(
            &format!(
                "SELECT attname::text, {}, attnotnull, attgenerated <> '', format_type(atttypid, atttypmod)
                   FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                base_type("atttypid", "atttypmod")
            ),
            &[&oid],
        )
        .await
        .ctx(|| format!("reading the columns of {table}"))?
        .iter()
        .map(|r| CatalogColumn {
            name: r.get(0),
            type_name: r.get(1),
            not_null: r.get(2),
            generated: r.get(3),
            declared: r.get(4),
        })
        .collect())
}

/// SQL for the type of a column of type `typ` and modifier `typmod` (SQL
/// expressions) underneath its domains, as `format_type` prints it: a
/// domain over bytea holds bytea values, read and written as such (its
/// checks hold on the values written). The type itself where it is no domain.
pub(crate) fn base_type(typ: &str, typmod: &str) -> String {
    underneath(typ, typmod, "format_type(oid, typmod)")
}

/// SQL for the oid of type `typ` (an SQL expression) underneath its
/// domains: what its operators (orderings, equality) are declared for.
pub(crate) fn base_type_oid(typ: &str) -> String {
    underneath(typ, "-1", "oid")
}

/// SQL for `what` (of `oid` and `typmod`) of the type underneath the
/// domains of type `typ` with modifier `typmod`.
fn underneath(typ: &str, typmod: &str, what: &str) -> String {
    format!(
        "(WITH RECURSIVE d (oid, typmod, depth) AS (
              SELECT {typ}, {typmod}, 0
              UNION ALL SELECT t.typbasetype, t.typtypmod, d.depth + 1 FROM pg_type t JOIN d ON t.oid = d.oid
               WHERE t.typtype = 'd')
          SELECT {what} FROM d ORDER BY depth DESC LIMIT 1)"
    )
}

/// A column's type for people, from the type it is `declared` as and the
/// type underneath its domains (`base`): a domain said with what it is over.
pub(crate) fn said_type(declared: &str, base: &str) -> String {
    if declared == base {
        base.to_string()
    } else {
        format!("{declared} (a domain over {base})")
    }
}

impl CatalogColumn {
    /// Its type for people: a domain said with what it is over.
    fn said_type(&self) -> String {
        said_type(&self.declared, &self.type_name)
    }
}

/// The names of a table's columns, for messages.
fn column_names(cols: &[CatalogColumn]) -> String {
    cols.iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The encrypted columns a target lists: present, and of a type that holds ciphertext.
fn encrypted_columns(
    spec: &TargetSpec,
    table: &TableRef,
    cols: &[CatalogColumn],
) -> Result<Vec<TableColumn>, Error> {
    let find = |c: &str| cols.iter().find(|col| col.name == c);
    let mut columns = Vec::new();
    for c in &spec.columns {
        let col = find(c).ok_or_else(|| {
            Error::Config(format!(
                "column {c:?} does not exist in {table}; its columns are: {}",
                column_names(cols)
            ))
        })?;
        if col.generated {
            return Err(Error::Config(format!(
                "column {table}.{c} is a generated column: the server computes its values from other columns and refuses \
                 any other; list the encrypted column it is generated from instead"
            )));
        }
        match col.type_name.as_str() {
            "bytea" | "text" => {}
            other if other.starts_with("character varying") => {}
            _ => {
                return Err(Error::Config(format!(
                    "column {table}.{c} is {}; encrypted columns must be bytea (raw ciphertext) or text (base64)",
                    col.said_type()
                )))
            }
        };
        columns.push(TableColumn {
            name: col.name.clone(),
            type_name: col.type_name.clone(),
        });
    }

    Ok(columns)
}

/// The key the target pages by: the given primary_key if it is a unique key
/// of NOT NULL columns, else the table's primary key.
async fn key_columns(
    client: &Client,
    spec: &TargetSpec,
    oid: u32,
    table: &TableRef,
    cols: &[CatalogColumn],
) -> Result<Vec<String>, Error> {
    let find = |c: &str| cols.iter().find(|col| col.name == c);
    let unique_keys: Vec<(bool, Vec<String>)> = client
        .query(
            "SELECT i.indisprimary,
                    array(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
                          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.ord)
               FROM pg_index i
              WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
              ORDER BY i.indisprimary DESC",
            &[&oid],
        )
        .await
        .ctx(|| format!("reading the keys of {table}"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    Ok(match &spec.primary_key {
        None => match unique_keys.iter().find(|(primary, _)| *primary) {
            Some((_, k)) => k.clone(),
            None => {
                return Err(Error::Config(format!(
                    "{table} has no primary key: add one, or name a unique NOT NULL column set in [[target]] primary_key"
                )))
            }
        },
        Some(given) => {
            for k in given {
                let col = find(k).ok_or_else(|| {
                    Error::Config(format!("primary_key column {k:?} does not exist in {table}; its columns are: {}", column_names(cols)))
                })?;
                if !col.not_null {
                    return Err(Error::Config(format!("primary_key column {table}.{k} allows NULL; the key must be NOT NULL and unique")));
                }
            }
            let mut sorted_given = given.clone();
            sorted_given.sort();
            let matches = unique_keys.iter().any(|(_, k)| {
                let mut k = k.clone();
                k.sort();
                k == sorted_given
            });
            if !matches {
                let found = unique_keys
                    .iter()
                    .map(|(p, k)| format!("{}({})", if *p { "primary key " } else { "unique " }, k.join(", ")))
                    .collect::<Vec<_>>();
                return Err(Error::Config(format!(
                    "primary_key [{}] is not a unique key of {table} (keys: {}); name its primary key, or leave primary_key out",
                    given.join(", "),
                    if found.is_empty() { "none".to_string() } else { found.join("; ") }
                )));
            }
            given.clone()
        }
    })
}

/// Checks that `column` exists in `table` (for an `aad = { column = ... }`).
pub async fn check_column_exists(
    client: &Client,
    table: &TableRef,
    column: &str,
) -> Result<(), Error> {
    let found: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                             WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = $3 AND a.attnum > 0 AND NOT a.attisdropped)",
            &[&table.schema, &table.name, &column],
        )
        .await
        .ctx(|| format!("looking up column {column:?} of {table}"))?
        .get(0);
    if found {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "aad column {column:?} does not exist in {table}"
        )))
    }
}
