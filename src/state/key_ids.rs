//! Key ids the database records for a key store: the keys earlier
//! rotations staged or rotated away from (`rekey.rotations`), and the keys
//! every job's runs read and wrote under (`rekey.jobs.keys`). Values may be
//! under any of them even where the store no longer holds the key (an older
//! copy of a keyring file put back, a key removed by hand), so a new key
//! takes an id above them all: two keys of one id would leave the values
//! under the first unreadable by their id.

use tokio_postgres::Client;

use crate::error::DbContext;
use crate::Error;

/// A key store as the database's records name it.
#[derive(Debug, Clone, Copy)]
pub struct RecordedStore<'a> {
    /// Its name in `rekey.rotations` (`Store::secret_id`).
    pub secret_id: &'a str,
    /// Its name in `rekey.job_targets.key_stores` (`KeysSpec::store_label`).
    pub label: &'a str,
    /// The fingerprints of the keys it holds (a store moved elsewhere is
    /// still known by its keys).
    pub fingerprints: &'a [String],
}

/// The highest key id the database records for a store, and what recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedId {
    /// The key id.
    pub id: i64,
    /// What recorded it, for the operator: `job "patients" (job id 3)
    /// recorded key 2 (fingerprint 1a2b3c4d)`.
    pub by: String,
}

/// The highest key id recorded for `store`: by a rotation of the store
/// (named by its secret id), or by a run of any job, in any state, that
/// read or wrote under it. A run's side (a target's read, write or hash
/// keys) counts where it holds a key the store holds, or, where no side of
/// its target does (the store lost every key the run knew), where the
/// target recorded the store's name among its key stores. A run from
/// before the names were recorded is known by its keys alone. `None`
/// before rekey's schema exists, or where nothing is recorded.
pub async fn highest_recorded(
    client: &Client,
    store: &RecordedStore<'_>,
) -> Result<Option<RecordedId>, Error> {
    if !super::schema_exists(client).await? {
        return Ok(None);
    }
    let rotation = client
        .query_opt(
            "SELECT rotation_id, greatest(new_key, coalesce(old_key, 0)) AS k FROM rekey.rotations
              WHERE secret_id = $1 ORDER BY k DESC, rotation_id DESC LIMIT 1",
            &[&store.secret_id],
        )
        .await
        .ctx(|| "reading the key ids of earlier rotations".into())?
        .map(|r| RecordedId {
            id: r.get(1),
            by: format!(
                "rotation {} recorded key {}",
                r.get::<_, i64>(0),
                r.get::<_, i64>(1)
            ),
        });
    let job = client
        .query_opt(
            "WITH sides AS (
                 SELECT j.job_id, j.name, t.n, s.ring,
                        coalesce($1 = ANY (jt.key_stores), false) AS named,
                        EXISTS (SELECT 1 FROM jsonb_each_text(s.ring -> 'keys') AS k(id, fingerprint)
                                 WHERE k.fingerprint = ANY ($2::text[])) AS holds
                   FROM rekey.jobs j
                  CROSS JOIN LATERAL jsonb_array_elements(CASE jsonb_typeof(j.keys) WHEN 'array'
                                     THEN j.keys ELSE '[]'::jsonb END) WITH ORDINALITY AS t(target, n)
                  CROSS JOIN LATERAL jsonb_each(CASE jsonb_typeof(t.target) WHEN 'object'
                                     THEN t.target ELSE '{}'::jsonb END) AS s(side, ring)
                   LEFT JOIN rekey.job_targets jt ON jt.job_id = j.job_id AND jt.target = t.n - 1
                  WHERE jsonb_typeof(s.ring -> 'keys') = 'object')
             SELECT k.id::bigint, s.name, s.job_id, k.fingerprint
               FROM sides s CROSS JOIN LATERAL jsonb_each_text(s.ring -> 'keys') AS k(id, fingerprint)
              WHERE k.id ~ '^[0-9]{1,9}$'
                AND (s.holds OR (s.named AND NOT EXISTS (
                        SELECT 1 FROM sides o WHERE o.job_id = s.job_id AND o.n = s.n AND o.holds)))
              ORDER BY 1 DESC, s.job_id DESC LIMIT 1",
            &[&store.label, &store.fingerprints],
        )
        .await
        .ctx(|| "reading the key ids the jobs' runs recorded".into())?
        .map(|r| RecordedId {
            id: r.get(0),
            by: format!(
                "job {:?} (job id {}) recorded key {} (fingerprint {})",
                r.get::<_, String>(1),
                r.get::<_, i64>(2),
                r.get::<_, i64>(0),
                r.get::<_, String>(3)
            ),
        });
    // the job's record where both name the same id: it says which key
    Ok(match (rotation, job) {
        (Some(r), Some(j)) if r.id > j.id => Some(r),
        (r, None) => r,
        (_, j) => j,
    })
}
