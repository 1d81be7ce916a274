//! A key column with a nondeterministic collation (keys that compare equal,
//! so that paging by it would skip rows) is refused before any write.

use rekey::crypto::codec::Codec;

use super::*;

// Before these checks existed: with --batch-size 7, `run` exits 0 ("done") having
// rewritten 88 of the 100 rows: rows whose key compares equal, under the
// case-insensitive collation, to the last key of a page are skipped and stay
// on V1, unreported.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_column_with_a_nondeterministic_collation_is_refused_before_any_write() {
    let db = TestDb::new().await;
    let made = db.client.batch_execute("CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)").await;
    if let Err(e) = made {
        let msg = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string());
        if msg.contains("ICU is not supported") {
            println!("SKIPPED a_key_column_with_a_nondeterministic_collation_is_refused_before_any_write: the server has no ICU ({msg})");
            return;
        }
        panic!("CREATE COLLATION failed: {msg}");
    }
    // 'r000' and 'R000' are one key under ci, two under "C": the unique index makes them both legal rows
    db.client
        .batch_execute(
            "CREATE TABLE case_files (case_ref text COLLATE ci NOT NULL, secret bytea);
             CREATE UNIQUE INDEX case_files_ref_c ON case_files (case_ref COLLATE \"C\");",
        )
        .await
        .unwrap();
    let v1 = v1_codec();
    let mut sealed = Vec::new();
    for i in 0..50 {
        for case_ref in [format!("r{i:03}"), format!("R{i:03}")] {
            v1.seal(
                format!("file {case_ref}").as_bytes(),
                b"",
                None,
                &mut sealed,
            );
            db.client
                .execute(
                    "INSERT INTO case_files VALUES ($1, $2)",
                    &[&case_ref, &sealed],
                )
                .await
                .unwrap();
        }
    }
    let equal: i64 = db.client.query_one("SELECT count(*) FROM case_files a JOIN case_files b ON a.case_ref = b.case_ref AND a.ctid <> b.ctid", &[]).await.unwrap().get(0);
    assert_eq!(equal, 100, "every row compares equal to one other under ci");
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("cases.toml");
    std::fs::write(
        &job,
        format!("[database]\nurl = \"{}\"\n[keys]\nsource = \"env\"\n[[target]]\ntable = \"case_files\"\nprimary_key = [\"case_ref\"]\ncolumns = [\"secret\"]\nformat = \"versioned-gcm\"\n", db.url),
    )
    .unwrap();
    let before = db.checksum("case_files").await;

    let out = rekey(
        &[
            "run",
            "--job",
            &job.display().to_string(),
            "--json",
            "--batch-size",
            "7",
        ],
        &seed_env(),
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "a key that compares equal to other keys must be refused\n{}",
        printed(&out)
    );
    let said = stderr(&out);
    assert!(
        said.to_lowercase().contains("collation") && said.contains("case_ref"),
        "the refusal names the collation and the column: {said}"
    );
    assert_eq!(
        db.checksum("case_files").await,
        before,
        "written before the refusal"
    );
}
