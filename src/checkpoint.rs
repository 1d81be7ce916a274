//! The engine's own state: schema `rekey`, jobs, and per-range progress.
//!
//! A batch's checkpoint is written by the sink inside the batch's own
//! transaction ([`record_batch`]), so what is committed and what the
//! checkpoint says can never disagree: a run killed at any instant resumes
//! after the last committed batch.

use tokio_postgres::{Client, GenericClient};

use crate::error::DbContext;
use crate::job::Job;
use crate::plan::{self, KeyBytes, KeyRange};
use crate::stats::Counts;
use crate::Error;

/// The engine schema's migrations, in order. Never edit a released one.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../sql/001_engine_state.sql")),
    (2, include_str!("../sql/002_conflicts.sql")),
    (3, include_str!("../sql/003_rotations.sql")),
    (4, include_str!("../sql/004_rotation_fingerprint.sql")),
    (5, include_str!("../sql/005_leases_control_key_usage.sql")),
];

/// The `range_no` under which conflict re-reads are counted.
pub const RETRY_RANGE: i32 = -1;

/// Creates or upgrades schema `rekey`. Safe to run from several processes at once.
pub async fn ensure_schema(client: &mut Client) -> Result<(), Error> {
    let what = || "creating rekey's engine schema (needs CREATE on the database, or create schema rekey for this role)".to_string();
    let tx = client.transaction().await.ctx(what)?;
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(hashtext('rekey.schema'));
         CREATE SCHEMA IF NOT EXISTS rekey;
         CREATE TABLE IF NOT EXISTS rekey.schema_version (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());",
    )
    .await
    .ctx(what)?;
    let current: i32 = tx.query_one("SELECT coalesce(max(version), 0) FROM rekey.schema_version", &[]).await.ctx(what)?.get(0);
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql).await.ctx(|| format!("applying engine schema migration {version}"))?;
        tx.execute("INSERT INTO rekey.schema_version (version) VALUES ($1)", &[version]).await.ctx(what)?;
    }
    tx.commit().await.ctx(what)
}

/// Whether schema `rekey` exists yet (read-only commands do not create it).
pub async fn schema_exists(client: &Client) -> Result<bool, Error> {
    Ok(client
        .query_one("SELECT to_regclass('rekey.progress') IS NOT NULL", &[])
        .await
        .ctx(|| "looking for rekey's engine schema".into())?
        .get(0))
}

/// Where one range of one target stands.
#[derive(Debug, Clone)]
pub struct RangeState {
    /// The target's index in the job.
    pub target: usize,
    /// The range's number within its target.
    pub range_no: i32,
    /// The range's bounds.
    pub range: KeyRange,
    /// Last key committed, if any.
    pub last: Option<KeyBytes>,
    /// Whether the range is finished.
    pub done: bool,
}

impl RangeState {
    /// Where reading continues: after the last committed key, else after the range's lower bound.
    pub fn start(&self) -> Option<&KeyBytes> {
        self.last.as_ref().or(self.range.lower.as_ref())
    }
}

/// A job row opened for running: new, or an unfinished one resumed.
#[derive(Debug)]
pub struct JobRecord {
    /// `rekey.jobs.job_id`.
    pub id: i64,
    /// Whether an unfinished job was picked up.
    pub resumed: bool,
    /// Every range, finished or not.
    pub ranges: Vec<RangeState>,
    /// What earlier runs of this job already did; after `commands::rewrite`,
    /// what every run of every process has done, this one included.
    pub prior: Counts,
}

/// How long to wait for a session-level advisory lock: a process that was
/// just killed leaves its server session (and the lock) alive until the
/// server notices the closed connection, a moment later.
const LOCK_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Takes the advisory lock named `name` for `client`'s session, retrying for
/// [`LOCK_GRACE`]; false if another session still holds it then.
pub async fn advisory_lock(client: &Client, name: &str) -> Result<bool, Error> {
    lock_within_grace(client, name, false).await
}

/// [`advisory_lock`], shared (`pg_try_advisory_lock_shared`) or exclusive.
async fn lock_within_grace(client: &Client, name: &str, shared: bool) -> Result<bool, Error> {
    let sql = if shared { "SELECT pg_try_advisory_lock_shared(hashtextextended($1, 0))" } else { "SELECT pg_try_advisory_lock(hashtextextended($1, 0))" };
    let deadline = std::time::Instant::now() + LOCK_GRACE;
    loop {
        let got: bool = client.query_one(sql, &[&name]).await.ctx(|| format!("taking the lock {name:?}"))?.get(0);
        if got || std::time::Instant::now() >= deadline {
            return Ok(got);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Joins the job on `client`'s session: any number of `rekey run` processes
/// share a job (they lease its ranges), while `--restart` needs it to
/// itself. The lock lasts as long as the session.
pub async fn lock_job(client: &Client, name: &str, restart: bool) -> Result<(), Error> {
    if lock_within_grace(client, &format!("rekey.job:{name}"), !restart).await? {
        return Ok(());
    }
    Err(Error::Runtime(if restart {
        format!("job {name:?} is being run by other rekey processes on this database; stop them first (`rekey stop --job ...`), then restart")
    } else {
        format!("job {name:?} is being restarted by another rekey process; wait for it, then run again")
    }))
}

/// Turns a `--restart`'s exclusive job lock into a shared one, so other
/// processes can join the new job.
pub async fn share_job_lock(client: &Client, name: &str) -> Result<(), Error> {
    let lock = format!("rekey.job:{name}");
    client
        .execute("SELECT pg_advisory_lock_shared(hashtextextended($1, 0)), pg_advisory_unlock(hashtextextended($1, 0))", &[&lock])
        .await
        .ctx(|| format!("sharing job {name:?}"))?;
    Ok(())
}

/// Opens the job: resumes the unfinished job of this name when its spec and
/// keys match, refuses when they do not, else plans ranges and starts a new one.
pub async fn open_job(client: &mut Client, job: &Job, lanes: usize, restart: bool) -> Result<JobRecord, Error> {
    // Processes starting together must agree on one job row: the first plans
    // it, the others resume it.
    let lock = format!("rekey.open:{}", job.name);
    client.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[&lock]).await.ctx(|| format!("opening job {:?}", job.name))?;
    let opened = open_job_locked(client, job, lanes, restart).await;
    let unlocked = client.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", &[&lock]).await.ctx(|| format!("opening job {:?}", job.name));
    let opened = opened?;
    unlocked?;
    Ok(opened)
}

async fn open_job_locked(client: &mut Client, job: &Job, lanes: usize, restart: bool) -> Result<JobRecord, Error> {
    let keys = job.describe_keys();
    let what = || format!("opening job {:?}", job.name);
    if let Some(row) = client
        .query_opt("SELECT job_id, spec_hash, keys FROM rekey.jobs WHERE name = $1 AND state = 'running'", &[&job.name])
        .await
        .ctx(what)?
    {
        let (id, hash, old_keys): (i64, String, serde_json::Value) = (row.get(0), row.get(1), row.get(2));
        if restart {
            client.execute("UPDATE rekey.jobs SET state = 'abandoned', updated_at = now() WHERE job_id = $1", &[&id]).await.ctx(what)?;
        } else if hash != job.spec_hash {
            return Err(Error::Config(format!(
                "job {:?} (id {id}) is unfinished and was started from a different job file; finish it with the original file, \
                 or start over with `rekey run --restart` (values already rotated stay rotated)",
                job.name
            )));
        } else if old_keys != keys {
            return Err(Error::Config(format!(
                "job {:?} (id {id}) is unfinished and was started with a different key set (ids or fingerprints differ: \
                 was {old_keys}, now {keys}); restore the original keys to finish it, or start over with `rekey run --restart`",
                job.name
            )));
        } else {
            // a stop asked of the last run is spent; a pause still holds
            // (unless processes are still stopping: a process started meanwhile must stop too)
            client
                .execute(
                    "UPDATE rekey.jobs SET control = 'run' WHERE job_id = $1 AND control = 'stop'
                        AND NOT EXISTS (SELECT 1 FROM rekey.progress WHERE job_id = $1 AND NOT done AND owner IS NOT NULL AND lease_until > now())",
                    &[&id],
                )
                .await
                .ctx(what)?;
            let (ranges, prior) = load_ranges(client, id, job.targets.len()).await?;
            return Ok(JobRecord { id, resumed: true, ranges, prior });
        }
    }

    let mut planned = Vec::new();
    for target in &job.targets {
        for (no, range) in plan::split_ranges(client, target, lanes * 4).await?.into_iter().enumerate() {
            planned.push(RangeState { target: target.index, range_no: no as i32, range, last: None, done: false });
        }
    }
    let tx = client.transaction().await.ctx(what)?;
    let id: i64 = tx
        .query_one(
            "INSERT INTO rekey.jobs (name, spec_hash, keys, state) VALUES ($1, $2, $3, 'running') RETURNING job_id",
            &[&job.name, &job.spec_hash, &keys],
        )
        .await
        .ctx(what)?
        .get(0);
    let insert = tx
        .prepare("INSERT INTO rekey.progress (job_id, target, range_no, table_name, lower_key, upper_key) VALUES ($1, $2, $3, $4, $5, $6)")
        .await
        .ctx(what)?;
    for r in &planned {
        let table = job.targets[r.target].table.to_string();
        tx.execute(&insert, &[&id, &(r.target as i32), &r.range_no, &table, &r.range.lower, &r.range.upper]).await.ctx(what)?;
    }
    tx.commit().await.ctx(what)?;
    Ok(JobRecord { id, resumed: false, ranges: planned, prior: Counts::default() })
}

async fn load_ranges(client: &Client, job_id: i64, targets: usize) -> Result<(Vec<RangeState>, Counts), Error> {
    let rows = client
        .query(
            "SELECT target, range_no, lower_key, upper_key, last_key, done, rows_scanned, rows_rewritten,
                    values_rewritten, values_skipped, values_failed, conflicts
               FROM rekey.progress WHERE job_id = $1 ORDER BY target, range_no",
            &[&job_id],
        )
        .await
        .ctx(|| format!("loading the progress of job {job_id}"))?;
    let mut prior = Counts::default();
    let mut ranges = Vec::new();
    for r in &rows {
        prior += counts_from(r, 6);
        let range_no: i32 = r.get(1);
        if range_no == RETRY_RANGE {
            continue;
        }
        let target = usize::try_from(r.get::<_, i32>(0)).ok().filter(|t| *t < targets).ok_or_else(|| {
            Error::Runtime(format!("rekey.progress of job {job_id} names a target this job does not have; the engine state was edited by hand"))
        })?;
        ranges.push(RangeState {
            target,
            range_no,
            range: KeyRange { lower: r.get(2), upper: r.get(3) },
            last: r.get(4),
            done: r.get(5),
        });
    }
    Ok((ranges, prior))
}

fn counts_from(r: &tokio_postgres::Row, first: usize) -> Counts {
    let g = |i: usize| r.get::<_, i64>(first + i) as u64;
    Counts {
        rows_scanned: g(0),
        rows_rewritten: g(1),
        values_rewritten: g(2),
        values_skipped: g(3),
        values_failed: g(4),
        conflicts: g(5),
    }
}

/// The six counters, in `rekey.progress` column order, as bigint parameters.
fn as_params(c: &Counts) -> [i64; 6] {
    [c.rows_scanned, c.rows_rewritten, c.values_rewritten, c.values_skipped, c.values_failed, c.conflicts].map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// A range's lease as a lane holds it: the owner's name and the claim's generation.
#[derive(Debug, Clone, Copy)]
pub struct Lease<'a> {
    /// This process's name in `rekey.progress.owner`.
    pub owner: &'a str,
    /// `rekey.progress.lease_gen` as the claim left it.
    pub generation: i64,
}

/// Records a committed batch inside its own transaction, if the range is
/// still held under `lease` (`None`: ranges are not leased); returns the
/// job's `control` ("run", "pause", "stop"), or `None` when the lease was
/// lost (the caller must roll back).
pub async fn record_batch(
    tx: &impl GenericClient,
    job_id: i64,
    state: &RangeState,
    lease: Option<Lease<'_>>,
    last: Option<&KeyBytes>,
    done: bool,
    c: &Counts,
) -> Result<Option<String>, tokio_postgres::Error> {
    let v = as_params(c);
    let owner = lease.map(|l| l.owner);
    let generation = lease.map(|l| l.generation);
    let row = tx
        .query_opt(
            "UPDATE rekey.progress SET last_key = coalesce($4, last_key), done = $5,
                    rows_scanned = rows_scanned + $6, rows_rewritten = rows_rewritten + $7,
                    values_rewritten = values_rewritten + $8, values_skipped = values_skipped + $9,
                    values_failed = values_failed + $10, conflicts = conflicts + $11, updated_at = now()
              WHERE job_id = $1 AND target = $2 AND range_no = $3
                AND owner IS NOT DISTINCT FROM $12 AND ($13::bigint IS NULL OR lease_gen = $13)
             RETURNING (SELECT control FROM rekey.jobs WHERE job_id = $1)",
            &[&job_id, &(state.target as i32), &state.range_no, &last, &done, &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &owner, &generation],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

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
        let state = RangeState { target, range_no: r.get(1), range: KeyRange { lower: r.get(2), upper: r.get(3) }, last: r.get(4), done: false };
        let previous: Option<String> = r.get(5);
        return Ok(Claim::Leased { state, generation: r.get(6), from: previous.filter(|p| p != owner) });
    }
    let left: i64 = client
        .query_one("SELECT count(*) FROM rekey.progress WHERE job_id = $1 AND range_no >= 0 AND NOT done", &[&job_id])
        .await
        .ctx(what)?
        .get(0);
    Ok(if left == 0 { Claim::Finished } else { Claim::Busy })
}

/// Extends the leases of the ranges `owner`'s lanes are working on (and
/// records the pid of its home session, which changes after a reconnect);
/// a range it owns but no lane works lapses, for whoever comes next.
pub async fn heartbeat(client: &Client, job_id: i64, owner: &str, ttl: std::time::Duration, working: &[(i32, i32)]) -> Result<u64, Error> {
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

/// The job's live control: "run", "pause" or "stop".
pub async fn job_control(client: &Client, job_id: i64) -> Result<String, Error> {
    Ok(client
        .query_one("SELECT control FROM rekey.jobs WHERE job_id = $1", &[&job_id])
        .await
        .ctx(|| format!("reading the control of job {job_id}"))?
        .get(0))
}

/// Sets the control of the running job named `name` (`rekey pause|resume|stop`);
/// false when no job of that name is running.
pub async fn set_control(client: &Client, name: &str, control: &str) -> Result<bool, Error> {
    Ok(client
        .execute("UPDATE rekey.jobs SET control = $2, updated_at = now() WHERE name = $1 AND state = 'running'", &[&name, &control])
        .await
        .ctx(|| format!("setting job {name:?} to {control}"))?
        > 0)
}

/// Most values one key may encrypt with random 96-bit nonces (NIST SP 800-38D, 8.3).
pub const NONCE_BUDGET: i64 = 1 << 32;

/// Adds `n` random-nonce encryptions under the key with `fingerprint`,
/// inside a batch's transaction; returns the key's new total.
pub async fn count_encryptions(tx: &impl GenericClient, fingerprint: &str, label: &str, n: i64) -> Result<i64, tokio_postgres::Error> {
    Ok(tx
        .query_one(
            "INSERT INTO rekey.key_usage AS u (fingerprint, key_label, encryptions) VALUES ($1, $2, $3)
             ON CONFLICT (fingerprint) DO UPDATE SET encryptions = u.encryptions + EXCLUDED.encryptions, updated_at = now()
             RETURNING encryptions",
            &[&fingerprint, &label, &n],
        )
        .await?
        .get(0))
}

/// Random-nonce encryptions rekey has made under the key with `fingerprint`.
pub async fn encryptions_so_far(client: &Client, fingerprint: &str) -> Result<i64, Error> {
    Ok(client
        .query_opt("SELECT encryptions FROM rekey.key_usage WHERE fingerprint = $1", &[&fingerprint])
        .await
        .ctx(|| "reading how many values the target key has encrypted".into())?
        .map_or(0, |r| r.get(0)))
}

/// Counts a batch of conflict re-reads, inside its own transaction.
pub async fn record_retry(tx: &impl GenericClient, job_id: i64, target: usize, table: &str, c: &Counts) -> Result<(), tokio_postgres::Error> {
    let v = as_params(c);
    tx.execute(
        "INSERT INTO rekey.progress AS p (job_id, target, range_no, table_name, done, rows_scanned, rows_rewritten,
                values_rewritten, values_skipped, values_failed, conflicts)
         VALUES ($1, $2, $3, $4, true, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (job_id, target, range_no) DO UPDATE SET
                rows_scanned = p.rows_scanned + EXCLUDED.rows_scanned, rows_rewritten = p.rows_rewritten + EXCLUDED.rows_rewritten,
                values_rewritten = p.values_rewritten + EXCLUDED.values_rewritten, values_skipped = p.values_skipped + EXCLUDED.values_skipped,
                values_failed = p.values_failed + EXCLUDED.values_failed, conflicts = p.conflicts + EXCLUDED.conflicts, updated_at = now()",
        &[&job_id, &(target as i32), &RETRY_RANGE, &table, &v[0], &v[1], &v[2], &v[3], &v[4], &v[5]],
    )
    .await
    .map(|_| ())
}

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

/// What every run of every process did for the job, from `rekey.progress`.
pub async fn job_totals(client: &Client, job_id: i64) -> Result<Counts, Error> {
    let row = client
        .query_one(
            "SELECT coalesce(sum(rows_scanned), 0)::bigint, coalesce(sum(rows_rewritten), 0)::bigint, coalesce(sum(values_rewritten), 0)::bigint,
                    coalesce(sum(values_skipped), 0)::bigint, coalesce(sum(values_failed), 0)::bigint, coalesce(sum(conflicts), 0)::bigint
               FROM rekey.progress WHERE job_id = $1",
            &[&job_id],
        )
        .await
        .ctx(|| format!("adding up the totals of job {job_id}"))?;
    Ok(counts_from(&row, 0))
}

/// Marks the job finished with its totals, if it is: every range done, and
/// still the running job of its name. The UPDATE commits synchronously, so
/// every batch committed before it is durable with it.
pub async fn finish_job(client: &Client, job_id: i64, summary: &serde_json::Value) -> Result<(), Error> {
    let what = || format!("finishing job {job_id}");
    let finished = client
        .execute(
            "UPDATE rekey.jobs SET state = 'done', finished_at = now(), updated_at = now(), summary = $2
              WHERE job_id = $1 AND state = 'running'
                AND NOT EXISTS (SELECT 1 FROM rekey.progress WHERE job_id = $1 AND range_no >= 0 AND NOT done)",
            &[&job_id, summary],
        )
        .await
        .ctx(what)?;
    if finished == 1 {
        return Ok(());
    }
    let row = client
        .query_one(
            "SELECT state, (SELECT count(*) FROM rekey.progress WHERE job_id = $1 AND range_no >= 0 AND NOT done) FROM rekey.jobs WHERE job_id = $1",
            &[&job_id],
        )
        .await
        .ctx(what)?;
    let (state, open): (String, i64) = (row.get(0), row.get(1));
    if state == "done" {
        // another process sharing the job finished it first
        return Ok(());
    }
    Err(Error::Runtime(if state != "running" {
        format!("job {job_id} is {state} now (another process restarted or finished it); this process's batches are committed, nothing more to do here")
    } else {
        format!(
            "job {job_id} still has {open} unfinished range(s): the server lost commits (a crash), or another process still works them; \
             run the same command again to finish it"
        )
    }))
}

/// A job as `rekey status` shows it.
#[derive(Debug, serde::Serialize)]
pub struct JobStatus {
    /// Job id.
    pub job_id: i64,
    /// Job name.
    pub name: String,
    /// running, done or abandoned.
    pub state: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// Last checkpoint (RFC 3339).
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
    /// Live control: run, pause or stop.
    pub control: String,
    /// Processes holding leases on unfinished ranges now.
    pub workers: Vec<String>,
}

/// The latest job of this name, from the database alone.
pub async fn job_status(client: &Client, name: &str) -> Result<Option<JobStatus>, Error> {
    let what = || format!("reading the status of job {name:?}");
    let Some(j) = client
        .query_opt(
            "SELECT job_id, state, to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    (SELECT count(*) FROM rekey.quarantine q WHERE q.job_id = j.job_id), control,
                    (SELECT coalesce(array_agg(DISTINCT p.owner ORDER BY p.owner), '{}') FROM rekey.progress p
                      WHERE p.job_id = j.job_id AND NOT p.done AND p.owner IS NOT NULL AND p.lease_until > now())
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
            "SELECT count(*) FILTER (WHERE done AND range_no >= 0), count(*) FILTER (WHERE range_no >= 0), coalesce(sum(rows_scanned), 0)::bigint,
                    coalesce(sum(rows_rewritten), 0)::bigint, coalesce(sum(values_rewritten), 0)::bigint,
                    coalesce(sum(values_skipped), 0)::bigint, coalesce(sum(values_failed), 0)::bigint,
                    coalesce(sum(conflicts), 0)::bigint
               FROM rekey.progress WHERE job_id = $1",
            &[&id],
        )
        .await
        .ctx(what)?;
    Ok(Some(JobStatus {
        job_id: id,
        name: name.to_string(),
        state: j.get(1),
        started_at: j.get(2),
        updated_at: j.get(3),
        finished_at: j.get(4),
        ranges_done: p.get(0),
        ranges_total: p.get(1),
        counts: counts_from(&p, 2),
        quarantined: j.get(5),
        control: j.get(6),
        workers: j.get(7),
    }))
}
