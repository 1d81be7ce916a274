//! Interop with an independent implementation: Python's `cryptography` AESGCM.

use std::process::Command;

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

fn python(script: &str, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with `cryptography` is needed (scripts/test.sh installs it)");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn values_sealed_by_python_rotate_and_python_reads_them_with_the_new_key() {
    let db = TestDb::new().await;
    db.client.batch_execute("CREATE TABLE organization_integrations (id int PRIMARY KEY, api_key_encrypted bytea NOT NULL)").await.unwrap();
    let sealed = python(PY_SEAL, &[K1, "500"], None);
    for (i, line) in sealed.lines().enumerate() {
        db.client
            .execute("INSERT INTO organization_integrations VALUES ($1, $2)", &[&(i as i32), &hex::decode(line).unwrap()])
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
    let out = rekey(&["run", "--job", &job.display().to_string(), "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["values_rewritten"], 500);

    let rotated: Vec<String> = db
        .client
        .query("SELECT api_key_encrypted FROM organization_integrations ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| hex::encode(r.get::<_, Vec<u8>>(0)))
        .collect();
    assert_eq!(python(PY_OPEN, &[K2], Some(&rotated.join("\n"))).trim(), "500");
}
