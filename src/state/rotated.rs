//! What a job rotated in its earlier runs, for a retire: the tables and
//! columns its file no longer lists, whose values the retire's full verify
//! would not read, under the store whose key is retiring.

use std::fmt;

use tokio_postgres::Client;

use crate::error::DbContext;
use crate::Error;

/// A table, or one column of it, that the job rotated in an earlier run and
/// its file no longer lists, or that another job rotated under the same
/// store and this job's file does not list.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LeftOut {
    /// `schema.table`, as `rekey.progress` records it.
    pub table: String,
    /// The column, where the file still lists the table (under the column's
    /// name today: renamed since, it is found by number).
    pub column: Option<String>,
    /// The other job that rotated it (`None`: this job did).
    pub other_job: Option<String>,
}

impl fmt::Display for LeftOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.column {
            Some(c) => write!(f, "column {c} of {}", self.table)?,
            None => f.write_str(&self.table)?,
        }
        match &self.other_job {
            Some(job) => write!(f, " (job {job:?})"),
            None => Ok(()),
        }
    }
}

/// The store whose key is retiring (the job's `[keys]`: a retire refuses
/// targets with keys of their own): what a run's records are matched
/// against to tell a table rotated under another store's keys (a target
/// with `keys` of its own, since moved to a job of its own).
pub struct RetiringStore<'a> {
    /// Its names (`KeysSpec::store_label`).
    pub labels: &'a [String],
    /// The fingerprints of every key it holds, the retiring key among them.
    pub fingerprints: &'a [String],
    /// The retiring job's file (absolute), telling it from another job of
    /// the same name (two job files without a name are both "rekey").
    pub job_file: Option<&'a str>,
    /// Where the retiring key was never current (an abort's staged key), the
    /// fingerprint another job must have written under for its tables to
    /// count; `None`: any run under the store counts.
    pub written_under: Option<&'a str>,
    /// `"<store label> <fingerprint>"` for each other store another job's
    /// runs named that still holds a key of this store's, by fingerprint
    /// (a keyring file imported from the same key): such a run wrote under
    /// a copy this retire does not destroy, and its tables do not count.
    pub held_elsewhere: &'a [String],
}

/// The stores other than `ours` (labels) that runs recorded reading or
/// writing under (`rekey.job_targets.key_stores`).
pub async fn other_stores(client: &Client, ours: &[String]) -> Result<Vec<String>, Error> {
    if !super::schema_exists(client).await? {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT DISTINCT s.label FROM rekey.job_targets t CROSS JOIN LATERAL unnest(t.key_stores) AS s(label)
              WHERE NOT s.label = ANY($1::text[])",
            &[&ours],
        )
        .await
        .ctx(|| "reading the key stores runs recorded".to_string())?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A condition on one run's target (`keys`: its element of
/// `rekey.jobs.keys`; `stores`: its `rekey.job_targets.key_stores`) that
/// holds unless the run shows positively that the target was under another
/// store: it recorded the stores it read and wrote under, none of them is
/// the retiring store by name, and no key it recorded is one the retiring
/// store holds (a keyring file moved to another path is still known by its
/// keys). `$labels` and `$fingerprints` are the statement's parameters of
/// those numbers, [`RetiringStore`]'s fields.
fn under_retiring_store(keys: &str, stores: &str, labels: u8, fingerprints: u8) -> String {
    format!(
        "NOT ({stores} IS NOT NULL
              AND NOT {stores} && ${labels}::text[]
              AND NOT EXISTS (SELECT 1 FROM jsonb_path_query({keys}, '$.*.keys.*') AS f(v)
                               WHERE f.v #>> '{{}}' = ANY(${fingerprints}::text[])))"
    )
}

/// What job `name` rotated in its earlier runs (abandoned runs too) under
/// `store`, and what any other job ran over under it (the store named by
/// the run, or the key it wrote under one of the store's), that still exists and that the
/// job file does not list: neither by `tables` (`schema.table`) nor by
/// `columns` (table as SQL, column), itself or through a table that holds
/// it as a partition or inheritance child. Another job's tables hold what
/// the applications wrote under the store's current key while it was
/// current, whatever that job rewrote. A column dropped from its table
/// holds no values and is not left out. Nothing before rekey's schema
/// exists.
pub async fn left_out(
    client: &Client,
    name: &str,
    tables: &[String],
    columns: &[(String, String)],
    store: &RetiringStore<'_>,
) -> Result<Vec<LeftOut>, Error> {
    if !super::schema_exists(client).await? {
        return Ok(Vec::new());
    }
    let mut all = tables_left_out(client, name, tables).await?;
    all.extend(columns_left_out(client, name, columns, store).await?);
    all.sort();
    all.dedup();
    Ok(all)
}

/// The tables of the runs that did not record their columns (before
/// `rekey.job_targets`), which are known by their tables alone, and did
/// not record their stores either: every one counts.
async fn tables_left_out(
    client: &Client,
    name: &str,
    listed: &[String],
) -> Result<Vec<LeftOut>, Error> {
    let rows = client
        .query(
            "WITH RECURSIVE rotated AS (
                     SELECT DISTINCT p.table_name
                       FROM rekey.progress p JOIN rekey.jobs j ON j.job_id = p.job_id
                      WHERE j.name = $1 AND p.rows_rewritten > 0
                        -- runs that recorded their columns are checked column by column
                        AND NOT EXISTS (SELECT 1 FROM rekey.job_targets t WHERE t.job_id = p.job_id)),
                 rel AS (
                     SELECT c.oid, n.nspname || '.' || c.relname AS name
                       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace),
                 up(table_name, ancestor) AS (
                     SELECT r.table_name, rel.oid FROM rotated r JOIN rel ON rel.name = r.table_name
                     UNION
                     SELECT up.table_name, i.inhparent FROM up JOIN pg_inherits i ON i.inhrelid = up.ancestor)
                 SELECT r.table_name FROM rotated r
                  WHERE EXISTS (SELECT 1 FROM rel WHERE rel.name = r.table_name)
                    AND NOT EXISTS (SELECT 1 FROM up JOIN rel ON rel.oid = up.ancestor
                                     WHERE up.table_name = r.table_name AND rel.name = ANY($2))",
            &[&name, &listed],
        )
        .await
        .ctx(|| format!("reading the tables job {name:?} rotated"))?;
    Ok(rows
        .iter()
        .map(|r| LeftOut {
            table: r.get(0),
            column: None,
            other_job: None,
        })
        .collect())
}

/// The columns of the runs that recorded them, found by the table's oid
/// and the column's number (renamed since) or by their names (dropped and
/// restored since); a table no listed pair covers at all is named whole.
async fn columns_left_out(
    client: &Client,
    name: &str,
    listed: &[(String, String)],
    store: &RetiringStore<'_>,
) -> Result<Vec<LeftOut>, Error> {
    let (tables, columns): (Vec<&str>, Vec<&str>) =
        listed.iter().map(|(t, c)| (t.as_str(), c.as_str())).unzip();
    // $4 and $5: the retiring store's labels and fingerprints
    let under = under_retiring_store("j.keys -> p.target", "t.key_stores", 4, 5);
    // another job's run counts where it names the store, or wrote under one
    // of its keys; for a key never current, only where it wrote under that key
    let wrote = "(j.keys -> p.target -> 'write' -> 'keys') ->> (j.keys -> p.target -> 'write' ->> 'target')";
    // a run that named other stores only, one of which still holds the key
    // it wrote under, wrote under a copy the retire does not destroy
    let copy_kept = format!(
        "(NOT coalesce(t.key_stores && $4::text[], false)
          AND EXISTS (SELECT 1 FROM unnest(t.key_stores) AS s(label) WHERE s.label || ' ' || ({wrote}) = ANY($8::text[])))"
    );
    let named = format!(
        "NOT {copy_kept} AND CASE WHEN $7::text IS NOT NULL THEN {wrote} = $7
              ELSE coalesce(t.key_stores && $4::text[], false) OR {wrote} = ANY($5::text[]) END"
    );
    // this job: its name, and its file where both runs recorded one
    let own = "(j.name = $1 AND (j.job_file IS NULL OR $6::text IS NULL OR j.job_file = $6))";
    let rows = client
        .query(
            &format!(
                "WITH RECURSIVE rotated AS (
                     SELECT DISTINCT r.table_oid, r.table_name, u.column_name, u.attnum,
                            CASE WHEN {own} THEN NULL
                                 WHEN j.name = $1 THEN j.name || ' at ' || coalesce(j.job_file, 'an unrecorded file')
                                 ELSE j.name END AS other_job
                       FROM rekey.progress p JOIN rekey.jobs j ON j.job_id = p.job_id
                       JOIN rekey.job_targets t ON t.job_id = p.job_id AND t.target = p.target
                       -- the target's table, and its partitions and children as the job's runs found them
                      CROSS JOIN LATERAL (
                            SELECT t.table_oid, t.table_name, t.columns, t.attnums
                            UNION ALL
                            SELECT s.table_oid, s.table_name, s.columns, s.attnums FROM rekey.job_target_parts s
                             WHERE s.job_id = t.job_id AND s.target = t.target) AS r
                      CROSS JOIN LATERAL unnest(r.columns, r.attnums) AS u(column_name, attnum)
                      WHERE ({own} AND p.rows_rewritten > 0 AND {under}) OR (NOT {own} AND ({named}))),
                 rel AS (
                     SELECT c.oid, n.nspname || '.' || c.relname AS name
                       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace),
                 live(oid, column_name, other_job) AS (
                     SELECT a.attrelid, a.attname::text, r.other_job FROM rotated r
                       JOIN pg_attribute a ON a.attrelid = r.table_oid AND a.attnum = r.attnum AND NOT a.attisdropped
                     UNION
                     SELECT a.attrelid, a.attname::text, r.other_job FROM rotated r JOIN rel ON rel.name = r.table_name
                       JOIN pg_attribute a ON a.attrelid = rel.oid AND a.attname = r.column_name AND NOT a.attisdropped),
                 up(oid, ancestor) AS (
                     SELECT DISTINCT oid, oid FROM live
                     UNION
                     SELECT up.oid, i.inhparent FROM up JOIN pg_inherits i ON i.inhrelid = up.ancestor),
                 listed AS (
                     SELECT to_regclass(l.table_name) AS oid, l.column_name
                       FROM unnest($2::text[], $3::text[]) AS l(table_name, column_name))
                 SELECT rel.name,
                        CASE WHEN EXISTS (SELECT 1 FROM up JOIN listed l ON l.oid = up.ancestor WHERE up.oid = v.oid)
                             THEN v.column_name END,
                        -- this job's own record first: its message says what its file left out
                        CASE WHEN bool_or(v.other_job IS NULL) THEN NULL ELSE min(v.other_job) END
                   FROM live v JOIN rel ON rel.oid = v.oid
                  WHERE NOT EXISTS (SELECT 1 FROM up JOIN listed l ON l.oid = up.ancestor AND l.column_name = v.column_name
                                     WHERE up.oid = v.oid)
                  GROUP BY 1, 2"
            ),
            &[
                &name,
                &tables,
                &columns,
                &store.labels,
                &store.fingerprints,
                &store.job_file,
                &store.written_under,
                &store.held_elsewhere,
            ],
        )
        .await
        .ctx(|| format!("reading the columns job {name:?} rotated"))?;
    Ok(rows
        .iter()
        .map(|r| LeftOut {
            table: r.get(0),
            column: r.get(1),
            other_job: r.get(2),
        })
        .collect())
}
