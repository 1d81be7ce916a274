//! One key table, keys of several purposes: the seed's `getNextKeyVersion`
//! hands out versions across the whole table, and applications may look a
//! key up by version alone. A job works on one purpose; what it does must
//! not collide with, or speak for, the keys of another.

use super::*;

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
