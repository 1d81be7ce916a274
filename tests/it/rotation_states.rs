//! `rekey rotate` as a state machine an operator can follow: it stops for
//! the deployment after staging (exit 6), honours `--grace` at any step,
//! notices a hand retire, says when a rotation is complete and starts the
//! next only with `--new`, cancels a staged rotation with `--abort`, and
//! runs a compromise rotation with no grace period.

use rekey::crypto::keytable::{KeyState, KeyTable};
use rekey::secrets::file::KeyringFile;

use crate::harness::*;

fn table(path: &std::path::Path) -> KeyTable {
    KeyringFile::open(path, KEYRING_PASS.as_bytes(), "P")
        .unwrap()
        .table
}

fn rotate(job: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["rotate", "--job", job, "--json"];
    args.extend_from_slice(extra);
    rekey(&args, &keyring_pass_env())
}

/// (exit code, step, how it ended, what it waits for)
fn state(out: &std::process::Output) -> (Option<i32>, String, String, String) {
    let j = json(out);
    let word = |k: &str| j[k].as_str().unwrap_or("-").to_string();
    (
        out.status.code(),
        word("step"),
        word("ended"),
        word("waiting_for"),
    )
}

fn expect(out: &std::process::Output, code: i32, step: &str, ended: &str, waiting_for: &str) {
    assert_eq!(
        state(out),
        (
            Some(code),
            step.to_string(),
            ended.to_string(),
            waiting_for.to_string()
        ),
        "{}",
        printed(out)
    );
}

/// Values per key id the patients table holds, decrypting with `table`'s keys.
async fn values_by_key(db: &TestDb, table: &KeyTable) -> std::collections::BTreeMap<u32, usize> {
    let ring = table.keyring().unwrap();
    let mut by_key = std::collections::BTreeMap::new();
    for (p, e) in db.decrypted_patients(&ring).await.into_values() {
        for d in [p, e] {
            match d {
                Decrypted::Plain(k, _) => *by_key.entry(k).or_default() += 1,
                Decrypted::Null => {}
                Decrypted::Failed(why) => panic!("a value did not decrypt: {why}"),
            }
        }
    }
    by_key
}

/// A `rotate --no-wait` of `job` killed once a third of its `values` are
/// re-encrypted: key 2 staged, values under both keys.
async fn rotate_killed_a_third_through(db: &TestDb, job: &str, values: i64) {
    let args = ["rotate", "--job", job, "--no-wait", "--batch-size", "200"];
    let mut child = spawn_rekey(&args, &keyring_pass_env());
    wait_for_progress(db, &mut child, values / 3).await;
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn rotate_stops_after_staging_for_the_deployment_then_goes_on() {
    let db = TestDb::new().await;
    db.seed_patients(600).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let values = values_in(600) as usize;

    let out = rotate(&job, &[]);
    expect(&out, 6, "staged", "waiting", "deploy");
    assert!(printed(&out).contains("redeploy"), "{}", printed(&out));
    assert_eq!(table(&keyring).id_in(KeyState::Pending), Some(2));
    assert_eq!(
        values_by_key(&db, &table(&keyring)).await,
        [(1, values)].into(),
        "nothing is rewritten before the applications read the new key"
    );

    let out = rotate(&job, &[]);
    expect(&out, 6, "promoted", "waiting", "grace_period");
    let due = json(&out)["retire_after"].clone();
    assert!(due.is_string(), "{}", printed(&out));
    assert_eq!(
        values_by_key(&db, &table(&keyring)).await,
        [(2, values)].into()
    );
    // known however an invocation ends (before: null but where it waited for the grace period)
    let dry = rotate(&job, &["--dry-run"]);
    assert_eq!(json(&dry)["retire_after"], due, "{}", printed(&dry));
}

#[tokio::test(flavor = "multi_thread")]
async fn grace_given_at_a_later_step_replaces_the_one_recorded_at_staging() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let out = rotate(&job, &["--no-wait"]);
    expect(&out, 6, "promoted", "waiting", "grace_period");
    assert_eq!(json(&out)["grace_s"], 24 * 3600, "{}", printed(&out));

    let out = rotate(&job, &["--grace", "0s"]);
    expect(&out, 0, "retired", "done", "-");
    assert_eq!(json(&out)["grace_s"], 0);
    assert!(
        printed(&out).contains("grace period set to"),
        "{}",
        printed(&out)
    );
    assert_eq!(table(&keyring).entries[0].state, KeyState::Retired);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hand_retire_of_the_old_key_completes_the_rotation() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _) = keyring_file_job(&db, &dir);
    expect(
        &rotate(&job, &["--no-wait"]),
        6,
        "promoted",
        "waiting",
        "grace_period",
    );

    let out = rekey(&["secrets", "retire", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    let out = rotate(&job, &[]);
    expect(&out, 0, "retired", "done", "-");
    assert!(printed(&out).contains("complete"), "{}", printed(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finished_rotation_is_complete_and_the_next_starts_only_with_new() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    expect(
        &rotate(&job, &["--no-wait", "--grace", "0s"]),
        0,
        "retired",
        "done",
        "-",
    );
    let before = std::fs::read(&keyring).unwrap();

    let out = rotate(&job, &[]);
    expect(&out, 0, "retired", "done", "-");
    assert!(
        printed(&out).contains("complete") && printed(&out).contains("--new"),
        "{}",
        printed(&out)
    );
    // --json names the rotation its message is about
    let j = json(&out);
    assert_eq!(
        (
            j["rotation"].as_i64(),
            j["old_key"].as_u64(),
            j["new_key"].as_u64()
        ),
        (Some(1), Some(1), Some(2)),
        "{j}"
    );
    assert_eq!(std::fs::read(&keyring).unwrap(), before, "a key was staged");

    let out = rotate(&job, &["--new"]);
    expect(&out, 6, "staged", "waiting", "deploy");
    assert_eq!(table(&keyring).id_in(KeyState::Pending), Some(3));

    let out = rotate(&job, &["--new"]);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("in progress") && printed(&out).contains("--abort"),
        "{}",
        printed(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn abort_puts_every_value_back_under_the_old_key_and_retires_the_staged_one() {
    let db = TestDb::new().await;
    db.seed_patients(20_000).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let values = values_in(20_000);

    // killed half-way through the re-encryption: values under both keys
    rotate_killed_a_third_through(&db, &job, values).await;
    let split = values_by_key(&db, &table(&keyring)).await;
    assert!(split.len() == 2, "killed too late or too early: {split:?}");

    // the abort itself killed part-way, then resumed by a plain rotate
    let done_before = committed_values(&db).await;
    let args = [
        "rotate",
        "--job",
        job.as_str(),
        "--abort",
        "--batch-size",
        "200",
    ];
    let mut child = spawn_rekey(&args, &keyring_pass_env());
    wait_for_progress(&db, &mut child, done_before + split[&2] as i64 / 3).await;
    child.kill().unwrap();
    child.wait().unwrap();

    let out = rotate(&job, &[]);
    expect(&out, 0, "rolled_back", "done", "-");
    let keys = table(&keyring);
    assert_eq!(keys.id_in(KeyState::Current), Some(1));
    assert_eq!(keys.id_in(KeyState::Pending), None);
    let staged = keys.entries.iter().find(|e| e.id == 2).unwrap();
    assert_eq!(staged.state, KeyState::Retired, "the staged key is retired");
    assert_eq!(
        values_by_key(&db, &keys).await,
        [(1, values as usize)].into()
    );

    // over: the next rotation needs --new, and nothing is left to abort
    let out = rotate(&job, &[]);
    assert!(printed(&out).contains("rolled back"), "{}", printed(&out));
    let out = rotate(&job, &["--abort"]);
    expect(&out, 0, "rolled_back", "done", "-");
    assert!(
        printed(&out).contains("rolled back already"),
        "{}",
        printed(&out)
    );
}

// Before: the abort un-staged key 2 in the store before it recorded step
// `aborting`; killed between the two, `rekey rotate` said "key 2 is not
// staged ... yet" (exit 2) instead of resuming the abort. The abort now
// records its step first: this is the state a kill leaves right after it.
#[tokio::test(flavor = "multi_thread")]
async fn an_abort_killed_after_recording_its_step_and_before_un_staging_resumes_with_rotate() {
    let db = TestDb::new().await;
    db.seed_patients(20_000).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let values = values_in(20_000);
    rotate_killed_a_third_through(&db, &job, values).await;
    assert_eq!(table(&keyring).id_in(KeyState::Pending), Some(2));
    db.client
        .batch_execute("UPDATE rekey.rotations SET step = 'aborting'")
        .await
        .unwrap();

    let out = rotate(&job, &[]);
    expect(&out, 0, "rolled_back", "done", "-");
    let keys = table(&keyring);
    assert_eq!(keys.id_in(KeyState::Current), Some(1));
    assert_eq!(keys.id_in(KeyState::Pending), None);
    assert_eq!(
        values_by_key(&db, &keys).await,
        [(1, values as usize)].into()
    );
    let started = audit_events(&dir)
        .iter()
        .filter(|e| e["event_type"] == "rotation_abort_started")
        .count();
    assert_eq!(started, 1, "the abort's start is recorded once");
}

// Before: with key 2 (staged, values already under it) removed from the
// keyring file by hand, `secrets stage` made a new key 2: those values then
// failed under the only key 2 there was, for good.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_key_never_takes_an_id_an_earlier_rotation_used_though_the_store_lost_it() {
    let db = TestDb::new().await;
    db.seed_patients(20_000).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let values = values_in(20_000);
    rotate_killed_a_third_through(&db, &job, values).await;
    let mut file = KeyringFile::open(&keyring, KEYRING_PASS.as_bytes(), "P").unwrap();
    file.table.entries.retain(|e| e.id != 2);
    file.save().unwrap();

    let out = rekey(&["secrets", "stage", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        table(&keyring).id_in(KeyState::Pending),
        Some(3),
        "{}",
        printed(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn abort_after_promotion_is_refused_and_changes_nothing() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    expect(
        &rotate(&job, &["--no-wait"]),
        6,
        "promoted",
        "waiting",
        "grace_period",
    );
    let before = std::fs::read(&keyring).unwrap();
    let out = rotate(&job, &["--abort"]);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("already promoted"),
        "{}",
        printed(&out)
    );
    assert_eq!(std::fs::read(&keyring).unwrap(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compromise_rotation_has_no_grace_and_destroys_the_old_key_after_a_full_verify() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let out = rotate(&job, &["--reason", "compromise", "--grace", "1h"]);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("no grace period"),
        "{}",
        printed(&out)
    );

    let out = rotate(&job, &["--reason", "compromise", "--no-wait"]);
    expect(&out, 0, "retired", "done", "-");
    let old = table(&keyring)
        .entries
        .into_iter()
        .find(|e| e.id == 1)
        .unwrap();
    assert_eq!(old.state, KeyState::Retired);
    assert!(old.key.is_none(), "the compromised key's material is kept");
    assert!(
        old.compromised,
        "the store does not say key 1 was compromised"
    );
    let show = rekey(
        &["secrets", "show", "--job", &job, "--json"],
        &keyring_pass_env(),
    );
    assert_eq!(
        json(&show)["keys"][0]["compromised"],
        true,
        "{}",
        printed(&show)
    );
}

// Before: the second invocation ran, promoted and destroyed key 1 at once
// (exit 0, "rotation 1 complete"), while applications not yet reloaded
// still encrypted with key 1: what they wrote next was left under a key
// nothing held any more.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_without_grace_stops_after_promotion_for_the_applications_before_the_retire() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    expect(
        &rotate(&job, &["--reason", "compromise"]),
        6,
        "staged",
        "waiting",
        "deploy",
    );
    let out = rotate(&job, &["--reason", "compromise"]);
    expect(&out, 6, "promoted", "waiting", "deploy");
    assert!(
        printed(&out).contains("so they encrypt with key 2"),
        "{}",
        printed(&out)
    );
    let old = table(&keyring)
        .entries
        .into_iter()
        .find(|e| e.id == 1)
        .unwrap();
    assert!(
        old.key.is_some() && old.state != KeyState::Retired,
        "key 1 is kept until the applications encrypt with key 2"
    );
    let out = rotate(&job, &["--reason", "compromise"]);
    expect(&out, 0, "retired", "done", "-");
    assert!(table(&keyring)
        .entries
        .iter()
        .any(|e| e.id == 1 && e.key.is_none()));
}

// Today: a second `rotate --grace 0s`, started while the first was
// re-encrypting (a second terminal, a retry), waited for it and retired key
// 1 the moment the first promoted key 2 and stopped for the applications'
// reload: the reload's stop was skipped.
#[tokio::test(flavor = "multi_thread")]
async fn an_invocation_that_waited_while_another_promoted_stops_for_the_reload_instead_of_retiring()
{
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    expect(&rotate(&job, &[]), 6, "staged", "waiting", "deploy");
    let out = rekey(&["run", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.client
        .execute("UPDATE rekey.rotations SET step = 'verified'", &[])
        .await
        .unwrap();
    // the job's lifecycle lock held here as the other invocation holds it:
    // this one reads the rotation (verified), then waits for the lock
    let lock = "rekey.lifecycle:patients";
    db.client
        .execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[&lock])
        .await
        .unwrap();
    let waiting = spawn_rekey_captured(
        &["rotate", "--job", &job, "--json", "--grace", "0s"],
        &keyring_pass_env(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let trying: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                   AND pid <> pg_backend_pid() AND query LIKE 'SELECT pg_try_advisory_lock(%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if trying > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rotate never tried the lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // meanwhile the other invocation promotes key 2 (with no grace period)
    // and stops for the applications' reload
    let mut file = KeyringFile::open(&keyring, KEYRING_PASS.as_bytes(), "P").unwrap();
    assert!(file.table.promote(rekey::crypto::keytable::now()).unwrap());
    file.save().unwrap();
    db.client
        .execute(
            "UPDATE rekey.rotations SET step = 'promoted', promoted_at = now(), grace_s = 0",
            &[],
        )
        .await
        .unwrap();
    db.client
        .execute(
            "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
            &[&lock],
        )
        .await
        .unwrap();
    let out = waiting.wait_with_output().unwrap();
    expect(&out, 6, "promoted", "waiting", "deploy");
    assert!(
        printed(&out).contains("promoted by another `rekey rotate` while this one waited"),
        "{}",
        printed(&out)
    );
    assert!(
        table(&keyring)
            .entries
            .iter()
            .any(|e| e.id == 1 && e.state != KeyState::Retired),
        "key 1 was retired before the applications were reloaded"
    );
    // the invocation after the reload retires it
    expect(&rotate(&job, &["--grace", "0s"]), 0, "retired", "done", "-");
}

// Before: a `secrets retire` without `--reason compromise` said again
// archived the compromised key's material, recoverable, and completed the
// rotation.
#[tokio::test(flavor = "multi_thread")]
async fn the_steps_of_a_compromise_rotation_stay_compromise_ones_without_the_flag() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    expect(
        &rotate(&job, &["--reason", "compromise"]),
        6,
        "staged",
        "waiting",
        "deploy",
    );
    expect(&rotate(&job, &[]), 6, "promoted", "waiting", "deploy");
    let out = rotate(&job, &["--grace", "1h"]);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    let out = rekey(
        &["secrets", "retire", "--job", &job, "--json"],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let old = table(&keyring)
        .entries
        .into_iter()
        .find(|e| e.id == 1)
        .unwrap();
    assert!(
        old.compromised && old.key.is_none(),
        "key 1 is retired as a compromised key"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_in_progress_switches_to_compromise_mode() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    expect(
        &rotate(&job, &["--no-wait"]),
        6,
        "promoted",
        "waiting",
        "grace_period",
    );
    let out = rotate(&job, &["--reason", "compromise"]);
    expect(&out, 0, "retired", "done", "-");
    assert!(
        printed(&out).contains("compromise rotation"),
        "{}",
        printed(&out)
    );
    let old = table(&keyring)
        .entries
        .into_iter()
        .find(|e| e.id == 1)
        .unwrap();
    assert!(old.key.is_none(), "the compromised key's material is kept");
}

#[tokio::test(flavor = "multi_thread")]
async fn environment_keys_wait_for_the_changes_with_exit_6() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);
    let j = job.display().to_string();
    let env = v1_env();
    let out = rekey(&["rotate", "--job", &j, "--json"], &env);
    expect(&out, 6, "staged", "waiting", "environment");
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_says_what_the_next_invocation_would_do_and_changes_nothing() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let before = std::fs::read(&keyring).unwrap();

    let out = rotate(&job, &["--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        printed(&out).contains("would stage key 2"),
        "{}",
        printed(&out)
    );
    assert_eq!(
        std::fs::read(&keyring).unwrap(),
        before,
        "a dry run changed the keys"
    );
    assert!(
        !engine_state_exists(&db).await,
        "a dry run created the engine schema"
    );

    expect(&rotate(&job, &[]), 6, "staged", "waiting", "deploy");
    let out = rotate(&job, &["--dry-run"]);
    // a rotation in progress: not done
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    assert_eq!(json(&out)["waiting_for"], "rotate", "{}", printed(&out));
    let said = format!("would re-encrypt {} values under key 2", values_in(300));
    assert!(printed(&out).contains(&said), "{}", printed(&out));
    assert_eq!(
        values_by_key(&db, &table(&keyring)).await,
        [(1, values_in(300) as usize)].into()
    );
}

// Today: `rotate --new --dry-run` and `rotate --abort --dry-run` were
// refused by the argument parser, so neither step could be previewed.
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_of_a_new_rotation_says_the_key_it_would_stage_or_the_refusal_beside_one_in_progress(
) {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    expect(
        &rotate(&job, &["--no-wait", "--grace", "0s"]),
        0,
        "retired",
        "done",
        "-",
    );
    let before = std::fs::read(&keyring).unwrap();
    let out = rotate(&job, &["--new", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        printed(&out).contains("would stage key 3"),
        "{}",
        printed(&out)
    );
    assert_eq!(
        std::fs::read(&keyring).unwrap(),
        before,
        "a dry run changed the keys"
    );

    expect(&rotate(&job, &["--new"]), 6, "staged", "waiting", "deploy");
    for args in [&["--new", "--dry-run"][..], &["--new"][..]] {
        let out = rotate(&job, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", printed(&out));
        assert!(
            printed(&out).contains("rotation 2 of job") && printed(&out).contains("in progress"),
            "{args:?}: {}",
            printed(&out)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_of_an_abort_says_what_it_would_undo_or_the_refusal_the_abort_would_give() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let out = rotate(&job, &["--abort", "--dry-run"]);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("no rotation in progress to abort"),
        "{}",
        printed(&out)
    );

    expect(&rotate(&job, &[]), 6, "staged", "waiting", "deploy");
    let before = std::fs::read(&keyring).unwrap();
    let out = rotate(&job, &["--abort", "--dry-run"]);
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    assert!(
        printed(&out).contains(
            "would abort rotation 1 (step staged): un-stage key 2 in file:{keyring}"
                .replace("{keyring}", &keyring.display().to_string())
                .as_str()
        ) && printed(&out).contains("back to key 1"),
        "{}",
        printed(&out)
    );
    assert_eq!(
        std::fs::read(&keyring).unwrap(),
        before,
        "a dry run changed the keys"
    );
    assert_eq!(table(&keyring).id_in(KeyState::Pending), Some(2));
    let step: String = db
        .client
        .query_one(
            "SELECT step FROM rekey.rotations WHERE rotation_id = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(step, "staged", "a dry run changed the rotation");

    expect(&rotate(&job, &["--abort"]), 0, "rolled_back", "done", "-");
    let out = rotate(&job, &["--abort", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        printed(&out).contains("rolled back already"),
        "{}",
        printed(&out)
    );

    // after a promotion, the abort's own refusal
    expect(
        &rotate(&job, &["--new", "--no-wait"]),
        6,
        "promoted",
        "waiting",
        "grace_period",
    );
    let out = rotate(&job, &["--abort", "--dry-run"]);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("already promoted"),
        "{}",
        printed(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rotate_obeys_the_run_controls_a_control_file_stops_its_re_encryption() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _) = keyring_file_job(&db, &dir);
    let control = dir.path().join("control");
    std::fs::write(&control, "stop\n").unwrap();
    let c = control.display().to_string();
    let out = rotate(
        &job,
        &[
            "--no-wait",
            "--control-file",
            &c,
            "--max-rows-per-sec",
            "100000",
        ],
    );
    expect(&out, 130, "staged", "stopped", "-");
    std::fs::write(&control, "run\n").unwrap();
    let out = rotate(&job, &["--control-file", &c]);
    expect(&out, 6, "promoted", "waiting", "grace_period");
}

#[tokio::test(flavor = "multi_thread")]
async fn reveal_off_a_terminal_says_why_no_key_is_printed() {
    let db = TestDb::new().await;
    db.seed_patients(50).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let env = v1_env();
    let out = rekey(&["rotate", "--job", &j, "--reveal"], &env);
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    assert!(
        stderr(&out).contains("--reveal prints key values only when stdout is a terminal"),
        "{}",
        printed(&out)
    );
    assert!(printed(&out).contains("rekey keygen"), "{}", printed(&out));
}

// Before: imported and environment keys were dated 1970 (`age_s` of 57 years).
#[tokio::test(flavor = "multi_thread")]
async fn keys_imported_from_the_environment_have_an_unknown_age_not_1970() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    std::fs::remove_file(&keyring).unwrap();
    let mut env = keyring_pass_env();
    env.extend(seed_env());
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
    let show = json(&rekey(&["secrets", "show", "--job", &job, "--json"], &env));
    for k in show["keys"].as_array().unwrap() {
        assert!(k["age_s"].is_null(), "{show}");
        assert_eq!(k["created_at"], "unknown", "{show}");
    }
    // a key rekey stages itself has its real age
    let out = rekey(&["secrets", "stage", "--job", &job], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let show = json(&rekey(&["secrets", "show", "--job", &job, "--json"], &env));
    let staged = show["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == 3)
        .unwrap()
        .clone();
    assert!(staged["age_s"].as_u64().is_some_and(|a| a < 3600), "{show}");
}

// The dual convention keeps the new key only where applications read
// ENCRYPTION_KEY_NEW: un-staging it would delete the only copy of a key that
// values may be under, so abort (and a hand rollback) refuse and say why.
#[tokio::test(flavor = "multi_thread")]
async fn abort_refuses_where_the_staged_key_has_nowhere_to_stay() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let mut env = vec![("ENCRYPTION_KEY", K1.to_string())];
    let out = rekey(&["rotate", "--job", &j], &env);
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    assert!(
        printed(&out).contains("ENCRYPTION_KEY_NEW"),
        "{}",
        printed(&out)
    );
    env.push(("ENCRYPTION_KEY_NEW", K2.to_string()));
    for args in [
        vec!["rotate", "--job", j.as_str(), "--abort"],
        vec!["secrets", "rollback", "--job", j.as_str()],
    ] {
        let out = rekey(&args, &env);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", printed(&out));
        assert!(
            stderr(&out).contains("Finish the rotation instead")
                && stderr(&out).contains("if `rekey verify --full`")
                && !stderr(&out).contains("rekey plan"),
            "{args:?}: {}",
            printed(&out)
        );
    }
    // nothing changed: the rotation goes on
    let out = rekey(&["rotate", "--job", &j, "--json"], &env);
    assert_eq!(json(&out)["step"], "promoted", "{}", printed(&out));
}

/// Writes one phone value under key 1, as an application still on key 1 would.
async fn app_writes_under_key_1(db: &TestDb, id: i64) {
    let mut sealed = Vec::new();
    rekey::crypto::codec::Codec::seal(&v1_codec(), b"written late", b"", None, &mut sealed);
    db.client
        .execute(
            "UPDATE patient_persons SET phone_encrypted = $1 WHERE id = $2",
            &[&sealed, &id],
        )
        .await
        .unwrap();
}

// Before: with the old key removed by hand after promotion, `rotate` said
// "already retired, rotation complete" and exited 0 with no verify.
#[tokio::test(flavor = "multi_thread")]
async fn an_old_key_removed_by_hand_completes_the_rotation_only_on_a_full_verify() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let mut env = v1_env();
    assert_eq!(rekey(&["rotate", "--job", &j], &env).status.code(), Some(6));
    env.push(("ENCRYPTION_KEY_V2", K2.to_string()));
    env.push(("ENCRYPTION_PENDING_VERSION", "2".to_string()));
    let out = rekey(&["rotate", "--job", &j, "--json"], &env);
    assert_eq!(json(&out)["step"], "promoted", "{}", printed(&out));
    app_writes_under_key_1(&db, 5).await;
    // the operator moves to key 2 and drops key 1 by hand
    let env = vec![
        ("ENCRYPTION_KEY_V2", K2.to_string()),
        ("ENCRYPTION_CURRENT_VERSION", "2".to_string()),
    ];
    let out = rekey(&["rotate", "--job", &j, "--json", "--grace", "0s"], &env);
    assert_eq!(
        (out.status.code(), json(&out)["step"].as_str()),
        (Some(4), Some("promoted")),
        "{}",
        printed(&out)
    );
    // the values the app wrote name key 1, which the environment no longer
    // holds (before: no `named_keys`)
    assert_eq!(
        (
            &json(&out)["named_keys"][0]["key_id"],
            &json(&out)["named_keys"][0]["held"],
            &json(&out)["named_keys"][0]["values"],
        ),
        (
            &serde_json::json!(1),
            &serde_json::json!("not_in_store"),
            &serde_json::json!(1)
        ),
        "{}",
        printed(&out)
    );
    assert!(
        printed(&out).contains(
            "are under ENCRYPTION_KEY_V1 in the environment, which the keys given do not hold"
        ),
        "{}",
        printed(&out)
    );
}

// Before: after `secrets rollback` of a promoted rotation, `rotate` exited 0
// ("was rolled back") with every value under the key it turned away from.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_rollback_rotate_says_values_are_left_until_a_run() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _) = keyring_file_job(&db, &dir);
    expect(
        &rotate(&job, &["--no-wait"]),
        6,
        "promoted",
        "waiting",
        "grace_period",
    );
    let out = rekey(&["secrets", "rollback", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = rotate(&job, &[]);
    expect(&out, 4, "rolled_back", "not_verified", "-");
    assert!(
        printed(&out).contains("`rekey run` rewrites them"),
        "{}",
        printed(&out)
    );
    let out = rekey(&["run", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    expect(&rotate(&job, &[]), 0, "rolled_back", "done", "-");
}

// Before: an abort whose staged key the operator had already removed ended
// "rolled back" with exit 0 while values were under that key.
#[tokio::test(flavor = "multi_thread")]
async fn an_abort_without_the_staged_key_ends_only_on_a_full_verify() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let base = v1_env();
    assert_eq!(
        rekey(&["rotate", "--job", &j], &base).status.code(),
        Some(6)
    );
    let mut staged = base.clone();
    staged.push(("ENCRYPTION_KEY_V2", K2.to_string()));
    staged.push(("ENCRYPTION_PENDING_VERSION", "2".to_string()));
    // values rewritten under key 2 by a run, then the abort begins
    assert_eq!(rekey(&["run", "--job", &j], &staged).status.code(), Some(0));
    let out = rekey(&["rotate", "--job", &j, "--abort", "--json"], &staged);
    assert_eq!(
        json(&out)["waiting_for"],
        "environment",
        "{}",
        printed(&out)
    );
    // the operator removes key 2 entirely instead of keeping it
    let out = rekey(&["rotate", "--job", &j, "--abort", "--json"], &base);
    assert_eq!(
        (out.status.code(), json(&out)["step"].as_str()),
        (Some(4), Some("aborting")),
        "{}",
        printed(&out)
    );
    // the values name key 2, which the environment does not hold (before:
    // no `named_keys`)
    assert_eq!(
        (
            &json(&out)["named_keys"][0]["key_id"],
            &json(&out)["named_keys"][0]["held"],
        ),
        (&serde_json::json!(2), &serde_json::json!("not_in_store")),
        "{}",
        printed(&out)
    );
    assert!(
        printed(&out).contains(
            "are under ENCRYPTION_KEY_V2 in the environment, which the keys given do not hold"
        ),
        "{}",
        printed(&out)
    );
    // with key 2 back (not pending), the abort rewrites and ends
    let mut readable = base.clone();
    readable.push(("ENCRYPTION_KEY_V2", K2.to_string()));
    let out = rekey(&["rotate", "--job", &j, "--abort", "--json"], &readable);
    assert_eq!(
        (out.status.code(), json(&out)["step"].as_str()),
        (Some(0), Some("rolled_back")),
        "{}",
        printed(&out)
    );
}

// Before: after a finished rotation, a key staged and promoted by hand
// (`secrets stage`, `secrets promote`) left every value on the old key
// while `rotate` said "rotation 1 is complete (key 2 current)", exit 0.
#[tokio::test(flavor = "multi_thread")]
async fn a_finished_rotation_whose_key_was_promoted_by_hand_since_is_not_called_complete() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    expect(
        &rotate(&job, &["--no-wait", "--grace", "0s"]),
        0,
        "retired",
        "done",
        "-",
    );
    stage_and_promote(&job, &keyring_pass_env());
    assert_eq!(table(&keyring).id_in(KeyState::Current), Some(3));
    let out = rotate(&job, &[]);
    expect(&out, 4, "retired", "not_verified", "-");
    let values = values_by_key(&db, &table(&keyring)).await[&2];
    assert!(
        printed(&out).contains("key 3 is current in the store, not key 2 as rotation 1 left it")
            && printed(&out).contains(&format!("{values} values are not on key 3")),
        "{}",
        printed(&out)
    );
    // the dry run says the same (before: "rotation 1 is over (step retired)", exit 0)
    let dry = rotate(&job, &["--dry-run"]);
    expect(&dry, 4, "retired", "not_verified", "-");
    assert!(
        printed(&dry).contains("dry run: rotation 1 ended")
            && printed(&dry)
                .contains("key 3 is current in the store, not key 2 as rotation 1 left it"),
        "{}",
        printed(&dry)
    );
}

// Before: a key staged after a finished rotation (a `rotate --new` killed
// after its store write) left `rotate` saying "complete", exit 0, while
// applications already wrote under the staged key.
#[tokio::test(flavor = "multi_thread")]
async fn a_finished_rotation_with_a_key_staged_since_says_so_and_how_to_take_it_up() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    expect(
        &rotate(&job, &["--no-wait", "--grace", "0s"]),
        0,
        "retired",
        "done",
        "-",
    );
    let out = rekey(&["secrets", "stage", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = rotate(&job, &[]);
    expect(&out, 4, "retired", "not_verified", "-");
    assert!(
        printed(&out).contains("key 3 is staged in the store")
            && printed(&out).contains("rekey rotate --new"),
        "{}",
        printed(&out)
    );
    // --new takes the staged key up
    let out = rotate(&job, &["--new", "--no-wait", "--grace", "0s"]);
    expect(&out, 0, "retired", "done", "-");
    assert_eq!(table(&keyring).id_in(KeyState::Current), Some(3));
}

// Before: the abort's run refused before any write, "2 values sampled ...
// are already labelled v1 ... and the key given as v1 opens none of them
// ... --force quarantines what does not open" (exit 2), and `rotate` takes
// no --force: values damaged before the rotation began, under key 1's
// label, kept the abort from ever turning the others back.
#[tokio::test(flavor = "multi_thread")]
async fn an_abort_over_values_damaged_before_the_rotation_turns_the_others_back_and_ends_once_they_are_mended(
) {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    // damaged under key 1's label before the rotation: no key opens them
    db.client
        .batch_execute(
            "UPDATE patient_persons SET phone_encrypted = '\\x01'::bytea || sha512('damaged') WHERE id IN (5, 6)",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let out = rotate(&job, &["--no-wait"]);
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));

    let out = rotate(&job, &["--abort"]);
    expect(&out, 4, "aborting", "not_verified", "-");
    assert!(
        printed(&out)
            .contains("refusing to retire key 2: 0 values still under key 2, 2 undecryptable")
            && printed(&out).contains("restore them from a backup"),
        "{}",
        printed(&out)
    );
    // every value that opens is back under key 1; key 2 stays until no value may need it
    db.client
        .batch_execute("UPDATE patient_persons SET phone_encrypted = NULL WHERE id IN (5, 6)")
        .await
        .unwrap();
    let keys = table(&keyring);
    assert_eq!(
        values_by_key(&db, &keys).await.keys().collect::<Vec<_>>(),
        [&1]
    );
    assert_ne!(
        keys.entries.iter().find(|e| e.id == 2).unwrap().state,
        KeyState::Retired
    );

    // mended: the abort ends
    let out = rotate(&job, &["--abort"]);
    expect(&out, 0, "rolled_back", "done", "-");
    let keys = table(&keyring);
    assert_eq!(keys.id_in(KeyState::Current), Some(1));
    assert_eq!(
        keys.entries.iter().find(|e| e.id == 2).unwrap().state,
        KeyState::Retired
    );
}

/// Two jobs (a on `patient_persons`, b on a copy of it) on the same
/// environment keys, key 1 current, and job a's rotation staged key 2,
/// which the environment does not hold yet: (job a, job b).
async fn a_staged_key_2_of_job_a_beside_job_b(
    db: &TestDb,
    dir: &tempfile::TempDir,
) -> (String, String) {
    let (job_a, job_b) = two_jobs_on_one_environment(db, dir).await;
    let out = rekey(&["rotate", "--job", &job_a], &v1_env());
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    assert!(
        printed(&out).contains("export ENCRYPTION_PENDING_VERSION=2"),
        "{}",
        printed(&out)
    );
    (job_a, job_b)
}

/// Two jobs (a on `patient_persons`, b on a copy of it) on the same
/// environment keys: (job a, job b).
async fn two_jobs_on_one_environment(db: &TestDb, dir: &tempfile::TempDir) -> (String, String) {
    db.seed_patients(30).await;
    db.client
        .batch_execute(
            "CREATE TABLE patient_copy AS SELECT * FROM patient_persons;
             ALTER TABLE patient_copy ADD PRIMARY KEY (id);",
        )
        .await
        .unwrap();
    let whole = std::fs::read_to_string(db.patients_job(dir)).unwrap();
    let job_a = dir.path().join("a.toml");
    std::fs::write(&job_a, format!("name = \"a\"\n{whole}")).unwrap();
    let job_b = dir.path().join("b.toml");
    std::fs::write(
        &job_b,
        format!(
            "name = \"b\"\n{}",
            whole.replace("\"patient_persons\"", "\"patient_copy\"")
        ),
    )
    .unwrap();
    (job_a.display().to_string(), job_b.display().to_string())
}

/// How many rotations job `name` has recorded.
async fn rotations_of(db: &TestDb, name: &str) -> i64 {
    db.client
        .query_one(
            "SELECT count(*) FROM rekey.rotations WHERE job_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0)
}

// Today: job b's rotate, while job a's key 2 was staged but not yet set in
// the environment, staged key 3 ("rotation 1 recorded key 2 under
// env:ENCRYPTION, which no longer holds it"), and from then on each job
// asked for its own key to be made current: neither rotation could end.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_job_on_the_same_environment_is_refused_a_key_beside_one_staged_and_not_yet_set() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, job_b) = a_staged_key_2_of_job_a_beside_job_b(&db, &dir).await;

    let out = rekey(&["rotate", "--job", &job_b], &v1_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("job \"a\" staged key 2")
            && printed(&out).contains("ENCRYPTION_KEY_V2 and ENCRYPTION_PENDING_VERSION=2")
            && printed(&out).contains("Nothing was staged"),
        "{}",
        printed(&out)
    );
    assert_eq!(rotations_of(&db, "b").await, 0, "job b recorded a rotation");
    // the key set but not made pending: still not staged to the environment
    let mut half = v1_env();
    half.push(("ENCRYPTION_KEY_V2", K2.to_string()));
    let out = rekey(&["rotate", "--job", &job_b], &half);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("job \"a\" staged key 2"),
        "{}",
        printed(&out)
    );

    // once key 2 is set, job b takes it up
    let mut env = v1_env();
    env.push(("ENCRYPTION_KEY_V2", K2.to_string()));
    env.push(("ENCRYPTION_PENDING_VERSION", "2".to_string()));
    let out = rekey(&["rotate", "--job", &job_b, "--json"], &env);
    let report = json(&out);
    assert_eq!(
        (&report["step"], &report["new_key"]),
        (&"staged".into(), &2.into()),
        "{}",
        printed(&out)
    );
}

// Today: a filtered job's rotation said "verified: all 334 values under
// key 2" (and recorded it) while the rows outside its filter were still
// under key 1.
#[tokio::test(flavor = "multi_thread")]
async fn a_filtered_jobs_verify_says_it_read_only_the_rows_its_filters_select() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db
        .patients_job_where(&dir, "id <= 100")
        .display()
        .to_string();
    let out = rekey(&["rotate", "--job", &job], &v1_env());
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    let mut env = v1_env();
    env.push(("ENCRYPTION_KEY_V2", K2.to_string()));
    env.push(("ENCRYPTION_PENDING_VERSION", "2".to_string()));
    let out = rekey(&["rotate", "--job", &job, "--no-wait"], &env);
    let verified = printed(&out)
        .lines()
        .find(|l| l.starts_with("verified: "))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no verify said: {}", printed(&out)));
    assert!(
        verified.ends_with("(in the rows the job's `where` filters select)"),
        "{verified}"
    );
    let detail: String = db
        .client
        .query_one(
            "SELECT detail FROM rekey.audit WHERE event_type = 'verification_passed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(detail.contains("`where` filters select"), "{detail}");
}

// Today: `rotate --dry-run` for job b said "would stage key 3" while the
// rotation itself refuses (exit 2) beside job a's key 2 not yet set.
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_of_a_second_job_says_the_refusal_its_rotation_would_give() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, job_b) = a_staged_key_2_of_job_a_beside_job_b(&db, &dir).await;
    let out = rekey(&["rotate", "--job", &job_b, "--dry-run"], &v1_env());
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("job \"a\" staged key 2") && !text.contains("would stage key"),
        "{text}"
    );
    assert_eq!(rotations_of(&db, "b").await, 0);
}

// Today: `rekey secrets stage` for job b printed the exports for key 3
// beside job a's key 2, staged and not yet set: only `rotate` was guarded.
#[tokio::test(flavor = "multi_thread")]
async fn secrets_stage_of_a_second_job_is_refused_beside_a_key_staged_and_not_yet_set() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, job_b) = a_staged_key_2_of_job_a_beside_job_b(&db, &dir).await;
    let out = rekey(&["secrets", "stage", "--job", &job_b], &v1_env());
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("job \"a\" staged key 2")
            && text.contains("Nothing was staged")
            && !text.contains("ENCRYPTION_KEY_V3"),
        "{text}"
    );
    assert_eq!(rotations_of(&db, "b").await, 0);
}

// Today: two jobs' rotations started together on the same environment
// keys could both pass the check for a key staged beside theirs (each
// under its own job's lock only) and stage keys 2 and 3.
#[tokio::test(flavor = "multi_thread")]
async fn two_jobs_rotations_started_together_on_one_environment_stage_one_key() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (job_a, job_b) = two_jobs_on_one_environment(&db, &dir).await;
    // the environment's stage lock held here, so both rotations reach it
    // and wait: released, they go one after the other
    let lock = "rekey.stage:env:ENCRYPTION";
    db.client
        .execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[&lock])
        .await
        .unwrap();
    let a = spawn_rekey_captured(&["rotate", "--job", &job_a], &v1_env());
    let b = spawn_rekey_captured(&["rotate", "--job", &job_b], &v1_env());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let waiting: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid
                  WHERE s.datname = current_database() AND l.locktype = 'advisory' AND NOT l.granted
                    AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended($1, 0)",
                &[&lock],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the two rotations did not both wait for the stage lock ({waiting} waiting)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    db.client
        .execute(
            "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
            &[&lock],
        )
        .await
        .unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let mut codes = [a.status.code(), b.status.code()];
    codes.sort();
    assert_eq!(
        codes,
        [Some(2), Some(6)],
        "a: {}\nb: {}",
        printed(&a),
        printed(&b)
    );
    let staged: i64 = db
        .client
        .query_one("SELECT count(*) FROM rekey.rotations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(staged, 1, "a: {}\nb: {}", printed(&a), printed(&b));
}

// Today: with Fernet values (their key is not visible without decrypting),
// `rotate` after a `secrets rollback` of a promoted rotation said "rotation
// 1 was rolled back; start the next one with `rekey rotate --new`" and
// exited 0 while every value was still under key 2 (`verify --full`: exit 4).
#[tokio::test(flavor = "multi_thread")]
async fn after_a_rollback_values_that_hide_their_key_are_not_called_rolled_back_until_a_run_rewrites_them(
) {
    let db = TestDb::new().await;
    db.client
        .batch_execute("CREATE TABLE people (id int PRIMARY KEY, ssn text)")
        .await
        .unwrap();
    let seal = "import sys, base64\nfrom cryptography.fernet import Fernet\nf = Fernet(base64.urlsafe_b64encode(bytes.fromhex(sys.argv[1])))\nfor i in range(60):\n    print(f.encrypt(b'ssn').decode())\n";
    for (i, t) in python(seal, &[K1], "").lines().enumerate() {
        db.client
            .execute("INSERT INTO people VALUES ($1, $2)", &[&(i as i32), &t])
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring.json");
    keyring_file_with_key_1(&keyring, K1);
    let job = dir.path().join("people.toml");
    std::fs::write(
        &job,
        format!(
            "[database]\nurl = \"{}\"\n[keys]\nsource = \"file\"\npath = {:?}\n[[target]]\ntable = \"people\"\ncolumns = [\"ssn\"]\nformat = \"fernet\"\n",
            db.url,
            keyring.display().to_string()
        ),
    )
    .unwrap();
    let job = job.display().to_string();
    let out = rotate(&job, &["--no-wait"]);
    assert_eq!(json(&out)["step"], "promoted", "{}", printed(&out));
    let out = rekey(&["secrets", "rollback", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    for args in [&[][..], &["--dry-run"][..]] {
        let out = rotate(&job, args);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {}", printed(&out));
        assert!(printed(&out).contains("`rekey run`"), "{}", printed(&out));
    }
    let out = rekey(&["run", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = rotate(&job, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        printed(&out).contains("was rolled back"),
        "{}",
        printed(&out)
    );
}

// Today: `rotate --dry-run` with a key that opens none of the values said
// "would stage key 2 ..." and exited 0; the rotation refuses before staging.
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_with_a_key_that_opens_nothing_gives_the_refusal_the_stage_would() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    // the keyring's key 1 is not the one the values are under
    std::fs::remove_file(&keyring).unwrap();
    keyring_file_with_key_1(&keyring, K3);
    let before = std::fs::read(&keyring).unwrap();
    let out = rotate(&job, &["--dry-run"]);
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("opens") && !text.contains("would stage"),
        "{text}"
    );
    let out = rotate(&job, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert_eq!(std::fs::read(&keyring).unwrap(), before, "a key was staged");
}

// Today: `rotate --dry-run --grace 0s` after the promotion said "key 1
// stays for the grace period (1day)"; the same invocation retires it at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_with_a_new_grace_period_says_what_that_grace_period_leads_to() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _) = keyring_file_job(&db, &dir);
    let out = rotate(&job, &["--no-wait"]);
    expect(&out, 6, "promoted", "waiting", "grace_period");
    let out = rotate(&job, &["--dry-run", "--grace", "0s"]);
    let text = printed(&out);
    assert!(
        text.contains("would verify every value and retire key 1")
            && !text.contains("stays for the grace period"),
        "{text}"
    );
    let out = rotate(&job, &["--dry-run"]);
    assert!(
        printed(&out).contains("stays for the grace period (1day)"),
        "{}",
        printed(&out)
    );
}

// Today: after key 1 was made current again by hand, `rotate --dry-run`
// said "key 1 stays for the grace period" where the rotation refuses
// ("changed by hand"); and the refusal did not say how to record a
// rollback that was meant.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_hand_rollback_the_dry_run_refuses_as_the_rotation_does_and_both_say_how_to_record_it(
) {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let out = rotate(&job, &["--no-wait"]);
    expect(&out, 6, "promoted", "waiting", "grace_period");
    let mut file = KeyringFile::open(&keyring, KEYRING_PASS.as_bytes(), "P").unwrap();
    assert!(file.table.rollback(1).unwrap());
    file.save().unwrap();
    for args in [&["--dry-run"][..], &[][..]] {
        let out = rotate(&job, args);
        let text = printed(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {text}");
        assert!(
            text.contains("changed by hand")
                && text.contains("`rekey secrets rollback` records it"),
            "{args:?}: {text}"
        );
    }
    let out = rekey(&["secrets", "rollback", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = rotate(&job, &[]);
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert!(
        printed(&out).contains("`rekey run` rewrites them"),
        "{}",
        printed(&out)
    );
}

// Today: while an abort waited for `ENCRYPTION_PENDING_VERSION` to be
// unset, `status` said "`rekey run` with the same job file resumes it", and
// `rekey run` (the pending key still set) rewrote every value forward to
// key 2, the key the abort takes away, exit 0.
#[tokio::test(flavor = "multi_thread")]
async fn while_an_abort_waits_status_names_it_and_a_run_to_the_key_it_takes_away_is_refused() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let base = v1_env();
    assert_eq!(
        rekey(&["rotate", "--job", &j], &base).status.code(),
        Some(6)
    );
    let mut staged = base.clone();
    staged.push(("ENCRYPTION_KEY_V2", K2.to_string()));
    staged.push(("ENCRYPTION_PENDING_VERSION", "2".to_string()));
    let out = rekey(&["rotate", "--job", &j, "--abort", "--json"], &staged);
    assert_eq!(
        (
            json(&out)["step"].as_str(),
            json(&out)["waiting_for"].as_str()
        ),
        (Some("aborting"), Some("environment")),
        "{}",
        printed(&out)
    );
    let before = db.checksum("patient_persons").await;

    let out = rekey(&["status", "--job", &j], &staged);
    let text = printed(&out);
    assert!(
        text.contains("rotation 1 is being aborted") && text.contains("`rekey rotate --abort`"),
        "{text}"
    );
    let out = rekey(&["run", "--job", &j], &staged);
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("being aborted") && text.contains("key 2 no longer pending"),
        "{text}"
    );
    assert_eq!(
        db.checksum("patient_persons").await,
        before,
        "the run wrote"
    );

    // once key 2 is no longer pending, a run goes the abort's way
    let mut readable = base.clone();
    readable.push(("ENCRYPTION_KEY_V2", K2.to_string()));
    let out = rekey(&["run", "--job", &j], &readable);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

// Today: after `secrets rollback` of a promoted rotation with keys in the
// environment (rekey prints the changes, the operator makes them), `rotate`
// said "rotation 1 was rolled back" and exited 0 before they were made,
// with key 2 still current and every value under it.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_whose_changes_are_not_made_yet_is_not_called_rolled_back() {
    let db = TestDb::new().await;
    db.seed_patients(50).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    assert_eq!(
        rekey(&["rotate", "--job", &j], &v1_env()).status.code(),
        Some(6)
    );
    let mut env = v1_env();
    env.push(("ENCRYPTION_KEY_V2", K2.to_string()));
    env.push(("ENCRYPTION_PENDING_VERSION", "2".to_string()));
    let out = rekey(&["rotate", "--job", &j, "--json"], &env);
    assert_eq!(json(&out)["step"], "promoted", "{}", printed(&out));
    // the promotion's changes made: key 2 current
    let promoted = vec![
        ("ENCRYPTION_KEY_V1", K1.to_string()),
        ("ENCRYPTION_KEY_V2", K2.to_string()),
        ("ENCRYPTION_CURRENT_VERSION", "2".to_string()),
    ];
    let out = rekey(&["secrets", "rollback", "--job", &j], &promoted);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        printed(&out).contains("ENCRYPTION_CURRENT_VERSION=1"),
        "{}",
        printed(&out)
    );
    let out = rekey(&["rotate", "--job", &j], &promoted);
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(
        text.contains("key 2 is current in the store, not key 1"),
        "{text}"
    );
}
