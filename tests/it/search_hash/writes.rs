//! Writes that must not happen: a hash no key made, an application's
//! concurrent write, a kill mid-batch, wrong hash keys, a column no UPDATE
//! can write.

use std::time::Duration;

use rekey::engine::sink::{Commit, Writer};

use super::*;
use crate::by_hand::{first_batch, open_job, Opened};

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
    // verify counts them as what they are: hashes, not ciphertexts no key opens
    let out = rekey(&["verify", "--job", &job, "--json"], &env());
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert_eq!(
        (
            &json(&out)["values_undecryptable"],
            &json(&out)["values_hash_mismatched"]
        ),
        (&serde_json::json!(0), &serde_json::json!(2)),
        "{}",
        printed(&out)
    );
    let out = rekey(&["verify", "--job", &job], &env());
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert!(
        printed(&out).contains("2 search hashes match no hash key given for their row's plaintext")
            && !printed(&out).contains("values no key given opens"),
        "{}",
        printed(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_application_write_to_the_hash_between_read_and_write_is_a_conflict_not_overwritten() {
    let db = TestDb::new().await;
    seed(&db, 50, HEX).await;
    let dir = tempfile::tempdir().unwrap();
    let job_path = job_file(&db, &dir, HEX, "");
    let Opened {
        job,
        database,
        record,
    } = open_job(&db, std::path::Path::new(&job_path), &env()).await;
    let target = &job.targets[0];

    // read and transform one batch, as the pipeline does
    let batch = first_batch(&database, target).await;

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

    // the encryption keys given as hash keys: a warning, then the same refusal
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, text.replace("\"SSN_HASH\"", "\"ENCRYPTION\"")).unwrap();
    let out = rekey(&["run", "--job", &job], &seed_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    let said = stderr(&out);
    assert!(
        said.contains("hash key 2 is also an encryption key"),
        "{said}"
    );
    assert!(
        !said.contains(K2) && !said.contains(K1),
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
            "ALTER TABLE people ADD COLUMN ssn_gen text GENERATED ALWAYS AS (md5(note)) STORED;
             CREATE DOMAIN ssn_digest AS text;
             ALTER TABLE people ADD COLUMN ssn_dom ssn_digest;",
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
        // a domain is named with what it is over
        (
            raw,
            "ssn_dom",
            "is ssn_digest (a domain over text), and output = \"raw\" needs bytea",
        ),
    ] {
        let job = job_file(&db, &dir, shape, "");
        let text = std::fs::read_to_string(&job).unwrap();
        std::fs::write(&job, text.replace("\"ssn_bidx\"", &format!("\"{column}\""))).unwrap();
        let out = rekey(&["run", "--job", &job], &env());
        assert_eq!(out.status.code(), Some(2), "{column}: {}", printed(&out));
        assert!(stderr(&out).contains(says), "{column}: {}", stderr(&out));
    }
}

// Found by a review: a deferred foreign key pointing at the hash column
// refuses the new hashes at the batch's COMMIT, not at its UPDATE; past the
// limit of rows refused one by one, the run stopped with "the database
// refused the write" beside the hint for any failed statement ("running the
// same command again resumes safely"), which fails the same way every time.
#[tokio::test(flavor = "multi_thread")]
async fn a_deferred_foreign_key_refusing_new_hashes_at_commit_is_hinted_as_a_refused_write() {
    let db = TestDb::new().await;
    let rows = 1_100;
    seed(&db, rows, HEX).await;
    db.client
        .batch_execute(
            "ALTER TABLE people ADD CONSTRAINT people_ssn_bidx_key UNIQUE (ssn_bidx);
             CREATE TABLE lookups (bidx text REFERENCES people (ssn_bidx) DEFERRABLE INITIALLY DEFERRED);
             INSERT INTO lookups SELECT ssn_bidx FROM people;",
        )
        .await
        .unwrap();
    let before = column_checksum(&db, "ssn_bidx").await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_file(&db, &dir, HEX, "");
    let out = rekey(&["run", "--job", &job, "--json"], &env());
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let error = json(&out);
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("refused the write of more than 1000 rows")),
        "{error}"
    );
    assert!(
        error["hint"]
            .as_str()
            .is_some_and(|h| h.contains("the database refused the write itself")),
        "{error}"
    );
    assert_eq!(column_checksum(&db, "ssn_bidx").await, before);
}
