//! The agent on the peer socket (§7.5, §7.6): probing, nomination, the Configuration exchange,
//! keepalives, release and data on the direct path. Every control message here carries
//! Message Integrity under the pair's token, and is dropped and counted when it does not verify.

use std::net::SocketAddr;

use rand_core::RngCore;

use super::service::is_stun;
use super::{after, Cx, PeerAgent, PeerDownReason, Phase, Role, Via, NOMINATION_RTO};
use crate::wire::{Envelope, EnvelopeType, InnerPacket, Message, MessageType, ResultCode};

impl PeerAgent {
    /// Demultiplexes one datagram of the peer socket by its first octet (§2.4).
    pub(super) fn handle_datagram(&mut self, cx: &mut Cx<'_>, from: SocketAddr, datagram: &[u8]) {
        if is_stun(datagram) {
            return self.handle_stun(cx, from, datagram);
        }
        let Ok(envelope) = Envelope::decode_datagram(datagram) else {
            cx.stats.peer.dropped_not_tscf += 1;
            return;
        };
        self.on_envelope(cx, Via::Udp(from), envelope);
    }

    /// A decoded envelope from the peer socket or a peer stream.
    pub(super) fn on_envelope(&mut self, cx: &mut Cx<'_>, from: Via, envelope: Envelope<'_>) {
        match envelope.kind {
            EnvelopeType::DATA => self.on_data(cx, from, envelope.payload),
            EnvelopeType::CONTROL => self.on_control(cx, from, envelope.payload),
            _ => cx.stats.peer.dropped_not_tscf += 1,
        }
    }

    fn on_control(&mut self, cx: &mut Cx<'_>, from: Via, payload: &[u8]) {
        let Ok(msg) = Message::decode(payload) else {
            cx.stats.peer.dropped_bad_control += 1;
            return;
        };
        match (msg.header.message_type, from) {
            (MessageType::PEER_PROBE, Via::Udp(from)) => self.on_probe(cx, from, &msg, payload),
            (MessageType::PEER_PROBE_RESPONSE, Via::Udp(from)) => {
                self.on_probe_response(cx, from, &msg, payload);
            }
            (MessageType::PEER_PROBE | MessageType::PEER_PROBE_RESPONSE, _) => {
                cx.stats.peer.dropped_bad_control += 1;
            }
            (message_type, _) => self.on_path_control(cx, from, message_type, &msg, payload),
        }
    }

    fn on_path_control(
        &mut self,
        cx: &mut Cx<'_>,
        from: Via,
        message_type: MessageType,
        msg: &Message<'_>,
        payload: &[u8],
    ) {
        if self.plain_on_secure(cx, from) {
            return;
        }
        match message_type {
            MessageType::CONFIGURATION_REQUEST => self.on_configuration(cx, from, msg, payload),
            MessageType::CONFIGURATION_RESPONSE => {
                self.on_configuration_response(cx, from, msg, payload);
            }
            MessageType::KEEPALIVE
            | MessageType::KEEPALIVE_RESPONSE
            | MessageType::CONFIGURATION_RELEASE_REQUEST
            | MessageType::CONFIGURATION_RELEASE_RESPONSE => {
                self.on_tunnel_control(cx, from, msg, payload);
            }
            _ => cx.stats.peer.dropped_bad_control += 1,
        }
    }

    /// The peer a message names by Peer Internal Address, if its integrity verifies under
    /// that peer's token.
    pub(super) fn verified(
        &self,
        cx: &mut Cx<'_>,
        msg: &Message<'_>,
        payload: &[u8],
    ) -> Option<usize> {
        let found = msg
            .tlvs
            .peer_internal_address
            .and_then(|a| self.find(a))
            .and_then(|i| self.peers[i].token.map(|t| (i, t)));
        let Some((i, token)) = found else {
            cx.stats.peer.dropped_unknown_peer += 1;
            return None;
        };
        if !Message::verify_integrity(payload, &token) {
            cx.stats.peer.integrity_failures += 1;
            return None;
        }
        Some(i)
    }

    /// Signs `msg` with peer `i`'s token and queues it to `to`.
    pub(super) fn send_signed(&mut self, cx: &mut Cx<'_>, i: usize, to: Via, msg: &Message<'_>) {
        let Some(token) = self.peers[i].token else {
            return;
        };
        let mut bytes = Vec::new();
        // Messages of the peer path hold a few fixed-size TLVs, far below 2048 octets.
        if msg
            .encode_envelope_with_integrity(&token, &mut bytes)
            .is_ok()
        {
            self.queue_control(cx, to, &bytes);
        }
    }

    // ---- nomination and configuration ----

    /// The initiator picks `path`: the first pair that answered, or an open peer stream.
    pub(super) fn nominate(&mut self, cx: &mut Cx<'_>, i: usize, path: Via) {
        let peer = self.peers[i].addr;
        let (Some(own), Some(token)) = (cx.own_for(peer), self.peers[i].token) else {
            return;
        };
        let sequence = cx.take_sequence();
        let mut msg = Message::new(MessageType::CONFIGURATION_REQUEST, sequence, 0);
        msg.tlvs.peer_internal_address = Some(own);
        let mut bytes = Vec::new();
        if msg
            .encode_envelope_with_integrity(&token, &mut bytes)
            .is_err()
        {
            return;
        }
        self.queue_control(cx, path, &bytes);
        self.set_route(i, path);
        let p = &mut self.peers[i];
        p.phase = Phase::Nominating;
        p.next_probe = None;
        p.next_stream_at = None;
        p.nomination = Some((sequence, bytes));
        // A stream is reliable: nothing to retransmit there. A session may lose datagrams.
        p.next_nomination =
            matches!(path, Via::Udp(_) | Via::Session(_)).then(|| after(cx.now, NOMINATION_RTO));
    }

    /// A Configuration Request on the peer socket: the initiator nominated a path to us.
    fn on_configuration(&mut self, cx: &mut Cx<'_>, from: Via, msg: &Message<'_>, payload: &[u8]) {
        // Only a request that verifies under a pair's token gets an answer: anyone can send
        // the rest, and an answer would make this socket a reflector (counted by `verified`).
        let Some(i) = self.verified(cx, msg, payload) else {
            return;
        };
        let p = &self.peers[i];
        let in_session = match from {
            Via::Session(a) => p.authorised.contains(&a) || (p.secured && p.path == Some(a)),
            _ => false,
        };
        match (p.secure.is_some(), in_session) {
            (true, false) => {
                // A secured tunnel is configured only inside its session.
                cx.stats.peer.dropped_plain_on_secure += 1;
                return;
            }
            (false, _) if matches!(from, Via::Session(_)) => {
                cx.stats.peer.dropped_bad_control += 1;
                return;
            }
            _ => {}
        }
        if let Some((_, bytes)) = p.answer.as_ref().filter(|(s, _)| *s == msg.header.sequence) {
            // A retransmission: the same answer again (§6.2).
            let bytes = bytes.clone();
            if p.route() == Some(from) {
                self.peers[i].last_heard = cx.now;
            }
            return self.queue_control(cx, from, &bytes);
        }
        if p.role != Role::Destination || !matches!(p.phase, Phase::Probing | Phase::Up) {
            cx.stats.peer.dropped_bad_control += 1;
            return;
        }
        let Some(own) = cx.own_for(p.addr) else {
            return;
        };
        let (Some(token), tunnel_id) = (p.token, p.tunnel_id) else {
            return;
        };
        if let Via::Stream(id) = from {
            // The stream is now this peer's (and no longer closed for idling).
            if !self.identify_stream(cx, id, self.peers[i].addr) {
                return;
            }
        }
        let tunnel_id = match tunnel_id {
            0 => self.rng.next_u64().max(1),
            id => id,
        };
        let mut reply = Message::response_to(&msg.header, ResultCode::SUCCESS);
        reply.header.tunnel_id = tunnel_id;
        reply.tlvs.peer_internal_address = Some(own);
        let mut bytes = Vec::new();
        if reply
            .encode_envelope_with_integrity(&token, &mut bytes)
            .is_err()
        {
            return;
        }
        self.queue_control(cx, from, &bytes);
        self.peers[i].answer = Some((msg.header.sequence, bytes));
        if self.peers[i].phase == Phase::Up {
            // A new nomination on an up tunnel: follow it to the new path.
            self.set_route(i, from);
            let addr = self.peers[i].addr;
            let keep = self.peers[i].stream;
            self.close_streams(cx, addr, keep);
            self.peers[i].last_heard = cx.now;
        } else {
            self.up(cx, i, from, tunnel_id);
        }
    }

    fn on_configuration_response(
        &mut self,
        cx: &mut Cx<'_>,
        from: Via,
        msg: &Message<'_>,
        payload: &[u8],
    ) {
        let Some(i) = self.verified(cx, msg, payload) else {
            return;
        };
        let p = &self.peers[i];
        let expected = p.phase == Phase::Nominating
            && p.route() == Some(from)
            && p.nomination
                .as_ref()
                .is_some_and(|(s, _)| *s == msg.header.sequence);
        if !expected {
            cx.stats.peer.dropped_bad_control += 1;
            return;
        }
        match msg.tlvs.result_code {
            Some(ResultCode::SUCCESS) if msg.header.tunnel_id != 0 => {
                self.up(cx, i, from, msg.header.tunnel_id);
            }
            Some(code) if code != ResultCode::SUCCESS => {
                self.down(cx, i, PeerDownReason::Unavailable(code));
            }
            _ => cx.stats.peer.dropped_bad_control += 1,
        }
    }

    // ---- the up tunnel ----

    /// Keepalives and release on an up tunnel: found by path and tunnel id, then verified.
    fn on_tunnel_control(&mut self, cx: &mut Cx<'_>, from: Via, msg: &Message<'_>, payload: &[u8]) {
        if msg.header.message_type == MessageType::CONFIGURATION_RELEASE_RESPONSE
            && self.on_release_response(from, msg, payload)
        {
            return;
        }
        let found = self.peers.iter().position(|p| {
            p.phase == Phase::Up && p.route() == Some(from) && p.tunnel_id == msg.header.tunnel_id
        });
        let Some(i) = found else {
            cx.stats.peer.dropped_unknown_peer += 1;
            return;
        };
        let Some(token) = self.peers[i].token else {
            return;
        };
        if !Message::verify_integrity(payload, &token) {
            cx.stats.peer.integrity_failures += 1;
            return;
        }
        self.peers[i].last_heard = cx.now;
        match msg.header.message_type {
            MessageType::KEEPALIVE => {
                let reply = Message::response_to(&msg.header, ResultCode::SUCCESS);
                self.send_signed(cx, i, from, &reply);
            }
            MessageType::CONFIGURATION_RELEASE_REQUEST => {
                let reply = Message::response_to(&msg.header, ResultCode::SUCCESS);
                self.send_signed(cx, i, from, &reply);
                self.down(cx, i, PeerDownReason::Released);
            }
            _ => {}
        }
    }

    fn on_data(&mut self, cx: &mut Cx<'_>, from: Via, payload: &[u8]) {
        if self.plain_on_secure(cx, from) {
            return;
        }
        let Ok(packet) = InnerPacket::parse(payload) else {
            cx.stats.peer.dropped_bad_data += 1;
            return;
        };
        let source = packet.source();
        let found = self.find(source).filter(|i| {
            let p = &self.peers[*i];
            // The initiator takes data on the path it nominated as soon as its Configuration
            // Request is out: the destination sends there once it has answered, and a lost
            // answer must not lose that data (§7.5).
            let nominated = p.phase == Phase::Nominating && p.role == Role::Initiator;
            (p.phase == Phase::Up || nominated) && p.route() == Some(from)
        });
        let releasing = found.is_none() && self.releasing_accepts(source, from);
        if !cx.owns(packet.destination()) || (found.is_none() && !releasing) {
            cx.stats.peer.dropped_bad_data += 1;
            return;
        }
        if let Some(i) = found.filter(|i| self.peers[*i].phase == Phase::Up) {
            self.peers[i].last_heard = cx.now;
        }
        if cx.inbound.push(cx.pool, payload) {
            cx.stats.peer.data_received += 1;
            cx.stats.data_received += 1;
        } else {
            cx.stats.peer.dropped_receive_queue_full += 1;
        }
    }

    /// Removes the tunnel to `peer` on request of the application.
    pub(super) fn release(&mut self, cx: &mut Cx<'_>, peer: std::net::IpAddr) {
        let Some(i) = self.find(peer) else {
            return;
        };
        if self.peers[i].phase == Phase::Fallback {
            return;
        }
        self.tell_release(cx, i);
        self.down(cx, i, PeerDownReason::Released);
    }

    // ---- timers ----

    pub(super) fn peers_timeout(&mut self, cx: &mut Cx<'_>) {
        let now = cx.now;
        for i in 0..self.peers.len() {
            let p = &self.peers[i];
            if p.deadline.is_some_and(|d| d <= now) && p.in_setup() {
                let reason = match p.phase {
                    Phase::AwaitingForward => PeerDownReason::Unavailable(ResultCode::PEER_TIMEOUT),
                    _ => PeerDownReason::EstablishTimeout,
                };
                self.down(cx, i, reason);
                continue;
            }
            if p.phase == Phase::Up && after(p.last_heard, self.config.silence_timeout) <= now {
                let silent = now.saturating_duration_since(p.last_heard);
                cx.stats.peer.silence_to_relay.record(silent);
                // The path may have failed one way only: the peer may still hear us.
                self.tell_release(cx, i);
                self.down(cx, i, PeerDownReason::Silence);
                continue;
            }
            if p.next_probe.is_some_and(|t| t <= now) && p.phase == Phase::Probing {
                self.probe(cx, i);
            }
            let p = &self.peers[i];
            if p.next_stream_at.is_some_and(|t| t <= now) && p.phase == Phase::Probing {
                self.open_stream(cx, i);
            }
            let p = &mut self.peers[i];
            if p.next_nomination.is_some_and(|t| t <= now) {
                p.next_nomination = Some(after(now, NOMINATION_RTO));
                if let (Some(path), Some((_, bytes))) = (p.route(), p.nomination.clone()) {
                    self.queue_control(cx, path, &bytes);
                }
            }
            let p = &mut self.peers[i];
            if p.next_keepalive.is_some_and(|t| t <= now) {
                p.next_keepalive = Some(after(now, self.config.keepalive_interval));
                if let Some(path) = p.route() {
                    let sequence = cx.take_sequence();
                    let msg = Message::new(MessageType::KEEPALIVE, sequence, p.tunnel_id);
                    self.send_signed(cx, i, path, &msg);
                    cx.stats.peer.keepalives_sent += 1;
                }
            }
        }
    }
}
