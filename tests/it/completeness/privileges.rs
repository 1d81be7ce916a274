//! A role that may read a table but not update its encrypted columns, or
//! read only some of its columns, is refused before any write, with the
//! GRANT that fixes it.

use super::*;

/// A login role (named `<database>_<suffix>`) that may read
/// `patient_persons` and update only its `name`, and create rekey's schema.
async fn name_only_role(db: &TestDb, suffix: &str) -> String {
    let role = format!("{}_{suffix}", db_name(db).await);
    let database = db_name(db).await;
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'pw' NOSUPERUSER NOBYPASSRLS;
             GRANT SELECT, UPDATE (name) ON patient_persons TO {role};
             GRANT USAGE, CREATE ON SCHEMA public TO {role};
             GRANT CREATE, TEMPORARY ON DATABASE {database} TO {role};"
        ))
        .await
        .unwrap();
    role
}

// Before this check: exit 1, "writing a batch to public.patient_persons:
// permission denied for table patient_persons", with the hint to run again.
#[tokio::test(flavor = "multi_thread")]
async fn a_role_that_may_not_update_the_columns_is_refused_with_the_grant_before_any_write() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let role = name_only_role(&db, "readonly").await;
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

// Before: `rotate` staged key 2 in the keyring file and recorded
// `key_staged`, then the run refused (exit 2, "nothing was changed"), with
// no word of the key it had staged.
#[tokio::test(flavor = "multi_thread")]
async fn rotate_as_a_role_that_may_not_update_the_columns_is_refused_before_it_stages_a_key() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let role = name_only_role(&db, "stager").await;
    let dir = tempfile::tempdir().unwrap();
    let (job, keyring) = keyring_file_job(&db, &dir);
    let url = url_as(&db, &role);
    let before = std::fs::read(&keyring).unwrap();

    let out = rekey(
        &["rotate", "--job", &job, "--no-wait", "--database-url", &url],
        &keyring_pass_env(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(printed(&out).contains("GRANT UPDATE"), "{}", printed(&out));
    assert_eq!(
        std::fs::read(&keyring).unwrap(),
        before,
        "the keyring file changed (a key staged)"
    );
    assert!(
        !audit_events(&dir)
            .iter()
            .any(|e| e["event_type"] == "key_staged"),
        "{:?}",
        audit_events(&dir)
    );
    assert_nothing_written(&db, 100).await;
}

// Before this check: exit 1, "looking for rekey's engine schema: permission
// denied for schema rekey", with the hint to run again.
#[tokio::test(flavor = "multi_thread")]
async fn a_role_that_may_not_use_the_engine_schema_another_role_made_is_refused_with_the_grants() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    // the engine schema made by another role's run (here the superuser's)
    let first = rekey(&["run", "--job", &job], &seed_env());
    assert_eq!(first.status.code(), Some(0), "{}", printed(&first));
    let role = restricted_role(&db, "newcomer").await;
    let url = url_as(&db, &role);

    let status = rekey(
        &["status", "--job", &job, "--database-url", &url],
        &seed_env(),
    );
    assert_eq!(status.status.code(), Some(2), "{}", printed(&status));
    let read = format!("GRANT SELECT ON ALL TABLES IN SCHEMA rekey TO {role};");
    assert!(printed(&status).contains(&read), "{}", printed(&status));

    let out = rekey(&["run", "--job", &job, "--database-url", &url], &seed_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    let grants = [
        format!("GRANT USAGE ON SCHEMA rekey TO {role};"),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA rekey TO {role};"),
        format!("GRANT USAGE ON ALL SEQUENCES IN SCHEMA rekey TO {role};"),
    ];
    for grant in &grants {
        assert!(printed(&out).contains(grant), "{grant}\n{}", printed(&out));
    }
    db.client.batch_execute(&grants.concat()).await.unwrap();
    // a value restored under key 1 since: the role's run has one to rotate
    let mut v1 = Vec::new();
    rekey::crypto::codec::Codec::seal(&v1_codec(), b"555-0100", b"", None, &mut v1);
    db.client
        .execute(
            "UPDATE patient_persons SET phone_encrypted = $1 WHERE id = 7",
            &[&v1],
        )
        .await
        .unwrap();
    let out = rekey(
        &["run", "--job", &job, "--database-url", &url, "--json"],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["values_rewritten"], 1, "{}", printed(&out));
}

// The grants are the tables' owner's to give: where a DBA made the schema
// and the application's role made its tables, the refusal names that role,
// and its grants let the next role in.
#[tokio::test(flavor = "multi_thread")]
async fn the_grants_are_asked_of_the_role_that_owns_the_engine_tables_not_the_schema() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let app = restricted_role(&db, "app").await;
    db.client
        .batch_execute(&format!(
            "CREATE SCHEMA rekey; GRANT USAGE, CREATE ON SCHEMA rekey TO {app};"
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let app_url = url_as(&db, &app);
    let first = rekey(
        &["run", "--job", &job, "--database-url", &app_url],
        &seed_env(),
    );
    assert_eq!(first.status.code(), Some(0), "{}", printed(&first));

    let other = restricted_role(&db, "other").await;
    let other_url = url_as(&db, &other);
    let out = rekey(
        &["status", "--job", &job, "--database-url", &other_url],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    let said = printed(&out);
    assert!(
        said.contains(&format!(
            "as {app} (the owner of its tables) or a superuser, GRANT SELECT ON ALL TABLES IN SCHEMA rekey TO {other};"
        )) && said.contains(&format!(
            "as postgres (the owner of the schema) or a superuser, GRANT USAGE ON SCHEMA rekey TO {other};"
        )),
        "{said}"
    );
    let as_app = connect(&app_url).await;
    as_app
        .batch_execute(&format!(
            "GRANT SELECT ON ALL TABLES IN SCHEMA rekey TO {other};"
        ))
        .await
        .unwrap();
    // the schema's USAGE is the DBA's (its owner) to give
    db.client
        .batch_execute(&format!("GRANT USAGE ON SCHEMA rekey TO {other};"))
        .await
        .unwrap();
    let out = rekey(
        &["status", "--job", &job, "--database-url", &other_url],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

// An engine schema a newer rekey must change is changed by its tables'
// owner: another role is told so (exit 2), not "must be owner of table".
#[tokio::test(flavor = "multi_thread")]
async fn a_role_that_may_not_upgrade_the_engine_schema_is_told_who_may() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let first = rekey(&["run", "--job", &job], &seed_env());
    assert_eq!(first.status.code(), Some(0), "{}", printed(&first));
    let role = restricted_role(&db, "upgrader").await;
    // the schema as the version before the last migration left it
    db.client
        .batch_execute(&format!(
            "DELETE FROM rekey.schema_version WHERE version = 12;
             ALTER TABLE rekey.not_rotated DROP COLUMN detail;
             GRANT USAGE ON SCHEMA rekey TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA rekey TO {role};
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA rekey TO {role};"
        ))
        .await
        .unwrap();
    let url = url_as(&db, &role);
    let args = ["run", "--job", &job, "--restart", "--database-url", &url];
    let out = rekey(&args, &seed_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("only the owner of its tables may (postgres)"),
        "{}",
        printed(&out)
    );
    // the owner's run upgrades it; the role's goes on
    let owner = rekey(&["run", "--job", &job], &seed_env());
    assert_eq!(owner.status.code(), Some(0), "{}", printed(&owner));
    let out = rekey(&args, &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

// Before: a role granted each table of the engine schema what rekey does
// to it was refused for lacking INSERT on rekey.identity, which rekey only
// reads (its one row is made with the schema).
#[tokio::test(flavor = "multi_thread")]
async fn a_role_granted_only_what_rekey_does_to_each_engine_table_may_run() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let first = rekey(&["run", "--job", &job], &seed_env());
    assert_eq!(first.status.code(), Some(0), "{}", printed(&first));
    let role = restricted_role(&db, "exact").await;
    db.client
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA rekey TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA rekey TO {role};
             REVOKE INSERT, UPDATE, DELETE ON rekey.identity FROM {role};
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA rekey TO {role};"
        ))
        .await
        .unwrap();
    let url = url_as(&db, &role);
    let out = rekey(
        &["run", "--job", &job, "--restart", "--database-url", &url],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

// Before: "role r may not read it in public.patient_persons", with no word
// that the role's column grants were the reason.
#[tokio::test(flavor = "multi_thread")]
async fn a_role_that_may_read_only_some_columns_is_refused_with_why_and_the_grant() {
    let db = TestDb::new().await;
    db.seed_patients(10).await;
    let role = format!("{}_columns", db_name(&db).await);
    let database = db_name(&db).await;
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'pw' NOSUPERUSER NOBYPASSRLS;
             GRANT SELECT (id, phone_encrypted, emergency_contact_phone_encrypted),
                   UPDATE (phone_encrypted, emergency_contact_phone_encrypted) ON patient_persons TO {role};
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
    for said in [
        format!(
            "role {role} may not read public.patient_persons (it may read some of its columns only"
        ),
        format!("GRANT SELECT ON \"public\".\"patient_persons\" TO \"{role}\""),
    ] {
        assert!(printed(&out).contains(&said), "{said}: {}", printed(&out));
    }
    assert_nothing_written(&db, 10).await;

    db.client
        .batch_execute(&format!("GRANT SELECT ON patient_persons TO {role}"))
        .await
        .unwrap();
    let out = rekey(&["run", "--job", &job, "--database-url", &url], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(10).await;
}
