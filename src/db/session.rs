//! What rekey sets on each session it opens: per-statement limits that a
//! batch retries under (lock and statement timeouts) and the one that frees
//! a frozen process's locks. [`super::Database`] puts them in every
//! session's startup options, so a role's or a database's own settings
//! (a 50 ms `statement_timeout`, serializable by default) never apply.

use std::time::Duration;

/// Per-statement limits of a session.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timeouts {
    /// `lock_timeout`: how long one statement may wait for a row lock.
    pub lock: Option<std::time::Duration>,
    /// `statement_timeout`: how long one statement may run.
    pub statement: Option<std::time::Duration>,
    /// `idle_in_transaction_session_timeout`: a batch transaction left idle
    /// this long (its process frozen) is ended by the server, releasing its
    /// locks for the process that takes its range over.
    pub idle_in_transaction: Option<std::time::Duration>,
}

/// A limit as PostgreSQL's timeout settings take it: milliseconds, `0` for
/// none (`None`), and at least 1 for a limit given (0 would lift it).
pub fn ms(limit: Option<Duration>) -> u128 {
    limit.map_or(0, |d| d.as_millis().max(1))
}

impl Timeouts {
    /// What commands that only read (plan, verify, status) set: no statement
    /// limit (their scans take as long as the table needs), a lock wait and
    /// an idle transaction bounded.
    pub fn read_only() -> Timeouts {
        Timeouts {
            lock: Some(Duration::from_secs(5)),
            statement: None,
            idle_in_transaction: Some(Duration::from_secs(60)),
        }
    }

    /// The same settings as startup options (`-c name=value`), which the
    /// server applies over whatever the role or the database set, and the
    /// isolation rekey's statements are written for: read committed, so a
    /// server whose default is serializable does not fail them.
    pub fn startup_options(&self) -> String {
        format!(
            "-c lock_timeout={} -c statement_timeout={} -c idle_in_transaction_session_timeout={} -c default_transaction_isolation=read\\ committed",
            ms(self.lock),
            ms(self.statement),
            ms(self.idle_in_transaction)
        )
    }

    /// The `SET` commands for a session.
    pub fn session_sql(&self) -> String {
        format!(
            "SET lock_timeout = {}; SET statement_timeout = {}; SET idle_in_transaction_session_timeout = {}",
            ms(self.lock),
            ms(self.statement),
            ms(self.idle_in_transaction)
        )
    }
}
