//! The command line: what the user typed, validated, no I/O.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::keyring::KeyEncoding;

/// Rotates the key under encrypted columns in PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "rekey", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
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
    fn sample_and_full_conflict() {
        assert!(Cli::try_parse_from(["rekey", "verify", "--job", "j.toml", "--sample", "5", "--full"]).is_err());
    }
}
