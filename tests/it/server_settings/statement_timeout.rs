//! A role whose sessions start with a short `statement_timeout`: plans, runs
//! and verifies 400k rows without being told a longer one.

use super::*;

/// Rows for the statement-timeout tests: the 400k.
const TIMEOUT_ROWS: i64 = 400_000;

/// A role owning `patient_persons` (and allowed to create rekey's schema)
/// whose sessions start with `statement_timeout = 50ms`; returns its URL.
async fn impatient_role(db: &TestDb) -> String {
    let role = owner_role(db, "impatient", true).await;
    db.client
        .batch_execute(&format!("ALTER ROLE {role} SET statement_timeout = '50ms'"))
        .await
        .unwrap();
    let url = url_as(db, &role);
    // premise: the role's sessions get the timeout
    let as_role = connect(&url).await;
    let applied: String = as_role
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        applied, "50ms",
        "the role's statement_timeout does not apply to its sessions"
    );
    url
}

// Today: exit 1 at once, "rekey: counting rows to rotate in
// public.patient_persons: ... canceling statement due to statement
// timeout": the session that counts never gets rekey's own settings (nor
// would --statement-timeout 10m help).
#[tokio::test(flavor = "multi_thread")]
async fn a_role_with_a_50ms_statement_timeout_runs_400k_rows_to_the_end_without_being_told_a_longer_timeout(
) {
    let db = TestDb::new().await;
    db.seed_patients(TIMEOUT_ROWS).await;
    let url = impatient_role(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    let out = rekey_as(&url, "run", &j, &[], Duration::from_secs(600));
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        json(&out)["values_rewritten"],
        values_in(TIMEOUT_ROWS),
        "{}",
        printed(&out)
    );
    db.assert_every_value_rotated(TIMEOUT_ROWS).await;
}

// Today: exit 1, "rekey: counting values of
// public.patient_persons.phone_encrypted: ... canceling statement due to
// statement timeout".
#[tokio::test(flavor = "multi_thread")]
async fn a_role_with_a_50ms_statement_timeout_plans_400k_rows() {
    let db = TestDb::new().await;
    db.seed_patients(TIMEOUT_ROWS).await;
    let url = impatient_role(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    let out = rekey_as(&url, "plan", &j, &[], Duration::from_secs(300));
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        json(&out)["values_to_rewrite"],
        values_in(TIMEOUT_ROWS),
        "{}",
        printed(&out)
    );
}

// Today: exit 1 for the sampled verify and for --full alike, "rekey:
// counting values of public.patient_persons.phone_encrypted: ... canceling
// statement due to statement timeout".
#[tokio::test(flavor = "multi_thread")]
async fn a_role_with_a_50ms_statement_timeout_verifies_400k_rows_sampled_and_full() {
    let db = TestDb::new().await;
    // the table as a finished rotation leaves it: every value under V2
    seed_patients_sealed_by(&db, TIMEOUT_ROWS, &VersionedGcm::new(&v2_ring()).unwrap()).await;
    let url = impatient_role(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    // both depths are tried before either is judged, so a failure shows both
    let outs: Vec<(&str, Output)> = [("sampled", None), ("--full", Some("--full"))]
        .into_iter()
        .map(|(name, depth)| {
            let depth = depth.as_slice();
            (
                name,
                rekey_as(&url, "verify", &j, depth, Duration::from_secs(300)),
            )
        })
        .collect();
    let codes: Vec<(&str, Option<i32>)> = outs
        .iter()
        .map(|(name, out)| (*name, out.status.code()))
        .collect();
    assert_eq!(
        codes,
        vec![("sampled", Some(0)), ("--full", Some(0))],
        "{}",
        outs.iter()
            .map(|(name, out)| format!("{name}: {}", printed(out)))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for (name, out) in &outs {
        let v = json(out);
        assert_eq!(
            v["values_total"],
            values_in(TIMEOUT_ROWS),
            "verify {name}: {v}"
        );
        assert_eq!(
            v["values_on_target_key"],
            values_in(TIMEOUT_ROWS),
            "verify {name}: {v}"
        );
    }
}
