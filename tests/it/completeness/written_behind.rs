//! A value written on an old key behind the run (after it passed the row)
//! keeps `run` from saying done: exit 4, the rows counted by table, and the
//! next run rotates them.

use rekey::crypto::codec::Codec;

use super::*;

// Before this check: exit 0, "done", with row 1 on key 1 again.
#[tokio::test(flavor = "multi_thread")]
async fn a_value_written_on_an_old_key_behind_the_run_keeps_it_from_saying_done() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
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
            "--max-rows-per-sec",
            "2000",
        ],
        &seed_env(),
    );
    // the only lane reads in key order: once three batches committed, row 1 is rotated
    wait_for_progress(&db, &mut child, 500).await;
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
    let out = child.wait_with_output().unwrap();
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
