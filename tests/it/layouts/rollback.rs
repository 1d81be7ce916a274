//! A rollback after the promotion, in the layouts whose applications read
//! the current key and the new one and keep no place for a previous key
//! (healthprep's plain value with `ENCRYPTION_KEY_NEW` in a second secret,
//! the dual convention in an environment JSON secret): making the old key
//! current again would leave every value, now under the new key, unreadable
//! to them. Refused, the secret unchanged, the applications reading every
//! value.

use super::apps::*;
use crate::harness::*;

// Today: `rekey secrets rollback` after a promotion printed "key 1
// current" and exited 0; the seed's `DualKeyEncryption` then read 0 of the
// 300 values, and key 2 was left only in the secret's AWSPREVIOUS version.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_promotion_a_rollback_of_a_plain_value_secret_is_refused_and_every_value_stays_readable(
) {
    let db = TestDb::new().await;
    let secret = format!("/healthprep/prod/rollback-{}", std::process::id());
    let pending = format!("{secret}-new");
    py(PY_CREATE, &[&secret], &urlsafe(K1));
    fernet_table(&db, 300).await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        &db,
        &dir,
        &format!("secret_id = \"{secret}\"\nlayout = \"value\"\npending_secret_id = \"{pending}\""),
        "[[target]]\ntable = \"patients\"\ncolumns = [\"ssn\"]\nformat = \"fernet\"\n",
    );
    refused_after_promotion(&job, &secret, &healthprep_app(), &[&secret, &pending], &db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_promotion_a_rollback_of_the_dual_convention_in_an_env_json_secret_is_refused_and_every_value_stays_readable(
) {
    let db = TestDb::new().await;
    let secret = format!("healthprep/rollback-env-{}", std::process::id());
    db.seed_patients(300).await;
    py(
        PY_CREATE,
        &[&secret],
        &format!("{{\"ENCRYPTION_KEY\": \"{K1}\", \"OTHER\": \"x\"}}"),
    );
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        &db,
        &dir,
        &format!("secret_id = \"{secret}\"\nlayout = \"env-json\""),
        "[[target]]\ntable = \"patient_persons\"\ncolumns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]\nformat = \"versioned-gcm\"\n",
    );
    refused_after_promotion(&job, &secret, DUAL_GCM_APP, &[&secret, "json"], &db).await;
}

/// Adopts the secret, rotates to key 2 up to its promotion, then asks for
/// the rollback: refused (exit 2), the secret as the promotion left it, and
/// the application `app` (with `args`) reads every value.
async fn refused_after_promotion(job: &str, secret: &str, app: &str, args: &[&str], db: &TestDb) {
    let out = rekey(&["secrets", "init", "--adopt", "--job", job], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = rekey(&["rotate", "--job", job, "--no-wait", "--json"], &aws_env());
    assert_eq!(
        json(&out)["step"].as_str(),
        Some("promoted"),
        "{}",
        printed(&out)
    );
    let promoted = py(PY_RAW, &[secret], "");
    check_app(app, args, &lines_now(db), "after the promotion");

    let out = rekey(&["secrets", "rollback", "--job", job], &aws_env());
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("key 2") && text.contains("rekey rotate --new"),
        "{text}"
    );
    assert_eq!(py(PY_RAW, &[secret], ""), promoted, "the secret changed");
    check_app(app, args, &lines_now(db), "after the refused rollback");

    // and the abort's refusal does not send the operator to that rollback
    let out = rekey(&["rotate", "--job", job, "--abort"], &aws_env());
    let text = printed(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("rekey rotate --new") && !text.contains("secrets rollback"),
        "{text}"
    );
    assert_eq!(py(PY_RAW, &[secret], ""), promoted, "the secret changed");
}
