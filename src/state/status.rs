//! A job as `rekey status` shows it, from the database alone.

use tokio_postgres::Client;

use crate::error::DbContext;
use crate::observe::counts::Counts;
use crate::Error;

use super::jobs::{Control, JobState};
use super::progress::{counts_from, SUM_COUNTS};

/// A job as `rekey status` shows it.
#[derive(Debug, serde::Serialize)]
pub struct JobStatus {
    /// Job id.
    pub job_id: i64,
    /// Job name.
    pub name: String,
    /// Where it stands.
    pub state: JobState,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// Last checkpoint (RFC 3339): the last batch committed, or the job's
    /// last change of state.
    pub updated_at: String,
    /// When it finished, if it did.
    pub finished_at: Option<String>,
    /// Ranges finished.
    pub ranges_done: i64,
    /// Ranges in all.
    pub ranges_total: i64,
    /// Totals committed so far.
    pub counts: Counts,
    /// Values recorded in `rekey.quarantine` by this job.
    pub quarantined: i64,
    /// Values the database refused or undid the write of: still under an old key.
    pub values_not_rotated: i64,
    /// The same by reason (`write_refused`, `write_undone`).
    pub not_rotated_by_reason: std::collections::BTreeMap<String, i64>,
    /// Rows still waiting in `rekey.conflicts` to be re-read.
    pub conflicts_left: i64,
    /// Rows on an old key written behind the job's last run (after it passed
    /// them), as its summary recorded them: the next run rotates them.
    pub rows_written_behind: i64,
    /// Live control.
    pub control: Control,
    /// Processes holding leases on unfinished ranges now, and alive (the
    /// session that renews their leases is still connected).
    pub workers: Vec<String>,
}

/// The latest job of this name, from the database alone.
pub async fn job_status(client: &Client, name: &str) -> Result<Option<JobStatus>, Error> {
    let what = || format!("reading the status of job {name:?}");
    let Some(j) = client
        .query_opt(
            "SELECT job_id, state, to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    -- the last batch committed: a range's checkpoint, or the job's own last change
                    to_char(greatest(j.updated_at, (SELECT max(p.updated_at) FROM rekey.progress p WHERE p.job_id = j.job_id))
                              AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    (SELECT count(*) FROM rekey.quarantine q WHERE q.job_id = j.job_id), control,
                    (SELECT coalesce(array_agg(DISTINCT p.owner ORDER BY p.owner), '{}') FROM rekey.progress p
                      WHERE p.job_id = j.job_id AND NOT p.done AND p.owner IS NOT NULL AND p.lease_until > now()
                        -- a lease outlives a process killed with -9 until it expires; its session does not
                        AND EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = p.owner_pid)),
                    (SELECT count(*) FROM rekey.not_rotated n WHERE n.job_id = j.job_id),
                    (SELECT count(*) FROM rekey.conflicts c WHERE c.job_id = j.job_id),
                    coalesce((j.summary ->> 'rows_written_behind')::bigint, 0)
               FROM rekey.jobs j WHERE name = $1 ORDER BY job_id DESC LIMIT 1",
            &[&name],
        )
        .await
        .ctx(what)?
    else {
        return Ok(None);
    };
    let id: i64 = j.get(0);
    let p = client
        .query_one(
            &format!("SELECT count(*) FILTER (WHERE done AND range_no >= 0), count(*) FILTER (WHERE range_no >= 0), {SUM_COUNTS} FROM rekey.progress WHERE job_id = $1"),
            &[&id],
        )
        .await
        .ctx(what)?;
    let not_rotated_by_reason = client
        .query(
            "SELECT reason, count(*) FROM rekey.not_rotated WHERE job_id = $1 GROUP BY reason",
            &[&id],
        )
        .await
        .ctx(what)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(Some(JobStatus {
        job_id: id,
        name: name.to_string(),
        state: JobState::stored(j.get(1))?,
        started_at: j.get(2),
        updated_at: j.get(3),
        finished_at: j.get(4),
        ranges_done: p.get(0),
        ranges_total: p.get(1),
        counts: counts_from(&p, 2),
        quarantined: j.get(5),
        control: Control::stored(j.get(6))?,
        workers: j.get(7),
        values_not_rotated: j.get(8),
        not_rotated_by_reason,
        conflicts_left: j.get(9),
        rows_written_behind: j.get(10),
    }))
}
