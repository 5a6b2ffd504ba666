//! The control path of the director: configuration, re-attach, keepalive, release, and the
//! answers the receiver rules require (`docs/PROTOCOL.md` §3, §6).

use std::time::Instant;

use rand_core::RngCore;

use super::{
    constant_time_eq, negotiate, ConnectionHandle, DirectorEvent, SessionDirector, Tunnel,
};
use crate::wire::{
    DecodeErrorKind, Header, InternalAddress, Message, MessageType, ResultCode,
    ENVELOPE_HEADER_LEN, MAX_DNS_SERVERS,
};
use std::collections::VecDeque;

impl SessionDirector {
    pub(super) fn handle_control(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        bytes: &[u8],
    ) {
        let message = match Message::decode(bytes) {
            Ok(message) => message,
            Err(err) => {
                match err.response() {
                    Some(reply) => {
                        self.stats.refused.protocol_errors += 1;
                        self.send(connection, &reply);
                    }
                    None => self.stats.dropped.bad_control += 1,
                }
                if err.kind == DecodeErrorKind::Truncated {
                    return;
                }
                self.touch(now, connection);
                return;
            }
        };
        let tunnel = self.connections.get(&connection).and_then(|c| c.tunnel);
        if message.header.message_type == MessageType::CONFIGURATION_REQUEST {
            return self.handle_configuration_request(now, connection, tunnel, &message);
        }
        let Some(id) = tunnel else {
            return self.answer_without_tunnel(connection, &message.header);
        };
        if message.header.tunnel_id != id {
            self.stats.dropped.tunnel_mismatch += 1;
            if message.header.message_type.is_request() {
                self.answer(connection, &message.header, ResultCode::TUNNEL_NOT_FOUND);
            }
            return;
        }
        self.touch(now, connection);
        if self.answer_duplicate(connection, id, &message.header) {
            return;
        }
        match message.header.message_type {
            MessageType::KEEPALIVE => {
                let reply = Message::response_to(&message.header, ResultCode::SUCCESS);
                self.send_and_remember(connection, id, &message.header, &reply);
            }
            MessageType::CONFIGURATION_RELEASE_REQUEST => {
                let reply = Message::response_to(&message.header, ResultCode::SUCCESS);
                self.send(connection, &reply);
                self.close(now, id, ResultCode::SUCCESS);
                self.drop_connection(connection);
            }
            MessageType::CLIENT_SERVICE_REQUEST => {
                self.handle_service_request(now, connection, id, &message);
            }
            MessageType::CLIENT_SERVICE_RESPONSE => self.handle_service_response(id, &message),
            _ => self.stats.dropped.unexpected_message += 1,
        }
    }

    /// A message other than a Configuration Request on a connection without a tunnel.
    pub(super) fn answer_without_tunnel(&mut self, connection: ConnectionHandle, header: &Header) {
        let notification_ack = header.message_type
            == MessageType::CONFIGURATION_RELEASE_NOTIFICATION_RESPONSE
            && self.ack_notification(connection, header.sequence);
        if notification_ack {
            return;
        }
        if header.message_type.is_request() {
            self.answer(connection, header, ResultCode::TUNNEL_NOT_FOUND);
        } else {
            self.stats.dropped.unexpected_message += 1;
        }
    }

    pub(super) fn handle_configuration_request(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        current: Option<u64>,
        request: &Message<'_>,
    ) {
        if let Some(id) = current {
            // Already configured on this connection: a retransmission whose response was
            // lost, or a confused client; either way it gets the configuration it has.
            if !self.answer_duplicate(connection, id, &request.header) {
                self.send_configuration(connection, id, &request.header);
            }
            return;
        }
        let Some(info) = self.connections.get(&connection).map(|c| c.info) else {
            return;
        };
        let source = info.remote.ip();
        if self.failing(now, source) {
            self.stats.refused.rate_limited += 1;
            return self.answer(connection, &request.header, ResultCode::RATE_LIMITED);
        }
        if let Some(id) = request.tlvs.tunnel_id {
            return self.reattach(now, connection, id, request);
        }
        if !self.admits(&info, request.tlvs.auth_token) {
            self.stats.refused.unauthorized += 1;
            self.record_failure(now, source);
            return self.answer(connection, &request.header, ResultCode::UNAUTHORIZED);
        }
        if self.tunnels.len() >= self.config.max_tunnels {
            self.stats.refused.server_full += 1;
            return self.answer(connection, &request.header, ResultCode::SERVER_FULL);
        }
        let Some((ipv4, ipv6)) = self.allocate_addresses() else {
            self.stats.refused.no_address += 1;
            return self.answer(
                connection,
                &request.header,
                ResultCode::NO_ADDRESS_AVAILABLE,
            );
        };
        let id = self.fresh_tunnel_id();
        let keepalive =
            self.negotiate_keepalive(info.transport, request.tlvs.keepalive_interval_ms);
        let mut secret = [0u8; 16];
        self.rng.fill_bytes(&mut secret);
        let tunnel = Tunnel {
            id,
            ipv4,
            ipv6,
            connection: Some(connection),
            transport: info.transport,
            secret,
            keepalive,
            capabilities: request.tlvs.client_capabilities.unwrap_or_default(),
            last_heard: now,
            persistent_since: None,
            last_answer: [None, None],
            announced: None,
            queue: VecDeque::new(),
            in_ready: false,
        };
        for addr in tunnel.addresses() {
            self.by_addr.insert(addr, id);
        }
        self.tunnels.insert(id, tunnel);
        self.bind(connection, id);
        self.schedule_idle(id);
        self.stats.tunnels_opened += 1;
        self.events.push_back(DirectorEvent::TunnelOpened {
            tunnel_id: id,
            ipv4: ipv4.map(|(a, _)| a),
            ipv6: ipv6.map(|(a, _)| a),
            connection,
        });
        self.send_configuration(connection, id, &request.header);
    }

    pub(super) fn reattach(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        id: u64,
        request: &Message<'_>,
    ) {
        let Some(tunnel) = self.tunnels.get_mut(&id) else {
            self.stats.refused.tunnel_not_found += 1;
            return self.answer(connection, &request.header, ResultCode::TUNNEL_NOT_FOUND);
        };
        let secret_ok = request
            .tlvs
            .reattach_secret
            .is_some_and(|s| constant_time_eq(&s, &tunnel.secret));
        if !secret_ok {
            self.stats.refused.bad_reattach_secret += 1;
            if let Some(c) = self.connections.get(&connection) {
                let source = c.info.remote.ip();
                self.record_failure(now, source);
            }
            return self.answer(connection, &request.header, ResultCode::UNAUTHORIZED);
        }
        let old = tunnel.connection.replace(connection);
        if old.is_none() {
            // Held frames are queued again, for the new transport.
            self.held_frames -= tunnel.queue.len();
            self.queued_frames += tunnel.queue.len();
        }
        let transport = self.connections.get(&connection).map(|c| c.info.transport);
        tunnel.transport = transport.unwrap_or(tunnel.transport);
        tunnel.keepalive = negotiate(
            &self.config.keepalive,
            tunnel.transport,
            request.tlvs.keepalive_interval_ms,
        );
        tunnel.persistent_since = None;
        tunnel.last_heard = now;
        self.rng.fill_bytes(&mut tunnel.secret);
        let has_frames = !tunnel.queue.is_empty() && !tunnel.in_ready;
        if has_frames {
            tunnel.in_ready = true;
            self.ready.push_back(id);
        }
        if let Some(old) = old {
            // The tunnel was still active elsewhere; that transport is stale.
            if let Some(c) = self.connections.get_mut(&old) {
                c.tunnel = None;
            }
            self.drop_connection(old);
        }
        self.bind(connection, id);
        self.schedule_idle(id);
        self.stats.reattaches += 1;
        self.events.push_back(DirectorEvent::TunnelReattached {
            tunnel_id: id,
            connection,
        });
        self.send_configuration(connection, id, &request.header);
        self.peer_reattached(now, id);
    }

    /// Answers a Configuration Request with tunnel `id`'s configuration, and remembers it.
    pub(super) fn send_configuration(
        &mut self,
        connection: ConnectionHandle,
        id: u64,
        request: &Header,
    ) {
        let Some(t) = self.tunnels.get(&id) else {
            return;
        };
        let mut reply = Message::response_to(request, ResultCode::SUCCESS);
        reply.header.tunnel_id = id;
        reply.tlvs.reattach_secret = Some(t.secret);
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
        self.send_and_remember(connection, id, request, &reply);
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
        let mut bytes = Vec::with_capacity(reply.encoded_len() + ENVELOPE_HEADER_LEN);
        if reply.encode_envelope(&mut bytes).is_err() {
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

    pub(super) fn send(&mut self, connection: ConnectionHandle, message: &Message<'_>) {
        let mut bytes = self.spare.pop().unwrap_or_default();
        bytes.clear();
        if message.encode_envelope(&mut bytes).is_ok() {
            self.control_out.push_back((connection, bytes));
            self.stats.control_answered += 1;
        }
    }
}

/// Which remembered answer a request type uses (see `Tunnel::last_answer`).
fn answer_slot(request: MessageType) -> usize {
    usize::from(request == MessageType::CLIENT_SERVICE_REQUEST)
}
