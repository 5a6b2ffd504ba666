//! Input from the server: data envelopes, server requests (verified, answered, with the
//! duplicate and replay rules of `docs/PROTOCOL.md` §6.2) and responses to the client's own
//! requests.

use core::net::SocketAddr;
use core::time::Duration;

use super::{after, Request, TerminateReason, Timer, MAX_ANSWERS, MAX_CONTROL_QUEUE};
use super::{ClientEvent, Phase, RequestKind, Tunnel, TunnelClient, TunnelInfo};
use super::{DEFAULT_KEEPALIVE_DATAGRAM, DEFAULT_KEEPALIVE_STREAM};
use crate::wire::{
    ControlKey, DecodeError, Freshness, InnerPacket, Message, MessageType, PeerServiceResult,
    ReplayWindow, ResultCode, ServiceType, MAX_PAYLOAD_LEN,
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

    /// A control message from the server. Once the client holds a tunnel, only what carries
    /// the director's Message Integrity under the tunnel's key is taken (§4.4): anything else
    /// is dropped and counted, with one exception, a Tunnel Not Found answer to our keepalive,
    /// which a director that lost the tunnel cannot sign, and which only makes the client
    /// re-attach.
    pub(super) fn on_control(&mut self, payload: &[u8]) {
        let authentic = self
            .tunnel
            .as_ref()
            .is_some_and(|t| t.key.verify_from_director(payload));
        let msg = match Message::decode(payload) {
            Ok(msg) => msg,
            Err(error) => return self.on_bad_control(&error, authentic),
        };
        if msg.header.message_type == MessageType::CONFIGURATION_RESPONSE {
            return self.on_configuration_response(&msg, payload, authentic);
        }
        if !authentic || self.tunnel_id() != Some(msg.header.tunnel_id) {
            if self.is_tunnel_not_found(&msg) {
                return self.reattach_in_place();
            }
            self.stats.dropped_unauthenticated += 1;
            return;
        }
        self.heard_from_server();
        if !msg.header.message_type.is_request() {
            return self.on_response(&msg);
        }
        let Some(tunnel) = &mut self.tunnel else {
            return;
        };
        match tunnel.replay.admit(msg.header.sequence) {
            Freshness::Fresh => self.on_request(&msg),
            Freshness::Seen if self.answer_duplicate(msg.header.sequence) => {}
            Freshness::Seen | Freshness::Stale => self.stats.dropped_replayed += 1,
        }
    }

    /// A control message that failed validation: a request the director signed gets the error
    /// answer of §6.1; nothing else is answered.
    fn on_bad_control(&mut self, error: &DecodeError, authentic: bool) {
        if !authentic {
            self.stats.dropped_bad_control += 1;
            return;
        }
        self.heard_from_server();
        match error.response() {
            Some(reply) => {
                if !self.answer_duplicate(reply.header.sequence) {
                    self.stats.error_responses_sent += 1;
                    self.answer(&reply);
                }
            }
            None => self.stats.dropped_bad_control += 1,
        }
    }

    fn on_request(&mut self, msg: &Message<'_>) {
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
        let Some(kind) = self.outstanding(msg).map(|r| r.kind) else {
            self.stats.dropped_unmatched_response += 1;
            return;
        };
        let result = msg.tlvs.result_code.unwrap_or(ResultCode::MALFORMED);
        self.clear_request();
        match kind {
            RequestKind::Keepalive if result == ResultCode::TUNNEL_NOT_FOUND => {
                self.reattach_in_place();
            }
            RequestKind::Configuration { .. } | RequestKind::Keepalive => {}
            RequestKind::Release => self.terminate(TerminateReason::Released),
        }
    }

    /// The outstanding request `msg` answers, if any.
    fn outstanding(&self, msg: &Message<'_>) -> Option<&Request> {
        self.request.as_ref().filter(|r| {
            r.transmissions > 0
                && r.sequence == msg.header.sequence
                && r.kind.response_type() == msg.header.message_type
        })
    }

    /// Whether `msg` answers our outstanding keepalive with Tunnel Not Found, for our tunnel.
    fn is_tunnel_not_found(&self, msg: &Message<'_>) -> bool {
        msg.tlvs.result_code == Some(ResultCode::TUNNEL_NOT_FOUND)
            && self.tunnel_id() == Some(msg.header.tunnel_id)
            && self
                .outstanding(msg)
                .is_some_and(|r| r.kind == RequestKind::Keepalive)
    }

    /// The director says it does not hold our tunnel. That answer carries no key (a director
    /// without the tunnel has none), so it is only a reason to re-attach with our proof, on
    /// this transport and at once (§3.4); the tunnel is given up only if that fails.
    fn reattach_in_place(&mut self) {
        self.stats.tunnel_not_found_reattaches += 1;
        self.clear_request();
        self.timers.stop(Timer::Keepalive);
        self.timers.stop(Timer::Silence);
        self.send_configuration_request();
    }

    /// The answer to our Configuration Request, if `msg` is one: bound to it by the echoed
    /// Client Nonce and, when it grants a tunnel, signed (§3.3, §3.4).
    fn on_configuration_response(&mut self, msg: &Message<'_>, payload: &[u8], authentic: bool) {
        let Some(request) = self.outstanding(msg) else {
            self.stats.dropped_unmatched_response += 1;
            return;
        };
        let RequestKind::Configuration { reattach } = request.kind else {
            return;
        };
        let result = msg.tlvs.result_code.unwrap_or(ResultCode::MALFORMED);
        if msg.tlvs.client_nonce != request.nonce {
            // Not bound to our request. A director that does not know the Client Nonce
            // answers, without one, Unknown Critical TLV (or Version Not Supported): that ends
            // the attempt, as a lost answer would, and is all a forger could get from it.
            let refused = matches!(
                result,
                ResultCode::UNKNOWN_CRITICAL_TLV | ResultCode::VERSION_NOT_SUPPORTED
            );
            if msg.tlvs.client_nonce.is_none() && refused {
                self.clear_request();
                return self.fail_attempt(Some(result));
            }
            self.stats.dropped_unbound_response += 1;
            return;
        }
        if result != ResultCode::SUCCESS {
            self.clear_request();
            return self.on_configuration_refused(result, reattach);
        }
        // A fresh tunnel comes with its key, and is signed with it; a re-attached one is
        // signed with the key we hold, and keeps it.
        let key = match (reattach, msg.tlvs.control_key) {
            (true, _) if authentic && self.tunnel_id() == Some(msg.header.tunnel_id) => None,
            (false, Some(key)) if ControlKey::new(&key).verify_from_director(payload) => {
                Some(ControlKey::new(&key))
            }
            _ => {
                // Keep waiting: a broken or forged answer must not end the attempt early.
                self.stats.dropped_invalid_configuration += 1;
                return;
            }
        };
        let usable = msg.header.tunnel_id != 0
            && (msg.tlvs.internal_ipv4.is_some() || msg.tlvs.internal_ipv6.is_some());
        if !usable {
            self.stats.dropped_invalid_configuration += 1;
            return;
        }
        self.clear_request();
        self.configured(msg, key);
    }

    fn on_configuration_refused(&mut self, result: ResultCode, reattach: bool) {
        match result {
            ResultCode::TUNNEL_NOT_FOUND | ResultCode::UNAUTHORIZED if reattach => {
                self.tunnel_gone(result, true);
            }
            ResultCode::UNAUTHORIZED => self.terminate(TerminateReason::Unauthorized),
            _ => self.fail_attempt(Some(result)),
        }
    }

    /// A Configuration Response granted a tunnel: a fresh one with its `key`, or ours again
    /// (`key` is `None`: a re-attach keeps the key and the replay window).
    fn configured(&mut self, msg: &Message<'_>, key: Option<ControlKey>) {
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
            .or(self.proposed_keepalive())
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
        let same = key.is_none()
            && self.tunnel.as_ref().is_some_and(|t| {
                t.info.tunnel_id == info.tunnel_id
                    && t.info.ipv4 == info.ipv4
                    && t.info.ipv6 == info.ipv6
            });
        match key {
            Some(key) => {
                self.drop_tunnel();
                self.tunnel = Some(Tunnel {
                    info: info.clone(),
                    key,
                    replay: ReplayWindow::new(),
                });
            }
            None => {
                if !same {
                    // Other addresses: the queued packets' source is no longer ours.
                    self.stats.send_queue_discarded += self.outbound.clear(&mut self.pool) as u64;
                }
                // A re-attach answer is only taken for the tunnel we hold.
                let Some(tunnel) = &mut self.tunnel else {
                    return;
                };
                tunnel.info = info.clone();
            }
        }
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

    /// Answers `sequence` from memory if it is one of the last requests answered (§6.2).
    fn answer_duplicate(&mut self, sequence: u32) -> bool {
        let Some(bytes) = self
            .answers
            .iter()
            .find(|(seq, _)| *seq == sequence)
            .map(|(_, bytes)| bytes.clone())
        else {
            return false;
        };
        self.stats.duplicate_requests += 1;
        self.queue_control(bytes);
        true
    }

    /// Answers a server request, signed for our tunnel, and remembers the answer.
    fn answer(&mut self, reply: &Message<'_>) {
        let Some(bytes) = self.encode_signed(reply) else {
            return;
        };
        if self.answers.len() >= MAX_ANSWERS {
            self.answers.pop_front();
        }
        self.answers
            .push_back((reply.header.sequence, bytes.clone()));
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
