//! Formats whose values do not show their key (raw AES-GCM): an application
//! writing under the old key behind the run, into rows the run has already
//! rotated, keeps `run` from saying done. The run cannot count such rows
//! by their first bytes; it opens the rows others wrote while it ran.

use rekey::crypto::codec::{Codec, Format};
use rekey::crypto::keyring::{Key, Keyring};

use super::*;

/// Rows of the table.
const ROWS: i64 = 20_000;

/// Raw AES-GCM under keys 1 and 2, sealing under `target`.
fn raw(target: u32) -> std::sync::Arc<dyn Codec> {
    let ring = Keyring::new(
        vec![Key::parse(1, K1).unwrap(), Key::parse(2, K2).unwrap()],
        target,
        None,
    )
    .unwrap();
    Format::RawGcm.codec(&ring).unwrap()
}

/// The ids of `blobs` whose value key `key` opens.
async fn under_key(db: &TestDb, key: u32) -> Vec<i64> {
    let codec = raw(2);
    db.client
        .query("SELECT id, b FROM blobs ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .filter(|r| {
            let value: Vec<u8> = r.get(1);
            codec.open(&value, b"").map(|o| o.key).ok() == Some(key)
        })
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_application_writing_raw_gcm_values_under_the_old_key_behind_the_run_keeps_it_from_saying_done(
) {
    let db = TestDb::new().await;
    db.client
        .batch_execute("CREATE TABLE blobs (id bigint PRIMARY KEY, b bytea)")
        .await
        .unwrap();
    let old = raw(1);
    let (mut ids, mut values, mut out) = (Vec::new(), Vec::new(), Vec::new());
    for i in 1..=ROWS {
        ids.push(i);
        old.seal(format!("blob {i}").as_bytes(), b"", None, &mut out);
        values.push(out.clone());
    }
    db.client
        .execute(
            "INSERT INTO blobs SELECT * FROM unnest($1::bigint[], $2::bytea[])",
            &[&ids, &values],
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("blobs.toml");
    std::fs::write(
        &job,
        format!(
            "[database]\nurl = \"{}\"\n[keys]\nsource = \"env\"\nprefix = \"RAW\"\n\
             [[target]]\ntable = \"blobs\"\ncolumns = [\"b\"]\nformat = \"raw-gcm\"\n",
            db.url
        ),
    )
    .unwrap();
    let env = vec![("RAW_KEY", K1.to_string()), ("RAW_KEY_NEW", K2.to_string())];
    let job = job.display().to_string();
    let run = rekey_cmd(
        &[
            "run",
            "--job",
            &job,
            "--json",
            "--batch-size",
            "500",
            "--max-rows-per-sec",
            "4000",
        ],
        &env,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    while committed(&db).await < 4_000 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // the application writes under the old key into rows the run has rotated
    let rotated = under_key(&db, 2).await;
    let mut value = Vec::new();
    for id in rotated.iter().take(50) {
        old.seal(format!("late {id}").as_bytes(), b"", None, &mut value);
        db.client
            .execute("UPDATE blobs SET b = $2 WHERE id = $1", &[id, &value])
            .await
            .unwrap();
    }
    let out = finish(run, Duration::from_secs(120)).await;
    assert_eq!(out.status.code(), Some(4), "{}", printed(&out));
    // measured apart: every value key 1 still opens, all written behind the run
    let on_old = under_key(&db, 1).await.len() as u64;
    assert!(on_old >= 50, "{on_old}");
    assert_eq!(
        json(&out)["rows_written_behind"].as_u64(),
        Some(on_old),
        "{}",
        printed(&out)
    );
    // and the next run rotates them
    let out = rekey(&["run", "--job", &job, "--json"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(under_key(&db, 1).await.is_empty());
}
