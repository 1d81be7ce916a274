//! The standbys and logical subscribers streaming from this server, and how
//! far each has replayed: a copy of the data that has not yet replayed a
//! rotation's writes still holds values under the key it replaced, so a
//! key's retire waits for them (README, "Retire and the standbys"). Read
//! from `pg_stat_replication`, whose positions only roles with
//! `pg_read_all_stats` (`pg_monitor`) or superusers may see, and from
//! `pg_replication_slots` for standbys not connected.

use tokio_postgres::Client;

/// The server's WAL position now, as `pg_lsn` text: what every standby must
/// replay past to hold every write committed so far.
pub async fn current_position(client: &Client) -> Result<String, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0))
}

/// A standby (or logical subscriber) connected to this server that has not
/// replayed up to a position.
#[derive(Debug, Clone, PartialEq)]
pub struct Behind {
    /// Its server process (the WAL sender's), which names it while connected.
    pub pid: i32,
    /// `application_name` (a standby's `cluster_name` by default), and
    /// where it connects from.
    pub name: String,
    /// How far behind the position it is, in bytes; `None` where this role
    /// may not see its replay position.
    pub bytes: Option<i64>,
    /// The server's own measure of its replay lag, in seconds, where known.
    pub lag_s: Option<f64>,
}

impl Behind {
    /// For people: its name, where from, and how far behind.
    pub fn described(&self) -> String {
        match (self.bytes, self.lag_s) {
            (None, _) => format!("{} (its replay position hidden from this role)", self.name),
            (Some(b), Some(s)) if s > 0.0 => {
                format!(
                    "{} ({b} bytes of WAL behind, replaying {s:.1} s late)",
                    self.name
                )
            }
            (Some(b), _) => format!("{} ({b} bytes of WAL behind)", self.name),
        }
    }
}

/// The connected standbys and subscribers that have not replayed up to
/// `position` (`pg_lsn` text), or whose position this role may not see. WAL
/// senders of a base backup are left out: they replay nothing.
pub async fn behind(client: &Client, position: &str) -> Result<Vec<Behind>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT pid, format('%s at %s', coalesce(nullif(application_name, ''), 'unnamed'),
                                coalesce(host(client_addr), 'a local socket')),
                    pg_wal_lsn_diff($1::text::pg_lsn, replay_lsn)::int8,
                    extract(epoch FROM replay_lag)::float8
               FROM pg_stat_replication
              WHERE state IS DISTINCT FROM 'backup'
                AND (replay_lsn IS NULL OR replay_lsn < $1::text::pg_lsn)
              ORDER BY 2, 1",
            &[&position],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Behind {
            pid: r.get(0),
            name: r.get(1),
            bytes: r.get(2),
            lag_s: r.get(3),
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
