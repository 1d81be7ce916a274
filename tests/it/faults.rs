//! Things going wrong mid-run: the process killed, the application writing.

use std::time::Duration;

use rekey::checkpoint;
use rekey::db::Database;
use rekey::job::{Job, JobSpec};
use rekey::sink::{Batch, Commit, Writer};
use rekey::source::{self, Source};
use rekey::transform;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_moments_then_resume_loses_nothing_and_encrypts_nothing_twice() {
    let db = TestDb::new().await;
    db.seed_patients(60_000).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);
    let j = job.display().to_string();
    let run = ["run", "--job", j.as_str(), "--json", "--batch-size", "200", "--workers", "2"];

    // Kill when the committed progress passes each of these fractions, plus a
    // random few milliseconds so the kill lands at a different point of a batch.
    let total = 100_000i64;
    let mut kills = 0;
    let mut jitter = rekey::keyring::generate_material()[0] as u64;
    for fraction in [0.05, 0.15, 0.25, 0.35, 0.45, 0.55] {
        let mut child = spawn_rekey(&run, &seed_env());
        let threshold = (total as f64 * fraction) as i64;
        wait_for_progress(&db, &mut child, threshold).await;
        jitter = (jitter * 7919 + 104_729) % 15;
        tokio::time::sleep(Duration::from_millis(jitter)).await;
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
    }
    assert!(kills >= 5, "only {kills} kills landed before the run finished");

    let out = rekey(&run, &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let summary = json(&out);
    assert_eq!(summary["resumed"], true);
    assert_eq!(summary["job_totals"]["values_rewritten"], 60_000 + 40_000, "every value rewritten exactly once across all runs");

    for (id, (p, e)) in db.decrypted_patients(&v2_ring()).await {
        assert_eq!(p, Decrypted::Plain(2, phone(id)), "phone of {id}");
        let want = if id % 3 == 0 { Decrypted::Null } else { Decrypted::Plain(2, emergency(id)) };
        assert_eq!(e, want, "emergency phone of {id}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_application_update_between_read_and_write_is_not_overwritten() {
    let db = TestDb::new().await;
    db.seed_patients(50).await;
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec::load(&db.patients_job(&dir)).unwrap();
    for (k, v) in seed_env() {
        std::env::set_var(k, v);
    }
    let job = Job::resolve(&spec, &db.client).await.unwrap();
    let database = Database::parse(&db.url).unwrap();
    let mut admin = database.connect().await.unwrap();
    checkpoint::ensure_schema(&mut admin).await.unwrap();
    let record = checkpoint::open_job(&mut admin, &job, 1, false).await.unwrap();
    let target = &job.targets[0];

    // read and transform one batch, as the pipeline does
    let mut source = Source::new(database.connect().await.unwrap(), true);
    let rows = source.page(target, None, None, 100).await.unwrap();
    let mut cells = Vec::new();
    transform::rewrite(target, &rows, &mut cells);
    let last_key = rows.last().map(|r| source::row_key(target, r));
    let batch = Batch { range: 0, rows, cells, last_key, end: true };

    // the application writes row 5 in between, still with the old key
    let mut fresh = Vec::new();
    rekey::codec::Codec::seal(&v1_codec(), b"app wrote this", b"", None, &mut fresh);
    db.client.execute("UPDATE patient_persons SET phone_encrypted = $1 WHERE id = 5", &[&fresh]).await.unwrap();

    let mut writer = Writer::connect(&database, &job, record.id).await.unwrap();
    let counts = writer.write(target, Commit::Range(&record.ranges[0]), &batch).await.unwrap().counts;
    assert_eq!(counts.conflicts, 1);
    assert_eq!(counts.rows_rewritten, 49);
    assert_eq!(counts.values_rewritten, 49 + 33);

    let now: Vec<u8> = db.client.query_one("SELECT phone_encrypted FROM patient_persons WHERE id = 5", &[]).await.unwrap().get(0);
    assert_eq!(now, fresh, "the application's write was overwritten");
    let after = db.decrypted_patients(&v2_ring()).await;
    assert_eq!(after[&6].0, Decrypted::Plain(2, phone(6)));

    // the conflict is on record, and the end of the run re-reads it: the application's value, rotated
    let pending: i64 = db.client.query_one("SELECT count(*) FROM rekey.conflicts", &[]).await.unwrap().get(0);
    assert_eq!(pending, 1);
    let mut ranges = record.ranges.clone();
    ranges[0].done = true;
    let progress = rekey::progress::Progress::new(0, "test", true);
    let settings = rekey::pipeline::Settings { lanes: 1, batch_size: 100, ..Default::default() };
    let outcome = rekey::pipeline::run(&database, std::sync::Arc::new(job), ranges, rekey::pipeline::Mode::Rewrite { job_id: record.id }, settings, Default::default(), progress)
        .await
        .unwrap();
    assert_eq!((outcome.counts.values_rewritten, outcome.conflicts_left), (2, 0), "both values of the conflicted row");
    let after = db.decrypted_patients(&v2_ring()).await;
    assert_eq!(after[&5].0, Decrypted::Plain(2, "app wrote this".into()));
    let pending: i64 = db.client.query_one("SELECT count(*) FROM rekey.conflicts", &[]).await.unwrap().get(0);
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
    let mut child = rekey_cmd(&run, &seed_env()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    wait_for_progress(&db, &mut child, 5_001).await;
    std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
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
    assert_eq!(first["values_rewritten"].as_u64().unwrap() + second["values_rewritten"].as_u64().unwrap(), 40_000 + 26_667, "nothing redone after a clean stop");
}
