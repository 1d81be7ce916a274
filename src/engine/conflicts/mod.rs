//! The conflict pass at the end of a rewrite: rows the application changed
//! between a batch's read and its write are re-read and rewritten, until
//! none remain or the rounds run out. The progress line shows the pass as
//! a phase of its own: the rows re-read against the rows waiting.

use std::collections::BTreeMap;

use crate::db::{Database, KeyBytes, Page};
use crate::engine::pipeline::{Mode, Outcome};
use crate::engine::sink::{Batch, Commit, Failure, Writer};
use crate::engine::source::Source;
use crate::engine::transform::Cells;
use crate::error::Retry;
use crate::job::Target;
use crate::observe::counts::Counts;
use crate::observe::events;
use crate::Error;

mod turn;

use super::stages::on_pool;
use super::work::{backoff, Shared};
use turn::Turn;

/// Rounds of conflict re-reads before the run reports rows still changing.
pub(super) const RETRY_ROUNDS: u32 = 10;
/// Tries of one locked row in the conflict pass before it is not rotated.
const LOCKED_RETRIES: u32 = 2;
/// Keys re-read per batch.
pub(super) const RETRY_BATCH: i64 = 1000;

/// Re-reads rows the application changed under a batch, until none remain
/// or [`RETRY_ROUNDS`] rounds have passed; returns the outcome and how many
/// keys are still waiting.
pub(super) async fn retry_conflicts(
    db: &Database,
    shared: &Shared,
    job_id: i64,
) -> Result<(Outcome, u64), Error> {
    let mut outcome = Outcome::default();
    // processes sharing the job take turns: the next finds what the first left
    let mut turn = Turn::first(db, job_id).await?;
    let mut reader = None;
    let mut writer = None;
    // rows re-read so far: the progress line counts the pass as a phase of its own
    let mut reread_rows = 0;
    'rounds: for round in 0..RETRY_ROUNDS {
        let waiting = turn.waiting(shared).await?;
        if waiting == 0 {
            return Ok((outcome, 0));
        }
        match round {
            0 => shared.progress.begin_phase(PHASE, waiting),
            _ => shared.progress.set_phase_total(reread_rows + waiting),
        }
        for target in &shared.job.targets {
            // failed tries of the keys being re-read
            let mut failed = 0;
            loop {
                let keys = turn.pending(shared, target.index, RETRY_BATCH).await?;
                if keys.is_empty() {
                    break;
                }
                // throttles and live control hold re-reads too; a stop leaves
                // the keys in rekey.conflicts for the next run
                if !turn.pinging(shared.hold.wait(&shared.stop)).await {
                    break 'rounds;
                }
                if let Some(pace) = &shared.pace {
                    if !turn.pinging(pace.wait(keys.len(), &shared.stop)).await {
                        break 'rounds;
                    }
                }
                let mut done = Reread::default();
                let tried = async {
                    // opened at the first re-read, and again after a lost connection
                    if reader.is_none() || writer.is_none() {
                        reader = Some(Source::connect(db, false, shared.timeouts).await?);
                        writer = Some(
                            Writer::connect_as(db, &shared.job, job_id, None, shared.timeouts)
                                .await?,
                        );
                    }
                    match (reader.as_mut(), writer.as_mut()) {
                        (Some(source), Some(sink)) => {
                            let keys = &keys;
                            let read =
                                reread(shared, source, sink, target, keys, job_id, &mut done);
                            turn.pinging(read).await
                        }
                        _ => Ok(()),
                    }
                }
                .await;
                // what committed counts, even where a later key failed
                let Reread {
                    counts,
                    failures,
                    changing,
                } = done;
                reread_rows += counts.rows_scanned;
                outcome.merge(Outcome {
                    counts,
                    failures,
                    by_target: BTreeMap::from([(target.index, counts)]),
                    ..Outcome::default()
                });
                match tried {
                    Ok(()) => failed = 0,
                    // a deadlock with the application, a serialization
                    // failure, a count's wait cut short, a lost connection:
                    // wait, then read the keys still listed again (a re-read
                    // whose COMMIT landed unseen left the list)
                    Err(e)
                        if matches!(e.retry(), Retry::Wait | Retry::Reconnect)
                            && failed + 1 < shared.attempts =>
                    {
                        failed += 1;
                        let wait = backoff(failed);
                        events::BatchRetried {
                            table: &target.table.to_string(),
                            attempt: failed,
                            error: &e.chain(),
                            rows: keys.len(),
                            wait_seconds: wait.as_secs_f64(),
                        }
                        .emit();
                        if e.retry() == Retry::Reconnect {
                            // both sessions opened afresh for the next try
                            (reader, writer) = (None, None);
                        }
                        if !turn.pinging(shared.stop.sleep(wait)).await {
                            break 'rounds;
                        }
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                if changing {
                    // still changing: give the application's transactions time before the next round
                    break;
                }
            }
        }
        let pause = std::time::Duration::from_millis(50 * u64::from(round + 1));
        turn.pinging(tokio::time::sleep(pause)).await;
    }
    let left = turn.waiting(shared).await?;
    Ok((outcome, left))
}

/// What one batch of re-reads did.
#[derive(Default)]
struct Reread {
    /// What it counted (rows scanned, values rewritten, conflicts, ...).
    counts: Counts,
    /// Values quarantined on the way.
    failures: Vec<Failure>,
    /// Whether rows changed under it again (the round ends for this target).
    changing: bool,
}

/// Re-reads and rewrites `keys` of `target` as one batch, or one key at a
/// time where the batch hit a locked row or a refusal, adding what
/// commits to `done` and to the live counts as it goes (a key that fails
/// leaves what the keys before it did counted). The two sessions sat idle
/// through the holds and the counts before it: one a server's
/// `idle_session_timeout` (or a proxy) closed meanwhile is reopened first.
async fn reread(
    shared: &Shared,
    source: &mut Source,
    sink: &mut Writer,
    target: &Target,
    keys: &[KeyBytes],
    job_id: i64,
    done: &mut Reread,
) -> Result<(), Error> {
    source.reopen_if_closed().await?;
    let rows = source.rows_by_keys(target, keys).await?;
    // another connection can see these committed before they are added below
    let _writing = shared.live.writing(rows.len() as u64);
    let written = async {
        let batch = sealed(shared, target, rows, job_id).await?;
        // the writer idled through the read (a query per key)
        sink.reopen_if_closed(&shared.job).await?;
        sink.count(target, &batch).await?;
        match sink.write(target, Commit::Retry(keys), &batch).await {
            Ok(w) => {
                done.add(shared, w.counts, w.failures);
                Ok(())
            }
            // a row locked elsewhere, or one the database refuses: one key at
            // a time, and one that stays locked or is refused again is not rotated
            Err(e) if matches!(e.retry(), Retry::Smaller | Retry::Refused) => {
                one_by_one(shared, source, sink, target, keys, job_id, done).await
            }
            Err(e) => Err(e),
        }
    }
    .await;
    shared.live.add(&done.counts);
    shared.progress.update(&shared.live.snapshot());
    written
}

impl Reread {
    /// Adds what one write committed; its quarantined values are noted,
    /// and rows that changed under it again end the round.
    fn add(&mut self, shared: &Shared, counts: Counts, failures: Vec<Failure>) {
        shared.note_quarantined(&failures);
        self.changing |= counts.conflicts > 0;
        self.counts += counts;
        self.failures.extend(failures);
    }
}

/// `rows` re-read from `target`, as a batch re-encrypted on the pool (no
/// range: a re-read's checkpoint is the conflict list).
async fn sealed(shared: &Shared, target: &Target, rows: Page, job_id: i64) -> Result<Batch, Error> {
    let batch = Batch {
        range_index: 0,
        rows,
        cells: Cells::default(),
        last_key: None,
        end: false,
        lease: None,
        upper: None,
        slot: None,
    };
    on_pool(
        shared.job.clone(),
        target.index,
        Mode::Rewrite { job_id },
        batch,
    )
    .await
}

/// What the progress line says while the pass runs.
const PHASE: &str = "re-reading changed rows";

/// Re-reads and rewrites `keys` one at a time, after a batch of them hit a
/// lock or statement timeout or a refusal: a row that times out twice more
/// is recorded as not rotated (`row_locked`), one the database refuses
/// again as `write_rejected` with its words, and either leaves the list.
async fn one_by_one(
    shared: &Shared,
    source: &mut Source,
    sink: &mut Writer,
    target: &Target,
    keys: &[KeyBytes],
    job_id: i64,
    done: &mut Reread,
) -> Result<(), Error> {
    for key in keys {
        let one = std::slice::from_ref(key);
        let mut tries = 0;
        loop {
            // the reader idled through the last try's lock wait
            source.reopen_if_closed().await?;
            let rows = source.rows_by_keys(target, one).await?;
            let batch = sealed(shared, target, rows, job_id).await?;
            // the writer idled through the read
            sink.reopen_if_closed(&shared.job).await?;
            sink.count(target, &batch).await?;
            match sink.write(target, Commit::Retry(one), &batch).await {
                Ok(w) => {
                    done.add(shared, w.counts, w.failures);
                    break;
                }
                Err(e) if e.retry() == Retry::Smaller && tries + 1 < LOCKED_RETRIES => {
                    tries += 1;
                }
                Err(e) if e.retry() == Retry::Smaller => {
                    tracing::warn!(table = %target.table, "a row stayed locked through every try; its values are not rotated (see rekey.not_rotated)");
                    let counts = sink.not_rotated_locked(target, one, &batch).await?;
                    done.add(shared, counts, Vec::new());
                    break;
                }
                Err(e) if e.retry() == Retry::Refused => {
                    let words = e.server_words();
                    tracing::warn!(table = %target.table, "the database refused the write of a row again ({words}); its values are not rotated (see rekey.not_rotated)");
                    let w = sink.write_rejected(target, one, &batch, words).await?;
                    done.add(shared, w.counts, w.failures);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}
