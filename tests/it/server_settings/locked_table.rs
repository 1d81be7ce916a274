//! A table another session holds locked against writes (a plain `CREATE
//! INDEX`, a `LOCK ... IN SHARE MODE`) longer than `--lock-timeout` when a
//! run starts: refused before any write, naming the session that holds the
//! lock and what it runs.

use super::*;

// Today: exit 1, "checking that PostgreSQL lets this role update
// public.patient_persons: ... canceling statement due to lock timeout": the
// preflight's probe names neither the lock nor the session holding it.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_locked_against_writes_is_refused_naming_the_session_that_holds_the_lock() {
    const ROWS: i64 = 300;
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let before = db.checksum("patient_persons").await;

    // what a plain CREATE INDEX holds for as long as it builds
    let mut app = connect(&db.url).await;
    let tx = app.transaction().await.unwrap();
    let holder: i32 = tx
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    tx.batch_execute("LOCK TABLE patient_persons IN SHARE MODE")
        .await
        .unwrap();
    let run = ["run", "--job", j.as_str(), "--lock-timeout", "300ms"];
    let out = rekey_within(&run, &seed_env(), Duration::from_secs(60));
    // premise: the lock was held for the whole run
    tx.execute("SELECT 1", &[])
        .await
        .expect("the locking transaction ended during the run");
    tx.rollback().await.unwrap();

    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let said = stderr(&out);
    for words in [
        "patient_persons",
        "ShareLock",
        &format!("process {holder}"),
        "LOCK TABLE patient_persons ...",
        "Nothing was written",
        "--lock-timeout",
    ] {
        assert!(said.contains(words), "missing {words:?} in:\n{said}");
    }
    assert_eq!(
        db.checksum("patient_persons").await,
        before,
        "a value was written"
    );

    // once the lock is gone the same command goes through
    let out = rekey_within(&run, &seed_env(), Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(ROWS).await;
}

// Today: exit 1 after 5 s, the preflight session's own wait, whatever
// --lock-timeout says: a lock the run's batches would have waited out
// stopped the run before its first batch.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_locked_for_less_than_the_lock_timeout_is_waited_for_as_a_batch_would() {
    const ROWS: i64 = 300;
    // the wait of the sessions that only read (plan, verify, the preflight's)
    const PREFLIGHT_WAIT: Duration = Duration::from_secs(5);
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    let mut app = connect(&db.url).await;
    let tx = app.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE patient_persons IN SHARE MODE")
        .await
        .unwrap();
    let run = ["run", "--job", j.as_str(), "--lock-timeout", "60s"];
    let mut child = spawn_rekey_captured(&run, &seed_env());
    // a statement of rekey's has waited on the table's lock longer than the preflight's own wait
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "rekey ended while the table was locked: {}",
            printed(&child.wait_with_output().unwrap())
        );
        assert!(Instant::now() < deadline, "rekey never waited on the lock");
        let waited: Option<f64> = db
            .client
            .query_one(
                "SELECT max(extract(epoch FROM clock_timestamp() - a.query_start))::float8
                   FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid
                  WHERE l.relation = 'patient_persons'::regclass AND NOT l.granted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waited.is_some_and(|w| w > PREFLIGHT_WAIT.as_secs_f64() + 0.5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tx.commit().await.unwrap();

    let out = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(ROWS).await;
}

// Today: the refusal named the ALTER TABLE waiting for its lock, not the
// transaction it waits behind, which is what holds every session up.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_queued_behind_a_waiting_alter_table_is_refused_naming_the_transaction_it_waits_on() {
    const ROWS: i64 = 300;
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let before = db.checksum("patient_persons").await;

    // a report's long read, left open
    let mut reader = connect(&db.url).await;
    let read = reader.transaction().await.unwrap();
    let root: i32 = read
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    read.execute("SELECT count(*) FROM patient_persons", &[])
        .await
        .unwrap();
    // a migration queued behind it, which every later statement on the table queues behind
    let migration = connect(&db.url).await;
    let altering: i32 = migration
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let alter = tokio::spawn(async move {
        migration
            .batch_execute("ALTER TABLE patient_persons ADD COLUMN note int")
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: bool = db
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND NOT granted)",
                &[&altering],
            )
            .await
            .unwrap()
            .get(0);
        if waiting {
            break;
        }
        assert!(Instant::now() < deadline, "the ALTER TABLE never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let run = ["run", "--job", j.as_str(), "--lock-timeout", "300ms"];
    let out = rekey_within(&run, &seed_env(), Duration::from_secs(60));
    read.execute("SELECT 1", &[])
        .await
        .expect("premise: the read was open for the whole run");
    read.rollback().await.unwrap();
    alter.await.unwrap().unwrap();
    // the rows as they were, for the checksum
    db.client
        .batch_execute("ALTER TABLE patient_persons DROP COLUMN note")
        .await
        .unwrap();

    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let said = stderr(&out);
    for words in [
        &format!("process {altering} waits for AccessExclusiveLock"),
        "ALTER TABLE patient_persons ...",
        &format!("behind process {root} (in a transaction of"),
        "idle, its last statement SELECT ...)",
        "Nothing was written",
    ] {
        assert!(said.contains(words), "missing {words:?} in:\n{said}");
    }
    assert_eq!(
        db.checksum("patient_persons").await,
        before,
        "a value was written"
    );
}
