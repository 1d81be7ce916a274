//! The rows other processes sharing a job have done since this one started,
//! for the progress line: the rows left are everyone's, so a process that
//! showed only its own rows done against them stopped short of 100% and
//! projected an ETA as if it worked alone.
//!
//! Read by the monitor at each check: the job's rows in `rekey.progress`,
//! less what the job had at this process's start, less this process's own.
//! A batch this process committed is in `rekey.progress` a moment before
//! its own count has it, so one reading can count it as another's; a
//! reading is trusted only once the next one is at least as high (the
//! smaller of the two is shown), and what is shown never goes down.

use tokio_postgres::Client;

use crate::state;

/// What the monitor keeps between readings.
#[derive(Debug, Default)]
pub(super) struct OthersDone {
    /// The job's rows as this process started (`None`: unread).
    at_start: Option<u64>,
    /// The previous reading of the others' rows.
    previous: Option<u64>,
}

impl OthersDone {
    /// Reads the job's rows before this process's first batch.
    pub(super) async fn start(conn: &Client, job_id: i64) -> Self {
        OthersDone {
            at_start: read(conn, job_id).await,
            previous: None,
        }
    }

    /// Reads again; `own`: this process's rows, read after the job's. The
    /// others' rows to show, once two readings agree on them.
    pub(super) async fn read(
        &mut self,
        conn: &Client,
        job_id: i64,
        own: impl Fn() -> u64,
    ) -> Option<u64> {
        self.at_start?;
        let job = read(conn, job_id).await?;
        self.reading(job, own())
    }

    /// Takes one reading: the job's rows, then this process's own.
    fn reading(&mut self, job: u64, own: u64) -> Option<u64> {
        let others = job.saturating_sub(self.at_start?).saturating_sub(own);
        let shown = self.previous.map(|previous| previous.min(others));
        self.previous = Some(others);
        shown
    }
}

/// The job's rows so far; `None` (the progress line goes on without the
/// others) when unreadable.
async fn read(conn: &Client, job_id: i64) -> Option<u64> {
    match state::progress::rows_scanned(conn, job_id).await {
        Ok(rows) => Some(rows),
        Err(e) => {
            tracing::debug!("the job's rows done are unreadable: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started_at(rows: u64) -> OthersDone {
        OthersDone {
            at_start: Some(rows),
            previous: None,
        }
    }

    #[test]
    fn the_others_rows_are_the_job_s_since_the_start_less_this_process_s() {
        let mut o = started_at(1_000);
        assert_eq!(
            o.reading(1_500, 200),
            None,
            "one reading is not trusted yet"
        );
        assert_eq!(o.reading(2_000, 400), Some(300));
        assert_eq!(
            o.reading(2_600, 600),
            Some(600),
            "the lower of the last two"
        );
    }

    #[test]
    fn a_batch_of_this_process_s_counted_as_another_s_for_one_reading_is_not_shown() {
        // alone: the job's rows are this process's, but one reading saw a
        // committed batch of 100 before this process's count had it
        let mut o = started_at(0);
        assert_eq!(o.reading(500, 500), None);
        assert_eq!(o.reading(1_100, 1_000), Some(0));
        assert_eq!(o.reading(1_500, 1_500), Some(0));
    }

    #[test]
    fn nothing_is_shown_when_the_job_s_rows_at_the_start_were_unreadable() {
        let mut o = OthersDone::default();
        assert_eq!(o.reading(500, 0), None);
        assert_eq!(o.reading(900, 0), None);
    }
}
