//! Each event's log line and metrics.
use super::*;
use crate::observe::logging::tests::logged;
use crate::observe::logging::LogFormat;
use crate::observe::metrics::tests::rendered;

fn counts() -> Counts {
    Counts {
        rows_scanned: 10,
        rows_rewritten: 8,
        values_rewritten: 15,
        values_skipped: 3,
        values_failed: 1,
        conflicts: 2,
        values_not_rotated: 4,
    }
}

#[test]
fn batch_committed_counts_per_table_and_outcome() {
    let c = counts();
    let out = rendered(|| {
        BatchCommitted {
            table: "users",
            target: 0,
            counts: &c,
            seconds: 0.2,
            rows: 10,
        }
        .emit()
    });
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
        ValueQuarantined {
            table: "users",
            column: "ssn",
            key: "42",
            error: "authentication",
        }
        .emit();
        BatchRetried {
            table: "users",
            attempt: 1,
            error: "connection reset",
            rows: 10,
            wait_seconds: 0.5,
        }
        .emit();
        LeaseChanged {
            kind: LeaseChange::TakenOver,
            table: "users",
            range_no: 3,
            owner: "host-a:12",
        }
        .emit();
        ProgressSampled {
            rows_done: 50,
            rows_total: Some(200),
            rows_per_second: 25.0,
            eta_seconds: None,
        }
        .emit();
        QueueDepth {
            stage: "to_sink",
            depth: 4,
        }
        .emit();
        RunFinished {
            job: "quarterly",
            state: RunState::WindowEnded,
            seconds: 12.0,
        }
        .emit();
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
        ThrottleChanged {
            reason: Some("replica lag"),
            previous: None,
            detail: None,
        }
        .emit();
        ThrottleChanged {
            reason: Some("gate query"),
            previous: Some("replica lag"),
            detail: Some("the gate said no"),
        }
        .emit();
    });
    assert!(out.contains("rekey_throttled 1"), "{out}");
    assert!(
        out.contains(r#"rekey_throttle_info{reason="replica lag"} 0"#),
        "{out}"
    );
    assert!(
        out.contains(r#"rekey_throttle_info{reason="gate query"} 1"#),
        "{out}"
    );
    let out = rendered(|| {
        ThrottleChanged {
            reason: None,
            previous: Some("gate query"),
            detail: None,
        }
        .emit()
    });
    assert!(out.contains("rekey_throttled 0"), "{out}");
    assert!(
        out.contains(r#"rekey_throttle_info{reason="gate query"} 0"#),
        "{out}"
    );
}

#[test]
fn quarantine_warnings_name_table_column_key_and_error_once_per_column() {
    // Values never reach these events: they have no field for one. What
    // can go wrong is the wording and the count, checked here.
    let event = ValueQuarantined {
        table: "patients",
        column: "phone",
        key: "(7)",
        error: "authentication",
    };
    let keys = ["(7)".to_string(), "(9)".to_string()];
    let first = QuarantineSummary {
        table: "patients",
        column: "phone",
        error: "authentication",
        count: 1,
        first_keys: &keys[..1],
        finished: false,
        recorded: true,
    };
    let summary = QuarantineSummary {
        table: "patients",
        column: "phone",
        error: "authentication",
        count: 2,
        first_keys: &keys,
        finished: true,
        recorded: true,
    };
    let per_value = logged(LogFormat::Json, || event.emit());
    assert!(
        per_value.contains("cannot decrypt patients.phone at key (7): authentication")
            && per_value.contains("DEBUG"),
        "{per_value}"
    );
    let warned = logged(LogFormat::Text, || {
        first.emit();
        summary.emit();
    });
    assert_eq!(warned.lines().count(), 2, "{warned}");
    assert!(
        warned.contains(
            "values of patients.phone do not decrypt (authentication), the first at key (7)"
        ),
        "{warned}"
    );
    assert!(
        warned.contains(
            "quarantined 2 values of patients.phone (authentication), e.g. at keys (7), (9)"
        ),
        "{warned}"
    );
    let counted = rendered(|| event.emit());
    assert!(
        counted.contains(
            r#"rekey_quarantined_total{table="patients",column="phone",error="authentication"} 1"#
        ),
        "{counted}"
    );
}
