//! Sink: the only stage that writes to user tables.
//!
//! One transaction per batch: binary COPY of the re-encrypted values into a
//! temp stage table, one `UPDATE ... FROM` that replaces a value only where
//! the row still holds exactly what was read (compare-and-swap), the
//! quarantine rows, and the batch's checkpoint; then COMMIT. A row changed by
//! the application in between is left alone and counted as a conflict.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement, Transaction};

use crate::db::binary_copy::CopyBuffer;
use crate::state::{self, Control, RangeState};
use crate::db::raw::{self, params};
use crate::db::session::Timeouts;
use crate::db::Database;
use crate::error::DbContext;
use crate::job::{Job, Target};
use crate::db::KeyBytes;
use crate::engine::sql;
use crate::observe::counts::Counts;
use crate::engine::transform::{self, Cell};
use crate::observe::events::{self, LeaseChange};
use crate::Error;

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
}

/// A batch on its way through the pipeline.
pub struct Batch {
    /// Index of the range (in the pipeline's range list) it belongs to.
    pub range_index: usize,
    /// The rows read, key columns first.
    pub rows: Vec<Row>,
    /// Row-major decisions, filled by the transform.
    pub cells: Vec<Cell>,
    /// Key of the last row read, where the next page starts.
    pub last_key: Option<KeyBytes>,
    /// Whether this is the last batch of its range.
    pub end: bool,
    /// The generation of the range's lease it was read under (`None`: not leased).
    pub lease: Option<i64>,
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
struct Prepared {
    /// The compare-and-swap UPDATE, bounded by the batch's key range.
    update: Statement,
    /// The same without key bounds (conflict re-reads are not contiguous).
    update_any: Statement,
    /// The quarantine INSERT.
    quarantine: Statement,
    /// Where each staged row stands after the UPDATE (run when not every row landed).
    outcome: Statement,
    /// The not-rotated INSERT.
    not_rotated: Statement,
}

/// Why a value was not rotated: the database refused or undid rekey's write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRotated {
    /// The row still held what was read but the UPDATE left it alone: a
    /// trigger returned NULL, a row-level security policy or a rule.
    WriteRefused,
    /// The UPDATE ran, but the stored value is not what rekey wrote: a
    /// BEFORE trigger changed it.
    WriteUndone,
}

impl NotRotated {
    /// The word stored in `rekey.not_rotated.reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            NotRotated::WriteRefused => "write_refused",
            NotRotated::WriteUndone => "write_undone",
        }
    }
}

/// What the compare-and-swap found for the rows it staged.
#[derive(Debug, Default)]
struct Swapped {
    /// Rows someone changed or deleted since they were read, or (on the
    /// first try) whose write was refused or undone: re-read later.
    conflicted: HashSet<KeyBytes>,
    /// (row, column) of values whose write was refused or undone again on a
    /// re-read: not rotated.
    not_rotated: HashMap<(usize, usize), NotRotated>,
    /// (row, column) of values that landed in rows that are re-read for
    /// their other values.
    landed_in_conflicted: HashSet<(usize, usize)>,
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
    /// The last key this writer committed in each (target, range), to tell
    /// after a reconnect whether the server lost acknowledged commits.
    ledger: HashMap<(usize, i32), KeyBytes>,
}

/// Where a batch stands after its connection broke and was reopened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterReconnect {
    /// Its COMMIT landed before the break: do not redo it.
    Committed,
    /// It did not commit, and nothing before it was lost: redo it.
    NotCommitted,
    /// The server lost batches it had acknowledged (a crash; rekey's commits
    /// are asynchronous): pages read since are ahead of what is durable.
    Lost,
}

impl Writer {
    /// Opens a writing connection with stage tables and statements for every target.
    pub async fn connect(db: &Database, job: &Job, job_id: i64) -> Result<Writer, Error> {
        Self::connect_as(db, job, job_id, None, Timeouts::default()).await
    }

    /// As [`Writer::connect`], for the lease holder `owner`, with `timeouts`.
    pub async fn connect_as(db: &Database, job: &Job, job_id: i64, owner: Option<String>, timeouts: Timeouts) -> Result<Writer, Error> {
        let (client, prepared) = Self::open(db, job, timeouts).await?;
        Ok(Writer { client, db: db.clone(), job_id, owner, timeouts, prepared, ledger: HashMap::new() })
    }

    /// Replaces a broken connection with a new one.
    pub async fn reconnect(&mut self, job: &Job) -> Result<(), Error> {
        let (client, prepared) = Self::open(&self.db, job, self.timeouts).await?;
        self.client = client;
        self.prepared = prepared;
        Ok(())
    }

    /// After a reconnect: whether the batch ending at `last` of `state`
    /// committed, and whether every batch this writer committed before it
    /// is still there (a crash can lose acknowledged asynchronous commits,
    /// each together with its checkpoint).
    pub async fn after_reconnect(&self, state: &RangeState, last: Option<&KeyBytes>) -> Result<AfterReconnect, Error> {
        let rows = self
            .client
            .query("SELECT target, range_no, last_key, owner FROM rekey.progress WHERE job_id = $1 AND range_no >= 0", &[&self.job_id])
            .await
            .ctx(|| "checking the checkpoints after a reconnect".into())?;
        let mut this = None;
        for r in &rows {
            let key = (usize::try_from(r.get::<_, i32>(0)).unwrap_or(usize::MAX), r.get::<_, i32>(1));
            let durable: Option<KeyBytes> = r.get(2);
            let owner: Option<String> = r.get(3);
            if key == (state.target, state.range_no) {
                this = Some(durable.clone());
            }
            // ranges another process has taken over are theirs to finish, from what is durable
            if owner.is_some() && owner != self.owner {
                continue;
            }
            if let Some(committed) = self.ledger.get(&key) {
                if durable.as_ref() != Some(committed) && !(key == (state.target, state.range_no) && durable.as_ref() == last && last.is_some()) {
                    return Ok(AfterReconnect::Lost);
                }
            }
        }
        Ok(match (this, last) {
            (Some(Some(durable)), Some(last)) if &durable == last => AfterReconnect::Committed,
            _ => AfterReconnect::NotCommitted,
        })
    }

    async fn open(db: &Database, job: &Job, timeouts: Timeouts) -> Result<(Client, HashMap<usize, Prepared>), Error> {
        let client = db.connect().await?;
        // The checkpoint commits with its batch, so a commit lost in a crash
        // loses both together and the batch is simply redone.
        client.batch_execute("SET synchronous_commit = off").await.ctx(|| "configuring the writer connection".into())?;
        client.batch_execute(&timeouts.session_sql()).await.ctx(|| "configuring the writer connection".into())?;
        let mut prepared = HashMap::new();
        for t in &job.targets {
            let what = || format!("preparing writes to {}", t.table);
            client.batch_execute(&sql::create_stage(t)).await.ctx(what)?;
            let update = client.prepare(&sql::update_from_stage(t, true)).await.ctx(what)?;
            let update_any = client.prepare(&sql::update_from_stage(t, false)).await.ctx(what)?;
            let quarantine = client.prepare(&sql::insert_quarantine(t)).await.ctx(what)?;
            let outcome = client.prepare(&sql::staged_outcome(t)).await.ctx(what)?;
            let not_rotated = client.prepare(&sql::insert_not_rotated(t)).await.ctx(what)?;
            prepared.insert(t.index, Prepared { update, update_any, quarantine, outcome, not_rotated });
        }
        Ok((client, prepared))
    }

    /// Commits one batch and its checkpoint; returns what it did.
    pub async fn write(&mut self, target: &Target, commit: Commit<'_>, batch: &Batch) -> Result<Written, Error> {
        let what = || format!("writing a batch to {}", target.table);
        let mut counts = Counts { rows_scanned: batch.rows.len() as u64, ..Counts::default() };
        let staged: Vec<usize> = transform::rewritten_rows(&batch.cells, target.columns.len()).collect();
        let tx = self.client.transaction().await.ctx(what)?;
        let p = &self.prepared[&target.index];
        let swapped = if staged.is_empty() { Swapped::default() } else { swap(&tx, p, target, commit, batch, &staged, &mut counts).await.ctx(what)? };
        let failures = tally_and_quarantine(&tx, p, self.job_id, target, batch, &swapped, &mut counts).await.ctx(what)?;
        record_not_rotated(&tx, p, self.job_id, target, batch, &swapped).await.ctx(what)?;
        let job = self.job_id;
        if let Commit::Retry(keys) = commit {
            state::conflicts::clear(&tx, job, target.index, keys).await.ctx(what)?;
        }
        state::conflicts::add(&tx, job, target.index, &swapped.conflicted).await.ctx(what)?;
        if target.write.format.random_nonces() && !staged.is_empty() {
            // The nonce budget (README, Guarantees 7): every staged value was encrypted under a fresh random nonce.
            let encrypted = batch.cells.iter().filter(|c| matches!(c, Cell::Rewritten(_))).count() as i64;
            let key = target.write.keyring.target();
            let total = state::count_encryptions(&tx, &key.fingerprint(), &target.target_label(), encrypted).await.ctx(what)?;
            if total > state::NONCE_BUDGET {
                return Err(nonce_budget_spent(target, total - encrypted, "this batch (rolled back)"));
            }
        }
        let control = checkpoint(&tx, self.job_id, self.owner.as_deref(), target, commit, batch, &counts).await?;
        tx.commit().await.ctx(what)?;
        if let (Commit::Range(state), Some(last)) = (commit, &batch.last_key) {
            self.ledger.insert((state.target, state.range_no), last.clone());
        }
        Ok(Written { counts, failures, control })
    }
}

/// Counts every value of the batch by what became of it, and records the
/// ones that did not open in `rekey.quarantine`.
async fn tally_and_quarantine(
    tx: &Transaction<'_>,
    p: &Prepared,
    job_id: i64,
    target: &Target,
    batch: &Batch,
    swapped: &Swapped,
    counts: &mut Counts,
) -> Result<Vec<Failure>, tokio_postgres::Error> {
    let ncols = target.columns.len();
    let mut failures = Vec::new();
    for (r, row) in batch.rows.iter().enumerate() {
        let row_conflicted = !swapped.conflicted.is_empty() && swapped.conflicted.contains(&target.row_key(row));
        for (c, cell) in batch.cells[r * ncols..(r + 1) * ncols].iter().enumerate() {
            match cell {
                Cell::Rewritten(_) if swapped.not_rotated.contains_key(&(r, c)) => counts.values_not_rotated += 1,
                Cell::Rewritten(_) if !row_conflicted || swapped.landed_in_conflicted.contains(&(r, c)) => counts.values_rewritten += 1,
                Cell::Rewritten(_) | Cell::Opened(..) => {}
                Cell::Null | Cell::Current => counts.values_skipped += 1,
                Cell::Failed(e) => {
                    counts.values_failed += 1;
                    let key = target.row_key(row);
                    let pk: Vec<&[u8]> = key.iter().map(|k| k.as_slice()).collect();
                    let table = target.table.to_string();
                    let column = &target.columns[c].name;
                    let kind = e.kind();
                    let keyp = target.key_params(row);
                    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&job_id, &table, column, &pk, &kind];
                    params.extend(raw::params(&keyp));
                    let key_text: Option<String> = tx.query_one(&p.quarantine, &params).await?.get(0);
                    failures.push(Failure { table, column: column.clone(), key: key_text.unwrap_or_default(), error: kind });
                }
            }
        }
    }
    Ok(failures)
}

/// Records the values whose write was refused or undone on a re-read in
/// `rekey.not_rotated`.
async fn record_not_rotated(tx: &Transaction<'_>, p: &Prepared, job_id: i64, target: &Target, batch: &Batch, swapped: &Swapped) -> Result<(), tokio_postgres::Error> {
    let (target_no, table) = (target.index as i32, target.table.to_string());
    for (&(r, c), reason) in &swapped.not_rotated {
        let row = &batch.rows[r];
        let key = target.row_key(row);
        let pk: Vec<&[u8]> = key.iter().map(|k| k.as_slice()).collect();
        let keyp = target.key_params(row);
        let reason = reason.as_str();
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&job_id, &target_no, &table, &target.columns[c].name, &pk, &reason];
        params.extend(raw::params(&keyp));
        tx.execute(&p.not_rotated, &params).await?;
    }
    Ok(())
}

/// Moves the range's checkpoint (or counts a conflict re-read) in the
/// batch's transaction; returns the job's live control as of now.
async fn checkpoint(tx: &Transaction<'_>, job_id: i64, owner: Option<&str>, target: &Target, commit: Commit<'_>, batch: &Batch, counts: &Counts) -> Result<Control, Error> {
    let what = || format!("writing a batch to {}", target.table);
    match commit {
        Commit::Range(state) => {
            let lease = owner.zip(batch.lease).map(|(owner, generation)| state::Lease { owner, generation });
            let Some(word) = state::record_batch(tx, job_id, state, lease, batch.last_key.as_ref(), batch.end, counts).await.ctx(what)? else {
                let owner = owner.unwrap_or("");
                events::LeaseChanged { kind: LeaseChange::Lost, table: &target.table.to_string(), range_no: state.range_no, owner }.emit();
                return Err(Error::LeaseLost(format!(
                    "range {} of {} was taken over by another rekey process (this one stopped renewing its lease); \
                     the batch was rolled back, nothing of it was written",
                    state.range_no, target.table
                )));
            };
            Control::stored(&word)
        }
        Commit::Retry(_) => {
            state::record_retry(tx, job_id, target.index, &target.table.to_string(), counts).await.ctx(what)?;
            Ok(Control::Run)
        }
    }
}

/// Stages the batch's new values with binary COPY and swaps them in where
/// each row still holds what was read (compare-and-swap), then checks that
/// what is stored is what was written. A row whose value did not land is
/// re-read later (a conflict); on a re-read, a value whose write the
/// database refuses or undoes again is not rotated.
async fn swap(
    tx: &Transaction<'_>,
    p: &Prepared,
    target: &Target,
    commit: Commit<'_>,
    batch: &Batch,
    staged: &[usize],
    counts: &mut Counts,
) -> Result<Swapped, tokio_postgres::Error> {
    let ncols = target.columns.len();
    let mut buf = CopyBuffer::with_capacity(staged.len() * 160);
    let fields = (target.key.len() + 2 * ncols) as i16;
    for &r in staged {
        let row = &batch.rows[r];
        buf.row(fields);
        for k in raw::leading(row, target.key.len()) {
            buf.field(Some(k));
        }
        for (c, cell) in batch.cells[r * ncols..(r + 1) * ncols].iter().enumerate() {
            buf.field(transform::value(target, row, c));
            buf.field(match cell {
                Cell::Rewritten(v) => Some(v),
                _ => None,
            });
        }
    }
    let copy = tx.copy_in::<_, bytes::Bytes>(&sql::copy_stage(target)).await?;
    futures_util::pin_mut!(copy);
    futures_util::SinkExt::send(&mut copy, buf.finish()).await?;
    copy.finish().await?;

    let answer = match (commit, staged.first(), staged.last()) {
        (Commit::Range(_), Some(&first), Some(&last)) => {
            let lo = target.key_params(&batch.rows[first]);
            let hi = target.key_params(&batch.rows[last]);
            let mut params = params(&lo);
            params.extend(raw::params(&hi));
            tx.query_one(&p.update, &params).await?
        }
        _ => tx.query_one(&p.update_any, &[]).await?,
    };
    let landed = answer.get::<_, i64>(1) as u64;
    counts.rows_rewritten = landed;
    if landed == staged.len() as u64 {
        return Ok(Swapped::default());
    }
    let retry = matches!(commit, Commit::Retry(_));
    let outcomes = staged_outcomes(tx, p, target).await?;
    let mut swapped = Swapped::default();
    counts.rows_rewritten = 0;
    for &r in staged {
        let row = &batch.rows[r];
        let key = target.row_key(row);
        let rewritten: Vec<usize> = (0..ncols).filter(|&c| matches!(batch.cells[r * ncols + c], Cell::Rewritten(_))).collect();
        let Some(o) = outcomes.get(&key) else {
            // deleted meanwhile: the re-read finds nothing left to rotate
            swapped.conflicted.insert(key);
            continue;
        };
        let unlanded: Vec<usize> = rewritten.iter().copied().filter(|&c| !o.landed[c]).collect();
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
            Some(reason) if retry => swapped.not_rotated.extend(unlanded.iter().map(|&c| ((r, c), reason))),
            _ => {
                swapped.landed_in_conflicted.extend(rewritten.iter().copied().filter(|&c| o.landed[c]).map(|c| (r, c)));
                swapped.conflicted.insert(key);
            }
        }
    }
    counts.conflicts = swapped.conflicted.len() as u64;
    Ok(swapped)
}

/// Where one staged row stands after the UPDATE.
struct StagedOutcome {
    /// This transaction updated it.
    touched: bool,
    /// It still holds every value as it was read.
    as_read: bool,
    /// Per encrypted column: it holds what rekey wrote.
    landed: Vec<bool>,
}

/// Where each staged row still in the table stands, by key.
async fn staged_outcomes(tx: &Transaction<'_>, p: &Prepared, target: &Target) -> Result<HashMap<KeyBytes, StagedOutcome>, tokio_postgres::Error> {
    let nkeys = target.key.len();
    let mut out = HashMap::new();
    for row in tx.query(&p.outcome, &[]).await? {
        let landed = (0..target.columns.len()).map(|c| row.try_get(nkeys + 2 + c)).collect::<Result<_, _>>()?;
        let o = StagedOutcome { touched: row.try_get(nkeys)?, as_read: row.try_get(nkeys + 1)?, landed };
        out.insert(raw::key_of(&row, nkeys), o);
    }
    Ok(out)
}

/// The error for a key that has used up its random nonces (README, Guarantees 7).
pub fn nonce_budget_spent(target: &Target, used: i64, what: &str) -> Error {
    Error::Config(format!(
        "key {} has already encrypted {used} values with random 96-bit nonces, and {what} would pass the limit of 2^32 \
         (NIST SP 800-38D); stage a new key and rotate to it instead (rekey.key_usage counts per key fingerprint)",
        target.target_label()
    ))
}

/// Looks up the text form of failed values' keys for reports, writing nothing
/// (`--dry-run` and `verify`).
pub async fn describe_failures(client: &Client, target: &Target, batch: &Batch) -> Result<Vec<Failure>, Error> {
    let ncols = target.columns.len();
    let mut out = Vec::new();
    let mut stmt = None;
    for (r, row) in batch.rows.iter().enumerate() {
        for (c, cell) in batch.cells[r * ncols..(r + 1) * ncols].iter().enumerate() {
            if let Cell::Failed(e) = cell {
                let what = || format!("describing a failed value of {}", target.table);
                if stmt.is_none() {
                    stmt = Some(client.prepare(&sql::key_text(target)).await.ctx(what)?);
                }
                let Some(s) = &stmt else { continue };
                let keyp = target.key_params(row);
                let key: Option<String> = client.query_opt(s, &params(&keyp)).await.ctx(what)?.map(|r| r.get(0));
                out.push(Failure {
                    table: target.table.to_string(),
                    column: target.columns[c].name.clone(),
                    key: key.unwrap_or_default(),
                    error: e.kind(),
                });
            }
        }
    }
    Ok(out)
}
