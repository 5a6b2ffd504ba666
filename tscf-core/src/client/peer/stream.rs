//! Peer streams (`docs/PROTOCOL.md` §7.7): TCP or TLS connections between peers, for pairs
//! where no UDP path answers. The initiator asks the runtime to open one to a host candidate of
//! the destination; the destination's runtime reports the streams its listener accepts. On the
//! stream the Configuration exchange, keepalives, release and data run as on UDP, with the same
//! Message Integrity; an accepted stream that brings no valid Configuration Request within the
//! establishment timeout is closed.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::{after, Cx, PeerAgent, PeerDownReason, Phase, Role, Via, MAX_PENDING_STREAMS};
use super::{PeerStreamId, MAX_STREAMS_PER_PEER};
use crate::client::ClientEvent;
use crate::wire::{Envelope, Transport};

/// One peer stream the agent holds.
#[derive(Debug)]
pub(super) struct StreamSlot {
    pub(super) id: PeerStreamId,
    /// The peer it belongs to: known for the streams we open, learned from the first valid
    /// Configuration Request for the ones we accept.
    peer: Option<IpAddr>,
    remote: SocketAddr,
    open: bool,
    /// Accepted and not yet identified: closed here.
    pub(super) deadline: Option<Instant>,
}

impl PeerAgent {
    pub(super) fn stream_remote(&self, id: PeerStreamId) -> Option<SocketAddr> {
        self.streams.iter().find(|s| s.id == id).map(|s| s.remote)
    }

    /// Closes every stream of `peer` but `keep`.
    pub(super) fn close_streams(
        &mut self,
        cx: &mut Cx<'_>,
        peer: IpAddr,
        keep: Option<PeerStreamId>,
    ) {
        let mut i = 0;
        while i < self.streams.len() {
            let s = &self.streams[i];
            if s.peer == Some(peer) && Some(s.id) != keep {
                let id = self.streams.swap_remove(i).id;
                cx.event(ClientEvent::ClosePeerStream { stream: id });
            } else {
                i += 1;
            }
        }
    }

    /// Initiator: opens a stream to the next TCP or TLS candidate of peer `i`, if any is left.
    pub(super) fn open_stream(&mut self, cx: &mut Cx<'_>, i: usize) {
        let p = &mut self.peers[i];
        p.next_stream_at = None;
        if p.role != Role::Initiator || p.phase != Phase::Probing {
            return;
        }
        let addr = p.addr;
        if self.streams.iter().any(|s| s.peer == Some(addr)) {
            return;
        }
        let p = &mut self.peers[i];
        while p.streams_tried < p.stream_candidates.len() {
            let (transport, remote) = p.stream_candidates[p.streams_tried];
            p.streams_tried += 1;
            // TLS needs the fingerprint to pin; without it the candidate is unusable.
            let fingerprint = match transport {
                Transport::TLS if p.fingerprint.is_none() => continue,
                // Plain TCP is not secured.
                Transport::TCP if self.config.require_secure => continue,
                Transport::TLS => p.fingerprint,
                _ => None,
            };
            self.next_stream = self.next_stream.wrapping_add(1);
            let stream = PeerStreamId(PeerStreamId::CLIENT_CHOSEN | self.next_stream);
            self.streams.push(StreamSlot {
                id: stream,
                peer: Some(addr),
                remote,
                open: false,
                deadline: None,
            });
            cx.stats.peer.streams_opened += 1;
            cx.event(ClientEvent::OpenPeerStream {
                peer: addr,
                stream,
                addr: remote,
                transport,
                fingerprint,
            });
            return;
        }
    }

    pub(super) fn stream_open(&mut self, cx: &mut Cx<'_>, id: PeerStreamId) {
        let Some(s) = self.streams.iter_mut().find(|s| s.id == id && !s.open) else {
            return;
        };
        s.open = true;
        let peer = s.peer;
        let waiting = peer.and_then(|a| self.find(a)).filter(|i| {
            let p = &self.peers[*i];
            p.role == Role::Initiator && p.phase == Phase::Probing
        });
        match waiting {
            Some(i) => self.nominate(cx, i, Via::Stream(id)),
            // UDP won meanwhile, or the negotiation ended: not needed.
            None => self.close_stream(cx, id),
        }
    }

    fn close_stream(&mut self, cx: &mut Cx<'_>, id: PeerStreamId) {
        self.streams.retain(|s| s.id != id);
        cx.event(ClientEvent::ClosePeerStream { stream: id });
    }

    /// A stream failed to open (`failed`) or ended.
    pub(super) fn stream_gone(&mut self, cx: &mut Cx<'_>, id: PeerStreamId, failed: bool) {
        let Some(pos) = self.streams.iter().position(|s| s.id == id) else {
            return;
        };
        let slot = self.streams.swap_remove(pos);
        if failed {
            cx.stats.peer.stream_failures += 1;
        }
        let Some(i) = slot.peer.and_then(|a| self.find(a)) else {
            return;
        };
        let p = &mut self.peers[i];
        if p.stream == Some(id) {
            match p.phase {
                Phase::Up => self.down(cx, i, PeerDownReason::StreamLost),
                Phase::Nominating => {
                    // Back to probing; the next stream candidate follows.
                    p.phase = Phase::Probing;
                    p.stream = None;
                    p.path = None;
                    p.nomination = None;
                    p.next_nomination = None;
                    p.next_probe = Some(cx.now);
                    p.next_stream_at = Some(cx.now);
                }
                _ => {}
            }
        } else if p.phase == Phase::Probing && p.role == Role::Initiator {
            p.next_stream_at = Some(cx.now);
        }
    }

    pub(super) fn stream_accepted(
        &mut self,
        cx: &mut Cx<'_>,
        id: PeerStreamId,
        remote: SocketAddr,
    ) {
        let pending = self.streams.iter().filter(|s| s.peer.is_none()).count();
        let bad_id =
            id.0 & PeerStreamId::CLIENT_CHOSEN != 0 || self.streams.iter().any(|s| s.id == id);
        if bad_id || pending >= MAX_PENDING_STREAMS {
            cx.stats.peer.streams_refused += 1;
            cx.event(ClientEvent::ClosePeerStream { stream: id });
            return;
        }
        cx.stats.peer.streams_accepted += 1;
        self.streams.push(StreamSlot {
            id,
            peer: None,
            remote,
            open: true,
            deadline: Some(after(cx.now, self.config.establish_timeout)),
        });
    }

    /// A verified Configuration Request from `peer` came on accepted stream `id`: the stream
    /// is now the peer's. False when it cannot be (not ours, another peer's, or too many).
    pub(super) fn identify_stream(
        &mut self,
        cx: &mut Cx<'_>,
        id: PeerStreamId,
        peer: IpAddr,
    ) -> bool {
        let held = self
            .streams
            .iter()
            .filter(|s| s.peer == Some(peer) && s.id != id)
            .count();
        let Some(s) = self.streams.iter_mut().find(|s| s.id == id) else {
            return false;
        };
        match s.peer {
            Some(p) => p == peer,
            None if held < MAX_STREAMS_PER_PEER => {
                s.peer = Some(peer);
                s.deadline = None;
                true
            }
            None => {
                cx.stats.peer.streams_refused += 1;
                self.close_stream(cx, id);
                false
            }
        }
    }

    pub(super) fn handle_stream_envelope(
        &mut self,
        cx: &mut Cx<'_>,
        id: PeerStreamId,
        bytes: &[u8],
    ) {
        if !self.streams.iter().any(|s| s.id == id && s.open) {
            cx.stats.peer.dropped_unknown_stream += 1;
            return;
        }
        let Ok(envelope) = Envelope::decode_datagram(bytes) else {
            cx.stats.peer.dropped_not_tscf += 1;
            return;
        };
        self.on_envelope(cx, Via::Stream(id), envelope);
    }

    /// Closes accepted streams that stayed silent (or sent nothing valid) too long.
    pub(super) fn streams_timeout(&mut self, cx: &mut Cx<'_>) {
        let now = cx.now;
        while let Some(pos) = self
            .streams
            .iter()
            .position(|s| s.deadline.is_some_and(|d| d <= now))
        {
            let id = self.streams.swap_remove(pos).id;
            cx.stats.peer.streams_idle_closed += 1;
            cx.event(ClientEvent::ClosePeerStream { stream: id });
        }
    }
}
