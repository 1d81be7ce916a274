//! The recount at the end of a rewrite: rows holding a value on an old key
//! that the run never read, because they were written behind it (an
//! application still writing under an old key after the run passed the
//! row, a restore from a backup). `run` may not say done while one is in
//! scope: exit 0 promises that nothing in scope is left on an old key.
//!
//! Where a value shows its key by its first bytes
//! ([`super::left::shows_rotated`]) the rows on an old key are counted.
//! Elsewhere (raw AES-GCM, Fernet) telling a value written behind the run
//! from one it rotated takes a decrypt, so only the rows written by someone
//! else since the job began are read and opened: a row whose `xmin` is no
//! older than the oldest transaction running when the job began and none of
//! the transactions its batches committed in (`rekey.job_xids`). Where the
//! job has spanned 2^31 transactions or more (`age()` wraps), every row
//! but the job's own is read.

use futures_util::TryStreamExt;
use tokio_postgres::Client;

use crate::db::page::Page;
use crate::db::raw::params;
use crate::error::DbContext;
use crate::job::{Job, Target};
use crate::Error;

use super::left::shows_rotated;
use super::sql;
use super::transform::{self, Cell, Cells};

/// Rows written behind the run in one table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Behind {
    /// `schema.table`.
    pub table: String,
    /// Rows holding a value on an old key the run did not leave knowingly.
    pub rows: u64,
    /// A trigger fires on rekey's writes to a target of the job: it may
    /// have written them, inside the run's own transactions.
    #[serde(skip)]
    pub triggers: bool,
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
    for t in &job.targets {
        let rows = if shows_rotated(t) {
            unrecorded_stale_rows(client, t, job_id).await?
        } else {
            others_on_old_keys(client, t, job_id).await?
        };
        if rows > 0 {
            behind.push(Behind {
                table: t.table.to_string(),
                rows,
                triggers: job.targets.iter().any(|t| t.update_triggers),
            });
        }
    }
    Ok(behind)
}

/// Rows of `t` holding a value on an old key that the job did not record
/// as left on one, column by column: a value recorded (quarantined, not
/// rotated) does not hide one written behind in another column of its row;
/// a row still changing (`rekey.conflicts`) counts as recorded in each.
/// The most of any column's, a lower bound of the rows. In one statement:
/// one snapshot, so a row another process re-reads and clears from
/// `rekey.conflicts` meanwhile is not counted as written behind.
async fn unrecorded_stale_rows(client: &Client, t: &Target, job_id: i64) -> Result<u64, Error> {
    let table = t.table.to_string();
    let target = t.index as i32;
    let names: Vec<String> = t.columns.iter().map(|c| c.name.clone()).collect();
    let mut prefixes = Vec::new();
    let (mut stale, mut recorded) = (Vec::new(), Vec::new());
    // $1 job, $2 table, $3 target, then one name per column, then the prefixes
    for (col, name) in (0..names.len()).zip(4..) {
        let param = 4 + names.len() + prefixes.len();
        let Some(term) = sql::prefix_compared(t, col, "", "<>", param) else {
            continue;
        };
        prefixes.extend(t.stale_prefix(col));
        stale.push(format!("count(*) FILTER (WHERE {term})"));
        // a target reading its labelled values quarantines some that carry
        // the target's label, which `stale` does not count: left out (the
        // table read once more, as the run read them all)
        let labelled = match (t.reads_labelled, sql::prefix_compared(t, col, "l.", "=", param)) {
            (true, Some(on_target)) => format!(
                " AND NOT EXISTS (SELECT 1 FROM {} AS l WHERE ROW({})::text = pk_text AND {on_target})",
                t.qualified(),
                t.key_list("l."),
            ),
            _ => String::new(),
        };
        recorded.push(format!(
            "(SELECT count(*) FROM (
                 SELECT pk FROM rekey.quarantine WHERE job_id = $1 AND table_name = $2 AND column_name = ${name}{labelled}
                 UNION SELECT pk FROM rekey.not_rotated WHERE job_id = $1 AND target = $3 AND column_name = ${name}
                 UNION SELECT pk FROM rekey.conflicts WHERE job_id = $1 AND target = $3) AS recorded)"
        ));
    }
    if stale.is_empty() {
        return Ok(0);
    }
    let mut values: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        vec![&job_id, &table, &target];
    values.extend(
        names
            .iter()
            .map(|n| n as &(dyn tokio_postgres::types::ToSql + Sync)),
    );
    values.extend(params(&prefixes));
    let row = client
        .query_one(
            &format!(
                "SELECT ARRAY[{}]::bigint[], ARRAY[{}]::bigint[] FROM (SELECT * FROM {} WHERE true{}) AS t",
                stale.join(", "),
                recorded.join(", "),
                t.qualified(),
                sql::target_filter(t)
            ),
            &values,
        )
        .await
        .ctx(|| format!("counting the rows of {} still on an old key", t.table))?;
    let (stale, recorded): (Vec<i64>, Vec<i64>) = (row.get(0), row.get(1));
    let behind = stale
        .iter()
        .zip(&recorded)
        .map(|(s, r)| s.saturating_sub(*r))
        .max()
        .unwrap_or(0);
    Ok(u64::try_from(behind).unwrap_or(0))
}

/// Rows of `t` another writer changed since job `job_id` began that hold a
/// value an old key opens, or that no key opens: read (only those rows)
/// and opened; less the rows the job recorded (quarantined, not rotated,
/// still changing), as [`unrecorded_stale_rows`] counts. A job begun before
/// rekey noted its transactions is not checked (0).
async fn others_on_old_keys(client: &Client, t: &Target, job_id: i64) -> Result<u64, Error> {
    let what = || {
        format!(
            "reading the rows of {} others changed during the run",
            t.table
        )
    };
    // the job's start as an age (transactions since), and whether age() can
    // still tell it, in the statement that reads the rows: age() counts from
    // one point per transaction, and transactions others begin between two
    // statements would age every row past a span taken in the first
    // (none: a job begun before its transactions were noted, nothing read)
    let text = format!(
        "SELECT {}, {}{} FROM {} AS \"rekey row\"
          WHERE ((SELECT txid_snapshot_xmax(txid_current_snapshot()) - started_xid >= 2000000000
                    FROM rekey.jobs WHERE job_id = $1)
                 OR age(xmin) BETWEEN 0 AND (SELECT age((started_xid % 4294967296)::text::xid)
                                               FROM rekey.jobs WHERE job_id = $1))
            AND NOT EXISTS (SELECT 1 FROM rekey.job_xids x WHERE x.job_id = $1 AND x.xid = \"rekey row\".xmin::text::bigint){}",
        t.key_list(""),
        sql::column_list(t),
        sql::aad_select(t),
        t.qualified(),
        sql::target_filter(t)
    );
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&job_id];
    let stream = client.query_raw(&text, params).await.ctx(what)?;
    futures_util::pin_mut!(stream);
    let (mut behind, mut rows) = (0u64, Vec::new());
    loop {
        let row = stream.try_next().await.ctx(what)?;
        let last = row.is_none();
        rows.extend(row);
        if rows.len() >= PAGE_ROWS || (last && !rows.is_empty()) {
            behind += off_target(t, &rows)?;
            rows.clear();
        }
        if last {
            break;
        }
    }
    if behind == 0 {
        return Ok(0);
    }
    let recorded: i64 = client
        .query_one(
            "SELECT count(*) FROM (
                 SELECT pk FROM rekey.quarantine WHERE job_id = $1 AND table_name = $2
                 UNION SELECT pk FROM rekey.not_rotated WHERE job_id = $1 AND target = $3
                 UNION SELECT pk FROM rekey.conflicts WHERE job_id = $1 AND target = $3) AS recorded",
            &[&job_id, &t.table.to_string(), &(t.index as i32)],
        )
        .await
        .ctx(what)?
        .get(0);
    Ok(behind.saturating_sub(u64::try_from(recorded).unwrap_or(0)))
}

/// Rows read at a time by [`others_on_old_keys`].
const PAGE_ROWS: usize = 5_000;

/// Rows of `rows` (key columns, encrypted columns, associated data) with a
/// value an old key opens, or no key opens: written after the run passed
/// the row, so the run never met it.
fn off_target(t: &Target, rows: &[tokio_postgres::Row]) -> Result<u64, Error> {
    let page = Page::from_rows(rows).map_err(|e| {
        Error::Runtime(format!(
            "reading the rows of {} others changed: {e}",
            t.table
        ))
    })?;
    let mut cells = Cells::default();
    transform::classify(t, &page, &mut cells);
    let ncols = t.columns.len().max(1);
    let off = cells
        .chunks(ncols)
        .filter(|row| {
            row.iter().any(|c| {
                matches!(
                    c,
                    Cell::Opened {
                        on_target: false,
                        ..
                    } | Cell::Failed(_)
                )
            })
        })
        .count();
    Ok(off as u64)
}
