//! Invariant 1: no key material in any output, log, error or engine table.

use base64::Engine as _;

use crate::harness::*;

fn forms(hex_key: &str) -> Vec<String> {
    let bytes = hex::decode(hex_key).unwrap();
    vec![
        hex_key.to_lowercase(),
        hex_key.to_uppercase(),
        base64::engine::general_purpose::STANDARD.encode(&bytes),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes),
        // the hex of the key as PostgreSQL would print it in a bytea
        format!("\\x{}", hex_key.to_lowercase()),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn no_key_material_in_outputs_errors_or_engine_tables() {
    let db = TestDb::new().await;
    db.seed_patients(2_000).await;
    db.client
        .execute(
            "UPDATE patient_persons SET phone_encrypted = '\\x0102' WHERE id = 3",
            &[],
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir);
    let j = job.display().to_string();
    let mut said = String::new();
    for args in [
        vec!["plan", "--job", &j],
        vec!["run", "--job", &j, "--dry-run"],
        vec!["run", "--job", &j],
        vec!["run", "--job", &j, "--json"],
        vec!["verify", "--job", &j, "--full", "--json"],
        vec!["status", "--job", &j],
    ] {
        said.push_str(&printed(&rekey(&args, &seed_env())));
    }
    // and an error path: a key of the wrong length
    let bad = vec![
        ("ENCRYPTION_KEY_V1", K1.to_string()),
        ("ENCRYPTION_KEY_V2", K2[..60].to_string()),
        ("ENCRYPTION_CURRENT_VERSION", "2".to_string()),
    ];
    said.push_str(&printed(&rekey(&["run", "--job", &j], &bad)));

    let tables = db
        .client
        .query_one(
            "SELECT (SELECT coalesce(string_agg(j::text, ''), '') FROM rekey.jobs j)
                 || (SELECT coalesce(string_agg(p::text, ''), '') FROM rekey.progress p)
                 || (SELECT coalesce(string_agg(q::text, ''), '') FROM rekey.quarantine q)
                 || (SELECT coalesce(string_agg(a::text, ''), '') FROM rekey.audit a)",
            &[],
        )
        .await
        .unwrap()
        .get::<_, String>(0);
    assert!(said.contains("rewrote"), "the commands did run: {said}");
    for key in [K1, K2, &K2[..60]] {
        for form in forms(if key.len() == 64 { key } else { K2 }) {
            assert!(!said.contains(&form), "key material in output");
            assert!(!tables.contains(&form), "key material in engine tables");
        }
        assert!(!said.contains(key), "key material in output");
    }
}
