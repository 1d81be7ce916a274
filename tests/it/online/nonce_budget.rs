//! The nonce budget (2^32 random nonces per key): a key near it is refused
//! before any write, and a batch that would take it past is rolled back and
//! the run stops.

use rekey::crypto::codec::Codec;

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_key_near_its_nonce_budget_is_refused_before_any_write() {
    let (db, _dir, j) = patients(100).await;
    let out = rekey(&["run", "--job", &j, "--json"], &seed_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let fingerprint = v2_ring().target().fingerprint();
    let used: i64 = db
        .client
        .query_one(
            "SELECT sum(encryptions)::bigint FROM rekey.key_usage WHERE fingerprint = $1",
            &[&fingerprint],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        used,
        values(100),
        "every encryption under the new key is counted"
    );

    // the key has (nearly) used up its 2^32 random nonces; new old-key rows arrive
    db.client
        .execute(
            "UPDATE rekey.key_usage SET encryptions = CASE WHEN shard = (SELECT min(shard) FROM rekey.key_usage WHERE fingerprint = $1) THEN 4294967290 ELSE 0 END WHERE fingerprint = $1",
            &[&fingerprint],
        )
        .await
        .unwrap();
    let stale = v1_codec();
    let mut value = Vec::new();
    stale.seal(b"+15550000000", b"", None, &mut value);
    db.client
        .execute(
            "INSERT INTO patient_persons (id, name, phone_encrypted) VALUES (100001, 'late', $1)",
            &[&value],
        )
        .await
        .unwrap();
    db.client
        .execute(
            "INSERT INTO patient_persons (id, name, phone_encrypted) VALUES (100002, 'late', $1)",
            &[&value],
        )
        .await
        .unwrap();
    db.client
        .execute(
            "INSERT INTO patient_persons (id, name, phone_encrypted) VALUES (100003, 'late', $1)",
            &[&value],
        )
        .await
        .unwrap();
    db.client
        .execute(
            "INSERT INTO patient_persons (id, name, phone_encrypted) VALUES (100004, 'late', $1)",
            &[&value],
        )
        .await
        .unwrap();
    let before = db.checksum("patient_persons").await;
    let out = rekey(&["run", "--job", &j, "--json", "--restart"], &seed_env());
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(printed(&out).contains("2^32"), "{}", printed(&out));
    assert_eq!(
        db.checksum("patient_persons").await,
        before,
        "nothing written"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_that_would_take_its_key_past_the_nonce_budget_is_rolled_back_and_the_run_stops() {
    let (db, _dir, j) = patients(20_000).await;
    let mut child = spawn_captured(&[
        "run",
        "--job",
        &j,
        "--json",
        "--batch-size",
        "200",
        "--workers",
        "1",
        "--max-rows-per-sec",
        "5000",
    ]);
    wait_for_progress(&db, &mut child, 1_000).await;
    // another job (or process) sealing under the same key spends the budget meanwhile
    let fingerprint = v2_ring().target().fingerprint();
    db.client
        .execute(
            "UPDATE rekey.key_usage SET encryptions = CASE WHEN shard = (SELECT min(shard) FROM rekey.key_usage WHERE fingerprint = $1) THEN 4294967290 ELSE 0 END WHERE fingerprint = $1",
            &[&fingerprint],
        )
        .await
        .unwrap();
    let at_limit = committed(&db).await;
    let out = finish(child, Duration::from_secs(60)).await;
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        printed(&out).contains("2^32") && printed(&out).contains("rolled back"),
        "{}",
        printed(&out)
    );
    let used: i64 = db
        .client
        .query_one(
            "SELECT sum(encryptions)::bigint FROM rekey.key_usage WHERE fingerprint = $1",
            &[&fingerprint],
        )
        .await
        .unwrap()
        .get(0);
    assert!(used <= 1 << 32, "the budget was never passed: {used}");
    // at most the batch in flight when the budget was spent committed after it
    assert!(
        committed(&db).await <= at_limit + 400,
        "{} > {at_limit} + one batch",
        committed(&db).await
    );
}
