//! A keyring file shared by jobs in two databases: a retire in one of them
//! cannot read the other's tables, so the file records each database whose
//! values its keys encrypt, and a retire refuses a key another database's
//! record names until a run there moves its values off it, or the operator
//! forgets a database that no longer uses the file.

use crate::harness::*;
use rekey::crypto::keytable::KeyState;

/// Two databases seeded with `rows` patients under key 1 of one keyring
/// file, and a job file for each (`patients.toml` on the first, `b.toml`
/// on the second).
struct TwoDatabases {
    a: TestDb,
    b: TestDb,
    dir: tempfile::TempDir,
    job_a: String,
    job_b: String,
    keyring: std::path::PathBuf,
}

async fn two_databases_sharing_one_keyring_file(rows: i64) -> TwoDatabases {
    let t = two_databases_before_any_run(rows).await;
    // job b runs over its table: every value is on the current key 1 already
    let out = rekey(&["run", "--job", &t.job_b], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    t
}

/// [`two_databases_sharing_one_keyring_file`], before job b's run.
async fn two_databases_before_any_run(rows: i64) -> TwoDatabases {
    let (a, b) = (TestDb::new().await, TestDb::new().await);
    a.seed_patients(rows).await;
    b.seed_patients(rows).await;
    let dir = tempfile::tempdir().unwrap();
    let (job_a, keyring) = keyring_file_job(&a, &dir);
    let job_b = dir.path().join("b.toml").display().to_string();
    let text = std::fs::read_to_string(&job_a).unwrap();
    std::fs::write(&job_b, text.replace(&a.url, &b.url)).unwrap();
    TwoDatabases {
        a,
        b,
        dir,
        job_a,
        job_b,
        keyring,
    }
}

/// The values of `db`'s patients by the key that opens them, with every
/// key the keyring file holds (a value no key opens fails the test).
async fn values_by_key(db: &TestDb, keyring: &std::path::Path) -> Vec<(u32, usize)> {
    let ring = keyring_table(keyring).keyring().unwrap();
    let mut by_key = std::collections::BTreeMap::new();
    for (p, e) in db.decrypted_patients(&ring).await.into_values() {
        for d in [p, e] {
            match d {
                Decrypted::Plain(k, _) => *by_key.entry(k).or_insert(0) += 1,
                Decrypted::Null => {}
                Decrypted::Failed(why) => panic!("a value did not decrypt: {why}"),
            }
        }
    }
    by_key.into_iter().collect()
}

/// `<file>.uses` beside the keyring file at `keyring`.
fn uses_file(keyring: &std::path::Path) -> std::path::PathBuf {
    let mut name = keyring.as_os_str().to_owned();
    name.push(".uses");
    name.into()
}

/// Moves key `id`'s last change of state in the keyring file back to 2020:
/// applications that had not reloaded the file since have long done so.
fn key_changed_long_ago(keyring: &std::path::Path, id: u32) {
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(keyring).unwrap()).unwrap();
    for k in doc["keys"].as_array_mut().unwrap() {
        if k["id"] == id {
            k["changed_at"] = "2020-01-01T00:00:00Z".into();
        }
    }
    std::fs::write(keyring, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
}

fn key_1_state(keyring: &std::path::Path) -> (KeyState, bool) {
    let e = keyring_table(keyring)
        .entries
        .into_iter()
        .find(|e| e.id == 1)
        .unwrap();
    (e.state, e.key.is_some())
}

/// Asserts that `out` is a retire refused (exit 2) for another database's
/// values.
fn refused_for_another_database(out: &std::process::Output) {
    assert_eq!(out.status.code(), Some(2), "{}", printed(out));
    assert!(
        printed(out).contains("may still encrypt values in another database"),
        "{}",
        printed(out)
    );
}

// Before the record: job a's compromise rotation destroyed key 1 (exit 0)
// while database b's table held its values under key 1 alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_retire_is_refused_while_another_database_sharing_the_keyring_file_has_values_under_the_key(
) {
    let t = two_databases_sharing_one_keyring_file(100).await;
    let b_values = values_by_key(&t.b, &t.keyring).await;
    assert_eq!(b_values.len(), 1, "{b_values:?}");
    assert_eq!(b_values[0].0, 1);

    let out = compromise_rotation(&t.job_a, &keyring_pass_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    let b_name: String =
        t.b.client
            .query_one("SELECT current_database()", &[])
            .await
            .unwrap()
            .get(0);
    assert!(
        printed(&out).contains(&format!("job \"b\" in database {b_name}"))
            && printed(&out).contains("Nothing was retired"),
        "{}",
        printed(&out)
    );
    assert_eq!(
        key_1_state(&t.keyring),
        (KeyState::Previous, true),
        "key 1 was destroyed while database b's values need it"
    );
    assert_eq!(values_by_key(&t.b, &t.keyring).await, b_values);

    // job b runs again, a day after key 1 stopped being current (no
    // application still writes under it): its values move to the current
    // key 2, and the file records it; the rotation then goes through
    key_changed_long_ago(&t.keyring, 1);
    let out = rekey(&["run", "--job", &t.job_b], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        values_by_key(&t.b, &t.keyring).await,
        vec![(2, b_values[0].1)]
    );
    let out = rekey(
        &["rotate", "--job", &t.job_a, "--no-wait", "--grace", "0s"],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(key_1_state(&t.keyring).0, KeyState::Retired);
    assert_eq!(values_by_key(&t.a, &t.keyring).await.len(), 1);
}

// A database that stopped using the file (dropped, moved to another
// store) would otherwise hold every retire back for good.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_forgotten_by_the_keyring_file_no_longer_holds_a_retire_back() {
    let t = two_databases_sharing_one_keyring_file(50).await;
    let b_rekey_id: String =
        t.b.client
            .query_one("SELECT database_id FROM rekey.identity", &[])
            .await
            .unwrap()
            .get(0);
    let out = rekey(
        &["secrets", "show", "--job", &t.job_a, "--json"],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let uses = json(&out)["uses"].clone();
    assert_eq!(uses.as_array().map(Vec::len), Some(1), "{uses}");
    let b_id = uses[0]["database_id"].as_str().unwrap().to_string();
    assert!(b_id.starts_with(&b_rekey_id), "{uses}");
    assert_eq!(uses[0]["job"], "b");
    assert_eq!(uses[0]["keys"], serde_json::json!([1]));

    // an id the file does not hold changes nothing
    let records = uses_file(&t.keyring);
    let before = std::fs::read(&records).unwrap();
    let out = rekey(
        &[
            "secrets",
            "forget",
            "--job",
            &t.job_a,
            "--database",
            "nosuch",
        ],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(printed(&out).contains(&b_id), "{}", printed(&out));
    assert_eq!(std::fs::read(&records).unwrap(), before);

    let out = rekey(
        &["secrets", "forget", "--job", &t.job_a, "--database", &b_id],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(audit_events(&t.dir)
        .iter()
        .any(|e| e["event_type"] == "store_use_forgotten"));
    let out = compromise_rotation(&t.job_a, &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(key_1_state(&t.keyring), (KeyState::Retired, false));
}

// Without the record a run makes before its first write: a run killed
// under a staged key (its values under both keys) left nothing, and a
// retire of the staged key, rolled back, from the other database went
// through.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_killed_in_another_database_holds_back_a_retire_of_the_key_it_wrote_under() {
    let t = two_databases_before_any_run(3_000).await;
    let out = rekey(
        &["secrets", "stage", "--job", &t.job_a],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let mut child = spawn_rekey(
        &[
            "run",
            "--job",
            &t.job_b,
            "--batch-size",
            "100",
            "--max-rows-per-sec",
            "1000",
        ],
        &keyring_pass_env(),
    );
    wait_for_progress(&t.b, &mut child, 300).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let b_values = values_by_key(&t.b, &t.keyring).await;
    assert!(b_values.iter().any(|&(k, _)| k == 2), "{b_values:?}");

    // the stage is rolled back in database a, whose values never left key 1
    let out = rekey(
        &["secrets", "rollback", "--job", &t.job_a],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = rekey(
        &["secrets", "retire", "--job", &t.job_a, "--key-id", "2"],
        &keyring_pass_env(),
    );
    refused_for_another_database(&out);
    assert_eq!(values_by_key(&t.b, &t.keyring).await, b_values);
}

// Before the record named the keys the file held: database b's record
// said key 1 alone; key 2 became current and b's application wrote under
// it; once key 3 replaced it, a compromise retire of key 2 from database a
// went through (exit 0) and b's value lost its key.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_made_current_after_another_databases_last_run_is_not_retired_from_under_it() {
    let t = two_databases_sharing_one_keyring_file(50).await;
    stage_promote_and_run(&t.job_a);
    // b's application writes a value under the current key 2
    let under_2: Vec<u8> =
        t.a.client
            .query_one(
                "SELECT phone_encrypted FROM patient_persons WHERE id = 1",
                &[],
            )
            .await
            .unwrap()
            .get(0);
    t.b.client
        .execute(
            "UPDATE patient_persons SET phone_encrypted = $1 WHERE id = 1",
            &[&under_2],
        )
        .await
        .unwrap();
    let b_before = values_by_key(&t.b, &t.keyring).await;
    assert!(b_before.iter().any(|&(k, _)| k == 2), "{b_before:?}");
    // key 3 in database a, then key 2 retired as compromised
    stage_promote_and_run(&t.job_a);
    let out = rekey(
        &[
            "secrets",
            "retire",
            "--job",
            &t.job_a,
            "--key-id",
            "2",
            "--reason",
            "compromise",
        ],
        &keyring_pass_env(),
    );
    refused_for_another_database(&out);
    assert_eq!(values_by_key(&t.b, &t.keyring).await, b_before);
}

// A database copied from another (a snapshot restored beside it) keeps
// its rekey.identity: before the record named the database too, the
// copy's record read as the retiring database's own, and a compromise
// retire destroyed the key the copy's values were under.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_of_the_retiring_database_is_another_database_to_the_record() {
    let t = two_databases_before_any_run(50).await;
    let out = rekey(&["run", "--job", &t.job_a], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let a_id: String =
        t.a.client
            .query_one("SELECT database_id FROM rekey.identity", &[])
            .await
            .unwrap()
            .get(0);
    // database b takes a's identity, as a copy of a would (its record
    // under its own identity forgotten)
    let out = rekey(&["run", "--job", &t.job_b], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = rekey(
        &["secrets", "show", "--job", &t.job_b, "--json"],
        &keyring_pass_env(),
    );
    let b_id = json(&out)["uses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["job"] == "b")
        .unwrap()["database_id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = rekey(
        &["secrets", "forget", "--job", &t.job_b, "--database", &b_id],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    t.b.client
        .execute("UPDATE rekey.identity SET database_id = $1", &[&a_id])
        .await
        .unwrap();
    let out = rekey(&["run", "--job", &t.job_b], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    let out = compromise_rotation(&t.job_a, &keyring_pass_env());
    refused_for_another_database(&out);
    assert_eq!(key_1_state(&t.keyring), (KeyState::Previous, true));
}

// A database whose runs predate the record (or whose record was removed)
// is unknown to a retire, and so may be another database sharing the
// store: the retire said nothing of it.
#[tokio::test(flavor = "multi_thread")]
async fn a_retire_from_a_database_the_store_holds_no_record_of_warns_that_others_may_be_unknown_too(
) {
    let t = two_databases_before_any_run(100).await;
    stage_promote_and_run(&t.job_a);
    let uses = uses_file(&t.keyring);
    std::fs::remove_file(&uses).unwrap();
    let out = rekey(
        &["secrets", "retire", "--job", &t.job_a],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        stderr(&out).contains("holds no record of this database"),
        "{}",
        printed(&out)
    );
    assert_eq!(key_1_state(&t.keyring).0, KeyState::Retired);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retire_from_a_database_the_store_records_says_nothing_of_unknown_databases() {
    let t = two_databases_before_any_run(100).await;
    stage_promote_and_run(&t.job_a);
    let out = rekey(
        &["secrets", "retire", "--job", &t.job_a],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        !printed(&out).contains("holds no record of this database"),
        "{}",
        printed(&out)
    );
}
