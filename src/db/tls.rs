//! TLS to PostgreSQL with rustls on ring: where the CAs come from, what is
//! checked of the server's certificate for each `sslmode`, and the one
//! verifier for the modes that do not check the host name.

use std::error::Error as StdError;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::connect::ConnectError;

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
    pub(super) fn parse(value: &str) -> Result<Self, ConnectError> {
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

/// Where the CA certificates come from.
pub(super) enum Roots {
    /// A PEM file (`sslrootcert=/path`, or libpq's default `~/.postgresql/root.crt`).
    File(PathBuf),
    /// The operating system's trust store (`sslrootcert=system`).
    System,
}

/// What is checked of the server's certificate.
pub(super) enum Check {
    /// Nothing (`prefer`, and `require` without a CA): encrypted, not authenticated.
    Nothing,
    /// The chain up to a CA (`verify-ca`, and `require` with a CA).
    Chain(RootCertStore),
    /// The chain and the host name (`verify-full`).
    ChainAndName(RootCertStore),
}

pub(super) fn load_roots(roots: &Roots) -> Result<RootCertStore, ConnectError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(ConnectError::RootCert {
                    path: "system".into(),
                    reason: "the system's trust store holds no usable CA certificate".into(),
                });
            }
        }
        Roots::File(path) => {
            let bad = |reason: String| ConnectError::RootCert {
                path: path.display().to_string(),
                reason,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad(
                    "it holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
                ));
            }
            for cert in certs {
                store
                    .add(cert)
                    .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
            }
        }
    }
    Ok(store)
}

pub(super) fn tls_config(check: Check) -> Result<ClientConfig, ConnectError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnectError::BadUrl(format!("TLS cannot be set up: {e}")))?;
    let mut config = match check {
        Check::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoHostName {
                roots: None,
                provider,
            }))
            .with_no_client_auth(),
        Check::Chain(roots) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoHostName {
                roots: Some(Arc::new(roots)),
                provider,
            }))
            .with_no_client_auth(),
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
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What a failed connection says about TLS.
pub(super) enum TlsFailure<'a> {
    /// The server said no to TLS.
    NoTls,
    /// rustls refused the server's certificate.
    Certificate(&'a CertificateError),
}

/// Finds the TLS reason in a driver error's chain (tokio-rustls wraps
/// rustls's error in an `io::Error`, whose `source` skips it).
pub(super) fn tls_failure(e: &tokio_postgres::Error) -> Option<TlsFailure<'_>> {
    let mut next: Option<&(dyn StdError + 'static)> = e.source();
    while let Some(err) = next {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
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

pub(super) fn server_name(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(dns) => dns.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// A name from the certificate as a user writes it: rustls gives webpki's
/// `Debug` form, `DnsName("db.example")` or `IpAddress(10.0.0.1)`.
pub(super) fn presented_name(name: &str) -> &str {
    name.strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .or_else(|| {
            name.strip_prefix("IpAddress(")
                .and_then(|n| n.strip_suffix(')'))
        })
        .unwrap_or(name)
}
