//! rekey rotates the key under encrypted columns of PostgreSQL tables.
//!
//! Layout (data flows top to bottom):
//! - [`cli`]: the command line, validated, no I/O.
//! - [`commands`]: one function per subcommand; prints results, picks exit codes.
//! - [`job`]: the job file, then the job resolved once against the database.
//! - [`catalog`]: checks tables, keys and column types before any row is read.
//! - [`keyring`]: keys and where they come from; zeroized, never printed.
//! - [`rotate`]: `rekey rotate` and `rekey secrets`: the lifecycle around a run, resumable.
//! - [`secrets`]: the stores keys live in (environment, keyring file), read and written.
//! - [`audit`]: one event per lifecycle step, JSON lines and `rekey.audit`.
//! - [`lifecycle`]: stage / promote / rollback / retire on a table of keys.
//! - [`codec`]: ciphertext formats, pure functions, one file each.
//! - [`plan`]: counts per key, splitting a table into key ranges.
//! - [`checkpoint`]: the engine's schema `rekey`: jobs, progress, resume.
//! - [`pipeline`]: source -> transform -> sink; the only place that spawns.
//!   - [`source`]: keyset pages, never OFFSET.
//!   - [`transform`]: decrypt, encrypt, verify, on rayon.
//!   - [`sink`]: binary COPY + compare-and-swap UPDATE + checkpoint, one transaction.
//!   - [`throttle`]: rows/s pace, the hold, adaptive batch size, replica lag estimate.
//!   - [`monitor`]: live control, replica lag, the SQL gate; read between batches.
//! - [`verify`]: proves no value is left on an old key.
//! - [`sql`]: every statement's text, identifiers quoted, values bound.
//! - [`binary_copy`]: PostgreSQL's binary COPY encoding.
//! - [`db`]: connections (TLS with rustls, libpq sslmode semantics), identifier quoting, raw binary values.
//! - [`stats`], [`progress`]: counters and the progress line.
//! - [`metrics`]: one struct per observable event: its log line and its metrics; the Prometheus endpoint.
//! - [`bench`]: `rekey bench`, the floor-vs-rekey measurement.
//! - [`cluster`]: throwaway PostgreSQL clusters for tests, demos and benchmarks.
//! - [`error`]: the library's error type and exit codes.

pub mod audit;
pub mod bench;
pub mod binary_copy;
pub mod catalog;
pub mod checkpoint;
pub mod cli;
pub mod cluster;
pub mod codec;
pub mod commands;
pub mod db;
pub mod error;
pub mod job;
pub mod keyring;
pub mod lifecycle;
pub mod monitor;
pub mod metrics;
pub mod pipeline;
pub mod plan;
pub mod rotate;
pub mod secrets;
pub mod progress;
pub mod sink;
pub mod source;
pub mod sql;
pub mod stats;
pub mod throttle;
pub mod transform;
pub mod verify;

pub use error::Error;
