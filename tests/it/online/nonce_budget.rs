//! The nonce budget (2^32 random nonces per key): a key near it is refused
//! before any write, a batch that would take it past is refused before it
//! writes and the run stops, a batch's values are counted before it writes
//! (so what a batch that fails for good sealed is counted, and the count
//! holds no lock while the batch waits for rows), and near the budget
//! batches count one at a time without being halved.

use rekey::crypto::codec::Codec;
use tokio_postgres::Client;

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_key_near_its_nonce_budget_is_refused_before_any_write() {
    let (db, _dir, j) = patients(100).await;
    let out = rekey(&["run", "--job", &j, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let fingerprint = v2_ring().target().fingerprint();
    let used = db.encryptions_under(&fingerprint).await;
    assert_eq!(
        used,
        values(100),
        "every encryption under the new key is counted"
    );

    // the key has (nearly) used up its 2^32 random nonces; new old-key rows arrive
    db.client
        .execute(
            "UPDATE rekey.key_usage SET encryptions = CASE WHEN shard = (SELECT min(shard) FROM rekey.key_usage WHERE fingerprint = $1) THEN 4294967290 ELSE 0 END WHERE fingerprint = $1",
            &[&fingerprint],
        )
        .await
        .unwrap();
    let stale = v1_codec();
    let mut value = Vec::new();
    stale.seal(b"+15550000000", b"", None, &mut value);
    db.client
        .execute(
            "INSERT INTO patient_persons (id, name, phone_encrypted) VALUES (100001, 'late', $1)",
            &[&value],
        )
        .await
        .unwrap();
    db.client
        .execute(
            "INSERT INTO patient_persons (id, name, phone_encrypted) VALUES (100002, 'late', $1)",
            &[&value],
        )
        .await
        .unwrap();
    db.client
        .execute(
            "INSERT INTO patient_persons (id, name, phone_encrypted) VALUES (100003, 'late', $1)",
            &[&value],
        )
        .await
        .unwrap();
    db.client
        .execute(
            "INSERT INTO patient_persons (id, name, phone_encrypted) VALUES (100004, 'late', $1)",
            &[&value],
        )
        .await
        .unwrap();
    let before = db.checksum("patient_persons").await;
    let out = rekey(&["run", "--job", &j, "--json", "--restart"], &seed_env());
    assert_refused_for_the_budget(&db, &out, &before).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_that_would_take_its_key_past_the_nonce_budget_is_refused_before_it_writes_and_the_run_stops(
) {
    let (db, _dir, j) = patients(20_000).await;
    let mut child = spawn_captured(&[
        "run",
        "--job",
        &j,
        "--json",
        "--batch-size",
        "200",
        "--workers",
        "1",
        "--max-rows-per-sec",
        "5000",
    ]);
    wait_for_progress(&db, &mut child, 1_000).await;
    // another job (or process) sealing under the same key spends the budget
    // meanwhile, counting as rekey does near the budget: the key's lock alone
    let fingerprint = v2_ring().target().fingerprint();
    let mut other = connect(&db.url).await;
    let spent = other.transaction().await.unwrap();
    spent
        .execute(
            "SELECT pg_advisory_xact_lock(hashtext('rekey.key_usage'), hashtext($1))",
            &[&fingerprint],
        )
        .await
        .unwrap();
    spent
        .execute(
            "UPDATE rekey.key_usage SET encryptions = CASE WHEN shard = (SELECT min(shard) FROM rekey.key_usage WHERE fingerprint = $1) THEN 4294967290 ELSE 0 END WHERE fingerprint = $1",
            &[&fingerprint],
        )
        .await
        .unwrap();
    spent.commit().await.unwrap();
    let at_limit = committed(&db).await;
    let out = finish(child, Duration::from_secs(60)).await;
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("2^32") && printed(&out).contains("nothing written"),
        "{}",
        printed(&out)
    );
    let used = db.encryptions_under(&fingerprint).await;
    assert!(used <= 1 << 32, "the budget was never passed: {used}");
    // at most the batch in flight when the budget was spent committed after it
    assert!(
        committed(&db).await <= at_limit + 400,
        "{} > {at_limit} + one batch",
        committed(&db).await
    );
}

// Near its budget a key's batch waits, holding the key's lock exclusively,
// for every batch in flight beside it to commit. Before: that wait ran
// under the writer's lock_timeout, meant for rows the application holds:
// a batch in flight committing slowly (another process's, here held open)
// had the batch halved down to single rows set aside as locked, whose own
// counts then timed out too and stopped the run.
#[tokio::test(flavor = "multi_thread")]
async fn near_its_nonce_budget_a_batch_waits_past_the_lock_timeout_for_the_batches_in_flight() {
    let rows = 200;
    let (db, _dir, in_flight, mut child) = run_near_the_budget_beside_a_batch_in_flight(
        rows,
        &["--batch-size", "4", "--lock-timeout", "200ms"],
    )
    .await;
    // a batch of the run has waited for the key's lock five times its lock timeout
    let waited_long = watch_lock_waits(&db, &mut child, "advisory", |_, waited| waited > 1.0).await;
    in_flight.batch_execute("COMMIT").await.unwrap();
    let out = finish(child, Duration::from_secs(60)).await;
    assert!(
        waited_long,
        "the run never waited for the key's lock past its lock timeout: {}",
        printed(&out)
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["values_not_rotated"], 0, "{}", printed(&out));
    db.assert_every_value_rotated(rows).await;
}

// Before: a wait for the count cut short (here by the statement timeout)
// was taken for a row lock: the batch was halved, and halved again, down
// to single rows set aside as locked, though halving cannot shorten a
// wait for other batches to commit.
#[tokio::test(flavor = "multi_thread")]
async fn near_its_nonce_budget_a_batch_whose_wait_for_the_count_runs_out_waits_and_tries_again_whole(
) {
    let rows = 200;
    let (db, _dir, in_flight, mut child) = run_near_the_budget_beside_a_batch_in_flight(
        rows,
        &["--batch-size", "4", "--statement-timeout", "1s"],
    )
    .await;
    // the first wait ran out, and a batch waits again
    let mut first = None;
    let waited_again = watch_lock_waits(&db, &mut child, "advisory", |began, _| {
        *first.get_or_insert(began) != began
    })
    .await;
    in_flight.batch_execute("COMMIT").await.unwrap();
    let out = finish(child, Duration::from_secs(60)).await;
    let said = printed(&out);
    assert!(
        waited_again,
        "the run never waited for the count again: {said}"
    );
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("waiting for the key's lock while other batches count"),
        "the retry does not say what the batch waited for: {said}"
    );
    assert!(
        !said.contains("retrying in halves"),
        "a batch whose wait for the count ran out was halved: {said}"
    );
    assert_eq!(json(&out)["values_not_rotated"], 0, "{said}");
    db.assert_every_value_rotated(rows).await;
}

// Before: a batch counted its values after its UPDATE, so near the budget
// the rows it had swapped stayed locked, the application's writes to them
// waiting, for as long as the batches in flight beside it took to commit.
#[tokio::test(flavor = "multi_thread")]
async fn near_its_nonce_budget_a_batch_waiting_for_the_count_holds_none_of_the_tables_rows() {
    let rows = 200;
    let (db, _dir, in_flight, mut child) =
        run_near_the_budget_beside_a_batch_in_flight(rows, &["--batch-size", "1000"]).await;
    let waiting = watch_lock_waits(&db, &mut child, "advisory", |_, _| true).await;
    // the application locks every row of the table, waiting for none
    let app = connect(&db.url).await;
    app.batch_execute("BEGIN").await.unwrap();
    let locked = app
        .query("SELECT id FROM patient_persons FOR UPDATE NOWAIT", &[])
        .await
        .map(|r| r.len() as i64)
        .map_err(|e| db_error(&e));
    app.batch_execute("ROLLBACK").await.unwrap();
    in_flight.batch_execute("COMMIT").await.unwrap();
    let out = finish(child, Duration::from_secs(60)).await;
    assert!(
        waiting,
        "the run never waited for the count: {}",
        printed(&out)
    );
    assert_eq!(
        locked,
        Ok(rows),
        "rows held while a batch waited for the count"
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(rows).await;
}

// Before: a batch counted its values first in its own transaction, so
// while it waited for a row the application held, it held the key's count
// lock (shared) and its count row: a batch near the budget, or another
// session counting into the same row, waited for the application too.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_waiting_for_a_row_the_application_holds_holds_no_lock_of_the_nonce_count() {
    let rows = 200;
    let (db, _dir, j) = patients(rows).await;
    let app = connect(&db.url).await;
    app.batch_execute("BEGIN; SELECT id FROM patient_persons WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let mut child = spawn_captured(&[
        "run",
        "--job",
        &j,
        "--json",
        "--workers",
        "1",
        "--lock-timeout",
        "30s",
    ]);
    let waiting = watch_lock_waits(&db, &mut child, "transactionid", |_, _| true).await;
    // another process's count, near the budget: the key's lock alone, and every count row
    let other = connect(&db.url).await;
    other.batch_execute("BEGIN").await.unwrap();
    let alone: bool = other
        .query_one(
            "SELECT pg_try_advisory_xact_lock(hashtext('rekey.key_usage'), hashtext($1))",
            &[&v2_ring().target().fingerprint()],
        )
        .await
        .unwrap()
        .get(0);
    let rows_free = other
        .query("SELECT 1 FROM rekey.key_usage FOR UPDATE NOWAIT", &[])
        .await
        .map(|r| r.len())
        .map_err(|e| db_error(&e));
    other.batch_execute("ROLLBACK").await.unwrap();
    app.batch_execute("COMMIT").await.unwrap();
    let out = finish(child, Duration::from_secs(60)).await;
    assert!(
        waiting,
        "the run never waited for the row: {}",
        printed(&out)
    );
    assert!(
        alone,
        "the key's count lock was held while a batch waited for a row"
    );
    assert!(
        rows_free.is_ok(),
        "a count row was locked while a batch waited for a row: {rows_free:?}"
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(rows).await;
}

// Before: far from the budget a count decided, took the key's lock shared
// and added its values in one statement, from one view of the sum: a count
// near the budget that committed while it waited for the lock was not in
// that view, and the two together passed the budget.
#[tokio::test(flavor = "multi_thread")]
async fn a_count_whose_view_of_the_sum_is_overtaken_while_it_waits_for_the_lock_keeps_the_budget() {
    let rows = 100;
    let (db, _dir, j) = patients(rows).await;
    let (fingerprint, _) = db.near_its_nonce_budget().await;
    let far = (1i64 << 32) - (1 << 29);
    db.client
        .execute(
            "UPDATE rekey.key_usage SET encryptions = $2 WHERE fingerprint = $1",
            &[&fingerprint, &far],
        )
        .await
        .unwrap();
    // another process's count near the budget: the key's lock alone, its
    // values added, not yet committed
    let near = (1i64 << 32) - 10;
    let other = connect(&db.url).await;
    other.batch_execute("BEGIN").await.unwrap();
    other
        .execute(
            "SELECT pg_advisory_xact_lock(hashtext('rekey.key_usage'), hashtext($1))",
            &[&fingerprint],
        )
        .await
        .unwrap();
    other
        .execute(
            "UPDATE rekey.key_usage SET encryptions = $2 WHERE fingerprint = $1",
            &[&fingerprint, &near],
        )
        .await
        .unwrap();
    let before = db.checksum("patient_persons").await;
    let mut child = spawn_captured(&["run", "--job", &j, "--json", "--workers", "1"]);
    let waited = watch_lock_waits(&db, &mut child, "advisory", |_, _| true).await;
    other.batch_execute("COMMIT").await.unwrap();
    let out = finish(child, Duration::from_secs(60)).await;
    assert!(
        waited,
        "the run's count never waited for the key's lock: {}",
        printed(&out)
    );
    assert_eq!(
        db.encryptions_under(&fingerprint).await,
        near,
        "the budget was passed, or a refused count recorded"
    );
    assert_refused_for_the_budget(&db, &out, &before).await;
}

// Before: a batch that failed for good (an error no retry helps, every try
// used) stopped the run uncounted (its count was rolled back with it),
// though its values, sealed under the new key with fresh nonces, had
// reached the server in the writes that failed; the next run seals those
// rows afresh.
#[tokio::test(flavor = "multi_thread")]
async fn what_a_batch_that_failed_for_good_sealed_counts_against_the_nonce_budget() {
    // fewer rows than a run's first page holds: one batch holds them all
    let (db, _dir, j) = patients(100).await;
    // a trigger with a bug: every update of the table fails (division by zero)
    db.client
        .batch_execute(
            "CREATE FUNCTION visit_ratio() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN PERFORM 1 / (OLD.id - OLD.id); RETURN NEW; END $$;
             CREATE TRIGGER visit_ratio BEFORE UPDATE ON patient_persons FOR EACH ROW EXECUTE FUNCTION visit_ratio();",
        )
        .await
        .unwrap();
    let before = db.checksum("patient_persons").await;
    let sealed = db.encrypted_values().await;
    let out = rekey(
        &["run", "--job", &j, "--json", "--workers", "1"],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(
        printed(&out).contains("division by zero"),
        "{}",
        printed(&out)
    );
    assert_eq!(
        db.checksum("patient_persons").await,
        before,
        "nothing written"
    );
    assert_eq!(
        db.encryptions_under(&v2_ring().target().fingerprint())
            .await,
        sealed,
        "the values of the batch that failed are counted"
    );
}

/// A run (`run --json --workers 1`, then `extra`) over `rows` seeded
/// patients whose target key is near its nonce budget, started while a
/// batch in flight elsewhere holds the key's lock shared: the database, the
/// job's folder, that batch's session (`COMMIT` ends it) and the run.
async fn run_near_the_budget_beside_a_batch_in_flight(
    rows: i64,
    extra: &[&str],
) -> (TestDb, tempfile::TempDir, Client, std::process::Child) {
    let (db, dir, j) = patients(rows).await;
    let (fingerprint, _) = db.near_its_nonce_budget().await;
    let in_flight = batch_in_flight(&db, &fingerprint).await;
    let mut args = vec!["run", "--job", &j, "--json", "--workers", "1"];
    args.extend_from_slice(extra);
    let child = spawn_captured(&args);
    (db, dir, in_flight, child)
}

/// A batch in flight in another session (another process's): the key
/// with `fingerprint` held shared until the returned session commits.
async fn batch_in_flight(db: &TestDb, fingerprint: &str) -> Client {
    let other = connect(&db.url).await;
    other.batch_execute("BEGIN").await.unwrap();
    other
        .execute(
            "SELECT pg_advisory_xact_lock_shared(hashtext('rekey.key_usage'), hashtext($1))",
            &[&fingerprint],
        )
        .await
        .unwrap();
    other
}

/// Watches the run's sessions waiting for a lock of the kind `event`
/// (`advisory`: a key's count lock; `transactionid`: a row another
/// transaction holds) until `enough` holds for one (when its wait began
/// and how long it has waited, in seconds), or the run ends first; returns
/// whether it held. Fails the test after a minute.
async fn watch_lock_waits(
    db: &TestDb,
    child: &mut std::process::Child,
    event: &str,
    mut enough: impl FnMut(f64, f64) -> bool,
) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let wait = db
            .client
            .query_opt(
                "SELECT extract(epoch FROM query_start)::float8, extract(epoch FROM clock_timestamp() - query_start)::float8
                   FROM pg_stat_activity WHERE application_name = 'rekey' AND datname = current_database()
                                            AND wait_event_type = 'Lock' AND wait_event = $1
                  ORDER BY query_start LIMIT 1",
                &[&event],
            )
            .await
            .unwrap();
        if wait.is_some_and(|w| enough(w.get(0), w.get(1))) {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        assert!(
            Instant::now() < deadline,
            "no {event} lock wait seen in a minute"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that the run `out` was refused for the nonce budget (exit 2,
/// naming 2^32) and wrote nothing: the table's checksum is still `before`.
async fn assert_refused_for_the_budget(db: &TestDb, out: &Output, before: &str) {
    assert_eq!(out.status.code(), Some(2), "{}", printed(out));
    assert!(printed(out).contains("2^32"), "{}", printed(out));
    assert_eq!(
        db.checksum("patient_persons").await,
        before,
        "nothing written"
    );
}
