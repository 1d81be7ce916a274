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

/// The standbys a retire has seen while it waits: one seen behind that
/// disconnects stays behind, since a standby with no replication slot
/// leaves no trace once gone.
#[derive(Debug, Default)]
struct Standbys {
    /// Those seen behind.
    behind: Vec<Tracked>,
    /// Every WAL sender process seen, in the order first seen.
    seen: Vec<i32>,
    /// Standbys whose state this role may not see, by name.
    hidden: Vec<String>,
}

/// A standby seen behind.
#[derive(Debug)]
struct Tracked {
    /// Its WAL sender process.
    pid: i32,
    /// As last seen.
    behind: Behind,
    /// Whether it has shown a replay position (a connection that never
    /// did was no standby).
    positioned: bool,
    /// Once gone: how many WAL senders had been seen then; one seen only
    /// after, of its name, is its reconnection.
    gone_at: Option<usize>,
}

impl Standbys {
    /// Takes in what the WAL senders are now: a connection seen before is
    /// what it is now; one gone stays behind, unless it never showed a
    /// position or a connection of its name made since it went has
    /// replayed (it reconnected and caught up).
    fn track(&mut self, now: &[Sender]) {
        let seen = &self.seen;
        let replayed_since = |name: &str, at: usize| {
            now.iter().any(|s| {
                s.is == Standby::Replayed
                    && s.name == name
                    && seen
                        .iter()
                        .position(|p| *p == s.pid)
                        .is_none_or(|i| i >= at)
            })
        };
        self.behind
            .retain_mut(|t| match now.iter().find(|s| s.pid == t.pid) {
                Some(Sender {
                    is: Standby::Behind { bytes, lag_s },
                    ..
                }) => {
                    (t.behind.bytes, t.behind.lag_s) = (*bytes, *lag_s);
                    t.positioned |= bytes.is_some();
                    true
                }
                Some(_) => false,
                None => {
                    t.behind.gone = true;
                    let at = *t.gone_at.get_or_insert(seen.len());
                    t.positioned && !replayed_since(&t.behind.name, at)
                }
            });
        for s in now {
            match &s.is {
                Standby::Behind { bytes, lag_s } if !self.behind.iter().any(|t| t.pid == s.pid) => {
                    self.behind.push(Tracked {
                        pid: s.pid,
                        behind: Behind {
                            name: s.name.clone(),
                            bytes: *bytes,
                            lag_s: *lag_s,
                            gone: false,
                        },
                        positioned: bytes.is_some(),
                        gone_at: None,
                    });
                }
                Standby::Hidden if !self.hidden.contains(&s.name) => {
                    self.hidden.push(s.name.clone())
                }
                _ => {}
            }
            if !self.seen.contains(&s.pid) {
                self.seen.push(s.pid);
            }
        }
    }
}

/// Waits, up to `limit`, for every standby connected (or seen behind
/// while it waits) whose position this role may see to replay
/// past the server's WAL position now (every write committed so far,
/// the rotation's included); returns those still behind then, and
/// warnings for those it cannot check.
/// A stop asked for ends the wait at once; the caller looks at `stop` after.
pub(super) async fn standbys_replayed(
    client: &Client,
    limit: Duration,
    stop: &Stop,
) -> Result<Replayed, Error> {
    let mut seen = Standbys::default();
    let what = || "reading how far the standbys have replayed".to_string();
    let position = standbys::current_position(client).await.ctx(what)?;
    let mut logged = false;
    // a limit past what a clock can hold waits as long as it takes
    let deadline = Instant::now().checked_add(limit);
    loop {
        let now = standbys::senders(client, &position).await.ctx(what)?;
        seen.track(&now);
        if seen.behind.is_empty() || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if !logged {
            logged = true;
            tracing::info!(
                "waiting up to {} for {} standby(s) to replay the rotation's writes ({} first)",
                humantime::format_duration(limit),
                seen.behind.len(),
                seen.behind[0].behind.described()
            );
        }
        if !stop.sleep(POLL).await {
            break;
        }
    }
    let behind: Vec<Behind> = seen.behind.into_iter().map(|t| t.behind).collect();
    let mut warnings: Vec<String> = seen
        .hidden
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sender(pid: i32, name: &str, is: Standby) -> Sender {
        Sender {
            pid,
            name: name.to_string(),
            is,
        }
    }

    fn behind(bytes: i64) -> Standby {
        Standby::Behind {
            bytes: Some(bytes),
            lag_s: None,
        }
    }

    fn still_behind(s: &Standbys) -> Vec<(String, bool)> {
        s.behind
            .iter()
            .map(|t| (t.behind.name.clone(), t.behind.gone))
            .collect()
    }

    #[test]
    fn a_standby_seen_behind_and_gone_by_the_next_look_stays_behind() {
        let mut s = Standbys::default();
        s.track(&[sender(10, "replica", behind(800))]);
        s.track(&[]);
        assert_eq!(still_behind(&s), [("replica".to_string(), true)]);
    }

    #[test]
    fn a_standby_that_reconnects_and_catches_up_later_is_no_longer_behind() {
        let mut s = Standbys::default();
        s.track(&[sender(10, "replica", behind(800))]);
        // gone, then back under a new process, still catching up
        s.track(&[]);
        s.track(&[sender(11, "replica", behind(300))]);
        assert_eq!(still_behind(&s).len(), 2, "{:?}", s.behind);
        s.track(&[sender(11, "replica", Standby::Replayed)]);
        assert!(s.behind.is_empty(), "{:?}", s.behind);
    }

    #[test]
    fn another_standby_of_the_same_name_seen_before_one_went_does_not_clear_it() {
        let mut s = Standbys::default();
        s.track(&[
            sender(10, "walreceiver", behind(800)),
            sender(20, "walreceiver", behind(100)),
        ]);
        s.track(&[sender(20, "walreceiver", Standby::Replayed)]);
        assert_eq!(still_behind(&s), [("walreceiver".to_string(), true)]);
    }

    #[test]
    fn a_connection_that_never_showed_a_position_is_dropped_once_gone() {
        let mut s = Standbys::default();
        s.track(&[sender(
            10,
            "starting",
            Standby::Behind {
                bytes: None,
                lag_s: None,
            },
        )]);
        s.track(&[]);
        assert!(s.behind.is_empty(), "{:?}", s.behind);
    }
}
