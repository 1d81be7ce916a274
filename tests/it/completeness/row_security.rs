//! Row-level security: a role that policies limit, and the owner under
//! FORCE ROW LEVEL SECURITY, are refused by run, verify and retire, before
//! anything is written or any key retired.

use std::process::Output;

use rekey::crypto::codec::versioned_gcm::VersionedGcm;
use rekey::crypto::codec::Codec;

use super::*;

/// Makes a non-superuser role own `patient_persons` (and may create rekey's schema).
async fn owner_role(db: &TestDb) -> String {
    let name = format!("{}_owner", db_name(db).await);
    let database = db_name(db).await;
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {name} LOGIN PASSWORD 'pw' NOSUPERUSER NOBYPASSRLS;
             GRANT USAGE, CREATE ON SCHEMA public TO {name};
             GRANT CREATE, TEMPORARY ON DATABASE {database} TO {name};
             ALTER TABLE patient_persons OWNER TO {name};"
        ))
        .await
        .unwrap();
    name
}

/// The two ways row-level security applies to the role rekey connects as.
#[derive(Debug, Clone, Copy)]
enum Rls {
    /// A role that is neither superuser nor BYPASSRLS, RLS enabled on the table.
    OtherRole,
    /// The table's owner (not superuser), under FORCE ROW LEVEL SECURITY.
    ForcedOwner,
}

/// Turns on row-level security on `patient_persons` with a policy that
/// shows `role` (the form's role) only the even ids.
async fn hide_odd_rows(db: &TestDb, form: Rls) {
    db.client
        .batch_execute(
            "ALTER TABLE patient_persons ENABLE ROW LEVEL SECURITY;
             CREATE POLICY even_only ON patient_persons FOR ALL USING (id % 2 = 0);",
        )
        .await
        .unwrap();
    if let Rls::ForcedOwner = form {
        db.client
            .batch_execute("ALTER TABLE patient_persons FORCE ROW LEVEL SECURITY")
            .await
            .unwrap();
    }
}

/// The role of `form` (created here), for a table already seeded.
async fn role_for(db: &TestDb, form: Rls) -> String {
    match form {
        Rls::OtherRole => restricted_role(db, "halfsight").await,
        Rls::ForcedOwner => owner_role(db).await,
    }
}

/// Sanity: the role really sees half the rows (else the test proves nothing).
async fn assert_role_sees_half(role_url: &str, rows: i64) {
    let as_role = connect(role_url).await;
    let seen: i64 = as_role
        .query_one("SELECT count(*) FROM patient_persons", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        seen,
        rows / 2,
        "the policy should hide the odd rows from the role"
    );
}

/// A refusal for row-level security: exit 2, naming the table, the cause and the fix.
fn assert_refused_for_row_security(what: &str, out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(2),
        "{what}: must be refused (exit 2)\n{}",
        printed(out)
    );
    let said = stderr(out);
    assert!(
        said.contains("patient_persons"),
        "{what}: the refusal names the table: {said}"
    );
    assert!(
        said.to_lowercase().contains("row-level security"),
        "{what}: the refusal says why (row-level security): {said}"
    );
    assert!(
        said.contains("BYPASSRLS"),
        "{what}: the refusal names the fix (a role with BYPASSRLS): {said}"
    );
    assert!(
        said.contains("even_only (permissive, USING ((id % (2)::bigint) = 0))"),
        "{what}: the refusal names the policy that hides rows: {said}"
    );
}

/// Re-seals the values of the even rows under V2, as superuser: the state a
/// run as the half-sighted role leaves (visible rows rotated, hidden ones not).
async fn rotate_even_rows_by_hand(db: &TestDb) {
    let v2 = VersionedGcm::new(&v2_ring()).unwrap();
    let rows = db.client.query("SELECT id, emergency_contact_phone_encrypted IS NOT NULL FROM patient_persons WHERE id % 2 = 0", &[]).await.unwrap();
    let mut out = Vec::new();
    for r in rows {
        let (id, has_emergency): (i64, bool) = (r.get(0), r.get(1));
        v2.seal(phone(id).as_bytes(), b"", None, &mut out);
        let p = out.clone();
        let e = has_emergency.then(|| {
            v2.seal(emergency(id).as_bytes(), b"", None, &mut out);
            out.clone()
        });
        db.client
            .execute("UPDATE patient_persons SET phone_encrypted = $2, emergency_contact_phone_encrypted = $3 WHERE id = $1", &[&id, &p, &e])
            .await
            .unwrap();
    }
}

// Before these checks existed: exit 0, "values_rewritten": 167 (the 100 even
// rows the role sees); the 100 odd rows' 167 values stay on V1 and nothing
// says so ("rekey: job patients: done").
#[tokio::test(flavor = "multi_thread")]
async fn run_as_a_role_that_row_security_limits_is_refused_before_any_write() {
    run_under_row_security_is_refused(Rls::OtherRole).await;
}

// Before these checks existed: the same for the owner under FORCE: exit 0,
// "values_rewritten": 167 (the even rows), the odd rows left on V1.
#[tokio::test(flavor = "multi_thread")]
async fn run_as_the_owner_under_forced_row_security_is_refused_before_any_write() {
    run_under_row_security_is_refused(Rls::ForcedOwner).await;
}

async fn run_under_row_security_is_refused(form: Rls) {
    const ROWS: i64 = 200;
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    let role = role_for(&db, form).await;
    hide_odd_rows(&db, form).await;
    let role_url = url_as(&db, &role);
    assert_role_sees_half(&role_url, ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    let out = rekey(
        &["run", "--job", &j, "--database-url", &role_url, "--json"],
        &seed_env(),
    );
    assert_refused_for_row_security(&format!("run ({form:?})"), &out);
    assert_nothing_written(&db, ROWS).await;
}

// Today: a restrictive policy created while the run went on (its check
// before the first write had passed) hid a tenth of the rows from the
// run's recount at its end: "done", exit 0, with every hidden row not yet
// passed left on V1.
#[tokio::test(flavor = "multi_thread")]
async fn row_security_that_starts_hiding_rows_during_a_run_keeps_it_from_saying_done() {
    const ROWS: i64 = 400;
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    let role = restricted_role(&db, "seesall").await;
    db.client
        .batch_execute(&format!(
            "ALTER TABLE patient_persons ENABLE ROW LEVEL SECURITY;
             CREATE POLICY see_all ON patient_persons FOR SELECT USING (true);
             CREATE POLICY write_all ON patient_persons FOR UPDATE USING (true);
             CREATE TABLE gate (open boolean); INSERT INTO gate VALUES (false);
             GRANT SELECT ON gate TO {role};"
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let role_url = url_as(&db, &role);
    let run = spawn_rekey_captured(
        &[
            "run",
            "--job",
            &j,
            "--database-url",
            &role_url,
            "--json",
            "--gate-sql",
            "SELECT open FROM gate",
            "--check-every",
            "100ms",
        ],
        &seed_env(),
    );
    // held at its gate, past its checks: then the policy comes
    wait_for_query(&db, "SELECT open FROM gate").await;
    db.client
        .batch_execute(
            "CREATE POLICY hide_tenth ON patient_persons AS RESTRICTIVE FOR SELECT USING (id % 10 <> 0);
             UPDATE gate SET open = true;",
        )
        .await
        .unwrap();
    let out = run.wait_with_output().unwrap();
    let left: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM patient_persons WHERE get_byte(phone_encrypted, 0) = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        left,
        ROWS / 10,
        "the hidden rows are the ones left: {}",
        printed(&out)
    );
    // 4: values may be left on an old key (not 2: the run wrote)
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert_eq!(json(&out)["exit_code"], 4, "{}", printed(&out));
    let said = printed(&out);
    assert!(
        said.contains("row-level security")
            && said.contains("hide_tenth")
            && said.contains("rekey run"),
        "{said}"
    );
    // fixed, the next run starts over (its ranges were all done) and ends
    // with every value rotated
    db.client
        .batch_execute("DROP POLICY hide_tenth ON patient_persons")
        .await
        .unwrap();
    let out = rekey(
        &["run", "--job", &j, "--database-url", &role_url],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(ROWS).await;
}

// Today: under FORCE ROW LEVEL SECURITY, the refusal of a role that does
// not own the table gave FORCE as the reason ("its policies apply to its
// owner too"), which is not why they apply to that role.
#[tokio::test(flavor = "multi_thread")]
async fn under_forced_row_security_a_role_that_is_not_the_owner_is_told_why_the_policies_apply_to_it(
) {
    let db = TestDb::new().await;
    db.seed_patients(10).await;
    let role = role_for(&db, Rls::OtherRole).await;
    hide_odd_rows(&db, Rls::ForcedOwner).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let out = rekey(
        &["run", "--job", &j, "--database-url", &url_as(&db, &role)],
        &seed_env(),
    );
    assert_refused_for_row_security("run (another role, FORCE)", &out);
    let said = stderr(&out);
    assert!(
        said.contains("neither a superuser, nor BYPASSRLS, nor the table's owner")
            && !said.contains("applies to its owner too"),
        "{said}"
    );
}

// Before: the refusal said the table's policies "may hide rows" where the
// table has none, and row-level security then hides every row.
#[tokio::test(flavor = "multi_thread")]
async fn run_under_row_security_with_no_policy_is_refused_saying_the_role_sees_no_row() {
    let db = TestDb::new().await;
    db.seed_patients(10).await;
    let role = restricted_role(&db, "blind").await;
    db.client
        .batch_execute("ALTER TABLE patient_persons ENABLE ROW LEVEL SECURITY")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    let out = rekey(
        &["run", "--job", &j, "--database-url", &url_as(&db, &role)],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        stderr(&out).contains("no policy lets it read a row, so it sees none"),
        "{}",
        printed(&out)
    );
    assert_nothing_written(&db, 10).await;
}

// Before: the refusal quoted each policy's whole USING expression, however
// long (a tenant list, a subquery), burying the fix after it.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_policy_expression_is_shortened_in_the_refusal() {
    let db = TestDb::new().await;
    db.seed_patients(10).await;
    let role = restricted_role(&db, "listed").await;
    let ids: Vec<String> = (1000..1100).map(|i| i.to_string()).collect();
    db.client
        .batch_execute(&format!(
            "ALTER TABLE patient_persons ENABLE ROW LEVEL SECURITY;
             CREATE POLICY listed_ids ON patient_persons FOR SELECT USING (id IN ({}));",
            ids.join(", ")
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    let out = rekey(
        &["run", "--job", &j, "--database-url", &url_as(&db, &role)],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    let said = stderr(&out);
    assert!(
        said.contains("listed_ids (permissive, USING (id = ANY (ARRAY[(1000)::bigint")
            && said.contains("...)")
            && !said.contains("1099"),
        "{said}"
    );
    assert_nothing_written(&db, 10).await;
}

// Before these checks existed, with the even rows on V2 and the hidden odd rows
// on V1: `verify` exits 0 with "167 values: 167 on the target key ...
// verified: nothing left on an old key" (it never gets to `--full`).
#[tokio::test(flavor = "multi_thread")]
async fn verify_as_a_role_that_row_security_limits_is_refused_sampled_and_full() {
    verify_under_row_security_is_refused(Rls::OtherRole).await;
}

// Before these checks existed: as above for the owner under FORCE: exit 0,
// "verified: nothing left on an old key".
#[tokio::test(flavor = "multi_thread")]
async fn verify_as_the_owner_under_forced_row_security_is_refused_sampled_and_full() {
    verify_under_row_security_is_refused(Rls::ForcedOwner).await;
}

async fn verify_under_row_security_is_refused(form: Rls) {
    const ROWS: i64 = 200;
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    rotate_even_rows_by_hand(&db).await;
    let role = role_for(&db, form).await;
    hide_odd_rows(&db, form).await;
    let role_url = url_as(&db, &role);
    assert_role_sees_half(&role_url, ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let before = db.checksum("patient_persons").await;

    for depth in [&[][..], &["--full"][..]] {
        let mut args = vec!["verify", "--job", &j, "--database-url", &role_url];
        args.extend_from_slice(depth);
        let out = rekey(&args, &seed_env());
        assert_refused_for_row_security(&format!("verify {depth:?} ({form:?})"), &out);
    }
    assert_eq!(
        db.checksum("patient_persons").await,
        before,
        "verify wrote to the table"
    );
}

/// Key 1's state in `rekey secrets show --json`, and whether its material is there (a fingerprint).
fn key_1_as_shown(job: &str) -> (String, bool) {
    let show = rekey(
        &["secrets", "show", "--job", job, "--json"],
        &keyring_pass_env(),
    );
    assert_eq!(show.status.code(), Some(0), "{}", printed(&show));
    let keys = json(&show)["keys"].clone();
    let one = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == 1)
        .unwrap_or_else(|| panic!("key 1 is gone from the store: {keys}"));
    (
        one["state"].as_str().unwrap_or_default().to_string(),
        one["fingerprint"].as_str().is_some_and(|f| !f.is_empty()),
    )
}

// Before these checks existed: `secrets retire` as the half-sighted role exits 0
// and prints "retired key 1": key 1 leaves the keyring while the 100 phones
// of the hidden rows are still sealed under it (permanent data loss).
#[tokio::test(flavor = "multi_thread")]
async fn retire_as_a_role_that_row_security_limits_is_refused_and_the_old_key_stays() {
    retire_under_row_security_is_refused(Rls::OtherRole).await;
}

// Before these checks existed: as above for the owner under FORCE: exit 0,
// "retired key 1".
#[tokio::test(flavor = "multi_thread")]
async fn retire_as_the_owner_under_forced_row_security_is_refused_and_the_old_key_stays() {
    retire_under_row_security_is_refused(Rls::ForcedOwner).await;
}

async fn retire_under_row_security_is_refused(form: Rls) {
    const ROWS: i64 = 200;
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    let owner = owner_role(&db).await;
    let owner_url = url_as(&db, &owner);
    let dir = tempfile::tempdir().unwrap();
    let (job, _keyring) = keyring_file_job(&db, &dir);

    // the whole rotation as the owner, RLS off: key 2 current, key 1 previous
    let out = rekey(
        &[
            "rotate",
            "--job",
            &job,
            "--database-url",
            &owner_url,
            "--json",
            "--no-wait",
        ],
        &keyring_pass_env(),
    );
    assert_eq!(
        (out.status.code(), json(&out)["step"].as_str()),
        (Some(6), Some("promoted")),
        "{}",
        printed(&out)
    );
    assert_eq!(key_1_as_shown(&job), ("previous".to_string(), true));

    // rows the role will not see are still sealed under key 1 (an application
    // with the old key wrote them during the grace period)
    let v1 = v1_codec();
    let mut sealed = Vec::new();
    for id in (1..=ROWS).filter(|id| id % 2 == 1) {
        v1.seal(phone(id).as_bytes(), b"", None, &mut sealed);
        db.client
            .execute(
                "UPDATE patient_persons SET phone_encrypted = $2 WHERE id = $1",
                &[&id, &sealed],
            )
            .await
            .unwrap();
    }
    let role = match form {
        Rls::OtherRole => {
            let r = restricted_role(&db, "halfsight").await;
            // it may use rekey's engine state, which the owner created
            db.client
                .batch_execute(&format!(
                    "GRANT USAGE, CREATE ON SCHEMA rekey TO {r};
                     GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA rekey TO {r};
                     GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA rekey TO {r};"
                ))
                .await
                .unwrap();
            r
        }
        Rls::ForcedOwner => owner,
    };
    hide_odd_rows(&db, form).await;
    let role_url = url_as(&db, &role);
    assert_role_sees_half(&role_url, ROWS).await;

    let out = rekey(
        &[
            "secrets",
            "retire",
            "--job",
            &job,
            "--database-url",
            &role_url,
        ],
        &keyring_pass_env(),
    );
    assert_refused_for_row_security(&format!("secrets retire ({form:?})"), &out);
    assert_eq!(
        key_1_as_shown(&job),
        ("previous".to_string(), true),
        "secrets retire removed key 1"
    );

    // rotate's own retire step, the grace period over
    pretend_grace_passed(&db).await;
    let out = rekey(
        &[
            "rotate",
            "--job",
            &job,
            "--database-url",
            &role_url,
            "--grace",
            "0s",
        ],
        &keyring_pass_env(),
    );
    assert_refused_for_row_security(&format!("rotate at its retire step ({form:?})"), &out);
    assert_eq!(
        key_1_as_shown(&job),
        ("previous".to_string(), true),
        "rotate retired key 1"
    );
}
