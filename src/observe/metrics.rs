//! Logs and metrics, one struct per observable event.
//!
//! Each event's `emit()` writes its log line and updates its metrics together,
//! so the two never drift apart; the pipeline only builds events and emits
//! them. Logs go to stderr through `tracing` ([`init_logging`]); metrics go
//! through the `metrics` facade to a Prometheus endpoint ([`serve`]). With no
//! recorder installed the metric calls do nothing.
//!
//! No event carries a value, plaintext or ciphertext, or key material: labels
//! and fields are table and column names, key ids, counts and error kinds.

use std::net::SocketAddr;
use std::sync::Once;

use metrics::Unit;
use metrics_exporter_prometheus::PrometheusBuilder;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::observe::counts::Counts;
use crate::Error;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// Human lines: `rekey: <message> key=value ...`.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, message and fields.
    Json,
}

/// The filter when `RUST_LOG` is unset.
const DEFAULT_FILTER: &str = "info";

/// Installs the tracing subscriber on stderr, filtered by `RUST_LOG` (default
/// `info`). Only the first call installs anything; later calls do nothing.
pub fn init_logging(format: LogFormat) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let (filter, bad_filter) = match EnvFilter::try_from_default_env() {
            Ok(filter) => (filter, None),
            Err(e) => {
                let bad = std::env::var("RUST_LOG").ok().map(|_| e.to_string());
                (EnvFilter::new(DEFAULT_FILTER), bad)
            }
        };
        // Fails only when another subscriber is already installed: keep that one.
        if tracing::subscriber::set_global_default(subscriber(format, filter, std::io::stderr)).is_ok() {
            if let Some(e) = bad_filter {
                tracing::warn!("RUST_LOG ignored ({e}); logging at {DEFAULT_FILTER}");
            }
        }
    });
}

/// The subscriber [`init_logging`] installs, writing to `writer`.
fn subscriber<W>(format: LogFormat, filter: EnvFilter, writer: W) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.event_format(TextLine).finish()),
        LogFormat::Json => Box::new(
            builder.json().flatten_event(true).with_current_span(false).with_span_list(false).with_target(false).finish(),
        ),
    }
}

/// The text format: `rekey: message key=value ...`, with `warning: ` or
/// `error: ` after the program name for those levels; no timestamp.
struct TextLine;

impl<S, N> FormatEvent<S, N> for TextLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let prefix = match *event.metadata().level() {
            Level::ERROR => "rekey: error: ",
            Level::WARN => "rekey: warning: ",
            _ => "rekey: ",
        };
        writer.write_str(prefix)?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// What kind of metric a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric rekey exports: name, kind, unit, help. README's table lists the same.
const METRICS: &[(&str, Kind, Option<Unit>, &str)] = &[
    ("rekey_rows_scanned_total", Kind::Counter, Some(Unit::Count), "Rows read in committed batches, by table."),
    ("rekey_rows_rewritten_total", Kind::Counter, Some(Unit::Count), "Rows whose new values committed, by table."),
    ("rekey_values_total", Kind::Counter, Some(Unit::Count), "Values in committed batches, by table and outcome (rewritten, skipped, failed, not_rotated)."),
    ("rekey_conflicts_total", Kind::Counter, Some(Unit::Count), "Rows the application changed between read and write, left alone and re-read later, by table."),
    ("rekey_batch_seconds", Kind::Histogram, Some(Unit::Seconds), "Time from reading a batch to its commit, by table."),
    ("rekey_batch_rows", Kind::Gauge, Some(Unit::Count), "Rows in the last committed batch, by table."),
    ("rekey_quarantined_total", Kind::Counter, Some(Unit::Count), "Values that could not be decrypted and were quarantined, by table, column and error kind."),
    ("rekey_batch_retries_total", Kind::Counter, Some(Unit::Count), "Batches retried after a transient failure, by table."),
    ("rekey_throttled", Kind::Gauge, None, "1 while the run is paused by a throttle, else 0."),
    ("rekey_throttle_info", Kind::Gauge, None, "1 for the reason the run is paused now, 0 for earlier reasons."),
    ("rekey_leases_total", Kind::Counter, Some(Unit::Count), "Range lease changes, by kind (taken, taken_over, lost, released)."),
    ("rekey_rows_done", Kind::Gauge, Some(Unit::Count), "Rows done so far in the current phase (rewriting or verifying)."),
    ("rekey_rows_total", Kind::Gauge, Some(Unit::Count), "Rows the current phase expects in all."),
    ("rekey_rows_per_second", Kind::Gauge, Some(Unit::CountPerSecond), "Rows per second since the current phase started."),
    ("rekey_eta_seconds", Kind::Gauge, Some(Unit::Seconds), "Estimated seconds left in the current phase (NaN while unknown)."),
    ("rekey_queue_depth", Kind::Gauge, Some(Unit::Count), "Batches waiting between pipeline stages, summed over lanes, by stage (to_transform, to_sink)."),
    ("rekey_run_state", Kind::Gauge, None, "1 for the state the last run ended in (done, left_on_old_keys, stopped, window_ended, failed), else 0."),
];

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
    const ALL: [RunState; 5] = [RunState::Done, RunState::LeftOnOldKeys, RunState::Stopped, RunState::WindowEnded, RunState::Failed];

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

/// Bucket bounds of `rekey_batch_seconds`, in seconds.
const BATCH_SECONDS_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Registers the help text and unit of every metric with the installed recorder.
fn describe() {
    for &(name, kind, unit, help) in METRICS {
        match (kind, unit) {
            (Kind::Counter, Some(u)) => metrics::describe_counter!(name, u, help),
            (Kind::Counter, None) => metrics::describe_counter!(name, help),
            (Kind::Gauge, Some(u)) => metrics::describe_gauge!(name, u, help),
            (Kind::Gauge, None) => metrics::describe_gauge!(name, help),
            (Kind::Histogram, Some(u)) => metrics::describe_histogram!(name, u, help),
            (Kind::Histogram, None) => metrics::describe_histogram!(name, help),
        }
    }
}

/// The exporter's settings: real histogram buckets for batch times, so
/// quantiles can be aggregated over processes.
fn builder() -> Result<PrometheusBuilder, Error> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("rekey_batch_seconds".to_owned()),
            BATCH_SECONDS_BUCKETS,
        )
        .map_err(|e| Error::Runtime(format!("cannot set up the metrics exporter: {e}")))
}

/// Serves `GET /metrics` for Prometheus on `addr` and installs the recorder.
/// Inside a tokio runtime the listener runs on it; outside, on a thread of its
/// own. Fails with [`Error::Config`] naming `addr` when it cannot bind.
pub fn serve(addr: SocketAddr) -> Result<(), Error> {
    builder()?.with_http_listener(addr).install().map_err(|e| match e {
        metrics_exporter_prometheus::BuildError::FailedToCreateHTTPListener(why) => {
            Error::Config(format!("cannot serve metrics on {addr}: {why}; pick another address with --metrics-addr"))
        }
        other => Error::Runtime(format!("cannot serve metrics on {addr}: {other}")),
    })?;
    describe();
    Ok(())
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
        metrics::counter!("rekey_rows_scanned_total", "table" => table.clone()).increment(c.rows_scanned);
        metrics::counter!("rekey_rows_rewritten_total", "table" => table.clone()).increment(c.rows_rewritten);
        for (outcome, n) in [("rewritten", c.values_rewritten), ("skipped", c.values_skipped), ("failed", c.values_failed), ("not_rotated", c.values_not_rotated)] {
            metrics::counter!("rekey_values_total", "table" => table.clone(), "outcome" => outcome).increment(n);
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
        tracing::debug!("cannot decrypt {}.{} at key {}: {}", self.table, self.column, self.key, self.error);
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
    /// `paused`, `control_file`, `unreadable`); `None`: running again.
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
        metrics::counter!("rekey_batch_retries_total", "table" => self.table.to_owned()).increment(1);
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
}

impl QuarantineSummary<'_> {
    /// Warns: one line per column and error kind, however many values.
    pub fn emit(&self) {
        let keys = self.first_keys.join(", ");
        if self.finished {
            tracing::warn!(count = self.count, "quarantined {} values of {}.{} ({}), e.g. at keys {keys}; see rekey.quarantine", self.count, self.table, self.column, self.error);
        } else {
            tracing::warn!("values of {}.{} do not decrypt ({}), the first at key {keys}: quarantining them; the run ends with their count", self.table, self.column, self.error);
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
    /// Rows expected in all.
    pub rows_total: u64,
    /// Rows per second since the phase started.
    pub rows_per_second: f64,
    /// Seconds left, when known.
    pub eta_seconds: Option<f64>,
}

impl ProgressSampled {
    /// Sets the progress gauges (`rekey_eta_seconds` to NaN while unknown).
    pub fn emit(&self) {
        metrics::gauge!("rekey_rows_done").set(self.rows_done as f64);
        metrics::gauge!("rekey_rows_total").set(self.rows_total as f64);
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
        tracing::info!("job {}: {} after {:.1}s", self.job, self.state.as_str(), self.seconds);
        for other in RunState::ALL.into_iter().filter(|s| *s != self.state) {
            metrics::gauge!("rekey_run_state", "state" => other.as_str()).set(0.0);
        }
        metrics::gauge!("rekey_run_state", "state" => self.state.as_str()).set(1.0);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};

    use metrics_exporter_prometheus::PrometheusHandle;

    use super::*;

    /// Runs `f` with a fresh Prometheus recorder on this thread; returns what `/metrics` would show.
    fn rendered(f: impl FnOnce()) -> String {
        let recorder = builder().expect("builder").build_recorder();
        let handle: PrometheusHandle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe();
            f();
        });
        handle.render()
    }

    /// A `MakeWriter` into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Buffer {
            self.clone()
        }
    }

    /// The log lines `f` writes in `format`, at `debug` and above.
    fn logged(format: LogFormat, f: impl FnOnce()) -> String {
        let buf = Buffer::default();
        tracing::subscriber::with_default(subscriber(format, EnvFilter::new("debug"), buf.clone()), f);
        let bytes = buf.0.lock().expect("buffer").clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    fn counts() -> Counts {
        Counts { rows_scanned: 10, rows_rewritten: 8, values_rewritten: 15, values_skipped: 3, values_failed: 1, conflicts: 2, values_not_rotated: 4 }
    }

    #[test]
    fn batch_committed_counts_per_table_and_outcome() {
        let c = counts();
        let out = rendered(|| BatchCommitted { table: "users", target: 0, counts: &c, seconds: 0.2, rows: 10 }.emit());
        for line in [
            r#"rekey_rows_scanned_total{table="users"} 10"#,
            r#"rekey_rows_rewritten_total{table="users"} 8"#,
            r#"rekey_values_total{table="users",outcome="rewritten"} 15"#,
            r#"rekey_values_total{table="users",outcome="skipped"} 3"#,
            r#"rekey_values_total{table="users",outcome="failed"} 1"#,
            r#"rekey_values_total{table="users",outcome="not_rotated"} 4"#,
            r#"rekey_conflicts_total{table="users"} 2"#,
            r#"rekey_batch_seconds_bucket{table="users",le="0.25"} 1"#,
            r#"rekey_batch_seconds_count{table="users"} 1"#,
            r#"rekey_batch_rows{table="users"} 10"#,
            "# HELP rekey_batch_seconds ",
            "# TYPE rekey_batch_seconds histogram",
        ] {
            assert!(out.contains(line), "{line} missing from:\n{out}");
        }
    }

    #[test]
    fn every_other_event_renders_its_series() {
        let out = rendered(|| {
            ValueQuarantined { table: "users", column: "ssn", key: "42", error: "authentication" }.emit();
            BatchRetried { table: "users", attempt: 1, error: "connection reset", rows: 10, wait_seconds: 0.5 }.emit();
            LeaseChanged { kind: LeaseChange::TakenOver, table: "users", range_no: 3, owner: "host-a:12" }.emit();
            ProgressSampled { rows_done: 50, rows_total: 200, rows_per_second: 25.0, eta_seconds: None }.emit();
            QueueDepth { stage: "to_sink", depth: 4 }.emit();
            RunFinished { job: "quarterly", state: RunState::WindowEnded, seconds: 12.0 }.emit();
        });
        for line in [
            r#"rekey_quarantined_total{table="users",column="ssn",error="authentication"} 1"#,
            r#"rekey_batch_retries_total{table="users"} 1"#,
            r#"rekey_leases_total{kind="taken_over"} 1"#,
            "rekey_rows_done 50",
            "rekey_rows_total 200",
            "rekey_rows_per_second 25",
            "rekey_eta_seconds NaN",
            r#"rekey_queue_depth{stage="to_sink"} 4"#,
            r#"rekey_run_state{state="window_ended"} 1"#,
            r#"rekey_run_state{state="done"} 0"#,
        ] {
            assert!(out.contains(line), "{line} missing from:\n{out}");
        }
    }

    #[test]
    fn throttle_info_follows_the_current_reason() {
        let out = rendered(|| {
            ThrottleChanged { reason: Some("replica lag"), previous: None, detail: None }.emit();
            ThrottleChanged { reason: Some("gate query"), previous: Some("replica lag"), detail: Some("the gate said no") }.emit();
        });
        assert!(out.contains("rekey_throttled 1"), "{out}");
        assert!(out.contains(r#"rekey_throttle_info{reason="replica lag"} 0"#), "{out}");
        assert!(out.contains(r#"rekey_throttle_info{reason="gate query"} 1"#), "{out}");
        let out = rendered(|| ThrottleChanged { reason: None, previous: Some("gate query"), detail: None }.emit());
        assert!(out.contains("rekey_throttled 0"), "{out}");
        assert!(out.contains(r#"rekey_throttle_info{reason="gate query"} 0"#), "{out}");
    }

    #[test]
    fn json_logs_are_one_object_per_line() {
        let out = logged(LogFormat::Json, || {
            BatchRetried { table: "users", attempt: 2, error: "connection reset", rows: 10, wait_seconds: 1.5 }.emit();
            ThrottleChanged { reason: None, previous: None, detail: None }.emit();
        });
        let lines: Vec<serde_json::Value> =
            out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
        assert_eq!(lines.len(), 2, "{out}");
        let first = &lines[0];
        assert_eq!(first["level"], "WARN");
        assert_eq!(first["message"], "batch on users failed, retrying in 1.5s: connection reset");
        assert_eq!(first["attempt"], 2);
        assert_eq!(first["rows"], 10);
        assert!(first["timestamp"].is_string(), "{first}");
        assert_eq!(lines[1]["message"], "reading again");
    }

    #[test]
    fn text_logs_name_the_program_and_the_level() {
        let out = logged(LogFormat::Text, || {
            LeaseChanged { kind: LeaseChange::Lost, table: "users", range_no: 3, owner: "host-b:7" }.emit();
            BatchRetried { table: "users", attempt: 2, error: "connection reset", rows: 10, wait_seconds: 1.5 }.emit();
        });
        assert_eq!(
            out,
            "rekey: lost the lease on range 3 of users owner=\"host-b:7\"\n\
             rekey: warning: batch on users failed, retrying in 1.5s: connection reset attempt=2 rows=10\n"
        );
    }

    #[test]
    fn quarantine_warnings_name_table_column_key_and_error_once_per_column() {
        // Values never reach these events: they have no field for one. What
        // can go wrong is the wording and the count, checked here.
        let event = ValueQuarantined { table: "patients", column: "phone", key: "(7)", error: "authentication" };
        let keys = ["(7)".to_string(), "(9)".to_string()];
        let first = QuarantineSummary { table: "patients", column: "phone", error: "authentication", count: 1, first_keys: &keys[..1], finished: false };
        let summary = QuarantineSummary { table: "patients", column: "phone", error: "authentication", count: 2, first_keys: &keys, finished: true };
        let per_value = logged(LogFormat::Json, || event.emit());
        assert!(per_value.contains("cannot decrypt patients.phone at key (7): authentication") && per_value.contains("DEBUG"), "{per_value}");
        let warned = logged(LogFormat::Text, || {
            first.emit();
            summary.emit();
        });
        assert_eq!(warned.lines().count(), 2, "{warned}");
        assert!(warned.contains("values of patients.phone do not decrypt (authentication), the first at key (7)"), "{warned}");
        assert!(warned.contains("quarantined 2 values of patients.phone (authentication), e.g. at keys (7), (9)"), "{warned}");
        let counted = rendered(|| event.emit());
        assert!(counted.contains(r#"rekey_quarantined_total{table="patients",column="phone",error="authentication"} 1"#), "{counted}");
    }

    #[test]
    fn serve_exports_help_lines_and_names_an_address_it_cannot_bind() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let busy = taken.local_addr().expect("addr");
        match rt.block_on(async { serve(busy) }) {
            Err(Error::Config(msg)) => assert!(msg.contains(&busy.to_string()), "{msg}"),
            other => panic!("expected a configuration error, got {other:?}"),
        }
        let free = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port");
        rt.block_on(async { serve(free) }).expect("serve");
        QueueDepth { stage: "to_transform", depth: 1 }.emit();
        let mut stream = std::net::TcpStream::connect(free).expect("connect");
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("request");
        let mut page = String::new();
        stream.read_to_string(&mut page).expect("response");
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(page.contains("# HELP rekey_queue_depth "), "{page}");
        assert!(page.contains(r#"rekey_queue_depth{stage="to_transform"} 1"#), "{page}");
    }

    #[test]
    fn readme_lists_every_metric() {
        let readme = include_str!("../../README.md");
        for (name, ..) in METRICS {
            assert!(readme.contains(&format!("`{name}`")), "README's metrics table lacks {name}");
        }
    }
}
