//! rekey rotates the key under encrypted columns of PostgreSQL tables.
//!
//! Layout: one folder per layer; imports point down this list, never up.
//! - [`cli`]: the command line: arguments, one module per command, output and exit codes.
//! - [`bench`]: `rekey bench`, rekey measured against PostgreSQL's own rewrite.
//! - [`lifecycle`]: the rotation state machine around a run, and the audit trail.
//! - [`engine`]: source -> transform -> sink and what drives them: the pipeline
//!   (the only place that spawns), plans, verification.
//! - [`state`]: the engine's schema `rekey`: jobs, ranges and leases, conflicts, key usage.
//! - [`control`]: what a run obeys between batches: stop, pause, pace, replica lag, the SQL gate.
//! - [`job`]: the job file, and the job resolved once against the catalog and the keys.
//! - [`secrets`]: the stores keys live in, read and written.
//! - [`crypto`]: ciphertext formats, keys and keyrings: pure, no I/O.
//! - [`db`]: connections (TLS, libpq strings), raw binary values, binary COPY, throwaway clusters.
//! - [`observe`]: counters, metrics, logs and the progress line.
//! - [`error`]: the library's error type.

pub mod bench;
pub mod cli;
pub mod control;
pub mod crypto;
pub mod db;
pub mod engine;
pub mod error;
pub mod job;
pub mod lifecycle;
pub mod observe;
pub mod secrets;
pub mod state;

pub use error::Error;
