//! Timing: batches shrink toward `--batch-time`, and `--until` ends the run
//! at the instant given, as `--run-time` does.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn batches_shrink_toward_the_target_batch_time() {
    let (db, _dir, j) = patients(20_000).await;
    let out = rekey(
        &[
            "run",
            "--job",
            &j,
            "--json",
            "--batch-size",
            "2000",
            "--batch-time",
            "1ms",
            "--workers",
            "1",
        ],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let s = json(&out);
    let (min, max) = (
        s["batch_rows_min"].as_u64().unwrap(),
        s["batch_rows_max"].as_u64().unwrap(),
    );
    assert!(max <= 2000, "never above --batch-size: {s}");
    assert!(min < 100, "shrinks below the first page toward 1 ms: {s}");
    assert_all_rotated(&db, 20_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn until_stops_at_the_given_instant_like_run_time() {
    let (_db, _dir, j) = patients(40_000).await;
    // The instant is 5 s off, far beyond any start-up (an instant already
    // past is refused with exit 2); at 2000 rows/s the 40k rows need 20 s, so
    // only the deadline can end the run, and only exit 5 is right.
    let until = std::time::SystemTime::now() + Duration::from_secs(5);
    let at = humantime::format_rfc3339_millis(until).to_string();
    let out = rekey(
        &[
            "run",
            "--job",
            &j,
            "--json",
            "--batch-size",
            "200",
            "--max-rows-per-sec",
            "2000",
            "--until",
            &at,
        ],
        &seed_env(),
    );
    let ended = std::time::SystemTime::now();
    assert_eq!(out.status.code(), Some(5), "{}", printed(&out));
    let s = json(&out);
    assert_eq!(s["stopped_by"], "run-time");
    assert!(s["projected_s"].as_f64().unwrap() > 0.0, "{s}");
    assert!(ended >= until, "stopped before the instant given");
    let late = ended.duration_since(until).unwrap();
    assert!(
        late < Duration::from_secs(5),
        "stopped {late:?} after the instant given"
    );
}
