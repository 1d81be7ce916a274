//! `rekey verify`: proves (or disproves) that no value is left on an old key.

use std::sync::Arc;

use crate::cli::args::VerifyArgs;
use crate::cli::exit::EXIT_LEFT_ON_OLD_KEYS;
use crate::cli::out::out;
use crate::cli::{default_lanes, open, print_json, Opened};
use crate::engine::verify::{self, Depth, VerifyMode};
use crate::job::Job;
use crate::Error;

/// `rekey verify`.
pub async fn verify(args: &VerifyArgs) -> Result<u8, Error> {
    let Opened { spec, db, client } = open(&args.common).await?;
    let job = Arc::new(Job::resolve(&spec, &client).await?);
    let lanes = crate::engine::plan::lanes_for_server(&client, default_lanes()).await?;
    let v = verify::verify(
        &db,
        &client,
        &job,
        Depth {
            full: args.full,
            sample: args.sample,
            lanes,
        },
        args.quiet || args.common.json,
    )
    .await?;
    // a target's `where` leaves rows out of sight: said, never implied
    let only_where: Vec<(String, &str)> = job
        .targets
        .iter()
        .filter_map(|t| t.filter.as_deref().map(|f| (t.table.to_string(), f)))
        .collect();
    // values under a retired key come back: what brings the key back, if anything
    let named = crate::engine::named_keys::named_keys(&job, &v.failures, v.failures_capped()).await;
    if args.common.json {
        let mut value = serde_json::to_value(&v).unwrap_or_default();
        value["named_keys"] = serde_json::to_value(&named).unwrap_or_default();
        value["only_where"] = only_where
            .iter()
            .map(|(table, filter)| serde_json::json!({ "table": table, "where": filter }))
            .collect();
        print_json(&value);
    } else {
        out!(
            "{}: {} values: {} on the target key, {} on old keys, {} undecryptable{} ({})",
            job.name,
            v.values_total,
            v.values_on_target_key,
            v.values_on_old_keys,
            v.values_undecryptable,
            if v.values_hash_mismatched > 0 {
                format!(
                    ", {} search hashes matching no hash key",
                    v.values_hash_mismatched
                )
            } else {
                String::new()
            },
            if v.mode == VerifyMode::Full {
                "every value decrypted".to_string()
            } else {
                format!(
                    "key versions counted for every value, {} sampled values decrypted",
                    v.values_sampled
                )
            }
        );
        for (col, keys) in &v.by_column {
            let list = keys
                .iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect::<Vec<_>>()
                .join(" ");
            out!("  {col}: {list}");
        }
        for f in v.failures.iter().take(20) {
            let what = if f.error == crate::crypto::codec::CodecError::HashMismatch.kind() {
                "search hash matches no hash key"
            } else {
                "cannot decrypt"
            };
            out!(
                "  {what}: {}.{} at key {}: {}",
                f.table,
                f.column,
                f.key,
                f.error
            );
        }
        for line in crate::engine::named_keys::advice(&named) {
            out!("  {line}");
        }
        for (table, filter) in &only_where {
            out!("  only rows of {table} where {filter} were read (the target's `where`): its other rows were not verified");
        }
        out!(
            "{}",
            match (v.verified, v.mode) {
                (true, VerifyMode::Full) => "verified: every value decrypted, nothing left on an old key".to_string(),
                (true, _) => format!(
                    "verified by a sample: every value's key version counted, {} sampled values decrypted; `rekey verify --full` decrypts every value (a retire always does)",
                    v.values_sampled
                ),
                (false, _) => not_verified(v.values_on_old_keys, v.values_undecryptable, v.values_hash_mismatched, !named.is_empty()),
            }
        );
    }
    Ok(if v.verified { 0 } else { EXIT_LEFT_ON_OLD_KEYS })
}

/// What to do about values left on old keys, and about values no key opens.
/// `named`: some undecryptable values name their key, told above with the way on.
fn not_verified(on_old: u64, undecryptable: u64, mismatched: u64, named: bool) -> String {
    let mut out = "NOT verified:".to_string();
    if on_old > 0 {
        out.push_str(&format!(
            " {on_old} values on old keys: `rekey run` rewrites them;"
        ));
    }
    if undecryptable > 0 {
        out.push_str(&format!(
            " {undecryptable} values no key given opens (damaged, truncated, or under a key the job does not have): {}\
             `rekey run` cannot fix these; restore them from a backup or add the key they were written under \
             (each is listed above; a run records in rekey.quarantine those it reads, never one labelled with the \
             target key)",
            if named {
                "those under a key named above are told there with what brings it back, if anything; otherwise "
            } else {
                ""
            }
        ));
    }
    if mismatched > 0 {
        out.push_str(&format!(
            " {mismatched} search hashes match no hash key given for their row's plaintext (made with a hash key the job \
             does not have, or written beside another value): `rekey run` leaves them as they are; give the job the hash \
             key they were made with, or recompute them from the plaintext (each is listed above)"
        ));
    }
    out.trim_end_matches(';').to_string()
}
