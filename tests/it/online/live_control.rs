//! Live control of a run: `rekey pause`, `resume` and `stop` and a control
//! file hold or end it cleanly, and name a job that does not exist;
//! `rekey status` names the processes running it.

use super::*;

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

// Before: `status` said "being run by 1 process(es): <owner>" until the
// killed process's lease expired (30 s), and "being run by 0 process(es): "
// after.
#[tokio::test(flavor = "multi_thread")]
async fn status_stops_listing_a_process_killed_with_sigkill_once_its_session_is_gone() {
    let db = TestDb::new().await;
    db.seed_patients(5_000).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let mut child = spawn_rekey(
        &[
            "run",
            "--job",
            &j,
            "--max-rows-per-sec",
            "500",
            "--batch-size",
            "100",
        ],
        &seed_env(),
    );
    wait_for_progress(&db, &mut child, 100).await;
    let workers = |out: &std::process::Output| json(out)["workers"].as_array().map(Vec::len);
    let running = rekey(&["status", "--job", &j, "--json"], &seed_env());
    assert_eq!(workers(&running), Some(1), "{}", printed(&running));

    child.kill().unwrap(); // SIGKILL: its leases stay until they expire
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = rekey(&["status", "--job", &j, "--json"], &seed_env());
        if workers(&out) == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status still lists the killed process 20 s later: {}",
            printed(&out)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = rekey(&["status", "--job", &j], &seed_env());
    assert!(
        printed(&out).contains("not being run by any process now"),
        "{}",
        printed(&out)
    );
}

/// Sends SIGINT to `child`.
fn interrupt(child: &std::process::Child) {
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

// Before: `run --json` stopped by a second SIGINT exited 130 with nothing
// on stdout, where every other ending prints one JSON object.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_sigint_exits_at_once_and_still_prints_the_json_object_stdout_promises() {
    let (db, _dir, j) = patients(2_000).await;
    // an application holds a row of the run's first batch: that batch waits
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
        "--json",
        "--batch-size",
        "500",
        "--workers",
        "1",
        "--lock-timeout",
        "60s",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while lock_waits(&db).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "rekey never waited on the locked row"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    interrupt(&run.child);
    run.said(
        "stopping after the batches in flight commit",
        Duration::from_secs(10),
    )
    .await;
    // the batch in flight still waits on the lock: the second signal ends it
    interrupt(&run.child);
    let out = run.finish(Duration::from_secs(20)).await;
    tx.rollback().await.unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", printed(&out));
    let said = json(&out);
    assert_eq!(said["kind"], "stopped", "{said}");
    assert_eq!(said["exit_code"], 130, "{said}");
    assert!(printed(&out).contains("stopping now"), "{}", printed(&out));
}
