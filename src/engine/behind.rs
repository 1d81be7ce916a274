//! The recount at the end of a rewrite: rows holding a value on an old key
//! that the run never read, because they were written behind it (an
//! application still writing under an old key after the run passed the
//! row, a restore from a backup). `run` may not say done while one is in
//! scope: exit 0 promises that nothing in scope is left on an old key.
//!
//! Only where a value shows its key by its first bytes
//! ([`super::left::shows_rotated`]); elsewhere a run reads every row, and
//! telling a value written behind it from one it rotated takes a decrypt
//! of every value (`rekey verify --full`).

use tokio_postgres::Client;

use crate::error::DbContext;
use crate::job::{Job, Target};
use crate::Error;

use super::left::shows_rotated;
use super::rewrite::stale_rows_of;

/// Rows written behind the run in one table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Behind {
    /// `schema.table`.
    pub table: String,
    /// Rows holding a value on an old key the run did not leave knowingly.
    pub rows: u64,
}

/// The job's tables holding rows on an old key that the run did not leave
/// knowingly (quarantined, not rotated, still changing when it ended),
/// once every range of the job is done (until then, the rows left are
/// another process's to rotate). Counts the rows to rotate less the rows
/// the run recorded, so a recorded row since rotated by the application
/// can hide one written behind: a lower bound, never a false alarm.
pub async fn rows_behind(client: &Client, job: &Job, job_id: i64) -> Result<Vec<Behind>, Error> {
    let all_done: Option<bool> = client
        .query_one(
            "SELECT bool_and(done) FROM rekey.progress WHERE job_id = $1",
            &[&job_id],
        )
        .await
        .ctx(|| "reading whether every range of the job is done".into())?
        .get(0);
    if all_done != Some(true) {
        return Ok(Vec::new());
    }
    let mut behind = Vec::new();
    for t in job.targets.iter().filter(|t| shows_rotated(t)) {
        let stale = stale_rows_of(client, t).await?;
        if stale == 0 {
            continue;
        }
        let rows = stale.saturating_sub(left_knowingly(client, t, job_id).await?);
        if rows > 0 {
            behind.push(Behind {
                table: t.table.to_string(),
                rows,
            });
        }
    }
    Ok(behind)
}

/// Rows of `t` the job recorded as left on an old key: quarantined, not
/// rotated, or still changing.
async fn left_knowingly(client: &Client, t: &Target, job_id: i64) -> Result<u64, Error> {
    let table = t.table.to_string();
    let rows: i64 = client
        .query_one(
            "SELECT count(*) FROM (
                 SELECT pk FROM rekey.quarantine WHERE job_id = $1 AND table_name = $2
                 UNION SELECT pk FROM rekey.not_rotated WHERE job_id = $1 AND target = $3
                 UNION SELECT pk FROM rekey.conflicts WHERE job_id = $1 AND target = $3) AS recorded",
            &[&job_id, &table, &(t.index as i32)],
        )
        .await
        .ctx(|| format!("counting the rows of {} the run recorded as not rotated", t.table))?
        .get(0);
    Ok(u64::try_from(rows).unwrap_or(0))
}
