//! The compare-and-swap write of a batch: binary COPY into the stage table,
//! one UPDATE that swaps a row's values only where it still holds what was
//! read, then a check of what landed (read back from the table, after the
//! AFTER triggers, where it has any). A row whose values did not land is
//! re-read later; on a re-read, a value the database refuses or undoes again
//! is not rotated.

use std::collections::{HashMap, HashSet};

use tokio_postgres::Transaction;

use crate::db::binary_copy::{send, CopyBuffer, COPY_PIECE};
use crate::db::raw::{self, params};
use crate::db::KeyBytes;
use crate::engine::sql;
use crate::engine::transform::{self, Cell};
use crate::job::Target;
use crate::observe::counts::Counts;

use super::{Batch, Beside, Commit, Prepared};

/// Why a value was not rotated: the database refused or undid rekey's write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRotated {
    /// The row still held what was read but the UPDATE left it alone: a
    /// trigger returned NULL, a row-level security policy or a rule.
    WriteRefused,
    /// The UPDATE ran, but the stored value is not what rekey wrote: a
    /// BEFORE trigger changed it, or an AFTER trigger (deferred or not)
    /// changed it back.
    WriteUndone,
    /// Another transaction held the row locked through every try.
    RowLocked,
    /// The database refused the write with an error (a trigger's
    /// exception, a constraint), on the first try and again when re-read.
    WriteRejected,
}

impl NotRotated {
    /// The word stored in `rekey.not_rotated.reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            NotRotated::WriteRefused => "write_refused",
            NotRotated::WriteUndone => "write_undone",
            NotRotated::RowLocked => "row_locked",
            NotRotated::WriteRejected => "write_rejected",
        }
    }
}

/// What the compare-and-swap found for the rows it staged.
#[derive(Debug, Default)]
pub(super) struct Swapped {
    /// Rows someone changed or deleted since they were read, or (on the
    /// first try) whose write was refused or undone: re-read later.
    pub(super) conflicted: HashSet<KeyBytes>,
    /// (row, column) of values whose write was refused or undone again on a
    /// re-read: not rotated.
    pub(super) not_rotated: HashMap<(usize, usize), NotRotated>,
    /// (row, column) of values that landed in rows that are re-read for
    /// their other values.
    pub(super) landed_in_conflicted: HashSet<(usize, usize)>,
    /// The database's own words for a refusal, recorded with the values not rotated.
    pub(super) detail: Option<String>,
    /// The transaction wrote rows of the job's targets beside the ones it
    /// swapped (a trigger's): its xid is not the job's own.
    pub(super) wrote_beside: bool,
}

impl Swapped {
    /// Every value the batch would rewrite, not rotated for `reason`.
    pub(super) fn none_landed(
        batch: &Batch,
        ncols: usize,
        reason: NotRotated,
        detail: Option<String>,
    ) -> Swapped {
        let not_rotated = (0..batch.rows.len())
            .flat_map(|r| (0..ncols).map(move |c| (r, c)))
            .filter(|&(r, c)| matches!(batch.cells[r * ncols + c], Cell::Rewritten(_)))
            .map(|rc| (rc, reason))
            .collect();
        Swapped {
            not_rotated,
            detail,
            ..Swapped::default()
        }
    }
}

/// Stages the batch's new values with binary COPY and swaps them in where
/// each row still holds what was read (compare-and-swap), then checks that
/// what is stored is what was written. A row whose value did not land is
/// re-read later (a conflict); on a re-read, a value whose write the
/// database refuses or undoes again is not rotated.
pub(super) async fn swap(
    tx: &Transaction<'_>,
    p: &Prepared,
    target: &Target,
    commit: Commit<'_>,
    batch: &Batch,
    staged: &[usize],
    counts: &mut Counts,
) -> Result<Swapped, tokio_postgres::Error> {
    let ncols = target.columns.len();
    let copy = tx
        .copy_in::<_, bytes::Bytes>(&sql::copy_stage(target))
        .await?;
    futures_util::pin_mut!(copy);
    // encoded and sent a piece at a time: built whole, a batch's data
    // (about 1.3 MB at 5,000 rows) was held beside its page until the end
    let mut buf = CopyBuffer::with_capacity(COPY_PIECE + COPY_PIECE / 4);
    let fields = (target.key.len() + 2 * ncols) as i16;
    for &r in staged {
        let row = batch.rows.row(r);
        buf.row(fields);
        for k in row.leading(target.key.len()) {
            buf.field(Some(k));
        }
        for c in 0..ncols {
            buf.field(transform::value(target, row, c));
            buf.field(batch.cells.new_value(r, c));
        }
        if buf.len() >= COPY_PIECE {
            send(copy.as_mut(), buf.take()).await?;
        }
    }
    send(copy.as_mut(), buf.finish()).await?;
    copy.finish().await?;

    let before = match &p.beside {
        Some(b) => Some(rows_written(tx, b).await?),
        None => None,
    };
    let answer = match (commit, staged.first(), staged.last()) {
        (Commit::Range(_), Some(&first), Some(&last)) => {
            let lo = target.key_params(batch.rows.row(first));
            let hi = target.key_params(batch.rows.row(last));
            let mut params = params(&lo);
            params.extend(raw::params(&hi));
            tx.query_one(&p.update, &params).await?
        }
        _ => tx.query_one(&p.update_any, &[]).await?,
    };
    let (updated, landed) = (answer.get::<_, i64>(0), answer.get::<_, i64>(1) as u64);
    counts.rows_rewritten = landed;
    let landed = match &p.landed {
        Some(count) => {
            // RETURNING saw the rows before the AFTER triggers: deferred
            // ones fire now (as they would at COMMIT), and what is stored
            // is counted again
            tx.batch_execute("SET CONSTRAINTS ALL IMMEDIATE").await?;
            let now = tx.query_one(count, &[]).await?.get::<_, i64>(0) as u64;
            now.min(landed)
        }
        None => landed,
    };
    // after the AFTER triggers, deferred ones included (fired above, or
    // here where the table has BEFORE ones alone: a deferred trigger of
    // another table they write would fire at COMMIT, after the count);
    // counts that do not show the UPDATE's own rows (`track_counts` off)
    // cannot tell, and are taken as showing more
    let wrote_beside = match (&p.beside, before) {
        (Some(b), Some(before)) => {
            if p.landed.is_none() {
                tx.batch_execute("SET CONSTRAINTS ALL IMMEDIATE").await?;
            }
            rows_written(tx, b).await? - before != updated
        }
        _ => false,
    };
    if landed == staged.len() as u64 {
        return Ok(Swapped {
            wrote_beside,
            ..Swapped::default()
        });
    }
    let retry = matches!(commit, Commit::Retry(_));
    let outcomes = staged_outcomes(tx, p, target).await?;
    let mut swapped = Swapped {
        wrote_beside,
        ..Swapped::default()
    };
    counts.rows_rewritten = 0;
    for &r in staged {
        let key = target.row_key(batch.rows.row(r));
        let rewritten: Vec<usize> = (0..ncols)
            .filter(|&c| matches!(batch.cells[r * ncols + c], Cell::Rewritten(_)))
            .collect();
        let Some(o) = outcomes.get(&key) else {
            // deleted meanwhile: the re-read finds nothing left to rotate
            swapped.conflicted.insert(key);
            continue;
        };
        let unlanded: Vec<usize> = rewritten
            .iter()
            .copied()
            .filter(|&c| !o.landed[c])
            .collect();
        if rewritten.iter().any(|&c| o.landed[c]) {
            counts.rows_rewritten += 1;
        }
        if unlanded.is_empty() {
            continue;
        }
        let refusal = if o.touched {
            Some(NotRotated::WriteUndone)
        } else if o.as_read {
            Some(NotRotated::WriteRefused)
        } else {
            None // the application changed it
        };
        match refusal {
            Some(reason) if retry => swapped
                .not_rotated
                .extend(unlanded.iter().map(|&c| ((r, c), reason))),
            _ => {
                swapped.landed_in_conflicted.extend(
                    rewritten
                        .iter()
                        .copied()
                        .filter(|&c| o.landed[c])
                        .map(|c| (r, c)),
                );
                swapped.conflicted.insert(key);
            }
        }
    }
    counts.conflicts = swapped.conflicted.len() as u64;
    Ok(swapped)
}

/// The rows the transaction has inserted or updated so far in the job's targets.
async fn rows_written(tx: &Transaction<'_>, b: &Beside) -> Result<i64, tokio_postgres::Error> {
    Ok(tx.query_one(&b.count, &[&b.tables]).await?.get(0))
}

/// Where one staged row stands after the UPDATE.
pub(super) struct StagedOutcome {
    /// This transaction updated it.
    touched: bool,
    /// It still holds every value as it was read.
    as_read: bool,
    /// Per encrypted column: it holds what rekey wrote.
    landed: Vec<bool>,
}

/// Where each staged row still in the table stands, by key.
pub(super) async fn staged_outcomes(
    tx: &Transaction<'_>,
    p: &Prepared,
    target: &Target,
) -> Result<HashMap<KeyBytes, StagedOutcome>, tokio_postgres::Error> {
    let nkeys = target.key.len();
    let mut out = HashMap::new();
    for row in tx.query(&p.outcome, &[]).await? {
        let landed = (0..target.columns.len())
            .map(|c| row.try_get(nkeys + 2 + c))
            .collect::<Result<_, _>>()?;
        let o = StagedOutcome {
            touched: row.try_get(nkeys)?,
            as_read: row.try_get(nkeys + 1)?,
            landed,
        };
        out.insert(raw::key_of(&row, nkeys), o);
    }
    Ok(out)
}
