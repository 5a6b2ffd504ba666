//! TLS for the stream transport: rustls with the ring provider only (never the process default).
//!
//! Servers present a certificate from PEM files or a generated self-signed one whose SHA-256
//! [`Fingerprint`] is returned for pinning. Clients verify the server by a CA file, by a pinned
//! fingerprint, or (explicitly, with a warning) not at all. A server configured with a client CA
//! asks for client certificates and verifies them (mutual TLS).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use sha2::{Digest, Sha256};

/// The SHA-256 hash of a certificate's DER encoding, as pinned by clients.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// Parses 64 hex digits, optionally separated by `:`.
    pub fn from_hex(text: &str) -> Result<Self, TlsConfigError> {
        let digits: Vec<u8> = text.bytes().filter(|&b| b != b':').collect();
        let mut out = [0u8; 32];
        if digits.len() != 64 {
            return Err(TlsConfigError::BadFingerprint(text.to_owned()));
        }
        for (byte, pair) in out.iter_mut().zip(digits.chunks(2)) {
            let hex = std::str::from_utf8(pair).ok();
            *byte = hex
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| TlsConfigError::BadFingerprint(text.to_owned()))?;
        }
        Ok(Self(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Where the server's certificate and key come from.
#[derive(Clone, Debug)]
pub enum ServerIdentity {
    /// A PEM certificate chain (end entity first) and a PEM private key.
    PemFiles {
        /// The certificate chain.
        cert: PathBuf,
        /// The private key (PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
    },
    /// A certificate generated at start for these names (DNS names or IP addresses); clients
    /// pin its fingerprint, which [`ServerHandle::tls_fingerprint`](crate::ServerHandle::tls_fingerprint)
    /// returns.
    SelfSigned {
        /// Subject alternative names.
        names: Vec<String>,
    },
}

/// TLS settings of a server.
#[derive(Clone, Debug)]
pub struct ServerTlsConfig {
    /// The server's certificate.
    pub identity: ServerIdentity,
    /// A PEM file of CA certificates that sign client certificates. When set, the server asks
    /// every client for a certificate and verifies it; a verified client is admitted if the
    /// director's [`Admission::verified_identities`](tscf_core::director::Admission) is set.
    /// Clients without a certificate still complete the handshake and need another credential.
    pub client_ca: Option<PathBuf>,
}

/// How a client checks the server's certificate.
#[derive(Clone, Debug)]
pub enum ServerVerification {
    /// Verify the chain against the CA certificates in this PEM file, and the server name.
    CaFile(PathBuf),
    /// Accept exactly the end-entity certificate with this SHA-256 fingerprint (the handshake
    /// signatures are still verified).
    Pinned(Fingerprint),
    /// Accept any certificate. Anyone on the path can read and change the traffic; a warning
    /// is logged on every connection.
    Insecure,
}

/// TLS settings of a client.
#[derive(Clone, Debug)]
pub struct ClientTlsConfig {
    /// How the server certificate is checked.
    pub verification: ServerVerification,
    /// The name to verify and send as SNI; by default the server's IP address.
    pub server_name: Option<String>,
    /// A client certificate chain and key (PEM files) for mutual TLS.
    pub client_identity: Option<(PathBuf, PathBuf)>,
}

impl ClientTlsConfig {
    /// Verification by pinned fingerprint, no client certificate.
    pub fn pinned(fingerprint: Fingerprint) -> Self {
        Self {
            verification: ServerVerification::Pinned(fingerprint),
            server_name: None,
            client_identity: None,
        }
    }
}

/// A TLS setting that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built from the client CA.
    #[error("client CA: {0}")]
    ClientVerifier(String),
    /// Generating the self-signed certificate failed.
    #[error("self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A fingerprint is not 64 hex digits.
    #[error("not a SHA-256 fingerprint (64 hex digits): {0:?}")]
    BadFingerprint(String),
    /// The server name is not a valid DNS name or IP address.
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    /// The DTLS library refused the certificate, key or settings.
    #[error("DTLS configuration: {0}")]
    Dtls(String),
}

/// The ring provider; every rustls configuration here is built from it.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server's certificate chain and private key, loaded or generated once, so that every
/// listener (TLS, QUIC, DTLS) presents the same certificate and one fingerprint pins them all.
#[derive(Debug)]
pub struct LoadedIdentity {
    /// The certificate chain, end entity first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
    /// The SHA-256 fingerprint of the end-entity certificate.
    pub fingerprint: Fingerprint,
}

/// Reads the PEM files of `identity`, or generates the self-signed certificate.
pub fn load_identity(identity: &ServerIdentity) -> Result<LoadedIdentity, TlsConfigError> {
    let (chain, key) = match identity {
        ServerIdentity::PemFiles { cert, key } => (read_certs(cert)?, read_key(key)?),
        ServerIdentity::SelfSigned { names } => {
            let generated = rcgen::generate_simple_self_signed(names.clone())?;
            let key = PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
            (vec![generated.cert.der().clone()], key)
        }
    };
    let fingerprint = chain
        .first()
        .map(|c| Fingerprint::of(c))
        .ok_or_else(|| TlsConfigError::Rustls(rustls::Error::NoCertificatesPresented))?;
    Ok(LoadedIdentity {
        chain,
        key,
        fingerprint,
    })
}

/// Reads a PEM certificate chain and a PEM private key (a client's identity for mutual TLS).
pub fn load_pem_identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsConfigError> {
    Ok((read_certs(cert)?, read_key(key)?))
}

/// The CA certificates of a PEM file, as a root store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsConfigError> {
    root_store(path)
}

/// A rustls server configuration (ring provider) and the fingerprint of its certificate.
/// Runtime-independent: `tscf-runtime-smol` builds its TLS listeners with it too.
pub fn server_config(
    config: &ServerTlsConfig,
) -> Result<(Arc<rustls::ServerConfig>, Fingerprint), TlsConfigError> {
    let identity = load_identity(&config.identity)?;
    let fingerprint = identity.fingerprint;
    Ok((server_config_with(config, identity)?, fingerprint))
}

/// A rustls server configuration (ring provider) presenting an identity already loaded.
pub fn server_config_with(
    config: &ServerTlsConfig,
    identity: LoadedIdentity,
) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    let LoadedIdentity { chain, key, .. } = identity;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match &config.client_ca {
        Some(path) => {
            let roots = Arc::new(root_store(path)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsConfigError::ClientVerifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(builder.with_single_cert(chain, key)?))
}

/// A rustls client configuration (ring provider) that verifies the server as `config` says.
pub fn client_config(
    config: &ClientTlsConfig,
) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let algorithms = provider().signature_verification_algorithms;
    let builder = match &config.verification {
        ServerVerification::CaFile(path) => builder.with_root_certificates(root_store(path)?),
        ServerVerification::Pinned(fingerprint) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                pinned: Some(*fingerprint),
                algorithms,
            })),
        ServerVerification::Insecure => {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                    pinned: None,
                    algorithms,
                }))
        }
    };
    let config = match &config.client_identity {
        Some((cert, key)) => builder.with_client_auth_cert(read_certs(cert)?, read_key(key)?)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The certificate and key a client presents on its secured peer paths (`docs/PROTOCOL.md`
/// §7.5.1), and the fingerprint it announces for them.
pub struct PeerIdentity {
    /// The certificate chain, end entity first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Its private key.
    pub key: PrivateKeyDer<'static>,
    /// The SHA-256 of the end-entity certificate.
    pub fingerprint: Fingerprint,
}

impl PeerIdentity {
    /// A fresh self-signed certificate (rcgen, ECDSA P-256).
    pub fn generate() -> Result<Self, TlsConfigError> {
        let generated = rcgen::generate_simple_self_signed(vec!["tscf-peer".to_owned()])?;
        let der = generated.cert.der().clone();
        Ok(Self {
            fingerprint: Fingerprint::of(&der),
            chain: vec![der],
            key: PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into()),
        })
    }
}

impl Clone for PeerIdentity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            fingerprint: self.fingerprint,
        }
    }
}

impl fmt::Debug for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerIdentity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// The client side of a secured peer session (TLS 1.3, ring): presents `identity` and accepts
/// only a server whose end-entity certificate has the fingerprint `peer`.
pub fn peer_client_config(
    identity: &PeerIdentity,
    peer: Fingerprint,
) -> Result<rustls::ClientConfig, TlsConfigError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
            pinned: Some(peer),
            algorithms: provider().signature_verification_algorithms,
        }))
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    Ok(config)
}

/// The server side of a secured peer session (TLS 1.3, ring): presents `identity`, requires a
/// client certificate, and accepts only one whose fingerprint is `peer`.
pub fn peer_server_config(
    identity: &PeerIdentity,
    peer: Fingerprint,
) -> Result<rustls::ServerConfig, TlsConfigError> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(PinnedClientVerifier {
            pinned: peer,
            algorithms: provider().signature_verification_algorithms,
        }))
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    Ok(config)
}

/// The name a client verifies: the configured one, else the server's IP address.
pub fn server_name(
    config: &ClientTlsConfig,
    addr: std::net::SocketAddr,
) -> Result<ServerName<'static>, TlsConfigError> {
    match &config.server_name {
        Some(name) => {
            ServerName::try_from(name.clone()).map_err(|_| TlsConfigError::ServerName(name.clone()))
        }
        None => Ok(ServerName::IpAddress(addr.ip().into())),
    }
}

/// Accepts the end-entity certificate whose SHA-256 hash is pinned (or any, when `pinned` is
/// `None`), and verifies the handshake signatures with the ring provider's algorithms.
#[derive(Debug)]
struct PinnedVerifier {
    pinned: Option<Fingerprint>,
    algorithms: WebPkiSupportedAlgorithms,
}

/// The server's certificate is not the pinned one.
#[derive(Debug, thiserror::Error)]
#[error("certificate fingerprint {got} does not match the pinned {expected}")]
struct FingerprintMismatch {
    expected: Fingerprint,
    got: Fingerprint,
}

/// Accepts `got` if it is the pinned fingerprint (compared in constant time).
fn check_pin(expected: Fingerprint, got: Fingerprint) -> Result<(), rustls::Error> {
    if constant_time_eq(&got.0, &expected.0) {
        Ok(())
    } else {
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(FingerprintMismatch { expected, got })),
        )))
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Fingerprint::of(end_entity);
        let Some(expected) = self.pinned else {
            tracing::warn!(fingerprint = %got, "TLS server certificate NOT verified (insecure mode)");
            return Ok(ServerCertVerified::assertion());
        };
        check_pin(expected, got).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Requires a client certificate and accepts only the end-entity certificate with the pinned
/// SHA-256 hash; verifies the handshake signatures with the ring provider's algorithms.
#[derive(Debug)]
struct PinnedClientVerifier {
    pinned: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_pin(self.pinned, Fingerprint::of(end_entity))
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem_error = |reason: String| TlsConfigError::Pem {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error("no certificate found".to_owned()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsConfigError::Pem {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn root_store(path: &Path) -> Result<RootCertStore, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// Equality whose time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
