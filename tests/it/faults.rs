//! Things going wrong mid-run: the process killed, the application writing.

use std::time::Duration;

use rekey::engine::sink::{Commit, Writer};

use crate::by_hand::{first_batch, open_job, Opened};
use crate::harness::*;

/// Kills of the run: at least this many must land on a live process.
const KILLS: i64 = 24;

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_moments_then_resume_loses_nothing_and_encrypts_nothing_twice() {
    const ROWS: i64 = 60_000;
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    let untouched = db.unencrypted_checksum().await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);
    let j = job.display().to_string();
    let run = [
        "run",
        "--job",
        j.as_str(),
        "--json",
        "--batch-size",
        "150",
        "--workers",
        "2",
    ];

    // Kill when the committed progress passes a random point in each of
    // KILLS equal slices of the run, plus a random few milliseconds, so the
    // kills land at different points of a batch (reading, COPY, UPDATE,
    // COMMIT) and of the process's life (start-up, resume, mid-range).
    // REKEY_FAULT_SEED replays a failing sequence.
    let total = values_in(ROWS);
    let seed = std::env::var("REKEY_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let m = rekey::crypto::keyring::generate_material();
            u64::from_le_bytes([m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7]]) | 1
        });
    let mut rng = seed;
    let mut next = move |below: i64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % below.max(1) as u64) as i64
    };
    let (first, slice) = (total / 50, total * 90 / 100 / KILLS);
    let mut landed = 0;
    for k in 0..KILLS {
        let mut child = spawn_rekey(&run, &seed_env());
        wait_for_progress(&db, &mut child, first + k * slice + next(slice)).await;
        tokio::time::sleep(Duration::from_millis(next(20) as u64)).await;
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            landed += 1;
        }
        child.wait().unwrap();
    }
    let killed_at = committed_values(&db).await;
    println!("fault report: kill -9 landed {landed} of {KILLS} times (seed {seed}), {killed_at} of {total} values committed by then");
    assert!(
        landed >= 20,
        "only {landed} kills landed before the run finished (seed {seed})"
    );

    let out = rekey(&run, &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let summary = json(&out);
    assert_eq!(summary["resumed"], true);
    assert_eq!(
        summary["job_totals"]["values_rewritten"], total,
        "every value rewritten exactly once across all runs (seed {seed})"
    );
    db.assert_every_value_rotated(ROWS).await;
    assert_eq!(
        db.unencrypted_checksum().await,
        untouched,
        "a column rekey does not own was written"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_application_update_between_read_and_write_is_not_overwritten() {
    let db = TestDb::new().await;
    db.seed_patients(50).await;
    let dir = tempfile::tempdir().unwrap();
    let Opened {
        job,
        database,
        record,
    } = open_job(&db, &db.patients_job(&dir), &seed_env()).await;
    let target = &job.targets[0];

    // read and transform one batch, as the pipeline does
    let batch = first_batch(&database, target).await;

    // the application writes row 5 in between, still with the old key
    let mut fresh = Vec::new();
    rekey::crypto::codec::Codec::seal(&v1_codec(), b"app wrote this", b"", None, &mut fresh);
    db.client
        .execute(
            "UPDATE patient_persons SET phone_encrypted = $1 WHERE id = 5",
            &[&fresh],
        )
        .await
        .unwrap();

    let mut writer = Writer::connect(&database, &job, record.id).await.unwrap();
    let counts = writer
        .write(target, Commit::Range(&record.ranges[0]), &batch)
        .await
        .unwrap()
        .counts;
    assert_eq!(counts.conflicts, 1);
    assert_eq!(counts.rows_rewritten, 49);
    assert_eq!(counts.values_rewritten, 49 + 33);

    let now: Vec<u8> = db
        .client
        .query_one(
            "SELECT phone_encrypted FROM patient_persons WHERE id = 5",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(now, fresh, "the application's write was overwritten");
    let after = db.decrypted_patients(&v2_ring()).await;
    assert_eq!(after[&6].0, Decrypted::Plain(2, phone(6)));

    // the conflict is on record, and the end of the run re-reads it: the application's value, rotated
    let pending: i64 = db
        .client
        .query_one("SELECT count(*) FROM rekey.conflicts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, 1);
    let mut ranges = record.ranges.clone();
    ranges[0].done = true;
    let progress = rekey::observe::progress::Progress::new(0, "test", true);
    let settings = rekey::engine::pipeline::Settings {
        lanes: 1,
        batch_size: 100,
        ..Default::default()
    };
    let outcome = rekey::engine::pipeline::run(
        &database,
        std::sync::Arc::new(job),
        ranges,
        rekey::engine::pipeline::Mode::Rewrite { job_id: record.id },
        settings,
        Default::default(),
        progress,
    )
    .await
    .unwrap();
    assert_eq!(
        (outcome.counts.values_rewritten, outcome.conflicts_left),
        (2, 0),
        "both values of the conflicted row"
    );
    let after = db.decrypted_patients(&v2_ring()).await;
    assert_eq!(after[&5].0, Decrypted::Plain(2, "app wrote this".into()));
    let pending: i64 = db
        .client
        .query_one("SELECT count(*) FROM rekey.conflicts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_stops_cleanly_after_in_flight_batches_and_the_run_resumes() {
    let db = TestDb::new().await;
    db.seed_patients(40_000).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);
    let j = job.display().to_string();
    let run = ["run", "--job", j.as_str(), "--json", "--batch-size", "200"];
    let mut child = rekey_cmd(&run, &seed_env())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_progress(&db, &mut child, 5_001).await;
    std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", printed(&out));
    let first = json(&out);
    assert_eq!(first["stopped"], true);
    let status = rekey(&["status", "--job", &j, "--json"], &[]);
    assert_eq!(json(&status)["state"], "running");

    let out = rekey(&run, &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let second = json(&out);
    assert_eq!(second["resumed"], true);
    assert_eq!(second["job_totals"]["values_rewritten"], 40_000 + 26_667);
    assert_eq!(
        first["values_rewritten"].as_u64().unwrap() + second["values_rewritten"].as_u64().unwrap(),
        40_000 + 26_667,
        "nothing redone after a clean stop"
    );
}

// Before: after a run killed part-way, `status` gave the job's start as its
// last checkpoint, however many batches had committed since.
#[tokio::test(flavor = "multi_thread")]
async fn status_after_a_killed_run_gives_its_last_committed_batch_as_the_last_checkpoint() {
    let db = TestDb::new().await;
    db.seed_patients(2_000).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let run = [
        "run",
        "--job",
        j.as_str(),
        "--batch-size",
        "50",
        "--max-rows-per-sec",
        "200",
    ];
    let mut child = spawn_rekey(&run, &seed_env());
    // more than a second of batches (200 rows a second, 5 values in 3 rows)
    wait_for_progress(&db, &mut child, 700).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let last: String = db
        .client
        .query_one(
            "SELECT to_char(max(updated_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') FROM rekey.progress",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let status = json(&rekey(&["status", "--job", &j, "--json"], &[]));
    assert_eq!(status["state"], "running");
    assert_ne!(
        status["started_at"],
        last.as_str(),
        "the run lasted less than a second"
    );
    assert_eq!(status["updated_at"], last.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forced_run_with_a_wrong_old_key_quarantines_every_value_overwrites_none_and_the_right_key_then_rotates_them(
) {
    // (That the same run without --force is refused before any write is
    // config::a_key_that_opens_nothing_is_refused_before_any_write_unless_forced.)
    const ROWS: i64 = 300;
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);
    let j = job.display().to_string();
    let wrong_v1 = "9999999999999999999999999999999999999999999999999999999999999999";
    let wrong = vec![
        ("ENCRYPTION_KEY_V1", wrong_v1.to_string()),
        ("ENCRYPTION_KEY_V2", K2.to_string()),
        ("ENCRYPTION_CURRENT_VERSION", "2".to_string()),
    ];
    let before = db.checksum("patient_persons").await;

    let out = rekey(
        &[
            "run",
            "--job",
            &j,
            "--json",
            "--force",
            "--batch-size",
            "64",
        ],
        &wrong,
    );
    assert_eq!(out.status.code(), Some(3), "{}", printed(&out));
    let s = json(&out);
    assert_eq!(
        (s["values_failed"].as_i64(), s["values_rewritten"].as_i64()),
        (Some(values_in(ROWS)), Some(0))
    );
    assert_eq!(
        db.checksum("patient_persons").await,
        before,
        "a value was overwritten"
    );
    let listed: Vec<(String, String, i64)> = db
        .client
        .query(
            "SELECT column_name, error_kind, count(DISTINCT pk)::bigint FROM rekey.quarantine WHERE job_id = $1 AND table_name = 'public.patient_persons'
              GROUP BY 1, 2 ORDER BY 1, 2",
            &[&s["job_id"].as_i64().unwrap()],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        listed,
        vec![
            (
                "emergency_contact_phone_encrypted".to_string(),
                "auth_failed".to_string(),
                ROWS - ROWS / 3
            ),
            (
                "phone_encrypted".to_string(),
                "auth_failed".to_string(),
                ROWS
            ),
        ],
        "rekey.quarantine lists every value, once"
    );

    let out = rekey(&["run", "--job", &j, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        json(&out)["values_rewritten"].as_i64(),
        Some(values_in(ROWS))
    );
    db.assert_every_value_rotated(ROWS).await;
}
