//! `rekey plan`: values per key version and what a run would rewrite.

use serde_json::json;

use crate::cli::args::StatusArgs;
use crate::cli::{open, print_json, Opened};
use crate::engine::plan;
use crate::job::Job;
use crate::Error;

/// `rekey plan`.
pub async fn plan(args: &StatusArgs) -> Result<u8, Error> {
    let Opened { spec, client, .. } = open(&args.common).await?;
    let job = Job::resolve(&spec, &client).await?;
    let columns = plan::count_by_key(&client, &job).await?;
    let to_rewrite: u64 = columns.iter().map(|c| c.to_rewrite).sum();
    if args.common.json {
        let target_keys: Vec<String> = job.targets.iter().map(|t| t.target_label()).collect();
        print_json(
            &json!({ "job": job.name, "target_keys": target_keys, "values_to_rewrite": to_rewrite, "columns": columns }),
        );
    } else {
        println!("{}: {} values to rewrite", job.name, to_rewrite);
        for t in &job.targets {
            println!("  {}: target {}", t.table, t.target_label());
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
            println!(
                "  {}.{}: {} rows, {} NULL, {}; {} to rewrite",
                c.table, c.column, c.rows, c.nulls, keys, c.to_rewrite
            );
        }
    }
    Ok(0)
}
