//! `rekey secrets rewrap --to-kms-key KEY`: master key rotation. Every data
//! key of the job's key table or KMS keyring is re-wrapped under the new
//! master key (see `secrets::rewrap`), under the job's lifecycle lock,
//! audited before and after. The old master key is left as it is.

use serde_json::json;

use crate::cli::args::RewrapArgs;
use crate::cli::out::out;
use crate::cli::secrets::recorded;
use crate::cli::{open, print_json};
use crate::db::idle::keeping_alive;
use crate::lifecycle::rotation::job_keys;
use crate::secrets::rewrap::{self, rewrap as rewrap_keys};
use crate::secrets::KeySource;
use crate::state;
use crate::Error;

/// `rekey secrets rewrap`.
pub async fn rewrap(a: &RewrapArgs) -> Result<u8, Error> {
    let life = &a.life;
    let mut opened = open(&life.common).await?;
    let spec = opened.spec.clone();
    let keys = job_keys(&spec)?;
    if !matches!(keys.source, KeySource::Table | KeySource::AwsKms) {
        return Err(Error::Config(format!(
            "a master key rewrap re-wraps KMS-wrapped data keys: [keys] source must be \"table\" or \"aws-kms\", not {:?}",
            keys.source
        )));
    }
    state::ensure_schema(&mut opened.client).await?;
    let client = &opened.client;
    state::lock_lifecycle(client, spec.name.as_deref().unwrap_or_default()).await?;
    // the lock's session is kept from idling while the store works (a KMS
    // call or two per data key)
    let mut store = keeping_alive(client, rewrap::open(&keys)).await?;
    let secret_id = store.secret_id();
    let to = &a.to_kms_key;
    recorded(
        life,
        &spec,
        client,
        &secret_id,
        "master_key_rewrap_started",
        &format!("re-wrapping every data key under KMS key {to}"),
    )
    .await?;
    let rewrapped = keeping_alive(
        client,
        rewrap_keys(&mut store, to, |id| {
            tracing::debug!("data key {id} re-wrapped")
        }),
    )
    .await;
    let done = match rewrapped {
        Ok(done) => done,
        Err(e) => {
            // the trail says it ended: what is re-wrapped stays so, a rerun finishes
            let note = format!("rewrap to KMS key {to} stopped: {e}");
            recorded(
                life,
                &spec,
                client,
                &secret_id,
                "master_key_rewrap_failed",
                &note,
            )
            .await?;
            return Err(e);
        }
    };
    let from: Vec<&String> = done.from.iter().collect();
    let mut note = format!(
        "{} of {} data keys of {secret_id} re-wrapped under {} ({} already were), each checked to unwrap to the same key under it alone; \
         none of them needs {} any more",
        done.rewrapped,
        done.total,
        done.target,
        done.already,
        if from.is_empty() {
            "any other master key".to_string()
        } else {
            format!("{from:?}")
        }
    );
    if !done.elsewhere.is_empty() {
        note.push_str(&format!(
            "; keys of the same table this job does not cover (other purposes) are still wrapped under another master key: {}",
            done.elsewhere.join(", ")
        ));
    }
    if !done.unchecked.is_empty() {
        note.push_str(&format!(
            "; KMS would not say which master key wraps {} (same table, other purposes)",
            done.unchecked.join(", ")
        ));
    }
    let covered = done.elsewhere.is_empty() && done.unchecked.is_empty();
    recorded(
        life,
        &spec,
        client,
        &store.secret_id(),
        "master_key_rewrapped",
        &note,
    )
    .await?;
    let next = if covered {
        format!(
            "set [keys] kms_key_id = {to:?} in the job, so new data keys are wrapped under it; the old master key was left enabled: \
             disable it (or schedule its deletion) once nothing else uses it"
        )
    } else {
        format!(
            "set [keys] kms_key_id = {to:?} in the job, so new data keys are wrapped under it; keep the old master key enabled: \
             the keys named above still need it; rewrap them with a job of their purpose, then run this again"
        )
    };
    if life.common.json {
        print_json(&json!({
            "event": "master_key_rewrapped",
            "target": done.target,
            "total": done.total,
            "rewrapped": done.rewrapped,
            "already": done.already,
            "from": done.from,
            "elsewhere": done.elsewhere,
            "unchecked": done.unchecked,
            "next": next,
        }));
    } else {
        out!("{note}");
        out!("next: {next}");
    }
    Ok(0)
}
