//! Secured peer tunnels (`docs/PROTOCOL.md` §7.5.1), QUIC and DTLS, between two smol clients
//! through a smol server on loopback: up over the offered transport and carrying packets both
//! ways off the relay; a certificate that does not match the announced fingerprint keeps the
//! flow on the relay; QUIC or DTLS datagrams from an unauthorised socket are counted and change
//! nothing; a mixed offer agrees on plain UDP. Each transport's test runs the same function and
//! prints the peer setup time and the round trip against plain UDP.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tscf_core::client::{PeerPath, PeerTunnelState};
use tscf_core::wire::Transport;
use tscf_runtime_smol::tls::{self, ClientTlsConfig};
use tscf_runtime_smol::{Notification, PeerIdentity, ServerHandle, Tunnel, TunnelConfig};

use crate::util::{config_for, server_config, smol_flow, smol_server, smol_tunnel};

/// 2 s at 50 packets/s.
const PACKETS: u32 = 100;

/// A client offering `peer`, and settling for plain UDP when the other side offers something
/// else (these tests are about the agreement itself, §7.5.1).
fn config(server: &ServerHandle, peer: Transport) -> TunnelConfig {
    let mut c = config_for(server, Transport::UDP);
    let p = c.client.peer.as_mut().expect("peer tunneling on");
    p.transport = peer;
    p.require_secure = false;
    c
}

fn relayed(server: &ServerHandle) -> u64 {
    server.stats().director.frames_relayed
}

fn ip(t: &Tunnel) -> IpAddr {
    IpAddr::V4(t.internal_ipv4().unwrap())
}

/// Whether `p` is a peer session over `transport`.
fn is_session(p: PeerPath, transport: Transport) -> bool {
    matches!(p, PeerPath::Session { transport: t, .. } if t == transport)
}

/// The setup time of the first peer tunnel `t` reported.
fn setup(t: &Tunnel) -> Option<Duration> {
    std::iter::from_fn(|| t.notifications().try_recv().ok()).find_map(|n| match n {
        Notification::PeerTunnelUp { setup, .. } => Some(setup),
        _ => None,
    })
}

/// Waits until both tunnels see each other through a peer tunnel (or 5 s pass).
async fn until_up(a: &Tunnel, b: &Tunnel) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let up = |x: &Tunnel, y: &Tunnel| {
            x.peer_tunnels()
                .iter()
                .any(|p| p.peer == ip(y) && p.state == PeerTunnelState::Up)
        };
        if up(a, b) && up(b, a) {
            return true;
        }
        smol::Timer::after(Duration::from_millis(10)).await;
    }
    false
}

/// Median round trip of `n` echoes from `a` to `b`, both sockets opted in.
async fn rtt(a: &Tunnel, b: &Tunnel, n: usize) -> Duration {
    let echo = b.bind(7007).unwrap();
    echo.set_peer_tunneling(true);
    let ping = a.bind(0).unwrap();
    ping.set_peer_tunneling(true);
    ping.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let dst = SocketAddr::new(ip(b), 7007);
    let echoing = smol::spawn(async move {
        let mut buf = [0u8; 256];
        while let Ok((len, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..len], from).await;
        }
    });
    let mut samples = Vec::new();
    let mut buf = [0u8; 256];
    for i in 0..n as u32 {
        let sent = Instant::now();
        ping.send_to(&i.to_be_bytes(), dst).await.unwrap();
        if let Ok((4, _)) = ping.recv_from(&mut buf).await {
            if buf[..4] == i.to_be_bytes() {
                samples.push(sent.elapsed());
            }
        }
    }
    drop(echoing);
    samples.sort();
    samples
        .get(samples.len() / 2)
        .copied()
        .unwrap_or(Duration::MAX)
}

/// Brings a peer tunnel up between two clients offering `transport`; returns them with the
/// initiator's setup time.
async fn pair(server: &ServerHandle, transport: Transport) -> (Tunnel, Tunnel, Duration) {
    let a = smol_tunnel(config(server, transport)).await;
    let b = smol_tunnel(config(server, transport)).await;
    let got = smol_flow(&a, &b, 50, true).await;
    assert_eq!(got.len(), 50, "{transport}: nothing lost on the way");
    assert!(
        until_up(&a, &b).await,
        "{transport}: up, {:?}",
        a.peer_tunnels()
    );
    let setup = setup(&a).expect("a PeerTunnelUp notification");
    (a, b, setup)
}

/// A peer tunnel over `secure` comes up, says so, and carries 100 packets each way with
/// nothing relayed; prints its setup time and round trip against plain UDP.
fn carries_packets_both_ways_off_the_relay(secure: Transport) {
    let server = smol_server();
    smol::block_on(async {
        let (a, b, secure_setup) = pair(&server, secure).await;
        assert!(
            is_session(a.peer_path(ip(&b)), secure),
            "{:?}",
            a.peer_path(ip(&b))
        );
        assert!(is_session(b.peer_path(ip(&a)), secure));
        assert_eq!(a.peer_tunnels()[0].session, Some(secure));
        assert!(a.stats().peer_sessions_open >= 1 && b.stats().peer_sessions_open >= 1);

        let before = relayed(&server);
        let forward = smol_flow(&a, &b, PACKETS, true).await;
        let back = smol_flow(&b, &a, PACKETS, true).await;
        if forward.len() != PACKETS as usize || back.len() != PACKETS as usize {
            eprintln!("a: {:?}\n{:?}", a.stats(), a.peer_tunnels());
            eprintln!("b: {:?}\n{:?}", b.stats(), b.peer_tunnels());
            let notes: Vec<_> = std::iter::from_fn(|| a.notifications().try_recv().ok()).collect();
            eprintln!("{notes:?}");
        }
        assert_eq!(forward, (0..PACKETS).collect::<Vec<_>>());
        assert_eq!(back, (0..PACKETS).collect::<Vec<_>>());
        assert_eq!(relayed(&server) - before, 0, "nothing relayed");
        assert!(is_session(a.peer_path(ip(&b)), secure), "still on {secure}");
        let (pa, pb) = (a.stats().client.peer, b.stats().client.peer);
        assert!(pa.data_received >= u64::from(PACKETS), "{pa:?}");
        assert!(pb.data_received >= u64::from(PACKETS), "{pb:?}");
        assert_eq!(pa.dropped_plain_on_secure + pb.dropped_plain_on_secure, 0);
        let secure_rtt = rtt(&a, &b, 50).await;
        a.close().await;
        b.close().await;

        let (a, b, udp_setup) = pair(&server, Transport::UDP).await;
        assert!(matches!(a.peer_path(ip(&b)), PeerPath::Peer(_)));
        let udp_rtt = rtt(&a, &b, 50).await;
        a.close().await;
        b.close().await;
        println!(
            "peer tunnel on loopback: setup UDP {:.1} ms, {secure} {:.1} ms; median RTT UDP \
             {:.0} µs, {secure} {:.0} µs",
            udp_setup.as_secs_f64() * 1e3,
            secure_setup.as_secs_f64() * 1e3,
            udp_rtt.as_secs_f64() * 1e6,
            secure_rtt.as_secs_f64() * 1e6,
        );
    });
    smol::block_on(server.shutdown());
}

#[test]
fn a_quic_peer_tunnel_carries_packets_both_ways_off_the_relay() {
    carries_packets_both_ways_off_the_relay(Transport::QUIC);
}

#[test]
fn a_dtls_peer_tunnel_carries_packets_both_ways_off_the_relay() {
    carries_packets_both_ways_off_the_relay(Transport::DTLS);
}

/// With `secure` offered, a certificate other than the announced one keeps the flow on the
/// relay: first the destination presents it (the initiator's pin fails), then the initiator
/// does (the destination's check fails).
fn a_wrong_certificate_keeps_the_flow_on_the_relay(secure: Transport) {
    let server = smol_server();
    for liar_is_destination in [true, false] {
        smol::block_on(async {
            let a = smol_tunnel(config(&server, secure)).await;
            let b = smol_tunnel(config(&server, secure)).await;
            let liar = if liar_is_destination { &b } else { &a };
            liar.present_peer_identity(PeerIdentity::generate(tscf_runtime_smol::OS).unwrap());
            let before = relayed(&server);
            let got = smol_flow(&a, &b, PACKETS, true).await;
            assert_eq!(got, (0..PACKETS).collect::<Vec<_>>(), "all on the relay");
            assert!(relayed(&server) - before >= u64::from(PACKETS));
            assert_eq!(a.peer_path(ip(&b)), PeerPath::Relay);
            assert_eq!(b.peer_path(ip(&a)), PeerPath::Relay);
            let failures =
                a.stats().client.peer.session_failures + b.stats().client.peer.session_failures;
            assert!(failures >= 1, "{:?} {:?}", a.stats(), b.stats());
            assert_eq!(a.stats().client.peer.tunnels_up, 0);
            a.close().await;
            b.close().await;
        });
    }
    smol::block_on(server.shutdown());
}

#[test]
fn a_certificate_that_does_not_match_keeps_the_flow_on_the_relay() {
    a_wrong_certificate_keeps_the_flow_on_the_relay(Transport::QUIC);
}

#[test]
fn a_dtls_certificate_that_does_not_match_keeps_the_flow_on_the_relay() {
    a_wrong_certificate_keeps_the_flow_on_the_relay(Transport::DTLS);
}

/// What a stranger sends at a `secure` peer session: for QUIC, long (Initial) and short
/// headers; for DTLS, ClientHello records and application data records of epoch 1.
fn stranger_datagram(secure: Transport, i: u8) -> Vec<u8> {
    if secure == Transport::QUIC {
        let mut datagram = vec![if i.is_multiple_of(2) { 0xc3 } else { 0x43 }; 1200];
        datagram[1..5].copy_from_slice(&1u32.to_be_bytes());
        return datagram;
    }
    let (content, epoch, body) = if i.is_multiple_of(2) {
        // A handshake record: ClientHello, message sequence 0, 100 octets of body.
        let mut hello = vec![1, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 100];
        hello.extend_from_slice(&[0xfe, 0xfd]);
        hello.resize(12 + 100, i);
        (22u8, 0u16, hello)
    } else {
        (23, 1, vec![i; 64])
    };
    let mut datagram = vec![content, 0xfe, 0xfd];
    datagram.extend_from_slice(&epoch.to_be_bytes());
    datagram.extend_from_slice(&[0, 0, 0, 0, 0, i]);
    datagram.extend_from_slice(&(body.len() as u16).to_be_bytes());
    datagram.extend_from_slice(&body);
    datagram
}

/// Datagrams of the `secure` session's protocol from a socket nobody authorised are counted
/// and dropped, and the session goes on.
fn unauthorised_datagrams_change_nothing(secure: Transport) {
    let server = smol_server();
    smol::block_on(async {
        let (a, b, _) = pair(&server, secure).await;
        let PeerPath::Session { addr: b_peer, .. } = a.peer_path(ip(&b)) else {
            panic!("not on a session: {:?}", a.peer_path(ip(&b)));
        };
        let unauthorised = |t: &Tunnel| match secure {
            Transport::QUIC => t.stats().peer_quic_unauthorised,
            _ => t.stats().peer_dtls_unauthorised,
        };
        let failures = b.stats().peer_session_failures;
        let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..100u8 {
            stranger
                .send_to(&stranger_datagram(secure, i), b_peer)
                .unwrap();
            // Paced, so that a loaded machine's socket buffer keeps them all.
            smol::Timer::after(Duration::from_millis(2)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while unauthorised(&b) < 100 && Instant::now() < deadline {
            smol::Timer::after(Duration::from_millis(10)).await;
        }
        let counted = unauthorised(&b);
        assert!((90..=100).contains(&counted), "{counted} of 100 counted");
        assert_eq!(b.stats().peer_sessions_refused, 0, "quinn never saw them");
        assert_eq!(b.stats().peer_session_failures, failures);
        let before = relayed(&server);
        let got = smol_flow(&a, &b, PACKETS, true).await;
        assert_eq!(got, (0..PACKETS).collect::<Vec<_>>());
        assert_eq!(relayed(&server) - before, 0);
        assert!(is_session(b.peer_path(ip(&a)), secure));
        assert_eq!(b.stats().client.peer.fallbacks, 0);
        a.close().await;
        b.close().await;
    });
    smol::block_on(server.shutdown());
}

#[test]
fn quic_from_an_unauthorised_socket_is_counted_and_changes_nothing() {
    unauthorised_datagrams_change_nothing(Transport::QUIC);
}

#[test]
fn dtls_from_an_unauthorised_socket_is_counted_and_changes_nothing() {
    unauthorised_datagrams_change_nothing(Transport::DTLS);
}

/// Clients offering `offers` agree on a plain UDP peer tunnel.
fn mixed_offer_agrees_on_plain_udp(offers: (Transport, Transport)) {
    let server = smol_server();
    smol::block_on(async {
        let a = smol_tunnel(config(&server, offers.0)).await;
        let b = smol_tunnel(config(&server, offers.1)).await;
        let got = smol_flow(&a, &b, PACKETS, true).await;
        assert_eq!(got.len(), PACKETS as usize);
        assert!(until_up(&a, &b).await);
        assert!(matches!(a.peer_path(ip(&b)), PeerPath::Peer(_)));
        assert!(matches!(b.peer_path(ip(&a)), PeerPath::Peer(_)));
        assert_eq!(a.peer_tunnels()[0].session, None);
        assert_eq!(a.stats().peer_sessions_open, 0);
        assert_eq!(b.stats().peer_sessions_open, 0);
        a.close().await;
        b.close().await;
    });
    smol::block_on(server.shutdown());
}

#[test]
fn a_mixed_offer_agrees_on_plain_udp() {
    mixed_offer_agrees_on_plain_udp((Transport::QUIC, Transport::UDP));
}

#[test]
fn a_dtls_and_a_quic_offer_agree_on_plain_udp() {
    mixed_offer_agrees_on_plain_udp((Transport::DTLS, Transport::QUIC));
}

/// Forged DTLS records from the peers' own sockets (as someone able to spoof their addresses
/// would send them) reach the DTLS endpoints, which count and drop them: `ChangeCipherSpec`
/// records of epoch 1 and application data records of epoch 1 that do not authenticate at the
/// destination, handshake records (a ClientHello) at the initiator, whose handshake is over.
/// The session goes on.
#[test]
fn forged_dtls_records_from_an_authorised_address_are_counted_and_change_nothing() {
    let server = smol_server();
    smol::block_on(async {
        let (a, b, _) = pair(&server, Transport::DTLS).await;
        let PeerPath::Session { addr: b_peer, .. } = a.peer_path(ip(&b)) else {
            panic!("not on a session: {:?}", a.peer_path(ip(&b)));
        };
        let PeerPath::Session { addr: a_peer, .. } = b.peer_path(ip(&a)) else {
            panic!("not on a session: {:?}", b.peer_path(ip(&a)));
        };
        let (before_a, before) = (a.stats(), b.stats());
        assert_eq!(before.peer_dtls_bad_records, 0, "{before:?}");
        assert_eq!(before_a.peer_dtls_bad_records, 0, "{before_a:?}");
        for i in 0..25u8 {
            // A ChangeCipherSpec record of epoch 1, to the destination.
            let mut ccs = stranger_datagram(Transport::DTLS, 1);
            ccs[0] = 20;
            ccs.truncate(13);
            ccs.push(1);
            ccs[11..13].copy_from_slice(&1u16.to_be_bytes());
            a.send_from_peer_socket(b_peer, &ccs).unwrap();
            // An application data record of epoch 1 it cannot authenticate, to the destination.
            a.send_from_peer_socket(b_peer, &stranger_datagram(Transport::DTLS, 2 * i + 1))
                .unwrap();
            // A ClientHello record, to the initiator.
            b.send_from_peer_socket(a_peer, &stranger_datagram(Transport::DTLS, 2 * i))
                .unwrap();
            smol::Timer::after(Duration::from_millis(2)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let counted = || {
            (
                b.stats().peer_dtls_bad_records,
                a.stats().peer_dtls_bad_records,
            )
        };
        while counted() != (50, 25) && Instant::now() < deadline {
            smol::Timer::after(Duration::from_millis(10)).await;
        }
        let (after_a, after) = (a.stats(), b.stats());
        println!(
            "forged DTLS records counted as bad: {} of 50 at the destination (25 \
             ChangeCipherSpec, 25 application data), {} of 25 ClientHello at the initiator",
            after.peer_dtls_bad_records, after_a.peer_dtls_bad_records
        );
        assert!(
            (45..=50).contains(&after.peer_dtls_bad_records),
            "{after:?}"
        );
        assert!(
            (22..=25).contains(&after_a.peer_dtls_bad_records),
            "{after_a:?}"
        );
        assert_eq!(
            after_a.peer_session_failures,
            before_a.peer_session_failures
        );
        assert_eq!(after.peer_dtls_unauthorised, before.peer_dtls_unauthorised);
        assert_eq!(after.peer_session_failures, before.peer_session_failures);
        let relayed_before = relayed(&server);
        let got = smol_flow(&a, &b, PACKETS, true).await;
        assert_eq!(got, (0..PACKETS).collect::<Vec<_>>());
        assert_eq!(relayed(&server) - relayed_before, 0);
        assert!(is_session(b.peer_path(ip(&a)), Transport::DTLS));
        a.close().await;
        b.close().await;
    });
    smol::block_on(server.shutdown());
}

/// Sends `count` datagrams of `size` octets from `a` to `b` (opted in, paced at 5 ms), and
/// returns the sequence numbers that arrived whole.
async fn sized_flow(a: &Tunnel, b: &Tunnel, port: u16, size: usize, count: u32) -> Vec<u32> {
    let rx = b.bind(port).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let tx = a.bind(0).unwrap();
    tx.set_peer_tunneling(true);
    let dst = SocketAddr::new(ip(b), port);
    let receive = async {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 70_000];
        let mut idle_since = Instant::now();
        while idle_since.elapsed() < Duration::from_secs(1) {
            if let Ok((n, _)) = rx.recv_from(&mut buf).await {
                idle_since = Instant::now();
                let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
                if n == size && buf[4..n].iter().all(|&x| x == 0xa5) {
                    got.push(seq);
                }
                if seq == count - 1 {
                    break;
                }
            }
        }
        got
    };
    let send = async {
        let mut payload = vec![0xa5u8; size];
        for seq in 0..count {
            payload[..4].copy_from_slice(&seq.to_be_bytes());
            tx.send_to(&payload, dst).await.unwrap();
            smol::Timer::after(Duration::from_millis(5)).await;
        }
    };
    futures_lite::future::zip(receive, send).await.0
}

/// The largest UDP payload whose data envelope (3 octets of header, 28 of inner IPv4 and UDP
/// headers) still fits one UDP datagram over IPv4 (65 507 octets) inside a DTLS 1.2 AES-GCM
/// record (37 octets more).
const DTLS_LARGEST: usize = 65_507 - 37 - 3 - 28;
/// The largest UDP payload the tunnel takes (an inner packet of 65 532 octets).
const LARGEST: usize = 65_535 - 3 - 28;

/// A server that relays inner packets as large as one envelope holds. Clients keep to the
/// server's bound on peer tunnels too (PROTOCOL §3.3), so full-size packets need this one.
fn jumbo_server() -> ServerHandle {
    let mut config = server_config();
    config.director.max_packet_len = tscf_core::wire::MAX_PAYLOAD_LEN;
    smol::block_on(tscf_runtime_smol::Server::start(config)).expect("smol server")
}

/// Full-size inner packets over a `secure` peer tunnel: 1200 octets of UDP payload, 1372 (an
/// inner packet of 1400, the relay's default bound), 8000, the largest whose DTLS record fits
/// a UDP datagram and the largest the tunnel takes. QUIC delivers them all (on the session's
/// stream when no QUIC datagram is that large); DTLS delivers all but the last, whose record
/// cannot be one UDP datagram: each of those is a counted send error, not a silent loss.
/// Nothing goes on the relay, and the tunnel stays on its session.
fn full_size_packets_cross_a_secured_peer_tunnel(secure: Transport) {
    let server = jumbo_server();
    smol::block_on(async {
        let (a, b, _) = pair(&server, secure).await;
        let too_large = a.bind(0).unwrap();
        too_large.set_peer_tunneling(true);
        let dst = SocketAddr::new(ip(&b), 9);
        // Past the tunnel's limit an IPv4 datagram leaves as fragments; past what IPv4 holds
        // (65,507 octets of UDP payload) it is refused.
        assert!(too_large.send_to(&vec![0; 65_508], dst).await.is_err());
        for (k, size) in [1200, 1372, 8000, DTLS_LARGEST, LARGEST]
            .into_iter()
            .enumerate()
        {
            let (before, relayed_before) = (a.stats(), relayed(&server));
            let got = sized_flow(&a, &b, 6000 + k as u16, size, 20).await;
            let after = a.stats();
            let errors = after.peer_send_errors - before.peer_send_errors;
            println!(
                "{secure} peer tunnel, {size} octets of UDP payload: {} of 20 delivered, \
                 {errors} counted send errors",
                got.len()
            );
            if secure == Transport::DTLS && size > DTLS_LARGEST {
                assert!(got.is_empty(), "{size}: {got:?}");
                assert_eq!(errors, 20, "{size}: every loss counted");
            } else {
                assert_eq!(got, (0..20).collect::<Vec<_>>(), "{secure} {size}");
                assert_eq!(errors, 0);
            }
            assert_eq!(
                relayed(&server) - relayed_before,
                0,
                "{size}: nothing relayed"
            );
            assert!(
                is_session(a.peer_path(ip(&b)), secure),
                "{size}: still on {secure}"
            );
        }
        a.close().await;
        b.close().await;
    });
    smol::block_on(server.shutdown());
}

#[test]
fn full_size_packets_cross_a_quic_peer_tunnel() {
    full_size_packets_cross_a_secured_peer_tunnel(Transport::QUIC);
}

#[test]
fn full_size_packets_cross_a_dtls_peer_tunnel_or_are_counted() {
    full_size_packets_cross_a_secured_peer_tunnel(Transport::DTLS);
}

/// A QUIC peer session sends an envelope no QUIC datagram can hold on its stream: 20 packets
/// of 8000 octets and 20 of the largest size all take the stream and arrive whole and in
/// order, while 160-octet packets before and after still go as QUIC datagrams. Packets of 1200
/// octets arrive too; whether they fit a datagram depends on the path MTU quinn found, so how
/// many took the stream is printed, not asserted.
#[test]
fn large_envelopes_take_the_quic_peer_session_stream() {
    let server = jumbo_server();
    smol::block_on(async {
        let (a, b, _) = pair(&server, Transport::QUIC).await;
        let stream = |t: &Tunnel| t.stats().peer_quic_stream_envelopes;
        for (k, size) in [160, 1200, 8000, LARGEST, 160].into_iter().enumerate() {
            let (before, relayed_before) = (stream(&a), relayed(&server));
            let got = sized_flow(&a, &b, 6100 + k as u16, size, 20).await;
            let on_stream = stream(&a) - before;
            println!("QUIC peer session, {size} octets: {on_stream} of 20 on the stream");
            assert_eq!(got, (0..20).collect::<Vec<_>>(), "{size}");
            if size != 1200 {
                assert_eq!(on_stream, if size > 1500 { 20 } else { 0 }, "{size}");
            }
            assert_eq!(relayed(&server) - relayed_before, 0);
        }
        assert_eq!(a.stats().peer_quic_stream_full, 0);
        assert!(is_session(a.peer_path(ip(&b)), Transport::QUIC));
        a.close().await;
        b.close().await;
    });
    smol::block_on(server.shutdown());
}

/// The first datagram of a QUIC handshake for a peer session (a quinn client's Initial),
/// captured at a socket of ours: what someone able to spoof a peer's address would replay.
fn captured_initial(server: &ServerHandle) -> Vec<u8> {
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let pinned = ClientTlsConfig::pinned(server.tls_fingerprint().unwrap());
    let mut rustls_config = (*tls::client_config(&pinned, tscf_runtime_smol::OS).unwrap()).clone();
    rustls_config.alpn_protocols = vec![b"tscf-peer".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(rustls_config).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let _connecting = endpoint
        .connect_with(config, sink.local_addr().unwrap(), "tscf-peer")
        .unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = sink.recv_from(&mut buf).unwrap();
    endpoint.close(0u32.into(), b"");
    buf[..n].to_vec()
}

/// A QUIC handshake that someone able to spoof the initiator's address starts while the
/// session is up (a replayed Initial from the initiator's own peer socket) is refused and
/// counted: it does not replace the open session, which goes on carrying the flow.
#[test]
fn a_spoofed_quic_handshake_does_not_replace_an_open_peer_session() {
    let server = smol_server();
    let initial = captured_initial(&server);
    assert!(
        initial.len() >= 1200,
        "an Initial: {} octets",
        initial.len()
    );
    smol::block_on(async {
        let (a, b, _) = pair(&server, Transport::QUIC).await;
        let PeerPath::Session { addr: b_peer, .. } = a.peer_path(ip(&b)) else {
            panic!("not on a session: {:?}", a.peer_path(ip(&b)));
        };
        let before = b.stats();
        a.send_from_peer_socket(b_peer, &initial).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while b.stats().peer_sessions_refused == before.peer_sessions_refused
            && Instant::now() < deadline
        {
            smol::Timer::after(Duration::from_millis(10)).await;
        }
        let after = b.stats();
        println!(
            "spoofed QUIC Initial: refused {}, session failures {}, peer tunnels down {}",
            after.peer_sessions_refused - before.peer_sessions_refused,
            after.peer_session_failures - before.peer_session_failures,
            after.client.peer.fallbacks - before.client.peer.fallbacks,
        );
        assert_eq!(
            after.peer_sessions_refused,
            before.peer_sessions_refused + 1
        );
        let relayed_before = relayed(&server);
        let got = smol_flow(&a, &b, PACKETS, true).await;
        assert_eq!(got, (0..PACKETS).collect::<Vec<_>>());
        assert_eq!(relayed(&server) - relayed_before, 0, "nothing relayed");
        assert!(is_session(b.peer_path(ip(&a)), Transport::QUIC));
        assert!(is_session(a.peer_path(ip(&b)), Transport::QUIC));
        assert_eq!(
            b.stats().client.peer.tunnels_up,
            before.client.peer.tunnels_up
        );
        a.close().await;
        b.close().await;
    });
    smol::block_on(server.shutdown());
}
