//! A server (or database, or role) with `idle_session_timeout`: the session
//! that holds a run's share of its job sits idle while the lanes work, and
//! the server closed it, and the lock with it, a second into the run; a
//! `run --restart` could then abandon the job under the run.

use super::*;

// Before: the lock was gone from the first second past the timeout to the
// end of the run (the session was reopened, without it, for the recount).
#[tokio::test(flavor = "multi_thread")]
async fn the_runs_share_of_its_job_is_held_through_a_run_longer_than_idle_session_timeout() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let all = values_in(3_000);
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    db.alter_database("SET idle_session_timeout = '500ms'")
        .await;
    let started = Instant::now();
    let mut child = spawn_rekey_captured(
        &[
            "run",
            "--job",
            &job,
            "--workers",
            "1",
            "--batch-size",
            "100",
            "--max-rows-per-sec",
            "1500",
        ],
        &seed_env(),
    );
    let mut checked = 0;
    while child.try_wait().unwrap().is_none() {
        let before = committed_values(&db).await;
        let held = advisory_lock_held(&db, "rekey.job:patients").await;
        // while the run writes, between its first batch and its last
        if before > 0 && committed_values(&db).await < all {
            assert!(
                held,
                "no session holds the run's share of its job {:?} into the run, {before} values committed",
                started.elapsed()
            );
            checked += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ran_for = started.elapsed();
    db.alter_database("RESET idle_session_timeout").await;
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        ran_for > Duration::from_millis(1_500) && checked > 0,
        "the run ({ran_for:?}, {checked} checks) outlasted the timeout three times over"
    );
    db.assert_every_value_rotated(3_000).await;
}

// Before: a check interval longer than the timeout had the monitor's
// connection (whose server process owns the run's leases) closed between
// checks: the run held at every check to reconnect.
#[tokio::test(flavor = "multi_thread")]
async fn a_check_interval_longer_than_idle_session_timeout_keeps_the_monitors_connection() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    db.alter_database("SET idle_session_timeout = '300ms'")
        .await;
    let started = Instant::now();
    let out = rekey(
        &[
            "run",
            "--job",
            &job,
            "--workers",
            "1",
            "--batch-size",
            "100",
            "--max-rows-per-sec",
            "1500",
            "--check-every",
            "1s",
        ],
        &seed_env(),
    );
    let ran_for = started.elapsed();
    db.alter_database("RESET idle_session_timeout").await;
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        ran_for > Duration::from_millis(1_500),
        "the run ({ran_for:?}) outlasted a check"
    );
    assert!(
        !printed(&out).contains("monitor's connection was lost"),
        "{}",
        printed(&out)
    );
    db.assert_every_value_rotated(3_000).await;
}
