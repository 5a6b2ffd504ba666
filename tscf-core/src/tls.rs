//! TLS for tscf's transports and secured peer sessions: rustls with the ring provider only
//! (never the process default), fingerprint pinning, CA files and mutual TLS.
//!
//! Servers present a certificate from PEM files or a generated self-signed one whose SHA-256
//! [`Fingerprint`] is returned for pinning. Clients verify the server by a CA file, by a pinned
//! fingerprint, or (explicitly, with a warning) not at all. A server configured with a client CA
//! asks for client certificates and verifies them (mutual TLS). The directors of a cluster link
//! over mutual TLS under a cluster CA ([`mesh_tls`]). The builders return rustls
//! configurations that any runtime hands to its TLS or QUIC sessions; the DTLS ones are in the
//! `dtls` module (feature `dtls`).
//!
//! # What comes from the operating system
//!
//! The core reads no file and draws no randomness of its own, yet a configuration may name PEM
//! files and a self-signed certificate needs a fresh key. Both come from the caller as one
//! [`Os`] value: a function that reads a file and one that generates a key pair. A runtime
//! builds it once (`std::fs::read`, `rcgen::KeyPair::generate`) and passes it to every builder
//! that may need it, so each call site stays one argument longer and no more; a test may read
//! from memory instead. The handshakes themselves draw their randoms and ephemeral keys from
//! ring inside rustls (and rtc-dtls), as every TLS stack does: that is the TLS library's, not a
//! decision of the core.
//!
//! No input from the network reaches this module except certificates presented in a
//! handshake, which the verifiers below hash and compare; nothing here panics.

use std::fmt;
use std::io;
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
use subtle::ConstantTimeEq;

/// What the core needs from the operating system and never takes itself: files, fresh keys
/// and the seeds of its generators. A runtime builds it once; see the module documentation for
/// why the caller supplies it.
#[derive(Clone, Copy, Debug)]
pub struct Os {
    /// Reads a whole file: PEM certificate chains, private keys, CA certificates.
    pub read_file: fn(&Path) -> io::Result<Vec<u8>>,
    /// A fresh key pair from a secure random source, for a self-signed certificate
    /// (`rcgen::KeyPair::generate` makes ECDSA P-256 keys).
    pub generate_key: fn() -> Result<rcgen::KeyPair, rcgen::Error>,
    /// Fills a buffer from the operating system's secure random source.
    pub fill_random: fn(&mut [u8]) -> io::Result<()>,
}

impl Os {
    /// 32 octets from the secure random source: the `rng_seed` of a director or a client.
    /// There is no fallback: tunnel ids, re-attach secrets and peer tokens drawn from a
    /// guessable seed would let anyone hijack a tunnel, so without a secure source nothing
    /// starts.
    pub fn seed(&self) -> io::Result<[u8; 32]> {
        let mut seed = [0u8; 32];
        (self.fill_random)(&mut seed).map_err(|e| {
            io::Error::other(format!(
                "no secure randomness from the operating system: {e}"
            ))
        })?;
        Ok(seed)
    }
}

/// The SHA-256 hash of a certificate's DER encoding, as pinned by clients.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// Whether `self` equals `other`, compared in constant time.
    pub fn matches(&self, other: &Fingerprint) -> bool {
        self.0[..].ct_eq(&other.0[..]).into()
    }

    /// Parses 64 hex digits, optionally separated by `:`.
    pub fn from_hex(text: &str) -> Result<Self, TlsConfigError> {
        let digits: Vec<u8> = text.bytes().filter(|&b| b != b':').collect();
        let mut out = [0u8; 32];
        hex::decode_to_slice(digits, &mut out)
            .map_err(|_| TlsConfigError::BadFingerprint(text.to_owned()))?;
        Ok(Self(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
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
    /// A certificate generated at start for these names (DNS names or IP addresses), with a key
    /// from [`Os::generate_key`]; clients pin its fingerprint, which [`load_identity`] and
    /// [`server_config`] return (and the runtimes' `ServerHandle::tls_fingerprint`).
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
    /// director's [`Admission::verified_identities`](crate::director::Admission) is set.
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
pub fn load_identity(identity: &ServerIdentity, os: Os) -> Result<LoadedIdentity, TlsConfigError> {
    let (chain, key) = match identity {
        ServerIdentity::PemFiles { cert, key } => (read_certs(cert, os)?, read_key(key, os)?),
        ServerIdentity::SelfSigned { names } => return self_signed(names.clone(), os),
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
    os: Os,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsConfigError> {
    Ok((read_certs(cert, os)?, read_key(key, os)?))
}

/// The CA certificates of a PEM file, as a root store.
pub fn load_roots(path: &Path, os: Os) -> Result<RootCertStore, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path, os)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// A rustls server configuration (ring provider) and the fingerprint of its certificate.
pub fn server_config(
    config: &ServerTlsConfig,
    os: Os,
) -> Result<(Arc<rustls::ServerConfig>, Fingerprint), TlsConfigError> {
    let identity = load_identity(&config.identity, os)?;
    let fingerprint = identity.fingerprint;
    Ok((server_config_with(config, identity, os)?, fingerprint))
}

/// A rustls server configuration (ring provider) presenting an identity already loaded.
pub fn server_config_with(
    config: &ServerTlsConfig,
    identity: LoadedIdentity,
    os: Os,
) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    let LoadedIdentity { chain, key, .. } = identity;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match &config.client_ca {
        Some(path) => {
            let roots = Arc::new(load_roots(path, os)?);
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

/// The client configuration of a peer stream: it accepts exactly the certificate whose
/// SHA-256 is `fingerprint` and presents none, so it reads no file.
pub fn pinned_client_config(
    fingerprint: Fingerprint,
) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let no_files = Os {
        read_file: |_| Err(io::ErrorKind::Unsupported.into()),
        generate_key: || Err(rcgen::Error::KeyGenerationUnavailable),
        fill_random: |_| Err(io::ErrorKind::Unsupported.into()),
    };
    client_config(&ClientTlsConfig::pinned(fingerprint), no_files)
}

/// A rustls client configuration (ring provider) that verifies the server as `config` says.
pub fn client_config(
    config: &ClientTlsConfig,
    os: Os,
) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let algorithms = provider().signature_verification_algorithms;
    let builder = match &config.verification {
        ServerVerification::CaFile(path) => builder.with_root_certificates(load_roots(path, os)?),
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
        Some((cert, key)) => {
            builder.with_client_auth_cert(read_certs(cert, os)?, read_key(key, os)?)?
        }
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
    /// A fresh self-signed certificate (rcgen) with a key from [`Os::generate_key`].
    pub fn generate(os: Os) -> Result<Self, TlsConfigError> {
        let LoadedIdentity {
            chain,
            key,
            fingerprint,
        } = self_signed(vec!["tscf-peer".to_owned()], os)?;
        Ok(Self {
            chain,
            key,
            fingerprint,
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

/// The PEM files of a director's mesh TLS (`docs/CLUSTER.md`): the cluster CA and this
/// director's certificate, whose subject alternative name is the director's name.
#[derive(Clone, Debug)]
pub struct MeshTlsConfig {
    /// The cluster CA's certificate(s), which sign every director's certificate.
    pub ca: PathBuf,
    /// This director's certificate chain, end entity first.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// Both ends of a director's mesh links: each side presents its director's certificate and
/// accepts only a peer whose certificate chains to the cluster CA.
#[derive(Clone, Debug)]
pub struct MeshTls {
    /// For the mesh listener: requires a client certificate of the cluster.
    pub server: Arc<rustls::ServerConfig>,
    /// For dialing another director: verifies it against the cluster CA under its name
    /// ([`mesh_server_name`]).
    pub client: Arc<rustls::ClientConfig>,
}

/// The mesh TLS configurations (TLS 1.3, ring) from the PEM files of `config`, read through
/// `os`.
pub fn mesh_tls(config: &MeshTlsConfig, os: Os) -> Result<MeshTls, TlsConfigError> {
    let roots = Arc::new(load_roots(&config.ca, os)?);
    let (chain, key) = load_pem_identity(&config.cert, &config.key, os)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| TlsConfigError::ClientVerifier(e.to_string()))?;
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())?;
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    Ok(MeshTls {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

/// The name a director's mesh certificate carries and its peers verify: the director's name
/// as a DNS name. A name that is no DNS name (one that starts or ends with `-`) is refused.
pub fn mesh_server_name(
    director: &crate::cluster::DirectorName,
) -> Result<ServerName<'static>, TlsConfigError> {
    let name = director.as_str().to_owned();
    ServerName::try_from(name.clone()).map_err(|_| TlsConfigError::ServerName(name))
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
    if got.matches(&expected) {
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

/// A certificate for `names` signed by a fresh key of its own, with that key.
fn self_signed(names: Vec<String>, os: Os) -> Result<LoadedIdentity, TlsConfigError> {
    let key = (os.generate_key)()?;
    let cert = rcgen::CertificateParams::new(names)?.self_signed(&key)?;
    Ok(LoadedIdentity {
        fingerprint: Fingerprint::of(cert.der()),
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    })
}

fn read_certs(path: &Path, os: Os) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem_error = |reason: String| TlsConfigError::Pem {
        path: path.to_owned(),
        reason,
    };
    let pem = read_pem(path, os)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error("no certificate found".to_owned()));
    }
    Ok(certs)
}

fn read_key(path: &Path, os: Os) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    let pem = read_pem(path, os)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsConfigError::Pem {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn read_pem(path: &Path, os: Os) -> Result<Vec<u8>, TlsConfigError> {
    (os.read_file)(path).map_err(|e| TlsConfigError::Pem {
        path: path.to_owned(),
        // As rustls-pki-types words a file it cannot read.
        reason: rustls::pki_types::pem::Error::Io(e).to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;

    /// A certificate and key as PEM files "on disk": in memory, generated once.
    fn files() -> &'static (String, String) {
        static FILES: OnceLock<(String, String)> = OnceLock::new();
        FILES.get_or_init(|| {
            let key = rcgen::KeyPair::generate().expect("a key");
            let params = rcgen::CertificateParams::new(vec!["server.test".to_owned()]);
            let cert = params
                .expect("names")
                .self_signed(&key)
                .expect("a certificate");
            (cert.pem(), key.serialize_pem())
        })
    }

    /// Reads `cert.pem` and `key.pem` from [`files`]; anything else does not exist.
    const MEMORY: Os = Os {
        read_file: |path| match path.to_str() {
            Some("cert.pem") => Ok(files().0.clone().into_bytes()),
            Some("key.pem") => Ok(files().1.clone().into_bytes()),
            _ => Err(io::ErrorKind::NotFound.into()),
        },
        generate_key: rcgen::KeyPair::generate,
        fill_random: |_| Err(io::ErrorKind::Unsupported.into()),
    };

    /// Runs a handshake in memory; `Err` carries the first side's error.
    fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
        name: &str,
    ) -> Result<(), rustls::Error> {
        let name = ServerName::try_from(name.to_owned()).expect("a name");
        let mut client = rustls::ClientConnection::new(client, name)?;
        let mut server = rustls::ServerConnection::new(server)?;
        let mut wire = Vec::new();
        for _ in 0..8 {
            wire.clear();
            while client.wants_write() {
                client.write_tls(&mut wire).expect("to memory");
            }
            let mut input = &wire[..];
            while !input.is_empty() {
                server.read_tls(&mut input).expect("from memory");
            }
            server.process_new_packets()?;
            wire.clear();
            while server.wants_write() {
                server.write_tls(&mut wire).expect("to memory");
            }
            let mut input = &wire[..];
            while !input.is_empty() {
                client.read_tls(&mut input).expect("from memory");
            }
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        Err(rustls::Error::General(
            "the handshake did not finish".to_owned(),
        ))
    }

    #[test]
    fn fingerprints_print_and_parse_as_hex() {
        let f = Fingerprint(core::array::from_fn(|i| i as u8 * 7));
        let text = f.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(Fingerprint::from_hex(&text).expect("hex"), f);
        let colons: Vec<String> = f.0.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(Fingerprint::from_hex(&colons.join(":")).expect("hex"), f);
        for bad in ["0f:0f", &text[..62], &format!("{}zz", &text[..62])] {
            assert!(Fingerprint::from_hex(bad).is_err(), "{bad}");
        }
        assert!(f.matches(&f));
        assert!(!f.matches(&Fingerprint([0; 32])));
    }

    #[test]
    fn pem_files_are_read_through_the_callers_reader() {
        let identity = ServerIdentity::PemFiles {
            cert: "cert.pem".into(),
            key: "key.pem".into(),
        };
        let loaded = load_identity(&identity, MEMORY).expect("the files load");
        assert_eq!(loaded.chain.len(), 1);
        assert_eq!(loaded.fingerprint, Fingerprint::of(&loaded.chain[0]));
        let missing = ServerIdentity::PemFiles {
            cert: "missing.pem".into(),
            key: "key.pem".into(),
        };
        let err = load_identity(&missing, MEMORY).expect_err("no such file");
        assert!(
            matches!(&err, TlsConfigError::Pem { path, .. } if path == Path::new("missing.pem"))
        );
        // A key is no certificate.
        let swapped = ServerIdentity::PemFiles {
            cert: "key.pem".into(),
            key: "key.pem".into(),
        };
        assert!(load_identity(&swapped, MEMORY).is_err());
    }

    #[test]
    fn a_pinned_client_accepts_only_the_pinned_certificate() {
        let config = ServerTlsConfig {
            identity: ServerIdentity::SelfSigned {
                names: vec!["server.test".to_owned()],
            },
            client_ca: None,
        };
        let (server, fingerprint) = server_config(&config, MEMORY).expect("a server");
        let client = client_config(&ClientTlsConfig::pinned(fingerprint), MEMORY).expect("client");
        handshake(client, server.clone(), "server.test").expect("the pinned certificate");

        let other = client_config(&ClientTlsConfig::pinned(Fingerprint([1; 32])), MEMORY);
        let err = handshake(other.expect("client"), server.clone(), "server.test");
        assert!(
            matches!(err, Err(rustls::Error::InvalidCertificate(_))),
            "{err:?}"
        );

        // Verified by CA file and name: the self-signed certificate is its own CA.
        let files = ServerTlsConfig {
            identity: ServerIdentity::PemFiles {
                cert: "cert.pem".into(),
                key: "key.pem".into(),
            },
            client_ca: None,
        };
        let (server, _) = server_config(&files, MEMORY).expect("a server");
        let by_ca = ClientTlsConfig {
            verification: ServerVerification::CaFile("cert.pem".into()),
            server_name: None,
            client_identity: None,
        };
        let client = client_config(&by_ca, MEMORY).expect("client");
        handshake(client.clone(), server.clone(), "server.test").expect("the CA's name");
        assert!(handshake(client, server, "other.test").is_err());
    }

    /// Two clusters' PEM files "on disk": each a CA and two directors, `dir-a` and `dir-b`,
    /// under `<cluster>/ca.pem`, `<cluster>/<director>.pem` and `<cluster>/<director>.key`.
    fn cluster_files() -> &'static std::collections::HashMap<String, String> {
        static FILES: OnceLock<std::collections::HashMap<String, String>> = OnceLock::new();
        FILES.get_or_init(|| {
            let mut files = std::collections::HashMap::new();
            for cluster in ["one", "two"] {
                let ca_key = rcgen::KeyPair::generate().expect("a key");
                let mut ca_params = rcgen::CertificateParams::new(vec![]).expect("no names");
                ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
                let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("a CA");
                files.insert(format!("{cluster}/ca.pem"), ca.pem());
                for director in ["dir-a", "dir-b"] {
                    let key = rcgen::KeyPair::generate().expect("a key");
                    let params = rcgen::CertificateParams::new(vec![director.to_owned()]);
                    let cert = params
                        .expect("a name")
                        .signed_by(&key, &ca)
                        .expect("a certificate");
                    files.insert(format!("{cluster}/{director}.pem"), cert.pem());
                    files.insert(format!("{cluster}/{director}.key"), key.serialize_pem());
                }
            }
            files
        })
    }

    const CLUSTER_MEMORY: Os = Os {
        read_file: |path| {
            let path = path.to_str().unwrap_or_default();
            cluster_files()
                .get(path)
                .map(|pem| pem.clone().into_bytes())
                .ok_or_else(|| io::ErrorKind::NotFound.into())
        },
        generate_key: rcgen::KeyPair::generate,
        fill_random: |_| Err(io::ErrorKind::Unsupported.into()),
    };

    fn mesh(cluster: &str, director: &str) -> MeshTls {
        let config = MeshTlsConfig {
            ca: format!("{cluster}/ca.pem").into(),
            cert: format!("{cluster}/{director}.pem").into(),
            key: format!("{cluster}/{director}.key").into(),
        };
        mesh_tls(&config, CLUSTER_MEMORY).expect("mesh TLS")
    }

    #[test]
    fn directors_of_one_cluster_link_both_ways_and_strangers_are_refused() {
        let a = mesh("one", "dir-a");
        let b = mesh("one", "dir-b");
        handshake(a.client.clone(), b.server.clone(), "dir-b").expect("a dials b");
        handshake(b.client.clone(), a.server.clone(), "dir-a").expect("b dials a");
        // The name is checked: a's certificate is not b's.
        assert!(handshake(a.client.clone(), b.server.clone(), "dir-a").is_err());

        // A director of another cluster, dialing: refused by the listener.
        let stranger = mesh("two", "dir-b");
        let err = handshake(stranger.client.clone(), a.server.clone(), "dir-a");
        assert!(err.is_err(), "the listener took a stranger");
        // Listening: refused by the one who dials.
        let err = handshake(a.client.clone(), stranger.server.clone(), "dir-b");
        assert!(
            matches!(err, Err(rustls::Error::InvalidCertificate(_))),
            "{err:?}"
        );

        // A client without any certificate: refused by the listener.
        let anonymous = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(
                load_roots(Path::new("one/ca.pem"), CLUSTER_MEMORY).expect("CA"),
            )
            .with_no_client_auth();
        let err = handshake(Arc::new(anonymous), a.server.clone(), "dir-a");
        assert!(
            err.is_err(),
            "the listener took a client without a certificate"
        );
    }

    #[test]
    fn a_director_name_is_the_mesh_server_name() {
        let name = crate::cluster::DirectorName::new("dir-a").expect("a name");
        assert!(mesh_server_name(&name).is_ok());
        let dashed = crate::cluster::DirectorName::new("-a").expect("a director name");
        assert!(mesh_server_name(&dashed).is_err());
    }

    #[test]
    fn peer_sessions_pin_both_ends() {
        let a = PeerIdentity::generate(MEMORY).expect("a");
        let b = PeerIdentity::generate(MEMORY).expect("b");
        assert_ne!(a.fingerprint, b.fingerprint);
        let name = "tscf-peer";
        let client = Arc::new(peer_client_config(&a, b.fingerprint).expect("client"));
        let server = Arc::new(peer_server_config(&b, a.fingerprint).expect("server"));
        handshake(client.clone(), server, name).expect("both pins hold");
        // The server pins another client.
        let server = Arc::new(peer_server_config(&b, b.fingerprint).expect("server"));
        assert!(handshake(client, server, name).is_err());
    }
}
