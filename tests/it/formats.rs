//! Every ciphertext format against its reference implementation, migrations
//! between formats, and a job mixing formats and key sources.

use base64::Engine as _;
use rekey::crypto::codec::{Codec, Format};
use rekey::crypto::keyring::{Key, Keyring};

use crate::harness::*;

fn urlsafe(hex_key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE.encode(hex::decode(hex_key).unwrap())
}

fn job_file(dir: &tempfile::TempDir, name: &str, db: &TestDb, body: &str) -> String {
    let path = dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, format!("[database]\nurl = \"{}\"\n{body}", db.url)).unwrap();
    path.display().to_string()
}

fn fernet_env() -> Vec<(&'static str, String)> {
    vec![("FERNET_KEY", urlsafe(K1)), ("FERNET_KEY_NEW", urlsafe(K2))]
}

fn ring(ids: &[(u32, &str)], current: u32) -> Keyring {
    Keyring::new(
        ids.iter()
            .map(|(id, k)| Key::parse(*id, k).unwrap())
            .collect(),
        current,
        None,
    )
    .unwrap()
}

const PY_FERNET_SEAL: &str = r#"
import sys
from cryptography.fernet import Fernet
f = Fernet(sys.argv[1])
for i in range(int(sys.argv[2])):
    print(f._encrypt_from_parts(f"f-{i}".encode(), 1700000000 + i, bytes(16 - len(str(i))) + str(i).encode()).decode())
"#;

const PY_FERNET_OPEN: &str = r#"
import sys
from cryptography.fernet import Fernet
f = Fernet(sys.argv[1])
n = 0
for i, line in enumerate(sys.stdin.read().split()):
    assert f.decrypt(line.encode()) == f"f-{i}".encode(), i
    assert f.extract_timestamp(line.encode()) == 1700000000 + i, "timestamp not kept"
    n += 1
print(n)
"#;

#[tokio::test(flavor = "multi_thread")]
async fn fernet_tokens_from_python_rotate_and_python_reads_them_with_only_the_new_key() {
    let db = TestDb::new().await;
    db.client
        .batch_execute("CREATE TABLE people (id int PRIMARY KEY, ssn text, ssn_b bytea)")
        .await
        .unwrap();
    let tokens = python(PY_FERNET_SEAL, &[&urlsafe(K1), "400"], "");
    for (i, t) in tokens.lines().enumerate() {
        db.client
            .execute(
                "INSERT INTO people VALUES ($1, $2, convert_to($2, 'UTF8'))",
                &[&(i as i32), &t],
            )
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(&dir, "people", &db, "[[target]]\ntable = \"people\"\ncolumns = [\"ssn\", \"ssn_b\"]\nformat = \"fernet\"\nkeys = { source = \"env\", prefix = \"FERNET\" }\n");
    let out = rekey(&["run", "--job", &job, "--json"], &fernet_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["values_rewritten"], 800);

    for col in ["ssn", "convert_from(ssn_b, 'UTF8')"] {
        let rotated: Vec<String> = db
            .client
            .query(&format!("SELECT {col} FROM people ORDER BY id"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            python(PY_FERNET_OPEN, &[&urlsafe(K2)], &rotated.join("\n")).trim(),
            "400",
            "{col}"
        );
    }
    // values already on the new key are skipped without a rewrite
    let again = rekey(&["run", "--job", &job, "--json"], &fernet_env());
    let s = json(&again);
    assert_eq!(
        (s["values_rewritten"].as_u64(), s["values_skipped"].as_u64()),
        (Some(0), Some(800)),
        "{}",
        printed(&again)
    );
}

const PY_TINK_SEAL: &str = r#"
import io, json, sys
import tink
from tink import aead, cleartext_keyset_handle
aead.register()
old = tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM)
new = tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM)
def dump(h):
    s = io.StringIO(); cleartext_keyset_handle.write(tink.JsonKeysetWriter(s), h); return json.loads(s.getvalue())
o, n = dump(old), dump(new)
both = {"primaryKeyId": n["primaryKeyId"], "key": o["key"] + n["key"]}
only_new = n
prim = old.primitive(aead.Aead)
out = {"keyset": both, "only_new": only_new, "values": [prim.encrypt(f"t-{i}".encode(), str(i).encode()).hex() for i in range(int(sys.argv[1]))]}
print(json.dumps(out))
"#;

const PY_TINK_OPEN: &str = r#"
import json, sys
import tink
from tink import aead, cleartext_keyset_handle
aead.register()
data = json.loads(sys.stdin.read())
h = cleartext_keyset_handle.read(tink.JsonKeysetReader(json.dumps(data["keyset"])))
prim = h.primitive(aead.Aead)
for i, v in enumerate(data["values"]):
    assert prim.decrypt(bytes.fromhex(v), str(i).encode()) == f"t-{i}".encode(), i
print(len(data["values"]))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn tink_ciphertexts_and_keysets_from_python_rotate_and_tink_reads_them() {
    let db = TestDb::new().await;
    db.client
        .batch_execute("CREATE TABLE cards (id int PRIMARY KEY, pan bytea)")
        .await
        .unwrap();
    let made: serde_json::Value =
        serde_json::from_str(&python(PY_TINK_SEAL, &["300"], "")).unwrap();
    for (i, v) in made["values"].as_array().unwrap().iter().enumerate() {
        db.client
            .execute(
                "INSERT INTO cards VALUES ($1, $2)",
                &[&(i as i32), &hex::decode(v.as_str().unwrap()).unwrap()],
            )
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let keyset = dir.path().join("keyset.json");
    std::fs::write(&keyset, made["keyset"].to_string()).unwrap();
    let job = job_file(
        &dir,
        "cards",
        &db,
        &format!(
            "[[target]]\ntable = \"cards\"\ncolumns = [\"pan\"]\nformat = \"tink-gcm\"\naad = {{ column = \"id\" }}\nkeys = {{ source = \"tink-keyset\", path = {:?} }}\n",
            keyset.display().to_string()
        ),
    );
    let plan = rekey(&["plan", "--job", &job, "--json"], &[]);
    assert_eq!(plan.status.code(), Some(0), "{}", printed(&plan));
    assert_eq!(json(&plan)["values_to_rewrite"], 300);
    let out = rekey(&["run", "--job", &job, "--json"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["values_rewritten"], 300);

    let rotated: Vec<String> = db
        .client
        .query("SELECT pan FROM cards ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| hex::encode(r.get::<_, Vec<u8>>(0)))
        .collect();
    let input = serde_json::json!({ "keyset": made["only_new"], "values": rotated }).to_string();
    assert_eq!(python(PY_TINK_OPEN, &[], &input).trim(), "300");
    let verify = rekey(&["verify", "--job", &job, "--json"], &[]);
    assert_eq!(verify.status.code(), Some(0), "{}", printed(&verify));
}

#[tokio::test(flavor = "multi_thread")]
async fn fernet_to_versioned_gcm_migration_of_100k_rows() {
    let db = TestDb::new().await;
    db.client
        .batch_execute("CREATE TABLE notes (id bigint PRIMARY KEY, body text)")
        .await
        .unwrap();
    let fernet = Format::Fernet.codec(&ring(&[(1, K1)], 1)).unwrap();
    let (mut ids, mut bodies, mut out) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..100_000i64 {
        fernet.seal(format!("note {i}").as_bytes(), b"", None, &mut out);
        ids.push(i);
        bodies.push(String::from_utf8(out.clone()).unwrap());
    }
    db.client
        .execute(
            "INSERT INTO notes SELECT * FROM unnest($1::bigint[], $2::text[])",
            &[&ids, &bodies],
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        &dir,
        "notes",
        &db,
        "[[target]]\ntable = \"notes\"\ncolumns = [\"body\"]\nformat = \"fernet\"\nkeys = { source = \"env\", prefix = \"FERNET\" }\n\
         to_format = \"versioned-gcm\"\nto_keys = { source = \"env\" }\n",
    );
    let mut env = fernet_env();
    env.extend(seed_env());
    let before = rekey(&["verify", "--job", &job, "--json"], &env);
    assert_eq!(before.status.code(), Some(4), "{}", printed(&before));
    assert_eq!(json(&before)["values_on_old_keys"], 100_000);

    let out = rekey(&["run", "--job", &job, "--json"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["values_rewritten"], 100_000);
    let gcm = rekey::crypto::codec::versioned_gcm::VersionedGcm::new(&v2_ring()).unwrap();
    for r in db
        .client
        .query("SELECT id, body FROM notes", &[])
        .await
        .unwrap()
    {
        let (id, body): (i64, String) = (r.get(0), r.get(1));
        let raw = base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap();
        assert_eq!(
            gcm.open(&raw, b"").unwrap().plaintext.as_slice(),
            format!("note {id}").as_bytes()
        );
    }
    let after = rekey(&["verify", "--job", &job, "--json"], &env);
    assert_eq!(after.status.code(), Some(0), "{}", printed(&after));
    let again = rekey(&["run", "--job", &job, "--json"], &env);
    assert_eq!(json(&again)["values_rewritten"], 0, "{}", printed(&again));
}

/// Bad values of every format are quarantined and left as they were.
#[tokio::test(flavor = "multi_thread")]
async fn every_format_quarantines_tampered_truncated_wrong_key_and_bad_encoding() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let old = ring(&[(1, K1)], 1);
    let stranger = ring(
        &[(
            1,
            "7777777777777777777777777777777777777777777777777777777777777777",
        )],
        1,
    );
    for (format, table) in [
        (Format::VersionedGcm, "vg"),
        (Format::Fernet, "fe"),
        (Format::TinkGcm, "ti"),
        (Format::RawGcm, "rg"),
    ] {
        db.client
            .batch_execute(&format!(
                "CREATE TABLE {table} (id int PRIMARY KEY, v text)"
            ))
            .await
            .unwrap();
        let codec = format.codec(&old).unwrap();
        let store = |v: Vec<u8>| {
            if format == Format::Fernet {
                String::from_utf8_lossy(&v).into_owned()
            } else {
                base64::engine::general_purpose::STANDARD.encode(v)
            }
        };
        let mut out = Vec::new();
        for i in 0..20 {
            codec.seal(b"fine", b"", None, &mut out);
            db.client
                .execute(
                    &format!("INSERT INTO {table} VALUES ($1, $2)"),
                    &[&i, &store(out.clone())],
                )
                .await
                .unwrap();
        }
        // tampered: flip a byte in the middle; truncated; wrong key; not base64
        // (and an empty value: no ciphertext, left as it is and not counted)
        codec.seal(b"tampered", b"", None, &mut out);
        let mid = out.len() / 2;
        out[mid] ^= if format == Format::Fernet { 0x01 } else { 0x80 };
        db.client
            .execute(
                &format!("INSERT INTO {table} VALUES (100, $1)"),
                &[&store(out.clone())],
            )
            .await
            .unwrap();
        codec.seal(b"truncated", b"", None, &mut out);
        out.truncate(10);
        db.client
            .execute(
                &format!("INSERT INTO {table} VALUES (101, $1)"),
                &[&store(out.clone())],
            )
            .await
            .unwrap();
        format
            .codec(&stranger)
            .unwrap()
            .seal(b"wrong key", b"", None, &mut out);
        db.client
            .execute(
                &format!("INSERT INTO {table} VALUES (102, $1)"),
                &[&store(out.clone())],
            )
            .await
            .unwrap();
        db.client
            .execute(
                &format!("INSERT INTO {table} VALUES (103, '%%% not base64 %%%'), (104, '')"),
                &[],
            )
            .await
            .unwrap();
        let bad_before = db
            .checksum(&format!("(SELECT * FROM {table} WHERE id >= 100)"))
            .await;

        let (keys, env) = match format {
            Format::Fernet => (
                "keys = { source = \"env\", prefix = \"FERNET\" }",
                fernet_env(),
            ),
            _ => ("keys = { source = \"env\" }", seed_env()),
        };
        let job = job_file(
            &dir,
            table,
            &db,
            &format!(
                "[[target]]\ntable = \"{table}\"\ncolumns = [\"v\"]\nformat = \"{}\"\n{keys}\n",
                format.name()
            ),
        );
        let out = rekey(&["run", "--job", &job, "--json"], &env);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{}: {}",
            format.name(),
            printed(&out)
        );
        let s = json(&out);
        assert_eq!(
            (s["values_rewritten"].as_u64(), s["values_failed"].as_u64()),
            (Some(20), Some(4)),
            "{}",
            format.name()
        );
        assert_eq!(
            db.checksum(&format!("(SELECT * FROM {table} WHERE id >= 100)"))
                .await,
            bad_before,
            "{}",
            format.name()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_of_three_formats_and_key_sources_killed_and_resumed() {
    let db = TestDb::new().await;
    db.seed_patients(20_000).await;
    db.client.batch_execute("CREATE TABLE tokens (id bigint PRIMARY KEY, t text); CREATE TABLE blobs (id bigint PRIMARY KEY, b bytea)").await.unwrap();
    let fernet = Format::Fernet.codec(&ring(&[(1, K1)], 1)).unwrap();
    let raw = Format::RawGcm.codec(&ring(&[(1, K1)], 1)).unwrap();
    let (mut ids, mut ts, mut bs, mut out) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..20_000i64 {
        ids.push(i);
        fernet.seal(format!("tok {i}").as_bytes(), b"", None, &mut out);
        ts.push(String::from_utf8(out.clone()).unwrap());
        raw.seal(format!("blob {i}").as_bytes(), b"", None, &mut out);
        bs.push(out.clone());
    }
    db.client
        .execute(
            "INSERT INTO tokens SELECT * FROM unnest($1::bigint[], $2::text[])",
            &[&ids, &ts],
        )
        .await
        .unwrap();
    db.client
        .execute(
            "INSERT INTO blobs SELECT * FROM unnest($1::bigint[], $2::bytea[])",
            &[&ids, &bs],
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        &dir,
        "mixed",
        &db,
        "[keys]\nsource = \"env\"\n\
         [[target]]\ntable = \"patient_persons\"\ncolumns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]\nformat = \"versioned-gcm\"\n\
         [[target]]\ntable = \"tokens\"\ncolumns = [\"t\"]\nformat = \"fernet\"\nkeys = { source = \"env\", prefix = \"FERNET\" }\n\
         [[target]]\ntable = \"blobs\"\ncolumns = [\"b\"]\nformat = \"raw-gcm\"\nkeys = { source = \"env\", prefix = \"RAW\" }\n",
    );
    let mut env = seed_env();
    env.extend(fernet_env());
    env.push(("RAW_KEY", K1.into()));
    env.push(("RAW_KEY_NEW", K2.into()));
    let run = [
        "run",
        "--job",
        job.as_str(),
        "--json",
        "--batch-size",
        "200",
    ];

    let mut kills = 0;
    for fraction in [0.1, 0.3, 0.5, 0.7] {
        let mut child = spawn_rekey(&run, &env);
        let threshold = (73_334.0 * fraction) as i64;
        wait_for_progress(&db, &mut child, threshold).await;
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
    }
    assert!(kills >= 3, "only {kills} kills landed");
    let out = rekey(&run, &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        json(&out)["job_totals"]["values_rewritten"],
        20_000 + 13_334 + 20_000 + 20_000
    );
    let verify = rekey(&["verify", "--job", &job, "--full", "--json"], &env);
    assert_eq!(verify.status.code(), Some(0), "{}", printed(&verify));
    assert_eq!(json(&verify)["values_on_target_key"], 73_334);
}

// Before: the run stopped on the server's bare "22001: value too long for
// type character varying(60)", naming neither the column nor the fix.
#[tokio::test(flavor = "multi_thread")]
async fn a_migration_to_values_longer_than_the_column_allows_names_the_column_and_the_fix() {
    let db = TestDb::new().await;
    db.client
        .batch_execute("CREATE TABLE notes (id bigint PRIMARY KEY, body varchar(60))")
        .await
        .unwrap();
    let gcm = Format::VersionedGcm.codec(&ring(&[(1, K1)], 1)).unwrap();
    let (mut ids, mut bodies, mut out) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..50i64 {
        gcm.seal(format!("note {i}").as_bytes(), b"", None, &mut out);
        ids.push(i);
        bodies.push(base64::engine::general_purpose::STANDARD.encode(&out));
    }
    db.client
        .execute(
            "INSERT INTO notes SELECT * FROM unnest($1::bigint[], $2::text[])",
            &[&ids, &bodies],
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(
        &dir,
        "notes",
        &db,
        "[keys]\nsource = \"env\"\n[[target]]\ntable = \"notes\"\ncolumns = [\"body\"]\nformat = \"versioned-gcm\"\n\
         to_format = \"fernet\"\nto_keys = { source = \"env\", prefix = \"FERNET\" }\n",
    );
    let mut env = fernet_env();
    env.extend(seed_env());
    let before = db.checksum("notes").await;
    // the dry run says so first (before: "would rewrite 50", and no word)
    let dry = rekey(&["run", "--job", &job, "--dry-run", "--json"], &env);
    assert_eq!(dry.status.code(), Some(4), "{}", printed(&dry));
    let warnings = json(&dry)["warnings"].to_string();
    assert!(
        warnings.contains("public.notes.body: 50 values the run would write are longer than the column's type allows")
            && warnings.contains("widen the column first"),
        "{}",
        printed(&dry)
    );
    let out = rekey(&["run", "--job", &job], &env);
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let said = stderr(&out);
    for words in [
        "longer than its column allows (body character varying(60))",
        "ALTER TABLE \"public\".\"notes\" ALTER COLUMN ... TYPE text",
        "nothing of this batch was written",
    ] {
        assert!(said.contains(words), "{words:?} missing: {said}");
    }
    assert_eq!(db.checksum("notes").await, before);
}
