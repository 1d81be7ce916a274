//! Even lanes to the end: a lane that finds no range left splits off the
//! rest of a range another lane of its process is still reading, so every
//! lane works until the last rows.

use rekey::crypto::codec::Codec;

use crate::harness::*;

/// The ranges of the database's only job: (range_no, rows scanned, rows rewritten).
async fn ranges(db: &TestDb) -> Vec<(i32, i64, i64)> {
    db.client
        .query(
            "SELECT range_no, rows_scanned, rows_rewritten FROM rekey.progress WHERE range_no >= 0 ORDER BY range_no",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_of_one_range_is_split_so_every_lane_rewrites_rows() {
    let db = TestDb::new().await;
    // fewer rows than one range holds: planning gives the whole table to one range
    let rows = 4_000;
    db.seed_patients(rows).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();

    let out = rekey(
        &[
            "run",
            "--job",
            &job,
            "--json",
            "--workers",
            "2",
            "--batch-size",
            "100",
        ],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    let ranges = ranges(&db).await;
    assert!(
        ranges.len() > 1,
        "the lane without a range split the other's: {ranges:?}"
    );
    assert!(
        ranges.iter().all(|&(_, _, rewritten)| rewritten > 0),
        "every range split off was worked: {ranges:?}"
    );
    // the ranges still cover the table exactly once
    let scanned: i64 = ranges.iter().map(|r| r.1).sum();
    let rewritten: i64 = ranges.iter().map(|r| r.2).sum();
    assert_eq!((scanned, rewritten), (rows, rows), "{ranges:?}");
    db.assert_every_value_rotated(rows).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn near_its_nonce_budget_a_key_counts_every_lanes_batches_exactly() {
    let db = TestDb::new().await;
    let rows = 6_000;
    db.seed_patients(rows).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let (fingerprint, before) = db.near_its_nonce_budget().await;

    let out = rekey(
        &[
            "run",
            "--job",
            &job,
            "--json",
            "--workers",
            "2",
            "--batch-size",
            "100",
        ],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(rows).await;
    let used = db.encryptions_under(&fingerprint).await;
    let encrypted = db.encrypted_values().await;
    assert_eq!(used, before + encrypted, "every encryption counted once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_range_over_a_composite_text_and_uuid_key_is_split_and_covered_exactly_once() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            "CREATE TABLE events (region text, id uuid, payload bytea, PRIMARY KEY (region, id))",
        )
        .await
        .unwrap();
    let rows = 3_000;
    let mut sealed = Vec::new();
    for i in 0..rows {
        let mut out = Vec::new();
        v1_codec().seal(format!("event {i}").as_bytes(), b"", None, &mut out);
        sealed.push(out);
    }
    db.client
        .execute(
            "INSERT INTO events SELECT CASE WHEN i % 3 = 0 THEN 'eu' ELSE 'us' END, md5(i::text)::uuid, p
               FROM unnest($1::bytea[]) WITH ORDINALITY AS u(p, i)",
            &[&sealed],
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.toml");
    std::fs::write(
        &path,
        format!(
            "[database]\nurl = \"{}\"\n[keys]\nsource = \"env\"\n[[target]]\ntable = \"events\"\ncolumns = [\"payload\"]\nformat = \"versioned-gcm\"\n",
            db.url
        ),
    )
    .unwrap();
    let job = path.display().to_string();
    let out = rekey(
        &[
            "run",
            "--job",
            &job,
            "--json",
            "--workers",
            "2",
            "--batch-size",
            "50",
        ],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let ranges = ranges(&db).await;
    assert!(ranges.len() > 1, "split: {ranges:?}");
    let scanned: i64 = ranges.iter().map(|r| r.1).sum();
    assert_eq!(scanned, rows, "every row read once: {ranges:?}");
    let verify = rekey(&["verify", "--job", &job, "--full", "--json"], &seed_env());
    assert_eq!(verify.status.code(), Some(0), "{}", printed(&verify));
    assert_eq!(json(&verify)["values_on_target_key"], rows);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_with_nothing_to_claim_gets_half_of_the_first_ones_range() {
    let db = TestDb::new().await;
    let rows = 6_000;
    db.seed_patients(rows).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    // one slow process holds the table's only range
    let mut first = spawn_rekey_captured(
        &[
            "run",
            "--job",
            &job,
            "--json",
            "--workers",
            "1",
            "--batch-size",
            "100",
            "--max-rows-per-sec",
            "1500",
        ],
        &seed_env(),
    );
    wait_for_progress(&db, &mut first, 200).await;

    let second = rekey(
        &["run", "--job", &job, "--json", "--workers", "1"],
        &seed_env(),
    );
    assert_eq!(second.status.code(), Some(0), "{}", printed(&second));
    assert!(
        json(&second)["rows_rewritten"].as_u64() > Some(0),
        "the second process was handed part of the first one's range: {}",
        printed(&second)
    );
    let first = first.wait_with_output().unwrap();
    assert_eq!(first.status.code(), Some(0), "{}", printed(&first));

    let ranges = ranges(&db).await;
    let scanned: i64 = ranges.iter().map(|r| r.1).sum();
    assert_eq!(scanned, rows, "every row read once: {ranges:?}");
    db.assert_every_value_rotated(rows).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_split_the_server_lost_leaves_the_range_open_and_every_row_is_still_rotated() {
    let db = TestDb::new().await;
    let rows = 6_000;
    db.seed_patients(rows).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let one_lane = |pace: &'static str| {
        spawn_rekey_captured(
            &[
                "run",
                "--job",
                &job,
                "--json",
                "--workers",
                "1",
                "--batch-size",
                "100",
                "--max-rows-per-sec",
                pace,
            ],
            &seed_env(),
        )
    };
    // one slow process holds the table's only range; a second one, with
    // nothing to claim, asks for it to be split
    let mut first = one_lane("1000");
    wait_for_progress(&db, &mut first, 200).await;
    let second = one_lane("100000");
    // the split lands (range 1, not claimed yet): lose it, as a server that
    // lost the split's commit would: one range to the end, nothing split off
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let lost = db
            .client
            .query_one(
                "WITH gone AS (DELETE FROM rekey.progress WHERE range_no = 1 AND owner IS NULL RETURNING 1),
                      widened AS (UPDATE rekey.progress SET upper_key = NULL WHERE range_no = 0 AND EXISTS (SELECT 1 FROM gone) RETURNING 1)
                 SELECT count(*) FROM widened",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        if lost == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no split to lose");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }

    let first = first.wait_with_output().unwrap();
    assert_eq!(first.status.code(), Some(0), "{}", printed(&first));
    let second = second.wait_with_output().unwrap();
    assert_eq!(second.status.code(), Some(0), "{}", printed(&second));
    // the reader stopped at the split key, but the range was not marked done
    // there: it was claimed again and read to its real end
    db.assert_every_value_rotated(rows).await;
}
