//! TLS to PostgreSQL with rustls on ring: where the CAs come from, what is
//! checked of the server's certificate for each `sslmode`, and the one
//! verifier for the modes that do not check the host name.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::connect::ConnectError;

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
