//! Rows the application changed between a batch's read and its write, kept
//! in `rekey.conflicts` to be re-read later.

use tokio_postgres::Client;

use crate::db::raw::KeyBytes;
use crate::error::DbContext;
use crate::Error;

/// Up to `limit` keys of rows of `target` waiting to be re-read after a conflict.
pub async fn pending_conflicts(client: &Client, job_id: i64, target: usize, limit: i64) -> Result<Vec<KeyBytes>, Error> {
    Ok(client
        .query("SELECT pk FROM rekey.conflicts WHERE job_id = $1 AND target = $2 ORDER BY seen_at LIMIT $3", &[&job_id, &(target as i32), &limit])
        .await
        .ctx(|| "reading conflicts to re-read".into())?
        .iter()
        .filter_map(|r| r.try_get(0).ok())
        .collect())
}
