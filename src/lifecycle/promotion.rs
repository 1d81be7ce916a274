//! What a promotion needs first where the store's layout leaves the
//! applications only the new key once it is current: the dual convention
//! (`<P>_KEY` and `<P>_KEY_NEW`) and the value layouts, whose applications
//! read the current key and the new one, and after promotion the new one
//! alone (the old key's place is where they read the current key). There a
//! value left under the old key is one no application can read, so a key is
//! promoted only once every value is under it, proven by a full verify (a
//! sample, or version bytes, cannot show where a Fernet token stands), and
//! a rotation never promotes over values written behind its run.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use crate::control::stop::Stop;
use crate::crypto::keyring::KeyId;
use crate::crypto::keytable::KeyState;
use crate::db::Database;
use crate::engine::verify::{self, Depth, Verification};
use crate::job::{Job, JobSpec};
use crate::secrets::Store;
use crate::Error;

use super::retire::{described, writers_ended};

/// Whether the applications read only the current key once the pending one
/// is promoted.
pub fn old_key_unread_after_promotion(store: &Store) -> bool {
    !store.holds_unstaged_keys()
}

/// The proof a promotion needs where the applications read only the new
/// key after it, as a retire does (the old key leaves what they read): the
/// job covers whole tables, no key repeats across inheritance children
/// (the verify's pages would skip rows), no transaction still open has
/// written to the tables (its values are invisible to the verify), then a
/// full verify. `Err` is a refusal before the verify, for people.
pub async fn proof(
    db: &Database,
    client: &Client,
    job: &Arc<Job>,
    lanes: usize,
    quiet: bool,
    wait_for_writers: Duration,
    stop: &Stop,
) -> Result<Result<Verification, String>, Error> {
    if let Some(t) = job.filtered_target() {
        return Err(Error::Config(format!(
            "target {} has a `where` filter, so no verify sees every row, and once the new key is promoted the \
             applications read only it: promote with a job that covers whole tables",
            t.table
        )));
    }
    for t in &job.targets {
        Box::pin(crate::job::shared_keys::refuse_keys_shared_with_children(
            client, t,
        ))
        .await?;
    }
    let open = Box::pin(writers_ended(client, job, wait_for_writers, stop)).await?;
    // a stop asked for before the wait ends it at once too
    if stop.requested() {
        return Ok(Err(
            "stopped before the promotion's verify: nothing was promoted; run the same command again".to_string(),
        ));
    }
    if let Some(w) = open.first() {
        return Ok(Err(format!(
            "refusing to promote after waiting {} for it: a transaction still open has written to {} ({}), and what it \
             wrote is invisible to the verify, while once the new key is promoted the applications read only it. \
             Promote once it ends (or end it), or wait longer (--wait-for-writers)",
            humantime::format_duration(wait_for_writers),
            w.table,
            described(w)
        )));
    }
    let v = Box::pin(verify::verify(db, client, job, Depth::full(lanes), quiet)).await?;
    Ok(Ok(v))
}

/// Why the pending key may not be promoted yet, if it may not: where the
/// layout leaves the applications only the new key, the [`proof`] refused,
/// or found values not under it. `None` where the layout keeps the old key
/// readable, or nothing is pending, or every value is under the new key.
pub async fn refused(
    db: &Database,
    client: &Client,
    spec: &JobSpec,
    store: &Store,
    lanes: usize,
    wait_for_writers: Duration,
) -> Result<Option<String>, Error> {
    let Some(new) = store.table().id_in(KeyState::Pending) else {
        return Ok(None);
    };
    if !old_key_unread_after_promotion(store) {
        return Ok(None);
    }
    let job = Arc::new(Job::resolve(spec, client).await?);
    Ok(
        // `secrets promote` takes no stop: a signal ends it as it ends any command
        match proof(
            db,
            client,
            &job,
            lanes,
            false,
            wait_for_writers,
            &Stop::default(),
        )
        .await?
        {
            Err(why) => Some(why),
            Ok(v) if !v.verified => Some(refusal(store, new, &v)),
            Ok(_) => None,
        },
    )
}

/// The refusal's words: what is left, why it matters in this layout, what helps.
pub fn refusal(store: &Store, new: KeyId, v: &Verification) -> String {
    let mut said = format!(
        "refusing to promote key {new}: {} values are not under it ({} on other keys, {} undecryptable), and once it is \
         current the applications read only key {new} (the old key's place in {} is where they read the current key), \
         so they could not read those values",
        v.values_on_old_keys + v.values_unreadable(),
        v.values_on_old_keys,
        v.values_unreadable(),
        store.secret_id(),
    );
    if v.values_on_old_keys > 0 {
        said.push_str(&format!(
            ". Rotate them first (`rekey run`, or `rekey rotate`, which promotes once a full verify finds every value \
             under key {new}); where values keep arriving under the old key, an application does not yet encrypt \
             with the new key ({}): in this layout it must before the promotion",
            store.new_key_place()
        ));
    }
    if v.values_unreadable() > 0 {
        said.push_str(
            ". No key given opens the undecryptable ones (`rekey verify --full` lists them): restore them from a \
             backup or give the job the key they were written under",
        );
    }
    said
}
