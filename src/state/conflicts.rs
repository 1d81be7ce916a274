//! Rows the application changed between a batch's read and its write, kept
//! in `rekey.conflicts` to be re-read later.

use std::collections::HashSet;

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

/// Records rows of `target` that conflicted, inside a batch's transaction.
pub async fn add(
    tx: &impl GenericClient,
    job_id: i64,
    target: usize,
    keys: &HashSet<KeyBytes>,
) -> Result<(), tokio_postgres::Error> {
    for key in keys {
        tx.execute("INSERT INTO rekey.conflicts (job_id, target, pk) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING", &[&job_id, &(target as i32), key]).await?;
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
    for key in keys {
        tx.execute(
            "DELETE FROM rekey.conflicts WHERE job_id = $1 AND target = $2 AND pk = $3",
            &[&job_id, &(target as i32), key],
        )
        .await?;
    }
    Ok(())
}
