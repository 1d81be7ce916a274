//! A compromise retire in the layouts that keep only the current key in the
//! secret's content (`value`): the old key lives on in former versions
//! (AWSPREVIOUS), and those must lose it too.

use crate::harness::*;

use super::apps::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_compromise_retire_of_a_plain_value_secret_leaves_no_version_holding_the_old_key() {
    let db = TestDb::new().await;
    let secret = format!("/healthprep/prod/compromised-value-{}", std::process::id());
    py(PY_CREATE, &[&secret], &urlsafe(K1));
    let lines = fernet_table(&db, 40).await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        &db,
        &dir,
        &format!("secret_id = \"{secret}\"\nlayout = \"value\""),
        "[[target]]\ntable = \"patients\"\ncolumns = [\"ssn\"]\nformat = \"fernet\"\n",
    );
    let out = rekey(
        &["rotate", "--job", &job, "--json", "--no-wait"],
        &aws_env(),
    );
    assert_eq!(json(&out)["step"], "promoted", "{}", printed(&out));
    let before = py(PY_ALL_VERSIONS, &[&secret], "");
    assert!(
        before.contains(&urlsafe(K1)),
        "the old key is not in a former version to begin with: {before}"
    );

    let out = rekey(
        &[
            "secrets",
            "retire",
            "--job",
            &job,
            "--reason",
            "compromise",
            "--json",
        ],
        &aws_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let versions = py(PY_ALL_VERSIONS, &[&secret], "");
    assert!(!versions.trim().is_empty());
    assert!(
        !versions.contains(&urlsafe(K1)) && !versions.contains(K1),
        "a version still holds the compromised key: {versions}"
    );
    let show = json(&rekey(
        &["secrets", "show", "--job", &job, "--json"],
        &aws_env(),
    ));
    let old = show["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == 1)
        .unwrap()
        .clone();
    assert_eq!(old["compromised"], true, "{show}");
    // the application, with the new key alone, still reads every value
    let lines_after = fernet_lines(&db).await;
    assert_eq!(lines_after.len(), lines.len());
    check_app(
        &healthprep_app(),
        &[&secret, "-"],
        &lines_after,
        "after the compromise retire",
    );
}

/// "yes" when secret argv 2 exists (even scheduled for deletion: no), else "no".
const PY_EXISTS: &str = r#"
import boto3, sys
c = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
try:
    c.get_secret_value(SecretId=sys.argv[2])
    print("yes")
except Exception:
    print("no")
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_purge_stopped_between_delete_and_create_is_undone_from_its_backup() {
    let db = TestDb::new().await;
    let secret = format!("/healthprep/prod/purge-crash-{}", std::process::id());
    let backup = format!("{secret}.rekey-purge-backup");
    // what a purge killed after its delete leaves: the backup, no secret
    py(PY_CREATE, &[&backup], &urlsafe(K1));
    assert_eq!(py(PY_EXISTS, &[&secret], "").trim(), "no");
    let dir = tempfile::tempdir().unwrap();
    let _ = fernet_table(&db, 5).await;
    let job = job_file(
        &db,
        &dir,
        &format!("secret_id = \"{secret}\"\nlayout = \"value\""),
        "[[target]]\ntable = \"patients\"\ncolumns = [\"ssn\"]\nformat = \"fernet\"\n",
    );
    let out = rekey(&["secrets", "show", "--job", &job, "--json"], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        py(PY_RAW, &[&secret], ""),
        urlsafe(K1),
        "the secret was not put back"
    );
    assert_eq!(
        py(PY_EXISTS, &[&backup], "").trim(),
        "no",
        "the backup stayed"
    );
}

// Before: after promotion the old key lived only in AWSPREVIOUS, which run and
// verify never read: a value written late under it could not be rewritten,
// and the retire refused for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_value_written_late_under_the_old_key_is_rewritten_from_its_former_version() {
    let db = TestDb::new().await;
    let secret = format!("/healthprep/prod/late-value-{}", std::process::id());
    py(PY_CREATE, &[&secret], &urlsafe(K1));
    let _ = fernet_table(&db, 20).await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        &db,
        &dir,
        &format!("secret_id = \"{secret}\"\nlayout = \"value\""),
        "[[target]]\ntable = \"patients\"\ncolumns = [\"ssn\"]\nformat = \"fernet\"\n",
    );
    let out = rekey(
        &["rotate", "--job", &job, "--json", "--no-wait"],
        &aws_env(),
    );
    assert_eq!(json(&out)["step"], "promoted", "{}", printed(&out));
    // an application instance not yet redeployed writes under key 1
    let script = "import sys\nfrom cryptography.fernet import Fernet\nprint(Fernet(sys.argv[2]).encrypt(b'ssn-1000').decode())\n";
    let token = py(script, &[&urlsafe(K1)], "");
    db.client
        .execute("INSERT INTO patients VALUES (1000, $1)", &[&token.trim()])
        .await
        .unwrap();

    let out = rekey(&["run", "--job", &job, "--json"], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["values_rewritten"], 1, "{}", printed(&out));
    let out = rekey(
        &["rotate", "--job", &job, "--json", "--grace", "0s"],
        &aws_env(),
    );
    assert_eq!(
        (out.status.code(), json(&out)["step"].as_str()),
        (Some(0), Some("retired")),
        "{}",
        printed(&out)
    );
    check_app(
        &healthprep_app(),
        &[&secret, "-"],
        &fernet_lines(&db).await,
        "after the late value was rewritten",
    );
}
