//! Off a terminal (stderr to a file or a pipe, as under ECS, Kubernetes or
//! `nohup`), a run logs a progress line every `--progress-every`: rows done
//! and total, percent, rows/s and ETA, as text or as JSON fields. The total
//! is the rows left to rotate: counted for a small table, sampled for a
//! large one.

use crate::harness::*;

/// A run of 3,000 rows held to 1,500 rows/s: about two seconds.
async fn slow_run(log_format: &str) -> String {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    slow_run_on(&db, log_format)
}

/// A run over `db`'s patients held to 1,500 rows/s, logging progress every
/// 300 ms as `log_format`; what it wrote on stderr.
fn slow_run_on(db: &TestDb, log_format: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    run_logging_progress(
        &db.patients_job(&dir).display().to_string(),
        log_format,
        Pace {
            rows_per_sec: 1_500,
            batch: 100,
            every: "300ms",
        },
    )
}

/// The last JSON progress line of `log` that shows a total.
fn last_progress_with_a_total(log: &str) -> serde_json::Value {
    progress_lines(log)
        .into_iter()
        .rev()
        .find(|v| v.get("rows_total").is_some())
        .unwrap_or_else(|| panic!("no progress line with a total: {log}"))
}

/// How fast a run goes and how often it logs its progress.
struct Pace {
    rows_per_sec: u32,
    batch: u32,
    every: &'static str,
}

/// Runs `job` at `pace`, logging progress as `log_format`; what it wrote
/// on stderr once it finished (exit 0).
fn run_logging_progress(job: &str, log_format: &str, pace: Pace) -> String {
    run_logging_progress_with(job, log_format, pace, &[], &seed_env())
}

/// [`run_logging_progress`] with more arguments, `extra`, and the keys in `env`.
fn run_logging_progress_with(
    job: &str,
    log_format: &str,
    pace: Pace,
    extra: &[&str],
    env: &[(&str, String)],
) -> String {
    let (rate, batch) = (pace.rows_per_sec.to_string(), pace.batch.to_string());
    let mut args = vec![
        "run",
        "--job",
        job,
        "--max-rows-per-sec",
        &rate,
        "--batch-size",
        &batch,
        "--progress-every",
        pace.every,
        "--log-format",
        log_format,
    ];
    args.extend_from_slice(extra);
    let out = rekey(&args, env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    stderr(&out)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_off_a_terminal_logs_progress_with_percent_and_eta() {
    let log = slow_run("text").await;
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("rows (") && l.contains("rows/s, eta"))
        .collect();
    assert!(lines.len() >= 3, "{log}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("/3,000 rows (") && l.contains("%)")),
        "{log}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("rows/s") && l.contains('.')),
        "a rate with decimals: {log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_lines_are_json_fields_with_log_format_json() {
    let log = slow_run("json").await;
    let lines = progress_lines(&log);
    assert!(lines.len() >= 3, "{log}");
    for v in &lines {
        assert_eq!(v["rows_total"], 3_000, "{v}");
        assert!(v["percent"].as_u64().is_some_and(|p| p <= 100), "{v}");
        assert!(v["rows_per_second"].is_u64(), "{v}");
    }
    let done: Vec<u64> = lines
        .iter()
        .map(|v| v["rows_done"].as_u64().unwrap())
        .collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "{done:?}");
    assert!(
        done.first() < done.last(),
        "no progress between lines: {done:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_progress_total_is_the_rows_left_to_rotate_counted_beside_the_run() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    // rows with nothing encrypted have nothing to rotate; the catalogue still counts them
    db.client
        .batch_execute(
            "UPDATE patient_persons SET phone_encrypted = NULL, emergency_contact_phone_encrypted = NULL WHERE id <= 1200;
             ANALYZE patient_persons",
        )
        .await
        .unwrap();
    let left: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM patient_persons WHERE phone_encrypted IS NOT NULL OR emergency_contact_phone_encrypted IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let estimate: f32 = db
        .client
        .query_one(
            "SELECT reltuples FROM pg_class WHERE relname = 'patient_persons'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(
        estimate as i64, left,
        "the premise: the catalogue's size is not the count"
    );
    let log = slow_run_on(&db, "json");
    let last = last_progress_with_a_total(&log);
    assert_eq!(last["rows_total"], left, "{last}");
    assert_eq!(last["rows_total_estimated"], false, "{last}");
}

/// A table too large to count cheaply beside the run gets its total from a
/// sample of its pages: near the rows left to rotate, not the catalogue's
/// size, and shown as an estimate to the end.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_table_s_progress_total_is_estimated_from_a_sample_of_its_pages() {
    let db = TestDb::new().await;
    db.seed_patients(20_000).await;
    pad_with_rows_to_leave_alone(&db).await;
    assert_sampled_total_near(&db, 20_000.0);
}

/// A sampled total that comes out low is found again as the run nears it,
/// rather than shown as unknown for the rest of the run. Here the sample
/// sees only half the rows to rotate (the job's filter hides every other
/// row from a read-only repeatable-read transaction, which only the count
/// uses), so the first total is about 10,000 of 20,000.
#[tokio::test(flavor = "multi_thread")]
async fn a_low_sampled_total_is_found_again_before_the_rows_done_pass_it() {
    let db = TestDb::new().await;
    db.seed_patients(20_000).await;
    pad_with_rows_to_leave_alone(&db).await;
    db.client
        .batch_execute(
            "CREATE FUNCTION half_to_the_count(id bigint) RETURNS boolean LANGUAGE sql STABLE AS $$
               SELECT CASE WHEN current_setting('transaction_isolation') = 'repeatable read'
                           THEN id % 2 = 0 ELSE true END $$",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = db.patients_job_where(&dir, "half_to_the_count(id)");
    // about 10 s, for samples at most every 20 times as long as one takes
    // (a first sample of up to 0.4 s still leaves time for a second)
    let log = run_logging_progress(
        &path.display().to_string(),
        "json",
        Pace {
            rows_per_sec: 2_000,
            batch: 250,
            every: "100ms",
        },
    );
    let past: Vec<serde_json::Value> = progress_lines(&log)
        .into_iter()
        .filter(|v| v["rows_done"].as_u64().is_some_and(|done| done > 12_000))
        .collect();
    assert!(
        !past.is_empty(),
        "the premise: a run long enough to watch: {log}"
    );
    // well past the first total (about 10,000, within 20% at 5 standard deviations)
    assert!(
        past.iter()
            .any(|v| v["rows_total"].as_u64() >= v["rows_done"].as_u64()),
        "past 12,000 rows done, no progress line shows a total: {log}"
    );
}

/// Where a value's key cannot be read from its first bytes (here a move to
/// another key store, where every value is read whatever key it names),
/// every row with a value stays among those "left" once rotated: the total
/// is found once, and not sampled again, which would add the rows done to
/// it a second time.
#[tokio::test(flavor = "multi_thread")]
async fn a_total_whose_rotated_rows_still_look_left_is_not_sampled_again() {
    let db = TestDb::new().await;
    db.seed_patients(20_000).await;
    pad_with_rows_to_leave_alone(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.toml");
    std::fs::write(
        &path,
        format!(
            "[database]\nurl = \"{}\"\n\n[[target]]\ntable = \"patient_persons\"\nprimary_key = [\"id\"]\ncolumns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]\nformat = \"versioned-gcm\"\nkeys = {{ source = \"env\" }}\nto_keys = {{ source = \"env\", prefix = \"NEWKEYS\" }}\n",
            db.url
        ),
    )
    .unwrap();
    let env = [
        ("ENCRYPTION_KEY_V1", K1.to_string()),
        ("ENCRYPTION_CURRENT_VERSION", "1".to_string()),
        // a third key, the new store's
        ("NEWKEYS_KEY_V1", K3.to_string()),
        ("NEWKEYS_CURRENT_VERSION", "1".to_string()),
    ];
    let log = run_logging_progress_with(
        &path.display().to_string(),
        "json",
        Pace {
            rows_per_sec: 4_000,
            batch: 250,
            every: "100ms",
        },
        &[],
        &env,
    );
    let last = last_progress_with_a_total(&log);
    let total = last["rows_total"].as_f64().unwrap();
    assert!(
        total <= 1.2 * 20_000.0,
        "a total of {total} for 20,000 rows to move: {last}"
    );
}

/// Once a rewrite has begun, the dead versions it leaves spread the
/// table's rows over more pages (here twice as many). A sample taken then
/// is not scaled by the catalogue's rows per page times the pages now
/// (which counts twice the rows): mid-run, it is scaled by the live rows
/// found at the start; in a run after an interrupted one (the catalogue
/// not analyzed since), by the share of pages sampled. The rows left are
/// in a few hundred pages, so a sample's count of them varies by about
/// 10% (one standard deviation): the bound is 40%, where counting twice the
/// rows is 100% over.
#[tokio::test(flavor = "multi_thread")]
async fn a_sample_after_a_rewrite_began_is_not_inflated_by_the_dead_versions_it_left() {
    let db = TestDb::new().await;
    db.seed_patients(20_000).await;
    pad_with_rows_to_leave_alone(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = rekey::job::JobSpec::load(&db.patients_job(&dir)).unwrap();
    // the keys, as a run reads them (the same for every test that sets them)
    for (k, v) in seed_env() {
        std::env::set_var(k, v);
    }
    let job = rekey::job::Job::resolve(&spec, &db.client).await.unwrap();
    let mut at_start = rekey::engine::left::AtStart::default();
    rows_left(&db, &job, &mut at_start).await;
    // what a run leaves halfway: half the rows to rotate done, and a new
    // version of every row (the old ones dead, the table twice its pages)
    db.client
        .batch_execute(
            "ALTER TABLE patient_persons SET (autovacuum_enabled = false);
             UPDATE patient_persons SET phone_encrypted = NULL, emergency_contact_phone_encrypted = NULL WHERE id <= 10000;
             UPDATE patient_persons SET notes = notes WHERE id > 10000",
        )
        .await
        .unwrap();
    let left: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM patient_persons WHERE phone_encrypted IS NOT NULL OR emergency_contact_phone_encrypted IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mid_run = rows_left(&db, &job, &mut at_start).await;
    let after_an_interrupted_run =
        rows_left(&db, &job, &mut rekey::engine::left::AtStart::default()).await;
    for (when, found) in [
        ("mid-run", mid_run),
        ("after an interrupted run", after_an_interrupted_run),
    ] {
        assert!(
            (found as f64 - left as f64).abs() <= 0.4 * left as f64,
            "{when}: sampled {found} rows left to rotate of {left}"
        );
    }
}

/// The rows left to rotate in `job`, sampled (the premise of the tests
/// that call it).
async fn rows_left(
    db: &TestDb,
    job: &rekey::job::Job,
    at_start: &mut rekey::engine::left::AtStart,
) -> u64 {
    match rekey::engine::left::rows_left(&db.client, job, at_start)
        .await
        .unwrap()
    {
        rekey::engine::left::RowsLeft::Sampled(rows) => rows,
        counted => panic!("the premise: the table is sampled, not counted: {counted:?}"),
    }
}

/// A partitioned table is sized by its partitions (the parent holds no
/// pages of its own): large, it is sampled like any other.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_partitioned_table_s_progress_total_is_sampled_over_its_partitions() {
    let db = TestDb::new().await;
    db.seed_patients(20_000).await;
    db.client
        .batch_execute(
            "ALTER TABLE patient_persons RENAME TO seeded;
             CREATE TABLE patient_persons (LIKE seeded INCLUDING ALL) PARTITION BY RANGE (id);
             CREATE TABLE patients_low PARTITION OF patient_persons FOR VALUES FROM (MINVALUE) TO (100001);
             CREATE TABLE patients_high PARTITION OF patient_persons FOR VALUES FROM (100001) TO (MAXVALUE);
             INSERT INTO patient_persons SELECT * FROM seeded;
             DROP TABLE seeded",
        )
        .await
        .unwrap();
    pad_with_rows_to_leave_alone(&db).await;
    assert_sampled_total_near(&db, 20_000.0);
}

/// Adds 60,000 rows with nothing to rotate after the seeded ones (the
/// catalogue counts them), so the table is larger than is counted.
async fn pad_with_rows_to_leave_alone(db: &TestDb) {
    db.client
        .batch_execute(
            "INSERT INTO patient_persons (id, name, notes)
               SELECT g, 'no phone', repeat('n', 120) FROM generate_series(100001, 160000) g;
             ANALYZE patient_persons; ANALYZE",
        )
        .await
        .unwrap();
    let pages: f64 = db
        .client
        .query_one(
            "SELECT greatest(pg_relation_size('patient_persons'),
                             (SELECT coalesce(sum(pg_relation_size(relid)), 0) FROM pg_partition_tree('patient_persons')))::float8
                    / current_setting('block_size')::float8",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        pages > rekey::engine::left::SAMPLE_PAGES,
        "the premise: the table ({pages} pages) is sampled, not counted"
    );
}

/// Runs the patients' job and checks its last progress total: an estimate
/// within 20% of the `left` rows to rotate (about half the pages are
/// sampled: 3-4% off at one standard deviation).
fn assert_sampled_total_near(db: &TestDb, left: f64) {
    let dir = tempfile::tempdir().unwrap();
    let log = run_logging_progress(
        &db.patients_job(&dir).display().to_string(),
        "json",
        Pace {
            rows_per_sec: 10_000,
            batch: 500,
            every: "200ms",
        },
    );
    let last = last_progress_with_a_total(&log);
    assert_eq!(last["rows_total_estimated"], true, "{last}");
    let total = last["rows_total"].as_f64().unwrap();
    assert!(
        (total - left).abs() <= 0.2 * left,
        "a sampled total of {total} for {left} rows to rotate (the catalogue holds 80,000): {last}"
    );
}

/// Runs `args` under an 80-column pseudo-terminal; returns everything drawn.
const UNDER_A_TERMINAL: &str = r#"
import fcntl, os, pty, struct, subprocess, sys, termios
master, slave = pty.openpty()
fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
env = dict(line.split("=", 1) for line in sys.stdin.read().splitlines() if line)
p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
os.close(slave)
out = b""
while True:
    try:
        chunk = os.read(master, 65536)
    except OSError:
        break
    if not chunk:
        break
    out += chunk
p.wait()
sys.stdout.write(out.decode("utf-8", "replace"))
sys.stdout.write("\nEXIT %d\n" % p.returncode)
"#;

/// What a terminal of 80 columns shows of `rekey args` on `db`'s patients
/// job: each redraw or printed line on a line of its own (split at carriage
/// returns and newlines), escapes taken out; and the exit line.
fn under_a_terminal(db: &TestDb, dir: &tempfile::TempDir, args: &[&str]) -> (Vec<String>, String) {
    let job = db.patients_job(dir).display().to_string();
    let mut env: Vec<String> = seed_env().iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.push(format!(
        "PATH={}",
        std::env::var("PATH").unwrap_or_default()
    ));
    env.push("TERM=xterm".into());
    let mut argv = vec![env!("CARGO_BIN_EXE_rekey"), "run", "--job", &job];
    argv.extend_from_slice(args);
    let drawn = python(UNDER_A_TERMINAL, &argv, &env.join("\n"));
    let mut plain = String::new();
    let mut chars = drawn.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte
            if chars.next_if_eq(&'[').is_some() {
                for n in chars.by_ref() {
                    if n.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        plain.push(c);
    }
    let exit = plain
        .lines()
        .rev()
        .find(|l| l.starts_with("EXIT "))
        .unwrap_or_else(|| panic!("no exit line: {drawn:?}"))
        .to_string();
    let lines = plain
        .split(['\r', '\n'])
        .filter(|l| !l.is_empty() && !l.starts_with("EXIT "))
        .map(str::to_owned)
        .collect();
    (lines, exit)
}

/// Whether a line of the terminal is (or holds) a drawing of the bar.
fn is_bar(line: &str) -> bool {
    line.starts_with("rewriting") || line.contains("% ")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_terminal_bar_fits_an_80_column_terminal_and_rounds_its_rate() {
    let db = TestDb::new().await;
    db.seed_patients(3_000).await;
    let dir = tempfile::tempdir().unwrap();
    let (lines, exit) = under_a_terminal(
        &db,
        &dir,
        &["--max-rows-per-sec", "1500", "--batch-size", "100"],
    );
    assert_eq!(exit, "EXIT 0", "{lines:#?}");
    let bars: Vec<&String> = lines.iter().filter(|l| is_bar(l)).collect();
    assert!(!bars.is_empty(), "no bar drawn: {lines:#?}");
    for b in &bars {
        assert!(
            b.chars().count() <= 80,
            "a bar line wider than 80 columns: {b:?}"
        );
        let c: Vec<char> = b.chars().collect();
        let decimals = c
            .windows(3)
            .any(|w| w[0].is_ascii_digit() && w[1] == '.' && w[2].is_ascii_digit());
        assert!(!decimals, "a rate with decimals: {b:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_line_logged_while_the_bar_is_drawn_gets_a_line_of_its_own() {
    let db = TestDb::new().await;
    db.seed_patients(6_000).await;
    let dir = tempfile::tempdir().unwrap();
    // the window ends (which is logged) while the bar is drawn: the window
    // counts from the start of the process, the rows take about 6 s
    let (lines, exit) = under_a_terminal(
        &db,
        &dir,
        &[
            "--max-rows-per-sec",
            "1000",
            "--batch-size",
            "100",
            "--run-time",
            "3s",
        ],
    );
    assert_eq!(exit, "EXIT 5", "{lines:#?}");
    let at = lines
        .iter()
        .position(|l| l.contains("window is over"))
        .unwrap_or_else(|| panic!("the window's end is not logged: {lines:#?}"));
    assert!(
        lines[..at].iter().any(|l| is_bar(l)),
        "the premise: the bar was drawn before the line was logged: {lines:#?}"
    );
    assert!(
        !is_bar(&lines[at]),
        "the logged line shares its line with the bar: {:?}",
        lines[at]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn processes_sharing_a_job_each_show_the_job_s_rows_done_against_everyone_s_rows_left() {
    let db = TestDb::new().await;
    db.seed_patients(6_000).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    // two processes of one lane each, 1,000 rows/s each: about 3 s together
    let processes: Vec<_> = (0..2)
        .map(|_| {
            let job = job.clone();
            std::thread::spawn(move || {
                run_logging_progress_with(
                    &job,
                    "json",
                    Pace {
                        rows_per_sec: 1_000,
                        batch: 100,
                        every: "200ms",
                    },
                    &["--workers", "1", "--check-every", "100ms"],
                    &seed_env(),
                )
            })
        })
        .collect();
    for p in processes {
        let log = p.join().unwrap();
        let last = last_progress_with_a_total(&log);
        let (done, total) = (
            last["rows_done"].as_u64().unwrap(),
            last["rows_total"].as_u64().unwrap(),
        );
        // the other process's rows count too; they are read at each check, so the last line can lag the job by a check
        assert!(
            done <= total && done as f64 >= 0.8 * total as f64,
            "a process shows only its own share of the job: {last}\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_on_its_own_shows_no_rows_but_its_own() {
    let db = TestDb::new().await;
    let rows = 4_000;
    db.seed_patients(rows).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    // two lanes committing small batches while the monitor reads the job's
    // rows every 50 ms: none of them is another process's (the moment a
    // batch is committed and not yet counted is the unit test's in
    // observe::counts; it is too short to be met here at will)
    let log = run_logging_progress_with(
        &job,
        "json",
        Pace {
            rows_per_sec: 2_000,
            batch: 50,
            every: "100ms",
        },
        &["--workers", "2", "--check-every", "50ms"],
        &seed_env(),
    );
    let lines = progress_lines(&log);
    assert!(
        lines.len() >= 5,
        "the premise: a run logging its progress: {log}"
    );
    for v in &lines {
        assert!(
            v["rows_done"].as_u64().unwrap() <= rows as u64,
            "more rows done than the table holds: {v}\n{log}"
        );
    }
}
