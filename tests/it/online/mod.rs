//! Running against a live primary: live control (pause, stop, a control
//! file), gates, rows an application holds locked, batch timing and
//! deadlines, the nonce budget, several processes sharing a job, an
//! application writing during the run, and the metrics and logs of a run.
//!
//! The helpers here start `rekey` in the background, watch what it says and
//! count what it commits; each file holds the tests of one topic.

use std::io::BufRead;
use std::process::{Child, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;

mod application_writes;
mod gates;
mod live_control;
mod metrics_and_logs;
mod nonce_budget;
mod rotate_written_behind;
mod row_locks;
mod shared_job;
mod timing;
mod unlabelled_written_behind;

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
