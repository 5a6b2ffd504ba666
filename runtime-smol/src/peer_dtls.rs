//! DTLS peer sessions (`docs/PROTOCOL.md` §7.5.1) on the tunnel's shared peer UDP socket.
//!
//! One [`DtlsEndpoint`] per tunnel, holding no socket: the UDP task hands it the DTLS
//! datagrams (first octet 20–63, §2.4) that come from an address the client authorised or
//! opened a session to, and the tunnel's drain sends what it queues on the peer socket. Other
//! DTLS datagrams are counted and dropped before the endpoint sees them. The core decides
//! which sessions exist ([`ClientEvent::OpenPeerSession`](tscf_core::client::ClientEvent),
//! `AcceptPeerSession`, `ClosePeerSession`); this module runs them: the initiator connects
//! as DTLS client pinning the destination's certificate fingerprint and presenting its own
//! certificate, the destination accepts a handshake only from an authorised address and only
//! with a client certificate of the initiator's fingerprint. Each envelope travels as one
//! application data record (§2.5).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rtc_dtls::crypto::Certificate;
use tscf_core::tls::{Fingerprint, PeerIdentity, TlsConfigError};

use crate::dtls::{
    self, ClientCheck, DtlsCounters, DtlsEndpoint, DtlsEvent, DtlsLimits, PeerCheck,
};

/// Bound of one handshake (the core's establishment timeout is the real limit).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// What a DTLS peer session reports to the client, in the core's terms.
#[derive(Debug)]
pub(crate) enum PeerDtlsEvent {
    /// The handshake on `path` completed with the pinned certificate.
    Open { path: SocketAddr },
    /// The handshake on `path` failed, or the session ended.
    Failed { path: SocketAddr, handshake: bool },
    /// One envelope received in the session on `path`.
    Envelope {
        path: SocketAddr,
        envelope: bytes::BytesMut,
    },
}

/// The DTLS peer sessions of one tunnel.
#[derive(Debug)]
pub(crate) struct PeerDtls {
    endpoint: DtlsEndpoint,
    identity: PeerIdentity,
    certificate: Certificate,
    /// Paths opened or authorised, with the fingerprint the peer must present.
    pins: HashMap<SocketAddr, Fingerprint>,
}

impl PeerDtls {
    /// Sessions for the peer socket bound to `local`, presenting `identity`.
    pub(crate) fn new(local: SocketAddr, identity: PeerIdentity) -> Result<Self, TlsConfigError> {
        let certificate = certificate(&identity)?;
        let limits = DtlsLimits {
            // No acceptor: only authorised addresses start handshakes here.
            max_half_open: 1,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        };
        Ok(Self {
            endpoint: DtlsEndpoint::new(local, limits),
            identity,
            certificate,
            pins: HashMap::new(),
        })
    }

    /// Presents `identity` in the sessions opened or accepted from now on (a test hook).
    pub(crate) fn set_identity(&mut self, identity: PeerIdentity) -> Result<(), TlsConfigError> {
        self.certificate = certificate(&identity)?;
        self.identity = identity;
        Ok(())
    }

    /// Whether a DTLS datagram from `from` may reach the endpoint.
    pub(crate) fn admits(&self, from: SocketAddr) -> bool {
        self.pins.contains_key(&from)
    }

    /// Feeds one DTLS datagram from an admitted address.
    pub(crate) fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.endpoint.handle_datagram(now, from, datagram);
    }

    /// Initiator: starts a handshake with `path`, accepting only the certificate `fingerprint`.
    pub(crate) fn open(
        &mut self,
        now: Instant,
        path: SocketAddr,
        fingerprint: [u8; 32],
    ) -> Result<(), String> {
        let config = dtls::client_config(
            path,
            PeerCheck::Pinned(Fingerprint(fingerprint)),
            Some(self.certificate.clone()),
        )
        .map_err(|e| e.to_string())?;
        self.endpoint
            .connect(now, path, config)
            .map_err(|e| e.to_string())?;
        self.pins.insert(path, Fingerprint(fingerprint));
        Ok(())
    }

    /// Destination: accepts a handshake from `path`, only with a client certificate of
    /// `fingerprint`.
    pub(crate) fn authorise(
        &mut self,
        path: SocketAddr,
        fingerprint: [u8; 32],
    ) -> Result<(), String> {
        let config = dtls::server_config(
            self.certificate.clone(),
            ClientCheck::Pinned(Fingerprint(fingerprint)),
        )
        .map_err(|e| e.to_string())?;
        self.endpoint.authorise(path, config);
        self.pins.insert(path, Fingerprint(fingerprint));
        Ok(())
    }

    /// Sends one envelope in the session on `path`; false when it is not open (the core
    /// notices the loss) or the send ended it (reported as a [`PeerDtlsEvent::Failed`]).
    pub(crate) fn send(&mut self, now: Instant, path: SocketAddr, envelope: &[u8]) -> bool {
        self.endpoint.send(now, path, envelope).is_ok()
    }

    /// Closes the session on `path` (with `close_notify`) and withdraws its authorisation.
    pub(crate) fn close(&mut self, now: Instant, path: SocketAddr) {
        self.endpoint.close(now, path);
        self.pins.remove(&path);
    }

    /// Closes everything (the tunnel stops).
    pub(crate) fn close_all(&mut self, now: Instant) {
        let paths: Vec<SocketAddr> = self.pins.keys().copied().collect();
        for path in paths {
            self.close(now, path);
        }
    }

    /// The endpoint's counters (its drops of hostile or stale input among them).
    #[must_use]
    pub(crate) fn counters(&self) -> DtlsCounters {
        self.endpoint.counters()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is next due.
    #[must_use]
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.endpoint.poll_timeout()
    }

    /// Retransmits handshake flights and gives up handshakes past their deadline.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        self.endpoint.handle_timeout(now);
    }

    /// The next datagram to send on the peer socket, and where.
    #[must_use]
    pub(crate) fn poll_transmit(&mut self) -> Option<(SocketAddr, bytes::BytesMut)> {
        self.endpoint.poll_transmit()
    }

    /// The next event. A session that ends or fails is forgotten, its authorisation included.
    #[must_use]
    pub(crate) fn poll_event(&mut self, now: Instant) -> Option<PeerDtlsEvent> {
        let event = match self.endpoint.poll_event()? {
            DtlsEvent::HandshakeDone {
                peer,
                peer_certificate,
            } => {
                // The handshake configuration already pinned it; checked again so that a
                // session never opens on a certificate the core did not announce.
                let pinned = self.pins.get(&peer).is_some_and(|pin| {
                    peer_certificate
                        .as_deref()
                        .is_some_and(|c| Fingerprint::of(c).matches(pin))
                });
                if pinned {
                    PeerDtlsEvent::Open { path: peer }
                } else {
                    self.close(now, peer);
                    PeerDtlsEvent::Failed {
                        path: peer,
                        handshake: true,
                    }
                }
            }
            DtlsEvent::HandshakeFailed { peer, reason } => {
                tracing::debug!(path = %peer, %reason, "DTLS peer session handshake failed");
                self.close(now, peer);
                PeerDtlsEvent::Failed {
                    path: peer,
                    handshake: true,
                }
            }
            DtlsEvent::Closed { peer } => {
                self.close(now, peer);
                PeerDtlsEvent::Failed {
                    path: peer,
                    handshake: false,
                }
            }
            DtlsEvent::Data { peer, payload } => PeerDtlsEvent::Envelope {
                path: peer,
                envelope: payload,
            },
        };
        Some(event)
    }
}

fn certificate(identity: &PeerIdentity) -> Result<Certificate, TlsConfigError> {
    dtls::certificate(identity.chain.clone(), &identity.key)
        .map_err(|e| TlsConfigError::Dtls(e.to_string()))
}
