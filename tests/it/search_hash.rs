//! Search hashes (blind indexes) rotated with their ciphertexts: every hash
//! equals what Python's `hmac` computes under the new hash key, lookups by it
//! find every row, a hash no key made is quarantined, an application write to
//! the hash is a conflict, a kill loses nothing, hash-only runs leave
//! ciphertexts alone, and verify fails on a hash left under an old key.

use std::time::Duration;

use rekey::crypto::codec::Codec;
use rekey::db::Database;
use rekey::engine::sink::{Batch, Commit, Writer};
use rekey::engine::source::Source;
use rekey::engine::transform;
use rekey::job::{Job, JobSpec};
use rekey::state;

use crate::harness::*;

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

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_rehashes_every_row_to_pythons_hmac_and_lookups_by_the_new_hash_find_every_row()
{
    const ROWS: i64 = 300;
    let shapes = [
        HEX,
        Shape {
            output: "raw",
            truncate: 16,
            column_type: "bytea",
        },
        Shape {
            output: "base64",
            truncate: 20,
            column_type: "character varying(64)",
        },
    ];
    for shape in shapes {
        let db = TestDb::new().await;
        seed(&db, ROWS, shape).await;
        let dir = tempfile::tempdir().unwrap();
        let job = job_file(&db, &dir, shape, "");
        let out = rekey(&["run", "--job", &job, "--json"], &env());
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            shape.output,
            printed(&out)
        );
        let said = printed(&out);
        assert!(
            !said.contains(H1) && !said.contains(H2) && !said.contains(&ssn(1)),
            "{said}"
        );
        let summary = json(&out);
        assert_eq!(summary["values_rewritten"], 2 * ROWS, "{}", shape.output);
        assert_eq!(summary["rows_rewritten"], ROWS, "one update per row");
        assert_python_agrees(&db, shape, ROWS).await;
        assert_lookups_find_every_row(&db, shape, ROWS).await;

        let out = rekey(&["verify", "--job", &job, "--json"], &env());
        assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
        let v = json(&out);
        assert_eq!(v["values_on_target_key"], 2 * ROWS, "{v}");
        assert_eq!(v["by_key"]["hash v2"], ROWS, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hash_no_key_made_is_quarantined_and_reported_never_overwritten() {
    let db = TestDb::new().await;
    seed(&db, 100, HEX).await;
    // row 7: a hash under a key rekey is not given; row 8: H1's hash of another SSN
    let foreign = py_hashes(K1, HEX, &[ssn(7)]).remove(0);
    let other = py_hashes(H1, HEX, &["999-99-9999".into()]).remove(0);
    for (id, h) in [(7i64, &foreign), (8, &other)] {
        db.client
            .execute(
                "UPDATE people SET ssn_bidx = convert_from($1, 'UTF8') WHERE id = $2",
                &[h, &id],
            )
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(&db, &dir, HEX, "");
    let out = rekey(&["run", "--job", &job, "--json"], &env());
    assert_eq!(out.status.code(), Some(3), "{}", printed(&out));
    assert_eq!(json(&out)["values_failed"], 2);
    let quarantined: Vec<(String, String, String)> = db
        .client
        .query(
            "SELECT column_name, pk_text, error_kind FROM rekey.quarantine ORDER BY pk_text",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let q = |id: &str| {
        (
            "ssn_bidx".to_string(),
            id.to_string(),
            "hash_mismatch".to_string(),
        )
    };
    assert_eq!(quarantined, vec![q("(7)"), q("(8)")]);
    for (id, h) in [(7i64, foreign), (8, other)] {
        let now: Vec<u8> = db
            .client
            .query_one(
                "SELECT convert_to(ssn_bidx, 'UTF8') FROM people WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(now, h, "the hash of row {id} was overwritten");
    }
    let out = rekey(&["verify", "--job", &job, "--json"], &env());
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert_eq!(json(&out)["values_undecryptable"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_application_write_to_the_hash_between_read_and_write_is_a_conflict_not_overwritten() {
    let db = TestDb::new().await;
    seed(&db, 50, HEX).await;
    let dir = tempfile::tempdir().unwrap();
    let job_path = job_file(&db, &dir, HEX, "");
    let spec = JobSpec::load(std::path::Path::new(&job_path)).unwrap();
    for (k, v) in env() {
        std::env::set_var(k, v);
    }
    let job = Job::resolve(&spec, &db.client).await.unwrap();
    let database = Database::parse(&db.url).unwrap();
    let mut admin = database.connect().await.unwrap();
    state::ensure_schema(&mut admin).await.unwrap();
    let record = state::open_job(
        &mut admin,
        &job,
        false,
        async |c: &tokio_postgres::Client| rekey::engine::plan::job_ranges(c, &job, 1).await,
    )
    .await
    .unwrap();
    let target = &job.targets[0];

    // read and transform one batch, as the pipeline does
    let mut source = Source::new(database.connect().await.unwrap(), true);
    let rows = source.page(target, None, None, 100).await.unwrap();
    let mut cells = Vec::new();
    transform::rewrite(target, &rows, &mut cells);
    let last_key = rows.last().map(|r| target.row_key(r));
    let batch = Batch {
        range_index: 0,
        rows,
        cells,
        last_key,
        end: true,
        lease: None,
    };

    // the application writes row 5's hash in between (only the hash column)
    let app = String::from_utf8(py_hashes(H2, HEX, &["555-55-5555".into()]).remove(0)).unwrap();
    db.client
        .execute("UPDATE people SET ssn_bidx = $1 WHERE id = 5", &[&app])
        .await
        .unwrap();
    let ct_before: Vec<u8> = db
        .client
        .query_one("SELECT ssn_encrypted FROM people WHERE id = 5", &[])
        .await
        .unwrap()
        .get(0);

    let mut writer = Writer::connect(&database, &job, record.id).await.unwrap();
    let counts = writer
        .write(target, Commit::Range(&record.ranges[0]), &batch)
        .await
        .unwrap()
        .counts;
    assert_eq!(counts.conflicts, 1);
    assert_eq!(counts.rows_rewritten, 49);
    let (hash, ct): (String, Vec<u8>) = db
        .client
        .query_one(
            "SELECT ssn_bidx, ssn_encrypted FROM people WHERE id = 5",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(hash, app, "the application's hash was overwritten");
    assert_eq!(ct, ct_before, "the conflicted row was half written");
    let pending: i64 = db
        .client
        .query_one("SELECT count(*) FROM rekey.conflicts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, 1);

    // the re-read finds the application's hash is no hash key's HMAC of the
    // row's plaintext (it hashed another SSN): quarantined, still not overwritten
    let out = rekey(&["run", "--job", &job_path, "--json"], &env());
    assert_eq!(out.status.code(), Some(3), "{}", printed(&out));
    let q: Vec<(String, String, String)> = db
        .client
        .query(
            "SELECT column_name, pk_text, error_kind FROM rekey.quarantine",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        q,
        [("ssn_bidx".into(), "(5)".into(), "hash_mismatch".into())]
    );
    let hash: String = db
        .client
        .query_one("SELECT ssn_bidx FROM people WHERE id = 5", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        hash, app,
        "the application's hash was overwritten on the re-read"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_a_hash_rotation_then_resume_loses_nothing_and_rehashes_nothing_twice() {
    const ROWS: i64 = 20_000;
    const KILLS: i64 = 6;
    let db = TestDb::new().await;
    seed(&db, ROWS, HEX).await;
    let notes = column_checksum(&db, "note").await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(&db, &dir, HEX, "");
    let run = [
        "run",
        "--job",
        job.as_str(),
        "--json",
        "--batch-size",
        "150",
        "--workers",
        "2",
    ];
    let total = 2 * ROWS;
    let mut landed = 0;
    for k in 0..KILLS {
        let mut child = spawn_rekey(&run, &env());
        wait_for_progress(&db, &mut child, total / 10 + k * total / 8).await;
        tokio::time::sleep(Duration::from_millis(3 * k as u64)).await;
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            landed += 1;
        }
        child.wait().unwrap();
    }
    assert!(
        landed >= 4,
        "only {landed} kills landed before the run finished"
    );
    let out = rekey(&run, &env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let summary = json(&out);
    assert_eq!(summary["resumed"], true);
    assert_eq!(
        summary["job_totals"]["values_rewritten"], total,
        "every ciphertext and hash rewritten exactly once across all runs"
    );
    assert_python_agrees(&db, HEX, ROWS).await;
    // a new pass finds nothing left: no hash is rewritten twice
    let again = rekey(&run, &env());
    assert_eq!(again.status.code(), Some(0), "{}", printed(&again));
    assert_eq!(json(&again)["values_rewritten"], 0, "{}", printed(&again));
    assert_eq!(
        column_checksum(&db, "note").await,
        notes,
        "a column rekey does not own was written"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hash_only_run_rehashes_and_leaves_every_ciphertext_byte_identical() {
    const ROWS: i64 = 200;
    let db = TestDb::new().await;
    seed(&db, ROWS, HEX).await;
    let sealed = column_checksum(&db, "ssn_encrypted").await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(&db, &dir, HEX, "rewrite = \"hash\"\n");
    // V2 is the target encryption key, yet a hash-only run never re-encrypts
    let env = env();
    let out = rekey(&["run", "--job", &job, "--json"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["values_rewritten"], ROWS);
    assert_eq!(
        column_checksum(&db, "ssn_encrypted").await,
        sealed,
        "a ciphertext was rewritten"
    );
    assert_lookups_find_every_row(&db, HEX, ROWS).await;
    let out = rekey(&["verify", "--job", &job, "--json"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["values_on_target_key"], ROWS);
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

#[tokio::test(flavor = "multi_thread")]
async fn verify_fails_when_a_hash_is_left_under_the_old_key() {
    let db = TestDb::new().await;
    seed(&db, 60, HEX).await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(&db, &dir, HEX, "");
    let out = rekey(&["run", "--job", &job, "--json"], &env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    // the application (still on the old hash key) writes row 3's hash back under H1
    let old = String::from_utf8(py_hashes(H1, HEX, &[ssn(3)]).remove(0)).unwrap();
    db.client
        .execute("UPDATE people SET ssn_bidx = $1 WHERE id = 3", &[&old])
        .await
        .unwrap();
    for depth in [&[][..], &["--full"][..]] {
        let mut args = vec!["verify", "--job", &job, "--json"];
        args.extend(depth);
        let out = rekey(&args, &env());
        assert_eq!(out.status.code(), Some(4), "{depth:?}: {}", printed(&out));
        let v = json(&out);
        assert_eq!(v["values_on_old_keys"], 1, "{v}");
        assert_eq!(
            v["by_column"]["public.people.ssn_bidx"]["hash v1"], 1,
            "{v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hash_keys_that_made_none_of_the_hashes_are_refused_before_anything_is_written() {
    let db = TestDb::new().await;
    seed(&db, 80, HEX).await;
    let before = column_checksum(&db, "ssn_bidx").await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(&db, &dir, HEX, "");
    // the new hash key alone: the old one (H1), which made every hash, is left out
    let mut env = seed_env();
    env.extend([
        ("SSN_HASH_KEY_V2", H2.to_string()),
        ("SSN_HASH_CURRENT_VERSION", "2".into()),
    ]);
    let out = rekey(&["run", "--job", &job], &env);
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    let said = stderr(&out);
    assert!(
        said.contains("search hashes sampled from public.people.ssn_bidx"),
        "{said}"
    );
    assert!(said.contains("SSN_HASH_KEY_V2"), "{said}");
    assert!(
        !said.contains(H2) && !said.contains(H1),
        "key material in: {said}"
    );
    assert_eq!(column_checksum(&db, "ssn_bidx").await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn hash_columns_a_run_cannot_write_are_refused_with_the_fix() {
    let db = TestDb::new().await;
    seed(&db, 5, HEX).await;
    db.client
        .batch_execute(
            "ALTER TABLE people ADD COLUMN ssn_gen text GENERATED ALWAYS AS (md5(note)) STORED",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let raw = Shape {
        output: "raw",
        ..HEX
    };
    for (shape, column, says) in [
        (raw, "ssn_bidx", "needs bytea"),
        (HEX, "ssn_gone", "does not exist in public.people"),
        (HEX, "ssn_gen", "generated by the database"),
    ] {
        let job = job_file(&db, &dir, shape, "");
        let text = std::fs::read_to_string(&job).unwrap();
        std::fs::write(&job, text.replace("\"ssn_bidx\"", &format!("\"{column}\""))).unwrap();
        let out = rekey(&["run", "--job", &job], &env());
        assert_eq!(out.status.code(), Some(2), "{column}: {}", printed(&out));
        assert!(stderr(&out).contains(says), "{column}: {}", stderr(&out));
    }
}
