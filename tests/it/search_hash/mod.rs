//! Search hashes (blind indexes) rotated with their ciphertexts: every hash
//! equals what Python's `hmac` computes under the new hash key, lookups by it
//! find every row, a hash no key made is quarantined, an application write to
//! the hash is a conflict, a kill loses nothing, hash-only runs leave
//! ciphertexts alone, and verify fails on a hash left under an old key.

use rekey::crypto::codec::Codec;

use crate::harness::*;

mod rotate;
mod writes;

/// Old (V1) and new (V2) hash keys, as hex.
const H1: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
const H2: &str = "d00dfeedd00dfeedd00dfeedd00dfeedd00dfeedd00dfeedd00dfeedd00dfeed";

/// Prints the hash of each stdin line under key argv[1] as hex of the stored
/// bytes: `output` (argv[2]) hex / raw / base64, truncated to argv[3] bytes (0: whole).
const PY_HASH: &str = r#"
import base64, hmac, sys
key, output, cut = bytes.fromhex(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for line in sys.stdin.read().splitlines():
    mac = hmac.new(key, line.encode(), "sha256").digest()
    mac = mac[:cut] if cut else mac
    stored = {"hex": mac.hex().encode(), "raw": mac, "base64": base64.b64encode(mac)}[output]
    print(stored.hex())
"#;

/// Reads `id plaintext ciphertext-hex stored-hash-hex` lines; checks each
/// ciphertext opens under argv[1] (version 2) to its plaintext and each hash is
/// the HMAC under argv[2] in argv[3] form, cut to argv[4] bytes; prints the count.
const PY_CHECK: &str = r#"
import base64, hmac, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
aes, hkey = AESGCM(bytes.fromhex(sys.argv[1])), bytes.fromhex(sys.argv[2])
output, cut, n = sys.argv[3], int(sys.argv[4]), 0
for line in sys.stdin.read().splitlines():
    i, plain, ct, stored = line.split(" ")
    ct = bytes.fromhex(ct)
    assert ct[0] == 2, f"row {i}: ciphertext on version {ct[0]}"
    assert aes.decrypt(ct[1:13], ct[13:], None) == plain.encode(), f"row {i}: plaintext"
    mac = hmac.new(hkey, plain.encode(), "sha256").digest()
    mac = mac[:cut] if cut else mac
    want = {"hex": mac.hex().encode(), "raw": mac, "base64": base64.b64encode(mac)}[output]
    assert bytes.fromhex(stored) == want, f"row {i}: hash {stored} is not Python's {want!r}"
    n += 1
print(n)
"#;

/// How a test table stores its hash.
#[derive(Clone, Copy)]
struct Shape {
    output: &'static str,
    truncate: usize,
    column_type: &'static str,
}

const HEX: Shape = Shape {
    output: "hex",
    truncate: 0,
    column_type: "text",
};

impl Shape {
    fn textual(&self) -> bool {
        self.column_type != "bytea"
    }

    /// SQL giving the stored hash's bytes.
    fn hash_bytes(&self) -> &'static str {
        if self.textual() {
            "convert_to(ssn_bidx, 'UTF8')"
        } else {
            "ssn_bidx"
        }
    }

    fn job_line(&self) -> String {
        let cut = if self.truncate > 0 {
            format!(", truncate = {}", self.truncate)
        } else {
            String::new()
        };
        format!("hash = {{ column = \"ssn_bidx\", algorithm = \"hmac-sha256\", keys = {{ source = \"env\", prefix = \"SSN_HASH\" }}, output = \"{}\"{cut} }}\n", self.output)
    }
}

fn ssn(id: i64) -> String {
    format!("{:03}-{:02}-{:04}", id % 997, id % 89, id)
}

/// Stored hashes (as bytes) of `plaintexts` under `key`, computed by Python.
fn py_hashes(key: &str, shape: Shape, plaintexts: &[String]) -> Vec<Vec<u8>> {
    let cut = shape.truncate.to_string();
    python(PY_HASH, &[key, shape.output, &cut], &plaintexts.join("\n"))
        .lines()
        .map(|l| hex::decode(l).unwrap())
        .collect()
}

/// `people` with `rows` rows: the SSN sealed under V1, its hash under H1.
async fn seed(db: &TestDb, rows: i64, shape: Shape) {
    db.client
        .batch_execute(&format!(
            "CREATE TABLE people (id bigint PRIMARY KEY, ssn_encrypted bytea, ssn_bidx {}, note text);
             CREATE INDEX people_ssn_bidx ON people (ssn_bidx)",
            shape.column_type
        ))
        .await
        .unwrap();
    let ids: Vec<i64> = (1..=rows).collect();
    let plain: Vec<String> = ids.iter().map(|&i| ssn(i)).collect();
    let codec = v1_codec();
    let sealed: Vec<Vec<u8>> = plain
        .iter()
        .map(|p| {
            let mut out = Vec::new();
            codec.seal(p.as_bytes(), b"", None, &mut out);
            out
        })
        .collect();
    let hashes = py_hashes(H1, shape, &plain);
    let h = if shape.textual() {
        "convert_from(h, 'UTF8')"
    } else {
        "h"
    };
    db.client
        .execute(
            &format!("INSERT INTO people SELECT i, c, {h}, 'note ' || i FROM unnest($1::bigint[], $2::bytea[], $3::bytea[]) AS u(i, c, h)"),
            &[&ids, &sealed, &hashes],
        )
        .await
        .unwrap();
    db.client.batch_execute("ANALYZE people").await.unwrap();
}

fn job_file(db: &TestDb, dir: &tempfile::TempDir, shape: Shape, extra: &str) -> String {
    let path = dir.path().join("people.toml");
    std::fs::write(
        &path,
        format!(
            "[database]\nurl = \"{}\"\n[keys]\nsource = \"env\"\n[[target]]\ntable = \"people\"\ncolumns = [\"ssn_encrypted\"]\nformat = \"versioned-gcm\"\n{}{extra}",
            db.url,
            shape.job_line()
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// The encryption keys V1 + V2 (current 2) and hash keys H1 + H2 (current 2).
fn env() -> Vec<(&'static str, String)> {
    let mut env = seed_env();
    env.extend([
        ("SSN_HASH_KEY_V1", H1.into()),
        ("SSN_HASH_KEY_V2", H2.into()),
        ("SSN_HASH_CURRENT_VERSION", "2".into()),
    ]);
    env
}

/// Python checks every row: ciphertext under V2 opening to its SSN, hash Python's HMAC under H2.
async fn assert_python_agrees(db: &TestDb, shape: Shape, rows: i64) {
    let lines: Vec<String> = db
        .client
        .query(
            &format!(
                "SELECT id, ssn_encrypted, {} FROM people ORDER BY id",
                shape.hash_bytes()
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let id: i64 = r.get(0);
            let ct: Vec<u8> = r.get(1);
            let h: Vec<u8> = r.get(2);
            format!("{id} {} {} {}", ssn(id), hex::encode(ct), hex::encode(h))
        })
        .collect();
    let cut = shape.truncate.to_string();
    let checked = python(PY_CHECK, &[K2, H2, shape.output, &cut], &lines.join("\n"));
    assert_eq!(checked.trim(), rows.to_string());
}

/// Looks every row up by the hash Python computes under H2, as an application would.
async fn assert_lookups_find_every_row(db: &TestDb, shape: Shape, rows: i64) {
    let plain: Vec<String> = (1..=rows).map(ssn).collect();
    for (i, h) in py_hashes(H2, shape, &plain).into_iter().enumerate() {
        let found = if shape.textual() {
            let h = String::from_utf8(h).unwrap();
            db.client
                .query("SELECT id FROM people WHERE ssn_bidx = $1", &[&h])
                .await
        } else {
            db.client
                .query("SELECT id FROM people WHERE ssn_bidx = $1", &[&h])
                .await
        }
        .unwrap();
        let ids: Vec<i64> = found.iter().map(|r| r.get(0)).collect();
        assert_eq!(ids, vec![i as i64 + 1], "lookup of row {}", i + 1);
    }
}

/// md5 of one column of `people`, in key order.
async fn column_checksum(db: &TestDb, column: &str) -> String {
    db.client
        .query_one(
            &format!("SELECT md5(string_agg(id || ':' || coalesce({column}::text, 'NULL'), '|' ORDER BY id)) FROM people"),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}
