//! Interop with an independent implementation: Python's `cryptography` AESGCM.

use crate::harness::*;

const PY_SEAL: &str = r#"
import os, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
key = bytes.fromhex(sys.argv[1])
for i in range(int(sys.argv[2])):
    nonce = os.urandom(12)
    print((b"\x01" + nonce + AESGCM(key).encrypt(nonce, f"py-{i}".encode(), None)).hex())
"#;

const PY_OPEN: &str = r#"
import sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
key = AESGCM(bytes.fromhex(sys.argv[1]))
for i, line in enumerate(sys.stdin):
    v = bytes.fromhex(line.strip())
    assert v[0] == 2, f"row {i} is on version {v[0]}"
    assert key.decrypt(v[1:13], v[13:], None) == f"py-{i}".encode(), f"row {i}"
    n = i + 1
print(n)
"#;

#[tokio::test(flavor = "multi_thread")]
async fn values_sealed_by_python_rotate_and_python_reads_them_with_the_new_key() {
    let db = TestDb::new().await;
    db.client.batch_execute("CREATE TABLE organization_integrations (id int PRIMARY KEY, api_key_encrypted bytea NOT NULL)").await.unwrap();
    let sealed = python(PY_SEAL, &[K1, "500"], "");
    for (i, line) in sealed.lines().enumerate() {
        db.client
            .execute(
                "INSERT INTO organization_integrations VALUES ($1, $2)",
                &[&(i as i32), &hex::decode(line).unwrap()],
            )
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("orgs.toml");
    std::fs::write(
        &job,
        format!("[database]\nurl = \"{}\"\n[keys]\nsource = \"env\"\n[[target]]\ntable = \"organization_integrations\"\ncolumns = [\"api_key_encrypted\"]\nformat = \"versioned-gcm\"\n", db.url),
    )
    .unwrap();
    let out = rekey(
        &["run", "--job", &job.display().to_string(), "--json"],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["values_rewritten"], 500);

    let rotated: Vec<String> = db
        .client
        .query(
            "SELECT api_key_encrypted FROM organization_integrations ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| hex::encode(r.get::<_, Vec<u8>>(0)))
        .collect();
    assert_eq!(python(PY_OPEN, &[K2], &rotated.join("\n")).trim(), "500");
}
