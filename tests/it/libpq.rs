//! Connections as libpq makes them: from the `PG*` variables alone, with the
//! password from `PGPASSWORD` or a password file (ignored when others can
//! read it), and from a connection service file, against a server that asks
//! for a password.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use crate::harness::*;

/// A role the shared cluster admits over TCP with its password only.
const PW_USER: &str = "pw_user";
const PW: &str = "pw-s3cret";

static PASSWORD_AUTH: OnceCell<()> = OnceCell::const_new();

/// Makes the shared cluster ask `PW_USER` for a password (scram-sha-256)
/// and waits until it does.
async fn password_auth() {
    PASSWORD_AUTH
        .get_or_init(|| async {
            let admin = connect(&cluster().url("postgres")).await;
            let hba: String = admin.query_one("SHOW hba_file", &[]).await.unwrap().get(0);
            let rules = std::fs::read_to_string(&hba).unwrap();
            std::fs::write(
                &hba,
                format!("host all {PW_USER} 127.0.0.1/32 scram-sha-256\n{rules}"),
            )
            .unwrap();
            admin
                .batch_execute(&format!(
                    "SET password_encryption = 'scram-sha-256';
                     CREATE ROLE {PW_USER} SUPERUSER LOGIN PASSWORD '{PW}';
                     SELECT pg_reload_conf();"
                ))
                .await
                .unwrap();
            // the reload is asynchronous: wait until a password-less session is refused
            let url = cluster()
                .url("postgres")
                .replace("user=postgres", &format!("user={PW_USER}"));
            let deadline = Instant::now() + Duration::from_secs(30);
            while tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .is_ok()
            {
                assert!(Instant::now() < deadline, "pg_hba.conf was not reloaded");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
}

/// A job for the patients table that names no database.
fn job_without_url(db: &TestDb, dir: &tempfile::TempDir) -> String {
    let path = db.patients_job(dir);
    let text = std::fs::read_to_string(&path).unwrap();
    let (_, after) = text.split_once("\n\n").unwrap();
    assert!(after.starts_with("[keys]"), "{text}");
    std::fs::write(&path, after).unwrap();
    path.display().to_string()
}

fn pg_env(dbname: &str) -> Vec<(&'static str, String)> {
    let mut env = seed_env();
    env.extend([
        ("PGHOST", "127.0.0.1".to_string()),
        ("PGPORT", cluster().port().to_string()),
        ("PGUSER", PW_USER.to_string()),
        ("PGDATABASE", dbname.to_string()),
    ]);
    env
}

#[tokio::test(flavor = "multi_thread")]
async fn pg_variables_alone_reach_a_server_that_asks_for_a_password() {
    password_auth().await;
    let db = TestDb::new().await;
    db.seed_patients(30).await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_without_url(&db, &dir);
    let name = db_name(&db).await;

    let out = rekey(&["plan", "--job", &job, "--json"], &pg_env(&name));
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let said = stderr(&out);
    assert!(
        said.contains(&format!("127.0.0.1:{}", cluster().port()))
            && said.contains(&name)
            && said.contains(PW_USER),
        "the error names host, port, database and user: {said}"
    );

    let mut env = pg_env(&name);
    env.push(("PGPASSWORD", PW.to_string()));
    let out = rekey(&["plan", "--job", &job, "--json"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert!(!printed(&out).contains(PW), "the password was printed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_password_file_gives_the_password_unless_others_can_read_it() {
    password_auth().await;
    let db = TestDb::new().await;
    db.seed_patients(30).await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_without_url(&db, &dir);
    let name = db_name(&db).await;
    let pgpass = dir.path().join("pgpass");
    std::fs::write(
        &pgpass,
        format!(
            "# host:port:db:user:password\nelsewhere:*:*:*:wrong\n127.0.0.1:{}:*:{PW_USER}:{PW}\n",
            cluster().port()
        ),
    )
    .unwrap();
    let mut env = pg_env(&name);
    env.push(("PGPASSFILE", pgpass.display().to_string()));

    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = rekey(&["plan", "--job", &job], &env);
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(
        stderr(&out).contains("group or world access"),
        "{}",
        printed(&out)
    );

    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = rekey(&["plan", "--job", &job], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_service_names_the_server() {
    password_auth().await;
    let db = TestDb::new().await;
    db.seed_patients(30).await;
    let dir = tempfile::tempdir().unwrap();
    let job = job_without_url(&db, &dir);
    let name = db_name(&db).await;
    let services = dir.path().join("pg_service.conf");
    std::fs::write(
        &services,
        format!(
            "[other]\nhost=nowhere.invalid\n\n[billing]\nhost=127.0.0.1\nport={}\nuser={PW_USER}\ndbname={name}\npassword={PW}\n",
            cluster().port()
        ),
    )
    .unwrap();
    let mut env = seed_env();
    env.push(("PGSERVICEFILE", services.display().to_string()));
    env.push(("PGSERVICE", "billing".to_string()));
    let out = rekey(&["plan", "--job", &job], &env);
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));

    let out = rekey(
        &["plan", "--job", &job, "--database-url", "service=missing"],
        &env,
    );
    assert_eq!(out.status.code(), Some(2), "{}", printed(&out));
    assert!(
        stderr(&out).contains("service \"missing\" not found"),
        "{}",
        printed(&out)
    );
}
