//! The three stages of a lane: the source reads pages of the ranges it
//! takes, the transform runs each batch on the rayon pool, the sink commits
//! it (a rewrite) or tallies it (a dry run, verify).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::control::monitor::Verdict;
use crate::control::stop::StopBy;
use crate::engine::pipeline::{Mode, Outcome};
use crate::engine::sink::{self, Batch, Writer};
use crate::engine::source::Source;
use crate::engine::transform::{self, Cell, Cells};
use crate::job::Job;
use crate::observe::counts::Counts;
use crate::observe::events;
use crate::state::Control;
use crate::Error;

use super::retry::commit;
use super::watch::apply;
use super::work::{PageSlot, Shared};

/// Source stage: reads each range it takes, page by page, in key order.
pub(super) async fn read(
    shared: Arc<Shared>,
    mut source: Source,
    slots: Arc<Semaphore>,
    out: mpsc::Sender<Batch>,
) -> Result<Option<Outcome>, Error> {
    while let Some((ri, start, lease)) = shared.next_range(&mut source).await? {
        let state = shared.range(ri);
        let target = &shared.job.targets[state.target];
        let mut after = start;
        let mut upper = state.bounds.upper.clone();
        loop {
            // the lane's page slots: one comes back as the sink drops a batch
            // (nothing closes them: were they closed, the lane must not look finished)
            let slot = slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| Error::Runtime("a lane's page slots were closed".into()))?;
            if !shared.hold.wait(&shared.stop).await {
                shared.cut_short.store(true, Ordering::Relaxed);
                return Ok(None);
            }
            if shared.is_lost(ri, lease) {
                // another process has the range now; its checkpoint, not ours,
                // says where it stands. Given up here too: a claim a server
                // crash undid hands the same generation out again, already
                // lost, and a range kept as worked would never be claimed
                shared.leave(&state, lease);
                break;
            }
            let limit = shared.sizer.rows();
            if let Some(pace) = &shared.pace {
                // a hold or stop may have come while waiting for the page's turn
                if !pace.wait(limit, &shared.stop).await || !shared.hold.wait(&shared.stop).await {
                    shared.cut_short.store(true, Ordering::Relaxed);
                    return Ok(None);
                }
            }
            match shared
                .split_for_idle_lane(
                    &mut source,
                    ri,
                    after.as_ref(),
                    upper.as_ref(),
                    lease,
                    limit,
                )
                .await
            {
                Ok(Some(at)) => upper = Some(at),
                Ok(None) => {}
                // a split is an optimisation: the lane goes on with the bounds
                // it has (were the split committed unseen, the compare-and-swap
                // writes keep two lanes on the same rows from losing anything)
                Err(e) => tracing::warn!(
                    "splitting a range of {} for an idle lane failed: {}",
                    target.table,
                    e.chain()
                ),
            }
            let mut failed = 0;
            let rows = loop {
                match source
                    .page(target, after.as_ref(), upper.as_ref(), limit)
                    .await
                {
                    Ok(rows) => break rows,
                    Err(e) => {
                        shared
                            .recover(
                                &mut source,
                                &format!("reading a page of {}", target.table),
                                &mut failed,
                                e,
                            )
                            .await?
                    }
                }
            };
            shared
                .sizer
                .read(rows.len(), rows.bytes_in(target.key.len()..usize::MAX));
            let end = rows.len() < limit;
            let last_key = rows.last().map(|r| target.row_key(r));
            if let Some(k) = &last_key {
                after = Some(k.clone());
            }
            let batch = Batch {
                range_index: ri,
                rows,
                cells: Cells::default(),
                last_key,
                end,
                lease,
                upper: upper.clone(),
                slot: Some(PageSlot::new(slot, shared.queued.pages.clone())),
            };
            if out.send(batch).await.is_err() {
                return Ok(None);
            }
            shared.queued.to_transform.fetch_add(1, Ordering::Relaxed);
            if end {
                break;
            }
        }
    }
    Ok(None)
}

/// Transform stage: runs each batch on the rayon pool and passes it on.
pub(super) async fn transform_stage(
    shared: Arc<Shared>,
    mode: Mode,
    mut input: mpsc::Receiver<Batch>,
    out: mpsc::Sender<Batch>,
) -> Result<Option<Outcome>, Error> {
    while let Some(batch) = input.recv().await {
        shared.queued.to_transform.fetch_sub(1, Ordering::Relaxed);
        let target_index = shared.range(batch.range_index).target;
        let batch = on_pool(shared.job.clone(), target_index, mode, batch).await?;
        if out.send(batch).await.is_err() {
            break;
        }
        shared.queued.to_sink.fetch_add(1, Ordering::Relaxed);
    }
    Ok(None)
}

/// Runs the transform of one batch on the rayon pool.
pub(super) async fn on_pool(
    job: Arc<Job>,
    target_index: usize,
    mode: Mode,
    mut batch: Batch,
) -> Result<Batch, Error> {
    let (done, result) = oneshot::channel();
    rayon::spawn(move || {
        let target = &job.targets[target_index];
        match mode {
            Mode::Verify => transform::classify(target, &batch.rows, &mut batch.cells),
            Mode::Rewrite { .. } | Mode::DryRun => {
                transform::rewrite(target, &batch.rows, &mut batch.cells)
            }
        }
        let _ = done.send(batch);
    });
    result
        .await
        .map_err(|_| Error::Runtime("the transform pool dropped a batch".into()))
}

/// Sink stage: commits batches (rewrite) or tallies them (dry run, verify).
pub(super) async fn write(
    shared: Arc<Shared>,
    mut writer: Option<Writer>,
    lookup: Option<tokio_postgres::Client>,
    mut input: mpsc::Receiver<Batch>,
) -> Result<Option<Outcome>, Error> {
    let mut outcome = Outcome::default();
    while let Some(batch) = input.recv().await {
        shared.queued.to_sink.fetch_sub(1, Ordering::Relaxed);
        let started = Instant::now();
        let rows = batch.rows.len();
        let state = shared.range(batch.range_index);
        let state = &*state;
        let target = &shared.job.targets[state.target];
        let (end, lease) = (batch.end, batch.lease);
        if shared.is_lost(batch.range_index, lease) {
            // read before the lease was lost, sealed, and not written: counted all the same
            if let Some(w) = writer.as_mut() {
                w.count_given_up(target, &batch).await?;
            }
            continue;
        }
        // the batch is another connection's to see as committed before it is added below
        let _writing = shared.live.writing(rows as u64);
        let (counts, failures) = match (&mut writer, &lookup) {
            (Some(w), _) => {
                let range = batch.range_index;
                let (written, retries) = match commit(&shared, w, state, batch).await {
                    Ok(done) => done,
                    Err(Error::LeaseLost(why)) => {
                        // nothing of the batch was written; the range goes on elsewhere
                        tracing::warn!("{why}; this process goes on with other ranges");
                        if let (Ok(mut lost), Some(g)) = (shared.lost.lock(), lease) {
                            lost.insert((range, g));
                        }
                        shared.leave(state, lease);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if end {
                    shared.leave(state, lease);
                }
                outcome.retries += retries;
                if written.split_wanted {
                    // a lane of another process waits: this lane's reader splits at its next page
                    shared.hungry.fetch_add(1, Ordering::Relaxed);
                }
                // the job's control as of this commit: honoured before the next page
                match written.control {
                    Control::Stop => apply(&shared, Verdict::Stop(StopBy::RekeyStop)),
                    Control::Pause => apply(
                        &shared,
                        Verdict::Hold("paused", crate::control::monitor::PAUSED.into()),
                    ),
                    Control::Run => {}
                }
                (written.counts, written.failures)
            }
            (None, Some(client)) => (
                tally(target, &batch, &mut outcome),
                sink::record::describe_failures(client, target, &batch).await?,
            ),
            (None, None) => {
                return Err(Error::Runtime(
                    "a sink has neither a writer nor a lookup connection".into(),
                ))
            }
        };
        shared.note_quarantined(&failures);
        let took = started.elapsed();
        events::BatchCommitted {
            table: &target.table.to_string(),
            target: target.index,
            counts: &counts,
            seconds: took.as_secs_f64(),
            rows,
        }
        .emit();
        shared.sizer.committed(rows, took);
        let _ = outcome.batch_micros.record(took.as_micros().max(1) as u64);
        if rows > 0 {
            outcome.batch_rows = (
                outcome.batch_rows.0.min(rows),
                outcome.batch_rows.1.max(rows),
            );
        }
        outcome.merge(Outcome {
            counts,
            failures,
            by_target: BTreeMap::from([(target.index, counts)]),
            ..Outcome::default()
        });
        shared.live.add(&counts);
        shared.progress.update(&shared.live.snapshot());
    }
    Ok(Some(outcome))
}

/// Counts a batch that is not written: what a run would do, and which keys hold the values.
pub(super) fn tally(target: &crate::job::Target, batch: &Batch, verified: &mut Outcome) -> Counts {
    let ncols = target.columns.len();
    let mut c = Counts {
        rows_scanned: batch.rows.len() as u64,
        ..Counts::default()
    };
    for (i, cell) in batch.cells.iter().enumerate() {
        match cell {
            Cell::Null | Cell::Current => c.values_skipped += 1,
            Cell::Rewritten(_) => {
                c.values_rewritten += 1;
                let (row, col) = (i / ncols, i % ncols);
                let column = &target.columns[col];
                if let (Some(cap), Some(value)) =
                    (column.max_chars(), batch.cells.new_value(row, col))
                {
                    // written values are ASCII (base64, hex, Fernet tokens): a byte a character
                    if value.len() > cap {
                        let seen = verified
                            .too_long
                            .entry(format!("{}.{}", target.table, column.name))
                            .or_default();
                        *seen = (seen.0 + 1, seen.1.max(value.len()));
                    }
                }
            }
            Cell::Failed(_) => c.values_failed += 1,
            Cell::Opened {
                label,
                key,
                on_target,
            } => {
                *verified
                    .by_key
                    .entry(target.label(i % ncols))
                    .or_default()
                    .entry(label.clone())
                    .or_default() += 1;
                // hash key ids are another keyring's: they say nothing of a ciphertext key
                if !target.is_hash_column(i % ncols) {
                    *verified.by_key_id.entry(*key).or_default() += 1;
                }
                if *on_target {
                    verified.on_target += 1;
                } else {
                    verified.on_old += 1;
                }
            }
        }
    }
    c.rows_rewritten = transform::rewritten_rows(&batch.cells, ncols).count() as u64;
    c
}
