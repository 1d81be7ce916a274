//! Verify cannot pass on the wrong keys or on nothing: a target key that is
//! not the job's, a sample of zero; and sampled and full agree on damaged
//! values, which no run can fix, and which verify counts without recording.

use super::*;

/// A keyring with V1 and `v2` as key 2, current 2, in the seed's variables.
fn env_with_v2(v2: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ENCRYPTION_KEY_V1", K1.into()),
        ("ENCRYPTION_KEY_V2", v2.into()),
        ("ENCRYPTION_CURRENT_VERSION", "2".into()),
    ]
}

// Before these checks existed: `--sample 0` exits 0 with "verified": true; the
// default sample, `--sample 5` and `--full` exit 4 (the values decrypted are
// "undecryptable", one warning line per value for --full); none exits 2 or
// says the key is not the one the job recorded.
#[tokio::test(flavor = "multi_thread")]
async fn verify_with_a_target_key_that_is_not_the_jobs_fails_on_its_fingerprint_at_every_depth() {
    let db = TestDb::new().await;
    db.seed_patients(500).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let out = rekey(&["run", "--job", &j, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    let mut wrong = Vec::new();
    // (`--sample 0` is refused before anything is read)
    for depth in [&[][..], &["--sample", "5"][..], &["--full"][..]] {
        let mut args = vec!["verify", "--job", j.as_str(), "--json"];
        args.extend_from_slice(depth);
        let out = rekey(&args, &env_with_v2(K3));
        let said = stderr(&out);
        if out.status.code() != Some(2) || !said.to_lowercase().contains("fingerprint") {
            wrong.push(format!(
                "verify {depth:?}: exit {:?}, stdout {}, stderr {said}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).trim()
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "a wrong key 2 must be refused (exit 2, naming the fingerprint) at every depth:\n{}",
        wrong.join("\n")
    );
}

// Before these checks existed: exit 0, "verified": true, "values_sampled": 0:
// verified having decrypted nothing.
#[tokio::test(flavor = "multi_thread")]
async fn verify_with_a_sample_of_zero_never_says_verified() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let out = rekey(&["run", "--job", &j, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    let out = rekey(
        &["verify", "--job", &j, "--sample", "0", "--json"],
        &seed_env(),
    );
    assert_ne!(
        out.status.code(),
        Some(0),
        "a sample of 0 decrypts nothing: it cannot verify\n{}",
        printed(&out)
    );
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
        assert_ne!(v["verified"], true, "{v}");
    }
    let out = rekey(&["verify", "--job", &j, "--sample", "0"], &seed_env());
    assert_ne!(out.status.code(), Some(0), "{}", printed(&out));
    let claims = printed(&out)
        .lines()
        .any(|l| l.trim_start().to_lowercase().starts_with("verified"));
    assert!(
        !claims,
        "a sample of 0 printed a verified line:\n{}",
        printed(&out)
    );
}

// Before: with values on the old key, `--sample 0` ran a full verify
// (exit 4) where the README says it is refused.
#[tokio::test(flavor = "multi_thread")]
async fn verify_with_a_sample_of_zero_is_refused_while_values_are_on_an_old_key_too() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let out = rekey(&["verify", "--job", &j, "--sample", "0"], &seed_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("--sample 0 decrypts nothing"),
        "{}",
        printed(&out)
    );
}

// Before: on the same damaged table, `--full` said "0 on old keys, 3
// undecryptable" and a sample "2 on old keys, 1 undecryptable" (it counted the
// old key's version byte on two damaged values), and both said `rekey run`
// would fix what no run can.
#[tokio::test(flavor = "multi_thread")]
async fn a_sample_and_a_full_verify_agree_on_damaged_values_and_say_a_run_cannot_fix_them() {
    let db = TestDb::new().await;
    db.seed_patients(400).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let out = rekey(&["run", "--job", &j], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    // one value's tag damaged; two values given key 1's version byte over garbage
    db.client
        .batch_execute(
            "UPDATE patient_persons SET phone_encrypted = overlay(phone_encrypted placing '\\xff'::bytea from length(phone_encrypted)) WHERE id = 11;
             UPDATE patient_persons SET phone_encrypted = '\\x01'::bytea || substring(phone_encrypted from 2) WHERE id IN (12, 13);",
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    for depth in [&["--full"][..], &[][..], &["--sample", "5"][..]] {
        let mut args = vec!["verify", "--job", j.as_str(), "--json"];
        args.extend_from_slice(depth);
        let out = rekey(&args, &seed_env());
        assert_eq!(out.status.code(), Some(4), "{depth:?}: {}", printed(&out));
        let v = json(&out);
        seen.push((
            v["values_on_old_keys"].as_u64(),
            v["values_undecryptable"].as_u64(),
        ));
    }
    assert_eq!(seen, vec![(Some(0), Some(3)); 3], "the depths disagree");
    let out = rekey(&["verify", "--job", &j], &seed_env());
    let said = printed(&out);
    assert!(
        said.contains("3 values no key given opens")
            && said.contains("`rekey run` cannot fix these"),
        "{said}"
    );
    assert!(!said.contains("need `rekey run`"), "{said}");
    // verify writes nothing, and says so (before: "quarantining them")
    assert!(
        !said.contains("quarantining") && said.contains("nothing was recorded"),
        "{said}"
    );
    let recorded: i64 = db
        .client
        .query_one("SELECT count(*) FROM rekey.quarantine", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 0, "verify wrote to rekey.quarantine");
}

// Before: a job whose target has a `where` said "verified: every value
// decrypted, nothing left on an old key" with no word of the rows it never read.
#[tokio::test(flavor = "multi_thread")]
async fn verify_of_a_target_with_a_where_says_which_rows_it_did_not_read() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db
        .patients_job_where(&dir, "id <= 100")
        .display()
        .to_string();
    let out = rekey(&["run", "--job", &job], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = rekey(&["verify", "--job", &job, "--full"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        printed(&out).contains(
            "only rows of public.patient_persons where id <= 100 were read (the target's `where`): its other rows were not verified"
        ),
        "{}",
        printed(&out)
    );
    let out = rekey(&["verify", "--job", &job, "--json"], &seed_env());
    assert_eq!(
        json(&out)["only_where"],
        serde_json::json!([{"table": "public.patient_persons", "where": "id <= 100"}])
    );
    let whole = db.patients_job(&dir).display().to_string();
    let out = rekey(&["verify", "--job", &whole, "--json"], &seed_env());
    assert_eq!(
        json(&out)["only_where"],
        serde_json::json!([]),
        "{}",
        printed(&out)
    );
}
