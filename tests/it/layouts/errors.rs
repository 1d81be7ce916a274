//! Secrets of another layout, or none, explained in one sentence naming the
//! secret and the fix; the env store's dual convention walked by hand.

use super::apps::*;
use super::quarterly_secret;
use crate::harness::*;

fn rekey_layout_job(db: &TestDb, dir: &tempfile::TempDir, secret: &str, layout: &str) -> String {
    job_file(
        db,
        dir,
        &format!("secret_id = \"{secret}\"\nlayout = \"{layout}\""),
        "[[target]]\ntable = \"patient_persons\"\ncolumns = [\"phone_encrypted\"]\nformat = \"versioned-gcm\"\n",
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_of_another_layout_or_none_at_all_is_explained_in_one_sentence() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let id = std::process::id();
    let plain = format!("errors/plain-{id}");
    let env = format!("errors/env-{id}");
    py(PY_CREATE, &[&plain], &urlsafe(K1));
    py(PY_CREATE, &[&env], &quarterly_secret());
    let cases = [
        (
            plain.clone(),
            "rekey",
            "is a plain value, not a rekey keyring: set layout = \"value\"",
        ),
        (env.clone(), "rekey", "set layout = \"env-json\""),
        (
            env.clone(),
            "value",
            "holds a JSON object, not a plain key: set layout = \"env-json\"",
        ),
        (format!("errors/missing-{id}"), "rekey", "does not exist"),
    ];
    for (secret, layout, says) in cases {
        let job = rekey_layout_job(&db, &dir, &secret, layout);
        let out = rekey(&["secrets", "show", "--job", &job], &aws_env());
        let text = printed(&out);
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(
            text.contains(says) && text.contains(&secret),
            "{secret} as {layout}: {text}"
        );
        for dump in ["line 1 column", "ServiceError", "Exception(", "{ ", K1] {
            assert!(!text.contains(dump), "{dump} in: {text}");
        }
        assert!(!text.contains(&urlsafe(K1)), "key material in: {text}");
    }
    // init over an existing secret suggests --adopt, and writes nothing
    let job = rekey_layout_job(&db, &dir, &env, "env-json");
    let out = rekey(&["secrets", "init", "--job", &job], &aws_env());
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("already exists")
            && text.contains("--adopt")
            && !text.contains("ResourceExistsException("),
        "{text}"
    );
    assert_eq!(py(PY_RAW, &[&env], ""), quarterly_secret());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_env_store_walks_the_dual_convention_as_the_healthprep_policy_does() {
    let db = TestDb::new().await;
    // an empty table: nothing under the old key to keep the promotion back
    db.seed_patients(0).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let env = |pairs: &[(&'static str, String)]| pairs.to_vec();
    let out = rekey(
        &["secrets", "stage", "--job", &job],
        &env(&[("ENCRYPTION_KEY", urlsafe(K1))]),
    );
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("export ENCRYPTION_KEY_NEW=") && text.contains("--format base64"),
        "in the encoding of ENCRYPTION_KEY (base64 without urlsafe characters, in a GCM job): {text}"
    );
    let staged = env(&[
        ("ENCRYPTION_KEY", urlsafe(K1)),
        ("ENCRYPTION_KEY_NEW", urlsafe(K2)),
    ]);
    let out = rekey(&["secrets", "promote", "--job", &job], &staged);
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    for step in [
        "export ENCRYPTION_KEY=",
        "export ENCRYPTION_KEY_VERSION=2",
        "unset ENCRYPTION_KEY_NEW",
    ] {
        assert!(text.contains(step), "{step} in: {text}");
    }
    let promoted = env(&[
        ("ENCRYPTION_KEY", urlsafe(K2)),
        ("ENCRYPTION_KEY_VERSION", "2".into()),
    ]);
    let show = json(&rekey(
        &["secrets", "show", "--job", &job, "--json"],
        &promoted,
    ));
    assert_eq!(show["keys"][1]["state"], "current", "{show}");
    assert_eq!(show["keys"][1]["created_at"], "unknown", "{show}");
}

#[tokio::test(flavor = "multi_thread")]
async fn init_creates_a_secret_in_the_layout_the_application_reads() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = format!("init/value-{}", std::process::id());
    let job = rekey_layout_job(&db, &dir, &secret, "value");
    let out = rekey(&["secrets", "init", "--job", &job], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let raw = py(PY_RAW, &[&secret], "");
    assert!(
        raw.len() == 64 && raw.bytes().all(|b| b.is_ascii_hexdigit()),
        "the key itself, hex for a GCM job"
    );
    let show = json(&rekey(
        &["secrets", "show", "--job", &job, "--json"],
        &aws_env(),
    ));
    assert_eq!(
        (
            show["keys"][0]["id"].as_u64(),
            show["keys"][0]["state"].as_str()
        ),
        (Some(1), Some("current")),
        "{show}"
    );
    assert!(
        show["keys"][0]["age_s"].as_u64().is_some(),
        "created now: {show}"
    );
}

// Before: exit 0, "key 2 current", and the instructions to make
// ENCRYPTION_KEY the new key and unset ENCRYPTION_KEY_NEW: followed, the
// application (which reads only those two) could read none of the rows.
#[tokio::test(flavor = "multi_thread")]
async fn in_the_dual_convention_a_promote_is_refused_while_values_are_under_the_old_key() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let staged = [
        ("ENCRYPTION_KEY", urlsafe(K1)),
        ("ENCRYPTION_KEY_NEW", urlsafe(K2)),
    ];
    let out = rekey(&["secrets", "promote", "--job", &job], &staged);
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(
        text.contains(&format!("{} values are not under it", values_in(300)))
            && text.contains("rekey run")
            && !text.contains("export ENCRYPTION_KEY="),
        "{text}"
    );
    assert_eq!(
        audit_events(&dir).len(),
        0,
        "a refused promote records no promotion"
    );

    let out = rekey(&["run", "--job", &job], &staged);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = rekey(&["secrets", "promote", "--job", &job], &staged);
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("unset ENCRYPTION_KEY_NEW"), "{text}");
}

// Before: the full verify saw only the filtered rows, and the promotion
// left every other row under a key the application no longer reads.
#[tokio::test(flavor = "multi_thread")]
async fn in_the_dual_convention_a_promote_from_a_filtered_job_is_refused() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db
        .patients_job_where(&dir, "id <= 100")
        .display()
        .to_string();
    let staged = [
        ("ENCRYPTION_KEY", urlsafe(K1)),
        ("ENCRYPTION_KEY_NEW", urlsafe(K2)),
    ];
    let out = rekey(&["run", "--job", &job], &staged);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = rekey(&["secrets", "promote", "--job", &job], &staged);
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("`where` filter") && !text.contains("export ENCRYPTION_KEY="),
        "{text}"
    );
}

// Today: the promotion's instruction read `export ENCRYPTION_KEY=<a new key
// from rekey keygen ...>   # the value of ENCRYPTION_KEY_NEW` (followed, the
// applications got a key no value is under), and with ENCRYPTION_KEY moved
// but ENCRYPTION_KEY_VERSION not set, the next rotate asked again for the
// two changes already made and never named the one missing.
#[tokio::test(flavor = "multi_thread")]
async fn in_the_dual_convention_rotate_says_to_copy_the_new_key_and_names_the_version_still_missing(
) {
    let db = TestDb::new().await;
    db.seed_patients(30).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let rotate = ["rotate", "--job", job.as_str()];
    let out = rekey(&rotate, &[("ENCRYPTION_KEY", urlsafe(K1))]);
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    assert!(
        printed(&out).contains("export ENCRYPTION_KEY_NEW=<a new key from `rekey keygen"),
        "{}",
        printed(&out)
    );
    let staged = [
        ("ENCRYPTION_KEY", urlsafe(K1)),
        ("ENCRYPTION_KEY_NEW", urlsafe(K2)),
    ];
    let out = rekey(&rotate, &staged);
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(6), "{text}");
    let copy = text
        .lines()
        .find(|l| l.contains("export ENCRYPTION_KEY="))
        .unwrap_or_else(|| panic!("no promotion instruction: {text}"));
    assert_eq!(
        copy.trim(),
        "export ENCRYPTION_KEY=<the value of ENCRYPTION_KEY_NEW>",
        "{text}"
    );
    assert!(text.contains("export ENCRYPTION_KEY_VERSION=2"), "{text}");

    let moved_without_version = [("ENCRYPTION_KEY", urlsafe(K2))];
    let out = rekey(&rotate, &moved_without_version);
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(6), "{text}");
    assert!(
        text.contains("key 2 is not current") && text.contains("ENCRYPTION_KEY_VERSION=2"),
        "{text}"
    );

    let promoted = [
        ("ENCRYPTION_KEY", urlsafe(K2)),
        ("ENCRYPTION_KEY_VERSION", "2".to_string()),
    ];
    let out = rekey(&rotate, &promoted);
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(6), "{text}");
    assert!(
        !text.contains("is not current") && text.contains("grace period"),
        "{text}"
    );
}

// Today: `rotate --dry-run` of a filtered job under the dual convention
// said "would stage key 2" where the rotation refuses before staging.
#[tokio::test(flavor = "multi_thread")]
async fn in_the_dual_convention_a_dry_run_of_a_filtered_job_says_the_rotation_would_be_refused() {
    let db = TestDb::new().await;
    db.seed_patients(30).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db
        .patients_job_where(&dir, "id <= 10")
        .display()
        .to_string();
    let out = rekey(
        &["rotate", "--job", &job, "--dry-run"],
        &[("ENCRYPTION_KEY", urlsafe(K1))],
    );
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("`where` filter")
            && text.contains("whole tables")
            && !text.contains("would stage key"),
        "{text}"
    );
}

// Today: `rotate` staged the key and rewrote every filtered row, then
// refused the promotion for the filter (exit 2, "nothing was touched",
// after it had): knowable before anything was staged.
#[tokio::test(flavor = "multi_thread")]
async fn in_the_dual_convention_a_rotation_of_a_filtered_job_is_refused_before_it_stages_a_key() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db
        .patients_job_where(&dir, "id <= 100")
        .display()
        .to_string();
    let before = db
        .checksum(
            "(SELECT id, phone_encrypted, emergency_contact_phone_encrypted FROM patient_persons)",
        )
        .await;
    let out = rekey(
        &["rotate", "--job", &job],
        &[("ENCRYPTION_KEY", urlsafe(K1))],
    );
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("`where` filter")
            && text.contains("whole tables")
            && text.contains("Nothing was staged")
            && !text.contains("export ENCRYPTION_KEY_NEW"),
        "{text}"
    );
    let engine_state: bool = db
        .client
        .query_one("SELECT to_regclass('rekey.rotations') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    if engine_state {
        let rotations: i64 = db
            .client
            .query_one("SELECT count(*) FROM rekey.rotations", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(rotations, 0, "a rotation was recorded");
    }
    assert_eq!(
        db.checksum(
            "(SELECT id, phone_encrypted, emergency_contact_phone_encrypted FROM patient_persons)"
        )
        .await,
        before
    );
}
