//! Rotation end to end: the seed's table goes from V1 to V2.

use crate::harness::*;

fn run_args(job: &std::path::Path) -> Vec<String> {
    vec![
        "run".into(),
        "--job".into(),
        job.display().to_string(),
        "--json".into(),
    ]
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_of_100k_rows_leaves_every_value_on_v2_with_its_plaintext() {
    let db = TestDb::new().await;
    db.seed_patients(100_000).await;
    let others_before = db
        .checksum("(SELECT id, name, notes FROM patient_persons)")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);

    let out = rekey(&args(&run_args(&job)), &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let summary = json(&out);
    assert_eq!(summary["values_rewritten"], 100_000 + 66_667);
    assert_eq!(summary["values_failed"], 0);
    assert_eq!(summary["conflicts"], 0);

    let after = db.decrypted_patients(&v2_ring()).await;
    assert_eq!(after.len(), 100_000);
    for (id, (p, e)) in &after {
        assert_eq!(p, &Decrypted::Plain(2, phone(*id)), "phone of {id}");
        let want = if id % 3 == 0 {
            Decrypted::Null
        } else {
            Decrypted::Plain(2, emergency(*id))
        };
        assert_eq!(e, &want, "emergency phone of {id}");
    }
    assert_eq!(
        db.checksum("(SELECT id, name, notes FROM patient_persons)")
            .await,
        others_before,
        "other columns changed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_run_after_a_finished_one_rewrites_nothing() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);
    assert_eq!(
        rekey(&args(&run_args(&job)), &seed_env()).status.code(),
        Some(0)
    );
    let before = db.checksum("patient_persons").await;

    let out = rekey(&args(&run_args(&job)), &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let summary = json(&out);
    assert_eq!(summary["values_rewritten"], 0);
    assert_eq!(summary["rows_scanned"], 0, "a re-run reads only stale rows");
    assert_eq!(db.checksum("patient_persons").await, before);
}

// Before: a dry run that would rewrite every value exited 0 and logged
// "done", where 0 promises that nothing in scope is on an old key.
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_exits_4_while_values_would_be_rewritten_and_0_once_none_would() {
    let db = TestDb::new().await;
    db.seed_patients(500).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let dry = ["run", "--job", job.as_str(), "--dry-run", "--json"];
    let out = rekey(&dry, &seed_env());
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert!(
        json(&out)["values_rewritten"].as_i64() > Some(0),
        "{}",
        printed(&out)
    );
    assert!(!printed(&out).contains(": done after"), "{}", printed(&out));
    let out = rekey(&["run", "--job", &job], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = rekey(&dry, &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["values_rewritten"], 0, "{}", printed(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_changes_neither_the_table_nor_engine_state() {
    let db = TestDb::new().await;
    db.seed_patients(5_000).await;
    db.client
        .execute(
            "UPDATE patient_persons SET phone_encrypted = '\\x0102' WHERE id = 7",
            &[],
        )
        .await
        .unwrap();
    db.client.execute("UPDATE patient_persons SET phone_encrypted = '\\x09' || substring(phone_encrypted from 2) WHERE id = 8", &[]).await.unwrap();
    let before = db.checksum("patient_persons").await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);

    let mut a = run_args(&job);
    a.push("--dry-run".into());
    let out = rekey(&args(&a), &seed_env());
    // values it would rewrite are still on an old key
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    let summary = json(&out);
    assert_eq!(summary["values_rewritten"], 5_000 + 3_334 - 2);
    assert_eq!(
        summary["values_failed"], 2,
        "every failing value is reported"
    );
    let failures = summary["failures"].as_array().unwrap();
    let keys: Vec<&str> = failures
        .iter()
        .map(|f| f["key"].as_str().unwrap())
        .collect();
    assert!(
        keys.contains(&"(7)") && keys.contains(&"(8)"),
        "{failures:?}"
    );

    assert_eq!(db.checksum("patient_persons").await, before);
    let schema: bool = db
        .client
        .query_one("SELECT to_regnamespace('rekey') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!schema, "dry run created engine state");
}

// Before: an empty value was quarantined as truncated, and the run ended
// with exit 3 at every try, while applications (and the seeds' own
// re-encryption script, `if patient.encrypted_ssn:`) write one for "no
// value" and skip it. It holds no ciphertext: under no key, as NULL is.
#[tokio::test(flavor = "multi_thread")]
async fn empty_values_hold_no_ciphertext_and_are_left_as_they_are_like_null() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    db.client
        .batch_execute(
            "UPDATE patient_persons SET phone_encrypted = '\\x'::bytea WHERE id % 25 = 0",
        )
        .await
        .unwrap();
    let empty = "(SELECT id FROM patient_persons WHERE phone_encrypted = '\\x'::bytea)";
    let empty_before = db.checksum(empty).await;
    let emptied: i64 = db
        .client
        .query_one(&format!("SELECT count(*) FROM {empty} e"), &[])
        .await
        .unwrap()
        .get(0);
    assert!(emptied > 0);
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);

    let out = rekey(&args(&run_args(&job)), &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["values_failed"], 0);
    assert_eq!(
        db.checksum(empty).await,
        empty_before,
        "an empty value was changed"
    );
    let after = db.decrypted_patients(&v2_ring()).await;
    for (id, (p, e)) in &after {
        if id % 25 != 0 {
            assert_eq!(*p, Decrypted::Plain(2, phone(*id)), "row {id}");
        }
        assert!(
            matches!(e, Decrypted::Plain(2, _) | Decrypted::Null),
            "row {id}: {e:?}"
        );
    }
    let job = job.display().to_string();
    let out = rekey(&["verify", "--job", &job, "--full", "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = rekey(&["plan", "--job", &job, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        !printed(&out).contains("\"to_rewrite\":1") && !printed(&out).contains("no such key"),
        "{}",
        printed(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupted_values_are_quarantined_reported_and_left_byte_for_byte() {
    let db = TestDb::new().await;
    db.seed_patients(2_000).await;
    // truncated, tampered tag, unknown version byte, wrong key (sealed under a key we do not hold as V1)
    db.client
        .batch_execute(
            "UPDATE patient_persons SET phone_encrypted = substring(phone_encrypted from 1 for 20) WHERE id = 10;
             UPDATE patient_persons SET phone_encrypted = overlay(phone_encrypted placing '\\xff'::bytea from length(phone_encrypted)) WHERE id = 11;
             UPDATE patient_persons SET emergency_contact_phone_encrypted = '\\x07' || substring(emergency_contact_phone_encrypted from 2) WHERE id = 13;",
        )
        .await
        .unwrap();
    let wrong = rekey::crypto::keyring::Keyring::new(
        vec![rekey::crypto::keyring::Key::new(1, [9; 32])],
        1,
        None,
    )
    .unwrap();
    let mut sealed = Vec::new();
    rekey::crypto::codec::Codec::seal(
        &rekey::crypto::codec::versioned_gcm::VersionedGcm::new(&wrong).unwrap(),
        b"x",
        b"",
        None,
        &mut sealed,
    );
    db.client
        .execute(
            "UPDATE patient_persons SET phone_encrypted = $1 WHERE id = 16",
            &[&sealed],
        )
        .await
        .unwrap();
    let corrupt = "(SELECT id, CASE WHEN id = 13 THEN emergency_contact_phone_encrypted ELSE phone_encrypted END FROM patient_persons WHERE id IN (10, 11, 13, 16))";
    let corrupt_before = db.checksum(corrupt).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);

    let out = rekey(&args(&run_args(&job)), &seed_env());
    assert_eq!(out.status.code(), Some(3), "{}", printed(&out));
    assert_eq!(json(&out)["values_failed"], 4);
    assert_eq!(
        db.checksum(corrupt).await,
        corrupt_before,
        "a corrupted value was changed"
    );

    let q = db
        .client
        .query("SELECT pk_text, column_name, error_kind FROM rekey.quarantine ORDER BY pk_text, column_name", &[])
        .await
        .unwrap();
    let got: Vec<(String, String, String)> =
        q.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    let want = [
        ("(10)", "phone_encrypted", "truncated"),
        ("(11)", "phone_encrypted", "auth_failed"),
        ("(13)", "emergency_contact_phone_encrypted", "unknown_key"),
        ("(16)", "phone_encrypted", "auth_failed"),
    ];
    assert_eq!(
        got,
        want.map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    );

    // everything else rotated, including the healthy column of the corrupted rows
    let after = db.decrypted_patients(&v2_ring()).await;
    assert_eq!(after[&13].0, Decrypted::Plain(2, phone(13)));
    assert_eq!(after[&10].1, Decrypted::Plain(2, emergency(10)));
    let rotated = after
        .values()
        .flat_map(|(p, e)| [p, e])
        .filter(|d| matches!(d, Decrypted::Plain(2, _)))
        .count();
    assert_eq!(rotated, 2_000 + 1_334 - 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_exits_4_before_rotation_and_0_after() {
    let db = TestDb::new().await;
    db.seed_patients(4_000).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);
    let j = job.display().to_string();

    let before = rekey(&["verify", "--job", &j, "--json"], &seed_env());
    assert_eq!(before.status.code(), Some(4), "{}", printed(&before));
    assert_eq!(json(&before)["values_on_old_keys"], 4_000 + 2_667);
    assert_eq!(json(&before)["by_key"]["v1"], 4_000 + 2_667);

    assert_eq!(
        rekey(&args(&run_args(&job)), &seed_env()).status.code(),
        Some(0)
    );
    for mode in ["--full", "--sample"] {
        let mut a = vec!["verify", "--job", &j, "--json", mode];
        if mode == "--sample" {
            a.push("500");
        }
        let after = rekey(&a, &seed_env());
        assert_eq!(after.status.code(), Some(0), "{mode}: {}", printed(&after));
        let v = json(&after);
        assert_eq!(v["values_on_target_key"], 4_000 + 2_667, "{mode}");
        assert_eq!(v["values_undecryptable"], 0, "{mode}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_counts_values_per_key_version_and_nulls() {
    let db = TestDb::new().await;
    db.seed_patients(900).await;
    db.client
        .execute(
            "UPDATE patient_persons SET phone_encrypted = NULL WHERE id <= 10",
            &[],
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);
    let out = rekey(
        &["plan", "--job", &job.display().to_string(), "--json"],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let plan = json(&out);
    let cols = plan["columns"].as_array().unwrap();
    assert_eq!(cols[0]["column"], "phone_encrypted");
    assert_eq!(cols[0]["nulls"], 10);
    assert_eq!(cols[0]["by_key"]["v1"], 890);
    assert_eq!(cols[1]["nulls"], 300);
    assert_eq!(plan["values_to_rewrite"], 890 + 600);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_a_finished_job_from_the_database() {
    let db = TestDb::new().await;
    db.seed_patients(1_500).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);
    let j = job.display().to_string();
    let never = rekey(&["status", "--job", &j, "--json"], &[]);
    assert_eq!(json(&never)["state"], "never run");
    assert_eq!(
        rekey(&args(&run_args(&job)), &seed_env()).status.code(),
        Some(0)
    );

    let out = rekey(&["status", "--job", &j, "--json"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let s = json(&out);
    assert_eq!(s["state"], "done");
    assert_eq!(s["counts"]["values_rewritten"], 1_500 + 1_000);
    assert_eq!(s["ranges_done"], s["ranges_total"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn composite_keys_and_quoted_identifiers_rotate() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            "CREATE SCHEMA \"Clinic Data\";
             CREATE TABLE \"Clinic Data\".\"Visit Notes\" (org text, \"Seq\" int, \"Secret Col\" bytea, PRIMARY KEY (org, \"Seq\"))",
        )
        .await
        .unwrap();
    let codec = v1_codec();
    let mut out = Vec::new();
    for org in ["a", "b\"quote", "c'; drop"] {
        for seq in 0..700 {
            rekey::crypto::codec::Codec::seal(
                &codec,
                format!("{org}/{seq}").as_bytes(),
                b"",
                None,
                &mut out,
            );
            db.client
                .execute(
                    "INSERT INTO \"Clinic Data\".\"Visit Notes\" VALUES ($1, $2, $3)",
                    &[&org, &seq, &out],
                )
                .await
                .unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("visits.toml");
    std::fs::write(
        &job,
        format!(
            "[database]\nurl = \"{}\"\n[keys]\nsource = \"env\"\n[[target]]\ntable = \"Visit Notes\"\nschema = \"Clinic Data\"\ncolumns = [\"Secret Col\"]\nformat = \"versioned-gcm\"\n",
            db.url
        ),
    )
    .unwrap();
    let out = rekey(
        &[
            "run",
            "--job",
            &job.display().to_string(),
            "--json",
            "--batch-size",
            "97",
        ],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["values_rewritten"], 2_100);
    let codec2 = rekey::crypto::codec::versioned_gcm::VersionedGcm::new(&v2_ring()).unwrap();
    for r in db
        .client
        .query(
            "SELECT org, \"Seq\", \"Secret Col\" FROM \"Clinic Data\".\"Visit Notes\"",
            &[],
        )
        .await
        .unwrap()
    {
        let (org, seq, v): (String, i32, Vec<u8>) = (r.get(0), r.get(1), r.get(2));
        let opened = rekey::crypto::codec::Codec::open(&codec2, &v, b"").unwrap();
        assert_eq!(
            (opened.key, opened.plaintext.as_slice()),
            (2, format!("{org}/{seq}").as_bytes())
        );
    }
}

// Before this warning: key 2 set, the current version left at 1, and the
// run rewrote nothing, exit 0, saying no word of key 2.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_warns_when_the_environment_holds_a_key_newer_than_the_current_version() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);
    let not_raised = vec![
        ("ENCRYPTION_KEY_V1", K1.to_string()),
        ("ENCRYPTION_KEY_V2", K2.to_string()),
        ("ENCRYPTION_CURRENT_VERSION", "1".to_string()),
    ];
    let out = rekey(&args(&run_args(&job)), &not_raised);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let warnings = json(&out)["warnings"].clone();
    assert_eq!(warnings.as_array().map(Vec::len), Some(1), "{warnings}");
    let words = "ENCRYPTION_KEY_V2 is set, newer than key 1";
    assert!(
        warnings[0].as_str().unwrap_or_default().contains(words),
        "{warnings}"
    );
    assert!(
        warnings[0]
            .as_str()
            .unwrap_or_default()
            .contains("set ENCRYPTION_CURRENT_VERSION=2"),
        "{warnings}"
    );
    assert!(stderr(&out).contains(words), "{}", stderr(&out));
    assert_eq!(json(&out)["values_rewritten"], 0);

    // raised: no warning, and the run rotates
    let out = rekey(&args(&run_args(&job)), &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        json(&out)["warnings"],
        serde_json::json!([]),
        "{}",
        printed(&out)
    );
    assert!(!stderr(&out).contains("newer than key"), "{}", stderr(&out));
    assert!(json(&out)["values_rewritten"].as_u64() > Some(0));
}

// Today: `ENCRYPTION_PENDING_VERSION=2` left from the last rotation while
// the next one set key 3 current: the run took the "pending" key 2 for its
// target, rewrote what the applications wrote under key 3 back under key
// 2, exited 0, and verify said every value was on the target.
#[tokio::test(flavor = "multi_thread")]
async fn a_pending_version_left_below_the_current_one_is_refused_and_nothing_is_rewritten() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);
    let out = rekey(&args(&run_args(&job)), &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let ciphertexts =
        "(SELECT id, phone_encrypted, emergency_contact_phone_encrypted FROM patient_persons)";
    let on_key_2 = db.checksum(ciphertexts).await;
    let leftover = vec![
        ("ENCRYPTION_KEY_V1", K1.to_string()),
        ("ENCRYPTION_KEY_V2", K2.to_string()),
        ("ENCRYPTION_KEY_V3", K3.to_string()),
        ("ENCRYPTION_CURRENT_VERSION", "3".to_string()),
        ("ENCRYPTION_PENDING_VERSION", "2".to_string()),
    ];
    for command in [
        run_args(&job),
        vec!["verify".into(), "--job".into(), job.display().to_string()],
    ] {
        let out = rekey(&args(&command), &leftover);
        assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
        assert!(
            printed(&out).contains(
                "ENCRYPTION_PENDING_VERSION=2 names a key older than the current one (ENCRYPTION_CURRENT_VERSION=3)"
            ) && printed(&out).contains("unset ENCRYPTION_PENDING_VERSION"),
            "{}",
            printed(&out)
        );
    }
    assert_eq!(
        db.checksum(ciphertexts).await,
        on_key_2,
        "a value was rewritten"
    );
}

// Today: values whose version byte is 0 were said to be "under
// ENCRYPTION_KEY_V0 in the environment ... Give the old key", and a
// variable of that name is refused: no key has version 0, so the run's
// refusal says so, and past --force they are quarantined as damaged.
#[tokio::test(flavor = "multi_thread")]
async fn values_labelled_version_0_are_refused_as_no_keys_values_not_sent_looking_for_key_0() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    db.client
        .batch_execute(
            "UPDATE patient_persons SET phone_encrypted = '\\x00' || substring(phone_encrypted from 2) WHERE id <= 10",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);
    let out = rekey(&args(&run_args(&job)), &seed_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("10 begin with version byte 0, which no versioned-gcm key has")
            && !printed(&out).contains("_V0"),
        "{}",
        printed(&out)
    );
    assert_eq!(committed_values(&db).await, 0, "a value was written");
    let mut forced = run_args(&job);
    forced.push("--force".into());
    let out = rekey(&args(&forced), &seed_env());
    assert_eq!(out.status.code(), Some(3), "{}", printed(&out));
    assert_eq!(json(&out)["values_failed"], 10, "{}", printed(&out));
    let out = rekey(
        &["verify", "--job", &job.display().to_string(), "--full"],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert!(!printed(&out).contains("_V0"), "{}", printed(&out));
}
