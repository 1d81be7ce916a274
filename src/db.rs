//! PostgreSQL plumbing: connecting, quoting identifiers, and raw binary values.
//!
//! rekey never needs to understand a primary key's type: it reads key columns
//! in PostgreSQL's binary format and hands the same bytes back as parameters
//! and COPY fields. [`RawRef`] and [`RawParam`] carry those bytes through
//! tokio-postgres for any column type.

use std::error::Error as StdError;
use std::str::FromStr;

use bytes::BytesMut;
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use tokio_postgres::{Client, Config, NoTls};

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL or key=value string does not parse.
    #[error("the database URL does not parse ({0}); give a libpq URL (postgres://user@host:5432/db) or key=value string (host=... dbname=...)")]
    BadUrl(String),
    /// The server could not be reached or refused us.
    #[error("cannot connect to PostgreSQL")]
    Connect(#[source] tokio_postgres::Error),
}

/// A parsed connection string; the password never appears in `Debug` output
/// (tokio-postgres redacts it).
#[derive(Clone)]
pub struct Database {
    /// The parsed configuration.
    config: Config,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database").field("dbname", &self.config.get_dbname()).finish()
    }
}

impl Database {
    /// Parses a libpq URL or key=value string.
    pub fn parse(url: &str) -> Result<Self, ConnectError> {
        let mut config = Config::from_str(url).map_err(|e| ConnectError::BadUrl(e.to_string()))?;
        if config.get_application_name().is_none() {
            config.application_name("rekey");
        }
        Ok(Database { config })
    }

    /// Opens one connection; its I/O runs on a spawned tokio task until the
    /// client is dropped.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        let (client, connection) = self.config.connect(NoTls).await.map_err(ConnectError::Connect)?;
        tokio::spawn(async move {
            // The client sees the same error on its next call; nothing to add here.
            let _ = connection.await;
        });
        Ok(client)
    }
}

/// Quotes an identifier for SQL: `my "col"` becomes `"my ""col"""`.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A column value in PostgreSQL's binary format, borrowed from a result row.
#[derive(Debug, Clone, Copy)]
pub struct RawRef<'a>(pub &'a [u8]);

impl<'a> FromSql<'a> for RawRef<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(RawRef(raw))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A parameter sent as raw binary-format bytes, whatever the column's type.
/// The bytes must be a valid binary encoding for that type: rekey only sends
/// back bytes PostgreSQL itself produced for the same column.
#[derive(Debug, Clone, Copy)]
pub struct RawParam<'a>(pub &'a [u8]);

impl ToSql for RawParam<'_> {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.extend_from_slice(self.0);
        Ok(IsNull::No)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    #[test]
    fn quote_ident_doubles_quotes() {
        assert_eq!(super::quote_ident(r#"a "b"; drop"#), r#""a ""b""; drop""#);
    }
}
