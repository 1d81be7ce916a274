//! A data key rotation through the seed's key table: adopted as it is,
//! a new key from GenerateDataKey staged INACTIVE (never what the
//! application writes with), values re-encrypted, promoted in one
//! transaction, the old key retired; then a compromise rotation end to end.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn the_seed_key_table_is_adopted_and_data_keys_rotate_through_it_while_the_application_reads_every_value(
) {
    let db = TestDb::new().await;
    let master = master_key(true);
    seed(&db, &master, 1, 200).await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &master);
    let env = aws_env();

    let out = rekey(&["secrets", "init", "--adopt", "--job", &j, "--json"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        json(&out)["keys"][0]["state"],
        "current",
        "{}",
        printed(&out)
    );
    let seen = app(&db, "-").await.unwrap();
    assert_eq!((seen.active, seen.read), (1, 200));

    // stage: a new row, INACTIVE: the application keeps writing with key 1
    let out = rekey(&["secrets", "stage", "--job", &j], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        statuses(&db).await,
        vec![(1, "ACTIVE".into()), (2, "INACTIVE".into())]
    );
    let marker: String = db
        .client
        .query_one(
            "SELECT state FROM rekey.key_table_keys WHERE version = 2",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(marker, "pending");
    let seen = app(&db, "-").await.unwrap();
    assert_eq!(
        (seen.active, seen.read),
        (1, 201),
        "a staged key is not what the application writes with"
    );

    // run: every value onto key 2, which the application reads by version
    let out = rekey(&["run", "--job", &j, "--json"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["values_rewritten"], 202);
    let seen = app(&db, "-").await.unwrap();
    assert_eq!((seen.active, seen.read), (1, 202));
    // the value the application wrote meanwhile, under key 1, is picked up
    let out = rekey(&["run", "--job", &j, "--json"], &env);
    assert_eq!(json(&out)["values_rewritten"], 1, "{}", printed(&out));
    let out = rekey(&["verify", "--job", &j, "--full", "--json"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    // promote: old INACTIVE and new ACTIVE in one transaction
    db.client
        .batch_execute("TRUNCATE status_changes")
        .await
        .unwrap();
    let out = rekey(&["secrets", "promote", "--job", &j], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        statuses(&db).await,
        vec![(1, "INACTIVE".into()), (2, "ACTIVE".into())]
    );
    let (changes, transactions): (i64, i64) = db
        .client
        .query_one(
            "SELECT count(*), count(DISTINCT tx) FROM status_changes",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(
        (changes, transactions),
        (2, 1),
        "a promotion is one transaction"
    );
    let seen = app(&db, "-").await.unwrap();
    assert_eq!((seen.active, seen.read), (2, 203));

    // retire: key 1's row leaves the table (kept wrapped in rekey's archive)
    let out = rekey(&["secrets", "retire", "--job", &j, "--json"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(statuses(&db).await, vec![(2, "ACTIVE".into())]);
    let archived: bool = db
        .client
        .query_one(
            "SELECT state = 'retired' AND archived_key IS NOT NULL FROM rekey.key_table_keys WHERE version = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(archived);
    let seen = app(&db, "-").await.unwrap();
    assert_eq!((seen.active, seen.read), (2, 204));

    // a compromise rotation, end to end: key 2 COMPROMISED when key 3 becomes ACTIVE
    db.client
        .batch_execute("TRUNCATE status_changes")
        .await
        .unwrap();
    let out = rekey(
        &[
            "rotate",
            "--job",
            &j,
            "--json",
            "--no-wait",
            "--reason",
            "compromise",
        ],
        &env,
    );
    assert_eq!(
        (out.status.code(), json(&out)["step"].as_str()),
        (Some(0), Some("retired")),
        "{}",
        printed(&out)
    );
    let changes: Vec<(i32, String, i64)> = db
        .client
        .query(
            "SELECT version, status, dense_rank() OVER (ORDER BY tx) FROM status_changes ORDER BY tx, version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        changes,
        vec![(2, "COMPROMISED".into(), 1), (3, "ACTIVE".into(), 1)],
        "the compromised key demoted and the new one promoted in one transaction"
    );
    assert_eq!(statuses(&db).await, vec![(3, "ACTIVE".into())]);
    let purged: bool = db
        .client
        .query_one(
            "SELECT compromised AND archived_key IS NULL FROM rekey.key_table_keys WHERE version = 2",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(purged, "a compromised key's wrapped material is destroyed");
    let seen = app(&db, "-").await.unwrap();
    assert_eq!((seen.active, seen.read), (3, 205));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_table_with_two_active_keys_or_missing_columns_is_refused_with_the_fix() {
    let db = TestDb::new().await;
    let master = master_key(false);
    seed(&db, &master, 2, 10).await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &master);
    db.client
        .batch_execute(
            "DROP INDEX encryption_keys_one_active; UPDATE encryption_keys SET status = 'ACTIVE'",
        )
        .await
        .unwrap();
    let out = rekey(&["secrets", "show", "--job", &j], &aws_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        stderr(&out).contains("2 ACTIVE keys") && stderr(&out).contains("set all but one INACTIVE"),
        "{}",
        printed(&out)
    );
    db.client
        .batch_execute(r#"ALTER TABLE encryption_keys RENAME COLUMN "expiresAt" TO expires"#)
        .await
        .unwrap();
    let out = rekey(&["secrets", "show", "--job", &j], &aws_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        stderr(&out).contains("expires_at = \"expiresAt\"")
            && stderr(&out).contains("[keys.columns]"),
        "{}",
        printed(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_table_changed_between_read_and_write_is_not_overwritten() {
    let db = TestDb::new().await;
    let master = master_key(false);
    seed(&db, &master, 1, 10).await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &master);
    stage_and_promote(&j, &aws_env());
    // hold rekey between reading the key table and writing it back: its
    // markers are read after the rows, and wait for this lock
    let blocker = connect(&db.url).await;
    blocker
        .batch_execute("BEGIN; LOCK TABLE rekey.key_table_keys IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let child = spawn_rekey_captured(&["secrets", "stage", "--job", &j], &aws_env());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let waiting: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%key_table_keys%'
                    AND datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rekey never reached the key table"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // the application's security team marks key 1 compromised meanwhile
    db.client
        .batch_execute("UPDATE encryption_keys SET status = 'COMPROMISED' WHERE version = 1")
        .await
        .unwrap();
    blocker.batch_execute("COMMIT").await.unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        stderr(&out).contains("changed since rekey read it"),
        "{}",
        printed(&out)
    );
    assert_eq!(
        statuses(&db).await,
        vec![(1, "COMPROMISED".into()), (2, "ACTIVE".into())],
        "nothing written over the change"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compromised_key_is_never_made_active_again_by_rollback_or_promote() {
    let db = TestDb::new().await;
    let master = master_key(false);
    seed(&db, &master, 1, 10).await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &master);
    let env = aws_env();
    let out = rekey(&["secrets", "stage", "--job", &j], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = rekey(
        &["secrets", "promote", "--job", &j, "--reason", "compromise"],
        &env,
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        statuses(&db).await,
        vec![(1, "COMPROMISED".into()), (2, "ACTIVE".into())]
    );

    // rollback would hand applications the compromised key to encrypt with
    let out = rekey(&["secrets", "rollback", "--job", &j], &env);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        stderr(&out).contains("key 1 is marked compromised")
            && stderr(&out).contains("rekey rotate --new"),
        "{}",
        printed(&out)
    );
    assert_eq!(
        statuses(&db).await,
        vec![(1, "COMPROMISED".into()), (2, "ACTIVE".into())],
        "nothing written"
    );

    // a staged key the security team marked COMPROMISED is not promoted
    let out = rekey(&["secrets", "stage", "--job", &j], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.client
        .batch_execute("UPDATE encryption_keys SET status = 'COMPROMISED' WHERE version = 3")
        .await
        .unwrap();
    let out = rekey(&["secrets", "promote", "--job", &j], &env);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        stderr(&out).contains("key 3 is staged but marked compromised")
            && stderr(&out).contains("rekey rotate --new"),
        "{}",
        printed(&out)
    );
    assert_eq!(
        statuses(&db).await,
        vec![
            (1, "COMPROMISED".into()),
            (2, "ACTIVE".into()),
            (3, "COMPROMISED".into())
        ],
        "nothing written"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_without_a_version_or_epoch_number_times_is_refused_with_the_fix_not_a_panic() {
    let db = TestDb::new().await;
    let master = master_key(false);
    seed(&db, &master, 1, 10).await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &master);
    let out = rekey(&["secrets", "stage", "--job", &j], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let no_version = r#"ALTER TABLE encryption_keys ALTER version DROP NOT NULL;
        INSERT INTO encryption_keys (version, purpose, algorithm, "encryptedKey", status, "expiresAt")
        VALUES (NULL, 'PHI', 'AES-256-GCM', '\x00', 'INACTIVE', now())"#;

    // a row without a version appears between rekey's read and its write
    let blocker = connect(&db.url).await;
    blocker
        .batch_execute("BEGIN; LOCK TABLE rekey.key_table_keys IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut child = spawn_rekey_captured(&["secrets", "promote", "--job", &j], &aws_env());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let waiting: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'rekey.key_table_keys'::regclass",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "rekey ended early");
        assert!(std::time::Instant::now() < deadline, "rekey never waited");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    db.client.batch_execute(no_version).await.unwrap();
    blocker.batch_execute("COMMIT").await.unwrap();
    let out = child.wait_with_output().unwrap();
    let says_fix = |out: &std::process::Output| {
        stderr(out).contains("has no version (\"version\" is NULL)")
            && stderr(out).contains("give it its version")
    };
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(says_fix(&out), "{}", printed(&out));

    // and when rekey reads it
    let out = rekey(&["secrets", "show", "--job", &j], &aws_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(says_fix(&out), "{}", printed(&out));

    // times kept as epoch milliseconds: refused up front, naming the column and the fix
    db.client
        .batch_execute(
            r#"DELETE FROM encryption_keys WHERE version IS NULL;
               ALTER TABLE encryption_keys ALTER "createdAt" DROP DEFAULT,
                 ALTER "createdAt" TYPE bigint USING (extract(epoch FROM "createdAt") * 1000)::bigint"#,
        )
        .await
        .unwrap();
    let out = rekey(&["secrets", "show", "--job", &j], &aws_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        stderr(&out).contains("column \"createdAt\" (created_at) is bigint, not a timestamp")
            && stderr(&out).contains("[keys.columns]"),
        "{}",
        printed(&out)
    );
}

/// The job's key table of 250 data keys (the format's version byte holds
/// one more) adopted before any idle timeout, then `idle_session_timeout`
/// set: every key's unwrap through KMS at each command's start takes
/// longer than the timeout.
async fn a_large_key_table_under_an_idle_session_timeout(
    db: &TestDb,
    dir: &tempfile::TempDir,
) -> String {
    let master = master_key(false);
    seed(db, &master, 250, 20).await;
    let j = job(db, dir, &master);
    let out = rekey(&["secrets", "init", "--adopt", "--job", &j], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    // the premise: opening the store (all `secrets show` does) outlasts the timeout
    let started = std::time::Instant::now();
    let out = rekey(&["secrets", "show", "--job", &j], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let took = started.elapsed();
    assert!(
        took > std::time::Duration::from_millis(400),
        "opening the key table took {took:?}, not twice the timeout"
    );
    db.alter_database("SET idle_session_timeout = '200ms'")
        .await;
    j
}

// Before: the session holding the lifecycle lock sat idle while the store
// unwrapped every key; the server closed it (and the lock with it), and
// the stage's audit event failed (exit 1) after the key was staged.
#[tokio::test(flavor = "multi_thread")]
async fn a_stage_whose_key_table_takes_longer_to_open_than_idle_session_timeout_is_staged_and_audited(
) {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let j = a_large_key_table_under_an_idle_session_timeout(&db, &dir).await;
    let out = rekey(&["secrets", "stage", "--job", &j], &aws_env());
    db.alter_database("RESET idle_session_timeout").await;
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(statuses(&db).await.last(), Some(&(251, "INACTIVE".into())));
    let last: String = db
        .client
        .query_one(
            "SELECT event_type FROM rekey.audit ORDER BY audit_id DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(last, "key_staged");
}

// Before: as above, a rotation's first statement after opening the store
// found the lifecycle lock's session closed (exit 1, nothing staged); and
// the run's job, resolved on that session after loading the keys, failed
// the same way.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_whose_key_table_takes_longer_to_open_than_idle_session_timeout_goes_through_its_steps(
) {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let j = a_large_key_table_under_an_idle_session_timeout(&db, &dir).await;
    let out = rekey(&["rotate", "--job", &j, "--no-wait", "--json"], &aws_env());
    db.alter_database("RESET idle_session_timeout").await;
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    let report = json(&out);
    assert_eq!(
        (&report["step"], &report["waiting_for"]),
        (&"promoted".into(), &"grace_period".into()),
        "{report}"
    );
    assert_eq!(
        report["events"],
        serde_json::json!([
            "key_staged",
            "reencryption_completed",
            "verification_passed",
            "key_promoted"
        ])
    );
}

// Before: `rotate --dry-run` opened the store, then read the rotation on
// the session that had idled meanwhile (exit 1).
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_whose_key_table_takes_longer_to_open_than_idle_session_timeout_says_what_is_next(
) {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let j = a_large_key_table_under_an_idle_session_timeout(&db, &dir).await;
    let out = rekey(&["rotate", "--job", &j, "--dry-run"], &aws_env());
    db.alter_database("RESET idle_session_timeout").await;
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(printed(&out).contains("dry run:"), "{}", printed(&out));
}

// Before: with the only row COMPROMISED (the procedure's emergency
// rotation marks it first), the rotation staged key 2 and then every
// command failed with "no keys were found"; a promote by hand left key 1's
// material in the table.
#[tokio::test(flavor = "multi_thread")]
async fn a_compromise_rotation_away_from_a_key_the_table_already_marks_compromised_destroys_it() {
    let db = TestDb::new().await;
    let master = master_key(false);
    seed(&db, &master, 1, 20).await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &master);
    let env = aws_env();
    db.client
        .batch_execute("UPDATE encryption_keys SET status = 'COMPROMISED'; TRUNCATE status_changes")
        .await
        .unwrap();
    let out = rekey(
        &[
            "rotate",
            "--job",
            &j,
            "--json",
            "--no-wait",
            "--reason",
            "compromise",
        ],
        &env,
    );
    assert_eq!(
        (out.status.code(), json(&out)["step"].as_str()),
        (Some(0), Some("retired")),
        "{}",
        printed(&out)
    );
    assert_eq!(statuses(&db).await, vec![(2, "ACTIVE".into())]);
    let reactivated: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM status_changes WHERE version = 1 AND status = 'ACTIVE'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reactivated, 0, "a COMPROMISED row is never written ACTIVE");
    let purged: bool = db
        .client
        .query_one(
            "SELECT compromised AND archived_key IS NULL FROM rekey.key_table_keys WHERE version = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        purged,
        "the compromised key's wrapped material is destroyed"
    );
    let seen = app(&db, "-").await.unwrap();
    assert_eq!((seen.active, seen.read), (2, 20));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_staged_key_beside_a_compromised_row_leaves_that_row_compromised_for_the_application() {
    let db = TestDb::new().await;
    let master = master_key(false);
    seed(&db, &master, 1, 5).await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &master);
    db.client
        .batch_execute("UPDATE encryption_keys SET status = 'COMPROMISED'")
        .await
        .unwrap();
    let out = rekey(&["secrets", "stage", "--job", &j], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        statuses(&db).await,
        vec![(1, "COMPROMISED".into()), (2, "INACTIVE".into())]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_table_with_neither_an_active_nor_a_compromised_key_names_the_table_purpose_and_fix()
{
    let db = TestDb::new().await;
    let master = master_key(false);
    seed(&db, &master, 2, 5).await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &master);
    db.client
        .batch_execute("UPDATE encryption_keys SET status = 'INACTIVE'")
        .await
        .unwrap();
    let out = rekey(&["secrets", "show", "--job", &j], &aws_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    let said = stderr(&out);
    assert!(
        said.contains("encryption_keys")
            && said.contains("\"PHI\"")
            && said.contains("no ACTIVE")
            && said.contains("set the key applications encrypt with ACTIVE")
            && !said.contains("no keys were found"),
        "{}",
        printed(&out)
    );
}

// Before: a restored key's row was inserted as a key made now: a new
// `createdAt`, and an `expiresAt` 90 days on, which applications that
// expire keys by date read as a fresh key.
#[tokio::test(flavor = "multi_thread")]
async fn a_restored_key_row_keeps_the_times_the_application_made_it_with() {
    let db = TestDb::new().await;
    let master = master_key(false);
    seed(&db, &master, 1, 5).await;
    db.client
        .batch_execute(
            "UPDATE encryption_keys SET \"createdAt\" = '2025-01-02 03:04:05.678', \"expiresAt\" = '2025-04-02 03:04:05.678' WHERE version = 1",
        )
        .await
        .unwrap();
    let times = "SELECT md5(string_agg(concat_ws(' ', version, algorithm, \"createdAt\", \"expiresAt\"), ',' ORDER BY version)) \
                 FROM encryption_keys WHERE version = 1";
    let before = table_hash(&db, times).await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &master);
    for step in [
        &["secrets", "stage", "--job", &j][..],
        &["run", "--job", &j],
        &["secrets", "promote", "--job", &j],
        &["secrets", "retire", "--job", &j, "--key-id", "1"],
        &["secrets", "restore", "--job", &j, "--key-id", "1"],
    ] {
        let out = rekey(step, &aws_env());
        assert_eq!(out.status.code(), Some(0), "{step:?}: {}", printed(&out));
    }
    assert_eq!(
        statuses(&db).await,
        vec![(1, "INACTIVE".into()), (2, "ACTIVE".into())]
    );
    assert_eq!(
        table_hash(&db, times).await,
        before,
        "the restored row's algorithm or times changed"
    );
    let seen = app(&db, "-").await.unwrap();
    assert_eq!(seen.read, 5, "every note reads with the restored keys");
}
