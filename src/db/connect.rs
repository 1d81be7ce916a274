//! Connecting: every connection rekey opens comes from [`Database::connect`],
//! so the TLS policy a connection string asks for holds for every session of
//! a run. Strings are libpq's, and so is `sslmode` (tokio-postgres alone
//! knows only disable/prefer/require and has no `sslrootcert`), over rustls:
//! rekey takes the TLS parameters out of the string itself ([`super::conninfo`])
//! and hands the rest to tokio-postgres.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use rustls::CertificateError;
use tokio_postgres::config::{Host, SslMode as DriverSslMode};
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::conninfo::take_tls_params;
use super::libpq_env;
use super::session::Timeouts;
use super::tls::{
    load_roots, presented_name, server_name, tls_config, tls_failure, Check, Roots, SslMode,
    TlsFailure,
};

/// Why a connection could not be made. No variant carries the password.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL or key=value string does not parse.
    #[error("the database URL does not parse ({0}); give a libpq URL (postgres://user@host:5432/db) or key=value string (host=... dbname=...)")]
    BadUrl(String),
    /// The CA file named by `sslrootcert` cannot be used.
    #[error("cannot use sslrootcert={path}: {reason}; give a PEM file holding the certificate of the CA that signed the server's certificate")]
    RootCert {
        /// The file (or `system`) as given.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `verify-ca`/`verify-full` with no CA to verify against.
    #[error("sslmode={mode} checks the server's certificate but no CA was given: pass sslrootcert=/path/to/ca.pem (or set PGSSLROOTCERT), or sslrootcert=system with sslmode=verify-full for the system's trusted CAs, or use sslmode=require to encrypt without checking the certificate")]
    NoRootCert {
        /// The sslmode asked for.
        mode: &'static str,
    },
    /// The server answered the TLS request with "no"; rekey does not fall back to plaintext.
    #[error("the server does not accept TLS connections but sslmode={mode} refuses plaintext; turn ssl on in the server's configuration, or use sslmode=prefer to allow plaintext")]
    ServerWithoutTls {
        /// The sslmode asked for.
        mode: &'static str,
    },
    /// The server's certificate does not lead to the CA in `sslrootcert`.
    #[error("the server's certificate is not signed by the CA in sslrootcert={roots}; pass the right CA file, or use sslmode=require to encrypt without checking the certificate")]
    UnknownIssuer {
        /// The CA file (or `system`) as given.
        roots: String,
    },
    /// `verify-full`: the certificate does not name the host connected to.
    #[error("the server's certificate is not valid for {detail}; connect with a host name the certificate lists, or use sslmode=verify-ca to check the CA only")]
    WrongHost {
        /// The host, and the names the certificate lists when known.
        detail: String,
    },
    /// Any other reason the server's certificate was refused (expired, wrong usage, ...).
    #[error("the server's certificate was refused ({reason}); fix the server's certificate, or pass the CA that signed it as sslrootcert (now {roots})")]
    BadCertificate {
        /// rustls's reason.
        reason: String,
        /// The CA file (or `system`) as given.
        roots: String,
    },
    /// The server could not be reached or refused us.
    #[error("cannot connect to PostgreSQL at {at}")]
    Connect {
        /// Host, port, database and user (never the password).
        at: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Nothing answered within the connect timeout (a stuck pooler, a half-dead host).
    #[error("no answer from PostgreSQL at {at} within {secs}s (connect_timeout): check the host and port, and that the server or pooler there is answering; set connect_timeout=N in the URL or PGCONNECT_TIMEOUT to wait longer")]
    Timeout {
        /// Host, port, database and user (never the password).
        at: String,
        /// The bound, in seconds.
        secs: u64,
    },
}

/// A parsed connection string and the TLS setup it asks for; the password
/// never appears in `Debug` output.
#[derive(Clone)]
pub struct Database {
    /// The parsed configuration, TLS parameters taken out.
    config: Config,
    /// The sslmode asked for (URL, else `PGSSLMODE`, else `prefer`).
    mode: SslMode,
    /// Where the CAs come from, as the user named it (for error messages).
    roots: String,
    /// The TLS connector, built once: CA files are read when the URL is parsed.
    tls: MakeRustlsConnect,
    /// The string's own `options`, before rekey's session settings.
    options: String,
    /// How long a connection may take to start, TLS and authentication included.
    connect_timeout: Duration,
}

/// How long a connection may take to start when neither the string
/// (`connect_timeout`) nor `PGCONNECT_TIMEOUT` says.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// TCP keepalives: a peer gone silent in the middle of a session is noticed
/// after about `idle + interval * retries` instead of never.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// See [`KEEPALIVE_IDLE`].
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// See [`KEEPALIVE_IDLE`].
const KEEPALIVE_RETRIES: u32 = 3;

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("dbname", &self.config.get_dbname())
            .field("sslmode", &self.mode)
            .finish()
    }
}

impl Database {
    /// Parses a libpq URL or key=value string. `sslmode` and `sslrootcert`
    /// default to `PGSSLMODE` and `PGSSLROOTCERT`; a CA file is read here, so
    /// a missing or bad one is a configuration error before any connection.
    pub fn parse(url: &str) -> Result<Self, ConnectError> {
        Self::parse_with_env(url, &|name| std::env::var(name).ok())
    }

    fn parse_with_env(
        url: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConnectError> {
        let params = take_tls_params(url)?;
        let mut config =
            Config::from_str(&params.rest).map_err(|e| ConnectError::BadUrl(e.to_string()))?;
        let service = match params
            .service
            .clone()
            .or_else(|| env("PGSERVICE"))
            .filter(|s| !s.is_empty())
        {
            Some(name) => libpq_env::service(&name, env)?,
            None => Vec::new(),
        };
        libpq_env::fill(&mut config, &service, env)?;
        libpq_env::password_file(&mut config, params.passfile.clone(), env);
        if config.get_application_name().is_none() {
            config.application_name("rekey");
        }
        // rekey's SQL and a job's `where` must read the same on every server:
        // backslashes in string literals are plain characters.
        let options = match config.get_options() {
            Some(o) if !o.is_empty() => format!("{o} -c standard_conforming_strings=on"),
            _ => "-c standard_conforming_strings=on".to_string(),
        };
        config.options(format!(
            "{options} {}",
            Timeouts::read_only().startup_options()
        ));
        let connect_timeout = match config.get_connect_timeout() {
            Some(t) => *t,
            None => match env("PGCONNECT_TIMEOUT").filter(|t| !t.trim().is_empty()) {
                // libpq: a value under 2 seconds waits 2
                Some(t) => Duration::from_secs(
                    t.trim()
                        .parse::<u64>()
                        .map_err(|_| {
                            ConnectError::BadUrl(format!(
                                "PGCONNECT_TIMEOUT={t} is not a number of seconds"
                            ))
                        })?
                        .max(2),
                ),
                None => DEFAULT_CONNECT_TIMEOUT,
            },
        };
        config.connect_timeout(connect_timeout);
        config
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_RETRIES);
        let rootcert = params
            .sslrootcert
            .or_else(|| libpq_env::param(&service, "sslrootcert"))
            .or_else(|| env("PGSSLROOTCERT"))
            .filter(|r| !r.is_empty());
        let mode = match params
            .sslmode
            .or_else(|| libpq_env::param(&service, "sslmode"))
            .or_else(|| env("PGSSLMODE"))
            .filter(|m| !m.is_empty())
        {
            Some(mode) => SslMode::parse(&mode)?,
            // libpq 16: the system's CAs make verify-full the default.
            None if rootcert.as_deref() == Some("system") => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        let roots = match (mode, rootcert) {
            (_, Some(r)) if r == "system" && mode != SslMode::VerifyFull => {
                return Err(ConnectError::BadUrl(format!(
                    "sslrootcert=system needs sslmode=verify-full (as in libpq), not sslmode={}",
                    mode.as_str()
                )))
            }
            (_, Some(r)) if r == "system" => Some(Roots::System),
            (SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull, Some(r)) => {
                Some(Roots::File(PathBuf::from(r)))
            }
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                match env("HOME").map(|h| PathBuf::from(h).join(".postgresql/root.crt")) {
                    // libpq's default CA file.
                    Some(path) if path.is_file() => Some(Roots::File(path)),
                    _ => {
                        return Err(ConnectError::NoRootCert {
                            mode: mode.as_str(),
                        })
                    }
                }
            }
            // prefer never checks (libpq's default must keep working with any server).
            (SslMode::Disable | SslMode::Prefer | SslMode::Require, _) => None,
        };
        let check = match (&roots, mode) {
            (None, _) => Check::Nothing,
            (Some(r), SslMode::VerifyFull) => Check::ChainAndName(load_roots(r)?),
            (Some(r), _) => Check::Chain(load_roots(r)?),
        };
        config.ssl_mode(match mode {
            SslMode::Disable => DriverSslMode::Disable,
            SslMode::Prefer => DriverSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => DriverSslMode::Require,
        });
        // libpq never uses TLS over a unix socket, whatever sslmode says (and
        // PostgreSQL refuses it there); a string naming only sockets connects plainly.
        if !config.get_hosts().is_empty() && config.get_hosts().iter().all(is_socket) {
            config.ssl_mode(DriverSslMode::Disable);
        }
        let roots = match &roots {
            None => "(none)".to_string(),
            Some(Roots::System) => "system".to_string(),
            Some(Roots::File(path)) => path.display().to_string(),
        };
        Ok(Database {
            config,
            mode,
            roots,
            tls: MakeRustlsConnect::new(tls_config(check)?),
            options,
            connect_timeout,
        })
    }

    /// The same database, every session opened with `timeouts` (and read
    /// committed) as its startup options.
    pub fn with_session(&self, timeouts: &Timeouts) -> Database {
        let mut db = self.clone();
        db.config
            .options(format!("{} {}", self.options, timeouts.startup_options()));
        db
    }

    /// Where connections go, for messages: host and port, database, user;
    /// never the password.
    pub fn describe(&self) -> String {
        let ports = self.config.get_ports();
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| (h, ports.get(i).or(ports.first()).copied().unwrap_or(5432)))
            .map(|(h, p)| match h {
                Host::Tcp(name) => format!("{name}:{p}"),
                #[cfg(unix)]
                Host::Unix(dir) => format!("{}/.s.PGSQL.{p}", dir.display()),
            })
            .collect();
        format!(
            "{} (database {}, user {})",
            if hosts.is_empty() {
                "localhost:5432".to_string()
            } else {
                hosts.join(", ")
            },
            self.config.get_dbname().unwrap_or("(default)"),
            self.config.get_user().unwrap_or("(default)")
        )
    }

    /// The sslmode this database is reached with.
    pub fn ssl_mode(&self) -> SslMode {
        self.mode
    }

    /// Asks the server to cancel what the session behind `token` is running
    /// (over TLS when the connection was).
    pub async fn cancel(
        &self,
        token: &tokio_postgres::CancelToken,
    ) -> Result<(), tokio_postgres::Error> {
        token.cancel_query(self.tls.clone()).await
    }

    /// Opens one connection; its I/O runs on a spawned tokio task until the
    /// client is dropped.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        // the driver's connect_timeout bounds the TCP connect only: the TLS and
        // PostgreSQL handshakes of a server that accepts and never answers would hang
        let started = self.config.connect(self.tls.clone());
        let (client, connection) = match tokio::time::timeout(
            self.connect_timeout + Duration::from_secs(1),
            started,
        )
        .await
        {
            Ok(connected) => connected.map_err(|e| self.explain(e))?,
            Err(_) => {
                return Err(ConnectError::Timeout {
                    at: self.describe(),
                    secs: self.connect_timeout.as_secs(),
                })
            }
        };
        tokio::spawn(async move {
            // The client sees the same error on its next call; nothing to add here.
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Turns a TLS failure into an error that names the problem and the fix.
    fn explain(&self, e: tokio_postgres::Error) -> ConnectError {
        let roots = self.roots.clone();
        match tls_failure(&e) {
            Some(TlsFailure::NoTls) => ConnectError::ServerWithoutTls {
                mode: self.mode.as_str(),
            },
            Some(TlsFailure::Certificate(CertificateError::UnknownIssuer)) => {
                ConnectError::UnknownIssuer { roots }
            }
            Some(TlsFailure::Certificate(CertificateError::NotValidForNameContext {
                expected,
                presented,
            })) => {
                let presented: Vec<&str> =
                    presented.iter().map(|name| presented_name(name)).collect();
                ConnectError::WrongHost {
                    detail: format!(
                        "host {} (it names {})",
                        server_name(expected),
                        presented.join(", ")
                    ),
                }
            }
            Some(TlsFailure::Certificate(CertificateError::NotValidForName)) => {
                ConnectError::WrongHost {
                    detail: "the host connected to".into(),
                }
            }
            Some(TlsFailure::Certificate(other)) => ConnectError::BadCertificate {
                reason: other.to_string(),
                roots,
            },
            None => ConnectError::Connect {
                at: self.describe(),
                source: e,
            },
        }
    }
}

#[cfg(unix)]
fn is_socket(host: &Host) -> bool {
    matches!(host, Host::Unix(_))
}

#[cfg(not(unix))]
fn is_socket(_: &Host) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn an_unknown_sslmode_is_refused_naming_the_choices() {
        let err = Database::parse_with_env("host=h sslmode=verify", &no_env).unwrap_err();
        assert!(err.to_string().contains("sslmode=verify is not one of disable, allow, prefer, require, verify-ca, verify-full"), "{err}");
    }

    #[test]
    fn prefer_is_the_default_and_pgsslmode_applies_when_the_url_says_nothing() {
        assert_eq!(
            Database::parse_with_env("host=h", &no_env)
                .unwrap()
                .ssl_mode(),
            SslMode::Prefer
        );
        let env = |name: &str| (name == "PGSSLMODE").then(|| "require".to_string());
        assert_eq!(
            Database::parse_with_env("host=h", &env).unwrap().ssl_mode(),
            SslMode::Require
        );
        assert_eq!(
            Database::parse_with_env("host=h sslmode=disable", &env)
                .unwrap()
                .ssl_mode(),
            SslMode::Disable
        );
    }

    #[test]
    fn verify_full_without_a_ca_is_refused_with_the_fix() {
        let err =
            Database::parse_with_env("postgres://h/db?sslmode=verify-full", &no_env).unwrap_err();
        assert!(
            matches!(
                err,
                ConnectError::NoRootCert {
                    mode: "verify-full"
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("pass sslrootcert=/path/to/ca.pem"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_ca_file_is_refused_naming_it() {
        let err = Database::parse_with_env(
            "host=h sslmode=verify-ca sslrootcert=/nonexistent/ca.pem",
            &no_env,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot use sslrootcert=/nonexistent/ca.pem: "),
            "{err}"
        );
    }

    #[test]
    fn system_roots_need_verify_full() {
        let err = Database::parse_with_env("host=h sslmode=require sslrootcert=system", &no_env)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("sslrootcert=system needs sslmode=verify-full"),
            "{err}"
        );
    }

    #[test]
    fn certificate_names_read_as_written() {
        assert_eq!(presented_name(r#"DnsName("db.example")"#), "db.example");
        assert_eq!(presented_name("IpAddress(10.0.0.1)"), "10.0.0.1");
        assert_eq!(presented_name("other"), "other");
    }

    #[test]
    fn unix_sockets_never_use_tls() {
        let db = Database::parse_with_env("host=/run/postgresql sslmode=require", &no_env).unwrap();
        assert_eq!(db.config.get_ssl_mode(), DriverSslMode::Disable);
    }

    #[test]
    fn debug_shows_no_password() {
        let db = Database::parse_with_env("postgres://u:s3cret-pw@h/db?sslmode=require", &no_env)
            .unwrap();
        assert!(!format!("{db:?}").contains("s3cret-pw"));
    }
}
