//! `rekey bench --report-dir`: the report's samples reach the end of the run
//! and mark a kill and its resume; the chart has labelled axes ticked from 0
//! and draws the interrupted run with its marks.

use crate::harness::*;

#[test]
fn a_bench_report_samples_to_the_end_and_charts_the_kill_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = rekey(
        &[
            "bench",
            "--rows",
            "20000",
            "--batch-size",
            "500",
            "--interrupt-at",
            "0.5",
            "--report-dir",
            &dir.path().display().to_string(),
            "--quiet",
            "--json",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
            .unwrap();
    let progress = report["progress"].as_array().unwrap();
    let last = progress.last().unwrap();
    assert_eq!(last[1], 20_000, "the samples end with every row: {last}");
    let rekey_s = report["rekey_runs_s"][0].as_f64().unwrap();
    assert!(
        (last[0].as_f64().unwrap() - rekey_s).abs() < 1e-6,
        "{last} vs {rekey_s}"
    );
    let killed = report["killed_at_s"].as_f64().unwrap();
    let resumed = report["resumed_at_s"].as_f64().unwrap();
    assert!(0.0 < killed && killed <= resumed, "{killed} {resumed}");
    assert!(report["throughput"].as_array().unwrap().len() >= 60);

    let svg = std::fs::read_to_string(dir.path().join("throughput.svg")).unwrap();
    for label in [
        "rows/s",
        "seconds since the start of the run",
        "killed",
        "resumed",
        "p99",
        "milliseconds",
    ] {
        assert!(svg.contains(label), "the chart lacks {label:?}");
    }
    let squeezed: String = svg.split_whitespace().collect();
    assert!(
        squeezed.contains(">0<") && squeezed.contains(">0.0<"),
        "no tick at 0 on both axes"
    );
}
