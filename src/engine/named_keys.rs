//! Values no key given opens that name their key (a version byte, a Tink
//! key id): most often values under a retired key come back (rows
//! restored from a backup taken before the rotation, a standby promoted
//! before it replayed it, a late writer). Where the job's store retired
//! that key, its archive may still hold it, and one command brings it back
//! for a run to rewrite the values; where its material was destroyed, no
//! key opens them any more. Told by `rekey verify`, `rekey run` and the
//! run's refusal of a key left out.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::crypto::keyring::KeyId;
use crate::engine::sink::Failure;
use crate::engine::verify::Verification;
use crate::job::{Job, Target};
use crate::secrets::archived::{self, Held};
use crate::secrets::KeysSpec;

/// A key that values no key given opens name.
#[derive(Debug, Clone, Serialize)]
pub struct NamedKey {
    /// The key's id.
    pub key_id: KeyId,
    /// Where the job looks for it.
    #[serde(rename = "where")]
    pub where_key: String,
    /// What its store holds of it.
    pub held: Held,
    /// Values counted that name it: among the failures reported, which
    /// are capped, so at least this many where `at_least`.
    pub values: u64,
    /// Whether more values failed than were reported.
    pub at_least: bool,
    /// The first of them, `table.column at key (…)`, or `table` alone.
    pub first: String,
    /// The command that brings it back, where the store's archive holds it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<String>,
    /// The command that would restore it from the store's archive, for
    /// people: said where the archive holds it, or may.
    #[serde(skip)]
    pub restore_command: String,
    /// Why the store could not be read, where it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
}

/// The keys that `failures` name, with what each target's store holds of
/// them (one look per store). `capped`: more values failed than
/// `failures` holds.
pub async fn named_keys(job: &Job, failures: &[Failure], capped: bool) -> Vec<NamedKey> {
    let mut counted: BTreeMap<(String, KeyId), (u64, String)> = BTreeMap::new();
    let mut stores: BTreeMap<String, &KeysSpec> = BTreeMap::new();
    for f in failures {
        let Some(id) = f.named_key else { continue };
        let Some(t) = job.targets.iter().find(|t| t.index == f.target) else {
            continue;
        };
        // a label no key has (versioned-gcm's version byte 0): damaged, no key to name
        if !t.read.format.names_a_key(id) {
            continue;
        }
        let Some(spec) = t.read.source.as_ref() else {
            continue;
        };
        let label = spec.store_label();
        stores.entry(label.clone()).or_insert(spec);
        counted
            .entry((label, id))
            .or_insert_with(|| (0, format!("{}.{} at key {}", f.table, f.column, f.key)))
            .0 += 1;
    }
    let looked = counted_keys(&stores, &counted).await;
    counted
        .into_iter()
        .map(|((label, id), (values, first))| {
            let (held, unreadable) = looked
                .get(&(label.clone(), id))
                .cloned()
                .unwrap_or((Held::Unknown, None));
            named(
                job,
                stores[&label],
                id,
                held,
                values,
                capped,
                first,
                unreadable,
            )
        })
        .collect()
}

/// The keys `missing` names, counted in values of `target` that name
/// them (a run's sample, or a count by key), with what the target's store
/// holds of each.
pub async fn named_in_counts(
    job: &Job,
    target: &Target,
    missing: &BTreeMap<KeyId, u64>,
) -> Vec<NamedKey> {
    let Some(spec) = target.read.source.as_ref() else {
        return Vec::new();
    };
    let ids: Vec<KeyId> = missing.keys().copied().collect();
    let (held, unreadable) = archived::held(spec, &ids).await;
    // in the order asked: the ids of `missing`
    held.into_iter()
        .zip(missing.values())
        .map(|((id, h), &values)| {
            let first = target.table.to_string();
            named(job, spec, id, h, values, false, first, unreadable.clone())
        })
        .collect()
}

/// What each store of `stores` holds of the keys `counted` names in it.
async fn counted_keys(
    stores: &BTreeMap<String, &KeysSpec>,
    counted: &BTreeMap<(String, KeyId), (u64, String)>,
) -> BTreeMap<(String, KeyId), (Held, Option<String>)> {
    let mut looked = BTreeMap::new();
    for (label, spec) in stores {
        let ids: Vec<KeyId> = counted
            .keys()
            .filter(|(l, _)| l == label)
            .map(|(_, id)| *id)
            .collect();
        let (held, unreadable) = archived::held(spec, &ids).await;
        for (id, h) in held {
            looked.insert((label.clone(), id), (h, unreadable.clone()));
        }
    }
    looked
}

#[allow(clippy::too_many_arguments)]
fn named(
    job: &Job,
    spec: &KeysSpec,
    id: KeyId,
    held: Held,
    values: u64,
    at_least: bool,
    first: String,
    unreadable: Option<String>,
) -> NamedKey {
    let command = restore_command(job, id);
    let restore = (held == Held::Archived).then(|| command.clone());
    NamedKey {
        restore_command: command,
        key_id: id,
        where_key: spec.where_key(id),
        held,
        values,
        at_least,
        first,
        restore,
        unreadable,
    }
}

/// The command that restores key `id` of the job's store: with the job
/// file where `secrets` manages the job's keys, else with one that does.
pub fn restore_command(job: &Job, id: KeyId) -> String {
    match (&job.file, job.keys_managed) {
        (Some(file), true) => format!(
            "rekey secrets restore --job {} --key-id {id}",
            shell_word(file)
        ),
        _ => format!(
            "rekey secrets restore --job <a job file whose [keys] is that store> --key-id {id}"
        ),
    }
}

/// `word` as one word of a shell command line.
fn shell_word(word: &str) -> String {
    if word
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:@,".contains(c))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// What to do about the values a full verify found no key opens, for each
/// key they name ([`named_keys`], then [`advice`]): what a refusal resting
/// on that verify says besides; and whether those keys account for every
/// such value (none is merely damaged, nor a search hash no key made).
pub async fn advice_after(job: &Job, v: &Verification) -> (Vec<NamedKey>, Vec<String>, bool) {
    let named = named_keys(job, &v.failures, v.failures_capped()).await;
    let named_values: u64 = named.iter().map(|n| n.values).sum();
    let all = !v.failures_capped() && named_values >= v.values_unreadable();
    let advice = advice(&named);
    (named, advice, all)
}

/// What a refusal over values a full verify (`v`, of `job`) found no key
/// opens says besides its own words: for each key the values name, what
/// brings it back (its `named_keys`); and, unless those keys account for
/// every such value, `otherwise` (the refusal's own fix), led by "for
/// them" or "for the others". Nothing where every value opened.
pub async fn said_after(job: &Job, v: &Verification, otherwise: &str) -> (String, Vec<NamedKey>) {
    if v.values_unreadable() == 0 {
        return (String::new(), Vec::new());
    }
    let (named, advice, all) = advice_after(job, v).await;
    let mut said: String = advice.iter().map(|a| format!("; {a}")).collect();
    if !all {
        said.push_str(&format!(
            "; {}: {otherwise}",
            if advice.is_empty() {
                "for them"
            } else {
                "for the others"
            }
        ));
    }
    (said, named)
}

/// What a refusal resting on a full verify (`v`) says of the values that
/// opened under a key other than the current one: a run rewrites them.
pub fn rewrites_the_others(v: &Verification) -> &'static str {
    if v.values_on_old_keys > 0 {
        "; `rekey run` rewrites the values on other keys"
    } else {
        ""
    }
}

/// What to do about the values that name each key, for people.
pub fn advice(named: &[NamedKey]) -> Vec<String> {
    named
        .iter()
        .map(|n| {
            let them = format!(
                "{}{} values (the first {}) are under {}",
                if n.at_least { "at least " } else { "" },
                n.values,
                n.first,
                n.where_key
            );
            match n.held {
                Held::Archived => format!(
                    "{them}, retired and still in the store's archive (were they restored from a backup?): \
                     `{}` brings it back as a previous key, `rekey run` then rewrites them under the current \
                     key, and a retire retires it again",
                    n.restore_command
                ),
                Held::Destroyed => format!(
                    "{them}, retired and its material destroyed (purged, or compromised): no key opens them any \
                     more; restore them from a backup taken after the rotation, or write them again from their source"
                ),
                Held::NotInStore => {
                    format!("{them}, which the keys given do not hold: give the job that key")
                }
                Held::Unknown => format!(
                    "{them}, which the keys given do not hold; whether the store's archive holds it is not known: \
                     the store could not be read ({}). If it was retired, `{}` brings it back while its archive \
                     holds it",
                    n.unreadable.as_deref().unwrap_or("no reason given"),
                    n.restore_command
                ),
            }
        })
        .collect()
}
