//! The command line: what the user typed, validated, no I/O.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::keyring::KeyEncoding;
use crate::metrics::LogFormat;

/// Rotates the key under encrypted columns in PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "rekey", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// How log lines on stderr are written: text, or one JSON object per line. Filter with RUST_LOG.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    pub log_format: LogFormat,
}

/// The subcommands (DESIGN.md, "CLI contract").
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Re-encrypt every value not on the target key; resumes an unfinished job.
    Run(RunArgs),
    /// Prove that no value is left on an old key.
    Verify(VerifyArgs),
    /// Show a job's progress, from the database alone.
    Status(StatusArgs),
    /// Count values per key version, per table and column.
    Plan(StatusArgs),
    /// Print a new random key.
    Keygen(KeygenArgs),
    /// Measure rows/s against PostgreSQL's own floor and project a maintenance window.
    Bench(BenchArgs),
    /// Show and move keys through their lifecycle in the job's key store.
    Secrets(SecretsArgs),
    /// The whole rotation: stage -> run -> verify -> promote (-> retire after the grace period); resumable.
    Rotate(RotateArgs),
}

/// Options every job command shares.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job file (TOML).
    #[arg(long, value_name = "JOB.toml")]
    pub job: PathBuf,
    /// PostgreSQL URL or key=value string; else DATABASE_URL; else [database] url in the job.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `rekey run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: JobArgs,
    /// Read, decrypt and re-encrypt everything, but write nothing and change no engine state.
    #[arg(long)]
    pub dry_run: bool,
    /// Lanes working at once (each one reader and one writer connection). Default: CPU cores, at least 2.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: Option<u16>,
    /// Rows per batch (one transaction each).
    #[arg(long, value_name = "N", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch_size: u32,
    /// Abandon an unfinished job of this name and start a new one.
    #[arg(long)]
    pub restart: bool,
    /// Run even when no sampled value opens with the keys given (every such value is quarantined).
    #[arg(long)]
    pub force: bool,
    /// Read at most this many rows per second (all lanes together), to spare a live primary.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rows_per_sec: Option<u32>,
    /// Stop cleanly after this long (e.g. 2h, 45m), checkpointed, with the time still needed (exit 5).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub run_time: Option<std::time::Duration>,
    /// No progress line.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `rekey verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub common: JobArgs,
    /// Decrypt this many sampled values per target (key versions are counted for every value).
    #[arg(long, value_name = "N", default_value_t = 1000, conflicts_with = "full")]
    pub sample: u32,
    /// Decrypt every value.
    #[arg(long)]
    pub full: bool,
    /// No progress line.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `rekey status` and `rekey plan`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub common: JobArgs,
}

/// `rekey bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Rows in the synthetic seed-shaped table.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub rows: u64,
    /// Use this server (in a scratch schema it creates and drops) instead of a throwaway cluster.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// Lanes working at once. Default: CPU cores, at least 2.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: Option<u16>,
    /// Rows per batch.
    #[arg(long, value_name = "N", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch_size: u32,
    /// Measure this many rounds and report medians (the floor varies from run to run).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=20))]
    pub repeat: u16,
    /// Also time a run killed at this fraction of its rows (e.g. 0.5) and resumed.
    #[arg(long, value_name = "FRACTION")]
    pub interrupt_at: Option<f64>,
    /// Table sizes to project a window for, e.g. 10M,100M,1B.
    #[arg(long, value_name = "SIZES", default_value = "10M,100M,1B")]
    pub project: String,
    /// Project the window for the tables of this job instead (counts from `rekey plan`).
    #[arg(long, value_name = "JOB.toml")]
    pub job: Option<PathBuf>,
    /// Write report.json and throughput.svg into this directory.
    #[arg(long, value_name = "DIR")]
    pub report_dir: Option<PathBuf>,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Why a key is rotated (recorded in the audit trail).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Reason {
    /// The regular schedule.
    Scheduled,
    /// Unplanned, e.g. an employee leaving.
    Emergency,
    /// The key is known or suspected to be exposed.
    Compromise,
}

impl Reason {
    /// The name recorded in the audit trail.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Scheduled => "scheduled",
            Reason::Emergency => "emergency",
            Reason::Compromise => "compromise",
        }
    }
}

/// Options of every lifecycle command.
#[derive(Debug, Args)]
pub struct LifecycleArgs {
    #[command(flatten)]
    pub common: JobArgs,
    /// Why (audit trail).
    #[arg(long, value_enum, default_value_t = Reason::Scheduled)]
    pub reason: Reason,
    /// Who (audit trail); default: the OS user.
    #[arg(long)]
    pub operator: Option<String>,
    /// The JSON lines audit log; default: <job name>.audit.jsonl beside the job file.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// For keys in the environment: print new key values (only on a terminal).
    #[arg(long)]
    pub reveal: bool,
}

/// `rekey secrets`.
#[derive(Debug, Args)]
pub struct SecretsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: SecretsCommand,
}

/// `rekey secrets ...`.
#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Key ids, states, fingerprints and ages; never material.
    Show(LifecycleArgs),
    /// Create the job's keyring file with one new current key (or the keys in the environment).
    Init(InitArgs),
    /// Stage a new key as pending (idempotent).
    Stage(LifecycleArgs),
    /// Make the pending key current; the current key becomes previous (idempotent).
    Promote(LifecycleArgs),
    /// Make the previous key current again (or drop a pending key).
    Rollback(LifecycleArgs),
    /// Remove a previous key; refused while any value still needs it.
    Retire(RetireArgs),
}

/// `rekey secrets init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub life: LifecycleArgs,
    /// Import the keys of the environment (ENCRYPTION_KEY_V<n>, ...) instead of generating one.
    #[arg(long, value_name = "PREFIX")]
    pub import_env: Option<String>,
}

/// `rekey secrets retire`.
#[derive(Debug, Args)]
pub struct RetireArgs {
    #[command(flatten)]
    pub life: LifecycleArgs,
    /// The key to retire; default: the previous key.
    #[arg(long, value_name = "ID")]
    pub key_id: Option<u32>,
}

/// `rekey rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    #[command(flatten)]
    pub life: LifecycleArgs,
    /// How long the old key stays after promotion before a later invocation retires it.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub grace: std::time::Duration,
    /// Lanes for the re-encryption.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: Option<u16>,
    /// Rows per batch.
    #[arg(long, value_name = "N", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch_size: u32,
    /// No progress line.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `rekey keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// How to print the key.
    #[arg(long, value_enum, default_value_t = KeyEncoding::Hex)]
    pub format: KeyEncoding,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn log_format_is_global() {
        let cli = Cli::try_parse_from(["rekey", "status", "--job", "j.toml", "--log-format", "json"]).expect("parses");
        assert_eq!(cli.log_format, LogFormat::Json);
        let cli = Cli::try_parse_from(["rekey", "keygen"]).expect("parses");
        assert_eq!(cli.log_format, LogFormat::Text);
    }

    #[test]
    fn sample_and_full_conflict() {
        assert!(Cli::try_parse_from(["rekey", "verify", "--job", "j.toml", "--sample", "5", "--full"]).is_err());
    }
}
