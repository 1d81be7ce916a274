//! AWS Secrets Manager as the key store, against moto's server on loopback:
//! versions moved through AWSPENDING -> AWSCURRENT -> AWSPREVIOUS.
#![cfg(feature = "aws")]

use std::process::Command;

use crate::harness::*;

/// Labels per version, oldest first, read with boto3 (an independent client).
fn labels(secret: &str) -> Vec<Vec<String>> {
    let script = r#"
import boto3, json, sys
c = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
vs = c.list_secret_version_ids(SecretId=sys.argv[2], IncludeDeprecated=True)["Versions"]
vs.sort(key=lambda v: v["CreatedDate"])
print(json.dumps([sorted(v.get("VersionStages", [])) for v in vs]))
"#;
    serde_json::from_str(&boto3(script, &[secret])).unwrap()
}

/// Runs `script` (Python, boto3 on moto) with moto's endpoint and then
/// `args` as its arguments; its stdout. Fails the test where it fails.
pub fn boto3(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&moto().endpoint)
        .args(args)
        .envs(aws_env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn aws_job(db: &TestDb, dir: &tempfile::TempDir, secret: &str) -> String {
    let job = dir.path().join("patients.toml");
    std::fs::write(
        &job,
        format!(
            "[database]\nurl = \"{}\"\n[keys]\nsource = \"aws-secrets-manager\"\nsecret_id = \"{secret}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\n[[target]]\ntable = \"patient_persons\"\ncolumns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]\nformat = \"versioned-gcm\"\n",
            db.url,
            moto().endpoint
        ),
    )
    .unwrap();
    job.display().to_string()
}

fn env_with(extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut e = aws_env();
    e.extend_from_slice(extra);
    e
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_rotation_moves_versions_through_the_staging_labels() {
    let db = TestDb::new().await;
    db.seed_patients(5_000).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = format!("rekey-test/full-{}", std::process::id());
    let job = aws_job(&db, &dir, &secret);
    let import = env_with(&[
        ("ENCRYPTION_KEY_V1", K1.into()),
        ("ENCRYPTION_CURRENT_VERSION", "1".into()),
    ]);
    let out = rekey(
        &[
            "secrets",
            "init",
            "--job",
            &job,
            "--import-env",
            "ENCRYPTION",
        ],
        &import,
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(labels(&secret), vec![s(&["AWSCURRENT"])]);

    // createSecret
    let out = rekey(&["secrets", "stage", "--job", &job], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        labels(&secret),
        vec![s(&["AWSCURRENT"]), s(&["AWSPENDING"])]
    );
    // idempotent
    assert_eq!(
        rekey(&["secrets", "stage", "--job", &job], &aws_env())
            .status
            .code(),
        Some(0)
    );
    assert_eq!(labels(&secret).len(), 2);

    // testSecret (run + verify) and finishSecret
    let out = rekey(
        &["rotate", "--job", &job, "--json", "--no-wait"],
        &aws_env(),
    );
    assert_eq!(
        (out.status.code(), json(&out)["step"].as_str()),
        (Some(6), Some("promoted")),
        "{}",
        printed(&out)
    );
    assert_eq!(
        labels(&secret),
        vec![s(&["AWSPREVIOUS"]), s(&["AWSCURRENT"])]
    );
    let show = json(&rekey(
        &["secrets", "show", "--job", &job, "--json"],
        &aws_env(),
    ));
    assert_eq!(
        (
            show["keys"][0]["state"].as_str(),
            show["keys"][1]["state"].as_str()
        ),
        (Some("previous"), Some("current")),
        "{show}"
    );

    pretend_grace_passed(&db).await;
    let out = rekey(&["rotate", "--job", &job, "--json"], &aws_env());
    assert_eq!(
        (out.status.code(), json(&out)["step"].as_str()),
        (Some(0), Some("retired")),
        "{}",
        printed(&out)
    );
    assert_eq!(
        labels(&secret),
        vec![s(&[]), s(&["AWSPREVIOUS"]), s(&["AWSCURRENT"])]
    );
    let show = json(&rekey(
        &["secrets", "show", "--job", &job, "--json"],
        &aws_env(),
    ));
    assert_eq!(show["keys"][0]["state"], "retired");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_killed_before_promote_resumes_and_rollback_restores_the_previous_current() {
    let db = TestDb::new().await;
    db.seed_patients(30_000).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = format!("rekey-test/resume-{}", std::process::id());
    let job = aws_job(&db, &dir, &secret);
    let import = env_with(&[
        ("ENCRYPTION_KEY_V1", K1.into()),
        ("ENCRYPTION_CURRENT_VERSION", "1".into()),
    ]);
    assert_eq!(
        rekey(
            &[
                "secrets",
                "init",
                "--job",
                &job,
                "--import-env",
                "ENCRYPTION"
            ],
            &import
        )
        .status
        .code(),
        Some(0)
    );

    let args = [
        "rotate",
        "--job",
        job.as_str(),
        "--json",
        "--no-wait",
        "--batch-size",
        "200",
    ];
    let mut child = spawn_rekey(&args, &aws_env());
    wait_for_progress(&db, &mut child, 5_000 + 1).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        labels(&secret),
        vec![s(&["AWSCURRENT"]), s(&["AWSPENDING"])],
        "killed between stage and promote"
    );

    let out = rekey(&args, &aws_env());
    assert_eq!(
        (out.status.code(), json(&out)["step"].as_str()),
        (Some(6), Some("promoted")),
        "{}",
        printed(&out)
    );
    assert_eq!(
        labels(&secret),
        vec![s(&["AWSPREVIOUS"]), s(&["AWSCURRENT"])]
    );

    let out = rekey(
        &[
            "secrets",
            "rollback",
            "--job",
            &job,
            "--reason",
            "emergency",
        ],
        &aws_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let show = json(&rekey(
        &["secrets", "show", "--job", &job, "--json"],
        &aws_env(),
    ));
    assert_eq!(
        (
            show["keys"][0]["state"].as_str(),
            show["keys"][1]["state"].as_str()
        ),
        (Some("current"), Some("previous")),
        "{show}"
    );
    assert_eq!(labels(&secret).last().unwrap(), &s(&["AWSCURRENT"]));

    // retire refused while values are still under the key being retired (key 2 now)
    let out = rekey(&["secrets", "retire", "--job", &job], &aws_env());
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
}

/// A KMS master key made on the moto server with boto3.
pub fn kms_master_key() -> String {
    let script = r#"
import boto3, sys
c = boto3.client("kms", endpoint_url=sys.argv[1], region_name="us-east-1")
print(c.create_key(Description="rekey test master key")["KeyMetadata"]["KeyId"])
"#;
    boto3(script, &[]).trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn kms_wrapped_data_keys_rotate_and_only_wrapped_keys_are_stored() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    let master = kms_master_key();
    let keyring = dir.path().join("keyring.json");
    let job = dir.path().join("patients.toml");
    std::fs::write(
        &job,
        format!(
            "[database]\nurl = \"{}\"\n[keys]\nsource = \"aws-kms\"\nkms_key_id = \"{master}\"\npath = {:?}\nendpoint = \"{}\"\nregion = \"us-east-1\"\n[[target]]\ntable = \"patient_persons\"\ncolumns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]\nformat = \"versioned-gcm\"\n",
            db.url,
            keyring.display().to_string(),
            moto().endpoint
        ),
    )
    .unwrap();
    let j = job.display().to_string();
    let import = env_with(&[
        ("ENCRYPTION_KEY_V1", K1.into()),
        ("ENCRYPTION_CURRENT_VERSION", "1".into()),
    ]);
    let out = rekey(
        &["secrets", "init", "--job", &j, "--import-env", "ENCRYPTION"],
        &import,
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    let out = rekey(&["rotate", "--job", &j, "--json", "--no-wait"], &aws_env());
    assert_eq!(
        (out.status.code(), json(&out)["step"].as_str()),
        (Some(6), Some("promoted")),
        "{}",
        printed(&out)
    );
    let show = json(&rekey(
        &["secrets", "show", "--job", &j, "--json"],
        &aws_env(),
    ));
    assert_eq!(
        (
            show["keys"][0]["state"].as_str(),
            show["keys"][1]["state"].as_str()
        ),
        (Some("previous"), Some("current")),
        "{show}"
    );

    let text = std::fs::read_to_string(&keyring).unwrap();
    let k1_b64 = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        hex::decode(K1).unwrap(),
    );
    assert!(
        !text.contains(K1) && !text.contains(&k1_b64),
        "an unwrapped key in the keyring file"
    );
    let verify = rekey(&["verify", "--job", &j, "--full", "--json"], &aws_env());
    assert_eq!(verify.status.code(), Some(0), "{}", printed(&verify));
    assert_eq!(json(&verify)["by_key"]["v2"], 3_000 + 2_000);
}
