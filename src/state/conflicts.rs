//! Rows the application changed between a batch's read and its write, kept
//! in `rekey.conflicts` to be re-read later.

use std::collections::HashSet;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient};

use crate::db::raw::KeyBytes;
use crate::error::DbContext;
use crate::Error;

/// Up to `limit` keys of rows of `target` waiting to be re-read after a conflict.
pub async fn pending_conflicts(
    client: &Client,
    job_id: i64,
    target: usize,
    limit: i64,
) -> Result<Vec<KeyBytes>, Error> {
    Ok(client
        .query("SELECT pk FROM rekey.conflicts WHERE job_id = $1 AND target = $2 ORDER BY seen_at LIMIT $3", &[&job_id, &(target as i32), &limit])
        .await
        .ctx(|| "reading conflicts to re-read".into())?
        .iter()
        .filter_map(|r| r.try_get(0).ok())
        .collect())
}

/// Keys written or removed by one statement, so its parameters stay well
/// under the protocol's 65,535.
const KEYS_PER_STATEMENT: usize = 1_000;

/// `$first, $first+1, ...`: one placeholder per key of `keys`.
fn placeholders(first: usize, keys: usize, row: impl Fn(String) -> String) -> String {
    (first..first + keys)
        .map(|i| row(format!("${i}")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Records rows of `target` that conflicted, inside a batch's transaction:
/// one statement for every thousand keys.
pub async fn add(
    tx: &impl GenericClient,
    job_id: i64,
    target: usize,
    keys: &HashSet<KeyBytes>,
) -> Result<(), tokio_postgres::Error> {
    let target = target as i32;
    let keys: Vec<&KeyBytes> = keys.iter().collect();
    for chunk in keys.chunks(KEYS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO rekey.conflicts (job_id, target, pk) VALUES {} ON CONFLICT DO NOTHING",
            placeholders(3, chunk.len(), |p| format!("($1, $2, {p})"))
        );
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&job_id, &target];
        params.extend(chunk.iter().map(|k| *k as &(dyn ToSql + Sync)));
        tx.execute(&sql, &params).await?;
    }
    Ok(())
}

/// Takes re-read rows off the list, inside their batch's transaction (those
/// that conflict again are added back by [`add`]).
pub async fn clear(
    tx: &impl GenericClient,
    job_id: i64,
    target: usize,
    keys: &[KeyBytes],
) -> Result<(), tokio_postgres::Error> {
    let target = target as i32;
    for chunk in keys.chunks(KEYS_PER_STATEMENT) {
        let sql = format!(
            "DELETE FROM rekey.conflicts WHERE job_id = $1 AND target = $2 AND pk IN ({})",
            placeholders(3, chunk.len(), |p| p)
        );
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&job_id, &target];
        params.extend(chunk.iter().map(|k| k as &(dyn ToSql + Sync)));
        tx.execute(&sql, &params).await?;
    }
    Ok(())
}
