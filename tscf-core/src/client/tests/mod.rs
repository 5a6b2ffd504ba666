//! The client against a scripted fake server, in virtual time.

use core::net::{IpAddr, Ipv4Addr, SocketAddr};

use etherparse::PacketBuilder;

use super::*;
use crate::wire::{Capabilities, ControlKey, InternalAddress, Transport, MAX_PAYLOAD_LEN};

mod data;
mod failover;
mod nat;
mod peer;

const TUNNEL: u64 = 0x5a17_c0de_2024_0b01;
const ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
/// The control key the scripted director gives every tunnel.
const KEY: [u8; 32] = *b"the scripted director's tunnel k";

#[allow(clippy::disallowed_methods)]
pub(super) fn base() -> Instant {
    // The client's tests' only clock read: a fixed origin for virtual time.
    Instant::now()
}

fn server(port: u16, transport: Transport) -> ServerEndpoint {
    ServerEndpoint {
        addr: SocketAddr::from(([192, 0, 2, 1], port)),
        transport,
    }
}

fn tcp() -> ServerEndpoint {
    server(4000, Transport::TCP)
}

fn udp() -> ServerEndpoint {
    server(4001, Transport::UDP)
}

/// A client, its virtual clock, and everything it has emitted.
struct Harness {
    client: TunnelClient,
    start: Instant,
    now: Instant,
    /// (time since start, envelope) of every transmit.
    sent: Vec<(Duration, Vec<u8>)>,
    /// (destination, datagram) of every transmit from the peer socket.
    peer_sent: Vec<(SocketAddr, Vec<u8>)>,
    /// Envelopes sent inside peer sessions.
    session_sent: Vec<(SocketAddr, Vec<u8>)>,
    /// (stream, envelope) of every transmit on a peer stream.
    stream_sent: Vec<(PeerStreamId, Vec<u8>)>,
    events: Vec<ClientEvent>,
    /// The Client Nonce of the last Configuration Request, and whether it re-attached.
    configuration: Option<([u8; 16], bool)>,
}

impl Harness {
    fn new(config: ClientConfig) -> Self {
        let start = base();
        let client = TunnelClient::new(config, start).expect("valid config");
        let mut h = Self {
            client,
            start,
            now: start,
            sent: Vec::new(),
            peer_sent: Vec::new(),
            session_sent: Vec::new(),
            stream_sent: Vec::new(),
            events: Vec::new(),
            configuration: None,
        };
        h.drain();
        h
    }

    fn with_servers(servers: Vec<ServerEndpoint>) -> Self {
        Self::new(ClientConfig::new(servers))
    }

    fn drain(&mut self) {
        let mut buf = Vec::new();
        while let Some(t) = self.client.poll_transmit(self.now, &mut buf) {
            match t.destination {
                Destination::Server => {
                    let request = Envelope::decode_datagram(&buf)
                        .ok()
                        .filter(|e| e.kind == EnvelopeType::CONTROL)
                        .and_then(|e| Message::decode(e.payload).ok())
                        .filter(|m| m.header.message_type == MessageType::CONFIGURATION_REQUEST)
                        .and_then(|m| Some((m.tlvs.client_nonce?, m.tlvs.tunnel_id.is_some())));
                    if request.is_some() {
                        self.configuration = request;
                    }
                    self.sent.push((self.now - self.start, buf.clone()));
                }
                Destination::Peer(to) => self.peer_sent.push((to, buf.clone())),
                Destination::PeerStream(id) => self.stream_sent.push((id, buf.clone())),
                Destination::PeerSession(to) => self.session_sent.push((to, buf.clone())),
            }
        }
        while let Some(e) = self.client.poll_event() {
            self.events.push(e);
        }
    }

    /// Moves virtual time forward by `d`, firing every timer on the way.
    fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        while let Some(at) = self.client.poll_timeout().filter(|at| *at <= target) {
            self.now = self.now.max(at);
            self.client.handle_timeout(self.now);
            self.drain();
        }
        self.now = target;
    }

    fn open(&mut self) {
        self.client.handle_input(self.now, Input::TransportOpen);
        self.drain();
    }

    /// Delivers what the scripted director sends, as a director of this version sends it: a
    /// Configuration Response echoing the request's Client Nonce (with the control key
    /// [`KEY`] when it grants a fresh tunnel), and everything for a tunnel signed with it.
    fn deliver(&mut self, envelope: &[u8]) {
        let envelope = self.as_director(envelope);
        self.deliver_raw(&envelope);
    }

    /// Delivers exactly `envelope`.
    fn deliver_raw(&mut self, envelope: &[u8]) {
        self.client
            .handle_input(self.now, Input::Envelope(envelope));
        self.drain();
    }

    fn as_director(&self, envelope: &[u8]) -> Vec<u8> {
        let unchanged = envelope.to_vec();
        let Ok(env) = Envelope::decode_datagram(envelope) else {
            return unchanged;
        };
        let Ok(mut msg) = Message::decode(env.payload) else {
            return unchanged;
        };
        if env.kind != EnvelopeType::CONTROL || msg.tlvs.message_integrity.is_some() {
            return unchanged;
        }
        if msg.header.message_type == MessageType::CONFIGURATION_RESPONSE {
            let Some((nonce, reattach)) = self.configuration else {
                return unchanged;
            };
            msg.tlvs.client_nonce.get_or_insert(nonce);
            if msg.tlvs.result_code != Some(ResultCode::SUCCESS) {
                return encode(&msg);
            }
            if !reattach {
                msg.tlvs.control_key.get_or_insert(KEY);
            }
        } else if self.client.tunnel_id().is_none() {
            return unchanged;
        }
        let mut out = Vec::new();
        msg.encode_envelope_with_integrity(&ControlKey::new(&KEY).director_to_client(), &mut out)
            .expect("encodable");
        out
    }

    fn take_sent(&mut self) -> Vec<Vec<u8>> {
        self.sent.drain(..).map(|(_, bytes)| bytes).collect()
    }

    fn take_events(&mut self) -> Vec<ClientEvent> {
        core::mem::take(&mut self.events)
    }

    /// The one control message sent since the last take.
    fn take_control(&mut self) -> Vec<u8> {
        let sent = self.take_sent();
        assert_eq!(sent.len(), 1, "expected one transmit, got {sent:?}");
        sent.into_iter().next().expect("one transmit")
    }

    /// Opens the transport, answers the Configuration Request with success and checks the
    /// resulting event.
    fn connect(&mut self, interval_ms: u32) -> TunnelInfo {
        self.open();
        let request = self.take_control();
        let seq = decode(&request).header.sequence;
        self.deliver(&config_response(seq, TUNNEL, ADDR, interval_ms));
        match self.take_events().as_slice() {
            [ClientEvent::Connected(info)] => info.clone(),
            other => panic!("expected Connected, got {other:?}"),
        }
    }
}

/// Decodes a control envelope the client sent.
fn decode(envelope: &[u8]) -> Message<'_> {
    let env = Envelope::decode_datagram(envelope).expect("an envelope");
    assert_eq!(env.kind, EnvelopeType::CONTROL);
    Message::decode(env.payload).expect("a valid control message")
}

fn encode(msg: &Message<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    msg.encode_envelope(&mut out).expect("encodable");
    out
}

/// The largest inner packet the fake server relays, as the director's default.
const MAX_PACKET: u16 = 1400;

fn config_response(seq: u32, tunnel: u64, addr: Ipv4Addr, interval_ms: u32) -> Vec<u8> {
    config_response_with(seq, tunnel, addr, interval_ms, Some(MAX_PACKET))
}

fn config_response_with(
    seq: u32,
    tunnel: u64,
    addr: Ipv4Addr,
    interval_ms: u32,
    max_packet_size: Option<u16>,
) -> Vec<u8> {
    let mut msg = Message::new(MessageType::CONFIGURATION_RESPONSE, seq, tunnel);
    msg.tlvs.max_packet_size = max_packet_size;
    msg.tlvs.result_code = Some(ResultCode::SUCCESS);
    msg.tlvs.internal_ipv4 = Some(InternalAddress {
        addr,
        prefix_len: 16,
    });
    msg.tlvs.keepalive_interval_ms = Some(interval_ms);
    msg.tlvs.dns_servers.push(IpAddr::from([10, 77, 0, 1]));
    msg.tlvs.observed_address = Some(SocketAddr::from(([198, 51, 100, 7], 40000)));
    encode(&msg)
}

fn error_response(request: &[u8], code: ResultCode) -> Vec<u8> {
    encode(&Message::response_to(&decode(request).header, code))
}

fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .udp(5004, 5004)
        .write(&mut out, payload)
        .expect("vec write");
    out
}

fn data_envelope(packet: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Envelope::encode(EnvelopeType::DATA, packet, &mut out).expect("fits");
    out
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn packets_beyond_the_servers_maximum_are_refused_at_the_sender() {
    let mut h = Harness::new(ClientConfig::new(vec![udp()]));
    h.take_events();
    let info = h.connect(30_000);
    assert_eq!(info.max_packet_len, usize::from(MAX_PACKET));
    // 28 octets of IPv4 and UDP headers.
    let fits = udp_packet(ADDR, PEER, &[7; 1400 - 28]);
    h.client.send_ip(h.now, &fits).expect("fits");
    h.drain();
    assert_eq!(h.take_sent().len(), 1);
    let too_big = udp_packet(ADDR, PEER, &[7; 1400 - 27]);
    assert_eq!(
        h.client.send_ip(h.now, &too_big),
        Err(SendError::TooLarge {
            len: 1401,
            max: 1400
        })
    );
    h.drain();
    assert!(
        h.take_sent().is_empty(),
        "nothing left for the server to drop"
    );

    // A director that does not announce a maximum: what one envelope holds.
    let mut h = Harness::new(ClientConfig::new(vec![udp()]));
    h.take_events();
    h.open();
    let seq = decode(&h.take_control()).header.sequence;
    h.deliver(&config_response_with(seq, TUNNEL, ADDR, 30_000, None));
    match h.take_events().as_slice() {
        [ClientEvent::Connected(info)] => assert_eq!(info.max_packet_len, MAX_PAYLOAD_LEN),
        other => panic!("expected Connected, got {other:?}"),
    }
    h.client
        .send_ip(h.now, &too_big)
        .expect("within an envelope");
}

#[test]
fn connects_over_a_stream_transport() {
    let mut config = ClientConfig::new(vec![tcp()]);
    config.auth_token = Some(b"s3cret".to_vec());
    config.keepalive_interval = Some(Duration::from_secs(60));
    config.capabilities = Capabilities::PEER_TUNNELING;
    let mut h = Harness::new(config);
    assert_eq!(
        h.take_events(),
        [ClientEvent::OpenTransport { server: tcp() }]
    );
    assert_eq!(h.client.state(), ClientState::Connecting);
    // Nothing goes out before the transport is open.
    assert!(h.sent.is_empty());

    h.open();
    let request = h.take_control();
    let msg = decode(&request);
    assert_eq!(msg.header.message_type, MessageType::CONFIGURATION_REQUEST);
    assert_eq!(msg.header.tunnel_id, 0);
    assert_eq!(msg.header.sequence & 0x8000_0000, 0);
    assert_eq!(msg.tlvs.supported_versions, Some(&[1u8][..]));
    assert_eq!(msg.tlvs.auth_token, Some(&b"s3cret"[..]));
    assert_eq!(msg.tlvs.keepalive_interval_ms, Some(60_000));
    assert_eq!(
        msg.tlvs.client_capabilities,
        Some(Capabilities::PEER_TUNNELING)
    );
    assert!(msg.tlvs.software.is_some_and(|s| s.starts_with("tscf/")));
    assert_eq!(msg.tlvs.tunnel_id, None);
    assert!(msg.tlvs.client_nonce.is_some());
    assert_eq!(msg.tlvs.message_integrity, None, "no key to sign with yet");

    // A stream transport sends the request once.
    h.advance(Duration::from_secs(5));
    assert!(h.sent.is_empty());

    h.deliver(&config_response(msg.header.sequence, TUNNEL, ADDR, 30_000));
    let events = h.take_events();
    let [ClientEvent::Connected(info)] = events.as_slice() else {
        panic!("expected Connected, got {events:?}");
    };
    assert_eq!(info.tunnel_id, TUNNEL);
    assert_eq!(info.ipv4.map(|a| a.addr), Some(ADDR));
    assert_eq!(info.keepalive_interval, Duration::from_secs(30));
    assert_eq!(info.dns_servers, [IpAddr::from([10, 77, 0, 1])]);
    assert_eq!(info.server, tcp());
    assert_eq!(h.client.state(), ClientState::Connected);
    assert_eq!(h.client.tunnel_id(), Some(TUNNEL));
    assert_eq!(h.client.internal_ipv4(), Some(ADDR));
    assert_eq!(h.client.internal_ipv6(), None);
    assert_eq!(h.client.stats().connects, 1);
}

#[test]
fn stream_request_times_out_and_the_round_starts_over_with_backoff() {
    let mut h = Harness::with_servers(vec![tcp()]);
    h.take_events();
    h.open();
    h.take_sent();
    h.advance(ms(9_999));
    assert!(h.take_events().is_empty());
    h.advance(ms(1));
    assert_eq!(
        h.take_events(),
        [
            ClientEvent::ConnectFailed {
                server: tcp(),
                result: None
            },
            ClientEvent::CloseTransport,
        ]
    );
    // Last server failed: start over after 100 ms, then 200 ms.
    h.advance(ms(99));
    assert!(h.take_events().is_empty());
    h.advance(ms(1));
    assert_eq!(
        h.take_events(),
        [ClientEvent::OpenTransport { server: tcp() }]
    );
    h.client.handle_input(h.now, Input::TransportFailed);
    h.drain();
    h.take_events();
    h.advance(ms(199));
    assert!(h.take_events().is_empty());
    h.advance(ms(1));
    assert_eq!(
        h.take_events(),
        [ClientEvent::OpenTransport { server: tcp() }]
    );
}

#[test]
fn retransmits_over_udp_with_the_same_sequence() {
    let mut h = Harness::with_servers(vec![udp()]);
    h.take_events();
    h.open();
    // The first three requests are lost; the fourth is answered.
    h.advance(ms(1750));
    let times: Vec<Duration> = h.sent.iter().map(|(t, _)| *t).collect();
    assert_eq!(times, [ms(0), ms(250), ms(750), ms(1750)]);
    let sent = h.take_sent();
    assert!(
        sent.iter().all(|s| *s == sent[0]),
        "identical retransmissions"
    );
    let seq = decode(&sent[0]).header.sequence;
    assert_eq!(h.client.stats().retransmissions, 3);
    h.deliver(&config_response(seq, TUNNEL, ADDR, 30_000));
    assert!(matches!(
        h.take_events().as_slice(),
        [ClientEvent::Connected(_)]
    ));
    // No further retransmission once answered.
    h.advance(Duration::from_secs(10));
    assert!(h
        .take_sent()
        .iter()
        .all(|s| decode(s).header.sequence != seq));
}

#[test]
fn udp_request_fails_after_seven_transmissions() {
    let mut h = Harness::with_servers(vec![udp()]);
    h.take_events();
    h.open();
    h.advance(ms(15_749));
    let times: Vec<u64> = h.sent.iter().map(|(t, _)| t.as_millis() as u64).collect();
    // 250 ms doubling, capped at 4 s.
    assert_eq!(times, [0, 250, 750, 1750, 3750, 7750, 11_750]);
    assert!(h.take_events().is_empty());
    h.advance(ms(1));
    assert_eq!(
        h.take_events(),
        [
            ClientEvent::ConnectFailed {
                server: udp(),
                result: None
            },
            ClientEvent::CloseTransport,
        ]
    );
}

#[test]
fn fails_over_along_the_server_list() {
    let (a, b, c) = (
        server(1, Transport::TCP),
        server(2, Transport::UDP),
        server(3, Transport::TLS),
    );
    let mut h = Harness::with_servers(vec![a, b, c]);
    assert_eq!(h.take_events(), [ClientEvent::OpenTransport { server: a }]);
    h.client.handle_input(h.now, Input::TransportFailed);
    h.drain();
    assert_eq!(
        h.take_events(),
        [
            ClientEvent::ConnectFailed {
                server: a,
                result: None
            },
            ClientEvent::OpenTransport { server: b },
        ]
    );
    h.open();
    let request = h.take_control();
    h.deliver(&error_response(&request, ResultCode::SERVER_FULL));
    assert_eq!(
        h.take_events(),
        [
            ClientEvent::ConnectFailed {
                server: b,
                result: Some(ResultCode::SERVER_FULL)
            },
            ClientEvent::CloseTransport,
            ClientEvent::OpenTransport { server: c },
        ]
    );
    let info = h.connect(30_000);
    assert_eq!(info.server, c);
    // The late response of B's retransmissions matches nothing.
    h.deliver(&error_response(&request, ResultCode::SERVER_FULL));
    assert_eq!(h.client.stats().dropped_unmatched_response, 1);
    assert_eq!(h.client.state(), ClientState::Connected);
}

#[test]
fn idle_keepalive_then_silence_then_reattach() {
    let mut h = Harness::with_servers(vec![tcp()]);
    h.take_events();
    h.connect(1000);
    // Idle for one interval: a Keepalive.
    h.advance(ms(999));
    assert!(h.sent.is_empty());
    h.advance(ms(1));
    let keepalive = h.take_control();
    let msg = decode(&keepalive);
    assert_eq!(msg.header.message_type, MessageType::KEEPALIVE);
    assert_eq!(msg.header.tunnel_id, TUNNEL);
    // Answered: the server is alive and the next keepalive is an interval later.
    h.deliver(&error_response(&keepalive, ResultCode::SUCCESS));
    h.advance(ms(1000));
    let keepalive = h.take_control();
    assert_eq!(
        decode(&keepalive).header.message_type,
        MessageType::KEEPALIVE
    );
    // Then the server goes silent: lost three intervals after it was last heard (t = 1 s).
    h.advance(ms(1999));
    assert!(h.take_events().is_empty());
    h.advance(ms(1));
    assert_eq!(
        h.take_events(),
        [
            ClientEvent::TransportLost,
            ClientEvent::CloseTransport,
            ClientEvent::OpenTransport { server: tcp() },
        ]
    );
    assert_eq!(h.client.state(), ClientState::Reattaching);
    assert_eq!(h.client.tunnel_id(), Some(TUNNEL));

    h.open();
    let request = h.take_control();
    let msg = decode(&request);
    assert_eq!(msg.header.tunnel_id, 0);
    assert_eq!(msg.tlvs.tunnel_id, Some(TUNNEL));
    // The proof is our Message Integrity under the tunnel's key, never a bare secret.
    assert_eq!(msg.tlvs.reattach_secret, None);
    let nonce = msg.tlvs.client_nonce.expect("a nonce");
    assert!(ControlKey::new(&KEY).verify_from_client(&request[3..]));
    let mut response = Message::new(
        MessageType::CONFIGURATION_RESPONSE,
        msg.header.sequence,
        TUNNEL,
    );
    response.tlvs.result_code = Some(ResultCode::SUCCESS);
    response.tlvs.internal_ipv4 = Some(InternalAddress {
        addr: ADDR,
        prefix_len: 16,
    });
    h.deliver(&encode(&response));
    assert!(matches!(
        h.take_events().as_slice(),
        [ClientEvent::Reattached(info)] if info.tunnel_id == TUNNEL
    ));
    assert_eq!(h.client.stats().reattaches, 1);

    // The next re-attach carries a fresh nonce.
    h.client.handle_input(h.now, Input::TransportLost);
    h.drain();
    assert_eq!(
        h.take_events(),
        [
            ClientEvent::TransportLost,
            ClientEvent::OpenTransport { server: tcp() },
        ]
    );
    h.open();
    let request = h.take_control();
    assert_ne!(decode(&request).tlvs.client_nonce, Some(nonce));
}

#[test]
fn udp_keepalive_is_retransmitted_then_counts_as_loss() {
    let mut config = ClientConfig::new(vec![udp()]);
    config.silence_intervals = 1000;
    let mut h = Harness::new(config);
    h.take_events();
    h.connect(60_000);
    h.advance(Duration::from_secs(60));
    let first = h.take_control();
    h.advance(ms(15_749));
    let sent = h.take_sent();
    assert_eq!(sent.len(), 6);
    assert!(sent.iter().all(|s| *s == first));
    assert!(h.take_events().is_empty());
    h.advance(ms(1));
    assert_eq!(
        h.take_events(),
        [
            ClientEvent::TransportLost,
            ClientEvent::CloseTransport,
            ClientEvent::OpenTransport { server: udp() },
        ]
    );
}

#[test]
fn refused_reattach_gets_a_fresh_tunnel_on_the_same_transport() {
    let mut h = Harness::with_servers(vec![tcp()]);
    h.take_events();
    h.connect(30_000);
    h.client.handle_input(h.now, Input::TransportLost);
    h.drain();
    h.take_events();
    let packet = udp_packet(ADDR, PEER, b"old");
    h.client.send_ip(h.now, &packet).expect("queued");
    h.open();
    let request = h.take_control();
    h.deliver(&error_response(&request, ResultCode::TUNNEL_NOT_FOUND));
    assert_eq!(
        h.take_events(),
        [ClientEvent::TunnelClosed {
            reason: ResultCode::TUNNEL_NOT_FOUND
        }]
    );
    assert_eq!(h.client.state(), ClientState::Connecting);
    let fresh = h.take_control();
    let msg = decode(&fresh);
    assert_eq!(msg.header.message_type, MessageType::CONFIGURATION_REQUEST);
    assert_eq!(msg.tlvs.tunnel_id, None);
    assert_eq!(msg.tlvs.message_integrity, None);
    assert_ne!(msg.header.sequence, decode(&request).header.sequence);

    let new_addr = Ipv4Addr::new(10, 77, 0, 9);
    h.deliver(&config_response(msg.header.sequence, 77, new_addr, 30_000));
    assert!(matches!(
        h.take_events().as_slice(),
        [ClientEvent::Connected(info)] if info.tunnel_id == 77
    ));
    assert_eq!(h.client.internal_ipv4(), Some(new_addr));
    // The packet from the old address was not sent.
    assert!(h.sent.is_empty());
    assert_eq!(h.client.stats().send_queue_discarded, 1);
    assert_eq!(
        h.client.send_ip(h.now, &packet),
        Err(SendError::WrongSource(ADDR.into()))
    );
}

#[test]
fn unauthorized_terminates_without_retrying() {
    let mut h = Harness::with_servers(vec![tcp(), udp()]);
    h.take_events();
    h.open();
    let request = h.take_control();
    h.deliver(&error_response(&request, ResultCode::UNAUTHORIZED));
    assert_eq!(
        h.take_events(),
        [
            ClientEvent::CloseTransport,
            ClientEvent::Terminated {
                reason: TerminateReason::Unauthorized
            },
        ]
    );
    assert_eq!(h.client.state(), ClientState::Terminated);
    assert_eq!(h.client.poll_timeout(), None);
    h.advance(Duration::from_secs(3600));
    assert!(h.take_events().is_empty());
}

#[test]
fn administrative_release_notification_terminates() {
    let mut h = Harness::with_servers(vec![tcp()]);
    h.take_events();
    h.connect(30_000);
    let mut note = Message::new(
        MessageType::CONFIGURATION_RELEASE_NOTIFICATION,
        0x8000_0001,
        TUNNEL,
    );
    note.tlvs.result_code = Some(ResultCode::ADMINISTRATIVE);
    h.deliver(&encode(&note));
    let answer = h.take_control();
    let msg = decode(&answer);
    assert_eq!(
        msg.header.message_type,
        MessageType::CONFIGURATION_RELEASE_NOTIFICATION_RESPONSE
    );
    assert_eq!(msg.header.sequence, 0x8000_0001);
    assert_eq!(msg.tlvs.result_code, Some(ResultCode::SUCCESS));
    assert_eq!(
        h.take_events(),
        [
            ClientEvent::CloseTransport,
            ClientEvent::Terminated {
                reason: TerminateReason::ReleasedByServer(ResultCode::ADMINISTRATIVE)
            },
        ]
    );
    assert_eq!(
        h.client.send_ip(h.now, &udp_packet(ADDR, PEER, b"x")),
        Err(SendError::Closed)
    );
}

#[test]
fn shutdown_notification_reconnects_with_a_fresh_tunnel() {
    let mut h = Harness::with_servers(vec![tcp()]);
    h.take_events();
    h.connect(30_000);
    let mut note = Message::new(
        MessageType::CONFIGURATION_RELEASE_NOTIFICATION,
        0x8000_0002,
        TUNNEL,
    );
    note.tlvs.result_code = Some(ResultCode::SHUTDOWN);
    h.deliver(&encode(&note));
    let answer = h.take_control();
    assert_eq!(decode(&answer).tlvs.result_code, Some(ResultCode::SUCCESS));
    assert_eq!(
        h.take_events(),
        [
            ClientEvent::TunnelClosed {
                reason: ResultCode::SHUTDOWN
            },
            ClientEvent::CloseTransport,
        ]
    );
    assert_eq!(h.client.tunnel_id(), None);
    h.advance(ms(100));
    assert_eq!(
        h.take_events(),
        [ClientEvent::OpenTransport { server: tcp() }]
    );
    h.open();
    let request = h.take_control();
    let msg = decode(&request);
    assert_eq!(msg.tlvs.tunnel_id, None);
    h.deliver(&config_response(msg.header.sequence, 99, ADDR, 30_000));
    assert!(matches!(
        h.take_events().as_slice(),
        [ClientEvent::Connected(info)] if info.tunnel_id == 99
    ));
}

#[test]
fn duplicate_server_keepalive_is_answered_identically() {
    let mut h = Harness::with_servers(vec![udp()]);
    h.take_events();
    h.connect(30_000);
    let keepalive = encode(&Message::new(MessageType::KEEPALIVE, 0x8000_0007, TUNNEL));
    h.deliver(&keepalive);
    let first = h.take_control();
    let msg = decode(&first);
    assert_eq!(msg.header.message_type, MessageType::KEEPALIVE_RESPONSE);
    assert_eq!(msg.header.sequence, 0x8000_0007);
    assert_eq!(msg.tlvs.result_code, Some(ResultCode::SUCCESS));
    h.deliver(&keepalive);
    assert_eq!(h.take_control(), first);
    assert_eq!(h.client.stats().duplicate_requests, 1);
    // A new sequence is a new request.
    h.deliver(&encode(&Message::new(
        MessageType::KEEPALIVE,
        0x8000_0008,
        TUNNEL,
    )));
    assert_eq!(decode(&h.take_control()).header.sequence, 0x8000_0008);
    assert_eq!(h.client.stats().duplicate_requests, 1);
    assert_eq!(h.client.stats().requests_answered, 3);
}

#[test]
fn without_peer_config_client_service_requests_are_refused() {
    let mut h = Harness::with_servers(vec![tcp()]);
    h.take_events();
    h.connect(30_000);
    // Peer: Peer Unavailable, the peer address echoed.
    let mut request = Message::new(MessageType::CLIENT_SERVICE_REQUEST, 0x8000_0003, TUNNEL);
    request.tlvs.service_type = Some(crate::wire::ServiceType::PEER);
    request.tlvs.service_action = Some(crate::wire::ServiceAction::ESTABLISH);
    request.tlvs.peer_internal_address = Some(IpAddr::V4(PEER));
    h.deliver(&encode(&request));
    let answer = h.take_control();
    let msg = decode(&answer);
    assert_eq!(
        msg.header.message_type,
        MessageType::CLIENT_SERVICE_RESPONSE
    );
    assert_eq!(msg.tlvs.result_code, Some(ResultCode::PEER_UNAVAILABLE));
    assert_eq!(
        msg.tlvs.peer_service_result,
        Some(crate::wire::PeerServiceResult::UNAVAILABLE)
    );
    assert_eq!(msg.tlvs.peer_internal_address, Some(IpAddr::V4(PEER)));
    // Any other service: Service Not Enabled.
    let mut request = Message::new(MessageType::CLIENT_SERVICE_REQUEST, 0x8000_0004, TUNNEL);
    request.tlvs.service_type = Some(crate::wire::ServiceType::DDT);
    h.deliver(&encode(&request));
    let msg_bytes = h.take_control();
    let msg = decode(&msg_bytes);
    assert_eq!(msg.tlvs.result_code, Some(ResultCode::SERVICE_NOT_ENABLED));
    assert_eq!(h.client.state(), ClientState::Connected);
}

#[test]
fn release_waits_for_queued_data_then_terminates() {
    let mut h = Harness::with_servers(vec![tcp()]);
    h.take_events();
    h.connect(30_000);
    let packet = udp_packet(ADDR, PEER, b"bye");
    h.client.send_ip(h.now, &packet).expect("queued");
    h.client.release(h.now);
    h.drain();
    assert_eq!(h.client.state(), ClientState::Releasing);
    let sent = h.take_sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0], data_envelope(&packet));
    let msg = decode(&sent[1]);
    assert_eq!(
        msg.header.message_type,
        MessageType::CONFIGURATION_RELEASE_REQUEST
    );
    assert_eq!(msg.header.tunnel_id, TUNNEL);
    h.deliver(&error_response(&sent[1], ResultCode::SUCCESS));
    assert_eq!(
        h.take_events(),
        [
            ClientEvent::CloseTransport,
            ClientEvent::Terminated {
                reason: TerminateReason::Released
            },
        ]
    );
    assert_eq!(h.client.poll_timeout(), None);
}

#[test]
fn unanswered_release_over_udp_still_terminates() {
    let mut h = Harness::with_servers(vec![udp()]);
    h.take_events();
    h.connect(30_000);
    h.client.release(h.now);
    h.drain();
    h.advance(ms(15_749));
    assert_eq!(h.take_sent().len(), 7);
    assert!(h.take_events().is_empty());
    h.advance(ms(1));
    assert_eq!(
        h.take_events(),
        [
            ClientEvent::CloseTransport,
            ClientEvent::Terminated {
                reason: TerminateReason::Released
            },
        ]
    );
}

#[test]
fn success_without_an_address_is_not_a_tunnel() {
    let mut h = Harness::with_servers(vec![tcp()]);
    h.take_events();
    h.open();
    let request = h.take_control();
    h.deliver(&error_response(&request, ResultCode::SUCCESS));
    assert!(h.take_events().is_empty());
    assert_eq!(h.client.stats().dropped_invalid_configuration, 1);
    // The proper answer still counts.
    let seq = decode(&request).header.sequence;
    h.deliver(&config_response(seq, TUNNEL, ADDR, 30_000));
    assert!(matches!(
        h.take_events().as_slice(),
        [ClientEvent::Connected(_)]
    ));
}

#[test]
fn sequence_numbers_increment_from_a_seeded_start() {
    let first_sequence = |seed| {
        let mut config = ClientConfig::new(vec![tcp()]);
        config.rng_seed = seed;
        let mut h = Harness::new(config);
        h.open();
        decode(&h.take_control()).header.sequence
    };
    assert_eq!(first_sequence([1; 32]), first_sequence([1; 32]));
    assert_ne!(first_sequence([1; 32]), first_sequence([2; 32]));

    let mut h = Harness::with_servers(vec![tcp()]);
    h.take_events();
    h.open();
    let s1 = decode(&h.take_control()).header.sequence;
    h.deliver(&config_response(s1, TUNNEL, ADDR, 1000));
    h.advance(ms(1000));
    let s2 = decode(&h.take_control()).header.sequence;
    assert_eq!(s2, (s1 + 1) & SEQUENCE_MASK);
}

#[test]
fn configuration_bounds_are_checked() {
    let new = |f: &dyn Fn(&mut ClientConfig)| {
        let mut config = ClientConfig::new(vec![tcp()]);
        f(&mut config);
        TunnelClient::new(config, base()).err()
    };
    assert_eq!(new(&|c| c.servers.clear()), Some(ConfigError::NoServers));
    assert_eq!(
        new(&|c| c.servers = vec![tcp(); 9]),
        Some(ConfigError::TooManyServers(9))
    );
    assert_eq!(
        new(&|c| c.auth_token = Some(Vec::new())),
        Some(ConfigError::AuthTokenLength(0))
    );
    assert_eq!(
        new(&|c| c.keepalive_interval = Some(ms(50))),
        Some(ConfigError::KeepaliveInterval(ms(50)))
    );
    assert_eq!(new(&|c| c.max_rto = ms(1)), Some(ConfigError::Rto));
    assert_eq!(
        new(&|c| c.max_transmissions = 0),
        Some(ConfigError::MaxTransmissions(0))
    );
    assert_eq!(
        new(&|c| c.max_queued_packets = 0),
        Some(ConfigError::MaxQueuedPackets(0))
    );
    assert_eq!(new(&|_| {}), None);
}

#[test]
fn reattach_retries_its_server_after_backoff_then_fails_over() {
    let (a, b) = (server(1, Transport::TCP), server(2, Transport::TCP));
    let mut h = Harness::with_servers(vec![a, b]);
    h.take_events();
    h.connect(30_000);
    h.client.handle_input(h.now, Input::TransportLost);
    h.drain();
    assert_eq!(
        h.take_events(),
        [
            ClientEvent::TransportLost,
            ClientEvent::OpenTransport { server: a },
        ]
    );
    h.client.handle_input(h.now, Input::TransportFailed);
    h.drain();
    assert_eq!(
        h.take_events(),
        [ClientEvent::ConnectFailed {
            server: a,
            result: None
        }]
    );
    h.advance(ms(100));
    assert_eq!(h.take_events(), [ClientEvent::OpenTransport { server: a }]);
    h.client.handle_input(h.now, Input::TransportFailed);
    h.drain();
    assert_eq!(
        h.take_events(),
        [
            ClientEvent::ConnectFailed {
                server: a,
                result: None
            },
            ClientEvent::OpenTransport { server: b },
        ]
    );
    assert_eq!(h.client.state(), ClientState::Reattaching);
    // B does not know the tunnel: a fresh one there.
    h.open();
    let request = h.take_control();
    assert_eq!(decode(&request).tlvs.tunnel_id, Some(TUNNEL));
    h.deliver(&error_response(&request, ResultCode::TUNNEL_NOT_FOUND));
    let fresh = h.take_control();
    let seq = decode(&fresh).header.sequence;
    h.deliver(&config_response(seq, 5, PEER, 30_000));
    assert!(matches!(
        h.take_events().as_slice(),
        [ClientEvent::TunnelClosed { .. }, ClientEvent::Connected(info)] if info.server == b
    ));
}

// ---- keyed control (docs/PROTOCOL.md §3.3, §3.4, §4.4) ----

#[test]
fn forged_server_requests_are_dropped_once_the_tunnel_is_keyed() {
    let mut h = Harness::with_servers(vec![udp()]);
    h.take_events();
    h.connect(30_000);
    // A peer introduction, a release and a keepalive, without the director's integrity.
    let mut intro = Message::new(MessageType::CLIENT_SERVICE_REQUEST, 0x8000_0100, TUNNEL);
    intro.tlvs.service_type = Some(crate::wire::ServiceType::PEER);
    intro.tlvs.service_action = Some(crate::wire::ServiceAction::ESTABLISH);
    intro.tlvs.peer_internal_address = Some(IpAddr::V4(PEER));
    let mut release = Message::new(
        MessageType::CONFIGURATION_RELEASE_NOTIFICATION,
        0x8000_0101,
        TUNNEL,
    );
    release.tlvs.result_code = Some(ResultCode::ADMINISTRATIVE);
    let keepalive = Message::new(MessageType::KEEPALIVE, 0x8000_0102, TUNNEL);
    for forged in [&intro, &release, &keepalive] {
        h.deliver_raw(&encode(forged));
    }
    // Signed with another key, or the client's own (reflected), it is no better.
    let other = ControlKey::new(&[0x99; 32]);
    let mut signed = Vec::new();
    release
        .encode_envelope_with_integrity(&other.director_to_client(), &mut signed)
        .expect("fits");
    h.deliver_raw(&signed);
    signed.clear();
    release
        .encode_envelope_with_integrity(&ControlKey::new(&KEY).client_to_director(), &mut signed)
        .expect("fits");
    h.deliver_raw(&signed);
    assert!(h.take_sent().is_empty(), "nothing answered");
    assert!(h.take_events().is_empty());
    assert_eq!(h.client.stats().dropped_unauthenticated, 5);
    assert_eq!(h.client.state(), ClientState::Connected);
    // The director's own request is answered, signed.
    h.deliver(&encode(&keepalive));
    let answer = h.take_control();
    assert!(ControlKey::new(&KEY).verify_from_client(&answer[3..]));
}

#[test]
fn everything_the_client_sends_on_its_tunnel_is_signed() {
    let mut h = Harness::with_servers(vec![udp()]);
    h.take_events();
    h.connect(1000);
    let key = ControlKey::new(&KEY);
    h.advance(ms(1000));
    let keepalive = h.take_control();
    assert_eq!(
        decode(&keepalive).header.message_type,
        MessageType::KEEPALIVE
    );
    assert!(key.verify_from_client(&keepalive[3..]));
    h.deliver(&error_response(&keepalive, ResultCode::SUCCESS));
    h.client.release(h.now);
    h.drain();
    let release = h.take_control();
    assert!(key.verify_from_client(&release[3..]));
    // The retransmission is the same signed octets.
    h.advance(ms(250));
    assert_eq!(h.take_control(), release);
}

#[test]
fn a_configuration_response_must_answer_our_request() {
    let mut h = Harness::with_servers(vec![udp(), tcp()]);
    h.take_events();
    h.open();
    let request = h.take_control();
    let seq = decode(&request).header.sequence;
    // Another nonce: not an answer to this request.
    let mut wrong = Message::new(MessageType::CONFIGURATION_RESPONSE, seq, TUNNEL);
    wrong.tlvs.result_code = Some(ResultCode::SUCCESS);
    wrong.tlvs.client_nonce = Some([0x55; 16]);
    wrong.tlvs.control_key = Some([0x55; 32]);
    wrong.tlvs.internal_ipv4 = Some(InternalAddress {
        addr: ADDR,
        prefix_len: 16,
    });
    h.deliver(&encode(&wrong));
    assert_eq!(h.client.stats().dropped_unbound_response, 1);
    // Ours, but its key does not sign it: not a tunnel.
    let mut unsigned = Vec::new();
    let mut bound = wrong.clone();
    bound.tlvs.client_nonce = h.configuration.map(|(n, _)| n);
    bound.encode_envelope(&mut unsigned).expect("fits");
    h.deliver_raw(&unsigned);
    assert_eq!(h.client.stats().dropped_invalid_configuration, 1);
    assert_eq!(h.client.state(), ClientState::Connecting);
    // A director that does not know the Client Nonce refuses it as unknown: next server.
    let old = encode(&Message::response_to(
        &decode(&request).header,
        ResultCode::UNKNOWN_CRITICAL_TLV,
    ));
    h.deliver_raw(&old);
    assert_eq!(
        h.take_events(),
        [
            ClientEvent::ConnectFailed {
                server: udp(),
                result: Some(ResultCode::UNKNOWN_CRITICAL_TLV)
            },
            ClientEvent::CloseTransport,
            ClientEvent::OpenTransport { server: tcp() },
        ]
    );
}

#[test]
fn tunnel_not_found_to_a_keepalive_reattaches_in_place_before_giving_up() {
    let mut h = Harness::with_servers(vec![udp()]);
    h.take_events();
    h.connect(1000);
    h.advance(ms(1000));
    let keepalive = h.take_control();
    // Unsigned: a director without the tunnel has no key.
    h.deliver_raw(&error_response(&keepalive, ResultCode::TUNNEL_NOT_FOUND));
    assert!(
        h.take_events().is_empty(),
        "no transport loss, nothing given up"
    );
    let reattach = h.take_control();
    let msg = decode(&reattach);
    assert_eq!(msg.header.message_type, MessageType::CONFIGURATION_REQUEST);
    assert_eq!(msg.tlvs.tunnel_id, Some(TUNNEL));
    assert!(ControlKey::new(&KEY).verify_from_client(&reattach[3..]));
    assert_eq!(h.client.state(), ClientState::Reattaching);
    h.deliver(&config_response(msg.header.sequence, TUNNEL, ADDR, 1000));
    assert!(matches!(
        h.take_events().as_slice(),
        [ClientEvent::Reattached(info)] if info.tunnel_id == TUNNEL
    ));
    assert_eq!(h.client.stats().tunnel_not_found_reattaches, 1);
    // When the re-attach is refused too, the tunnel is gone: said, and a fresh one asked for.
    h.advance(ms(1000));
    let keepalive = h.take_control();
    h.deliver_raw(&error_response(&keepalive, ResultCode::TUNNEL_NOT_FOUND));
    let reattach = h.take_control();
    h.deliver(&error_response(&reattach, ResultCode::TUNNEL_NOT_FOUND));
    assert_eq!(
        h.take_events(),
        [ClientEvent::TunnelClosed {
            reason: ResultCode::TUNNEL_NOT_FOUND
        }]
    );
    let fresh = decode(&h.take_control()).tlvs.tunnel_id;
    assert_eq!(fresh, None);
}

#[test]
fn after_a_silence_a_udp_client_proves_its_address_before_its_data() {
    let mut h = Harness::with_servers(vec![udp()]);
    h.take_events();
    h.connect(30_000);
    let packet = udp_packet(ADDR, PEER, b"media");
    // Heard just now: data alone.
    h.client.send_ip(h.now, &packet).expect("queued");
    h.drain();
    assert_eq!(h.take_sent(), [data_envelope(&packet)]);
    // Half a second of silence: a keepalive first, then the data.
    h.advance(ms(500));
    h.client.send_ip(h.now, &packet).expect("queued");
    h.drain();
    let sent = h.take_sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(decode(&sent[0]).header.message_type, MessageType::KEEPALIVE);
    assert_eq!(sent[1], data_envelope(&packet));
    assert_eq!(h.client.stats().roaming_probes, 1);
    // While it is out, and once answered, data goes alone.
    h.client.send_ip(h.now, &packet).expect("queued");
    h.drain();
    assert_eq!(h.take_sent().len(), 1);
    h.deliver(&error_response(&sent[0], ResultCode::SUCCESS));
    h.client.send_ip(h.now, &packet).expect("queued");
    h.drain();
    assert_eq!(h.take_sent().len(), 1);
    assert_eq!(h.client.stats().roaming_probes, 1);

    // Not over a stream transport, whose connection is the client's address.
    let mut h = Harness::with_servers(vec![tcp()]);
    h.take_events();
    h.connect(30_000);
    h.advance(ms(5000));
    h.client.send_ip(h.now, &packet).expect("queued");
    h.drain();
    assert_eq!(h.take_sent(), [data_envelope(&packet)]);
}

#[test]
fn a_server_request_whose_answer_is_forgotten_is_a_replay() {
    let mut h = Harness::with_servers(vec![udp()]);
    h.take_events();
    h.connect(30_000);
    let first = encode(&Message::new(MessageType::KEEPALIVE, 0x8000_0010, TUNNEL));
    h.deliver(&first);
    h.take_control();
    for seq in 0x8000_0011..0x8000_0015 {
        h.deliver(&encode(&Message::new(MessageType::KEEPALIVE, seq, TUNNEL)));
        h.take_control();
    }
    // Four answers later, the first is no longer remembered.
    h.deliver(&first);
    assert!(h.take_sent().is_empty());
    assert_eq!(h.client.stats().dropped_replayed, 1);
}
