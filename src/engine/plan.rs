//! Planning: how many values sit under each key, and how to split a table
//! into key ranges that lanes can rotate side by side.

use std::collections::BTreeMap;

use serde::Serialize;
use tokio_postgres::Client;

use crate::crypto::keyring::KeyId;
use crate::db::raw::{self, KeyBytes};
use crate::engine::sql;
use crate::error::DbContext;
use crate::job::{Job, Target};
use crate::state::{KeyRange, RangeState};
use crate::Error;

/// Rows per range below which a table is not split further.
const MIN_ROWS_PER_RANGE: f64 = 5_000.0;

/// Ranges per lane a job's tables are split into, so lanes that finish
/// early find work left.
const RANGES_PER_LANE: usize = 4;

/// Connections a lane holds: a reader and a writer (or a lookup).
const CONNECTIONS_PER_LANE: i64 = 2;

/// Lanes a run may take without crowding the server: at most `wanted`, and
/// at most what half of the connection slots still free (after those
/// reserved for superusers, and every session open now) can hold, beside the
/// run's monitor connection. At least one.
pub async fn lanes_for_server(client: &Client, wanted: usize) -> Result<usize, Error> {
    let free: i64 = client
        .query_one(
            "SELECT (current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int
                    - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int)::bigint",
            &[],
        )
        .await
        .ctx(|| "reading how many connections the server has free".into())?
        .get(0);
    let fit = usize::try_from((free / 2 - 1) / CONNECTIONS_PER_LANE)
        .unwrap_or(0)
        .max(1);
    if fit < wanted {
        tracing::info!("the server has {free} connection slots free: running {fit} lanes, not {wanted} (at most half the free slots; --workers to choose)");
    }
    Ok(fit.min(wanted))
}

/// Every target of `job` split into ranges for `lanes` lanes, none started.
pub async fn job_ranges(
    client: &Client,
    job: &Job,
    lanes: usize,
) -> Result<Vec<RangeState>, Error> {
    let mut ranges = Vec::new();
    for t in &job.targets {
        for (no, bounds) in split_ranges(client, t, lanes * RANGES_PER_LANE)
            .await?
            .into_iter()
            .enumerate()
        {
            ranges.push(RangeState {
                target: t.index,
                range_no: no as i32,
                bounds,
                last: None,
                done: false,
            });
        }
    }
    Ok(ranges)
}

/// Splits a target into at most `n` ranges of about equal row counts, from a
/// sample of its keys. Rows inserted later still fall in some range: the
/// first and last ranges are open-ended.
pub async fn split_ranges(
    client: &Client,
    target: &Target,
    n: usize,
) -> Result<Vec<KeyRange>, Error> {
    let whole = vec![KeyRange {
        lower: None,
        upper: None,
    }];
    let rows = estimated_rows(client, target).await?;
    let n = n.min((rows / MIN_ROWS_PER_RANGE) as usize).max(1);
    if n == 1 {
        return Ok(whole);
    }
    let percent = (100.0 * (n as f64 * 100.0) / rows).clamp(0.001, 100.0) as f32;
    let keys = target.key_list("");
    let sample = client
        .query(
            &format!(
                "SELECT {keys} FROM {} TABLESAMPLE SYSTEM ($1) ORDER BY {keys}",
                target.qualified()
            ),
            &[&percent],
        )
        .await
        .ctx(|| format!("sampling the keys of {}", target.table))?;
    if sample.len() < n {
        return Ok(whole);
    }
    let mut bounds: Vec<KeyBytes> = Vec::new();
    for i in 1..n {
        let row = &sample[i * sample.len() / n];
        let key = raw::key_of(row, target.key.len());
        if bounds.last() != Some(&key) {
            bounds.push(key);
        }
    }
    let mut ranges = Vec::with_capacity(bounds.len() + 1);
    let mut lower = None;
    for b in bounds {
        ranges.push(KeyRange {
            lower: lower.take(),
            upper: Some(b.clone()),
        });
        lower = Some(b);
    }
    ranges.push(KeyRange { lower, upper: None });
    Ok(ranges)
}

/// The planner's row estimate, or an exact count for a never-analyzed table.
pub async fn estimated_rows(client: &Client, target: &Target) -> Result<f64, Error> {
    let what = || format!("estimating the size of {}", target.table);
    let est: f32 = client
        .query_one(
            "SELECT c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
            &[&target.table.schema, &target.table.name],
        )
        .await
        .ctx(what)?
        .get(0);
    if est >= 0.0 {
        return Ok(f64::from(est));
    }
    let count: i64 = client
        .query_one(&format!("SELECT count(*) FROM {}", target.qualified()), &[])
        .await
        .ctx(what)?
        .get(0);
    Ok(count as f64)
}

/// The planner's estimate of a target's rows now: rows per page at the
/// last ANALYZE times the pages the table has now (so a table that grew
/// since is not underestimated by its growth); `None` before any ANALYZE.
pub async fn current_rows_estimate(client: &Client, target: &Target) -> Result<Option<f64>, Error> {
    let est: Option<f64> = client
        .query_one(
            "SELECT CASE WHEN c.relpages > 0 AND c.reltuples >= 0
                         THEN c.reltuples::float8 / c.relpages * (pg_relation_size(c.oid) / current_setting('block_size')::float8) END
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
            &[&target.table.schema, &target.table.name],
        )
        .await
        .ctx(|| format!("estimating the size of {}", target.table))?
        .get(0);
    Ok(est)
}

/// Values of one column, counted by the key they are under.
#[derive(Debug, Clone, Serialize)]
pub struct ColumnPlan {
    /// Index of the target in the job.
    #[serde(skip)]
    pub target: usize,
    /// `schema.table`.
    pub table: String,
    /// The column.
    pub column: String,
    /// Rows in the table.
    pub rows: u64,
    /// NULL values (nothing to rotate).
    pub nulls: u64,
    /// Non-NULL values per key label (`v1`, `v2`, ...); `None` where the
    /// format carries no key id and only decryption can tell.
    pub by_key: Option<BTreeMap<String, u64>>,
    /// Values already on the target key (where countable).
    pub on_target_key: Option<u64>,
    /// Values whose prefix names a key the keyring does not hold, or no key
    /// at all (where countable): they cannot be decrypted.
    #[serde(skip)]
    pub unknown_key: Option<u64>,
    /// Values a run will read (not NULL and not visibly on the target key).
    pub to_rewrite: u64,
    /// Of the values under a key the keyring does not hold, those whose
    /// prefix names it, by its id.
    #[serde(skip)]
    pub not_held: BTreeMap<KeyId, u64>,
}

/// Values `job` would rewrite now, every encrypted column together. Search
/// hashes are left out: no count tells which key made one (a run reads
/// them all; a full verify decides), and rotation steps ask about ciphertexts.
/// So is every column of a hash-only target: its ciphertexts are never rewritten.
pub async fn values_to_rewrite(client: &Client, job: &Job) -> Result<u64, Error> {
    Ok(count_by_key(client, job)
        .await?
        .iter()
        .filter(|c| {
            let t = &job.targets[c.target];
            !t.hash_only()
                && t.hash
                    .as_ref()
                    .is_none_or(|h| t.columns[h.column].name != c.column)
        })
        .map(|c| c.to_rewrite)
        .sum())
}

/// The columns of `plans` ([`count_by_key`]) whose values show their key
/// (no decrypt), whose `to_rewrite` are the values visibly off the target
/// key: a format without a key prefix (raw GCM, Fernet, a migration)
/// counts every value as to rewrite, so it is left out here, as search
/// hashes are.
pub fn visibly_off_target<'a>(
    job: &'a Job,
    plans: &'a [ColumnPlan],
) -> impl Iterator<Item = &'a ColumnPlan> {
    plans
        .iter()
        .filter(|c| c.by_key.is_some() && holds_ciphertexts(job, c))
}

/// Whether `c` is a column of ciphertexts, not a search hash (nor the
/// ciphertexts of a target that rewrites its hashes alone).
fn holds_ciphertexts(job: &Job, c: &ColumnPlan) -> bool {
    let t = &job.targets[c.target];
    !t.hash_only()
        && t.hash
            .as_ref()
            .is_none_or(|h| t.columns[h.column].name != c.column)
}

/// The encrypted columns whose values do not show their key (Fernet, raw
/// AES-GCM): only decrypting tells where they stand. Search hashes are left
/// out (no count tells which key made one either, but nothing decrypts them).
pub fn keys_hidden<'a>(
    job: &'a Job,
    plans: &'a [ColumnPlan],
) -> impl Iterator<Item = &'a ColumnPlan> {
    plans
        .iter()
        .filter(|c| c.by_key.is_none() && holds_ciphertexts(job, c))
}

/// Counts every column of every target by key, in one scan per column.
pub async fn count_by_key(client: &Client, job: &Job) -> Result<Vec<ColumnPlan>, Error> {
    let mut out = Vec::new();
    for target in &job.targets {
        for (i, col) in target.columns.iter().enumerate() {
            let what = || format!("counting values of {}", target.label(i));
            let target_prefix = if target.migrating {
                None
            } else {
                target.stale_prefix(i)
            };
            let filter = target
                .filter
                .as_ref()
                .map(|f| format!(" WHERE ({f})"))
                .unwrap_or_default();
            let Some(tp) = target_prefix else {
                let row = client
                    .query_one(
                        &format!(
                            // an empty value holds no ciphertext: counted as NULL is
                            "SELECT count(*), count(*) FILTER (WHERE octet_length({}) > 0) FROM {}{filter}",
                            crate::db::quote_ident(&col.name),
                            target.qualified()
                        ),
                        &[],
                    )
                    .await
                    .ctx(what)?;
                let (rows, non_null): (i64, i64) = (row.get(0), row.get(1));
                out.push(ColumnPlan {
                    target: target.index,
                    table: target.table.to_string(),
                    column: col.name.clone(),
                    rows: rows as u64,
                    nulls: (rows - non_null) as u64,
                    by_key: None,
                    on_target_key: None,
                    unknown_key: None,
                    to_rewrite: non_null as u64,
                    not_held: BTreeMap::new(),
                });
                continue;
            };
            let expr = sql::prefix_expr(target, i, "", tp.len());
            let rows = client
                .query(
                    &format!(
                        "SELECT {expr}, count(*) FROM {}{filter} GROUP BY 1",
                        target.qualified()
                    ),
                    &[],
                )
                .await
                .ctx(what)?;
            let mut plan = ColumnPlan {
                target: target.index,
                table: target.table.to_string(),
                column: col.name.clone(),
                rows: 0,
                nulls: 0,
                by_key: Some(BTreeMap::new()),
                on_target_key: Some(0),
                unknown_key: Some(0),
                to_rewrite: 0,
                not_held: BTreeMap::new(),
            };
            for row in rows {
                let prefix: Option<Vec<u8>> = row.get(0);
                let n = row.get::<_, i64>(1) as u64;
                plan.rows += n;
                let Some(prefix) = prefix else {
                    plan.nulls += n;
                    continue;
                };
                let codec = &target.write.codec;
                let hint = codec.key_hint(&prefix);
                let known = hint.is_some_and(|id| target.write.keyring.get(id).is_some());
                // an empty prefix: a text value that is not base64 (a run
                // quarantines it as badly encoded), not a key
                let mut label = if prefix.is_empty() {
                    "not base64".to_string()
                } else {
                    codec.describe_prefix(&prefix)
                };
                if !known && !prefix.is_empty() {
                    label.push_str(" (no such key)");
                    plan.unknown_key = plan.unknown_key.map(|u| u + n);
                    if let Some(id) = hint {
                        *plan.not_held.entry(id).or_default() += n;
                    }
                }
                *plan
                    .by_key
                    .get_or_insert_with(BTreeMap::new)
                    .entry(label)
                    .or_default() += n;
                if prefix == tp {
                    plan.on_target_key = plan.on_target_key.map(|t| t + n);
                } else {
                    plan.to_rewrite += n;
                }
            }
            out.push(plan);
        }
    }
    Ok(out)
}
