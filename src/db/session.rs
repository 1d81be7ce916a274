//! What rekey sets on each session it opens: per-statement limits that a
//! batch retries under (lock and statement timeouts) and the one that frees
//! a frozen process's locks.

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

impl Timeouts {
    /// The `SET` commands for a session.
    pub fn session_sql(&self) -> String {
        let ms = |d: Option<std::time::Duration>| d.map_or(0, |d| d.as_millis().max(1));
        format!(
            "SET lock_timeout = {}; SET statement_timeout = {}; SET idle_in_transaction_session_timeout = {}",
            ms(self.lock),
            ms(self.statement),
            ms(self.idle_in_transaction)
        )
    }
}
