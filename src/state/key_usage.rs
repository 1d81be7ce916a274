//! How many values each key has encrypted with random nonces, counted inside
//! each batch's transaction, so no key passes the 2^32 limit.
//!
//! The count is sharded: each writer session adds to a row of its own
//! (`shard` = its backend pid modulo 64) and a key's count is the sum of
//! its rows, so the batches of different lanes and processes do not wait on
//! one row's lock until they commit. Exactness comes from an advisory lock
//! per key: far from the budget every batch holds it shared, and a batch
//! whose key is within [`NEAR`] of the budget takes it exclusively, so it
//! waits for every batch in flight to commit and counts what they added
//! (two-key advisory locks, apart from the session locks on jobs).
//! A batch that counted under the shared lock commits only while the sum
//! stays [`NEAR`]` / 2` below the budget, and only a batch of at most
//! `NEAR / 2 / max_connections` values counts under the shared lock (a
//! larger one takes the exclusive lock): each session holds at most one
//! batch, so the batches in flight beside it cannot make up the rest.

use tokio_postgres::{Client, GenericClient};

use crate::error::DbContext;
use crate::Error;

/// Server error codes of a wait cut short by a limit: a statement timeout
/// (the near wait is bounded by the session's `statement_timeout`) or a
/// lock timeout.
const TIMED_OUT: [&str; 2] = ["57014", "55P03"];

/// Most values one key may encrypt with random 96-bit nonces (NIST SP 800-38D, 8.3).
pub const NONCE_BUDGET: i64 = 1 << 32;

/// How close to the budget a key's count must be for its batches to count
/// one at a time (2^28 values, 1/16 of the budget).
pub const NEAR: i64 = 1 << 28;

/// A key's count as a batch's transaction saw it after adding its own.
#[derive(Debug, Clone, Copy)]
pub struct Counted {
    /// The key's count with this batch, as committed so far.
    pub total: i64,
    /// The most it can be once this batch commits, counting what batches in
    /// flight beside it may add: the batch must not commit when this passes
    /// [`NONCE_BUDGET`].
    pub most: i64,
}

/// Adds `n` random-nonce encryptions under the key with `fingerprint`,
/// inside a batch's transaction, before the batch writes anything: a
/// batch that waits here near the budget holds none of the table's rows.
/// `what` says what the count is part of, for its errors. Near the budget
/// the wait for the batches in flight beside it is bounded by the
/// session's `statement_timeout`, not its `lock_timeout` (meant for rows
/// the application holds); a wait cut short is [`Error::CountWait`], which
/// the batch waits out and tries again whole.
pub async fn count_encryptions(
    tx: &impl GenericClient,
    fingerprint: &str,
    label: &str,
    n: i64,
    what: impl Fn() -> String,
) -> Result<Counted, Error> {
    // shared far from the budget, exclusive near it; the sum that decides is
    // read in the same statement, before the lock (any recent view will do)
    let row = tx
        .query_one(
            "SELECT near, current_setting('lock_timeout'),
                    CASE WHEN NOT near THEN pg_advisory_xact_lock_shared(hashtext('rekey.key_usage'), hashtext($1))::text END
               FROM (SELECT coalesce(sum(encryptions), 0)::bigint + $2::bigint > $3::bigint
                            OR $2::bigint > $4::bigint / current_setting('max_connections')::bigint AS near
                       FROM rekey.key_usage WHERE fingerprint = $1) s",
            &[&fingerprint, &n, &(NONCE_BUDGET - NEAR), &(NEAR / 2)],
        )
        .await
        .ctx(&what)?;
    let near: bool = row.get(0);
    if near {
        let was: String = row.get(1);
        tx.execute("SELECT set_config('lock_timeout', '0', true)", &[])
            .await
            .ctx(&what)?;
        // the exclusive lock waits for every batch in flight to commit
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('rekey.key_usage'), hashtext($1))",
            &[&fingerprint],
        )
        .await
        .map_err(|source| {
            if source.code().is_some_and(|c| TIMED_OUT.contains(&c.code())) {
                Error::CountWait {
                    context: format!(
                        "{}: waiting for the batches in flight beside it to commit (key {label} is within 2^28 values of its \
                         nonce budget, so its batches count one at a time)",
                        what()
                    ),
                    source,
                }
            } else {
                Error::Db {
                    context: what(),
                    source,
                }
            }
        })?;
        tx.execute("SELECT set_config('lock_timeout', $1, true)", &[&was])
            .await
            .ctx(&what)?;
    }
    // a new statement: its snapshot holds every batch that committed before the lock was granted
    let total: i64 = tx
        .query_one(
            "WITH bumped AS (
                INSERT INTO rekey.key_usage AS u (fingerprint, shard, key_label, encryptions)
                VALUES ($1, pg_backend_pid() % 64, $2, $3)
                ON CONFLICT (fingerprint, shard) DO UPDATE SET encryptions = u.encryptions + EXCLUDED.encryptions, updated_at = now()
                RETURNING shard, encryptions)
             SELECT (SELECT encryptions FROM bumped)
                    + coalesce((SELECT sum(encryptions) FROM rekey.key_usage WHERE fingerprint = $1 AND shard <> (SELECT shard FROM bumped)), 0)::bigint",
            &[&fingerprint, &label, &n],
        )
        .await
        .ctx(&what)?
        .get(0);
    // under the shared lock, batches in flight beside this one are not in the
    // sum: count them as the half of NEAR they cannot fill
    Ok(Counted {
        total,
        most: if near { total } else { total + NEAR / 2 },
    })
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
