//! The library's error type. Each variant maps to one exit code at the edge.

use crate::db::ConnectError;

/// Everything that can stop a rekey command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad usage or configuration: the job file, the keys, the target tables (exit 2).
    #[error("{0}")]
    Config(String),
    /// The database could not be reached (exit 1).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A statement failed (exit 1).
    #[error("{context}")]
    Db {
        /// What rekey was doing.
        context: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
        /// Which statement it was: what the database raises while it
        /// reads is no refusal of a write.
        statement: Statement,
    },
    /// A batch's count against the nonce budget waited for the key's lock
    /// while other batches counted, and a limit cut the wait short (exit
    /// 1): the batch waits and tries again whole, as halving it would not
    /// shorten the wait.
    #[error("{context}")]
    CountWait {
        /// What rekey was doing.
        context: String,
        /// The driver's error (a statement or lock timeout).
        #[source]
        source: tokio_postgres::Error,
    },
    /// A pipeline stage stopped unexpectedly (exit 1).
    #[error("{0}")]
    Runtime(String),
    /// A range's lease passed to another lane or process while a batch of it
    /// was in flight; the batch was rolled back (the pipeline drops the range).
    #[error("{0}")]
    LeaseLost(String),
    /// A run that wrote cannot say done: something that came while it went
    /// on (row security, a table replaced, a trigger) may have kept rows
    /// from it, which may be on an old key (exit 4, as for values left).
    #[error("{0}")]
    NotDone(String),
}

/// Which of rekey's statements a database error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statement {
    /// The write of a batch's rotated values into a target table, where
    /// the table's triggers, constraints and rules run.
    TargetWrite,
    /// Any other: reads of the targets (their `where` included), checks,
    /// rekey's own records.
    Other,
}

/// What a failed batch can do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A lock or statement timeout: try again with fewer rows.
    Smaller,
    /// The connection is gone (server restart, terminated backend): reconnect, then try again.
    Reconnect,
    /// A transient condition (deadlock, serialization failure, disk full): wait, then try again.
    Wait,
    /// The database refused the write itself, for a row (a trigger's
    /// exception, a constraint): try fewer rows, to find the ones refused
    /// and go on without them.
    Refused,
    /// Anything else: report it.
    Never,
}

impl Error {
    /// Whether (and how) the work that failed with this error may be retried.
    pub fn retry(&self) -> Retry {
        match self {
            Error::Connect(crate::db::ConnectError::BadUrl(_)) => Retry::Never,
            Error::Connect(_) => Retry::Reconnect,
            Error::Db { source, .. } => {
                if source.is_closed() {
                    return Retry::Reconnect;
                }
                let Some(code) = source.code() else {
                    // no server error: the socket broke
                    return Retry::Reconnect;
                };
                match code.code() {
                    "55P03" | "57014" => Retry::Smaller,
                    "40001" | "40P01" => Retry::Wait,
                    // raised by a trigger (PL/pgSQL's RAISE) or a constraint of the
                    // user's table (one of rekey's own tables is rekey's error)
                    c if (c.starts_with("P0") || c.starts_with("23"))
                        && source.as_db_error().and_then(|d| d.schema()) != Some("rekey") =>
                    {
                        Retry::Refused
                    }
                    // a row-level security policy's WITH CHECK refusing
                    // some rewritten rows: the rows', not the role's
                    "42501"
                        if source.as_db_error().is_some_and(|d| {
                            // the routine's name is never translated; the message is
                            d.routine() == Some("ExecWithCheckOptions")
                                || d.message().contains("violates row-level security policy")
                        }) =>
                    {
                        Retry::Refused
                    }
                    c if c.starts_with("08") || c.starts_with("57P") => Retry::Reconnect,
                    c if c.starts_with("53") => Retry::Wait,
                    _ => Retry::Never,
                }
            }
            Error::CountWait { .. } => Retry::Wait,
            Error::Config(_) | Error::Runtime(_) | Error::LeaseLost(_) | Error::NotDone(_) => {
                Retry::Never
            }
        }
    }

    /// The server's own words for an error it raised (`SQLSTATE: message`),
    /// or the whole chain for any other error.
    pub fn server_words(&self) -> String {
        match self {
            Error::Db { source, .. } | Error::CountWait { source, .. } => {
                match source.as_db_error() {
                    Some(e) => format!("{}: {}", e.code().code(), e.message()),
                    None => self.chain(),
                }
            }
            _ => self.chain(),
        }
    }

    /// Whether the server refused a connection for want of slots
    /// (`max_connections`, or the slots reserved for superusers).
    pub fn is_too_many_connections(&self) -> bool {
        match self {
            Error::Connect(ConnectError::Connect { source, .. }) | Error::Db { source, .. } => {
                source.code().is_some_and(|c| c.code() == "53300")
            }
            _ => false,
        }
    }

    /// The message with every cause behind it, on one line, each cause
    /// only once (a wrapper often repeats its source's text); for a refused
    /// write into a target, the server's words ([`Error::without_detail`]).
    pub fn chain(&self) -> String {
        if let Error::Db {
            statement: Statement::TargetWrite,
            ..
        } = self
        {
            // a refused write's DETAIL shows the row's values ("Failing row
            // contains (...)", "Key (...)=(...)"), and the row's other
            // columns may be plaintext
            return self.without_detail();
        }
        self.every_cause()
    }

    /// The message with every cause behind it, each only once.
    fn every_cause(&self) -> String {
        let mut msg = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            let text = s.to_string();
            if !msg.contains(&text) {
                msg.push_str(": ");
                msg.push_str(&text);
            }
            source = s.source();
        }
        msg
    }

    /// The message, with a database error in the server's words only
    /// (what rekey was doing, `SQLSTATE: message`, and the server's HINT):
    /// never its DETAIL, which may show a row's values. What a record kept
    /// for good (the audit trail) says of an error.
    pub fn without_detail(&self) -> String {
        if let Error::Db {
            context, source, ..
        }
        | Error::CountWait { context, source } = self
        {
            if let Some(e) = source.as_db_error() {
                let hint = e
                    .hint()
                    .map(|h| format!(" (hint: {h})"))
                    .unwrap_or_default();
                return format!("{context}: {}: {}{hint}", e.code().code(), e.message());
            }
        }
        // no server error (a connection lost): nothing the server said of a row
        self.every_cause()
    }

    /// The kind of failure, for `--json`: `config`, `connect`, `database`, `runtime`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Connect(ConnectError::BadUrl(_)) => "config",
            Error::Connect(_) => "connect",
            Error::Db { .. } | Error::CountWait { .. } => "database",
            Error::Runtime(_) | Error::LeaseLost(_) | Error::NotDone(_) => "runtime",
        }
    }

    /// This error, saying what the command had changed before it (`done`):
    /// a refusal's "nothing was written" is its own step's, not the command's.
    pub fn after(self, done: &str) -> Error {
        let add = |m: String| format!("{m} (before this, the command had: {done})");
        match self {
            Error::Config(m) => Error::Config(add(m)),
            Error::Runtime(m) => Error::Runtime(add(m)),
            Error::LeaseLost(m) => Error::LeaseLost(add(m)),
            Error::NotDone(m) => Error::NotDone(add(m)),
            Error::Db {
                context,
                source,
                statement,
            } => Error::Db {
                context: add(context),
                source,
                statement,
            },
            Error::CountWait { context, source } => Error::CountWait {
                context: add(context),
                source,
            },
            other => other,
        }
    }

    /// What to do next, for `--json` (the message names the problem and,
    /// where it knows one, its own fix).
    pub fn hint(&self) -> &'static str {
        if let Error::Db {
            source, statement, ..
        } = self
        {
            match (source.code().map(|c| c.code()), statement) {
                (Some("42501"), _) => return "the role lacks the privilege the error names: grant it (GRANT ... TO the role rekey connects as), then run the same command again; every batch commits whole, so it resumes safely",
                // raised by a trigger, a constraint or a rule: the same rows fail again on every run
                (Some(c), Statement::TargetWrite) if c == "P0001" || c == "0A000" || c.starts_with("23") => return "the database refused the write itself (a trigger, constraint or rule of the table raised the error): running again fails the same way; change what raises it, or leave those rows out with the target's `where`, then run again; every batch commits whole, nothing is half-written",
                // raised by a function of the user's (one in the `where`), or a feature the statement needs
                (Some(c), Statement::Other) if c.starts_with("P0") || c == "0A000" => return "the database raised the error while rekey read or checked the table (a function the statement calls, such as one in the target's `where`, or a collation, operator or type it does not support): running again fails the same way; change what raises it, then run again; every batch commits whole, nothing is half-written",
                _ => {}
            }
        }
        if let Error::NotDone(_) = self {
            return "what the run wrote stands, and its job was given up: once what the error names is fixed, run the same command again; it starts the job over (values already rotated stay rotated)";
        }
        match self.kind() {
            "config" => "fix the job file, keys or arguments the error names, then run the command again; the step that refused changed nothing",
            "connect" => "check the host, port, database, user and credentials the error names, and that the server is up; nothing was changed",
            "database" => "a statement failed; every batch commits whole, so running the same command again resumes safely",
            _ => "once what the error names is fixed or over, run the same command again: it resumes from the last committed batch or step",
        }
    }

    /// The process exit code for this error (README, "Output and exit codes").
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) => 2,
            Error::NotDone(_) => 4,
            _ => 1,
        }
    }
}

/// Adds "what rekey was doing" to a driver error.
pub trait DbContext<T> {
    /// Wraps the error with `context`.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, Error>;
}

impl<T> DbContext<T> for Result<T, tokio_postgres::Error> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(|source| Error::Db {
            context: context(),
            source,
            statement: Statement::Other,
        })
    }
}

/// Adds "what rekey was doing" to the error of the statement that writes
/// rotated values into a target table.
pub fn writing_target<T>(
    result: Result<T, tokio_postgres::Error>,
    context: impl FnOnce() -> String,
) -> Result<T, Error> {
    result.map_err(|source| Error::Db {
        context: context(),
        source,
        statement: Statement::TargetWrite,
    })
}
