//! The key hierarchy procedure's key table as rekey's key source, against
//! moto's KMS and a real PostgreSQL: the seed-shaped `encryption_keys`
//! table adopted, a data key rotation run through it, and master key
//! rewraps. At every step an independent application (Python: boto3 and
//! `cryptography`, given the table's rows as its ORM would read them)
//! unwraps the keys with KMS and decrypts every value, and writes a new
//! value with the ACTIVE key as the seed's applications do.
#![cfg(feature = "aws")]

mod compromised_retire;
mod exclusion;
mod master_key;
mod purposes;
mod rewrap;
mod rotation;

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::harness::*;

static NEXT_ALIAS: AtomicU32 = AtomicU32::new(0);

/// The seed's table as Prisma would create it (enums for purpose and
/// status, camelCase columns, one ACTIVE key per purpose), a user table of
/// encrypted notes, and a log of status changes with their transaction.
const SCHEMA: &str = r#"
CREATE TYPE "KeyPurpose" AS ENUM ('PHI', 'AUDIT', 'BACKUP');
CREATE TYPE "KeyStatus" AS ENUM ('ACTIVE', 'INACTIVE', 'COMPROMISED');
CREATE TABLE encryption_keys (
    id text PRIMARY KEY DEFAULT md5(random()::text || clock_timestamp()::text),
    version integer NOT NULL,
    purpose "KeyPurpose" NOT NULL,
    algorithm text NOT NULL,
    "encryptedKey" bytea NOT NULL,
    status "KeyStatus" NOT NULL,
    "createdAt" timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "expiresAt" timestamp(3) NOT NULL,
    UNIQUE (purpose, version));
CREATE UNIQUE INDEX encryption_keys_one_active ON encryption_keys (purpose) WHERE status = 'ACTIVE';
CREATE TABLE patient_notes (id int PRIMARY KEY, note_encrypted bytea NOT NULL);
CREATE TABLE status_changes (tx bigint, version int, status text);
CREATE FUNCTION log_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO status_changes VALUES (txid_current(), NEW.version, NEW.status::text); RETURN NEW; END $$;
CREATE TRIGGER log_status AFTER UPDATE OF status ON encryption_keys FOR EACH ROW EXECUTE FUNCTION log_status();
"#;

/// The seed's `generateDataKey`, `count` times, and notes sealed under
/// them (note i under key i % min(count, 255) + 1, versioned-gcm: the key's version
/// byte, nonce, ciphertext, tag). Prints {"keys": [hex blob], "notes": [hex]}.
const PY_GENERATE: &str = r#"
import boto3, json, os, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
kms = boto3.client("kms", endpoint_url=sys.argv[1], region_name="us-east-1")
count, notes = int(sys.argv[3]), int(sys.argv[4])
keys, blobs = [], []
for _ in range(count):
    k = kms.generate_data_key(KeyId=sys.argv[2], KeySpec="AES_256")
    keys.append(k["Plaintext"]); blobs.append(k["CiphertextBlob"].hex())
out = []
for i in range(notes):
    v = i % min(count, 255) + 1
    n = os.urandom(12)
    out.append((bytes([v % 256]) + n + AESGCM(keys[v - 1]).encrypt(n, f"note-{i}".encode(), None)).hex())
print(json.dumps({"keys": blobs, "notes": out}))
"#;

/// The application: unwraps every key of the table with KMS Decrypt
/// (pinned to one master key when argv[2] is not "-"), decrypts every note
/// by its version byte, and seals note argv[3] with the one ACTIVE key.
/// Prints {"active", "read", "sealed", "fingerprints"}.
const PY_APP: &str = r#"
import boto3, hashlib, json, os, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
kms = boto3.client("kms", endpoint_url=sys.argv[1], region_name="us-east-1")
d = json.load(sys.stdin)
keys = {}
for r in d["keys"]:
    kw = {"CiphertextBlob": bytes.fromhex(r["key"])}
    if sys.argv[2] != "-":
        kw["KeyId"] = sys.argv[2]
    keys[r["version"]] = kms.decrypt(**kw)["Plaintext"]
active = [r["version"] for r in d["keys"] if r["status"] == "ACTIVE"]
assert len(active) == 1, f"ACTIVE keys: {active}"
read = 0
for v in d["notes"]:
    b = bytes.fromhex(v["c"])
    assert AESGCM(keys[b[0]]).decrypt(b[1:13], b[13:], None) == f"note-{v['id']}".encode(), v["id"]
    read += 1
n = os.urandom(12)
sealed = bytes([active[0]]) + n + AESGCM(keys[active[0]]).encrypt(n, f"note-{sys.argv[3]}".encode(), None)
fp = {v: hashlib.sha256(k).hexdigest() for v, k in keys.items()}
print(json.dumps({"active": active[0], "read": read, "sealed": sealed.hex(), "fingerprints": fp}))
"#;

/// Runs a Python script with moto's endpoint and credentials.
fn py(script: &str, args: &[&str], input: &str) -> Result<String, String> {
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
        .expect("python3 with boto3 and cryptography");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A new KMS master key; with `alias`, an alias for it (the seed's
/// `alias/phi-master-key`, made unique per test). Returns what to name it by.
pub fn master_key(alias: bool) -> String {
    let script = r#"
import boto3, sys
c = boto3.client("kms", endpoint_url=sys.argv[1], region_name="us-east-1")
k = c.create_key(Description="PHI Master Key", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
if sys.argv[2] != "-":
    c.create_alias(AliasName=sys.argv[2], TargetKeyId=k)
    print(sys.argv[2])
else:
    print(k)
"#;
    let name = if alias {
        format!(
            "alias/phi-master-key-{}-{}",
            std::process::id(),
            NEXT_ALIAS.fetch_add(1, Ordering::Relaxed)
        )
    } else {
        "-".into()
    };
    py(script, &[&name], "").unwrap().trim().to_string()
}

/// Disables a KMS key.
pub fn disable_key(key: &str) {
    let script = r#"
import boto3, sys
boto3.client("kms", endpoint_url=sys.argv[1], region_name="us-east-1").disable_key(KeyId=sys.argv[2])
"#;
    py(script, &[key], "").unwrap();
}

/// The seed's tables with `keys` data keys generated under `master` (the
/// first one ACTIVE, the others INACTIVE) and `notes` notes sealed under them.
pub async fn seed(db: &TestDb, master: &str, keys: usize, notes: usize) {
    db.client.batch_execute(SCHEMA).await.unwrap();
    let out: serde_json::Value = serde_json::from_str(
        &py(
            PY_GENERATE,
            &[master, &keys.to_string(), &notes.to_string()],
            "",
        )
        .unwrap(),
    )
    .unwrap();
    let blobs: Vec<Vec<u8>> = out["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| hex::decode(b.as_str().unwrap()).unwrap())
        .collect();
    let versions: Vec<i32> = (1..=keys as i32).collect();
    db.client
        .execute(
            r#"INSERT INTO encryption_keys (version, purpose, algorithm, "encryptedKey", status, "expiresAt")
               SELECT v, 'PHI', 'AES-256-GCM', k, CASE WHEN v = 1 THEN 'ACTIVE' ELSE 'INACTIVE' END::"KeyStatus", now() + interval '90 days'
                 FROM unnest($1::int[], $2::bytea[]) AS u(v, k)"#,
            &[&versions, &blobs],
        )
        .await
        .unwrap();
    let ids: Vec<i32> = (0..notes as i32).collect();
    let sealed: Vec<Vec<u8>> = out["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| hex::decode(b.as_str().unwrap()).unwrap())
        .collect();
    db.client
        .execute(
            "INSERT INTO patient_notes SELECT * FROM unnest($1::int[], $2::bytea[])",
            &[&ids, &sealed],
        )
        .await
        .unwrap();
}

/// One more row of the key table: a data key the seed's `generateDataKey`
/// made under `master`, of `purpose`, with `version` and `status` (the
/// seed's `getNextKeyVersion` hands versions out across purposes).
pub async fn add_key(db: &TestDb, master: &str, version: i32, purpose: &str, status: &str) {
    let out: serde_json::Value =
        serde_json::from_str(&py(PY_GENERATE, &[master, "1", "0"], "").unwrap()).unwrap();
    let blob = hex::decode(out["keys"][0].as_str().unwrap()).unwrap();
    db.client
        .execute(
            r#"INSERT INTO encryption_keys (version, purpose, algorithm, "encryptedKey", status, "expiresAt")
               VALUES ($1, $2::text::"KeyPurpose", 'AES-256-GCM', $3, $4::text::"KeyStatus", now() + interval '90 days')"#,
            &[&version, &purpose, &blob, &status],
        )
        .await
        .unwrap();
}

/// What the application saw.
#[derive(Debug)]
pub struct Seen {
    /// The ACTIVE key's version.
    pub active: i64,
    /// Notes decrypted.
    pub read: i64,
    /// sha256 of each unwrapped data key, by version.
    pub fingerprints: serde_json::Value,
}

/// The key table's rows and every note, as the application's ORM reads them.
async fn rows(db: &TestDb) -> String {
    db.client
        .query_one(
            r#"SELECT json_build_object(
                 'keys', (SELECT coalesce(json_agg(json_build_object('version', version, 'status', status, 'key', encode("encryptedKey", 'hex'))), '[]') FROM encryption_keys WHERE purpose = 'PHI'),
                 'notes', (SELECT coalesce(json_agg(json_build_object('id', id, 'c', encode(note_encrypted, 'hex'))), '[]') FROM patient_notes))::text"#,
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Runs the application once (Decrypt pinned to `pinned` unless "-"): every
/// note must decrypt; it then writes one new note with the ACTIVE key.
pub async fn app(db: &TestDb, pinned: &str) -> Result<Seen, String> {
    let next: i32 = db
        .client
        .query_one("SELECT coalesce(max(id), -1) + 1 FROM patient_notes", &[])
        .await
        .unwrap()
        .get(0);
    let out = py(PY_APP, &[pinned, &next.to_string()], &rows(db).await)?;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let sealed = hex::decode(v["sealed"].as_str().unwrap()).unwrap();
    db.client
        .execute(
            "INSERT INTO patient_notes VALUES ($1, $2)",
            &[&next, &sealed],
        )
        .await
        .unwrap();
    Ok(Seen {
        active: v["active"].as_i64().unwrap(),
        read: v["read"].as_i64().unwrap(),
        fingerprints: v["fingerprints"].clone(),
    })
}

/// A job over `patient_notes` whose keys are the key table, wrapped under `master`.
pub fn job(db: &TestDb, dir: &tempfile::TempDir, master: &str) -> String {
    let job = dir.path().join("notes.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"notes\"\n[database]\nurl = \"{}\"\n[keys]\nsource = \"table\"\nkms_key_id = \"{master}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\n[[target]]\ntable = \"patient_notes\"\ncolumns = [\"note_encrypted\"]\nformat = \"versioned-gcm\"\n",
            db.url,
            moto().endpoint
        ),
    )
    .unwrap();
    job.display().to_string()
}

/// `version -> status` of the key table.
pub async fn statuses(db: &TestDb) -> Vec<(i32, String)> {
    db.client
        .query(
            "SELECT version, status::text FROM encryption_keys ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// A hash of every row of a table, in key order.
pub async fn table_hash(db: &TestDb, sql: &str) -> String {
    db.client.query_one(sql, &[]).await.unwrap().get(0)
}
