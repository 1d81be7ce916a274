//! Rows an application holds locked: a blocked batch is retried in halves,
//! a row locked past every retry is set aside, reported as not rotated
//! and rotated by the next run, and a deadlock while re-reading changed
//! rows is waited out.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_blocked_by_a_row_lock_is_retried_in_halves_and_the_run_finishes() {
    let (db, _dir, j) = patients(2_000).await;
    // an application transaction holds one row's lock for 1.5 s
    let mut app = connect(&db.url).await;
    let tx = app.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM patient_persons WHERE id = 1000 FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let child = spawn_captured(&[
        "run",
        "--job",
        &j,
        "--json",
        "--batch-size",
        "500",
        "--workers",
        "1",
        "--lock-timeout",
        "200ms",
    ]);
    // hold the lock until rekey has run into it three times: three distinct
    // waiting statements (each try is a new statement, with its own start)
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut waits = std::collections::BTreeSet::new();
    while waits.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "rekey ran into the locked row {} times in 30 s, not 3",
            waits.len()
        );
        waits.extend(lock_waits(&db).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tx.rollback().await.unwrap();
    let out = finish(child, Duration::from_secs(60)).await;
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let s = json(&out);
    assert!(s["retries"].as_u64().unwrap() >= 1, "{s}");
    assert!(
        printed(&out).contains("retrying in halves"),
        "{}",
        printed(&out)
    );
    assert_eq!(s["values_rewritten"], values(2_000));
    assert_all_rotated(&db, 2_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_locked_for_longer_than_every_retry_is_set_aside_reported_as_not_rotated_and_rotated_by_the_next_run(
) {
    let (db, _dir, j) = patients(1_000).await;
    let mut app = connect(&db.url).await;
    let tx = app.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM patient_persons WHERE id = 500 FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let out = rekey(
        &[
            "run",
            "--job",
            &j,
            "--json",
            "--batch-size",
            "100",
            "--workers",
            "1",
            "--lock-timeout",
            "50ms",
            "--attempts",
            "2",
        ],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    let s = json(&out);
    let locked_values: i64 = db
        .client
        .query_one("SELECT ((phone_encrypted IS NOT NULL)::int + (emergency_contact_phone_encrypted IS NOT NULL)::int)::bigint FROM patient_persons WHERE id = 500", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(s["values_not_rotated"], locked_values, "{s}");
    assert_eq!(
        s["job_totals"]["values_rewritten"],
        values(1_000) - locked_values,
        "every other value is rotated: {s}"
    );
    let reason: String = db
        .client
        .query_one(
            "SELECT reason FROM rekey.not_rotated WHERE pk_text = '(500)' LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reason, "row_locked");
    tx.rollback().await.unwrap();
    let out = rekey(&["run", "--job", &j, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        json(&out)["job_totals"]["values_rewritten"],
        locked_values,
        "the next run rotates the row"
    );
    assert_all_rotated(&db, 1_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_re_reads_at_the_end_show_in_the_progress_line_as_a_phase_of_their_own() {
    let (db, _dir, j) = patients(200).await;
    // row 100 stays locked until the re-reads at the end show in the progress line
    let mut app = connect(&db.url).await;
    let tx = app.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM patient_persons WHERE id = 100 FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let mut run = Watched::spawn(&[
        "run",
        "--job",
        &j,
        "--batch-size",
        "2",
        "--workers",
        "1",
        "--lock-timeout",
        "1s",
        "--progress-every",
        "100ms",
        "--log-format",
        "json",
    ]);
    run.said("re-reading changed rows", Duration::from_secs(60))
        .await;
    tx.rollback().await.unwrap();
    let out = run.finish(Duration::from_secs(60)).await;
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_all_rotated(&db, 200).await;
    let lines = progress_lines(&stderr(&out));
    let is_reread = |v: &serde_json::Value| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("re-reading changed rows"))
    };
    let first = lines
        .iter()
        .position(is_reread)
        .unwrap_or_else(|| panic!("no progress line of the re-reads: {lines:?}"));
    assert!(
        first > 0 && lines[first - 1]["rows_total"] == 200,
        "the rewrite's lines come first, against the table's rows: {lines:?}"
    );
    // the set-aside row is all there is to re-read, and none is done while it is locked
    let reread = &lines[first];
    assert_eq!(reread["rows_total"], 1, "{reread}");
    assert_eq!(reread["rows_done"], 0, "{reread}");
    assert_eq!(reread["percent"], 0, "{reread}");
    assert!(
        lines[first..].iter().all(is_reread),
        "once the re-reads begin, every line is theirs: {lines:?}"
    );
}

// Before: the conflict pass stopped the run at any error but a lock
// timeout or a refusal: a deadlock with the application while re-reading
// (or a serialization failure, a lost connection) ended the run with exit
// 1 and the rows left on the old key, where the main pass waits and tries
// such a batch again.
#[tokio::test(flavor = "multi_thread")]
async fn a_deadlock_while_re_reading_changed_rows_is_waited_out_and_the_run_finishes() {
    let rows = 200;
    let (db, _dir, j) = patients(rows).await;
    // the first write of each of the first 50 rows lands nowhere (they are
    // re-read at the end), and the first re-read write ends in a deadlock
    db.client
        .batch_execute(
            "CREATE TABLE skipped (id bigint PRIMARY KEY);
             CREATE SEQUENCE deadlocks;
             CREATE FUNCTION skip_then_deadlock() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF OLD.id <= 50 THEN
                 IF NOT EXISTS (SELECT 1 FROM skipped WHERE id = OLD.id) THEN
                   INSERT INTO skipped VALUES (OLD.id);
                   RETURN NULL;
                 END IF;
                 IF nextval('deadlocks') = 1 THEN
                   RAISE EXCEPTION 'deadlock detected' USING ERRCODE = 'deadlock_detected';
                 END IF;
               END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER skip_then_deadlock BEFORE UPDATE ON patient_persons FOR EACH ROW EXECUTE FUNCTION skip_then_deadlock();",
        )
        .await
        .unwrap();
    let out = rekey(&["run", "--job", &j, "--json"], &seed_env());
    assert_deadlocked_and_retried(&db, &out).await;
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let skipped: i64 = db
        .client
        .query_one("SELECT count(*) FROM skipped", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(json(&out)["conflicts"], skipped, "{}", printed(&out));
    db.assert_every_value_rotated(rows).await;
}

// Before: a deadlock that came while the re-reads went one key at a time
// (after a refusal) re-read every key of the batch again: what the keys
// before it had rotated was missing from the run's summary, and the
// refused row was refused and recorded a second time.
#[tokio::test(flavor = "multi_thread")]
async fn a_deadlock_while_re_reading_one_key_at_a_time_keeps_what_the_keys_before_it_did() {
    let rows = 200;
    let (db, _dir, j) = patients(rows).await;
    // the first write of each of the first 50 rows lands nowhere; re-read,
    // row 10 is refused (the batch goes one key at a time), and once row 10
    // is recorded as not rotated, row 20's first write ends in a deadlock
    db.client
        .batch_execute(
            "CREATE TABLE skipped (id bigint PRIMARY KEY);
             CREATE SEQUENCE deadlocks;
             CREATE FUNCTION refuse_then_deadlock() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF OLD.id <= 50 THEN
                 IF NOT EXISTS (SELECT 1 FROM skipped WHERE id = OLD.id) THEN
                   INSERT INTO skipped VALUES (OLD.id);
                   RETURN NULL;
                 END IF;
                 IF OLD.id = 10 THEN
                   RAISE EXCEPTION 'archived patients are read-only';
                 END IF;
                 IF OLD.id = 20 AND EXISTS (SELECT 1 FROM rekey.not_rotated) THEN
                   IF nextval('deadlocks') = 1 THEN
                     RAISE EXCEPTION 'deadlock detected' USING ERRCODE = 'deadlock_detected';
                   END IF;
                 END IF;
               END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER refuse_then_deadlock BEFORE UPDATE ON patient_persons FOR EACH ROW EXECUTE FUNCTION refuse_then_deadlock();",
        )
        .await
        .unwrap();
    let out = rekey(&["run", "--job", &j, "--json"], &seed_env());
    assert_deadlocked_and_retried(&db, &out).await;
    // row 10's values stay on the old key, reported
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    let after = db.decrypted_patients(&v2_ring()).await;
    let landed = after
        .values()
        .flat_map(|(p, e)| [p, e])
        .filter(|d| matches!(d, Decrypted::Plain(2, _)))
        .count() as i64;
    let summary = json(&out);
    assert_eq!(summary["values_rewritten"], landed, "{summary}");
    let recorded: i64 = db
        .client
        .query_one("SELECT count(*) FROM rekey.not_rotated", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(summary["values_not_rotated"], recorded, "{summary}");
    assert_eq!(
        values(rows) - landed,
        recorded,
        "every value rotated but the refused row's, each recorded once"
    );
}

/// Asserts the premise of a deadlock test: the `deadlocks` sequence was
/// drawn (a re-read deadlocked), and the run `out` reported its retry.
async fn assert_deadlocked_and_retried(db: &TestDb, out: &Output) {
    let deadlocked: bool = db
        .client
        .query_one("SELECT is_called FROM deadlocks", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        deadlocked,
        "the premise: a re-read deadlocked\n{}",
        printed(out)
    );
    assert!(
        printed(out).contains("deadlock detected"),
        "the retry is not reported: {}",
        printed(out)
    );
}
