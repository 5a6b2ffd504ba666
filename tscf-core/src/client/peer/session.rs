//! Secured peer paths (`docs/PROTOCOL.md` §7.5): the agreement on a session transport (DTLS or
//! QUIC), and the peer sessions the runtime runs for it. The initiator asks the runtime to open
//! a session to the path that answered its probes, pinned to the peer's fingerprint; the
//! destination authorises the addresses its verified probes came from, so that its runtime
//! accepts a handshake only from them and only with the initiator's certificate. Inside the
//! session the Configuration exchange, keepalives, release and data run as on plain UDP, with
//! the same Message Integrity; plain datagrams other than probes from a secured path are
//! dropped.

use std::net::SocketAddr;

use super::config::is_secure;
use super::{Cx, PeerAgent, PeerDownReason, Phase, Role, Via};
use crate::client::ClientEvent;
use crate::wire::{Envelope, Transport};

/// The outcome of the agreement for one negotiation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Agreement {
    /// Plain signed UDP.
    Plain,
    /// A session of this transport.
    Secure(Transport),
    /// Not secured, and our policy requires it.
    Refused,
}

impl PeerAgent {
    /// The agreement rule of §7.5: both sides offer the same secure transport and both
    /// fingerprints are known, or plain UDP; our `require_secure` policy refuses the latter.
    pub(super) fn agree(
        &self,
        offer: Option<Transport>,
        fingerprint: Option<[u8; 32]>,
    ) -> Agreement {
        let ours = self.config.transport;
        let secure = is_secure(ours)
            && offer == Some(ours)
            && fingerprint.is_some()
            && self.config.certificate_fingerprint.is_some();
        match (secure, self.config.require_secure) {
            (true, _) => Agreement::Secure(ours),
            (false, false) => Agreement::Plain,
            (false, true) => Agreement::Refused,
        }
    }

    /// Initiator: the first pair answered on `path`; a secured tunnel needs its session first.
    pub(super) fn start_session(&mut self, cx: &mut Cx<'_>, i: usize, path: SocketAddr) {
        let p = &mut self.peers[i];
        let (Some(transport), Some(fingerprint)) = (p.secure, p.fingerprint) else {
            return;
        };
        p.phase = Phase::Handshaking;
        p.path = Some(path);
        p.stream = None;
        p.secured = false;
        p.next_probe = None;
        p.next_stream_at = None;
        cx.stats.peer.sessions_opened += 1;
        cx.event(ClientEvent::OpenPeerSession {
            peer: p.addr,
            path,
            transport,
            fingerprint,
        });
    }

    /// Destination: a verified probe came from `from`; authorise it for the handshake.
    pub(super) fn authorise(&mut self, cx: &mut Cx<'_>, i: usize, from: SocketAddr) {
        let p = &mut self.peers[i];
        let (Some(transport), Some(fingerprint)) = (p.secure, p.fingerprint) else {
            return;
        };
        if p.role != Role::Destination
            || p.phase != Phase::Probing
            || p.authorised.contains(&from)
            || p.authorised.is_full()
        {
            return;
        }
        p.authorised.push(from);
        cx.stats.peer.sessions_authorised += 1;
        cx.event(ClientEvent::AcceptPeerSession {
            peer: p.addr,
            path: from,
            transport,
            fingerprint,
        });
    }

    /// The peer whose session runs (or is being set up) on `path`.
    fn session_peer(&self, path: SocketAddr) -> Option<usize> {
        self.peers.iter().position(|p| {
            p.secure.is_some()
                && p.stream.is_none()
                && match p.role {
                    Role::Initiator => {
                        p.path == Some(path)
                            && matches!(p.phase, Phase::Handshaking | Phase::Nominating | Phase::Up)
                    }
                    Role::Destination => {
                        p.authorised.contains(&path) || (p.secured && p.path == Some(path))
                    }
                }
        })
    }

    pub(super) fn session_open(&mut self, cx: &mut Cx<'_>, path: SocketAddr) {
        let Some(i) = self.session_peer(path) else {
            cx.stats.peer.dropped_unknown_session += 1;
            cx.event(ClientEvent::ClosePeerSession { path });
            return;
        };
        let p = &self.peers[i];
        if p.role == Role::Initiator && p.phase == Phase::Handshaking {
            self.nominate(cx, i, Via::Session(path));
        }
        // The destination waits for the Configuration Request inside the session.
    }

    pub(super) fn session_failed(&mut self, cx: &mut Cx<'_>, path: SocketAddr) {
        let Some(i) = self.session_peer(path) else {
            return;
        };
        let p = &mut self.peers[i];
        if p.phase == Phase::Up {
            if p.path == Some(path) {
                self.down(cx, i, PeerDownReason::SessionLost);
            }
            return;
        }
        // The runtime forgets the path; so do we.
        p.authorised.retain(|a| *a != path);
        cx.stats.peer.session_failures += 1;
        self.down(cx, i, PeerDownReason::SessionFailed);
    }

    pub(super) fn handle_session_datagram(
        &mut self,
        cx: &mut Cx<'_>,
        path: SocketAddr,
        datagram: &[u8],
    ) {
        if self.session_peer(path).is_none() {
            cx.stats.peer.dropped_unknown_session += 1;
            return;
        }
        let Ok(envelope) = Envelope::decode_datagram(datagram) else {
            cx.stats.peer.dropped_not_tscf += 1;
            return;
        };
        self.on_envelope(cx, Via::Session(path), envelope);
    }

    /// Tells the runtime to close every session of peer `i` and forget its authorisations.
    pub(super) fn close_sessions(&mut self, cx: &mut Cx<'_>, i: usize) {
        let p = &mut self.peers[i];
        if p.secure.is_none() {
            return;
        }
        let initiated = (p.role == Role::Initiator
            && matches!(p.phase, Phase::Handshaking | Phase::Nominating | Phase::Up))
        .then_some(p.path)
        .flatten();
        let accepted = (p.role == Role::Destination && p.secured)
            .then_some(p.path)
            .flatten()
            .filter(|a| !p.authorised.contains(a));
        let paths: Vec<SocketAddr> = p
            .authorised
            .drain(..)
            .chain(initiated)
            .chain(accepted)
            .collect();
        for path in paths {
            cx.event(ClientEvent::ClosePeerSession { path });
        }
    }

    /// Whether `from` is a plain datagram's source on the path of a secured peer (only
    /// probes may come that way); counted when it is.
    pub(super) fn plain_on_secure(&self, cx: &mut Cx<'_>, from: Via) -> bool {
        let Via::Udp(addr) = from else {
            return false;
        };
        let hit = self.peers.iter().any(|p| {
            p.secure.is_some()
                && p.stream.is_none()
                && (p.path == Some(addr) || p.authorised.contains(&addr))
        });
        if hit {
            cx.stats.peer.dropped_plain_on_secure += 1;
        }
        hit
    }
}
