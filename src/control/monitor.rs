//! The signals a run checks between batches, on a connection of its own:
//! live control (`rekey pause|resume|stop`, or a control file), replica
//! lag from `pg_stat_replication`, the WAL rate from `pg_current_wal_lsn()`,
//! the archiver's lag from `pg_stat_archiver`, and a user's SQL gate. A signal that
//! cannot be read holds the run (fail closed); nothing here holds a
//! transaction open while the run waits.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::archive::{archive_lag, segment_of, ArchiveLag, ArchiverState};
use super::stop::StopBy;
use super::throttle::LagTracker;
use super::wal::{WalBudget, WalRate};
use crate::state::Control;
use crate::Error;

/// What the user asked the run to watch.
#[derive(Debug, Clone)]
pub struct Signals {
    /// Hold while any replica's replay is further behind than this.
    pub max_replica_lag: Option<Duration>,
    /// Hold while this query does not return true.
    pub gate_sql: Option<String>,
    /// Hold while the server writes more WAL than this many bytes per second.
    pub max_wal_rate: Option<u64>,
    /// Hold while more than this many bytes of complete WAL segments wait
    /// to be archived, or while archiving fails.
    pub max_archive_lag: Option<u64>,
    /// A file whose content (`run`, `pause` or `stop`) controls the run.
    pub control_file: Option<PathBuf>,
    /// How often the signals are read.
    pub check_every: Duration,
}

impl Default for Signals {
    fn default() -> Self {
        Signals {
            max_replica_lag: None,
            gate_sql: None,
            max_wal_rate: None,
            max_archive_lag: None,
            control_file: None,
            check_every: Duration::from_secs(1),
        }
    }
}

/// The hold `rekey pause` puts on a job.
pub const PAUSED: &str = "paused by `rekey pause`; `rekey resume` goes on";

/// What the signals say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Read on.
    Go,
    /// Read nothing until the reason passes: a stable name for metrics, and the text for people.
    Hold(&'static str, String),
    /// Stop cleanly, asked by this.
    Stop(StopBy),
}

/// Reads the signals, keeping what needs memory (the replica lag samples,
/// the WAL budget, where the archiver stood).
#[derive(Debug, Default)]
pub struct Monitor {
    /// What to watch.
    signals: Signals,
    /// The primary's WAL positions over time.
    lag: LagTracker,
    /// The WAL rate budget, with `--max-wal-rate`.
    wal: Option<WalBudget>,
    /// Why the WAL budget holds the run, while it does.
    wal_hold: Option<String>,
    /// Whether the last check sampled the WAL position (a check that holds
    /// for another reason returns before it).
    wal_sampled: bool,
    /// The WAL segment size and the segment the run started in, once read.
    archive_base: Option<(u64, u64)>,
}

impl Monitor {
    /// A monitor of `signals`.
    pub fn new(signals: Signals) -> Self {
        let wal = signals
            .max_wal_rate
            .map(|cap| WalBudget::new(cap, signals.check_every));
        Monitor {
            signals,
            lag: LagTracker::default(),
            wal,
            wal_hold: None,
            wal_sampled: false,
            archive_base: None,
        }
    }

    /// Reads every signal once, in order of precedence: a stop, then holds.
    /// `job_control` is the job's `rekey.jobs.control`, when there is a job;
    /// `rows` is how many rows the run has read so far.
    pub async fn check(
        &mut self,
        client: &mut Client,
        job_control: Option<Control>,
        rows: u64,
    ) -> Verdict {
        let sampled_before = std::mem::replace(&mut self.wal_sampled, false);
        if let Some(path) = &self.signals.control_file {
            match read_control_file(path) {
                Ok(Some(Control::Stop)) => return Verdict::Stop(StopBy::ControlFile),
                Ok(Some(Control::Pause)) => {
                    return Verdict::Hold(
                        "control_file",
                        format!("paused by the control file {}", path.display()),
                    )
                }
                Ok(_) => {}
                Err(e) => return Verdict::Hold("unreadable", e),
            }
        }
        match job_control {
            Some(Control::Stop) => return Verdict::Stop(StopBy::RekeyStop),
            Some(Control::Pause) => return Verdict::Hold("paused", PAUSED.into()),
            Some(Control::Run) | None => {}
        }
        if let Some(max) = self.signals.max_replica_lag {
            match self.replica_lag(client).await {
                Ok(Some((name, lag))) if lag > max => {
                    return Verdict::Hold(
                        "replica_lag",
                        format!(
                            "replica {name} replays {:.1}s behind (--max-replica-lag {})",
                            lag.as_secs_f64(),
                            humantime::format_duration(max)
                        ),
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    return Verdict::Hold(
                        "unreadable",
                        format!("replica lag unreadable, holding: {e}"),
                    )
                }
            }
        }
        if let Some(cap) = self.signals.max_wal_rate {
            match self.wal_rate(client, rows, sampled_before).await {
                Ok(WalRate::Go) => self.wal_hold = None,
                Ok(WalRate::Hold { rate, window }) => {
                    // the rate that started the hold stays its reason: one
                    // log line per hold, not one per check
                    let why = self.wal_hold.get_or_insert_with(|| format!(
                        "the server writes WAL above --max-wal-rate {}/s ({}/s over the last {:.1}s); holding until the average is back under it",
                        mib(cap as f64),
                        mib(rate),
                        window.as_secs_f64()
                    ));
                    return Verdict::Hold("wal_rate", why.clone());
                }
                Err(e) => {
                    return Verdict::Hold(
                        "unreadable",
                        format!("the WAL position is unreadable, holding: {e}"),
                    )
                }
            }
        }
        if let Some(cap) = self.signals.max_archive_lag {
            match self.archive_lag(client, cap).await {
                Ok(ArchiveLag::Go) => {}
                Ok(ArchiveLag::Failing(why)) => return Verdict::Hold("archive_failing", why),
                Ok(ArchiveLag::Behind { segments, bytes }) => {
                    return Verdict::Hold(
                        "archive_lag",
                        format!(
                            "the archiver is {segments} WAL segments ({}) behind, over --max-archive-lag {}; holding",
                            mib(bytes as f64),
                            mib(cap as f64)
                        ),
                    )
                }
                Err(e) => {
                    return Verdict::Hold(
                        "unreadable",
                        format!("pg_stat_archiver is unreadable, holding: {e}"),
                    )
                }
            }
        }
        if let Some(sql) = &self.signals.gate_sql {
            match gate(client, sql).await {
                Ok(true) => {}
                Ok(false) => {
                    return Verdict::Hold("gate", "the --gate-sql query returned false".into())
                }
                Err(e) => {
                    return Verdict::Hold(
                        "unreadable",
                        format!("the --gate-sql query failed, holding: {e}"),
                    )
                }
            }
        }
        Verdict::Go
    }

    /// With `--max-wal-rate`, the rows per second that keep the server's WAL
    /// at the cap, as the last checks measured it ([`WalBudget::pace`]).
    pub fn wal_pace(&self) -> Option<f64> {
        self.wal.as_ref()?.pace()
    }

    /// Samples the server's WAL position into the budget.
    async fn wal_rate(
        &mut self,
        client: &Client,
        rows: u64,
        sampled_before: bool,
    ) -> Result<WalRate, String> {
        let lsn = current_lsn(client).await?;
        let now = Instant::now();
        self.wal_sampled = true;
        if let (false, Some(budget)) = (sampled_before, self.wal.as_mut()) {
            budget.restart();
        }
        Ok(self
            .wal
            .as_mut()
            .map_or(WalRate::Go, |budget| budget.sample(now, lsn, rows)))
    }

    /// How far the archiver is behind, or whether it fails.
    async fn archive_lag(&mut self, client: &Client, cap: u64) -> Result<ArchiveLag, String> {
        let row = client
            .query_one(
                "SELECT pg_walfile_name(pg_current_wal_lsn()), a.last_archived_wal, a.last_failed_wal,
                        a.last_failed_time::text, a.failed_count,
                        a.last_failed_time IS NOT NULL
                          AND a.last_failed_time > coalesce(a.last_archived_time, '-infinity'),
                        pg_size_bytes(current_setting('wal_segment_size'))
                   FROM pg_stat_archiver a",
                &[],
            )
            .await
            .map_err(|e| db_message(&e))?;
        let state = ArchiverState {
            current_wal: row.try_get(0).map_err(|e| e.to_string())?,
            last_archived_wal: row.try_get(1).map_err(|e| e.to_string())?,
            last_failed_wal: row.try_get(2).map_err(|e| e.to_string())?,
            last_failed_time: row.try_get(3).map_err(|e| e.to_string())?,
            failed_count: row.try_get(4).map_err(|e| e.to_string())?,
            failing: row.try_get(5).map_err(|e| e.to_string())?,
        };
        let segment_size = u64::try_from(row.try_get::<_, i64>(6).map_err(|e| e.to_string())?)
            .map_err(|_| "wal_segment_size is negative".to_string())?;
        let (size, base) = match self.archive_base {
            Some(known) => known,
            None => {
                let base = segment_of(&state.current_wal, segment_size).unwrap_or(0);
                *self.archive_base.insert((segment_size, base))
            }
        };
        Ok(archive_lag(&state, size, base, cap))
    }

    /// The replica furthest behind and by how long; `None` when caught up.
    async fn replica_lag(&mut self, client: &Client) -> Result<Option<(String, Duration)>, String> {
        let rows = client
            .query(
                "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::float8, r.application_name, (r.replay_lsn - '0/0'::pg_lsn)::float8,
                        extract(epoch FROM r.replay_lag)::float8
                   FROM (SELECT 1) one LEFT JOIN pg_stat_replication r ON true",
                &[],
            )
            .await
            .map_err(|e| db_message(&e))?;
        let now = Instant::now();
        let current = rows
            .first()
            .and_then(|r| r.get::<_, Option<f64>>(0))
            .ok_or("the primary's WAL position is unknown")?;
        self.lag.sample(now, current as u64);
        let mut worst: Option<(String, Duration)> = None;
        for r in &rows {
            let Some(name) = r.get::<_, Option<String>>(1) else {
                return Err("no replica is connected (pg_stat_replication is empty); drop --max-replica-lag on a server without replicas".into());
            };
            let Some(replayed) = r.get::<_, Option<f64>>(2) else {
                return Err(format!("replica {name:?} shows no replay position (grant pg_monitor to this role, or wait for the replica to start)"));
            };
            // our own estimate keeps counting while replay is stalled; the
            // server's own replay_lag knows about lag from before we started
            let reported = r
                .get::<_, Option<f64>>(3)
                .filter(|l| l.is_finite() && *l > 0.0)
                .map_or(Duration::ZERO, Duration::from_secs_f64);
            let lag =
                self.lag
                    .lag(now, replayed as u64)
                    .max(if (replayed as u64) < current as u64 {
                        reported
                    } else {
                        Duration::ZERO
                    });
            if worst.as_ref().is_none_or(|(_, w)| lag > *w) {
                worst = Some((
                    if name.is_empty() {
                        "(unnamed)".into()
                    } else {
                        name
                    },
                    lag,
                ));
            }
        }
        Ok(worst)
    }
}

/// Reads a control file: absent means run; empty holds (it may be half
/// written: `echo stop > file` truncates it first).
pub fn read_control_file(path: &std::path::Path) -> Result<Option<Control>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => match text.trim() {
            "" => Err(format!("the control file {} is empty; write run, pause or stop into it (holding meanwhile)", path.display())),
            word => Control::parse(word).map(Some).ok_or_else(|| format!(
                "the control file {} says {:?}; write run, pause or stop into it (holding meanwhile)",
                path.display(),
                word.chars().take(40).collect::<String>()
            )),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("the control file {} cannot be read ({e}); holding", path.display())),
    }
}

/// Runs the gate query in a read-only transaction that is always rolled back.
async fn gate(client: &mut Client, sql: &str) -> Result<bool, String> {
    let tx = client.transaction().await.map_err(|e| db_message(&e))?;
    tx.batch_execute("SET TRANSACTION READ ONLY; SET LOCAL statement_timeout = '5s'")
        .await
        .map_err(|e| db_message(&e))?;
    let rows = tx.query(sql, &[]).await.map_err(|e| db_message(&e))?;
    let value = match rows.as_slice() {
        [row] if row.len() == 1 => row
            .try_get::<_, Option<bool>>(0)
            .map_err(|_| "it must return one boolean column".to_string())?,
        _ => {
            return Err(format!(
                "it returned {} rows; it must return exactly one row with one boolean",
                rows.len()
            ))
        }
    };
    let _ = tx.rollback().await;
    Ok(value == Some(true))
}

/// Checks the gate query before a run starts: it must parse, run read-only
/// and return one boolean. A false answer is fine (the run waits).
pub async fn check_gate_sql(client: &mut Client, sql: &str) -> Result<(), Error> {
    gate(client, sql)
        .await
        .map(|_| ())
        .map_err(|e| Error::Config(format!("--gate-sql {sql:?} cannot serve as a gate: {e}")))
}

/// The server's WAL position, in bytes from 0/0.
async fn current_lsn(client: &Client) -> Result<u64, String> {
    let row = client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::text", &[])
        .await
        .map_err(|e| db_message(&e))?;
    let text: String = row.try_get(0).map_err(|e| e.to_string())?;
    text.parse()
        .map_err(|_| format!("the WAL position {text:?} is not a number"))
}

/// Checks the WAL throttles before a run starts: `--max-wal-rate` needs a
/// primary's WAL position, `--max-archive-lag` a server that archives.
pub async fn check_wal_signals(client: &Client, signals: &Signals) -> Result<(), Error> {
    if signals.max_wal_rate.is_none() && signals.max_archive_lag.is_none() {
        return Ok(());
    }
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('archive_mode')",
            &[],
        )
        .await
        .map_err(|e| {
            Error::Config(format!(
                "the WAL throttles cannot read the server's state: {}",
                db_message(&e)
            ))
        })?;
    let standby: bool = row.try_get(0).map_err(|e| Error::Config(e.to_string()))?;
    let archive_mode: String = row.try_get(1).map_err(|e| Error::Config(e.to_string()))?;
    if standby {
        return Err(Error::Config(
            "--max-wal-rate and --max-archive-lag read the primary's WAL position (pg_current_wal_lsn()), \
             and this server is a standby; connect to the primary"
                .into(),
        ));
    }
    if signals.max_wal_rate.is_some() {
        current_lsn(client).await.map_err(|e| {
            Error::Config(format!("--max-wal-rate cannot read the WAL position: {e}"))
        })?;
    }
    if signals.max_archive_lag.is_some() {
        if archive_mode == "off" {
            return Err(Error::Config(
                "--max-archive-lag needs WAL archiving, and archive_mode is off on this server: \
                 nothing is archived, so nothing can fall behind; drop the flag (or use --max-wal-rate)"
                    .into(),
            ));
        }
        client
            .query_one("SELECT failed_count FROM pg_stat_archiver", &[])
            .await
            .map_err(|e| {
                Error::Config(format!(
                    "--max-archive-lag cannot read pg_stat_archiver: {}",
                    db_message(&e)
                ))
            })?;
    }
    Ok(())
}

/// Bytes per second or bytes, for people: `20.0 MiB`.
fn mib(bytes: f64) -> String {
    if bytes >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", bytes / (1u64 << 30) as f64)
    } else if bytes >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", bytes / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", bytes / 1024.0)
    }
}

/// The server's message, without the driver's wrapping.
fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_control_file_means_nothing_and_its_words_are_run_pause_stop() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("control");
        assert_eq!(read_control_file(&f), Ok(None));
        for (text, want) in [
            ("run\n", Control::Run),
            ("pause", Control::Pause),
            (" stop \n", Control::Stop),
        ] {
            std::fs::write(&f, text).unwrap();
            assert_eq!(read_control_file(&f), Ok(Some(want)), "{text:?}");
        }
        std::fs::write(&f, "").unwrap();
        assert!(
            read_control_file(&f).is_err(),
            "an empty (half-written) file holds"
        );
    }

    #[test]
    fn an_unknown_word_in_the_control_file_holds_and_says_what_to_write() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("control");
        std::fs::write(&f, "pasue").unwrap();
        let e = read_control_file(&f).unwrap_err();
        assert!(e.contains("run, pause or stop"), "{e}");
    }
}
