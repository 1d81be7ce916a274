//! The rows other processes sharing a job have done since this one started,
//! for the progress line: the rows left are everyone's, so a process that
//! showed only its own rows done against them stopped short of 100% and
//! projected an ETA as if it worked alone.
//!
//! Read by the monitor at each check: the job's rows in `rekey.progress`,
//! less what the job had at this process's start, less this process's own
//! read after it, counting the batches it is writing
//! ([`crate::observe::counts::LiveCounts::own_so_far`]): a batch of its own
//! can be seen committed a moment before it is counted, and would otherwise
//! be shown as another's. What is shown never goes down, and is a lower
//! bound but for one rare case: a batch whose COMMIT landed as the
//! connection broke, where another process took the range over before
//! this one reconnected, cannot be told from one it never wrote.

use tokio_postgres::Client;

use crate::state;

/// What the monitor keeps between readings.
#[derive(Debug, Default)]
pub(super) struct OthersDone {
    /// The job's rows as this process started (`None`: unread).
    at_start: Option<u64>,
}

impl OthersDone {
    /// Reads the job's rows before this process's first batch.
    pub(super) async fn start(conn: &Client, job_id: i64) -> Self {
        OthersDone {
            at_start: job_rows(conn, job_id).await,
        }
    }

    /// Reads again; `own`: this process's rows with those it is writing,
    /// read after the job's. The others' rows to show.
    pub(super) async fn read(
        &self,
        conn: &Client,
        job_id: i64,
        own: impl Fn() -> u64,
    ) -> Option<u64> {
        self.at_start?;
        let job = job_rows(conn, job_id).await?;
        self.reading(job, own())
    }

    /// One reading: the job's rows, then this process's own.
    fn reading(&self, job: u64, own: u64) -> Option<u64> {
        Some(job.saturating_sub(self.at_start?).saturating_sub(own))
    }
}

/// The job's rows so far, conflict re-reads included as this process's own
/// count includes them; `None` (the progress line goes on without the
/// others) when unreadable.
async fn job_rows(conn: &Client, job_id: i64) -> Option<u64> {
    match state::job_totals(conn, job_id).await {
        Ok(totals) => Some(totals.rows_scanned),
        Err(e) => {
            tracing::debug!("the job's rows done are unreadable: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_others_rows_are_the_job_s_since_the_start_less_this_process_s() {
        let o = OthersDone {
            at_start: Some(1_000),
        };
        assert_eq!(o.reading(1_500, 200), Some(300));
        assert_eq!(o.reading(2_600, 600), Some(1_000));
    }

    #[test]
    fn nothing_is_shown_when_the_job_s_rows_at_the_start_were_unreadable() {
        let o = OthersDone::default();
        assert_eq!(o.reading(500, 0), None);
    }
}
