//! The conflict pass at the end of a rewrite: rows the application changed
//! between a batch's read and its write are re-read and rewritten, until
//! none remain or the rounds run out.

use std::collections::BTreeMap;

use crate::db::Database;
use crate::engine::pipeline::{Mode, Outcome};
use crate::engine::sink::{Batch, Commit, Writer, Written};
use crate::engine::source::Source;
use crate::Error;

use super::stages::on_pool;
use super::work::Shared;

/// Rounds of conflict re-reads before the run reports rows still changing.
pub(super) const RETRY_ROUNDS: u32 = 10;
/// Keys re-read per batch.
pub(super) const RETRY_BATCH: i64 = 1000;

/// Re-reads rows the application changed under a batch, until none remain
/// or [`RETRY_ROUNDS`] rounds have passed; returns the outcome and how many
/// keys are still waiting.
pub(super) async fn retry_conflicts(db: &Database, shared: &Shared, job_id: i64) -> Result<(Outcome, u64), Error> {
    let mut outcome = Outcome::default();
    let admin = db.connect().await?;
    // processes sharing the job take turns: the next finds what the first left
    admin
        .execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[&format!("rekey.conflicts:{job_id}")])
        .await
        .map_err(|e| Error::Db { context: "waiting for another process's conflict re-reads".into(), source: e })?;
    let mut reader = None;
    let mut writer = None;
    'rounds: for round in 0..RETRY_ROUNDS {
        let mut any = false;
        for target in &shared.job.targets {
            loop {
                let keys = crate::state::pending_conflicts(&admin, job_id, target.index, RETRY_BATCH).await?;
                if keys.is_empty() {
                    break;
                }
                any = true;
                // throttles and live control hold re-reads too; a stop leaves
                // the keys in rekey.conflicts for the next run
                if !shared.hold.wait(&shared.stop).await {
                    break 'rounds;
                }
                if let Some(pace) = &shared.pace {
                    pace.wait(keys.len()).await;
                }
                if reader.is_none() {
                    reader = Some(Source::connect(db, false, shared.timeouts).await?);
                    writer = Some(Writer::connect_as(db, &shared.job, job_id, None, shared.timeouts).await?);
                }
                let (Some(source), Some(sink)) = (reader.as_mut(), writer.as_mut()) else { break };
                let rows = source.rows_by_keys(target, &keys).await?;
                let batch = Batch { range_index: 0, rows, cells: Vec::new(), last_key: None, end: false, lease: None };
                let batch = on_pool(shared.job.clone(), target.index, Mode::Rewrite { job_id }, batch).await?;
                let Written { counts, failures, .. } = sink.write(target, Commit::Retry(&keys), &batch).await?;
                shared.note_quarantined(&failures);
                shared.live.add(&counts);
                outcome.merge(Outcome { counts, failures, by_target: BTreeMap::from([(target.index, counts)]), ..Outcome::default() });
                if counts.conflicts > 0 {
                    // still changing: give the application's transactions time before the next round
                    break;
                }
            }
        }
        if !any {
            return Ok((outcome, 0));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50 * u64::from(round + 1))).await;
    }
    let left: i64 = admin
        .query_one("SELECT count(*) FROM rekey.conflicts WHERE job_id = $1", &[&job_id])
        .await
        .map_err(|e| Error::Db { context: "counting conflicts left".into(), source: e })?
        .get(0);
    Ok((outcome, left as u64))
}
