//! The engine's entry for a rewrite: join the job (resuming an unfinished
//! one), refuse what would spend a key's nonces, plan ranges for a new job,
//! run the pipeline while the rows left are found for the progress total
//! ([`super::left`]), and add up what every process sharing the job did.

use std::sync::Arc;

use tokio_postgres::{Client, GenericClient};

use crate::db::idle::keeping_alive;
use crate::db::raw::params;
use crate::db::session::Timeouts;
use crate::db::Database;
use crate::engine::left::{counted_beside, rows_estimate};
use crate::engine::pipeline::{self, Mode, Outcome, Settings};
use crate::engine::{behind, held, uses};
use crate::engine::{plan, sql};
use crate::error::DbContext;
use crate::job::{Job, Target};
use crate::observe::counts::LiveCounts;
use crate::observe::progress::Progress;
use crate::state::{self, JobRecord};
use crate::Error;

/// How a rewrite starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunControl {
    /// Abandon an unfinished job of this name and start a new one.
    pub restart: bool,
    /// No progress line.
    pub quiet: bool,
}

/// Rewrites every stale value of `job` under its job lock, resuming an
/// unfinished job of the same name; stops cleanly when `settings.stop` is
/// triggered. `opened` is called once the job is joined or made, before
/// any value is written (the caller's audit event names the job).
pub async fn rewrite(
    db: &Database,
    client: &mut Client,
    job: &Arc<Job>,
    settings: Settings,
    control: RunControl,
    live: Arc<LiveCounts>,
    opened: impl AsyncFnOnce(&Client, &JobRecord) -> Result<(), Error>,
) -> Result<(Outcome, JobRecord), Error> {
    let RunControl { restart, quiet } = control;
    state::ensure_schema(client).await?;
    state::lock_job(client, &job.name, restart).await?;
    check_nonce_budget(client, job).await?;
    let lanes = settings.lanes;
    let mut record = state::open_job(client, job, restart, async |c: &Client| {
        plan::job_ranges(c, job, lanes).await
    })
    .await?;
    if restart {
        state::share_job_lock(client, &job.name).await?;
    }
    // before the first write (and the run's audit event): the keyring files
    // record this database's use
    uses::starting(client, job).await?;
    opened(client, &record).await?;
    let progress = Progress::estimated(rows_estimate(client, job).await?, "rewriting", quiet);
    let total = progress.total();
    let ranges = std::mem::take(&mut record.ranges);
    let stop = settings.stop.clone();
    let mut watches = held::watches(job);
    let every = held::every(settings.signals.check_every);
    let run = pipeline::run(
        db,
        job.clone(),
        ranges,
        Mode::Rewrite { job_id: record.id },
        settings,
        live,
        progress,
    );
    let mut put_back = Vec::new();
    let run = held::watching(&mut watches, every, &stop, &mut put_back, run);
    // this session holds the job's lock while the pipeline's sessions work
    let ran = keeping_alive(client, counted_beside(db, job, &total, run)).await;
    let mut outcome = said_with(ran.and_then(|r| r), &put_back)?;
    // an error from here on says the keys put back too
    let finished = async {
        if client.is_closed() {
            // this session was lost during the run (a restart, the network): the work is committed, carry on,
            // without the statement timeout of the run's batches: the recount below reads whole tables;
            // and join the job again, so that no restart abandons it before it is finished
            *client = db.with_session(&Timeouts::read_only()).connect().await?;
            state::lock_job(client, &job.name, false).await?;
            outcome.session_reopened = true;
        }
        // every value written is under a key its store still holds, or the run fails
        // (a store may take long to open: a key table through KMS; the session idles meanwhile)
        keeping_alive(client, held::look(&mut watches, true, &mut put_back)).await?;
        // partitions attached during the run are the job's too (a retire reads the record)
        state::jobs::record_parts(client, record.id, job).await?;
        if !outcome.stopped {
            // what would hide rows from the recount hid them from the run:
            // its ranges, all done, would let a resume pass the rows over, so
            // the job is given up and the next run starts over
            let began = state::jobs::began_on(client, record.id)
                .await?
                .into_iter()
                .map(|(t, b)| (t, (b.oid, b.update_triggers)))
                .collect::<std::collections::HashMap<_, _>>();
            let keys_hidden = !job.targets.iter().all(super::left::shows_rotated);
            if let Err(e) = crate::job::visibility::still_sees_every_row(
                client,
                &job.targets,
                &began,
                keys_hidden,
            )
            .await
            {
                state::jobs::abandon(client, record.id).await?;
                return Err(e);
            }
            outcome.behind = behind::rows_behind(client, job, record.id).await?;
        }
        // what every process sharing the job has done, not only this one
        record.prior = state::job_totals(client, record.id).await?;
        let everything_on_target = !outcome.stopped
            && outcome.behind.is_empty()
            && outcome.conflicts_left == 0
            && record.prior.values_not_rotated == 0
            && record.prior.values_failed == 0;
        if everything_on_target {
            uses::finished(client, job).await?;
        }
        Ok(())
    }
    .await;
    said_with(finished, &put_back)?;
    outcome.keys_put_back = put_back;
    Ok((outcome, record))
}

/// `result`, its error saying the keys put back into their stores before
/// it: a run that fails writes no summary, and the store was written.
fn said_with<T>(result: Result<T, Error>, put_back: &[held::PutBack]) -> Result<T, Error> {
    let done = || held::PutBack::before_failing(put_back);
    match result {
        // a lost connection is said with them too (it carries no context of its own)
        Err(Error::Connect(e)) if !put_back.is_empty() => {
            Err(Error::Runtime(Error::Connect(e).chain()).after(&done()))
        }
        Err(e) if !put_back.is_empty() => Err(e.after(&done())),
        other => other,
    }
}

/// Rows of `t` holding at least one value not visibly on the target key.
pub(super) async fn stale_rows_of(client: &impl GenericClient, t: &Target) -> Result<u64, Error> {
    let (filter, cols) = sql::stale_filter(t, "", 1);
    let prefixes: Vec<Vec<u8>> = cols.iter().filter_map(|&c| t.stale_prefix(c)).collect();
    let n: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE {filter}{}",
                t.qualified(),
                sql::target_filter(t)
            ),
            &params(&prefixes),
        )
        .await
        .ctx(|| format!("counting rows to rotate in {}", t.table))?
        .get(0);
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Rows holding at least one value not visibly on the target key, all targets.
pub async fn stale_rows(client: &impl GenericClient, job: &Job) -> Result<u64, Error> {
    let mut total = 0u64;
    for t in &job.targets {
        total += stale_rows_of(client, t).await?;
    }
    Ok(total)
}

/// Refuses a run that would take a key past 2^32 random-nonce encryptions
/// (README, Guarantees: the nonce budget), before any write; the sink
/// enforces it per batch too. Targets sealing under the same key are summed.
async fn check_nonce_budget(client: &Client, job: &Job) -> Result<(), Error> {
    let mut by_key: std::collections::BTreeMap<String, Vec<&Target>> = Default::default();
    for t in job
        .targets
        .iter()
        .filter(|t| t.write.format.random_nonces())
    {
        by_key
            .entry(t.write.keyring.target().fingerprint())
            .or_default()
            .push(t);
    }
    for (fingerprint, targets) in by_key {
        let used = state::encryptions_so_far(client, &fingerprint).await?;
        // far from the budget, the catalogue's size (four times over) settles
        // it without counting the tables; a table never analyzed, or
        // analyzed empty, is counted
        let mut estimated = 0.0;
        for t in &targets {
            match plan::current_rows_estimate(client, t).await? {
                Some(rows) if rows >= 1.0 => estimated += rows * t.columns.len() as f64,
                _ => {
                    estimated = f64::INFINITY;
                    break;
                }
            }
        }
        if used as f64 + 4.0 * estimated <= state::NONCE_BUDGET as f64 {
            continue;
        }
        let mut most = used;
        for t in &targets {
            let rows = i64::try_from(stale_rows_of(client, t).await?).unwrap_or(i64::MAX);
            most = most.saturating_add(rows.saturating_mul(t.columns.len() as i64));
        }
        if most > state::NONCE_BUDGET {
            return Err(crate::engine::sink::nonce_budget_spent(
                targets[0],
                used,
                "this run (nothing written)",
            ));
        }
    }
    Ok(())
}
