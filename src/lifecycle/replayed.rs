//! Before a key is retired: the standbys and logical subscribers streaming
//! from the server have replayed the rotation's writes. One that has not
//! (a replica lagging, a delayed standby, replay paused) still serves the
//! values under the key being retired, which its applications could no
//! longer open, and a standby promoted before it catches up would hold
//! them for good. Waited for, then refused; what this role cannot see (a
//! replay position hidden without `pg_monitor`, a standby not connected)
//! is said, not refused.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::db::standbys::{self, Behind};
use crate::error::DbContext;
use crate::Error;

/// What the standbys had replayed when the retire looked.
#[derive(Debug, Default)]
pub(super) struct Replayed {
    /// Connected standbys still behind the rotation's writes after the wait.
    pub behind: Vec<Behind>,
    /// What could not be checked, for the operator.
    pub warnings: Vec<String>,
}

/// How often [`standbys_replayed`] looks again.
const POLL: Duration = Duration::from_millis(100);

/// Waits, up to `limit`, for every connected standby whose replay position
/// this role may see to replay past the server's WAL position now (every
/// write committed so far, the rotation's included); returns those still
/// behind then, and warnings for those it cannot check.
pub(super) async fn standbys_replayed(client: &Client, limit: Duration) -> Result<Replayed, Error> {
    let what = || "reading how far the standbys have replayed".to_string();
    let position = standbys::current_position(client).await.ctx(what)?;
    let (mut behind, hidden): (Vec<Behind>, Vec<Behind>) = standbys::behind(client, &position)
        .await
        .ctx(what)?
        .into_iter()
        .partition(|b| b.bytes.is_some());
    let mut warnings: Vec<String> = hidden
        .iter()
        .map(|b| {
            format!(
                "standby {} shows no replay position to this role: rekey cannot tell whether it has replayed the \
                 rotation; grant pg_monitor to the role so that a retire waits for it",
                b.name
            )
        })
        .collect();
    for slot in standbys::disconnected(client, &position).await.ctx(what)? {
        warnings.push(format!(
            "replication slot {slot} has no standby connected: that standby, when it returns, replays the rotation, \
             and until it has, it holds values under the retired key"
        ));
    }
    if let Some(first) = behind.first() {
        tracing::info!(
            "waiting up to {} for {} standby(s) to replay the rotation's writes ({} first)",
            humantime::format_duration(limit),
            behind.len(),
            first.described()
        );
    }
    // a limit past what a clock can hold waits as long as it takes
    let deadline = Instant::now().checked_add(limit);
    while !behind.is_empty() && deadline.is_none_or(|d| Instant::now() < d) {
        tokio::time::sleep(POLL).await;
        behind = standbys::behind(client, &position).await.ctx(what)?;
        behind.retain(|b| b.bytes.is_some());
    }
    Ok(Replayed { behind, warnings })
}
