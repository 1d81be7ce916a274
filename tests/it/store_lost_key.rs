//! A key taken out of its store while a run writes values under it (a
//! deployment putting back an older keyring file, a hand edit): the values
//! written since would open with no key any store holds once the run's
//! process exits. A staged key whose place is free is put back and the run
//! finishes; one that cannot be put back stops the run, which fails naming
//! the key and the store, never exit 0.

use rekey::crypto::keyring::Key;
use rekey::crypto::keytable::{Entry, KeyState, KeyTable};
use rekey::secrets::file::{backup_path, KeyringFile};

use crate::harness::*;

/// Rows seeded: enough for a throttled run to last several seconds.
const ROWS: i64 = 20_000;

/// Patients under key 1 in a keyring file with key 2 staged; returns the
/// job file, the keyring file, and key 2's fingerprint.
async fn staged(db: &TestDb, dir: &tempfile::TempDir) -> (String, std::path::PathBuf, String) {
    db.seed_patients(ROWS).await;
    let (job, keyring) = keyring_file_job(db, dir);
    let out = rekey(
        &["secrets", "stage", "--job", job.as_str()],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let fingerprint = fingerprint_of(&keyring, 2).expect("key 2 staged");
    (job, keyring, fingerprint)
}

/// The fingerprint of key `id` in the keyring file, if it holds its material.
fn fingerprint_of(keyring: &std::path::Path, id: u32) -> Option<String> {
    keyring_table(keyring)
        .entries
        .iter()
        .find(|e| e.id == id)
        .and_then(|e| e.key.as_ref())
        .map(Key::fingerprint)
}

/// A slow run of the job, looking at its store every second.
fn slow_run(job: &str) -> std::process::Child {
    slow_run_checking(job, "100ms")
}

/// A slow run of the job, reading its signals every `every` (and its store
/// every ten of those, at least once a second, at most once a minute).
fn slow_run_checking(job: &str, every: &str) -> std::process::Child {
    spawn_rekey_captured(
        &[
            "run",
            "--job",
            job,
            "--max-rows-per-sec",
            "2000",
            "--check-every",
            every,
        ],
        &keyring_pass_env(),
    )
}

/// Puts in place of the keyring file one holding key 1 current and another
/// key 3 staged where key 2 was: key 2 cannot go back as pending.
fn another_key_staged(dir: &tempfile::TempDir, keyring: &std::path::Path) {
    let other = dir.path().join("other.json");
    let key = |id: u32, state: KeyState, hex: &str| Entry {
        id,
        state,
        created_at: 1,
        changed_at: 1,
        key: Some(Key::parse(id, hex).unwrap()),
        compromised: false,
    };
    let table = KeyTable {
        entries: vec![key(1, KeyState::Current, K1), key(3, KeyState::Pending, K3)],
    };
    KeyringFile::create(&other, KEYRING_PASS.as_bytes(), table).unwrap();
    std::fs::rename(&other, keyring).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_staged_key_removed_from_the_keyring_file_during_a_run_is_put_back_and_the_run_finishes()
{
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring, fingerprint) = staged(&db, &dir).await;
    let mut child = slow_run(&job);
    wait_for_progress(&db, &mut child, 2_000).await;
    // the file as it was before the stage: key 2 is gone from it
    std::fs::copy(backup_path(&keyring), &keyring).unwrap();
    assert_eq!(fingerprint_of(&keyring, 2), None);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        stderr(&out).contains("rekey put it back as the pending key"),
        "{}",
        printed(&out)
    );
    let table = keyring_table(&keyring);
    assert_eq!(table.id_in(KeyState::Pending), Some(2));
    assert_eq!(fingerprint_of(&keyring, 2), Some(fingerprint));
    // every value the run wrote opens with the keys the file holds
    let out = rekey(
        &["verify", "--job", job.as_str(), "--full"],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_removed_during_a_run_that_cannot_be_put_back_stops_the_run_naming_the_key() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring, fingerprint) = staged(&db, &dir).await;
    let mut child = slow_run(&job);
    wait_for_progress(&db, &mut child, 2_000).await;
    another_key_staged(&dir, &keyring);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let said = stderr(&out);
    assert!(
        said.contains(&format!("key 2 (fingerprint {fingerprint})"))
            && said.contains(&format!(
                "is no longer in keyring file {}",
                keyring.display()
            ))
            && said.contains("key 3 is staged in its place")
            && said.contains("The run stopped"),
        "{said}"
    );
    // stopped as soon as it was seen, not at the end of the table
    assert!(committed_values(&db).await < values_in(ROWS));
    // and the key is not lost with the process: sealed beside the store
    assert_eq!(
        sealed_copy(&keyring, &fingerprint, &said),
        Some(fingerprint)
    );
}

/// The fingerprint of key 2 in the keyring file rekey sealed it into
/// beside `keyring`, where what it `said` names that file.
fn sealed_copy(keyring: &std::path::Path, fingerprint: &str, said: &str) -> Option<String> {
    let copy = format!("{}.key-2-{fingerprint}.json", keyring.display());
    assert!(said.contains(&copy), "{said}");
    fingerprint_of(std::path::Path::new(&copy), 2)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keyring_file_deleted_during_a_run_stops_it_and_the_key_is_sealed_beside_it() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring, fingerprint) = staged(&db, &dir).await;
    let mut child = slow_run(&job);
    wait_for_progress(&db, &mut child, 2_000).await;
    std::fs::remove_file(&keyring).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let said = stderr(&out);
    assert!(
        said.contains("no longer exists") && said.contains("The run stopped"),
        "{said}"
    );
    assert_eq!(
        sealed_copy(&keyring, &fingerprint, &said),
        Some(fingerprint)
    );
}

// Before: an abort run during the run un-staged key 2 (previous again),
// then refused ("being run by other rekey processes"), and the run went on
// to say done, exit 0, with every value under key 2. The abort is refused
// before it changes anything; a rollback by hand (`secrets rollback`) turns
// the key previous, and the run does not say done over it.
#[tokio::test(flavor = "multi_thread")]
async fn an_abort_during_a_run_is_refused_before_it_changes_anything() {
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let out = rekey(&["rotate", "--job", job.as_str()], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    let mut child = slow_run(&job);
    wait_for_progress(&db, &mut child, 2_000).await;
    let out = rekey(
        &["rotate", "--job", job.as_str(), "--abort"],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(
        printed(&out).contains("nothing was changed by this abort"),
        "{}",
        printed(&out)
    );
    assert_eq!(keyring_table(&keyring).id_in(KeyState::Pending), Some(2));
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    // the abort goes through once the run is over
    let out = rekey(
        &["rotate", "--job", job.as_str(), "--abort"],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_staged_key_was_rolled_back_to_previous_does_not_say_done() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring, _) = staged(&db, &dir).await;
    let mut child = slow_run(&job);
    wait_for_progress(&db, &mut child, 2_000).await;
    let out = rekey(
        &["secrets", "rollback", "--job", job.as_str()],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(keyring_table(&keyring).id_in(KeyState::Pending), None);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(
        stderr(&out).contains("is no longer the key values go to"),
        "{}",
        printed(&out)
    );
}
