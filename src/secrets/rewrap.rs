//! Master key (KEK) rotation: every wrapped data key of a store re-wrapped
//! under a new KMS master key, without touching a single value of user
//! data. Each key is re-wrapped inside KMS (ReEncrypt), unwrapped again
//! under the new master key alone, and its fingerprint compared with the
//! old one before the old wrapped form is replaced.
//!
//! The key table replaces each row with one compare-and-swap UPDATE on the
//! old wrapped value, committed at once: a rewrap killed at any instant
//! leaves every key wrapped under one master key or the other, and running
//! it again finishes it (keys already under the new master key are left
//! alone). The KMS keyring file is rewritten once, atomically. The old
//! master key is never disabled here: the rewrap ends by unwrapping every
//! key under the new master key alone, and says so; disabling or deleting
//! the old one is the operator's later step. A job's key table holds one
//! purpose's keys; rows of the table's other purposes are not re-wrapped,
//! and those not under the new master key are named, so that the old one
//! is not disabled while they need it.

use std::collections::BTreeSet;

use crate::crypto::keyring::KeyId;
use crate::secrets::{kms, table, wrap, KeySource, KeysSpec, Store};
use crate::Error;

/// What a rewrap did.
#[derive(Debug, Clone, Default)]
pub struct Rewrapped {
    /// The new master key's ARN.
    pub target: String,
    /// Wrapped data keys in the store (archive included).
    pub total: usize,
    /// Re-wrapped by this invocation.
    pub rewrapped: usize,
    /// Already under the new master key (an earlier, interrupted run).
    pub already: usize,
    /// The master keys they were wrapped under before (ARNs).
    pub from: BTreeSet<String>,
    /// Keys of the same store this rewrap does not cover (a key table's
    /// other purposes) still under another master key: "AUDIT version 3
    /// under arn:...".
    pub elsewhere: Vec<String>,
    /// Keys of the same store it does not cover whose master key KMS
    /// would not name (Decrypt refused).
    pub unchecked: Vec<String>,
}

/// Opens the store of `keys` for a rewrap: its data keys unwrapped under
/// whichever master key wraps each (an interrupted rewrap leaves both).
pub async fn open(keys: &KeysSpec) -> Result<Store, Error> {
    match keys.source {
        KeySource::Table => Ok(Store::Table(Box::new(
            table::KeyTableStore::open(keys, false).await?,
        ))),
        KeySource::AwsKms => Ok(Store::Kms(Box::new(
            kms::KmsKeyring::open_with(keys, true).await?,
        ))),
        _ => Store::open(keys).await,
    }
}

/// Re-wraps every data key of `store` under master key `to`; `done` is
/// called after each key is replaced (progress, tests).
pub async fn rewrap(
    store: &mut Store,
    to: &str,
    mut done: impl FnMut(KeyId),
) -> Result<Rewrapped, Error> {
    let Store::Table(t) = store else {
        return match store {
            Store::Kms(k) => k.rewrap_to(to).await,
            other => Err(Error::Config(format!(
                "a master key rewrap needs a store of KMS-wrapped data keys ([keys] source = \"table\" or \"aws-kms\"); this job's keys are in the {}",
                other.kind()
            ))),
        };
    };
    let kms = t.kms().clone();
    let target = wrap::usable_master(&kms, to)
        .await
        .map_err(|e| Error::Config(format!("{e}; nothing was re-wrapped")))?;
    let mut out = Rewrapped {
        target: target.clone(),
        ..Rewrapped::default()
    };
    for (id, old) in t.wrapped_keys() {
        out.total += 1;
        let (key, under) = wrap::unwrap(&kms, id, &old, None).await?;
        if under == target {
            out.already += 1;
            continue;
        }
        out.from.insert(under);
        let new = wrap::rewrap(&kms, id, &old, &target).await?;
        let (again, _) = wrap::unwrap(&kms, id, &new, Some(&target)).await?;
        if again.fingerprint() != key.fingerprint() {
            return Err(Error::Runtime(format!(
                "data key {id} re-wrapped under {target} unwraps to another key (fingerprint {} instead of {}); it was not replaced, and nothing after it was re-wrapped",
                again.fingerprint(),
                key.fingerprint()
            )));
        }
        if !t.replace_wrapped(id, &old, &new).await? {
            return Err(Error::Runtime(format!(
                "data key {id} changed in its store while it was being re-wrapped (another rewrap?); nothing was lost: run the rewrap again"
            )));
        }
        out.rewrapped += 1;
        done(id);
    }
    // the proof: every key opens under the new master key alone, one
    // added meanwhile included; under the key table's lock, so no other
    // job's stage (a key wrapped under the old master key) commits between
    // this read and the answer
    t.hold_lock().await?;
    let checked = all_under(t, &kms, &target).await;
    let released = t.release_lock().await;
    checked?;
    released?;
    for (purpose, version, under) in t.other_purposes_wrapping().await? {
        match under {
            Some(arn) if arn == target => {}
            Some(arn) => out
                .elsewhere
                .push(format!("{purpose} version {version} under {arn}")),
            None => out.unchecked.push(format!("{purpose} version {version}")),
        }
    }
    Ok(out)
}

/// Reads the key table again and unwraps every key under `target` alone.
async fn all_under(
    t: &mut table::KeyTableStore,
    kms: &aws_sdk_kms::Client,
    target: &str,
) -> Result<(), Error> {
    t.refresh().await?;
    for (id, blob) in t.wrapped_keys() {
        wrap::unwrap(kms, id, &blob, Some(target)).await.map_err(|e| {
            Error::Runtime(format!("after the rewrap, data key {id} does not unwrap under {target} alone: {e}; keep the old master key enabled and run the rewrap again"))
        })?;
    }
    Ok(())
}
