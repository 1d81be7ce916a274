//! One key table, keys of several purposes: the seed's `getNextKeyVersion`
//! hands out versions across the whole table, and applications may look a
//! key up by version alone. A job works on one purpose; what it does must
//! not collide with, or speak for, the keys of another.

use super::*;

// Before: PHI v1 and AUDIT v2 in the table, a rotation created PHI v2
// ACTIVE, and a lookup by version 2 alone found the AUDIT key.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_key_takes_a_version_above_every_purposes_keys() {
    let db = TestDb::new().await;
    let master = master_key(false);
    seed(&db, &master, 1, 5).await;
    add_key(&db, &master, 2, "AUDIT", "ACTIVE").await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &master);
    let out = rekey(&["secrets", "stage", "--job", &j], &aws_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let versions: Vec<(i32, String)> = db
        .client
        .query(
            "SELECT version, purpose::text FROM encryption_keys ORDER BY version, purpose",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        versions,
        vec![(1, "PHI".into()), (2, "AUDIT".into()), (3, "PHI".into())]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_version_the_version_column_cannot_hold_is_refused_before_anything_is_written() {
    let db = TestDb::new().await;
    let master = master_key(false);
    seed(&db, &master, 1, 5).await;
    add_key(&db, &master, i32::MAX, "AUDIT", "ACTIVE").await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &master);
    let out = rekey(&["secrets", "stage", "--job", &j], &aws_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        stderr(&out).contains(&format!("{}", i32::MAX)) && stderr(&out).contains("integer"),
        "{}",
        printed(&out)
    );
    assert_eq!(
        statuses(&db).await,
        vec![(1, "ACTIVE".into()), (i32::MAX, "ACTIVE".into())]
    );
}

// Before: "2 of 2 data keys re-wrapped ... no data key needs A any more ...
// disable it", with the AUDIT row still wrapped under A.
#[tokio::test(flavor = "multi_thread")]
async fn a_rewrap_of_one_purpose_names_the_other_purposes_rows_still_under_the_old_master_key() {
    let db = TestDb::new().await;
    let old = master_key(false);
    seed(&db, &old, 2, 5).await;
    add_key(&db, &old, 3, "AUDIT", "ACTIVE").await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &old);
    let new = master_key(false);
    let out = rekey(
        &["secrets", "rewrap", "--job", &j, "--to-kms-key", &new],
        &aws_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let said = printed(&out);
    assert!(
        !said.contains("no data key needs") && !said.contains("disable it"),
        "{said}"
    );
    assert!(
        said.contains("AUDIT version 3") && said.contains(&old),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_purpose_no_row_has_is_refused_naming_the_table_and_the_purposes_present() {
    let db = TestDb::new().await;
    let master = master_key(false);
    seed(&db, &master, 1, 5).await;
    add_key(&db, &master, 2, "AUDIT", "ACTIVE").await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &master);
    let text = std::fs::read_to_string(&j).unwrap();
    std::fs::write(&j, text.replace("[keys]\n", "[keys]\npurpose = \"phi\"\n")).unwrap();
    let out = rekey(&["secrets", "show", "--job", &j], &aws_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    let said = stderr(&out);
    assert!(
        said.contains("encryption_keys")
            && said.contains("purpose \"phi\"")
            && said.contains("\"AUDIT\", \"PHI\"")
            && !said.contains("no keys were found"),
        "{}",
        printed(&out)
    );
}

// Before: a restored key counted as a new one, and its version was below
// another purpose's, so every restore was refused as a table "changed since".
#[tokio::test(flavor = "multi_thread")]
async fn a_retired_key_is_restored_beside_another_purposes_higher_versions() {
    let db = TestDb::new().await;
    let master = master_key(false);
    seed(&db, &master, 1, 5).await;
    let dir = tempfile::tempdir().unwrap();
    let j = job(&db, &dir, &master);
    for step in [
        &["secrets", "stage", "--job", &j][..],
        &["run", "--job", &j],
        &["secrets", "promote", "--job", &j],
        &["secrets", "retire", "--job", &j, "--key-id", "1"],
    ] {
        let out = rekey(step, &aws_env());
        assert_eq!(out.status.code(), Some(0), "{step:?}: {}", printed(&out));
    }
    add_key(&db, &master, 5, "AUDIT", "ACTIVE").await;
    let out = rekey(
        &["secrets", "restore", "--job", &j, "--key-id", "1"],
        &aws_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        statuses(&db).await,
        vec![
            (1, "INACTIVE".into()),
            (2, "ACTIVE".into()),
            (5, "ACTIVE".into())
        ]
    );
}
