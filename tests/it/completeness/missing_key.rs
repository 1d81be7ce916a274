//! An old key not given at all: refused before any write, and with
//! `--force` its values are quarantined with one summary, not a line each.

use super::*;

/// Only V2 in the environment, current 2: key 1 is not given at all.
fn env_without_v1() -> Vec<(&'static str, String)> {
    vec![
        ("ENCRYPTION_KEY_V2", K2.into()),
        ("ENCRYPTION_CURRENT_VERSION", "2".into()),
    ]
}

// Before these checks existed: exit 3: all 100 values are quarantined as
// unknown_key, one warning line each (the preflight refuses a key that
// fails authentication, not one that is missing).
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_old_key_is_refused_before_any_write() {
    let db = TestDb::new().await;
    db.seed_patients(60).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let before = db.checksum("patient_persons").await;

    let out = rekey(&["run", "--job", &j, "--json"], &env_without_v1());
    assert_eq!(
        out.status.code(),
        Some(2),
        "a missing old key is refused like a wrong one\n{}",
        printed(&out)
    );
    let said = stderr(&out);
    assert!(
        said.contains("ENCRYPTION_KEY_V1") || said.contains("key 1"),
        "the refusal names key 1: {said}"
    );
    assert_eq!(
        db.checksum("patient_persons").await,
        before,
        "written before the refusal"
    );
    assert_nothing_written(&db, 60).await;
    let schema: bool = db
        .client
        .query_one("SELECT to_regclass('rekey.quarantine') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    if schema {
        let q: i64 = db
            .client
            .query_one("SELECT count(*) FROM rekey.quarantine", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(q, 0, "values were quarantined before the refusal");
    }
}

// Before: `rotate` was told to "pass --force to quarantine every value
// under a key that is not given", and it takes no --force.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotate_refused_for_a_missing_old_key_is_not_told_to_pass_force() {
    let db = TestDb::new().await;
    db.seed_patients(60).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    let out = rekey(&["rotate", "--job", &j], &env_without_v1());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    let said = stderr(&out);
    assert!(
        said.contains("the keys given do not hold that key")
            && said.contains("`rekey rotate` takes no --force")
            && !said.contains("pass --force"),
        "{said}"
    );
    assert_nothing_written(&db, 60).await;
}

// Before these checks existed: the 100 values are quarantined, with one warning
// line per value on stderr ("rekey: warning: cannot decrypt
// public.patient_persons.phone_encrypted at key (1): unknown_key", 100 lines)
// and no summary there. (Those lines say "cannot decrypt", not "quarantine":
// counting only "quarantin" would pass today, so both are counted.)
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_old_key_with_force_quarantines_with_a_summary_not_a_line_per_value() {
    let db = TestDb::new().await;
    db.seed_patients(60).await;
    let values = values_in(60);
    assert_eq!(values, 100);
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    let out = rekey(&["run", "--job", &j, "--force"], &env_without_v1());
    let quarantined: i64 = db
        .client
        .query_one("SELECT count(*) FROM rekey.quarantine", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        quarantined,
        values,
        "every value under the missing key is quarantined\n{}",
        printed(&out)
    );
    let said = stderr(&out);
    let about: Vec<&str> = said
        .lines()
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("quarantin") || l.contains("cannot decrypt")
        })
        .collect();
    assert!(
        about.len() < 10,
        "{} lines about quarantined values for {values} values (summarise them):\n{said}",
        about.len()
    );
    let counted = about
        .iter()
        .any(|l| l.to_lowercase().contains("quarantin") && l.contains(&values.to_string()))
        || (about.iter().any(|l| l.contains("60")) && about.iter().any(|l| l.contains("40")));
    assert!(
        counted,
        "the summary gives the count ({values}, or 60 and 40 per column):\n{said}"
    );
}
