//! Raw binary values: rekey never needs to understand a primary key's type.
//! It reads key columns in PostgreSQL's binary format and hands the same
//! bytes back as parameters and COPY fields; [`RawRef`] and [`RawParam`]
//! carry those bytes through tokio-postgres for any column type.

use std::error::Error as StdError;

use bytes::BytesMut;
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use tokio_postgres::Row;

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
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.extend_from_slice(self.0);
        Ok(IsNull::No)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// A key in PostgreSQL's binary format, one element per key column.
pub type KeyBytes = Vec<Vec<u8>>;

/// The first `n` columns of `row` as raw bytes (key columns come first in
/// every row rekey reads); a NULL reads as empty, which no key column holds.
fn leading(row: &Row, n: usize) -> impl Iterator<Item = &[u8]> {
    (0..n).map(move |i| value(row, i).unwrap_or_default())
}

/// Column `i` of `row` as raw bytes; `None` for NULL (or past the row's end).
pub fn value(row: &Row, i: usize) -> Option<&[u8]> {
    row.try_get::<_, Option<RawRef>>(i)
        .ok()
        .flatten()
        .map(|r| r.0)
}

/// The key of a row whose first `n` columns are its key, owned.
pub fn key_of(row: &Row, n: usize) -> KeyBytes {
    leading(row, n).map(<[u8]>::to_vec).collect()
}

/// Parameters as the driver takes them, from values of one type.
pub fn params<T: ToSql + Sync>(values: &[T]) -> Vec<&(dyn ToSql + Sync)> {
    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}
