//! How many values each key has encrypted with random nonces, counted inside
//! each batch's transaction, so no key passes the 2^32 limit.

use tokio_postgres::{Client, GenericClient};

use crate::error::DbContext;
use crate::Error;

/// Most values one key may encrypt with random 96-bit nonces (NIST SP 800-38D, 8.3).
pub const NONCE_BUDGET: i64 = 1 << 32;

/// Adds `n` random-nonce encryptions under the key with `fingerprint`,
/// inside a batch's transaction; returns the key's new total.
pub async fn count_encryptions(
    tx: &impl GenericClient,
    fingerprint: &str,
    label: &str,
    n: i64,
) -> Result<i64, tokio_postgres::Error> {
    Ok(tx
        .query_one(
            "INSERT INTO rekey.key_usage AS u (fingerprint, key_label, encryptions) VALUES ($1, $2, $3)
             ON CONFLICT (fingerprint) DO UPDATE SET encryptions = u.encryptions + EXCLUDED.encryptions, updated_at = now()
             RETURNING encryptions",
            &[&fingerprint, &label, &n],
        )
        .await?
        .get(0))
}

/// Random-nonce encryptions rekey has made under the key with `fingerprint`.
pub async fn encryptions_so_far(client: &Client, fingerprint: &str) -> Result<i64, Error> {
    Ok(client
        .query_opt(
            "SELECT encryptions FROM rekey.key_usage WHERE fingerprint = $1",
            &[&fingerprint],
        )
        .await
        .ctx(|| "reading how many values the target key has encrypted".into())?
        .map_or(0, |r| r.get(0)))
}
