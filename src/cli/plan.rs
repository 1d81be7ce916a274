//! `rekey plan`: values per key version and what a run would rewrite. With
//! keys in the environment and no target chosen yet (no
//! `<PREFIX>_CURRENT_VERSION`), it counts values per key version only.

use serde_json::json;

use crate::cli::args::StatusArgs;
use crate::cli::out::out;
use crate::cli::{open, print_json, Opened};
use crate::crypto::keyring::env;
use crate::engine::plan;
use crate::job::{Job, JobSpec};
use crate::secrets::KeySource;
use crate::Error;

/// The job, and whether its target keys were chosen.
async fn resolve(spec: &JobSpec, client: &tokio_postgres::Client) -> Result<(Job, bool), Error> {
    let env_keys = spec
        .keys
        .as_ref()
        .filter(|k| k.source == KeySource::Env && !spec.targets_have_own_keys());
    if let Some(keys) = env_keys {
        let (ring, chosen) =
            env::for_counting(&keys.prefix).map_err(|e| Error::Config(e.to_string()))?;
        if !chosen {
            return Ok((Job::resolve_with(spec, client, Some(&ring)).await?, false));
        }
    }
    Ok((Job::resolve(spec, client).await?, true))
}

/// `rekey plan`.
pub async fn plan(args: &StatusArgs) -> Result<u8, Error> {
    let Opened { spec, client, .. } = open(&args.common).await?;
    let (job, chosen) = resolve(&spec, &client).await?;
    let prefix = spec
        .keys
        .as_ref()
        .map_or("ENCRYPTION", |k| k.prefix.as_str());
    let columns = plan::count_by_key(&client, &job).await?;
    let to_rewrite: u64 = columns.iter().map(|c| c.to_rewrite).sum();
    if args.common.json {
        let target_keys: Vec<String> = job.targets.iter().map(|t| t.target_label()).collect();
        let columns: Vec<serde_json::Value> = columns
            .iter()
            .map(|c| {
                let mut v = serde_json::to_value(c).unwrap_or_default();
                if !chosen {
                    v["to_rewrite"] = serde_json::Value::Null;
                    v["on_target_key"] = serde_json::Value::Null;
                }
                v
            })
            .collect();
        print_json(&json!({
            "job": job.name,
            "target_chosen": chosen,
            "target_keys": if chosen { json!(target_keys) } else { serde_json::Value::Null },
            "values_to_rewrite": if chosen { json!(to_rewrite) } else { serde_json::Value::Null },
            "columns": columns,
        }));
    } else {
        if chosen {
            out!("{}: {} values to rewrite", job.name, to_rewrite);
            for t in &job.targets {
                out!("  {}: target {}", t.table, t.target_label());
            }
        } else {
            out!(
                "{}: no target key chosen yet ({prefix}_CURRENT_VERSION is not set): values per key version only",
                job.name
            );
        }
        for c in &columns {
            let keys = c
                .by_key
                .as_ref()
                .map(|m| {
                    m.iter()
                        .map(|(k, n)| format!("{k}={n}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_else(|| "key not visible without decrypting".into());
            let left = match (chosen, c.by_key.is_some()) {
                (false, _) => String::new(),
                (true, true) => format!("; {} to rewrite", c.to_rewrite),
                // only decrypting tells which are on the target key already
                (true, false) => format!(
                    "; {} to read (a run decrypts each, and rewrites those not on the target key)",
                    c.to_rewrite
                ),
            };
            let keys = if keys.is_empty() {
                String::new()
            } else {
                format!(", {keys}")
            };
            // an empty value holds no ciphertext: counted with the NULLs
            out!(
                "  {}.{}: {} rows, {} NULL or empty{keys}{left}",
                c.table,
                c.column,
                c.rows,
                c.nulls
            );
        }
    }
    Ok(0)
}
