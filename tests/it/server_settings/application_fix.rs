//! An undecryptable value the application fixes between rekey's read and
//! write: not quarantined.

use super::*;
use crate::by_hand::{first_batch, open_job, Opened};

// Today: the batch's compare-and-swap leaves row 5 alone (a conflict), yet
// its tampered phone is still recorded in rekey.quarantine (auth_failed);
// the run that re-reads the row rotates the application's value and then
// exits 3, with the stale quarantine row left behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_value_the_application_fixes_between_read_and_write_is_not_quarantined() {
    use rekey::engine::sink::{Commit, Writer};

    const ROWS: i64 = 50;
    const FIXED: i64 = 5; // has both values (5 % 3 != 0)
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    // row 5's phone is tampered with: its tag no longer authenticates
    let mut tampered: Vec<u8> = db
        .client
        .query_one(
            "SELECT phone_encrypted FROM patient_persons WHERE id = $1",
            &[&FIXED],
        )
        .await
        .unwrap()
        .get(0);
    *tampered.last_mut().unwrap() ^= 0x55;
    db.client
        .execute(
            "UPDATE patient_persons SET phone_encrypted = $2 WHERE id = $1",
            &[&FIXED, &tampered],
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job_file = db.patients_job(&dir);
    let j = job_file.display().to_string();

    // a run as the pipeline does it, up to the write of its one batch
    let Opened {
        job,
        database,
        record,
    } = open_job(&db, &job_file, &seed_env()).await;
    assert_eq!(
        record.ranges.len(),
        1,
        "premise: one range, read in one page"
    );
    let target = &job.targets[0];
    let batch = first_batch(&database, target).await;

    // the application fixes row 5's phone (a good value under V1) in between
    let mut fixed = Vec::new();
    v1_codec().seal(phone(FIXED).as_bytes(), b"", None, &mut fixed);
    db.client
        .execute(
            "UPDATE patient_persons SET phone_encrypted = $2 WHERE id = $1",
            &[&FIXED, &fixed],
        )
        .await
        .unwrap();

    let mut writer = Writer::connect(&database, &job, record.id).await.unwrap();
    let counts = writer
        .write(target, Commit::Range(&record.ranges[0]), &batch)
        .await
        .unwrap()
        .counts;
    // premise: the application's fix made the row conflict (it is re-read at the end of the run)
    assert_eq!(counts.conflicts, 1, "premise: row {FIXED} conflicted");
    let pending: i64 = db
        .client
        .query_one("SELECT count(*) FROM rekey.conflicts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, 1, "premise: row {FIXED} waits in rekey.conflicts");
    let quarantined_for = || async {
        db.client
            .query_one(
                "SELECT count(*) FROM rekey.quarantine WHERE pk_text = $1",
                &[&format!("({FIXED})")],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(
        quarantined_for().await,
        0,
        "row {FIXED}'s value was quarantined though its row conflicted and will be re-read"
    );

    // the same command finishes the job: it re-reads row 5 and rotates the application's value
    let run = ["run", "--job", j.as_str(), "--json"];
    let out = rekey_within(&run, &seed_env(), Duration::from_secs(60));
    assert_eq!(
        out.status.code(),
        Some(0),
        "nothing is left undecryptable: exit 0, not 3\n{}",
        printed(&out)
    );
    db.assert_every_value_rotated(ROWS).await;
    // and a second run finds nothing to do and nothing quarantined
    let out = rekey_within(&run, &seed_env(), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        quarantined_for().await,
        0,
        "rekey.quarantine keeps a row for the value the application fixed"
    );
}
