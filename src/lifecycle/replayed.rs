//! Before a key is retired: the standbys streaming from the server have
//! replayed the rotation's writes. One that has not (a replica lagging, a
//! delayed standby, replay paused) still serves the values under the key
//! being retired, which its applications could no longer open, and a
//! standby promoted before it catches up would hold them for good. Waited
//! for, then refused; what this role cannot see (a standby's position
//! hidden without `pg_monitor`, a standby not connected) is said, not
//! refused. Logical decoding clients are no copy served as the database
//! and are not waited for.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use tokio_postgres::Client;

use crate::control::stop::Stop;
use crate::db::standbys::{self, Behind, Look, Sender, Standby};
use crate::db::Database;
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

/// How often a [`Watch`] looks again while the retire verifies: a standby
/// reports its replay position every `wal_receiver_status_interval` (10 s
/// by default), and one gone leaves no trace to look up later.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// One connection of a WAL sender: its process and when it began (a
/// process id alone is reused).
type Connection = (i32, Option<SystemTime>);

fn connection(s: &Sender) -> Connection {
    (s.pid, s.since)
}

/// The standbys a retire has seen: one seen behind that disconnects stays
/// behind, since a standby with no replication slot leaves no trace once
/// gone.
#[derive(Debug, Default)]
struct Standbys {
    /// Those seen behind.
    behind: Vec<Tracked>,
    /// Every WAL sender connection seen, with the look it was first seen in.
    seen: Vec<(Connection, usize)>,
    /// How many looks were taken.
    looks: usize,
    /// Standbys whose state this role may not see, by name.
    hidden: Vec<String>,
}

/// A standby seen behind.
#[derive(Debug)]
struct Tracked {
    /// Its WAL sender's connection.
    connection: Connection,
    /// As last seen.
    behind: Behind,
    /// When it was last seen connected.
    last_seen: SystemTime,
    /// When the standby last replied on this connection, as last seen
    /// (the standby's clock).
    replied: Option<SystemTime>,
    /// The look that first showed that reply.
    replied_in: usize,
    /// Whether it has shown a replay position (a connection that never
    /// did was no standby).
    positioned: bool,
}

impl Standbys {
    /// Takes in what the WAL senders are now (each against the position
    /// looked for): a connection seen before is what it is now; one gone
    /// stays behind, unless it never showed a position or a connection of
    /// its name has replayed that the standby moved to: first seen in a
    /// later look, or begun after the standby last replied on the old one,
    /// which was not seen to reply again once the new one was listed (it
    /// reconnected, perhaps before the server noticed the old connection
    /// gone, as late as `wal_sender_timeout` after, and caught up; a name
    /// includes the host, whose clock stamps both the replies of the old
    /// connection and those of one of that host's other standbys). One
    /// still listed is never replaced: it may be another standby of the
    /// same name (a delayed one beside a normal one), which replies on its
    /// own connection as long as it is connected.
    fn track(&mut self, now: &[Sender]) {
        let at = SystemTime::now();
        self.looks += 1;
        let (seen, this_look) = (&self.seen, self.looks);
        let first_seen = |c: &Connection| {
            seen.iter()
                .find(|(s, _)| s == c)
                .map_or(this_look, |(_, look)| *look)
        };
        let moved_to = |t: &Tracked, s: &Sender| {
            let began = first_seen(&connection(s));
            began > first_seen(&t.connection)
                || (t.replied_in <= began
                    && matches!((t.replied, s.since), (Some(replied), Some(since)) if replied < since))
        };
        let replayed_after = |t: &Tracked| {
            now.iter()
                .any(|s| s.is == Standby::Replayed && s.name == t.behind.name && moved_to(t, s))
        };
        self.behind.retain_mut(
            |t| match now.iter().find(|s| connection(s) == t.connection) {
                Some(Sender {
                    is: Standby::Behind { bytes, lag_s },
                    replied,
                    ..
                }) => {
                    (t.behind.bytes, t.behind.lag_s) = (*bytes, *lag_s);
                    t.positioned |= bytes.is_some();
                    t.last_seen = at;
                    if *replied != t.replied {
                        (t.replied, t.replied_in) = (*replied, this_look);
                    }
                    true
                }
                Some(_) => false,
                None => {
                    t.behind.gone = Some(t.last_seen);
                    t.positioned && !replayed_after(t)
                }
            },
        );
        for s in now {
            match &s.is {
                Standby::Behind { bytes, lag_s }
                    if !self.behind.iter().any(|t| t.connection == connection(s)) =>
                {
                    self.behind.push(Tracked {
                        connection: connection(s),
                        behind: Behind {
                            name: s.name.clone(),
                            bytes: *bytes,
                            lag_s: *lag_s,
                            gone: None,
                        },
                        last_seen: at,
                        replied: s.replied,
                        replied_in: this_look,
                        positioned: bytes.is_some(),
                    });
                }
                Standby::Hidden if !self.hidden.contains(&s.name) => {
                    self.hidden.push(s.name.clone())
                }
                _ => {}
            }
            if !self.seen.iter().any(|(c, _)| *c == connection(s)) {
                self.seen.push((connection(s), this_look));
            }
        }
    }
}

/// The standbys watched, on a connection of its own, from the retire's
/// start through its wait for writers and its verify (hours, on a large
/// job) to its last step ([`standbys_replayed`]): one that disconnects
/// while behind is still seen there, which a standby with no replication
/// slot would otherwise leave no trace for. Looked at against the WAL
/// position when the retire began (past every write of the rotation), then,
/// once the writers waited for have ended, against the position then (past
/// theirs too), which the last step waits for: one seen at or past it is
/// let go, since it holds every write the verify reads.
pub(super) struct Watch {
    client: Client,
    position: String,
    seen: Standbys,
    /// A look that failed while the work went on.
    failed: Option<Error>,
}

fn looking() -> String {
    "reading how far the standbys have replayed".to_string()
}

impl Watch {
    /// Connects, takes the server's WAL position and a first look at its
    /// standbys.
    pub(super) async fn begin(db: &Database) -> Result<Watch, Error> {
        let client = db.connect().await.map_err(|e| {
            Error::Runtime(format!(
                "opening a connection to watch the standbys during the retire: {e}; nothing was retired"
            ))
        })?;
        let position = standbys::current_position(&client).await.ctx(looking)?;
        let mut watch = Watch {
            client,
            position,
            seen: Standbys::default(),
            failed: None,
        };
        watch.look().await?;
        Ok(watch)
    }

    /// Takes the server's WAL position again (once the writers waited for
    /// have ended), and looks against it.
    pub(super) async fn again(&mut self) -> Result<(), Error> {
        self.position = standbys::current_position(&self.client)
            .await
            .ctx(looking)?;
        self.look().await
    }

    async fn look(&mut self) -> Result<(), Error> {
        let now = standbys::senders(&self.client, &self.position, Look::Watch)
            .await
            .ctx(looking)?;
        self.seen.track(&now);
        Ok(())
    }

    /// Runs `work`, looking at the standbys every [`WATCH_EVERY`]
    /// meanwhile. A look that fails ends the watching, not the work, and
    /// is kept: the last step fails with it where the retire would
    /// otherwise go on (a standby gone meanwhile would not be seen), and a
    /// refusal on the work's findings is said as it would be.
    pub(super) async fn during<T>(&mut self, work: impl Future<Output = T>) -> T {
        if self.failed.is_some() {
            return work.await;
        }
        let looks = async {
            loop {
                tokio::time::sleep(WATCH_EVERY).await;
                if let Err(e) = self.look().await {
                    return e;
                }
            }
        };
        tokio::pin!(work);
        let failed = tokio::select! {
            done = &mut work => return done,
            failed = looks => failed,
        };
        self.failed = Some(failed);
        work.await
    }
}

/// Waits, up to `limit`, for every standby connected (or seen behind by
/// `watch` or while it waits) whose position this role may see to replay
/// past the watch's position; returns those still behind then, and
/// warnings for those it cannot check.
/// A stop asked for ends the wait at once; the caller looks at `stop` after.
pub(super) async fn standbys_replayed(
    limit: Duration,
    stop: &Stop,
    watch: Watch,
) -> Result<Replayed, Error> {
    let Watch {
        client,
        position,
        mut seen,
        failed,
    } = watch;
    if let Some(e) = failed {
        return Err(e);
    }
    let mut logged = false;
    // a limit past what a clock can hold waits as long as it takes
    let deadline = Instant::now().checked_add(limit);
    loop {
        let now = standbys::senders(&client, &position, Look::Wait)
            .await
            .ctx(looking)?;
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
    for slot in standbys::disconnected(&client, &position)
        .await
        .ctx(looking)?
    {
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
            since: None,
            replied: None,
            name: name.to_string(),
            is,
        }
    }

    /// `s` seconds into the test's clock.
    fn at(s: u64) -> Option<SystemTime> {
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s))
    }

    /// A WAL sender begun at `since` whose standby last replied at `replied`.
    fn connected(pid: i32, name: &str, is: Standby, since: u64, replied: u64) -> Sender {
        Sender {
            since: at(since),
            replied: at(replied),
            ..sender(pid, name, is)
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
            .map(|t| (t.behind.name.clone(), t.behind.gone.is_some()))
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
    fn a_standby_that_reconnects_before_its_old_connection_is_gone_and_catches_up_is_no_longer_behind(
    ) {
        let mut s = Standbys::default();
        s.track(&[sender(10, "replica", behind(800))]);
        // back under a new process while the server still lists the old one
        s.track(&[
            sender(10, "replica", behind(800)),
            sender(11, "replica", behind(300)),
        ]);
        s.track(&[
            sender(10, "replica", behind(800)),
            sender(11, "replica", Standby::Replayed),
        ]);
        // the server drops the old connection
        s.track(&[sender(11, "replica", Standby::Replayed)]);
        assert!(s.behind.is_empty(), "{:?}", s.behind);
    }

    #[test]
    fn a_standby_still_connected_and_behind_is_not_cleared_by_another_of_its_name_that_replayed() {
        let mut s = Standbys::default();
        s.track(&[sender(10, "walreceiver", behind(800))]);
        // a second standby of the default name, on the same host, connects and replays
        s.track(&[
            sender(10, "walreceiver", behind(800)),
            sender(20, "walreceiver", behind(100)),
        ]);
        s.track(&[
            sender(10, "walreceiver", behind(800)),
            sender(20, "walreceiver", Standby::Replayed),
        ]);
        assert_eq!(still_behind(&s), [("walreceiver".to_string(), false)]);
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
    fn a_process_id_taken_by_a_later_connection_does_not_stand_for_the_one_that_went() {
        let mut s = Standbys::default();
        let begun = |since, is| Sender {
            since: at(since),
            ..sender(10, "replica", is)
        };
        s.track(&[begun(3 * 3600, behind(800))]);
        // another standby's sender, given the same process id hours later
        s.track(&[Sender {
            name: "other".to_string(),
            ..begun(5 * 3600, Standby::Replayed)
        }]);
        assert_eq!(still_behind(&s), [("replica".to_string(), true)]);
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

    #[test]
    fn a_silent_connection_dropped_after_its_standby_reconnected_and_replayed_is_no_longer_behind()
    {
        let mut s = Standbys::default();
        // both listed at the first look: the old one silent since 100 s,
        // the standby back on a new connection since 130 s
        s.track(&[
            connected(10, "replica", behind(800), 0, 100),
            connected(11, "replica", behind(300), 130, 150),
        ]);
        s.track(&[
            connected(10, "replica", behind(800), 0, 100),
            connected(11, "replica", Standby::Replayed, 130, 160),
        ]);
        // the server drops the old connection (wal_sender_timeout)
        s.track(&[connected(11, "replica", Standby::Replayed, 130, 170)]);
        assert!(s.behind.is_empty(), "{:?}", s.behind);
    }

    #[test]
    fn a_standby_that_replied_after_another_of_its_name_connected_is_not_cleared_by_it_when_gone() {
        let mut s = Standbys::default();
        s.track(&[
            connected(10, "walreceiver", behind(800), 0, 140),
            connected(20, "walreceiver", behind(100), 130, 135),
        ]);
        s.track(&[connected(20, "walreceiver", Standby::Replayed, 130, 160)]);
        assert_eq!(still_behind(&s), [("walreceiver".to_string(), true)]);
    }

    #[test]
    fn a_connection_seen_to_reply_after_another_of_its_name_was_listed_is_not_cleared_by_it_when_gone(
    ) {
        let mut s = Standbys::default();
        s.track(&[
            connected(10, "walreceiver", behind(800), 0, 100),
            connected(20, "walreceiver", behind(100), 130, 131),
        ]);
        // it replies again (its clock behind the server's: still before 130)
        s.track(&[
            connected(10, "walreceiver", behind(800), 0, 125),
            connected(20, "walreceiver", Standby::Replayed, 130, 140),
        ]);
        s.track(&[connected(20, "walreceiver", Standby::Replayed, 130, 150)]);
        assert_eq!(still_behind(&s), [("walreceiver".to_string(), true)]);
    }
}
