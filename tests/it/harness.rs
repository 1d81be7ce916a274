//! The test harness: one throwaway cluster per test binary, a fresh database
//! per test, seed-shaped tables, and the `rekey` binary run as a user would.

use std::collections::BTreeMap;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use rekey::crypto::codec::versioned_gcm::VersionedGcm;
use rekey::crypto::codec::Codec;
use rekey::crypto::keyring::{Key, Keyring};
use rekey::db::cluster::{ClusterOptions, TempCluster};
use tokio_postgres::{Client, NoTls};

/// Old key (V1) and new key (V2) of the seed procedure, as hex.
pub const K1: &str = "5c2a8f0e7d1b3c4a96e8f7d2b1a0c3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0";
pub const K2: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f91";

/// A third key: neither V1 nor V2 of the seed.
pub const K3: &str = "3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b";

static CLUSTER: OnceLock<TempCluster> = OnceLock::new();
static NEXT_DB: AtomicU64 = AtomicU64::new(0);

/// The binary's one cluster, started on first use.
pub fn cluster() -> &'static TempCluster {
    CLUSTER.get_or_init(
        || match TempCluster::start(ClusterOptions { durable: false }) {
            Ok(c) => c,
            Err(e) => panic!("cannot start the test PostgreSQL cluster: {e}"),
        },
    )
}

/// A fresh database for one test.
pub struct TestDb {
    /// Connection string.
    pub url: String,
    /// A connection for setup and checks.
    pub client: Client,
}

impl TestDb {
    /// Creates an empty database on the binary's shared cluster.
    pub async fn new() -> TestDb {
        TestDb::on(cluster()).await
    }

    /// Creates an empty database on `c`: a test's own cluster, for faults
    /// that disturb the whole server (restarts, full disks).
    pub async fn on(c: &TempCluster) -> TestDb {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        let admin = connect(&c.url("postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let url = c.url(&name);
        let client = connect(&url).await;
        TestDb { url, client }
    }

    /// Creates the seed's `patient_persons` table with `rows` rows under V1:
    /// `phone_encrypted` everywhere, `emergency_contact_phone_encrypted` NULL in every third row.
    pub async fn seed_patients(&self, rows: i64) {
        self.client
            .batch_execute(
                "CREATE TABLE patient_persons (
                    id bigint PRIMARY KEY,
                    name text NOT NULL,
                    phone_encrypted bytea,
                    emergency_contact_phone_encrypted bytea,
                    notes text)",
            )
            .await
            .unwrap();
        let codec = v1_codec();
        let mut ids = Vec::new();
        let mut names = Vec::new();
        let mut phones = Vec::new();
        let mut emergencies = Vec::new();
        let mut out = Vec::new();
        for id in 1..=rows {
            ids.push(id);
            names.push(format!("patient {id}"));
            codec.seal(phone(id).as_bytes(), b"", None, &mut out);
            phones.push(out.clone());
            if id % 3 == 0 {
                emergencies.push(None);
            } else {
                codec.seal(emergency(id).as_bytes(), b"", None, &mut out);
                emergencies.push(Some(out.clone()));
            }
        }
        for chunk in 0..ids.len().div_ceil(50_000) {
            let r = chunk * 50_000..((chunk + 1) * 50_000).min(ids.len());
            self.client
                .execute(
                    "INSERT INTO patient_persons (id, name, phone_encrypted, emergency_contact_phone_encrypted, notes)
                     SELECT id, name, p, e, repeat('n', 120) FROM unnest($1::bigint[], $2::text[], $3::bytea[], $4::bytea[]) AS u(id, name, p, e)",
                    &[&&ids[r.clone()], &&names[r.clone()], &&phones[r.clone()], &&emergencies[r]],
                )
                .await
                .unwrap();
        }
        self.client
            .batch_execute("ANALYZE patient_persons")
            .await
            .unwrap();
    }

    /// Writes a job file for `patient_persons` and returns its path.
    pub fn patients_job(&self, dir: &tempfile::TempDir) -> std::path::PathBuf {
        self.patients_job_with(dir, "")
    }

    /// [`TestDb::patients_job`] limited to the rows where `filter` holds.
    pub fn patients_job_where(&self, dir: &tempfile::TempDir, filter: &str) -> std::path::PathBuf {
        self.patients_job_with(dir, &format!("where = \"{filter}\"\n"))
    }

    /// The patients' job file with `more` lines in its target.
    fn patients_job_with(&self, dir: &tempfile::TempDir, more: &str) -> std::path::PathBuf {
        let path = dir.path().join("patients.toml");
        std::fs::write(
            &path,
            format!(
                "[database]\nurl = \"{}\"\n\n[keys]\nsource = \"env\"\n\n[[target]]\ntable = \"patient_persons\"\nprimary_key = [\"id\"]\ncolumns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]\nformat = \"versioned-gcm\"\n{more}",
                self.url
            ),
        )
        .unwrap();
        path
    }

    /// Every (id -> (phone, emergency)) pair, decrypted with `keyring`, with the version byte of each.
    pub async fn decrypted_patients(
        &self,
        keyring: &Keyring,
    ) -> BTreeMap<i64, (Decrypted, Decrypted)> {
        let codec = VersionedGcm::new(keyring).unwrap();
        let rows = self
            .client
            .query("SELECT id, phone_encrypted, emergency_contact_phone_encrypted FROM patient_persons ORDER BY id", &[])
            .await
            .unwrap();
        rows.iter()
            .map(|r| {
                let open = |v: Option<Vec<u8>>| match v {
                    None => Decrypted::Null,
                    Some(v) => match codec.open(&v, b"") {
                        Ok(o) => Decrypted::Plain(
                            o.key,
                            String::from_utf8_lossy(&o.plaintext).into_owned(),
                        ),
                        Err(e) => Decrypted::Failed(e.kind()),
                    },
                };
                (r.get(0), (open(r.get(1)), open(r.get(2))))
            })
            .collect()
    }

    /// md5 of the whole table in key order: equal before and after means nothing changed.
    pub async fn checksum(&self, table: &str) -> String {
        self.client
            .query_one(
                &format!("SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {table} t"),
                &[],
            )
            .await
            .unwrap()
            .get::<_, Option<String>>(0)
            .unwrap_or_default()
    }
}

impl TestDb {
    /// Asserts that `patient_persons` still holds exactly the `rows` seeded
    /// rows and that every value opens under V2 (and only V2) to its seeded
    /// plaintext: nothing lost, nothing left behind, nothing encrypted twice
    /// (a value sealed twice would open to a ciphertext, not to its phone number).
    pub async fn assert_every_value_rotated(&self, rows: i64) {
        let after = self.decrypted_patients(&v2_ring()).await;
        assert_eq!(after.len() as i64, rows, "rows lost or added");
        for (id, (p, e)) in after {
            assert_eq!(p, Decrypted::Plain(2, phone(id)), "phone of {id}");
            let want = if id % 3 == 0 {
                Decrypted::Null
            } else {
                Decrypted::Plain(2, emergency(id))
            };
            assert_eq!(e, want, "emergency phone of {id}");
        }
    }

    /// md5 of the columns rekey must never write (`id`, `name`, `notes`).
    pub async fn unencrypted_checksum(&self) -> String {
        self.client
            .query_one("SELECT md5(string_agg(concat_ws(',', id, name, notes), '|' ORDER BY id)) FROM patient_persons", &[])
            .await
            .unwrap()
            .get::<_, Option<String>>(0)
            .unwrap_or_default()
    }

    /// Random-nonce encryptions `rekey.key_usage` counts under the key
    /// with `fingerprint` (0 where it counts none).
    pub async fn encryptions_under(&self, fingerprint: &str) -> i64 {
        self.client
            .query_one(
                "SELECT coalesce(sum(encryptions), 0)::bigint FROM rekey.key_usage WHERE fingerprint = $1",
                &[&fingerprint],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Encrypted values `patient_persons` holds now, counted.
    pub async fn encrypted_values(&self) -> i64 {
        self.client
            .query_one(
                "SELECT count(phone_encrypted) + count(emergency_contact_phone_encrypted) FROM patient_persons",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Records that the target key (V2's) has encrypted 2^32 - 2^27 values
    /// before, so its batches count one at a time. Returns its fingerprint
    /// and that count.
    pub async fn near_its_nonce_budget(&self) -> (String, i64) {
        let before: i64 = (1 << 32) - (1 << 27);
        let fingerprint = v2_ring().target().fingerprint();
        rekey::state::ensure_schema(&mut connect(&self.url).await)
            .await
            .unwrap();
        self.client
            .execute(
                "INSERT INTO rekey.key_usage (fingerprint, shard, key_label, encryptions) VALUES ($1, 99, 'earlier runs', $2)",
                &[&fingerprint, &before],
            )
            .await
            .unwrap();
        (fingerprint, before)
    }

    /// `ALTER DATABASE <this one> ...` (e.g. `SET statement_timeout = '100ms'`): applies to sessions opened afterwards.
    pub async fn alter_database(&self, change: &str) {
        let name: String = self
            .client
            .query_one("SELECT current_database()", &[])
            .await
            .unwrap()
            .get(0);
        self.client
            .batch_execute(&format!("ALTER DATABASE {name} {change}"))
            .await
            .unwrap();
    }
}

/// Encrypted values in `rows` seeded patients: every phone, and the emergency
/// phone of two rows in three.
pub fn values_in(rows: i64) -> i64 {
    rows + (rows - rows / 3)
}

/// One value as the check sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decrypted {
    /// NULL.
    Null,
    /// Opened under key id, with this plaintext.
    Plain(u32, String),
    /// Did not open.
    Failed(&'static str),
}

/// The plaintext phone of patient `id`.
pub fn phone(id: i64) -> String {
    format!("+1555{id:07}")
}

/// The plaintext emergency phone of patient `id`.
pub fn emergency(id: i64) -> String {
    format!("+1444{id:07}")
}

/// Keyring with V1 only, current V1 (how the data was written).
pub fn v1_ring() -> Keyring {
    Keyring::new(vec![Key::parse(1, K1).unwrap()], 1, None).unwrap()
}

/// Keyring with V1 and V2, current V2.
pub fn v2_ring() -> Keyring {
    Keyring::new(
        vec![Key::parse(1, K1).unwrap(), Key::parse(2, K2).unwrap()],
        2,
        None,
    )
    .unwrap()
}

/// A codec that writes V1 values.
pub fn v1_codec() -> VersionedGcm {
    VersionedGcm::new(&v1_ring()).unwrap()
}

/// Connects for setup and checks.
pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect to test cluster");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// The environment of the seed after step 2: V1 and V2 set, current version 2.
pub fn seed_env() -> Vec<(&'static str, String)> {
    vec![
        ("ENCRYPTION_KEY_V1", K1.into()),
        ("ENCRYPTION_KEY_V2", K2.into()),
        ("ENCRYPTION_CURRENT_VERSION", "2".into()),
    ]
}

/// Key 1 alone, current: the environment before a first rotation.
pub fn v1_env() -> Vec<(&'static str, String)> {
    vec![
        ("ENCRYPTION_KEY_V1", K1.into()),
        ("ENCRYPTION_CURRENT_VERSION", "1".into()),
    ]
}

/// A `rekey` command with a clean environment plus `env`.
pub fn rekey_cmd(args: &[&str], env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rekey"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `rekey` to completion.
pub fn rekey(args: &[&str], env: &[(&str, String)]) -> Output {
    rekey_cmd(args, env).output().expect("run rekey")
}

/// `rekey secrets stage`, then `rekey secrets promote`, of `job` with
/// `env`: the store's next key made current; each must exit 0.
pub fn stage_and_promote(job: &str, env: &[(&str, String)]) {
    for step in ["stage", "promote"] {
        let out = rekey(&["secrets", step, "--job", job], env);
        assert_eq!(out.status.code(), Some(0), "{step}: {}", printed(&out));
    }
}

/// Stages and promotes the next key of the job's keyring file, then runs
/// the job: its values move to it.
pub fn stage_promote_and_run(job: &str) {
    stage_and_promote(job, &keyring_pass_env());
    let out = rekey(&["run", "--job", job], &keyring_pass_env());
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

/// A compromise rotation of `job` in one invocation (`--no-wait`, no
/// grace), with `env`.
pub fn compromise_rotation(job: &str, env: &[(&str, String)]) -> Output {
    rekey(
        &[
            "rotate",
            "--job",
            job,
            "--no-wait",
            "--grace",
            "0s",
            "--reason",
            "compromise",
        ],
        env,
    )
}

/// stdout parsed as the one JSON object `--json` promises.
pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Everything a command printed, for assertions and failure messages.
pub fn printed(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[cfg(feature = "aws")]
/// A moto server (AWS APIs on loopback) for the whole test binary.
pub struct Moto {
    /// Its endpoint URL.
    pub endpoint: String,
    /// The server process, kept (not waited on) for the life of the binary; the watchdog stops it.
    _server: std::sync::Mutex<std::process::Child>,
}

#[cfg(feature = "aws")]
static MOTO: OnceLock<Moto> = OnceLock::new();

#[cfg(feature = "aws")]
/// Starts moto's server on a free loopback port, once; a watchdog stops it
/// when this test process ends, however it ends.
pub fn moto() -> &'static Moto {
    MOTO.get_or_init(|| {
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m moto.server (scripts/test.sh installs moto)");
        let watchdog = format!(
            "while kill -0 {} 2>/dev/null; do sleep 1; done; kill {} 2>/dev/null",
            std::process::id(),
            child.id()
        );
        let _ = Command::new("setsid")
            .args(["sh", "-c", &watchdog])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "moto server did not start on port {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Moto {
            endpoint: format!("http://127.0.0.1:{port}"),
            _server: std::sync::Mutex::new(child),
        }
    })
}

#[cfg(feature = "aws")]
/// Credentials and region for moto (its credentials are not checked).
pub fn aws_env() -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ]
}

/// `rekey` in the background, its output discarded (to be killed by a test).
pub fn spawn_rekey(args: &[&str], env: &[(&str, String)]) -> std::process::Child {
    rekey_cmd(args, env)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn rekey")
}

/// `rekey` in the background with stdout and stderr captured (for
/// `wait_with_output` once it is done).
pub fn spawn_rekey_captured(args: &[&str], env: &[(&str, String)]) -> std::process::Child {
    rekey_cmd(args, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rekey")
}

/// A database error as the server said it ("db error" alone says nothing).
pub fn db_error(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_string())
}

/// Whether rekey has created its engine state (`rekey.progress`) in the database yet.
pub async fn engine_state_exists(db: &TestDb) -> bool {
    db.client
        .query_one("SELECT to_regclass('rekey.progress') IS NOT NULL", &[])
        .await
        .unwrap_or_else(|e| panic!("looking for rekey.progress: {}", db_error(&e)))
        .get(0)
}

/// Values committed so far by every job of the database. Before rekey has
/// created its engine state nothing can have been committed, so that alone
/// reads as 0; any error reading it fails the test.
pub async fn committed_values(db: &TestDb) -> i64 {
    if !engine_state_exists(db).await {
        return 0;
    }
    db.client
        .query_one(
            "SELECT coalesce(sum(values_rewritten), 0)::bigint FROM rekey.progress",
            &[],
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "reading the values committed from rekey.progress: {}",
                db_error(&e)
            )
        })
        .get(0)
}

/// Values committed by the database's one running job, which must exist:
/// "nothing written" means something only once rekey has started its job
/// (a rekey that never started also writes nothing).
pub async fn committed_by_running_job(db: &TestDb) -> i64 {
    assert!(
        engine_state_exists(db).await,
        "rekey has not created its engine state: it never started its job"
    );
    let rows = db
        .client
        .query(
            "SELECT j.job_id, coalesce(sum(p.values_rewritten), 0)::bigint FROM rekey.jobs j
               LEFT JOIN rekey.progress p USING (job_id) WHERE j.state = 'running' GROUP BY j.job_id",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("reading the running job from rekey.jobs: {}", db_error(&e)));
    assert_eq!(
        rows.len(),
        1,
        "expected exactly one running job in rekey.jobs"
    );
    rows[0].get(1)
}

/// Waits until the values committed by every job of the database reach
/// Waits until `sql` counts at least one row, while `child` runs; fails
/// the test, naming `what`, if rekey ends first or 30 s pass.
pub async fn until(db: &TestDb, sql: &str, child: &mut std::process::Child, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let n: i64 = db.client.query_one(sql, &[]).await.unwrap().get(0);
        if n > 0 {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "rekey ended before {what}"
        );
        assert!(std::time::Instant::now() < deadline, "never {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `threshold`, or `child` has exited.
pub async fn wait_for_progress(db: &TestDb, child: &mut std::process::Child, threshold: i64) {
    loop {
        let done = committed_values(db).await;
        if done >= threshold || child.try_wait().map(|s| s.is_some()).unwrap_or(true) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// Runs a Python script (stdin `input`), returning stdout; fails the test on error.
pub fn python(script: &str, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 is needed (scripts/test.sh installs cryptography and tink)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A tiny tmpfs mounted on a temp directory (owned by the server's user), for
/// a tablespace that fills up; unmounted when dropped. Mounting needs root
/// and a kernel/container that allows it.
pub struct TinyDisk {
    /// The mount point.
    dir: tempfile::TempDir,
}

impl TinyDisk {
    /// Mounts a tmpfs of `size` (e.g. `"16M"`), or says why it cannot.
    pub fn mount(size: &str) -> Result<TinyDisk, String> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map_err(|e| format!("cannot run id: {e}"))?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("mounting a tmpfs needs root".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed (an unprivileged container?): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let disk = TinyDisk { dir };
        // The test cluster runs as `postgres` under root (see TempCluster).
        let chown = Command::new("chown")
            .arg("postgres:")
            .arg(disk.path())
            .output()
            .map_err(|e| e.to_string())?;
        if !chown.status.success() {
            return Err(format!(
                "chown postgres of the mount failed: {}",
                String::from_utf8_lossy(&chown.stderr).trim()
            ));
        }
        Ok(disk)
    }

    /// The mount point.
    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        // Lazy: a server still holding files there lets go when it stops.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .output();
    }
}

/// The passphrase of the keyring files tests create.
pub const KEYRING_PASS: &str = "correct horse battery staple";

/// The environment giving [`KEYRING_PASS`] to rekey.
pub fn keyring_pass_env() -> Vec<(&'static str, String)> {
    vec![("REKEY_KEYRING_PASSPHRASE", KEYRING_PASS.to_string())]
}

/// A keyring file holding K1 as current key 1 (sealed with
/// [`KEYRING_PASS`]), and a job over `patient_persons` using it; returns the
/// job file and the keyring file.
pub fn keyring_file_job(db: &TestDb, dir: &tempfile::TempDir) -> (String, std::path::PathBuf) {
    let keyring = dir.path().join("keyring.json");
    keyring_file_with_key_1(&keyring, K1);
    let job = dir.path().join("patients.toml");
    std::fs::write(
        &job,
        format!(
            "[database]\nurl = \"{}\"\n[keys]\nsource = \"file\"\npath = {:?}\n[[target]]\ntable = \"patient_persons\"\ncolumns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]\nformat = \"versioned-gcm\"\n",
            db.url,
            keyring.display().to_string()
        ),
    )
    .unwrap();
    (job.display().to_string(), keyring)
}

/// Creates a keyring file at `path` (sealed with [`KEYRING_PASS`]) holding
/// one key, id 1 and current, of material `hex`.
pub fn keyring_file_with_key_1(path: &std::path::Path, hex: &str) {
    use rekey::crypto::keytable::{Entry, KeyState, KeyTable};
    let table = KeyTable {
        entries: vec![Entry {
            id: 1,
            state: KeyState::Current,
            created_at: 1,
            changed_at: 1,
            key: Some(Key::parse(1, hex).unwrap()),
            compromised: false,
        }],
    };
    rekey::secrets::file::KeyringFile::create(path, KEYRING_PASS.as_bytes(), table).unwrap();
}

/// What a command wrote to stderr, as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The progress lines (those with `rows_done`) of a log written with
/// `--log-format json`, in order.
pub fn progress_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("rows_done").is_some())
        .collect()
}

/// The current database's name: roles are per cluster, so names made from it
/// do not collide between tests.
pub async fn db_name(db: &TestDb) -> String {
    db.client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0)
}

/// `db.url` with the user replaced by `role`, password `pw` (the harness's
/// URLs name `user=postgres`; its servers trust local connections).
pub fn url_as(db: &TestDb, role: &str) -> String {
    assert!(
        db.url.contains("user=postgres"),
        "the harness's URL changed shape: {}",
        db.url
    );
    db.url
        .replace("user=postgres", &format!("user={role} password=pw"))
}

/// A loopback port free a moment ago (for a listener the test starts, or one
/// nothing listens on).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// rekey's statements of this database now waiting for a lock, as (pid,
/// statement start): one entry per statement, however often it is seen.
pub async fn lock_waits(db: &TestDb) -> Vec<(i32, String)> {
    db.client
        .query(
            "SELECT pid, query_start::text FROM pg_stat_activity
              WHERE application_name = 'rekey' AND datname = current_database() AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The audit events a job named `patients` wrote beside its job file in `dir`.
pub fn audit_events(dir: &tempfile::TempDir) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.path().join("patients.audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The key table of the keyring file at `path` (sealed with [`KEYRING_PASS`]).
pub fn keyring_table(path: &std::path::Path) -> rekey::crypto::keytable::KeyTable {
    rekey::secrets::file::KeyringFile::open(path, KEYRING_PASS.as_bytes(), "P")
        .unwrap()
        .table
}

/// A keyring of key `id` of the keyring file at `path`, alone and current.
pub fn keyring_file_key(path: &std::path::Path, id: u32) -> Keyring {
    let table = keyring_table(path);
    let material = hex::encode(table.keyring().unwrap().get(id).unwrap().material());
    Keyring::new(vec![Key::parse(id, &material).unwrap()], id, None).unwrap()
}

/// Moves every rotation's promotion two days back: the default grace
/// period is over.
pub async fn pretend_grace_passed(db: &TestDb) {
    db.client
        .execute(
            "UPDATE rekey.rotations SET promoted_at = promoted_at - interval '2 days'",
            &[],
        )
        .await
        .unwrap();
}

/// Whether a session of rekey holds the session-level lock named `name`
/// (`rekey.job:<job>`, `rekey.lifecycle:<job>`).
pub async fn advisory_lock_held(db: &TestDb, name: &str) -> bool {
    db.client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                             WHERE a.application_name = 'rekey' AND l.locktype = 'advisory' AND l.granted
                               AND a.datname = current_database()
                               AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended($1, 0))",
            &[&name],
        )
        .await
        .unwrap()
        .get(0)
}

/// Ends every session of rekey on the test database that holds one of its
/// session-level locks (a command's own session); returns how many.
pub async fn end_rekeys_lock_holding_sessions(db: &TestDb) -> i64 {
    db.client
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))::bigint FROM (
               SELECT DISTINCT l.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND a.application_name = 'rekey'
                  AND a.datname = current_database()) AS holders",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits until no session of rekey is left on the test database: after a
/// kill -9, a batch whose COMMIT the server had received still commits,
/// so what the tables hold is settled only once its sessions ended.
pub async fn wait_for_rekeys_sessions_to_end(db: &TestDb) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let left: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE application_name = 'rekey' AND datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left} sessions of rekey still open a minute after it ended"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Waits, up to a minute, until another session of `db` runs (or waits
/// in, or last ran) a statement containing `needle`: a run held at its
/// `--gate-sql` (with a short `--check-every`, so that the gate is the
/// statement its session runs most).
pub async fn wait_for_query(db: &TestDb, needle: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let asked: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                   AND pid <> pg_backend_pid() AND strpos(query, $1) > 0",
                &[&needle],
            )
            .await
            .unwrap()
            .get(0);
        if asked > 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no session ran {needle:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
