//! A keyring file as it may be found on disk: truncated, with a corrupted
//! byte, a sealed key altered, open to other users. Each is refused (exit 2,
//! nothing changed) with a message that says what the format can tell: a
//! file that does not parse, or whose keys open only in part, is damaged; a
//! well-formed file none of whose keys opens has a wrong passphrase, or was
//! altered; a file group or others may read is refused as ssh refuses such
//! a private key, naming the `chmod` that fixes it. rekey writes its own
//! keyring files for their owner alone. A damaged file's error says what
//! its backup holds, and which keys restoring it would lose.

use std::os::unix::fs::PermissionsExt;

use rekey::crypto::keyring::Key;
use rekey::secrets::file::{backup_path, KeyringFile};

use crate::harness::*;

/// 100 patients and a job over them whose keys are in a keyring file
/// (key 1, current); returns the job file and the keyring file.
async fn patients_with_a_keyring_file() -> (TestDb, tempfile::TempDir, String, std::path::PathBuf) {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    (db, dir, job, keyring)
}

/// Runs the job with the keyring's passphrase in `env`; expects exit 2, no
/// row changed, and what it said.
async fn refused(db: &TestDb, job: &str, env: &[(&str, String)]) -> String {
    let before = db.checksum("patient_persons").await;
    let out = rekey(&["run", "--job", job], env);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert_eq!(db.checksum("patient_persons").await, before);
    stderr(&out)
}

/// Rewrites the keyring file's bytes with `change`, keeping its permissions.
fn damage(keyring: &std::path::Path, change: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(keyring).unwrap();
    change(&mut bytes);
    std::fs::write(keyring, bytes).unwrap();
}

/// The sealed material of key `id` as the keyring file holds it.
fn sealed_material(keyring: &std::path::Path, id: u64) -> String {
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(keyring).unwrap()).unwrap();
    let keys = doc["keys"].as_array().unwrap();
    let key = keys.iter().find(|k| k["id"] == id).unwrap();
    key["material"].as_str().unwrap().to_string()
}

/// `sealed` with one base64 character changed: still base64 of the same
/// length, but not what was sealed.
fn altered(sealed: &str) -> String {
    let mut chars: Vec<char> = sealed.chars().collect();
    chars[10] = if chars[10] == 'A' { 'B' } else { 'A' };
    chars.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_keyring_file_is_damaged_not_a_wrong_passphrase() {
    let (db, _dir, job, keyring) = patients_with_a_keyring_file().await;
    damage(&keyring, |b| b.truncate(b.len() / 2));
    let said = refused(&db, &job, &keyring_pass_env()).await;
    assert!(said.contains("is damaged"), "{said}");
    assert!(said.contains("truncated"), "{said}");
    assert!(!said.contains("passphrase"), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keyring_file_with_a_byte_that_is_not_text_is_damaged_not_unreadable() {
    let (db, _dir, job, keyring) = patients_with_a_keyring_file().await;
    damage(&keyring, |b| {
        let middle = b.len() / 2;
        b[middle] = 0xff;
    });
    let said = refused(&db, &job, &keyring_pass_env()).await;
    assert!(said.contains("is damaged"), "{said}");
    assert!(!said.contains("passphrase"), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sealed_key_altered_beside_one_that_opens_is_damage_not_a_wrong_passphrase() {
    let (db, _dir, job, keyring) = patients_with_a_keyring_file().await;
    let mut file = KeyringFile::open(&keyring, KEYRING_PASS.as_bytes(), "P").unwrap();
    file.table.stage(Key::parse(2, K2).unwrap(), 2).unwrap();
    file.save().unwrap();
    let sealed = sealed_material(&keyring, 2);
    let text = std::fs::read_to_string(&keyring).unwrap();
    std::fs::write(&keyring, text.replace(&sealed, &altered(&sealed))).unwrap();
    let said = refused(&db, &job, &keyring_pass_env()).await;
    assert!(said.contains("is damaged"), "{said}");
    assert!(said.contains("key 2"), "{said}");
    assert!(!said.contains("wrong passphrase"), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_keyring_file_names_the_key_its_backup_lacks() {
    let (db, _dir, job, keyring) = patients_with_a_keyring_file().await;
    let mut file = KeyringFile::open(&keyring, KEYRING_PASS.as_bytes(), "P").unwrap();
    file.table.stage(Key::parse(2, K2).unwrap(), 2).unwrap();
    file.save().unwrap();
    let sealed = sealed_material(&keyring, 2);
    let text = std::fs::read_to_string(&keyring).unwrap();
    std::fs::write(&keyring, text.replace(&sealed, &altered(&sealed))).unwrap();
    let said = refused(&db, &job, &keyring_pass_env()).await;
    let backup = backup_path(&keyring);
    assert!(
        said.contains(&format!(
            "its backup {} holds key 1 (current) but not key 2",
            backup.display()
        )),
        "{said}"
    );
    assert!(
        said.contains("restoring it alone would lose key 2"),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keyring_file_no_key_of_which_opens_says_wrong_passphrase_or_altered() {
    let (db, _dir, job, keyring) = patients_with_a_keyring_file().await;
    let wrong = vec![("REKEY_KEYRING_PASSPHRASE", "Tr0ub4dor&3".to_string())];
    let sealed = sealed_material(&keyring, 1);
    let text = std::fs::read_to_string(&keyring).unwrap();
    for (what, env) in [
        ("a wrong passphrase", wrong),
        ("its one key altered", keyring_pass_env()),
    ] {
        if what == "its one key altered" {
            std::fs::write(&keyring, text.replace(&sealed, &altered(&sealed))).unwrap();
        }
        let said = refused(&db, &job, &env).await;
        assert!(
            said.contains("wrong passphrase in REKEY_KEYRING_PASSPHRASE, or"),
            "{what}: {said}"
        );
        assert!(said.contains("altered"), "{what}: {said}");
        assert!(said.contains("REKEY_KEYRING_PASSPHRASE"), "{what}: {said}");
    }
}

/// The permission bits of `path`.
fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keyring_file_group_or_others_may_read_is_refused_naming_the_chmod_that_fixes_it() {
    let (db, _dir, job, keyring) = patients_with_a_keyring_file().await;
    for open in [0o640, 0o604, 0o660, 0o644] {
        std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(open)).unwrap();
        let said = refused(&db, &job, &keyring_pass_env()).await;
        let fix = format!("chmod 600 {}", keyring.display());
        assert!(said.contains(&fix), "{open:o}: {said}");
    }
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = rekey(&["run", "--job", job.as_str()], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn keyring_files_rekey_writes_are_its_owners_alone_whatever_the_umask() {
    let (_db, _dir, job, keyring) = patients_with_a_keyring_file().await;
    std::fs::remove_file(&keyring).unwrap();
    for step in ["init", "stage"] {
        let out = std::process::Command::new("sh")
            .args(["-c", "umask 000; exec \"$0\" secrets \"$1\" --job \"$2\""])
            .args([env!("CARGO_BIN_EXE_rekey"), step, &job])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(keyring_pass_env())
            .output()
            .expect("run rekey through sh");
        assert!(out.status.success(), "{step}: {}", printed(&out));
    }
    let backup = backup_path(&keyring);
    assert!(backup.exists(), "stage saved no backup");
    assert_eq!(mode(&keyring), 0o600);
    assert_eq!(mode(&backup), 0o600);
}

// Before: `secrets init` made a key and recorded nothing (a regulated
// store's first key had no event), and printed prose under `--json`.
#[tokio::test(flavor = "multi_thread")]
async fn secrets_init_records_the_keys_it_made_and_answers_json_without_key_material() {
    let (_db, dir, job, keyring) = patients_with_a_keyring_file().await;
    std::fs::remove_file(&keyring).unwrap();
    let out = rekey(
        &["secrets", "init", "--job", &job, "--json"],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let said = json(&out);
    let made = keyring_table(&keyring);
    let key = made.entries[0].key.as_ref().unwrap();
    assert_eq!(said["event"], "key_store_created", "{said}");
    assert_eq!(said["keys"][0]["id"], 1, "{said}");
    assert_eq!(said["keys"][0]["fingerprint"], key.fingerprint(), "{said}");
    assert!(
        !printed(&out).contains(&hex::encode(key.material())),
        "the key's value was printed"
    );
    let events = audit_events(&dir);
    let created: Vec<_> = events
        .iter()
        .filter(|e| e["event_type"] == "key_store_created")
        .collect();
    assert_eq!(created.len(), 1, "{events:?}");
    assert!(
        created[0]["detail"]
            .as_str()
            .is_some_and(|n| n.contains("keys [1]")),
        "{}",
        created[0]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keyring_file_with_two_current_keys_is_refused_by_every_command_that_reads_it() {
    let (db, _dir, job, keyring) = patients_with_a_keyring_file().await;
    let mut file = KeyringFile::open(&keyring, KEYRING_PASS.as_bytes(), "P").unwrap();
    file.table.stage(Key::parse(2, K2).unwrap(), 2).unwrap();
    file.save().unwrap();
    let text = std::fs::read_to_string(&keyring).unwrap();
    std::fs::write(&keyring, text.replace("\"pending\"", "\"current\"")).unwrap();
    let before = db.checksum("patient_persons").await;
    for args in [
        vec!["secrets", "show", "--job", job.as_str()],
        vec!["plan", "--job", job.as_str()],
        vec!["run", "--dry-run", "--job", job.as_str()],
    ] {
        let out = rekey(&args, &keyring_pass_env());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", printed(&out));
        let said = stderr(&out);
        assert!(
            said.contains("keys 1 and 2 are both current"),
            "{args:?}: {said}"
        );
    }
    assert_eq!(db.checksum("patient_persons").await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_whose_staged_key_left_the_keyring_file_says_to_restore_it_or_abort() {
    let (db, _dir, job, keyring) = patients_with_a_keyring_file().await;
    let out = rekey(&["rotate", "--job", job.as_str()], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    assert_eq!(
        keyring_table(&keyring).id_in(rekey::crypto::keytable::KeyState::Pending),
        Some(2)
    );
    // the file is put back as it was before the stage: key 2 is gone from it
    std::fs::copy(backup_path(&keyring), &keyring).unwrap();
    let before = db.checksum("patient_persons").await;
    let out = rekey(&["rotate", "--job", job.as_str()], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    let said = stderr(&out);
    assert!(!said.contains("ENCRYPTION_"), "{said}");
    assert!(
        said.contains("no longer holds key 2")
            && said.contains(&backup_path(&keyring).display().to_string())
            && said.contains("rekey rotate --abort"),
        "{said}"
    );
    assert_eq!(db.checksum("patient_persons").await, before);
}

// Before: `rotate --job ../prod/job.toml` run from a directory holding an
// older copy of the keyring (a relative `path`) staged, promoted and
// retired in that copy and said complete, while the keyring beside the job
// file, the one the applications read, held key 1 alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_relative_keyring_path_that_names_another_file_beside_the_job_than_where_rekey_runs_is_refused(
) {
    let (db, dir, job, keyring) = patients_with_a_keyring_file().await;
    let prod = dir.path().join("prod");
    let backup = dir.path().join("backup");
    std::fs::create_dir_all(&prod).unwrap();
    std::fs::create_dir_all(&backup).unwrap();
    std::fs::copy(&keyring, prod.join("keyring.json")).unwrap();
    std::fs::copy(&keyring, backup.join("keyring.json")).unwrap();
    let text = std::fs::read_to_string(&job).unwrap().replace(
        &format!("{:?}", keyring.display().to_string()),
        "\"keyring.json\"",
    );
    assert!(text.contains("path = \"keyring.json\""), "{text}");
    std::fs::write(prod.join("job.toml"), text).unwrap();
    let before = db.checksum("patient_persons").await;
    let copies = || [&prod, &backup].map(|d| std::fs::read(d.join("keyring.json")).unwrap());
    let was = copies();
    let out = rekey_cmd(
        &[
            "rotate",
            "--job",
            "../prod/job.toml",
            "--no-wait",
            "--grace",
            "0s",
        ],
        &keyring_pass_env(),
    )
    .current_dir(&backup)
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    let said = stderr(&out);
    for words in [
        "keys path \"keyring.json\" is relative, so rekey reads",
        "backup/keyring.json",
        "prod/keyring.json",
        "Give the store's absolute path in the job file",
    ] {
        assert!(said.contains(words), "{words:?} missing: {said}");
    }
    assert!(copies() == was, "a keyring copy changed");
    assert_eq!(db.checksum("patient_persons").await, before);
    // run from the job's directory, the same path names one file
    let out = rekey_cmd(&["plan", "--job", "job.toml"], &keyring_pass_env())
        .current_dir(&prod)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}
