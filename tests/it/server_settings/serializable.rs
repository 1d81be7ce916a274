//! Serializable default isolation with the application writing the same rows:
//! the run completes and verifies.

use super::*;

/// rekey's statements of this database now waiting for a lock that backend `holder` holds.
async fn rekey_waits_on(db: &TestDb, holder: i32) -> bool {
    db.client
        .query_one(
            "SELECT count(*) > 0 FROM pg_stat_activity
              WHERE application_name = 'rekey' AND datname = current_database() AND $1 = ANY (pg_blocking_pids(pid))",
            &[&holder],
        )
        .await
        .unwrap()
        .get(0)
}

// Today: exit 1, "a batch of 50 rows of public.patient_persons failed 6
// times, the last time with: ... could not serialize access due to
// concurrent update": every lane's batch updates the same rows of rekey's
// own state (the key's nonce count, the job's progress), which under
// serializable fail on each collision instead of waiting their turn, and
// the retries run out.
#[tokio::test(flavor = "multi_thread")]
async fn serializable_default_isolation_with_the_application_writing_the_same_rows_completes_and_verifies(
) {
    // enough rows for several ranges (rekey runs no more lanes than ranges of 20,000 rows)
    const ROWS: i64 = 120_000;
    const HELD: i64 = 10_001;
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    db.alter_database("SET default_transaction_isolation = 'serializable'")
        .await;
    let mut app = connect(&db.url).await;
    let level: String = app
        .query_one("SHOW transaction_isolation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        level, "serializable",
        "premise: new sessions of the database are serializable"
    );
    let app_pid: i32 = app
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let v2 = VersionedGcm::new(&v2_ring()).unwrap();
    let saved = |id: i64| {
        let mut out = Vec::new();
        v2.seal(phone(id).as_bytes(), b"", None, &mut out);
        out
    };

    // A certain serialization failure: the application has saved row HELD
    // (under the current key) and commits only once a batch of rekey's waits
    // on the row, whose UPDATE then cannot serialize (its snapshot predates
    // the commit). This one transaction of the application's is READ
    // COMMITTED, so that its commit cannot be the one that fails.
    let tx = app
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
        .start()
        .await
        .unwrap();
    tx.execute(
        "UPDATE patient_persons SET phone_encrypted = $2 WHERE id = $1",
        &[&HELD, &saved(HELD)],
    )
    .await
    .unwrap();
    let mut child = spawn_rekey_captured(
        &[
            "run",
            "--job",
            &j,
            "--json",
            "--workers",
            "4",
            "--batch-size",
            "50",
        ],
        &seed_env(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    // (a run that ends before it meets the row is judged below by its exit)
    while !rekey_waits_on(&db, app_pid).await && child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "no batch of rekey's waited on row {HELD} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tx.commit().await.unwrap();

    // meanwhile the application goes on saving patients, each a serializable
    // read-then-write (skipping its own serialization failures)
    let mut saves = 0;
    let mut id = 1;
    let deadline = Instant::now() + Duration::from_secs(300);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!(
                "rekey still ran after 300 s (killed): {}",
                printed(&child.wait_with_output().unwrap())
            );
        }
        let tx = app.transaction().await.unwrap();
        let step = async {
            tx.query_one(
                "SELECT phone_encrypted FROM patient_persons WHERE id = $1",
                &[&id],
            )
            .await?;
            tx.execute(
                "UPDATE patient_persons SET phone_encrypted = $2 WHERE id = $1",
                &[&id, &saved(id)],
            )
            .await?;
            tx.commit().await
        };
        match step.await {
            Ok(()) => saves += 1,
            Err(e)
                if e.code()
                    == Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE) => {}
            Err(e) => panic!("the application's save of {id} failed: {}", db_error(&e)),
        }
        id = (id + 96) % ROWS + 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let out = child.wait_with_output().unwrap();
    println!("serializable: the application saved {saves} rows during the run");
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let s = json(&out);
    // the application's writes met rekey's batches: under the database's
    // serializable default they would have failed them; rekey's sessions run
    // read committed, so a changed row is a conflict, re-read, not a failure
    assert!(
        s["conflicts"].as_u64().is_some_and(|c| c >= 1),
        "premise: the application's writes reached rekey's batches: {}",
        printed(&out)
    );
    assert_eq!(s["conflicts_left"], 0, "{}", printed(&out));
    db.assert_every_value_rotated(ROWS).await;
    let out = rekey_within(
        &["verify", "--job", &j, "--full", "--json"],
        &seed_env(),
        Duration::from_secs(120),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}
