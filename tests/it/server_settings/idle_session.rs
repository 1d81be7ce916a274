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

// Before: the conflict pass's reading and writing sessions sat idle through
// the pace's wait between two batches of re-reads; the server closed them
// and the next re-read failed (exit 1, the keys left for another run).
#[tokio::test(flavor = "multi_thread")]
async fn the_conflict_re_reads_go_on_after_their_sessions_idled_through_a_hold() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    // the first write of each of the first 1,500 rows lands nowhere: two
    // batches of re-reads, the pace's wait of a second between them
    db.client
        .batch_execute(
            "CREATE TABLE skipped (id bigint PRIMARY KEY);
             CREATE FUNCTION skip_once() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF OLD.id <= 1500 AND NOT EXISTS (SELECT 1 FROM skipped WHERE id = OLD.id) THEN
                 INSERT INTO skipped VALUES (OLD.id);
                 RETURN NULL;
               END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER skip_once BEFORE UPDATE ON patient_persons FOR EACH ROW EXECUTE FUNCTION skip_once();",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    db.alter_database("SET idle_session_timeout = '250ms'")
        .await;
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
            "1000",
            "--json",
            "--quiet",
        ],
        &seed_env(),
    );
    db.alter_database("RESET idle_session_timeout").await;
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let skipped: i64 = db
        .client
        .query_one("SELECT count(*) FROM skipped", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(skipped, 1_500, "the premise: 1,500 rows re-read");
    assert_eq!(json(&out)["conflicts"], 1_500, "{}", printed(&out));
    db.assert_every_value_rotated(3_000).await;
}

// Before: a row locked through the conflict pass is tried one key at a
// time; the reading session sat idle through each try's lock wait, the
// server closed it, and the next try's read failed (exit 1) instead of
// recording the row as not rotated.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_locked_through_the_conflict_re_reads_is_reported_not_rotated_after_their_reader_idled(
) {
    const LOCKED: i64 = 100; // has both values (100 % 3 != 0)
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let mut app = connect(&db.url).await;
    let tx = app.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM patient_persons WHERE id = $1 FOR UPDATE",
        &[&LOCKED],
    )
    .await
    .unwrap();
    db.alter_database("SET idle_session_timeout = '300ms'")
        .await;
    let out = rekey(
        &[
            "run",
            "--job",
            &job,
            "--workers",
            "1",
            "--batch-size",
            "20",
            "--lock-timeout",
            "1s",
            "--json",
            "--quiet",
        ],
        &seed_env(),
    );
    db.alter_database("RESET idle_session_timeout").await;
    tx.execute("SELECT 1", &[])
        .await
        .expect("the premise: the row stayed locked through the run");
    tx.rollback().await.unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert_eq!(json(&out)["values_not_rotated"], 2, "{}", printed(&out));
    let not_rotated: Vec<String> = db
        .client
        .query("SELECT DISTINCT pk_text FROM rekey.not_rotated", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(not_rotated, vec![format!("({LOCKED})")]);
}
