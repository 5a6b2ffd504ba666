//! Tearing a peer tunnel down on one side (`docs/PROTOCOL.md` §7.6): the application releases
//! it, the peer is evicted, our server tunnel is gone, the path fell silent, or the director
//! reported the peer's server tunnel closed. The other side is told at once with a signed
//! Configuration Release Request on the path, on plain UDP sent again until answered (at most
//! [`RELEASE_TRANSMISSIONS`] times, every [`RELEASE_INTERVAL`]), so that it moves its flows to
//! the relay without waiting for its silence timeout. Until then, data it still sends on the
//! path is delivered: nothing is lost while it learns. A stream or a session carries the
//! request once, before it closes with the tunnel.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::{after, Cx, PeerAgent, Phase, Via};
use crate::wire::{Message, MessageType, ResultCode};

/// Transmissions of the Configuration Release Request of a one-sided teardown, at most.
pub(super) const RELEASE_TRANSMISSIONS: u32 = 4;
/// Interval between them; data on the path is delivered until one interval after the last.
pub(super) const RELEASE_INTERVAL: Duration = Duration::from_millis(100);

/// A peer tunnel this client tore down whose peer has not acknowledged the release yet.
#[derive(Debug)]
pub(super) struct Releasing {
    peer: IpAddr,
    via: Via,
    token: [u8; 16],
    sequence: u32,
    envelope: Vec<u8>,
    sent: u32,
    /// The next retransmission, or after the last one the end of the delivery of data.
    next_at: Instant,
}

impl PeerAgent {
    /// Peer `i`'s tunnel is being torn down by us: tell the peer on its path. Call before
    /// [`down`](Self::down), which forgets the path and the token.
    pub(super) fn tell_release(&mut self, cx: &mut Cx<'_>, i: usize) {
        let p = &self.peers[i];
        let (Phase::Up, Some(via), Some(token)) = (p.phase, p.route(), p.token) else {
            return;
        };
        let sequence = cx.take_sequence();
        let mut msg = Message::new(
            MessageType::CONFIGURATION_RELEASE_REQUEST,
            sequence,
            p.tunnel_id,
        );
        msg.tlvs.result_code = Some(ResultCode::SUCCESS);
        let mut envelope = Vec::new();
        // A header, a result code and Message Integrity: far below 2048 octets.
        if msg
            .encode_envelope_with_integrity(&token, &mut envelope)
            .is_err()
        {
            return;
        }
        let peer = p.addr;
        self.queue_control(cx, via, &envelope);
        cx.stats.peer.releases_sent += 1;
        self.releasing.retain(|r| r.peer != peer);
        if !matches!(via, Via::Udp(_)) {
            // A stream or session is reliable and closes with the tunnel: the peer sees the
            // request go out before the close, or the close itself.
            return;
        }
        if self.releasing.len() >= self.config.max_peers {
            self.releasing.remove(0);
        }
        self.releasing.push(Releasing {
            peer,
            via,
            token,
            sequence,
            envelope,
            sent: 1,
            next_at: after(cx.now, RELEASE_INTERVAL),
        });
    }

    /// A Configuration Release Response on `from`: true when it acknowledges one of our
    /// releases (verified under that tunnel's token), which is then done.
    pub(super) fn on_release_response(
        &mut self,
        from: Via,
        msg: &Message<'_>,
        payload: &[u8],
    ) -> bool {
        let found = self.releasing.iter().position(|r| {
            r.via == from
                && r.sequence == msg.header.sequence
                && Message::verify_integrity(payload, &r.token)
        });
        match found {
            Some(k) => {
                self.releasing.swap_remove(k);
                true
            }
            None => false,
        }
    }

    /// Whether data from `peer` on `from` belongs to a tunnel we are releasing, whose peer may
    /// not know yet.
    pub(super) fn releasing_accepts(&self, peer: IpAddr, from: Via) -> bool {
        self.releasing
            .iter()
            .any(|r| r.peer == peer && r.via == from)
    }

    /// A new tunnel with `peer` is up: an old release must not linger beside it.
    pub(super) fn forget_release(&mut self, peer: IpAddr) {
        self.releasing.retain(|r| r.peer != peer);
    }

    pub(super) fn releases_timeout(&mut self, cx: &mut Cx<'_>) {
        let now = cx.now;
        let mut k = 0;
        while k < self.releasing.len() {
            let r = &mut self.releasing[k];
            if r.next_at > now {
                k += 1;
                continue;
            }
            if r.sent >= RELEASE_TRANSMISSIONS {
                self.releasing.swap_remove(k);
                continue;
            }
            r.sent += 1;
            r.next_at = after(now, RELEASE_INTERVAL);
            let (via, envelope) = (r.via, r.envelope.clone());
            cx.stats.peer.release_retransmissions += 1;
            self.queue_control(cx, via, &envelope);
            k += 1;
        }
    }

    pub(super) fn releases_deadline(&self) -> Option<Instant> {
        self.releasing.iter().map(|r| r.next_at).min()
    }
}
