//! The seeds' own secret layouts on Secrets Manager (moto on loopback) and
//! real PostgreSQL: healthprep's plain Fernet key with `ENCRYPTION_KEY_NEW`
//! in a second secret, the quarterly procedure's flat environment JSON. Each
//! seed's application logic runs unchanged against the secret, as its
//! deployment fills it in, and must decrypt every value at every step of a
//! rotation, a kill -9 in the middle included.
#![cfg(feature = "aws")]

use std::process::Command;

use base64::Engine as _;

use crate::harness::*;

/// A Python script run with moto's credentials; stdout.
fn py(script: &str, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&moto().endpoint)
        .args(args)
        .envs(aws_env())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn urlsafe(hex_key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE.encode(hex::decode(hex_key).unwrap())
}

const PY_CREATE: &str = r#"
import boto3, sys
c = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
c.create_secret(Name=sys.argv[2], SecretString=sys.stdin.read())
"#;

const PY_RAW: &str = r#"
import boto3, sys
c = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
print(c.get_secret_value(SecretId=sys.argv[2], VersionStage="AWSCURRENT")["SecretString"], end="")
"#;

/// Every version's string, deprecated ones included, one per line (JSON strings).
const PY_ALL_VERSIONS: &str = r#"
import boto3, json, sys
c = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
vs = c.list_secret_version_ids(SecretId=sys.argv[2], IncludeDeprecated=True)["Versions"]
for v in vs:
    print(json.dumps(c.get_secret_value(SecretId=sys.argv[2], VersionId=v["VersionId"])["SecretString"]))
"#;

/// healthprep-key-management-policy.md, step 3: the class, verbatim.
const DUAL_KEY_ENCRYPTION: &str = r#"
# services/encryption.py - Dual-key support
import os
from cryptography.fernet import Fernet, InvalidToken

class DualKeyEncryption:
    def __init__(self):
        self.current_key = os.environ.get('ENCRYPTION_KEY')
        self.new_key = os.environ.get('ENCRYPTION_KEY_NEW')
        
        self.current_fernet = Fernet(self.current_key) if self.current_key else None
        self.new_fernet = Fernet(self.new_key) if self.new_key else None
    
    def decrypt(self, ciphertext: bytes) -> bytes:
        """Try new key first, fall back to current key."""
        if self.new_fernet:
            try:
                return self.new_fernet.decrypt(ciphertext)
            except InvalidToken:
                pass
        return self.current_fernet.decrypt(ciphertext)
    
    def encrypt(self, plaintext: bytes) -> bytes:
        """Always encrypt with new key if available."""
        fernet = self.new_fernet if self.new_fernet else self.current_fernet
        return fernet.encrypt(plaintext)
"#;

/// Deployments read `VersionStage="AWSCURRENT"` explicitly: what AWS reads
/// by default, but moto's default answer is the value last written without a
/// label, not the version AWSCURRENT was moved to.
///
/// The deployment: ENCRYPTION_KEY from the secret, ENCRYPTION_KEY_NEW from
/// the second secret ("-": the AWSPENDING version) when there is one; then
/// the application decrypts every `expected\ttoken` line. Prints "ok failed".
fn healthprep_app() -> String {
    format!(
        r#"
import os, sys, boto3
c = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
def value(sid, stage="AWSCURRENT"):
    try:
        return c.get_secret_value(SecretId=sid, VersionStage=stage)["SecretString"]
    except (c.exceptions.ResourceNotFoundException, c.exceptions.InvalidRequestException):
        return None
os.environ["ENCRYPTION_KEY"] = value(sys.argv[2])
new = value(sys.argv[3]) if sys.argv[3] != "-" else value(sys.argv[2], "AWSPENDING")
if new:
    os.environ["ENCRYPTION_KEY_NEW"] = new
{DUAL_KEY_ENCRYPTION}
service = DualKeyEncryption()
ok = failed = 0
for line in sys.stdin.read().splitlines():
    expected, token = line.split("\t")
    try:
        assert service.decrypt(token.encode()) == expected.encode()
        ok += 1
    except Exception:
        failed += 1
print(ok, failed)
"#
    )
}

/// The quarterly procedure's application: the whole environment from the
/// flat JSON secret, every `ENCRYPTION_KEY_V<n>` (64 hex) by version, the
/// version byte of each value naming its key. Prints "ok failed".
const QUARTERLY_APP: &str = r#"
import json, re, sys, boto3
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
c = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
env = json.loads(c.get_secret_value(SecretId=sys.argv[2], VersionStage="AWSCURRENT")["SecretString"])
keys = {}
for name, value in env.items():
    m = re.fullmatch(r"ENCRYPTION_KEY_V(\d+)", name)
    if m:
        keys[int(m.group(1))] = AESGCM(bytes.fromhex(value))
assert int(env["ENCRYPTION_CURRENT_VERSION"]) in keys
ok = failed = 0
for line in sys.stdin.read().splitlines():
    expected, value = line.split("\t")
    ct = bytes.fromhex(value)
    try:
        assert keys[ct[0]].decrypt(ct[1:13], ct[13:], None) == expected.encode()
        ok += 1
    except Exception as e:
        failed += 1
        why = f" (first: version {ct[0]}, keys {sorted(keys)}, {e!r})"
print(ok, failed, why if failed else "")
"#;

/// Runs an application check: every value decrypts.
fn check_app(script: &str, args: &[&str], lines: &[String], when: &str) {
    let out = py(script, args, &lines.join("\n"));
    assert_eq!(
        out.trim(),
        format!("{} 0", lines.len()),
        "the application failed {when}"
    );
}

/// Calls `rekey rotate` until the rotation is over, checking the
/// application after each call: exit 6 (waiting for an operator step) or 0
/// with the rotation not yet retired mean "call again". Returns the steps seen.
fn drive(job: &str, check: &mut dyn FnMut(&str)) -> Vec<String> {
    let mut steps = Vec::new();
    for call in 0..8 {
        let out = rekey(
            &[
                "rotate",
                "--job",
                job,
                "--grace",
                "0s",
                "--json",
                "--batch-size",
                "50",
            ],
            &aws_env(),
        );
        let code = out.status.code();
        assert!(
            matches!(code, Some(0 | 6)),
            "rotate call {call}: {}",
            printed(&out)
        );
        let step = json(&out)["step"].as_str().unwrap_or_default().to_string();
        check(&format!(
            "after rotate call {call} (exit {code:?}, step {step})"
        ));
        steps.push(step.clone());
        let text = printed(&out);
        if code == Some(0) && (step == "retired" || text.contains("rotation complete")) {
            return steps;
        }
    }
    panic!("the rotation did not end in 8 calls: {steps:?}");
}

/// Starts `rekey rotate` until it is re-encrypting with rows locked by the
/// test, so the run stops part-way; checks the app, kills it with SIGKILL,
/// checks again, releases the rows.
async fn kill_mid_run(
    db: &TestDb,
    job: &str,
    locked_from: i64,
    table: &str,
    check: &mut dyn FnMut(&str),
) {
    let mut locker = connect(&db.url).await;
    let tx = locker.transaction().await.unwrap();
    tx.execute(
        &format!("SELECT 1 FROM {table} WHERE id >= $1 FOR UPDATE"),
        &[&locked_from],
    )
    .await
    .unwrap();
    let args = [
        "rotate",
        "--job",
        job,
        "--grace",
        "0s",
        "--json",
        "--batch-size",
        "20",
    ];
    for _ in 0..4 {
        let mut child = spawn_rekey(&args, &aws_env());
        wait_for_progress(db, &mut child, 20).await;
        if child.try_wait().unwrap().is_none() {
            check("mid-run, while rekey re-encrypts");
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            check("after kill -9 of rekey mid-run");
            tx.rollback().await.unwrap();
            return;
        }
        check("after a rotate call that stopped before the run");
    }
    panic!("rekey never started re-encrypting");
}

async fn fernet_table(db: &TestDb, rows: usize) -> Vec<String> {
    db.client
        .batch_execute("CREATE TABLE patients (id bigint PRIMARY KEY, ssn text)")
        .await
        .unwrap();
    let script = "import sys\nfrom cryptography.fernet import Fernet\nf = Fernet(sys.argv[2])\nfor i in range(int(sys.argv[3])):\n    print(f.encrypt(f'ssn-{i}'.encode()).decode())\n";
    let tokens = py(script, &[&urlsafe(K1), &rows.to_string()], "");
    for (i, t) in tokens.lines().enumerate() {
        db.client
            .execute("INSERT INTO patients VALUES ($1, $2)", &[&(i as i64), &t])
            .await
            .unwrap();
    }
    fernet_lines(db).await
}

async fn fernet_lines(db: &TestDb) -> Vec<String> {
    db.client
        .query("SELECT id, ssn FROM patients ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| format!("ssn-{}\t{}", r.get::<_, i64>(0), r.get::<_, String>(1)))
        .collect()
}

async fn gcm_lines(db: &TestDb) -> Vec<String> {
    let mut lines = Vec::new();
    for r in db
        .client
        .query("SELECT id, phone_encrypted, emergency_contact_phone_encrypted FROM patient_persons ORDER BY id", &[])
        .await
        .unwrap()
    {
        let id: i64 = r.get(0);
        lines.push(format!("{}\t{}", phone(id), hex::encode(r.get::<_, Vec<u8>>(1))));
        if let Some(e) = r.get::<_, Option<Vec<u8>>>(2) {
            lines.push(format!("{}\t{}", emergency(id), hex::encode(e)));
        }
    }
    lines
}

fn job_file(db: &TestDb, dir: &tempfile::TempDir, keys: &str, target: &str) -> String {
    let path = dir.path().join("job.toml");
    std::fs::write(
        &path,
        format!(
            "[database]\nurl = \"{}\"\n[keys]\nsource = \"aws-secrets-manager\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\n{keys}\n{target}",
            db.url,
            moto().endpoint
        ),
    )
    .unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn healthprep_plain_fernet_key_with_the_new_key_in_a_second_secret_rotates_without_one_failed_decrypt(
) {
    let db = TestDb::new().await;
    let secret = format!("/healthprep/prod/encryption-key-{}", std::process::id());
    let pending = format!("{secret}-new");
    py(PY_CREATE, &[&secret], &urlsafe(K1));
    let mut lines = fernet_table(&db, 300).await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        &db,
        &dir,
        &format!("secret_id = \"{secret}\"\nlayout = \"value\"\npending_secret_id = \"{pending}\""),
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
    let new_gone = Command::new("python3")
        .arg("-c")
        .arg(PY_RAW)
        .arg(&moto().endpoint)
        .arg(&pending)
        .envs(aws_env())
        .output()
        .unwrap();
    assert!(
        !new_gone.status.success(),
        "ENCRYPTION_KEY_NEW is deleted at promotion, as the policy says"
    );
    // The rotated values open with ENCRYPTION_KEY alone.
    let only_key = "import sys\nfrom cryptography.fernet import Fernet\nf = Fernet(sys.argv[2])\nprint(sum(1 for l in sys.stdin.read().splitlines() if f.decrypt(l.split('\\t')[1].encode()).decode() == l.split('\\t')[0]))\n";
    assert_eq!(py(only_key, &[&current], &lines.join("\n")).trim(), "300");
}

/// The table's values as application-check lines, read on a fresh connection
/// (for checks made inside synchronous callbacks).
fn lines_now(db: &TestDb) -> Vec<String> {
    let url = db.url.clone();
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move {
                let db = TestDb {
                    client: connect(&url).await,
                    url,
                };
                let gcm = db
                    .client
                    .query_opt("SELECT to_regclass('patient_persons')::text", &[])
                    .await
                    .unwrap();
                if gcm.and_then(|r| r.get::<_, Option<String>>(0)).is_some() {
                    gcm_lines(&db).await
                } else {
                    fernet_lines(&db).await
                }
            })
    })
    .join()
    .unwrap()
}

use rekey::crypto::keyring::Key;

/// The quarterly procedure's flat environment secret, with members a
/// careless re-serialisation would change.
fn quarterly_secret() -> String {
    format!(
        "{{\"DATABASE_URL\" :\"postgres://app@db.internal/app\",\n  \"ENCRYPTION_KEY_V1\": \"{K1}\", \"RATIO\": 1.0e3,\t\"NAME\": \"caf\\u00e9 \\\"q\\\"\",\n  \"ENCRYPTION_CURRENT_VERSION\": \"1\", \"NESTED\": {{\"a\": [1, {{\"b\": \"}}\"}}]}}, \"SENTRY_DSN\":\"https://k@sentry.io/1\",\"LAST\":null }}"
    )
}

const UNRELATED: [&str; 6] = [
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
