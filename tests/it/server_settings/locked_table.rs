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

/// A long read left open on `patient_persons` and an `ALTER TABLE` queued
/// behind it, which every later statement on the table queues behind.
struct QueuedAlter {
    reader: tokio_postgres::Client,
    /// The read's session: what the queue waits on.
    root: i32,
    /// The ALTER TABLE's session.
    altering: i32,
    alter: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
}

impl QueuedAlter {
    async fn start(db: &TestDb) -> QueuedAlter {
        let reader = connect(&db.url).await;
        let root: i32 = reader
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        reader.batch_execute("BEGIN").await.unwrap();
        reader
            .execute("SELECT count(*) FROM patient_persons", &[])
            .await
            .unwrap();
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
        QueuedAlter {
            reader,
            root,
            altering,
            alter,
        }
    }

    /// Ends the read (failing if it ended before), lets the ALTER TABLE
    /// through, and drops its column, so that the rows read as before.
    async fn end(self, db: &TestDb) {
        self.reader
            .batch_execute("SELECT 1; ROLLBACK")
            .await
            .expect("premise: the read was open until now");
        self.alter.await.unwrap().unwrap();
        db.client
            .batch_execute("ALTER TABLE patient_persons DROP COLUMN note")
            .await
            .unwrap();
    }
}

/// `rekey run --job <job> --lock-timeout 300ms` behind a [`QueuedAlter`]:
/// its output (after checking it wrote nothing) and the queue's root and
/// waiting sessions.
async fn run_behind_a_queued_alter(db: &TestDb, job: &str) -> (std::process::Output, i32, i32) {
    let before = db.checksum("patient_persons").await;
    let queue = QueuedAlter::start(db).await;
    let run = ["run", "--job", job, "--lock-timeout", "300ms"];
    let out = rekey_within(&run, &seed_env(), Duration::from_secs(60));
    let (root, altering) = (queue.root, queue.altering);
    queue.end(db).await;
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert_eq!(
        db.checksum("patient_persons").await,
        before,
        "a value was written"
    );
    (out, root, altering)
}

// Today: the refusal named the ALTER TABLE waiting for its lock, not the
// transaction it waits behind, which is what holds every session up.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_queued_behind_a_waiting_alter_table_is_refused_naming_the_transaction_it_waits_on() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    let (out, root, altering) = run_behind_a_queued_alter(&db, &j).await;
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
}

// Today: exit 2, "where = \"id > 0\" is not a valid condition on
// public.patient_persons: canceling statement due to lock timeout": a
// locked table told as a mistake in the job file.
#[tokio::test(flavor = "multi_thread")]
async fn a_filtered_target_whose_table_is_locked_is_refused_as_locked_not_as_a_bad_condition() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job_where(&dir, "id > 0").display().to_string();

    let (out, root, altering) = run_behind_a_queued_alter(&db, &j).await;
    let said = stderr(&out);
    assert!(!said.contains("not a valid condition"), "{said}");
    for words in [
        "public.patient_persons is locked against reads",
        &format!("process {altering} waits for AccessExclusiveLock"),
        &format!("behind process {root} (in a transaction of"),
        "Nothing was written",
    ] {
        assert!(said.contains(words), "missing {words:?} in:\n{said}");
    }
}

// Today: --force (meant to let values no key opens through) skipped every
// check before the first write, so a locked table was not told.
#[tokio::test(flavor = "multi_thread")]
async fn a_forced_run_on_a_locked_table_is_refused_as_one_without_force_is() {
    const ROWS: i64 = 300;
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let before = db.checksum("patient_persons").await;

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
    let run = [
        "run",
        "--job",
        j.as_str(),
        "--force",
        "--lock-timeout",
        "300ms",
    ];
    let out = rekey_within(&run, &seed_env(), Duration::from_secs(60));
    tx.execute("SELECT 1", &[])
        .await
        .expect("the locking transaction ended during the run");
    tx.rollback().await.unwrap();

    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let said = stderr(&out);
    for words in [
        &format!("process {holder} holds ShareLock"),
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
