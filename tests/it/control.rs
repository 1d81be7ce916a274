//! Keeping a run inside its window and off the primary's back.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread")]
async fn run_time_stops_cleanly_at_the_end_of_the_window_and_the_next_run_finishes() {
    let db = TestDb::new().await;
    db.seed_patients(60_000).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);
    let j = job.display().to_string();
    let out = rekey(
        &[
            "run",
            "--job",
            &j,
            "--json",
            "--batch-size",
            "200",
            "--max-rows-per-sec",
            "20000",
            "--run-time",
            "500ms",
        ],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(5), "{}", printed(&out));
    let first = json(&out);
    assert_eq!(
        (first["stopped"].as_bool(), first["stopped_by"].as_str()),
        (Some(true), Some("run-time"))
    );
    let left = first["remaining_rows"].as_u64().unwrap();
    assert!(left > 0 && left < 60_000, "{first}");
    assert!(first["projected_s"].as_f64().unwrap() > 0.0);

    let out = rekey(&["run", "--job", &j, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let second = json(&out);
    assert_eq!(second["job_totals"]["values_rewritten"], 60_000 + 40_000);
    assert_eq!(
        second["rows_scanned"].as_u64(),
        Some(left),
        "the second run reads exactly what the first left"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn max_rows_per_sec_spaces_the_reads_out() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);
    let out = rekey(
        &[
            "run",
            "--job",
            &job.display().to_string(),
            "--json",
            "--batch-size",
            "500",
            "--max-rows-per-sec",
            "5000",
        ],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let s = json(&out);
    assert_eq!(s["values_rewritten"], 3_000 + 2_000);
    // 3,000 rows at 5,000 rows/s: at least 0.5 s of spacing (a lower bound; a slow machine only adds)
    assert!(s["elapsed_s"].as_f64().unwrap() >= 0.5, "{s}");
}
