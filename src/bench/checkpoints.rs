//! The checkpoints the server made during a bench rekey run, and why.
//!
//! While a checkpoint runs, the first change to each page writes the whole
//! page to the WAL (full-page writes), so a rewrite's WAL and time per row
//! jump until most pages have been touched once; a checkpoint started
//! because the WAL passed `max_wal_size` comes every few hundred MB of a
//! rotation's WAL, and its dips show in the chart's rate. The bench reads
//! the server's checkpoint counters at every sample tick (readable by any
//! role) and, where the role may, the redo point of the last checkpoint
//! (`pg_control_checkpoint()`), whose WAL position gives the time it began.

use serde::Serialize;
use tokio_postgres::Client;

use crate::error::DbContext;
use crate::Error;

/// Why the server made a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// Asked for: the WAL since the last one passed what `max_wal_size`
    /// allows, or a `CHECKPOINT` command.
    Requested,
    /// `checkpoint_timeout` passed.
    Timed,
}

/// One checkpoint that ended during the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Checkpoint {
    /// Why it was made.
    pub cause: Cause,
    /// When it began, seconds since the start of the run: when the run's
    /// WAL reached its redo point. `None` where it began before the run, or
    /// the redo point is not readable (`pg_control_checkpoint()` needs
    /// superuser or `pg_monitor` on some servers).
    pub began_at_s: Option<f64>,
    /// When the bench saw it ended (its counter moved), seconds since the start.
    pub ended_at_s: f64,
}

/// What the checkpoint counters and the last redo point read at one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reading {
    timed: i64,
    requested: i64,
    /// The last checkpoint's redo point, bytes from 0/0.
    redo: Option<u64>,
}

/// Reads the counters on the server's version of the statistics views.
pub(super) struct Counters {
    sql: &'static str,
    /// Whether `pg_control_checkpoint()` may be read; false after it refused once.
    redo_readable: bool,
}

impl Counters {
    /// Picks the view for the server: `pg_stat_checkpointer` from PostgreSQL
    /// 17, `pg_stat_bgwriter` before.
    pub(super) async fn for_server(client: &Client) -> Result<Counters, Error> {
        let what = || "reading the server's version".to_string();
        let row = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .ctx(what)?;
        let version: i32 = row.try_get(0).ctx(what)?;
        Ok(Counters {
            sql: if version >= 170_000 {
                "SELECT num_timed, num_requested FROM pg_stat_checkpointer"
            } else {
                "SELECT checkpoints_timed, checkpoints_req FROM pg_stat_bgwriter"
            },
            redo_readable: true,
        })
    }

    /// The counters now, and the last redo point where readable.
    pub(super) async fn read(&mut self, client: &Client) -> Result<Reading, Error> {
        let what = || "reading the server's checkpoint counters".to_string();
        let row = client.query_one(self.sql, &[]).await.ctx(what)?;
        let (timed, requested) = (row.try_get(0).ctx(what)?, row.try_get(1).ctx(what)?);
        let mut redo = None;
        if self.redo_readable {
            let read = client
                .query_one(
                    "SELECT pg_wal_lsn_diff(redo_lsn, '0/0')::bigint FROM pg_control_checkpoint()",
                    &[],
                )
                .await;
            match read.map(|r| r.try_get::<_, i64>(0)) {
                Ok(Ok(at)) => redo = u64::try_from(at).ok(),
                // not this role's to read: the counters alone
                _ => self.redo_readable = false,
            }
        }
        Ok(Reading {
            timed,
            requested,
            redo,
        })
    }
}

/// The checkpoints that ended between two readings, the second at `t`
/// seconds: one for each step of each counter, the last of them with the
/// redo point read at `t`, placed on the run's `wal` series (bytes since
/// `wal_base`, in time order). A counter reset (it went down) shows none.
pub(super) fn ended(
    before: &Reading,
    now: &Reading,
    t: f64,
    wal_base: u64,
    wal: &[(f64, u64)],
) -> Vec<Checkpoint> {
    let steps = |a: i64, b: i64| usize::try_from(b.saturating_sub(a)).unwrap_or(0);
    let mut out: Vec<Checkpoint> =
        std::iter::repeat_n(Cause::Timed, steps(before.timed, now.timed))
            .chain(std::iter::repeat_n(
                Cause::Requested,
                steps(before.requested, now.requested),
            ))
            .map(|cause| Checkpoint {
                cause,
                began_at_s: None,
                ended_at_s: t,
            })
            .collect();
    if let (Some(last), Some(redo)) = (out.last_mut(), now.redo) {
        last.began_at_s = redo.checked_sub(wal_base).and_then(|at| when(wal, at));
    }
    out
}

/// When the run's WAL reached `at` bytes, between the samples around it
/// (the WAL taken as written evenly between two samples).
fn when(wal: &[(f64, u64)], at: u64) -> Option<f64> {
    let j = wal.iter().position(|&(_, b)| b >= at)?;
    let (t1, b1) = wal[j];
    let Some(&(t0, b0)) = j.checked_sub(1).and_then(|i| wal.get(i)) else {
        return Some(t1);
    };
    let share = (at - b0) as f64 / (b1 - b0).max(1) as f64;
    Some(t0 + (t1 - t0) * share)
}

/// What to tell the operator when the WAL caused checkpoints during the
/// run: how much `max_wal_size` would let the run's WAL pass without one.
/// `wal_bytes`: the run's WAL; `max_wal_size`, `completion_target`: the
/// server's settings. `None` when no checkpoint was requested.
pub fn advice(
    checkpoints: &[Checkpoint],
    wal_bytes: u64,
    wal_bytes_per_row: f64,
    max_wal_size: u64,
    completion_target: f64,
) -> Option<String> {
    let requested = checkpoints
        .iter()
        .filter(|c| c.cause == Cause::Requested)
        .count();
    if requested == 0 {
        return None;
    }
    // the server asks for one each max_wal_size / (1 + completion target) of WAL
    let enough = wal_bytes as f64 * (1.0 + completion_target.clamp(0.0, 1.0));
    Some(format!(
        "the server started {requested} checkpoint(s) during the run because its WAL \
         passed max_wal_size ({}); while one runs, each page's first change writes the \
         whole page to the WAL and the rate dips. For the rotation's window, a \
         max_wal_size of about {} would take this run's {} of WAL without one \
         ({:.0} bytes a row: scale it by your table's rows, and keep that much free \
         in pg_wal); or keep it, and size the window from a bench that has the dips",
        mib(max_wal_size as f64),
        mib(enough),
        mib(wal_bytes as f64),
        wal_bytes_per_row,
    ))
}

fn mib(bytes: f64) -> String {
    format!("{:.0} MiB", bytes / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(timed: i64, requested: i64, redo: Option<u64>) -> Reading {
        Reading {
            timed,
            requested,
            redo,
        }
    }

    #[test]
    fn a_requested_checkpoint_begins_where_the_run_s_wal_reached_its_redo_point() {
        let wal = [(0.0, 0), (1.0, 100), (2.0, 300), (3.0, 400)];
        let seen = ended(
            &reading(4, 1, Some(900)),
            &reading(4, 2, Some(1_000 + 200)),
            3.0,
            1_000,
            &wal,
        );
        // halfway from 100 bytes at 1 s to 300 at 2 s
        assert_eq!(
            seen,
            vec![Checkpoint {
                cause: Cause::Requested,
                began_at_s: Some(1.5),
                ended_at_s: 3.0
            }]
        );
    }

    #[test]
    fn a_checkpoint_begun_before_the_run_has_no_start_and_unmoved_counters_show_none() {
        let wal = [(0.0, 0), (1.0, 100)];
        let seen = ended(
            &reading(4, 1, None),
            &reading(5, 1, Some(500)),
            1.0,
            1_000,
            &wal,
        );
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].cause, seen[0].began_at_s), (Cause::Timed, None));
        assert!(ended(&reading(5, 1, None), &reading(5, 1, None), 1.0, 0, &wal).is_empty());
        assert!(ended(&reading(5, 3, None), &reading(0, 0, None), 1.0, 0, &wal).is_empty());
    }

    #[test]
    fn advice_is_given_only_for_requested_checkpoints_and_names_the_setting() {
        let timed = Checkpoint {
            cause: Cause::Timed,
            began_at_s: None,
            ended_at_s: 1.0,
        };
        assert_eq!(
            advice(std::slice::from_ref(&timed), 1 << 30, 700.0, 1 << 30, 0.9),
            None
        );
        let requested = Checkpoint {
            cause: Cause::Requested,
            ..timed
        };
        let said = advice(&[requested], 1 << 30, 700.0, 256 << 20, 0.9).unwrap();
        assert!(said.contains("max_wal_size (256 MiB)"), "{said}");
        assert!(said.contains("about 1946 MiB"), "{said}");
    }
}
