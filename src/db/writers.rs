//! Transactions still open that have written to a table: what they wrote
//! is invisible to every other session until they commit, so a scan that
//! must see the whole table (the full verify a key's retire rests on) first
//! waits for them, as `CREATE INDEX CONCURRENTLY` waits for the
//! transactions before it. Found by their locks, which no one waits on.

use tokio_postgres::Client;

/// Another session's transaction holding a write lock on a table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct OpenWriter {
    /// The server process of its session.
    pub pid: i32,
    /// When its transaction began (it is this transaction, not the session's next).
    pub since: String,
    /// `active`, `idle in transaction`, ...
    pub state: String,
    /// The table it wrote to (`schema.table`, quoted where needed).
    pub table: String,
}

/// The transactions of other sessions that hold a write lock (`ROW
/// EXCLUSIVE`: an INSERT, UPDATE, DELETE or COPY FROM, kept until they
/// end) on one of `tables` (quoted, qualified names) or on a partition or
/// inheritance child of one, at any depth.
pub async fn open_writers(
    client: &Client,
    tables: &[String],
) -> Result<Vec<OpenWriter>, tokio_postgres::Error> {
    let rows = client
        .query(
            "WITH RECURSIVE tables AS (
                 SELECT t::regclass::oid AS oid FROM unnest($1::text[]) AS t
                 UNION SELECT i.inhrelid FROM pg_inherits i JOIN tables ON i.inhparent = tables.oid)
             SELECT DISTINCT l.pid, a.xact_start::text, coalesce(a.state, ''), format('%I.%I', n.nspname, c.relname)
               FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
               JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE l.locktype = 'relation' AND l.mode = 'RowExclusiveLock' AND l.granted
                AND l.relation IN (SELECT oid FROM tables) AND l.pid <> pg_backend_pid()
                AND a.xact_start IS NOT NULL
              ORDER BY 1, 4",
            &[&tables],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| OpenWriter {
            pid: r.get(0),
            since: r.get(1),
            state: r.get(2),
            table: r.get(3),
        })
        .collect())
}
