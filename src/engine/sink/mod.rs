//! Sink: the only stage that writes to user tables.
//!
//! One transaction per batch: binary COPY of the re-encrypted values into a
//! temp stage table, one `UPDATE ... FROM` that replaces a value only where
//! the row still holds exactly what was read (compare-and-swap), the
//! quarantine rows, and the batch's checkpoint; then COMMIT. A row changed by
//! the application in between is left alone and counted as a conflict.
//! [`swap`] stages and swaps the values and checks what landed; [`record`]
//! counts every value and records what did not open or did not land.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use tokio_postgres::{Client, Statement, Transaction};

use crate::crypto::keyring::KeyId;
use crate::db::session::Timeouts;
use crate::db::{Database, KeyBytes, Page};
use crate::engine::left::shows_rotated;
use crate::engine::sql;
use crate::engine::transform::{self, Cell, Cells};
use crate::engine::work::PageSlot;
use crate::error::{writing_target, DbContext};
use crate::job::{Job, Target};
use crate::observe::counts::Counts;
use crate::observe::events::{self, LeaseChange};
use crate::state::conflicts::SetAside;
use crate::state::{self, Control, RangeState};
use crate::Error;

pub mod reconnect;
pub mod record;
pub mod swap;

pub use reconnect::AfterReconnect;

use record::{record_not_rotated, tally_and_quarantine};
use swap::{swap, Swapped};

/// One value that could not be decrypted, as reported (never the value itself).
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// `schema.table`.
    pub table: String,
    /// The column.
    pub column: String,
    /// The row's key as text, e.g. `(42)`.
    pub key: String,
    /// Why: truncated, unknown_key, auth_failed, bad_encoding.
    pub error: &'static str,
    /// The key an `unknown_key` value names, in a format that names keys:
    /// one the keys given do not hold (retired, perhaps still in the
    /// store's archive, or never given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub named_key: Option<KeyId>,
    /// The index of its target in the job (two targets may share a table).
    #[serde(skip)]
    pub target: usize,
}

/// A batch on its way through the pipeline.
pub struct Batch {
    /// Index of the range (in the pipeline's range list) it belongs to.
    pub range_index: usize,
    /// The rows read, key columns first.
    pub rows: Page,
    /// Row-major decisions, filled by the transform.
    pub cells: Cells,
    /// Key of the last row read, where the next page starts.
    pub last_key: Option<KeyBytes>,
    /// Whether this is the last batch of its range.
    pub end: bool,
    /// The generation of the range's lease it was read under (`None`: not leased).
    pub lease: Option<i64>,
    /// The range's upper bound as the reader knew it: the range is marked
    /// done only where `rekey.progress` has the same bound (a split the
    /// server lost leaves the range open, to be claimed again).
    pub upper: Option<KeyBytes>,
    /// The lane's page slot this batch holds until it is dropped (`None`:
    /// read outside a lane's pipeline, as the conflict re-reads are).
    pub slot: Option<PageSlot>,
}

/// What a committed batch records besides the rows.
#[derive(Debug, Clone, Copy)]
pub enum Commit<'a> {
    /// A page of a range: its checkpoint moves forward.
    Range(&'a RangeState),
    /// A conflict re-read of these keys: they leave `rekey.conflicts` unless they conflict again.
    Retry(&'a [KeyBytes]),
}

/// Per-target prepared statements of a writer connection.
pub(super) struct Prepared {
    /// The compare-and-swap UPDATE, bounded by the batch's key range.
    pub(super) update: Statement,
    /// The same without key bounds (conflict re-reads are not contiguous).
    pub(super) update_any: Statement,
    /// The quarantine INSERT, per encrypted column.
    pub(super) quarantine: Vec<Statement>,
    /// Where each staged row stands after the UPDATE (run when not every row landed).
    pub(super) outcome: Statement,
    /// How many staged rows hold what rekey wrote, read back after the
    /// AFTER triggers (tables that have any).
    pub(super) landed: Option<Statement>,
    /// The not-rotated INSERT.
    pub(super) not_rotated: Statement,
    /// Where an UPDATE trigger fires on the target and a target of the job
    /// hides its key in its values: the count of rows the transaction
    /// wrote in the job's targets, and their names.
    pub(super) beside: Option<Beside>,
}

/// Counts what a batch's transaction wrote in the job's targets beside the
/// rows it swapped: rows a trigger wrote there are rows the run did not
/// rotate, under the transaction's xid, which the recount of values that
/// hide their key would otherwise take for the run's own
/// ([`crate::engine::behind`]).
pub(super) struct Beside {
    /// [`sql::ROWS_WRITTEN_IN_TARGETS`].
    pub(super) count: Statement,
    /// The job's targets, qualified.
    pub(super) tables: Vec<String>,
}

/// What a committed batch did.
#[derive(Debug)]
pub struct Written {
    /// Counts of the batch.
    pub counts: Counts,
    /// Values that could not be decrypted, now in `rekey.quarantine`.
    pub failures: Vec<Failure>,
    /// The job's live control as of the commit.
    pub control: Control,
    /// Whether a lane of another process asked for the batch's range to be split.
    pub split_wanted: bool,
}

impl Written {
    /// Adds what a later piece of the same batch committed: its counts and
    /// failures, and the job's control and split request as of its commit.
    pub fn absorb(&mut self, piece: Written) {
        self.counts += piece.counts;
        self.failures.extend(piece.failures);
        self.control = piece.control;
        self.split_wanted |= piece.split_wanted;
    }
}

/// Writes batches over one connection.
pub struct Writer {
    /// The writing connection.
    client: Client,
    /// Where to reconnect.
    db: Database,
    /// The job row checkpoints go to.
    job_id: i64,
    /// This process's name in range leases (`None`: ranges are not leased).
    owner: Option<String>,
    /// The session's limits.
    timeouts: Timeouts,
    /// Statements by target index.
    prepared: HashMap<usize, Prepared>,
    /// The nonce count's statements.
    count: state::CountStatements,
    /// The last key this writer committed in each (target, range), with the
    /// lease generation it wrote under, to tell after a reconnect whether the
    /// server lost acknowledged commits.
    ledger: HashMap<(usize, i32), (KeyBytes, Option<i64>)>,
}

impl Writer {
    /// Opens a writing connection with stage tables and statements for every target.
    pub async fn connect(db: &Database, job: &Job, job_id: i64) -> Result<Writer, Error> {
        Self::connect_as(db, job, job_id, None, Timeouts::default()).await
    }

    /// As [`Writer::connect`], for the lease holder `owner`, with `timeouts`.
    pub async fn connect_as(
        db: &Database,
        job: &Job,
        job_id: i64,
        owner: Option<String>,
        timeouts: Timeouts,
    ) -> Result<Writer, Error> {
        let (client, prepared, count) = Self::open(db, job, timeouts).await?;
        Ok(Writer {
            client,
            db: db.clone(),
            job_id,
            owner,
            timeouts,
            prepared,
            count,
            ledger: HashMap::new(),
        })
    }

    /// Rows of this job whose write the database refused, in any run (the
    /// refused-row limit is the job's).
    pub async fn refused_rows(&self) -> Result<u64, Error> {
        state::conflicts::refused_rows(&self.client, self.job_id).await
    }

    /// Sets aside a batch whose rows stayed locked past the retries, or a
    /// row whose write the database refused: their keys go to
    /// `rekey.conflicts` (re-read at the end of the run) and the range's
    /// checkpoint moves past them, in one transaction, so the range goes on.
    pub async fn set_aside(
        &mut self,
        target: &Target,
        state: &RangeState,
        batch: &Batch,
        why: SetAside,
    ) -> Result<Written, Error> {
        let what = || format!("setting aside rows of {}", target.table);
        let rows: HashSet<KeyBytes> = batch.rows.rows().map(|r| target.row_key(r)).collect();
        let counts = Counts {
            rows_scanned: batch.rows.len() as u64,
            conflicts: rows.len() as u64,
            ..Counts::default()
        };
        let tx = self.client.transaction().await.ctx(what)?;
        state::conflicts::add(&tx, self.job_id, target.index, &rows, why)
            .await
            .ctx(what)?;
        let control = checkpoint(
            &tx,
            self.job_id,
            self.owner.as_deref(),
            target,
            Commit::Range(state),
            batch,
            &counts,
        )
        .await?;
        tx.commit().await.ctx(what)?;
        self.remember(state, batch);
        let (control, split_wanted) = control;
        Ok(Written {
            counts,
            failures: Vec::new(),
            control,
            split_wanted,
        })
    }

    /// Records the values a conflict re-read would rewrite as not rotated:
    /// their rows stayed locked through every try. They leave `rekey.conflicts`.
    pub async fn not_rotated_locked(
        &mut self,
        target: &Target,
        keys: &[KeyBytes],
        batch: &Batch,
    ) -> Result<Counts, Error> {
        let what = || format!("recording locked rows of {}", target.table);
        let p = &self.prepared[&target.index];
        let swapped = Swapped::none_landed(
            batch,
            target.columns.len(),
            swap::NotRotated::RowLocked,
            None,
        );
        let counts = Counts {
            rows_scanned: batch.rows.len() as u64,
            values_not_rotated: swapped.not_rotated.len() as u64,
            ..Counts::default()
        };
        let tx = self.client.transaction().await.ctx(what)?;
        record_not_rotated(&tx, p, self.job_id, target, batch, &swapped)
            .await
            .ctx(what)?;
        state::conflicts::clear(&tx, self.job_id, target.index, keys)
            .await
            .ctx(what)?;
        state::record_retry(
            &tx,
            self.job_id,
            target.index,
            &target.table.to_string(),
            &counts,
        )
        .await
        .ctx(what)?;
        tx.commit().await.ctx(what)?;
        Ok(counts)
    }

    async fn open(
        db: &Database,
        job: &Job,
        timeouts: Timeouts,
    ) -> Result<(Client, HashMap<usize, Prepared>, state::CountStatements), Error> {
        let client = db.connect().await?;
        // The checkpoint commits with its batch, so a commit lost in a crash
        // loses both together and the batch is simply redone.
        client
            .batch_execute("SET synchronous_commit = off")
            .await
            .ctx(|| "configuring the writer connection".into())?;
        client
            .batch_execute(&timeouts.session_sql())
            .await
            .ctx(|| "configuring the writer connection".into())?;
        let mut prepared = HashMap::new();
        for t in &job.targets {
            let what = || format!("preparing writes to {}", t.table);
            client
                .batch_execute(&sql::create_stage(t))
                .await
                .ctx(what)?;
            let update = client
                .prepare(&sql::update_from_stage(t, true))
                .await
                .ctx(what)?;
            let update_any = client
                .prepare(&sql::update_from_stage(t, false))
                .await
                .ctx(what)?;
            let mut quarantine = Vec::with_capacity(t.columns.len());
            for col in 0..t.columns.len() {
                quarantine.push(
                    client
                        .prepare(&sql::insert_quarantine(t, col))
                        .await
                        .ctx(what)?,
                );
            }
            let outcome = client.prepare(&sql::staged_outcome(t)).await.ctx(what)?;
            let landed = match t.after_triggers {
                true => Some(client.prepare(&sql::landed_count(t)).await.ctx(what)?),
                false => None,
            };
            let not_rotated = client
                .prepare(&sql::insert_not_rotated(t))
                .await
                .ctx(what)?;
            let beside = match t.update_triggers && !job.targets.iter().all(shows_rotated) {
                true => Some(Beside {
                    count: client
                        .prepare(sql::ROWS_WRITTEN_IN_TARGETS)
                        .await
                        .ctx(what)?,
                    tables: job.targets.iter().map(Target::qualified).collect(),
                }),
                false => None,
            };
            prepared.insert(
                t.index,
                Prepared {
                    update,
                    update_any,
                    quarantine,
                    outcome,
                    landed,
                    not_rotated,
                    beside,
                },
            );
        }
        let count = state::CountStatements::prepare(&client).await?;
        Ok((client, prepared, count))
    }

    /// Commits one batch and its checkpoint; returns what it did.
    pub async fn write(
        &mut self,
        target: &Target,
        commit: Commit<'_>,
        batch: &Batch,
    ) -> Result<Written, Error> {
        self.commit_batch(target, commit, batch, None).await
    }

    /// Commits a conflict re-read whose write the database refused with
    /// an error again (`refusal`, its words): the values it would rewrite
    /// are recorded as not rotated, the rest as [`Writer::write`] would.
    pub async fn write_rejected(
        &mut self,
        target: &Target,
        keys: &[KeyBytes],
        batch: &Batch,
        refusal: String,
    ) -> Result<Written, Error> {
        self.commit_batch(target, Commit::Retry(keys), batch, Some(refusal))
            .await
    }

    /// Counts what `batch` sealed against the nonce budget (README,
    /// Guarantees 7), before it writes: every value sealed under the target
    /// key with a fresh random nonce (a search hash is not), whether it then
    /// lands, is refused, is set aside or is given up. Past the budget the
    /// batch must not write, and the error stops the run.
    pub async fn count(&mut self, target: &Target, batch: &Batch) -> Result<(), Error> {
        let sealed = sealed_values(target, batch);
        if sealed == 0 {
            return Ok(());
        }
        let what = || {
            format!(
                "counting the values of a batch of {} against the nonce budget",
                target.table
            )
        };
        let key = target.write.keyring.target();
        let count = state::count_encryptions(
            &mut self.client,
            &self.count,
            &key.fingerprint(),
            &target.target_label(),
            sealed,
            what,
        )
        .await?;
        match count {
            state::Count::Counted => Ok(()),
            state::Count::Refused { used } => Err(nonce_budget_spent(
                target,
                used,
                "this batch (nothing written)",
            )),
        }
    }

    /// As [`Writer::count`], for a batch sealed and given up before it was
    /// written (its range's lease lost): a count that fails other than past
    /// the budget is a warning, as the lost lease is what the run reports.
    pub async fn count_given_up(&mut self, target: &Target, batch: &Batch) -> Result<(), Error> {
        match self.count(target, batch).await {
            Err(spent @ Error::Config(_)) => Err(spent),
            Err(e) => {
                tracing::warn!(table = %target.table, "a batch given up was not counted against the nonce budget: {}", e.chain());
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Commits one batch, swapped in (`refusal` is `None`) or recorded as
    /// refused with those words.
    async fn commit_batch(
        &mut self,
        target: &Target,
        commit: Commit<'_>,
        batch: &Batch,
        refusal: Option<String>,
    ) -> Result<Written, Error> {
        let what = || format!("writing a batch to {}", target.table);
        let mut counts = Counts {
            rows_scanned: batch.rows.len() as u64,
            ..Counts::default()
        };
        let staged: Vec<usize> =
            transform::rewritten_rows(&batch.cells, target.columns.len()).collect();
        let tx = self.client.transaction().await.ctx(what)?;
        let p = &self.prepared[&target.index];
        // the swap writes the target's rows: its refusals are the table's
        let wrote_target = refusal.is_none() && !staged.is_empty();
        let swapped = match refusal {
            Some(words) => Swapped::none_landed(
                batch,
                target.columns.len(),
                swap::NotRotated::WriteRejected,
                Some(words),
            ),
            None if staged.is_empty() => Swapped::default(),
            None => {
                let swapped = swap(&tx, p, target, commit, batch, &staged, &mut counts).await;
                let context = write_context(target, swapped.as_ref().err());
                writing_target(swapped, || context)?
            }
        };
        let (failures, changed) =
            tally_and_quarantine(&tx, p, self.job_id, target, batch, &swapped, &mut counts)
                .await
                .ctx(what)?;
        record_not_rotated(&tx, p, self.job_id, target, batch, &swapped)
            .await
            .ctx(what)?;
        let job = self.job_id;
        if let Commit::Retry(keys) = commit {
            state::conflicts::clear(&tx, job, target.index, keys)
                .await
                .ctx(what)?;
        }
        state::conflicts::add(
            &tx,
            job,
            target.index,
            &swapped.conflicted,
            SetAside::Changed,
        )
        .await
        .ctx(what)?;
        state::conflicts::add(&tx, job, target.index, &changed, SetAside::Changed)
            .await
            .ctx(what)?;
        let control = checkpoint(
            &tx,
            self.job_id,
            self.owner.as_deref(),
            target,
            commit,
            batch,
            &counts,
        )
        .await?;
        if swapped.wrote_beside {
            state::disown_transaction(&tx, self.job_id)
                .await
                .ctx(what)?;
        }
        // a deferred constraint of the table (a foreign key, a unique one)
        // refuses the swap's rows at the commit
        match tx.commit().await {
            Err(e) if wrote_target => {
                let context = write_context(target, Some(&e));
                writing_target(Err(e), || context)?
            }
            done => done.ctx(what)?,
        }
        if let Commit::Range(state) = commit {
            self.remember(state, batch);
        }
        let (control, split_wanted) = control;
        Ok(Written {
            counts,
            failures,
            control,
            split_wanted,
        })
    }
}

/// What rekey was doing when a write into `target` failed with `e`: for a
/// value longer than its column allows (`varchar(n)`, `char(n)`, a domain
/// over one), which the format or encoding written can make where the one
/// read fit, the columns whose type caps the length and the fix.
fn write_context(target: &Target, e: Option<&tokio_postgres::Error>) -> String {
    let what = format!("writing a batch to {}", target.table);
    if e.and_then(|e| e.code())
        != Some(&tokio_postgres::error::SqlState::STRING_DATA_RIGHT_TRUNCATION)
    {
        return what;
    }
    let capped: Vec<String> = target
        .columns
        .iter()
        .filter(|c| c.type_name.starts_with("character"))
        .map(|c| format!("{} {}", c.name, c.type_name))
        .collect();
    format!(
        "{what}: a value rekey wrote is longer than its column allows ({}): the format or encoding written makes longer \
         values than the ones read; widen the column (ALTER TABLE {} ALTER COLUMN ... TYPE text, or a longer varchar), then \
         run again; nothing of this batch was written",
        match capped.is_empty() {
            true => "a domain or type that caps its length".to_string(),
            false => capped.join(", "),
        },
        target.qualified()
    )
}

/// Values of `batch` sealed under the target key with a fresh random nonce
/// (a search hash is not; nor is a value of a format without random
/// nonces): what the nonce budget counts.
fn sealed_values(target: &Target, batch: &Batch) -> i64 {
    if !target.write.format.random_nonces() {
        return 0;
    }
    let ncols = target.columns.len();
    batch
        .cells
        .iter()
        .enumerate()
        .filter(|(i, c)| matches!(c, Cell::Rewritten(_)) && !target.is_hash_column(i % ncols))
        .count() as i64
}

/// Moves the range's checkpoint (or counts a conflict re-read) in the
/// batch's transaction; returns the job's live control as of now, and
/// whether another process asked for the range to be split.
async fn checkpoint(
    tx: &Transaction<'_>,
    job_id: i64,
    owner: Option<&str>,
    target: &Target,
    commit: Commit<'_>,
    batch: &Batch,
    counts: &Counts,
) -> Result<(Control, bool), Error> {
    let what = || format!("writing a batch to {}", target.table);
    match commit {
        Commit::Range(state) => {
            let lease = owner
                .zip(batch.lease)
                .map(|(owner, generation)| state::Lease { owner, generation });
            let Some((word, split_wanted)) = state::record_batch(
                tx,
                job_id,
                state,
                lease,
                state::Reached {
                    last: batch.last_key.as_ref(),
                    end: batch.end,
                    upper: batch.upper.as_ref(),
                },
                counts,
            )
            .await
            .ctx(what)?
            else {
                let owner = owner.unwrap_or("");
                events::LeaseChanged {
                    kind: LeaseChange::Lost,
                    table: &target.table.to_string(),
                    range_no: state.range_no,
                    owner,
                }
                .emit();
                return Err(Error::LeaseLost(format!(
                    "range {} of {} was taken over by another rekey process (this one stopped renewing its lease); \
                     the batch was rolled back, nothing of it was written",
                    state.range_no, target.table
                )));
            };
            Ok((Control::stored(&word)?, split_wanted))
        }
        Commit::Retry(_) => {
            state::record_retry(tx, job_id, target.index, &target.table.to_string(), counts)
                .await
                .ctx(what)?;
            Ok((Control::Run, false))
        }
    }
}

/// The error for a key that has used up its random nonces (README, Guarantees 7).
pub fn nonce_budget_spent(target: &Target, used: i64, what: &str) -> Error {
    Error::Config(format!(
        "key {} has already encrypted {used} values with random 96-bit nonces, and {what} would pass the limit of 2^32 \
         (NIST SP 800-38D); stage a new key and rotate to it instead (rekey.key_usage counts per key fingerprint)",
        target.target_label()
    ))
}
