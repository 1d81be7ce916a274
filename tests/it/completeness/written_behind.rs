//! A value written on an old key behind the run (after it passed the row)
//! keeps `run` from saying done: exit 4, the rows counted by table, and the
//! next run rotates them.

use rekey::crypto::codec::Codec;

use super::*;

/// `rekey run` of `job` (one slow lane) while the application writes row 1
/// under key 1 behind it.
async fn run_with_a_value_written_behind(db: &TestDb, job: &str) -> std::process::Output {
    let mut child = spawn_rekey_captured(
        &[
            "run",
            "--job",
            job,
            "--json",
            "--workers",
            "1",
            "--batch-size",
            "100",
            "--max-rows-per-sec",
            "2000",
        ],
        &seed_env(),
    );
    // the only lane reads in key order: once three batches committed, row 1 is rotated
    wait_for_progress(db, &mut child, 500).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run ended before the application wrote"
    );
    let mut value = Vec::new();
    v1_codec().seal(phone(1).as_bytes(), b"", None, &mut value);
    db.client
        .execute(
            "UPDATE patient_persons SET phone_encrypted = $1 WHERE id = 1",
            &[&value],
        )
        .await
        .unwrap();
    child.wait_with_output().unwrap()
}

// Before this check: exit 0, "done", with row 1 on key 1 again.
#[tokio::test(flavor = "multi_thread")]
async fn a_value_written_on_an_old_key_behind_the_run_keeps_it_from_saying_done() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let out = run_with_a_value_written_behind(&db, &job).await;
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    let s = json(&out);
    assert_eq!(s["rows_written_behind"], 1, "{s}");
    assert_eq!(
        s["written_behind"][0]["table"], "public.patient_persons",
        "{s}"
    );

    let out = rekey(&["run", "--job", &job], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(3_000).await;
}

// Before: the run exited 4, but its audit event was `run_completed` with
// status `not_applicable` and a detail naming nothing left, and `rekey
// status` said `done` with nothing to show.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_left_rows_written_behind_it_is_audited_as_failed_and_status_shows_them() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let out = run_with_a_value_written_behind(&db, &job).await;
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));

    let events = audit_events(&dir);
    let ended = events.last().unwrap();
    assert_eq!(ended["verification_status"], "failed", "{ended}");
    let detail = ended["detail"].as_str().unwrap();
    assert!(
        detail.contains("1 rows written behind the run under an old key"),
        "{detail}"
    );
    let out = rekey(&["status", "--job", &job, "--json"], &seed_env());
    assert_eq!(json(&out)["rows_written_behind"], 1, "{}", printed(&out));
    let out = rekey(&["status", "--job", &job], &seed_env());
    assert!(
        printed(&out).contains("1 rows written behind the run"),
        "{}",
        printed(&out)
    );
}

// Before this: a run whose own session was closed during the run (then by
// the server's idle_session_timeout; now by anything else, as rekey keeps
// it from idling) reopened it under the run's statement timeout, and the
// recount, a scan of the whole table, was cancelled past it: exit 1 after
// every batch had committed.
#[tokio::test(flavor = "multi_thread")]
async fn the_recount_at_the_end_is_not_cut_short_by_the_runs_statement_timeout() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    // every row read costs a sleep of at least 0.3 ms (a millisecond or so
    // as timers go): a batch of 100 rows well under the statement timeout,
    // a scan of the table (the recount) well over it
    let job = db
        .patients_job_where(&dir, "pg_sleep(0.0003) IS NOT NULL")
        .display()
        .to_string();
    let mut child = spawn_rekey_captured(
        &[
            "run",
            "--job",
            &job,
            "--json",
            "--workers",
            "1",
            "--batch-size",
            "100",
            "--statement-timeout",
            "1500ms",
        ],
        &seed_env(),
    );
    wait_for_progress(&db, &mut child, 500).await;
    // the run's own session: the one holding its share of the job
    let closed = end_rekeys_lock_holding_sessions(&db).await;
    assert_eq!(closed, 1, "the run's own session was not found");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["rows_written_behind"], 0, "{}", printed(&out));
}

// Before: the recount subtracted every row the run had recorded (one of its
// values quarantined) whole, so a value written behind the run in another
// column of that row went unseen: exit 3, "done but values quarantined",
// with row 11's emergency phone on key 1 again.
#[tokio::test(flavor = "multi_thread")]
async fn a_value_written_behind_the_run_beside_a_quarantined_one_in_its_row_is_still_seen() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    // row 11's phone does not open (quarantined); the run's write of row 200,
    // long after row 11's batch, puts row 11's emergency phone back as it was
    db.client
        .batch_execute(
            "UPDATE patient_persons SET phone_encrypted = substring(phone_encrypted from 1 for 10) WHERE id = 11;
             CREATE TABLE kept AS SELECT emergency_contact_phone_encrypted AS v FROM patient_persons WHERE id = 11;
             CREATE FUNCTION write_behind() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               UPDATE patient_persons SET emergency_contact_phone_encrypted = (SELECT v FROM kept) WHERE id = 11;
               RETURN NULL;
             END $$;
             CREATE TRIGGER write_behind AFTER UPDATE ON patient_persons FOR EACH ROW
               WHEN (OLD.id = 200) EXECUTE FUNCTION write_behind();",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let out = rekey(
        &[
            "run",
            "--job",
            &job,
            "--json",
            "--workers",
            "1",
            "--batch-size",
            "50",
        ],
        &seed_env(),
    );
    let on_key_1: bool = db
        .client
        .query_one(
            "SELECT get_byte(emergency_contact_phone_encrypted, 0) = 1 FROM patient_persons WHERE id = 11",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        on_key_1,
        "the premise: written behind the run\n{}",
        printed(&out)
    );
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    let summary = json(&out);
    assert_eq!(summary["values_failed"], 1, "{summary}");
    assert_eq!(summary["rows_written_behind"], 1, "{summary}");
}
