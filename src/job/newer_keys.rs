//! A key newer than the one a run rotates to, in keys read from the
//! environment: most often a version variable nobody raised, which turns a
//! rotation into a run that keeps every value where it was and exits 0.

use crate::secrets::KeySource;

use super::Job;

/// One line per target whose environment keys hold a key newer than the
/// key the target rotates to, naming the variables (never their values).
/// Stores with key states (a keyring file, Secrets Manager) are left out:
/// there a newer key that is not pending was rolled back on purpose.
pub fn newer_than_target(job: &Job) -> Vec<String> {
    let mut lines = Vec::new();
    for t in &job.targets {
        let Some(spec) = t.write.source.as_ref() else {
            continue;
        };
        if spec.source != KeySource::Env {
            continue;
        }
        if t.write.keyring.pending_id().is_some() {
            // a key staged (PENDING_VERSION, or KEY_NEW) is the target already
            continue;
        }
        let target = t.write.codec.target();
        let Some(newest) = t
            .write
            .keyring
            .keys()
            .map(|k| k.id())
            .filter(|id| *id > target)
            .max()
        else {
            continue;
        };
        let prefix = &spec.prefix;
        lines.push(format!(
            "{prefix}_KEY_V{newest} is set, newer than key {target} that {} is rotated to ({prefix}_CURRENT_VERSION={target}): \
             this run leaves values under key {target}. To rotate them to key {newest}, set {prefix}_CURRENT_VERSION={newest} \
             (where applications read it too, or {prefix}_PENDING_VERSION={newest} until they do) and run again; \
             if key {newest} was rolled back on purpose, nothing needs doing",
            t.table
        ));
    }
    lines
}
