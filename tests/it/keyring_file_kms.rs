//! A KMS keyring file (`source = "aws-kms"`) as it may be found on disk,
//! against moto's server on loopback: read as the passphrase keyring file
//! is, it is refused (exit 2, nothing changed) when group or others may
//! read it, naming the `chmod` that fixes it, and as damaged, naming the
//! file and what its backup holds, when it does not parse.
#![cfg(feature = "aws")]

use std::os::unix::fs::PermissionsExt;

use rekey::secrets::file::{archive_path, backup_path};

use crate::aws::kms_master_key;
use crate::harness::*;

/// 100 patients and a job over them whose key 1 is wrapped by a KMS
/// master key in a keyring file; returns the job file and the keyring file.
async fn patients_with_a_kms_keyring_file(
) -> (TestDb, tempfile::TempDir, String, std::path::PathBuf) {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring.kms.json");
    let job = dir.path().join("patients.toml");
    std::fs::write(
        &job,
        format!(
            "[database]\nurl = \"{}\"\n[keys]\nsource = \"aws-kms\"\nkms_key_id = \"{}\"\npath = {:?}\nendpoint = \"{}\"\nregion = \"us-east-1\"\n[[target]]\ntable = \"patient_persons\"\ncolumns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]\nformat = \"versioned-gcm\"\n",
            db.url,
            kms_master_key(),
            keyring.display().to_string(),
            moto().endpoint
        ),
    )
    .unwrap();
    let job = job.display().to_string();
    let mut env = aws_env();
    env.push(("ENCRYPTION_KEY_V1", K1.into()));
    env.push(("ENCRYPTION_CURRENT_VERSION", "1".into()));
    let out = rekey(
        &[
            "secrets",
            "init",
            "--job",
            &job,
            "--import-env",
            "ENCRYPTION",
        ],
        &env,
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    (db, dir, job, keyring)
}

/// Runs the job; expects exit 2, no row changed, and what it said.
async fn refused(db: &TestDb, job: &str) -> String {
    let before = db.checksum("patient_persons").await;
    let out = rekey(&["run", "--job", job], &aws_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert_eq!(db.checksum("patient_persons").await, before);
    stderr(&out)
}

/// Rewrites `path`'s bytes with `change`, keeping its permissions.
fn damage(path: &std::path::Path, change: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    change(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kms_keyring_file_group_or_others_may_read_is_refused_naming_the_chmod_that_fixes_it() {
    let (db, _dir, job, keyring) = patients_with_a_kms_keyring_file().await;
    assert_eq!(
        std::fs::metadata(&keyring).unwrap().permissions().mode() & 0o777,
        0o600,
        "rekey writes it for its owner alone"
    );
    for open in [0o640, 0o604, 0o644] {
        std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(open)).unwrap();
        let said = refused(&db, &job).await;
        let fix = format!("chmod 600 {}", keyring.display());
        assert!(said.contains(&fix), "{open:o}: {said}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kms_keyring_archive_group_or_others_may_read_is_refused_too() {
    let (db, _dir, job, keyring) = patients_with_a_kms_keyring_file().await;
    let archive = archive_path(&keyring);
    std::fs::copy(&keyring, &archive).unwrap();
    std::fs::set_permissions(&archive, std::fs::Permissions::from_mode(0o644)).unwrap();
    let said = refused(&db, &job).await;
    assert!(
        said.contains(&format!("chmod 600 {}", archive.display())),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_kms_keyring_file_is_damaged_naming_the_file() {
    let (db, _dir, job, keyring) = patients_with_a_kms_keyring_file().await;
    damage(&keyring, |b| b.truncate(b.len() / 2));
    let said = refused(&db, &job).await;
    assert!(
        said.contains(&format!(
            "keyring file {} is damaged or not a rekey keyring",
            keyring.display()
        )),
        "{said}"
    );
    assert!(said.contains("truncated"), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kms_keyring_file_that_is_not_json_is_damaged_not_a_parser_s_message() {
    let (db, _dir, job, keyring) = patients_with_a_kms_keyring_file().await;
    damage(&keyring, |b| {
        let middle = b.len() / 2;
        b[middle] = 0xff;
    });
    let said = refused(&db, &job).await;
    assert!(
        said.contains(&format!(
            "keyring file {} is damaged or not a rekey keyring: invalid JSON at line",
            keyring.display()
        )),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_kms_keyring_file_names_the_keys_its_backup_holds() {
    let (db, _dir, job, keyring) = patients_with_a_kms_keyring_file().await;
    let out = rekey(&["secrets", "stage", "--job", &job], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    damage(&keyring, |b| b.truncate(b.len() / 2));
    let said = refused(&db, &job).await;
    assert!(
        said.contains(&format!(
            "its backup {} holds key 1 (current), as they were before the file's last save: a key that save added is not in it",
            backup_path(&keyring).display()
        )),
        "{said}"
    );
}
