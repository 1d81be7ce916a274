//! A table renamed away and another made under its name while a run goes
//! on (a DBA's swap): the run's statements follow the name, so the rows of
//! the table it began on that it had not reached stay on their old key out
//! of its scope. The run does not say done.

use super::*;

// Before: the run rotated the new, empty table, found nothing left and
// said done (exit 0), with every row of the renamed one on key 1.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_swapped_under_a_running_job_keeps_it_from_saying_done() {
    const ROWS: i64 = 200;
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    db.client
        .batch_execute("CREATE TABLE gate (open boolean); INSERT INTO gate VALUES (false);")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let run = spawn_rekey_captured(
        &[
            "run",
            "--job",
            &job,
            "--json",
            "--gate-sql",
            "SELECT open FROM gate",
            "--check-every",
            "100ms",
        ],
        &seed_env(),
    );
    // held at its gate, past its checks: then the swap
    wait_for_query(&db, "SELECT open FROM gate").await;
    db.client
        .batch_execute(
            "ALTER TABLE patient_persons RENAME TO patient_persons_old;
             CREATE TABLE patient_persons (LIKE patient_persons_old INCLUDING ALL);
             UPDATE gate SET open = true;",
        )
        .await
        .unwrap();
    let out = run.wait_with_output().unwrap();
    let left: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM patient_persons_old WHERE get_byte(phone_encrypted, 0) = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, ROWS, "the renamed table is untouched");
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    let said = stderr(&out);
    for words in [
        "public.patient_persons was renamed or replaced",
        "another table now answers to that name",
        "the table the run began on is now public.patient_persons_old",
    ] {
        assert!(said.contains(words), "{words:?} missing: {said}");
    }
}

// Before: a run stopped (here killed) part way, the table swapped, and the
// next run resumed the job on the new table and said done, the old one's
// rows it had not reached left on key 1 under another name.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_whose_table_was_swapped_since_it_began_is_not_resumed_on_the_new_one() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    db.client
        .batch_execute("CREATE TABLE gate (open boolean); INSERT INTO gate VALUES (false);")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let mut run = spawn_rekey(
        &[
            "run",
            "--job",
            &job,
            "--gate-sql",
            "SELECT open FROM gate",
            "--check-every",
            "100ms",
        ],
        &seed_env(),
    );
    wait_for_query(&db, "SELECT open FROM gate").await;
    run.kill().unwrap();
    run.wait().unwrap();
    db.client
        .batch_execute(
            "ALTER TABLE patient_persons RENAME TO patient_persons_old;
             CREATE TABLE patient_persons (LIKE patient_persons_old INCLUDING ALL);",
        )
        .await
        .unwrap();
    for dry in [true, false] {
        let mut args = vec!["run", "--job", job.as_str()];
        if dry {
            args.push("--dry-run");
        }
        let out = rekey(&args, &seed_env());
        assert_eq!(
            out.status.code(),
            Some(2),
            "dry run {dry}: {}",
            printed(&out)
        );
        let said = stderr(&out);
        for words in [
            "public.patient_persons is not the table it began on: that one is now public.patient_persons_old",
            "rekey run --restart",
        ] {
            assert!(said.contains(words), "{words:?} missing: {said}");
        }
    }
}
