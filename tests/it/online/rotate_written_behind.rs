//! `rekey rotate` while an application writes under the current key, as the
//! quarterly procedure's applications do until the new key is promoted
//! (they read the pending key, they encrypt with the current one). Every
//! value such an application writes after the run passed its row is still
//! on the old key when the run ends, so a rotation that waited for a clean
//! verify before promoting would never promote under a steady write load:
//! each invocation ran again and found the latest writes. It promotes once
//! the values left on an old key are only what was written behind its run
//! (readable, none refused by the database), and rotates those in a
//! catch-up run after promotion, before the grace period and the retire.

use rekey::crypto::codec::Codec;
use rekey::crypto::keytable::KeyState;

use super::*;

/// `rekey rotate` with `more` arguments, its run slowed so a write lands
/// behind it.
fn spawn_slow_rotate(job: &str, more: &[&str], env: &[(&str, String)]) -> Child {
    let mut args = vec![
        "rotate",
        "--job",
        job,
        "--json",
        "--workers",
        "1",
        "--batch-size",
        "100",
        "--max-rows-per-sec",
        "2000",
    ];
    args.extend_from_slice(more);
    rekey_cmd(&args, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rekey")
}

/// The application writes row `id` under key 1, the current key, once the
/// run has rotated past it (its only lane reads in key order).
async fn write_behind_the_run(db: &TestDb, child: &mut Child, id: i64) {
    wait_for_progress(db, child, 500).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run ended before the application wrote"
    );
    write_under_key_1(db, id).await;
}

/// The application writes row `id`'s phone under key 1.
async fn write_under_key_1(db: &TestDb, id: i64) {
    let mut value = Vec::new();
    v1_codec().seal(phone(id).as_bytes(), b"", None, &mut value);
    db.client
        .execute(
            "UPDATE patient_persons SET phone_encrypted = $1 WHERE id = $2",
            &[&value, &id],
        )
        .await
        .unwrap();
}

// Before: exit 4, "verification failed: 1 values on old keys", back to
// staged with key 2 still pending; under a steady write load every
// invocation ended so.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_written_behind_under_the_current_key_promotes_then_rotates_what_was_written() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);

    let mut child = spawn_slow_rotate(&job, &["--no-wait"], &keyring_pass_env());
    write_behind_the_run(&db, &mut child, 1).await;
    let out = finish(child, Duration::from_secs(120)).await;
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    let s = json(&out);
    assert_eq!(
        (s["step"].as_str(), s["waiting_for"].as_str()),
        (Some("promoted"), Some("grace_period")),
        "{s}"
    );
    let events = audit_events(&dir);
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "key_staged",
            "reencryption_completed",
            "verification_failed",
            "key_promoted",
            "reencryption_completed",
            "verification_passed"
        ]
    );
    // the record says what was promoted over, and that it was caught up
    assert_eq!(events[2]["verification_status"], "partial", "{}", events[2]);
    assert_eq!(events[2]["affected_records"], 1, "{}", events[2]);
    let detail = events[2]["detail"].as_str().unwrap();
    assert!(
        detail.contains("applications wrote behind the run"),
        "{detail}"
    );
    assert!(
        detail.contains("values on key 1, the current key"),
        "{detail}"
    );
    assert_eq!(events[3]["verification_status"], "partial", "{}", events[3]);
    assert_eq!(events[4]["affected_records"], 1, "{}", events[4]);
    assert_eq!(events[5]["verification_status"], "passed", "{}", events[5]);

    // key 2 is current, and every value is under it, the one written behind too
    let table = keyring_table(&keyring);
    assert_eq!(
        (table.id_in(KeyState::Current), table.previous_ids()),
        (Some(2), vec![1])
    );
    let after = db.decrypted_patients(&keyring_file_key(&keyring, 2)).await;
    assert_eq!(after.len(), 3_000);
    assert!(after
        .iter()
        .all(|(id, (p, _))| *p == Decrypted::Plain(2, phone(*id))));

    // and the rotation ends as any other
    pretend_grace_passed(&db).await;
    let out = rekey(&["rotate", "--job", &job, "--json"], &keyring_pass_env());
    assert_eq!(
        (out.status.code(), json(&out)["step"].as_str()),
        (Some(0), Some("retired")),
        "{}",
        printed(&out)
    );
}

// Without --no-wait the catch-up waits for the operator's word that the
// applications encrypt with the promoted key: what they wrote under key 1
// until then is rotated by the next invocation.
#[tokio::test(flavor = "multi_thread")]
async fn after_promoting_over_written_behind_values_rotate_waits_for_the_applications_then_catches_up(
) {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let out = rekey(&["rotate", "--job", &job, "--json"], &keyring_pass_env());
    assert_eq!(json(&out)["waiting_for"], "deploy", "{}", printed(&out));

    // the applications now read key 2 and still encrypt with key 1
    let mut child = spawn_slow_rotate(&job, &[], &keyring_pass_env());
    write_behind_the_run(&db, &mut child, 1).await;
    let out = finish(child, Duration::from_secs(120)).await;
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    let s = json(&out);
    assert_eq!(
        (s["step"].as_str(), s["waiting_for"].as_str()),
        (Some("promoted"), Some("deploy")),
        "{s}"
    );
    assert!(
        printed(&out).contains("reload or redeploy the applications so they encrypt with key 2"),
        "{}",
        printed(&out)
    );
    assert_eq!(keyring_table(&keyring).id_in(KeyState::Current), Some(2));

    // until they are redeployed, they write under key 1
    write_under_key_1(&db, 2).await;
    let out = rekey(&["rotate", "--job", &job, "--json"], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    assert_eq!(
        json(&out)["waiting_for"],
        "grace_period",
        "{}",
        printed(&out)
    );
    let events = audit_events(&dir);
    let catch_up = &events[events.len() - 2];
    assert_eq!(
        (
            catch_up["event_type"].as_str(),
            &catch_up["affected_records"]
        ),
        (Some("reencryption_completed"), &serde_json::json!(2)),
        "{catch_up}"
    );
    assert!(db
        .decrypted_patients(&keyring_file_key(&keyring, 2))
        .await
        .iter()
        .all(|(id, (p, _))| *p == Decrypted::Plain(2, phone(*id))));
}

// What the database refused to let rekey write is no application's write:
// the rotation stays staged, as before, and says what to fix.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_whose_writes_the_database_refused_is_not_promoted() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    db.client
        .batch_execute(
            "CREATE FUNCTION archived_read_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
               IF OLD.id % 100 = 0 THEN RAISE EXCEPTION 'archived patients are read-only'; END IF;
               RETURN NEW; END $$;
             CREATE TRIGGER archived_read_only BEFORE UPDATE ON patient_persons FOR EACH ROW EXECUTE FUNCTION archived_read_only();",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);

    let mut child = spawn_slow_rotate(&job, &["--no-wait"], &keyring_pass_env());
    write_behind_the_run(&db, &mut child, 1).await;
    let out = finish(child, Duration::from_secs(120)).await;
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert_eq!(json(&out)["step"], "staged", "{}", printed(&out));
    let table = keyring_table(&keyring);
    assert_eq!(
        (
            table.id_in(KeyState::Current),
            table.id_in(KeyState::Pending)
        ),
        (Some(1), Some(2))
    );
    let promoted = audit_events(&dir)
        .iter()
        .any(|e| e["event_type"] == "key_promoted");
    assert!(!promoted, "{}", printed(&out));
}

// Keys in the environment: rekey cannot promote by itself, so the catch-up
// waits for the operator's change of the current version (until then the
// applications write under key 1) and runs on the next invocation.
#[tokio::test(flavor = "multi_thread")]
async fn with_keys_in_the_environment_the_catch_up_runs_after_the_current_version_changed() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let mut env = v1_env();
    let out = rekey(&["rotate", "--job", &job], &env);
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    env.push(("ENCRYPTION_KEY_V2", K2.to_string()));
    env.push(("ENCRYPTION_PENDING_VERSION", "2".to_string()));

    let mut child = spawn_slow_rotate(&job, &["--no-wait"], &env);
    write_behind_the_run(&db, &mut child, 1).await;
    let out = finish(child, Duration::from_secs(120)).await;
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    let s = json(&out);
    assert_eq!(
        (s["step"].as_str(), s["waiting_for"].as_str()),
        (Some("promoted"), Some("environment")),
        "{s}"
    );
    assert!(
        printed(&out).contains("export ENCRYPTION_CURRENT_VERSION=2"),
        "{}",
        printed(&out)
    );

    // not redeployed yet: the application still writes under key 1
    write_under_key_1(&db, 2).await;
    let out = rekey(&["rotate", "--job", &job, "--dry-run"], &env);
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    assert!(
        printed(&out).contains("would first run the catch-up (2 values to re-encrypt under key 2)"),
        "{}",
        printed(&out)
    );

    env.retain(|(k, _)| *k != "ENCRYPTION_PENDING_VERSION" && *k != "ENCRYPTION_CURRENT_VERSION");
    env.push(("ENCRYPTION_CURRENT_VERSION", "2".to_string()));
    let out = rekey(&["rotate", "--job", &job, "--json"], &env);
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    let s = json(&out);
    assert_eq!(
        (s["step"].as_str(), s["waiting_for"].as_str()),
        (Some("promoted"), Some("grace_period")),
        "{s}"
    );
    let events = audit_events(&dir);
    let last: Vec<(&str, &serde_json::Value)> = events[events.len() - 2..]
        .iter()
        .map(|e| (e["event_type"].as_str().unwrap(), &e["affected_records"]))
        .collect();
    assert_eq!(
        last,
        [
            ("reencryption_completed", &serde_json::json!(2)),
            ("verification_passed", &serde_json::json!(values_in(3_000)))
        ]
    );
    db.assert_every_value_rotated(3_000).await;

    // caught up once: a later invocation in the grace period runs nothing
    let out = rekey(&["rotate", "--job", &job, "--json"], &env);
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    assert_eq!(audit_events(&dir).len(), events.len());
}

// Only the rotation's own run vouches for what it left: where the job's
// latest run is another (a `rekey run` by hand after rotate's, here with
// the rotation put back to the step after its run, as a kill leaves it),
// values on the old key keep the rotation staged.
#[tokio::test(flavor = "multi_thread")]
async fn values_on_the_old_key_after_a_run_that_is_not_the_rotations_keep_it_staged() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let out = rekey(&["rotate", "--job", &job, "--json"], &keyring_pass_env());
    assert_eq!(json(&out)["waiting_for"], "deploy", "{}", printed(&out));
    let out = rekey(&["run", "--job", &job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.client
        .execute("UPDATE rekey.rotations SET step = 'ran'", &[])
        .await
        .unwrap();
    write_under_key_1(&db, 1).await;

    let out = rekey(&["rotate", "--job", &job, "--json"], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert_eq!(json(&out)["step"], "staged", "{}", printed(&out));
    assert_eq!(keyring_table(&keyring).id_in(KeyState::Pending), Some(2));
}

/// Starts a rotation of `job` with its key in the dual convention
/// (`ENCRYPTION_KEY`, base64) and returns the environment once the staging
/// is made: the new key as `ENCRYPTION_KEY_NEW`.
fn stage_in_the_dual_convention(job: &str) -> [(&'static str, String); 2] {
    use base64::Engine as _;
    let urlsafe =
        |k: &str| base64::engine::general_purpose::URL_SAFE.encode(hex::decode(k).unwrap());
    let out = rekey(
        &["rotate", "--job", job],
        &[("ENCRYPTION_KEY", urlsafe(K1))],
    );
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    [
        ("ENCRYPTION_KEY", urlsafe(K1)),
        ("ENCRYPTION_KEY_NEW", urlsafe(K2)),
    ]
}

// Before: "not verified, promoting over them", the instructions to make
// ENCRYPTION_KEY the new key and unset ENCRYPTION_KEY_NEW, and the value
// written behind unreadable by the application until the catch-up run.
#[tokio::test(flavor = "multi_thread")]
async fn in_the_dual_convention_a_value_written_behind_the_run_keeps_the_key_staged_until_a_run_rotates_it(
) {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let staged = stage_in_the_dual_convention(&job);

    let mut child = spawn_slow_rotate(&job, &[], &staged);
    write_behind_the_run(&db, &mut child, 1).await;
    let out = finish(child, Duration::from_secs(120)).await;
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    let s = json(&out);
    assert_eq!(
        (s["step"].as_str(), s["waiting_for"].as_str()),
        (Some("staged"), Some("deploy")),
        "{s}"
    );
    let text = printed(&out);
    assert!(
        text.contains("refusing to promote key 2: 1 values are not under it")
            && text.contains("ENCRYPTION_KEY_NEW")
            && !text.contains("export ENCRYPTION_KEY="),
        "{text}"
    );

    // the next invocation rotates it, and promotes on a full verify
    let out = rekey(&["rotate", "--job", &job, "--json"], &staged);
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    assert_eq!(
        json(&out)["step"].as_str(),
        Some("promoted"),
        "{}",
        printed(&out)
    );
    assert!(printed(&out).contains("unset ENCRYPTION_KEY_NEW"));
    db.assert_every_value_rotated(3_000).await;
}

// Before: a rotation found at `verified` (the invocation that verified was
// killed after) promoted with no verify of its own, the value written since
// under key 1 included: unreadable by the application once promoted.
#[tokio::test(flavor = "multi_thread")]
async fn in_the_dual_convention_a_rotation_resumed_at_verified_proves_again_before_promoting() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let staged = stage_in_the_dual_convention(&job);
    let out = rekey(&["run", "--job", &job], &staged);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    // as a kill right after the verify leaves it
    db.client
        .execute("UPDATE rekey.rotations SET step = 'verified'", &[])
        .await
        .unwrap();
    write_under_key_1(&db, 1).await;

    let out = rekey(&["rotate", "--job", &job, "--json"], &staged);
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert_eq!(json(&out)["step"], "staged", "{}", printed(&out));
    let text = printed(&out);
    assert!(
        text.contains("refusing to promote key 2: 1 values are not under it")
            && !text.contains("export ENCRYPTION_KEY="),
        "{text}"
    );
    // the next invocation rotates it and promotes
    let out = rekey(&["rotate", "--job", &job, "--json"], &staged);
    assert_eq!(json(&out)["step"], "promoted", "{}", printed(&out));
    db.assert_every_value_rotated(300).await;
}
