//! A key the security team marked `COMPROMISED` in the key table is a
//! compromised key to rekey whatever the invocation's reason: its retire
//! destroys its material instead of archiving it, and no run rewrites
//! values under it.

use super::*;

// Before: `secrets retire` without `--reason compromise` kept the wrapped
// key in rekey's archive (restorable) although its row said COMPROMISED.
#[tokio::test(flavor = "multi_thread")]
async fn retiring_a_key_marked_compromised_in_the_table_destroys_its_material() {
    let db = TestDb::new().await;
    let master = master_key(false);
    seed(&db, &master, 1, 10).await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &master);
    let env = aws_env();
    for step in [
        &["secrets", "stage", "--job", &j][..],
        &["run", "--job", &j],
        &["secrets", "promote", "--job", &j],
    ] {
        let out = rekey(step, &env);
        assert_eq!(out.status.code(), Some(0), "{step:?}: {}", printed(&out));
    }
    db.client
        .batch_execute("UPDATE encryption_keys SET status = 'COMPROMISED' WHERE version = 1")
        .await
        .unwrap();

    let out = rekey(&["secrets", "retire", "--job", &j, "--key-id", "1"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let archived: Option<Vec<u8>> = db
        .client
        .query_one(
            "SELECT archived_key FROM rekey.key_table_keys WHERE version = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        archived.is_none(),
        "the compromised key's wrapped material is kept in the archive: {}",
        printed(&out)
    );
    assert_eq!(statuses(&db).await, vec![(2, "ACTIVE".into())]);
    let seen = app(&db, "-").await.unwrap();
    assert_eq!(seen.read, 10, "every note reads with the keys left");
}

// Before: with the only usable row COMPROMISED read as the current key and
// nothing staged, `rekey run` rewrote every value under the compromised key
// and exited 0.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_never_rewrites_values_under_a_key_marked_compromised() {
    let db = TestDb::new().await;
    let master = master_key(false);
    seed(&db, &master, 2, 10).await;
    db.client
        .batch_execute(
            "UPDATE encryption_keys SET status = CASE version WHEN 1 THEN 'INACTIVE' ELSE 'COMPROMISED' END::\"KeyStatus\"",
        )
        .await
        .unwrap();
    let notes = "SELECT md5(string_agg(note_encrypted::text, '' ORDER BY id)) FROM patient_notes";
    let before = table_hash(&db, notes).await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &master);
    let out = rekey(&["run", "--job", &j], &aws_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        stderr(&out).contains("marked compromised"),
        "{}",
        printed(&out)
    );
    assert_eq!(
        table_hash(&db, notes).await,
        before,
        "values were rewritten"
    );
}

// Before: `secrets promote --reason compromise` with a job whose target has
// a `where` filter marked the old row COMPROMISED (the application stops
// using it), for a key no verify of that job could ever retire.
#[tokio::test(flavor = "multi_thread")]
async fn a_compromise_promote_with_a_where_filter_is_refused_before_it_changes_a_key() {
    let db = TestDb::new().await;
    let master = master_key(false);
    seed(&db, &master, 1, 10).await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &master);
    let whole = std::fs::read_to_string(&j).unwrap();
    std::fs::write(&j, format!("{whole}where = \"id < 5\"\n")).unwrap();
    let env = aws_env();
    for step in [
        &["secrets", "stage", "--job", &j][..],
        &["run", "--job", &j],
    ] {
        let out = rekey(step, &env);
        assert_eq!(out.status.code(), Some(0), "{step:?}: {}", printed(&out));
    }
    let before = statuses(&db).await;

    let out = rekey(
        &["secrets", "promote", "--job", &j, "--reason", "compromise"],
        &env,
    );
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("`where` filter"),
        "the refusal names the filter: {}",
        printed(&out)
    );
    assert_eq!(statuses(&db).await, before, "the key table changed");
    assert!(
        !statuses(&db).await.iter().any(|(_, s)| s == "COMPROMISED"),
        "{:?}",
        statuses(&db).await
    );
}
