//! Formats whose values do not show their key (raw AES-GCM): an application
//! writing under the old key behind the run, into rows the run has already
//! rotated, keeps `run` from saying done, and so does a value no key opens;
//! a transaction begun before the run and committed during it too. The run
//! cannot count such rows by their first bytes; it opens the rows others
//! wrote while its job ran. A finished rotation of such values is complete.

use rekey::crypto::codec::{Codec, Format};
use rekey::crypto::keyring::{Key, Keyring};

use super::*;

/// Rows of the table.
const ROWS: i64 = 20_000;

/// Raw AES-GCM under keys 1 and 2, sealing under `target`.
fn raw(target: u32) -> std::sync::Arc<dyn Codec> {
    let ring = Keyring::new(
        vec![Key::parse(1, K1).unwrap(), Key::parse(2, K2).unwrap()],
        target,
        None,
    )
    .unwrap();
    Format::RawGcm.codec(&ring).unwrap()
}

/// The ids of `blobs` whose value key `key` opens.
async fn under_key(db: &TestDb, key: u32) -> Vec<i64> {
    let codec = raw(2);
    db.client
        .query("SELECT id, b FROM blobs ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .filter(|r| {
            let value: Vec<u8> = r.get(1);
            codec.open(&value, b"").map(|o| o.key).ok() == Some(key)
        })
        .map(|r| r.get(0))
        .collect()
}

/// Table `blobs` of `rows` raw AES-GCM values under key 1.
async fn blobs(db: &TestDb, rows: i64) {
    db.client
        .batch_execute("CREATE TABLE blobs (id bigint PRIMARY KEY, b bytea)")
        .await
        .unwrap();
    let old = raw(1);
    let (mut ids, mut values, mut out) = (Vec::new(), Vec::new(), Vec::new());
    for i in 1..=rows {
        ids.push(i);
        old.seal(format!("blob {i}").as_bytes(), b"", None, &mut out);
        values.push(out.clone());
    }
    db.client
        .execute(
            "INSERT INTO blobs SELECT * FROM unnest($1::bigint[], $2::bytea[])",
            &[&ids, &values],
        )
        .await
        .unwrap();
}

/// The `[[target]]` of `blobs`.
const BLOBS_TARGET: &str =
    "[[target]]\ntable = \"blobs\"\ncolumns = [\"b\"]\nformat = \"raw-gcm\"\n";

/// A job file for `blobs` in `dir`, its keys in the environment (key 1 to
/// key 2); its path and that environment.
fn blobs_job(db: &TestDb, dir: &tempfile::TempDir) -> (String, Vec<(&'static str, String)>) {
    let job = dir.path().join("blobs.toml");
    std::fs::write(
        &job,
        format!(
            "[database]\nurl = \"{}\"\n[keys]\nsource = \"env\"\nprefix = \"RAW\"\n{BLOBS_TARGET}",
            db.url
        ),
    )
    .unwrap();
    let env = vec![("RAW_KEY", K1.to_string()), ("RAW_KEY_NEW", K2.to_string())];
    (job.display().to_string(), env)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_application_writing_raw_gcm_values_under_the_old_key_behind_the_run_keeps_it_from_saying_done(
) {
    let db = TestDb::new().await;
    blobs(&db, ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, env) = blobs_job(&db, &dir);
    // an application transaction that began before the run and commits during it
    let mut early = connect(&db.url).await;
    early
        .batch_execute("CREATE TABLE side (x int)")
        .await
        .unwrap();
    let early = early.transaction().await.unwrap();
    early
        .execute("INSERT INTO side VALUES (1)", &[])
        .await
        .unwrap();
    let run = rekey_cmd(
        &[
            "run",
            "--job",
            &job,
            "--json",
            "--batch-size",
            "500",
            "--max-rows-per-sec",
            "4000",
        ],
        &env,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    while committed(&db).await < 4_000 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // the application writes under the old key into rows the run has rotated,
    // and a value no key opens
    let rotated = under_key(&db, 2).await;
    assert!(rotated.len() >= 55, "{}", rotated.len());
    let (old, mut value) = (raw(1), Vec::new());
    for id in &rotated[..20] {
        old.seal(format!("late {id}").as_bytes(), b"", None, &mut value);
        early
            .execute("UPDATE blobs SET b = $2 WHERE id = $1", &[id, &value])
            .await
            .unwrap();
    }
    early.commit().await.unwrap();
    for id in &rotated[20..50] {
        old.seal(format!("late {id}").as_bytes(), b"", None, &mut value);
        db.client
            .execute("UPDATE blobs SET b = $2 WHERE id = $1", &[id, &value])
            .await
            .unwrap();
    }
    for id in &rotated[50..55] {
        db.client
            .execute(
                "UPDATE blobs SET b = $2 WHERE id = $1",
                &[id, &vec![7u8; 40]],
            )
            .await
            .unwrap();
    }
    let out = finish(run, Duration::from_secs(120)).await;
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    // measured apart: every value key 1 still opens, and the five no key opens
    let on_old = under_key(&db, 1).await.len() as u64;
    assert!(on_old >= 50, "{on_old}");
    assert_eq!(
        json(&out)["rows_written_behind"].as_u64(),
        Some(on_old + 5),
        "{}",
        printed(&out)
    );
    // the next run rotates them (and quarantines what no key opens)
    let out = rekey(&["run", "--job", &job, "--json"], &env);
    assert_eq!(out.status.code(), Some(3), "{}", printed(&out));
    assert!(under_key(&db, 1).await.is_empty());
}

// Before: the recount took the job's start as an age in one statement and
// read the rows changed since in the next; transactions others began in
// between aged every row by as many, so rows written by a transaction
// begun just before the run fell out of the recount, and a run whose only
// rows written behind were those said done (exit 0) with them on key 1.
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_begun_before_the_run_that_writes_behind_it_keeps_it_from_saying_done_however_many_transactions_begin_as_it_ends(
) {
    let db = TestDb::new().await;
    blobs(&db, 2_000).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, env) = blobs_job(&db, &dir);
    db.client
        .batch_execute("CREATE TABLE side (x int)")
        .await
        .unwrap();
    // an application transaction that began before the run (its xid taken)
    let mut early = connect(&db.url).await;
    let early = early.transaction().await.unwrap();
    let early_xid: i64 = early
        .query_one("SELECT txid_current()", &[])
        .await
        .unwrap()
        .get(0);
    let mut run = rekey_cmd(
        &[
            "run",
            "--job",
            &job,
            "--json",
            "--workers",
            "1",
            "--batch-size",
            "500",
            "--max-rows-per-sec",
            "1000",
        ],
        &env,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    while committed(&db).await < 500 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // the batch that finishes the table waits for the test before it commits
    db.client
        .batch_execute(
            "SELECT pg_advisory_lock(4242);
             CREATE FUNCTION hold_the_last_batch() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NEW; END $$;
             CREATE TRIGGER hold_the_last_batch AFTER UPDATE ON rekey.progress FOR EACH ROW
               WHEN (NEW.done AND NOT OLD.done) EXECUTE FUNCTION hold_the_last_batch();",
        )
        .await
        .unwrap();
    until(
        &db,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        &mut run,
        "the last batch waiting",
    )
    .await;
    // the early transaction writes under key 1 into rows the run has rotated
    let rotated = under_key(&db, 2).await;
    assert!(rotated.len() >= 20, "{}", rotated.len());
    let (old, mut value) = (raw(1), Vec::new());
    for id in &rotated[..20] {
        old.seal(format!("late {id}").as_bytes(), b"", None, &mut value);
        early
            .execute("UPDATE blobs SET b = $2 WHERE id = $1", &[id, &value])
            .await
            .unwrap();
    }
    early.commit().await.unwrap();
    // the recount's read of the table waits behind a lock taken once the last batch commits
    let mut locker = connect(&db.url).await;
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let locked = tokio::spawn(async move {
        let tx = locker.transaction().await.unwrap();
        tx.batch_execute("LOCK TABLE blobs IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        released.await.unwrap();
        tx.commit().await.unwrap();
    });
    until(
        &db,
        "SELECT count(*) FROM pg_locks WHERE relation = 'blobs'::regclass AND mode = 'AccessExclusiveLock'",
        &mut run,
        "the table's lock asked for",
    )
    .await;
    db.client
        .execute("SELECT pg_advisory_unlock(4242)", &[])
        .await
        .unwrap();
    until(
        &db,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
            AND application_name = 'rekey' AND wait_event_type = 'Lock' AND query LIKE '%rekey row%'",
        &mut run,
        "the recount waiting for the table",
    )
    .await;
    // meanwhile others begin more transactions than were begun between the
    // early transaction and the job's start (one per subtransaction written)
    let started: i64 = db
        .client
        .query_one("SELECT started_xid FROM rekey.jobs", &[])
        .await
        .unwrap()
        .get(0);
    let burn = early_xid - started + 10;
    let before: i64 = db
        .client
        .query_one("SELECT txid_snapshot_xmax(txid_current_snapshot())", &[])
        .await
        .unwrap()
        .get(0);
    db.client
        .batch_execute(&format!(
            "DO $$ BEGIN FOR i IN 1..{burn} LOOP
                 BEGIN INSERT INTO side VALUES (i); EXCEPTION WHEN OTHERS THEN NULL; END;
               END LOOP; END $$"
        ))
        .await
        .unwrap();
    let after: i64 = db
        .client
        .query_one("SELECT txid_snapshot_xmax(txid_current_snapshot())", &[])
        .await
        .unwrap()
        .get(0);
    assert!(after - before >= burn, "{before} {after} {burn}");
    release.send(()).unwrap();
    locked.await.unwrap();
    let out = finish(run, Duration::from_secs(120)).await;
    let on_old = under_key(&db, 1).await.len() as u64;
    assert_eq!(on_old, 20);
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert_eq!(
        json(&out)["rows_written_behind"].as_u64(),
        Some(on_old),
        "{}",
        printed(&out)
    );
}

// Before: `rotate` after a finished rotation of raw AES-GCM values said "N
// values are not on key 2" for every value (exit 4), as a count by key
// cannot see which key such a value is under; `run` then exited 0.
#[tokio::test(flavor = "multi_thread")]
async fn a_finished_rotation_of_values_that_do_not_show_their_key_is_complete() {
    let db = TestDb::new().await;
    blobs(&db, 300).await;
    let dir = tempfile::tempdir().unwrap();
    let (patients, _keyring) = keyring_file_job(&db, &dir);
    let database_and_keys = std::fs::read_to_string(&patients)
        .unwrap()
        .split("[[target]]")
        .next()
        .unwrap()
        .to_string();
    let job = dir.path().join("blobs.toml");
    std::fs::write(&job, format!("{database_and_keys}{BLOBS_TARGET}")).unwrap();
    let job = job.display().to_string();
    let rotate = |extra: &[&str]| {
        let mut args = vec!["rotate", "--job", job.as_str(), "--json"];
        args.extend_from_slice(extra);
        rekey(&args, &keyring_pass_env())
    };
    let out = rotate(&["--no-wait", "--grace", "0s"]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = rotate(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(printed(&out).contains("is complete"), "{}", printed(&out));
}

/// A history table of `blobs`, listed in the job, that a trigger fills
/// with the old value of each row updated: rekey's own writes make rows
/// under key 1, in its own transactions.
const BLOB_HISTORY: &str = "
    CREATE TABLE blob_history (history_id bigserial PRIMARY KEY, id bigint, b bytea);
    CREATE FUNCTION keep_old_blob() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO blob_history (id, b) VALUES (OLD.id, OLD.b);
        RETURN NULL;
    END $$;
    CREATE TRIGGER keep_old_blob AFTER UPDATE ON blobs
        FOR EACH ROW EXECUTE FUNCTION keep_old_blob();";

// Before: the recount of values that do not show their key opens only the
// rows others wrote, taking every row written in one of the run's own
// transactions for one it rotated; the copies a trigger made there under
// key 1 were passed over, and the run said done (exit 0) with them on it.
#[tokio::test(flavor = "multi_thread")]
async fn copies_a_trigger_makes_under_the_old_key_inside_the_run_s_own_writes_keep_it_from_saying_done(
) {
    let db = TestDb::new().await;
    let rows = 1_200;
    blobs(&db, rows).await;
    db.client.batch_execute(BLOB_HISTORY).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (job, env) = blobs_job(&db, &dir);
    // the history table first, read by the one lane before the copies are
    // made: whatever the machine's pace, they are made behind the run
    let text = std::fs::read_to_string(&job).unwrap();
    let at = text.find("[[target]]").unwrap();
    std::fs::write(
        &job,
        format!(
            "{}[[target]]\ntable = \"blob_history\"\ncolumns = [\"b\"]\nformat = \"raw-gcm\"\n\n{}",
            &text[..at],
            &text[at..]
        ),
    )
    .unwrap();
    let history_on = |key: u32| {
        let db = &db;
        async move {
            let codec = raw(2);
            db.client
                .query("SELECT b FROM blob_history", &[])
                .await
                .unwrap()
                .iter()
                .filter(|r| {
                    codec.open(&r.get::<_, Vec<u8>>(0), b"").map(|o| o.key).ok() == Some(key)
                })
                .count() as u64
        }
    };
    let first = rekey(
        &[
            "run",
            "--job",
            &job,
            "--json",
            "--workers",
            "1",
            "--batch-size",
            "500",
        ],
        &env,
    );
    let copies = history_on(1).await;
    assert_eq!(copies, rows as u64, "one copy per row the run rewrote");
    assert_eq!(first.status.code(), Some(4), "{}", printed(&first));
    assert_eq!(
        json(&first)["written_behind"][0]["table"],
        "public.blob_history",
        "{}",
        printed(&first)
    );
    assert_eq!(
        json(&first)["rows_written_behind"].as_u64(),
        Some(copies),
        "{}",
        printed(&first)
    );
    // the next run rotates the copies, and says done
    let second = rekey(&["run", "--job", &job, "--json"], &env);
    assert_eq!(second.status.code(), Some(0), "{}", printed(&second));
    assert_eq!(history_on(1).await, 0);
    assert_eq!(history_on(2).await, rows as u64);
}

// The same where the trigger puts a value under key 1 back into another
// row of the table itself, one the run has already rotated, in a BEFORE
// trigger or an AFTER one.
#[tokio::test(flavor = "multi_thread")]
async fn a_trigger_that_writes_the_old_key_into_rows_the_run_rotated_keeps_it_from_saying_done() {
    for timing in ["BEFORE", "AFTER"] {
        let db = TestDb::new().await;
        blobs(&db, 1_200).await;
        db.client
            .batch_execute(&format!(
                "CREATE TABLE old_blobs AS SELECT * FROM blobs;
                 CREATE FUNCTION put_back() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                     IF pg_trigger_depth() = 1 AND NEW.id > 600 AND NEW.id % 7 = 0 THEN
                         UPDATE blobs SET b = (SELECT b FROM old_blobs o WHERE o.id = NEW.id - 600)
                          WHERE id = NEW.id - 600;
                     END IF;
                     RETURN NEW;
                 END $$;
                 CREATE TRIGGER put_back {timing} UPDATE ON blobs FOR EACH ROW EXECUTE FUNCTION put_back();"
            ))
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (job, env) = blobs_job(&db, &dir);
        let out = rekey(
            &[
                "run",
                "--job",
                &job,
                "--json",
                "--workers",
                "1",
                "--batch-size",
                "100",
            ],
            &env,
        );
        let on_old = under_key(&db, 1).await.len() as u64;
        assert!(on_old > 0, "{timing}: the trigger put nothing back");
        assert_eq!(out.status.code(), Some(4), "{timing}: {}", printed(&out));
        assert_eq!(
            json(&out)["rows_written_behind"].as_u64(),
            Some(on_old),
            "{timing}: {}",
            printed(&out)
        );
    }
}

// The counts do not raise a false alarm: a history trigger that keeps the
// new value (under key 2) makes the batches' rows read again at the end,
// where they are found on the target key; the run says done.
#[tokio::test(flavor = "multi_thread")]
async fn a_trigger_that_copies_the_new_values_into_a_listed_table_lets_the_run_say_done() {
    let db = TestDb::new().await;
    let rows = 600;
    blobs(&db, rows).await;
    db.client
        .batch_execute(&BLOB_HISTORY.replace("OLD.id, OLD.b", "NEW.id, NEW.b"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (job, env) = blobs_job(&db, &dir);
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(
        &job,
        format!(
            "{text}[[target]]\ntable = \"blob_history\"\ncolumns = [\"b\"]\nformat = \"raw-gcm\"\n"
        ),
    )
    .unwrap();
    let out = rekey(&["run", "--job", &job, "--json", "--workers", "1"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let copies: i64 = db
        .client
        .query_one("SELECT count(*) FROM blob_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(copies, rows, "one copy per row rewritten");
    assert!(under_key(&db, 1).await.is_empty());
}

// A trigger that comes while the run goes on was not there for its
// batches to count what it wrote: the run does not say done, and gives
// its job up, so the next run reads every row again.
#[tokio::test(flavor = "multi_thread")]
async fn an_update_trigger_created_during_the_run_keeps_it_from_saying_done() {
    let db = TestDb::new().await;
    let rows = 300;
    blobs(&db, rows).await;
    db.client
        .batch_execute(
            "CREATE TABLE blob_history (history_id bigserial PRIMARY KEY, id bigint, b bytea);
             CREATE TABLE gate (open boolean); INSERT INTO gate VALUES (false);",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (job, env) = blobs_job(&db, &dir);
    let text = std::fs::read_to_string(&job).unwrap();
    let at = text.find("[[target]]").unwrap();
    std::fs::write(
        &job,
        format!(
            "{}[[target]]\ntable = \"blob_history\"\ncolumns = [\"b\"]\nformat = \"raw-gcm\"\n\n{}",
            &text[..at],
            &text[at..]
        ),
    )
    .unwrap();
    let run = spawn_rekey_captured(
        &[
            "run",
            "--job",
            &job,
            "--workers",
            "1",
            "--gate-sql",
            "SELECT open FROM gate",
            "--check-every",
            "100ms",
        ],
        &env,
    );
    wait_for_query(&db, "SELECT open FROM gate").await;
    db.client
        .batch_execute(
            "CREATE FUNCTION keep_old_blob() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO blob_history (id, b) VALUES (OLD.id, OLD.b); RETURN NULL; END $$;
             CREATE TRIGGER keep_old_blob AFTER UPDATE ON blobs FOR EACH ROW EXECUTE FUNCTION keep_old_blob();
             UPDATE gate SET open = true;",
        )
        .await
        .unwrap();
    let out = run.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert!(
        stderr(&out).contains(
            "public.blobs: an UPDATE trigger was created or enabled on it since the job began"
        ),
        "{}",
        printed(&out)
    );
    // the next run starts over, reads the copies and rotates them
    let out = rekey(&["run", "--job", &job], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let codec = raw(2);
    let on_target = db
        .client
        .query("SELECT b FROM blob_history", &[])
        .await
        .unwrap()
        .iter()
        .filter(|r| codec.open(&r.get::<_, Vec<u8>>(0), b"").map(|o| o.key).ok() == Some(2))
        .count() as i64;
    assert_eq!(on_target, rows);
}

// Where the server keeps no counts (`track_counts` off), a batch cannot
// tell what its transaction wrote beside its rows: it is taken as having
// written some, and the copies keep the run from saying done all the same.
#[tokio::test(flavor = "multi_thread")]
async fn without_the_server_s_counts_copies_a_trigger_makes_still_keep_the_run_from_saying_done() {
    let db = TestDb::new().await;
    blobs(&db, 400).await;
    db.client.batch_execute(BLOB_HISTORY).await.unwrap();
    db.client
        .batch_execute(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET track_counts = off', current_database()); END $$",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (job, env) = blobs_job(&db, &dir);
    let text = std::fs::read_to_string(&job).unwrap();
    let at = text.find("[[target]]").unwrap();
    std::fs::write(
        &job,
        format!(
            "{}[[target]]\ntable = \"blob_history\"\ncolumns = [\"b\"]\nformat = \"raw-gcm\"\n\n{}",
            &text[..at],
            &text[at..]
        ),
    )
    .unwrap();
    let out = rekey(&["run", "--job", &job, "--json", "--workers", "1"], &env);
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert_eq!(json(&out)["rows_written_behind"], 400, "{}", printed(&out));
}

// A trigger that came while no process ran (between two windows of a
// job, after a kill) is counted by the next process from its start, not
// by the batches before it: the job, begun without it, does not say done.
#[tokio::test(flavor = "multi_thread")]
async fn an_update_trigger_created_between_two_runs_of_a_job_keeps_it_from_saying_done() {
    let db = TestDb::new().await;
    blobs(&db, 300).await;
    db.client
        .batch_execute(
            "CREATE TABLE gate (open boolean); INSERT INTO gate VALUES (false);
             CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (job, env) = blobs_job(&db, &dir);
    let mut first = spawn_rekey(
        &[
            "run",
            "--job",
            &job,
            "--gate-sql",
            "SELECT open FROM gate",
            "--check-every",
            "100ms",
        ],
        &env,
    );
    wait_for_query(&db, "SELECT open FROM gate").await;
    first.kill().unwrap();
    first.wait().unwrap();
    db.client
        .batch_execute(
            "CREATE TRIGGER stamp BEFORE UPDATE ON blobs FOR EACH ROW EXECUTE FUNCTION stamp();
             UPDATE gate SET open = true;",
        )
        .await
        .unwrap();
    let out = rekey(&["run", "--job", &job], &env);
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert!(
        stderr(&out).contains(
            "public.blobs: an UPDATE trigger was created or enabled on it since the job began"
        ),
        "{}",
        printed(&out)
    );
    let out = rekey(&["run", "--job", &job], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}
