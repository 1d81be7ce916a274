//! `rekey verify`: proves (or disproves) that no value is left on an old key.

use std::sync::Arc;

use crate::cli::args::VerifyArgs;
use crate::cli::exit::EXIT_LEFT_ON_OLD_KEYS;
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
    if args.common.json {
        print_json(&serde_json::to_value(&v).unwrap_or_default());
    } else {
        println!(
            "{}: {} values: {} on the target key, {} on old keys, {} undecryptable ({})",
            job.name,
            v.values_total,
            v.values_on_target_key,
            v.values_on_old_keys,
            v.values_undecryptable,
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
            println!("  {col}: {list}");
        }
        for f in v.failures.iter().take(20) {
            println!(
                "  cannot decrypt {}.{} at key {}: {}",
                f.table, f.column, f.key, f.error
            );
        }
        println!(
            "{}",
            match (v.verified, v.mode) {
                (true, VerifyMode::Full) => "verified: every value decrypted, nothing left on an old key".to_string(),
                (true, _) => format!(
                    "verified by a sample: every value's key version counted, {} sampled values decrypted; `rekey verify --full` decrypts every value (a retire always does)",
                    v.values_sampled
                ),
                (false, _) => "NOT verified: values on old keys need `rekey run`; undecryptable ones are listed in rekey.quarantine after a run".into(),
            }
        );
    }
    Ok(if v.verified { 0 } else { EXIT_LEFT_ON_OLD_KEYS })
}
