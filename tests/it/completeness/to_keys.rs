//! `to_keys` without `to_format`: every value moves to the new keys, not a
//! silent no-op.

use std::collections::BTreeMap;

use rekey::crypto::keyring::{Key, Keyring};

use super::*;

// Before these checks existed: exit 0, "values_rewritten": 0, "rows_scanned": 0:
// all 300 rows still sealed under the old key 1 (the stale filter sees
// version byte 1, the write side's current version, and skips everything).
#[tokio::test(flavor = "multi_thread")]
async fn to_keys_without_to_format_moves_every_value_to_the_new_keys() {
    let db = TestDb::new().await;
    db.seed_patients(300).await;
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("patients.toml");
    std::fs::write(
        &job,
        format!(
            "[database]\nurl = \"{}\"\n\n[[target]]\ntable = \"patient_persons\"\nprimary_key = [\"id\"]\ncolumns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]\nformat = \"versioned-gcm\"\nkeys = {{ source = \"env\" }}\nto_keys = {{ source = \"env\", prefix = \"NEWKEYS\" }}\n",
            db.url
        ),
    )
    .unwrap();
    let env = vec![
        ("ENCRYPTION_KEY_V1", K1.to_string()),
        ("ENCRYPTION_CURRENT_VERSION", "1".to_string()),
        ("NEWKEYS_KEY_V1", K3.to_string()),
        ("NEWKEYS_CURRENT_VERSION", "1".to_string()),
    ];

    let out = rekey(
        &["run", "--job", &job.display().to_string(), "--json"],
        &env,
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let new_ring = Keyring::new(vec![Key::parse(1, K3).unwrap()], 1, None).unwrap();
    let under_new = db.decrypted_patients(&new_ring).await;
    let under_old = db.decrypted_patients(&v1_ring()).await;
    let mut wrong = BTreeMap::new();
    for (id, (p, e)) in &under_new {
        let want_e = if id % 3 == 0 {
            Decrypted::Null
        } else {
            Decrypted::Plain(1, emergency(*id))
        };
        if *p != Decrypted::Plain(1, phone(*id)) || *e != want_e {
            wrong.insert(*id, (p.clone(), e.clone()));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of 300 rows not under the NEWKEYS key, e.g. {:?}\n{}",
        wrong.len(),
        wrong.iter().next(),
        printed(&out)
    );
    let still_old = under_old
        .values()
        .flat_map(|(p, e)| [p, e])
        .filter(|d| matches!(d, Decrypted::Plain(..)))
        .count();
    assert_eq!(still_old, 0, "values still open under the old key 1");
}
