//! One struct per observable event: its `emit()` writes the log line and
//! updates the metrics together, so the two never drift apart; the engine
//! only builds events and emits them.
//!
//! No event carries a value, plaintext or ciphertext, or key material: labels
//! and fields are table and column names, key ids, counts and error kinds.

use crate::observe::counts::Counts;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Every value in scope is on the target key (quarantined ones aside).
    Done,
    /// Finished, but values are left on an old key (not rotated, or still changing).
    LeftOnOldKeys,
    /// Stopped on request; resumable.
    Stopped,
    /// Stopped at the end of its window; resumable.
    WindowEnded,
    /// Ended by an error.
    Failed,
}

impl RunState {
    /// Every state, for the gauge.
    const ALL: [RunState; 5] = [
        RunState::Done,
        RunState::LeftOnOldKeys,
        RunState::Stopped,
        RunState::WindowEnded,
        RunState::Failed,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Done => "done",
            RunState::LeftOnOldKeys => "left_on_old_keys",
            RunState::Stopped => "stopped",
            RunState::WindowEnded => "window_ended",
            RunState::Failed => "failed",
        }
    }
}

/// A batch committed: rows, values by outcome, conflicts, its duration.
#[derive(Debug)]
pub struct BatchCommitted<'a> {
    /// The table (as named in the job).
    pub table: &'a str,
    /// The target's index in the job.
    pub target: usize,
    /// What the batch did.
    pub counts: &'a Counts,
    /// From reading the batch to its commit.
    pub seconds: f64,
    /// Rows in the batch.
    pub rows: usize,
}

impl BatchCommitted<'_> {
    /// Logs at `debug`; counts rows, values and conflicts, times the batch.
    pub fn emit(&self) {
        let c = self.counts;
        tracing::debug!(
            table = self.table,
            target = self.target,
            rows = self.rows,
            rows_rewritten = c.rows_rewritten,
            values_rewritten = c.values_rewritten,
            values_skipped = c.values_skipped,
            values_failed = c.values_failed,
            conflicts = c.conflicts,
            seconds = self.seconds,
            "batch committed"
        );
        let table = self.table.to_owned();
        metrics::counter!("rekey_rows_scanned_total", "table" => table.clone())
            .increment(c.rows_scanned);
        metrics::counter!("rekey_rows_rewritten_total", "table" => table.clone())
            .increment(c.rows_rewritten);
        for (outcome, n) in [
            ("rewritten", c.values_rewritten),
            ("skipped", c.values_skipped),
            ("failed", c.values_failed),
            ("not_rotated", c.values_not_rotated),
        ] {
            metrics::counter!("rekey_values_total", "table" => table.clone(), "outcome" => outcome)
                .increment(n);
        }
        metrics::counter!("rekey_conflicts_total", "table" => table.clone()).increment(c.conflicts);
        metrics::histogram!("rekey_batch_seconds", "table" => table.clone()).record(self.seconds);
        metrics::gauge!("rekey_batch_rows", "table" => table).set(self.rows as f64);
    }
}

/// A value could not be decrypted and was quarantined. Carries no value.
#[derive(Debug)]
pub struct ValueQuarantined<'a> {
    /// The table.
    pub table: &'a str,
    /// The column.
    pub column: &'a str,
    /// The row's primary key, as text.
    pub key: &'a str,
    /// The error kind.
    pub error: &'static str,
}

impl ValueQuarantined<'_> {
    /// Logs at `debug` (a run warns once per column and error, then sums
    /// up: [`QuarantineSummary`]), and counts by table, column and error
    /// kind (not by row).
    pub fn emit(&self) {
        tracing::debug!(
            "cannot decrypt {}.{} at key {}: {}",
            self.table,
            self.column,
            self.key,
            self.error
        );
        metrics::counter!(
            "rekey_quarantined_total",
            "table" => self.table.to_owned(),
            "column" => self.column.to_owned(),
            "error" => self.error
        )
        .increment(1);
    }
}

/// A throttle paused the run (`Some(reason)`) or let it go on (`None`).
#[derive(Debug)]
pub struct ThrottleChanged<'a> {
    /// Why the run waits, as a stable label value (`replica_lag`, `gate`,
    /// `wal_rate`, `archive_lag`, `archive_failing`, `paused`,
    /// `control_file`, `unreadable`); `None`: running again.
    pub reason: Option<&'a str>,
    /// The reason before this change, whose info series goes back to 0.
    pub previous: Option<&'a str>,
    /// The same, for people: "replica r1 replays 12.0s behind (--max-replica-lag 10s)".
    pub detail: Option<&'a str>,
}

impl ThrottleChanged<'_> {
    /// Logs at `info`; sets `rekey_throttled` and the current reason's info series.
    pub fn emit(&self) {
        match (self.reason, self.detail) {
            (Some(reason), Some(detail)) => tracing::info!(reason, "holding: {detail}"),
            (Some(reason), None) => tracing::info!("holding: {reason}"),
            (None, _) => tracing::info!("reading again"),
        }
        if let Some(previous) = self.previous.filter(|p| Some(*p) != self.reason) {
            metrics::gauge!("rekey_throttle_info", "reason" => previous.to_owned()).set(0.0);
        }
        if let Some(reason) = self.reason {
            metrics::gauge!("rekey_throttle_info", "reason" => reason.to_owned()).set(1.0);
        }
        metrics::gauge!("rekey_throttled").set(if self.reason.is_some() { 1.0 } else { 0.0 });
    }
}

/// A batch failed and will be tried again.
#[derive(Debug)]
pub struct BatchRetried<'a> {
    /// The table.
    pub table: &'a str,
    /// Which attempt failed (1: the first).
    pub attempt: u32,
    /// The error's text (never a value).
    pub error: &'a str,
    /// Rows in the batch.
    pub rows: usize,
    /// How long before the next attempt.
    pub wait_seconds: f64,
}

impl BatchRetried<'_> {
    /// Warns and counts the retry.
    pub fn emit(&self) {
        tracing::warn!(
            attempt = self.attempt,
            rows = self.rows,
            "batch on {} failed, retrying in {:.1}s: {}",
            self.table,
            self.wait_seconds,
            self.error
        );
        metrics::counter!("rekey_batch_retries_total", "table" => self.table.to_owned())
            .increment(1);
    }
}

/// Values of one column that could not be decrypted, for one error kind:
/// warned once when the first is found, and summed up when the run ends.
/// Carries no value.
#[derive(Debug)]
pub struct QuarantineSummary<'a> {
    /// The table.
    pub table: &'a str,
    /// The column.
    pub column: &'a str,
    /// The error kind.
    pub error: &'static str,
    /// Values so far.
    pub count: u64,
    /// The first few rows' keys, as text.
    pub first_keys: &'a [String],
    /// Whether the run is over (the sum) or not (the first of them).
    pub finished: bool,
    /// Whether they go to `rekey.quarantine` (a rewrite) or are only
    /// counted (verify and dry runs write nothing).
    pub recorded: bool,
}

impl QuarantineSummary<'_> {
    /// Warns: one line per column and error kind, however many values.
    pub fn emit(&self) {
        let keys = self.first_keys.join(", ");
        let (table, column, error) = (self.table, self.column, self.error);
        match (self.finished, self.recorded) {
            (true, true) => tracing::warn!(
                count = self.count,
                "quarantined {} values of {table}.{column} ({error}), e.g. at keys {keys}; see rekey.quarantine",
                self.count,
            ),
            (true, false) => tracing::warn!(
                count = self.count,
                "found {} values of {table}.{column} that do not decrypt ({error}), e.g. at keys {keys}; \
                 nothing was recorded (this command writes nothing)",
                self.count,
            ),
            (false, true) => tracing::warn!("values of {table}.{column} do not decrypt ({error}), the first at key {keys}: quarantining them; the run ends with their count"),
            (false, false) => tracing::warn!("values of {table}.{column} do not decrypt ({error}), the first at key {keys}; the command ends with their count"),
        }
    }
}

/// How a range lease changed hands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseChange {
    /// A free range was leased.
    Taken,
    /// A range was taken over from an owner that stopped renewing it.
    TakenOver,
    /// This process's lease passed to another.
    Lost,
    /// A range was given back.
    Released,
}

impl LeaseChange {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseChange::Taken => "taken",
            LeaseChange::TakenOver => "taken_over",
            LeaseChange::Lost => "lost",
            LeaseChange::Released => "released",
        }
    }
}

/// A range lease changed hands.
#[derive(Debug)]
pub struct LeaseChanged<'a> {
    /// How.
    pub kind: LeaseChange,
    /// The table.
    pub table: &'a str,
    /// The range.
    pub range_no: i32,
    /// The lease's owner.
    pub owner: &'a str,
}

impl LeaseChanged<'_> {
    /// Logs (`info` for taken_over and lost, `debug` otherwise) and counts by kind.
    pub fn emit(&self) {
        let (table, n, owner) = (self.table, self.range_no, self.owner);
        match self.kind {
            LeaseChange::TakenOver => tracing::info!(owner, "took over range {n} of {table}"),
            LeaseChange::Lost => tracing::info!(owner, "lost the lease on range {n} of {table}"),
            LeaseChange::Taken => tracing::debug!(owner, "leased range {n} of {table}"),
            LeaseChange::Released => tracing::debug!(owner, "released range {n} of {table}"),
        }
        metrics::counter!("rekey_leases_total", "kind" => self.kind.as_str()).increment(1);
    }
}

/// How far the current phase is; gauges only (the progress display logs).
#[derive(Debug, Clone, Copy)]
pub struct ProgressSampled {
    /// Rows done so far.
    pub rows_done: u64,
    /// Rows expected in all, when known.
    pub rows_total: Option<u64>,
    /// Rows per second since the phase started.
    pub rows_per_second: f64,
    /// Seconds left, when known.
    pub eta_seconds: Option<f64>,
}

impl ProgressSampled {
    /// Sets the progress gauges (`rekey_rows_total` and `rekey_eta_seconds`
    /// to NaN while unknown).
    pub fn emit(&self) {
        metrics::gauge!("rekey_rows_done").set(self.rows_done as f64);
        metrics::gauge!("rekey_rows_total").set(self.rows_total.map_or(f64::NAN, |r| r as f64));
        metrics::gauge!("rekey_rows_per_second").set(self.rows_per_second);
        metrics::gauge!("rekey_eta_seconds").set(self.eta_seconds.unwrap_or(f64::NAN));
    }
}

/// Batches waiting between two stages; a gauge only.
#[derive(Debug, Clone, Copy)]
pub struct QueueDepth {
    /// "to_transform" or "to_sink".
    pub stage: &'static str,
    /// Batches waiting, summed over lanes.
    pub depth: usize,
}

impl QueueDepth {
    /// Sets `rekey_queue_depth{stage}`.
    pub fn emit(&self) {
        metrics::gauge!("rekey_queue_depth", "stage" => self.stage).set(self.depth as f64);
    }
}

/// Pages read and not yet written or dropped, all lanes; a gauge only.
#[derive(Debug, Clone, Copy)]
pub struct PagesHeld {
    /// Pages held.
    pub pages: usize,
}

impl PagesHeld {
    /// Sets `rekey_pages_held`.
    pub fn emit(&self) {
        metrics::gauge!("rekey_pages_held").set(self.pages as f64);
    }
}

/// A run ended.
#[derive(Debug)]
pub struct RunFinished<'a> {
    /// The job's name.
    pub job: &'a str,
    /// How.
    pub state: RunState,
    /// How long the run took.
    pub seconds: f64,
}

impl RunFinished<'_> {
    /// Logs at `info`; sets `rekey_run_state` to 1 for this state, 0 for the others.
    pub fn emit(&self) {
        tracing::info!(
            "job {}: {} after {:.1}s",
            self.job,
            self.state.as_str(),
            self.seconds
        );
        for other in RunState::ALL.into_iter().filter(|s| *s != self.state) {
            metrics::gauge!("rekey_run_state", "state" => other.as_str()).set(0.0);
        }
        metrics::gauge!("rekey_run_state", "state" => self.state.as_str()).set(1.0);
    }
}

#[cfg(test)]
mod tests;
