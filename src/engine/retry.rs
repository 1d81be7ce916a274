//! Committing one batch despite what can be retried: a lock or statement
//! timeout splits it in halves, a lost connection is reopened (and a batch
//! whose COMMIT did land is not redone), a transient error waits, and a
//! write the database refuses for a row is halved down to that row, which
//! is set aside.

use std::collections::VecDeque;

use crate::engine::sink::{AfterReconnect, Batch, Commit, Writer, Written};
use crate::error::Retry;
use crate::observe::counts::Counts;
use crate::observe::events;
use crate::state::conflicts::SetAside;
use crate::state::{Control, RangeState};
use crate::Error;

use super::work::{backoff, Shared};

/// Commits one batch, retrying what can be retried: a lock or statement
/// timeout splits it in halves, a lost connection is reopened (and a batch
/// whose COMMIT did land is not redone), a transient error waits. After
/// `attempts` failed tries the last error stops the run, which resumes
/// from the last committed batch. Returns what was written and the retries.
pub(super) async fn commit(
    shared: &Shared,
    writer: &mut Writer,
    state: &RangeState,
    batch: Batch,
) -> Result<(Written, u64), Error> {
    let mut total = Written {
        counts: Counts::default(),
        failures: Vec::new(),
        control: Control::Run,
        split_wanted: false,
    };
    match pieces(shared, writer, state, batch, &mut total).await {
        Ok(retries) => Ok((total, retries)),
        Err(e) => {
            // pieces committed before the error (a half, a row set aside)
            // are in rekey.progress: they are this process's rows, or the
            // progress line would count them as another process's
            shared.live.add(&total.counts);
            Err(e)
        }
    }
}

/// Commits the pieces of one batch for [`commit`], adding what each
/// committed to `total` as it goes; returns the retries.
async fn pieces(
    shared: &Shared,
    writer: &mut Writer,
    state: &RangeState,
    batch: Batch,
    total: &mut Written,
) -> Result<u64, Error> {
    let target = &shared.job.targets[state.target];
    let mut pending = VecDeque::from([batch]);
    let mut failed = 0u32;
    let mut retries = 0u64;
    // after a reconnect, nothing is written before the checkpoints are checked
    let mut unchecked = false;
    let mut counted = false;
    while let Some(b) = pending.pop_front() {
        let attempt = match count_once(writer, target, &b, &mut counted).await {
            Err(e) => Err(e),
            // the COMMIT may have landed before the connection broke, and a
            // crash may have lost commits the server had acknowledged
            Ok(()) if unchecked => match writer.after_reconnect(state, b.last_key.as_ref()).await {
                Ok(AfterReconnect::Committed) => {
                    // landed before the break: its checkpoint and counts are in
                    // rekey.progress; its rows count as this process's (the
                    // other counts are not known here)
                    unchecked = false;
                    total.counts.rows_scanned += b.rows.len() as u64;
                    writer.remember(state, &b);
                    continue;
                }
                Ok(AfterReconnect::NotCommitted) => {
                    unchecked = false;
                    writer.write(target, Commit::Range(state), &b).await
                }
                Ok(AfterReconnect::Lost) => {
                    return Err(Error::Runtime(format!(
                        "the server lost batches of {} it had acknowledged before it went down (rekey commits asynchronously; \
                         each batch's checkpoint was lost with it); stopping so they are redone: run the same command again to resume",
                        target.table
                    )))
                }
                Err(e) => Err(e),
            },
            Ok(()) => writer.write(target, Commit::Range(state), &b).await,
        };
        let error = match attempt {
            Ok(w) => {
                total.absorb(w);
                continue;
            }
            Err(e) => e,
        };
        let how = error.retry();
        if how == Retry::Never {
            return Err(error);
        }
        retries += 1;
        if how == Retry::Refused && b.rows.len() == 1 {
            // one row the database refuses (a trigger's exception, a
            // constraint): set aside like a locked row, so the range goes on;
            // refused again on the re-read, it is recorded as not rotated
            // the limit is the job's: rows every process and run set aside
            // count, read afresh each time (refusals are rare, and other
            // processes add to them)
            let so_far = writer.refused_rows().await?;
            if so_far >= REFUSED_LIMIT {
                return Err(too_many_refused(error, so_far));
            }
            // the server's words alone: a constraint's DETAIL shows the row's values
            tracing::warn!(table = %target.table, "the database refused the write of one row ({}); it is re-read at the end of the run and, refused again, left on its old key", error.server_words());
            total.absorb(
                writer
                    .set_aside(target, state, &b, SetAside::Refused)
                    .await?,
            );
            continue;
        }
        // halving is bounded by log2(rows); only other retries use up tries
        let halves = matches!(how, Retry::Smaller | Retry::Refused) && b.rows.len() > 1;
        if !halves {
            failed += 1;
        }
        if how == Retry::Smaller && !halves && failed >= LOCKED_TRIES {
            // one row held by another transaction: set it aside, re-read it at the end, go on
            tracing::info!(table = %target.table, "a row stayed locked through {failed} tries; it is re-read at the end of the run");
            total.absorb(
                writer
                    .set_aside(target, state, &b, SetAside::Changed)
                    .await?,
            );
            failed = 0;
            continue;
        }
        if failed >= shared.attempts {
            return Err(Error::Runtime(format!(
                "a batch of {} rows of {} failed {failed} times, the last time with: {}; the batch was not written; run the same command again to resume",
                b.rows.len(),
                target.table,
                error.chain()
            )));
        }
        let wait = backoff(failed.max(1));
        let message = format!(
            "{}{}",
            match how {
                // the server's words alone: a constraint's DETAIL shows the row's values
                Retry::Refused => error.server_words(),
                _ => error.chain(),
            },
            if halves { "; retrying in halves" } else { "" }
        );
        events::BatchRetried {
            table: &target.table.to_string(),
            attempt: failed,
            error: &message,
            rows: b.rows.len(),
            wait_seconds: if halves { 0.0 } else { wait.as_secs_f64() },
        }
        .emit();
        match how {
            Retry::Smaller | Retry::Refused if halves => {
                // a timeout shrinks the pages; a refusal is the row's, not the page size's
                if how == Retry::Smaller {
                    shared.sizer.shrink();
                }
                let (first, second) = split(target, b);
                pending.push_front(second);
                pending.push_front(first);
            }
            Retry::Reconnect => {
                tokio::time::sleep(wait).await;
                unchecked = true;
                if let Err(e) = writer.reconnect(&shared.job).await {
                    tracing::warn!("reconnecting failed: {}", e.chain());
                }
                pending.push_front(b);
            }
            Retry::Smaller | Retry::Refused | Retry::Wait | Retry::Never => {
                tokio::time::sleep(wait).await;
                pending.push_front(b);
            }
        }
    }
    Ok(retries)
}

/// Counts what the batch `b` is the first piece of sealed ([`Writer::count`]),
/// before its first write, once: the pieces it is retried in hold the
/// values it sealed, and a piece set aside or given up spent them too.
async fn count_once(
    writer: &mut Writer,
    target: &crate::job::Target,
    b: &Batch,
    counted: &mut bool,
) -> Result<(), Error> {
    if !*counted {
        writer.count(target, b).await?;
        *counted = true;
    }
    Ok(())
}

/// Rows of a job set aside because the database refused their write (each
/// alone), in all its runs, before it stops: past this, what refuses them
/// is not about a row or two, and halving batches down to single rows costs
/// more than fixing it or leaving the rows out with the target's `where`.
/// A run resumed after the limit stopped it stops at its first refusal.
pub(super) const REFUSED_LIMIT: u64 = 1000;

/// The error that stops a run once [`REFUSED_LIMIT`] rows of the job were
/// refused (`so_far`, every run and process of the job together).
fn too_many_refused(error: Error, so_far: u64) -> Error {
    match error {
        Error::Db {
            context,
            source,
            statement,
        } => Error::Db {
            context: format!(
                "{context}: the database refused the write of more than {REFUSED_LIMIT} rows of this job, each alone \
                 ({so_far} set aside or recorded by its runs so far, this one's included), so rekey stops without setting \
                 aside more; `rekey run --restart` starts the job over, counting afresh (the last refusal follows)"
            ),
            source,
            statement,
        },
        other => other,
    }
}

/// Tries of a single row that times out (a lock held elsewhere) before it
/// is set aside.
const LOCKED_TRIES: u32 = 2;

/// Splits a batch into two contiguous halves; the first ends at its own last row.
pub(super) fn split(target: &crate::job::Target, mut b: Batch) -> (Batch, Batch) {
    let mid = b.rows.len() / 2;
    let rows = b.rows.split_off(mid);
    let cells = b.cells.split_off(mid);
    let first_last = b.rows.last().map(|r| target.row_key(r));
    let second = Batch {
        range_index: b.range_index,
        rows,
        cells,
        last_key: b.last_key,
        end: b.end,
        lease: b.lease,
        upper: b.upper.clone(),
        // the slot goes with the half written last
        slot: b.slot,
    };
    let first = Batch {
        range_index: b.range_index,
        rows: b.rows,
        cells: b.cells,
        last_key: first_last,
        end: false,
        lease: b.lease,
        upper: b.upper,
        slot: None,
    };
    (first, second)
}
