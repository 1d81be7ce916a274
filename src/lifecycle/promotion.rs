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

use tokio_postgres::Client;

use crate::crypto::keytable::KeyState;
use crate::db::Database;
use crate::engine::verify::{self, Depth, Verification};
use crate::job::{Job, JobSpec};
use crate::secrets::Store;
use crate::Error;

/// Whether the applications read only the current key once the pending one
/// is promoted.
pub fn old_key_unread_after_promotion(store: &Store) -> bool {
    !store.holds_unstaged_keys()
}

/// Why the pending key may not be promoted yet, if it may not: where the
/// layout leaves the applications only the new key, a full verify that
/// finds values not under it. `None` where the layout keeps the old key
/// readable, or nothing is pending, or every value is under the new key.
pub async fn refused(
    db: &Database,
    client: &Client,
    spec: &JobSpec,
    store: &Store,
    lanes: usize,
    quiet: bool,
) -> Result<Option<String>, Error> {
    let Some(new) = store.table().id_in(KeyState::Pending) else {
        return Ok(None);
    };
    if !old_key_unread_after_promotion(store) {
        return Ok(None);
    }
    let job = Arc::new(Job::resolve(spec, client).await?);
    let v = verify::verify(db, client, &job, Depth::full(lanes), quiet).await?;
    Ok((!v.verified).then(|| refusal(store, new, &v)))
}

/// The refusal's words: what is left, why it matters in this layout, what helps.
pub fn refusal(store: &Store, new: crate::crypto::keyring::KeyId, v: &Verification) -> String {
    format!(
        "refusing to promote key {new}: {} values are not under it ({} on other keys, {} undecryptable), and once it is \
         current the applications read only key {new} (the old key's place in {} is where they read the current key), \
         so they could not read those values. Rotate them first (`rekey run`, or `rekey rotate`, which promotes once a \
         full verify finds every value under key {new}); where values keep arriving under the old key, an application \
         does not yet encrypt with {}: redeploy it first",
        v.values_on_old_keys + v.values_unreadable(),
        v.values_on_old_keys,
        v.values_unreadable(),
        store.secret_id(),
        store.new_key_place()
    )
}
