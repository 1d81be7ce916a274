//! Transactions still open that have written to a table: what they wrote
//! is invisible to every other session until they commit, so a scan that
//! must see the whole table (the full verify a key's retire rests on) first
//! waits for them, as `CREATE INDEX CONCURRENTLY` waits for the
//! transactions before it. Found by their locks, which no one waits on,
//! and which every role may read.

use tokio_postgres::Client;

/// Another transaction holding a lock that writes, or changes what, a
/// table holds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct OpenWriter {
    /// Its virtual transaction id (`pg_locks.virtualtransaction`), which
    /// every role may read and which names this transaction, not the
    /// session's next.
    pub transaction: String,
    /// The server process of its session; none for a prepared transaction.
    pub pid: Option<i32>,
    /// When it began, where this role may see it (its own role's sessions,
    /// or with `pg_read_all_stats`).
    pub since: Option<String>,
    /// `active`, `idle in transaction`, ..., where this role may see it.
    pub state: Option<String>,
    /// The table it holds the lock on (`schema.table`, quoted where needed).
    pub table: String,
}

/// The transactions of other sessions (prepared ones too) holding a lock
/// on one of `tables` (quoted, qualified names), or on a partition or
/// inheritance child of one at any depth, in a mode that conflicts with
/// `SHARE`, as `CREATE INDEX CONCURRENTLY` waits for: `ROW EXCLUSIVE` (an
/// INSERT, UPDATE, DELETE, MERGE or COPY FROM) and the modes of the DDL
/// that changes what a table holds (attaching a partition, rewriting a
/// column). Autovacuum's workers write no values and are left out. The
/// locks are read from `pg_locks`, which every role may read in full.
pub async fn open_writers(
    client: &Client,
    tables: &[String],
) -> Result<Vec<OpenWriter>, tokio_postgres::Error> {
    let rows = client
        .query(
            "WITH RECURSIVE tables AS (
                 SELECT t::regclass::oid AS oid FROM unnest($1::text[]) AS t
                 UNION SELECT i.inhrelid FROM pg_inherits i JOIN tables ON i.inhparent = tables.oid)
             SELECT DISTINCT l.virtualtransaction, l.pid, a.xact_start::text, a.state,
                    format('%I.%I', n.nspname, c.relname)
               FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
               JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE l.locktype = 'relation' AND l.granted
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND l.mode IN ('RowExclusiveLock', 'ShareUpdateExclusiveLock', 'ShareRowExclusiveLock',
                               'ExclusiveLock', 'AccessExclusiveLock')
                AND l.relation IN (SELECT oid FROM tables)
                AND l.pid IS DISTINCT FROM pg_backend_pid()
                AND a.backend_type IS DISTINCT FROM 'autovacuum worker'
              ORDER BY 2, 5",
            &[&tables],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| OpenWriter {
            transaction: r.get(0),
            pid: r.get(1),
            since: r.get(2),
            state: r.get(3),
            table: r.get(4),
        })
        .collect())
}
