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
    },
    /// A pipeline stage stopped unexpectedly (exit 1).
    #[error("{0}")]
    Runtime(String),
}

impl Error {
    /// The process exit code DESIGN.md assigns to this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) => 2,
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
        self.map_err(|source| Error::Db { context: context(), source })
    }
}
