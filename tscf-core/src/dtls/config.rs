//! rtc-dtls configurations: certificates, how each side checks the other, and the settings of
//! a client's DTLS transport.

use std::net::SocketAddr;
use std::sync::Arc;

use rtc_dtls::cipher_suite::CipherSuiteId;
use rtc_dtls::config::{
    ClientAuthType, ConfigBuilder, ExtendedMasterSecretType, HandshakeConfig,
    RustlsVerifierAdapter, VerifyPeerCertificateFn,
};
use rtc_dtls::crypto::Certificate;
use rtc_dtls::crypto_provider::providers::RingProvider;
use rtc_dtls::crypto_provider::{RTCCryptoProvider, SignatureScheme};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

use super::DtlsConfigError;
use crate::tls::{self, ClientTlsConfig, Fingerprint, Os, ServerVerification, TlsConfigError};

/// The crypto provider of every DTLS configuration here (ring).
fn provider() -> Arc<dyn RTCCryptoProvider> {
    Arc::new(RingProvider::new())
}

/// A DTLS certificate from a chain and a PKCS#8 key (rtc-dtls imports PKCS#8 only).
pub fn certificate(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'_>,
) -> Result<Certificate, DtlsConfigError> {
    let PrivateKeyDer::Pkcs8(key) = key else {
        return Err(DtlsConfigError(
            "the private key must be PKCS#8 for DTLS".to_owned(),
        ));
    };
    let provider = provider();
    let signing_key = [
        SignatureScheme::EcdsaP256Sha256,
        SignatureScheme::EcdsaP384Sha384,
        SignatureScheme::Ed25519,
        SignatureScheme::RsaPkcs1Sha256,
    ]
    .into_iter()
    .find_map(|scheme| {
        provider
            .crypto()
            .import_signing_key(scheme, key.secret_pkcs8_der())
            .ok()
    })
    .ok_or_else(|| DtlsConfigError("unsupported private key type".to_owned()))?;
    Ok(Certificate::from_signing_key(chain, signing_key))
}

/// How a DTLS client checks the server's certificate.
#[derive(Clone, Debug)]
pub enum PeerCheck {
    /// The end-entity certificate has this SHA-256 fingerprint.
    Pinned(Fingerprint),
    /// The chain verifies against these roots for this name (a DNS name or an IP address).
    Roots {
        /// The trusted CA certificates.
        roots: RootCertStore,
        /// The name the certificate must carry.
        name: String,
    },
    /// Anything (the handshake signature is still verified).
    Insecure,
}

/// ECDHE with an AEAD only (no CBC, no CCM-8, no pre-shared keys), for ECDSA and RSA
/// certificates.
const CIPHER_SUITES: [CipherSuiteId; 4] = [
    CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Gcm_Sha256,
    CipherSuiteId::Tls_Ecdhe_Ecdsa_With_ChaCha20_Poly1305_Sha256,
    CipherSuiteId::Tls_Ecdhe_Rsa_With_Aes_128_Gcm_Sha256,
    CipherSuiteId::Tls_Ecdhe_Rsa_With_ChaCha20_Poly1305_Sha256,
];

fn builder() -> ConfigBuilder {
    ConfigBuilder::default()
        .with_crypto_provider(provider())
        .with_cipher_suites(CIPHER_SUITES.to_vec())
        .with_extended_master_secret(ExtendedMasterSecretType::Require)
        .with_rustls_verifier_adapter(RustlsVerifierAdapter::ring())
}

fn pin(fingerprint: Fingerprint) -> VerifyPeerCertificateFn {
    Arc::new(move |certs: &[Vec<u8>], _| {
        let matches = certs
            .first()
            .is_some_and(|c| Fingerprint::of(c).matches(&fingerprint));
        if matches {
            Ok(())
        } else {
            Err(rtc_shared::error::Error::Other(
                "certificate fingerprint does not match the pinned one".to_owned(),
            ))
        }
    })
}

/// How a DTLS server checks the client's certificate.
#[derive(Clone, Debug)]
pub enum ClientCheck {
    /// It asks for none.
    None,
    /// It asks for one and, if given, verifies it against these roots (mutual TLS).
    Roots(RootCertStore),
    /// It requires one with this SHA-256 fingerprint (a peer tunnel's other end).
    Pinned(Fingerprint),
}

/// A server-role configuration presenting `certificate` and checking the client as `check`
/// says (for [`DtlsEndpoint::authorise`](super::DtlsEndpoint::authorise); a listener uses an
/// [`Acceptor`](super::Acceptor)).
pub fn server_config(
    certificate: Certificate,
    check: ClientCheck,
) -> Result<Arc<HandshakeConfig>, DtlsConfigError> {
    server_builder(certificate, check)
        .build(false, None)
        .map(Arc::new)
        .map_err(|e| DtlsConfigError(e.to_string()))
}

pub(super) fn server_builder(certificate: Certificate, check: ClientCheck) -> ConfigBuilder {
    // Server certificates are for clients to verify; skipping it here skips building a
    // verifier the server never uses.
    let mut builder = builder()
        .with_certificates(vec![certificate])
        .with_insecure_skip_verify(true);
    match check {
        ClientCheck::None => {}
        ClientCheck::Roots(roots) => {
            builder = builder
                .with_client_auth(ClientAuthType::VerifyClientCertIfGiven)
                .with_client_cas(roots);
        }
        ClientCheck::Pinned(fingerprint) => {
            builder = builder
                .with_client_auth(ClientAuthType::RequireAnyClientCert)
                .with_verify_peer_certificate(Some(pin(fingerprint)));
        }
    }
    builder
}

/// A client-role configuration for the server at `server` that checks it as `check` says and
/// presents `certificate` if given.
pub fn client_config(
    server: SocketAddr,
    check: PeerCheck,
    certificate: Option<Certificate>,
) -> Result<Arc<HandshakeConfig>, DtlsConfigError> {
    let mut builder = builder();
    if let Some(certificate) = certificate {
        builder = builder.with_certificates(vec![certificate]);
    }
    builder = match check {
        PeerCheck::Pinned(fingerprint) => builder
            .with_insecure_skip_verify(true)
            .with_verify_peer_certificate(Some(pin(fingerprint))),
        PeerCheck::Roots { roots, name } => builder.with_roots_cas(roots).with_server_name(name),
        PeerCheck::Insecure => builder.with_insecure_skip_verify(true),
    };
    builder
        .build(true, Some(server))
        .map(Arc::new)
        .map_err(|e| DtlsConfigError(e.to_string()))
}

/// How a client's DTLS transports check the server, and the client certificate they present:
/// a [`ClientTlsConfig`] with its files read once, from which each attempt's handshake
/// configuration is one call.
#[derive(Debug)]
pub struct ClientSettings {
    verification: ServerVerification,
    roots: Option<RootCertStore>,
    server_name: Option<String>,
    certificate: Option<Certificate>,
}

impl ClientSettings {
    /// Reads the CA file and the client certificate `config` names, through `os`.
    pub fn new(config: &ClientTlsConfig, os: Os) -> Result<Self, TlsConfigError> {
        let roots = match &config.verification {
            ServerVerification::CaFile(path) => Some(tls::load_roots(path, os)?),
            _ => None,
        };
        let certificate = match &config.client_identity {
            Some((cert, key)) => {
                let (chain, key) = tls::load_pem_identity(cert, key, os)?;
                Some(certificate(chain, &key)?)
            }
            None => None,
        };
        Ok(Self {
            verification: config.verification.clone(),
            roots,
            server_name: config.server_name.clone(),
            certificate,
        })
    }

    /// The client-role configuration for a handshake with `server`: pinned, or verified
    /// against the CA file for the configured name (by default the server's IP address), or
    /// not verified at all, with a warning logged.
    pub fn handshake_config(
        &self,
        server: SocketAddr,
    ) -> Result<Arc<HandshakeConfig>, DtlsConfigError> {
        let check = match (&self.verification, &self.roots) {
            (ServerVerification::Pinned(fingerprint), _) => PeerCheck::Pinned(*fingerprint),
            (ServerVerification::CaFile(_), Some(roots)) => PeerCheck::Roots {
                roots: roots.clone(),
                name: self
                    .server_name
                    .clone()
                    .unwrap_or_else(|| server.ip().to_string()),
            },
            _ => {
                tracing::warn!(%server, "DTLS server certificate is not verified");
                PeerCheck::Insecure
            }
        };
        client_config(server, check, self.certificate.clone())
    }
}
