//! The seeds' own secret layouts on Secrets Manager (moto on loopback) and
//! real PostgreSQL: healthprep's plain Fernet key with `ENCRYPTION_KEY_NEW`
//! in a second secret, the quarterly procedure's flat environment JSON. Each
//! seed's application logic runs unchanged against the secret, as its
//! deployment fills it in, and must decrypt every value at every step of a
//! rotation, a kill -9 in the middle included.
#![cfg(feature = "aws")]
mod apps;
mod compromise;
mod errors;
mod rollback;
mod stopped_promote;

use std::process::Command;

use base64::Engine as _;
use rekey::crypto::keyring::Key;

use crate::harness::*;
use apps::*;

#[tokio::test(flavor = "multi_thread")]
async fn healthprep_plain_fernet_key_with_the_new_key_in_a_second_secret_rotates_without_one_failed_decrypt(
) {
    healthprep(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn healthprep_plain_fernet_key_with_the_new_key_as_awspending_rotates_without_one_failed_decrypt(
) {
    healthprep(false).await;
}

/// healthprep's dual-key procedure, `ENCRYPTION_KEY_NEW` read from a second
/// secret (`second_secret`) or from the AWSPENDING version of the first.
async fn healthprep(second_secret: bool) {
    let db = TestDb::new().await;
    let secret = format!(
        "/healthprep/prod/encryption-key-{}-{second_secret}",
        std::process::id()
    );
    let pending = if second_secret {
        format!("{secret}-new")
    } else {
        "-".into()
    };
    let pending_keys = if second_secret {
        format!("\npending_secret_id = \"{pending}\"")
    } else {
        String::new()
    };
    py(PY_CREATE, &[&secret], &urlsafe(K1));
    let mut lines = fernet_table(&db, 300).await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        &db,
        &dir,
        &format!("secret_id = \"{secret}\"\nlayout = \"value\"{pending_keys}"),
        "[[target]]\ntable = \"patients\"\ncolumns = [\"ssn\"]\nformat = \"fernet\"\n",
    );
    let app = healthprep_app();
    let out = rekey(&["secrets", "init", "--adopt", "--job", &job], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        printed(&out).contains("keys in fernet") && printed(&out).contains("nothing was written"),
        "{}",
        printed(&out)
    );
    let show = json(&rekey(
        &["secrets", "show", "--job", &job, "--json"],
        &aws_env(),
    ));
    assert!(
        show["keys"][0]["age_s"].as_u64().is_some_and(|a| a < 3600),
        "the secret version's date: {show}"
    );

    let args = [secret.as_str(), pending.as_str()];
    check_app(&app, &args, &lines, "before the rotation");
    kill_mid_run(&db, &job, 150, "patients", &mut |when| {
        let now = lines_now(&db);
        check_app(&app, &args, &now, when);
    })
    .await;
    drive(&job, &mut |when| {
        check_app(&app, &args, &lines_now(&db), when)
    });
    lines = fernet_lines(&db).await;
    check_app(&app, &args, &lines, "after the rotation");
    let current = py(PY_RAW, &[&secret], "");
    assert_ne!(current, urlsafe(K1));
    assert!(
        current.len() == 44 && Key::parse(1, &current).is_ok(),
        "a Fernet key, as Fernet.generate_key() writes"
    );
    // ENCRYPTION_KEY_NEW is deleted at promotion, as the policy says
    let new_gone = Command::new("python3")
        .arg("-c")
        .arg(PY_PENDING)
        .arg(&moto().endpoint)
        .arg(&secret)
        .arg(&pending)
        .envs(aws_env())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&new_gone.stdout).trim(),
        "gone",
        "{}",
        String::from_utf8_lossy(&new_gone.stderr)
    );
    // The rotated values open with ENCRYPTION_KEY alone.
    let only_key = "import sys\nfrom cryptography.fernet import Fernet\nf = Fernet(sys.argv[2])\nprint(sum(1 for l in sys.stdin.read().splitlines() if f.decrypt(l.split('\\t')[1].encode()).decode() == l.split('\\t')[0]))\n";
    assert_eq!(py(only_key, &[&current], &lines.join("\n")).trim(), "300");
}

/// The quarterly procedure's flat environment secret, with members a
/// careless re-serialisation would change.
pub fn quarterly_secret() -> String {
    format!(
        "{{\"DATABASE_URL\" :\"postgres://app@db.internal/app\",\n  \"ENCRYPTION_KEY_V1\": \"{K1}\", \"RATIO\": 1.0e3,\t\"NAME\": \"caf\\u00e9 \\\"q\\\"\",\n  \"ENCRYPTION_CURRENT_VERSION\": \"1\", \"NESTED\": {{\"a\": [1, {{\"b\": \"}}\"}}]}}, \"SENTRY_DSN\":\"https://k@sentry.io/1\",\"LAST\":null }}"
    )
}

pub const UNRELATED: [&str; 6] = [
    "\"DATABASE_URL\" :\"postgres://app@db.internal/app\"",
    "\"RATIO\": 1.0e3",
    "\"NAME\": \"caf\\u00e9 \\\"q\\\"\"",
    "\"NESTED\": {\"a\": [1, {\"b\": \"}\"}]}",
    "\"SENTRY_DSN\":\"https://k@sentry.io/1\"",
    "\"LAST\":null",
];

#[tokio::test(flavor = "multi_thread")]
async fn quarterly_env_json_secret_rotates_versioned_gcm_and_keeps_every_other_field_byte_for_byte()
{
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let secret = format!("restartix/prod/env-{}", std::process::id());
    py(PY_CREATE, &[&secret], &quarterly_secret());
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        &db,
        &dir,
        &format!("secret_id = \"{secret}\"\nlayout = \"env-json\""),
        "[[target]]\ntable = \"patient_persons\"\ncolumns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]\nformat = \"versioned-gcm\"\n",
    );
    let out = rekey(&["secrets", "init", "--adopt", "--job", &job], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        printed(&out).contains("versioned convention") && printed(&out).contains("keys in hex"),
        "{}",
        printed(&out)
    );
    let show = json(&rekey(
        &["secrets", "show", "--job", &job, "--json"],
        &aws_env(),
    ));
    assert_eq!(
        (
            show["keys"][0]["created_at"].as_str(),
            show["keys"][0]["age_s"].is_null()
        ),
        (Some("unknown"), true),
        "{show}"
    );

    let args = [secret.as_str()];
    check_app(
        QUARTERLY_APP,
        &args,
        &gcm_lines(&db).await,
        "before the rotation",
    );
    kill_mid_run(&db, &job, 150, "patient_persons", &mut |when| {
        check_app(QUARTERLY_APP, &args, &lines_now(&db), when);
    })
    .await;
    drive(&job, &mut |when| {
        check_app(QUARTERLY_APP, &args, &lines_now(&db), when);
        let raw = py(PY_RAW, &args, "");
        for member in UNRELATED {
            assert!(raw.contains(member), "{member} changed {when}: {raw}");
        }
    });
    let raw = py(PY_RAW, &args, "");
    let env: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(env["ENCRYPTION_CURRENT_VERSION"], "2", "{raw}");
    assert!(
        env.get("ENCRYPTION_KEY_V1").is_none() && env.get("ENCRYPTION_PENDING_VERSION").is_none(),
        "{raw}"
    );
    assert_eq!(
        env["ENCRYPTION_KEY_V2"].as_str().map(str::len),
        Some(64),
        "hex, as the keys already there"
    );
    assert!(raw.starts_with("{\"DATABASE_URL\" :"), "order kept: {raw}");
    let stale: i64 = db
        .client
        .query_one("SELECT count(*) FROM patient_persons WHERE get_byte(phone_encrypted, 0) <> 2 OR get_byte(emergency_contact_phone_encrypted, 0) <> 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stale, 0, "every value under key 2");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compromised_key_leaves_no_version_of_the_secret_holding_its_material() {
    let db = TestDb::new().await;
    db.seed_patients(60).await;
    let secret = format!("restartix/prod/compromised-{}", std::process::id());
    py(PY_CREATE, &[&secret], &quarterly_secret());
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        &db,
        &dir,
        &format!("secret_id = \"{secret}\"\nlayout = \"env-json\""),
        "[[target]]\ntable = \"patient_persons\"\ncolumns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]\nformat = \"versioned-gcm\"\n",
    );
    // to promotion: every value on the new key
    for _ in 0..6 {
        let out = rekey(
            &["rotate", "--job", &job, "--json", "--no-wait"],
            &aws_env(),
        );
        let out = if out.status.code() == Some(2) {
            rekey(&["rotate", "--job", &job, "--json"], &aws_env())
        } else {
            out
        };
        if json(&out)["step"] == "promoted" {
            break;
        }
    }
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
    let material = hex::decode(K1).unwrap();
    let encodings = [
        K1.to_string(),
        K1.to_uppercase(),
        base64::engine::general_purpose::STANDARD.encode(&material),
        base64::engine::general_purpose::URL_SAFE.encode(&material),
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(&material),
    ];
    let versions = py(PY_ALL_VERSIONS, &[&secret], "");
    assert!(!versions.trim().is_empty());
    for v in versions.lines() {
        for e in &encodings {
            assert!(
                !v.contains(e.as_str()),
                "a version still holds the compromised key: {v}"
            );
        }
    }
    let raw = py(PY_RAW, &[&secret], "");
    for member in UNRELATED {
        assert!(
            raw.contains(member),
            "{member} lost in the recreated secret: {raw}"
        );
    }
    check_app(
        QUARTERLY_APP,
        &[&secret],
        &gcm_lines(&db).await,
        "after the compromised key was destroyed",
    );
    let show = json(&rekey(
        &["secrets", "show", "--job", &job, "--json"],
        &aws_env(),
    ));
    assert_eq!(show["keys"][0]["state"], "retired", "{show}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dual_convention_in_an_env_json_secret_rotates_fernet_with_the_healthprep_class() {
    dual_env_json(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dual_convention_in_an_env_json_secret_rotates_versioned_gcm() {
    dual_env_json(false).await;
}

/// `ENCRYPTION_KEY` + `ENCRYPTION_KEY_NEW` in a flat JSON secret beside other
/// variables: stage adds NEW, promote copies it into `ENCRYPTION_KEY` and
/// removes it; ids stay stable across processes (the GCM version byte).
async fn dual_env_json(fernet: bool) {
    let db = TestDb::new().await;
    let secret = format!("healthprep/env-{}-{fernet}", std::process::id());
    let (key, target, table) = if fernet {
        fernet_table(&db, 300).await;
        (
            urlsafe(K1),
            "[[target]]\ntable = \"patients\"\ncolumns = [\"ssn\"]\nformat = \"fernet\"\n",
            "patients",
        )
    } else {
        db.seed_patients(300).await;
        (K1.to_string(), "[[target]]\ntable = \"patient_persons\"\ncolumns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]\nformat = \"versioned-gcm\"\n", "patient_persons")
    };
    let raw = format!("{{\"APP_NAME\": \"healthprep\",\n \"ENCRYPTION_KEY\": \"{key}\", \"DEBUG\": false, \"PORT\": 8080}}");
    py(PY_CREATE, &[&secret], &raw);
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        &db,
        &dir,
        &format!("secret_id = \"{secret}\"\nlayout = \"env-json\""),
        target,
    );
    let out = rekey(&["secrets", "init", "--adopt", "--job", &job], &aws_env());
    assert!(
        printed(&out).contains("dual convention"),
        "{}",
        printed(&out)
    );
    let app = if fernet {
        healthprep_app()
    } else {
        DUAL_GCM_APP.to_string()
    };
    let args = [secret.as_str(), "json"];
    let check = |when: &str| {
        check_app(&app, &args, &lines_now(&db), when);
        let raw = py(PY_RAW, &[&secret], "");
        for member in [
            "{\"APP_NAME\": \"healthprep\",\n ",
            "\"DEBUG\": false",
            "\"PORT\": 8080",
        ] {
            assert!(raw.contains(member), "{member} changed {when}: {raw}");
        }
    };
    check("before the rotation");
    kill_mid_run(&db, &job, 150, table, &mut |when| check(when)).await;
    drive(&job, &mut |when| check(when));
    let env: serde_json::Value = serde_json::from_str(&py(PY_RAW, &[&secret], "")).unwrap();
    assert!(
        env.get("ENCRYPTION_KEY_NEW").is_none(),
        "NEW removed at promotion: {env}"
    );
    assert_ne!(env["ENCRYPTION_KEY"].as_str(), Some(key.as_str()), "{env}");
    let show = json(&rekey(
        &["secrets", "show", "--job", &job, "--json"],
        &aws_env(),
    ));
    assert_eq!(
        (
            show["keys"][1]["id"].as_u64(),
            show["keys"][1]["state"].as_str()
        ),
        (Some(2), Some("current")),
        "{show}"
    );
    if !fernet {
        let stale: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM patient_persons WHERE get_byte(phone_encrypted, 0) <> 2",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(stale, 0, "every value under key 2, the id NEW had");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn purging_a_retired_key_of_a_rekey_keyring_secret_removes_it_from_every_version() {
    let db = TestDb::new().await;
    db.seed_patients(60).await;
    let secret = format!("rekey-test/purge-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        &db,
        &dir,
        &format!("secret_id = \"{secret}\""),
        "[[target]]\ntable = \"patient_persons\"\ncolumns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]\nformat = \"versioned-gcm\"\n",
    );
    let mut import = aws_env();
    import.extend([
        ("ENCRYPTION_KEY_V1", K1.to_string()),
        ("ENCRYPTION_CURRENT_VERSION", "1".to_string()),
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
    drive(&job, &mut |_| {});
    assert!(
        py(PY_ALL_VERSIONS, &[&secret], "").contains(K1),
        "retired, archived in a former version"
    );
    let out = rekey(
        &["secrets", "purge", "--job", &job, "--key-id", "1"],
        &aws_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let versions = py(PY_ALL_VERSIONS, &[&secret], "");
    assert!(
        !versions.trim().is_empty() && !versions.contains(K1),
        "{versions}"
    );
    let out = rekey(
        &["secrets", "restore", "--job", &job, "--key-id", "1"],
        &aws_env(),
    );
    assert_ne!(out.status.code(), Some(0), "purged: {}", printed(&out));
}
