//! A writer after its connection broke: reopened, it checks its committed
//! checkpoints before it writes again, so a batch whose COMMIT landed is not
//! redone and a crash that lost acknowledged commits stops the run.

use crate::db::KeyBytes;
use crate::error::DbContext;
use crate::job::Job;
use crate::state::RangeState;
use crate::Error;

use super::{Batch, Writer};

/// Where a batch stands after its connection broke and was reopened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterReconnect {
    /// Its COMMIT landed before the break: do not redo it.
    Committed,
    /// It did not commit, and nothing before it was lost: redo it.
    NotCommitted,
    /// The server lost batches it had acknowledged (a crash; rekey's commits
    /// are asynchronous): pages read since are ahead of what is durable.
    Lost,
}

impl Writer {
    /// Replaces a broken connection with a new one.
    pub async fn reconnect(&mut self, job: &Job) -> Result<(), Error> {
        let (client, prepared, count) = Self::open(&self.db, job, self.timeouts).await?;
        self.client = client;
        self.prepared = prepared;
        self.count = count;
        Ok(())
    }

    /// Reopens the connection where it was closed while this writer sat
    /// idle (a server's `idle_session_timeout`, a proxy) with no batch in
    /// flight; returns whether it did.
    pub async fn reopen_if_closed(&mut self, job: &Job) -> Result<bool, Error> {
        if !self.client.is_closed() {
            return Ok(false);
        }
        tracing::debug!("a writing session was closed while idle; reopening it");
        self.reconnect(job).await?;
        Ok(true)
    }

    /// Notes that `batch` of `state` is committed (by [`Writer::write`], or
    /// found committed after a reconnect).
    pub fn remember(&mut self, state: &RangeState, batch: &Batch) {
        if let Some(last) = &batch.last_key {
            self.ledger
                .insert((state.target, state.range_no), (last.clone(), batch.lease));
        }
    }

    /// After a reconnect: whether the batch ending at `last` of `state`
    /// committed, and whether every batch this writer committed before it
    /// is still there (a crash can lose acknowledged asynchronous commits,
    /// each together with its checkpoint).
    pub async fn after_reconnect(
        &self,
        state: &RangeState,
        last: Option<&KeyBytes>,
    ) -> Result<AfterReconnect, Error> {
        let rows = self
            .client
            .query("SELECT target, range_no, last_key, owner, lease_gen FROM rekey.progress WHERE job_id = $1 AND range_no >= 0", &[&self.job_id])
            .await
            .ctx(|| "checking the checkpoints after a reconnect".into())?;
        let mut this = None;
        for r in &rows {
            let key = (
                usize::try_from(r.get::<_, i32>(0)).unwrap_or(usize::MAX),
                r.get::<_, i32>(1),
            );
            let durable: Option<KeyBytes> = r.get(2);
            let owner: Option<String> = r.get(3);
            let generation: i64 = r.get(4);
            if key == (state.target, state.range_no) {
                this = Some(durable.clone());
            }
            // ranges another process has taken over are theirs to finish, from what is durable
            if owner.is_some() && owner != self.owner {
                continue;
            }
            if let Some((committed, written_under)) = self.ledger.get(&key) {
                // claimed again since (by another lane, or handed back): its checkpoint moved on without us
                if written_under.is_some_and(|g| g != generation) {
                    continue;
                }
                if durable.as_ref() != Some(committed)
                    && !(key == (state.target, state.range_no)
                        && durable.as_ref() == last
                        && last.is_some())
                {
                    return Ok(AfterReconnect::Lost);
                }
            }
        }
        Ok(match (this, last) {
            (Some(Some(durable)), Some(last)) if &durable == last => AfterReconnect::Committed,
            _ => AfterReconnect::NotCommitted,
        })
    }
}
