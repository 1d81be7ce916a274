//! The progress total of a rewrite: the rows left to rotate, found beside
//! the run so the first batch does not wait for them. A table of up to
//! [`SAMPLE_PAGES`] pages (its partitions or inheritance children
//! included) is counted; a larger one is estimated from a sample of about
//! that many pages, and sampled again as the run nears the estimate. A
//! full count reads the whole table a second time beside the run (on 100M
//! rows, tens of GB of I/O against the run's and the application's) for a
//! number only the progress line reads.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_postgres::{CancelToken, Client};

use crate::db::raw::params;
use crate::db::session::Timeouts;
use crate::db::Database;
use crate::engine::sql;
use crate::error::DbContext;
use crate::job::{Job, Target};
use crate::observe::progress::Total;
use crate::Error;

use super::rewrite::stale_rows_of;

/// Pages a table may have and still be counted row by row (8 MiB at the
/// default 8 kB block size: a count of milliseconds); above it, about this
/// many pages are sampled.
pub const SAMPLE_PAGES: f64 = 1_000.0;

/// How many times its pages when the catalogue last sized it (`ANALYZE`,
/// `VACUUM`) a table may have before the catalogue's rows per page no
/// longer scale its live rows.
const GROWN: f64 = 1.1;

/// The rows left to rotate, and how they were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowsLeft {
    /// Counted: every target was small enough.
    Counted(u64),
    /// Estimated from a sample of pages of at least one large target.
    Sampled(u64),
}

/// How many times at most a sampled total is found again as the run nears it.
const RESAMPLES: u32 = 32;

/// A sample is taken again no sooner than this many times as long as the
/// last one took after it: sampling is at most a twentieth of one session's
/// time (of the server's, a twentieth of that over the run's lanes).
const SAMPLE_SHARE: u32 = 20;

/// How often the rows done are compared with the point a total is found
/// again.
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// Runs `run` (not started yet) while the rows left to rotate in `job` are
/// found beside it (counted or sampled: [`rows_left`]) for the progress
/// `total`. They are read in a session of their own, in a read-only
/// snapshot taken before `run` starts, so they are the rows left at the
/// start whatever the batches commit meanwhile; the session is closed as
/// soon as it has its answer, and a run that ends first cancels it.
///
/// A sampled total can come out low. Rather than showing an unknown total
/// once the rows done pass it, the rows left are sampled again, in a new
/// snapshot, when the run has done half of what the last sample found left
/// (any more, where it found none), and no sooner than [`SAMPLE_SHARE`]
/// times as long as the last sample took: the total becomes the rows done
/// as of that snapshot plus the rows left in it. Each sample reads about
/// [`SAMPLE_PAGES`] pages, and a run takes at most [`RESAMPLES`] more.
/// Only where a rotated value can be told from one left to rotate by its
/// first bytes ([`shows_rotated`]): elsewhere every row with a value stays
/// "left", and a sample taken mid-run would count the rows done twice.
///
/// Where several processes share a job, the rows left are everyone's, and
/// so are the rows done ([`Total::rows_done`]: the others' are read up to a
/// check late, so a re-sample may come a little late, and the total it
/// gives be low by the others' rows of that check).
pub async fn counted_beside<T>(
    db: &Database,
    job: &Job,
    total: &Total,
    run: impl Future<Output = T>,
) -> Result<T, Error> {
    // the total only feeds the progress line: without a session for it
    // (connection slots full, a role's limit) the run goes on with the estimate
    let first = match open_counter(db).await {
        Ok(counter) => counter,
        Err(e) => {
            stays_an_estimate(&e);
            return Ok(run.await);
        }
    };
    // the session counting now, for the run's end to cancel
    let counting = Mutex::new(Some(first.cancel_token()));
    let resamples = if job.targets.iter().all(shows_rotated) {
        RESAMPLES
    } else {
        0
    };
    let count = async {
        let (mut counter, mut began) = (first, Instant::now());
        let mut at_start = AtStart::default();
        // the rows done as of the snapshot: none before `run` starts
        let mut done = 0;
        for resample in 0..=resamples {
            let left = rows_left(&counter, job, &mut at_start).await;
            // the session goes with its snapshot at once: held through the run,
            // it would keep vacuum from removing anything deleted since, cluster-wide
            drop(counter);
            set_counting(&counting, None);
            let (took, ended) = (began.elapsed(), Instant::now());
            tracing::debug!(
                resample,
                seconds = took.as_secs_f64(),
                "found the rows left to rotate: {left:?}"
            );
            let left = match left {
                Ok(RowsLeft::Counted(rows)) => {
                    total.set(done + rows);
                    return;
                }
                Ok(RowsLeft::Sampled(rows)) => {
                    total.set_estimate(done + rows);
                    rows
                }
                Err(e) => {
                    stays_an_estimate(&e);
                    return;
                }
            };
            if resample == resamples {
                return;
            }
            // a sample can miss the few pages that still hold rows to rotate:
            // where it found none, the next one comes once any more are done
            let again = done + (left / 2).max(1);
            while total.rows_done() < again || ended.elapsed() < took * SAMPLE_SHARE {
                tokio::time::sleep(WATCH_EVERY).await;
            }
            began = Instant::now();
            counter = match open_counter(db).await {
                Ok(counter) => counter,
                Err(e) => {
                    stays_an_estimate(&e);
                    return;
                }
            };
            set_counting(&counting, Some(counter.cancel_token()));
            // the snapshot is taken: the rows done by now are not among those it
            // sees left (but for batches committed and not yet counted: a moment's)
            done = total.rows_done();
        }
    };
    tokio::pin!(count, run);
    Ok(tokio::select! {
        () = &mut count => run.await,
        out = &mut run => {
            // the total no longer matters; the session is dropped with its snapshot
            let token = counting.lock().ok().and_then(|mut t| t.take());
            if let Some(token) = token {
                let _ = db.cancel(&token).await;
            }
            out
        }
    })
}

/// Whether every value of `t` rotated can be told from one left to rotate
/// by its first bytes (the target key's id), so the rows found left shrink
/// as the run goes. Not for a move to another format or key store, or a
/// search hash, where every row with a value is read.
pub(super) fn shows_rotated(t: &Target) -> bool {
    (0..t.columns.len()).all(|c| t.stale_prefix(c).is_some())
}

/// Warns that the total could not be found (the run goes on without it).
fn stays_an_estimate(e: &Error) {
    tracing::warn!("the progress total stays an estimate: {}", e.chain());
}

/// Notes which session is counting (`None`: none is).
fn set_counting(counting: &Mutex<Option<CancelToken>>, token: Option<CancelToken>) {
    if let Ok(mut t) = counting.lock() {
        *t = token;
    }
}

/// A session in a read-only snapshot taken now, for [`rows_left`].
async fn open_counter(db: &Database) -> Result<Client, Error> {
    // a count reads whole tables: not under the statement timeout of the run's batches
    let counter = db.with_session(&Timeouts::read_only()).connect().await?;
    counter
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT 1")
        .await
        .ctx(|| "starting the count of rows to rotate".into())?;
    Ok(counter)
}

/// The live rows each sampled target was scaled by at its first sample, so
/// later samples scale by the same (see [`rows_left`]).
#[derive(Debug, Default)]
pub struct AtStart {
    /// By target, in the job's order: `None` where it was counted, or its
    /// sample saw no live rows.
    live: Vec<Option<f64>>,
}

/// The rows left to rotate in every target: counted, or sampled where a
/// target is larger than [`SAMPLE_PAGES`]. The first call fills
/// `at_start`; later ones scale their samples by it: a rewrite leaves as
/// many rows as it found, but the dead versions it leaves behind spread
/// them over more pages, so the catalogue's rows per page times the pages
/// now would count too many once it has begun.
pub async fn rows_left(
    client: &Client,
    job: &Job,
    at_start: &mut AtStart,
) -> Result<RowsLeft, Error> {
    let (mut rows, mut sampled) = (0u64, false);
    let first = at_start.live.is_empty();
    for (i, t) in job.targets.iter().enumerate() {
        let size = size_of(client, t).await?;
        let live = if size.pages <= SAMPLE_PAGES {
            rows += stale_rows_of(client, t).await?;
            None
        } else {
            let fixed = at_start.live.get(i).copied().flatten();
            let found = sampled_stale_rows(client, t, size, fixed).await?;
            rows += found.stale;
            sampled = true;
            Some(found.live).filter(|live| *live > 0.0)
        };
        if first {
            at_start.live.push(live);
        }
    }
    Ok(if sampled {
        RowsLeft::Sampled(rows)
    } else {
        RowsLeft::Counted(rows)
    })
}

/// How large a target's table is now, its partitions or inheritance
/// children included (a read of it reads them too).
#[derive(Debug, Clone, Copy)]
struct Size {
    /// Pages now (not the catalogue's figure from the last `ANALYZE`).
    pages: f64,
    /// Rows: the catalogue's rows per page times the pages now; `None` when
    /// a part with pages was never analyzed.
    rows: Option<f64>,
    /// Over a tenth more pages, over its whole tree, than when the
    /// catalogue last sized it (`ANALYZE`, `VACUUM`): grown by
    /// inserts, or by the dead versions of a rewrite (one interrupted
    /// before this run), which the pages alone cannot tell apart.
    grown: bool,
}

/// Reads a target's [`Size`] in one statement, before its sample.
async fn size_of(client: &Client, t: &Target) -> Result<Size, Error> {
    let row = client
        .query_one(
            "WITH RECURSIVE tree(oid) AS (
                 SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relname = $2
                 UNION ALL
                 SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid),
             part AS (
                 SELECT c.relpages, c.reltuples::float8 AS reltuples,
                        pg_relation_size(c.oid)::float8 / current_setting('block_size')::float8 AS pages
                   FROM tree JOIN pg_class c ON c.oid = tree.oid)
             SELECT coalesce(sum(pages), 0)::float8,
                    sum(CASE WHEN relpages > 0 AND reltuples >= 0 THEN reltuples / relpages * pages ELSE 0 END)::float8,
                    coalesce(bool_or(pages > 0 AND NOT (relpages > 0 AND reltuples >= 0)), false),
                    coalesce(sum(pages) > $3::float8 * sum(greatest(relpages, 0))::float8, false)
               FROM part",
            &[&t.table.schema, &t.table.name, &GROWN],
        )
        .await
        .ctx(|| format!("reading the size of {}", t.table))?;
    let pages: f64 = row.get(0);
    let rows: Option<f64> = row.get(1);
    let unanalyzed: bool = row.get(2);
    Ok(Size {
        pages,
        rows: rows.filter(|_| !unanalyzed),
        grown: row.get(3),
    })
}

/// What a sample of a target found.
struct Sampled {
    /// Rows left to rotate.
    stale: u64,
    /// The live rows they were scaled by.
    live: f64,
}

/// Rows of `t` holding a value not visibly on the target key, estimated
/// from about [`SAMPLE_PAGES`] pages picked at random: the share of the
/// sampled rows left to rotate times the table's live rows (`live` when
/// given, else its [`Size`]), or, where its size cannot be trusted (never
/// analyzed, or grown since: inserts or dead versions, which cannot be told
/// apart), the sampled count scaled up by the share of pages sampled. The
/// share is the steadier figure: how many pages a sample picks varies by
/// about 3% at 1,000 pages, and the first form cancels it out.
async fn sampled_stale_rows(
    client: &Client,
    t: &Target,
    size: Size,
    live: Option<f64>,
) -> Result<Sampled, Error> {
    let (filter, cols) = sql::stale_filter(t, "", 1);
    let prefixes: Vec<Vec<u8>> = cols.iter().filter_map(|&c| t.stale_prefix(c)).collect();
    let percent = (100.0 * SAMPLE_PAGES / size.pages).min(100.0) as f32;
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
    let (stale, sampled) = (stale.max(0) as f64, sampled.max(0) as f64);
    let scale = 100.0 / f64::from(percent);
    let live = live.or(size.rows.filter(|_| !size.grown));
    Ok(match live {
        Some(live) if sampled > 0.0 => Sampled {
            stale: (stale / sampled * live).round() as u64,
            live,
        },
        _ => Sampled {
            stale: (stale * scale).round() as u64,
            live: live.unwrap_or(sampled * scale),
        },
    })
}

/// The percent of `t`'s pages (its partitions or children included) that
/// holds about [`SAMPLE_PAGES`] of them, for `TABLESAMPLE SYSTEM`.
pub async fn sample_percent(client: &Client, t: &Target) -> Result<f32, Error> {
    let pages = size_of(client, t).await?.pages;
    Ok((100.0 * SAMPLE_PAGES / pages.max(1.0)).min(100.0) as f32)
}

/// The catalogue's estimate of the targets' rows (no count), partitions and
/// inheritance children included; `None` when a part was never analyzed (a
/// restored database before its `ANALYZE`).
pub async fn rows_estimate(client: &Client, job: &Job) -> Result<Option<u64>, Error> {
    let mut rows = 0.0;
    for t in &job.targets {
        match size_of(client, t).await?.rows {
            Some(r) => rows += r,
            None => return Ok(None),
        }
    }
    Ok(Some(rows as u64))
}
