//! Who holds a target's table locked against writes: asked when the
//! preflight's probe of an UPDATE ([`super::visibility`]), or the read of
//! a target's `where` condition, waited longer than the session's
//! `lock_timeout`, so that the refusal names the sessions (a
//! plain `CREATE INDEX`, a `LOCK ... IN SHARE MODE`, an `ALTER TABLE`) and
//! what they run, where PostgreSQL's own words name neither. Of a
//! statement only its command and the object it names are said: the rest
//! may hold an application's values.

use tokio_postgres::Client;

use crate::error::DbContext;
use crate::Error;

use super::Target;

/// Holders named in a refusal at most; the rest are counted.
const NAMED: usize = 5;

/// Which statement of rekey's waited on the table's lock.
pub enum Stalled {
    /// The preflight's probe of an UPDATE, for `--lock-timeout` (this long).
    Update(std::time::Duration),
    /// A read of the table (a target's `where` condition checked), for the
    /// session's own `lock_timeout` (as PostgreSQL says it).
    Read(String),
}

impl Stalled {
    /// The lock modes that hold the statement up: those that conflict with
    /// an UPDATE's ROW EXCLUSIVE, or a read's ACCESS SHARE.
    fn modes(&self) -> &'static [&'static str] {
        match self {
            Stalled::Update(_) => &[
                "ShareLock",
                "ShareRowExclusiveLock",
                "ExclusiveLock",
                "AccessExclusiveLock",
            ],
            Stalled::Read(_) => &["AccessExclusiveLock"],
        }
    }
}

/// The refusal of a target whose table (or a partition or child of it)
/// another session held locked against one of rekey's statements for
/// longer than its `lock_timeout`: the sessions (and prepared
/// transactions) holding or awaiting a lock that conflicts with it, each
/// with its mode, how long its transaction has run, its command and what
/// it waits behind, and the ways on. `timed_out` is the statement's
/// error, kept as the cause.
pub async fn refusal(
    client: &Client,
    t: &Target,
    stalled: &Stalled,
    timed_out: tokio_postgres::Error,
) -> Error {
    let holders = match holders(client, t, stalled.modes()).await {
        Ok(h) if h.is_empty() => match stalled {
            Stalled::Update(_) => "the session holding it has since let it go".to_string(),
            Stalled::Read(_) => {
                "no session holds or awaits such a lock on it now (it has let it go, or the \
                                 `where` condition reads another table, which is locked)"
                    .to_string()
            }
        },
        Ok(h) if h.len() > NAMED => {
            format!("{}; and {} more", h[..NAMED].join("; "), h.len() - NAMED)
        }
        Ok(h) => h.join("; "),
        Err(e) => format!(
            "the sessions holding it could not be listed ({})",
            e.chain()
        ),
    };
    let (against, waited, longer) = match stalled {
        Stalled::Update(d) => (
            "writes",
            format!(
                "rekey's UPDATE waited {} (--lock-timeout) for it, as each batch would",
                humantime::format_duration(*d)
            ),
            ", or give each wait longer with --lock-timeout",
        ),
        Stalled::Read(limit) => (
            "reads",
            format!(
                "reading the table for its `where` condition waited {limit} (the lock_timeout of rekey's first \
                 session, which --lock-timeout does not set) for it"
            ),
            "",
        ),
    };
    Error::Db {
        context: format!(
            "{} is locked against {against} by another session: {holders}; {waited}. Nothing was written. Run again \
             once that session has ended (a plain CREATE INDEX holds its lock until the index is built; CREATE INDEX \
             CONCURRENTLY lets writes through; a session waiting behind another goes on when that one ends){longer}",
            t.table,
        ),
        source: timed_out,
        statement: crate::error::Statement::Other,
    }
}

/// One line per other session (or prepared transaction) that holds, or
/// waits ahead of rekey for, a lock on the target's tree in one of `modes`.
async fn holders(client: &Client, t: &Target, modes: &[&str]) -> Result<Vec<String>, Error> {
    // a session's state and statement are shown to the roles that may see
    // them (its own, or pg_read_all_stats); a prepared transaction has no session
    let rows = client
        .query(
            "WITH RECURSIVE tree(relid) AS (
                 SELECT $1::text::regclass::oid
                 UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.relid)
             SELECT l.pid, l.mode, l.granted, l.relation::regclass::text,
                    extract(epoch FROM clock_timestamp() - coalesce(a.xact_start, p.prepared))::int8,
                    a.query, a.state, p.gid,
                    CASE WHEN NOT l.granted THEN pg_blocking_pids(l.pid) END
               FROM pg_locks l JOIN tree ON l.relation = tree.relid
               LEFT JOIN pg_stat_activity a ON a.pid = l.pid
               LEFT JOIN pg_locks x ON l.pid IS NULL AND x.pid IS NULL AND x.locktype = 'transactionid'
                                   AND x.virtualtransaction = l.virtualtransaction
               LEFT JOIN pg_prepared_xacts p ON p.transaction = x.transactionid
              WHERE l.locktype = 'relation' AND l.pid IS DISTINCT FROM pg_backend_pid()
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND l.mode = ANY($2)
              ORDER BY l.granted DESC, l.pid, 4",
            &[&t.qualified(), &modes],
        )
        .await
        .ctx(|| format!("listing the sessions that hold {} locked", t.table))?;
    // what the waiters wait on: the root of a queue (a long read ahead of
    // a waiting ALTER TABLE) holds no conflicting lock itself
    let mut blocking: Vec<i32> = rows
        .iter()
        .filter_map(|r| r.get::<_, Option<Vec<i32>>>(8))
        .flatten()
        .collect();
    blocking.sort_unstable();
    blocking.dedup();
    // what could not be read leaves the waiters' blockers named by process alone
    let blockers = sessions(client, &blocking).await.unwrap_or_default();
    Ok(rows
        .iter()
        .map(|r| {
            let (pid, mode, table): (Option<i32>, String, String) = (r.get(0), r.get(1), r.get(3));
            let who = match (pid, r.get::<_, Option<String>>(7)) {
                (Some(pid), _) => format!("process {pid}"),
                (None, Some(gid)) => format!(
                    "prepared transaction {gid:?} (ROLLBACK PREPARED or COMMIT PREPARED ends it)"
                ),
                (None, None) => "a prepared transaction".to_string(),
            };
            let holds = if r.get::<_, bool>(2) {
                "holds"
            } else {
                "waits for"
            };
            let doing = doing(pid, r.get(4), r.get(6), r.get(5));
            let behind = r
                .get::<_, Option<Vec<i32>>>(8)
                .map_or_else(String::new, |b| behind(b, &blockers));
            format!("{who} {holds} {mode} on {table}{doing}{behind}")
        })
        .collect())
}

/// What a waiter waits behind (`pids`, from `pg_blocking_pids`), each
/// with what it does where `blockers` says (none where it says nothing).
fn behind(mut pids: Vec<i32>, blockers: &[(i32, String)]) -> String {
    if pids.is_empty() {
        return String::new();
    }
    // a parallel query's workers name their leader more than once
    pids.sort_unstable();
    pids.dedup();
    let mut named: Vec<String> = pids
        .iter()
        .take(NAMED)
        .map(|p| match blockers.iter().find(|(q, _)| q == p) {
            Some((_, said)) if said.is_empty() => format!("process {p}"),
            Some((_, said)) => format!("process {p} ({})", said.trim_start_matches(", ")),
            // pg_blocking_pids names a prepared transaction 0
            None if *p == 0 => "a prepared transaction (see pg_prepared_xacts)".into(),
            None => format!("process {p}"),
        })
        .collect();
    if pids.len() > NAMED {
        named.push(format!("{} more", pids.len() - NAMED));
    }
    format!(", behind {}", named.join(" and "))
}

/// What the sessions `pids` are doing, for [`holders`]: each pid and
/// [`doing`]'s words.
async fn sessions(client: &Client, pids: &[i32]) -> Result<Vec<(i32, String)>, Error> {
    if pids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT pid, extract(epoch FROM clock_timestamp() - xact_start)::int8, query, state
               FROM pg_stat_activity WHERE pid = ANY($1)",
            &[&pids],
        )
        .await
        .ctx(|| "listing the sessions a lock's waiters wait on".to_string())?;
    Ok(rows
        .iter()
        .map(|r| {
            let pid: i32 = r.get(0);
            (pid, doing(Some(pid), r.get(1), r.get(3), r.get(2)))
        })
        .collect())
}

/// How long a session's transaction has run and what it runs, or ran
/// last where it is idle in it (the statement that may have taken the
/// lock): its command and object only.
fn doing(
    pid: Option<i32>,
    xact_s: Option<i64>,
    state: Option<String>,
    query: Option<String>,
) -> String {
    let since = xact_s.map_or_else(String::new, |s| format!(", in a transaction of {s} s"));
    let what = match (state, query) {
        (Some(state), Some(q)) if state == "active" => format!(", running {}", command(&q)),
        (Some(_), Some(q)) => format!(", idle, its last statement {}", command(&q)),
        (None, _) if pid.is_some() => {
            ", its statement hidden from this role (pg_read_all_stats shows it)".to_string()
        }
        _ => String::new(),
    };
    format!("{since}{what}")
}

/// A statement's command and the object it names (`LOCK TABLE patients`,
/// `CREATE INDEX patients_phone`), nothing past the first word that is not
/// a keyword or a name: the rest may hold an application's values.
fn command(statement: &str) -> String {
    let words: Vec<&str> = statement
        .split_whitespace()
        .take(3)
        .take_while(|w| {
            w.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.\"".contains(c))
        })
        .collect();
    match words.as_slice() {
        [] => "(not shown)".to_string(),
        w => format!("{} ...", w.join(" ")),
    }
}

#[cfg(test)]
mod tests {
    use super::command;

    #[test]
    fn a_statement_is_said_by_its_command_and_object_only() {
        assert_eq!(
            command("LOCK TABLE patient_persons IN SHARE MODE"),
            "LOCK TABLE patient_persons ..."
        );
        assert_eq!(
            command("insert into t values ('123-45-6789')"),
            "insert into t ..."
        );
        assert_eq!(command("SELECT 'secret' FROM x"), "SELECT ...");
        assert_eq!(command("  CREATE\n INDEX i ON t (c)"), "CREATE INDEX i ...");
        assert_eq!(command("'x'"), "(not shown)");
    }
}
