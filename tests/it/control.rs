//! Keeping a run inside its window and off the primary's back: a window's
//! end is not held up by the count of rows to rotate or a slow pace's next
//! page, the count's snapshot is let go once it has its answer, and a hold
//! that begins as the last batch commits is lifted again.

use std::time::{Duration, Instant};

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

// Before: "stopped on request after the batches in flight committed", for
// a window that ended as planned, with no word of what was left.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_stopped_by_its_window_says_so_with_the_rows_and_time_left() {
    let db = TestDb::new().await;
    db.seed_patients(60_000).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let out = rekey(
        &[
            "run",
            "--job",
            &j,
            "--max-rows-per-sec",
            "20000",
            "--run-time",
            "500ms",
        ],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(5), "{}", printed(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("stopped "))
        .unwrap_or_else(|| panic!("no stop line: {text}"));
    assert!(
        line.starts_with("stopped at the end of its window"),
        "{line}"
    );
    let left: u64 = line
        .split("about ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no rows left in: {line}"));
    assert!(left > 0 && left < 60_000, "{line}");
    assert!(line.contains("at this run's rate"), "{line}");
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

/// The count of rows to rotate (the only statement rekey runs under
/// REPEATABLE READ) made slow: 3,000 rows x 10 ms = 30 s. A run whose
/// window ends after 2 s ends (exit 5) soon after: the count is cancelled.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_window_is_not_held_open_by_the_count_of_rows_to_rotate() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    db.client
        .batch_execute(
            "CREATE FUNCTION slow_when_counting() RETURNS boolean LANGUAGE sql VOLATILE AS $$
               SELECT CASE WHEN current_setting('transaction_isolation') = 'repeatable read'
                           THEN pg_sleep(0.01) IS NOT NULL ELSE true END $$",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = db.patients_job_where(&dir, "slow_when_counting()");
    assert_a_2s_window_ends_in_time(
        &path.display().to_string(),
        &["--max-rows-per-sec", "200", "--batch-size", "100"],
    );
}

/// The count of rows to rotate reads in a snapshot of its own. Held for the
/// whole run, that snapshot would keep vacuum, on every table of the
/// cluster, from removing anything deleted since the run began: over a
/// rotation of hours, bloat the application pays for. Once the count has
/// its answer, its session is gone.
#[tokio::test(flavor = "multi_thread")]
async fn the_count_of_rows_to_rotate_lets_its_snapshot_go_once_counted() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let mut child = spawn_rekey(
        &[
            "run",
            "--job",
            &job,
            "--max-rows-per-sec",
            "500",
            "--batch-size",
            "100",
            "--quiet",
        ],
        &seed_env(),
    );
    // the count's snapshot is taken before the first batch; at 500 rows/s a
    // third of the rows are two seconds in, and 3,000 rows count in milliseconds
    wait_for_progress(&db, &mut child, values_in(1_000)).await;
    loop {
        let counting: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                   AND application_name = 'rekey' AND state = 'active' AND query LIKE 'SELECT count(*)%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if counting == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // whatever its last statement: a batch's transaction is idle for milliseconds, not a second
    let holding: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
               AND application_name = 'rekey' AND state = 'idle in transaction'
               AND backend_xmin IS NOT NULL AND xact_start < now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let still_running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(still_running, "the premise: the run was still going");
    assert_eq!(
        holding, 0,
        "a session of the run holds the count's snapshot after counting"
    );
}

/// At 1 row/s, a page of 20 rows is 20 s away: a window's end (or a
/// signal) ends the wait for it instead of waiting it out.
#[tokio::test(flavor = "multi_thread")]
async fn a_window_s_end_does_not_wait_for_a_slow_pace_s_next_page() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    assert_a_2s_window_ends_in_time(
        &db.patients_job(&dir).display().to_string(),
        &[
            "--max-rows-per-sec",
            "1",
            "--batch-size",
            "20",
            "--workers",
            "2",
        ],
    );
}

/// Runs `job` with `args` in a window of 2 s: it stops for the window
/// (exit 5), well within 10 s.
fn assert_a_2s_window_ends_in_time(job: &str, args: &[&str]) {
    let mut argv = vec!["run", "--job", job, "--run-time", "2s", "--quiet"];
    argv.extend_from_slice(args);
    let started = Instant::now();
    let out = rekey(&argv, &seed_env());
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(5), "{}", printed(&out));
    assert!(
        took < Duration::from_secs(10),
        "a 2 s window ended after {took:?}"
    );
}

/// A pause that starts while the last batch commits is still read after
/// the lanes end: once the control file says `run` again, the conflict
/// re-reads go on and the run finishes.
#[tokio::test(flavor = "multi_thread")]
async fn a_hold_as_the_last_batch_commits_is_lifted_for_the_conflict_re_reads() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    db.client
        .batch_execute(
            "CREATE TABLE flags (skipped boolean NOT NULL);
             INSERT INTO flags VALUES (false);
             CREATE FUNCTION skip_once_then_sleep() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF OLD.id = 10 AND NOT (SELECT skipped FROM flags) THEN
                 UPDATE flags SET skipped = true;
                 RETURN NULL; -- one conflict, re-read at the end
               END IF;
               IF OLD.id = 3000 THEN PERFORM pg_sleep(4); END IF; -- the last batch commits slowly
               RETURN NEW;
             END $$;
             CREATE TRIGGER skip_once_then_sleep BEFORE UPDATE ON patient_persons FOR EACH ROW EXECUTE FUNCTION skip_once_then_sleep();",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let control = dir.path().join("control");
    let mut child = rekey_cmd(
        &[
            "run",
            "--job",
            &job,
            "--workers",
            "1",
            "--batch-size",
            "500",
            "--check-every",
            "100ms",
            "--control-file",
            &control.display().to_string(),
            "--json",
            "--quiet",
        ],
        &seed_env(),
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    // wait for the last batch's sleep, then pause through the control file
    let started = Instant::now();
    loop {
        let n: i64 = db
            .client
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND application_name = 'rekey' AND datname = current_database()", &[])
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never reached the last batch"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(&control, "pause").unwrap();
    // held through the last commit: every range done, the conflict not re-read yet
    loop {
        let done: Option<bool> = db
            .client
            .query_one(
                "SELECT bool_and(done) FROM rekey.progress WHERE range_no >= 0",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if done == Some(true) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the last batch never committed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(&control, "run").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        status.is_some(),
        "rekey run still running 20 s after the control file said run again: {}",
        printed(&out)
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(3_000).await;
}
