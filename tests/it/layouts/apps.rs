//! What the seeds' deployments run against a secret: their applications'
//! decryption logic in Python (the healthprep class verbatim), filled from
//! Secrets Manager via boto3, and the helpers that drive `rekey rotate`
//! around them and check every value after each step.

use std::process::Command;

use base64::Engine as _;

use crate::harness::*;

/// A Python script run with moto's credentials; stdout.
pub fn py(script: &str, args: &[&str], input: &str) -> String {
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

pub fn urlsafe(hex_key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE.encode(hex::decode(hex_key).unwrap())
}

pub const PY_CREATE: &str = r#"
import boto3, sys
c = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
c.create_secret(Name=sys.argv[2], SecretString=sys.stdin.read())
"#;

pub const PY_RAW: &str = r#"
import boto3, sys
c = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
print(c.get_secret_value(SecretId=sys.argv[2], VersionStage="AWSCURRENT")["SecretString"], end="")
"#;

/// "gone" when no ENCRYPTION_KEY_NEW is left: the second secret (argv 3)
/// deleted, or ("-") no version of the first labelled AWSPENDING.
pub const PY_PENDING: &str = r#"
import boto3, sys
c = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
if sys.argv[3] == "-":
    vs = c.list_secret_version_ids(SecretId=sys.argv[2], IncludeDeprecated=True)["Versions"]
    print("left" if any("AWSPENDING" in v.get("VersionStages", []) for v in vs) else "gone")
else:
    try:
        c.get_secret_value(SecretId=sys.argv[3])
        print("left")
    except (c.exceptions.ResourceNotFoundException, c.exceptions.InvalidRequestException):
        print("gone")
"#;

/// Every version's string, deprecated ones included, one per line (JSON strings).
pub const PY_ALL_VERSIONS: &str = r#"
import boto3, json, sys
c = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
vs = c.list_secret_version_ids(SecretId=sys.argv[2], IncludeDeprecated=True)["Versions"]
for v in vs:
    print(json.dumps(c.get_secret_value(SecretId=sys.argv[2], VersionId=v["VersionId"])["SecretString"]))
"#;

/// healthprep-key-management-policy.md, step 3: the class, verbatim.
pub const DUAL_KEY_ENCRYPTION: &str = r#"
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
/// the second secret ("-": the AWSPENDING version) when there is one, or
/// ("json") both from the flat environment JSON of the secret; then
/// the application decrypts every `expected\ttoken` line. Prints "ok failed".
pub fn healthprep_app() -> String {
    format!(
        r#"
import json, os, sys, boto3
c = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
def value(sid, stage="AWSCURRENT"):
    try:
        return c.get_secret_value(SecretId=sid, VersionStage=stage)["SecretString"]
    except (c.exceptions.ResourceNotFoundException, c.exceptions.InvalidRequestException):
        return None
if sys.argv[3] == "json":
    env = json.loads(value(sys.argv[2]))
    for name in ("ENCRYPTION_KEY", "ENCRYPTION_KEY_NEW"):
        if name in env:
            os.environ[name] = env[name]
else:
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
pub const QUARTERLY_APP: &str = r#"
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

/// The dual-key procedure with AES-GCM values: `ENCRYPTION_KEY` and
/// `ENCRYPTION_KEY_NEW` (64 hex) from the flat JSON secret, the new key tried
/// first, as `DualKeyEncryption` does. Prints "ok failed".
pub const DUAL_GCM_APP: &str = r#"
import json, sys, boto3
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
c = boto3.client("secretsmanager", endpoint_url=sys.argv[1], region_name="us-east-1")
env = json.loads(c.get_secret_value(SecretId=sys.argv[2], VersionStage="AWSCURRENT")["SecretString"])
keys = [AESGCM(bytes.fromhex(env[n])) for n in ("ENCRYPTION_KEY_NEW", "ENCRYPTION_KEY") if n in env]
ok = failed = 0
for line in sys.stdin.read().splitlines():
    expected, value = line.split("\t")
    ct = bytes.fromhex(value)
    for k in keys:
        try:
            assert k.decrypt(ct[1:13], ct[13:], None) == expected.encode()
            ok += 1
            break
        except Exception:
            pass
    else:
        failed += 1
print(ok, failed)
"#;

/// Runs an application check: every value decrypts.
pub fn check_app(script: &str, args: &[&str], lines: &[String], when: &str) {
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
pub fn drive(job: &str, check: &mut dyn FnMut(&str)) -> Vec<String> {
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
pub async fn kill_mid_run(
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

pub async fn fernet_table(db: &TestDb, rows: usize) -> Vec<String> {
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

pub async fn fernet_lines(db: &TestDb) -> Vec<String> {
    db.client
        .query("SELECT id, ssn FROM patients ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| format!("ssn-{}\t{}", r.get::<_, i64>(0), r.get::<_, String>(1)))
        .collect()
}

pub async fn gcm_lines(db: &TestDb) -> Vec<String> {
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

pub fn job_file(db: &TestDb, dir: &tempfile::TempDir, keys: &str, target: &str) -> String {
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

/// The table's values as application-check lines, read on a fresh connection
/// (for checks made inside synchronous callbacks).
pub fn lines_now(db: &TestDb) -> Vec<String> {
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
