//! Input from the server: data envelopes, server requests (answered, with the duplicate rule
//! of `docs/PROTOCOL.md` §6.2) and responses to the client's own requests.

use core::net::SocketAddr;
use core::time::Duration;

use super::{after, TerminateReason, Timer, MAX_CONTROL_QUEUE};
use super::{ClientEvent, Phase, RequestKind, Tunnel, TunnelClient, TunnelInfo};
use super::{DEFAULT_KEEPALIVE_DATAGRAM, DEFAULT_KEEPALIVE_STREAM};
use crate::wire::{
    InnerPacket, Message, MessageType, PeerServiceResult, ResultCode, ServiceType, MAX_PAYLOAD_LEN,
};

impl TunnelClient {
    pub(super) fn on_data(&mut self, payload: &[u8]) {
        if !matches!(self.phase, Phase::Connected | Phase::Releasing) {
            self.stats.dropped_data_not_connected += 1;
            return;
        }
        let Ok(packet) = InnerPacket::parse(payload) else {
            self.stats.dropped_bad_packet += 1;
            return;
        };
        if !self
            .tunnel
            .as_ref()
            .is_some_and(|t| t.info.owns(packet.destination()))
        {
            self.stats.dropped_wrong_destination += 1;
            return;
        }
        self.heard_from_server();
        if self.inbound.push(&mut self.pool, payload) {
            self.stats.data_received += 1;
        } else {
            self.stats.dropped_receive_queue_full += 1;
        }
    }

    pub(super) fn on_control(&mut self, payload: &[u8]) {
        match Message::decode(payload) {
            Ok(msg) => {
                self.heard_from_server();
                if msg.header.message_type.is_request() {
                    self.on_request(&msg);
                } else {
                    self.on_response(&msg);
                }
            }
            Err(error) => match error.response() {
                Some(reply) => {
                    if !self.answer_duplicate(reply.header.sequence) {
                        self.stats.error_responses_sent += 1;
                        self.answer(&reply);
                    }
                }
                None => self.stats.dropped_bad_control += 1,
            },
        }
    }

    fn on_request(&mut self, msg: &Message<'_>) {
        if self.answer_duplicate(msg.header.sequence) {
            return;
        }
        let header = &msg.header;
        match header.message_type {
            MessageType::KEEPALIVE => {
                self.answer(&Message::response_to(header, ResultCode::SUCCESS));
            }
            MessageType::CLIENT_SERVICE_REQUEST => {
                let reply = self.answer_client_service(msg);
                self.answer(&reply);
            }
            MessageType::CONFIGURATION_RELEASE_NOTIFICATION
            | MessageType::CONFIGURATION_RELEASE_REQUEST => self.on_server_release(msg),
            _ => self.stats.dropped_unexpected_request += 1,
        }
    }

    /// The server ends the tunnel (§3.5).
    fn on_server_release(&mut self, msg: &Message<'_>) {
        let header = &msg.header;
        let ours = self
            .tunnel
            .as_ref()
            .is_some_and(|t| t.info.tunnel_id == header.tunnel_id);
        if !ours {
            self.stats.dropped_unexpected_request += 1;
            self.answer(&Message::response_to(header, ResultCode::TUNNEL_NOT_FOUND));
            return;
        }
        self.answer(&Message::response_to(header, ResultCode::SUCCESS));
        let reason = msg.tlvs.result_code.unwrap_or(ResultCode::SUCCESS);
        if header.message_type == MessageType::CONFIGURATION_RELEASE_NOTIFICATION
            && reason == ResultCode::SHUTDOWN
        {
            self.tunnel_gone(reason, false);
        } else {
            self.terminate(TerminateReason::ReleasedByServer(reason));
        }
    }

    fn on_response(&mut self, msg: &Message<'_>) {
        if msg.header.message_type == MessageType::CLIENT_SERVICE_RESPONSE {
            let matched = match self.peer_cx() {
                Some((agent, mut cx)) => agent.on_service_response(&mut cx, msg),
                None => false,
            };
            if !matched {
                self.stats.dropped_unmatched_response += 1;
            }
            return;
        }
        let Some(kind) = self
            .request
            .as_ref()
            .filter(|r| {
                r.transmissions > 0
                    && r.sequence == msg.header.sequence
                    && r.kind.response_type() == msg.header.message_type
            })
            .map(|r| r.kind)
        else {
            self.stats.dropped_unmatched_response += 1;
            return;
        };
        let result = msg.tlvs.result_code.unwrap_or(ResultCode::MALFORMED);
        if let RequestKind::Configuration { .. } = kind {
            let usable = msg.header.tunnel_id != 0
                && (msg.tlvs.internal_ipv4.is_some() || msg.tlvs.internal_ipv6.is_some());
            if result == ResultCode::SUCCESS && !usable {
                // Keep waiting: a broken answer must not end the attempt early.
                self.stats.dropped_invalid_configuration += 1;
                return;
            }
        }
        self.clear_request();
        match kind {
            RequestKind::Configuration { reattach } => {
                self.on_configuration_response(msg, result, reattach);
            }
            RequestKind::Keepalive => {
                if result == ResultCode::TUNNEL_NOT_FOUND {
                    self.tunnel_gone(result, true);
                }
            }
            RequestKind::Release => self.terminate(TerminateReason::Released),
        }
    }

    fn on_configuration_response(&mut self, msg: &Message<'_>, result: ResultCode, reattach: bool) {
        match result {
            ResultCode::SUCCESS => self.configured(msg, reattach),
            ResultCode::TUNNEL_NOT_FOUND | ResultCode::UNAUTHORIZED if reattach => {
                self.tunnel_gone(result, true);
            }
            ResultCode::UNAUTHORIZED => self.terminate(TerminateReason::Unauthorized),
            _ => self.fail_attempt(Some(result)),
        }
    }

    fn configured(&mut self, msg: &Message<'_>, reattach: bool) {
        let server = self.current_server();
        let default_interval = if server.transport.is_datagram() {
            DEFAULT_KEEPALIVE_DATAGRAM
        } else {
            DEFAULT_KEEPALIVE_STREAM
        };
        let keepalive_interval = msg
            .tlvs
            .keepalive_interval_ms
            .map(|ms| Duration::from_millis(ms.into()))
            .or(self.config.keepalive_interval)
            .unwrap_or(default_interval);
        let info = TunnelInfo {
            tunnel_id: msg.header.tunnel_id,
            ipv4: msg.tlvs.internal_ipv4,
            ipv6: msg.tlvs.internal_ipv6,
            dns_servers: msg.tlvs.dns_servers.to_vec(),
            keepalive_interval,
            observed_address: msg.tlvs.observed_address,
            max_packet_len: msg
                .tlvs
                .max_packet_size
                .map_or(MAX_PAYLOAD_LEN, usize::from),
            stun_server: msg
                .tlvs
                .stun_port
                .map(|port| SocketAddr::new(server.addr.ip(), port)),
            server,
        };
        let same = reattach
            && self.tunnel.as_ref().is_some_and(|t| {
                t.info.tunnel_id == info.tunnel_id
                    && t.info.ipv4 == info.ipv4
                    && t.info.ipv6 == info.ipv6
            });
        if !same {
            self.drop_tunnel();
        }
        self.tunnel = Some(Tunnel {
            info: info.clone(),
            secret: msg.tlvs.reattach_secret,
        });
        self.phase = Phase::Connected;
        self.backoff = self.config.reconnect_backoff.0;
        self.timers.stop(Timer::Reconnect);
        self.timers
            .set(Timer::Keepalive, after(self.now, keepalive_interval));
        self.heard_from_server();
        if same {
            self.stats.reattaches += 1;
            self.push_event(ClientEvent::Reattached(info));
        } else {
            self.stats.connects += 1;
            self.push_event(ClientEvent::Connected(info));
        }
        self.peer_server_up();
    }

    /// Answers `sequence` from memory if it is the last request answered (§6.2).
    fn answer_duplicate(&mut self, sequence: u32) -> bool {
        let Some(bytes) = self
            .last_answer
            .as_ref()
            .filter(|(seq, _)| *seq == sequence)
            .map(|(_, bytes)| bytes.clone())
        else {
            return false;
        };
        self.stats.duplicate_requests += 1;
        self.queue_control(bytes);
        true
    }

    fn answer(&mut self, reply: &Message<'_>) {
        let mut bytes = Vec::new();
        // Replies carry a few fixed-size TLVs and at most 8 candidates: far below 2048 octets.
        if reply.encode_envelope(&mut bytes).is_err() {
            return;
        }
        self.last_answer = Some((reply.header.sequence, bytes.clone()));
        self.queue_control(bytes);
    }

    fn queue_control(&mut self, bytes: Vec<u8>) {
        if self.control_out.len() >= MAX_CONTROL_QUEUE {
            self.stats.dropped_control_queue_full += 1;
            return;
        }
        self.stats.requests_answered += 1;
        self.control_out.push_back(bytes);
    }
}

impl TunnelClient {
    /// The answer to a Client Service Request. Peer requests go to the peer agent; without
    /// one they are refused with Peer Unavailable. Other services are not implemented and get
    /// Service Not Enabled (§4.2: also the answer to an unknown one).
    fn answer_client_service(&mut self, request: &Message<'_>) -> Message<'static> {
        if request.tlvs.service_type == Some(ServiceType::PEER) {
            if let Some((agent, mut cx)) = self.peer_cx() {
                return agent.on_service_request(&mut cx, request);
            }
            let mut reply = Message::response_to(&request.header, ResultCode::PEER_UNAVAILABLE);
            reply.tlvs.service_type = request.tlvs.service_type;
            reply.tlvs.peer_service_result = Some(PeerServiceResult::UNAVAILABLE);
            reply.tlvs.peer_internal_address = request.tlvs.peer_internal_address;
            return reply;
        }
        let mut reply = Message::response_to(&request.header, ResultCode::SERVICE_NOT_ENABLED);
        reply.tlvs.service_type = request.tlvs.service_type;
        reply
    }
}
