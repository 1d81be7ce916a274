//! The standbys streaming from this server, and how far each has replayed:
//! a copy of the data that has not yet replayed a rotation's writes still
//! holds values under the key it replaced, so a key's retire waits for
//! them (README, "Retire rests on a full proof"). Read from
//! `pg_stat_replication`, whose states and positions only roles with
//! `pg_read_all_stats` (`pg_monitor`) or superusers may see, and from
//! `pg_replication_slots` for standbys not connected.

use std::time::SystemTime;

use tokio_postgres::Client;

/// The server's WAL position now, as `pg_lsn` text: what every standby must
/// replay past to hold every write committed so far. A commit made with
/// `synchronous_commit = off` (a run's batches) may sit in the WAL buffers,
/// past `pg_current_wal_lsn()` (what is written), for up to three
/// `wal_writer_delay`s: a commit of this session's own, flushed at once,
/// writes every record before it first.
pub async fn current_position(client: &Client) -> Result<String, tokio_postgres::Error> {
    client
        .batch_execute("BEGIN; SET LOCAL synchronous_commit = local; SELECT txid_current(); COMMIT")
        .await?;
    Ok(client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0))
}

/// A WAL sender of this server, against a position.
#[derive(Debug, Clone, PartialEq)]
pub struct Sender {
    /// The WAL sender's process: one connection, with [`Sender::since`].
    pub pid: i32,
    /// When its connection began (`backend_start`), where this role may see
    /// it: a process id is reused, its start is not.
    pub since: Option<SystemTime>,
    /// When the standby last replied on it (`reply_time`), where this role
    /// may see it and the standby has replied: a live standby replies at
    /// least every `wal_receiver_status_interval`; a connection cut off
    /// stays listed, silent, until `wal_sender_timeout`.
    pub replied: Option<SystemTime>,
    /// Its `application_name` (a standby's `cluster_name` by default) and
    /// where it connects from: what names it across reconnections.
    pub name: String,
    /// What it streams to.
    pub is: Standby,
}

/// What a WAL sender streams to, against a position.
#[derive(Debug, Clone, PartialEq)]
pub enum Standby {
    /// A standby that has replayed up to the position.
    Replayed,
    /// A standby that has not (or reports no replay position yet: starting,
    /// catching up).
    Behind {
        /// How far behind the position it is, in bytes; `None` while it
        /// reports no replay position.
        bytes: Option<i64>,
        /// The server's own measure of its replay lag, in seconds, where known.
        lag_s: Option<f64>,
    },
    /// One whose state and position this role may not see.
    Hidden,
    /// Not a copy anyone reads: a logical replication connection (a
    /// subscription, a change-data-capture consumer, whose slot confirms
    /// only what it processed), a base backup, or a WAL receiver that
    /// replays nothing (`pg_receivewal`).
    NotACopy,
}

/// A standby that has not replayed up to a position.
#[derive(Debug, Clone, PartialEq)]
pub struct Behind {
    /// Its `application_name` and where it connects from.
    pub name: String,
    /// How far behind the position it is, in bytes; `None` while it reports
    /// no replay position.
    pub bytes: Option<i64>,
    /// The server's own measure of its replay lag, in seconds, where known.
    pub lag_s: Option<f64>,
    /// It was seen behind and is no longer connected: when it was last seen.
    pub gone: Option<SystemTime>,
}

impl Behind {
    /// For people: its name, where from, and how far behind.
    pub fn described(&self) -> String {
        match (self.gone, self.bytes, self.lag_s) {
            (Some(at), bytes, _) => format!(
                "{} (disconnected while behind: {} when last seen, at {})",
                self.name,
                bytes.map_or("no replay position reported".to_string(), |b| format!(
                    "{b} bytes of WAL behind"
                )),
                humantime::format_rfc3339_seconds(at)
            ),
            (_, None, _) => format!("{} (connected, no replay position reported yet)", self.name),
            (_, Some(b), Some(s)) if s > 0.0 => {
                format!(
                    "{} ({b} bytes of WAL behind, replaying {s:.1} s late)",
                    self.name
                )
            }
            (_, Some(b), _) => format!("{} ({b} bytes of WAL behind)", self.name),
        }
    }
}

/// Why the standbys are looked at: said in the statement, for whoever
/// reads `pg_stat_activity` (a retire's watch runs for as long as its verify).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// Watching them while a retire waits for writers and verifies.
    Watch,
    /// Waiting for them to replay, the last step before a retire.
    Wait,
}

impl Look {
    fn said(self) -> &'static str {
        match self {
            Look::Watch => {
                "rekey: watching the standbys while a retire waits for writers and verifies"
            }
            Look::Wait => "rekey: waiting for the standbys to replay a rotation",
        }
    }
}

/// Every WAL sender of this server, as seen against `position` (`pg_lsn`
/// text).
pub async fn senders(
    client: &Client,
    position: &str,
    look: Look,
) -> Result<Vec<Sender>, tokio_postgres::Error> {
    // a logical connection is to a database (datid, shown to every role)
    // from its start; a physical standby reports its replay position with
    // its write position, a WAL receiver that replays nothing never does;
    // a socket's client_addr is NULL, and client_port -1; a hidden row shows neither
    let sql = format!(
        "/* {} */ SELECT r.pid, format('%s at %s', coalesce(nullif(r.application_name, ''), 'unnamed'),
                           CASE WHEN r.client_port = -1 THEN 'a local socket'
                                ELSE coalesce(host(r.client_addr), 'an address hidden from this role') END),
                    r.state, r.replay_lsn >= $1::text::pg_lsn,
                    pg_wal_lsn_diff($1::text::pg_lsn, r.replay_lsn)::int8,
                    extract(epoch FROM r.replay_lag)::float8,
                    a.datid IS NOT NULL OR r.state = 'backup'
                      OR (r.replay_lsn IS NULL AND r.write_lsn IS NOT NULL),
                    r.backend_start, r.reply_time
               FROM pg_stat_replication r LEFT JOIN pg_stat_activity a ON a.pid = r.pid
              ORDER BY 2, 1",
        look.said()
    );
    let rows = client.query(&sql, &[&position]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let is = match (
                r.get::<_, bool>(6),
                r.get::<_, Option<String>>(2),
                r.get::<_, Option<bool>>(3),
            ) {
                (true, _, _) => Standby::NotACopy,
                (_, None, _) => Standby::Hidden,
                (_, _, Some(true)) => Standby::Replayed,
                _ => Standby::Behind {
                    bytes: r.get(4),
                    lag_s: r.get(5),
                },
            };
            Sender {
                pid: r.get(0),
                since: r.get(7),
                replied: r.get(8),
                name: r.get(1),
                is,
            }
        })
        .collect())
}

/// The physical replication slots no standby is connected to whose
/// standby has not received up to `position`: a standby stopped or cut off,
/// which replays the writes when it returns and until then holds values
/// from before them.
pub async fn disconnected(
    client: &Client,
    position: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT slot_name::text FROM pg_replication_slots
              WHERE slot_type = 'physical' AND NOT active
                AND (restart_lsn IS NULL OR restart_lsn < $1::text::pg_lsn)
              ORDER BY 1",
            &[&position],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
