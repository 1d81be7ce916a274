//! Who holds a target's table locked against writes: asked when the
//! preflight's probe of an UPDATE ([`super::visibility`]) waited longer than
//! the session's `lock_timeout`, so that the refusal names the sessions (a
//! plain `CREATE INDEX`, a `LOCK ... IN SHARE MODE`, an `ALTER TABLE`) and
//! what they run, where PostgreSQL's own words name neither.

use tokio_postgres::Client;

use crate::error::DbContext;
use crate::Error;

use super::Target;

/// The preflight's refusal of a target whose table (or a partition or
/// child of it) another session held locked against rekey's UPDATE for
/// longer than `lock_timeout`: the sessions holding or awaiting a lock that
/// conflicts with ROW EXCLUSIVE, each with its mode, how long its
/// transaction has run and its statement, and the ways on. `timed_out` is
/// the probe's error, kept as the cause.
pub async fn refusal(
    client: &Client,
    t: &Target,
    waited: std::time::Duration,
    timed_out: tokio_postgres::Error,
) -> Error {
    let holders = match holders(client, t).await {
        Ok(h) if h.is_empty() => "the session holding it has since let it go".to_string(),
        Ok(h) => h.join("; "),
        Err(e) => format!(
            "the sessions holding it could not be listed ({})",
            e.chain()
        ),
    };
    let wait = humantime::format_duration(waited);
    Error::Db {
        context: format!(
            "{} is locked against writes by another session: {holders}. rekey's UPDATE waited {wait} (--lock-timeout) \
             for it, as each batch would. Nothing was written. Run again once that session has ended (a plain CREATE \
             INDEX holds its lock until the index is built; CREATE INDEX CONCURRENTLY lets writes through), or give \
             each wait longer with --lock-timeout",
            t.table
        ),
        source: timed_out,
    }
}

/// One line per other session that holds, or waits ahead of rekey for, a
/// lock on the target's tree that conflicts with ROW EXCLUSIVE.
async fn holders(client: &Client, t: &Target) -> Result<Vec<String>, Error> {
    // a statement's text is shown to the roles that may see it (its own, or pg_read_all_stats)
    let rows = client
        .query(
            "WITH RECURSIVE tree(relid) AS (
                 SELECT $1::text::regclass::oid
                 UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.relid)
             SELECT l.pid, l.mode, l.granted, l.relation::regclass::text,
                    coalesce(extract(epoch FROM clock_timestamp() - a.xact_start)::int8, -1),
                    coalesce(regexp_replace(left(a.query, 120), '\\s+', ' ', 'g'), ''),
                    coalesce(a.state, '') = 'active'
               FROM pg_locks l JOIN tree ON l.relation = tree.relid
               LEFT JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'relation' AND l.pid <> pg_backend_pid()
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND l.mode IN ('ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')
              ORDER BY l.granted DESC, l.pid, 4",
            &[&t.qualified()],
        )
        .await
        .ctx(|| format!("listing the sessions that hold {} locked", t.table))?;
    Ok(rows
        .iter()
        .map(|r| {
            let (pid, mode, table): (i32, String, String) = (r.get(0), r.get(1), r.get(3));
            let holds = if r.get::<_, bool>(2) {
                "holds"
            } else {
                "waits for"
            };
            let since = match r.get::<_, i64>(4) {
                s if s < 0 => String::new(),
                s => format!(", in a transaction of {s} s"),
            };
            let running = match (r.get::<_, String>(5), r.get::<_, bool>(6)) {
                (q, _) if q.is_empty() => String::new(),
                (q, true) => format!(", running: {q}"),
                // idle in its transaction: the statement it ran last, which may have taken the lock
                (q, false) => format!(", idle, its last statement: {q}"),
            };
            format!("process {pid} {holds} {mode} on {table}{since}{running}")
        })
        .collect())
}
