//! The peer agent against a scripted fake server and a fake peer.

use super::*;
use crate::stun;
use crate::wire::{
    Candidate, CandidateKind, PeerCredentials, PeerServiceResult, ServiceAction, ServiceType,
};

const LOCAL: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10)), 5000);
const STUN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 4001);
const PUBLIC: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5)), 6000);
const REMOTE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9)), 5000);
const TOKEN: [u8; 16] = *b"one-time token!!";

impl Harness {
    /// A datagram on the peer socket from `from`, at the current time.
    fn peer_datagram(&mut self, from: SocketAddr, datagram: &[u8]) {
        let input = Input::PeerDatagram { from, datagram };
        self.client.handle_input(self.now, input);
    }

    /// A peer stream the runtime accepted, at the current time.
    fn peer_stream_accepted(&mut self, stream: PeerStreamId, remote: SocketAddr) {
        let input = Input::PeerStreamAccepted { stream, remote };
        self.client.handle_input(self.now, input);
    }

    /// An envelope on a peer stream, at the current time.
    fn peer_stream_envelope(&mut self, stream: PeerStreamId, envelope: &[u8]) {
        let input = Input::PeerStreamEnvelope { stream, envelope };
        self.client.handle_input(self.now, input);
    }

    /// A datagram a peer session carried, at the current time.
    fn peer_session_datagram(&mut self, path: SocketAddr, datagram: &[u8]) {
        let input = Input::PeerSessionDatagram { path, datagram };
        self.client.handle_input(self.now, input);
    }
}

/// A connected peer-enabled client whose NAT discovery has finished; returns it with the
/// Announce it sent.
fn peer_client() -> (Harness, Vec<u8>) {
    peer_client_with(|_| {})
}

/// [`peer_client`] with its peer configuration adjusted by `adjust`.
fn peer_client_with(adjust: impl FnOnce(&mut PeerConfig)) -> (Harness, Vec<u8>) {
    let mut config = ClientConfig::new(vec![udp()]);
    let mut peer = PeerConfig::new(vec![LOCAL], vec![STUN]);
    adjust(&mut peer);
    config.peer = Some(peer);
    let mut h = Harness::new(config);
    h.take_events();
    h.open();
    let request = h.take_control();
    let msg = decode(&request);
    let caps = msg.tlvs.client_capabilities.expect("capabilities");
    assert!(caps.contains(Capabilities::PEER_TUNNELING));
    let seq = msg.header.sequence;
    h.deliver(&config_response(seq, TUNNEL, ADDR, 30_000));
    // Discovery: one Binding request to the STUN server from the peer socket.
    let (to, binding) = h.peer_sent.pop().expect("a STUN request");
    assert_eq!(to, STUN);
    assert!(stun::is_stun(&binding));
    let mut answer = Vec::new();
    stun::answer_binding_request(&binding, PUBLIC, &mut answer).expect("valid request");
    h.peer_datagram(STUN, &answer);
    h.drain();
    assert!(h.take_events().contains(&ClientEvent::NatDiscovered {
        public: Some(PUBLIC),
        varies_by_destination: None,
    }));
    let announce = h.take_control();
    (h, announce)
}

fn signed(msg: &Message<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    msg.encode_envelope_with_integrity(&TOKEN, &mut out)
        .expect("encodable");
    out
}

fn payload(envelope: &[u8]) -> &[u8] {
    Envelope::decode_datagram(envelope)
        .expect("envelope")
        .payload
}

fn media(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    udp_packet(src, dst, b"media")
}

#[test]
fn announces_host_and_server_reflexive_candidates() {
    let (_, announce) = peer_client();
    let msg = decode(&announce);
    assert_eq!(msg.header.message_type, MessageType::CLIENT_SERVICE_REQUEST);
    assert_eq!(msg.header.tunnel_id, TUNNEL);
    assert_eq!(msg.tlvs.service_type, Some(ServiceType::PEER));
    assert_eq!(msg.tlvs.service_action, Some(ServiceAction::ANNOUNCE));
    let kinds: Vec<_> = msg
        .tlvs
        .candidates
        .iter()
        .map(|c| (c.kind, c.addr))
        .collect();
    assert_eq!(
        kinds,
        [
            (CandidateKind::HOST, LOCAL),
            (CandidateKind::SERVER_REFLEXIVE, PUBLIC)
        ]
    );
    assert_eq!(msg.tlvs.connection_info.map(|c| c.addr), Some(LOCAL));
}

#[test]
fn opted_out_flows_never_ask_for_a_peer_tunnel() {
    let (mut h, _) = peer_client();
    h.client.send_ip(h.now, &media(ADDR, PEER)).expect("queued");
    h.drain();
    let sent = h.take_sent();
    assert_eq!(sent.len(), 1, "the packet only");
    assert_eq!(sent[0][0], EnvelopeType::DATA.0);
    assert!(h.client.peer_tunnels().is_empty());
}

#[test]
fn initiator_probes_nominates_and_moves_the_flow() {
    let (mut h, _) = peer_client();
    h.client.set_peer_tunneling(5004, true);
    h.client.send_ip(h.now, &media(ADDR, PEER)).expect("queued");
    h.drain();
    // The packet goes through the relay; the request goes with it.
    let sent = h.take_sent();
    assert_eq!(sent.len(), 2);
    let request = sent
        .iter()
        .find(|b| b[0] == EnvelopeType::CONTROL.0)
        .expect("a request");
    let msg = decode(request);
    assert_eq!(msg.tlvs.service_action, Some(ServiceAction::ESTABLISH));
    assert_eq!(msg.tlvs.peer_internal_address, Some(IpAddr::V4(PEER)));

    // The director's answer: Available, with the peer's candidate and the token.
    let mut answer = Message::response_to(&msg.header, ResultCode::SUCCESS);
    answer.tlvs.service_type = Some(ServiceType::PEER);
    answer.tlvs.peer_service_result = Some(PeerServiceResult::AVAILABLE);
    answer.tlvs.candidates.push(Candidate {
        kind: CandidateKind::HOST,
        transport: Transport::UDP,
        addr: REMOTE,
    });
    answer.tlvs.peer_credentials = Some(PeerCredentials {
        token: TOKEN,
        fingerprint: None,
    });
    h.advance(ms(40));
    h.deliver(&encode(&answer));
    let (to, probe) = h.peer_sent.pop().expect("a probe");
    assert_eq!(to, REMOTE);
    assert!(Message::verify_integrity(payload(&probe), &TOKEN));
    let probe_msg = decode(&probe);
    assert_eq!(probe_msg.header.message_type, MessageType::PEER_PROBE);
    assert_eq!(probe_msg.tlvs.peer_internal_address, Some(IpAddr::V4(ADDR)));

    // A forged response is dropped; a real one nominates the path.
    let mut response = Message::response_to(&probe_msg.header, ResultCode::SUCCESS);
    response.tlvs.peer_internal_address = Some(IpAddr::V4(PEER));
    response.tlvs.observed_address = Some(PUBLIC);
    let mut forged = Vec::new();
    response
        .encode_envelope_with_integrity(&[0; 16], &mut forged)
        .expect("encodable");
    h.peer_datagram(REMOTE, &forged);
    assert_eq!(h.client.stats().peer.integrity_failures, 1);
    h.peer_datagram(REMOTE, &signed(&response));
    h.drain();
    let (to, config) = h.peer_sent.pop().expect("a Configuration Request");
    assert_eq!(to, REMOTE);
    let config_msg = decode(&config);
    assert_eq!(
        config_msg.header.message_type,
        MessageType::CONFIGURATION_REQUEST
    );
    assert!(Message::verify_integrity(payload(&config), &TOKEN));
    // It is retransmitted until answered.
    h.advance(ms(260));
    assert_eq!(h.peer_sent.pop().map(|(_, b)| b), Some(config.clone()));

    let mut done = Message::response_to(&config_msg.header, ResultCode::SUCCESS);
    done.header.tunnel_id = 77;
    done.tlvs.peer_internal_address = Some(IpAddr::V4(PEER));
    h.peer_datagram(REMOTE, &signed(&done));
    h.drain();
    let up = h.take_events();
    // The peer saw our probe come from our server-reflexive address (PUBLIC), and REMOTE is
    // the host candidate it announced.
    assert!(
        matches!(up.as_slice(), [ClientEvent::PeerTunnelUp {
            peer,
            path,
            initiator: true,
            local_kind: Some(CandidateKind::SERVER_REFLEXIVE),
            remote_kind: Some(CandidateKind::HOST),
            ..
        }] if *peer == IpAddr::V4(PEER) && *path == REMOTE),
        "{up:?}"
    );
    assert_eq!(h.client.peer_path(IpAddr::V4(PEER)), PeerPath::Peer(REMOTE));

    // Opted-in packets now take the peer path; others stay on the relay.
    h.peer_sent.clear();
    h.take_sent();
    h.client.send_ip(h.now, &media(ADDR, PEER)).expect("sent");
    h.drain();
    assert_eq!(h.peer_sent.len(), 1);
    // The server's maximum holds on the peer tunnel too, so a flow that falls back to the
    // relay keeps working.
    let big = udp_packet(ADDR, PEER, &vec![0; usize::from(MAX_PACKET) - 27]);
    assert!(matches!(
        h.client.send_ip(h.now, &big),
        Err(SendError::TooLarge { .. })
    ));
    h.drain();
    assert_eq!(h.peer_sent.len(), 1);
    assert_eq!(h.peer_sent[0].1[0], EnvelopeType::DATA.0);
    assert!(h.take_sent().is_empty());
    // Data from the peer on the path is received; from elsewhere it is dropped.
    let inbound = data_envelope(&media(PEER, ADDR));
    h.peer_datagram(PUBLIC, &inbound);
    assert_eq!(h.client.stats().peer.dropped_bad_data, 1);
    h.peer_datagram(REMOTE, &inbound);
    let mut got = Vec::new();
    assert!(h.client.recv_ip(&mut got));
    assert_eq!(got, media(PEER, ADDR));

    // Silence: back on the relay.
    h.take_sent();
    h.advance(ms(1600));
    assert!(h.take_events().iter().any(|e| matches!(
        e,
        ClientEvent::PeerTunnelDown {
            reason: PeerDownReason::Silence,
            ..
        }
    )));
    assert_eq!(h.client.peer_path(IpAddr::V4(PEER)), PeerPath::Relay);
    // The relay reaches us only through the server transport's NAT mapping, which the peer
    // tunnel's traffic did not keep: a keepalive refreshes it at once, though the keepalive
    // interval (30 s) is far off and we have no data to send.
    let sent: Vec<MessageType> = h.take_sent().iter().filter_map(|e| decode_any(e)).collect();
    let keepalives = sent.iter().filter(|t| **t == MessageType::KEEPALIVE);
    assert_eq!(keepalives.count(), 1, "{sent:?}");
    assert_eq!(h.client.stats().server_path_refreshes, 1);
    // Our NAT may have given us a new mapping too: NAT discovery runs again, so that the next
    // negotiation announces the mapping we have now.
    assert_eq!(h.client.stats().peer.rediscoveries, 1);
    assert!(h
        .peer_sent
        .iter()
        .any(|(to, d)| *to == STUN && stun::is_stun(d)));
}

#[test]
fn destination_answers_probes_and_ignores_unsigned_configuration() {
    let (mut h, _) = peer_client();
    // The director forwards a request from PEER.
    let mut forward = Message::new(MessageType::CLIENT_SERVICE_REQUEST, 0x8000_0010, TUNNEL);
    forward.tlvs.service_type = Some(ServiceType::PEER);
    forward.tlvs.service_action = Some(ServiceAction::ESTABLISH);
    forward.tlvs.peer_internal_address = Some(IpAddr::V4(PEER));
    forward.tlvs.candidates.push(Candidate {
        kind: CandidateKind::SERVER_REFLEXIVE,
        transport: Transport::UDP,
        addr: REMOTE,
    });
    forward.tlvs.peer_credentials = Some(PeerCredentials {
        token: TOKEN,
        fingerprint: None,
    });
    h.deliver(&encode(&forward));
    let answer = h.take_control();
    let msg = decode(&answer);
    assert_eq!(msg.tlvs.result_code, Some(ResultCode::SUCCESS));
    assert_eq!(
        msg.tlvs.peer_service_result,
        Some(PeerServiceResult::AVAILABLE)
    );
    assert_eq!(msg.tlvs.candidates.len(), 2);
    assert_eq!(msg.tlvs.peer_internal_address, Some(IpAddr::V4(PEER)));
    // Probing starts at once.
    assert_eq!(h.peer_sent.pop().map(|(to, _)| to), Some(REMOTE));

    // A probe from an address never announced is answered there (peer-reflexive).
    let elsewhere = SocketAddr::from(([198, 51, 100, 9], 41_000));
    let mut probe = Message::new(MessageType::PEER_PROBE, 5, 0);
    probe.tlvs.peer_internal_address = Some(IpAddr::V4(PEER));
    h.peer_datagram(elsewhere, &signed(&probe));
    h.drain();
    let (to, reply) = h.peer_sent.pop().expect("a probe response");
    assert_eq!(to, elsewhere);
    let reply_msg = decode(&reply);
    assert_eq!(reply_msg.tlvs.observed_address, Some(elsewhere));
    assert!(Message::verify_integrity(payload(&reply), &TOKEN));

    // Without valid integrity: no answer, counted, nothing changes.
    let mut config = Message::new(MessageType::CONFIGURATION_REQUEST, 6, 0);
    config.tlvs.peer_internal_address = Some(IpAddr::V4(PEER));
    h.peer_sent.clear();
    h.peer_datagram(elsewhere, &encode(&config));
    h.drain();
    assert!(h.peer_sent.is_empty(), "{:?}", h.peer_sent);
    assert_eq!(h.client.stats().peer.integrity_failures, 1);
    assert_eq!(h.client.peer_path(IpAddr::V4(PEER)), PeerPath::Relay);

    // Signed: up on that address, answered with a tunnel id; a duplicate gets the same answer.
    h.peer_datagram(elsewhere, &signed(&config));
    h.drain();
    let (_, accepted) = h.peer_sent.pop().expect("an answer");
    let accepted_msg = decode(&accepted);
    assert_eq!(accepted_msg.tlvs.result_code, Some(ResultCode::SUCCESS));
    assert_ne!(accepted_msg.header.tunnel_id, 0);
    assert!(Message::verify_integrity(payload(&accepted), &TOKEN));
    assert_eq!(
        h.client.peer_path(IpAddr::V4(PEER)),
        PeerPath::Peer(elsewhere)
    );
    h.peer_datagram(elsewhere, &signed(&config));
    h.drain();
    assert_eq!(h.peer_sent.pop().map(|(_, b)| b), Some(accepted));

    // The director's release notice removes it.
    let mut notice = Message::new(MessageType::CLIENT_SERVICE_REQUEST, 0x8000_0011, TUNNEL);
    notice.tlvs.service_type = Some(ServiceType::PEER);
    notice.tlvs.service_action = Some(ServiceAction::RELEASE);
    notice.tlvs.peer_internal_address = Some(IpAddr::V4(PEER));
    h.take_events();
    h.deliver(&encode(&notice));
    assert_eq!(
        decode(&h.take_control()).tlvs.result_code,
        Some(ResultCode::SUCCESS)
    );
    assert!(h.take_events().contains(&ClientEvent::PeerTunnelDown {
        peer: IpAddr::V4(PEER),
        reason: PeerDownReason::PeerServerTunnelGone,
    }));
    assert_eq!(h.client.peer_path(IpAddr::V4(PEER)), PeerPath::Relay);
}

#[test]
fn garbage_on_the_peer_socket_is_counted() {
    let (mut h, _) = peer_client();
    for datagram in [
        &[][..],
        &[0x17, 1, 2],
        &[0x05, 0, 3],
        &[0x04, 0, 4, 0x45],
        &[0xff; 40],
    ] {
        h.peer_datagram(REMOTE, datagram);
    }
    let stats = h.client.stats().peer;
    assert_eq!(
        stats.dropped_not_tscf + stats.dropped_bad_control + stats.dropped_bad_data,
        5
    );
    h.drain();
    assert!(h.peer_sent.is_empty());
}

#[test]
fn a_policy_may_keep_the_peer_tunnel_when_the_peer_server_tunnel_goes() {
    let (mut h, _) = peer_client_with(|p| p.keep_on_peer_server_tunnel_loss = true);
    let mut forward = Message::new(MessageType::CLIENT_SERVICE_REQUEST, 0x8000_0010, TUNNEL);
    forward.tlvs.service_type = Some(ServiceType::PEER);
    forward.tlvs.service_action = Some(ServiceAction::ESTABLISH);
    forward.tlvs.peer_internal_address = Some(IpAddr::V4(PEER));
    forward.tlvs.peer_credentials = Some(PeerCredentials {
        token: TOKEN,
        fingerprint: None,
    });
    h.deliver(&encode(&forward));
    h.take_control();
    let mut config = Message::new(MessageType::CONFIGURATION_REQUEST, 6, 0);
    config.tlvs.peer_internal_address = Some(IpAddr::V4(PEER));
    h.peer_datagram(REMOTE, &signed(&config));
    h.drain();
    assert_eq!(h.client.peer_path(IpAddr::V4(PEER)), PeerPath::Peer(REMOTE));

    let mut notice = Message::new(MessageType::CLIENT_SERVICE_REQUEST, 0x8000_0011, TUNNEL);
    notice.tlvs.service_type = Some(ServiceType::PEER);
    notice.tlvs.service_action = Some(ServiceAction::RELEASE);
    notice.tlvs.peer_internal_address = Some(IpAddr::V4(PEER));
    h.take_events();
    h.deliver(&encode(&notice));
    assert_eq!(
        decode(&h.take_control()).tlvs.result_code,
        Some(ResultCode::SUCCESS),
        "the notice is still acknowledged"
    );
    assert!(!h
        .take_events()
        .iter()
        .any(|e| matches!(e, ClientEvent::PeerTunnelDown { .. })));
    assert_eq!(h.client.peer_path(IpAddr::V4(PEER)), PeerPath::Peer(REMOTE));
}

// ---- peer streams (§7.7) ----

const STREAM_REMOTE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9)), 7000);
const FINGERPRINT: [u8; 32] = [0xf1; 32];

/// The initiator, its Establish answered with a UDP and a TLS candidate of the peer.
fn initiator_with_stream_candidates() -> Harness {
    let (mut h, _) = peer_client();
    h.client.set_peer_tunneling(5004, true);
    h.client.send_ip(h.now, &media(ADDR, PEER)).expect("queued");
    h.drain();
    let sent = h.take_sent();
    let request = sent
        .iter()
        .find(|b| b[0] == EnvelopeType::CONTROL.0)
        .expect("a request");
    let msg = decode(request);
    let mut answer = Message::response_to(&msg.header, ResultCode::SUCCESS);
    answer.tlvs.service_type = Some(ServiceType::PEER);
    answer.tlvs.peer_service_result = Some(PeerServiceResult::AVAILABLE);
    for (transport, addr) in [(Transport::UDP, REMOTE), (Transport::TLS, STREAM_REMOTE)] {
        answer.tlvs.candidates.push(Candidate {
            kind: CandidateKind::HOST,
            transport,
            addr,
        });
    }
    answer.tlvs.peer_credentials = Some(PeerCredentials {
        token: TOKEN,
        fingerprint: Some(FINGERPRINT),
    });
    h.deliver(&encode(&answer));
    h.take_events();
    h
}

fn open_request(
    events: &[ClientEvent],
) -> Option<(PeerStreamId, SocketAddr, Transport, Option<[u8; 32]>)> {
    events.iter().find_map(|e| match e {
        ClientEvent::OpenPeerStream {
            stream,
            addr,
            transport,
            fingerprint,
            ..
        } => Some((*stream, *addr, *transport, *fingerprint)),
        _ => None,
    })
}

#[test]
fn initiator_falls_back_to_a_pinned_stream_when_udp_is_silent() {
    let mut h = initiator_with_stream_candidates();
    // UDP probing first; no stream before the fallback delay.
    h.advance(ms(450));
    assert!(open_request(&h.take_events()).is_none());
    h.advance(ms(100));
    let (stream, addr, transport, fingerprint) =
        open_request(&h.take_events()).expect("a stream is asked for");
    assert_eq!(
        (addr, transport, fingerprint),
        (STREAM_REMOTE, Transport::TLS, Some(FINGERPRINT))
    );
    assert_ne!(stream.0 & PeerStreamId::CLIENT_CHOSEN, 0);

    // Open: the signed Configuration Request goes on the stream, once.
    h.client.handle_input(h.now, Input::PeerStreamOpen(stream));
    h.drain();
    let (on, config) = h.stream_sent.pop().expect("a Configuration Request");
    assert_eq!(on, stream);
    let config_msg = decode(&config);
    assert_eq!(
        config_msg.header.message_type,
        MessageType::CONFIGURATION_REQUEST
    );
    assert!(Message::verify_integrity(payload(&config), &TOKEN));
    h.advance(ms(300));
    assert!(h.stream_sent.iter().all(|(_, b)| b != &config));

    let mut done = Message::response_to(&config_msg.header, ResultCode::SUCCESS);
    done.header.tunnel_id = 78;
    done.tlvs.peer_internal_address = Some(IpAddr::V4(PEER));
    // The same answer over UDP is not for this path.
    h.peer_datagram(REMOTE, &signed(&done));
    h.peer_stream_envelope(stream, &signed(&done));
    h.drain();
    assert!(h.take_events().iter().any(|e| matches!(
        e,
        ClientEvent::PeerTunnelUp { path, initiator: true, .. } if *path == STREAM_REMOTE
    )));
    assert_eq!(
        h.client.peer_path(IpAddr::V4(PEER)),
        PeerPath::Stream {
            stream,
            addr: STREAM_REMOTE
        }
    );

    // Data and keepalives take the stream.
    h.stream_sent.clear();
    h.client.send_ip(h.now, &media(ADDR, PEER)).expect("sent");
    h.drain();
    assert_eq!(h.stream_sent.len(), 1);
    assert_eq!(h.stream_sent[0].1[0], EnvelopeType::DATA.0);
    h.peer_stream_envelope(stream, &data_envelope(&media(PEER, ADDR)));
    let mut got = Vec::new();
    assert!(h.client.recv_ip(&mut got));
    h.advance(ms(510));
    assert!(h
        .stream_sent
        .iter()
        .any(|(_, b)| decode_any(b) == Some(MessageType::KEEPALIVE)));

    // The stream breaks: back on the relay.
    h.client.handle_input(h.now, Input::PeerStreamLost(stream));
    h.drain();
    assert!(h.take_events().contains(&ClientEvent::PeerTunnelDown {
        peer: IpAddr::V4(PEER),
        reason: PeerDownReason::StreamLost,
    }));
    assert_eq!(h.client.peer_path(IpAddr::V4(PEER)), PeerPath::Relay);
}

fn decode_any(envelope: &[u8]) -> Option<MessageType> {
    let env = Envelope::decode_datagram(envelope).ok()?;
    (env.kind == EnvelopeType::CONTROL)
        .then(|| {
            Message::decode(env.payload)
                .ok()
                .map(|m| m.header.message_type)
        })
        .flatten()
}

#[test]
fn a_failed_stream_leaves_the_flow_on_the_relay() {
    let mut h = initiator_with_stream_candidates();
    h.advance(ms(550));
    let (stream, ..) = open_request(&h.take_events()).expect("a stream");
    h.client
        .handle_input(h.now, Input::PeerStreamFailed(stream));
    h.drain();
    assert_eq!(h.client.stats().peer.stream_failures, 1);
    // No other stream candidate: it stays on the relay until the setup times out.
    h.advance(ms(3000));
    let events = h.take_events();
    assert!(open_request(&events).is_none());
    assert!(events.iter().any(|e| matches!(
        e,
        ClientEvent::PeerTunnelDown {
            reason: PeerDownReason::EstablishTimeout,
            ..
        }
    )));
    assert_eq!(h.client.peer_path(IpAddr::V4(PEER)), PeerPath::Relay);
}

#[test]
fn destination_announces_stream_listeners_and_answers_on_an_accepted_stream() {
    let listener = SocketAddr::from(([192, 168, 1, 10], 7001));
    let (mut h, announce) = peer_client_with(|p| {
        p.stream_listeners = vec![(Transport::TCP, listener)];
        p.certificate_fingerprint = Some(FINGERPRINT);
    });
    let msg = decode(&announce);
    assert!(msg
        .tlvs
        .candidates
        .iter()
        .any(|c| c.kind == CandidateKind::HOST
            && c.transport == Transport::TCP
            && c.addr == listener));
    assert_eq!(msg.tlvs.certificate_fingerprint, Some(FINGERPRINT));

    let mut forward = Message::new(MessageType::CLIENT_SERVICE_REQUEST, 0x8000_0010, TUNNEL);
    forward.tlvs.service_type = Some(ServiceType::PEER);
    forward.tlvs.service_action = Some(ServiceAction::ESTABLISH);
    forward.tlvs.peer_internal_address = Some(IpAddr::V4(PEER));
    forward.tlvs.peer_credentials = Some(PeerCredentials {
        token: TOKEN,
        fingerprint: None,
    });
    h.deliver(&encode(&forward));
    let answer = decode(&h.take_control()).tlvs.certificate_fingerprint;
    assert_eq!(answer, Some(FINGERPRINT));

    let stream = PeerStreamId(1);
    h.peer_stream_accepted(stream, STREAM_REMOTE);
    let mut config = Message::new(MessageType::CONFIGURATION_REQUEST, 6, 0);
    config.tlvs.peer_internal_address = Some(IpAddr::V4(PEER));
    h.peer_stream_envelope(stream, &encode(&config));
    h.drain();
    assert!(
        h.stream_sent.is_empty(),
        "an unsigned request gets no answer"
    );
    h.peer_stream_envelope(stream, &signed(&config));
    h.drain();
    let (_, accepted) = h.stream_sent.pop().expect("an answer");
    assert_eq!(
        decode(&accepted).tlvs.result_code,
        Some(ResultCode::SUCCESS)
    );
    assert!(Message::verify_integrity(payload(&accepted), &TOKEN));
    assert_eq!(
        h.client.peer_path(IpAddr::V4(PEER)),
        PeerPath::Stream {
            stream,
            addr: STREAM_REMOTE
        }
    );
    // Identified: it is not closed for idling.
    h.take_events();
    h.advance(ms(1000));
    assert!(!h
        .take_events()
        .contains(&ClientEvent::ClosePeerStream { stream }));
}

#[test]
fn silent_and_excess_accepted_streams_are_closed() {
    let (mut h, _) = peer_client();
    h.peer_stream_accepted(PeerStreamId(PeerStreamId::CLIENT_CHOSEN), REMOTE);
    for n in 0..17 {
        h.peer_stream_accepted(PeerStreamId(n), REMOTE);
    }
    h.peer_stream_envelope(PeerStreamId(3), &[0xff; 20]);
    h.drain();
    let closed = |events: &[ClientEvent]| {
        events
            .iter()
            .filter(|e| matches!(e, ClientEvent::ClosePeerStream { .. }))
            .count()
    };
    assert_eq!(closed(&h.take_events()), 2, "a bad id and the 17th");
    let stats = h.client.stats().peer;
    assert_eq!((stats.streams_refused, stats.streams_accepted), (2, 16));
    assert_eq!(stats.dropped_not_tscf, 1);
    h.advance(ms(3001));
    assert_eq!(closed(&h.take_events()), 16);
    assert_eq!(h.client.stats().peer.streams_idle_closed, 16);
    h.peer_stream_envelope(PeerStreamId(3), &data_envelope(&media(PEER, ADDR)));
    assert_eq!(h.client.stats().peer.dropped_unknown_stream, 1);
}

#[test]
fn a_secured_destination_authorises_probes_and_configures_only_inside_the_session() {
    const CERT: [u8; 32] = [7; 32];
    const PEER_CERT: [u8; 32] = [9; 32];
    let (mut h, _) = peer_client_with(|p| {
        p.transport = Transport::QUIC;
        p.certificate_fingerprint = Some(CERT);
    });
    // The director forwards a request from PEER, which offers QUIC too.
    let mut forward = Message::new(MessageType::CLIENT_SERVICE_REQUEST, 0x8000_0020, TUNNEL);
    forward.tlvs.service_type = Some(ServiceType::PEER);
    forward.tlvs.service_action = Some(ServiceAction::ESTABLISH);
    forward.tlvs.peer_internal_address = Some(IpAddr::V4(PEER));
    forward.tlvs.candidates.push(Candidate {
        kind: CandidateKind::HOST,
        transport: Transport::UDP,
        addr: REMOTE,
    });
    forward.tlvs.connection_info = Some(crate::wire::ConnectionInfo {
        transport: Transport::QUIC,
        addr: REMOTE,
    });
    forward.tlvs.peer_credentials = Some(PeerCredentials {
        token: TOKEN,
        fingerprint: Some(PEER_CERT),
    });
    h.deliver(&encode(&forward));
    let answer = h.take_control();
    let answer = decode(&answer);
    assert_eq!(
        answer.tlvs.connection_info.map(|c| c.transport),
        Some(Transport::QUIC)
    );
    assert_eq!(answer.tlvs.certificate_fingerprint, Some(CERT));
    h.take_events();

    // A probe that does not verify authorises nothing; a verified one authorises its source.
    let mut probe = Message::new(MessageType::PEER_PROBE, 5, 0);
    probe.tlvs.peer_internal_address = Some(IpAddr::V4(PEER));
    h.peer_datagram(REMOTE, &encode(&probe));
    h.drain();
    assert!(h.take_events().is_empty());
    h.peer_datagram(REMOTE, &signed(&probe));
    h.drain();
    assert_eq!(
        h.take_events(),
        [ClientEvent::AcceptPeerSession {
            peer: IpAddr::V4(PEER),
            path: REMOTE,
            transport: Transport::QUIC,
            fingerprint: PEER_CERT,
        }]
    );

    // A signed Configuration Request outside the session is dropped, without an answer.
    let mut config = Message::new(MessageType::CONFIGURATION_REQUEST, 6, 0);
    config.tlvs.peer_internal_address = Some(IpAddr::V4(PEER));
    h.peer_sent.clear();
    h.peer_datagram(REMOTE, &signed(&config));
    let other = SocketAddr::from(([198, 51, 100, 77], 5000));
    h.peer_datagram(other, &signed(&config));
    h.drain();
    assert!(h
        .peer_sent
        .iter()
        .all(|(_, b)| decode_any(b) != Some(MessageType::CONFIGURATION_RESPONSE)));
    assert_eq!(h.client.stats().peer.dropped_plain_on_secure, 2);
    assert_eq!(h.client.peer_path(IpAddr::V4(PEER)), PeerPath::Relay);

    // Inside a session from an address never authorised: dropped too.
    h.peer_session_datagram(other, &signed(&config));
    assert_eq!(h.client.stats().peer.dropped_unknown_session, 1);

    // Inside the session: answered there, and up on it.
    h.client.handle_input(h.now, Input::PeerSessionOpen(REMOTE));
    h.peer_session_datagram(REMOTE, &signed(&config));
    h.drain();
    let (to, accepted) = h.session_sent.pop().expect("an answer in the session");
    assert_eq!(to, REMOTE);
    assert_eq!(
        decode(&accepted).tlvs.result_code,
        Some(ResultCode::SUCCESS)
    );
    assert_eq!(
        h.client.peer_path(IpAddr::V4(PEER)),
        PeerPath::Session {
            addr: REMOTE,
            transport: Transport::QUIC
        }
    );
    // Data goes in the session; plain data from the path is dropped.
    let packet = media(PEER, ADDR);
    h.peer_datagram(REMOTE, &data_envelope(&packet));
    assert_eq!(h.client.stats().peer.dropped_plain_on_secure, 3);
    assert_eq!(h.client.stats().peer.data_received, 0);
    h.peer_session_datagram(REMOTE, &data_envelope(&packet));
    assert_eq!(h.client.stats().peer.data_received, 1);

    // The session breaks: back on the relay, and the runtime is told to close it.
    h.take_events();
    h.client
        .handle_input(h.now, Input::PeerSessionFailed(REMOTE));
    h.drain();
    let events = h.take_events();
    assert!(events.contains(&ClientEvent::ClosePeerSession { path: REMOTE }));
    assert!(events.contains(&ClientEvent::PeerTunnelDown {
        peer: IpAddr::V4(PEER),
        reason: PeerDownReason::SessionLost,
    }));
    assert_eq!(h.client.peer_path(IpAddr::V4(PEER)), PeerPath::Relay);
}

/// A client over TCP whose peer configuration names no STUN server asks the director's STUN
/// responder it announced (at the server's address), and announces what it learnt; without
/// the announcement it announces its host candidate only.
#[test]
fn nat_discovery_asks_the_stun_responder_the_director_announced() {
    for announced in [Some(3478), None] {
        let mut config = ClientConfig::new(vec![tcp()]);
        config.peer = Some(PeerConfig::new(vec![LOCAL], Vec::new()));
        let mut h = Harness::new(config);
        h.take_events();
        h.open();
        let seq = decode(&h.take_control()).header.sequence;
        let mut response = Message::new(MessageType::CONFIGURATION_RESPONSE, seq, TUNNEL);
        response.tlvs.result_code = Some(ResultCode::SUCCESS);
        response.tlvs.internal_ipv4 = Some(InternalAddress {
            addr: ADDR,
            prefix_len: 16,
        });
        response.tlvs.stun_port = announced;
        h.deliver(&encode(&response));
        let responder = announced.map(|port| SocketAddr::new(tcp().addr.ip(), port));
        let events = h.take_events();
        assert!(
            matches!(
                events.first(),
                Some(ClientEvent::Connected(info)) if info.stun_server == responder
            ),
            "{events:?}"
        );
        let expected = match responder {
            Some(responder) => {
                let (to, binding) = h.peer_sent.pop().expect("a STUN request");
                assert_eq!(to, responder);
                let mut answer = Vec::new();
                stun::answer_binding_request(&binding, PUBLIC, &mut answer).expect("valid");
                h.peer_datagram(responder, &answer);
                h.drain();
                vec![
                    (CandidateKind::HOST, LOCAL),
                    (CandidateKind::SERVER_REFLEXIVE, PUBLIC),
                ]
            }
            None => {
                assert!(h.peer_sent.is_empty(), "no STUN server to ask");
                vec![(CandidateKind::HOST, LOCAL)]
            }
        };
        let announce = decode(&h.take_control())
            .tlvs
            .candidates
            .iter()
            .map(|c| (c.kind, c.addr))
            .collect::<Vec<_>>();
        assert_eq!(announce, expected, "announced {announced:?}");
    }
}

/// Whether what `h` sent holds a request for a peer tunnel.
fn asked_for_a_peer(h: &mut Harness) -> bool {
    h.drain();
    h.take_sent().iter().any(|b| {
        b[0] == EnvelopeType::CONTROL.0
            && decode(b).tlvs.service_action == Some(ServiceAction::ESTABLISH)
    })
}

#[test]
fn tcp_flows_flows_to_an_opted_in_port_and_packets_without_ports_follow_the_default() {
    let tcp = |from: u16, to: u16| {
        let mut out = Vec::new();
        PacketBuilder::ipv4(ADDR.octets(), PEER.octets(), 64)
            .tcp(from, to, 1, 1024)
            .write(&mut out, b"syn")
            .expect("vec write");
        out
    };
    // TCP from an opted-in port.
    let (mut h, _) = peer_client();
    h.client.set_peer_tunneling(7000, true);
    h.client.send_ip(h.now, &tcp(7000, 80)).expect("queued");
    assert!(asked_for_a_peer(&mut h));
    // From any port to one opted in explicitly here (a service's port on the other side).
    let (mut h, _) = peer_client();
    h.client.set_peer_tunneling(5201, true);
    h.client.send_ip(h.now, &tcp(40_000, 5201)).expect("queued");
    assert!(asked_for_a_peer(&mut h));
    // Neither port opted in: the relay only.
    let (mut h, _) = peer_client();
    h.client.set_peer_tunneling(5201, true);
    h.client.send_ip(h.now, &tcp(40_000, 80)).expect("queued");
    assert!(!asked_for_a_peer(&mut h));
    // ICMP has no port: the default decides.
    let mut echo = Vec::new();
    PacketBuilder::ipv4(ADDR.octets(), PEER.octets(), 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut echo, b"ping")
        .expect("vec write");
    let (mut h, _) = peer_client();
    h.client.set_peer_tunneling(5004, true);
    h.client.send_ip(h.now, &echo).expect("queued");
    assert!(!asked_for_a_peer(&mut h));
    let (mut h, _) = peer_client_with(|p| p.default_opt_in = true);
    h.client.send_ip(h.now, &echo).expect("queued");
    assert!(asked_for_a_peer(&mut h));
}
