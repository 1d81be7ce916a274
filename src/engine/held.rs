//! The run's watch on the stores it writes under: every key a rewrite
//! seals values with must stay in its store while the run goes and when it
//! ends ([`crate::secrets::held`]). A key the store lost is put back where
//! it was staged and nothing took its place; otherwise the run stops (the
//! values written under the key since are bounded by one look's interval)
//! and fails naming the key and the store: exit 0 would promise values no
//! key in any store opens.

use std::future::Future;
use std::time::Duration;

use crate::control::stop::Stop;
use crate::crypto::keyring::KeyId;
use crate::job::Job;
use crate::secrets::held::{Held, KeyWatch};
use crate::Error;

/// A key its store lost during a run and rekey put back as the pending
/// key: a write into the store, said in the run's summary and audited.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PutBack {
    /// The store, for people.
    pub store: String,
    /// The key's id.
    pub key_id: KeyId,
    /// The key's fingerprint (never its material).
    pub fingerprint: String,
    /// What the store had become.
    pub why: String,
    /// When rekey put it back (RFC 3339).
    pub at: String,
    /// The store as the audit trail names it, with the key's id.
    pub secret_id: String,
}

impl PutBack {
    /// The warning, for the log and the summary.
    pub fn said(&self) -> String {
        format!(
            "{} lost key {} (fingerprint {}) while this run wrote values under it: {}; rekey put it back as the \
             pending key at {}, as it was the only copy. Find what changed the store (a deployment writing an older \
             copy, a hand edit) before it does so again",
            self.store, self.key_id, self.fingerprint, self.why, self.at
        )
    }

    /// What the keys put back were, for the error of a run that failed
    /// after (the summary and the audit event come with a run's end).
    pub fn before_failing(put_back: &[PutBack]) -> String {
        put_back
            .iter()
            .map(|p| {
                format!(
                    "put key {} (fingerprint {}) back into {} as the pending key at {}",
                    p.key_id, p.fingerprint, p.store, p.at
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// How often the stores are looked at during a run: ten rounds of the
/// monitor (`--check-every`), from 1 s to 60 s. A keyring file unchanged
/// since the last look is not read again.
pub fn every(check_every: Duration) -> Duration {
    (check_every * 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// One watch per store and key the job's targets write under.
pub fn watches(job: &Job) -> Vec<KeyWatch> {
    let mut seen: Vec<(&crate::secrets::KeysSpec, String)> = Vec::new();
    let mut out = Vec::new();
    for t in &job.targets {
        let Some(keys) = &t.write.source else {
            continue;
        };
        let fingerprint = t.write.keyring.target().fingerprint();
        if seen.iter().any(|(k, f)| *k == keys && *f == fingerprint) {
            continue;
        }
        seen.push((keys, fingerprint));
        out.extend(KeyWatch::new(keys, &t.write.keyring));
    }
    out
}

/// Runs `run` while the stores are looked at every `every`; a key lost
/// stops the run (through `stop`), which ends with that error once the
/// batches in flight have committed. Keys put back are added to `put_back`.
pub async fn watching<T>(
    watches: &mut [KeyWatch],
    every: Duration,
    stop: &Stop,
    put_back: &mut Vec<PutBack>,
    run: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    if watches.is_empty() {
        return run.await;
    }
    tokio::pin!(run);
    loop {
        tokio::select! {
            done = &mut run => return done,
            _ = tokio::time::sleep(every) => {}
        }
        // a look runs to its end, the run going on meanwhile: one cut short
        // could have written the key back without saying so
        let mut done = None;
        let looked = {
            let looking = look(watches, false, put_back);
            tokio::pin!(looking);
            tokio::select! {
                looked = &mut looking => looked,
                ended = &mut run => {
                    done = Some(ended);
                    looking.await
                }
            }
        };
        if let Err(lost) = looked {
            tracing::error!("{}", lost.chain());
            stop.trigger();
            // the batches in flight commit; what the run wrote is recorded
            return Err(match done {
                None => {
                    let _ = run.await;
                    lost
                }
                // the run failed as the look found the key lost: both are said
                Some(Err(failed)) => Error::Runtime(format!(
                    "{}; the run had failed besides: {}",
                    lost.chain(),
                    failed.chain()
                )),
                Some(Ok(_)) => lost,
            });
        }
        if let Some(done) = done {
            return done;
        }
    }
}

/// Looks at every store once, reading each (`always`) or only those whose
/// file changed. A key put back is said and added to `put_back`; a key
/// lost is the error. A store that cannot be read fails the look at the
/// end of a run (`always`), and is tried again at the next look during one.
pub async fn look(
    watches: &mut [KeyWatch],
    always: bool,
    put_back: &mut Vec<PutBack>,
) -> Result<(), Error> {
    for w in watches.iter_mut() {
        let (id, fingerprint) = (w.key().id(), w.key().fingerprint());
        match w.check(always).await {
            Ok(Held::Present) => {}
            Ok(Held::PutBack { why, secret_id }) => {
                let back = PutBack {
                    store: w.store().to_string(),
                    key_id: id,
                    fingerprint,
                    why,
                    at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                        .to_string(),
                    secret_id: format!("{secret_id}#{id}"),
                };
                tracing::warn!("{}", back.said());
                put_back.push(back);
            }
            Ok(Held::Demoted { why }) => {
                return Err(Error::Runtime(format!(
                    "key {id} (fingerprint {fingerprint}), which this run writes values under, is no longer the key \
                     values go to in {}: {why}. The run stopped: the values it wrote under key {id} are on an old key \
                     now. Finish what changed the store (`rekey rotate` resumes an abort) rather than this run",
                    w.store()
                )))
            }
            Ok(Held::Lost { why }) => return Err(lost_key(w, &why)),
            // a keyring file that cannot be read (another passphrase, damage,
            // permissions) is no passing fault: the run stops at the first
            Err(e) if w.is_file() => {
                return Err(lost_key(w, &format!("it cannot be read ({})", e.chain())));
            }
            Err(e) if always => {
                return Err(Error::Runtime(format!(
                    "could not confirm that key {id} (fingerprint {fingerprint}), which this run wrote values under, \
                     is still in {}: {}. Check that it holds key {id} before anything else, then run `rekey run` \
                     again to finish",
                    w.store(),
                    e.chain()
                )))
            }
            Err(e) => tracing::warn!(
                "could not read {} to confirm it still holds key {id}, which this run writes under \
                 (tried again in a moment): {}",
                w.store(),
                e.chain()
            ),
        }
    }
    Ok(())
}

/// The error for a key its store lost: the run stops, and where the store
/// is a keyring file the key is first sealed into a file of its own, so
/// that the values written under it do not die with this process.
fn lost_key(w: &KeyWatch, why: &str) -> Error {
    let (id, fingerprint) = (w.key().id(), w.key().fingerprint());
    let copy = match w.save_copy() {
        Some(path) => format!(
            "rekey sealed key {id} with the keyring's passphrase into {} (a keyring file holding that key \
             alone): put it back from there (or from the copy or version the store held before the change)",
            path.display()
        ),
        None => format!(
            "put key {id} back in {} from the copy or version it held before the change",
            w.store()
        ),
    };
    Error::Runtime(format!(
        "key {id} (fingerprint {fingerprint}), which this run writes values under, is no longer in {}: {why}. \
         The run stopped. Values the job wrote under key {id} open with no other key: {copy} before anything \
         else, then run `rekey run` again to finish; do not abort, promote or retire until it is back",
        w.store()
    ))
}
