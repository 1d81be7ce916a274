//! Two jobs on one key table: a stage, promote or retire of one and a
//! master key rewrap of the other never interleave. Both take the key
//! table's transaction-level advisory lock (the two-key form, on
//! `hashtext('rekey.key_table')` and `hashtext(relation || '/' || purpose)`),
//! and a save refuses a table whose wrapped keys changed since it read them.

use super::*;

const LOCK: &str =
    "SELECT pg_advisory_xact_lock(hashtext('rekey.key_table'), hashtext('encryption_keys/PHI'))";

/// A second job on the same key table, under another name (its own
/// lifecycle lock), wrapped under `master`.
fn other_job(db: &TestDb, dir: &tempfile::TempDir, master: &str) -> String {
    let text = std::fs::read_to_string(job(db, dir, master))
        .unwrap()
        .replace("name = \"notes\"", "name = \"billing\"");
    let path = dir.path().join("billing.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Waits on a two-key advisory lock in this test's database (pg_locks
/// lists every database's, and the tests share one cluster).
const WAITS_ON_KEY_TABLE_LOCK: &str =
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND NOT granted
        AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";

#[tokio::test(flavor = "multi_thread")]
async fn a_stage_and_a_rewrap_wait_for_the_key_table_lock() {
    let db = TestDb::new().await;
    let old = master_key(false);
    seed(&db, &old, 2, 10).await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &old);
    let new = master_key(false);
    let stage: Vec<&str> = vec!["secrets", "stage", "--job", &j];
    let rewrap: Vec<&str> = vec!["secrets", "rewrap", "--job", &j, "--to-kms-key", &new];
    for args in [stage, rewrap] {
        let holder = connect(&db.url).await;
        holder.batch_execute("BEGIN").await.unwrap();
        holder.execute(LOCK, &[]).await.unwrap();
        let mut child = spawn_rekey_captured(&args, &aws_env());
        until(
            &db,
            WAITS_ON_KEY_TABLE_LOCK,
            &mut child,
            &format!("`{}` waited for the key table lock", args[1]),
        )
        .await;
        holder.batch_execute("COMMIT").await.unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    }
    assert_eq!(
        statuses(&db).await,
        vec![
            (1, "ACTIVE".into()),
            (2, "INACTIVE".into()),
            (3, "INACTIVE".into())
        ]
    );
    app(&db, &new).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retire_read_before_another_jobs_rewrap_does_not_archive_the_stale_wrapped_key() {
    let db = TestDb::new().await;
    let old = master_key(false);
    // key 2 INACTIVE, no value under it: retirable
    seed(&db, &old, 2, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let notes = job(&db, &dir, &old);
    let billing = other_job(&db, &dir, &old);
    let out = rekey(&["secrets", "init", "--adopt", "--job", &notes], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    // the retire reads the key table, then waits: for the blocker's
    // transaction to end before its full verify, and in it for the lock
    let blocker = connect(&db.url).await;
    blocker
        .batch_execute("BEGIN; LOCK TABLE patient_notes IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut retire = spawn_rekey_captured(
        &["secrets", "retire", "--job", &billing, "--key-id", "2"],
        &aws_env(),
    );
    until(
        &db,
        "SELECT (SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'patient_notes'::regclass)
              + (SELECT count(*) FROM pg_stat_activity WHERE application_name = 'rekey'
                    AND datname = current_database() AND query LIKE '%virtualtransaction%')",
        &mut retire,
        "the retire waited for the blocker",
    )
    .await;

    // meanwhile another job re-wraps every key under a new master key
    let new = master_key(false);
    let out = rekey(
        &["secrets", "rewrap", "--job", &notes, "--to-kms-key", &new],
        &aws_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    blocker.batch_execute("COMMIT").await.unwrap();
    let out = retire.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        stderr(&out).contains("changed since rekey read it")
            && stderr(&out).contains("wrapped keys changed: [1, 2]"),
        "{}",
        printed(&out)
    );
    assert_eq!(
        statuses(&db).await,
        vec![(1, "ACTIVE".into()), (2, "INACTIVE".into())],
        "nothing archived from the stale read"
    );
    app(&db, &new).await.unwrap();
}
