//! A foreign table among a target's children: its rows are another
//! server's, under that server's row security and the user mapping's
//! permissions, which no local catalog shows; run, verify and rotate
//! refuse the target before anything is written or a key staged.

use super::*;

/// Makes a foreign table (postgres_fdw) an inheritance child of
/// `patient_persons`; its server is never reached by a refusal.
async fn foreign_child(db: &TestDb) {
    db.client
        .batch_execute(
            "CREATE EXTENSION postgres_fdw;
             CREATE SERVER elsewhere FOREIGN DATA WRAPPER postgres_fdw OPTIONS (dbname 'elsewhere');
             CREATE FOREIGN TABLE patients_elsewhere () INHERITS (patient_persons) SERVER elsewhere;",
        )
        .await
        .unwrap();
}

// Before: with the remote table's own row security hiding half its rows
// from the user mapping's role, `rotate` re-encrypted what it saw, verified
// "all values under key 2", and retired key 1 (destroyed it with --reason
// compromise) while 834 remote values were still under it.
#[tokio::test(flavor = "multi_thread")]
async fn a_target_with_a_foreign_table_child_is_refused_before_anything_is_written() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    foreign_child(&db).await;
    // the local rows only: the foreign table's server is never reached
    let local = "SELECT md5(string_agg(phone_encrypted::text || coalesce(emergency_contact_phone_encrypted::text, ''), ',' ORDER BY id)) \
                 FROM ONLY patient_persons";
    let before: String = db.client.query_one(local, &[]).await.unwrap().get(0);
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    for args in [
        &["run", "--job", &j][..],
        &["verify", "--job", &j, "--full"],
        &["rotate", "--job", &j, "--no-wait"],
    ] {
        let env = if args[0] == "rotate" {
            v1_env()
        } else {
            seed_env()
        };
        let out = rekey(args, &env);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", printed(&out));
        assert!(
            stderr(&out).contains("patients_elsewhere") && stderr(&out).contains("foreign table"),
            "{args:?}: the refusal names the foreign table: {}",
            printed(&out)
        );
    }
    let after: String = db.client.query_one(local, &[]).await.unwrap().get(0);
    assert_eq!(after, before, "a value was written");
    let rotations: i64 = db
        .client
        .query_one("SELECT count(*) FROM rekey.rotations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rotations, 0, "rotate started a rotation it refuses");
}
