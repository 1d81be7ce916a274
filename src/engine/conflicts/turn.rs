//! The conflict pass's own session: it holds the pass's turn (processes
//! sharing a job re-read one at a time, the next finding what the first
//! left) and lists the keys to re-read. Ended under the pass (a server
//! restart, a terminated backend, a proxy), it is opened again and waits
//! for its turn again, as a lane's sessions are, where the pass would stop
//! the run at its next listing.

use std::time::Duration;

use tokio_postgres::Client;

use crate::db::idle::{ping_interval, pinging};
use crate::db::session::Timeouts;
use crate::db::{Database, KeyBytes};
use crate::engine::work::{backoff, Shared};
use crate::error::Retry;
use crate::Error;

/// The session holding one process's turn at a job's conflict re-reads.
pub(super) struct Turn<'a> {
    /// Where it is opened again.
    db: &'a Database,
    job_id: i64,
    client: Client,
    /// How often it is pinged while other sessions work.
    every: Duration,
    /// Its server process and when it started: after a break the server
    /// did not see (a network cut), that process may hold the turn still.
    backend: (i32, String),
}

impl<'a> Turn<'a> {
    /// Opens the session and waits, as long as it takes, for the turn;
    /// first ends `lost`, this process's session that held it before.
    async fn take(
        db: &'a Database,
        job_id: i64,
        lost: Option<&(i32, String)>,
    ) -> Result<Turn<'a>, Error> {
        // its waits and counts are not batches: none under the batches' statement timeout
        let client = db.with_session(&Timeouts::read_only()).connect().await?;
        let ctx = |what: &str| {
            let what = what.to_string();
            move |e| Error::Db {
                context: what,
                source: e,
                statement: crate::error::Statement::Other,
            }
        };
        if let Some((pid, started)) = lost {
            // the same process, started at the same instant: not one that reused its number
            client
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                      WHERE pid = $1 AND backend_start::text = $2",
                    &[pid, started],
                )
                .await
                .map_err(ctx("ending the lost session of the conflict re-reads"))?;
        }
        crate::state::locks::wait_for(&client, &format!("rekey.conflicts:{job_id}"))
            .await
            .map_err(ctx("waiting for another process's conflict re-reads"))?;
        let me = client
            .query_one(
                "SELECT pid, backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .map_err(ctx("reading the conflict re-reads' own session"))?;
        // the turn's lock is this session's: it is kept from idling through the holds
        let every = ping_interval(&client).await;
        Ok(Turn {
            db,
            job_id,
            client,
            every,
            backend: (me.get(0), me.get(1)),
        })
    }

    /// Takes the turn of job `job_id`'s re-reads ([`Turn::take`]).
    pub(super) async fn first(db: &'a Database, job_id: i64) -> Result<Turn<'a>, Error> {
        Turn::take(db, job_id, None).await
    }

    /// Runs `work` (on other sessions) while keeping this one from idling.
    pub(super) async fn pinging<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        pinging(&self.client, self.every, work).await
    }

    /// Keys of the job waiting to be re-read, every target's.
    pub(super) async fn waiting(&mut self, shared: &Shared) -> Result<u64, Error> {
        let mut failed = 0;
        loop {
            match waiting(&self.client, self.job_id).await {
                Err(e) => self.recover(shared, &mut failed, e).await?,
                listed => return listed,
            }
        }
    }

    /// Up to `limit` keys of `target` waiting to be re-read, the oldest first.
    pub(super) async fn pending(
        &mut self,
        shared: &Shared,
        target: usize,
        limit: i64,
    ) -> Result<Vec<KeyBytes>, Error> {
        let mut failed = 0;
        loop {
            let listed =
                crate::state::pending_conflicts(&self.client, self.job_id, target, limit).await;
            match listed {
                Err(e) => self.recover(shared, &mut failed, e).await?,
                listed => return listed,
            }
        }
    }

    /// After a listing failed with `error` (the `failed`-th time): where the
    /// session was lost, waits, opens it again, ends the lost one's server
    /// process where it lives on (a break the server did not see would
    /// otherwise keep the turn from this process for as long as the
    /// server's TCP keepalive takes) and takes the turn again, so
    /// the caller can list again; returns the error when it is another, or
    /// keeps coming past the run's tries.
    async fn recover(
        &mut self,
        shared: &Shared,
        failed: &mut u32,
        error: Error,
    ) -> Result<(), Error> {
        *failed += 1;
        if error.retry() != Retry::Reconnect || *failed >= shared.attempts {
            return Err(error);
        }
        let wait = backoff(*failed);
        tracing::warn!(
            attempt = *failed,
            "the conflict re-reads' own session was lost (try {failed} of {}), opening it again in {:.1}s: {}",
            shared.attempts,
            wait.as_secs_f64(),
            error.chain()
        );
        tokio::time::sleep(wait).await;
        // a failure here shows at the next listing, which counts a try
        match Turn::take(self.db, self.job_id, Some(&self.backend)).await {
            Ok(again) => *self = again,
            Err(e) => tracing::warn!("opening it again failed: {}", e.chain()),
        }
        Ok(())
    }
}

/// Keys of `job_id` waiting to be re-read, every target's.
async fn waiting(client: &Client, job_id: i64) -> Result<u64, Error> {
    let keys: i64 = client
        .query_one(
            "SELECT count(*) FROM rekey.conflicts WHERE job_id = $1",
            &[&job_id],
        )
        .await
        .map_err(|e| Error::Db {
            context: "counting the rows left to re-read".into(),
            source: e,
            statement: crate::error::Statement::Other,
        })?
        .get(0);
    Ok(u64::try_from(keys).unwrap_or(0))
}
