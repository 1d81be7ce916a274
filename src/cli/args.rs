//! The command line: what the user typed, validated, no I/O.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use super::args_audit::{
    parse_incident, parse_notes, parse_operator, Reason, RunAuditArgs, Who, MAX_REASON_LEN,
};
pub use super::args_rotate::RotateArgs;
pub use super::args_values::{parse_rate, parse_size, parse_until};
use crate::crypto::keyring::KeyEncoding;
use crate::observe::logging::LogFormat;

/// What each exit code means (README, "Output and exit codes"), under the
/// help of the commands whose outcome it tells.
pub const EXIT_CODES: &str = "Exit codes:
  0    done: every value in scope is on the target key
  1    runtime failure (database unreachable, statement failed); safe to run again
  2    bad usage or configuration (job file, keys, tables)
  3    done, but values were quarantined (see rekey.quarantine)
  4    values are left on an old key: verify found some, run left some not rotated, still changing or
       written behind it, or could not say done for what came while it went on (its job given up),
       or run --dry-run found values it would rewrite
  5    stopped at the end of its --run-time / --until window; run again to continue
  6    rotate is waiting for an operator step or the grace period; do what it printed, then run it again
  7    report: the audit evidence does not check
  130  stopped by SIGINT/SIGTERM, rekey stop or a control file; run again to resume";

/// Rotates the key under encrypted columns in PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "rekey", version, about, propagate_version = true, after_help = EXIT_CODES)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// How log lines on stderr are written: text, or one JSON object per line. Filter with RUST_LOG.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    pub log_format: LogFormat,
    /// Off a terminal, how often a progress line is logged (rows, percent, rows/s, ETA, hold reason).
    #[arg(long, global = true, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub progress_every: std::time::Duration,
}

/// The subcommands (README lists them with examples).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Re-encrypt every value not on the target key; resumes an unfinished job.
    #[command(after_help = EXIT_CODES)]
    Run(RunArgs),
    /// Prove that no value is left on an old key.
    #[command(after_help = EXIT_CODES)]
    Verify(VerifyArgs),
    /// Show a job's progress, from the database alone.
    Status(StatusArgs),
    /// Pause a running job: every process sharing it stops reading after its current batch, holding no transaction.
    Pause(StatusArgs),
    /// Resume a paused job.
    Resume(StatusArgs),
    /// Stop a running job cleanly (every process sharing it; checkpointed; `rekey run` resumes it).
    Stop(StatusArgs),
    /// Count values per key version, per table and column.
    Plan(StatusArgs),
    /// Print a new random key.
    Keygen(KeygenArgs),
    /// Measure rows/s against PostgreSQL's own floor and project a maintenance window.
    Bench(BenchArgs),
    /// Show and move keys through their lifecycle in the job's key store.
    Secrets(SecretsArgs),
    /// The whole rotation: stage -> run -> verify -> promote (-> retire after the grace period); resumable.
    #[command(after_help = EXIT_CODES)]
    Rotate(RotateArgs),
    /// Write the evidence of a rotation (JSON and a readable page), or check the audit chain (--check).
    #[command(after_help = EXIT_CODES)]
    Report(ReportArgs),
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
    /// Stop cleanly at this time of day (local, HH:MM or HH:MM:SS; the next one to come) or instant (RFC 3339), as --run-time.
    #[arg(long, value_name = "TIME", value_parser = parse_until, conflicts_with = "run_time")]
    pub until: Option<std::time::SystemTime>,
    /// No progress line.
    #[arg(long, short)]
    pub quiet: bool,
    #[command(flatten)]
    pub online: OnlineArgs,
    #[command(flatten)]
    pub audit: RunAuditArgs,
}

/// How a run behaves on a live primary: throttles, live control, timeouts, sharing a job.
#[derive(Debug, Args, Clone)]
pub struct OnlineArgs {
    /// Serve Prometheus metrics on this address (GET /metrics), e.g. 127.0.0.1:9187.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Hold while any replica's replay is further behind than this (read from pg_stat_replication; needs pg_monitor).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub max_replica_lag: Option<std::time::Duration>,
    /// Hold while this read-only query does not return true (one row, one boolean), e.g. "SELECT count(*) < 50 FROM pg_stat_activity".
    #[arg(long, value_name = "SQL")]
    pub gate_sql: Option<String>,
    /// Hold while the server writes more WAL per second than this, e.g. 20MB/s (B, KiB, MiB, GiB; MB = MiB, as PostgreSQL counts); the application's WAL counts too.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub max_wal_rate: Option<u64>,
    /// Hold while more than this much WAL (whole segments; e.g. 1GB, units B, KiB, MiB, GiB) waits to be archived, or while archive_command fails; needs archive_mode on.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_archive_lag: Option<u64>,
    /// A file whose content controls the run: run, pause or stop (absent: run).
    #[arg(long, value_name = "PATH")]
    pub control_file: Option<PathBuf>,
    /// How often the throttle signals and the control are read.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub check_every: std::time::Duration,
    /// Adapt the batch size (up to --batch-size) so one batch takes about this long to commit.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub batch_time: Option<std::time::Duration>,
    /// Most bytes of encrypted values in one batch (e.g. 16MiB); memory is about lanes x 20 x this, at most.
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub max_batch_bytes: u64,
    /// How long one statement of a batch may wait for a row lock; a batch that waits longer is retried in halves.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub lock_timeout: std::time::Duration,
    /// How long one statement may run; a batch that runs longer is retried in halves.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = humantime::parse_duration)]
    pub statement_timeout: std::time::Duration,
    /// Tries of one batch (timeouts, lost connections) before the run stops with its error.
    #[arg(long, value_name = "N", default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub attempts: u32,
    /// How long a range stays leased to a process that stopped renewing it (several processes may share a job).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease_ttl: std::time::Duration,
}

/// `rekey verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub common: JobArgs,
    /// Decrypt this many sampled values per target (key versions are counted for every value).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1000,
        conflicts_with = "full"
    )]
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
    /// Rows in the synthetic table (shaped like a patient-records table).
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
    /// Rows per second the rekey runs may read (as `rekey run --max-rows-per-sec`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rows_per_sec: Option<u32>,
    /// Also measure the cost to an application: a pgbench load before and during a rekey run, at full speed and at --max-rows-per-sec.
    #[arg(long)]
    pub with_load: bool,
    /// pgbench clients for --with-load (threads: at most 2).
    #[arg(long, value_name = "N", default_value_t = 2, requires = "with_load", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub load_clients: u32,
    /// pgbench scale for --with-load (100,000 accounts each).
    #[arg(long, value_name = "N", default_value_t = 5, requires = "with_load", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub load_scale: u32,
    /// Seconds of load measured before the rekey run (the application's baseline).
    #[arg(long, value_name = "SECS", default_value_t = 5, requires = "with_load", value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub load_baseline_secs: u32,
    /// The online settings to measure with, as `rekey run` takes them.
    #[command(flatten)]
    pub online: OnlineArgs,
}

/// Options of every lifecycle command.
#[derive(Debug, Args)]
pub struct LifecycleArgs {
    #[command(flatten)]
    pub common: JobArgs,
    /// Why (audit trail): scheduled, scheduled_annual, emergency, compromise, ... (letters, digits, _ - . :). Default: the rotation's in progress, else scheduled.
    #[arg(long, value_parser = Reason::parse)]
    pub reason: Option<Reason>,
    /// Who (audit trail); default: REKEY_OPERATOR, else the OS user, else the database role.
    #[arg(long, value_parser = parse_operator)]
    pub operator: Option<String>,
    /// The incident this rotation answers (audit trail), e.g. INC-2026-001.
    #[arg(long, value_name = "ID", value_parser = parse_incident)]
    pub incident: Option<String>,
    /// The operator's notes (audit trail), e.g. "Annual rotation per policy".
    #[arg(long, value_name = "TEXT", value_parser = parse_notes)]
    pub notes: Option<String>,
    /// The JSON lines audit log; default: <job name>.audit.jsonl beside the job file.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// For keys in the environment: print new key values (only on a terminal).
    #[arg(long)]
    pub reveal: bool,
}

impl LifecycleArgs {
    /// Whether this is a compromise rotation (`--reason compromise`).
    pub fn is_compromise(&self) -> bool {
        self.reason.as_ref().is_some_and(Reason::is_compromise)
    }

    /// What the audit events record.
    pub fn who(&self) -> Who {
        Who {
            reason: self.reason.clone(),
            operator: self.operator.clone(),
            incident: self.incident.clone(),
            notes: self.notes.clone(),
            audit_log: self.audit_log.clone(),
        }
    }
}

/// Output formats of `rekey report`'s readable page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// <job>-rotation-<id>.json only.
    Json,
    /// <job>-rotation-<id>.json and <job>-rotation-<id>.md.
    Markdown,
    /// <job>-rotation-<id>.json and <job>-rotation-<id>.html.
    Html,
}

/// `rekey report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub common: JobArgs,
    /// The rotation (`rotation_id` in rekey.rotations); default: the job's latest.
    #[arg(long, value_name = "ID")]
    pub rotation: Option<i64>,
    /// Where the evidence (<job>-rotation-<id>.json) and its page are written; default: the current directory.
    #[arg(long, value_name = "DIR", conflicts_with = "check")]
    pub out: Option<PathBuf>,
    /// The readable page written beside the JSON evidence.
    #[arg(long, value_enum, default_value_t = ReportFormat::Markdown, conflicts_with = "check")]
    pub format: ReportFormat,
    /// Verify the audit chain (rekey.audit and the JSON lines file) instead; exit 7 naming the first bad event.
    #[arg(long)]
    pub check: bool,
    /// The JSON lines audit log; default: <job name>.audit.jsonl beside the job file.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
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
    Show(StatusArgs),
    /// Create the job's keyring file with one new current key (or the keys in the environment).
    Init(InitArgs),
    /// Stage a new key as pending (idempotent).
    Stage(LifecycleArgs),
    /// Make the pending key current; the current key becomes previous (idempotent).
    Promote(LifecycleArgs),
    /// Make the previous key current again (or drop a pending key).
    Rollback(LifecycleArgs),
    /// Retire a previous key: out of what applications read, into the store's archive; refused while any value still needs it.
    Retire(RetireArgs),
    /// Bring a retired key back from the store's archive as previous.
    Restore(KeyArgs),
    /// Destroy the archived material of a retired key (all retired keys without --key-id).
    Purge(PurgeArgs),
    /// Re-wrap every data key under a new KMS master key (key table or KMS keyring); no value of user data is touched.
    Rewrap(RewrapArgs),
    /// Drop a database's record from the key store (keyring file, KMS keyring file, Secrets Manager secret), once it no longer uses the store (its records hold retires back).
    Forget(ForgetArgs),
}

/// `rekey secrets forget`.
#[derive(Debug, Args)]
pub struct ForgetArgs {
    #[command(flatten)]
    pub life: LifecycleArgs,
    /// The database's rekey id, as `rekey secrets show` and a refused retire name it.
    #[arg(long, value_name = "ID")]
    pub database: String,
}

/// `rekey secrets rewrap`.
#[derive(Debug, Args)]
pub struct RewrapArgs {
    #[command(flatten)]
    pub life: LifecycleArgs,
    /// The new master key: key id, ARN or alias.
    #[arg(long, value_name = "KMS_KEY")]
    pub to_kms_key: String,
}

/// `rekey secrets restore`.
#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(flatten)]
    pub life: LifecycleArgs,
    /// The retired key.
    #[arg(long, value_name = "ID")]
    pub key_id: u32,
}

/// `rekey secrets purge`.
#[derive(Debug, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub life: LifecycleArgs,
    /// The retired key; default: every retired key still archived.
    #[arg(long, value_name = "ID")]
    pub key_id: Option<u32>,
}

/// `rekey secrets init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub life: LifecycleArgs,
    /// Import the keys of the environment (ENCRYPTION_KEY_V<n>, ...) instead of generating one.
    #[arg(long, value_name = "PREFIX", conflicts_with = "adopt")]
    pub import_env: Option<String>,
    /// Take the existing secret as it is (any layout): check that it reads under the job's [keys], say what it holds, write nothing.
    #[arg(long)]
    pub adopt: bool,
}

/// `rekey secrets retire`.
#[derive(Debug, Args)]
pub struct RetireArgs {
    #[command(flatten)]
    pub life: LifecycleArgs,
    /// The key to retire; default: the previous key.
    #[arg(long, value_name = "ID")]
    pub key_id: Option<u32>,
    /// A table (schema.table) the job rotated in an earlier run and its
    /// file no longer lists, which you know holds no value under the key
    /// (it moved to a job of its own, say): the retire goes on without
    /// reading it, and its audit event records it as not verified. Once
    /// for each table the refusal names.
    #[arg(long, value_name = "TABLE")]
    pub accept_unverified: Vec<String>,
    /// How long a retire waits for transactions still open that wrote to the job's tables (what they wrote is invisible to its verify until they commit); one still open then refuses the retire.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = humantime::parse_duration)]
    pub wait_for_writers: std::time::Duration,
    /// How long a retire waits, after its verify, for the standbys streaming from the server to replay the rotation's writes (one behind still serves values under the old key); one still behind then refuses the retire.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = humantime::parse_duration)]
    pub wait_for_replicas: std::time::Duration,
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
    fn the_help_of_the_commands_that_end_in_them_lists_every_exit_code_of_the_readme() {
        let readme = include_str!("../../README.md");
        let table = readme
            .split("| code | meaning |")
            .nth(1)
            .expect("README's exit code table");
        let codes: Vec<&str> = table
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .filter_map(|l| l.split('|').nth(1).map(str::trim))
            .collect();
        assert!(codes.len() >= 9, "{codes:?}");
        let cli = Cli::command();
        let helps = ["run", "verify", "rotate", "report"]
            .map(|c| cli.find_subcommand(c).and_then(|c| c.get_after_help()))
            .into_iter()
            .chain([cli.get_after_help()]);
        for help in helps {
            let help = help.expect("an exit code list").to_string();
            let listed: Vec<&str> = help
                .lines()
                .filter_map(|l| l.strip_prefix("  "))
                .filter_map(|l| l.split_whitespace().next())
                .filter(|w| w.chars().all(|c| c.is_ascii_digit()))
                .collect();
            assert_eq!(listed, codes, "{help}");
        }
    }

    #[test]
    fn log_format_is_global() {
        let cli =
            Cli::try_parse_from(["rekey", "status", "--job", "j.toml", "--log-format", "json"])
                .expect("parses");
        assert_eq!(cli.log_format, LogFormat::Json);
        let cli = Cli::try_parse_from(["rekey", "keygen"]).expect("parses");
        assert_eq!(cli.log_format, LogFormat::Text);
    }

    #[test]
    fn sample_and_full_conflict() {
        assert!(Cli::try_parse_from([
            "rekey", "verify", "--job", "j.toml", "--sample", "5", "--full"
        ])
        .is_err());
    }
}
