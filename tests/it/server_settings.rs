//! Running under the server's and the role's own settings (issue 12): a
//! role's statement timeout, a server that accepts and never answers, a row
//! locked for the whole run, large values, missing privileges, serializable
//! default isolation, few connections, a key rekey cannot page by, and an
//! application fixing an undecryptable value between rekey's read and write.
//!
//! These tests specify the designed behaviour. Above each one, a comment
//! records what the code of the day did instead when the test was written.

use std::io::Read;
use std::net::TcpListener;
use std::process::Output;
use std::time::{Duration, Instant};

use rekey::crypto::codec::versioned_gcm::VersionedGcm;
use rekey::crypto::codec::Codec;
use rekey::db::cluster::{ClusterOptions, TempCluster};

use crate::by_hand::{first_batch, open_job, Opened};
use crate::harness::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// How a `rekey` started with a deadline ended.
enum Bounded {
    /// It exited by itself, after this long.
    Exited(Output, Duration),
    /// It was still running at the deadline and was killed; what it had
    /// printed on stderr by then.
    Killed(String),
}

/// Runs `rekey` with a deadline: a command that is still running after
/// `limit` is killed (SIGKILL to this child only), so that a hang fails the
/// test instead of hanging it.
fn rekey_bounded(args: &[&str], env: &[(&str, String)], limit: Duration) -> Bounded {
    let started = Instant::now();
    let mut child = spawn_rekey_captured(args, env);
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let out_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stdout.read_to_end(&mut b);
        b
    });
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stderr.read_to_end(&mut b);
        b
    });
    loop {
        if let Some(status) = child.try_wait().expect("waiting for rekey") {
            let elapsed = started.elapsed();
            let stdout = out_reader.join().unwrap();
            let stderr = err_reader.join().unwrap();
            return Bounded::Exited(
                Output {
                    status,
                    stdout,
                    stderr,
                },
                elapsed,
            );
        }
        if started.elapsed() >= limit {
            child.kill().expect("killing rekey at its deadline");
            child.wait().expect("reaping rekey");
            let _ = out_reader.join();
            let stderr = err_reader.join().unwrap();
            return Bounded::Killed(String::from_utf8_lossy(&stderr).into_owned());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `rekey` to completion within `limit`, failing the test (after
/// killing it) if it is still running then.
fn rekey_within(args: &[&str], env: &[(&str, String)], limit: Duration) -> Output {
    match tokio::task::block_in_place(|| rekey_bounded(args, env, limit)) {
        Bounded::Exited(out, _) => out,
        Bounded::Killed(said) => panic!(
            "`rekey {}` was still running after {limit:?} and was killed; it had said:\n{said}",
            args.join(" ")
        ),
    }
}

/// Whether `role` has CREATE on the database (premise checks).
async fn may_create_in_database(db: &TestDb, role: &str) -> bool {
    db.client
        .query_one(
            "SELECT has_database_privilege($1, current_database(), 'CREATE')",
            &[&role],
        )
        .await
        .unwrap()
        .get(0)
}

/// Makes a login role (not superuser) that owns `patient_persons`; with
/// `create_on_database` it may also create rekey's schema (CREATE on the
/// database). It has TEMPORARY on the database (stage tables) either way.
async fn owner_role(db: &TestDb, suffix: &str, create_on_database: bool) -> String {
    let database = db_name(db).await;
    let name = format!("{database}_{suffix}");
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {name} LOGIN NOSUPERUSER NOBYPASSRLS;
             GRANT USAGE ON SCHEMA public TO {name};
             GRANT TEMPORARY ON DATABASE {database} TO {name};
             ALTER TABLE patient_persons OWNER TO {name};"
        ))
        .await
        .unwrap();
    if create_on_database {
        db.client
            .batch_execute(&format!("GRANT CREATE ON DATABASE {database} TO {name}"))
            .await
            .unwrap();
    }
    assert_eq!(
        may_create_in_database(db, &name).await,
        create_on_database,
        "premise: CREATE on the database as intended"
    );
    name
}

/// Creates `patient_persons` (the seed's shape) with `rows` rows sealed by
/// `codec`: as the harness's `seed_patients`, for data already under V2.
async fn seed_patients_sealed_by(db: &TestDb, rows: i64, codec: &VersionedGcm) {
    db.client
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
    let mut out = Vec::new();
    let mut start = 1;
    while start <= rows {
        let end = (start + 50_000 - 1).min(rows);
        let (mut ids, mut phones, mut emergencies) = (Vec::new(), Vec::new(), Vec::new());
        for id in start..=end {
            ids.push(id);
            codec.seal(phone(id).as_bytes(), b"", None, &mut out);
            phones.push(out.clone());
            emergencies.push((id % 3 != 0).then(|| {
                codec.seal(emergency(id).as_bytes(), b"", None, &mut out);
                out.clone()
            }));
        }
        db.client
            .execute(
                "INSERT INTO patient_persons (id, name, phone_encrypted, emergency_contact_phone_encrypted, notes)
                 SELECT id, 'patient ' || id, p, e, repeat('n', 120) FROM unnest($1::bigint[], $2::bytea[], $3::bytea[]) AS u(id, p, e)",
                &[&ids, &phones, &emergencies],
            )
            .await
            .unwrap();
        start = end + 1;
    }
    db.client
        .batch_execute("ANALYZE patient_persons")
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------
// 1. A role with a short statement_timeout
// ---------------------------------------------------------------------------

/// Rows for the statement-timeout tests: the 400k.
const TIMEOUT_ROWS: i64 = 400_000;

/// A role owning `patient_persons` (and allowed to create rekey's schema)
/// whose sessions start with `statement_timeout = 50ms`; returns its URL.
async fn impatient_role(db: &TestDb) -> String {
    let role = owner_role(db, "impatient", true).await;
    db.client
        .batch_execute(&format!("ALTER ROLE {role} SET statement_timeout = '50ms'"))
        .await
        .unwrap();
    let url = url_as(db, &role);
    // premise: the role's sessions get the timeout
    let as_role = connect(&url).await;
    let applied: String = as_role
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        applied, "50ms",
        "the role's statement_timeout does not apply to its sessions"
    );
    url
}

// Today: exit 1 at once, "rekey: counting rows to rotate in
// public.patient_persons: ... canceling statement due to statement
// timeout": the session that counts never gets rekey's own settings (nor
// would --statement-timeout 10m help).
#[tokio::test(flavor = "multi_thread")]
async fn a_role_with_a_50ms_statement_timeout_runs_400k_rows_to_the_end_without_being_told_a_longer_timeout(
) {
    let db = TestDb::new().await;
    db.seed_patients(TIMEOUT_ROWS).await;
    let url = impatient_role(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    let out = rekey_within(
        &["run", "--job", &j, "--database-url", &url, "--json"],
        &seed_env(),
        Duration::from_secs(600),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        json(&out)["values_rewritten"],
        values_in(TIMEOUT_ROWS),
        "{}",
        printed(&out)
    );
    db.assert_every_value_rotated(TIMEOUT_ROWS).await;
}

// Today: exit 1, "rekey: counting values of
// public.patient_persons.phone_encrypted: ... canceling statement due to
// statement timeout".
#[tokio::test(flavor = "multi_thread")]
async fn a_role_with_a_50ms_statement_timeout_plans_400k_rows() {
    let db = TestDb::new().await;
    db.seed_patients(TIMEOUT_ROWS).await;
    let url = impatient_role(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    let out = rekey_within(
        &["plan", "--job", &j, "--database-url", &url, "--json"],
        &seed_env(),
        Duration::from_secs(300),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        json(&out)["values_to_rewrite"],
        values_in(TIMEOUT_ROWS),
        "{}",
        printed(&out)
    );
}

// Today: exit 1 for the sampled verify and for --full alike, "rekey:
// counting values of public.patient_persons.phone_encrypted: ... canceling
// statement due to statement timeout".
#[tokio::test(flavor = "multi_thread")]
async fn a_role_with_a_50ms_statement_timeout_verifies_400k_rows_sampled_and_full() {
    let db = TestDb::new().await;
    // the table as a finished rotation leaves it: every value under V2
    seed_patients_sealed_by(&db, TIMEOUT_ROWS, &VersionedGcm::new(&v2_ring()).unwrap()).await;
    let url = impatient_role(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    // both depths are tried before either is judged, so a failure shows both
    let outs: Vec<(&str, Output)> = [("sampled", None), ("--full", Some("--full"))]
        .into_iter()
        .map(|(name, depth)| {
            let mut args = vec!["verify", "--job", &j, "--database-url", &url, "--json"];
            args.extend(depth);
            (
                name,
                rekey_within(&args, &seed_env(), Duration::from_secs(300)),
            )
        })
        .collect();
    let codes: Vec<(&str, Option<i32>)> = outs
        .iter()
        .map(|(name, out)| (*name, out.status.code()))
        .collect();
    assert_eq!(
        codes,
        vec![("sampled", Some(0)), ("--full", Some(0))],
        "{}",
        outs.iter()
            .map(|(name, out)| format!("{name}: {}", printed(out)))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for (name, out) in &outs {
        let v = json(out);
        assert_eq!(
            v["values_total"],
            values_in(TIMEOUT_ROWS),
            "verify {name}: {v}"
        );
        assert_eq!(
            v["values_on_target_key"],
            values_in(TIMEOUT_ROWS),
            "verify {name}: {v}"
        );
    }
}

// ---------------------------------------------------------------------------
// 2. A server that accepts connections and never answers
// ---------------------------------------------------------------------------

/// A job file for `patient_persons` with no database in it (the URL comes from `--database-url`).
fn patients_job_without_database(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("patients.toml");
    std::fs::write(
        &path,
        "[keys]\nsource = \"env\"\n\n[[target]]\ntable = \"patient_persons\"\nprimary_key = [\"id\"]\ncolumns = [\"phone_encrypted\", \"emergency_contact_phone_encrypted\"]\nformat = \"versioned-gcm\"\n",
    )
    .unwrap();
    path.display().to_string()
}

/// A TCP listener on 127.0.0.1 that accepts every connection and never
/// writes a byte (a stuck pooler, a half-dead host); returns its port. The
/// accepted sockets are kept open for the life of the test process.
fn silent_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    port
}

/// How long a command may take against the silent server with a 3 s connect timeout.
const SILENT_BOUND: Duration = Duration::from_secs(15);

/// Runs `run`, `plan` and `verify` at once against a silent server (with
/// `url` and `env`) and asserts that each exits 1 within [`SILENT_BOUND`]
/// with a message naming the host and the port.
fn assert_every_command_gives_up_on_a_silent_server(url: &str, port: u16, env: &[(&str, String)]) {
    let dir = tempfile::tempdir().unwrap();
    let j = patients_job_without_database(&dir);
    let commands: [&[&str]; 3] = [&["run", "--json"], &["plan"], &["verify"]];
    let outcomes: Vec<(String, Bounded)> = std::thread::scope(|s| {
        let running: Vec<_> = commands
            .iter()
            .map(|c| {
                let mut args: Vec<&str> = vec![c[0], "--job", &j, "--database-url", url];
                args.extend_from_slice(&c[1..]);
                let name = c[0].to_string();
                s.spawn(move || (name, rekey_bounded(&args, env, SILENT_BOUND)))
            })
            .collect();
        running.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut wrong = Vec::new();
    for (command, outcome) in &outcomes {
        match outcome {
            Bounded::Killed(said) => wrong.push(format!("`rekey {command}` still ran after {SILENT_BOUND:?} (killed); it had said: {said:?}")),
            Bounded::Exited(out, took) => {
                let said = stderr(out);
                if out.status.code() != Some(1) || !said.contains("127.0.0.1") || !said.contains(&port.to_string()) {
                    wrong.push(format!("`rekey {command}` exited {:?} after {took:?}; expected 1, naming 127.0.0.1 and port {port}; said: {said:?}", out.status.code()));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "against a server that never answers:\n{}",
        wrong.join("\n")
    );
}

// Today: `run`, `plan` and `verify` all still running (no output) when
// killed after 15 s: connect_timeout bounds the TCP connect only, not the
// start-up handshake the server never answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_never_answers_fails_run_plan_and_verify_within_the_connect_timeout_of_the_url(
) {
    let port = silent_server();
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=rekey connect_timeout=3");
    tokio::task::block_in_place(|| {
        assert_every_command_gives_up_on_a_silent_server(&url, port, &seed_env())
    });
}

// Today: as above, all three killed after 15 s with no output.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_never_answers_fails_run_plan_and_verify_within_pgconnect_timeout() {
    let port = silent_server();
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=rekey");
    let mut env = seed_env();
    env.push(("PGCONNECT_TIMEOUT", "3".into()));
    tokio::task::block_in_place(|| {
        assert_every_command_gives_up_on_a_silent_server(&url, port, &env)
    });
}

// ---------------------------------------------------------------------------
// 3. A row locked by the application for the whole run
// ---------------------------------------------------------------------------

// Today: exit 1 after ~10 s: the batch holding row 1000 is halved down to
// that one row, which fails 6 times ("failed 6 times, the last time with:
// ... canceling statement due to lock timeout"), and the run stops with the
// rest of its range (hundreds of values) still under V1.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_locked_for_the_whole_run_is_reported_not_rotated_and_every_other_value_is_rotated() {
    const ROWS: i64 = 2_000;
    const LOCKED: i64 = 1_000; // has both values (1000 % 3 != 0)
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let locked_values: i64 = db
        .client
        .query_one(
            "SELECT num_nonnulls(phone_encrypted, emergency_contact_phone_encrypted)::int8 FROM patient_persons WHERE id = $1",
            &[&LOCKED],
        )
        .await
        .unwrap()
        .get(0);

    // an application transaction holds the row's lock until after rekey exits
    let mut app = connect(&db.url).await;
    let tx = app.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM patient_persons WHERE id = $1 FOR UPDATE",
        &[&LOCKED],
    )
    .await
    .unwrap();
    let run = [
        "run",
        "--job",
        j.as_str(),
        "--json",
        "--lock-timeout",
        "200ms",
        "--batch-size",
        "200",
        "--workers",
        "2",
    ];
    let out = rekey_within(&run, &seed_env(), Duration::from_secs(180));
    // premise: the lock was held for the whole run (the transaction is still open)
    tx.execute("SELECT 1", &[])
        .await
        .expect("the application's transaction ended during the run");
    let after = db.decrypted_patients(&v2_ring()).await;
    // (the database's only job)
    let not_rotated: Vec<String> = db
        .client
        .query(
            "SELECT DISTINCT pk_text FROM rekey.not_rotated ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    tx.rollback().await.unwrap();

    assert_eq!(
        out.status.code(),
        Some(4),
        "values left on an old key: exit 4\n{}",
        printed(&out)
    );
    let summary = json(&out);
    assert_eq!(summary["values_not_rotated"], locked_values, "{summary}");
    assert_eq!(after.len() as i64, ROWS);
    for (id, (p, e)) in &after {
        let key = if *id == LOCKED { 1 } else { 2 };
        assert_eq!(*p, Decrypted::Plain(key, phone(*id)), "phone of {id}");
        let want = if id % 3 == 0 {
            Decrypted::Null
        } else {
            Decrypted::Plain(key, emergency(*id))
        };
        assert_eq!(*e, want, "emergency phone of {id}");
    }
    assert_eq!(
        not_rotated,
        vec![format!("({LOCKED})")],
        "rekey.not_rotated lists the locked row, and only it"
    );

    // the lock released, the next run rotates it
    let out = rekey_within(&run, &seed_env(), Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(ROWS).await;
}

// ---------------------------------------------------------------------------
// 4. Large values
// ---------------------------------------------------------------------------

/// The plaintext of row `id` in the large-values table: 40,000 to 50,000
/// pseudo-random bytes, the same every time it is asked for.
fn big_plaintext(id: i64) -> Vec<u8> {
    let len = 40_000 + (id as usize).wrapping_mul(7_919) % 10_001;
    let mut x = (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `patient_persons` with `rows` rows whose phone is a 40-50 KB value sealed under V1 (no emergency phones).
async fn seed_big_values(db: &TestDb, rows: i64) {
    db.client
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
    let mut out = Vec::new();
    let mut start = 1;
    while start <= rows {
        let end = (start + 100 - 1).min(rows);
        let ids: Vec<i64> = (start..=end).collect();
        let sealed: Vec<Vec<u8>> = ids
            .iter()
            .map(|&id| {
                codec.seal(&big_plaintext(id), b"", None, &mut out);
                out.clone()
            })
            .collect();
        db.client
            .execute(
                "INSERT INTO patient_persons (id, name, phone_encrypted, notes)
                 SELECT id, 'patient ' || id, p, 'n' FROM unnest($1::bigint[], $2::bytea[]) AS u(id, p)",
                &[&ids, &sealed],
            )
            .await
            .unwrap();
        start = end + 1;
    }
    db.client
        .batch_execute("ANALYZE patient_persons")
        .await
        .unwrap();
}

// Today: exit 0 but "batch_rows_max": 3000 against a bound of 209 (the
// first page reads the whole table, ~135 MB of values, in one batch) and
// "peak_rss_mib": 851.
#[tokio::test(flavor = "multi_thread")]
async fn values_of_40_kb_under_max_batch_bytes_8mib_make_batches_that_fit_and_two_lanes_stay_within_the_memory_bound(
) {
    const ROWS: i64 = 3_000;
    const MAX_BATCH_BYTES: i64 = 8 << 20;
    let db = TestDb::new().await;
    seed_big_values(&db, ROWS).await;
    let smallest: i32 = db
        .client
        .query_one(
            "SELECT min(octet_length(phone_encrypted)) FROM patient_persons",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        smallest >= 40_000,
        "premise: every value is at least 40 KB (smallest: {smallest} bytes)"
    );
    // no batch of values this large can hold more rows than this and stay within 8 MiB
    let most_rows = MAX_BATCH_BYTES / i64::from(smallest);
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    // two lanes, whatever the machine's CPU count, so that the bound does not depend on it
    let out = rekey_within(
        &[
            "run",
            "--job",
            &j,
            "--json",
            "--max-batch-bytes",
            "8MiB",
            "--workers",
            "2",
        ],
        &seed_env(),
        Duration::from_secs(300),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let s = json(&out);
    let batch_rows_max = s["batch_rows_max"]
        .as_i64()
        .unwrap_or_else(|| panic!("no batch_rows_max: {s}"));
    assert!(batch_rows_max <= most_rows, "a batch of {batch_rows_max} rows of values of at least {smallest} bytes passes --max-batch-bytes 8MiB (at most {most_rows} rows fit): {s}");
    let rss = s["peak_rss_mib"]
        .as_f64()
        .unwrap_or_else(|| panic!("no peak_rss_mib: {s}"));
    let worked: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM rekey.progress WHERE range_no >= 0 AND rows_scanned > 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        worked >= 2,
        "premise: both lanes rewrote rows ({worked} ranges worked)"
    );
    // README: memory stays under about lanes x 20 x --max-batch-bytes, plus ~50 MiB
    // (both lanes work: the one range is split for the second)
    let bound = 50.0 + 2.0 * 20.0 * 8.0;
    assert!(
        rss < bound,
        "peak RSS {rss} MiB with two lanes of 8 MiB batches (bound {bound} MiB): {s}"
    );
    assert_eq!(s["values_rewritten"], ROWS, "{s}");

    // every value is under V2 and opens to its plaintext
    let v2 = VersionedGcm::new(&v2_ring()).unwrap();
    for from in (1..=ROWS).step_by(500) {
        let rows = db.client.query("SELECT id, phone_encrypted FROM patient_persons WHERE id BETWEEN $1 AND $2 ORDER BY id", &[&from, &(from + 499)]).await.unwrap();
        for r in rows {
            let (id, value): (i64, Vec<u8>) = (r.get(0), r.get(1));
            let opened = v2.open(&value, b"").unwrap_or_else(|e| {
                panic!("value of {id} does not open under V1 or V2: {}", e.kind())
            });
            assert_eq!(opened.key, 2, "value of {id} is not on V2");
            assert!(
                *opened.plaintext == big_plaintext(id),
                "value of {id} opens to another plaintext"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 5. Privileges: where rekey keeps its state, and what it says when it cannot
// ---------------------------------------------------------------------------

/// Whether schema `name` exists in the database.
async fn schema_exists(db: &TestDb, name: &str) -> bool {
    db.client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&name],
        )
        .await
        .unwrap()
        .get(0)
}

/// How a DBA made schema `rekey` ready for a role without CREATE on the database.
#[derive(Debug, Clone, Copy)]
enum SchemaMadeFor {
    /// `CREATE SCHEMA rekey AUTHORIZATION role`.
    OwnedByTheRole,
    /// Created by the superuser, `GRANT USAGE, CREATE ON SCHEMA rekey TO role`.
    GrantedToTheRole,
}

async fn runs_in_a_schema_made_for_it(made: SchemaMadeFor) {
    const ROWS: i64 = 1_000;
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    let role = owner_role(&db, "app", false).await;
    let sql = match made {
        SchemaMadeFor::OwnedByTheRole => format!("CREATE SCHEMA rekey AUTHORIZATION {role}"),
        SchemaMadeFor::GrantedToTheRole => {
            format!("CREATE SCHEMA rekey; GRANT USAGE, CREATE ON SCHEMA rekey TO {role}")
        }
    };
    db.client.batch_execute(&sql).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    let out = rekey_within(
        &[
            "run",
            "--job",
            &j,
            "--database-url",
            &url_as(&db, &role),
            "--json",
        ],
        &seed_env(),
        Duration::from_secs(120),
    );
    assert_eq!(out.status.code(), Some(0), "{made:?}: {}", printed(&out));
    db.assert_every_value_rotated(ROWS).await;
    let done: i64 = db
        .client
        .query_one("SELECT count(*) FROM rekey.jobs WHERE state = 'done'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        done, 1,
        "{made:?}: the job is recorded in the schema made for it"
    );
}

// Today: exit 1, "creating rekey's engine schema (needs CREATE on the
// database, or create schema rekey for this role): permission denied for
// database ...": CREATE SCHEMA IF NOT EXISTS needs CREATE on the database
// even when the schema exists.
#[tokio::test(flavor = "multi_thread")]
async fn a_role_without_create_on_the_database_runs_in_a_rekey_schema_it_owns() {
    runs_in_a_schema_made_for_it(SchemaMadeFor::OwnedByTheRole).await;
}

// Today: exit 1, "permission denied for database ...", as above.
#[tokio::test(flavor = "multi_thread")]
async fn a_role_without_create_on_the_database_runs_in_a_rekey_schema_it_was_granted_usage_and_create_on(
) {
    runs_in_a_schema_made_for_it(SchemaMadeFor::GrantedToTheRole).await;
}

// Today: exit 2 at once, "error: unexpected argument '--state-schema' found".
#[tokio::test(flavor = "multi_thread")]
#[ignore = "--state-schema is not built yet: the engine names schema rekey in its SQL"]
async fn state_schema_puts_the_engine_state_in_the_schema_named_for_run_status_verify_and_plan() {
    const ROWS: i64 = 1_000;
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let in_state = ["--state-schema", "rekey_state"];

    let mut run = vec!["run", "--job", j.as_str(), "--json"];
    run.extend(in_state);
    let out = rekey_within(&run, &seed_env(), Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(ROWS).await;
    let jobs: bool = db
        .client
        .query_one("SELECT to_regclass('rekey_state.jobs') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(jobs, "rekey_state.jobs does not exist after the run");
    let recorded: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM rekey_state.jobs WHERE state = 'done'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        recorded, 1,
        "the finished job is recorded in rekey_state.jobs"
    );

    // the other commands read it there
    let mut status = vec!["status", "--job", j.as_str(), "--json"];
    status.extend(in_state);
    let out = rekey_within(&status, &seed_env(), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        json(&out)["state"],
        "done",
        "status finds the job in rekey_state: {}",
        printed(&out)
    );
    for command in ["verify", "plan"] {
        let mut args = vec![command, "--job", j.as_str()];
        args.extend(in_state);
        let out = rekey_within(&args, &seed_env(), Duration::from_secs(60));
        assert_eq!(out.status.code(), Some(0), "{command}: {}", printed(&out));
    }
    assert!(
        !schema_exists(&db, "rekey").await,
        "a schema rekey was created besides rekey_state"
    );
}

// Today: exit 2 at once, "error: unexpected argument '--state-schema' found".
#[tokio::test(flavor = "multi_thread")]
#[ignore = "--state-schema is not built yet: the engine names schema rekey in its SQL"]
async fn state_schema_puts_the_engine_state_in_the_schema_named_for_rotate_and_secrets() {
    let db = TestDb::new().await;
    db.seed_patients(1_000).await;
    let dir = tempfile::tempdir().unwrap();
    let (job, _keyring) = keyring_file_job(&db, &dir);

    let out = rekey_within(
        &[
            "rotate",
            "--job",
            &job,
            "--json",
            "--state-schema",
            "rekey_state",
            "--no-wait",
        ],
        &keyring_pass_env(),
        Duration::from_secs(120),
    );
    assert_eq!(out.status.code(), Some(6), "{}", printed(&out));
    assert_eq!(json(&out)["step"], "promoted", "{}", printed(&out));
    let rotations: i64 = db
        .client
        .query_one("SELECT count(*) FROM rekey_state.rotations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rotations, 1,
        "the rotation is recorded in rekey_state.rotations"
    );
    let out = rekey_within(
        &[
            "secrets",
            "show",
            "--job",
            &job,
            "--json",
            "--state-schema",
            "rekey_state",
        ],
        &keyring_pass_env(),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(
        !schema_exists(&db, "rekey").await,
        "a schema rekey was created besides rekey_state"
    );
}

/// The fixes a refusal may name for a role that can neither create the
/// engine schema nor find one it may use.
fn fixes_for(database: &str, role: &str) -> [String; 2] {
    [
        format!("GRANT CREATE ON DATABASE {database} TO {role}"),
        format!("CREATE SCHEMA rekey AUTHORIZATION {role}"),
    ]
}

// Today: exit 1, "rekey: creating rekey's engine schema (needs CREATE on the
// database, or create schema rekey for this role): permission denied for
// database ..."; naming no exact GRANT, and its second hint does not work
// (a schema made for the role is refused the same way).
#[tokio::test(flavor = "multi_thread")]
async fn a_role_that_can_neither_create_nor_use_an_engine_schema_is_refused_before_any_write_with_the_grant_to_run(
) {
    const ROWS: i64 = 500;
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    let role = owner_role(&db, "nocreate", false).await;
    let database = db_name(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let before = db.checksum("patient_persons").await;
    let run = [
        "run",
        "--job",
        j.as_str(),
        "--database-url",
        &url_as(&db, &role),
        "--json",
    ];

    let out = rekey_within(&run, &seed_env(), Duration::from_secs(60));
    assert_eq!(
        out.status.code(),
        Some(2),
        "a missing privilege is a configuration error: exit 2\n{}",
        printed(&out)
    );
    assert_eq!(
        db.checksum("patient_persons").await,
        before,
        "written before the refusal"
    );
    assert!(
        !schema_exists(&db, "rekey").await,
        "a schema rekey exists after the refusal"
    );
    let said = stderr(&out);
    let named: Vec<String> = fixes_for(&database, &role)
        .into_iter()
        .filter(|f| said.contains(f.as_str()))
        .collect();
    assert!(
        !named.is_empty(),
        "the refusal names the exact fix ({:?}): {said}",
        fixes_for(&database, &role)
    );

    // the fix it names works
    db.client
        .batch_execute(&named[0])
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the fix named does not run ({}): {}",
                named[0],
                db_error(&e)
            )
        });
    let out = rekey_within(&run, &seed_env(), Duration::from_secs(120));
    assert_eq!(
        out.status.code(),
        Some(0),
        "after `{}`: {}",
        named[0],
        printed(&out)
    );
    db.assert_every_value_rotated(ROWS).await;
}

/// A refusal on a database nobody may write to: exit 2 (or 1), saying so,
/// with no hint about privileges that could not help.
fn assert_refused_as_read_only(what: &str, out: &Output, says: &[&str]) {
    assert!(
        matches!(out.status.code(), Some(1) | Some(2)),
        "{what}: exit 2 (or 1)\n{}",
        printed(out)
    );
    let said = stderr(out).to_lowercase();
    assert!(
        says.iter().any(|s| said.contains(s)),
        "{what}: the message says why (one of {says:?}): {said}"
    );
    for hint in ["create schema rekey", "grant create", "needs create"] {
        assert!(
            !said.contains(hint),
            "{what}: a privilege hint ({hint:?}) that cannot help here: {said}"
        );
    }
}

// Today: exit 1, "rekey: creating rekey's engine schema (needs CREATE on
// the database, or create schema rekey for this role): cannot execute
// CREATE SCHEMA in a read-only transaction": a hint that cannot help.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_read_only_by_default_is_refused_saying_it_is_read_only_without_a_grant_hint() {
    let db = TestDb::new().await;
    db.seed_patients(200).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    let before = db.checksum("patient_persons").await;
    db.alter_database("SET default_transaction_read_only = on")
        .await;

    let out = rekey_within(
        &["run", "--job", &j, "--json"],
        &seed_env(),
        Duration::from_secs(60),
    );
    assert_refused_as_read_only(
        "run on a read-only database",
        &out,
        &["read-only", "read only"],
    );
    assert_eq!(db.checksum("patient_persons").await, before);
}

// Today: exit 1, "rekey: creating rekey's engine schema (needs CREATE on
// the database, or create schema rekey for this role): cannot execute
// CREATE SCHEMA in a read-only transaction".
#[tokio::test(flavor = "multi_thread")]
async fn a_hot_standby_is_refused_saying_it_is_a_standby_without_a_grant_hint() {
    let primary = TempCluster::start(ClusterOptions { durable: false }).expect("a private primary");
    let db = TestDb::on(&primary).await;
    db.seed_patients(200).await;
    let database = db_name(&db).await;
    let replica = tokio::task::block_in_place(|| primary.start_replica())
        .unwrap_or_else(|e| panic!("replica did not start: {e}\n{}", primary.log()));
    let standby_url = replica.url(&database);
    // premise: the table has reached the standby
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((c, conn)) = tokio_postgres::connect(&standby_url, tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            if c.query_one("SELECT count(*) FROM patient_persons", &[])
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) == 200)
            {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the seeded table never reached the standby\n{}",
            replica.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    let out = rekey_within(
        &["run", "--job", &j, "--database-url", &standby_url, "--json"],
        &seed_env(),
        Duration::from_secs(60),
    );
    assert_refused_as_read_only(
        "run on a hot standby",
        &out,
        &["standby", "recovery", "replica"],
    );
    drop(replica);
}

// ---------------------------------------------------------------------------
// 6. Serializable by default
// ---------------------------------------------------------------------------

/// rekey's statements of this database now waiting for a lock that backend `holder` holds.
async fn rekey_waits_on(db: &TestDb, holder: i32) -> bool {
    db.client
        .query_one(
            "SELECT count(*) > 0 FROM pg_stat_activity
              WHERE application_name = 'rekey' AND datname = current_database() AND $1 = ANY (pg_blocking_pids(pid))",
            &[&holder],
        )
        .await
        .unwrap()
        .get(0)
}

// Today: exit 1, "a batch of 50 rows of public.patient_persons failed 6
// times, the last time with: ... could not serialize access due to
// concurrent update": every lane's batch updates the same rows of rekey's
// own state (the key's nonce count, the job's progress), which under
// serializable fail on each collision instead of waiting their turn, and
// the retries run out.
#[tokio::test(flavor = "multi_thread")]
async fn serializable_default_isolation_with_the_application_writing_the_same_rows_completes_and_verifies(
) {
    // enough rows for several ranges (rekey runs no more lanes than ranges of 20,000 rows)
    const ROWS: i64 = 120_000;
    const HELD: i64 = 10_001;
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();
    db.alter_database("SET default_transaction_isolation = 'serializable'")
        .await;
    let mut app = connect(&db.url).await;
    let level: String = app
        .query_one("SHOW transaction_isolation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        level, "serializable",
        "premise: new sessions of the database are serializable"
    );
    let app_pid: i32 = app
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let v2 = VersionedGcm::new(&v2_ring()).unwrap();
    let saved = |id: i64| {
        let mut out = Vec::new();
        v2.seal(phone(id).as_bytes(), b"", None, &mut out);
        out
    };

    // A certain serialization failure: the application has saved row HELD
    // (under the current key) and commits only once a batch of rekey's waits
    // on the row, whose UPDATE then cannot serialize (its snapshot predates
    // the commit). This one transaction of the application's is READ
    // COMMITTED, so that its commit cannot be the one that fails.
    let tx = app
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
        .start()
        .await
        .unwrap();
    tx.execute(
        "UPDATE patient_persons SET phone_encrypted = $2 WHERE id = $1",
        &[&HELD, &saved(HELD)],
    )
    .await
    .unwrap();
    let mut child = spawn_rekey_captured(
        &[
            "run",
            "--job",
            &j,
            "--json",
            "--workers",
            "4",
            "--batch-size",
            "50",
        ],
        &seed_env(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    // (a run that ends before it meets the row is judged below by its exit)
    while !rekey_waits_on(&db, app_pid).await && child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "no batch of rekey's waited on row {HELD} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tx.commit().await.unwrap();

    // meanwhile the application goes on saving patients, each a serializable
    // read-then-write (skipping its own serialization failures)
    let mut saves = 0;
    let mut id = 1;
    let deadline = Instant::now() + Duration::from_secs(300);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!(
                "rekey still ran after 300 s (killed): {}",
                printed(&child.wait_with_output().unwrap())
            );
        }
        let tx = app.transaction().await.unwrap();
        let step = async {
            tx.query_one(
                "SELECT phone_encrypted FROM patient_persons WHERE id = $1",
                &[&id],
            )
            .await?;
            tx.execute(
                "UPDATE patient_persons SET phone_encrypted = $2 WHERE id = $1",
                &[&id, &saved(id)],
            )
            .await?;
            tx.commit().await
        };
        match step.await {
            Ok(()) => saves += 1,
            Err(e)
                if e.code()
                    == Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE) => {}
            Err(e) => panic!("the application's save of {id} failed: {}", db_error(&e)),
        }
        id = (id + 96) % ROWS + 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let out = child.wait_with_output().unwrap();
    println!("serializable: the application saved {saves} rows during the run");
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    let s = json(&out);
    // the application's writes met rekey's batches: under the database's
    // serializable default they would have failed them; rekey's sessions run
    // read committed, so a changed row is a conflict, re-read, not a failure
    assert!(
        s["conflicts"].as_u64().is_some_and(|c| c >= 1),
        "premise: the application's writes reached rekey's batches: {}",
        printed(&out)
    );
    assert_eq!(s["conflicts_left"], 0, "{}", printed(&out));
    db.assert_every_value_rotated(ROWS).await;
    let out = rekey_within(
        &["verify", "--job", &j, "--full", "--json"],
        &seed_env(),
        Duration::from_secs(120),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

// ---------------------------------------------------------------------------
// 7. Few connections
// ---------------------------------------------------------------------------

/// A private cluster started with `max_connections = n` (and the server's
/// default `superuser_reserved_connections`, 3), a database on it seeded
/// with `rows` patients, and a role owning the table that may create
/// rekey's schema (a role, not the superuser, so the reserved slots are
/// not its to take); returns the cluster, the database and the role's URL.
async fn few_connections(n: i32, rows: i64) -> (TempCluster, TestDb, String) {
    let cluster = TempCluster::start(ClusterOptions { durable: false }).expect("a private cluster");
    let admin = connect(&cluster.url("postgres")).await;
    admin
        .batch_execute(&format!("ALTER SYSTEM SET max_connections = {n}"))
        .await
        .unwrap();
    drop(admin);
    tokio::task::block_in_place(|| cluster.ctl(&["restart", "-w", "-t", "60", "-m", "fast"]))
        .unwrap_or_else(|e| panic!("restart failed: {e}\n{}", cluster.log()));
    let db = TestDb::on(&cluster).await;
    let applied: String = db
        .client
        .query_one("SHOW max_connections", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        applied,
        n.to_string(),
        "premise: the server runs with max_connections = {n}"
    );
    db.seed_patients(rows).await;
    let role = owner_role(&db, "app", true).await;
    let url = url_as(&db, &role);
    (cluster, db, url)
}

/// Rows enough for eight ranges of rekey's plan (it splits a table into
/// ranges of at least 20,000 rows, and runs no more lanes than ranges), so
/// that eight lanes have work.
const LANE_ROWS: i64 = 170_000;

/// Processes `rekey status --json` lists as holding leases on the job.
fn workers_listed(job: &str) -> Vec<serde_json::Value> {
    let out = rekey_within(
        &["status", "--job", job, "--json"],
        &seed_env(),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    json(&out)["workers"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("status lists no workers field: {}", printed(&out)))
}

// Today on this 2-core machine: passes (2 lanes, 6 connections fit); on a
// host with more cores the default lanes (CPU count, 2 connections each)
// pass the server's limit and the run exits 1 ("sorry, too many clients
// already").
#[tokio::test(flavor = "multi_thread")]
async fn with_max_connections_10_a_run_with_default_settings_completes() {
    let (_cluster, db, url) = few_connections(10, LANE_ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    let out = rekey_within(
        &["run", "--job", &j, "--database-url", &url, "--json"],
        &seed_env(),
        Duration::from_secs(180),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(LANE_ROWS).await;
    assert_eq!(
        workers_listed(&j),
        Vec::<serde_json::Value>::new(),
        "a finished run leaves nobody holding leases"
    );
}

// Today: exit 1 at once, "cannot connect to PostgreSQL: db error: FATAL:
// remaining connection slots are reserved for non-replication superuser
// connections" (8 lanes want 18 connections).
#[tokio::test(flavor = "multi_thread")]
async fn with_max_connections_10_a_run_with_8_workers_shrinks_to_what_the_server_allows_and_completes(
) {
    let (_cluster, db, url) = few_connections(10, LANE_ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    let out = rekey_within(
        &[
            "run",
            "--job",
            &j,
            "--database-url",
            &url,
            "--json",
            "--workers",
            "8",
        ],
        &seed_env(),
        Duration::from_secs(180),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    db.assert_every_value_rotated(LANE_ROWS).await;
}

// Today: the run exits 1 (it could not open its lanes' connections) and
// `status` still lists it as holding leases (until --lease-ttl, 30 s,
// passes): the lanes already started had leased ranges, and the run
// returned without giving them back.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_exits_by_itself_leaves_no_process_holding_leases() {
    let (_cluster, db, url) = few_connections(10, LANE_ROWS).await;
    let dir = tempfile::tempdir().unwrap();
    let j = db.patients_job(&dir).display().to_string();

    // whatever this run does with the few connections it gets (designed:
    // finish; today: exit 1), once it has exited nobody holds leases
    let out = rekey_within(
        &[
            "run",
            "--job",
            &j,
            "--database-url",
            &url,
            "--json",
            "--workers",
            "8",
        ],
        &seed_env(),
        Duration::from_secs(180),
    );
    let exited = out.status.code();
    assert!(
        exited.is_some(),
        "rekey was killed by a signal: {}",
        printed(&out)
    );
    let listed = workers_listed(&j);
    assert_eq!(
        listed,
        Vec::<serde_json::Value>::new(),
        "`rekey status` lists processes holding leases after the run exited {exited:?}:\n{}",
        printed(&out)
    );
}

// ---------------------------------------------------------------------------
// 8. A key column rekey cannot page by
// ---------------------------------------------------------------------------

/// Rows recorded in `rekey.jobs` (0 when rekey's schema does not exist).
async fn jobs_recorded(db: &TestDb) -> i64 {
    if !db
        .client
        .query_one("SELECT to_regclass('rekey.jobs') IS NOT NULL", &[])
        .await
        .unwrap()
        .get::<_, bool>(0)
    {
        return 0;
    }
    db.client
        .query_one("SELECT count(*) FROM rekey.jobs", &[])
        .await
        .unwrap()
        .get(0)
}

// Today: the job check accepts it, a job is opened, and the run exits 1
// at the write of its first batch: "writing a batch to public.pair_secrets:
// ... input of anonymous composite types is not implemented".
#[tokio::test(flavor = "multi_thread")]
async fn a_key_column_of_a_composite_type_is_refused_before_any_write() {
    let db = TestDb::new().await;
    let codec = v1_codec();
    db.client
        .batch_execute(
            "CREATE TYPE id_pair AS (a int, b int);
             CREATE TABLE pair_secrets (pair_key id_pair PRIMARY KEY, secret_encrypted bytea);",
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    for i in 0..100i32 {
        codec.seal(format!("secret {i}").as_bytes(), b"", None, &mut out);
        db.client
            .execute(
                "INSERT INTO pair_secrets VALUES (ROW($1, $2)::id_pair, $3)",
                &[&i, &(i * 7), &out],
            )
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("pairs.toml");
    std::fs::write(
        &job,
        format!(
            "[database]\nurl = \"{}\"\n\n[keys]\nsource = \"env\"\n\n[[target]]\ntable = \"pair_secrets\"\nprimary_key = [\"pair_key\"]\ncolumns = [\"secret_encrypted\"]\nformat = \"versioned-gcm\"\n",
            db.url
        ),
    )
    .unwrap();
    let j = job.display().to_string();
    let before = db.checksum("pair_secrets").await;

    let out = rekey_within(
        &["run", "--job", &j, "--json"],
        &seed_env(),
        Duration::from_secs(60),
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "a key rekey cannot page by is a configuration error: exit 2\n{}",
        printed(&out)
    );
    let said = stderr(&out);
    assert!(
        said.contains("pair_key") && said.contains("id_pair"),
        "the refusal names the column and its type: {said}"
    );
    assert_eq!(
        db.checksum("pair_secrets").await,
        before,
        "written before the refusal"
    );
    assert_eq!(
        jobs_recorded(&db).await,
        0,
        "a job was recorded before the refusal"
    );
}

// ---------------------------------------------------------------------------
// 9. An undecryptable value the application fixes between read and write
// ---------------------------------------------------------------------------

// Today: the batch's compare-and-swap leaves row 5 alone (a conflict), yet
// its tampered phone is still recorded in rekey.quarantine (auth_failed);
// the run that re-reads the row rotates the application's value and then
// exits 3, with the stale quarantine row left behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_value_the_application_fixes_between_read_and_write_is_not_quarantined() {
    use rekey::engine::sink::{Commit, Writer};

    const ROWS: i64 = 50;
    const FIXED: i64 = 5; // has both values (5 % 3 != 0)
    let db = TestDb::new().await;
    db.seed_patients(ROWS).await;
    // row 5's phone is tampered with: its tag no longer authenticates
    let mut tampered: Vec<u8> = db
        .client
        .query_one(
            "SELECT phone_encrypted FROM patient_persons WHERE id = $1",
            &[&FIXED],
        )
        .await
        .unwrap()
        .get(0);
    *tampered.last_mut().unwrap() ^= 0x55;
    db.client
        .execute(
            "UPDATE patient_persons SET phone_encrypted = $2 WHERE id = $1",
            &[&FIXED, &tampered],
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job_file = db.patients_job(&dir);
    let j = job_file.display().to_string();

    // a run as the pipeline does it, up to the write of its one batch
    let Opened {
        job,
        database,
        record,
    } = open_job(&db, &job_file, &seed_env()).await;
    assert_eq!(
        record.ranges.len(),
        1,
        "premise: one range, read in one page"
    );
    let target = &job.targets[0];
    let batch = first_batch(&database, target).await;

    // the application fixes row 5's phone (a good value under V1) in between
    let mut fixed = Vec::new();
    v1_codec().seal(phone(FIXED).as_bytes(), b"", None, &mut fixed);
    db.client
        .execute(
            "UPDATE patient_persons SET phone_encrypted = $2 WHERE id = $1",
            &[&FIXED, &fixed],
        )
        .await
        .unwrap();

    let mut writer = Writer::connect(&database, &job, record.id).await.unwrap();
    let counts = writer
        .write(target, Commit::Range(&record.ranges[0]), &batch)
        .await
        .unwrap()
        .counts;
    // premise: the application's fix made the row conflict (it is re-read at the end of the run)
    assert_eq!(counts.conflicts, 1, "premise: row {FIXED} conflicted");
    let pending: i64 = db
        .client
        .query_one("SELECT count(*) FROM rekey.conflicts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, 1, "premise: row {FIXED} waits in rekey.conflicts");
    let quarantined_for = || async {
        db.client
            .query_one(
                "SELECT count(*) FROM rekey.quarantine WHERE pk_text = $1",
                &[&format!("({FIXED})")],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(
        quarantined_for().await,
        0,
        "row {FIXED}'s value was quarantined though its row conflicted and will be re-read"
    );

    // the same command finishes the job: it re-reads row 5 and rotates the application's value
    let run = ["run", "--job", j.as_str(), "--json"];
    let out = rekey_within(&run, &seed_env(), Duration::from_secs(60));
    assert_eq!(
        out.status.code(),
        Some(0),
        "nothing is left undecryptable: exit 0, not 3\n{}",
        printed(&out)
    );
    db.assert_every_value_rotated(ROWS).await;
    // and a second run finds nothing to do and nothing quarantined
    let out = rekey_within(&run, &seed_env(), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(
        quarantined_for().await,
        0,
        "rekey.quarantine keeps a row for the value the application fixed"
    );
}
