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
    /// Asked for: the WAL since the last one reached `max_wal_size / (1 +
    /// checkpoint_completion_target)`, or a `CHECKPOINT` command or a backup.
    Requested,
    /// `checkpoint_timeout` passed.
    Timed,
    /// Begun before the run, when the counters were first read.
    BeforeTheRun,
    /// Ended during the run before the server counted it (a checkpoint
    /// that never pauses is counted as it ends), and not counted by the
    /// run's last reading: why is not known.
    Unread,
}

/// One checkpoint the server ran during the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Checkpoint {
    /// Why it was made.
    pub cause: Cause,
    /// When it began, seconds since the start of the run: where the run's
    /// WAL reached its redo point; without the redo point, the sample at
    /// which its counter moved (the server counts one as it begins). `None`
    /// where it began before the run.
    pub began_at_s: Option<f64>,
    /// When it ended (its redo point became the last checkpoint's);
    /// `None` where it was still running as the run ended, or the redo point
    /// is not readable (`pg_control_checkpoint()` may be refused to a role).
    pub ended_at_s: Option<f64>,
}

/// What the checkpoint counters and the last checkpoint's redo point read
/// at one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reading {
    timed: i64,
    requested: i64,
    /// The last completed checkpoint's redo point, bytes from 0/0.
    redo: Option<u64>,
}

/// The checkpoints of one run, followed from the server's counters.
pub(super) struct Watch {
    counters: Counters,
    tracker: Tracker,
}

impl Watch {
    /// Starts following at the run's start, at WAL position `wal_base`.
    pub(super) async fn start(client: &Client, wal_base: u64) -> Result<Watch, Error> {
        let mut counters = Counters::for_server(client).await?;
        let first = counters.read(client).await?;
        Ok(Watch {
            counters,
            tracker: Tracker::new(first, wal_base),
        })
    }

    /// One more reading, `t` seconds into the run, with the run's WAL series
    /// so far (bytes since the start, in time order).
    pub(super) async fn sample(
        mut self,
        client: &Client,
        t: f64,
        wal: &[(f64, u64)],
    ) -> Result<Watch, Error> {
        let now = self.counters.read(client).await?;
        self.tracker.observe(now, t, wal);
        Ok(self)
    }

    /// Every checkpoint seen, with those still running, their times held to
    /// the run's `end` (the last sample may fall just after it).
    pub(super) fn finish(self, end: f64) -> Vec<Checkpoint> {
        let mut seen = self.tracker.finish();
        for c in &mut seen {
            c.began_at_s = c.began_at_s.map(|b| b.min(end));
            c.ended_at_s = c.ended_at_s.map(|e| e.min(end));
        }
        seen
    }
}

/// Reads the counters on the server's version of the statistics views.
struct Counters {
    sql: &'static str,
    /// Whether `pg_control_checkpoint()` may be read; false after it refused once.
    redo_readable: bool,
}

impl Counters {
    /// Picks the view for the server: `pg_stat_checkpointer` from PostgreSQL
    /// 17, `pg_stat_bgwriter` before.
    async fn for_server(client: &Client) -> Result<Counters, Error> {
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

    /// The last redo point where readable, then the counters: a checkpoint
    /// that never pauses is counted a moment after its redo point moves, so
    /// an end this reading sees comes with its count.
    async fn read(&mut self, client: &Client) -> Result<Reading, Error> {
        let what = || "reading the server's checkpoint counters".to_string();
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
        let row = client.query_one(self.sql, &[]).await.ctx(what)?;
        let (timed, requested) = (row.try_get(0).ctx(what)?, row.try_get(1).ctx(what)?);
        Ok(Reading {
            timed,
            requested,
            redo,
        })
    }
}

/// Follows the checkpoints through a run's samples. The server runs one at
/// a time; it counts one at its first pause, or as it ends where it never
/// pauses (just after its redo point became the last one, so a sample may
/// see the end first); the redo point moves as it ends. Each counted is held
/// until a redo point moves, oldest first, and each end seen before its
/// count waits for the next count.
#[derive(Debug)]
struct Tracker {
    last: Reading,
    /// Counted and not yet ended: why, and the sample its counter moved at.
    running: std::collections::VecDeque<(Cause, f64)>,
    seen: Vec<Checkpoint>,
    /// Ended during the run before they were counted: places in `seen`,
    /// oldest first, whose cause the next counts give.
    uncounted: std::collections::VecDeque<usize>,

    /// The WAL position (bytes from 0/0) at the run's start.
    wal_base: u64,
}

impl Tracker {
    /// From the reading before the run, at WAL position `wal_base`.
    fn new(first: Reading, wal_base: u64) -> Tracker {
        Tracker {
            last: first,
            running: Default::default(),
            seen: Vec::new(),
            uncounted: Default::default(),
            wal_base,
        }
    }

    /// The reading at `t` seconds, with the run's WAL series so far (bytes
    /// since the start, in time order).
    fn observe(&mut self, now: Reading, t: f64, wal: &[(f64, u64)]) {
        let steps = |a: i64, b: i64| usize::try_from(b.saturating_sub(a)).unwrap_or(0);
        for cause in std::iter::repeat_n(Cause::Timed, steps(self.last.timed, now.timed)).chain(
            std::iter::repeat_n(Cause::Requested, steps(self.last.requested, now.requested)),
        ) {
            match self.uncounted.pop_front() {
                // the count of one already seen ending
                Some(i) => self.seen[i].cause = cause,
                None => self.running.push_back((cause, t)),
            }
        }
        match (self.last.redo, now.redo) {
            (Some(before), Some(redo)) if redo != before => {
                // one ended (two in one sample look like one: the later)
                match redo.checked_sub(self.wal_base) {
                    None => {
                        // the one running as the run began: a count of an
                        // earlier sample is its own (none begun during the
                        // run could be counted before it ended), and so is
                        // one of this sample (one that never pauses is
                        // counted as it ends, and the counters are read
                        // after the redo point); else it was counted before
                        // the run
                        if self.running.front().is_some_and(|&(_, at)| at <= t) {
                            self.running.pop_front();
                        }
                        self.seen.push(Checkpoint {
                            cause: Cause::BeforeTheRun,
                            began_at_s: None,
                            ended_at_s: Some(t),
                        });
                    }
                    Some(at) => {
                        let began_at_s = Some(when(wal, at).unwrap_or(t));
                        let cause = match self.running.pop_front() {
                            Some((cause, _)) => cause,
                            None => {
                                self.uncounted.push_back(self.seen.len());
                                Cause::Unread
                            }
                        };
                        self.seen.push(Checkpoint {
                            cause,
                            began_at_s,
                            ended_at_s: Some(t),
                        });
                    }
                }
            }
            (_, None) => {
                // no redo point: each as its counter moved, its end unknown;
                // ends seen before cannot be matched with counts any more
                self.uncounted.clear();
                self.seen
                    .extend(self.running.drain(..).map(|(cause, at)| Checkpoint {
                        cause,
                        began_at_s: Some(at),
                        ended_at_s: None,
                    }));
            }
            _ => {}
        }
        self.last = now;
    }

    /// Every checkpoint seen, with those still running at the end, in the
    /// order they began.
    fn finish(mut self) -> Vec<Checkpoint> {
        self.seen
            .extend(self.running.drain(..).map(|(cause, at)| Checkpoint {
                cause,
                began_at_s: Some(at),
                ended_at_s: None,
            }));
        // those begun before the run first; a stable sort keeps the order
        // of those with one time
        self.seen.sort_by(|a, b| {
            a.began_at_s
                .unwrap_or(f64::NEG_INFINITY)
                .total_cmp(&b.began_at_s.unwrap_or(f64::NEG_INFINITY))
        });
        self.seen
    }
}

/// When the run's WAL reached `at` bytes, between the samples around it
/// (the WAL taken as written evenly between two samples); `None` past the
/// last sample.
fn when(wal: &[(f64, u64)], at: u64) -> Option<f64> {
    let j = wal.iter().position(|&(_, b)| b >= at)?;
    let (t1, b1) = wal[j];
    let Some(&(t0, b0)) = j.checked_sub(1).and_then(|i| wal.get(i)) else {
        return Some(t1);
    };
    let share = (at - b0) as f64 / (b1 - b0).max(1) as f64;
    Some(t0 + (t1 - t0) * share)
}

/// What to tell the operator when checkpoints were requested during the
/// run: the `max_wal_size` that would let the run's WAL pass without one.
/// `wal_bytes`: the run's WAL; the rest: the server's settings. `None` when
/// none was requested.
pub fn advice(
    checkpoints: &[Checkpoint],
    wal_bytes: u64,
    wal_bytes_per_row: f64,
    settings: &Settings,
) -> Option<String> {
    let requested = checkpoints
        .iter()
        .filter(|c| c.cause == Cause::Requested)
        .count();
    if requested == 0 {
        return None;
    }
    // the server asks for one when the WAL since the last one's redo point
    // reaches max_wal_size / (1 + completion target), less a segment
    let target = 1.0 + settings.completion_target.clamp(0.0, 1.0);
    let enough = (wal_bytes + 2 * settings.wal_segment) as f64 * target;
    Some(format!(
        "the server was asked for {requested} checkpoint(s) during the run: with no \
         CHECKPOINT command or backup running, its WAL reached what max_wal_size ({}) \
         allows; while one runs, each page's first change writes the whole page to the \
         WAL and the rate dips. For the rotation's window, a max_wal_size of at least {} \
         would take this run's {} of WAL without one ({:.0} bytes a row, the dips' \
         full pages included: scale it by your table's rows, add the WAL the server \
         writes since its last checkpoint, and keep that much free in pg_wal); or keep \
         it, and size the window from a bench that has the dips",
        mib(settings.max_wal_size as f64),
        mib(enough),
        mib(wal_bytes as f64),
        wal_bytes_per_row,
    ))
}

/// The server's checkpoint settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// `max_wal_size`, bytes.
    pub max_wal_size: u64,
    /// `checkpoint_completion_target`.
    pub completion_target: f64,
    /// `wal_segment_size`, bytes.
    pub wal_segment: u64,
}

impl Settings {
    /// Reads them.
    pub(super) async fn read(client: &Client) -> Result<Settings, Error> {
        let what = || "reading the server's checkpoint settings".to_string();
        let row = client
            .query_one(
                "SELECT pg_size_bytes(current_setting('max_wal_size')),
                        current_setting('checkpoint_completion_target')::float8,
                        pg_size_bytes(current_setting('wal_segment_size'))",
                &[],
            )
            .await
            .ctx(what)?;
        let bytes = |i: usize| -> Result<u64, Error> {
            let v: i64 = row.try_get(i).ctx(what)?;
            u64::try_from(v)
                .map_err(|_| Error::Runtime(format!("the server gave a negative size: {v}")))
        };
        Ok(Settings {
            max_wal_size: bytes(0)?,
            completion_target: row.try_get(1).ctx(what)?,
            wal_segment: bytes(2)?,
        })
    }
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

    const WAL: [(f64, u64); 4] = [(0.0, 0), (1.0, 100), (2.0, 300), (3.0, 400)];

    #[test]
    fn a_checkpoint_begins_where_the_wal_reached_its_redo_point_and_ends_when_that_point_moves() {
        let mut t = Tracker::new(reading(4, 1, Some(900)), 1_000);
        // its counter moves as it begins; the last redo point is still the old one
        t.observe(reading(4, 2, Some(900)), 1.0, &WAL[..2]);
        t.observe(reading(4, 2, Some(900)), 2.0, &WAL[..3]);
        t.observe(reading(4, 2, Some(1_000 + 200)), 3.0, &WAL);
        // halfway from 100 bytes at 1 s to 300 at 2 s
        assert_eq!(
            t.finish(),
            vec![Checkpoint {
                cause: Cause::Requested,
                began_at_s: Some(1.5),
                ended_at_s: Some(3.0)
            }]
        );
    }

    #[test]
    fn one_begun_before_the_run_has_no_start_and_one_still_running_has_no_end() {
        let mut t = Tracker::new(reading(4, 1, Some(500)), 1_000);
        // the one running as the run began ends (its redo point is before the run)
        t.observe(reading(4, 1, Some(800)), 1.0, &WAL[..2]);
        // a timed one begins, and is still running at the end
        t.observe(reading(5, 1, Some(800)), 2.0, &WAL[..3]);
        assert_eq!(
            t.finish(),
            vec![
                Checkpoint {
                    cause: Cause::BeforeTheRun,
                    began_at_s: None,
                    ended_at_s: Some(1.0)
                },
                Checkpoint {
                    cause: Cause::Timed,
                    began_at_s: Some(2.0),
                    ended_at_s: None
                },
            ]
        );
    }

    #[test]
    fn one_whose_redo_point_moves_before_its_counter_is_counted_once_with_the_counters_cause() {
        // a checkpoint that never pauses reports its counter just after it ends
        let mut t = Tracker::new(reading(4, 1, Some(900)), 1_000);
        t.observe(reading(4, 1, Some(1_000 + 200)), 2.0, &WAL[..3]);
        t.observe(reading(4, 2, Some(1_000 + 200)), 3.0, &WAL);
        assert_eq!(
            t.finish(),
            vec![Checkpoint {
                cause: Cause::Requested,
                began_at_s: Some(1.5),
                ended_at_s: Some(2.0)
            }]
        );
    }

    #[test]
    fn the_counter_of_one_begun_before_the_run_is_not_taken_for_one_begun_during_it() {
        let mut t = Tracker::new(reading(4, 1, Some(500)), 1_000);
        // the one running as the run began is counted, then ends
        t.observe(reading(4, 2, Some(500)), 1.0, &WAL[..2]);
        t.observe(reading(4, 2, Some(800)), 2.0, &WAL[..3]);
        // one begun during the run, counted, then ended
        t.observe(reading(4, 3, Some(800)), 2.5, &WAL[..3]);
        t.observe(reading(4, 3, Some(1_000 + 350)), 3.0, &WAL);
        assert_eq!(
            t.finish(),
            vec![
                Checkpoint {
                    cause: Cause::BeforeTheRun,
                    began_at_s: None,
                    ended_at_s: Some(2.0)
                },
                Checkpoint {
                    cause: Cause::Requested,
                    began_at_s: Some(2.5),
                    ended_at_s: Some(3.0)
                },
            ]
        );
    }

    #[test]
    fn one_begun_before_the_run_counted_in_the_sample_of_its_end_lends_no_count_to_the_next() {
        let mut t = Tracker::new(reading(4, 1, Some(500)), 1_000);
        t.observe(reading(4, 2, Some(800)), 1.0, &WAL[..2]);
        t.observe(reading(4, 3, Some(800)), 2.5, &WAL[..3]);
        t.observe(reading(4, 3, Some(1_000 + 350)), 3.0, &WAL);
        let seen = t.finish();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[1].began_at_s, Some(2.5));
        assert_eq!(seen[1].ended_at_s, Some(3.0));
    }

    #[test]
    fn once_the_redo_point_is_unreadable_a_count_is_a_new_checkpoint_not_an_earlier_end() {
        let mut t = Tracker::new(reading(4, 1, Some(900)), 1_000);
        t.observe(reading(4, 1, Some(1_000 + 200)), 2.0, &WAL[..3]);
        t.observe(reading(4, 1, None), 2.5, &WAL[..3]);
        t.observe(reading(4, 2, None), 3.0, &WAL);
        let seen = t.finish();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(
            (seen[0].cause, seen[0].ended_at_s),
            (Cause::Unread, Some(2.0))
        );
        assert_eq!(
            (seen[1].cause, seen[1].began_at_s),
            (Cause::Requested, Some(3.0))
        );
    }

    #[test]
    fn an_end_not_yet_counted_when_the_run_ends_has_no_cause_read() {
        let mut t = Tracker::new(reading(4, 1, Some(900)), 1_000);
        t.observe(reading(4, 1, Some(1_000 + 200)), 3.0, &WAL);
        let seen = t.finish();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].cause, Cause::Unread);
        assert_eq!(seen[0].began_at_s, Some(1.5));
    }

    #[test]
    fn without_the_redo_point_each_counter_step_is_a_checkpoint_begun_and_reset_counters_show_none()
    {
        let mut t = Tracker::new(reading(4, 1, None), 0);
        t.observe(reading(4, 3, None), 1.0, &WAL[..2]);
        t.observe(reading(0, 0, None), 2.0, &WAL[..3]);
        let seen = t.finish();
        assert_eq!(seen.len(), 2);
        assert!(seen.iter().all(|c| c.cause == Cause::Requested
            && c.began_at_s == Some(1.0)
            && c.ended_at_s.is_none()));
    }

    #[test]
    fn advice_is_given_only_for_requested_checkpoints_and_names_the_setting() {
        let settings = Settings {
            max_wal_size: 256 << 20,
            completion_target: 0.9,
            wal_segment: 16 << 20,
        };
        let timed = Checkpoint {
            cause: Cause::Timed,
            began_at_s: None,
            ended_at_s: Some(1.0),
        };
        assert_eq!(
            advice(std::slice::from_ref(&timed), 1 << 30, 700.0, &settings),
            None
        );
        let requested = Checkpoint {
            cause: Cause::Requested,
            ..timed
        };
        let said = advice(&[requested], 1 << 30, 700.0, &settings).unwrap();
        assert!(said.contains("max_wal_size (256 MiB)"), "{said}");
        // (1024 + 32) MiB x 1.9
        assert!(said.contains("at least 2006 MiB"), "{said}");
    }
}
