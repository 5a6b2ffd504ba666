//! DTLS 1.2 associations with many remote addresses over one UDP socket (rtc-dtls: sans-IO,
//! ring), for the server's DTLS listeners and a client's DTLS transport.
//!
//! [`DtlsEndpoint`] owns no socket and reads no clock: the caller feeds it each datagram whose
//! first octet is a DTLS record (20..=63, `docs/PROTOCOL.md` §2.4) with
//! [`handle_datagram`](DtlsEndpoint::handle_datagram), calls
//! [`handle_timeout`](DtlsEndpoint::handle_timeout) at [`poll_timeout`](DtlsEndpoint::poll_timeout),
//! and after any input drains [`poll_transmit`](DtlsEndpoint::poll_transmit) (datagrams to send
//! on its socket) and [`poll_event`](DtlsEndpoint::poll_event) until both return `None`.
//!
//! rtc-dtls keeps state for every address it is fed a datagram from, garbage included, so
//! this endpoint feeds it only datagrams from addresses that hold an association here:
//!
//! - one it started itself ([`connect`](DtlsEndpoint::connect), client role);
//! - one the caller authorised ([`authorise`](DtlsEndpoint::authorise), server role) whose
//!   first datagram looks like a ClientHello;
//! - when an acceptor is set ([`set_acceptor`](DtlsEndpoint::set_acceptor), a server
//!   listener), any source whose datagram looks like a ClientHello; such half-open handshakes
//!   are at most [`DtlsLimits::max_half_open`] (a new one evicts the oldest) and each has
//!   [`DtlsLimits::handshake_timeout`] to complete.
//!
//! Everything else is dropped before any state is kept, and counted. The state of an address
//! is dropped on a handshake error, a handshake timeout, the peer's `close_notify`, and
//! [`close`](DtlsEndpoint::close). Once an association is up, a record it refuses is counted
//! and the association kept: such a record can only be forged (RFC 6347 §4.1.2.7), and
//! letting it end the association would let anyone who can spoof the address cut it.
//!
//! rtc-dtls answers each ClientHello without a cookie with its own HelloVerifyRequest
//! (RFC 6347 §4.2.1) and keeps the cookie in the half-open state; it cannot be given a
//! stateless cookie of ours, so the bound on half-open state is the cap above, not a
//! stateless exchange.
//!
//! No input makes any function here panic.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rtc_dtls::config::{
    ClientAuthType, ConfigBuilder, ExtendedMasterSecretType, HandshakeConfig,
    RustlsVerifierAdapter, VerifyPeerCertificateFn,
};
use rtc_dtls::crypto::Certificate;
use rtc_dtls::crypto_provider::providers::RingProvider;
use rtc_dtls::crypto_provider::{RTCCryptoProvider, SignatureScheme};
use rtc_dtls::endpoint::{Endpoint, EndpointEvent};
use rtc_shared::TransportProtocol;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;
use tscf_runtime_std::tls::{constant_time_eq, Fingerprint};

/// Octets of datagrams carrying plaintext (epoch 0) records that one association takes in its
/// life; beyond it they are dropped (once established) or the handshake fails. A handshake
/// with certificate chains takes a few kilobytes. rtc-dtls buffers handshake fragments of
/// any message sequence up to 2 MB per association, so this is what bounds that memory.
const MAX_PLAINTEXT_OCTETS: usize = 64 * 1024;

/// Bounds of a [`DtlsEndpoint`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct DtlsLimits {
    /// Most half-open handshakes admitted from unknown sources (by the acceptor) at once.
    pub(crate) max_half_open: usize,
    /// How long any handshake may take before its state is dropped.
    pub(crate) handshake_timeout: Duration,
}

/// What a [`DtlsEndpoint`] reports.
#[derive(Debug)]
#[non_exhaustive]
pub(crate) enum DtlsEvent {
    /// The handshake with `peer` completed; [`DtlsEndpoint::send`] works from now on.
    HandshakeDone {
        peer: SocketAddr,
        /// The peer's end-entity certificate (DER), if it presented one.
        peer_certificate: Option<Vec<u8>>,
    },
    /// The handshake with `peer` failed or timed out; its state is gone.
    HandshakeFailed { peer: SocketAddr, reason: String },
    /// One application data record's payload from `peer`.
    Data { peer: SocketAddr, payload: BytesMut },
    /// The association with `peer` ended (the peer's `close_notify`, or a send that failed);
    /// its state is gone.
    Closed { peer: SocketAddr },
}

/// Counters of a [`DtlsEndpoint`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct DtlsCounters {
    /// Handshakes completed.
    pub(crate) handshakes: u64,
    /// Handshakes that failed or timed out.
    pub(crate) handshake_failures: u64,
    /// Datagrams from a source without state that do not start an allowed handshake.
    pub(crate) unknown_source: u64,
    /// Records an established association refused, and datagrams that are no DTLS record.
    pub(crate) bad_records: u64,
    /// Half-open handshakes evicted because the cap was reached.
    pub(crate) half_open_evicted: u64,
}

/// Why [`DtlsEndpoint::send`] did not send.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DtlsSendError {
    /// No association with this address has completed its handshake.
    #[error("no established DTLS association with {0}")]
    NotEstablished(SocketAddr),
    /// The association refused the data; it has been dropped.
    #[error("DTLS association with {peer} failed: {reason}")]
    Failed { peer: SocketAddr, reason: String },
}

/// A configuration rtc-dtls cannot use.
#[derive(Debug, thiserror::Error)]
#[error("DTLS configuration: {0}")]
pub(crate) struct DtlsConfigError(String);

/// One association: an rtc-dtls endpoint holding exactly the association with one address, so
/// that each address gets its own configuration (role, pinned fingerprint).
struct Association {
    dtls: Endpoint,
    established: bool,
    /// When the handshake is given up; `None` once established.
    deadline: Option<Instant>,
    /// Octets of datagrams with plaintext records fed so far (see [`MAX_PLAINTEXT_OCTETS`]).
    plaintext_octets: usize,
}

/// DTLS associations with many addresses over one socket. See the module documentation for
/// the call order and what is fed to rtc-dtls.
pub(crate) struct DtlsEndpoint {
    local: SocketAddr,
    limits: DtlsLimits,
    acceptor: Option<Arc<HandshakeConfig>>,
    authorised: HashMap<SocketAddr, Arc<HandshakeConfig>>,
    associations: HashMap<SocketAddr, Association>,
    /// Addresses whose handshake is in progress (they have timers).
    pending: HashSet<SocketAddr>,
    /// Half-open handshakes admitted by the acceptor, oldest first.
    admitted: VecDeque<SocketAddr>,
    transmits: VecDeque<(SocketAddr, BytesMut)>,
    events: VecDeque<DtlsEvent>,
    counters: DtlsCounters,
}

impl std::fmt::Debug for DtlsEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DtlsEndpoint")
            .field("local", &self.local)
            .field("associations", &self.associations.len())
            .field("half_open", &self.pending.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl DtlsEndpoint {
    /// An endpoint for the socket bound to `local`, with no association and no acceptor.
    pub(crate) fn new(local: SocketAddr, limits: DtlsLimits) -> Self {
        Self {
            local,
            limits,
            acceptor: None,
            authorised: HashMap::new(),
            associations: HashMap::new(),
            pending: HashSet::new(),
            admitted: VecDeque::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            counters: DtlsCounters::default(),
        }
    }

    /// Accepts handshakes (server role, with `config`) from any source, within the half-open
    /// cap; `None` accepts only authorised addresses.
    pub(crate) fn set_acceptor(&mut self, config: Option<Arc<HandshakeConfig>>) {
        self.acceptor = config;
    }

    /// Accepts a handshake (server role, with `config`, which may pin the peer's certificate)
    /// from `peer`, whose datagrams are dropped until then. Not counted against the cap.
    #[allow(dead_code)] // The API for peer tunnels on a shared socket.
    pub(crate) fn authorise(&mut self, peer: SocketAddr, config: Arc<HandshakeConfig>) {
        self.authorised.insert(peer, config);
    }

    /// Starts a handshake with `peer` in the client role. Replaces any association with it.
    pub(crate) fn connect(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        config: Arc<HandshakeConfig>,
    ) -> Result<(), DtlsConfigError> {
        self.forget(peer);
        let mut dtls = Endpoint::new(self.local, TransportProtocol::UDP, None);
        dtls.connect(now, peer, config, None)
            .map_err(|e| DtlsConfigError(e.to_string()))?;
        self.insert(now, peer, dtls);
        Ok(())
    }

    /// Feeds one datagram received from `from`.
    pub(crate) fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        if !matches!(datagram.first(), Some(20..=63)) {
            self.counters.bad_records += 1;
            return;
        }
        if !self.associations.contains_key(&from) && !self.admit(now, from, datagram) {
            self.counters.unknown_source += 1;
            return;
        }
        let Some(association) = self.associations.get_mut(&from) else {
            return;
        };
        if has_plaintext_record(datagram) {
            association.plaintext_octets += datagram.len();
            if association.plaintext_octets > MAX_PLAINTEXT_OCTETS {
                if association.established {
                    self.counters.bad_records += 1;
                } else {
                    self.fail(from, "too much handshake data".to_owned());
                }
                return;
            }
        }
        let result = association
            .dtls
            .read(now, from, None, BytesMut::from(datagram));
        let established = association.established;
        self.flush(from);
        match result {
            Ok(events) => {
                for event in events {
                    self.on_event(from, event);
                }
            }
            Err(_) if established => self.counters.bad_records += 1,
            Err(e) => self.fail(from, e.to_string()),
        }
    }

    /// Sends `payload` to `peer` as one application data record.
    pub(crate) fn send(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        payload: &[u8],
    ) -> Result<(), DtlsSendError> {
        let association = self
            .associations
            .get_mut(&peer)
            .filter(|a| a.established)
            .ok_or(DtlsSendError::NotEstablished(peer))?;
        let result = association.dtls.write(now, peer, payload);
        self.flush(peer);
        result.map_err(|e| {
            self.forget(peer);
            self.events.push_back(DtlsEvent::Closed { peer });
            DtlsSendError::Failed {
                peer,
                reason: e.to_string(),
            }
        })
    }

    /// Ends the association with `peer` (sending `close_notify`) and forgets it, its
    /// authorisation included. No event follows.
    pub(crate) fn close(&mut self, now: Instant, peer: SocketAddr) {
        if let Some(association) = self.associations.get_mut(&peer) {
            // The association is dropped below whatever this returns.
            let _ = association.dtls.stop(now, peer);
            self.flush(peer);
        }
        self.forget(peer);
        self.authorised.remove(&peer);
    }

    /// When [`handle_timeout`](Self::handle_timeout) is next due.
    #[must_use]
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.pending
            .iter()
            .filter_map(|peer| {
                let association = self.associations.get(peer)?;
                let retransmit = association.dtls.poll_timeout(peer);
                match (association.deadline, retransmit) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            })
            .min()
    }

    /// Retransmits handshake flights that are due and gives up handshakes past their deadline.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<SocketAddr> = self.pending.iter().copied().collect();
        for peer in due {
            let Some(association) = self.associations.get_mut(&peer) else {
                continue;
            };
            if association.deadline.is_some_and(|d| d <= now) {
                self.fail(peer, "handshake timed out".to_owned());
                continue;
            }
            if association
                .dtls
                .poll_timeout(&peer)
                .is_some_and(|t| t <= now)
            {
                let result = association.dtls.handle_timeout(peer, now);
                self.flush(peer);
                if let Err(e) = result {
                    self.fail(peer, e.to_string());
                }
            }
        }
    }

    /// The next datagram to send on the socket, and where.
    #[must_use]
    pub(crate) fn poll_transmit(&mut self) -> Option<(SocketAddr, BytesMut)> {
        self.transmits.pop_front()
    }

    /// The next event.
    #[must_use]
    pub(crate) fn poll_event(&mut self) -> Option<DtlsEvent> {
        self.events.pop_front()
    }

    /// Counters so far.
    pub(crate) fn counters(&self) -> DtlsCounters {
        self.counters
    }

    /// Associations whose handshake completed.
    pub(crate) fn established(&self) -> usize {
        self.associations.len() - self.pending.len()
    }

    /// Addresses with a handshake in progress (the per-address state hostile input can cause).
    pub(crate) fn half_open(&self) -> usize {
        self.pending.len()
    }

    /// Creates the association for a first datagram from `from` if it is allowed to start one:
    /// authorised or accepted, and looking like a ClientHello. False if not.
    fn admit(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> bool {
        if !looks_like_client_hello(datagram) {
            return false;
        }
        let (config, counted) = match self.authorised.get(&from) {
            Some(config) => (config.clone(), false),
            None => match &self.acceptor {
                Some(config) => (config.clone(), true),
                None => return false,
            },
        };
        if counted {
            while self.admitted.len() >= self.limits.max_half_open.max(1) {
                let Some(oldest) = self.admitted.pop_front() else {
                    break;
                };
                self.forget(oldest);
                self.counters.half_open_evicted += 1;
            }
            self.admitted.push_back(from);
        }
        let dtls = Endpoint::new(self.local, TransportProtocol::UDP, Some(config));
        self.insert(now, from, dtls);
        true
    }

    fn insert(&mut self, now: Instant, peer: SocketAddr, mut dtls: Endpoint) {
        while let Some(t) = dtls.poll_transmit() {
            self.transmits.push_back((peer, t.message));
        }
        self.associations.insert(
            peer,
            Association {
                dtls,
                established: false,
                deadline: Some(now + self.limits.handshake_timeout),
                plaintext_octets: 0,
            },
        );
        self.pending.insert(peer);
    }

    fn on_event(&mut self, peer: SocketAddr, event: EndpointEvent) {
        match event {
            EndpointEvent::HandshakeComplete => {
                let Some(association) = self.associations.get_mut(&peer) else {
                    return;
                };
                association.established = true;
                association.deadline = None;
                let peer_certificate = association
                    .dtls
                    .get_connection_state(peer)
                    .and_then(|s| s.peer_certificates.first().cloned());
                self.pending.remove(&peer);
                self.admitted.retain(|a| *a != peer);
                self.counters.handshakes += 1;
                self.events.push_back(DtlsEvent::HandshakeDone {
                    peer,
                    peer_certificate,
                });
            }
            EndpointEvent::ApplicationData(payload) => {
                self.events.push_back(DtlsEvent::Data { peer, payload });
            }
            EndpointEvent::PeerClosed => {
                self.forget(peer);
                self.events.push_back(DtlsEvent::Closed { peer });
            }
            _ => {}
        }
    }

    fn fail(&mut self, peer: SocketAddr, reason: String) {
        self.forget(peer);
        self.counters.handshake_failures += 1;
        self.events
            .push_back(DtlsEvent::HandshakeFailed { peer, reason });
    }

    fn forget(&mut self, peer: SocketAddr) {
        if self.associations.remove(&peer).is_some() {
            self.pending.remove(&peer);
            self.admitted.retain(|a| *a != peer);
        }
    }

    fn flush(&mut self, peer: SocketAddr) {
        if let Some(association) = self.associations.get_mut(&peer) {
            while let Some(t) = association.dtls.poll_transmit() {
                self.transmits.push_back((peer, t.message));
            }
        }
    }
}

/// A DTLS 1.x handshake record of epoch 0 carrying the start of a ClientHello: the only
/// datagram that may create state for a source (RFC 6347 §4.1 record header, §4.2.2
/// handshake header).
fn looks_like_client_hello(datagram: &[u8]) -> bool {
    const RECORD_HEADER: usize = 13;
    const HANDSHAKE_HEADER: usize = 12;
    datagram.len() >= RECORD_HEADER + HANDSHAKE_HEADER
        && datagram[0] == 22
        && datagram[1] == 0xfe
        && matches!(datagram[2], 0xfd | 0xff)
        && datagram[3..5] == [0, 0]
        && datagram[RECORD_HEADER] == 1
}

/// Whether any record in `datagram` is of epoch 0 (plaintext), or the records cannot be walked.
fn has_plaintext_record(mut datagram: &[u8]) -> bool {
    const RECORD_HEADER: usize = 13;
    while !datagram.is_empty() {
        if datagram.len() < RECORD_HEADER || datagram[3..5] == [0, 0] {
            return true;
        }
        let length = usize::from(u16::from_be_bytes([datagram[11], datagram[12]]));
        datagram = datagram.get(RECORD_HEADER + length..).unwrap_or_default();
    }
    false
}

/// The crypto provider of every DTLS configuration here (ring).
fn provider() -> Arc<dyn RTCCryptoProvider> {
    Arc::new(RingProvider::new())
}

/// A DTLS certificate from a chain and a PKCS#8 key (rtc-dtls imports PKCS#8 only).
pub(crate) fn certificate(
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
pub(crate) enum PeerCheck {
    /// The end-entity certificate has this SHA-256 fingerprint.
    Pinned(Fingerprint),
    /// The chain verifies against these roots for this name (a DNS name or an IP address).
    Roots { roots: RootCertStore, name: String },
    /// Anything (the handshake signature is still verified).
    Insecure,
}

fn builder() -> ConfigBuilder {
    ConfigBuilder::default()
        .with_crypto_provider(provider())
        .with_extended_master_secret(ExtendedMasterSecretType::Require)
        .with_rustls_verifier_adapter(RustlsVerifierAdapter::ring())
}

fn pin(fingerprint: Fingerprint) -> VerifyPeerCertificateFn {
    Arc::new(move |certs: &[Vec<u8>], _| {
        let matches = certs
            .first()
            .is_some_and(|c| constant_time_eq(&Fingerprint::of(c).0, &fingerprint.0));
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
pub(crate) enum ClientCheck {
    /// It asks for none.
    None,
    /// It asks for one and, if given, verifies it against these roots (mutual TLS).
    Roots(RootCertStore),
    /// It requires one with this SHA-256 fingerprint (a peer tunnel's other end).
    #[allow(dead_code)] // For peer tunnels; exercised by the tests below.
    Pinned(Fingerprint),
}

/// A server-role configuration presenting `certificate` and checking the client as `check`
/// says.
pub(crate) fn server_config(
    certificate: Certificate,
    check: ClientCheck,
) -> Result<Arc<HandshakeConfig>, DtlsConfigError> {
    let mut builder = builder().with_certificates(vec![certificate]);
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
        .build(false, None)
        .map(Arc::new)
        .map_err(|e| DtlsConfigError(e.to_string()))
}

/// A client-role configuration for the server at `server` that checks it as `check` says and
/// presents `certificate` if given.
pub(crate) fn client_config(
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

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: DtlsLimits = DtlsLimits {
        max_half_open: 8,
        handshake_timeout: Duration::from_secs(5),
    };

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn server_identity() -> (Certificate, Fingerprint) {
        let generated = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])
            .expect("a certificate is generated");
        let der = generated.cert.der().clone();
        let fingerprint = Fingerprint::of(&der);
        let key = PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
        let cert = certificate(vec![der], &key).expect("the key imports");
        (cert, fingerprint)
    }

    /// Delivers everything `from` wants to send to `to`, as if over loopback.
    fn transfer(now: Instant, from: &mut DtlsEndpoint, to: &mut DtlsEndpoint) -> usize {
        let mut n = 0;
        while let Some((dest, datagram)) = from.poll_transmit() {
            if dest == to.local {
                to.handle_datagram(now, from.local, &datagram);
                n += 1;
            }
        }
        n
    }

    fn events(endpoint: &mut DtlsEndpoint) -> Vec<DtlsEvent> {
        std::iter::from_fn(|| endpoint.poll_event()).collect()
    }

    fn pair(check: PeerCheck) -> (DtlsEndpoint, DtlsEndpoint, Vec<DtlsEvent>, Vec<DtlsEvent>) {
        let (cert, _) = server_identity();
        let now = Instant::now();
        let mut server = DtlsEndpoint::new(addr(4445), LIMITS);
        server.set_acceptor(Some(
            server_config(cert, ClientCheck::None).expect("server config"),
        ));
        let mut client = DtlsEndpoint::new(addr(50_000), LIMITS);
        let config = client_config(addr(4445), check, None).expect("client config");
        client.connect(now, server.local, config).expect("connect");
        let (mut server_events, mut client_events) = (Vec::new(), Vec::new());
        for _ in 0..16 {
            let moved =
                transfer(now, &mut client, &mut server) + transfer(now, &mut server, &mut client);
            server_events.extend(events(&mut server));
            client_events.extend(events(&mut client));
            if moved == 0 {
                break;
            }
        }
        (server, client, server_events, client_events)
    }

    #[test]
    fn a_pinned_handshake_carries_data_both_ways() {
        let (_, fingerprint) = server_identity();
        // A different certificate per call: pin the one the server really has.
        let (cert, fingerprint_real) = server_identity();
        assert_ne!(fingerprint, fingerprint_real);
        let now = Instant::now();
        let mut server = DtlsEndpoint::new(addr(4445), LIMITS);
        server.set_acceptor(Some(
            server_config(cert, ClientCheck::None).expect("server config"),
        ));
        let mut client = DtlsEndpoint::new(addr(50_000), LIMITS);
        let config =
            client_config(server.local, PeerCheck::Pinned(fingerprint_real), None).expect("config");
        client.connect(now, server.local, config).expect("connect");
        let mut done = (false, false);
        for _ in 0..16 {
            transfer(now, &mut client, &mut server);
            transfer(now, &mut server, &mut client);
            for e in events(&mut server) {
                done.0 |= matches!(e, DtlsEvent::HandshakeDone { .. });
            }
            for e in events(&mut client) {
                done.1 |= matches!(e, DtlsEvent::HandshakeDone { .. });
            }
        }
        assert_eq!(done, (true, true));
        assert_eq!((server.established(), server.half_open()), (1, 0));
        client.send(now, server.local, b"up").expect("send");
        transfer(now, &mut client, &mut server);
        let got: Vec<_> = events(&mut server)
            .into_iter()
            .filter_map(|e| match e {
                DtlsEvent::Data { payload, .. } => Some(payload.to_vec()),
                _ => None,
            })
            .collect();
        assert_eq!(got, vec![b"up".to_vec()]);
        server.send(now, client.local, b"down").expect("send");
        transfer(now, &mut server, &mut client);
        assert!(events(&mut client)
            .iter()
            .any(|e| matches!(e, DtlsEvent::Data { payload, .. } if &payload[..] == b"down")));
        // Closing tells the other side, which forgets the association.
        client.close(now, server.local);
        transfer(now, &mut client, &mut server);
        assert!(events(&mut server)
            .iter()
            .any(|e| matches!(e, DtlsEvent::Closed { .. })));
        assert_eq!(server.established(), 0);
    }

    #[test]
    fn an_authorised_address_with_a_pinned_client_certificate_and_no_acceptor() {
        let (server_cert, server_fp) = server_identity();
        let (client_cert, client_fp) = server_identity();
        let (_, other_fp) = server_identity();
        let now = Instant::now();
        let mut server = DtlsEndpoint::new(addr(4445), LIMITS);
        let mut client = DtlsEndpoint::new(addr(50_000), LIMITS);
        let mut stranger = DtlsEndpoint::new(addr(50_001), LIMITS);
        let pinned = |fp| server_config(server_cert.clone(), ClientCheck::Pinned(fp));
        // Without an acceptor, only the authorised address gets state.
        server.authorise(client.local, pinned(client_fp).expect("config"));
        let check = PeerCheck::Pinned(server_fp);
        let config = client_config(server.local, check, Some(client_cert.clone()));
        client
            .connect(now, server.local, config.expect("config"))
            .expect("connect");
        let config = client_config(server.local, PeerCheck::Pinned(server_fp), None);
        stranger
            .connect(now, server.local, config.expect("config"))
            .expect("connect");
        let mut done = false;
        for _ in 0..16 {
            transfer(now, &mut client, &mut server);
            transfer(now, &mut stranger, &mut server);
            transfer(now, &mut server, &mut client);
            for e in events(&mut server) {
                if let DtlsEvent::HandshakeDone {
                    peer,
                    peer_certificate,
                } = e
                {
                    assert_eq!(peer, client.local);
                    let der = peer_certificate.expect("the client's certificate");
                    assert_eq!(Fingerprint::of(&der), client_fp);
                    done = true;
                }
            }
        }
        assert!(done, "the authorised client completed");
        assert_eq!((server.established(), server.half_open()), (1, 0));
        assert!(
            server.counters().unknown_source > 0,
            "the stranger was dropped"
        );

        // A client whose certificate is not the pinned one is refused.
        let mut server = DtlsEndpoint::new(addr(4445), LIMITS);
        let mut client = DtlsEndpoint::new(addr(50_000), LIMITS);
        server.authorise(client.local, pinned(other_fp).expect("config"));
        let config = client_config(
            server.local,
            PeerCheck::Pinned(server_fp),
            Some(client_cert),
        );
        client
            .connect(now, server.local, config.expect("config"))
            .expect("connect");
        for _ in 0..16 {
            transfer(now, &mut client, &mut server);
            transfer(now, &mut server, &mut client);
        }
        assert!(events(&mut server)
            .iter()
            .any(|e| matches!(e, DtlsEvent::HandshakeFailed { .. })));
        assert_eq!(server.established() + server.half_open(), 0);
    }

    #[test]
    fn a_wrong_pin_fails_the_handshake_and_leaves_no_state() {
        let (_, wrong) = server_identity();
        let (server, client, _, client_events) = pair(PeerCheck::Pinned(wrong));
        assert!(client_events
            .iter()
            .any(|e| matches!(e, DtlsEvent::HandshakeFailed { .. })));
        assert!(!client_events
            .iter()
            .any(|e| matches!(e, DtlsEvent::HandshakeDone { .. })));
        assert_eq!(client.half_open() + client.established(), 0);
        assert_eq!(client.counters().handshake_failures, 1);
        assert_eq!(server.established(), 0);
    }

    #[test]
    fn plaintext_records_are_bounded_per_association() {
        let (mut server, client, _, _) = pair(PeerCheck::Insecure);
        let now = Instant::now();
        // Epoch-0 handshake records of ever new message sequence numbers, which rtc-dtls would
        // buffer (an attacker spoofing the client's address can send them).
        let mut record = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let body = [0u8; 1000];
        let mut fragment = vec![2, 0, 0x10, 0];
        for seq in 0..200u16 {
            record.truncate(13);
            record[5..11].copy_from_slice(&u64::from(1_000 + seq).to_be_bytes()[2..]);
            fragment.truncate(4);
            fragment.extend_from_slice(&(seq + 10).to_be_bytes());
            fragment.extend_from_slice(&[0, 0, 0, 0, 0x03, 0xe8]);
            fragment.extend_from_slice(&body);
            let length = u16::try_from(fragment.len()).expect("small");
            record[11..13].copy_from_slice(&length.to_be_bytes());
            record.extend_from_slice(&fragment);
            server.handle_datagram(now, client.local, &record);
        }
        let dropped = server.counters().bad_records;
        assert!(dropped >= 200 - 64, "{dropped} dropped");
        assert_eq!(server.established(), 1, "the association is kept");
    }

    #[test]
    fn garbage_from_many_sources_keeps_no_state() {
        let (mut server, _client, _, _) = pair(PeerCheck::Insecure);
        let now = Instant::now();
        let before = server.counters();
        for port in 1_000..3_000u16 {
            server.handle_datagram(now, addr(port), &[22, 0xfe, 0xfd, 0, 0, 1, 2, 3]);
            server.handle_datagram(now, addr(port), &[23; 40]);
            server.handle_datagram(now, addr(port), b"\x04not dtls");
        }
        assert_eq!(server.half_open(), 0);
        assert_eq!(server.established(), 1);
        let after = server.counters();
        assert_eq!(after.unknown_source - before.unknown_source, 4_000);
        assert_eq!(after.bad_records - before.bad_records, 2_000);
    }

    #[test]
    fn client_hellos_from_many_sources_stay_within_the_cap_and_time_out() {
        let (mut server, _client, _, _) = pair(PeerCheck::Insecure);
        // A real ClientHello, replayed from spoofed sources.
        let mut other = DtlsEndpoint::new(addr(50_001), LIMITS);
        let now = Instant::now();
        other
            .connect(
                now,
                server.local,
                client_config(server.local, PeerCheck::Insecure, None).expect("config"),
            )
            .expect("connect");
        let (_, hello) = other.poll_transmit().expect("a ClientHello");
        let before = server.counters();
        for port in 1_000..3_000u16 {
            // A truncated one first: it fails at once and leaves nothing behind.
            server.handle_datagram(now, addr(port), &hello[..30]);
            server.handle_datagram(now, addr(port), &hello);
            assert!(server.half_open() <= LIMITS.max_half_open);
        }
        let counters = server.counters();
        assert_eq!(
            counters.handshake_failures - before.handshake_failures,
            2_000
        );
        assert_eq!(server.half_open(), LIMITS.max_half_open);
        assert_eq!(
            counters.half_open_evicted,
            2_000 - LIMITS.max_half_open as u64
        );
        assert_eq!(server.established(), 1);
        // The survivors are given up at their deadline.
        let deadline = server.poll_timeout().expect("a deadline");
        assert!(deadline <= now + LIMITS.handshake_timeout);
        server.handle_timeout(now + LIMITS.handshake_timeout);
        assert_eq!(server.half_open(), 0);
        assert_eq!(server.established(), 1);
    }
}
