//! PostgreSQL plumbing: connecting (with TLS), quoting identifiers, and raw binary values.
//!
//! Every connection rekey opens comes from [`Database::connect`], so the TLS
//! policy a URL asks for holds for every session of a run. Connection strings
//! are libpq's, and so is `sslmode` (tokio-postgres alone knows only
//! disable/prefer/require and has no `sslrootcert`), over rustls: rekey takes
//! the TLS parameters out of the string itself and hands the rest to
//! tokio-postgres.
//!
//! rekey never needs to understand a primary key's type: it reads key columns
//! in PostgreSQL's binary format and hands the same bytes back as parameters
//! and COPY fields. [`RawRef`] and [`RawParam`] carry those bytes through
//! tokio-postgres for any column type.

use std::error::Error as StdError;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use bytes::BytesMut;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::{Host, SslMode as DriverSslMode};
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

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
    #[error("cannot connect to PostgreSQL")]
    Connect(#[source] tokio_postgres::Error),
}

/// How much TLS a connection asks for: libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// TLS when the server offers it, else plaintext; the certificate is not
    /// checked. The default, as in libpq; `allow` is taken as `prefer`.
    Prefer,
    /// TLS or no connection. The certificate is checked against `sslrootcert`
    /// only when one is given (as libpq), else not at all.
    Require,
    /// TLS; the certificate must chain to a CA in `sslrootcert`; the host name is not checked.
    VerifyCa,
    /// TLS; the certificate must chain to a CA in `sslrootcert` and name the host.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, ConnectError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ConnectError::BadUrl(format!(
                    "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                )))
            }
        })
    }

    /// The name libpq uses.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
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
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database").field("dbname", &self.config.get_dbname()).field("sslmode", &self.mode).finish()
    }
}

impl Database {
    /// Parses a libpq URL or key=value string. `sslmode` and `sslrootcert`
    /// default to `PGSSLMODE` and `PGSSLROOTCERT`; a CA file is read here, so
    /// a missing or bad one is a configuration error before any connection.
    pub fn parse(url: &str) -> Result<Self, ConnectError> {
        Self::parse_with_env(url, &|name| std::env::var(name).ok())
    }

    fn parse_with_env(url: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConnectError> {
        let params = take_tls_params(url)?;
        let mut config = Config::from_str(&params.rest).map_err(|e| ConnectError::BadUrl(e.to_string()))?;
        if config.get_application_name().is_none() {
            config.application_name("rekey");
        }
        // rekey's SQL and a job's `where` must read the same on every server:
        // backslashes in string literals are plain characters.
        let options = match config.get_options() {
            Some(o) if !o.is_empty() => format!("{o} -c standard_conforming_strings=on"),
            _ => "-c standard_conforming_strings=on".to_string(),
        };
        config.options(&options);
        let rootcert = params.sslrootcert.or_else(|| env("PGSSLROOTCERT")).filter(|r| !r.is_empty());
        let mode = match params.sslmode.or_else(|| env("PGSSLMODE")).filter(|m| !m.is_empty()) {
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
            (SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull, Some(r)) => Some(Roots::File(PathBuf::from(r))),
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => match env("HOME").map(|h| PathBuf::from(h).join(".postgresql/root.crt")) {
                // libpq's default CA file.
                Some(path) if path.is_file() => Some(Roots::File(path)),
                _ => return Err(ConnectError::NoRootCert { mode: mode.as_str() }),
            },
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
        Ok(Database { config, mode, roots, tls: MakeRustlsConnect::new(tls_config(check)?) })
    }

    /// The sslmode this database is reached with.
    pub fn ssl_mode(&self) -> SslMode {
        self.mode
    }

    /// Opens one connection; its I/O runs on a spawned tokio task until the
    /// client is dropped.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        let (client, connection) = self.config.connect(self.tls.clone()).await.map_err(|e| self.explain(e))?;
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
            Some(TlsFailure::NoTls) => ConnectError::ServerWithoutTls { mode: self.mode.as_str() },
            Some(TlsFailure::Certificate(CertificateError::UnknownIssuer)) => ConnectError::UnknownIssuer { roots },
            Some(TlsFailure::Certificate(CertificateError::NotValidForNameContext { expected, presented })) => {
                let presented: Vec<&str> = presented.iter().map(|name| presented_name(name)).collect();
                ConnectError::WrongHost { detail: format!("host {} (it names {})", server_name(expected), presented.join(", ")) }
            }
            Some(TlsFailure::Certificate(CertificateError::NotValidForName)) => ConnectError::WrongHost { detail: "the host connected to".into() },
            Some(TlsFailure::Certificate(other)) => ConnectError::BadCertificate { reason: other.to_string(), roots },
            None => ConnectError::Connect(e),
        }
    }
}

/// What a failed connection says about TLS.
enum TlsFailure<'a> {
    /// The server said no to TLS.
    NoTls,
    /// rustls refused the server's certificate.
    Certificate(&'a CertificateError),
}

/// Finds the TLS reason in a driver error's chain (tokio-rustls wraps
/// rustls's error in an `io::Error`, whose `source` skips it).
fn tls_failure(e: &tokio_postgres::Error) -> Option<TlsFailure<'_>> {
    let mut next: Option<&(dyn StdError + 'static)> = e.source();
    while let Some(err) = next {
        let tls = err
            .downcast_ref::<rustls::Error>()
            .or_else(|| err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).and_then(|inner| inner.downcast_ref::<rustls::Error>()));
        if let Some(rustls::Error::InvalidCertificate(cert)) = tls {
            return Some(TlsFailure::Certificate(cert));
        }
        // tokio-postgres's own words when the server answers the TLS request with 'N'.
        if err.to_string() == "server does not support TLS" {
            return Some(TlsFailure::NoTls);
        }
        next = err.source();
    }
    None
}

fn server_name(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(dns) => dns.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// A name from the certificate as a user writes it: rustls gives webpki's
/// `Debug` form, `DnsName("db.example")` or `IpAddress(10.0.0.1)`.
fn presented_name(name: &str) -> &str {
    name.strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .or_else(|| name.strip_prefix("IpAddress(").and_then(|n| n.strip_suffix(')')))
        .unwrap_or(name)
}

#[cfg(unix)]
fn is_socket(host: &Host) -> bool {
    matches!(host, Host::Unix(_))
}

#[cfg(not(unix))]
fn is_socket(_: &Host) -> bool {
    false
}

/// The TLS parameters rekey handles itself, and the rest of the connection
/// string for tokio-postgres (which rejects `sslrootcert` and the `verify-*` modes).
#[derive(Debug, Default, PartialEq, Eq)]
struct TlsParams {
    /// The connection string without `sslmode` and `sslrootcert`.
    rest: String,
    /// `sslmode`, if given.
    sslmode: Option<String>,
    /// `sslrootcert`, if given.
    sslrootcert: Option<String>,
}

/// Takes `sslmode` and `sslrootcert` out of a URL's query or a key=value
/// string, parsing as tokio-postgres does (the last of repeated keys wins).
/// A string it cannot read is passed on whole, for tokio-postgres to report.
fn take_tls_params(url: &str) -> Result<TlsParams, ConnectError> {
    let mut out = TlsParams::default();
    let mut keep = |key: &str, value: String| match key {
        "sslmode" => {
            out.sslmode = Some(value);
            false
        }
        "sslrootcert" => {
            out.sslrootcert = Some(value);
            false
        }
        _ => true,
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        // tokio-postgres reads credentials up to the first '@', then the query after the next '?'.
        let after_credentials = url.find('@').map_or(0, |at| at + 1);
        match url[after_credentials..].find('?').map(|q| after_credentials + q) {
            None => url.to_string(),
            Some(q) => {
                let mut kept = Vec::new();
                for pair in url[q + 1..].split('&') {
                    let Some((key, value)) = pair.split_once('=') else {
                        kept.push(pair);
                        continue;
                    };
                    let key = percent_decode(key)?;
                    if !matches!(key.as_str(), "sslmode" | "sslrootcert") || keep(&key, percent_decode(value)?) {
                        kept.push(pair);
                    }
                }
                match kept.is_empty() {
                    true => url[..q].to_string(),
                    false => format!("{}?{}", &url[..q], kept.join("&")),
                }
            }
        }
    } else {
        match key_values(url) {
            None => url.to_string(),
            Some(pairs) => pairs
                .into_iter()
                .filter_map(|(key, value)| keep(&key, value.clone()).then(|| format!("{key}='{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))))
                .collect::<Vec<_>>()
                .join(" "),
        }
    };
    out.rest = rest;
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, ConnectError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| ConnectError::BadUrl("a URL parameter is not UTF-8 once percent-decoded".into()))
}

/// Reads a libpq key=value string: `key = value` pairs separated by
/// whitespace, values bare or in single quotes, backslash escaping one
/// character. None when the string is not well formed.
fn key_values(s: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            return chars.peek().is_none().then_some(pairs);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        chars.next_if_eq(&'=')?;
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\'' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                match c {
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
            if value.is_empty() {
                return None;
            }
        }
        pairs.push((key, value));
    }
}

/// Where the CA certificates come from.
enum Roots {
    /// A PEM file (`sslrootcert=/path`, or libpq's default `~/.postgresql/root.crt`).
    File(PathBuf),
    /// The operating system's trust store (`sslrootcert=system`).
    System,
}

/// What is checked of the server's certificate.
enum Check {
    /// Nothing (`prefer`, and `require` without a CA): encrypted, not authenticated.
    Nothing,
    /// The chain up to a CA (`verify-ca`, and `require` with a CA).
    Chain(RootCertStore),
    /// The chain and the host name (`verify-full`).
    ChainAndName(RootCertStore),
}

fn load_roots(roots: &Roots) -> Result<RootCertStore, ConnectError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(ConnectError::RootCert { path: "system".into(), reason: "the system's trust store holds no usable CA certificate".into() });
            }
        }
        Roots::File(path) => {
            let bad = |reason: String| ConnectError::RootCert { path: path.display().to_string(), reason };
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("it holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
            }
            for cert in certs {
                store.add(cert).map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
            }
        }
    }
    Ok(store)
}

fn tls_config(check: Check) -> Result<ClientConfig, ConnectError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnectError::BadUrl(format!("TLS cannot be set up: {e}")))?;
    let mut config = match check {
        Check::Nothing => builder.dangerous().with_custom_certificate_verifier(Arc::new(NoHostName { roots: None, provider })).with_no_client_auth(),
        Check::Chain(roots) => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(NoHostName { roots: Some(Arc::new(roots)), provider })).with_no_client_auth()
        }
        Check::ChainAndName(roots) => builder.with_root_certificates(roots).with_no_client_auth(),
    };
    // PostgreSQL 17 checks ALPN; older servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

/// Checks the server's certificate without its host name: against `roots`
/// (`verify-ca`: the chain, dates and key usage), or not at all (`prefer`,
/// `require` without a CA, as libpq: the link is encrypted but the server
/// is not authenticated). Either way the handshake signatures are checked,
/// so the peer holds the certificate's key.
#[derive(Debug)]
struct NoHostName {
    /// The trusted CAs; `None` accepts any certificate.
    roots: Option<Arc<RootCertStore>>,
    /// Signature algorithms for the chain and the handshake.
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(&cert, roots, intermediates, now, self.provider.signature_verification_algorithms.all)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Quotes an identifier for SQL: `my "col"` becomes `"my ""col"""`.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A column value in PostgreSQL's binary format, borrowed from a result row.
#[derive(Debug, Clone, Copy)]
pub struct RawRef<'a>(pub &'a [u8]);

impl<'a> FromSql<'a> for RawRef<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(RawRef(raw))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A parameter sent as raw binary-format bytes, whatever the column's type.
/// The bytes must be a valid binary encoding for that type: rekey only sends
/// back bytes PostgreSQL itself produced for the same column.
#[derive(Debug, Clone, Copy)]
pub struct RawParam<'a>(pub &'a [u8]);

impl ToSql for RawParam<'_> {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.extend_from_slice(self.0);
        Ok(IsNull::No)
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn quote_ident_doubles_quotes() {
        assert_eq!(super::quote_ident(r#"a "b"; drop"#), r#""a ""b""; drop""#);
    }

    #[test]
    fn url_tls_parameters_are_taken_out_and_the_rest_kept() {
        let p = take_tls_params("postgres://u:p%3F@h:5432/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca%20dir%2Fca.pem").unwrap();
        assert_eq!(p.rest, "postgres://u:p%3F@h:5432/db?application_name=x");
        assert_eq!(p.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(p.sslrootcert.as_deref(), Some("/etc/ca dir/ca.pem"));
        let only = take_tls_params("postgresql://h/db?sslmode=require").unwrap();
        assert_eq!((only.rest.as_str(), only.sslmode.as_deref()), ("postgresql://h/db", Some("require")));
    }

    #[test]
    fn key_value_tls_parameters_are_taken_out_and_quoted_values_kept() {
        let p = take_tls_params(r"host=h dbname='my db' password='it\'s' sslrootcert = '/ca dir/ca.pem' sslmode=verify-ca").unwrap();
        assert_eq!(p.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(p.sslrootcert.as_deref(), Some("/ca dir/ca.pem"));
        let config = Config::from_str(&p.rest).unwrap();
        assert_eq!(config.get_dbname(), Some("my db"));
        assert_eq!(config.get_password(), Some(&b"it's"[..]));
    }

    #[test]
    fn an_unknown_sslmode_is_refused_naming_the_choices() {
        let err = Database::parse_with_env("host=h sslmode=verify", &no_env).unwrap_err();
        assert!(err.to_string().contains("sslmode=verify is not one of disable, allow, prefer, require, verify-ca, verify-full"), "{err}");
    }

    #[test]
    fn prefer_is_the_default_and_pgsslmode_applies_when_the_url_says_nothing() {
        assert_eq!(Database::parse_with_env("host=h", &no_env).unwrap().ssl_mode(), SslMode::Prefer);
        let env = |name: &str| (name == "PGSSLMODE").then(|| "require".to_string());
        assert_eq!(Database::parse_with_env("host=h", &env).unwrap().ssl_mode(), SslMode::Require);
        assert_eq!(Database::parse_with_env("host=h sslmode=disable", &env).unwrap().ssl_mode(), SslMode::Disable);
    }

    #[test]
    fn verify_full_without_a_ca_is_refused_with_the_fix() {
        let err = Database::parse_with_env("postgres://h/db?sslmode=verify-full", &no_env).unwrap_err();
        assert!(matches!(err, ConnectError::NoRootCert { mode: "verify-full" }), "{err:?}");
        assert!(err.to_string().contains("pass sslrootcert=/path/to/ca.pem"), "{err}");
    }

    #[test]
    fn a_missing_ca_file_is_refused_naming_it() {
        let err = Database::parse_with_env("host=h sslmode=verify-ca sslrootcert=/nonexistent/ca.pem", &no_env).unwrap_err();
        assert!(err.to_string().starts_with("cannot use sslrootcert=/nonexistent/ca.pem: "), "{err}");
    }

    #[test]
    fn system_roots_need_verify_full() {
        let err = Database::parse_with_env("host=h sslmode=require sslrootcert=system", &no_env).unwrap_err();
        assert!(err.to_string().contains("sslrootcert=system needs sslmode=verify-full"), "{err}");
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
        let db = Database::parse_with_env("postgres://u:s3cret-pw@h/db?sslmode=require", &no_env).unwrap();
        assert!(!format!("{db:?}").contains("s3cret-pw"));
    }
}
