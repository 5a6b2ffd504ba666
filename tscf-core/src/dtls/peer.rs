//! DTLS peer sessions (`docs/PROTOCOL.md` §7.5.1) on a tunnel's shared peer UDP socket.
//!
//! One [`DtlsEndpoint`] per tunnel, holding no socket: the runtime hands it the DTLS
//! datagrams (first octet 20–63, §2.4) that come from an address the client authorised or
//! opened a session to ([`PeerSessions::admits`]), and sends what it queues on the peer socket.
//! Other DTLS datagrams are counted and dropped before the endpoint sees them. The
//! [`TunnelClient`](crate::client::TunnelClient) decides which sessions exist
//! ([`ClientEvent::OpenPeerSession`](crate::client::ClientEvent::OpenPeerSession),
//! `AcceptPeerSession`, `ClosePeerSession`); this module runs them: the initiator connects
//! as DTLS client pinning the destination's certificate fingerprint and presenting its own
//! certificate, the destination accepts a handshake only from an authorised address and only
//! with a client certificate of the initiator's fingerprint. Each envelope travels as one
//! application data record (§2.5).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::{
    ClientCheck, DtlsConfigError, DtlsCounters, DtlsEndpoint, DtlsEvent, DtlsLimits, PeerCheck,
};
use crate::dtls::Certificate;
use crate::tls::{Fingerprint, PeerIdentity};

/// What a DTLS peer session reports, in the terms of the client's inputs.
#[derive(Debug)]
#[non_exhaustive]
pub enum PeerSessionEvent {
    /// The handshake on `path` completed with the pinned certificate
    /// ([`Input::PeerSessionOpen`](crate::client::Input::PeerSessionOpen)).
    Open {
        /// The peer path.
        path: SocketAddr,
    },
    /// The handshake on `path` failed, or the session ended
    /// ([`Input::PeerSessionFailed`](crate::client::Input::PeerSessionFailed));
    /// its state and authorisation are gone.
    Failed {
        /// The peer path.
        path: SocketAddr,
        /// Whether it was the handshake that failed (rather than an open session that ended).
        handshake: bool,
    },
    /// One envelope received in the session on `path`
    /// ([`Input::PeerSessionDatagram`](crate::client::Input::PeerSessionDatagram)).
    Envelope {
        /// The peer path.
        path: SocketAddr,
        /// The envelope.
        envelope: BytesMut,
    },
}

/// The DTLS peer sessions of one tunnel.
///
/// Call order, as for [`DtlsEndpoint`]: feed [`handle_datagram`](Self::handle_datagram) (only
/// for an address that [`admits`](Self::admits)) and [`handle_timeout`](Self::handle_timeout)
/// at [`poll_timeout`](Self::poll_timeout); act on the client's session events with
/// [`open`](Self::open), [`authorise`](Self::authorise) and [`close`](Self::close); after any
/// input drain [`poll_transmit`](Self::poll_transmit) and [`poll_event`](Self::poll_event) until
/// both return `None`.
#[derive(Debug)]
pub struct PeerSessions {
    endpoint: DtlsEndpoint,
    identity: PeerIdentity,
    certificate: Certificate,
    /// Paths opened or authorised, with the fingerprint the peer must present.
    pins: HashMap<SocketAddr, Fingerprint>,
}

impl PeerSessions {
    /// Sessions for the peer socket bound to `local`, presenting `identity`, each handshake
    /// given up after `handshake_timeout` (the client's own establishment timeout bounds the
    /// attempt as a whole).
    pub fn new(
        local: SocketAddr,
        identity: PeerIdentity,
        handshake_timeout: Duration,
    ) -> Result<Self, DtlsConfigError> {
        let certificate = certificate(&identity)?;
        let limits = DtlsLimits {
            // No acceptor: only authorised addresses start handshakes here.
            max_half_open: 1,
            handshake_timeout,
            cookie_lifetime: handshake_timeout,
        };
        Ok(Self {
            endpoint: DtlsEndpoint::new(local, limits),
            identity,
            certificate,
            pins: HashMap::new(),
        })
    }

    /// Presents `identity` in the sessions opened or accepted from now on (a test hook). A key
    /// rtc-dtls cannot use leaves the identity as it was.
    pub fn set_identity(&mut self, identity: PeerIdentity) -> Result<(), DtlsConfigError> {
        self.certificate = certificate(&identity)?;
        self.identity = identity;
        Ok(())
    }

    /// Whether a DTLS datagram from `from` may reach the endpoint.
    pub fn admits(&self, from: SocketAddr) -> bool {
        self.pins.contains_key(&from)
    }

    /// Feeds one DTLS datagram from an admitted address.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.endpoint.handle_datagram(now, from, datagram);
    }

    /// Initiator: starts a handshake with `path`, accepting only the certificate `fingerprint`.
    pub fn open(
        &mut self,
        now: Instant,
        path: SocketAddr,
        fingerprint: [u8; 32],
    ) -> Result<(), DtlsConfigError> {
        let config = super::client_config(
            path,
            PeerCheck::Pinned(Fingerprint(fingerprint)),
            Some(self.certificate.clone()),
        )?;
        self.endpoint.connect(now, path, config)?;
        self.pins.insert(path, Fingerprint(fingerprint));
        Ok(())
    }

    /// Destination: accepts a handshake from `path`, only with a client certificate of
    /// `fingerprint`.
    pub fn authorise(
        &mut self,
        path: SocketAddr,
        fingerprint: [u8; 32],
    ) -> Result<(), DtlsConfigError> {
        let config = super::server_config(
            self.certificate.clone(),
            ClientCheck::Pinned(Fingerprint(fingerprint)),
        )?;
        self.endpoint.authorise(path, config);
        self.pins.insert(path, Fingerprint(fingerprint));
        Ok(())
    }

    /// Sends one envelope in the session on `path`; false when it is not open (the core
    /// notices the loss) or the send ended it (reported as a [`PeerSessionEvent::Failed`]).
    pub fn send(&mut self, now: Instant, path: SocketAddr, envelope: &[u8]) -> bool {
        self.endpoint.send(now, path, envelope).is_ok()
    }

    /// Closes the session on `path` (with `close_notify`) and withdraws its authorisation.
    pub fn close(&mut self, now: Instant, path: SocketAddr) {
        self.endpoint.close(now, path);
        self.pins.remove(&path);
    }

    /// Closes everything (the tunnel stops).
    pub fn close_all(&mut self, now: Instant) {
        let paths: Vec<SocketAddr> = self.pins.keys().copied().collect();
        for path in paths {
            self.close(now, path);
        }
    }

    /// The endpoint's counters (its drops of hostile or stale input among them).
    #[must_use]
    pub fn counters(&self) -> DtlsCounters {
        self.endpoint.counters()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is next due.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.endpoint.poll_timeout()
    }

    /// Retransmits handshake flights and gives up handshakes past their deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.endpoint.handle_timeout(now);
    }

    /// The next datagram to send on the peer socket, and where.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, BytesMut)> {
        self.endpoint.poll_transmit()
    }

    /// The next event. A session that ends or fails is forgotten, its authorisation included.
    #[must_use]
    pub fn poll_event(&mut self, now: Instant) -> Option<PeerSessionEvent> {
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
                    PeerSessionEvent::Open { path: peer }
                } else {
                    self.close(now, peer);
                    PeerSessionEvent::Failed {
                        path: peer,
                        handshake: true,
                    }
                }
            }
            DtlsEvent::HandshakeFailed { peer, reason } => {
                tracing::debug!(path = %peer, %reason, "DTLS peer session handshake failed");
                self.close(now, peer);
                PeerSessionEvent::Failed {
                    path: peer,
                    handshake: true,
                }
            }
            DtlsEvent::Closed { peer } => {
                self.close(now, peer);
                PeerSessionEvent::Failed {
                    path: peer,
                    handshake: false,
                }
            }
            DtlsEvent::Data { peer, payload } => PeerSessionEvent::Envelope {
                path: peer,
                envelope: payload,
            },
        };
        Some(event)
    }
}

fn certificate(identity: &PeerIdentity) -> Result<Certificate, DtlsConfigError> {
    super::certificate(identity.chain.clone(), &identity.key)
}
