//! `rekey rotate`'s arguments: where the rotation goes next (`--new`,
//! `--abort`, `--no-wait`, `--dry-run`), its grace period, and the run
//! controls of its re-encryption. Kept apart from `args.rs` for size.

use clap::Args;

use super::args::{LifecycleArgs, OnlineArgs};

/// `rekey rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    #[command(flatten)]
    pub life: LifecycleArgs,
    /// How long the old key stays after promotion before a later invocation retires it (default 24h when a rotation starts). Given at a later step, it replaces the one recorded.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub grace: Option<std::time::Duration>,
    /// After staging, go on at once instead of stopping (exit 6) for the redeployment: for applications that already read the pending key.
    #[arg(long)]
    pub no_wait: bool,
    /// Start the next rotation when the last one is over (a job's first rotation starts without it).
    #[arg(long, conflicts_with = "abort")]
    pub new: bool,
    /// Cancel the rotation in progress (before promotion): values go back to the old key, then the staged key is retired.
    #[arg(long)]
    pub abort: bool,
    /// Lanes for the re-encryption.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: Option<u16>,
    /// Rows per batch.
    #[arg(long, value_name = "N", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch_size: u32,
    /// No progress line.
    #[arg(long, short)]
    pub quiet: bool,
    /// Say where the rotation stands and what the next invocation (with `--new` or `--abort`, what that one) would do; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Read at most this many rows per second during the re-encryption (all lanes together).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rows_per_sec: Option<u32>,
    /// How long a retire waits for transactions still open that wrote to the job's tables (what they wrote is invisible to its verify until they commit); one still open then refuses the retire.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = humantime::parse_duration)]
    pub wait_for_writers: std::time::Duration,
    /// How long a retire waits, after its verify, for the standbys streaming from the server to replay the rotation's writes (one behind still serves values under the old key); one still behind then refuses the retire.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = humantime::parse_duration)]
    pub wait_for_replicas: std::time::Duration,
    #[command(flatten)]
    pub online: OnlineArgs,
}
