//! The Prometheus side of rekey's events: every metric it exports (README
//! lists the same), and the `/metrics` endpoint ([`serve`]). The events
//! themselves are in [`super::events`]; with no recorder installed their
//! metric calls do nothing.

use std::net::SocketAddr;

use metrics::Unit;
use metrics_exporter_prometheus::PrometheusBuilder;

use crate::Error;

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
    ("rekey_rows_done", Kind::Gauge, Some(Unit::Count), "Rows done so far in the current phase (rewriting, re-reading changed rows, or verifying)."),
    ("rekey_rows_total", Kind::Gauge, Some(Unit::Count), "Rows the current phase expects in all."),
    ("rekey_rows_per_second", Kind::Gauge, Some(Unit::CountPerSecond), "Rows per second since the current phase started."),
    ("rekey_eta_seconds", Kind::Gauge, Some(Unit::Seconds), "Estimated seconds left in the current phase (NaN while unknown)."),
    ("rekey_queue_depth", Kind::Gauge, Some(Unit::Count), "Batches waiting between pipeline stages, summed over lanes, by stage (to_transform, to_sink)."),
    ("rekey_pages_held", Kind::Gauge, Some(Unit::Count), "Pages the lanes read and have not yet written or dropped, summed over lanes: what the run holds in memory (a conflict's re-read is not counted)."),
    ("rekey_run_state", Kind::Gauge, None, "1 for the state the last run ended in (done, left_on_old_keys, stopped, window_ended, failed), else 0."),
];

/// Bucket bounds of `rekey_batch_seconds`, in seconds.
const BATCH_SECONDS_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

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

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{Read, Write};

    use metrics_exporter_prometheus::PrometheusHandle;

    use super::*;
    use crate::observe::events::QueueDepth;

    /// Runs `f` with a fresh Prometheus recorder on this thread; returns what `/metrics` would show.
    pub(crate) fn rendered(f: impl FnOnce()) -> String {
        let recorder = builder().expect("builder").build_recorder();
        let handle: PrometheusHandle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe();
            f();
        });
        handle.render()
    }

    #[test]
    fn serve_exports_help_lines_and_names_an_address_it_cannot_bind() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let busy = taken.local_addr().expect("addr");
        match rt.block_on(async { serve(busy) }) {
            Err(Error::Config(msg)) => assert!(msg.contains(&busy.to_string()), "{msg}"),
            other => panic!("expected a configuration error, got {other:?}"),
        }
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        rt.block_on(async { serve(free) }).expect("serve");
        QueueDepth {
            stage: "to_transform",
            depth: 1,
        }
        .emit();
        let mut stream = std::net::TcpStream::connect(free).expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("request");
        let mut page = String::new();
        stream.read_to_string(&mut page).expect("response");
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(page.contains("# HELP rekey_queue_depth "), "{page}");
        assert!(
            page.contains(r#"rekey_queue_depth{stage="to_transform"} 1"#),
            "{page}"
        );
    }

    #[test]
    fn readme_lists_every_metric() {
        let readme = include_str!("../../README.md");
        for (name, ..) in METRICS {
            assert!(
                readme.contains(&format!("`{name}`")),
                "README's metrics table lacks {name}"
            );
        }
    }
}
