//! Running under the server's and the role's own settings (issue 12): a
//! role's statement timeout, a server that accepts and never answers, a row
//! locked for the whole run, large values, missing privileges, a published
//! table without a replica identity, serializable default isolation, few
//! connections, a key rekey cannot page by, and an application fixing an
//! undecryptable value between rekey's read and write.
//!
//! These tests specify the designed behaviour. Above each one, a comment
//! records what the code of the day did instead when the test was written.

use std::io::Read;
use std::process::Output;
use std::time::{Duration, Instant};

use rekey::crypto::codec::versioned_gcm::VersionedGcm;
use rekey::crypto::codec::Codec;

use crate::harness::*;

mod application_fix;
mod composite_key;
mod few_connections;
mod idle_session;
mod large_values;
mod locked_row;
mod locked_table;
mod privileges;
mod publication;
mod serializable;
mod silent_server;
mod statement_timeout;

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

/// Runs `rekey <command> --job <job> --database-url <url> --json`, then
/// `extra`, as [`rekey_within`] does: connected as the role of `url`.
fn rekey_as(url: &str, command: &str, job: &str, extra: &[&str], limit: Duration) -> Output {
    let mut args = vec![command, "--job", job, "--database-url", url, "--json"];
    args.extend_from_slice(extra);
    rekey_within(&args, &seed_env(), limit)
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
    create_patient_persons(db).await;
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

/// Creates `patient_persons` empty, in the shape the harness's
/// `seed_patients` gives it, for the seeds here that fill it otherwise.
async fn create_patient_persons(db: &TestDb) {
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
}
