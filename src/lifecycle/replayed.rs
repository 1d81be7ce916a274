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
use crate::db::standbys::{self, Behind, Sender, Standby};
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
    // the standbys seen behind, by WAL sender process, and whether each
    // has shown a replay position (a standby then disconnected stays behind)
    let mut behind: Vec<(i32, Behind, bool)> = Vec::new();
    let mut seen: Vec<i32> = Vec::new();
    let mut hidden: Vec<String> = Vec::new();
    let mut logged = false;
    // a limit past what a clock can hold waits as long as it takes
    let deadline = Instant::now().checked_add(limit);
    loop {
        let now = standbys::senders(client, &position).await.ctx(what)?;
        // a connection seen before: what it is now; one gone: behind still,
        // unless it never showed a position (a connection that was no standby),
        // or a new connection of the same name has replayed (it reconnected)
        let reconnected: Vec<&str> = now
            .iter()
            .filter(|s| s.is == Standby::Replayed && !seen.contains(&s.pid))
            .map(|s| s.name.as_str())
            .collect();
        behind.retain_mut(
            |(pid, b, positioned)| match now.iter().find(|s| s.pid == *pid) {
                Some(Sender {
                    is: Standby::Behind { bytes, lag_s },
                    ..
                }) => {
                    (b.bytes, b.lag_s) = (*bytes, *lag_s);
                    *positioned |= bytes.is_some();
                    true
                }
                Some(_) => false,
                None => {
                    b.gone = true;
                    *positioned && !reconnected.contains(&b.name.as_str())
                }
            },
        );
        for s in &now {
            match &s.is {
                Standby::Behind { bytes, lag_s }
                    if !behind.iter().any(|(pid, _, _)| *pid == s.pid) =>
                {
                    let b = Behind {
                        name: s.name.clone(),
                        bytes: *bytes,
                        lag_s: *lag_s,
                        gone: false,
                    };
                    behind.push((s.pid, b, bytes.is_some()));
                }
                Standby::Hidden if !hidden.contains(&s.name) => hidden.push(s.name.clone()),
                _ => {}
            }
            if !seen.contains(&s.pid) {
                seen.push(s.pid);
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
                behind[0].1.described()
            );
        }
        if !stop.sleep(POLL).await {
            break;
        }
    }
    let behind: Vec<Behind> = behind.into_iter().map(|(_, b, _)| b).collect();
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
    Ok(Replayed { behind, warnings })
}
