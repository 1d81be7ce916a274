//! A role that may read a table but not update its encrypted columns is
//! refused before any write, with the GRANT that fixes it.

use super::*;

// Before this check: exit 1, "writing a batch to public.patient_persons:
// permission denied for table patient_persons", with the hint to run again.
#[tokio::test(flavor = "multi_thread")]
async fn a_role_that_may_not_update_the_columns_is_refused_with_the_grant_before_any_write() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let role = format!("{}_readonly", db_name(&db).await);
    let database = db_name(&db).await;
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'pw' NOSUPERUSER NOBYPASSRLS;
             GRANT SELECT, UPDATE (name) ON patient_persons TO {role};
             GRANT USAGE, CREATE ON SCHEMA public TO {role};
             GRANT CREATE, TEMPORARY ON DATABASE {database} TO {role};"
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let url = url_as(&db, &role);

    let out = rekey(&["run", "--job", &job, "--database-url", &url], &seed_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    let grant = format!(
        "GRANT UPDATE (\"phone_encrypted\", \"emergency_contact_phone_encrypted\") ON \"public\".\"patient_persons\" TO \"{role}\""
    );
    assert!(printed(&out).contains(&grant), "{}", printed(&out));
    assert_nothing_written(&db, 100).await;

    db.client
        .batch_execute(&format!(
            "GRANT UPDATE (phone_encrypted, emergency_contact_phone_encrypted) ON patient_persons TO {role}"
        ))
        .await
        .unwrap();
    let out = rekey(&["run", "--job", &job, "--database-url", &url], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(100).await;
}
