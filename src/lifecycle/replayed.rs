//! Before a key is retired: the standbys streaming from the server have
//! replayed the rotation's writes. One that has not (a replica lagging, a
//! delayed standby, replay paused) still serves the values under the key
//! being retired, which its applications could no longer open, and a
//! standby promoted before it catches up would hold them for good. Waited
//! for, then refused; what this role cannot see (a standby's position
//! hidden without `pg_monitor`, a standby not connected) is said, not
//! refused. Logical decoding clients are no copy served as the database
//! and are not waited for.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::control::stop::Stop;
use crate::db::standbys::{self, Behind, Standby};
use crate::error::DbContext;
use crate::Error;

/// What the standbys had replayed when the retire looked.
#[derive(Debug, Default)]
pub(super) struct Replayed {
    /// Standbys still behind the rotation's writes after the wait (one
    /// seen behind that disconnected since counts as behind).
    pub behind: Vec<Behind>,
    /// What could not be checked, for the operator.
    pub warnings: Vec<String>,
}

/// How often [`standbys_replayed`] looks again.
const POLL: Duration = Duration::from_millis(100);

/// Waits, up to `limit`, for every standby connected (or seen behind while
/// it waits) whose position this role may see to replay past the server's
/// WAL position now (every write committed so far, the rotation's
/// included); returns those still behind then, and warnings for those it
/// cannot check.
/// A stop asked for ends the wait at once; the caller looks at `stop` after.
pub(super) async fn standbys_replayed(
    client: &Client,
    limit: Duration,
    stop: &Stop,
) -> Result<Replayed, Error> {
    let what = || "reading how far the standbys have replayed".to_string();
    let position = standbys::current_position(client).await.ctx(what)?;
    let mut behind: Vec<Behind> = Vec::new();
    let mut hidden: Vec<String> = Vec::new();
    let mut logged = false;
    // a limit past what a clock can hold waits as long as it takes
    let deadline = Instant::now().checked_add(limit);
    loop {
        let now = standbys::standbys(client, &position).await.ctx(what)?;
        // one seen behind stays behind until seen replayed: a reconnection
        // shows no position at first, and a disconnection none at all
        for b in &mut behind {
            b.gone = true;
        }
        let mut replayed = Vec::new();
        let mut still = Vec::new();
        for s in now {
            match s {
                Standby::Replayed { name } => replayed.push(name),
                Standby::Behind(b) => still.push(b),
                Standby::Hidden { name } if !hidden.contains(&name) => hidden.push(name),
                Standby::Hidden { .. } | Standby::NotACopy => {}
            }
        }
        // two standbys may share a name (the default `walreceiver`, one host): one behind keeps it behind
        behind.retain(|b| !replayed.contains(&b.name) || still.iter().any(|s| s.name == b.name));
        for b in still {
            match behind.iter_mut().find(|k| k.name == b.name) {
                Some(known) => *known = b,
                None => behind.push(b),
            }
        }
        if behind.is_empty() || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if !logged {
            logged = true;
            tracing::info!(
                "waiting up to {} for {} standby(s) to replay the rotation's writes ({} first)",
                humantime::format_duration(limit),
                behind.len(),
                behind[0].described()
            );
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = stop.asked() => break,
        }
    }
    let mut warnings: Vec<String> = hidden
        .iter()
        .map(|name| {
            format!(
                "standby {name} shows no state or replay position to this role: rekey cannot tell whether it has \
                 replayed the rotation; grant pg_monitor to the role so that a retire waits for it"
            )
        })
        .collect();
    // looked at after the wait: a standby that disconnected meanwhile leaves its slot
    for slot in standbys::disconnected(client, &position).await.ctx(what)? {
        warnings.push(format!(
            "replication slot {slot} has no standby connected: that standby, when it returns, replays the rotation, \
             and until it has, it holds values under the key"
        ));
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    Ok(Replayed { behind, warnings })
}
