//! Values of 40-50 KB: batches sized to `--max-batch-bytes`, lanes within the
//! memory bound.

use super::*;

/// The plaintext of row `id` in the large-values table: 40,000 to 50,000
/// pseudo-random bytes, the same every time it is asked for.
fn big_plaintext(id: i64) -> Vec<u8> {
    let len = 40_000 + (id as usize).wrapping_mul(7_919) % 10_001;
    let mut x = (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `patient_persons` with `rows` rows whose phone is a 40-50 KB value sealed under V1 (no emergency phones).
async fn seed_big_values(db: &TestDb, rows: i64) {
    create_patient_persons(db).await;
    let codec = v1_codec();
    let mut out = Vec::new();
    let mut start = 1;
    while start <= rows {
        let end = (start + 100 - 1).min(rows);
        let ids: Vec<i64> = (start..=end).collect();
        let sealed: Vec<Vec<u8>> = ids
            .iter()
            .map(|&id| {
                codec.seal(&big_plaintext(id), b"", None, &mut out);
                out.clone()
            })
            .collect();
        db.client
            .execute(
                "INSERT INTO patient_persons (id, name, phone_encrypted, notes)
                 SELECT id, 'patient ' || id, p, 'n' FROM unnest($1::bigint[], $2::bytea[]) AS u(id, p)",
                &[&ids, &sealed],
            )
            .await
            .unwrap();
        start = end + 1;
    }
    db.client
        .batch_execute("ANALYZE patient_persons")
        .await
        .unwrap();
}

// Today: exit 0 but "batch_rows_max": 3000 against a bound of 209 (the
// first page reads the whole table, ~135 MB of values, in one batch) and
// "peak_rss_mib": 851.
#[tokio::test(flavor = "multi_thread")]
async fn values_of_40_kb_under_max_batch_bytes_8mib_make_batches_that_fit_and_two_lanes_stay_within_the_memory_bound(
) {
    const ROWS: i64 = 3_000;
    const MAX_BATCH_BYTES: i64 = 8 << 20;
    let db = TestDb::new().await;
    seed_big_values(&db, ROWS).await;
    let smallest: i32 = db
        .client
        .query_one(
            "SELECT min(octet_length(phone_encrypted)) FROM patient_persons",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        smallest >= 40_000,
        "premise: every value is at least 40 KB (smallest: {smallest} bytes)"
    );
    // no batch of values this large can hold more rows than this and stay within 8 MiB
    let most_rows = MAX_BATCH_BYTES / i64::from(smallest);
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    // two lanes, whatever the machine's CPU count, so that the bound does not depend on it
    let out = rekey_within(
        &[
            "run",
            "--job",
            &j,
            "--json",
            "--max-batch-bytes",
            "8MiB",
            "--workers",
            "2",
        ],
        &seed_env(),
        Duration::from_secs(300),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let s = json(&out);
    let batch_rows_max = s["batch_rows_max"]
        .as_i64()
        .unwrap_or_else(|| panic!("no batch_rows_max: {s}"));
    assert!(batch_rows_max <= most_rows, "a batch of {batch_rows_max} rows of values of at least {smallest} bytes passes --max-batch-bytes 8MiB (at most {most_rows} rows fit): {s}");
    let rss = s["peak_rss_mib"]
        .as_f64()
        .unwrap_or_else(|| panic!("no peak_rss_mib: {s}"));
    let worked: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM rekey.progress WHERE range_no >= 0 AND rows_scanned > 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        worked >= 2,
        "premise: both lanes rewrote rows ({worked} ranges worked)"
    );
    // README: memory stays under about lanes x 20 x --max-batch-bytes, plus ~50 MiB
    // (both lanes work: the one range is split for the second)
    let bound = 50.0 + 2.0 * 20.0 * 8.0;
    assert!(
        rss < bound,
        "peak RSS {rss} MiB with two lanes of 8 MiB batches (bound {bound} MiB): {s}"
    );
    assert_eq!(s["values_rewritten"], ROWS, "{s}");

    // every value is under V2 and opens to its plaintext
    let v2 = VersionedGcm::new(&v2_ring()).unwrap();
    for from in (1..=ROWS).step_by(500) {
        let rows = db.client.query("SELECT id, phone_encrypted FROM patient_persons WHERE id BETWEEN $1 AND $2 ORDER BY id", &[&from, &(from + 499)]).await.unwrap();
        for r in rows {
            let (id, value): (i64, Vec<u8>) = (r.get(0), r.get(1));
            let opened = v2.open(&value, b"").unwrap_or_else(|e| {
                panic!("value of {id} does not open under V1 or V2: {}", e.kind())
            });
            assert_eq!(opened.key, 2, "value of {id} is not on V2");
            assert!(
                *opened.plaintext == big_plaintext(id),
                "value of {id} opens to another plaintext"
            );
        }
    }
}
