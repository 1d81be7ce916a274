//! A trigger that copies the old row elsewhere (a history or audit table)
//! on each row a run rewrites keeps the old values under the old key, out
//! of the job's targets: the run says so before it writes and with its
//! totals, naming the trigger and the fixes.

use super::*;

/// A history table that a trigger fills with the old phone of each row updated.
const HISTORY: &str = "
    CREATE TABLE patient_history (id bigint, phone_encrypted bytea, changed_at timestamptz DEFAULT now());
    CREATE FUNCTION keep_old_phone() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO patient_history (id, phone_encrypted) VALUES (OLD.id, OLD.phone_encrypted);
        RETURN NULL;
    END $$;
    CREATE TRIGGER keep_old_phone AFTER UPDATE ON patient_persons
        FOR EACH ROW EXECUTE FUNCTION keep_old_phone();";

// Before this warning: exit 0, no word, and patient_history held 100 copies
// of the phones under key 1, which retiring key 1 leaves unreadable.
#[tokio::test(flavor = "multi_thread")]
async fn a_trigger_that_copies_the_old_row_is_named_before_the_run_writes_and_with_its_totals() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    db.client.batch_execute(HISTORY).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let out = rekey(&["run", "--job", &job, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let warnings = json(&out)["warnings"].clone();
    let warning = warnings
        .as_array()
        .and_then(|w| {
            w.iter()
                .find_map(|w| w.as_str().filter(|w| w.contains("keep_old_phone")))
        })
        .unwrap_or_else(|| panic!("no warning names the trigger: {warnings}"));
    for words in [
        "public.patient_persons",
        "reads the old row",
        "under the old key",
        "list that table as a target",
        "DISABLE TRIGGER \"keep_old_phone\"",
    ] {
        assert!(warning.contains(words), "{words:?} missing: {warning}");
    }
    // said before the run wrote, on stderr
    assert!(stderr(&out).contains("keep_old_phone"), "{}", stderr(&out));
    // what it warns of: the copies are on key 1
    let copies: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM patient_history WHERE get_byte(phone_encrypted, 0) = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(copies > 0, "the trigger copied nothing");
}

// rekey's UPDATE of a table reaches the rows of its inheritance children,
// whose own triggers fire on them: a child's copying trigger is named too,
// with the child's name.
#[tokio::test(flavor = "multi_thread")]
async fn a_copying_trigger_of_an_inheritance_child_is_named_with_the_child() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    db.client
        .batch_execute(&format!(
            "{HISTORY}
             DROP TRIGGER keep_old_phone ON patient_persons;
             CREATE TABLE patient_archive () INHERITS (patient_persons);
             CREATE TRIGGER keep_old_phone AFTER UPDATE ON patient_archive
                 FOR EACH ROW EXECUTE FUNCTION keep_old_phone();"
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let out = rekey(&["run", "--job", &job, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let warnings = json(&out)["warnings"].to_string();
    assert!(
        warnings.contains("public.patient_archive: trigger keep_old_phone"),
        "{warnings}"
    );
}

// `rekey rotate` runs the same re-encryption, and goes on to retire the key
// the copies need: it names the trigger too.
#[tokio::test(flavor = "multi_thread")]
async fn rotate_names_a_trigger_that_copies_the_old_row() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    db.client.batch_execute(HISTORY).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (job, _keyring) = keyring_file_job(&db, &dir);
    let out = rekey(&["rotate", "--job", &job, "--no-wait"], &keyring_pass_env());
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("warning: public.patient_persons: trigger keep_old_phone"),
        "{}",
        printed(&out)
    );
}

// A trigger that does not read the old row (it stamps the new one), and
// one that reads it only on an update of a column rekey does not write,
// copy nothing a run leaves behind: no warning.
#[tokio::test(flavor = "multi_thread")]
async fn a_trigger_that_only_touches_the_new_row_is_not_warned_of() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    db.client
        .batch_execute(
            "ALTER TABLE patient_persons ADD COLUMN changed_at timestamptz;
             CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN NEW.changed_at := now(); RETURN NEW; END $$;
             CREATE TRIGGER stamp BEFORE UPDATE ON patient_persons FOR EACH ROW EXECUTE FUNCTION stamp();
             CREATE TABLE stamp_history (id bigint, changed_at timestamptz);
             CREATE FUNCTION keep_old_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO stamp_history VALUES (OLD.id, OLD.changed_at); RETURN NULL; END $$;
             CREATE TRIGGER keep_old_stamp AFTER UPDATE OF changed_at ON patient_persons
                 FOR EACH ROW EXECUTE FUNCTION keep_old_stamp();",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let out = rekey(&["run", "--job", &job, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    // the BEFORE trigger's caution (it may change a write) alone
    let warnings = json(&out)["warnings"].as_array().unwrap().clone();
    assert!(
        warnings.iter().all(|w| w
            .as_str()
            .unwrap()
            .contains("has BEFORE UPDATE triggers (stamp)")),
        "{}",
        printed(&out)
    );
}

// What the warning advises works: with the history table listed as a
// target, the copies the run's own writes make behind it keep it from
// saying done, and the next run leaves every copy on the new key.
#[tokio::test(flavor = "multi_thread")]
async fn a_history_table_listed_as_a_target_ends_with_every_copy_on_the_new_key() {
    let db = TestDb::new().await;
    let rows = 300;
    db.seed_patients(rows).await;
    db.client.batch_execute(HISTORY).await.unwrap();
    db.client
        .batch_execute("ALTER TABLE patient_history ADD COLUMN history_id bigserial PRIMARY KEY")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);
    // the history table first, read by the one lane before the copies are
    // made: whatever the machine's pace, they are made behind the run
    let text = std::fs::read_to_string(&job).unwrap();
    let at = text.find("[[target]]").unwrap();
    std::fs::write(
        &job,
        format!("{}[[target]]\ntable = \"patient_history\"\ncolumns = [\"phone_encrypted\"]\nformat = \"versioned-gcm\"\n\n{}", &text[..at], &text[at..]),
    )
    .unwrap();
    let job = job.display().to_string();
    let first = rekey(
        &["run", "--job", &job, "--json", "--workers", "1"],
        &seed_env(),
    );
    assert_eq!(first.status.code(), Some(4), "{}", printed(&first));
    assert_eq!(
        json(&first)["written_behind"][0]["table"],
        "public.patient_history",
        "{}",
        printed(&first)
    );
    let second = rekey(&["run", "--job", &job, "--json"], &seed_env());
    assert_eq!(second.status.code(), Some(0), "{}", printed(&second));
    let (copies, on_key_2): (i64, i64) = {
        let r = db
            .client
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE get_byte(phone_encrypted, 0) = 2) FROM patient_history",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(copies, rows, "one copy per row the first run rewrote");
    assert_eq!(on_key_2, copies);
}
