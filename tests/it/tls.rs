//! TLS to PostgreSQL: each `sslmode` does what libpq's does. The TLS tests use
//! a cluster of this module's own, serving a certificate for `localhost` only
//! from a CA made here; the harness's shared cluster keeps TLS off, which the
//! no-fallback test needs (and turning TLS on there would change every other test).

use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rekey::db::cluster::{ClusterOptions, TempCluster};
use rekey::db::{ConnectError, Database};
use tokio::sync::OnceCell;

use crate::harness::*;

/// A role the TLS cluster admits over TLS only (`hostnossl ... reject` in pg_hba.conf).
const TLS_ONLY: &str = "tls_only";

/// The TLS cluster and the CA that signed its certificate.
struct Tls {
    /// Serves TLS with a certificate for `localhost`.
    cluster: TempCluster,
    /// The CA's certificate, PEM.
    ca_pem: String,
}

static TLS: OnceCell<Tls> = OnceCell::const_new();

/// The module's TLS cluster, started on first use.
async fn tls() -> &'static Tls {
    TLS.get_or_init(start_tls_cluster).await
}

/// A self-signed CA.
fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// Starts a cluster and turns TLS on: certificate and key written into the
/// data directory as the server's user (the key readable by it alone), ssl on
/// and pg_hba.conf reloaded.
async fn start_tls_cluster() -> Tls {
    let cluster =
        tokio::task::spawn_blocking(|| TempCluster::start(ClusterOptions { durable: false }))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("cannot start the TLS test cluster: {e}"));
    let ca = ca("rekey test CA");
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca).unwrap();

    let admin = connect(&cluster.url("postgres")).await;
    let data = show_path(&admin, "data_directory").await;
    let hba = show_path(&admin, "hba_file").await;
    let owner = std::fs::metadata(&data).unwrap();
    for (name, pem) in [
        ("server.crt", cert.pem()),
        ("server.key", key.serialize_pem()),
    ] {
        let path = data.join(name);
        std::fs::write(&path, pem).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
    }
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("hostnossl all {TLS_ONLY} all reject\n{rules}"),
    )
    .unwrap();
    // One statement each: ALTER SYSTEM refuses to run in a multi-statement string's transaction.
    for sql in [
        &format!("CREATE ROLE {TLS_ONLY} SUPERUSER LOGIN"),
        "ALTER SYSTEM SET ssl = on",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }

    // The reload is asynchronous: wait for a session that gets TLS.
    let probe = Database::parse(&format!("{} sslmode=require", cluster.url("postgres"))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = probe.connect().await {
        assert!(
            Instant::now() < deadline,
            "TLS did not come on: {e}\n{}",
            cluster.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let plain = Database::parse(&format!(
        "{} user={TLS_ONLY} sslmode=disable",
        cluster.url("postgres")
    ))
    .unwrap();
    assert!(
        plain.connect().await.is_err(),
        "{TLS_ONLY} got in over plaintext: the TLS-only check proves nothing"
    );
    Tls {
        cluster,
        ca_pem: ca.pem(),
    }
}

/// A server setting that is a path.
async fn show_path(client: &tokio_postgres::Client, name: &str) -> PathBuf {
    PathBuf::from(
        client
            .query_one(&format!("SHOW {name}"), &[])
            .await
            .unwrap()
            .get::<_, String>(0),
    )
}

/// Writes `pem` into `dir` and returns its path.
fn write_pem(dir: &tempfile::TempDir, name: &str, pem: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, pem).unwrap();
    path.display().to_string()
}

/// A key=value URL for the TLS cluster's `postgres` database on `host`, plus `extra`.
fn url_on(tls: &Tls, host: &str, extra: &str) -> String {
    format!(
        "host={host} port={} user=postgres dbname=postgres {extra}",
        tls.cluster.port()
    )
}

/// Connects through rekey and asks the server whether the session is encrypted.
async fn session_is_encrypted(url: &str) -> Result<bool, ConnectError> {
    let client = Database::parse(url)?.connect().await?;
    Ok(client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_over_sslmode_require_uses_tls_for_every_session() {
    let tls = tls().await;
    let db = TestDb::on(&tls.cluster).await;
    db.seed_patients(3_000).await;
    // Every statement that writes the table notes whether its session is encrypted.
    db.client
        .batch_execute(
            "CREATE TABLE writer_sessions (ssl boolean);
             CREATE FUNCTION note_session() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN INSERT INTO writer_sessions SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid(); RETURN NULL; END $$;
             CREATE TRIGGER note_session AFTER UPDATE ON patient_persons FOR EACH STATEMENT EXECUTE FUNCTION note_session();",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    // As TLS_ONLY, a plaintext session of any stage would be refused by the server.
    let url = format!("{} user={TLS_ONLY} sslmode=require", db.url);

    let out = rekey(
        &["run", "--job", &job, "--database-url", &url, "--json"],
        &seed_env(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", printed(&out));
    assert_eq!(json(&out)["values_rewritten"], 3_000 + 2_000);
    let after = db.decrypted_patients(&v2_ring()).await;
    assert!(
        after
            .values()
            .all(|(phone, _)| matches!(phone, Decrypted::Plain(2, _))),
        "a phone is not on V2"
    );
    let sessions: Vec<bool> = db
        .client
        .query("SELECT ssl FROM writer_sessions", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        !sessions.is_empty() && sessions.iter().all(|ssl| *ssl),
        "writes per session's ssl: {sessions:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn prefer_by_default_encrypts_without_checking_the_certificate() {
    let tls = tls().await;
    // No sslmode, and a CA rekey has never seen.
    assert!(session_is_encrypted(&url_on(tls, "127.0.0.1", ""))
        .await
        .unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_with_the_servers_ca_connects_over_tls() {
    let tls = tls().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = write_pem(&dir, "ca.pem", &tls.ca_pem);
    let url = url_on(
        tls,
        "localhost",
        &format!("sslmode=verify-full sslrootcert='{ca}'"),
    );
    assert!(session_is_encrypted(&url).await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_with_another_ca_is_refused_and_changes_nothing() {
    let tls = tls().await;
    let db = TestDb::on(&tls.cluster).await;
    db.seed_patients(500).await;
    let before = db.checksum("patient_persons").await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let other = write_pem(&dir, "other-ca.pem", &ca("another CA").pem());
    let url = format!(
        "{} host=localhost sslmode=verify-full sslrootcert='{other}'",
        db.url
    );

    let out = rekey(&["run", "--job", &job, "--database-url", &url], &seed_env());
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let said = printed(&out);
    assert!(
        said.contains(&format!("not signed by the CA in sslrootcert={other}")),
        "{said}"
    );
    assert!(
        said.contains("pass the right CA file, or use sslmode=require"),
        "{said}"
    );
    assert_eq!(db.checksum("patient_persons").await, before, "data changed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_certificate_error_does_not_show_the_password() {
    let tls = tls().await;
    let db = TestDb::on(&tls.cluster).await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let other = write_pem(&dir, "other-ca.pem", &ca("another CA").pem());
    let password = "pw-7f3a9c-not-for-logs";
    let dbname = db
        .client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get::<_, String>(0);
    let url = format!("postgres://postgres:{password}@localhost:{}/{dbname}?sslmode=verify-full&sslrootcert={other}", tls.cluster.port());

    let out = rekey(&["run", "--job", &job, "--database-url", &url], &seed_env());
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let said = printed(&out);
    assert!(said.contains("not signed by the CA"), "{said}");
    assert!(!said.contains(password), "the password was printed: {said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_refuses_a_host_the_certificate_does_not_name() {
    let tls = tls().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = write_pem(&dir, "ca.pem", &tls.ca_pem);
    let url = url_on(
        tls,
        "127.0.0.1",
        &format!("sslmode=verify-full sslrootcert='{ca}'"),
    );

    let err = session_is_encrypted(&url).await.unwrap_err();
    assert!(matches!(err, ConnectError::WrongHost { .. }), "{err:?}");
    let said = err.to_string();
    assert!(
        said.contains("host 127.0.0.1 (it names localhost)") && said.contains("sslmode=verify-ca"),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_ca_accepts_a_host_the_certificate_does_not_name() {
    let tls = tls().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = write_pem(&dir, "ca.pem", &tls.ca_pem);
    let url = url_on(
        tls,
        "127.0.0.1",
        &format!("sslmode=verify-ca sslrootcert='{ca}'"),
    );
    assert!(session_is_encrypted(&url).await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn require_with_a_ca_file_checks_the_chain_as_libpq_does() {
    let tls = tls().await;
    let dir = tempfile::tempdir().unwrap();
    let other = write_pem(&dir, "other-ca.pem", &ca("another CA").pem());
    let err = session_is_encrypted(&url_on(
        tls,
        "127.0.0.1",
        &format!("sslmode=require sslrootcert='{other}'"),
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, ConnectError::UnknownIssuer { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sslmode_require_against_a_server_without_tls_fails_instead_of_going_plaintext() {
    // The harness's shared cluster runs with TLS off.
    let db = TestDb::new().await;
    db.seed_patients(100).await;
    let before = db.checksum("patient_persons").await;
    let dir = tempfile::tempdir().unwrap();
    let job = db.patients_job(&dir).display().to_string();
    let url = format!("{} sslmode=require", db.url);

    let out = rekey(&["run", "--job", &job, "--database-url", &url], &seed_env());
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let said = printed(&out);
    assert!(
        said.contains("does not accept TLS connections but sslmode=require refuses plaintext"),
        "{said}"
    );
    assert_eq!(db.checksum("patient_persons").await, before, "data changed");
}
