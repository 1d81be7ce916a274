//! pgbench, PostgreSQL's standard OLTP load, driven for `rekey bench --with-load`:
//! found beside the server binaries, its tables made in the bench's scratch
//! schema (`search_path` through `PGOPTIONS`, so nothing lands in `public`
//! and nothing collides with the bench table), run with per-transaction logs
//! (`-l`), and those logs read into time windows.
//!
//! pgbench stops cleanly only at its `-T`, and a rotation's length is not known
//! in advance, so the load runs with a long `-T` and is killed a margin after
//! the last window it measures. A killed pgbench loses the log lines it had not
//! flushed (a few KiB per thread, the newest ones) and may leave its last line
//! cut short: the reader takes only whole lines, skips any it cannot parse,
//! and clips each window to the instant every thread's log reaches.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde::Serialize;

use crate::db::cluster::find_bindir;

/// Why the load could not be run or read.
#[derive(Debug, thiserror::Error)]
pub enum PgbenchError {
    /// No pgbench where the server binaries are, nor on PATH.
    #[error("pgbench not found beside PostgreSQL's server binaries (PATH, pg_config, /usr/lib/postgresql/*/bin) nor on PATH; --with-load needs it: install PostgreSQL's server package (Debian/Ubuntu: apt-get install postgresql; pgbench is not in postgresql-client)")]
    NotFound,
    /// A step failed.
    #[error("{step} failed: {detail}")]
    Step {
        /// What was being done.
        step: String,
        /// What went wrong (pgbench's own last lines where it printed any).
        detail: String,
    },
}

fn step(what: &str, detail: impl std::fmt::Display) -> PgbenchError {
    PgbenchError::Step {
        step: what.to_string(),
        detail: detail.to_string(),
    }
}

/// The pgbench of the server binaries the throwaway cluster uses, else the one on PATH.
pub(super) fn find() -> Result<PathBuf, PgbenchError> {
    let beside_server = find_bindir().map(|d| d.join("pgbench"));
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("pgbench"))
            .find(|p| p.is_file())
    });
    beside_server
        .filter(|p| p.is_file())
        .or(on_path)
        .ok_or(PgbenchError::NotFound)
}

/// The connection string goes to pgbench in `PGDATABASE` (pgbench expands a
/// connection string there, as on its command line), never as an argument:
/// a password in it would show in the process list.
fn in_schema<'a>(cmd: &'a mut Command, schema: &str) -> &'a mut Command {
    // the schema is rekey's own scratch name (letters, digits, _), never input
    cmd.env("PGOPTIONS", format!("-c search_path={schema}"))
}

/// The last lines of what a failed pgbench printed.
fn tail(text: &[u8]) -> String {
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

/// `pgbench -i -s SCALE`: the TPC-B-like tables, in `schema`. Blocks.
pub(super) fn init(
    pgbench: &Path,
    conninfo: &str,
    schema: &str,
    scale: u32,
) -> Result<(), PgbenchError> {
    let out = in_schema(&mut Command::new(pgbench), schema)
        .args(["-i", "-q", "-s", &scale.to_string()])
        .env("PGDATABASE", conninfo)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| step("starting pgbench -i", e))?;
    if !out.status.success() {
        return Err(step("pgbench -i", tail(&out.stderr)));
    }
    Ok(())
}

/// A running load; killed and its files removed on drop.
pub(super) struct Running {
    /// The pgbench process.
    child: Child,
    /// Its per-transaction logs and output.
    dir: PathBuf,
}

impl Running {
    /// Starts `pgbench -c CLIENTS -j THREADS` with per-transaction logs, running until stopped.
    pub(super) fn start(
        pgbench: &Path,
        conninfo: &str,
        schema: &str,
        clients: u32,
        threads: u32,
    ) -> Result<Self, PgbenchError> {
        static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("rekey-pgbench-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| step("creating pgbench's log directory", e))?;
        let file = |name: &str| {
            std::fs::File::create(dir.join(name)).map_err(|e| step("creating pgbench's output", e))
        };
        let child = in_schema(&mut Command::new(pgbench), schema)
            .args(["-n", "-l", "-T", "86400"])
            .args(["-c", &clients.to_string()])
            .args(["-j", &threads.clamp(1, clients).to_string()])
            .arg("--log-prefix")
            .arg(dir.join("log"))
            .env("PGDATABASE", conninfo)
            .stdin(Stdio::null())
            .stdout(file("stdout")?)
            .stderr(file("stderr")?)
            .spawn()
            .map_err(|e| step("starting pgbench", e))?;
        Ok(Running { child, dir })
    }

    /// Fails with pgbench's last words if it has exited (it never should before it is stopped).
    pub(super) fn check(&mut self) -> Result<(), PgbenchError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(step(
                "pgbench",
                format!(
                    "exited ({status}) while loading: {}",
                    tail(&std::fs::read(self.dir.join("stderr")).unwrap_or_default())
                ),
            )),
            Err(e) => Err(step("watching pgbench", e)),
        }
    }

    /// Stops the load and reads its logs.
    pub(super) fn stop(mut self) -> Result<Logs, PgbenchError> {
        self.check()?;
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut threads = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| step("reading pgbench's logs", e))? {
            let path = entry.map_err(|e| step("reading pgbench's logs", e))?.path();
            let is_log = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("log."));
            if is_log {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| step("reading pgbench's logs", e))?;
                threads.push(parse_log(&text));
            }
        }
        Ok(Logs { threads })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One logged transaction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Txn {
    /// When it completed, seconds since the Unix epoch.
    pub end: f64,
    /// How long it took, microseconds.
    pub latency_us: u64,
}

/// Whole lines of one thread's log: `client_id transaction_no time script_no
/// time_epoch time_us [...]`; failed or skipped transactions (a word in the
/// `time` field) and cut or foreign lines are left out.
pub(super) fn parse_log(text: &str) -> Vec<Txn> {
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let latency_us = f.get(2)?.parse::<u64>().ok()?;
            let secs = f.get(4)?.parse::<u64>().ok()?;
            let micros = f.get(5)?.parse::<u64>().ok().filter(|&u| u < 1_000_000)?;
            Some(Txn {
                end: secs as f64 + micros as f64 / 1e6,
                latency_us,
            })
        })
        .collect()
}

/// The load's transactions, one list per pgbench thread.
#[derive(Debug, Default)]
pub(super) struct Logs {
    /// Per thread, in completion order.
    pub threads: Vec<Vec<Txn>>,
}

/// What the application saw in one window.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct AppWindow {
    /// Seconds measured (the window, clipped to what the logs cover).
    pub seconds: f64,
    /// Transactions completed in it.
    pub transactions: u64,
    /// Transactions per second.
    pub tps: f64,
    /// Median transaction latency, milliseconds.
    pub latency_ms_p50: f64,
    /// 99th percentile.
    pub latency_ms_p99: f64,
    /// Slowest transaction.
    pub latency_ms_max: f64,
}

impl Logs {
    /// The instant up to which every thread's log is complete.
    fn covered_until(&self) -> f64 {
        self.threads
            .iter()
            .filter_map(|t| t.last().map(|x| x.end))
            .fold(f64::INFINITY, f64::min)
    }

    /// The transactions that completed in `[from, to)` (epoch seconds).
    pub(super) fn window(&self, from: f64, to: f64) -> AppWindow {
        let to = to.min(self.covered_until());
        let mut lat: Vec<u64> = self
            .threads
            .iter()
            .flatten()
            .filter(|t| t.end >= from && t.end < to)
            .map(|t| t.latency_us)
            .collect();
        lat.sort_unstable();
        let seconds = (to - from).max(0.0);
        let at = |q: f64| -> f64 {
            // nearest rank
            let rank = ((q * lat.len() as f64).ceil() as usize).clamp(1, lat.len().max(1));
            lat.get(rank - 1).map_or(0.0, |&us| us as f64 / 1000.0)
        };
        AppWindow {
            seconds,
            transactions: lat.len() as u64,
            tps: if seconds > 0.0 {
                lat.len() as f64 / seconds
            } else {
                0.0
            },
            latency_ms_p50: at(0.5),
            latency_ms_p99: at(0.99),
            latency_ms_max: lat.last().map_or(0.0, |&us| us as f64 / 1000.0),
        }
    }

    /// Transactions per second in whole seconds from `origin` to the end of
    /// the logs: (seconds since `origin` at the second's end, tps).
    pub(super) fn per_second(&self, origin: f64) -> Vec<(f64, f64)> {
        let end = self.covered_until();
        if !end.is_finite() || end <= origin {
            return Vec::new();
        }
        let mut bins = vec![0u64; (end - origin).floor() as usize];
        for t in self.threads.iter().flatten() {
            let i = (t.end - origin).floor();
            if i >= 0.0 && (i as usize) < bins.len() {
                bins[i as usize] += 1;
            }
        }
        bins.iter()
            .enumerate()
            .map(|(i, &n)| ((i + 1) as f64, n as f64))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_whole_lines_and_skips_failed_cut_and_foreign_ones() {
        let text = "0 1 1500 0 1700000000 100000\n\
                    0 2 failed 0 1700000000 200000\n\
                    garbage\n\
                    0 3 2500 0 1700000000 300000 0 0\n\
                    0 4 12112 0 1700000000 77";
        let got = parse_log(text);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].latency_us, 1500);
        assert!((got[1].end - 1_700_000_000.3).abs() < 1e-6);
    }

    #[test]
    fn windows_count_percentiles_and_clip_to_what_every_thread_logged() {
        // thread 0: 1 ms transactions every 10 ms for 2 s; thread 1 stops at 1 s
        let t0: Vec<Txn> = (1..=200)
            .map(|i| Txn {
                end: 100.0 + i as f64 * 0.01,
                latency_us: 1000 + (i % 100) * 10,
            })
            .collect();
        let t1: Vec<Txn> = (1..=100)
            .map(|i| Txn {
                end: 100.0 + i as f64 * 0.01,
                latency_us: 1000,
            })
            .collect();
        let logs = Logs {
            threads: vec![t0, t1],
        };
        let w = logs.window(100.0, 105.0);
        assert!((w.seconds - 1.0).abs() < 1e-6, "{w:?}");
        assert_eq!(w.transactions, 198, "{w:?}");
        assert!(w.latency_ms_p50 <= w.latency_ms_p99 && w.latency_ms_p99 <= w.latency_ms_max);
        assert_eq!(logs.per_second(100.0), vec![(1.0, 198.0)]);
        assert_eq!(Logs::default().window(0.0, 1.0).tps, 0.0);
    }
}
