//! The attacks on control integrity, re-attach and plain transports, each against a live
//! server: what the attacker sends, and what must (not) happen.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use tscf_core::client::PeerPath;
use tscf_core::wire::{
    Candidate, CandidateKind, ConnectionInfo, Message, MessageType, PeerCredentials, ResultCode,
    ServiceAction, ServiceType, Transport,
};
use tscf_runtime_std::{Notification, Server, ServerConfig, Tunnel, TunnelConfig};

use crate::relay::{message, UdpRelay};
use crate::util::{rtp_flow, server, tunnel, wait_for, wait_for_notification};

/// A tunnel over UDP to the server through `relay`, offering plain UDP peer tunnels.
fn tunnel_via(relay: &UdpRelay, tweak: impl FnOnce(&mut TunnelConfig)) -> Tunnel {
    let mut config = TunnelConfig::new(vec![relay.endpoint()]);
    config.connect_timeout = Duration::from_secs(5);
    if let Some(peer) = &mut config.client.peer {
        peer.transport = Transport::UDP;
        peer.require_secure = false;
    }
    tweak(&mut config);
    Tunnel::connect(config).expect("tunnel connects")
}

fn envelope(message: &Message<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    message.encode_envelope(&mut out).unwrap();
    out
}

/// An off-path attacker who spoofs the server's UDP address sends a client a peer
/// introduction of its own making: a token it chose and its own socket as the candidate of
/// another client. The client must not take it: no probe reaches the attacker, no peer tunnel
/// forms, and the drop is counted.
#[test]
fn forged_peer_introduction_over_udp_is_dropped() {
    let server = server(|_| {});
    let relay = UdpRelay::new(server.local_addrs().udp[0]);
    let a = tunnel_via(&relay, |_| {});
    let c = tunnel(&server, Transport::UDP);
    let victim = relay.clients()[0];
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    let trap = attacker.local_addr().unwrap();
    let c_addr = IpAddr::V4(c.internal_ipv4().unwrap());

    // Even with the right tunnel id and a plausible director sequence number.
    let mut forged = Message::new(
        MessageType::CLIENT_SERVICE_REQUEST,
        0x8000_0100,
        a.tunnel_id().unwrap(),
    );
    forged.tlvs.service_type = Some(ServiceType::PEER);
    forged.tlvs.service_action = Some(ServiceAction::ESTABLISH);
    forged.tlvs.connection_info = Some(ConnectionInfo {
        transport: Transport::UDP,
        addr: trap,
    });
    forged.tlvs.candidates.push(Candidate {
        kind: CandidateKind::HOST,
        transport: Transport::UDP,
        addr: trap,
    });
    forged.tlvs.peer_credentials = Some(PeerCredentials {
        token: *b"attacker's token",
        fingerprint: None,
    });
    forged.tlvs.peer_internal_address = Some(c_addr);
    relay.send_to_client(victim, &envelope(&forged));

    wait_for("the forged request is dropped", || {
        a.stats().client.dropped_unauthenticated >= 1
    });
    attacker
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 2048];
    assert!(
        attacker.recv_from(&mut buf).is_err(),
        "the client probed the attacker's candidate"
    );
    assert_eq!(a.stats().client.peer.forwarded_requests, 0);
    assert_eq!(a.peer_path(c_addr), PeerPath::Relay);
    // The tunnel itself is untouched.
    assert_eq!(rtp_flow(&a, &c, 10, |_| {}), (0..10).collect::<Vec<_>>());
    relay.stop();
}

/// An attacker on the path (a new network the client moved to) watches the client re-attach
/// over plain UDP, then sends, from its own address, the request it saw and a request of its
/// own with whatever re-attach secret the exchange showed. Before, the response carried the
/// tunnel's fresh secret in clear, and the second request moved the tunnel to the attacker.
/// Now the proof is Message Integrity under a key the re-attach never shows, over a sequence
/// number the director has not accepted before: neither request gets the tunnel, and it stays
/// with its client.
#[test]
fn replayed_reattach_secret_does_not_take_over_tunnel() {
    let server = server(|_| {});
    let relay = UdpRelay::new(server.local_addrs().udp[0]);
    let a = tunnel_via(&relay, |_| {});
    let b = tunnel(&server, Transport::UDP);
    let id = a.tunnel_id().unwrap();
    a.drop_server_transport().unwrap();
    let notes = wait_for_notification(&a, |n| matches!(n, Notification::Reattached(_)));
    assert!(notes.contains(&Notification::TransportLost), "{notes:?}");
    let (_, request) = relay.wait_for_control(None, |m| {
        m.header.message_type == MessageType::CONFIGURATION_REQUEST && m.tlvs.tunnel_id == Some(id)
    });
    // The freshest secret in sight: the response's, else the request's.
    let seen_secret = relay
        .control_sent(None)
        .iter()
        .chain(&relay.control_received(None))
        .rev()
        .find_map(|(_, d)| message(d)?.tlvs.reattach_secret);

    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    attacker
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let ask = |request: &[u8]| {
        attacker
            .send_to(request, server.local_addrs().udp[0])
            .unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = attacker.recv_from(&mut buf).ok()?;
        message(&buf[..n]).map(|m| (m.tlvs.result_code, m.header.tunnel_id))
    };
    // The request as it was seen.
    let replayed = ask(&request);
    assert!(
        replayed.is_none_or(|(result, _)| result != Some(ResultCode::SUCCESS)),
        "the replay got the tunnel: {replayed:?}"
    );
    // A request of the attacker's own, with the secret the exchange showed, if any.
    let mut forged = Message::new(MessageType::CONFIGURATION_REQUEST, 0x0bad_5eed, 0);
    forged.tlvs.tunnel_id = Some(id);
    forged.tlvs.reattach_secret = seen_secret;
    let answer = ask(&envelope(&forged));
    assert!(
        answer.is_none_or(|(result, _)| result != Some(ResultCode::SUCCESS)),
        "the attacker's own request got the tunnel: {answer:?}"
    );
    // The tunnel is still the client's, both ways.
    assert_eq!(a.tunnel_id(), Some(id));
    assert_eq!(rtp_flow(&a, &b, 10, |_| {}), (0..10).collect::<Vec<_>>());
    assert_eq!(rtp_flow(&b, &a, 10, |_| {}), (0..10).collect::<Vec<_>>());
    let stats = server.stats().director;
    assert_eq!(stats.reattaches, 1);
    assert_eq!(stats.dropped.replayed, 1);
    relay.stop();
}

/// A plain UDP or TCP listener on an address beyond loopback carries tunnels that anyone on
/// the path reads and changes: the server refuses to start one unless told that this is
/// meant, and a TLS listener there needs no such consent.
#[test]
fn plain_listener_beyond_loopback_needs_opt_in() {
    let anywhere = SocketAddr::from(([0, 0, 0, 0], 0));
    for (udp, tcp) in [(vec![anywhere], vec![]), (vec![], vec![anywhere])] {
        let mut config = ServerConfig {
            udp,
            tcp,
            tls: Vec::new(),
            ..ServerConfig::loopback()
        };
        // Not an open relay: admission by token.
        config.director.admission.tokens = vec![b"a-long-enough-token".to_vec()];
        let refused = Server::start(config.clone()).expect_err("a plain listener beyond loopback");
        let text = refused.to_string();
        assert!(text.contains("0.0.0.0") && text.contains("plain"), "{text}");
        config.allow_plain_beyond_loopback = true;
        let server = Server::start(config).expect("started with the operator's consent");
        server.shutdown();
    }
    let mut config = ServerConfig {
        udp: Vec::new(),
        tcp: Vec::new(),
        tls: vec![anywhere],
        ..ServerConfig::loopback()
    };
    config.director.admission.tokens = vec![b"a-long-enough-token".to_vec()];
    Server::start(config)
        .expect("TLS needs no consent")
        .shutdown();
}
