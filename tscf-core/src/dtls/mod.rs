//! DTLS 1.2 associations with many remote addresses over one UDP socket (rtc-dtls: sans-IO,
//! ring), for a server's DTLS listeners, a client's DTLS transport and its DTLS peer sessions
//! (`docs/PROTOCOL.md` §2.5, §7.5.1).
//!
//! - [`DtlsEndpoint`]: the associations of one socket, with its [`DtlsLimits`], [`DtlsEvent`]s
//!   and [`DtlsCounters`];
//! - [`certificate`], [`server_config`], [`client_config`]: rtc-dtls configurations (ring,
//!   ECDHE with an AEAD, extended master secret) checking the other side as [`PeerCheck`] or
//!   [`ClientCheck`] says; [`ClientSettings`]: a client's DTLS transport settings from its
//!   [`ClientTlsConfig`](crate::tls::ClientTlsConfig), one handshake configuration per server;
//! - [`Acceptor`]: a server listener's stateless cookie exchange;
//! - [`PeerSessions`]: the DTLS peer sessions of one tunnel, in the client's terms.
//!
//! None of it owns a socket, reads a clock or starts a task, so it lives in the core and every
//! runtime drives it the same way. (rtc-dtls draws each handshake's randoms and ephemeral keys
//! from ring, as rustls does; the certificates and the cookie secret come from the caller.)
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
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rtc_dtls::endpoint::{Endpoint, EndpointEvent};
use rtc_shared::TransportProtocol;
use subtle::ConstantTimeEq;

use crate::wire::DatagramKind;
use cookie::ClientHello;

pub use config::{
    certificate, client_config, server_config, ClientCheck, ClientSettings, PeerCheck,
};
pub use cookie::Acceptor;
pub use peer::{PeerSessionEvent, PeerSessions};
/// One side's handshake configuration, as rtc-dtls takes it ([`server_config`],
/// [`client_config`]).
pub use rtc_dtls::config::HandshakeConfig;
/// A certificate chain and its signing key, as rtc-dtls presents them ([`certificate`]).
pub use rtc_dtls::crypto::Certificate;

/// Octets of datagrams carrying plaintext (epoch 0) records that one association takes in its
/// life; beyond it they are dropped (once established) or the handshake fails. A handshake
/// with certificate chains takes a few kilobytes. rtc-dtls buffers handshake fragments of
/// any message sequence up to 2 MB per association, so this is what bounds that memory.
const MAX_PLAINTEXT_OCTETS: usize = 64 * 1024;
/// The length of our cookies: that of rtc-dtls's own, which it draws as one random fill.
const COOKIE_LENGTH: usize = 20;

/// Bounds of a [`DtlsEndpoint`].
#[derive(Clone, Copy, Debug)]
pub struct DtlsLimits {
    /// Most half-open handshakes admitted from unknown sources (by the acceptor) at once; a
    /// new one evicts the oldest. At least 1 is used.
    pub max_half_open: usize,
    /// How long any handshake may take before its state is dropped.
    pub handshake_timeout: Duration,
    /// How long a cookie the acceptor handed out is accepted: between this and twice this
    /// (the cookie secret is mixed with the current period of this length, and the previous
    /// period's cookies are still accepted), so that a ClientHello with a cookie cannot be
    /// replayed for ever.
    pub cookie_lifetime: Duration,
}

/// What a [`DtlsEndpoint`] reports.
#[derive(Debug)]
#[non_exhaustive]
pub enum DtlsEvent {
    /// The handshake with `peer` completed; [`DtlsEndpoint::send`] works from now on.
    HandshakeDone {
        /// The remote address.
        peer: SocketAddr,
        /// The peer's end-entity certificate (DER), if it presented one.
        peer_certificate: Option<Vec<u8>>,
    },
    /// The handshake with `peer` failed or timed out; its state is gone.
    HandshakeFailed {
        /// The remote address.
        peer: SocketAddr,
        /// What went wrong, for logs.
        reason: String,
    },
    /// One application data record's payload from `peer`.
    Data {
        /// The remote address.
        peer: SocketAddr,
        /// The record's plaintext.
        payload: BytesMut,
    },
    /// The association with `peer` ended (the peer's `close_notify`, or a send that failed);
    /// its state is gone.
    Closed {
        /// The remote address.
        peer: SocketAddr,
    },
}

/// Counters of a [`DtlsEndpoint`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DtlsCounters {
    /// Handshakes completed.
    pub handshakes: u64,
    /// Handshakes that failed or timed out.
    pub handshake_failures: u64,
    /// Datagrams from a source without state that do not start an allowed handshake.
    pub unknown_source: u64,
    /// Records an established association refused, and datagrams that are no DTLS record.
    pub bad_records: u64,
    /// Half-open handshakes evicted because the cap was reached.
    pub half_open_evicted: u64,
    /// HelloVerifyRequests sent (statelessly) to ClientHellos without a cookie.
    pub hello_verify_sent: u64,
    /// ClientHellos with a cookie that is wrong or expired.
    pub bad_cookies: u64,
}

/// Why [`DtlsEndpoint::send`] did not send.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DtlsSendError {
    /// No association with this address has completed its handshake.
    #[error("no established DTLS association with {0}")]
    NotEstablished(SocketAddr),
    /// The association refused the data; it has been dropped (a [`DtlsEvent::Closed`]
    /// follows).
    #[error("DTLS association with {peer} failed: {reason}")]
    Failed {
        /// The remote address.
        peer: SocketAddr,
        /// What rtc-dtls said.
        reason: String,
    },
}

/// A certificate, key or configuration rtc-dtls cannot use.
#[derive(Debug, thiserror::Error)]
#[error("DTLS configuration: {0}")]
pub struct DtlsConfigError(String);

impl From<DtlsConfigError> for crate::tls::TlsConfigError {
    fn from(e: DtlsConfigError) -> Self {
        Self::Dtls(e.0)
    }
}

/// One association: an rtc-dtls endpoint holding exactly the association with one address, so
/// that each address gets its own configuration (role, pinned fingerprint).
struct Association {
    dtls: Endpoint,
    established: bool,
    /// When the handshake is given up; `None` once established.
    deadline: Option<Instant>,
    /// Octets of datagrams with plaintext records fed so far (see [`MAX_PLAINTEXT_OCTETS`]).
    plaintext_octets: usize,
    /// Whether this end started the handshake (client role).
    client: bool,
}

/// DTLS associations with many addresses over one socket. See the module documentation for
/// the call order and what is fed to rtc-dtls.
pub struct DtlsEndpoint {
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
    /// The start of the first cookie period: the first time the acceptor was asked.
    cookie_start: Option<Instant>,
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
    pub fn new(local: SocketAddr, limits: DtlsLimits) -> Self {
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
            cookie_start: None,
        }
    }

    /// Accepts handshakes (server role) from any source that returns a cookie, within the
    /// half-open cap; `None` accepts only authorised addresses.
    pub fn set_acceptor(&mut self, acceptor: Option<Acceptor>) {
        self.acceptor = acceptor;
    }

    /// Accepts a handshake (server role, with `config`, which may pin the peer's certificate)
    /// from `peer`, whose datagrams are dropped until then. Not counted against the cap.
    pub fn authorise(&mut self, peer: SocketAddr, config: Arc<HandshakeConfig>) {
        self.authorised.insert(peer, config);
    }

    /// Starts a handshake with `peer` in the client role. Replaces any association with it.
    pub fn connect(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        config: Arc<HandshakeConfig>,
    ) -> Result<(), DtlsConfigError> {
        self.forget(peer);
        let mut dtls = Endpoint::new(self.local, TransportProtocol::UDP, None);
        dtls.connect(now, peer, config, None)
            .map_err(|e| DtlsConfigError(e.to_string()))?;
        self.insert(now, peer, dtls, true);
        Ok(())
    }

    /// Feeds one datagram received from `from`.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        if DatagramKind::of(datagram) != DatagramKind::Dtls {
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
        let records = RecordScan::of(datagram);
        if records.epoch_change {
            self.counters.bad_records += 1;
            return;
        }
        if records.plaintext {
            // The server completes first, so once a client has completed the server sends no
            // plaintext record any more: any is forged or a duplicate, and rtc-dtls would
            // answer a handshake record by repeating its last flight.
            if association.established && association.client {
                self.counters.bad_records += 1;
                return;
            }
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
                // rtc-dtls drops, without an error, application data records it cannot
                // authenticate (or has seen): count those an established association took
                // without delivering.
                let delivered = events
                    .iter()
                    .filter(|e| matches!(e, EndpointEvent::ApplicationData(_)))
                    .count();
                if established {
                    self.counters.bad_records += records
                        .application_data
                        .saturating_sub(u64::try_from(delivered).unwrap_or(u64::MAX));
                }
                for event in events {
                    self.on_event(from, event);
                }
            }
            Err(_) if established => self.counters.bad_records += 1,
            Err(e) => self.fail(from, e.to_string()),
        }
    }

    /// Sends `payload` to `peer` as one application data record.
    pub fn send(
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
    pub fn close(&mut self, now: Instant, peer: SocketAddr) {
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
    pub fn poll_timeout(&self) -> Option<Instant> {
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
    pub fn handle_timeout(&mut self, now: Instant) {
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
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, BytesMut)> {
        self.transmits.pop_front()
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<DtlsEvent> {
        self.events.pop_front()
    }

    /// Counters so far.
    pub fn counters(&self) -> DtlsCounters {
        self.counters
    }

    /// Associations whose handshake completed.
    pub fn established(&self) -> usize {
        self.associations.len().saturating_sub(self.pending.len())
    }

    /// Addresses with a handshake in progress (the per-address state hostile input can cause).
    pub fn half_open(&self) -> usize {
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
            self.insert(now, from, dtls, false);
            return Admission::Admitted;
        }
        let Some(acceptor) = &self.acceptor else {
            return Admission::Refused;
        };
        let Some(hello) = ClientHello::parse(datagram) else {
            return Admission::Refused;
        };
        let start = *self.cookie_start.get_or_insert(now);
        let lifetime = self.limits.cookie_lifetime.max(Duration::from_millis(1));
        let period =
            (now.saturating_duration_since(start).as_millis() / lifetime.as_millis()) as u64;
        let fresh = acceptor.cookie(period, from, hello.random);
        if hello.cookie.is_empty() {
            self.transmits
                .push_back((from, hello.verify_request(&fresh)));
            self.counters.hello_verify_sent += 1;
            return Admission::Answered;
        }
        let Some(replayed) = hello.replayed_first() else {
            return Admission::Refused;
        };
        let previous = period
            .checked_sub(1)
            .map(|p| acceptor.cookie(p, from, hello.random));
        let Some(cookie) = [Some(fresh), previous]
            .into_iter()
            .flatten()
            .find(|c| bool::from(hello.cookie.ct_eq(&c[..])))
        else {
            self.counters.bad_cookies += 1;
            return Admission::Refused;
        };
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
        self.insert(now, from, dtls, false);
        Admission::Admitted
    }

    fn insert(&mut self, now: Instant, peer: SocketAddr, mut dtls: Endpoint, client: bool) {
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
                client,
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

/// What the record headers of a datagram say, as far as they can be walked.
struct RecordScan {
    /// A record of epoch 0 (plaintext), or a record that cannot be walked.
    plaintext: bool,
    /// A ChangeCipherSpec record of an epoch above 0. tscf never renegotiates, so none is
    /// genuine; and rtc-dtls does not authenticate ChangeCipherSpec records (they are never
    /// encrypted), so one with the association's current epoch would move it to the next
    /// epoch and it would never read the peer's records again.
    epoch_change: bool,
    /// Application data records of an epoch above 0.
    application_data: u64,
}

impl RecordScan {
    fn of(mut datagram: &[u8]) -> Self {
        const RECORD_HEADER: usize = 13;
        const CHANGE_CIPHER_SPEC: u8 = 20;
        const APPLICATION_DATA: u8 = 23;
        let mut scan = Self {
            plaintext: false,
            epoch_change: false,
            application_data: 0,
        };
        while !datagram.is_empty() {
            if datagram.len() < RECORD_HEADER {
                scan.plaintext = true;
                break;
            }
            let epoch_zero = datagram[3..5] == [0, 0];
            scan.plaintext |= epoch_zero;
            scan.epoch_change |= datagram[0] == CHANGE_CIPHER_SPEC && !epoch_zero;
            scan.application_data += u64::from(datagram[0] == APPLICATION_DATA && !epoch_zero);
            let length = usize::from(u16::from_be_bytes([datagram[11], datagram[12]]));
            datagram = datagram.get(RECORD_HEADER + length..).unwrap_or_default();
        }
        scan
    }
}

mod config;
mod cookie;
mod peer;
#[cfg(test)]
mod tests;
