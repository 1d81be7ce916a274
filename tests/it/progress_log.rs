//! Off a terminal (stderr to a file or a pipe, as under ECS, Kubernetes or
//! `nohup`), a run logs a progress line every `--progress-every`: rows done
//! and total, percent, rows/s and ETA, as text or as JSON fields.

use crate::harness::*;

/// A run of 3,000 rows held to 1,500 rows/s: about two seconds.
async fn slow_run(log_format: &str) -> String {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let out = rekey(
        &[
            "run",
            "--job",
            &job,
            "--max-rows-per-sec",
            "1500",
            "--batch-size",
            "100",
            "--progress-every",
            "300ms",
            "--log-format",
            log_format,
        ],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    stderr(&out)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_off_a_terminal_logs_progress_with_percent_and_eta() {
    let log = slow_run("text").await;
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("rows (") && l.contains("rows/s, eta"))
        .collect();
    assert!(lines.len() >= 3, "{log}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("/3,000 rows (") && l.contains("%)")),
        "{log}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("rows/s") && l.contains('.')),
        "a rate with decimals: {log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_lines_are_json_fields_with_log_format_json() {
    let log = slow_run("json").await;
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("rows_done").is_some())
        .collect();
    assert!(lines.len() >= 3, "{log}");
    for v in &lines {
        assert_eq!(v["rows_total"], 3_000, "{v}");
        assert!(v["percent"].as_u64().is_some_and(|p| p <= 100), "{v}");
        assert!(v["rows_per_second"].is_u64(), "{v}");
    }
    let done: Vec<u64> = lines
        .iter()
        .map(|v| v["rows_done"].as_u64().unwrap())
        .collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "{done:?}");
    assert!(
        done.first() < done.last(),
        "no progress between lines: {done:?}"
    );
}
