//! Throwaway PostgreSQL clusters: for the test suite, the demo and `rekey bench`.
//!
//! A cluster lives in a private temp directory with its own unix socket
//! directory and a free port on 127.0.0.1, and is removed when dropped. The
//! server binaries are found on PATH, else through `pg_config --bindir`, else
//! in the newest `/usr/lib/postgresql/*/bin`. initdb and postgres refuse to run
//! as root, so under root they run as the `postgres` user through `runuser`.
//! A small watchdog process stops the server and removes the directory if the
//! owning process dies without dropping the cluster (kill -9, abort, or a
//! test binary exiting with the cluster in a static).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Why a throwaway cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No initdb/pg_ctl anywhere we know to look.
    #[error("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH, via pg_config, or in /usr/lib/postgresql/*/bin; install them (Debian: apt-get install postgresql) or pass --database-url")]
    NoBinaries,
    /// A setup step failed.
    #[error("{step} failed: {detail}")]
    Step {
        /// What was being done.
        step: String,
        /// What it printed.
        detail: String,
    },
}

/// Options for a throwaway cluster.
#[derive(Debug, Clone, Copy)]
pub struct ClusterOptions {
    /// Keep fsync on (benchmarks); off is fine for tests.
    pub durable: bool,
}

/// A running throwaway cluster, stopped and deleted on drop.
#[derive(Debug)]
pub struct TempCluster {
    /// Directory holding data, socket and log.
    dir: PathBuf,
    /// Directory of initdb/pg_ctl.
    bin: PathBuf,
    /// TCP port on 127.0.0.1.
    port: u16,
    /// OS user the server runs as, when we are root.
    run_as: Option<String>,
    /// Whether the server is (believed to be) running.
    running: bool,
}

impl TempCluster {
    /// Creates and starts a cluster.
    pub fn start(opts: ClusterOptions) -> Result<Self, ClusterError> {
        let bin = find_bindir().ok_or(ClusterError::NoBinaries)?;
        let run_as = is_root().then(|| "postgres".to_string());
        let dir =
            std::env::temp_dir().join(format!("rekey-pg-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).map_err(|e| step("creating the cluster directory", e))?;
        let mut cluster = TempCluster {
            dir,
            bin,
            port: 0,
            run_as,
            running: false,
        };
        if let Some(user) = &cluster.run_as {
            run(
                Command::new("chown")
                    .arg(format!("{user}:"))
                    .arg(&cluster.dir),
                "chown of the cluster directory",
            )?;
        }
        cluster.spawn_watchdog();
        let data = cluster.data_dir();
        cluster.pg(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
        )?;
        cluster.port = free_port()?;
        let mut conf = format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nmax_connections = 200\n\
             shared_buffers = 256MB\nmax_wal_size = 4GB\ncheckpoint_timeout = 30min\n",
            cluster.port,
            path_str(&cluster.dir)
        );
        if !opts.durable {
            conf.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        }
        let conf_path = data.join("postgresql.auto.conf");
        let mut existing = std::fs::read_to_string(&conf_path).unwrap_or_default();
        existing.push_str(&conf);
        cluster.write_as_owner(&conf_path, &existing)?;
        cluster.ctl(&["start", "-w", "-t", "60"])?;
        cluster.running = true;
        Ok(cluster)
    }

    /// A key=value connection string for database `dbname`.
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.port
        )
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs `pg_ctl` with `args` (e.g. `["restart", "-w", "-m", "fast"]`).
    pub fn ctl(&self, args: &[&str]) -> Result<(), ClusterError> {
        let data = self.data_dir();
        let log = self.dir.join("server.log");
        let mut all = vec!["-D", path_str(&data), "-l", path_str(&log)];
        all.extend_from_slice(args);
        self.pg("pg_ctl", &all)
    }

    /// Starts a streaming standby of this cluster and returns it.
    ///
    /// The standby is a base backup taken with `pg_basebackup -R -X stream`
    /// (fast checkpoint) into a new temp directory, started on its own free
    /// port and unix socket directory, following this cluster over TCP on
    /// 127.0.0.1: PostgreSQL 15's defaults (`wal_level = replica`,
    /// `max_wal_senders = 10`) and initdb's `host replication all
    /// 127.0.0.1/32 trust` line in `pg_hba.conf` are all it needs. It runs
    /// with `cluster_name = 'replica'`, so the primary's `pg_stat_replication`
    /// shows it under `application_name = 'replica'` with `sent_lsn`,
    /// `replay_lsn` and `replay_lag`. It is read-only (hot standby) and, like
    /// any [`TempCluster`], stopped and removed when dropped; drop it before
    /// the primary, or it logs reconnection attempts until it stops.
    ///
    /// Lag on demand: [`TempCluster::pause_replay`] on the standby (the same
    /// as `SELECT pg_wal_replay_pause()` there) keeps WAL arriving but stops
    /// applying it, so the primary's `pg_wal_lsn_diff(sent_lsn, replay_lsn)`
    /// grows with every write and rows written on the primary stay invisible
    /// on the standby; [`TempCluster::resume_replay`] lets it catch up.
    pub fn start_replica(&self) -> Result<TempCluster, ClusterError> {
        let dir =
            std::env::temp_dir().join(format!("rekey-pg-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).map_err(|e| step("creating the replica directory", e))?;
        let mut replica = TempCluster {
            dir,
            bin: self.bin.clone(),
            port: 0,
            run_as: self.run_as.clone(),
            running: false,
        };
        if let Some(user) = &replica.run_as {
            run(
                Command::new("chown")
                    .arg(format!("{user}:"))
                    .arg(&replica.dir),
                "chown of the replica directory",
            )?;
        }
        replica.spawn_watchdog();
        let data = replica.data_dir();
        let primary_port = self.port.to_string();
        replica.pg(
            "pg_basebackup",
            &[
                "-D",
                path_str(&data),
                "-h",
                "127.0.0.1",
                "-p",
                &primary_port,
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
        )?;
        replica.port = free_port()?;
        // The backup carries the primary's settings; these lines come later and win.
        let conf = format!(
            "port = {}\nunix_socket_directories = '{}'\ncluster_name = 'replica'\nhot_standby = on\n",
            replica.port,
            path_str(&replica.dir)
        );
        let conf_path = data.join("postgresql.auto.conf");
        let mut existing = std::fs::read_to_string(&conf_path)
            .map_err(|e| step("reading the replica's postgresql.auto.conf", e))?;
        existing.push_str(&conf);
        replica.write_as_owner(&conf_path, &existing)?;
        replica.ctl(&["start", "-w", "-t", "60"])?;
        replica.running = true;
        Ok(replica)
    }

    /// On a standby from [`TempCluster::start_replica`]: stops applying WAL
    /// (`SELECT pg_wal_replay_pause()`), so replication lag grows with every
    /// write on the primary until [`TempCluster::resume_replay`]. WAL keeps
    /// streaming in; only replay waits. Fails on a cluster that is not a standby.
    pub fn pause_replay(&self) -> Result<(), ClusterError> {
        self.psql("SELECT pg_wal_replay_pause()")
    }

    /// On a standby: applies WAL again after [`TempCluster::pause_replay`]
    /// (`SELECT pg_wal_replay_resume()`).
    pub fn resume_replay(&self) -> Result<(), ClusterError> {
        self.psql("SELECT pg_wal_replay_resume()")
    }

    /// Runs one SQL statement with `psql` against database `postgres`.
    fn psql(&self, sql: &str) -> Result<(), ClusterError> {
        let port = self.port.to_string();
        run(
            Command::new(self.bin.join("psql"))
                .args([
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-c",
                    sql,
                ])
                .current_dir(&self.dir),
            "psql",
        )
    }

    /// The server log so far (for test failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn pg(&self, program: &str, args: &[&str]) -> Result<(), ClusterError> {
        let exe = self.bin.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(args).current_dir(&self.dir);
        run(&mut cmd, program)
    }

    fn write_as_owner(&self, path: &Path, text: &str) -> Result<(), ClusterError> {
        std::fs::write(path, text).map_err(|e| step("writing postgresql.auto.conf", e))?;
        if let Some(user) = &self.run_as {
            run(
                Command::new("chown").arg(format!("{user}:")).arg(path),
                "chown of postgresql.auto.conf",
            )?;
        }
        Ok(())
    }

    /// Starts a detached process that cleans up if we die first.
    fn spawn_watchdog(&self) {
        let ctl = self.bin.join("pg_ctl");
        let as_user = self
            .run_as
            .as_ref()
            .map(|u| format!("runuser -u {u} -- "))
            .unwrap_or_default();
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             {as_user}'{ctl}' -D '{data}' stop -m immediate >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            ctl = ctl.display(),
            data = self.data_dir().display(),
            dir = self.dir.display(),
        );
        let _ = Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        if self.running {
            let _ = self.ctl(&["stop", "-m", "immediate", "-w"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn step(what: &str, e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Step {
        step: what.to_string(),
        detail: e.to_string(),
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<(), ClusterError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| step(what, e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(step(
        what,
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn free_port() -> Result<u16, ClusterError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| step("finding a free port", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| step("finding a free port", e))
}

fn is_root() -> bool {
    // The effective uid is the second field of `Uid:` (not /proc/self's owner,
    // which is root for a non-dumpable process whoever runs it).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2))
                .map(|uid| uid == "0")
        })
        .unwrap_or(false)
}

/// The directory holding initdb and pg_ctl.
pub fn find_bindir() -> Option<PathBuf> {
    let has_tools = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if has_tools(&d) {
                // Debian links /usr/bin tools to a wrapper; prefer the real directory.
                return Some(
                    std::fs::canonicalize(d.join("initdb"))
                        .ok()
                        .and_then(|p| p.parent().map(Path::to_path_buf))
                        .unwrap_or(d),
                );
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_tools(&d) {
            return Some(d);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, d)| has_tools(d))
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}
