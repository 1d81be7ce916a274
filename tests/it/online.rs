//! Running against a live primary: live control, throttles, timeouts, an
//! application writing during the run, and several processes sharing a job.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::{Child, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use rekey::crypto::codec::versioned_gcm::VersionedGcm;
use rekey::crypto::codec::Codec;

use crate::harness::*;

/// `rekey` in the background with its output captured.
fn spawn_captured(args: &[&str]) -> Child {
    rekey_cmd(args, &seed_env())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rekey")
}

/// Waits for a background `rekey`, failing the test after `limit`.
async fn finish(child: Child, limit: Duration) -> std::process::Output {
    let waited = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap());
    tokio::time::timeout(limit, waited)
        .await
        .expect("rekey did not finish in time")
        .unwrap()
}

/// Values committed by every job of the database so far (0 only while
/// rekey's engine state does not exist yet; a query error fails the test).
async fn committed(db: &TestDb) -> i64 {
    committed_values(db).await
}

/// rekey's sessions of this database (other tests share the cluster) whose `state` matches `states` (a SQL list).
async fn rekey_sessions(db: &TestDb, states: &str) -> i64 {
    db.client
        .query_one(
            &format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'rekey' AND datname = current_database() AND state IN ({states})"),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits until rekey has at least `n` sessions open on the database (it has
/// started its run); fails the test if that does not happen within 30 s.
async fn sessions_open(db: &TestDb, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let open: i64 = db
            .client
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'rekey' AND datname = current_database()", &[])
            .await
            .unwrap()
            .get(0);
        if open >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "waited 30 s for rekey to open {n} sessions on the test database; {open} open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A background `rekey` whose stderr is read while it runs, so that a test
/// can wait for what it says (a hold, a retry) instead of sleeping.
struct Watched {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: std::thread::JoinHandle<()>,
}

impl Watched {
    fn spawn(args: &[&str]) -> Watched {
        let mut child = spawn_captured(args);
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                match line {
                    Ok(l) => sink.lock().unwrap().push(l),
                    Err(_) => break,
                }
            }
        });
        Watched {
            child,
            lines,
            reader,
        }
    }

    fn stderr(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn has_said(&self, text: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.contains(text))
    }

    /// Waits until a line of stderr contains `text`; fails the test, with
    /// what rekey said, if it exits first or `limit` passes.
    async fn said(&mut self, text: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.has_said(text) {
            if let Some(exited) = self.child.try_wait().unwrap() {
                // it may have said it just before it exited: read to the end first
                while !self.reader.is_finished() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                assert!(
                    self.has_said(text),
                    "rekey exited ({exited}) without saying {text:?}; it said:\n{}",
                    self.stderr()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "rekey did not say {text:?} within {limit:?}; it said:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the process (failing the test after `limit`); its stderr is what was read.
    async fn finish(self, limit: Duration) -> Output {
        let out = finish(self.child, limit).await;
        self.reader.join().unwrap();
        let stderr = self.lines.lock().unwrap().join("\n").into_bytes();
        Output {
            status: out.status,
            stdout: out.stdout,
            stderr,
        }
    }
}

/// A database seeded with `rows` patients, a folder for files, and the job file's path.
async fn patients(rows: i64) -> (TestDb, tempfile::TempDir, String) {
    let db = TestDb::new().await;
    db.seed_patients(rows).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    (db, dir, job)
}

/// Every seeded value decrypts under the current key to what was seeded.
async fn assert_all_rotated(db: &TestDb, rows: i64) {
    let all = db.decrypted_patients(&v2_ring()).await;
    assert_eq!(all.len() as i64, rows);
    for (id, (p, e)) in all {
        assert_eq!(p, Decrypted::Plain(2, phone(id)), "phone of {id}");
        let want = if id % 3 == 0 {
            Decrypted::Null
        } else {
            Decrypted::Plain(2, emergency(id))
        };
        assert_eq!(e, want, "emergency phone of {id}");
    }
}

/// Values per seeded row count: every row has a phone, two in three an emergency phone.
fn values(rows: i64) -> i64 {
    rows + rows - rows / 3
}

#[tokio::test(flavor = "multi_thread")]
async fn rekey_pause_holds_every_reader_and_rekey_resume_goes_on() {
    let (db, _dir, j) = patients(30_000).await;
    let mut run = Watched::spawn(&[
        "run",
        "--job",
        &j,
        "--json",
        "--batch-size",
        "200",
        "--max-rows-per-sec",
        "5000",
    ]);
    wait_for_progress(&db, &mut run.child, 2_000).await;

    let out = rekey(&["pause", "--job", &j], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    // the run says it holds, and its batches in flight have committed: no
    // session of it is inside a statement or a transaction
    run.said("paused by `rekey pause`", Duration::from_secs(30))
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while rekey_sessions(&db, "'active', 'idle in transaction'").await > 0 {
        assert!(
            Instant::now() < deadline,
            "rekey's sessions stayed busy for 30 s after it said it was paused"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let paused_at = committed(&db).await;
    assert!(
        paused_at < values(30_000),
        "paused before the end ({paused_at} values committed)"
    );
    // Watch for a while: unpaused, this run (5000 rows/s, 200-row batches)
    // commits a batch every 40 ms or so, and reads its control every 1 s.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        committed(&db).await,
        paused_at,
        "nothing is written while paused"
    );
    let status = rekey(&["status", "--job", &j], &seed_env());
    assert!(printed(&status).contains("paused"), "{}", printed(&status));
    assert_eq!(
        rekey_sessions(&db, "'idle in transaction'").await,
        0,
        "no transaction is held open while paused"
    );

    let out = rekey(&["resume", "--job", &j], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = run.finish(Duration::from_secs(60)).await;
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["job_totals"]["values_rewritten"], values(30_000));
    assert_all_rotated(&db, 30_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rekey_stop_stops_the_run_cleanly_and_the_next_run_finishes_it() {
    let (db, _dir, j) = patients(30_000).await;
    let mut child = spawn_captured(&[
        "run",
        "--job",
        &j,
        "--json",
        "--batch-size",
        "200",
        "--max-rows-per-sec",
        "5000",
    ]);
    wait_for_progress(&db, &mut child, 2_000).await;
    let out = rekey(&["stop", "--job", &j], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let out = finish(child, Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(130), "{}", printed(&out));
    let s = json(&out);
    assert_eq!(s["stopped_by"], "rekey stop");

    let out = rekey(&["run", "--job", &j, "--json"], &seed_env());
    assert_eq!(
        out.status.code(),
        Some(0),
        "the stop is spent: the next run goes on\n{}",
        printed(&out)
    );
    assert_eq!(json(&out)["job_totals"]["values_rewritten"], values(30_000));
    assert_all_rotated(&db, 30_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_resume_and_stop_name_a_missing_job() {
    let (_db, _dir, j) = patients(10).await;
    let out = rekey(&["pause", "--job", &j], &seed_env());
    assert_eq!(out.status.code(), Some(2));
    assert!(printed(&out).contains("no job named"), "{}", printed(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_control_file_pauses_the_run_and_then_stops_it() {
    let (db, dir, j) = patients(5_000).await;
    let control = dir.path().join("control");
    std::fs::write(&control, "pause\n").unwrap();
    let c = control.display().to_string();
    let mut run = Watched::spawn(&[
        "run",
        "--job",
        &j,
        "--json",
        "--batch-size",
        "200",
        "--control-file",
        &c,
        "--check-every",
        "100ms",
    ]);
    sessions_open(&db, 3).await;
    run.said("paused by the control file", Duration::from_secs(30))
        .await;
    assert_eq!(
        committed_by_running_job(&db).await,
        0,
        "paused from the start: nothing written"
    );
    std::fs::write(&control, "stop\n").unwrap();
    let out = run.finish(Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(130), "{}", printed(&out));
    assert_eq!(json(&out)["stopped_by"], "control file");
    assert_eq!(
        committed_by_running_job(&db).await,
        0,
        "paused from the start, then stopped: the run wrote nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gate_that_returns_false_holds_the_run_until_it_returns_true() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    db.client
        .batch_execute("CREATE TABLE gate (open boolean); INSERT INTO gate VALUES (false)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let mut run = Watched::spawn(&[
        "run",
        "--job",
        &j,
        "--json",
        "--batch-size",
        "200",
        "--gate-sql",
        "SELECT open FROM gate",
        "--check-every",
        "100ms",
    ]);
    sessions_open(&db, 3).await;
    run.said("--gate-sql query returned false", Duration::from_secs(30))
        .await;
    assert_eq!(
        committed_by_running_job(&db).await,
        0,
        "the gate is shut: nothing written"
    );
    db.client
        .batch_execute("UPDATE gate SET open = true")
        .await
        .unwrap();
    let out = run.finish(Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        printed(&out).contains("--gate-sql query returned false"),
        "{}",
        printed(&out)
    );
    assert_all_rotated(&db, 3_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gate_that_errors_holds_the_run_rather_than_running_blind() {
    let db = TestDb::new().await;
    db.seed_patients(2_000).await;
    db.client
        .batch_execute("CREATE TABLE gate (open boolean); INSERT INTO gate VALUES (true)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    // the gate works at the start, then its table goes away
    db.client
        .batch_execute("UPDATE gate SET open = false")
        .await
        .unwrap();
    let mut run = Watched::spawn(&[
        "run",
        "--job",
        &j,
        "--json",
        "--batch-size",
        "200",
        "--gate-sql",
        "SELECT open FROM gate",
        "--check-every",
        "100ms",
    ]);
    sessions_open(&db, 3).await;
    run.said("--gate-sql query returned false", Duration::from_secs(30))
        .await; // the gate was checked and the lanes are waiting on it
    db.client.batch_execute("DROP TABLE gate").await.unwrap();
    run.said("--gate-sql query failed, holding", Duration::from_secs(30))
        .await;
    assert_eq!(
        committed_by_running_job(&db).await,
        0,
        "a gate that cannot be read holds (fails closed)"
    );
    db.client
        .batch_execute("CREATE TABLE gate (open boolean); INSERT INTO gate VALUES (true)")
        .await
        .unwrap();
    let out = run.finish(Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        printed(&out).contains("--gate-sql query failed, holding"),
        "{}",
        printed(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gate_that_is_not_one_boolean_or_would_write_is_refused_before_any_write() {
    let (db, _dir, j) = patients(100).await;
    let before = db.checksum("patient_persons").await;
    for gate in [
        "SELECT 1",
        "SELECT true, false",
        "DELETE FROM patient_persons RETURNING true",
        "SELEC nonsense",
    ] {
        let out = rekey(&["run", "--job", &j, "--gate-sql", gate], &seed_env());
        assert_eq!(out.status.code(), Some(2), "{gate}: {}", printed(&out));
        assert!(
            printed(&out).contains("cannot serve as a gate"),
            "{}",
            printed(&out)
        );
    }
    assert_eq!(
        db.checksum("patient_persons").await,
        before,
        "nothing changed"
    );
}

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
        for r in db
            .client
            .query(
                "SELECT pid, query_start::text FROM pg_stat_activity
                  WHERE application_name = 'rekey' AND datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
        {
            waits.insert((r.get::<_, i32>(0), r.get::<_, String>(1)));
        }
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
async fn batches_shrink_toward_the_target_batch_time() {
    let (db, _dir, j) = patients(20_000).await;
    let out = rekey(
        &[
            "run",
            "--job",
            &j,
            "--json",
            "--batch-size",
            "2000",
            "--batch-time",
            "1ms",
            "--workers",
            "1",
        ],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let s = json(&out);
    let (min, max) = (
        s["batch_rows_min"].as_u64().unwrap(),
        s["batch_rows_max"].as_u64().unwrap(),
    );
    assert!(max <= 2000, "never above --batch-size: {s}");
    assert!(min < 100, "shrinks below the first page toward 1 ms: {s}");
    assert_all_rotated(&db, 20_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn until_stops_at_the_given_instant_like_run_time() {
    let (_db, _dir, j) = patients(40_000).await;
    // The instant is 5 s off, far beyond any start-up (an instant already
    // past is refused with exit 2); at 2000 rows/s the 40k rows need 20 s, so
    // only the deadline can end the run, and only exit 5 is right.
    let until = std::time::SystemTime::now() + Duration::from_secs(5);
    let at = humantime::format_rfc3339_millis(until).to_string();
    let out = rekey(
        &[
            "run",
            "--job",
            &j,
            "--json",
            "--batch-size",
            "200",
            "--max-rows-per-sec",
            "2000",
            "--until",
            &at,
        ],
        &seed_env(),
    );
    let ended = std::time::SystemTime::now();
    assert_eq!(out.status.code(), Some(5), "{}", printed(&out));
    let s = json(&out);
    assert_eq!(s["stopped_by"], "run-time");
    assert!(s["projected_s"].as_f64().unwrap() > 0.0, "{s}");
    assert!(ended >= until, "stopped before the instant given");
    let late = ended.duration_since(until).unwrap();
    assert!(
        late < Duration::from_secs(5),
        "stopped {late:?} after the instant given"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_near_its_nonce_budget_is_refused_before_any_write() {
    let (db, _dir, j) = patients(100).await;
    let out = rekey(&["run", "--job", &j, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let fingerprint = v2_ring().target().fingerprint();
    let used: i64 = db
        .client
        .query_one(
            "SELECT sum(encryptions)::bigint FROM rekey.key_usage WHERE fingerprint = $1",
            &[&fingerprint],
        )
        .await
        .unwrap()
        .get(0);
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
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(printed(&out).contains("2^32"), "{}", printed(&out));
    assert_eq!(
        db.checksum("patient_persons").await,
        before,
        "nothing written"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn three_processes_share_one_job_and_one_killed_midway_loses_nothing() {
    let (db, _dir, j) = patients(60_000).await;
    // 60k rows make three ranges (20k rows each at least): one lane per process
    let args = [
        "run",
        "--job",
        j.as_str(),
        "--json",
        "--batch-size",
        "200",
        "--workers",
        "1",
        "--max-rows-per-sec",
        "5000",
    ];
    let mut children = vec![
        spawn_captured(&args),
        spawn_captured(&args),
        spawn_captured(&args),
    ];
    // all three hold leases at some point (the machine may start one late)
    let mut owners = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while owners.len() < 3 && std::time::Instant::now() < deadline {
        // before the first process has created rekey.progress, no one holds a lease
        if engine_state_exists(&db).await {
            for r in db
                .client
                .query(
                    "SELECT owner FROM rekey.progress WHERE owner IS NOT NULL",
                    &[],
                )
                .await
                .unwrap()
            {
                owners.insert(r.get::<_, String>(0));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if owners.len() < 3 {
        for c in children {
            let out = finish(c, Duration::from_secs(60)).await;
            eprintln!("exit {:?}: {}", out.status.code(), printed(&out));
        }
        panic!("all three processes hold leases: {owners:?}");
    }
    wait_for_progress(&db, &mut children[0], 20_000).await;
    // kill one that holds an unfinished range right now, mid-batch
    let holder: String = db
        .client
        .query_one("SELECT owner FROM rekey.progress WHERE owner IS NOT NULL AND NOT done AND range_no >= 0 ORDER BY range_no LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    let pid: u32 = holder.split(':').nth(1).unwrap().parse().unwrap();
    let victim = children
        .iter()
        .position(|c| c.id() == pid)
        .expect("the lease holder is one of ours");
    let mut a = children.remove(victim);
    a.kill().unwrap(); // SIGKILL
    a.wait().unwrap();
    let (b, c) = (children.remove(0), children.remove(0));
    let (b, c) = (
        finish(b, Duration::from_secs(60)).await,
        finish(c, Duration::from_secs(60)).await,
    );
    assert_eq!(b.status.code(), Some(0), "{}", printed(&b));
    assert_eq!(c.status.code(), Some(0), "{}", printed(&c));
    let (b, c) = (json(&b), json(&c));
    assert_eq!(b["job_id"], c["job_id"], "one job");
    assert!(
        b["rows_scanned"].as_u64().unwrap() > 0 && c["rows_scanned"].as_u64().unwrap() > 0,
        "both did work"
    );
    let taken = b["ranges_taken_over"].as_u64().unwrap() + c["ranges_taken_over"].as_u64().unwrap();
    assert!(
        taken >= 1,
        "the killed process's ranges were taken over: {b} {c}"
    );
    assert_eq!(
        committed(&db).await,
        values(60_000),
        "every value rewritten exactly once across the three"
    );
    assert_all_rotated(&db, 60_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_that_stops_renewing_its_lease_loses_its_range_and_cannot_commit_after() {
    let (db, _dir, j) = patients(20_000).await;
    let mut a = spawn_captured(&[
        "run",
        "--job",
        &j,
        "--json",
        "--batch-size",
        "200",
        "--workers",
        "1",
        "--lease-ttl",
        "2s",
        "--check-every",
        "500ms",
        "--max-rows-per-sec",
        "5000",
    ]);
    wait_for_progress(&db, &mut a, 1_000).await;
    let pid = a.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    // its connections stay open, but its lease runs out after 2 s; b takes the range over
    let b = rekey(
        &["run", "--job", &j, "--json", "--batch-size", "500"],
        &seed_env(),
    );
    assert_eq!(b.status.code(), Some(0), "{}", printed(&b));
    assert!(
        json(&b)["ranges_taken_over"].as_u64().unwrap() >= 1,
        "{}",
        printed(&b)
    );
    assert!(std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    let a = finish(a, Duration::from_secs(30)).await;
    // its batch under the lapsed lease is rolled back; it leaves the range and finds nothing else to do
    assert_eq!(a.status.code(), Some(0), "{}", printed(&a));
    assert!(
        printed(&a).contains("taken over by another rekey process"),
        "{}",
        printed(&a)
    );
    assert_eq!(
        committed(&db).await,
        values(20_000),
        "the late process wrote nothing: every value counted once"
    );
    assert_all_rotated(&db, 20_000).await;
}

/// What the application last wrote to a row: (phone, emergency phone), or deleted.
type Expected = BTreeMap<i64, Option<(String, Option<String>)>>;

#[tokio::test(flavor = "multi_thread")]
async fn an_application_writing_during_the_rotation_loses_no_write_and_every_value_ends_on_the_current_key(
) {
    let db = TestDb::new().await;
    let rows = 20_000i64;
    db.seed_patients(rows).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let mut expected: Expected = (1..=rows)
        .map(|id| (id, Some((phone(id), (id % 3 != 0).then(|| emergency(id))))))
        .collect();

    let run = spawn_captured(&[
        "run",
        "--job",
        &j,
        "--json",
        "--batch-size",
        "100",
        "--workers",
        "2",
        "--max-rows-per-sec",
        "10000",
    ]);
    let app = connect(&db.url).await;
    let (old, new) = (v1_codec(), VersionedGcm::new(&v2_ring()).unwrap());
    let mut rng = rand::rng();
    let mut next_id = rows + 1;
    let mut writes = 0u64;
    let started = std::time::Instant::now();
    // about 2 s of steady writes: updates under the old key and the new, inserts, deletes
    while started.elapsed() < Duration::from_secs(2) {
        let id = 1 + i64::from(rng.next_u32()) % rows;
        let text = format!("+1999{:07}", rng.next_u32() % 10_000_000);
        let mut value = Vec::new();
        match rng.next_u32() % 10 {
            0..=3 => {
                old.seal(text.as_bytes(), b"", None, &mut value);
                if app
                    .execute(
                        "UPDATE patient_persons SET phone_encrypted = $2 WHERE id = $1",
                        &[&id, &value],
                    )
                    .await
                    .unwrap()
                    == 1
                {
                    if let Some(Some(row)) = expected.get_mut(&id) {
                        row.0 = text;
                    }
                }
            }
            4..=6 => {
                new.seal(text.as_bytes(), b"", None, &mut value);
                if app.execute("UPDATE patient_persons SET emergency_contact_phone_encrypted = $2 WHERE id = $1", &[&id, &value]).await.unwrap() == 1 {
                    if let Some(Some(row)) = expected.get_mut(&id) {
                        row.1 = Some(text);
                    }
                }
            }
            7..=8 => {
                old.seal(text.as_bytes(), b"", None, &mut value);
                app.execute("INSERT INTO patient_persons (id, name, phone_encrypted) VALUES ($1, 'new', $2)", &[&next_id, &value]).await.unwrap();
                expected.insert(next_id, Some((text, None)));
                next_id += 1;
            }
            _ => {
                app.execute("DELETE FROM patient_persons WHERE id = $1", &[&id])
                    .await
                    .unwrap();
                expected.insert(id, None);
            }
        }
        writes += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let out = finish(run, Duration::from_secs(120)).await;
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let first = json(&out);
    // old-key writes that landed behind the run are picked up by the next run
    let out = rekey(&["run", "--job", &j, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    eprintln!(
        "application writes: {writes}; conflicts seen by the run: {}",
        first["conflicts"]
    );

    let got = db.decrypted_patients(&v2_ring()).await;
    for (id, want) in &expected {
        match (want, got.get(id)) {
            (None, None) => {}
            (Some((p, e)), Some((gp, ge))) => {
                assert_eq!(
                    gp,
                    &Decrypted::Plain(2, p.clone()),
                    "phone of {id}: the application's last write, on the current key"
                );
                let want_e = e
                    .clone()
                    .map_or(Decrypted::Null, |e| Decrypted::Plain(2, e));
                assert_eq!(ge, &want_e, "emergency phone of {id}");
            }
            (want, got) => panic!("row {id}: expected {want:?}, found {got:?}"),
        }
    }
    assert_eq!(
        got.len(),
        expected.values().filter(|v| v.is_some()).count(),
        "no row appeared or vanished"
    );
}

/// `GET /metrics` from a running rekey, as Prometheus scrapes it.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut last = String::new();
    for _ in 0..100 {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            if body.starts_with("HTTP/1.1 200") {
                return body;
            }
            last = body;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no metrics on port {port}: {last}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_metrics_endpoint_shows_the_hold_and_the_rows_rewritten() {
    let (_db, dir, j) = patients(4_000).await;
    let control = dir.path().join("control");
    std::fs::write(&control, "pause").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let c = control.display().to_string();
    let child = spawn_captured(&[
        "run",
        "--job",
        &j,
        "--json",
        "--batch-size",
        "200",
        "--max-rows-per-sec",
        "2000",
        "--control-file",
        &c,
        "--check-every",
        "100ms",
        "--metrics-addr",
        &addr,
    ]);
    let mut held = String::new();
    for _ in 0..100 {
        held = tokio::task::block_in_place(|| scrape(port));
        if held.contains("rekey_throttled 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(held.contains("rekey_throttled 1"), "{held}");
    assert!(
        held.contains("rekey_throttle_info{reason=\"control_file\"} 1"),
        "{held}"
    );
    std::fs::write(&control, "run").unwrap();
    let mut running = String::new();
    for _ in 0..100 {
        running = tokio::task::block_in_place(|| scrape(port));
        if running.contains("outcome=\"rewritten\"") && running.contains("rekey_throttled 0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(running.contains("rekey_throttled 0"), "{running}");
    assert!(
        running
            .contains("rekey_values_total{table=\"public.patient_persons\",outcome=\"rewritten\"}"),
        "{running}"
    );
    assert!(running.contains("rekey_batch_seconds_bucket"), "{running}");
    assert!(
        running.contains("rekey_queue_depth{stage=\"to_sink\"}"),
        "{running}"
    );
    assert!(running.contains("rekey_eta_seconds"), "{running}");
    let out = finish(child, Duration::from_secs(60)).await;
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn log_format_json_writes_one_object_per_line_with_the_hold_reason() {
    let (db, dir, j) = patients(1_000).await;
    let control = dir.path().join("control");
    std::fs::write(&control, "pause").unwrap();
    let c = control.display().to_string();
    let mut run = Watched::spawn(&[
        "--log-format",
        "json",
        "run",
        "--job",
        &j,
        "--json",
        "--quiet",
        "--control-file",
        &c,
        "--check-every",
        "100ms",
    ]);
    sessions_open(&db, 3).await;
    run.said("paused by the control file", Duration::from_secs(30))
        .await;
    std::fs::write(&control, "stop").unwrap();
    let out = run.finish(Duration::from_secs(30)).await;
    assert_eq!(out.status.code(), Some(130), "{}", printed(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("paused by the control file"))
            && l["reason"] == "control_file"),
        "{stderr}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["timestamp"].is_string() && l["level"].is_string()),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_that_would_take_its_key_past_the_nonce_budget_is_rolled_back_and_the_run_stops() {
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
    // another job (or process) sealing under the same key spends the budget meanwhile
    let fingerprint = v2_ring().target().fingerprint();
    db.client
        .execute(
            "UPDATE rekey.key_usage SET encryptions = CASE WHEN shard = (SELECT min(shard) FROM rekey.key_usage WHERE fingerprint = $1) THEN 4294967290 ELSE 0 END WHERE fingerprint = $1",
            &[&fingerprint],
        )
        .await
        .unwrap();
    let at_limit = committed(&db).await;
    let out = finish(child, Duration::from_secs(60)).await;
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("2^32") && printed(&out).contains("rolled back"),
        "{}",
        printed(&out)
    );
    let used: i64 = db
        .client
        .query_one(
            "SELECT sum(encryptions)::bigint FROM rekey.key_usage WHERE fingerprint = $1",
            &[&fingerprint],
        )
        .await
        .unwrap()
        .get(0);
    assert!(used <= 1 << 32, "the budget was never passed: {used}");
    // at most the batch in flight when the budget was spent committed after it
    assert!(
        committed(&db).await <= at_limit + 400,
        "{} > {at_limit} + one batch",
        committed(&db).await
    );
}
