//! Bad configuration is refused with exit code 2, a message that says what to
//! fix, and no row touched.

use crate::harness::*;

async fn patients() -> (TestDb, tempfile::TempDir) {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    (db, tempfile::tempdir().unwrap())
}

fn job_with(dir: &tempfile::TempDir, db: &TestDb, target: &str) -> String {
    let path = dir.path().join("job.toml");
    std::fs::write(
        &path,
        format!(
            "[database]\nurl = \"{}\"\n[keys]\nsource = \"env\"\n[[target]]\n{target}\n",
            db.url
        ),
    )
    .unwrap();
    path.display().to_string()
}

async fn assert_refused(db: &TestDb, job: &str, env: &[(&str, String)], needle: &str) {
    let before = db.checksum("patient_persons").await;
    let out = rekey(&["run", "--job", job], env);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains(needle), "expected {needle:?} in: {said}");
    assert_eq!(db.checksum("patient_persons").await, before);
}

const GOOD: &str = "table = \"patient_persons\"\nprimary_key = [\"id\"]\ncolumns = [\"phone_encrypted\"]\nformat = \"versioned-gcm\"";

#[tokio::test(flavor = "multi_thread")]
async fn unknown_field_in_the_job_file_is_refused() {
    let (db, dir) = patients().await;
    let job = job_with(&dir, &db, &format!("{GOOD}\nbatch = 5"));
    assert_refused(&db, &job, &seed_env(), "unknown field `batch`").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_table_is_refused() {
    let (db, dir) = patients().await;
    let job = job_with(&dir, &db, &GOOD.replace("patient_persons", "patients"));
    assert_refused(&db, &job, &seed_env(), "table \"patients\" not found").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_column_is_refused_with_the_columns_that_exist() {
    let (db, dir) = patients().await;
    let job = job_with(&dir, &db, &GOOD.replace("phone_encrypted", "phone"));
    assert_refused(
        &db,
        &job,
        &seed_env(),
        "its columns are: id, name, phone_encrypted",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn column_of_the_wrong_type_is_refused() {
    let (db, dir) = patients().await;
    let job = job_with(
        &dir,
        &db,
        &GOOD
            .replace("[\"phone_encrypted\"]", "[\"id\"]")
            .replace("primary_key = [\"id\"]\n", ""),
    );
    assert_refused(
        &db,
        &job,
        &seed_env(),
        "is bigint; encrypted columns must be bytea",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_that_is_not_unique_is_refused() {
    let (db, dir) = patients().await;
    let job = job_with(&dir, &db, &GOOD.replace("[\"id\"]", "[\"name\"]"));
    assert_refused(
        &db,
        &job,
        &seed_env(),
        "primary_key [name] is not a unique key",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_current_version_names_the_variable() {
    let (db, dir) = patients().await;
    let job = job_with(&dir, &db, GOOD);
    let env = vec![
        ("ENCRYPTION_KEY_V1", K1.to_string()),
        ("ENCRYPTION_KEY_V2", K2.to_string()),
    ];
    assert_refused(&db, &job, &env, "ENCRYPTION_CURRENT_VERSION is not set").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn current_version_without_a_key_names_the_variable() {
    let (db, dir) = patients().await;
    let job = job_with(&dir, &db, GOOD);
    let env = vec![
        ("ENCRYPTION_KEY_V1", K1.to_string()),
        ("ENCRYPTION_CURRENT_VERSION", "2".to_string()),
    ];
    assert_refused(&db, &job, &env, "ENCRYPTION_KEY_V2 is not set").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_of_the_wrong_length_names_the_variable() {
    let (db, dir) = patients().await;
    let job = job_with(&dir, &db, GOOD);
    let env = vec![
        ("ENCRYPTION_KEY_V1", K1.to_string()),
        ("ENCRYPTION_KEY_V2", K2[..62].to_string()),
        ("ENCRYPTION_CURRENT_VERSION", "2".to_string()),
    ];
    assert_refused(
        &db,
        &job,
        &env,
        "ENCRYPTION_KEY_V2 looks like hex but is 62 characters; a key is 64 hex characters",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_hex_names_the_variable() {
    let (db, dir) = patients().await;
    let job = job_with(&dir, &db, GOOD);
    let bad = format!("zz{}", &K2[2..]);
    let env = vec![
        ("ENCRYPTION_KEY_V1", K1.to_string()),
        ("ENCRYPTION_KEY_V2", bad),
        ("ENCRYPTION_CURRENT_VERSION", "2".to_string()),
    ];
    assert_refused(&db, &job, &env, "ENCRYPTION_KEY_V2").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hex_key_with_a_typo_names_the_character_not_a_byte_count() {
    let (db, dir) = patients().await;
    let job = job_with(&dir, &db, GOOD);
    let typo = format!("{}g{}", &K2[..16], &K2[17..]);
    let env = vec![
        ("ENCRYPTION_KEY_V1", K1.to_string()),
        ("ENCRYPTION_KEY_V2", typo.clone()),
        ("ENCRYPTION_CURRENT_VERSION", "2".to_string()),
    ];
    let needle = "ENCRYPTION_KEY_V2 is not hex: character 17 is not a hex digit";
    assert_refused(&db, &job, &env, needle).await;
    let said = printed(&rekey(&["run", "--job", &job], &env));
    assert!(!said.contains("bytes"), "{said}");
    for part in typo.as_bytes().windows(6) {
        let part = std::str::from_utf8(part).unwrap();
        assert!(!said.contains(part), "a part of the key in: {said}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn resuming_with_a_changed_job_file_is_refused() {
    let (db, dir) = patients().await;
    let job = job_with(&dir, &db, GOOD);
    db.client
        .batch_execute("CREATE SCHEMA rekey")
        .await
        .unwrap();
    // an unfinished job of the same name, started from another spec
    let mut admin = connect(&db.url).await;
    rekey::state::ensure_schema(&mut admin).await.unwrap();
    admin
        .execute("INSERT INTO rekey.jobs (name, spec_hash, keys, state) VALUES ('job', 'other', '{}', 'running')", &[])
        .await
        .unwrap();
    assert_refused(&db, &job, &seed_env(), "started from a different job file").await;
}

// Today: with DATABASE_URL left set for another job, a run rotated that
// database instead of the one its job file names, and nothing said which.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_url_in_the_environment_that_overrides_the_job_file_s_is_said() {
    let (db, dir) = patients().await;
    let other = TestDb::new().await;
    other.seed_patients(10).await;
    let job = job_with(&dir, &db, GOOD);
    let mut env = seed_env();
    env.push(("DATABASE_URL", other.url.clone()));
    let out = rekey(&["run", "--job", &job, "--dry-run"], &env);
    let said = stderr(&out);
    assert!(
        said.contains("DATABASE_URL (") && said.contains("overrides the job file's [database] url"),
        "{said}"
    );
    // the same database both ways: nothing to say
    env.pop();
    env.push(("DATABASE_URL", db.url.clone()));
    let out = rekey(&["run", "--job", &job, "--dry-run"], &env);
    assert!(!stderr(&out).contains("overrides"), "{}", stderr(&out));
}

// Today: `run --dry-run` skipped the checks the run makes of its throttles
// and of a job to resume: it said "done" where the run refuses (exit 2).
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_refuses_a_gate_query_the_run_would_refuse() {
    let (db, dir) = patients().await;
    let job = job_with(&dir, &db, GOOD);
    let out = rekey(
        &["run", "--job", &job, "--dry-run", "--gate-sql", "SELECT 1"],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("cannot serve as a gate"),
        "{}",
        printed(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_refuses_an_archive_lag_cap_on_a_server_that_does_not_archive() {
    let (db, dir) = patients().await;
    let job = job_with(&dir, &db, GOOD);
    let out = rekey(
        &[
            "run",
            "--job",
            &job,
            "--dry-run",
            "--max-archive-lag",
            "1GB",
        ],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("archive_mode is off"),
        "{}",
        printed(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_of_a_job_left_unfinished_by_another_job_file_is_refused_as_its_run_would_be() {
    let (db, dir) = patients().await;
    let job = job_with(&dir, &db, GOOD);
    let mut admin = connect(&db.url).await;
    rekey::state::ensure_schema(&mut admin).await.unwrap();
    admin
        .execute("INSERT INTO rekey.jobs (name, spec_hash, keys, state) VALUES ('job', 'other', '{}', 'running')", &[])
        .await
        .unwrap();
    let out = rekey(&["run", "--job", &job, "--dry-run"], &seed_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("started from a different job file"),
        "{}",
        printed(&out)
    );
    // what the run would do instead is a dry run too
    let out = rekey(
        &["run", "--job", &job, "--dry-run", "--restart"],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
}

// Today: `run --dry-run` with a wrong old key said "would rewrite 0
// values ... 400000 failed" and "done" (exit 3, nothing quarantined) where
// the run itself refuses (exit 2): a dry run used as a gate said go.
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_with_a_key_that_opens_nothing_gives_the_refusal_the_run_would() {
    let (db, dir) = patients().await;
    let job = job_with(&dir, &db, GOOD);
    let env = vec![
        ("ENCRYPTION_KEY_V1", K3.to_string()),
        ("ENCRYPTION_KEY_V2", K2.to_string()),
        ("ENCRYPTION_CURRENT_VERSION", "2".to_string()),
    ];
    let out = rekey(&["run", "--job", &job, "--dry-run"], &env);
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("values sampled from public.patient_persons opens") && !text.contains("done"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_that_opens_nothing_is_refused_before_any_write_unless_forced() {
    let (db, dir) = patients().await;
    let job = job_with(&dir, &db, GOOD);
    let wrong_v1 = "9999999999999999999999999999999999999999999999999999999999999999";
    let env = vec![
        ("ENCRYPTION_KEY_V1", wrong_v1.to_string()),
        ("ENCRYPTION_KEY_V2", K2.to_string()),
        ("ENCRYPTION_CURRENT_VERSION", "2".to_string()),
    ];
    assert_refused(
        &db,
        &job,
        &env,
        "none of the 100 values sampled from public.patient_persons opens",
    )
    .await;
    let schema: bool = db
        .client
        .query_one("SELECT to_regnamespace('rekey') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!schema, "refused, yet engine state was created");

    let before = db.checksum("patient_persons").await;
    let out = rekey(&["run", "--job", &job, "--force", "--json"], &env);
    assert_eq!(out.status.code(), Some(3), "{}", printed(&out));
    assert_eq!(
        (
            json(&out)["values_failed"].as_u64(),
            json(&out)["values_rewritten"].as_u64()
        ),
        (Some(100), Some(0))
    );
    assert_eq!(
        db.checksum("patient_persons").await,
        before,
        "a value was overwritten"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_variable_that_is_not_text_names_the_variable() {
    use std::os::unix::ffi::OsStrExt;
    let (db, dir) = patients().await;
    let job = job_with(&dir, &db, GOOD);
    let mut cmd = rekey_cmd(
        &["run", "--job", &job],
        &[
            ("ENCRYPTION_KEY_V1", K1.to_string()),
            ("ENCRYPTION_CURRENT_VERSION", "1".to_string()),
        ],
    );
    cmd.env(
        "ENCRYPTION_KEY_V2",
        std::ffi::OsStr::from_bytes(b"\xff\xfe"),
    );
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("ENCRYPTION_KEY_V2 is not valid text"),
        "{}",
        printed(&out)
    );
}

#[cfg(not(feature = "aws"))]
#[tokio::test(flavor = "multi_thread")]
async fn without_the_aws_feature_the_aws_key_sources_are_refused_saying_how_to_get_them() {
    let (db, dir) = patients().await;
    for keys in [
        "source = \"aws-secrets-manager\"\nsecret_id = \"rekey\"",
        "source = \"aws-kms\"\nkms_key_id = \"alias/rekey\"\npath = \"keyring.json\"",
    ] {
        let job = job_with(&dir, &db, GOOD);
        std::fs::write(
            &job,
            std::fs::read_to_string(&job)
                .unwrap()
                .replace("source = \"env\"", keys),
        )
        .unwrap();
        assert_refused(
            &db,
            &job,
            &[],
            "needs AWS support, and this rekey was built without it",
        )
        .await;
        let out = rekey(&["secrets", "show", "--job", &job], &[]);
        assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    }
}

// Before: every `job.toml` was job "job", so `status`, `stop` and `--restart`
// of one acted on another folder's job.
#[tokio::test(flavor = "multi_thread")]
async fn two_job_files_named_alike_in_different_folders_are_kept_apart() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    db.client
        .batch_execute("CREATE TABLE other_secrets AS SELECT id, phone_encrypted AS secret FROM patient_persons; ALTER TABLE other_secrets ADD PRIMARY KEY (id)")
        .await
        .unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let job_a = a.path().join("job.toml");
    std::fs::rename(db.patients_job(&a), &job_a).unwrap();
    let text = std::fs::read_to_string(&job_a).unwrap();
    let job_b = b.path().join("job.toml");
    std::fs::write(
        &job_b,
        text.replace("patient_persons", "other_secrets").replace(
            "[\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]",
            "[\"secret\"]",
        ),
    )
    .unwrap();
    let (ja, jb) = (job_a.display().to_string(), job_b.display().to_string());
    let out = rekey(&["run", "--job", &ja], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    for args in [
        vec!["status", "--job", jb.as_str()],
        vec!["stop", "--job", jb.as_str()],
        vec!["run", "--job", jb.as_str(), "--restart"],
    ] {
        let out = rekey(&args, &seed_env());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", printed(&out));
        assert!(
            stderr(&out).contains("give this file its own name"),
            "{args:?}: {}",
            printed(&out)
        );
    }
    // the same file, again: its own job
    let out = rekey(&["status", "--job", &ja], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    // named, the second file is a job of its own
    std::fs::write(
        &job_b,
        format!(
            "name = \"other\"\n{}",
            std::fs::read_to_string(&job_b).unwrap()
        ),
    )
    .unwrap();
    let out = rekey(&["run", "--job", &jb], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

// Before: "ENCRYPTION_CURRENT_VERSION is not set": values could not be counted
// per key version before choosing the target.
#[tokio::test(flavor = "multi_thread")]
async fn plan_counts_values_per_key_version_before_a_target_is_chosen() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let env = vec![
        ("ENCRYPTION_KEY_V1", K1.to_string()),
        ("ENCRYPTION_KEY_V2", K2.to_string()),
    ];
    let out = rekey(&["plan", "--job", &j, "--json"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let v = json(&out);
    assert_eq!(v["target_chosen"], false, "{v}");
    assert!(v["values_to_rewrite"].is_null(), "{v}");
    let counted: u64 = v["columns"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| {
            c["by_key"]
                .as_object()
                .unwrap()
                .values()
                .map(|n| n.as_u64().unwrap())
        })
        .sum();
    assert_eq!(counted, values_in(300) as u64, "{v}");
    let out = rekey(&["plan", "--job", &j], &env);
    assert!(
        printed(&out).contains("no target key chosen yet"),
        "{}",
        printed(&out)
    );
}
