//! A retired key stays recoverable for a while: out of what applications
//! read, sealed in the store's archive until purged, or destroyed at once
//! when it was compromised.

use rekey::crypto::keyring::{Key, Keyring};
use rekey::crypto::keytable::{KeyState, KeyTable};
use rekey::secrets::file::{archive_path, backup_path, KeyringFile};

use crate::harness::*;

fn table(path: &std::path::Path) -> KeyTable {
    KeyringFile::open(path, KEYRING_PASS.as_bytes(), "P")
        .unwrap()
        .table
}

/// Rotates key 1 to key 2 and, with no grace period, retires key 1 in the same invocation.
fn rotated_and_retired(job: &str, reason: &str) -> std::process::Output {
    rekey(
        &[
            "rotate",
            "--job",
            job,
            "--grace",
            "0s",
            "--reason",
            reason,
            "--json",
            "--no-wait",
        ],
        &keyring_pass_env(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retired_key_leaves_the_keyring_file_for_its_archive_and_restore_brings_it_back() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let out = rotated_and_retired(&job, "scheduled");
    assert_eq!(
        (out.status.code(), json(&out)["step"].as_str()),
        (Some(0), Some("retired")),
        "{}",
        printed(&out)
    );

    // what applications read no longer holds key 1's material, in the file or its backup
    let k1_fingerprint = Key::parse(1, K1).unwrap().fingerprint();
    let read_by_apps = std::fs::read_to_string(&keyring).unwrap()
        + &std::fs::read_to_string(backup_path(&keyring)).unwrap_or_default();
    let file_only = KeyringFile::open(&keyring, KEYRING_PASS.as_bytes(), "P")
        .unwrap()
        .table
        .keyring()
        .unwrap();
    assert!(file_only.get(1).is_none(), "key 1 is retired");
    assert!(
        archive_path(&keyring).exists(),
        "the archive holds the retired key"
    );
    assert!(!read_by_apps.contains(&K1.to_string()));
    let archived = table(&keyring);
    let entry = archived.entries.iter().find(|e| e.id == 1).unwrap();
    assert_eq!(
        (entry.state, entry.key.as_ref().map(Key::fingerprint)),
        (KeyState::Retired, Some(k1_fingerprint.clone()))
    );

    // a value under key 1 turns up (a restore from a backup): the key comes back
    let out = rekey(
        &[
            "secrets", "restore", "--job", &job, "--key-id", "1", "--json",
        ],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["changed"], true);
    let restored = table(&keyring).keyring().unwrap();
    assert_eq!(restored.get(1).map(Key::fingerprint), Some(k1_fingerprint));
    assert!(
        !archive_path(&keyring).exists(),
        "nothing left in the archive"
    );
    let old_value = Keyring::new(vec![Key::parse(1, K1).unwrap()], 1, None).unwrap();
    assert!(
        restored.get(1).is_some()
            && old_value.get(1).map(Key::fingerprint) == restored.get(1).map(Key::fingerprint)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retire_names_a_file_left_under_an_earlier_rekey_s_backup_name_that_is_not_this_keyring_s(
) {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    // keyring.bak, as an earlier rekey named backups, but another keyring's
    let legacy = dir.path().join("keyring.bak");
    let other = dir.path().join("other.json");
    KeyringFile::create(&other, b"another", table(&keyring)).unwrap();
    std::fs::rename(&other, &legacy).unwrap();
    let theirs = std::fs::read(&legacy).unwrap();
    let out = rotated_and_retired(&job, "scheduled");
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(std::fs::read(&legacy).unwrap(), theirs, "left as it was");
    let said = stderr(&out);
    assert!(
        said.contains(&format!(
            "{} is not recognised as a backup of keyring file {}",
            legacy.display(),
            keyring.display()
        )),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_destroys_an_archived_key_and_it_cannot_be_restored_after() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let out = rotated_and_retired(&job, "scheduled");
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(table(&keyring).archived_ids(), vec![1]);

    let out = rekey(
        &["secrets", "purge", "--job", &job, "--key-id", "1"],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(table(&keyring).archived_ids().is_empty());
    assert!(!archive_path(&keyring).exists());
    assert!(!backup_path(&archive_path(&keyring)).exists());
    let out = rekey(
        &["secrets", "restore", "--job", &job, "--key-id", "1"],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(printed(&out).contains("purged"), "{}", printed(&out));
    let events: Vec<String> = std::fs::read_to_string(dir.path().join("patients.audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event_type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    // the start is recorded before anything is destroyed: a purge stopped
    // after its store write leaves evidence that keys may be gone
    let at = |e: &str| events.iter().position(|x| x == e);
    assert!(
        matches!((at("key_purge_started"), at("key_purged")), (Some(s), Some(p)) if s < p),
        "{events:?}"
    );
}

// Before: after rows were restored from a backup under the retired key 1,
// `secrets purge` exited 0 "destroyed the archived material of keys [1]",
// and those values could never be decrypted again.
#[tokio::test(flavor = "multi_thread")]
async fn purge_is_refused_while_values_only_the_archived_key_opens_are_in_the_job_s_tables() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let backup = db
        .client
        .query(
            "SELECT id, phone_encrypted FROM patient_persons WHERE id % 20 = 0",
            &[],
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let out = rotated_and_retired(&job, "scheduled");
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    for row in &backup {
        let (id, value): (i64, Vec<u8>) = (row.get(0), row.get(1));
        db.client
            .execute(
                "UPDATE patient_persons SET phone_encrypted = $1 WHERE id = $2",
                &[&value, &id],
            )
            .await
            .unwrap();
    }

    let out = rekey(&["secrets", "purge", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert!(
        printed(&out).contains(&format!("{} values no key", backup.len()))
            && printed(&out).contains("secrets restore"),
        "{}",
        printed(&out)
    );
    assert_eq!(table(&keyring).archived_ids(), vec![1], "key 1 was purged");
    let out = rekey(
        &["secrets", "restore", "--job", &job, "--key-id", "1"],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let restored = db
        .decrypted_patients(&table(&keyring).keyring().unwrap())
        .await;
    for row in &backup {
        let id: i64 = row.get(0);
        assert_eq!(restored[&id].0, Decrypted::Plain(1, phone(id)), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compromised_key_is_destroyed_at_retire_not_archived() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let out = rotated_and_retired(&job, "compromise");
    assert_eq!(
        (out.status.code(), json(&out)["step"].as_str()),
        (Some(0), Some("retired")),
        "{}",
        printed(&out)
    );
    let t = table(&keyring);
    let entry = t.entries.iter().find(|e| e.id == 1).unwrap();
    assert_eq!(entry.state, KeyState::Retired);
    assert!(
        entry.key.is_none(),
        "a compromised key's material is destroyed"
    );
    assert!(!archive_path(&keyring).exists());
}

/// Rotates key 1 to key 2, retires key 1 (`reason`), then writes one value
/// sealed under key 1 back into a row, as a restore from a backup taken
/// before the rotation would.
async fn value_under_retired_key_come_back(db: &TestDb, job: &str, reason: &str) {
    let old: Vec<u8> = db
        .client
        .query_one(
            "SELECT phone_encrypted FROM patient_persons WHERE phone_encrypted IS NOT NULL LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let out = rotated_and_retired(job, reason);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.client
        .execute(
            "UPDATE patient_persons SET phone_encrypted = $1 WHERE ctid = (SELECT min(ctid) FROM patient_persons)",
            &[&old],
        )
        .await
        .unwrap();
}

// Today: "1 values no key given opens (damaged, truncated, or under a key
// the job does not have) ... restore them from a backup or add the key they
// were written under", while the key was in the store's archive and one
// command brought it back.
#[tokio::test(flavor = "multi_thread")]
async fn a_value_under_a_retired_key_is_told_with_the_restore_that_brings_its_key_back() {
    let db = TestDb::new().await;
    db.seed_patients(50).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _keyring) = keyring_file_job(&db, &dir);
    value_under_retired_key_come_back(&db, &job, "scheduled").await;

    let verify = rekey(&["verify", "--job", &job], &keyring_pass_env());
    assert_eq!(verify.status.code(), Some(4), "{}", printed(&verify));
    let restore = format!("rekey secrets restore --job {job} --key-id 1");
    for words in [
        "1 values (the first public.patient_persons.phone_encrypted at key (",
        "are under key 1 of the keyring file",
        "retired and still in the store's archive",
        restore.as_str(),
    ] {
        assert!(
            printed(&verify).contains(words),
            "missing {words:?}:\n{}",
            printed(&verify)
        );
    }
    let verify = rekey(&["verify", "--job", &job, "--json"], &keyring_pass_env());
    assert_eq!(
        (
            &json(&verify)["named_keys"][0]["key_id"],
            &json(&verify)["named_keys"][0]["held"],
            &json(&verify)["failures"][0]["named_key"],
        ),
        (
            &serde_json::json!(1),
            &serde_json::json!("archived"),
            &serde_json::json!(1)
        ),
        "{}",
        printed(&verify)
    );
    let run = rekey(&["run", "--job", &job], &keyring_pass_env());
    assert_eq!(run.status.code(), Some(3), "{}", printed(&run));
    assert!(printed(&run).contains(&restore), "{}", printed(&run));

    restored_run_and_verified(&restore, &job);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_value_under_a_key_destroyed_at_its_retire_is_told_that_no_key_opens_it_any_more() {
    let db = TestDb::new().await;
    db.seed_patients(50).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _keyring) = keyring_file_job(&db, &dir);
    value_under_retired_key_come_back(&db, &job, "compromise").await;

    let verify = rekey(&["verify", "--job", &job], &keyring_pass_env());
    assert_eq!(verify.status.code(), Some(4), "{}", printed(&verify));
    for words in [
        "are under key 1 of the keyring file",
        "retired and its material destroyed",
        "restore them from a backup taken after the rotation",
    ] {
        assert!(
            printed(&verify).contains(words),
            "missing {words:?}:\n{}",
            printed(&verify)
        );
    }
    assert!(
        !printed(&verify).contains("secrets restore"),
        "{}",
        printed(&verify)
    );
}

// Today: "of the N values sampled ..., N under key v1: key 1 of the keyring
// file ... is not given; ... Give the old key as well as the new one, or
// pass --force": the key was in the store's archive, and nothing said so.
#[tokio::test(flavor = "multi_thread")]
async fn rows_restored_under_a_retired_key_are_refused_by_a_run_with_the_restore_that_brings_it_back(
) {
    let db = TestDb::new().await;
    db.seed_patients(50).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _keyring) = keyring_file_job(&db, &dir);
    db.client
        .batch_execute("CREATE TABLE backup AS SELECT id, phone_encrypted FROM patient_persons")
        .await
        .unwrap();
    let out = rotated_and_retired(&job, "scheduled");
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    // the backup restored over the rotated rows
    let restored = db
        .client
        .execute(
            "UPDATE patient_persons p SET phone_encrypted = b.phone_encrypted FROM backup b
              WHERE b.id = p.id AND b.phone_encrypted IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    assert!(restored > 1, "premise: values under key 1 are back");

    let run = rekey(&["run", "--job", &job], &keyring_pass_env());
    assert_eq!(run.status.code(), Some(2), "{}", printed(&run));
    let restore = format!("rekey secrets restore --job {job} --key-id 1");
    for words in [
        "Key 1 was retired and is still in the store's archive",
        restore.as_str(),
        "nothing was written",
    ] {
        assert!(
            printed(&run).contains(words),
            "missing {words:?}:\n{}",
            printed(&run)
        );
    }

    restored_run_and_verified(&restore, &job);
}

/// Follows the advice: runs `restore` (the command printed), then a run,
/// and a full verify proves every value on the target key.
fn restored_run_and_verified(restore: &str, job: &str) {
    let words: Vec<&str> = restore.split(' ').skip(1).collect();
    let out = rekey(&words, &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = rekey(&["run", "--job", job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = rekey(&["verify", "--job", job, "--full"], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

// Today: "refusing to destroy the archived material of keys [1]: a full
// verify found 1 values no key of ... opens ... Restore the key (`rekey
// secrets restore --key-id N`) ...": no key named, and a command that
// `secrets restore` refuses without the job file.
#[tokio::test(flavor = "multi_thread")]
async fn a_purge_refused_for_values_under_its_key_tells_the_restore_that_brings_the_key_back() {
    let db = TestDb::new().await;
    db.seed_patients(50).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _keyring) = keyring_file_job(&db, &dir);
    value_under_retired_key_come_back(&db, &job, "scheduled").await;

    let out = rekey(&["secrets", "purge", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    let restore = format!("rekey secrets restore --job {job} --key-id 1");
    for words in [
        "are under key 1 of the keyring file",
        "retired and still in the store's archive",
        restore.as_str(),
    ] {
        assert!(
            printed(&out).contains(words),
            "missing {words:?}:\n{}",
            printed(&out)
        );
    }
    restored_run_and_verified(&restore, &job);
}

/// Seeds the patients, brings a value under retired key 1 back
/// ([`value_under_retired_key_come_back`]), then promotes key 3 and runs
/// every other value onto it, past that one (`--force`): key 2 is the
/// previous key a retire would take out. Returns the job file.
async fn past_a_value_under_retired_key_1(db: &TestDb, dir: &tempfile::TempDir) -> String {
    db.seed_patients(50).await;
    let (job, _keyring) = keyring_file_job(db, dir);
    value_under_retired_key_come_back(db, &job, "scheduled").await;
    stage_and_promote(&job, &keyring_pass_env());
    // past the value no key given opens: every other value moves to key 3
    let out = rekey(&["run", "--job", &job, "--force"], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(3), "{}", printed(&out));
    job
}

// Today: "refusing to retire key 2: 0 values still under key 2, 1
// undecryptable; no key given opens the undecryptable ones (`rekey verify
// --full` lists them) ...", while key 1, which they are under, sat in the
// store's archive.
#[tokio::test(flavor = "multi_thread")]
async fn a_retire_refused_for_values_under_a_key_retired_before_tells_the_restore_that_brings_it_back(
) {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let job = past_a_value_under_retired_key_1(&db, &dir).await;

    let retire = ["secrets", "retire", "--job", &job, "--key-id", "2"];
    let out = rekey(&retire, &keyring_pass_env());
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    let restore = format!("rekey secrets restore --job {job} --key-id 1");
    for words in [
        "refusing to retire key 2: 0 values still under key 2, 1 undecryptable",
        "are under key 1 of the keyring file",
        restore.as_str(),
    ] {
        assert!(
            printed(&out).contains(words),
            "missing {words:?}:\n{}",
            printed(&out)
        );
    }
    restored_run_and_verified(&restore, &job);
    let out = rekey(&retire, &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

/// The one element of a refusal's `named_keys`, checked to be key 1 in
/// the store's archive with the command that brings it back.
fn names_key_1_archived(v: &serde_json::Value, job: &str) {
    let named = v["named_keys"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(named.len(), 1, "{v}");
    assert_eq!(named[0]["key_id"], 1, "{v}");
    assert_eq!(named[0]["held"], "archived", "{v}");
    assert_eq!(
        named[0]["restore"],
        format!("rekey secrets restore --job {job} --key-id 1").as_str(),
        "{v}"
    );
}

// Today: the retire's --json refusal carried the advice as a sentence of
// its messages only; verify's and run's --json name each key in
// `named_keys`, which a script acting on the refusal reads.
#[tokio::test(flavor = "multi_thread")]
async fn a_retire_refused_for_values_under_a_key_retired_before_names_it_in_its_json() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let job = past_a_value_under_retired_key_1(&db, &dir).await;

    let out = rekey(
        &[
            "secrets", "retire", "--job", &job, "--key-id", "2", "--json",
        ],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    names_key_1_archived(&json(&out), &job);
}

// Today: the purge's --json refusal was `{"refused": "..."}` alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_purge_refused_for_values_under_its_key_names_it_in_its_json() {
    let db = TestDb::new().await;
    db.seed_patients(50).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _keyring) = keyring_file_job(&db, &dir);
    value_under_retired_key_come_back(&db, &job, "scheduled").await;

    let out = rekey(
        &["secrets", "purge", "--job", &job, "--json"],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    let v = json(&out);
    assert_eq!(v["changed"], false, "{v}");
    names_key_1_archived(&v, &job);
}

// A rotation waiting out its grace period whose old key is retired by
// hand (`secrets retire`) ends there; a value under that key restored from
// a backup since. Today: "rotation 1 ended ..., but it is not where things
// stand now: 1 values are not on key 2: `rekey run` rewrites them", while
// a run refuses them (no key given opens them) and key 1 sat in the
// store's archive; no `named_keys` in the --json.
#[tokio::test(flavor = "multi_thread")]
async fn a_finished_rotation_past_a_value_under_its_retired_key_names_the_restore_that_brings_it_back(
) {
    let db = TestDb::new().await;
    db.seed_patients(50).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _keyring) = keyring_file_job(&db, &dir);
    let old: Vec<u8> = db
        .client
        .query_one(
            "SELECT phone_encrypted FROM patient_persons WHERE id = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let rotate = ["rotate", "--job", &job, "--json", "--no-wait"];
    let out = rekey(&rotate, &keyring_pass_env());
    assert_eq!(json(&out)["step"], "promoted", "{}", printed(&out));
    let out = rekey(
        &["secrets", "retire", "--job", &job, "--key-id", "1"],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.client
        .execute(
            "UPDATE patient_persons SET phone_encrypted = $1 WHERE id = 1",
            &[&old],
        )
        .await
        .unwrap();

    for args in [
        &rotate[..],
        &["rotate", "--job", &job, "--json", "--dry-run"],
    ] {
        let out = rekey(args, &keyring_pass_env());
        assert_eq!(
            (out.status.code(), json(&out)["ended"].as_str()),
            (Some(4), Some("not_verified")),
            "{}",
            printed(&out)
        );
        names_key_1_archived(&json(&out), &job);
        assert!(
            !printed(&out).contains("`rekey run` rewrites them"),
            "{}",
            printed(&out)
        );
    }
    let restore = format!("rekey secrets restore --job {job} --key-id 1");
    restored_run_and_verified(&restore, &job);
    let out = rekey(&rotate, &keyring_pass_env());
    assert_eq!(
        (out.status.code(), json(&out)["ended"].as_str()),
        (Some(0), Some("done")),
        "{}",
        printed(&out)
    );
}
