//! A table a publication publishes the updates of while it has no replica
//! identity, or with a row filter or a column list its replica identity
//! does not cover: PostgreSQL refuses every UPDATE of it, so the run is
//! refused before any write, with what fixes it.

use super::*;

/// Values of `patient_persons` not on key 1 (0: nothing written).
async fn written(db: &TestDb) -> i64 {
    db.client
        .query_one(
            "SELECT count(*) FROM patient_persons WHERE substring(phone_encrypted from 1 for 1) <> '\\x01'::bytea",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

// Before: exit 1 on the first batch, "writing a batch to
// public.patient_persons: cannot update table "patient_persons" because it
// does not have a replica identity and publishes updates".
#[tokio::test(flavor = "multi_thread")]
async fn a_published_table_without_a_replica_identity_is_refused_before_any_write_with_the_fix() {
    refused_then_run(
        "ALTER TABLE patient_persons REPLICA IDENTITY NOTHING;
         CREATE PUBLICATION to_the_warehouse FOR TABLE patient_persons",
        &[
            "REPLICA IDENTITY NOTHING",
            "to_the_warehouse",
            "ALTER TABLE public.patient_persons REPLICA IDENTITY DEFAULT",
        ],
        "ALTER TABLE patient_persons REPLICA IDENTITY DEFAULT",
    )
    .await;
}

// Before: exit 1 on the first batch that reached the partition.
#[tokio::test(flavor = "multi_thread")]
async fn a_partition_without_a_replica_identity_under_a_published_parent_is_refused_before_any_write(
) {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            "CREATE TABLE notes (id bigint PRIMARY KEY, v bytea) PARTITION BY RANGE (id);
             CREATE TABLE notes_low PARTITION OF notes FOR VALUES FROM (0) TO (50);
             CREATE TABLE notes_high PARTITION OF notes FOR VALUES FROM (50) TO (100);
             ALTER TABLE notes_high REPLICA IDENTITY NOTHING;
             CREATE PUBLICATION to_the_warehouse FOR TABLE notes",
        )
        .await
        .unwrap();
    let codec = VersionedGcm::new(&v1_ring()).unwrap();
    let mut value = Vec::new();
    for id in 0..100i64 {
        codec.seal(format!("note {id}").as_bytes(), b"", None, &mut value);
        db.client
            .execute("INSERT INTO notes VALUES ($1, $2)", &[&id, &value])
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("notes.toml");
    std::fs::write(
        &job,
        format!(
            "[database]\nurl = \"{}\"\n[keys]\nsource = \"env\"\n[[target]]\ntable = \"notes\"\nprimary_key = [\"id\"]\ncolumns = [\"v\"]\nformat = \"versioned-gcm\"\n",
            db.url
        ),
    )
    .unwrap();
    let job = job.display().to_string();

    let out = rekey(&["run", "--job", &job], &seed_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("public.notes_high has REPLICA IDENTITY NOTHING"),
        "{}",
        printed(&out)
    );
    let written: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM notes WHERE substring(v from 1 for 1) <> '\\x01'::bytea",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(written, 0);
}

/// Seeds `patient_persons`, runs `setup`, and asserts the patients job's run
/// is refused before any write, saying each of `said`; once `fix` has run,
/// the run goes through.
async fn refused_then_run(setup: &str, said: &[&str], fix: &str) {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    db.client.batch_execute(setup).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();

    let out = rekey(&["run", "--job", &job], &seed_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    for said in said.iter().chain(&["Nothing was written"]) {
        assert!(printed(&out).contains(said), "{said}: {}", printed(&out));
    }
    assert_eq!(written(&db).await, 0);

    db.client.batch_execute(fix).await.unwrap();
    let out = rekey(&["run", "--job", &job], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(100).await;
}

/// [`refused_then_run`] under a publication of `patient_persons` made with
/// `how`, saying `why` (PostgreSQL's own reason); the fix drops it.
async fn refused_under_a_publication(how: &str, why: &str) {
    refused_then_run(
        &format!("CREATE PUBLICATION to_the_warehouse FOR TABLE patient_persons {how}"),
        &[
            "PostgreSQL refuses every UPDATE of public.patient_persons",
            why,
            "ALTER PUBLICATION",
        ],
        "DROP PUBLICATION to_the_warehouse",
    )
    .await;
}

// Before: exit 1 on the first batch, "cannot update table
// "patient_persons": Column used in the publication WHERE expression is not
// part of the replica identity", in a job of several tables half done.
#[tokio::test(flavor = "multi_thread")]
async fn a_publication_row_filter_outside_the_replica_identity_is_refused_before_any_write() {
    refused_under_a_publication(
        "WHERE (phone_encrypted IS NOT NULL)",
        "Column used in the publication WHERE expression is not part of the replica identity",
    )
    .await;
}

// Before: exit 1 on the first batch, "Column list used by the publication
// does not cover the replica identity".
#[tokio::test(flavor = "multi_thread")]
async fn a_publication_column_list_without_the_replica_identity_is_refused_before_any_write() {
    refused_under_a_publication(
        "(phone_encrypted)",
        "Column list used by the publication does not cover the replica identity",
    )
    .await;
}
