//! Range leases: lanes of many processes claim unfinished ranges of a job
//! from `rekey.progress` (`FOR UPDATE SKIP LOCKED`), renew them while they
//! work, and give them back; a range whose owner died is taken over.

use tokio_postgres::Client;

use crate::db::raw::KeyBytes;
use crate::error::DbContext;
use crate::Error;

use super::progress::{KeyRange, RangeState};

/// How a lane's request for work went.
#[derive(Debug)]
pub enum Claim {
    /// A range is now leased to this process under `generation`; `from`
    /// names the owner it was taken over from.
    Leased {
        /// Where the range stands (durable checkpoint).
        state: RangeState,
        /// The lease's generation, for the checkpoints written under it.
        generation: i64,
        /// The previous owner, when the range was taken over.
        from: Option<String>,
    },
    /// Every unfinished range is leased to another live process (or worked by this one).
    Busy,
    /// Every range is finished.
    Finished,
}

/// Leases the first unfinished range nobody is working on to `owner` for
/// `ttl`: one never leased or released, one whose owner's session is gone
/// or whose lease ran out, or one of `owner`'s own that none of its lanes
/// holds (`working`: (target, range_no) of those it does; a claim whose
/// answer was lost, or a range a server crash reopened). `FOR UPDATE SKIP
/// LOCKED` lets many lanes of many processes ask at once.
pub async fn claim_range(
    client: &Client,
    job_id: i64,
    owner: &str,
    owner_pid: i32,
    ttl: std::time::Duration,
    working: &[(i32, i32)],
    targets: usize,
) -> Result<Claim, Error> {
    let what = || format!("leasing a range of job {job_id}");
    let ttl = ttl.as_secs_f64();
    let (wt, wr): (Vec<i32>, Vec<i32>) = working.iter().copied().unzip();
    let row = client
        .query_opt(
            "WITH pick AS (
                SELECT p.target, p.range_no, p.owner AS previous FROM rekey.progress p
                 WHERE p.job_id = $1 AND p.range_no >= 0 AND NOT p.done
                   AND (p.owner IS NULL
                        OR (p.owner = $2 AND (p.target, p.range_no) NOT IN (SELECT * FROM unnest($5::int[], $6::int[])))
                        OR (p.owner <> $2 AND (p.lease_until < now()
                            OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = p.owner_pid))))
                 ORDER BY p.target, p.range_no LIMIT 1
                 FOR UPDATE OF p SKIP LOCKED)
             UPDATE rekey.progress p SET owner = $2, owner_pid = $3, lease_until = now() + make_interval(secs => $4), lease_gen = p.lease_gen + 1
               FROM pick WHERE p.job_id = $1 AND p.target = pick.target AND p.range_no = pick.range_no
             RETURNING p.target, p.range_no, p.lower_key, p.upper_key, p.last_key, pick.previous, p.lease_gen",
            &[&job_id, &owner, &owner_pid, &ttl, &wt, &wr],
        )
        .await
        .ctx(what)?;
    if let Some(r) = row {
        let target = usize::try_from(r.get::<_, i32>(0)).ok().filter(|t| *t < targets).ok_or_else(|| {
            Error::Runtime(format!("rekey.progress of job {job_id} names a target this job does not have; the engine state was edited by hand"))
        })?;
        let state = RangeState {
            target,
            range_no: r.get(1),
            bounds: KeyRange {
                lower: r.get(2),
                upper: r.get(3),
            },
            last: r.get(4),
            done: false,
        };
        let previous: Option<String> = r.get(5);
        return Ok(Claim::Leased {
            state,
            generation: r.get(6),
            from: previous.filter(|p| p != owner),
        });
    }
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM rekey.progress WHERE job_id = $1 AND range_no >= 0 AND NOT done",
            &[&job_id],
        )
        .await
        .ctx(what)?
        .get(0);
    Ok(if left == 0 {
        Claim::Finished
    } else {
        Claim::Busy
    })
}

/// Extends the leases of the ranges `owner`'s lanes are working on (and
/// records the pid of its monitor session, which changes after a reconnect);
/// a range it owns but no lane works lapses, for whoever comes next.
pub async fn heartbeat(
    client: &Client,
    job_id: i64,
    owner: &str,
    ttl: std::time::Duration,
    working: &[(i32, i32)],
) -> Result<u64, Error> {
    let (wt, wr): (Vec<i32>, Vec<i32>) = working.iter().copied().unzip();
    client
        .execute(
            "UPDATE rekey.progress SET lease_until = now() + make_interval(secs => $3), owner_pid = pg_backend_pid()
              WHERE job_id = $1 AND owner = $2 AND NOT done AND (target, range_no) IN (SELECT * FROM unnest($4::int[], $5::int[]))",
            &[&job_id, &owner, &ttl.as_secs_f64(), &wt, &wr],
        )
        .await
        .ctx(|| format!("renewing the leases of job {job_id}"))
}

/// Gives back `owner`'s unfinished ranges, for other processes or the next run.
pub async fn release_ranges(client: &Client, job_id: i64, owner: &str) -> Result<(), Error> {
    client
        .execute("UPDATE rekey.progress SET owner = NULL, owner_pid = NULL, lease_until = NULL WHERE job_id = $1 AND owner = $2 AND NOT done", &[&job_id, &owner])
        .await
        .ctx(|| format!("releasing the leases of job {job_id}"))?;
    Ok(())
}

/// Splits the range `state` that `owner` holds under `generation`, and that
/// ends at `upper` as its reader knows it, at `at` (a key after its last read
/// row): the range now ends at `at`, and the rest, after `at` up to `upper`,
/// becomes a new unleased range that an idle lane (of any process) can
/// claim. One transaction, committed durably (whatever
/// `synchronous_commit` says), so the two ranges always cover exactly what
/// the one did. Returns the new range, or `None` when the lease was lost,
/// the range finished, or its bound is not `upper` (a split whose outcome
/// this reader never learned): nothing changed.
pub async fn split_range(
    client: &mut Client,
    job_id: i64,
    owner: &str,
    generation: i64,
    state: &RangeState,
    upper: Option<&KeyBytes>,
    at: &KeyBytes,
) -> Result<Option<RangeState>, Error> {
    let what = || format!("splitting range {} of job {job_id}", state.range_no);
    let target = state.target as i32;
    let tx = client.transaction().await.ctx(what)?;
    // the reader stops at `at` once this commits: a commit the server could
    // still lose would leave the rows after `at` in no range
    tx.batch_execute("SET LOCAL synchronous_commit = on")
        .await
        .ctx(what)?;
    // range numbers of a target are handed out one split at a time
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('rekey.split'), hashtext($1::text))",
        &[&job_id.to_string()],
    )
    .await
    .ctx(what)?;
    let Some(held) = tx
        .query_opt(
            "SELECT upper_key, table_name FROM rekey.progress
              WHERE job_id = $1 AND target = $2 AND range_no = $3 AND owner = $4 AND lease_gen = $5 AND NOT done
                AND upper_key IS NOT DISTINCT FROM $6
                FOR UPDATE",
            &[&job_id, &target, &state.range_no, &owner, &generation, &upper],
        )
        .await
        .ctx(what)?
    else {
        return Ok(None);
    };
    let upper: Option<KeyBytes> = held.get(0);
    let table: String = held.get(1);
    let range_no: i32 = tx
        .query_one(
            "SELECT coalesce(max(range_no), 0) + 1 FROM rekey.progress WHERE job_id = $1 AND target = $2",
            &[&job_id, &target],
        )
        .await
        .ctx(what)?
        .get(0);
    tx.execute(
        "UPDATE rekey.progress SET upper_key = $4, updated_at = now() WHERE job_id = $1 AND target = $2 AND range_no = $3",
        &[&job_id, &target, &state.range_no, at],
    )
    .await
    .ctx(what)?;
    tx.execute(
        "INSERT INTO rekey.progress (job_id, target, range_no, table_name, lower_key, upper_key) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&job_id, &target, &range_no, &table, at, &upper],
    )
    .await
    .ctx(what)?;
    tx.commit().await.ctx(what)?;
    Ok(Some(RangeState {
        target: state.target,
        range_no,
        bounds: KeyRange {
            lower: Some(at.clone()),
            upper,
        },
        last: None,
        done: false,
    }))
}

/// Asks the owner of a range another process holds to split it, for a lane
/// of `owner` that found nothing to claim: the range that has read the
/// fewest rows (the most likely to have the most left), skipping one a
/// batch is writing now (asked again at the next look); none while a
/// request is still open.
pub async fn ask_for_split(client: &Client, job_id: i64, owner: &str) -> Result<u64, Error> {
    client
        .execute(
            "UPDATE rekey.progress p SET split_wanted = true
               FROM (SELECT target, range_no FROM rekey.progress
                      WHERE job_id = $1 AND range_no >= 0 AND NOT done AND owner IS NOT NULL AND owner <> $2 AND NOT split_wanted
                      ORDER BY rows_scanned LIMIT 1 FOR UPDATE SKIP LOCKED) pick
              WHERE p.job_id = $1 AND p.target = pick.target AND p.range_no = pick.range_no
                -- one request at a time: a range asked and not split yet is enough
                AND NOT EXISTS (SELECT 1 FROM rekey.progress w WHERE w.job_id = $1 AND w.split_wanted AND NOT w.done)",
            &[&job_id, &owner],
        )
        .await
        .ctx(|| format!("asking for a range of job {job_id} to be split"))
}
