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

#[tokio::test(flavor = "multi_thread")]
async fn bench_job_projects_only_what_plan_says_is_left_to_rewrite() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let bench = |db_rows_left: u64| {
        let out = rekey(
            &[
                "bench", "--rows", "5000", "--job", &job, "--quiet", "--json",
            ],
            &seed_env(),
        );
        assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
        let projections = json(&out)["projections"].clone();
        assert_eq!(projections[0][0], db_rows_left, "{projections}");
        projections[0][1].as_f64().unwrap()
    };
    assert!(bench(3_000) > 0.0);
    let out = rekey(&["run", "--job", &job], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(bench(0), 0.0, "a rotated table needs no window");
}
