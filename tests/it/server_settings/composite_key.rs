//! A key column rekey cannot page by (a composite type): refused before any
//! write.

use super::*;

/// Rows recorded in `rekey.jobs` (0 when rekey's schema does not exist).
async fn jobs_recorded(db: &TestDb) -> i64 {
    if !db
        .client
        .query_one("SELECT to_regclass('rekey.jobs') IS NOT NULL", &[])
        .await
        .unwrap()
        .get::<_, bool>(0)
    {
        return 0;
    }
    db.client
        .query_one("SELECT count(*) FROM rekey.jobs", &[])
        .await
        .unwrap()
        .get(0)
}

// Today: the job check accepts it, a job is opened, and the run exits 1
// at the write of its first batch: "writing a batch to public.pair_secrets:
// ... input of anonymous composite types is not implemented".
#[tokio::test(flavor = "multi_thread")]
async fn a_key_column_of_a_composite_type_is_refused_before_any_write() {
    let db = TestDb::new().await;
    let codec = v1_codec();
    db.client
        .batch_execute(
            "CREATE TYPE id_pair AS (a int, b int);
             CREATE TABLE pair_secrets (pair_key id_pair PRIMARY KEY, secret_encrypted bytea);",
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    for i in 0..100i32 {
        codec.seal(format!("secret {i}").as_bytes(), b"", None, &mut out);
        db.client
            .execute(
                "INSERT INTO pair_secrets VALUES (ROW($1, $2)::id_pair, $3)",
                &[&i, &(i * 7), &out],
            )
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("pairs.toml");
    std::fs::write(
        &job,
        format!(
            "[database]\nurl = \"{}\"\n\n[keys]\nsource = \"env\"\n\n[[target]]\ntable = \"pair_secrets\"\nprimary_key = [\"pair_key\"]\ncolumns = [\"secret_encrypted\"]\nformat = \"versioned-gcm\"\n",
            db.url
        ),
    )
    .unwrap();
    let j = job.display().to_string();
    let before = db.checksum("pair_secrets").await;

    let out = rekey_within(
        &["run", "--job", &j, "--json"],
        &seed_env(),
        Duration::from_secs(60),
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "a key rekey cannot page by is a configuration error: exit 2\n{}",
        printed(&out)
    );
    let said = stderr(&out);
    assert!(
        said.contains("pair_key") && said.contains("id_pair"),
        "the refusal names the column and its type: {said}"
    );
    assert_eq!(
        db.checksum("pair_secrets").await,
        before,
        "written before the refusal"
    );
    assert_eq!(
        jobs_recorded(&db).await,
        0,
        "a job was recorded before the refusal"
    );
}
