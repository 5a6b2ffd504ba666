//! The control path of the director: configuration, re-attach, moves, keepalive, release, and
//! the answers the receiver rules require (`docs/PROTOCOL.md` §3, §4.4, §6).

use std::time::Instant;

use super::cluster::Stocked;
use super::{negotiate, ConnectionHandle, DirectorEvent, SessionDirector, Tunnel};
use crate::wire::{
    ControlKey, DecodeError, DecodeErrorKind, Freshness, Header, InternalAddress, Message,
    MessageType, ReplayWindow, ResultCode, CLIENT_NONCE_LEN, ENVELOPE_HEADER_LEN, MAX_DNS_SERVERS,
    MESSAGE_INTEGRITY_TLV_LEN,
};

/// The Diagnostic of the refusal of a Configuration Request without Client Nonce.
const UNKEYED: &str = "Client Nonce missing: control messages are keyed (PROTOCOL.md 3.3)";

impl SessionDirector {
    pub(super) fn handle_control(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        bytes: &[u8],
    ) {
        let current = self.connections.get(&connection).and_then(|c| c.tunnel);
        let message = match Message::decode(bytes) {
            Ok(message) => message,
            Err(err) => return self.control_error(now, connection, current, bytes, &err),
        };
        if message.header.message_type == MessageType::CONFIGURATION_REQUEST {
            return match message.tlvs.tunnel_id {
                Some(id) => self.reattach(now, connection, current, id, &message, bytes),
                None => self.configure(now, connection, current, &message),
            };
        }
        self.handle_tunnel_control(now, connection, current, &message, bytes);
    }

    /// A message that failed validation (§6.1). On a connection that carries a tunnel, only
    /// what its client signed is answered.
    fn control_error(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        current: Option<u64>,
        bytes: &[u8],
        err: &DecodeError,
    ) {
        if current.is_some_and(|id| !self.verified_from_client(id, bytes)) {
            self.stats.dropped.unauthenticated += 1;
            return;
        }
        match err.response() {
            Some(reply) => {
                self.stats.refused.protocol_errors += 1;
                self.send(connection, &reply);
            }
            None => self.stats.dropped.bad_control += 1,
        }
        if err.kind != DecodeErrorKind::Truncated {
            self.touch(now, connection);
        }
    }

    /// Any message but a Configuration Request: it must carry the Message Integrity of the
    /// tunnel its header names.
    fn handle_tunnel_control(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        current: Option<u64>,
        message: &Message<'_>,
        bytes: &[u8],
    ) {
        let header = message.header;
        let id = header.tunnel_id;
        if !self.tunnels.contains_key(&id) {
            return self.answer_without_tunnel(connection, current, &header, bytes);
        }
        if !self.verified_from_client(id, bytes) {
            // Forged, or from a client that lost its key: never answered (an answer would
            // tell a forger what it reached, and a tunnel held is never Tunnel Not Found).
            self.stats.dropped.unauthenticated += 1;
            return;
        }
        let request = header.message_type.is_request();
        if current != Some(id) && request {
            // From another connection than the tunnel's: a request the director has not seen
            // means the client is there now (§3.4). A replayed one moves nothing, and an answer
            // to one of the director's own requests is taken where it comes from.
            let fresh = self
                .tunnels
                .get(&id)
                .is_some_and(|t| t.replay.check(header.sequence) == Freshness::Fresh);
            if !fresh {
                self.stats.dropped.replayed += 1;
                return;
            }
            self.move_tunnel(now, id, connection);
            // Release notices held while it was persistent, if it was.
            self.peer_reattached(now, id);
            self.stats.moves += 1;
            self.events.push_back(DirectorEvent::TunnelMoved {
                tunnel_id: id,
                connection,
            });
        }
        if self.connections.get(&connection).and_then(|c| c.tunnel) == Some(id) {
            self.touch(now, connection);
        }
        if request {
            let Some(t) = self.tunnels.get_mut(&id) else {
                return;
            };
            match t.replay.admit(header.sequence) {
                Freshness::Fresh => {}
                // A retransmission: answered from memory, or still being answered (a
                // forwarded peer request waits for its destination, §6.2).
                Freshness::Seen
                    if self.answer_duplicate(connection, id, &header)
                        || self.peer_request_waiting(id, header.sequence) =>
                {
                    return
                }
                Freshness::Seen | Freshness::Stale => {
                    self.stats.dropped.replayed += 1;
                    return;
                }
            }
        }
        match header.message_type {
            MessageType::KEEPALIVE => {
                let reply = Message::response_to(&header, ResultCode::SUCCESS);
                self.send_and_remember(connection, id, &header, &reply);
            }
            MessageType::CONFIGURATION_RELEASE_REQUEST => {
                let reply = Message::response_to(&header, ResultCode::SUCCESS);
                self.send(connection, &reply);
                self.close(now, id, ResultCode::SUCCESS);
                self.drop_connection(connection);
            }
            MessageType::CLIENT_SERVICE_REQUEST => {
                self.handle_service_request(now, connection, id, message);
            }
            MessageType::CLIENT_SERVICE_RESPONSE => self.handle_service_response(id, message),
            // The answer to the director's last Keepalive: hearing it was the point.
            MessageType::KEEPALIVE_RESPONSE => match self.tunnels.get_mut(&id) {
                Some(t) if t.keepalive_sequence == header.sequence => t.keepalive_sequence = 0,
                _ => self.stats.dropped.unexpected_message += 1,
            },
            _ => self.stats.dropped.unexpected_message += 1,
        }
    }

    /// A message naming a tunnel the director does not hold: the acknowledgement of a release
    /// notification (its tunnel is closed), or anything else, which only an id not held is
    /// answered with: Tunnel Not Found (§3.4).
    fn answer_without_tunnel(
        &mut self,
        connection: ConnectionHandle,
        current: Option<u64>,
        header: &Header,
        bytes: &[u8],
    ) {
        let notification_ack = header.message_type
            == MessageType::CONFIGURATION_RELEASE_NOTIFICATION_RESPONSE
            && self.ack_notification(connection, header.sequence, bytes);
        if notification_ack {
            return;
        }
        if current.is_some() {
            self.stats.dropped.tunnel_mismatch += 1;
        }
        if header.message_type.is_request() {
            self.answer(connection, header, ResultCode::TUNNEL_NOT_FOUND);
        } else {
            self.stats.dropped.unexpected_message += 1;
        }
    }

    /// A Configuration Request for a new tunnel (§3.3).
    fn configure(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        current: Option<u64>,
        request: &Message<'_>,
    ) {
        let header = &request.header;
        if let Some(id) = current {
            // The connection carries a tunnel: its retransmitted request gets the response it
            // lost; any other unkeyed request there is not its client's, and gets nothing (the
            // tunnel's key must never go to whoever took its address over). On UDP it may be
            // a new client the address was given to: the tunnel is asked whether it is still
            // there.
            if !self.configuration_again(connection, id, request, true) {
                self.stats.dropped.unauthenticated += 1;
                self.check_address(now, connection, id);
            }
            return;
        }
        let Some(info) = self.connections.get(&connection).map(|c| c.info) else {
            return;
        };
        let source = info.remote.ip();
        if self.failing(now, source) {
            self.stats.refused.rate_limited += 1;
            let nonce = request.tlvs.client_nonce;
            return self.answer_bound(connection, header, nonce, ResultCode::RATE_LIMITED);
        }
        let Some(nonce) = request.tlvs.client_nonce else {
            self.stats.refused.unkeyed += 1;
            let mut reply = Message::response_to(header, ResultCode::UNAUTHORIZED);
            reply.tlvs.diagnostic = Some(UNKEYED);
            return self.send(connection, &reply);
        };
        let nonce = Some(nonce);
        if !self.admits(&info, request.tlvs.auth_token) {
            self.stats.refused.unauthorized += 1;
            self.record_failure(now, source);
            return self.answer_bound(connection, header, nonce, ResultCode::UNAUTHORIZED);
        }
        if self.tunnels.len() >= self.config.max_tunnels {
            self.stats.refused.server_full += 1;
            return self.answer_bound(connection, header, nonce, ResultCode::SERVER_FULL);
        }
        let assigned = if self.cluster.is_none() {
            self.allocate_addresses()
        } else {
            match self.take_from_stock() {
                Stocked::Granted(assigned) => Some(assigned),
                Stocked::Dry => None,
                Stocked::Empty => {
                    // Unanswered: the client's retransmission finds the stock refilled.
                    self.stats.cluster.stock_empty += 1;
                    return;
                }
            }
        };
        let Some((ipv4, ipv6)) = assigned else {
            self.stats.refused.no_address += 1;
            let result = ResultCode::NO_ADDRESS_AVAILABLE;
            return self.answer_bound(connection, header, nonce, result);
        };
        let id = self.fresh_tunnel_id();
        let keepalive =
            self.negotiate_keepalive(info.transport, request.tlvs.keepalive_interval_ms);
        let (key, salt) = self.draw_key(id);
        let mut replay = ReplayWindow::new();
        replay.accept(header.sequence);
        let key = ControlKey::new(&key);
        let tunnel = Tunnel {
            connection: Some(connection),
            replay,
            capabilities: request.tlvs.client_capabilities.unwrap_or_default(),
            configuration: (header.sequence, true),
            ..Tunnel::new(id, (ipv4, ipv6), info.transport, key, salt, keepalive, now)
        };
        for addr in tunnel.addresses() {
            self.by_addr.insert(addr, id);
        }
        self.tunnels.insert(id, tunnel);
        self.bind(connection, id);
        self.schedule_liveness(id);
        self.put_record(id);
        self.stats.tunnels_opened += 1;
        self.events.push_back(DirectorEvent::TunnelOpened {
            tunnel_id: id,
            ipv4: ipv4.map(|(a, _)| a),
            ipv6: ipv6.map(|(a, _)| a),
            connection,
        });
        self.send_configuration(connection, id, request, true);
    }

    /// A Configuration Request naming tunnel `id` (§3.4): its proof is the client's Message
    /// Integrity under the tunnel's key, over a sequence number the director has not accepted
    /// before. The bare secret of old never crosses the wire, and a replay moves nothing.
    fn reattach(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        current: Option<u64>,
        id: u64,
        request: &Message<'_>,
        bytes: &[u8],
    ) {
        let header = &request.header;
        let nonce = request.tlvs.client_nonce;
        let source = self
            .connections
            .get(&connection)
            .map(|c| c.info.remote.ip());
        if source.is_some_and(|source| self.failing(now, source)) {
            self.stats.refused.rate_limited += 1;
            return self.answer_bound(connection, header, nonce, ResultCode::RATE_LIMITED);
        }
        if !self.tunnels.contains_key(&id) {
            // In a cluster, another director may hold it, or have held it and died.
            if self.park_reattach(now, connection, id, bytes) {
                return;
            }
            self.stats.refused.tunnel_not_found += 1;
            return self.answer_bound(connection, header, nonce, ResultCode::TUNNEL_NOT_FOUND);
        }
        if !self.verified_from_client(id, bytes) {
            self.stats.refused.bad_reattach_secret += 1;
            if let Some(c) = self.connections.get(&connection) {
                let source = c.info.remote.ip();
                self.record_failure(now, source);
            }
            return self.answer_bound(connection, header, nonce, ResultCode::UNAUTHORIZED);
        }
        let freshness = match self.tunnels.get_mut(&id) {
            Some(t) => t.replay.admit(header.sequence),
            None => return,
        };
        match freshness {
            Freshness::Fresh => {}
            // A retransmission on the connection it moved the tunnel to.
            Freshness::Seen
                if current == Some(id)
                    && self.configuration_again(connection, id, request, false) =>
            {
                return
            }
            Freshness::Seen | Freshness::Stale => {
                self.stats.dropped.replayed += 1;
                return;
            }
        }
        if current != Some(id) {
            self.move_tunnel(now, id, connection);
            self.events.push_back(DirectorEvent::TunnelReattached {
                tunnel_id: id,
                connection,
            });
        }
        let transport = self.connections.get(&connection).map(|c| c.info.transport);
        if let Some(t) = self.tunnels.get_mut(&id) {
            t.keepalive = negotiate(
                &self.config.keepalive,
                transport.unwrap_or(t.transport),
                request.tlvs.keepalive_interval_ms,
            );
            t.last_heard = now;
        }
        self.stats.reattaches += 1;
        self.send_configuration(connection, id, request, false);
        self.peer_reattached(now, id);
    }

    /// Answers a retransmission of the Configuration Request that created (`created`) or last
    /// re-attached tunnel `id` as the first time; false if `request` is not that one.
    fn configuration_again(
        &mut self,
        connection: ConnectionHandle,
        id: u64,
        request: &Message<'_>,
        created: bool,
    ) -> bool {
        let again = self
            .tunnels
            .get(&id)
            .is_some_and(|t| t.configuration == (request.header.sequence, created));
        if again {
            self.send_configuration(connection, id, request, created);
        }
        again
    }

    /// Answers a Configuration Request with tunnel `id`'s configuration: with its control key
    /// when the request `created` the tunnel (the key is sent in that answer only), without
    /// when it re-attached it.
    pub(super) fn send_configuration(
        &mut self,
        connection: ConnectionHandle,
        id: u64,
        request: &Message<'_>,
        created: bool,
    ) {
        let Some(t) = self.tunnels.get_mut(&id) else {
            return;
        };
        t.configuration = (request.header.sequence, created);
        let mut reply = Message::response_to(&request.header, ResultCode::SUCCESS);
        reply.header.tunnel_id = id;
        reply.tlvs.client_nonce = request.tlvs.client_nonce;
        reply.tlvs.control_key = created.then(|| *t.key.octets());
        reply.tlvs.internal_ipv4 =
            t.ipv4
                .zip(self.config.ipv4_pool)
                .map(|((addr, _), p)| InternalAddress {
                    addr,
                    prefix_len: p.prefix_len,
                });
        reply.tlvs.internal_ipv6 =
            t.ipv6
                .zip(self.config.ipv6_pool)
                .map(|((addr, _), p)| InternalAddress {
                    addr,
                    prefix_len: p.prefix_len,
                });
        for dns in self.config.dns_servers.iter().take(MAX_DNS_SERVERS) {
            reply.tlvs.dns_servers.push(*dns);
        }
        reply.tlvs.keepalive_interval_ms =
            Some(u32::try_from(t.keepalive.as_millis()).unwrap_or(u32::MAX));
        reply.tlvs.observed_address = self.connections.get(&connection).map(|c| c.info.remote);
        // validate() keeps it within 68..=65,532.
        reply.tlvs.max_packet_size = u16::try_from(self.config.max_packet_len).ok();
        if self.config.peer_tunneling {
            reply.tlvs.stun_port = self.config.stun_port.filter(|p| *p != 0);
        }
        self.send(connection, &reply);
    }

    /// Resends the remembered response if `header` repeats the last request answered.
    pub(super) fn answer_duplicate(
        &mut self,
        connection: ConnectionHandle,
        id: u64,
        header: &Header,
    ) -> bool {
        let Some(t) = self.tunnels.get(&id) else {
            return false;
        };
        match &t.last_answer[answer_slot(header.message_type)] {
            Some((ty, seq, bytes)) if *ty == header.message_type && *seq == header.sequence => {
                let bytes = bytes.clone();
                self.control_out.push_back((connection, bytes));
                self.stats.control_answered += 1;
                true
            }
            _ => false,
        }
    }

    pub(super) fn send_and_remember(
        &mut self,
        connection: ConnectionHandle,
        id: u64,
        request: &Header,
        reply: &Message<'_>,
    ) {
        // Kept until the next answer: the exact size, with the Message Integrity it gets.
        let len = reply.encoded_len() + ENVELOPE_HEADER_LEN + MESSAGE_INTEGRITY_TLV_LEN;
        let mut bytes = Vec::with_capacity(len);
        if !self.encode_control(Some(id), reply, &mut bytes) {
            return;
        }
        if let Some(t) = self.tunnels.get_mut(&id) {
            let slot = answer_slot(request.message_type);
            t.last_answer[slot] = Some((request.message_type, request.sequence, bytes.clone()));
        }
        self.control_out.push_back((connection, bytes));
        self.stats.control_answered += 1;
    }

    pub(super) fn answer(
        &mut self,
        connection: ConnectionHandle,
        request: &Header,
        result: ResultCode,
    ) {
        self.send(connection, &Message::response_to(request, result));
    }

    /// Answers a Configuration Request with `result`, echoing its Client Nonce so that the
    /// client knows the answer is to its request (§3.3).
    pub(super) fn answer_bound(
        &mut self,
        connection: ConnectionHandle,
        request: &Header,
        nonce: Option<[u8; CLIENT_NONCE_LEN]>,
        result: ResultCode,
    ) {
        let mut reply = Message::response_to(request, result);
        reply.tlvs.client_nonce = nonce;
        self.send(connection, &reply);
    }

    /// Sends `message` on `connection`, signed for the tunnel the connection carries.
    pub(super) fn send(&mut self, connection: ConnectionHandle, message: &Message<'_>) {
        let tunnel = self.connections.get(&connection).and_then(|c| c.tunnel);
        let mut bytes = self.spare.pop().unwrap_or_default();
        bytes.clear();
        if self.encode_control(tunnel, message, &mut bytes) {
            self.control_out.push_back((connection, bytes));
            self.stats.control_answered += 1;
        }
    }
}

/// Which remembered answer a request type uses (see `Tunnel::last_answer`).
fn answer_slot(request: MessageType) -> usize {
    usize::from(request == MessageType::CLIENT_SERVICE_REQUEST)
}
