//! The WAL throttles: `--max-wal-rate` holds a run while the server writes
//! WAL faster than the cap and lets it through at about the cap;
//! `--max-archive-lag` holds while `archive_command` fails (or the archiver
//! is too far behind), goes on once archiving succeeds, and is refused on a
//! server that does not archive. Holds are shown by what rekey says and what
//! it committed, never by timing its speed.

use std::io::BufRead;
use std::process::{Child, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rekey::db::cluster::{ClusterOptions, TempCluster};

use crate::harness::*;

/// A `rekey` run in the background whose stderr is read as it comes.
struct Watched {
    /// The process.
    child: Child,
    /// Its stderr lines so far.
    lines: Arc<Mutex<Vec<String>>>,
    /// The thread reading them.
    reader: std::thread::JoinHandle<()>,
}

impl Watched {
    fn spawn(args: &[&str]) -> Watched {
        let mut child = rekey_cmd(args, &seed_env())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rekey");
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push(line);
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

    /// Waits until rekey says `text`; fails the test if it exits first or `limit` passes.
    async fn said(&mut self, text: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.stderr().contains(text) {
            if let Some(exited) = self.child.try_wait().unwrap() {
                while !self.reader.is_finished() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                assert!(
                    self.stderr().contains(text),
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

    /// Waits for the process to end (failing the test after `limit`).
    async fn finish(mut self, limit: Duration) -> Output {
        let deadline = Instant::now() + limit;
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "rekey did not finish within {limit:?}; it said:\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let out = tokio::task::spawn_blocking(move || self.child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        self.reader.join().unwrap();
        let stderr = self.lines.lock().unwrap().join("\n").into_bytes();
        Output { stderr, ..out }
    }
}

/// The server's WAL position, in bytes.
async fn wal_position(db: &TestDb) -> f64 {
    db.client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::float8", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tiny_wal_cap_holds_the_run_and_says_why_and_a_run_without_it_finishes() {
    let db = TestDb::new().await;
    db.seed_patients(5_000).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    // unthrottled by WAL, 5 000 rows at 2 000 rows/s take 2.5 s: well inside the window
    let args = [
        "run",
        "--job",
        &j,
        "--json",
        "--batch-size",
        "200",
        "--max-rows-per-sec",
        "2000",
        "--max-wal-rate",
        "1KiB/s",
        "--check-every",
        "100ms",
        "--run-time",
        "4s",
    ];
    let out = rekey(&args, &seed_env());
    assert_eq!(
        out.status.code(),
        Some(5),
        "held by the WAL cap until the window ended\n{}",
        printed(&out)
    );
    assert!(
        printed(&out).contains("the server writes WAL above --max-wal-rate 1.0 KiB/s"),
        "the hold says why\n{}",
        printed(&out)
    );
    let written = committed_values(&db).await;
    assert!(
        written < values_in(5_000),
        "the run held before the end ({written} values written)"
    );
    assert_eq!(json(&out)["stopped_by"], "run-time", "{}", printed(&out));
    let held = &json(&out)["held"]["wal_rate"];
    assert!(
        held["times"].as_u64() >= Some(1) && held["seconds"].as_f64() > Some(0.5),
        "the summary says how often and how long the cap held the run: {}",
        json(&out)
    );
    if json(&out)["rows_scanned"] == 0 {
        assert!(
            json(&out)["projected_s"].is_null(),
            "no rate, no projection: {}",
            json(&out)
        );
    }

    // the cap lifted: the same job resumes and finishes
    let out = rekey(&["run", "--job", &j, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(5_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wal_cap_lets_the_run_through_at_about_the_cap() {
    // a private server: WAL from other tests would count against the cap
    let cluster = TempCluster::start(ClusterOptions { durable: false }).expect("a private cluster");
    let db = TestDb::on(&cluster).await;
    db.seed_patients(ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let cap: f64 = 1024.0 * 1024.0;
    let before = wal_position(&db).await;
    let started = Instant::now();
    let run = Watched::spawn(&[
        "run",
        "--job",
        &j,
        "--json",
        "--batch-size",
        "200",
        "--max-rows-per-sec",
        "10000",
        "--max-wal-rate",
        "1MiB/s",
        "--check-every",
        "100ms",
    ]);
    // paced from the WAL a row costs, the run need not be held at all (a
    // hold is only the backstop): the cap shows in the rate it kept
    let out = run.finish(Duration::from_secs(120)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let wal = wal_position(&db).await - before;
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(ROWS).await;
    assert!(
        wal / ROWS as f64 * 10_000.0 > 2.0 * cap,
        "premise: at --max-rows-per-sec 10000 alone the run would write over twice the cap ({:.0} B a row)",
        wal / ROWS as f64
    );
    let rate = wal / elapsed;
    eprintln!(
        "WAL: {:.1} MiB in {elapsed:.1}s = {:.2}x the cap of 1 MiB/s",
        wal / cap,
        rate / cap
    );
    // a benchmark-ish bound, generous: the budget repays bursts, so over the
    // whole run the rate stays near the cap (below it when the machine is slow)
    assert!(
        rate < cap * 1.5,
        "the run wrote {:.2}x the cap over {elapsed:.1}s",
        rate / cap
    );
}

/// Rows of the rate test: enough WAL for several seconds at 1 MiB/s.
const ROWS: i64 = 20_000;

#[tokio::test(flavor = "multi_thread")]
async fn max_archive_lag_is_refused_on_a_server_that_does_not_archive() {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let before = db.checksum("patient_persons").await;
    let out = rekey(
        &["run", "--job", &j, "--max-archive-lag", "1GB"],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("archive_mode is off"),
        "{}",
        printed(&out)
    );
    assert_eq!(
        db.checksum("patient_persons").await,
        before,
        "nothing written"
    );
    assert!(
        !engine_state_exists(&db).await,
        "refused before the engine's state (and a job to resume) was created"
    );
}

/// A private cluster archiving with `command(dir)`, and `dir`: a folder the
/// server (another OS user) can see into. Dropped in this order, the folder
/// goes first, so a command that waits on a file there ends.
async fn archiving_cluster(
    command: impl Fn(&std::path::Path) -> String,
) -> (TempCluster, tempfile::TempDir) {
    let cluster = TempCluster::start(ClusterOptions { durable: false }).expect("a private cluster");
    let files = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        files.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let admin = connect(&cluster.url("postgres")).await;
    for set in [
        "ALTER SYSTEM SET archive_mode = on".to_string(),
        format!(
            "ALTER SYSTEM SET archive_command = '{}'",
            command(files.path())
        ),
    ] {
        admin.batch_execute(&set).await.unwrap();
    }
    drop(admin);
    tokio::task::block_in_place(|| cluster.ctl(&["restart", "-w", "-m", "fast"]))
        .unwrap_or_else(|e| panic!("restart with archiving: {e}\n{}", cluster.log()));
    (cluster, files)
}

/// Waits until `pg_stat_archiver` shows `column` at `at_least`.
async fn archiver_shows(db: &TestDb, column: &str, at_least: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = db
            .client
            .query_one(&format!("SELECT {column} FROM pg_stat_archiver"), &[])
            .await
            .unwrap()
            .get(0);
        if n >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pg_stat_archiver.{column} stayed at {n}, below {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Completes the segment being written (after a write: an empty one is not switched).
async fn switch_segment(db: &TestDb) {
    db.client
        .batch_execute("CREATE TABLE IF NOT EXISTS filler (n int); INSERT INTO filler VALUES (1); SELECT pg_switch_wal()")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_archiver_behind_the_cap_holds_the_run_until_it_catches_up() {
    // archive_command waits while `block` exists: busy, not failing
    let (cluster, files) = archiving_cluster(|dir| {
        format!("while [ -f {}/block ]; do sleep 0.05; done", dir.display())
    })
    .await;
    let db = TestDb::on(&cluster).await;
    db.seed_patients(2_000).await;
    switch_segment(&db).await;
    archiver_shows(&db, "archived_count", 1).await;
    let block = files.path().join("block");
    std::fs::write(&block, "").unwrap();
    // switch until at least two complete segments wait behind the archived one
    for _ in 0..10 {
        switch_segment(&db).await;
        let row = db
            .client
            .query_one(
                "SELECT pg_walfile_name(pg_current_wal_lsn()), last_archived_wal FROM pg_stat_archiver",
                &[],
            )
            .await
            .unwrap();
        let segment = |name: String| u64::from_str_radix(&name[8..], 16).unwrap();
        if segment(row.get(0)) >= segment(row.get(1)) + 3 {
            break;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let mut run = Watched::spawn(&[
        "run",
        "--job",
        &j,
        "--json",
        "--max-archive-lag",
        "16MiB",
        "--check-every",
        "100ms",
    ]);
    run.said(
        "behind, over --max-archive-lag 16.0 MiB",
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        committed_by_running_job(&db).await,
        0,
        "nothing written while the archiver is behind"
    );
    std::fs::remove_file(&block).unwrap();
    let out = run.finish(Duration::from_secs(120)).await;
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(2_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_archive_command_holds_the_run_until_archiving_succeeds() {
    // archive_command succeeds once `allow` exists
    let (cluster, files) =
        archiving_cluster(|dir| format!("test -f {}/allow", dir.display())).await;
    let allow = files.path().join("allow");
    let db = TestDb::on(&cluster).await;
    db.seed_patients(2_000).await;
    // a complete segment the archiver cannot archive
    db.client
        .batch_execute("SELECT pg_switch_wal()")
        .await
        .unwrap();
    archiver_shows(&db, "failed_count", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let mut run = Watched::spawn(&[
        "run",
        "--job",
        &j,
        "--json",
        "--max-archive-lag",
        "1GB",
        "--check-every",
        "100ms",
    ]);
    run.said("archiving is failing", Duration::from_secs(60))
        .await;
    assert_eq!(
        committed_by_running_job(&db).await,
        0,
        "nothing written while archiving fails"
    );

    std::fs::write(&allow, "").unwrap();
    // wake the archiver now rather than at its next minute
    db.client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let out = run.finish(Duration::from_secs(120)).await;
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        printed(&out).contains("archiving is failing"),
        "{}",
        printed(&out)
    );
    db.assert_every_value_rotated(2_000).await;
}

/// A dry run writes no WAL: `--max-wal-rate` does not pace it (paced at
/// one page per check until the first check measures a pace, it would
/// take at least one 10 s check).
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_is_not_paced_by_the_wal_cap_it_writes_nothing_for() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    db.client
        .batch_execute("ANALYZE patient_persons; CHECKPOINT")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let base = [
        "run",
        "--job",
        &job,
        "--dry-run",
        "--check-every",
        "10s",
        "--batch-size",
        "100",
        "--quiet",
        "--json",
    ];
    let started = Instant::now();
    let out = rekey(&base, &seed_env());
    let free = started.elapsed();
    // it would rewrite every value: they are still on an old key
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    let mut capped = base.to_vec();
    capped.extend(["--max-wal-rate", "20MB/s"]);
    let started = Instant::now();
    let out = rekey(&capped, &seed_env());
    let paced = started.elapsed();
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    assert!(
        paced < free + Duration::from_secs(5),
        "{free:?} vs {paced:?}"
    );
}
