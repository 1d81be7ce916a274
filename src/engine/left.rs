//! The progress total of a rewrite: the rows left to rotate, found beside
//! the run so the first batch does not wait for them. A table of up to
//! [`SAMPLE_PAGES`] pages is counted; a larger one is estimated from a
//! sample of that many pages. A full count reads the whole table a second
//! time beside the run (on 100M rows, tens of GB of I/O against the run's
//! and the application's) for a number only the progress line reads.

use std::future::Future;

use tokio_postgres::{Client, GenericClient};

use crate::db::raw::params;
use crate::db::Database;
use crate::engine::{plan, sql};
use crate::error::DbContext;
use crate::job::{Job, Target};
use crate::observe::progress::Total;
use crate::Error;

use super::rewrite::stale_rows_of;

/// Pages a table may have and still be counted row by row (8 MiB at the
/// default block size: a count of milliseconds); above it, this many pages
/// are sampled.
pub const SAMPLE_PAGES: f64 = 1_000.0;

/// The rows left to rotate, and how they were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowsLeft {
    /// Counted: every target was small enough.
    Counted(u64),
    /// Estimated from a sample of pages of at least one large target.
    Sampled(u64),
}

/// Runs `run` (not started yet) while the rows left to rotate in `job` are
/// found beside it for the progress `total`. They are read in a session of
/// their own, in a read-only snapshot taken before `run` starts, so they
/// are the rows left at the start whatever the batches commit meanwhile;
/// the session is closed as soon as it has its answer, and a run that ends
/// first cancels it.
pub async fn counted_beside<T>(
    db: &Database,
    job: &Job,
    total: &Total,
    run: impl Future<Output = T>,
) -> Result<T, Error> {
    let counter = db.connect().await?;
    counter
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT 1")
        .await
        .ctx(|| "starting the count of rows to rotate".into())?;
    let cancel = counter.cancel_token();
    let count = async move {
        let left = rows_left(&counter, job).await;
        // the session goes with its snapshot at once: held through the run,
        // it would keep vacuum from removing anything deleted since, cluster-wide
        drop(counter);
        match left {
            Ok(RowsLeft::Counted(rows)) => total.set(rows),
            Ok(RowsLeft::Sampled(rows)) => total.set_estimate(rows),
            Err(e) => tracing::warn!("the progress total stays an estimate: {}", e.chain()),
        }
    };
    tokio::pin!(count, run);
    Ok(tokio::select! {
        () = &mut count => run.await,
        out = &mut run => {
            // the total no longer matters; the session is dropped with its snapshot
            let _ = db.cancel(&cancel).await;
            out
        }
    })
}

/// The rows left to rotate in every target: counted, or sampled where a
/// target is larger than [`SAMPLE_PAGES`].
pub async fn rows_left(client: &Client, job: &Job) -> Result<RowsLeft, Error> {
    let (mut rows, mut sampled) = (0u64, false);
    for t in &job.targets {
        let pages = pages_of(client, t).await?;
        if pages <= SAMPLE_PAGES {
            rows += stale_rows_of(client, t).await?;
        } else {
            rows += sampled_stale_rows(client, t, pages).await?;
            sampled = true;
        }
    }
    Ok(if sampled {
        RowsLeft::Sampled(rows)
    } else {
        RowsLeft::Counted(rows)
    })
}

/// The table's pages now (not the catalogue's figure from its last ANALYZE).
async fn pages_of(client: &impl GenericClient, t: &Target) -> Result<f64, Error> {
    client
        .query_one(
            "SELECT pg_relation_size(c.oid)::float8 / current_setting('block_size')::float8
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&t.table.schema, &t.table.name],
        )
        .await
        .ctx(|| format!("reading the size of {}", t.table))
        .map(|r| r.get(0))
}

/// Rows of `t` (of `pages` pages) holding a value not visibly on the target
/// key, estimated from about [`SAMPLE_PAGES`] pages picked at random: the
/// share of the sampled rows left to rotate times the table's rows (the
/// catalogue's figure scaled to its pages now), or, for a table never
/// analyzed, the sampled count scaled up by the share of pages sampled. The
/// share is the steadier figure: how many pages a sample picks varies by
/// about 3% at 1,000 pages, and the first form cancels it out.
async fn sampled_stale_rows(client: &Client, t: &Target, pages: f64) -> Result<u64, Error> {
    let (filter, cols) = sql::stale_filter(t, "", 1);
    let prefixes: Vec<Vec<u8>> = cols.iter().filter_map(|&c| t.stale_prefix(c)).collect();
    let percent = (100.0 * SAMPLE_PAGES / pages).min(100.0) as f32;
    let mut values = params(&prefixes);
    values.push(&percent);
    let row = client
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE {filter}{}), count(*) FROM {} TABLESAMPLE SYSTEM (${})",
                sql::target_filter(t),
                t.qualified(),
                prefixes.len() + 1,
            ),
            &values,
        )
        .await
        .ctx(|| format!("sampling the rows to rotate in {}", t.table))?;
    let (stale, sampled): (i64, i64) = (row.get(0), row.get(1));
    let stale = stale.max(0) as f64;
    let rows = match plan::current_rows_estimate(client, t).await? {
        Some(rows) if sampled > 0 => stale / sampled as f64 * rows,
        _ => stale * 100.0 / f64::from(percent),
    };
    Ok(rows.round() as u64)
}

/// The catalogue's estimate of the targets' rows (no count); `None` when a
/// target was never analyzed (a restored database before its `ANALYZE`).
pub async fn rows_estimate(client: &Client, job: &Job) -> Result<Option<u64>, Error> {
    let mut rows = 0.0;
    for t in &job.targets {
        match plan::current_rows_estimate(client, t).await? {
            Some(r) => rows += r,
            None => return Ok(None),
        }
    }
    Ok(Some(rows as u64))
}
