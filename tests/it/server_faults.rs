//! The database going wrong under a run: connections terminated, the server
//! restarted or crashed, locks held, statements timed out, the disk full.
//!
//! Every test asserts the same contract: nothing is lost and nothing is
//! encrypted twice, and the run either finishes, or stops with exit 1 and a
//! message naming what happened, after which the same command resumes the
//! job and finishes it. Tests print one `fault report:` line each saying how
//! the engine met the fault.

use std::process::{Child, Output};
use std::time::{Duration, Instant};

use rekey::db::cluster::{ClusterOptions, TempCluster};
use serde_json::Value;

use crate::harness::*;

/// A run under faults: the process in flight, what each stopped one said,
/// and re-runs (resumes) until the job is done.
struct Disturbed {
    /// `rekey run ...`, the same command every time.
    args: Vec<String>,
    /// What a clear failure message may say (one of them must appear).
    names: &'static [&'static str],
    /// The process now running, if any.
    child: Option<Child>,
    /// stderr of each run that stopped on a fault.
    failures: Vec<String>,
    /// The summary of the run that finished the job.
    finished: Option<Value>,
}

impl Disturbed {
    fn new(args: &[&str], names: &'static [&'static str]) -> Disturbed {
        Disturbed {
            args: args.iter().map(|a| a.to_string()).collect(),
            names,
            child: None,
            failures: Vec::new(),
            finished: None,
        }
    }

    fn args(&self) -> Vec<&str> {
        self.args.iter().map(String::as_str).collect()
    }

    /// The run in flight, started (resuming the job) if the last one stopped.
    fn child(&mut self) -> &mut Child {
        if self.child.is_none() {
            self.child = Some(spawn_rekey_captured(&self.args(), &seed_env()));
        }
        self.child.as_mut().unwrap()
    }

    /// Whether no run is in flight now (the last one ended and was judged).
    fn ended(&mut self) -> bool {
        let done = match self.child.as_mut() {
            None => return true,
            Some(c) => c.try_wait().unwrap().is_some(),
        };
        if done {
            let out = self.child.take().unwrap().wait_with_output().unwrap();
            self.judge(&out);
        }
        done
    }

    /// A run that ended either finished the job or failed clearly.
    fn judge(&mut self, out: &Output) {
        if out.status.code() == Some(0) {
            self.finished = Some(json(out));
            return;
        }
        let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert_eq!(
            out.status.code(),
            Some(1),
            "a fault must stop the run with exit 1 (or not at all): {}",
            printed(out)
        );
        assert!(
            said.starts_with("rekey: ") && self.names.iter().any(|n| said.contains(n)),
            "unclear failure, expected one of {:?} in: {said}",
            self.names
        );
        self.failures.push(said);
    }

    /// Waits for the run in flight, then, if the job is not done, runs the
    /// same command once more: it must resume the job and finish it.
    async fn finish(mut self, db: &TestDb) -> (Value, Vec<String>) {
        if let Some(c) = self.child.take() {
            let out = c.wait_with_output().unwrap();
            self.judge(&out);
        }
        if let Some(summary) = self.finished.take() {
            return (summary, self.failures);
        }
        let job_started = committed_values(db).await > 0;
        let out = rekey(&self.args(), &seed_env());
        assert_eq!(
            out.status.code(),
            Some(0),
            "the re-run after the fault did not finish: {}",
            printed(&out)
        );
        let summary = json(&out);
        if job_started {
            assert_eq!(
                summary["resumed"], true,
                "the re-run started over instead of resuming"
            );
        }
        (summary, self.failures)
    }
}

/// Says how the engine met a fault, for the closing note.
fn report(fault: &str, landed: usize, failures: &[String]) {
    let met = if failures.is_empty() {
        "the run finished by itself".to_string()
    } else {
        format!(
            "{} run(s) stopped, then resumed and finished; said: {:?}",
            failures.len(),
            failures
        )
    };
    println!("fault report: {fault}: injected {landed} time(s); {met}");
}

/// Polls `cond` every 10 ms until it holds or `limit` passes; whether it held.
async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// A seeded database, its job file and the run command (small batches, two lanes).
async fn setup(db: &TestDb, rows: i64, dir: &tempfile::TempDir) -> Vec<String> {
    db.seed_patients(rows).await;
    let job = db.patients_job(dir).display().to_string();
    [
        "run",
        "--job",
        &job,
        "--json",
        "--batch-size",
        "200",
        "--workers",
        "2",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Asserts the contract after the job finished.
async fn assert_nothing_lost(db: &TestDb, rows: i64, summary: &Value, untouched: &str) {
    assert_eq!(
        summary["job_totals"]["values_rewritten"],
        values_in(rows),
        "every value rewritten exactly once across all runs"
    );
    db.assert_every_value_rotated(rows).await;
    assert_eq!(
        db.unencrypted_checksum().await,
        untouched,
        "a column rekey does not own was written"
    );
}

/// How a lost connection may be named.
const CONNECTION_LOST: &[&str] = &[
    "terminating connection due to administrator command",
    "terminating connection due to immediate shutdown",
    "terminating connection because of crash",
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is in recovery mode",
    "connection closed",
    "cannot connect to PostgreSQL",
];

/// Terminates rekey's sessions of this database that are inside a write
/// transaction (a batch between BEGIN and COMMIT); waits until one is, or
/// the run ended. Returns how many were terminated.
async fn terminate_mid_batch(db: &TestDb, runs: &mut Disturbed) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !runs.ended() {
        let killed: i64 = db
            .client
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))::bigint FROM pg_stat_activity
                  WHERE application_name = 'rekey' AND datname = current_database() AND backend_xid IS NOT NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if killed > 0 {
            return killed as usize;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    0
}

#[tokio::test(flavor = "multi_thread")]
async fn terminating_rekeys_sessions_mid_batch_loses_nothing_and_the_run_finishes_or_resumes() {
    const ROWS: i64 = 30_000;
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let run = setup(&db, ROWS, &dir).await;
    let untouched = db.unencrypted_checksum().await;
    let mut runs = Disturbed::new(&strs(&run), CONNECTION_LOST);
    let mut landed = 0;
    for fraction in [0.2, 0.45, 0.7] {
        if runs.finished.is_some() {
            break;
        }
        let child = runs.child();
        wait_for_progress(&db, child, (values_in(ROWS) as f64 * fraction) as i64).await;
        landed += terminate_mid_batch(&db, &mut runs).await;
        // let the run notice before the next round decides whether it is still going
        eventually(Duration::from_secs(2), || std::future::ready(runs.ended())).await;
    }
    let (summary, failures) = runs.finish(&db).await;
    report(
        "pg_terminate_backend of rekey's sessions inside a batch",
        landed,
        &failures,
    );
    assert!(landed > 0, "no session was caught inside a batch");
    assert_nothing_lost(&db, ROWS, &summary, &untouched).await;
}

/// A restart (`pg_ctl restart -m MODE`) of a private cluster once the run is a third done.
async fn restart_mid_run(mode: &'static str) {
    const ROWS: i64 = 30_000;
    let cluster = TempCluster::start(ClusterOptions { durable: false }).expect("a private cluster");
    let mut db = TestDb::on(&cluster).await;
    let dir = tempfile::tempdir().unwrap();
    let run = setup(&db, ROWS, &dir).await;
    let untouched = db.unencrypted_checksum().await;
    let mut runs = Disturbed::new(&strs(&run), CONNECTION_LOST);
    let child = runs.child();
    wait_for_progress(&db, child, values_in(ROWS) / 3).await;
    let landed = usize::from(!runs.ended());
    let before = committed_values(&db).await;
    // the restart lands mid-run: the run is still going, some values are
    // committed and not all (measured just before the restart is issued)
    assert_eq!(
        landed, 1,
        "the run ended before the restart: {before} values committed"
    );
    assert!(
        before > 0 && before < values_in(ROWS),
        "not mid-run: {before} of {} values committed when the restart was issued",
        values_in(ROWS)
    );
    tokio::task::block_in_place(|| cluster.ctl(&["restart", "-w", "-t", "60", "-m", mode]))
        .unwrap_or_else(|e| panic!("restart failed: {e}\n{}", cluster.log()));
    db.client = connect(&db.url).await;
    let after = committed_values(&db).await;
    let (summary, failures) = runs.finish(&db).await;
    report(
        &format!(
            "server restart -m {mode} (values committed: {before} seen before, {after} after)"
        ),
        landed,
        &failures,
    );
    assert_nothing_lost(&db, ROWS, &summary, &untouched).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_restart_mid_run_loses_nothing_and_the_run_finishes_or_resumes() {
    restart_mid_run("fast").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_crash_mid_run_loses_nothing_and_the_run_finishes_or_resumes() {
    // immediate: no shutdown checkpoint, crash recovery on start; commits
    // still in the WAL buffers (the writer commits asynchronously) are lost,
    // each together with its checkpoint row.
    restart_mid_run("immediate").await;
}

/// Holds `FOR UPDATE` locks on 20 rows in the middle of the table until committed.
async fn lock_middle_rows(db: &TestDb, rows: i64) -> tokio_postgres::Client {
    let locker = connect(&db.url).await;
    locker
        .batch_execute(&format!("SET statement_timeout = 0; BEGIN; SELECT id FROM patient_persons WHERE id BETWEEN {} AND {} FOR UPDATE", rows / 2, rows / 2 + 19))
        .await
        .unwrap();
    locker
}

/// rekey's statements of this database that have waited for a lock for longer than `for_ms`.
async fn lock_waits_longer_than(db: &TestDb, for_ms: i64) -> Vec<(i32, String)> {
    db.client
        .query(
            "SELECT pid, query_start::text FROM pg_stat_activity
              WHERE application_name = 'rekey' AND datname = current_database() AND wait_event_type = 'Lock'
                AND query_start < clock_timestamp() - $1::bigint * interval '1 millisecond'",
            &[&for_ms],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_holding_row_locks_mid_table_delays_the_run_but_loses_nothing() {
    const ROWS: i64 = 20_000;
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let run = setup(&db, ROWS, &dir).await;
    let untouched = db.unencrypted_checksum().await;
    let locker = lock_middle_rows(&db, ROWS).await;
    let mut runs = Disturbed::new(&strs(&run), &["lock", "canceling statement"]);
    runs.child();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut waits = std::collections::BTreeSet::new();
    while waits.is_empty() && !runs.ended() && Instant::now() < deadline {
        waits.extend(lock_waits(&db).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let met = !waits.is_empty() || runs.child.is_none();
    assert!(met, "rekey neither waited on the locked rows nor stopped");
    // hold the locks a while longer, as a slow application transaction
    // would, counting each statement of rekey's that waits on them
    let hold = Instant::now() + Duration::from_secs(2);
    while Instant::now() < hold {
        waits.extend(lock_waits(&db).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    locker.batch_execute("COMMIT").await.unwrap();
    let (summary, failures) = runs.finish(&db).await;
    report("FOR UPDATE on 20 mid-table rows held ~2 s after rekey met them (injections: rekey statements seen waiting on them)", waits.len(), &failures);
    assert_nothing_lost(&db, ROWS, &summary, &untouched).await;
}

/// How long the database's own `statement_timeout` is set to in the test below.
const DATABASE_TIMEOUT_MS: i64 = 1_000;

#[tokio::test(flavor = "multi_thread")]
async fn the_databases_statement_timeout_does_not_cut_rekeys_batches_its_own_setting_applies() {
    // rekey sets statement_timeout on each of its reading and writing
    // sessions from --statement-timeout (2 min by default), which overrides
    // the database's setting. So a batch waiting on locked rows well past
    // the database's timeout is not cancelled, and the run finishes by
    // itself without a retry. (The database's setting applies to rekey's
    // other sessions too, whose short statements stay far below 1 s.)
    const ROWS: i64 = 20_000;
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let mut run = setup(&db, ROWS, &dir).await;
    run.extend(["--lock-timeout", "60s"].map(String::from)); // only a statement timeout could cut the wait
    let untouched = db.unencrypted_checksum().await;
    let locker = lock_middle_rows(&db, ROWS).await;
    db.alter_database(&format!("SET statement_timeout = {DATABASE_TIMEOUT_MS}"))
        .await;
    // premise: a new session of this database gets the database's timeout
    let fresh = connect(&db.url).await;
    let applied: String = fresh
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        applied, "1s",
        "the database's statement_timeout does not apply to new sessions"
    );

    let mut runs = Disturbed::new(&strs(&run), &["statement timeout"]);
    runs.child();
    // a batch of rekey's waits on the locked rows for twice the database's timeout
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut long_waits = Vec::new();
    while long_waits.is_empty() {
        assert!(
            !runs.ended(),
            "the run ended before a batch of it waited past the database's statement_timeout"
        );
        assert!(
            Instant::now() < deadline,
            "no batch of rekey's was seen waiting on the locked rows for {} ms",
            2 * DATABASE_TIMEOUT_MS
        );
        long_waits = lock_waits_longer_than(&db, 2 * DATABASE_TIMEOUT_MS).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    locker.batch_execute("COMMIT").await.unwrap();
    let (summary, failures) = runs.finish(&db).await;
    db.alter_database("RESET statement_timeout").await;
    report(
        &format!("statement_timeout = {DATABASE_TIMEOUT_MS} ms on the database and 20 locked mid-table rows (injections: batches seen waiting past 2x it)"),
        long_waits.len(),
        &failures,
    );
    assert!(
        failures.is_empty(),
        "the run stopped: the database's timeout applied to a batch: {failures:?}"
    );
    assert_eq!(
        summary["retries"], 0,
        "a batch was retried: its statement was cancelled: {summary}"
    );
    assert_nothing_lost(&db, ROWS, &summary, &untouched).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_whose_batches_rekeys_own_statement_timeout_cancels_are_set_aside_reported_and_rotated_once_the_locks_go(
) {
    // --statement-timeout 300ms and 20 locked rows held through the run: the
    // batch that reaches them is cancelled, halved down to each locked row,
    // which is set aside after two tries; the rest of the table is rotated,
    // the conflict pass finds them still locked and reports them as not
    // rotated (exit 4); once the locks go, the next run rotates them.
    const ROWS: i64 = 20_000;
    const LOCKED: i64 = 20;
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let mut run = setup(&db, ROWS, &dir).await;
    run.extend(
        [
            "--statement-timeout",
            "300ms",
            "--lock-timeout",
            "60s",
            "--attempts",
            "2",
        ]
        .map(String::from),
    );
    let untouched = db.unencrypted_checksum().await;
    let locker = lock_middle_rows(&db, ROWS).await;
    let mut child = spawn_rekey_captured(&strs(&run), &seed_env());
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut waits = std::collections::BTreeSet::new();
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the run did not end in 120 s with 20 rows locked"
        );
        waits.extend(lock_waits(&db).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "values left on an old key: {}",
        printed(&out)
    );
    let s = json(&out);
    let locked_values: i64 = db
        .client
        .query_one(
            "SELECT (count(phone_encrypted) + count(emergency_contact_phone_encrypted))::bigint FROM patient_persons WHERE id BETWEEN $1 AND $2",
            &[&(ROWS / 2), &(ROWS / 2 + LOCKED - 1)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(s["values_not_rotated"], locked_values, "{s}");
    assert_eq!(
        s["job_totals"]["values_rewritten"],
        values_in(ROWS) - locked_values,
        "every unlocked value rotated: {s}"
    );
    let reasons: Vec<String> = db
        .client
        .query("SELECT DISTINCT reason FROM rekey.not_rotated", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(reasons, ["row_locked"]);
    report("--statement-timeout 300ms and 20 locked mid-table rows (injections: rekey statements seen waiting on them)", waits.len(), &[]);
    assert!(
        !waits.is_empty(),
        "no statement of rekey's was seen waiting on the locked rows"
    );
    locker.batch_execute("COMMIT").await.unwrap();
    let out = rekey(&strs(&run), &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        json(&out)["job_totals"]["values_rewritten"],
        locked_values,
        "the next run rotates the rows that were locked"
    );
    db.assert_every_value_rotated(ROWS).await;
    assert_eq!(
        db.unencrypted_checksum().await,
        untouched,
        "a column rekey does not own was written"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_under_the_table_stops_the_run_clearly_and_it_resumes_once_space_is_freed() {
    const ROWS: i64 = 12_000;
    let disk = match TinyDisk::mount("16M") {
        Ok(d) => d,
        Err(why) => {
            println!("fault report: disk full: SKIPPED, cannot make a tiny disk here: {why}");
            return;
        }
    };
    // The cluster stops (dropped first, declared last) before the disk is unmounted.
    let cluster = TempCluster::start(ClusterOptions { durable: false }).expect("a private cluster");
    let db = TestDb::on(&cluster).await;
    let space = disk.path().display().to_string();
    db.client
        .batch_execute(&format!("CREATE TABLESPACE tiny LOCATION '{space}'"))
        .await
        .unwrap();
    db.client
        .batch_execute("SET default_tablespace = tiny")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = setup(&db, ROWS, &dir).await;
    let untouched = db.unencrypted_checksum().await;
    // Fill the rest of the disk with 512 kB tables, then free two of them:
    // room for a few batches, not for a second copy of the table.
    let mut fillers = 0;
    loop {
        let fill = format!("CREATE TABLE filler{fillers} AS SELECT g, repeat(md5(g::text), 30) AS pad FROM generate_series(1, 500) g");
        if db.client.batch_execute(&fill).await.is_err() {
            break;
        }
        fillers += 1;
        assert!(fillers < 100, "the disk never filled up");
    }
    db.client
        .batch_execute(&format!(
            "DROP TABLE filler{}; DROP TABLE filler{}",
            fillers - 1,
            fillers - 2
        ))
        .await
        .unwrap();

    let mut runs = Disturbed::new(&strs(&run), &["No space left on device"]);
    runs.child();
    // Today the run stops at the first failed extension; an engine that
    // retries waits for space instead, so free it after a while either way.
    eventually(Duration::from_secs(15), || std::future::ready(runs.ended())).await;
    assert!(
        runs.finished.is_none(),
        "the run finished before space was freed: the disk was not full enough to matter"
    );
    let stopped = runs.failures.len();
    for f in 0..fillers - 2 {
        db.client
            .batch_execute(&format!("DROP TABLE filler{f}"))
            .await
            .unwrap();
    }
    let (summary, failures) = runs.finish(&db).await;
    report(
        "tablespace on a 16 MB disk filled to ~1 MB free",
        stopped,
        &failures,
    );
    assert_nothing_lost(&db, ROWS, &summary, &untouched).await;
}

/// Sessions of this database the server has ended with a fatal error (an
/// idle-session timeout among them), from `pg_stat_database`.
async fn sessions_ended_by_the_server(db: &TestDb) -> i64 {
    db.client
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .unwrap();
    db.client
        .query_one(
            "SELECT sessions_fatal FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// The finished job's recorded totals (`rekey.jobs.summary`), by job id.
async fn recorded_totals(db: &TestDb) -> Vec<(i64, String, Option<i64>)> {
    db.client
        .query("SELECT job_id, state, (summary->'job_totals'->>'values_rewritten')::bigint FROM rekey.jobs ORDER BY job_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn terminating_the_session_holding_the_job_lock_lets_the_run_finish_and_a_second_process_join_it(
) {
    const ROWS: i64 = 60_000;
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let run = setup(&db, ROWS, &dir).await;
    let untouched = db.unencrypted_checksum().await;
    let mut first = spawn_rekey_captured(&strs(&run), &seed_env());
    wait_for_progress(&db, &mut first, values_in(ROWS) / 5).await;
    let killed = end_rekeys_lock_holding_sessions(&db).await;
    assert_eq!(killed, 1, "the job lock's session was not found");

    // A second process on the same job shares it: ranges are leased, not locked per job.
    let second = rekey(&strs(&run), &seed_env());
    let first = first.wait_with_output().unwrap();
    println!(
        "fault report: job lock session terminated: first run {:?}; second run {:?}; jobs recorded: {:?}; values in rekey.progress: {}",
        first.status.code(),
        second.status.code(),
        recorded_totals(&db).await,
        committed_values(&db).await
    );
    assert_eq!(first.status.code(), Some(0), "{}", printed(&first));
    assert_eq!(second.status.code(), Some(0), "{}", printed(&second));
    // Whoever finished last, the job's record counts every value once.
    assert_eq!(
        recorded_totals(&db).await,
        vec![(1, "done".to_string(), Some(values_in(ROWS)))]
    );
    db.assert_every_value_rotated(ROWS).await;
    assert_eq!(db.unencrypted_checksum().await, untouched);
}

// rekey keeps every session of a run busy enough (the lock-holding ones
// pinged, the lanes and the monitor working) that the server closes none:
// before, it closed the run's own session and the monitor's, and the run
// held, reconnected, or stopped and resumed.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_session_timeout_shorter_than_the_run_closes_none_of_its_sessions_and_it_finishes()
{
    const ROWS: i64 = 60_000;
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let run = setup(&db, ROWS, &dir).await;
    let untouched = db.unencrypted_checksum().await;
    // rekey's sessions opened from now on are closed by the server after 500 ms idle
    db.alter_database("SET idle_session_timeout = '500ms'")
        .await;
    let fatal_before = sessions_ended_by_the_server(&db).await;
    let mut runs = Disturbed::new(
        &strs(&run),
        &["idle-session timeout", "job lock", "connection closed"],
    );
    runs.child();
    while !runs.ended() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    db.alter_database("RESET idle_session_timeout").await;
    let closed = sessions_ended_by_the_server(&db).await - fatal_before;
    let (summary, failures) = runs.finish(&db).await;
    report(
        "idle_session_timeout = 500ms on the database (injections: sessions the server ended)",
        closed as usize,
        &failures,
    );
    assert_eq!(
        closed, 0,
        "the server closed sessions of the run for idling"
    );
    assert!(failures.is_empty(), "the run stopped: {failures:?}");
    assert_nothing_lost(&db, ROWS, &summary, &untouched).await;
}

// Before: rotate's own session, ended during the run, was reopened for the
// recount without the lifecycle lock, and the verify and the promotion
// after it ran with no lock: a second rotate could have gone ahead beside.
#[tokio::test(flavor = "multi_thread")]
async fn rotate_whose_own_session_is_ended_during_its_run_takes_its_lock_again_before_going_on() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    // every row read sleeps: the verify after the run takes a while
    let job = db
        .patients_job_where(&dir, "pg_sleep(0.0003) IS NOT NULL")
        .display()
        .to_string();
    let mut env = v1_env();
    let out = rekey(&["rotate", "--job", &job], &env);
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    env.push(("ENCRYPTION_KEY_V2", K2.to_string()));
    env.push(("ENCRYPTION_PENDING_VERSION", "2".to_string()));
    let mut child = spawn_rekey_captured(
        &[
            "rotate",
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
    wait_for_progress(&db, &mut child, 500).await;
    let ended = end_rekeys_lock_holding_sessions(&db).await;
    assert_eq!(ended, 1, "rotate's own session was not found");
    // once its run is done (the verify after it takes a second or more),
    // the lock is held again (not at the instant the process exits, when
    // its sessions close: no check counts against it)
    let mut held_after_the_run = 0;
    while child.try_wait().unwrap().is_none() {
        let done: bool = db
            .client
            .query_one(
                "SELECT coalesce(bool_and(state = 'done'), false) FROM rekey.jobs",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if done && advisory_lock_held(&db, "rekey.lifecycle:patients").await {
            held_after_the_run += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    assert_eq!(json(&out)["step"], "promoted", "{}", printed(&out));
    assert!(
        held_after_the_run > 0,
        "rotate went on after its run without its lock"
    );
}

// Before: the session of the conflict pass's turn (it holds the turn's lock
// and lists the keys to re-read), ended mid-pass, ended the run (exit 1) at
// its next listing, where every other session of a run is opened again;
// meanwhile another process could take the turn beside it.
#[tokio::test(flavor = "multi_thread")]
async fn the_conflict_passs_own_session_ended_mid_pass_is_opened_again_with_its_turn_and_the_run_finishes(
) {
    const ROWS: i64 = 200;
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let run = setup(&db, ROWS, &dir).await;
    // the first write of each of the first 50 rows lands nowhere (they are
    // re-read at the end); the first re-read write ends the session holding
    // the pass's turn (its pid kept in a sequence, which no rollback undoes)
    // and fails as a deadlock; the next notes who holds the turn. The turn
    // is this database's: the cluster is shared with the other tests, whose
    // jobs are numbered from 1 too, and whose conflict passes hold a lock of
    // the same key in their own databases (pg_locks lists every database's)
    db.client
        .batch_execute(
            "CREATE TABLE skipped (id bigint PRIMARY KEY);
             CREATE SEQUENCE ended_turn;
             CREATE TABLE turn_held (pid int PRIMARY KEY);
             CREATE FUNCTION turn_holders() RETURNS SETOF int LANGUAGE plpgsql AS $$
             BEGIN
               RETURN QUERY SELECT pid FROM pg_locks
                WHERE locktype = 'advisory' AND granted AND objsubid = 1
                  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                  AND (classid::bigint << 32 | objid::bigint)
                      = hashtextextended('rekey.conflicts:' || (SELECT min(job_id) FROM rekey.conflicts), 0);
             END $$;
             CREATE FUNCTION skip_then_end_the_turn() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF OLD.id <= 50 THEN
                 IF NOT EXISTS (SELECT 1 FROM skipped WHERE id = OLD.id) THEN
                   INSERT INTO skipped VALUES (OLD.id);
                   RETURN NULL;
                 END IF;
                 IF NOT (SELECT is_called FROM ended_turn) THEN
                   PERFORM setval('ended_turn', pid) FROM turn_holders() AS pid WHERE pg_terminate_backend(pid);
                   RAISE EXCEPTION 'deadlock detected' USING ERRCODE = 'deadlock_detected';
                 END IF;
                 INSERT INTO turn_held SELECT pid FROM turn_holders() AS pid ON CONFLICT DO NOTHING;
               END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER skip_then_end_the_turn BEFORE UPDATE ON patient_persons FOR EACH ROW EXECUTE FUNCTION skip_then_end_the_turn();",
        )
        .await
        .unwrap();
    let untouched = db.unencrypted_checksum().await;
    let out = rekey(&strs(&run), &seed_env());
    let ended: Option<i64> = db
        .client
        .query_one(
            "SELECT CASE WHEN is_called THEN last_value END FROM ended_turn",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let ended = ended.unwrap_or_else(|| {
        panic!(
            "the premise: the turn's session was ended mid-pass\n{}",
            printed(&out)
        )
    });
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let held: Vec<i64> = db
        .client
        .query("SELECT pid::bigint FROM turn_held", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        held.len() == 1 && held[0] != ended,
        "the re-reads after it went on without the turn: held by {held:?} (ended: {ended})"
    );
    let skipped: i64 = db
        .client
        .query_one("SELECT count(*) FROM skipped", &[])
        .await
        .unwrap()
        .get(0);
    let summary = json(&out);
    assert_eq!(summary["conflicts"], skipped, "{summary}");
    assert_nothing_lost(&db, ROWS, &summary, &untouched).await;
}
