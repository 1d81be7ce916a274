//! Per-range progress in `rekey.progress`: where each range stands and what
//! its batches did, written by the sink inside each batch's own transaction,
//! so what is committed and what the checkpoint says can never disagree: a
//! run killed at any instant resumes after the last committed batch.

use tokio_postgres::GenericClient;

use crate::db::raw::KeyBytes;
use crate::observe::counts::Counts;

/// The `range_no` under which conflict re-reads are counted.
pub const RETRY_RANGE: i32 = -1;

/// A stretch of a table's key space: after `lower` (exclusive) up to `upper` (inclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    /// Exclusive lower bound; `None` from the first row.
    pub lower: Option<KeyBytes>,
    /// Inclusive upper bound; `None` to the last row.
    pub upper: Option<KeyBytes>,
}

/// Where one range of one target stands.
#[derive(Debug, Clone)]
pub struct RangeState {
    /// The target's index in the job.
    pub target: usize,
    /// The range's number within its target.
    pub range_no: i32,
    /// The range's bounds.
    pub bounds: KeyRange,
    /// Last key committed, if any.
    pub last: Option<KeyBytes>,
    /// Whether the range is finished.
    pub done: bool,
}

impl RangeState {
    /// Where reading continues: after the last committed key, else after the range's lower bound.
    pub fn start(&self) -> Option<&KeyBytes> {
        self.last.as_ref().or(self.bounds.lower.as_ref())
    }
}

/// The counters of `rekey.progress`, in [`Counts`] order.
pub const COUNT_COLUMNS: &str = "rows_scanned, rows_rewritten, values_rewritten, values_skipped, values_failed, conflicts, values_not_rotated";

/// The counters summed over a job's ranges, in [`Counts`] order, for
/// `SELECT {SUM_COUNTS} FROM rekey.progress WHERE ...`; read back with [`counts_from`].
pub const SUM_COUNTS: &str =
    "coalesce(sum(rows_scanned), 0)::bigint, coalesce(sum(rows_rewritten), 0)::bigint, \
     coalesce(sum(values_rewritten), 0)::bigint, coalesce(sum(values_skipped), 0)::bigint, \
     coalesce(sum(values_failed), 0)::bigint, coalesce(sum(conflicts), 0)::bigint, \
     coalesce(sum(values_not_rotated), 0)::bigint";

/// The counters of a row, starting at column `first`.
pub fn counts_from(r: &tokio_postgres::Row, first: usize) -> Counts {
    let g = |i: usize| r.get::<_, i64>(first + i) as u64;
    Counts {
        rows_scanned: g(0),
        rows_rewritten: g(1),
        values_rewritten: g(2),
        values_skipped: g(3),
        values_failed: g(4),
        conflicts: g(5),
        values_not_rotated: g(6),
    }
}

/// The counters, in `rekey.progress` column order, as bigint parameters.
fn as_params(c: &Counts) -> [i64; 7] {
    [
        c.rows_scanned,
        c.rows_rewritten,
        c.values_rewritten,
        c.values_skipped,
        c.values_failed,
        c.conflicts,
        c.values_not_rotated,
    ]
    .map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// A range's lease as a lane holds it: the owner's name and the claim's generation.
#[derive(Debug, Clone, Copy)]
pub struct Lease<'a> {
    /// This process's name in `rekey.progress.owner`.
    pub owner: &'a str,
    /// `rekey.progress.lease_gen` as the claim left it.
    pub generation: i64,
}

/// Where a batch leaves its range.
#[derive(Debug, Clone, Copy)]
pub struct Reached<'a> {
    /// The key of its last row, where the next batch starts.
    pub last: Option<&'a KeyBytes>,
    /// Whether it was the range's last page.
    pub end: bool,
    /// The range's upper bound as its reader knew it: the range is marked
    /// done only where `rekey.progress` has the same bound.
    pub upper: Option<&'a KeyBytes>,
}

/// Records a committed batch inside its own transaction, if the range is
/// still held under `lease` (`None`: ranges are not leased); returns the
/// job's `control` ("run", "pause", "stop") and whether a lane of another
/// process asked for the range to be split (the request is taken: cleared),
/// or `None` when the lease was lost (the caller must roll back). The
/// transaction's xid is noted as the job's own (`rekey.job_xids`): rows it
/// wrote are not taken for another writer's ([`crate::engine::behind`]).
pub async fn record_batch(
    tx: &impl GenericClient,
    job_id: i64,
    state: &RangeState,
    lease: Option<Lease<'_>>,
    reached: Reached<'_>,
    c: &Counts,
) -> Result<Option<(String, bool)>, tokio_postgres::Error> {
    let Reached {
        last,
        end: done,
        upper,
    } = reached;
    let v = as_params(c);
    let owner = lease.map(|l| l.owner);
    let generation = lease.map(|l| l.generation);
    let row = tx
        .query_opt(
            "WITH own AS (INSERT INTO rekey.job_xids (job_id, xid) VALUES ($1, txid_current() % 4294967296))
             UPDATE rekey.progress SET last_key = coalesce($4, last_key), done = $5 AND upper_key IS NOT DISTINCT FROM $15,
                    rows_scanned = rows_scanned + $6, rows_rewritten = rows_rewritten + $7,
                    values_rewritten = values_rewritten + $8, values_skipped = values_skipped + $9,
                    values_failed = values_failed + $10, conflicts = conflicts + $11,
                    values_not_rotated = values_not_rotated + $14, split_wanted = false, updated_at = now()
              WHERE job_id = $1 AND target = $2 AND range_no = $3
                AND owner IS NOT DISTINCT FROM $12 AND ($13::bigint IS NULL OR lease_gen = $13)
             RETURNING (SELECT control FROM rekey.jobs WHERE job_id = $1),
                       -- the flag as it was before this update (a subquery sees the statement's snapshot)
                       (SELECT w.split_wanted FROM rekey.progress w WHERE w.job_id = $1 AND w.target = $2 AND w.range_no = $3)",
            &[
                &job_id,
                &(state.target as i32),
                &state.range_no,
                &last,
                &done,
                &v[0],
                &v[1],
                &v[2],
                &v[3],
                &v[4],
                &v[5],
                &owner,
                &generation,
                &v[6],
                &upper,
            ],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get::<_, Option<bool>>(1).unwrap_or(false))))
}

/// Takes back the note [`record_batch`] or [`record_retry`] made of the
/// transaction's xid, inside that transaction: it wrote rows of the job's
/// targets beside the ones rekey swapped (a trigger's copies of the old
/// values), which the recount must read as it reads another writer's.
pub async fn disown_transaction(
    tx: &impl GenericClient,
    job_id: i64,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "DELETE FROM rekey.job_xids WHERE job_id = $1 AND xid = txid_current() % 4294967296",
        &[&job_id],
    )
    .await
    .map(|_| ())
}

/// Counts a batch of conflict re-reads, inside its own transaction, and
/// notes the transaction's xid as the job's own, as [`record_batch`].
pub async fn record_retry(
    tx: &impl GenericClient,
    job_id: i64,
    target: usize,
    table: &str,
    c: &Counts,
) -> Result<(), tokio_postgres::Error> {
    let v = as_params(c);
    tx.execute(
        "WITH own AS (INSERT INTO rekey.job_xids (job_id, xid) VALUES ($1, txid_current() % 4294967296))
         INSERT INTO rekey.progress AS p (job_id, target, range_no, table_name, done, rows_scanned, rows_rewritten,
                values_rewritten, values_skipped, values_failed, conflicts, values_not_rotated)
         VALUES ($1, $2, $3, $4, true, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (job_id, target, range_no) DO UPDATE SET
                rows_scanned = p.rows_scanned + EXCLUDED.rows_scanned, rows_rewritten = p.rows_rewritten + EXCLUDED.rows_rewritten,
                values_rewritten = p.values_rewritten + EXCLUDED.values_rewritten, values_skipped = p.values_skipped + EXCLUDED.values_skipped,
                values_failed = p.values_failed + EXCLUDED.values_failed, conflicts = p.conflicts + EXCLUDED.conflicts,
                values_not_rotated = p.values_not_rotated + EXCLUDED.values_not_rotated, updated_at = now()",
        &[&job_id, &(target as i32), &RETRY_RANGE, &table, &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6]],
    )
    .await
    .map(|_| ())
}
