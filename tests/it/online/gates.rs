//! `--gate-sql`: a gate that is shut, or cannot be read, holds the run
//! (fails closed); a query that is not one boolean, or would write, is
//! refused before any write.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_gate_that_returns_false_holds_the_run_until_it_returns_true() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    db.client
        .batch_execute("CREATE TABLE gate (open boolean); INSERT INTO gate VALUES (false)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let mut run = Watched::spawn(&[
        "run",
        "--job",
        &j,
        "--json",
        "--batch-size",
        "200",
        "--gate-sql",
        "SELECT open FROM gate",
        "--check-every",
        "100ms",
    ]);
    sessions_open(&db, 3).await;
    run.said("--gate-sql query returned false", Duration::from_secs(30))
        .await;
    assert_eq!(
        committed_by_running_job(&db).await,
        0,
        "the gate is shut: nothing written"
    );
    db.client
        .batch_execute("UPDATE gate SET open = true")
        .await
        .unwrap();
    let out = run.finish(Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        printed(&out).contains("--gate-sql query returned false"),
        "{}",
        printed(&out)
    );
    assert_all_rotated(&db, 3_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gate_that_errors_holds_the_run_rather_than_running_blind() {
    let db = TestDb::new().await;
    db.seed_patients(2_000).await;
    db.client
        .batch_execute("CREATE TABLE gate (open boolean); INSERT INTO gate VALUES (true)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    // the gate works at the start, then its table goes away
    db.client
        .batch_execute("UPDATE gate SET open = false")
        .await
        .unwrap();
    let mut run = Watched::spawn(&[
        "run",
        "--job",
        &j,
        "--json",
        "--batch-size",
        "200",
        "--gate-sql",
        "SELECT open FROM gate",
        "--check-every",
        "100ms",
    ]);
    sessions_open(&db, 3).await;
    run.said("--gate-sql query returned false", Duration::from_secs(30))
        .await; // the gate was checked and the lanes are waiting on it
    db.client.batch_execute("DROP TABLE gate").await.unwrap();
    run.said("--gate-sql query failed, holding", Duration::from_secs(30))
        .await;
    assert_eq!(
        committed_by_running_job(&db).await,
        0,
        "a gate that cannot be read holds (fails closed)"
    );
    db.client
        .batch_execute("CREATE TABLE gate (open boolean); INSERT INTO gate VALUES (true)")
        .await
        .unwrap();
    let out = run.finish(Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        printed(&out).contains("--gate-sql query failed, holding"),
        "{}",
        printed(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gate_that_is_not_one_boolean_or_would_write_is_refused_before_any_write() {
    let (db, _dir, j) = patients(100).await;
    let before = db.checksum("patient_persons").await;
    for gate in [
        "SELECT 1",
        "SELECT true, false",
        "DELETE FROM patient_persons RETURNING true",
        "SELEC nonsense",
    ] {
        let out = rekey(&["run", "--job", &j, "--gate-sql", gate], &seed_env());
        assert_eq!(out.status.code(), Some(2), "{gate}: {}", printed(&out));
        assert!(
            printed(&out).contains("cannot serve as a gate"),
            "{}",
            printed(&out)
        );
    }
    assert_eq!(
        db.checksum("patient_persons").await,
        before,
        "nothing changed"
    );
}
