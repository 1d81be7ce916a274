//! Writes the database refuses or undoes (a trigger that puts the old value
//! back or skips the update, an update policy narrower than the select one)
//! end as values not rotated, with exit 4, run after run.

use super::*;

/// Which values of a patient row the database refuses to change, by id: (phone, emergency phone).
type Blocked = fn(i64) -> (bool, bool);

/// Runs the job over a table where the database refuses or undoes some
/// writes (`blocked`), as `extra` (e.g. `--database-url` of a role), and
/// checks the designed outcome: exit 4, the refused values counted as not
/// rotated, only values that landed counted as rewritten, both in the run's
/// summary and in `status`, and the same again on a second run.
async fn assert_refused_writes_end_as_not_rotated(
    db: &TestDb,
    rows: i64,
    blocked: Blocked,
    extra: &[&str],
) {
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    // what the run will try to rewrite and the database will refuse, from the data
    let before = db.decrypted_patients(&v1_ring()).await;
    let refused: i64 = before
        .iter()
        .map(|(id, (p, e))| {
            let (bp, be) = blocked(*id);
            i64::from(bp && *p != Decrypted::Null) + i64::from(be && *e != Decrypted::Null)
        })
        .sum();
    assert!(
        refused > 0,
        "the restriction blocks no value: the test proves nothing"
    );
    let mut args = vec!["run", "--job", j.as_str(), "--json"];
    args.extend_from_slice(extra);

    let out = rekey(&args, &seed_env());
    let after = db.decrypted_patients(&v2_ring()).await;
    let landed = after
        .values()
        .flat_map(|(p, e)| [p, e])
        .filter(|d| matches!(d, Decrypted::Plain(2, _)))
        .count() as i64;
    assert_eq!(
        out.status.code(),
        Some(4),
        "values left on an old key: exit 4 (refused values: {refused}, landed: {landed})\n{}",
        printed(&out)
    );
    let summary = json(&out);
    assert_eq!(summary["values_not_rotated"], refused, "{summary}");
    assert_eq!(
        summary["values_rewritten"], landed,
        "only values that landed count as rewritten: {summary}"
    );

    // the refused values hold their V1 ciphertext, every other one is on V2
    for (id, (p, e)) in &after {
        let (bp, be) = blocked(*id);
        assert_eq!(
            *p,
            Decrypted::Plain(if bp { 1 } else { 2 }, phone(*id)),
            "phone of {id}"
        );
        let want_e = if id % 3 == 0 {
            Decrypted::Null
        } else {
            Decrypted::Plain(if be { 1 } else { 2 }, emergency(*id))
        };
        assert_eq!(*e, want_e, "emergency phone of {id}");
    }
    assert_eq!(after.len() as i64, rows);

    let status = rekey(&["status", "--job", &j, "--json"], &seed_env());
    assert_eq!(status.status.code(), Some(0), "{}", printed(&status));
    assert_eq!(
        json(&status)["values_not_rotated"],
        refused,
        "status reports the values not rotated: {}",
        printed(&status)
    );

    let again = rekey(&args, &seed_env());
    assert_eq!(
        again.status.code(),
        Some(4),
        "a second run still leaves them: exit 4\n{}",
        printed(&again)
    );
    let summary = json(&again);
    assert_eq!(
        summary["values_rewritten"], 0,
        "the refused values are not counted as rewritten again: {summary}"
    );
    assert_eq!(summary["values_not_rotated"], refused, "{summary}");
    assert_eq!(
        db.decrypted_patients(&v2_ring()).await,
        after,
        "the second run changed what the first left"
    );
}

fn every_tenth_phone(id: i64) -> (bool, bool) {
    (id % 10 == 0, false)
}

fn every_tenth_row(id: i64) -> (bool, bool) {
    (id % 10 == 0, id % 10 == 0)
}

// Before these checks existed: exit 0, "values_rewritten": 1667 (every value,
// including the 100 phones the trigger put back on V1), "conflicts": 0; a
// second run again exits 0 and counts the same 100 phones as rewritten.
#[tokio::test(flavor = "multi_thread")]
async fn a_trigger_that_puts_the_old_value_back_leaves_values_reported_as_not_rotated() {
    let db = TestDb::new().await;
    db.seed_patients(1_000).await;
    db.client
        .batch_execute(
            "CREATE FUNCTION keep_old_phone() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF OLD.id % 10 = 0 THEN NEW.phone_encrypted := OLD.phone_encrypted; END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER keep_old_phone BEFORE UPDATE ON patient_persons FOR EACH ROW EXECUTE FUNCTION keep_old_phone();",
        )
        .await
        .unwrap();
    assert_refused_writes_end_as_not_rotated(&db, 1_000, every_tenth_phone, &[]).await;
}

// Before: exit 0, "done", every value counted as rewritten, the tenth
// phones still on V1: the UPDATE's RETURNING saw the rows before the
// deferred trigger put the old value back at COMMIT.
#[tokio::test(flavor = "multi_thread")]
async fn a_deferred_trigger_that_puts_the_old_value_back_at_commit_leaves_values_reported_as_not_rotated(
) {
    let db = TestDb::new().await;
    db.seed_patients(1_000).await;
    db.client
        .batch_execute(&format!(
            "{PUT_OLD_PHONE_BACK}
             CREATE CONSTRAINT TRIGGER put_old_phone_back AFTER UPDATE ON patient_persons
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (pg_trigger_depth() = 0)
               EXECUTE FUNCTION put_old_phone_back();"
        ))
        .await
        .unwrap();
    assert_refused_writes_end_as_not_rotated(&db, 1_000, every_tenth_phone, &[]).await;
}

// Before: the run counted the tenth phones as rewritten, then blamed them
// on an application "still writing under an old key" (rows written behind).
#[tokio::test(flavor = "multi_thread")]
async fn an_after_trigger_that_puts_the_old_value_back_leaves_values_reported_as_not_rotated() {
    let db = TestDb::new().await;
    db.seed_patients(1_000).await;
    db.client
        .batch_execute(&format!(
            "{PUT_OLD_PHONE_BACK}
             CREATE TRIGGER put_old_phone_back AFTER UPDATE OF phone_encrypted ON patient_persons
               FOR EACH ROW WHEN (pg_trigger_depth() = 0) EXECUTE FUNCTION put_old_phone_back();"
        ))
        .await
        .unwrap();
    assert_refused_writes_end_as_not_rotated(&db, 1_000, every_tenth_phone, &[]).await;
}

/// An AFTER trigger's function that writes every tenth phone back as it was.
const PUT_OLD_PHONE_BACK: &str =
    "CREATE FUNCTION put_old_phone_back() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF OLD.id % 10 = 0 AND NEW.phone_encrypted IS DISTINCT FROM OLD.phone_encrypted THEN
                 UPDATE patient_persons SET phone_encrypted = OLD.phone_encrypted WHERE id = OLD.id;
               END IF;
               RETURN NULL;
             END $$;";

// Before these checks existed: exit 0 after ~4 s of re-reads, "values_rewritten":
// 1500, "conflicts": 1100, "conflicts_left": 100, no "values_not_rotated";
// the job is recorded as done.
#[tokio::test(flavor = "multi_thread")]
async fn a_trigger_that_skips_the_update_leaves_values_reported_as_not_rotated() {
    let db = TestDb::new().await;
    db.seed_patients(1_000).await;
    db.client
        .batch_execute(
            "CREATE FUNCTION skip_tenth() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF OLD.id % 10 = 0 THEN RETURN NULL; END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER skip_tenth BEFORE UPDATE ON patient_persons FOR EACH ROW EXECUTE FUNCTION skip_tenth();",
        )
        .await
        .unwrap();
    assert_refused_writes_end_as_not_rotated(&db, 1_000, every_tenth_row, &[]).await;
}

// Today: the BEFORE UPDATE trigger's warning was said on stderr alone, not
// with the run's totals nor in `--json` `warnings`, where the old-row
// copying triggers' warnings are.
#[tokio::test(flavor = "multi_thread")]
async fn a_trigger_that_may_refuse_writes_is_named_in_the_run_s_json_warnings() {
    let db = TestDb::new().await;
    db.seed_patients(50).await;
    db.client
        .batch_execute(
            "CREATE FUNCTION pass() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
             CREATE TRIGGER pass_all BEFORE UPDATE ON patient_persons FOR EACH ROW EXECUTE FUNCTION pass();",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let out = rekey(&["run", "--job", &job, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let warnings = json(&out)["warnings"].to_string();
    assert!(
        warnings.contains("public.patient_persons has BEFORE UPDATE triggers (pass_all)"),
        "{warnings}"
    );
}

// Before these checks existed: not refused up front (right: every row is
// visible), then exit 0 with "values_rewritten": 1500, "conflicts": 1100,
// "conflicts_left": 100, the tenth rows still on V1, no "values_not_rotated";
// in text mode the message blames the application ("rows kept changing").
#[tokio::test(flavor = "multi_thread")]
async fn an_update_policy_narrower_than_select_leaves_values_reported_as_not_rotated() {
    let db = TestDb::new().await;
    db.seed_patients(1_000).await;
    let role = restricted_role(&db, "narrow").await;
    db.client
        .batch_execute(
            "ALTER TABLE patient_persons ENABLE ROW LEVEL SECURITY;
             CREATE POLICY r ON patient_persons FOR SELECT USING (true);
             CREATE POLICY w ON patient_persons FOR UPDATE USING (id % 10 <> 0);",
        )
        .await
        .unwrap();
    let role_url = url_as(&db, &role);
    let as_role = connect(&role_url).await;
    let seen: i64 = as_role
        .query_one("SELECT count(*) FROM patient_persons", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 1_000, "the role sees every row");
    assert_refused_writes_end_as_not_rotated(
        &db,
        1_000,
        every_tenth_row,
        &["--database-url", &role_url],
    )
    .await;
}

// Before: the warning said such values "are reported as not rotated", but
// the first batch holding one failed the run (exit 1, "new row violates
// row-level security policy"), no value of the table rotated.
#[tokio::test(flavor = "multi_thread")]
async fn an_update_policy_whose_check_refuses_the_rewritten_row_leaves_values_reported_as_not_rotated(
) {
    let db = TestDb::new().await;
    db.seed_patients(1_000).await;
    let role = restricted_role(&db, "checked").await;
    db.client
        .batch_execute(
            "ALTER TABLE patient_persons ENABLE ROW LEVEL SECURITY;
             CREATE POLICY r ON patient_persons FOR SELECT USING (true);
             CREATE POLICY w ON patient_persons FOR UPDATE USING (true)
               WITH CHECK (id % 10 <> 0 OR get_byte(phone_encrypted, 0) = 1);",
        )
        .await
        .unwrap();
    let role_url = url_as(&db, &role);
    assert_refused_writes_end_as_not_rotated(
        &db,
        1_000,
        every_tenth_row,
        &["--database-url", &role_url],
    )
    .await;
}

// Before rows refused with an error were isolated: exit 1 ("archived patients
// are read-only"), not one value of the table rotated, and every run after
// it stopped the same way.
/// A trigger that refuses, with an error, the update of every tenth row.
const ARCHIVED_READ_ONLY: &str = "CREATE FUNCTION archived_read_only() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF OLD.id % 10 = 0 THEN RAISE EXCEPTION 'archived patients are read-only'; END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER archived_read_only BEFORE UPDATE ON patient_persons FOR EACH ROW EXECUTE FUNCTION archived_read_only();";

#[tokio::test(flavor = "multi_thread")]
async fn a_trigger_that_raises_an_error_for_some_rows_leaves_only_those_reported_as_not_rotated() {
    let db = TestDb::new().await;
    db.seed_patients(1_000).await;
    db.client.batch_execute(ARCHIVED_READ_ONLY).await.unwrap();
    assert_refused_writes_end_as_not_rotated(&db, 1_000, every_tenth_row, &[]).await;
    // each refused value is recorded with the database's own words
    assert_eq!(
        recorded_refusals(&db).await,
        vec![(
            "write_rejected".to_string(),
            Some("P0001: archived patients are read-only".to_string())
        )]
    );
}

// Before this count: key 2's count held the values written alone, while
// each refused row's values were sealed under fresh random nonces in the
// batch that set the row aside, in the batch that re-read it, and once more
// alone, and none of those was counted (invariant 7 counts every
// encryption, not only those that land).
#[tokio::test(flavor = "multi_thread")]
async fn values_sealed_for_refused_rows_count_against_the_nonce_budget() {
    let db = TestDb::new().await;
    db.seed_patients(1_000).await;
    db.client.batch_execute(ARCHIVED_READ_ONLY).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let out = rekey(&["run", "--job", &job, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    let summary = json(&out);
    let rewritten = summary["values_rewritten"].as_i64().unwrap();
    let refused = summary["values_not_rotated"].as_i64().unwrap();
    assert!(refused > 0, "nothing refused: the test proves nothing");
    let counted = db
        .encryptions_under(&v2_ring().target().fingerprint())
        .await;
    // a refused value is sealed three times: in the batch that set its row
    // aside (halved down to the row, its sealed values kept), in the re-read
    // batch the database refused, and alone, refused again
    assert_eq!(
        counted,
        rewritten + 3 * refused,
        "encryptions counted for {rewritten} values written and {refused} refused"
    );
}

/// The one reason and detail recorded for the values not rotated.
async fn recorded_refusals(db: &TestDb) -> Vec<(String, Option<String>)> {
    db.client
        .query("SELECT DISTINCT reason, detail FROM rekey.not_rotated", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

// A constraint added NOT VALID holds for new rows only; a legacy row that
// breaks it cannot be updated at all (SQLSTATE 23514), rekey's write included.
#[tokio::test(flavor = "multi_thread")]
async fn a_check_constraint_that_legacy_rows_break_leaves_only_those_reported_as_not_rotated() {
    let db = TestDb::new().await;
    db.seed_patients(1_000).await;
    db.client
        .batch_execute(
            "UPDATE patient_persons SET name = '' WHERE id % 10 = 0;
             ALTER TABLE patient_persons ADD CONSTRAINT named CHECK (name <> '') NOT VALID;",
        )
        .await
        .unwrap();
    assert_refused_writes_end_as_not_rotated(&db, 1_000, every_tenth_row, &[]).await;
    assert_eq!(
        recorded_refusals(&db).await,
        vec![(
            "write_rejected".to_string(),
            Some(
                "23514: new row for relation \"patient_persons\" violates check constraint \"named\""
                    .to_string()
            )
        )]
    );
}

// A deferred constraint trigger refuses at COMMIT, not at the UPDATE: the
// batch's whole transaction fails there, and is halved down to the rows
// refused all the same.
#[tokio::test(flavor = "multi_thread")]
async fn a_deferred_constraint_trigger_that_refuses_some_rows_at_commit_leaves_only_those_not_rotated(
) {
    let db = TestDb::new().await;
    db.seed_patients(1_000).await;
    db.client
        .batch_execute(
            "CREATE FUNCTION archived_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF NEW.id % 10 = 0 THEN RAISE EXCEPTION 'archived patients are read-only'; END IF;
               RETURN NULL;
             END $$;
             CREATE CONSTRAINT TRIGGER archived_at_commit AFTER UPDATE ON patient_persons
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION archived_at_commit();",
        )
        .await
        .unwrap();
    assert_refused_writes_end_as_not_rotated(&db, 1_000, every_tenth_row, &[]).await;
    assert_eq!(
        recorded_refusals(&db).await,
        vec![(
            "write_rejected".to_string(),
            Some("P0001: archived patients are read-only".to_string())
        )]
    );
}

// Before: a damaged value in a row the database refused was quarantined on
// the re-read, counted in values_failed, and missing from `failures`.
#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_value_in_a_refused_row_is_listed_in_the_runs_failures() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    db.client
        .batch_execute(
            "UPDATE patient_persons
                SET emergency_contact_phone_encrypted =
                    overlay(emergency_contact_phone_encrypted placing '\\xff'::bytea from 20 for 1)
              WHERE id = 10;",
        )
        .await
        .unwrap();
    db.client.batch_execute(ARCHIVED_READ_ONLY).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let out = rekey(&["run", "--job", &j, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    let summary = json(&out);
    let failures: Vec<(String, String)> = summary["failures"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| {
                    (
                        f["column"].as_str().unwrap_or_default().to_string(),
                        f["key"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        (summary["values_failed"].as_u64(), failures),
        (
            Some(1),
            vec![(
                "emergency_contact_phone_encrypted".to_string(),
                "(10)".to_string()
            )]
        ),
        "{summary}"
    );
}

// A table that refuses every row is not halved down to each of its rows:
// past the limit of rows refused one by one, the run stops with the error,
// and nothing of the table is changed.
#[tokio::test(flavor = "multi_thread")]
async fn a_trigger_that_raises_for_every_row_stops_the_run_once_more_rows_than_the_limit_are_refused(
) {
    let db = TestDb::new().await;
    db.seed_patients(1_500).await;
    db.client
        .batch_execute(
            "CREATE FUNCTION read_only() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'patients are read-only'; END $$;
             CREATE TRIGGER read_only BEFORE UPDATE ON patient_persons FOR EACH ROW EXECUTE FUNCTION read_only();",
        )
        .await
        .unwrap();
    let before = db.decrypted_patients(&v1_ring()).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let out = rekey(&["run", "--job", &j, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let error = json(&out);
    let message = error["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("refused the write of more than 1000 rows")
            && message.contains("patients are read-only"),
        "the error names the limit and the database's words: {error}"
    );
    assert!(
        error["hint"]
            .as_str()
            .is_some_and(|h| h.contains("the database refused the write itself")
                && h.contains("running again fails the same way")),
        "{error}"
    );
    assert_eq!(db.decrypted_patients(&v1_ring()).await, before);

    // The limit is the job's: run again (as a retrying scheduler would) and
    // no more rows are set aside; before, each run set aside another 1000
    // and the last one recorded them all as not rotated, exit 4.
    let set_aside = || async {
        db.client
            .query_one("SELECT count(*) FROM rekey.conflicts", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let first = set_aside().await;
    assert!((1..=1000).contains(&first), "{first} rows set aside");
    let out = rekey(&["run", "--job", &j, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let message = json(&out)["error"].as_str().unwrap_or_default().to_string();
    assert!(
        message.contains(&format!(
            "({first} set aside or recorded by its runs so far"
        )) && message.contains("`rekey run --restart` starts the job over"),
        "{message}"
    );
    assert_eq!(
        set_aside().await,
        first,
        "the second run set aside more rows"
    );
    assert_eq!(db.decrypted_patients(&v1_ring()).await, before);
}

// A constraint's refusal carries the refused row in its DETAIL ("Failing
// row contains (...)", every column, plaintext ones too). The warning for
// each row kept to the server's words; the error that stopped the run
// printed the driver's whole error. Today: "... 23514: ERROR: new row for
// relation \"patient_persons\" violates check constraint \"frozen\"
// DETAIL: Failing row contains (1001, patient 1001, \\x..., private note of 1001)"
#[tokio::test(flavor = "multi_thread")]
async fn the_error_that_stops_a_run_past_the_refusal_limit_does_not_show_the_refused_row() {
    let db = TestDb::new().await;
    db.seed_patients(1_100).await;
    db.client
        .batch_execute(
            "UPDATE patient_persons SET notes = 'private note of ' || id;
             ALTER TABLE patient_persons ADD CONSTRAINT frozen CHECK (false) NOT VALID;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let out = rekey(&["run", "--job", &j, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let message = json(&out)["error"].as_str().unwrap_or_default().to_string();
    assert!(
        message.contains("refused the write of more than 1000 rows")
            && message.contains("violates check constraint \"frozen\""),
        "the error names the limit and the database's words: {message}"
    );
    for row in ["Failing row", "patient ", "private note"] {
        assert!(!printed(&out).contains(row), "{row}: {}", printed(&out));
    }
}

// rekey's UPDATE of a table reaches the rows of its inheritance children
// (and partitions), whose own BEFORE UPDATE triggers fire on them. Before:
// the warning up front looked at the target alone, and said nothing of a
// child's trigger that refuses every write (the sink's check still
// reported the child's values as not rotated, exit 4).
#[tokio::test(flavor = "multi_thread")]
async fn a_refusing_trigger_of_an_inheritance_child_is_named_up_front_with_the_child() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    db.client
        .batch_execute(
            "CREATE TABLE patient_archive () INHERITS (patient_persons);
             WITH moved AS (DELETE FROM ONLY patient_persons WHERE id > 90 RETURNING *)
             INSERT INTO patient_archive SELECT * FROM moved;
             CREATE FUNCTION skip_all() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RETURN NULL; END $$;
             CREATE TRIGGER skip_all BEFORE UPDATE ON patient_archive FOR EACH ROW EXECUTE FUNCTION skip_all();",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let out = rekey(&["run", "--job", &job, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert!(
        stderr(&out).contains("public.patient_archive has BEFORE UPDATE triggers (skip_all)"),
        "{}",
        printed(&out)
    );
    assert!(
        !stderr(&out).contains("public.patient_persons has BEFORE UPDATE triggers"),
        "{}",
        printed(&out)
    );
}
