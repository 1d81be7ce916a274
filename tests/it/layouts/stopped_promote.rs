//! A promote in the value layout stopped after it made the new key the
//! secret's current value and before it took the key away from where the
//! deployment reads `ENCRYPTION_KEY_NEW`: the promote run again finishes it,
//! so the store ends in the layout the policy describes.

use crate::harness::*;

use super::apps::*;

/// Puts the pending key's value as the secret's new AWSCURRENT version (the
/// promote's first call) and stops, as a kill right after it would.
const PY_PROMOTE_FIRST_CALL_ONLY: &str = r#"
import boto3, sys
c = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
if sys.argv[3] == "-":
    vs = c.list_secret_version_ids(SecretId=sys.argv[2])["Versions"]
    pending = [v["VersionId"] for v in vs if "AWSPENDING" in v.get("VersionStages", [])][0]
    current = [v["VersionId"] for v in vs if "AWSCURRENT" in v.get("VersionStages", [])][0]
    c.update_secret_version_stage(SecretId=sys.argv[2], VersionStage="AWSCURRENT",
                                  MoveToVersionId=pending, RemoveFromVersionId=current)
else:
    new = c.get_secret_value(SecretId=sys.argv[3])["SecretString"]
    c.put_secret_value(SecretId=sys.argv[2], SecretString=new)
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_promote_stopped_before_it_deleted_the_pending_secret_deletes_it_when_run_again() {
    promote_stopped_part_way(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_promote_stopped_before_it_took_the_awspending_label_off_takes_it_off_when_run_again() {
    promote_stopped_part_way(false).await;
}

async fn promote_stopped_part_way(second_secret: bool) {
    let db = TestDb::new().await;
    let secret = format!(
        "/healthprep/prod/stopped-promote-{}-{second_secret}",
        std::process::id()
    );
    let (pending, pending_keys) = if second_secret {
        let p = format!("{secret}-new");
        (p.clone(), format!("\npending_secret_id = \"{p}\""))
    } else {
        ("-".to_string(), String::new())
    };
    py(PY_CREATE, &[&secret], &urlsafe(K1));
    fernet_table(&db, 30).await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        &db,
        &dir,
        &format!("secret_id = \"{secret}\"\nlayout = \"value\"{pending_keys}"),
        "[[target]]\ntable = \"patients\"\ncolumns = [\"ssn\"]\nformat = \"fernet\"\n",
    );
    for step in [
        &["secrets", "init", "--adopt", "--job", &job][..],
        &["secrets", "stage", "--job", &job],
        &["run", "--job", &job],
    ] {
        let out = rekey(step, &aws_env());
        assert_eq!(out.status.code(), Some(0), "{step:?}: {}", printed(&out));
    }
    let staged = rekey(&["secrets", "show", "--job", &job, "--json"], &aws_env());
    let staged_keys = json(&staged)["keys"].to_string();
    py(PY_PROMOTE_FIRST_CALL_ONLY, &[&secret, &pending], "");
    assert_eq!(
        py(PY_PENDING, &[&secret, &pending], "").trim(),
        "left",
        "the stopped promote left the new key's place: {staged_keys}"
    );

    let out = rekey(&["secrets", "promote", "--job", &job, "--json"], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        py(PY_PENDING, &[&secret, &pending], "").trim(),
        "gone",
        "ENCRYPTION_KEY_NEW is still there after the promote ran again: {}",
        printed(&out)
    );
    let promoted = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|f| f.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".audit.jsonl"))
        .flat_map(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            text.lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .filter(|e| e["event_type"] == "key_promoted")
        .count();
    assert_eq!(
        promoted,
        1,
        "the promote finished here is recorded once: {}",
        printed(&out)
    );
    let show = json(&rekey(
        &["secrets", "show", "--job", &job, "--json"],
        &aws_env(),
    ));
    let current = show["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["state"] == "current")
        .map(|k| k["id"].clone());
    assert_eq!(current, Some(2.into()), "{show}");
}
