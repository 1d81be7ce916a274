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
        .query("SELECT pk FROM rekey.conflicts WHERE job_id = $1 AND target = $2 ORDER BY seen_at, pk LIMIT $3", &[&job_id, &(target as i32), &limit])
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

/// Why a row was set aside to be re-read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetAside {
    /// The application changed it, or held it locked, while rekey wrote.
    Changed,
    /// The database refused its write with an error (a trigger, a constraint).
    Refused,
}

/// Records rows of `target` set aside to be re-read, inside a batch's
/// transaction: one statement for every thousand keys.
pub async fn add(
    tx: &impl GenericClient,
    job_id: i64,
    target: usize,
    keys: &HashSet<KeyBytes>,
    why: SetAside,
) -> Result<(), tokio_postgres::Error> {
    let refused = why == SetAside::Refused;
    if refused {
        // a row already set aside for a change is refused now: marked so
        // (DELETE and INSERT, no UPDATE privilege needed)
        let keys: Vec<KeyBytes> = keys.iter().cloned().collect();
        clear(tx, job_id, target, &keys).await?;
    }
    let target = target as i32;
    let keys: Vec<&KeyBytes> = keys.iter().collect();
    for chunk in keys.chunks(KEYS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO rekey.conflicts (job_id, target, pk, refused) VALUES {} ON CONFLICT DO NOTHING",
            placeholders(4, chunk.len(), |p| format!("($1, $2, {p}, $3)"))
        );
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&job_id, &target, &refused];
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

/// Rows of job `job_id` whose write the database refused with an error, in
/// any run: set aside to be re-read, or re-read and recorded as not rotated.
pub async fn refused_rows(client: &Client, job_id: i64) -> Result<u64, Error> {
    let n: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM rekey.conflicts WHERE job_id = $1 AND refused) \
                  + (SELECT count(DISTINCT (target, pk)) FROM rekey.not_rotated \
                     WHERE job_id = $1 AND reason = 'write_rejected')",
            &[&job_id],
        )
        .await
        .ctx(|| "counting the rows whose write the database refused".into())?
        .get(0);
    Ok(u64::try_from(n).unwrap_or(0))
}
