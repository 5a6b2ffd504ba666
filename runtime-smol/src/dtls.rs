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
//! - when an [`Acceptor`] is set ([`set_acceptor`](DtlsEndpoint::set_acceptor), a server
//!   listener), any source that proves it receives at its address: the endpoint answers a
//!   ClientHello without a cookie itself, statelessly, with a HelloVerifyRequest (RFC 6347
//!   §4.2.1) whose cookie is an HMAC of a secret, the source address and the ClientHello's
//!   random, and creates state only for a ClientHello that returns such a cookie. Those
//!   half-open handshakes are at most [`DtlsLimits::max_half_open`] (a new one evicts the
//!   oldest) and each has [`DtlsLimits::handshake_timeout`] to complete.
//!
//! Everything else is dropped before any state is kept, and counted. The state of an address
//! is dropped on a handshake error, a handshake timeout, the peer's `close_notify`, and
//! [`close`](DtlsEndpoint::close). Once an association is up, a record it refuses is counted
//! and the association kept: such a record can only be forged (RFC 6347 §4.1.2.7), and
//! letting it end the association would let anyone who can spoof the address cut it.
//!
//! rtc-dtls runs its own HelloVerifyRequest exchange with a random cookie and has no setting to
//! skip it or to take a cookie from outside. So when a ClientHello returns a valid cookie of
//! ours, the endpoint replays the exchange to the new association: it feeds it the ClientHello
//! as the first one would have been (message sequence 0, no cookie, an earlier record number),
//! with the association's crypto provider set to draw our cookie as its next random cookie,
//! discards the HelloVerifyRequest it answers with, and then feeds the real ClientHello, which
//! now carries the cookie it expects. The transcript is unchanged: DTLS leaves the first
//! ClientHello and the HelloVerifyRequest out of it (RFC 6347 §4.2.1), and rtc-dtls hashes
//! the ClientHello of the highest message sequence.
//!
//! No input makes any function here panic.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rtc_dtls::config::{
    ClientAuthType, ConfigBuilder, ExtendedMasterSecretType, HandshakeConfig,
    RustlsVerifierAdapter, VerifyPeerCertificateFn,
};
use rtc_dtls::crypto::Certificate;
use rtc_dtls::crypto_provider::providers::{RingProvider, RingRandom};
use rtc_dtls::crypto_provider::{
    CryptoError, RTCCrypto, RTCCryptoProvider, RTCRandom, SignatureScheme,
};
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
/// The length of our cookies: that of rtc-dtls's own, which it draws as one random fill.
const COOKIE_LENGTH: usize = 20;

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
    /// HelloVerifyRequests sent (statelessly) to ClientHellos without a cookie.
    pub(crate) hello_verify_sent: u64,
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
    acceptor: Option<Acceptor>,
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

    /// Accepts handshakes (server role) from any source that returns a cookie, within the
    /// half-open cap; `None` accepts only authorised addresses.
    pub(crate) fn set_acceptor(&mut self, acceptor: Option<Acceptor>) {
        self.acceptor = acceptor;
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
        if !self.associations.contains_key(&from) {
            match self.admit(now, from, datagram) {
                Admission::Admitted => {}
                Admission::Answered => return,
                Admission::Refused => {
                    self.counters.unknown_source += 1;
                    return;
                }
            }
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
    /// from an authorised address and looking like a ClientHello, or (with an acceptor) a
    /// ClientHello with a valid cookie. Answers a ClientHello without one statelessly.
    fn admit(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> Admission {
        if !looks_like_client_hello(datagram) {
            return Admission::Refused;
        }
        if let Some(config) = self.authorised.get(&from) {
            let dtls = Endpoint::new(self.local, TransportProtocol::UDP, Some(config.clone()));
            self.insert(now, from, dtls);
            return Admission::Admitted;
        }
        let Some(acceptor) = &self.acceptor else {
            return Admission::Refused;
        };
        let Some(hello) = ClientHello::parse(datagram) else {
            return Admission::Refused;
        };
        let cookie = acceptor.cookie(from, hello.random);
        if hello.cookie.is_empty() {
            self.transmits
                .push_back((from, hello.verify_request(&cookie)));
            self.counters.hello_verify_sent += 1;
            return Admission::Answered;
        }
        let Some(replayed) = hello.replayed_first() else {
            return Admission::Refused;
        };
        if !constant_time_eq(hello.cookie, &cookie) {
            return Admission::Refused;
        }
        let config = acceptor.config.clone();
        let random = acceptor.random.clone();
        while self.admitted.len() >= self.limits.max_half_open.max(1) {
            let Some(oldest) = self.admitted.pop_front() else {
                break;
            };
            self.forget(oldest);
            self.counters.half_open_evicted += 1;
        }
        // Replay the cookie exchange to the new association (see the module documentation);
        // what it answers is the HelloVerifyRequest the client already had from us.
        let mut dtls = Endpoint::new(self.local, TransportProtocol::UDP, Some(config));
        random.set_next(cookie);
        let replay = dtls.read(now, from, None, BytesMut::from(&replayed[..]));
        random.clear();
        while dtls.poll_transmit().is_some() {}
        if let Err(e) = replay {
            self.counters.handshake_failures += 1;
            tracing::debug!(%from, error = %e, "DTLS ClientHello refused");
            return Admission::Refused;
        }
        self.admitted.push_back(from);
        self.insert(now, from, dtls);
        Admission::Admitted
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

/// What [`DtlsEndpoint::admit`] did with a datagram from a source without state.
enum Admission {
    /// It created the association; the datagram goes to it.
    Admitted,
    /// It answered with a HelloVerifyRequest and kept no state.
    Answered,
    /// Dropped, no state kept.
    Refused,
}

/// What a server listener accepts handshakes with: the configuration, the crypto provider's
/// cookie slot, and the secret of the cookies.
pub(crate) struct Acceptor {
    config: Arc<HandshakeConfig>,
    random: Arc<CookieRandom>,
    secret: ring::hmac::Key,
}

impl Acceptor {
    /// An acceptor presenting `certificate`, checking clients as `check` says, with cookies
    /// keyed by `secret` (random, per listener).
    pub(crate) fn new(
        certificate: Certificate,
        check: ClientCheck,
        secret: [u8; 32],
    ) -> Result<Self, DtlsConfigError> {
        let random = Arc::new(CookieRandom::default());
        let provider = Arc::new(CookieProvider {
            ring: RingProvider::new(),
            random: random.clone(),
        });
        let config = server_builder(certificate, check)
            .with_crypto_provider(provider)
            .build(false, None)
            .map(Arc::new)
            .map_err(|e| DtlsConfigError(e.to_string()))?;
        Ok(Self {
            config,
            random,
            secret: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
        })
    }

    /// The cookie of a ClientHello with `random` from `from`.
    fn cookie(&self, from: SocketAddr, random: &[u8]) -> [u8; COOKIE_LENGTH] {
        let mut context = ring::hmac::Context::with_key(&self.secret);
        match from {
            SocketAddr::V4(a) => {
                context.update(&[4]);
                context.update(&a.ip().octets());
            }
            SocketAddr::V6(a) => {
                context.update(&[6]);
                context.update(&a.ip().octets());
            }
        }
        context.update(&from.port().to_be_bytes());
        context.update(random);
        let mut cookie = [0u8; COOKIE_LENGTH];
        cookie.copy_from_slice(&context.sign().as_ref()[..COOKIE_LENGTH]);
        cookie
    }
}

/// The ring provider, except that the next random fill of a cookie's length can be set.
struct CookieProvider {
    ring: RingProvider,
    random: Arc<CookieRandom>,
}

impl RTCCryptoProvider for CookieProvider {
    fn name(&self) -> &'static str {
        "ring with tscf cookies"
    }

    fn crypto(&self) -> &dyn RTCCrypto {
        self.ring.crypto()
    }

    fn random(&self) -> &dyn RTCRandom {
        &*self.random
    }
}

/// Ring's random source, with a slot for the cookie rtc-dtls draws next.
#[derive(Default)]
struct CookieRandom {
    next: Mutex<Option<[u8; COOKIE_LENGTH]>>,
    ring: RingRandom,
}

impl CookieRandom {
    fn set_next(&self, cookie: [u8; COOKIE_LENGTH]) {
        *crate::lock(&self.next) = Some(cookie);
    }

    fn clear(&self) {
        *crate::lock(&self.next) = None;
    }
}

impl RTCRandom for CookieRandom {
    fn fill(&self, output: &mut [u8]) -> Result<(), CryptoError> {
        if output.len() == COOKIE_LENGTH {
            if let Some(cookie) = crate::lock(&self.next).take() {
                output.copy_from_slice(&cookie);
                return Ok(());
            }
        }
        self.ring.fill(output)
    }
}

/// The parts of an unfragmented ClientHello in the first record of a datagram that the
/// cookie exchange needs (RFC 6347 §4.1 record, §4.2.2 handshake header, §4.2.1 cookie).
struct ClientHello<'a> {
    record_version: [u8; 2],
    record_sequence: u64,
    message_sequence: u16,
    version: &'a [u8],
    random: &'a [u8],
    session_id: &'a [u8],
    cookie: &'a [u8],
    /// Cipher suites, compression methods and extensions, as they are.
    rest: &'a [u8],
}

impl<'a> ClientHello<'a> {
    fn parse(datagram: &'a [u8]) -> Option<Self> {
        let be = |bytes: &[u8]| bytes.iter().fold(0u64, |n, b| n << 8 | u64::from(*b));
        let record_len = usize::try_from(be(datagram.get(11..13)?)).ok()?;
        let record = datagram.get(13..13 + record_len)?;
        let length = usize::try_from(be(record.get(1..4)?)).ok()?;
        let fragment_offset = be(record.get(6..9)?);
        let fragment_length = usize::try_from(be(record.get(9..12)?)).ok()?;
        if record.first() != Some(&1) || fragment_offset != 0 || fragment_length != length {
            return None;
        }
        let body = record.get(12..12 + length)?;
        let session_len = usize::from(*body.get(34)?);
        let session_id = body.get(35..35 + session_len)?;
        let cookie_at = 35 + session_len;
        let cookie_len = usize::from(*body.get(cookie_at)?);
        let cookie = body.get(cookie_at + 1..cookie_at + 1 + cookie_len)?;
        Some(Self {
            record_version: [datagram[1], datagram[2]],
            record_sequence: be(datagram.get(5..11)?),
            message_sequence: u16::try_from(be(record.get(4..6)?)).ok()?,
            version: body.get(0..2)?,
            random: body.get(2..34)?,
            session_id,
            cookie,
            rest: body.get(cookie_at + 1 + cookie_len..)?,
        })
    }

    /// Our HelloVerifyRequest with `cookie`, in a record of the ClientHello's record number.
    fn verify_request(&self, cookie: &[u8; COOKIE_LENGTH]) -> BytesMut {
        let mut body = vec![0xfe, 0xfd, COOKIE_LENGTH as u8];
        body.extend_from_slice(cookie);
        record(
            self.record_version,
            self.record_sequence,
            handshake(3, 0, &body),
        )
    }

    /// The ClientHello that a ClientHello returning a cookie answers, as rtc-dtls needs to
    /// have seen it: message sequence 0, no cookie, the record number before. `None` unless
    /// this one is the second ClientHello (message sequence 1) of a record number above 0.
    fn replayed_first(&self) -> Option<BytesMut> {
        if self.message_sequence != 1 || self.record_sequence == 0 {
            return None;
        }
        let mut body = Vec::with_capacity(36 + self.session_id.len() + self.rest.len());
        body.extend_from_slice(self.version);
        body.extend_from_slice(self.random);
        body.push(u8::try_from(self.session_id.len()).ok()?);
        body.extend_from_slice(self.session_id);
        body.push(0);
        body.extend_from_slice(self.rest);
        Some(record(
            self.record_version,
            self.record_sequence - 1,
            handshake(1, 0, &body),
        ))
    }
}

/// A handshake message of `kind` and `message_sequence`, unfragmented.
fn handshake(kind: u8, message_sequence: u16, body: &[u8]) -> Vec<u8> {
    let length = (body.len() as u32).to_be_bytes();
    let mut out = Vec::with_capacity(12 + body.len());
    out.push(kind);
    out.extend_from_slice(&length[1..]);
    out.extend_from_slice(&message_sequence.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&length[1..]);
    out.extend_from_slice(body);
    out
}

/// A plaintext handshake record (epoch 0) carrying `fragment`.
fn record(version: [u8; 2], sequence: u64, fragment: Vec<u8>) -> BytesMut {
    let mut out = BytesMut::with_capacity(13 + fragment.len());
    out.extend_from_slice(&[22, version[0], version[1], 0, 0]);
    out.extend_from_slice(&sequence.to_be_bytes()[2..]);
    out.extend_from_slice(&(fragment.len() as u16).to_be_bytes());
    out.extend_from_slice(&fragment);
    out
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
#[derive(Clone)]
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
/// says (for [`DtlsEndpoint::authorise`]; a listener uses an [`Acceptor`]).
#[allow(dead_code)] // For peer tunnels; exercised by the tests below.
pub(crate) fn server_config(
    certificate: Certificate,
    check: ClientCheck,
) -> Result<Arc<HandshakeConfig>, DtlsConfigError> {
    server_builder(certificate, check)
        .build(false, None)
        .map(Arc::new)
        .map_err(|e| DtlsConfigError(e.to_string()))
}

fn server_builder(certificate: Certificate, check: ClientCheck) -> ConfigBuilder {
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

    const SECRET: [u8; 32] = [7; 32];
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
            Acceptor::new(cert, ClientCheck::None, SECRET).expect("acceptor"),
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
            Acceptor::new(cert, ClientCheck::None, SECRET).expect("acceptor"),
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

    /// The first datagram of a client endpoint at `from`: a ClientHello without a cookie.
    fn first_hello(now: Instant, from: SocketAddr, server: SocketAddr) -> (DtlsEndpoint, Vec<u8>) {
        let mut client = DtlsEndpoint::new(from, LIMITS);
        let config = client_config(server, PeerCheck::Insecure, None).expect("config");
        client.connect(now, server, config).expect("connect");
        let (_, hello) = client.poll_transmit().expect("a ClientHello");
        (client, hello.to_vec())
    }

    #[test]
    fn client_hellos_without_a_cookie_are_answered_without_state() {
        let (mut server, _client, _, _) = pair(PeerCheck::Insecure);
        let now = Instant::now();
        let (_, hello) = first_hello(now, addr(50_001), server.local);
        let before = server.counters();
        for port in 1_000..3_000u16 {
            // Replayed from spoofed sources, and truncated.
            server.handle_datagram(now, addr(port), &hello);
            server.handle_datagram(now, addr(port), &hello[..30]);
            assert_eq!(server.half_open(), 0);
        }
        let after = server.counters();
        assert_eq!(after.hello_verify_sent - before.hello_verify_sent, 2_000);
        assert_eq!(after.unknown_source - before.unknown_source, 2_000);
        assert_eq!(server.established(), 1);
        // One answer each, to the source, as large as the ClientHello at most (no
        // amplification).
        let answers: Vec<_> = std::iter::from_fn(|| server.poll_transmit()).collect();
        assert_eq!(answers.len(), 2_000);
        assert!(answers.iter().all(|(_, d)| d.len() <= hello.len()));
    }

    #[test]
    fn a_cookie_is_bound_to_the_source_address() {
        let (cert, _) = server_identity();
        let now = Instant::now();
        let mut server = DtlsEndpoint::new(addr(4445), LIMITS);
        server.set_acceptor(Some(
            Acceptor::new(cert, ClientCheck::None, SECRET).expect("acceptor"),
        ));
        let (mut client, hello) = first_hello(now, addr(50_000), server.local);
        server.handle_datagram(now, client.local, &hello);
        transfer(now, &mut server, &mut client);
        let (_, second) = client
            .poll_transmit()
            .expect("a ClientHello with the cookie");
        // From another address the cookie is worthless.
        server.handle_datagram(now, addr(50_001), &second);
        assert_eq!(server.half_open(), 0);
        assert_eq!(server.counters().unknown_source, 1);
        // From the right one, the handshake goes on and completes.
        server.handle_datagram(now, client.local, &second);
        assert_eq!(server.half_open(), 1);
        for _ in 0..8 {
            transfer(now, &mut server, &mut client);
            transfer(now, &mut client, &mut server);
        }
        assert_eq!((server.established(), client.established()), (1, 1));
    }

    #[test]
    fn half_open_handshakes_stay_within_the_cap_and_time_out() {
        let (mut server, _client, _, _) = pair(PeerCheck::Insecure);
        let now = Instant::now();
        let sources = 3 * LIMITS.max_half_open as u16;
        for port in 0..sources {
            // Clients that answer the cookie and then go silent.
            let (mut client, hello) = first_hello(now, addr(51_000 + port), server.local);
            server.handle_datagram(now, client.local, &hello);
            while let Some((to, datagram)) = server.poll_transmit() {
                if to == client.local {
                    client.handle_datagram(now, server.local, &datagram);
                }
            }
            let (_, second) = client.poll_transmit().expect("a second ClientHello");
            server.handle_datagram(now, client.local, &second);
            assert!(server.half_open() <= LIMITS.max_half_open);
        }
        let counters = server.counters();
        assert_eq!(server.half_open(), LIMITS.max_half_open);
        assert_eq!(
            counters.half_open_evicted,
            u64::from(sources) - LIMITS.max_half_open as u64
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
