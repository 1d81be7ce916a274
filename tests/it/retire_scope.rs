//! What a retire's full verify must cover: tables and columns a job rotated
//! in an earlier run and its file no longer lists are refused, unless they
//! were under another key store than the key being retired, or the
//! operator vouches for them by name (recorded in the audit trail); and
//! what transactions still open wrote to them is waited for first.

use crate::harness::*;
use rekey::crypto::keytable::KeyState;

// Before this check: exit 0, "retired key 1 ... rotation 1 complete",
// while 3 values of the table the job file no longer listed were on key 1.
#[tokio::test(flavor = "multi_thread")]
async fn retire_is_refused_from_a_job_file_that_no_longer_lists_a_table_the_job_rotated() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    copy_patients(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let one_table = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, format!("{one_table}{COPY_TARGET}")).unwrap();
    // three of the copy's values as they were under key 1, to restore from a "backup"
    let backup = db
        .client
        .query(
            "SELECT id, phone_encrypted FROM patient_copy WHERE id IN (10, 20, 30)",
            &[],
        )
        .await
        .unwrap();
    stage_promote_and_run(&job);
    for row in &backup {
        let (id, value): (i64, Vec<u8>) = (row.get(0), row.get(1));
        db.client
            .execute(
                "UPDATE patient_copy SET phone_encrypted = $1 WHERE id = $2",
                &[&value, &id],
            )
            .await
            .unwrap();
    }
    // the operator drops the copy's target from the job file, then retires
    std::fs::write(&job, &one_table).unwrap();
    let before = std::fs::read(&keyring).unwrap();
    let out = rekey(&["secrets", "retire", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains(
            "rotated public.patient_copy in an earlier run, and the job file no longer lists it"
        ),
        "{}",
        printed(&out)
    );
    assert_eq!(
        std::fs::read(&keyring).unwrap(),
        before,
        "the keyring changed"
    );

    // listed again, the full verify finds the restored values
    std::fs::write(&job, format!("{one_table}{COPY_TARGET}")).unwrap();
    let out = rekey(&["secrets", "retire", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert!(
        printed(&out).contains("3 values still under key 1"),
        "{}",
        printed(&out)
    );
}

// Before this check: exit 0, "retired key 1", while 3 values of a column
// the job file no longer listed were on key 1. A column dropped from its
// table holds no values, so it refuses nothing.
#[tokio::test(flavor = "multi_thread")]
async fn retire_is_refused_from_a_job_file_that_no_longer_lists_a_column_the_job_rotated_renamed_or_not_until_it_is_dropped(
) {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let both_columns = std::fs::read_to_string(&job).unwrap();
    // three emergency phones as they were under key 1, to restore from a "backup"
    let backup = db
        .client
        .query(
            "SELECT id, emergency_contact_phone_encrypted FROM patient_persons WHERE id IN (10, 20, 40)",
            &[],
        )
        .await
        .unwrap();
    stage_promote_and_run(&job);
    for row in &backup {
        let (id, value): (i64, Vec<u8>) = (row.get(0), row.get(1));
        db.client
            .execute(
                "UPDATE patient_persons SET emergency_contact_phone_encrypted = $1 WHERE id = $2",
                &[&value, &id],
            )
            .await
            .unwrap();
    }
    // the operator drops the column from the target's list, then retires
    let one_column = both_columns.replace(
        "columns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]",
        "columns = [\"phone_encrypted\"]",
    );
    assert_ne!(one_column, both_columns);
    std::fs::write(&job, &one_column).unwrap();
    let before = std::fs::read(&keyring).unwrap();
    let out = rekey(&["secrets", "retire", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains(
            "rotated column emergency_contact_phone_encrypted of public.patient_persons in an earlier run"
        ),
        "{}",
        printed(&out)
    );
    assert_eq!(
        std::fs::read(&keyring).unwrap(),
        before,
        "the keyring changed"
    );

    // renamed, it is the same column, with the same values
    db.client
        .batch_execute(
            "ALTER TABLE patient_persons RENAME COLUMN emergency_contact_phone_encrypted TO emergency_phone",
        )
        .await
        .unwrap();
    let out = rekey(&["secrets", "retire", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("rotated column emergency_phone of public.patient_persons"),
        "{}",
        printed(&out)
    );

    // the column dropped from the table: nothing of it can need the key
    db.client
        .batch_execute("ALTER TABLE patient_persons DROP COLUMN emergency_phone")
        .await
        .unwrap();
    let out = rekey(&["secrets", "retire", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

/// Another key store's key, for the copy of the table kept under it.
const K4: &str = "4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c";

/// `patient_copy`, a copy of `patient_persons` with its own primary key.
async fn copy_patients(db: &TestDb) {
    db.client
        .batch_execute(
            "CREATE TABLE patient_copy AS SELECT * FROM patient_persons;
             ALTER TABLE patient_copy ADD PRIMARY KEY (id);",
        )
        .await
        .unwrap();
}

const COPY_TARGET: &str = "[[target]]\ntable = \"patient_copy\"\ncolumns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]\nformat = \"versioned-gcm\"\n";

/// `rekey secrets retire --job job` with `extra` arguments.
fn rekey_retire(job: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["secrets", "retire", "--job", job];
    args.extend_from_slice(extra);
    rekey(&args, &keyring_pass_env())
}

// Before this check: the job file's own advice ("rotate those with a job
// per key source") led to a refusal no run could lift: retire said the job
// "rotated public.patient_copy in an earlier run, and the job file no
// longer lists it" although that table's values were under the environment's
// keys, never under the keyring file's key being retired, and listing it
// again is refused by `secrets` (a target with keys of its own).
#[tokio::test(flavor = "multi_thread")]
async fn retire_is_not_refused_for_a_table_the_job_rotated_under_another_key_store_and_no_longer_lists(
) {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let job = copy_rotated_under_another_store(&db, &dir).await;
    // key 1 of the keyring file retires
    let out = rekey_retire(&job, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(printed(&out).contains("retired key 1"), "{}", printed(&out));
}

// A table the job rotated under the same store, and no longer lists: the
// operator may vouch for it by name (it moved to another job, say), and the
// retire's audit event says it was not verified.
#[tokio::test(flavor = "multi_thread")]
async fn retire_goes_on_without_a_left_out_table_the_operator_names_and_the_audit_event_says_so() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring, _) = copy_rotated_under_the_same_store(&db, &dir).await;

    let refused = rekey_retire(&job, &[]);
    assert_eq!(refused.status.code(), Some(2), "{}", printed(&refused));
    assert!(
        printed(&refused).contains("--accept-unverified public.patient_copy"),
        "the refusal does not name the way to vouch for the table: {}",
        printed(&refused)
    );
    // a name that is not among the tables left out is refused, nothing retired
    let before = std::fs::read(&keyring).unwrap();
    let out = rekey_retire(&job, &["--accept-unverified", "public.patient_cpy"]);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("public.patient_cpy is not a table this job rotated"),
        "{}",
        printed(&out)
    );
    assert_eq!(
        std::fs::read(&keyring).unwrap(),
        before,
        "the keyring changed"
    );
    // nor can a compromised key, whose material is destroyed at once, go on a word
    let out = rekey_retire(
        &job,
        &[
            "--reason",
            "compromise",
            "--accept-unverified",
            "public.patient_copy",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("cannot be retired on your word"),
        "{}",
        printed(&out)
    );
    assert_eq!(
        std::fs::read(&keyring).unwrap(),
        before,
        "the keyring changed"
    );

    let out = rekey_retire(&job, &["--accept-unverified", "public.patient_copy"]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let audit = std::fs::read_to_string(dir.path().join("patients.audit.jsonl")).unwrap();
    let retired: serde_json::Value = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["event_type"] == "key_retired")
        .expect("no key_retired event");
    assert_eq!(retired["verification_status"], "partial");
    let detail = retired["detail"].as_str().unwrap();
    assert!(
        detail.contains(
            "not verified, on the operator's word (--accept-unverified): public.patient_copy"
        ),
        "{detail}"
    );
}

// The same store is known by either of two records: by a key it still
// holds (the keyring file moved, and the job file names its new path), or
// by its name (the store no longer holds any key the run recorded).
#[tokio::test(flavor = "multi_thread")]
async fn a_left_out_table_under_the_same_store_is_still_refused_when_the_store_moved_or_its_keys_changed(
) {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring, one_table) = copy_rotated_under_the_same_store(&db, &dir).await;
    let left_out = "rotated public.patient_copy in an earlier run";

    // the run's recorded keys replaced by ones the store never held: its name still counts
    let recorded: serde_json::Value = db
        .client
        .query_one("SELECT keys FROM rekey.jobs", &[])
        .await
        .unwrap()
        .get(0);
    let unknown = unknown_fingerprints(&recorded);
    db.client
        .execute("UPDATE rekey.jobs SET keys = $1", &[&unknown])
        .await
        .unwrap();
    let out = rekey_retire(&job, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(printed(&out).contains(left_out), "{}", printed(&out));
    db.client
        .execute("UPDATE rekey.jobs SET keys = $1", &[&recorded])
        .await
        .unwrap();

    // the keyring file moved: its keys still count
    let moved = dir.path().join("moved-keyring.json");
    std::fs::rename(&keyring, &moved).unwrap();
    let moved_job = one_table.replace(
        &format!("{:?}", keyring.display().to_string()),
        &format!("{:?}", moved.display().to_string()),
    );
    assert_ne!(moved_job, one_table);
    std::fs::write(&job, &moved_job).unwrap();
    let out = rekey_retire(&job, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(printed(&out).contains(left_out), "{}", printed(&out));

    // moved, with none of its recorded keys: nothing says it is the same store
    db.client
        .execute("UPDATE rekey.jobs SET keys = $1", &[&unknown])
        .await
        .unwrap();
    let out = rekey_retire(&job, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

/// `keys` as `rekey.jobs` records them, every fingerprint replaced.
fn unknown_fingerprints(keys: &serde_json::Value) -> serde_json::Value {
    let mut keys = keys.clone();
    for target in keys.as_array_mut().unwrap() {
        for side in target.as_object_mut().unwrap().values_mut() {
            for fingerprint in side["keys"].as_object_mut().unwrap().values_mut() {
                *fingerprint = serde_json::Value::String("0000000000000000".into());
            }
        }
    }
    keys
}

/// `patient_copy` rotated by job `patients` beside `patient_persons`, both
/// under the keyring file (keys 1 to 2), then left out of the job file;
/// returns the job file, the keyring file and the job's text without it.
async fn copy_rotated_under_the_same_store(
    db: &TestDb,
    dir: &tempfile::TempDir,
) -> (String, std::path::PathBuf, String) {
    copy_patients(db).await;
    let (job, keyring) = keyring_file_job(db, dir);
    let one_table = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, format!("{one_table}{COPY_TARGET}")).unwrap();
    stage_promote_and_run(&job);
    std::fs::write(&job, &one_table).unwrap();
    (job, keyring, one_table)
}

/// `patient_copy` rotated by job `patients` under keys of its own (the
/// environment's `COPY_*`, keys 3 to 4, which the keyring file never held),
/// beside `patient_persons` under the keyring file (keys 1 to 2); then
/// left out of the job file, as a target moved to a job of its own is.
async fn copy_rotated_under_another_store(db: &TestDb, dir: &tempfile::TempDir) -> String {
    copy_patients(db).await;
    // the copy moves first to a store of its own (keys 3 and 4, which the keyring file never held)
    let prep = dir.path().join("copy.toml");
    std::fs::write(
        &prep,
        format!(
            "[database]\nurl = \"{}\"\n[keys]\nsource = \"env\"\nprefix = \"COPY\"\n{COPY_TARGET}",
            db.url
        ),
    )
    .unwrap();
    let mut copy_env = vec![
        ("COPY_KEY_V1", K1.to_string()),
        ("COPY_KEY_V3", K3.to_string()),
        ("COPY_CURRENT_VERSION", "3".to_string()),
    ];
    let out = rekey(&["run", "--job", prep.to_str().unwrap()], &copy_env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    let (job, _keyring) = keyring_file_job(db, dir);
    let one_table = std::fs::read_to_string(&job).unwrap();
    stage_and_promote(&job, &keyring_pass_env());
    // the job runs the copy too, under the environment's keys (3 to 4)
    let override_keys = "keys = { source = \"env\", prefix = \"COPY\" }\n";
    std::fs::write(&job, format!("{one_table}{COPY_TARGET}{override_keys}")).unwrap();
    copy_env = vec![
        ("COPY_KEY_V3", K3.to_string()),
        ("COPY_KEY_V4", K4.to_string()),
        ("COPY_CURRENT_VERSION", "4".to_string()),
    ];
    let env: Vec<(&str, String)> = keyring_pass_env().into_iter().chain(copy_env).collect();
    let out = rekey(&["run", "--job", &job], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    std::fs::write(&job, &one_table).unwrap();
    job
}

// Runs from before rekey recorded their targets' stores (a NULL
// `key_stores`, or no `rekey.job_targets` rows at all, before it recorded
// their columns) show nothing of the store they were under: a table they
// rotated and the job file no longer lists is refused whatever its store,
// until the operator vouches for it.
#[tokio::test(flavor = "multi_thread")]
async fn runs_recorded_before_their_stores_count_whatever_store_they_were_under() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let job = copy_rotated_under_another_store(&db, &dir).await;
    let left_out = "rotated public.patient_copy in an earlier run";
    for before in [
        "UPDATE rekey.job_targets SET key_stores = NULL",
        "DELETE FROM rekey.job_targets",
    ] {
        db.client.execute(before, &[]).await.unwrap();
        let out = rekey_retire(&job, &[]);
        assert_eq!(out.status.code(), Some(2), "{before}: {}", printed(&out));
        assert!(
            printed(&out).contains(left_out),
            "{before}: {}",
            printed(&out)
        );
    }
    let out = rekey_retire(&job, &["--accept-unverified", "public.patient_copy"]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

// A column the job file no longer lists, of a table it still lists, is
// vouched for by its table's name, and the audit event names the column.
#[tokio::test(flavor = "multi_thread")]
async fn vouching_for_a_table_covers_a_left_out_column_and_the_audit_event_names_the_column() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _keyring) = keyring_file_job(&db, &dir);
    let both_columns = std::fs::read_to_string(&job).unwrap();
    stage_promote_and_run(&job);
    let one_column = both_columns.replace(
        "columns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]",
        "columns = [\"phone_encrypted\"]",
    );
    assert_ne!(one_column, both_columns);
    std::fs::write(&job, &one_column).unwrap();
    let out = rekey_retire(&job, &["--accept-unverified", "public.patient_persons"]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let audit = std::fs::read_to_string(dir.path().join("patients.audit.jsonl")).unwrap();
    let detail = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["event_type"] == "key_retired")
        .expect("no key_retired event")["detail"]
        .clone();
    assert!(
        detail
            .as_str()
            .unwrap_or_default()
            .contains("(--accept-unverified): column emergency_contact_phone_encrypted of public.patient_persons"),
        "{detail}"
    );
}

/// An application's transaction that writes id 10's value as it was under
/// key 1 (before `stage_promote_and_run`) back, and stays open.
async fn open_write_under_key_1(db: &TestDb, old: &[u8]) -> tokio_postgres::Client {
    let app = connect(&db.url).await;
    app.batch_execute("BEGIN").await.unwrap();
    app.execute(
        "UPDATE patient_persons SET phone_encrypted = $1 WHERE id = 10",
        &[&old],
    )
    .await
    .unwrap();
    app
}

/// id 10's phone as it is now.
async fn phone_of_10(db: &TestDb) -> Vec<u8> {
    db.client
        .query_one(
            "SELECT phone_encrypted FROM patient_persons WHERE id = 10",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Whether `child` (a retire) looked for open writers to the job's tables
/// before it ended.
async fn looked_for_open_writers(db: &TestDb, child: &mut std::process::Child) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        let seen: bool = db
            .client
            .query_one(
                "SELECT count(*) > 0 FROM pg_stat_activity
                  WHERE application_name = 'rekey' AND datname = current_database()
                    AND query LIKE '%RowExclusiveLock%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if seen {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    false
}

// Before: a retire's full verify ran beside a transaction still open that
// had written a value under the retiring key, and saw the row as it was
// before: exit 0, "retired key 1", and once the transaction committed, its
// value's key was gone.
#[tokio::test(flavor = "multi_thread")]
async fn retire_waits_for_a_transaction_still_writing_to_the_table_and_refuses_on_what_it_committed(
) {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let old = phone_of_10(&db).await;
    stage_promote_and_run(&job);
    let app = open_write_under_key_1(&db, &old).await;
    let before = std::fs::read(&keyring).unwrap();
    let mut child =
        spawn_rekey_captured(&["secrets", "retire", "--job", &job], &keyring_pass_env());
    let waited = looked_for_open_writers(&db, &mut child).await;
    app.batch_execute("COMMIT").await.unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(waited, "the retire did not wait: {}", printed(&out));
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert!(
        printed(&out).contains("1 values still under key 1"),
        "{}",
        printed(&out)
    );
    assert_eq!(
        std::fs::read(&keyring).unwrap(),
        before,
        "the keyring changed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retire_is_refused_while_a_transaction_that_wrote_to_the_table_stays_open_naming_its_process(
) {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let old = phone_of_10(&db).await;
    stage_promote_and_run(&job);
    let app = open_write_under_key_1(&db, &old).await;
    let pid: i32 = app
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let before = std::fs::read(&keyring).unwrap();
    let out = rekey_retire(&job, &["--wait-for-writers", "500ms"]);
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert!(
        printed(&out).contains(&format!(
            "a transaction still open has written to public.patient_persons (process {pid}"
        )) && printed(&out).contains(&format!("pg_terminate_backend({pid})")),
        "{}",
        printed(&out)
    );
    assert_eq!(
        std::fs::read(&keyring).unwrap(),
        before,
        "the keyring changed"
    );
    app.batch_execute("ROLLBACK").await.unwrap();
    // once it is gone, nothing holds the retire back
    let out = rekey_retire(&job, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

/// Lists `patient_parts` in the job file too.
fn list_patient_parts(job: &str) {
    let listed = std::fs::read_to_string(job).unwrap();
    std::fs::write(
        job,
        format!(
            "{listed}{}",
            COPY_TARGET.replace("patient_copy", "patient_parts")
        ),
    )
    .unwrap();
}

/// Three (id, phone) of partition `patient_parts_b` as they are now: a backup.
async fn three_values_of_parts_b(db: &TestDb) -> Vec<(i64, Vec<u8>)> {
    db.client
        .query(
            "SELECT id, phone_encrypted FROM patient_parts WHERE id IN (110, 120, 130)",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Restores phones of `patient_parts` from `backup`.
async fn put_back(db: &TestDb, backup: &[(i64, Vec<u8>)]) {
    for (id, value) in backup {
        db.client
            .execute(
                "UPDATE patient_parts SET phone_encrypted = $1 WHERE id = $2",
                &[value, id],
            )
            .await
            .unwrap();
    }
}

/// Detaches `patient_parts_b`; the retire is then refused for it, naming
/// it, and the keyring file is left as it was.
async fn detach_parts_b_and_see_the_retire_refused(
    db: &TestDb,
    job: &str,
    keyring: &std::path::Path,
) {
    db.client
        .batch_execute("ALTER TABLE patient_parts DETACH PARTITION patient_parts_b")
        .await
        .unwrap();
    let before = std::fs::read(keyring).unwrap();
    let out = rekey_retire(job, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("rotated public.patient_parts_b in an earlier run"),
        "{}",
        printed(&out)
    );
    assert_eq!(
        std::fs::read(keyring).unwrap(),
        before,
        "the keyring changed"
    );
}

// Before: a partition the job rotated as part of its listed table, then
// detached, was a table of its own that no listed target covered, and the
// retire's full verify did not read it: exit 0, "retired key 1", while
// values there restored from a backup were under key 1.
#[tokio::test(flavor = "multi_thread")]
async fn retire_is_refused_for_a_partition_the_job_rotated_and_that_was_detached_since() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    db.client
        .batch_execute(
            "CREATE TABLE patient_parts (LIKE patient_persons) PARTITION BY RANGE (id);
             ALTER TABLE patient_parts ADD PRIMARY KEY (id);
             CREATE TABLE patient_parts_a PARTITION OF patient_parts FOR VALUES FROM (MINVALUE) TO (101);
             CREATE TABLE patient_parts_b PARTITION OF patient_parts FOR VALUES FROM (101) TO (MAXVALUE);
             INSERT INTO patient_parts SELECT * FROM patient_persons;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    list_patient_parts(&job);
    let backup = three_values_of_parts_b(&db).await;
    stage_promote_and_run(&job);
    put_back(&db, &backup).await;
    detach_parts_b_and_see_the_retire_refused(&db, &job, &keyring).await;
    // attached again, the full verify reads it and finds the restored values
    db.client
        .batch_execute("ALTER TABLE patient_parts ATTACH PARTITION patient_parts_b FOR VALUES FROM (101) TO (MAXVALUE)")
        .await
        .unwrap();
    let out = rekey_retire(&job, &[]);
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert!(
        printed(&out).contains("3 values still under key 1"),
        "{}",
        printed(&out)
    );
}

// Before: a job recorded its tables' partitions when it began only; a
// partition attached while the job ran (between a run stopped by its window
// and the next) and detached before the retire was no table the retire knew
// of: exit 0, "retired key 1", while values there restored from a backup
// were under key 1.
#[tokio::test(flavor = "multi_thread")]
async fn retire_is_refused_for_a_partition_attached_while_the_job_ran_and_detached_since() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    db.client
        .batch_execute(
            "CREATE TABLE patient_parts (LIKE patient_persons) PARTITION BY RANGE (id);
             ALTER TABLE patient_parts ADD PRIMARY KEY (id);
             CREATE TABLE patient_parts_a PARTITION OF patient_parts FOR VALUES FROM (MINVALUE) TO (101);
             INSERT INTO patient_parts SELECT * FROM patient_persons WHERE id < 101;
             CREATE TABLE patient_parts_b (LIKE patient_persons);
             ALTER TABLE patient_parts_b ADD PRIMARY KEY (id);
             INSERT INTO patient_parts_b SELECT * FROM patient_persons WHERE id >= 101;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    list_patient_parts(&job);
    stage_and_promote(&job, &keyring_pass_env());
    // the first run ends with its window, the job unfinished
    let out = rekey(
        &[
            "run",
            "--job",
            &job,
            "--max-rows-per-sec",
            "20",
            "--batch-size",
            "10",
            "--run-time",
            "1s",
        ],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(5), "{}", printed(&out));
    // a partition attached before the next
    db.client
        .batch_execute("ALTER TABLE patient_parts ATTACH PARTITION patient_parts_b FOR VALUES FROM (101) TO (MAXVALUE)")
        .await
        .unwrap();
    let backup = three_values_of_parts_b(&db).await;
    let out = rekey(&["run", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    put_back(&db, &backup).await;
    detach_parts_b_and_see_the_retire_refused(&db, &job, &keyring).await;
}

// Before: where rekey's role may not see other roles' sessions in
// pg_stat_activity (no pg_read_all_stats), an application's transaction
// still open under another role was not seen, and the retire went on.
#[tokio::test(flavor = "multi_thread")]
async fn retire_as_a_role_that_may_not_see_the_applications_sessions_still_waits_for_its_open_write(
) {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let old = phone_of_10(&db).await;
    stage_promote_and_run(&job);
    let role = format!("{}_retirer", db_name(&db).await);
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'pw' NOSUPERUSER NOBYPASSRLS;
             GRANT SELECT ON patient_persons TO {role};
             GRANT USAGE ON SCHEMA rekey TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA rekey TO {role};
             GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA rekey TO {role};"
        ))
        .await
        .unwrap();
    // the application's transaction, under the superuser's role
    let app = open_write_under_key_1(&db, &old).await;
    let before = std::fs::read(&keyring).unwrap();
    let url = url_as(&db, &role);
    let out = rekey_retire(
        &job,
        &["--wait-for-writers", "500ms", "--database-url", &url],
    );
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert!(
        printed(&out)
            .contains("a transaction still open has written to public.patient_persons (process"),
        "{}",
        printed(&out)
    );
    assert_eq!(
        std::fs::read(&keyring).unwrap(),
        before,
        "the keyring changed"
    );
    app.batch_execute("ROLLBACK").await.unwrap();
}

// Before: a value no key opens, labelled with the target key (here a key-1
// value whose version byte says 2), refused the retire with "rotate them
// first (`rekey run`)", and `verify` said a run records them: a run never
// reads a value labelled with the target key, so the advice looped.
#[tokio::test(flavor = "multi_thread")]
async fn a_retire_refused_for_values_no_key_opens_says_what_helps_not_a_run() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _keyring) = keyring_file_job(&db, &dir);
    let old = phone_of_10(&db).await;
    stage_promote_and_run(&job);
    db.client
        .execute(
            "UPDATE patient_persons SET phone_encrypted = set_byte($1, 0, 2) WHERE id = 10",
            &[&old],
        )
        .await
        .unwrap();
    let out = rekey_retire(&job, &[]);
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert!(
        printed(&out).contains("0 values still under key 1, 1 undecryptable; no key given opens")
            && !printed(&out).contains("rotate them first"),
        "{}",
        printed(&out)
    );
    let out = rekey(&["verify", "--job", &job, "--full"], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert!(
        !printed(&out).contains("a run also records them")
            && !printed(&out).contains("`rekey run` quarantines them"),
        "{}",
        printed(&out)
    );
}

// Before: exit 2 and "nothing was changed" after it had staged key 2,
// re-encrypted the rows the filter saw and promoted; the compromised key
// could then never be retired with that job.
#[tokio::test(flavor = "multi_thread")]
async fn a_compromise_rotation_with_a_where_filter_is_refused_before_it_stages_a_key() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let whole = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, format!("{whole}where = \"id <= 50\"\n")).unwrap();
    let rows_before = db.checksum("patient_persons").await;
    let dry = rekey(
        &[
            "rotate",
            "--job",
            &job,
            "--reason",
            "compromise",
            "--dry-run",
        ],
        &keyring_pass_env(),
    );
    assert_eq!(
        dry.status.code(),
        Some(2),
        "the dry run says what the run does: {}",
        printed(&dry)
    );
    let out = rekey(
        &[
            "rotate",
            "--job",
            &job,
            "--reason",
            "compromise",
            "--no-wait",
        ],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("`where` filter"),
        "the refusal names the filter: {}",
        printed(&out)
    );
    let keys: Vec<_> = keyring_table(&keyring)
        .entries
        .iter()
        .map(|e| (e.id, e.state))
        .collect();
    assert_eq!(
        keys,
        vec![(1, KeyState::Current)],
        "no key was staged: {}",
        printed(&out)
    );
    assert_eq!(
        db.checksum("patient_persons").await,
        rows_before,
        "no value was re-encrypted"
    );
}

// Before: with two jobs sharing one keyring file, the second job's rotate
// retired key 1 ("rotation 2 complete", exit 0) while the first job's
// rotation, still re-encrypting its table, had thousands of values under it.
#[tokio::test(flavor = "multi_thread")]
async fn retire_is_refused_while_another_job_on_the_same_store_still_rotates_away_from_the_key() {
    let db = TestDb::new().await;
    db.seed_patients(20_000).await;
    copy_patients(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let (job_a, keyring) = keyring_file_job(&db, &dir);
    let whole = std::fs::read_to_string(&job_a).unwrap();
    std::fs::write(&job_a, format!("name = \"a\"\n{whole}")).unwrap();
    let job_b = dir.path().join("b.toml").display().to_string();
    let database = whole.split("[[target]]").next().unwrap();
    std::fs::write(&job_b, format!("name = \"b\"\n{database}{COPY_TARGET}")).unwrap();

    // job a's rotation is killed with its table part done
    let mut a = spawn_rekey(
        &[
            "rotate",
            "--job",
            &job_a,
            "--no-wait",
            "--batch-size",
            "200",
            "--max-rows-per-sec",
            "5000",
        ],
        &keyring_pass_env(),
    );
    wait_for_progress(&db, &mut a, 1_000).await;
    a.kill().unwrap();
    a.wait().unwrap();
    let left = db
        .decrypted_patients(&keyring_table(&keyring).keyring().unwrap())
        .await
        .values()
        .filter(|(p, _)| matches!(p, Decrypted::Plain(1, _)))
        .count();
    assert!(left > 0, "job a's window rotated every row");

    let out = rekey(
        &["rotate", "--job", &job_b, "--no-wait", "--grace", "0s"],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("job \"a\" is rotating"),
        "the refusal names the other job: {}",
        printed(&out)
    );
    // exit 2 after this invocation promoted key 2: it says what it changed
    assert!(
        printed(&out).contains("before this, the command had")
            && printed(&out).contains("promoted"),
        "{}",
        printed(&out)
    );
    let key1 = keyring_table(&keyring)
        .entries
        .into_iter()
        .find(|e| e.id == 1)
        .unwrap();
    assert!(
        key1.state != KeyState::Retired,
        "key 1 was retired while job a's values need it"
    );
}

// Before: job b ran over its table under a keyring file job a also uses;
// job a's compromise rotation then retired key 1 and destroyed its
// material (exit 0) while every value of b's table was under it.
#[tokio::test(flavor = "multi_thread")]
async fn retire_is_refused_while_another_job_ran_over_a_table_under_the_same_store_that_this_job_does_not_list(
) {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    copy_patients(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let (job_a, keyring) = keyring_file_job(&db, &dir);
    let whole = std::fs::read_to_string(&job_a).unwrap();
    let job_b = dir.path().join("b.toml").display().to_string();
    let database = whole.split("[[target]]").next().unwrap();
    std::fs::write(&job_b, format!("{database}{COPY_TARGET}")).unwrap();
    // job b runs over its table: nothing to rewrite, every value is on the current key 1
    let out = rekey(&["run", "--job", &job_b], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    let out = rekey(
        &[
            "rotate",
            "--job",
            &job_a,
            "--no-wait",
            "--grace",
            "0s",
            "--reason",
            "compromise",
        ],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("public.patient_copy (job \"b\")")
            && printed(&out).contains("Nothing was retired"),
        "{}",
        printed(&out)
    );
    // a compromised key is never retired on the operator's word: no such way out is offered
    assert!(
        !printed(&out).contains("--accept-unverified public.patient_copy")
            && printed(&out).contains("cannot be retired on your word"),
        "{}",
        printed(&out)
    );
    let key1 = keyring_table(&keyring)
        .entries
        .into_iter()
        .find(|e| e.id == 1)
        .unwrap();
    assert!(
        key1.state != KeyState::Retired && key1.key.is_some(),
        "key 1 was destroyed while job b's values need it"
    );

    // job b rotates its table to the new current key; a job file listing
    // both tables then retires key 1, its full verify reading both
    let out = rekey(&["run", "--job", &job_b], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    std::fs::write(&job_a, format!("{whole}{COPY_TARGET}")).unwrap();
    let out = rekey(
        &["secrets", "retire", "--job", &job_a, "--key-id", "1"],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let key1 = keyring_table(&keyring)
        .entries
        .into_iter()
        .find(|e| e.id == 1)
        .unwrap();
    assert_eq!(key1.state, KeyState::Retired);
}

// Before the abort's exception: with another job's table run under the
// same keyring file, an abort could never retire the staged key it rolled
// back from (exit 2 at every try), though no run of that job wrote under
// it and applications never encrypt under a key that was never current.
#[tokio::test(flavor = "multi_thread")]
async fn an_abort_retires_its_staged_key_though_another_job_ran_under_the_same_store() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    copy_patients(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let (job_a, keyring) = keyring_file_job(&db, &dir);
    let whole = std::fs::read_to_string(&job_a).unwrap();
    let job_b = dir.path().join("copy.toml").display().to_string();
    let database = whole.split("[[target]]").next().unwrap();
    std::fs::write(&job_b, format!("{database}{COPY_TARGET}")).unwrap();
    let out = rekey(&["run", "--job", &job_b], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    let out = rekey(&["rotate", "--job", &job_a], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    let out = rekey(&["rotate", "--job", &job_a, "--abort"], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let key2 = keyring_table(&keyring)
        .entries
        .into_iter()
        .find(|e| e.id == 2)
        .unwrap();
    assert_eq!(key2.state, KeyState::Retired, "{}", printed(&out));
}

// Before the exception: two keyring files imported from the same key 1;
// job b's run under the second file counted, by the key's fingerprint, as
// a run under the first, so job a's compromise rotation could never retire
// key 1 (exit 2: listing the table failed its verify, --accept-unverified
// is refused under compromise), though destroying the first file's copy
// leaves the second file's, which job b's values are under.
#[tokio::test(flavor = "multi_thread")]
async fn another_job_under_a_second_keyring_file_holding_the_same_key_does_not_hold_back_a_retire_while_that_file_keeps_it(
) {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    copy_patients(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let (job_a, keyring) = keyring_file_job(&db, &dir);
    let second = tempfile::tempdir().unwrap();
    let imported = second.path().join("keyring.json");
    keyring_file_with_key_1(&imported, K1);
    let whole = std::fs::read_to_string(&job_a).unwrap();
    let database = whole.split("[[target]]").next().unwrap().replace(
        &format!("{:?}", keyring.display().to_string()),
        &format!("{:?}", imported.display().to_string()),
    );
    assert!(database.contains(&imported.display().to_string()));
    let job_b = dir.path().join("b.toml").display().to_string();
    std::fs::write(&job_b, format!("{database}{COPY_TARGET}")).unwrap();
    let out = rekey(&["run", "--job", &job_b], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    // the second file moved away: nothing says it still holds key 1
    let moved = second.path().join("moved.json");
    std::fs::rename(&imported, &moved).unwrap();
    let rotate = || {
        rekey(
            &[
                "rotate",
                "--job",
                &job_a,
                "--no-wait",
                "--grace",
                "0s",
                "--reason",
                "compromise",
            ],
            &keyring_pass_env(),
        )
    };
    let out = rotate();
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("public.patient_copy (job \"b\")"),
        "{}",
        printed(&out)
    );
    std::fs::rename(&moved, &imported).unwrap();
    let out = rotate();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let key1 = keyring_table(&keyring)
        .entries
        .into_iter()
        .find(|e| e.id == 1)
        .unwrap();
    assert_eq!((key1.state, key1.key.is_some()), (KeyState::Retired, false));
    // job b's values still open under its own file's key 1
    let out = rekey(&["verify", "--job", &job_b, "--full"], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

// Today: the first SIGINT did nothing while the retire waited for the open
// transaction (up to --wait-for-writers, an hour here); only a second one
// ended the process.
#[tokio::test(flavor = "multi_thread")]
async fn a_signal_while_a_rotation_waits_for_open_writers_stops_it_at_once_and_retires_nothing() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    // an application transaction that wrote a new row and stays open
    let app = connect(&db.url).await;
    app.batch_execute(
        "BEGIN; INSERT INTO patient_persons (id, name, notes) VALUES (100000, 'new', 'open')",
    )
    .await
    .unwrap();
    let rotate = [
        "rotate",
        "--job",
        job.as_str(),
        "--no-wait",
        "--grace",
        "0s",
        "--wait-for-writers",
        "1h",
    ];
    let mut child = spawn_rekey_captured(&rotate, &keyring_pass_env());
    // the rotation waits for that transaction
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let waiting: bool = db
            .client
            .query_one(
                // this database's own: other tests' retires run on the same server
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                                 WHERE application_name = 'rekey' AND datname = current_database()
                                   AND query LIKE '%SELECT DISTINCT l.virtualtransaction%')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the rotation ended before it waited for the open transaction: {}",
            printed(&child.wait_with_output().unwrap())
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the rotation never waited for the open transaction"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -INT failed");
    // a wait that ignored the signal would last the hour: killed, the test fails
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() >= deadline {
            child.kill().unwrap();
            panic!("the rotation was still waiting 60 s after SIGINT");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", printed(&out));
    assert!(
        printed(&out).contains("was not retired"),
        "{}",
        printed(&out)
    );
    assert_ne!(
        keyring_table(&keyring).entries[0].state,
        KeyState::Retired,
        "key 1 was retired"
    );

    // once the transaction ends, the same command finishes the rotation
    app.batch_execute("ROLLBACK").await.unwrap();
    let out = rekey(&rotate, &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(keyring_table(&keyring).entries[0].state, KeyState::Retired);
}
