//! Secured peer paths (`docs/PROTOCOL.md` §7.5): the agreement on a session transport, a peer
//! tunnel inside a (simulated) session, a certificate that does not match, plain datagrams on
//! a secured path, and silence followed by a new secured attempt.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use tscf_core::client::{
    ClientConfig, ClientEvent, ConfigError, PeerConfig, PeerDownReason, PeerPath, TunnelClient,
};
use tscf_core::director::DirectorConfig;
use tscf_core::sim::world::{data_envelope, udp_packet_ports, World};
use tscf_core::sim::{LinkConfig, SeedGuard};
use tscf_core::wire::Transport;

use super::ms;

const MEDIA: u16 = 6000;
const CERT_A: [u8; 32] = [0xa1; 32];
const CERT_B: [u8; 32] = [0xb2; 32];

/// A peer configuration offering `transport` (with a certificate for DTLS and QUIC).
fn offer(transport: Transport, cert: [u8; 32]) -> PeerConfig {
    let mut peer = PeerConfig::new(Vec::new(), Vec::new());
    peer.transport = transport;
    if transport != Transport::UDP {
        peer.certificate_fingerprint = Some(cert);
    }
    peer
}

/// Two public clients on UDP with these peer configurations, connected and discovered.
fn build(seed: u64, peer_a: PeerConfig, peer_b: PeerConfig) -> (World, usize, usize) {
    let mut w = World::new(seed, DirectorConfig::default(), ms(45));
    let config = || ClientConfig::new(vec![World::endpoint(Transport::UDP)]);
    let ip = |n| IpAddr::V4(Ipv4Addr::new(198, 18, 0, n));
    let a = w.add_peer_client(
        None,
        ip(10),
        LinkConfig::with_latency(ms(5)),
        config(),
        peer_a,
    );
    let b = w.add_peer_client(
        None,
        ip(11),
        LinkConfig::with_latency(ms(5)),
        config(),
        peer_b,
    );
    let ready = |w: &World, i: usize| {
        w.connected(i)
            && w.nodes[i]
                .events
                .iter()
                .any(|e| matches!(e, ClientEvent::NatDiscovered { .. }))
    };
    let deadline = w.now() + Duration::from_secs(30);
    assert!(w.run_until_cond(deadline, |w| ready(w, a) && ready(w, b)));
    w.run_for(ms(200));
    for i in [a, b] {
        w.nodes[i].client.set_peer_tunneling(MEDIA, true);
    }
    (w, a, b)
}

fn v4(w: &World, i: usize) -> Ipv4Addr {
    w.nodes[i].client.internal_ipv4().expect("an IPv4 address")
}

fn path(w: &World, i: usize, j: usize) -> PeerPath {
    w.nodes[i].client.peer_path(IpAddr::V4(v4(w, j)))
}

fn down_reasons(w: &World, i: usize) -> Vec<PeerDownReason> {
    w.nodes[i]
        .events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::PeerTunnelDown { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect()
}

fn ups(w: &World, i: usize) -> usize {
    let up = |e: &&ClientEvent| matches!(e, ClientEvent::PeerTunnelUp { .. });
    w.nodes[i].events.iter().filter(up).count()
}

/// Media both ways every 20 ms for `d`; returns how many packets each side sent.
fn call(w: &mut World, a: usize, b: usize, d: Duration) -> usize {
    let (ia, ib) = (v4(w, a), v4(w, b));
    let mut sent = 0;
    let end = w.now() + d;
    while w.now() < end {
        assert!(w.send_udp_ports(a, MEDIA, ib, MEDIA, b"a to b"));
        assert!(w.send_udp_ports(b, MEDIA, ia, MEDIA, b"b to a"));
        sent += 1;
        w.run_for(ms(20));
    }
    w.run_for(ms(300));
    sent
}

fn received(w: &World, i: usize, payload: &[u8]) -> usize {
    w.nodes[i]
        .received
        .iter()
        .filter(|p| p.ends_with(payload))
        .count()
}

fn is_session(p: PeerPath, transport: Transport) -> bool {
    matches!(p, PeerPath::Session { transport: t, .. } if t == transport)
}

fn dump(w: &World, a: usize, b: usize) {
    for i in [a, b] {
        let n = &w.nodes[i];
        eprintln!("client {i}: {:?}", n.events);
        eprintln!("  {:?}", n.client.stats().peer);
        eprintln!("  {:?}", n.client.peer_tunnels());
    }
}

#[test]
fn a_secured_peer_tunnel_comes_up_and_carries_data() {
    for (seed, transport) in [(201, Transport::QUIC), (202, Transport::DTLS)] {
        let _guard = SeedGuard(seed);
        let (mut w, a, b) = build(seed, offer(transport, CERT_A), offer(transport, CERT_B));
        let sent = call(&mut w, a, b, Duration::from_secs(2));
        let ok = is_session(path(&w, a, b), transport) && is_session(path(&w, b, a), transport);
        if !ok {
            dump(&w, a, b);
        }
        assert!(ok, "{transport}: both sides on the session");
        let info = w.nodes[a].client.peer_tunnels();
        assert_eq!(info[0].session, Some(transport));
        // The initiator asked for a session pinned to b's certificate, b authorised a's address.
        let open = w.nodes[a].events.iter().find_map(|e| match e {
            ClientEvent::OpenPeerSession {
                transport: t,
                fingerprint,
                path,
                ..
            } => Some((*t, *fingerprint, *path)),
            _ => None,
        });
        let peer_b = w.nodes[b].peer_socket.expect("a peer socket");
        assert_eq!(open, Some((transport, CERT_B, peer_b)));
        let peer_a = w.nodes[a].peer_socket.expect("a peer socket");
        assert_eq!(w.nodes[b].authorised.get(&peer_a), Some(&CERT_A));
        // Every packet arrived; those after the switch came inside the session.
        assert_eq!(received(&w, b, b"a to b"), sent);
        assert_eq!(received(&w, a, b"b to a"), sent);
        let (sa, sb) = (
            w.nodes[a].client.stats().peer,
            w.nodes[b].client.stats().peer,
        );
        assert!(
            sa.data_received > 0 && sb.data_received > 0,
            "{sa:?} {sb:?}"
        );
        assert_eq!((sa.sessions_opened, sb.sessions_opened), (1, 0));
        assert!(sb.sessions_authorised >= 1);
        assert_eq!(sa.dropped_plain_on_secure + sb.dropped_plain_on_secure, 0);
        assert!(w.nodes[a].sessions[&peer_b].open && w.nodes[b].sessions[&peer_a].open);
    }
}

#[test]
fn a_certificate_that_does_not_match_keeps_the_flow_on_the_relay() {
    // First b presents another certificate than it announced (the initiator's check fails),
    // then a does (the destination's check fails).
    for (seed, liar) in [(211, 1), (212, 0)] {
        let _guard = SeedGuard(seed);
        let (mut w, a, b) = build(
            seed,
            offer(Transport::QUIC, CERT_A),
            offer(Transport::QUIC, CERT_B),
        );
        let who = [a, b][liar];
        w.nodes[who].session_cert = Some([0xee; 32]);
        let sent = call(&mut w, a, b, Duration::from_secs(3));
        assert_eq!(path(&w, a, b), PeerPath::Relay, "liar {liar}");
        assert_eq!(path(&w, b, a), PeerPath::Relay, "liar {liar}");
        assert!(
            down_reasons(&w, a).contains(&PeerDownReason::SessionFailed),
            "liar {liar}"
        );
        let failures = w.nodes[a].client.stats().peer.session_failures
            + w.nodes[b].client.stats().peer.session_failures;
        assert!(failures >= 1);
        assert_eq!(ups(&w, a) + ups(&w, b), 0);
        // The relay carried everything.
        assert_eq!(received(&w, b, b"a to b"), sent);
        assert_eq!(received(&w, a, b"b to a"), sent);
    }
}

#[test]
fn plain_datagrams_on_a_secured_path_are_dropped() {
    let _guard = SeedGuard(221);
    let (mut w, a, b) = build(
        221,
        offer(Transport::QUIC, CERT_A),
        offer(Transport::QUIC, CERT_B),
    );
    call(&mut w, a, b, Duration::from_secs(1));
    assert!(is_session(path(&w, b, a), Transport::QUIC));
    // A forged data envelope, as if from a's peer socket, outside the session.
    let (peer_a, peer_b) = (
        w.nodes[a].peer_socket.expect("socket"),
        w.nodes[b].peer_socket.expect("socket"),
    );
    let packet = udp_packet_ports(v4(&w, a), MEDIA, v4(&w, b), MEDIA, b"forged!");
    let before = w.nodes[b].client.stats().peer.dropped_plain_on_secure;
    for _ in 0..5 {
        w.net.send_datagram(peer_a, peer_b, &data_envelope(&packet));
    }
    call(&mut w, a, b, ms(200));
    let after = w.nodes[b].client.stats().peer.dropped_plain_on_secure;
    assert_eq!(after - before, 5);
    assert_eq!(received(&w, b, b"forged!"), 0);
    assert!(
        is_session(path(&w, b, a), Transport::QUIC),
        "the tunnel stays up"
    );
}

#[test]
fn silence_returns_to_the_relay_and_a_new_secured_attempt_follows() {
    let _guard = SeedGuard(231);
    let (mut w, a, b) = build(
        231,
        offer(Transport::QUIC, CERT_A),
        offer(Transport::QUIC, CERT_B),
    );
    call(&mut w, a, b, Duration::from_secs(1));
    assert!(is_session(path(&w, a, b), Transport::QUIC));
    let (ha, hb) = (w.nodes[a].ip, w.nodes[b].ip);
    w.net.block(ha, hb);
    call(&mut w, a, b, Duration::from_secs(2));
    assert_eq!(path(&w, a, b), PeerPath::Relay);
    assert!(down_reasons(&w, a).contains(&PeerDownReason::Silence));
    // The core gave the session up: the runtime was told to close it.
    let closed = w.nodes[a]
        .events
        .iter()
        .any(|e| matches!(e, ClientEvent::ClosePeerSession { .. }));
    assert!(closed);
    assert!(w.nodes[a].sessions.is_empty() && w.nodes[b].authorised.is_empty());
    w.net.unblock(ha, hb);
    let sent = call(&mut w, a, b, Duration::from_secs(4));
    assert!(sent > 0);
    let ok = is_session(path(&w, a, b), Transport::QUIC) && ups(&w, a) == 2;
    if !ok {
        dump(&w, a, b);
    }
    assert!(ok, "up again, secured");
    assert_eq!(w.nodes[a].client.stats().peer.sessions_opened, 2);
}

#[test]
fn offers_that_differ_agree_on_plain_udp_unless_secure_is_required() {
    let plain = [
        (Transport::QUIC, Transport::UDP),
        (Transport::UDP, Transport::QUIC),
        (Transport::QUIC, Transport::DTLS),
    ];
    for (n, (ta, tb)) in plain.into_iter().enumerate() {
        let seed = 241 + n as u64;
        let _guard = SeedGuard(seed);
        let (mut w, a, b) = build(seed, offer(ta, CERT_A), offer(tb, CERT_B));
        call(&mut w, a, b, Duration::from_secs(2));
        assert!(matches!(path(&w, a, b), PeerPath::Peer(_)), "{ta}/{tb}");
        assert!(matches!(path(&w, b, a), PeerPath::Peer(_)), "{ta}/{tb}");
        assert_eq!(w.nodes[a].client.peer_tunnels()[0].session, None);
    }
    // a requires a secured tunnel, b offers only UDP: a refuses, flows stay on the relay.
    for (seed, required_by_a) in [(251, true), (252, false)] {
        let _guard = SeedGuard(seed);
        let mut strict = offer(Transport::QUIC, CERT_A);
        strict.require_secure = true;
        let (pa, pb) = if required_by_a {
            (strict, offer(Transport::UDP, CERT_B))
        } else {
            (offer(Transport::UDP, CERT_B), strict)
        };
        let (mut w, a, b) = build(seed, pa, pb);
        let sent = call(&mut w, a, b, Duration::from_secs(2));
        assert_eq!(path(&w, a, b), PeerPath::Relay);
        assert_eq!(path(&w, b, a), PeerPath::Relay);
        let strict_side = if required_by_a { a } else { b };
        assert!(w.nodes[strict_side].client.stats().peer.insecure_refused >= 1);
        if required_by_a {
            assert!(down_reasons(&w, a).contains(&PeerDownReason::InsecureRefused));
        }
        assert_eq!(received(&w, b, b"a to b"), sent);
    }
}

#[test]
fn a_secure_offer_needs_a_certificate_fingerprint() {
    let config = |peer: PeerConfig| {
        let mut c = ClientConfig::new(vec![World::endpoint(Transport::UDP)]);
        c.peer = Some(peer);
        let w = World::new(1, DirectorConfig::default(), ms(1));
        TunnelClient::new(c, w.now()).map(|_| ())
    };
    let local = "192.0.2.1:5000".parse().expect("address");
    let mut peer = PeerConfig::new(vec![local], Vec::new());
    peer.transport = Transport::QUIC;
    assert!(matches!(
        config(peer.clone()),
        Err(ConfigError::PeerTransport(Transport::QUIC))
    ));
    peer.certificate_fingerprint = Some(CERT_A);
    assert!(config(peer.clone()).is_ok());
    peer.transport = Transport::TLS;
    assert!(config(peer.clone()).is_err());
    peer.transport = Transport::UDP;
    peer.require_secure = true;
    assert!(config(peer).is_err());
}

/// The initiator's setup time, plain and secured, with a server RTT of 100 ms and a peer RTT of
/// 20 ms: the session handshake adds one peer RTT (printed for `docs/PEER-SETUP.md`).
#[test]
fn measure_secured_setup_time() {
    let mut rows = Vec::new();
    for (seed, transport) in [(261, Transport::UDP), (262, Transport::QUIC)] {
        let _guard = SeedGuard(seed);
        let (mut w, a, b) = build(seed, offer(transport, CERT_A), offer(transport, CERT_B));
        call(&mut w, a, b, Duration::from_secs(1));
        let setup = w.nodes[a].events.iter().find_map(|e| match e {
            ClientEvent::PeerTunnelUp {
                setup,
                initiator: true,
                ..
            } => Some(*setup),
            _ => None,
        });
        let setup = setup.expect("up");
        rows.push((transport, setup));
    }
    println!("| peer transport | setup (server RTT 100 ms, peer RTT 20 ms) |");
    println!("|---|---|");
    for (transport, setup) in &rows {
        println!("| {transport} | {} ms |", setup.as_millis());
    }
    let (plain, secured) = (rows[0].1, rows[1].1);
    assert!(secured > plain, "the handshake costs something");
}
