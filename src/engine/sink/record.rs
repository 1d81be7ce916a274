//! What a batch did to each value, counted; values that did not decrypt go
//! to `rekey.quarantine`, values the database would not take to
//! `rekey.not_rotated` (never the value itself in either).

use std::collections::HashSet;

use futures_util::future::join_all;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Transaction};

use crate::crypto::keyring::KeyId;
use crate::db::raw::{self, params, RawParam};
use crate::db::KeyBytes;
use crate::engine::sql;
use crate::engine::transform::{self, Cell};
use crate::error::DbContext;
use crate::job::Target;
use crate::observe::counts::Counts;
use crate::Error;

use super::swap::Swapped;
use super::{Batch, Failure, Prepared};

/// Counts every value of the batch by what became of it, and records the
/// ones that did not open in `rekey.quarantine`: the inserts go out
/// together (pipelined), so a batch of failures costs one round trip, not
/// one each, inside its transaction.
pub(super) async fn tally_and_quarantine(
    tx: &Transaction<'_>,
    p: &Prepared,
    job_id: i64,
    target: &Target,
    batch: &Batch,
    swapped: &Swapped,
    counts: &mut Counts,
) -> Result<(Vec<Failure>, HashSet<KeyBytes>), tokio_postgres::Error> {
    let ncols = target.columns.len();
    // (row, column, error kind) of each value to quarantine
    let mut failed = Vec::new();
    for (r, row) in batch.rows.rows().enumerate() {
        let row_conflicted =
            !swapped.conflicted.is_empty() && swapped.conflicted.contains(&target.row_key(row));
        for (c, cell) in batch.cells[r * ncols..(r + 1) * ncols].iter().enumerate() {
            match cell {
                Cell::Rewritten(_) if swapped.not_rotated.contains_key(&(r, c)) => {
                    counts.values_not_rotated += 1
                }
                Cell::Rewritten(_)
                    if !row_conflicted || swapped.landed_in_conflicted.contains(&(r, c)) =>
                {
                    counts.values_rewritten += 1
                }
                Cell::Rewritten(_) | Cell::Opened { .. } => {}
                Cell::Null | Cell::Current => counts.values_skipped += 1,
                // changed since it was read (perhaps fixed): the re-read decides
                Cell::Failed(_) if row_conflicted => {}
                Cell::Failed(e) => failed.push((r, c, e.kind())),
            }
        }
    }
    let table = target.table.to_string();
    let inserted = join_all(failed.iter().map(|&(r, c, kind)| {
        let table = &table;
        async move {
            let row = batch.rows.row(r);
            let key = target.row_key(row);
            let pk: Vec<&[u8]> = key.iter().map(|k| k.as_slice()).collect();
            let keyp = target.key_params(row);
            let read = RawParam(transform::value(target, row, c).unwrap_or_default());
            let mut params: Vec<&(dyn ToSql + Sync)> =
                vec![&job_id, table, &target.columns[c].name, &pk, &kind];
            params.extend(raw::params(&keyp));
            params.push(&read);
            tx.query_opt(&p.quarantine[c], &params).await
        }
    }))
    .await;
    let mut failures = Vec::new();
    let mut changed = HashSet::new();
    for (&(r, c, kind), answer) in failed.iter().zip(inserted) {
        match answer? {
            Some(found) => {
                counts.values_failed += 1;
                let key_text: Option<String> = found.get(0);
                failures.push(Failure {
                    table: table.clone(),
                    column: target.columns[c].name.clone(),
                    key: key_text.unwrap_or_default(),
                    error: kind,
                    named_key: named_key(target, batch, r, c),
                    target: target.index,
                });
            }
            // changed since it was read (perhaps fixed): re-read later
            None => {
                changed.insert(target.row_key(batch.rows.row(r)));
            }
        }
    }
    Ok((failures, changed))
}

/// Records the values whose write was refused or undone on a re-read in
/// `rekey.not_rotated`, the inserts pipelined like the quarantine's.
pub(super) async fn record_not_rotated(
    tx: &Transaction<'_>,
    p: &Prepared,
    job_id: i64,
    target: &Target,
    batch: &Batch,
    swapped: &Swapped,
) -> Result<(), tokio_postgres::Error> {
    let (target_no, table) = (target.index as i32, target.table.to_string());
    let written = join_all(swapped.not_rotated.iter().map(|(&(r, c), reason)| {
        let table = &table;
        async move {
            let row = batch.rows.row(r);
            let key = target.row_key(row);
            let pk: Vec<&[u8]> = key.iter().map(|k| k.as_slice()).collect();
            let keyp = target.key_params(row);
            let reason = reason.as_str();
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![
                &job_id,
                &target_no,
                table,
                &target.columns[c].name,
                &pk,
                &reason,
                &swapped.detail,
            ];
            params.extend(raw::params(&keyp));
            tx.execute(&p.not_rotated, &params).await
        }
    }))
    .await;
    written.into_iter().try_for_each(|w| w.map(|_| ()))
}

/// Looks up the text form of failed values' keys for reports, writing nothing
/// (`--dry-run` and `verify`).
pub async fn describe_failures(
    client: &Client,
    target: &Target,
    batch: &Batch,
) -> Result<Vec<Failure>, Error> {
    let ncols = target.columns.len();
    let mut out = Vec::new();
    let mut stmt = None;
    for (r, row) in batch.rows.rows().enumerate() {
        for (c, cell) in batch.cells[r * ncols..(r + 1) * ncols].iter().enumerate() {
            if let Cell::Failed(e) = cell {
                let what = || format!("describing a failed value of {}", target.table);
                if stmt.is_none() {
                    stmt = Some(client.prepare(&sql::key_text(target)).await.ctx(what)?);
                }
                let Some(s) = &stmt else { continue };
                let keyp = target.key_params(row);
                let key: Option<String> = client
                    .query_opt(s, &params(&keyp))
                    .await
                    .ctx(what)?
                    .map(|r| r.get(0));
                out.push(Failure {
                    table: target.table.to_string(),
                    column: target.columns[c].name.clone(),
                    key: key.unwrap_or_default(),
                    error: e.kind(),
                    named_key: named_key(target, batch, r, c),
                    target: target.index,
                });
            }
        }
    }
    Ok(out)
}

/// The key a value that did not open names, where the keys given do not
/// hold it (see [`Failure::named_key`]).
fn named_key(target: &Target, batch: &Batch, r: usize, c: usize) -> Option<KeyId> {
    transform::held(target, batch.rows.row(r), c)
        .and_then(|stored| transform::missing_key(target, c, stored))
}
