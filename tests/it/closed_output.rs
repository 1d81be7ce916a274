//! Output nobody can read: stdout or stderr a pipe whose reader has gone
//! (`rekey status | head -0`) or a full disk. The work's exit code stands,
//! never a panic's 101; except `keygen`, which fails when its key was not
//! written, so that nobody believes a key saved that was lost.

use std::process::{Output, Stdio};

use crate::harness::*;

/// A pipe whose reader is already closed: every write to it fails (EPIPE).
fn closed_pipe() -> Stdio {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    Stdio::from(writer)
}

/// `/dev/full`: every write to it fails (ENOSPC).
fn full_disk() -> Stdio {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    Stdio::from(full)
}

/// Runs `rekey` with its stdout set to `stdout`; stderr is captured.
fn with_stdout(args: &[&str], env: &[(&str, String)], stdout: Stdio) -> Output {
    rekey_cmd(args, env)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .expect("run rekey")
}

/// Runs `rekey` with its stderr set to `stderr`; stdout is captured.
fn with_stderr(args: &[&str], env: &[(&str, String)], stderr: Stdio) -> Output {
    rekey_cmd(args, env)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .output()
        .expect("run rekey")
}

/// 100 patients, one of whose values no key opens: a run of it earns exit 3.
async fn patients_with_one_damaged_value() -> (TestDb, tempfile::TempDir) {
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    db.client
        .execute(
            "UPDATE patient_persons SET phone_encrypted = substring(phone_encrypted from 1 for 20) WHERE id = 10",
            &[],
        )
        .await
        .unwrap();
    (db, tempfile::tempdir().unwrap())
}

/// Whether `text` holds a run of `len` characters from `alphabet`: how a
/// key printed in hex or base64 would show.
fn has_run_of(text: &str, len: usize, alphabet: impl Fn(char) -> bool) -> bool {
    let mut run = 0;
    for c in text.chars() {
        run = if alphabet(c) { run + 1 } else { 0 };
        if run >= len {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_stdout_reader_has_gone_exits_with_the_code_its_work_earned() {
    let (db, dir) = patients_with_one_damaged_value().await;
    let job = db.patients_job(&dir).display().to_string();
    let out = with_stdout(&["run", "--job", &job], &seed_env(), closed_pipe());
    assert_eq!(out.status.code(), Some(3), "{}", printed(&out));
    let verified = rekey(&["verify", "--job", &job, "--full", "--json"], &seed_env());
    assert_eq!(
        json(&verified)["values_undecryptable"],
        1,
        "{}",
        printed(&verified)
    );
    assert_eq!(
        json(&verified)["values_on_old_keys"],
        0,
        "{}",
        printed(&verified)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_stdout_is_a_full_disk_exits_with_the_code_its_work_earned_and_says_the_output_was_lost(
) {
    let (db, dir) = patients_with_one_damaged_value().await;
    let job = db.patients_job(&dir).display().to_string();
    let out = with_stdout(&["run", "--job", &job], &seed_env(), full_disk());
    assert_eq!(out.status.code(), Some(3), "{}", printed(&out));
    assert!(
        stderr(&out).contains("output to stdout was lost"),
        "{}",
        printed(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_stderr_reader_has_gone_still_finishes_with_its_logs_and_progress_lines_dropped(
) {
    let (db, dir) = patients_with_one_damaged_value().await;
    let job = db.patients_job(&dir).display().to_string();
    let args = [
        "--progress-every",
        "10ms",
        "run",
        "--job",
        &job,
        "--batch-size",
        "10",
    ];
    let out = with_stderr(&args, &seed_env(), closed_pipe());
    assert_eq!(out.status.code(), Some(3), "{}", printed(&out));
    assert!(printed(&out).contains("rewrote"), "{}", printed(&out));
}

#[test]
fn a_refusal_with_no_one_reading_stdout_or_stderr_keeps_its_exit_code() {
    let args = ["status", "--job", "/nonexistent/job.toml", "--json"];
    let out = rekey_cmd(&args, &[])
        .stdout(closed_pipe())
        .stderr(closed_pipe())
        .status()
        .expect("run rekey");
    assert_eq!(out.code(), Some(2));
}

#[test]
fn keygen_fails_saying_so_when_its_key_cannot_be_written() {
    for (sink, stdout) in [("closed pipe", closed_pipe()), ("full disk", full_disk())] {
        let out = with_stdout(&["keygen"], &[], stdout);
        assert_eq!(out.status.code(), Some(1), "{sink}: {}", printed(&out));
        let said = stderr(&out);
        assert!(said.contains("the key was not written"), "{sink}: {said}");
        assert!(
            !has_run_of(&said, 43, |c| c.is_ascii_alphanumeric()
                || "+/_-".contains(c)),
            "{sink}: a key in {said}"
        );
    }
}

#[test]
fn keygen_with_stdout_closed_fails_instead_of_writing_its_key_nowhere() {
    // A closed stdout is opened on /dev/null before rekey's code runs.
    let out = std::process::Command::new("sh")
        .args(["-c", "exec \"$0\" keygen >&-", env!("CARGO_BIN_EXE_rekey")])
        .stderr(Stdio::piped())
        .output()
        .expect("run rekey through sh");
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        stderr(&out).contains("the key was not written"),
        "{}",
        printed(&out)
    );
}
