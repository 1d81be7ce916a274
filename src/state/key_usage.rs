//! How many values each key has encrypted with random nonces, so no key
//! passes the 2^32 limit.
//!
//! A batch's values are counted before the batch writes, in a short
//! transaction of their own, committed at once: a value is spent when it is
//! sealed, whether its batch then lands, is refused, is retried in pieces
//! or is given up, and the count's locks are held for the count alone,
//! never while the batch waits for the application's rows.
//!
//! The count is sharded: each writer session adds to one of 64 rows
//! (`shard` = its backend pid modulo 64) and a key's count is the sum of
//! its rows, so the counts of different lanes and processes seldom wait on
//! one row. Exactness comes from an advisory lock per key: far from the
//! budget a count holds it shared, and a count whose key is within
//! [`NEAR`] of the budget takes it exclusively, so it waits for every count
//! in flight to commit and sees what they added (two-key advisory locks,
//! apart from the session locks on jobs). A count under the shared lock
//! commits only while the sum it reads after the lock stays [`NEAR`]` / 2`
//! below the budget (else it counts again, alone), and only a count of at
//! most `NEAR / 2 / max_connections` values goes under the shared lock (a
//! larger one takes the exclusive lock): each session counts one batch at a
//! time, so the counts in flight beside it cannot make up the rest.

use tokio_postgres::{Client, Statement};

use crate::error::DbContext;
use crate::Error;

/// Most values one key may encrypt with random 96-bit nonces (NIST SP 800-38D, 8.3).
pub const NONCE_BUDGET: i64 = 1 << 32;

/// How close to the budget a key's count must be for its batches to count
/// one at a time (2^28 values, 1/16 of the budget).
pub const NEAR: i64 = 1 << 28;

/// How long a count near the budget waits for the counts in flight beside
/// it where the session has no statement timeout (with one, that bounds the
/// wait).
const NEAR_WAIT_UNBOUNDED: &str = "60s";

/// Server error codes of a wait cut short by a limit: a statement or lock timeout.
const TIMED_OUT: [&str; 2] = ["57014", "55P03"];

/// What counting a batch's values came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Recorded: the batch may write.
    Counted,
    /// The batch would take the key past the budget: nothing recorded, and
    /// it must not write.
    Refused {
        /// What the key had encrypted before this batch.
        used: i64,
    },
}

/// The count's statements, prepared once per writing session.
pub struct CountStatements {
    /// Decides from a recent view of the key's sum whether the count is
    /// near the budget (or `$5`: counts as near), and far from it takes
    /// the key's lock shared.
    decide: Statement,
    /// Adds to the session's row and returns the key's total, from the
    /// statement's own snapshot (taken after the lock).
    bump: Statement,
}

impl CountStatements {
    /// Prepares the statements on `client`.
    pub async fn prepare(client: &Client) -> Result<CountStatements, Error> {
        let what = || "preparing the nonce count".to_string();
        let decide = client
            .prepare(
                "SELECT near, CASE WHEN NOT near THEN pg_advisory_xact_lock_shared(hashtext('rekey.key_usage'), hashtext($1))::text END
                   FROM (SELECT $5::bool
                                OR coalesce(sum(encryptions), 0)::bigint + $2::bigint > $3::bigint
                                OR $2::bigint > $4::bigint / current_setting('max_connections')::bigint AS near
                           FROM rekey.key_usage WHERE fingerprint = $1) s",
            )
            .await
            .ctx(what)?;
        let bump = client
            .prepare(
                "WITH bumped AS (
                    INSERT INTO rekey.key_usage AS u (fingerprint, shard, key_label, encryptions)
                    VALUES ($1, pg_backend_pid() % 64, $2, $3)
                    ON CONFLICT (fingerprint, shard) DO UPDATE SET encryptions = u.encryptions + EXCLUDED.encryptions, updated_at = now()
                    RETURNING shard, encryptions)
                 SELECT (SELECT encryptions FROM bumped)
                        + coalesce((SELECT sum(encryptions) FROM rekey.key_usage WHERE fingerprint = $1 AND shard <> (SELECT shard FROM bumped)), 0)::bigint",
            )
            .await
            .ctx(what)?;
        Ok(CountStatements { decide, bump })
    }
}

/// Adds `n` random-nonce encryptions under the key with `fingerprint` (its
/// label `label`), in a transaction of its own, before the batch that
/// sealed them writes; `statements` are the session's. `what` says what
/// the count is part of, for its errors. A count's wait for the key's lock
/// cut short by a limit is [`Error::CountWait`], which the batch waits out
/// and tries again whole.
pub async fn count_encryptions(
    client: &mut Client,
    statements: &CountStatements,
    fingerprint: &str,
    label: &str,
    n: i64,
    what: impl Fn() -> String,
) -> Result<Count, Error> {
    let fail = |e| cut_short(e, &what, label);
    let mut alone = false;
    loop {
        let tx = client.transaction().await.map_err(fail)?;
        let near: bool = tx
            .query_one(
                &statements.decide,
                &[
                    &fingerprint,
                    &n,
                    &(NONCE_BUDGET - NEAR),
                    &(NEAR / 2),
                    &alone,
                ],
            )
            .await
            .map_err(fail)?
            .get(0);
        if near {
            // the exclusive lock waits for every count in flight to commit:
            // not under the lock_timeout meant for rows the application
            // holds, but the statement's own limit (a count in flight is a
            // transaction of a few statements; one whose process froze is
            // ended by its session's idle_in_transaction_session_timeout)
            tx.execute(
                "SELECT set_config('lock_timeout', CASE current_setting('statement_timeout') WHEN '0' THEN $1 ELSE '0' END, true)",
                &[&NEAR_WAIT_UNBOUNDED],
            )
            .await
            .map_err(fail)?;
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext('rekey.key_usage'), hashtext($1))",
                &[&fingerprint],
            )
            .await
            .map_err(fail)?;
        }
        // a new statement: its snapshot holds every count that committed before the lock was granted
        let total: i64 = tx
            .query_one(&statements.bump, &[&fingerprint, &label, &n])
            .await
            .map_err(fail)?
            .get(0);
        if near && total > NONCE_BUDGET {
            tx.rollback().await.map_err(fail)?;
            return Ok(Count::Refused { used: total - n });
        }
        // under the shared lock, counts in flight beside this one are not in
        // the total: they fill at most half of NEAR; counts granted between
        // the decision's view and the lock may have brought the key near
        if !near && total + NEAR / 2 > NONCE_BUDGET {
            tx.rollback().await.map_err(fail)?;
            alone = true;
            continue;
        }
        tx.commit().await.map_err(fail)?;
        return Ok(Count::Counted);
    }
}

/// A count's error: [`Error::CountWait`] where a limit cut its wait for the
/// key's lock short, else [`Error::Db`].
fn cut_short(source: tokio_postgres::Error, what: &impl Fn() -> String, label: &str) -> Error {
    if source.code().is_some_and(|c| TIMED_OUT.contains(&c.code())) {
        Error::CountWait {
            context: format!(
                "{}: waiting for the key's lock while other batches count (key {label})",
                what()
            ),
            source,
        }
    } else {
        Error::Db {
            context: what(),
            source,
            statement: crate::error::Statement::Other,
        }
    }
}

/// Random-nonce encryptions rekey has made under the key with `fingerprint`.
pub async fn encryptions_so_far(client: &Client, fingerprint: &str) -> Result<i64, Error> {
    Ok(client
        .query_one(
            "SELECT coalesce(sum(encryptions), 0)::bigint FROM rekey.key_usage WHERE fingerprint = $1",
            &[&fingerprint],
        )
        .await
        .ctx(|| "reading how many values the target key has encrypted".into())?
        .get(0))
}
