//! Master key rotation: every data key of the key table (or of a KMS
//! keyring file) re-wrapped under a new master key, no value of user data
//! touched, killed and resumed without loss, and afterwards only the new
//! master key needed. moto does not refuse Decrypt under a disabled key,
//! so "only the new key is needed" is shown by pinning Decrypt to it
//! (KeyId), which moto, like KMS, refuses for a blob under another key.

use super::*;

const NOTES_HASH: &str =
    "SELECT md5(string_agg(id || ':' || encode(note_encrypted, 'hex'), ',' ORDER BY id)) FROM patient_notes";
const KEY_ROWS_HASH: &str = r#"SELECT md5(string_agg(concat_ws(':', id, version, purpose, algorithm, status, "createdAt", "expiresAt"), ',' ORDER BY version)) FROM encryption_keys"#;
const KEYS_HASH: &str = r#"SELECT md5(string_agg(encode("encryptedKey", 'hex'), ',' ORDER BY version)) FROM encryption_keys"#;

fn rewrap_args<'a>(j: &'a str, to: &'a str) -> Vec<&'a str> {
    vec![
        "secrets",
        "rewrap",
        "--job",
        j,
        "--to-kms-key",
        to,
        "--json",
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rewrap_of_1000_data_keys_touches_no_user_row_and_then_only_the_new_master_key_is_needed()
{
    let db = TestDb::new().await;
    let old = master_key(true);
    seed(&db, &old, 1_000, 500).await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &old);
    let before = app(&db, "-").await.unwrap();
    let notes = table_hash(&db, NOTES_HASH).await;
    let key_rows = table_hash(&db, KEY_ROWS_HASH).await;
    let wrapped = table_hash(&db, KEYS_HASH).await;

    // a master key that cannot be used is refused, naming it and the fix, before anything changes
    let disabled = master_key(false);
    disable_key(&disabled);
    let out = rekey(&rewrap_args(&j, &disabled), &aws_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        stderr(&out).contains(&disabled) && stderr(&out).contains("enable it"),
        "{}",
        printed(&out)
    );
    assert_eq!(table_hash(&db, KEYS_HASH).await, wrapped);

    let new = master_key(true);
    let out = rekey(&rewrap_args(&j, &new), &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let report = json(&out);
    assert_eq!(
        (report["total"].as_u64(), report["rewrapped"].as_u64()),
        (Some(1_000), Some(1_000)),
        "{report}"
    );
    assert_eq!(
        table_hash(&db, NOTES_HASH).await,
        notes,
        "no user row touched"
    );
    assert_eq!(
        table_hash(&db, KEY_ROWS_HASH).await,
        key_rows,
        "only the wrapped keys changed"
    );
    assert_ne!(table_hash(&db, KEYS_HASH).await, wrapped);

    // only the new master key is needed: every key unwraps under it alone, to the same key
    let after = app(&db, &new).await.unwrap();
    assert_eq!(after.fingerprints, before.fingerprints);
    assert_eq!(after.read, 501);
    let stale = app(&db, &old).await.unwrap_err();
    assert!(
        stale.contains("AccessDenied") || stale.contains("IncorrectKey"),
        "{stale}"
    );

    // rekey, with the job naming the new master key, reads the table under it alone
    let out = rekey(&["secrets", "show", "--job", &j], &aws_env());
    assert_eq!(
        out.status.code(),
        Some(2),
        "the job still names the old master key, a configuration to fix: {}",
        printed(&out)
    );
    assert!(stderr(&out).contains("rewrap"), "{}", printed(&out));
    let j = job(&db, &dir, &new);
    let out = rekey(&["secrets", "show", "--job", &j, "--json"], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["keys"].as_array().unwrap().len(), 1_000);

    // audited; a second rewrap has nothing left to do
    let events: Vec<String> = db
        .client
        .query("SELECT event_type FROM rekey.audit ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        events,
        [
            "master_key_rewrap_failed",
            "master_key_rewrap_started",
            "master_key_rewrap_started",
            "master_key_rewrapped"
        ],
        "the refused rewrap, then the rewrap"
    );
    let out = rekey(&rewrap_args(&j, &new), &aws_env());
    assert_eq!(
        (
            json(&out)["rewrapped"].as_u64(),
            json(&out)["already"].as_u64()
        ),
        (Some(0), Some(1_000))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rewrap_killed_mid_way_resumes_and_loses_nothing() {
    let db = TestDb::new().await;
    let old = master_key(false);
    seed(&db, &old, 1_000, 300).await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &old);
    let before = app(&db, "-").await.unwrap();
    db.client
        .batch_execute(r#"CREATE TABLE wrapped_before AS SELECT version, "encryptedKey" AS k FROM encryption_keys"#)
        .await
        .unwrap();
    let changed = || async {
        db.client
            .query_one(
                r#"SELECT count(*) FROM encryption_keys e JOIN wrapped_before b USING (version) WHERE e."encryptedKey" <> b.k"#,
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };

    let new = master_key(false);
    let mut child = spawn_rekey(&rewrap_args(&j, &new), &aws_env());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while changed().await < 100 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the rewrap ended before it was killed"
        );
        assert!(std::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done = changed().await;
    assert!(done < 1_000, "killed mid-way: {done}");

    // half and half: the application still reads everything
    let mid = app(&db, "-").await.unwrap();
    assert_eq!(mid.fingerprints, before.fingerprints);

    let out = rekey(&rewrap_args(&j, &new), &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let report = json(&out);
    assert_eq!(report["total"], 1_000);
    assert_eq!(
        report["rewrapped"].as_i64().unwrap() + report["already"].as_i64().unwrap(),
        1_000,
        "{report}"
    );
    assert!(report["already"].as_i64().unwrap() >= done, "{report}");
    assert_eq!(changed().await, 1_000);
    let after = app(&db, &new).await.unwrap();
    assert_eq!(
        after.fingerprints, before.fingerprints,
        "no data key lost or changed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kms_keyring_file_is_rewrapped_and_then_opens_under_the_new_master_key() {
    let db = TestDb::new().await;
    db.seed_patients(10).await;
    let dir = tempfile::tempdir().unwrap();
    let old = master_key(false);
    let keyring = dir.path().join("keyring.json");
    let write_job = |master: &str| {
        let job = dir.path().join("patients.toml");
        std::fs::write(
            &job,
            format!(
                "[database]\nurl = \"{}\"\n[keys]\nsource = \"aws-kms\"\nkms_key_id = \"{master}\"\npath = {:?}\nendpoint = \"{}\"\nregion = \"us-east-1\"\n[[target]]\ntable = \"patient_persons\"\ncolumns = [\"phone_encrypted\"]\nformat = \"versioned-gcm\"\n",
                db.url,
                keyring.display().to_string(),
                moto().endpoint
            ),
        )
        .unwrap();
        job.display().to_string()
    };
    let j = write_job(&old);
    let mut import = aws_env();
    import.extend(v1_env());
    let out = rekey(
        &["secrets", "init", "--job", &j, "--import-env", "ENCRYPTION"],
        &import,
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let show = |j: &str| rekey(&["secrets", "show", "--job", j, "--json"], &aws_env());
    let fingerprint = json(&show(&j))["keys"][0]["fingerprint"].clone();

    let new = master_key(false);
    let out = rekey(&rewrap_args(&j, &new), &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["rewrapped"], 1);
    let text = std::fs::read_to_string(&keyring).unwrap();
    assert!(text.contains(&new), "{text}");

    let out = show(&j);
    assert_eq!(
        out.status.code(),
        Some(2),
        "the job names the old key: {}",
        printed(&out)
    );
    assert!(stderr(&out).contains("rewrap"), "{}", printed(&out));
    let j = write_job(&new);
    let out = show(&j);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["keys"][0]["fingerprint"], fingerprint);
}

// Before: the session holding the job's lifecycle lock sat idle through
// the KMS calls; a server with `idle_session_timeout` closed it (the lock
// went with it, letting another command change the keys beside the
// rewrap), and the rewrap's closing audit event failed (exit 1).
#[tokio::test(flavor = "multi_thread")]
async fn a_rewrap_longer_than_idle_session_timeout_holds_the_lifecycle_lock_to_the_end() {
    let db = TestDb::new().await;
    let old = master_key(false);
    seed(&db, &old, 1_000, 10).await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &old);
    let new = master_key(false);
    db.alter_database("SET idle_session_timeout = '300ms'")
        .await;
    let started = std::time::Instant::now();
    let mut child = spawn_rekey_captured(&rewrap_args(&j, &new), &aws_env());
    let mut checked = 0;
    while child.try_wait().unwrap().is_none() {
        let schema: bool = db
            .client
            .query_one("SELECT to_regclass('rekey.audit') IS NOT NULL", &[])
            .await
            .unwrap()
            .get(0);
        if !schema {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            continue;
        }
        let audited: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM rekey.audit WHERE event_type = 'master_key_rewrap_started'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let held = advisory_lock_held(&db, "rekey.lifecycle:notes").await;
        let finished: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM rekey.audit WHERE event_type <> 'master_key_rewrap_started'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        eprintln!(
            "{:?} audited {audited} held {held} finished {finished}",
            started.elapsed()
        );
        if audited > 0 && finished == 0 && child.try_wait().unwrap().is_none() {
            assert!(
                held,
                "no session holds the lifecycle lock {:?} into the rewrap",
                started.elapsed()
            );
            checked += 1;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    db.alter_database("RESET idle_session_timeout").await;
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        took > std::time::Duration::from_millis(900) && checked > 0,
        "the premise: the rewrap ({took:?}, {checked} checks) outlasted the timeout three times over"
    );
    assert_eq!(json(&out)["rewrapped"], 1_000, "{}", printed(&out));
}
