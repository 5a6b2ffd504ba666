//! Peer tunnels over real loopback sockets, per server transport: two clients' opted-in flow
//! moves from the relay to a direct peer tunnel, and back to the relay when the direct path is
//! cut; an opted-out flow never leaves the relay.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use tscf_core::client::PeerPath;
use tscf_core::wire::Transport;
use tscf_runtime_std::{Notification, PeerStreamListen, ServerHandle, Tunnel};

use crate::util::{plain_peers, rtp_flow_opted, server};

/// A tunnel offering plain peer tunnels, which these tests are about.
fn tunnel(server: &ServerHandle, transport: Transport) -> Tunnel {
    Tunnel::connect(tunnel_config(server, transport)).expect("tunnel connects")
}

fn tunnel_config(server: &ServerHandle, transport: Transport) -> tscf_runtime_std::TunnelConfig {
    plain_peers(crate::util::tunnel_config(server, transport))
}

/// 6 s of a 50 packet/s flow.
const PACKETS: u32 = 300;
/// Both sides report the peer tunnel up before this packet is sent (2 s into the flow).
const UP_BY: u32 = 100;
/// The direct path is cut just before this packet is sent (3.5 s into the flow).
const CUT_AT: u32 = 175;
/// The sender notices the cut within this: the silence timeout (1.5 s) and timer slack.
const DOWN_WITHIN: Duration = Duration::from_secs(2);
/// Packets lost at most in the gap: those sent on the dead path until the silence timeout
/// (1.5 s at 50 packets/s is 75), and some slack.
const MAX_LOST_IN_GAP: usize = 85;

/// Notifications of one tunnel, with the time they were read.
#[derive(Default)]
struct Log(Vec<(Instant, Notification)>);

impl Log {
    fn read(&mut self, tunnel: &Tunnel) {
        let now = Instant::now();
        self.0
            .extend(tunnel.notifications().try_iter().map(|n| (now, n)));
    }

    fn up(&self, peer: IpAddr) -> Option<(Instant, Duration)> {
        self.0.iter().find_map(|(at, n)| match n {
            Notification::PeerTunnelUp { peer: p, setup, .. } if *p == peer => Some((*at, *setup)),
            _ => None,
        })
    }

    fn down_after(&self, peer: IpAddr, since: Instant) -> Option<Instant> {
        self.0.iter().find_map(|(at, n)| match n {
            Notification::PeerTunnelDown { peer: p, .. } if *p == peer && *at >= since => Some(*at),
            _ => None,
        })
    }
}

fn relayed(server: &ServerHandle) -> u64 {
    server.stats().director.frames_relayed
}

fn switch_and_fall_back(transport: Transport) {
    let server = server(|_| {});
    let a = tunnel(&server, transport);
    let b = tunnel(&server, transport);
    let (ia, ib) = (
        IpAddr::V4(a.internal_ipv4().unwrap()),
        IpAddr::V4(b.internal_ipv4().unwrap()),
    );
    let (mut log_a, mut log_b) = (Log::default(), Log::default());
    let mut relayed_when_up = 0;
    let mut cut = None;
    let started = Instant::now();
    let got = rtp_flow_opted(&a, &b, PACKETS, true, |seq| {
        log_a.read(&a);
        log_b.read(&b);
        if seq == UP_BY {
            assert!(log_a.up(ib).is_some(), "{transport}: A's tunnel not up");
            assert!(log_b.up(ia).is_some(), "{transport}: B's tunnel not up");
            assert!(matches!(a.peer_path(ib), PeerPath::Peer(_)), "{transport}");
            assert!(matches!(b.peer_path(ia), PeerPath::Peer(_)), "{transport}");
            relayed_when_up = relayed(&server);
        }
        if seq == CUT_AT {
            assert_eq!(
                relayed(&server),
                relayed_when_up,
                "{transport}: frames relayed while the peer tunnel is up"
            );
            // Let the packet just sent arrive first: the cut comes between two packets.
            std::thread::sleep(Duration::from_millis(5));
            a.block_peer_traffic(true);
            b.block_peer_traffic(true);
            cut = Some(Instant::now());
        }
    });
    let cut = cut.unwrap();
    log_a.read(&a);
    log_b.read(&b);

    let (up_at, setup) = log_a.up(ib).unwrap();
    eprintln!(
        "{transport}: peer tunnel up {:?} into the flow (setup {setup:?}, B {:?})",
        up_at - started,
        log_b.up(ia).unwrap().1
    );
    let down_a = log_a
        .down_after(ib, cut)
        .expect("A's peer tunnel goes down");
    assert!(log_b.down_after(ia, cut).is_some(), "{transport}: B's too");
    eprintln!("{transport}: down {:?} after the cut", down_a - cut);
    assert!(
        down_a - cut <= DOWN_WITHIN,
        "{transport}: {:?}",
        down_a - cut
    );
    assert_eq!(a.peer_path(ib), PeerPath::Relay, "{transport}");

    // In order and without duplicates; complete across the switch to the peer tunnel.
    assert!(got.windows(2).all(|w| w[0] < w[1]), "{transport}: {got:?}");
    let before_cut: Vec<u32> = got.iter().copied().filter(|&s| s < CUT_AT).collect();
    assert_eq!(before_cut, (0..CUT_AT).collect::<Vec<_>>(), "{transport}");
    // Back on the relay: the flow continues to the end, with a bounded gap.
    assert_eq!(got.last(), Some(&(PACKETS - 1)), "{transport}: {got:?}");
    let lost = PACKETS as usize - got.len();
    eprintln!("{transport}: {lost} packets lost in the gap");
    assert!(lost <= MAX_LOST_IN_GAP, "{transport}: {lost} lost");
    let after = relayed(&server) - relayed_when_up;
    assert!(
        after >= u64::from(PACKETS - CUT_AT) - MAX_LOST_IN_GAP as u64,
        "{transport}: {after} frames relayed after the cut"
    );
    let (pa, pb) = (a.stats().client.peer, b.stats().client.peer);
    assert!(
        pa.data_sent >= u64::from(CUT_AT - UP_BY),
        "{transport}: {pa:?}"
    );
    assert!(
        pb.data_received >= u64::from(CUT_AT - UP_BY),
        "{transport}: {pb:?}"
    );
    assert!(b.stats().peer_blocked > 0 && a.stats().peer_blocked > 0);
    a.close();
    b.close();
    server.shutdown();
}

#[test]
fn tcp_flow_switches_to_peer_tunnel_and_back() {
    switch_and_fall_back(Transport::TCP);
}

#[test]
fn tls_flow_switches_to_peer_tunnel_and_back() {
    switch_and_fall_back(Transport::TLS);
}

#[test]
fn udp_flow_switches_to_peer_tunnel_and_back() {
    switch_and_fall_back(Transport::UDP);
}

#[test]
fn opted_out_flow_stays_on_the_relay() {
    const COUNT: u32 = 100;
    let server = server(|_| {});
    let a = tunnel(&server, Transport::UDP);
    let b = tunnel(&server, Transport::UDP);
    let ib = IpAddr::V4(b.internal_ipv4().unwrap());
    let got = rtp_flow_opted(&a, &b, COUNT, false, |_| {
        assert_eq!(a.peer_path(ib), PeerPath::Relay);
    });
    assert_eq!(got, (0..COUNT).collect::<Vec<_>>());
    assert!(relayed(&server) >= u64::from(COUNT));
    assert!(a.peer_tunnels().is_empty(), "{:?}", a.peer_tunnels());
    let notes: Vec<Notification> = a.notifications().try_iter().collect();
    assert!(
        !notes
            .iter()
            .any(|n| matches!(n, Notification::PeerTunnelUp { .. })),
        "{notes:?}"
    );
    assert_eq!(a.stats().client.peer.requests_sent, 0);
}

#[test]
fn udp_tunnel_discovers_its_address_with_the_servers_stun() {
    let server = server(|_| {});
    let a = tunnel(&server, Transport::UDP);
    let deadline = Instant::now() + Duration::from_secs(3);
    let public = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match a.notifications().recv_timeout(left) {
            Ok(Notification::NatDiscovered { public, .. }) => break public,
            Ok(_) => {}
            Err(e) => panic!("no NAT discovery: {e}"),
        }
    };
    // The same socket carries the server tunnel, so STUN sees what the director saw.
    assert_eq!(public, a.observed_address());
    assert!(server.stats().transport.stun_answered >= 1);
    assert_eq!(a.stats().client.peer.dropped_stun, 0);
}

// ---- stream peer paths (docs/PROTOCOL.md §7.7) ----

/// Two UDP tunnels whose UDP peer traffic is blocked; B listens for peer streams with `listen`
/// (on loopback) and announces `fingerprint` if given instead of its certificate's.
fn stream_pair(
    server: &ServerHandle,
    listen: fn(std::net::SocketAddr) -> PeerStreamListen,
    fingerprint: Option<[u8; 32]>,
) -> (Tunnel, Tunnel) {
    let a = tunnel(server, Transport::UDP);
    let mut config = tunnel_config(server, Transport::UDP);
    config.peer_streams = listen(([127, 0, 0, 1], 0).into());
    if let Some(peer) = &mut config.client.peer {
        peer.certificate_fingerprint = fingerprint;
    }
    let b = Tunnel::connect(config).expect("tunnel connects");
    a.block_peer_traffic(true);
    b.block_peer_traffic(true);
    (a, b)
}

fn stream_peer_tunnel(listen: fn(std::net::SocketAddr) -> PeerStreamListen, name: &str) {
    const COUNT: u32 = 150;
    const UP_BY: u32 = 75;
    let server = server(|_| {});
    let (a, b) = stream_pair(&server, listen, None);
    let (ia, ib) = (
        IpAddr::V4(a.internal_ipv4().unwrap()),
        IpAddr::V4(b.internal_ipv4().unwrap()),
    );
    let (mut log_a, mut log_b) = (Log::default(), Log::default());
    let mut relayed_when_up = 0;
    let got = rtp_flow_opted(&a, &b, COUNT, true, |seq| {
        log_a.read(&a);
        log_b.read(&b);
        if seq == UP_BY {
            assert!(log_a.up(ib).is_some(), "{name}: A's tunnel not up");
            assert!(log_b.up(ia).is_some(), "{name}: B's tunnel not up");
            assert!(
                matches!(a.peer_path(ib), PeerPath::Stream { .. }),
                "{name}: {:?}",
                a.peer_path(ib)
            );
            assert!(matches!(b.peer_path(ia), PeerPath::Stream { .. }), "{name}");
            relayed_when_up = relayed(&server);
        }
    });
    assert_eq!(
        got,
        (0..COUNT).collect::<Vec<_>>(),
        "{name}: complete, in order"
    );
    assert_eq!(
        relayed(&server),
        relayed_when_up,
        "{name}: frames relayed while the stream is up"
    );
    let (pa, pb) = (a.stats().client.peer, b.stats().client.peer);
    assert!(
        pa.streams_opened >= 1 && pb.streams_accepted >= 1,
        "{pa:?} {pb:?}"
    );
    assert!(pb.data_received >= u64::from(COUNT - UP_BY), "{pb:?}");

    // Closing the stream puts the flow back on the relay.
    let cut = Instant::now();
    a.drop_peer_streams();
    let deadline = cut + Duration::from_secs(2);
    while log_a.down_after(ib, cut).is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        log_a.read(&a);
    }
    assert!(
        log_a.down_after(ib, cut).is_some(),
        "{name}: A's tunnel goes down"
    );
    assert_eq!(a.peer_path(ib), PeerPath::Relay, "{name}");
    while log_b.down_after(ia, cut).is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        log_b.read(&b);
    }
    assert!(
        log_b.down_after(ia, cut).is_some(),
        "{name}: B's tunnel goes down"
    );
    a.close();
    b.close();
    server.shutdown();
}

#[test]
fn peer_tunnel_forms_over_a_tcp_stream_when_udp_is_blocked() {
    stream_peer_tunnel(PeerStreamListen::Tcp, "TCP");
}

#[test]
fn peer_tunnel_forms_over_a_tls_stream_when_udp_is_blocked() {
    stream_peer_tunnel(PeerStreamListen::Tls, "TLS");
}

#[test]
fn tls_peer_stream_with_a_wrong_certificate_is_refused() {
    const COUNT: u32 = 100;
    let server = server(|_| {});
    let (a, b) = stream_pair(&server, PeerStreamListen::Tls, Some([0x55; 32]));
    let ib = IpAddr::V4(b.internal_ipv4().unwrap());
    let got = rtp_flow_opted(&a, &b, COUNT, true, |_| {
        assert_eq!(a.peer_path(ib), PeerPath::Relay);
    });
    assert_eq!(got, (0..COUNT).collect::<Vec<_>>());
    assert!(relayed(&server) >= u64::from(COUNT));
    let pa = a.stats().client.peer;
    assert!(pa.streams_opened >= 1 && pa.stream_failures >= 1, "{pa:?}");
    let notes: Vec<Notification> = a.notifications().try_iter().collect();
    assert!(
        !notes
            .iter()
            .any(|n| matches!(n, Notification::PeerTunnelUp { .. })),
        "{notes:?}"
    );
    a.close();
    b.close();
    server.shutdown();
}

#[test]
fn a_quic_peer_transport_is_refused_at_connect_and_udp_peers_still_work() {
    let server = server(|_| {});
    // This runtime has no QUIC stack; DTLS peer sessions it runs (the core's endpoint).
    let transport = Transport::QUIC;
    let mut config = tunnel_config(&server, Transport::UDP);
    let peer = config.client.peer.as_mut().expect("peer tunneling on");
    peer.transport = transport;
    peer.certificate_fingerprint = Some([1; 32]);
    match Tunnel::connect(config) {
        Err(tscf_runtime_std::ConnectError::Io(e)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::Unsupported);
            assert!(e.to_string().contains(&transport.to_string()), "{e}");
        }
        Err(e) => panic!("{transport}: {e}"),
        Ok(_) => panic!("{transport}: accepted"),
    }
    // The same settings with UDP connect, and peer tunnels form.
    let a = tunnel(&server, Transport::UDP);
    let b = tunnel(&server, Transport::UDP);
    let ib = IpAddr::V4(b.internal_ipv4().unwrap());
    let got = rtp_flow_opted(&a, &b, 100, true, |_| {});
    assert_eq!(got.len(), 100);
    assert!(matches!(a.peer_path(ib), PeerPath::Peer(_)));
    a.close();
    b.close();
    server.shutdown();
}

// ---- probe reflection (docs/SECURITY.md, "Peer probing and peer tunnels") ----

/// Reads one envelope from a stream transport.
fn read_envelope(s: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut header = [0u8; 3];
    s.read_exact(&mut header).ok()?;
    let len = usize::from(u16::from_be_bytes([header[1], header[2]]));
    let mut out = header.to_vec();
    out.resize(len.max(3), 0);
    s.read_exact(&mut out[3..]).ok()?;
    Some(out)
}

/// Writes `msg` and reads envelopes until the response to it arrives.
/// Sends `msg` on `s`, signed under `key` (the client's direction of the tunnel's control
/// key) when given, and reads up to its answer: the octets sent, the answer's header, its
/// Peer Service Result and Control Key.
fn exchange(
    s: &mut std::net::TcpStream,
    msg: &tscf_core::wire::Message<'_>,
    key: Option<&[u8]>,
) -> (
    usize,
    tscf_core::wire::Header,
    Option<tscf_core::wire::PeerServiceResult>,
    Option<[u8; 32]>,
) {
    use std::io::Write;
    use tscf_core::wire::{Envelope, Message};
    let mut bytes = Vec::new();
    match key {
        Some(key) => msg.encode_envelope_with_integrity(key, &mut bytes).unwrap(),
        None => msg.encode_envelope(&mut bytes).unwrap(),
    }
    s.write_all(&bytes).unwrap();
    loop {
        let env = read_envelope(s).expect("an answer");
        let env = Envelope::decode_datagram(&env).unwrap();
        let Ok(answer) = Message::decode(env.payload) else {
            continue;
        };
        if answer.header.sequence == msg.header.sequence && !answer.header.message_type.is_request()
        {
            let t = &answer.tlvs;
            return (
                bytes.len(),
                answer.header,
                t.peer_service_result,
                t.control_key,
            );
        }
    }
}

/// The attack of a malicious client: its tunnel asks, again and again, for a peer tunnel to
/// an innocent client, naming as its candidates eight UDP ports of a victim. The innocent
/// client probes them. Whatever the attacker does, the victim gets at most three octets of
/// probes per octet of the requests the director forwarded.
#[test]
fn probe_reflection_amplification_is_bounded() {
    use std::net::{SocketAddr, TcpStream, UdpSocket};
    use tscf_core::wire::{
        Candidate, CandidateKind, ConnectionInfo, Message, MessageType, PeerServiceResult,
        ServiceAction, ServiceType,
    };
    const REQUESTS: u32 = 30;

    let server = server(|_| {});
    // The innocent client, peer-capable (it announces its candidates).
    let reflector = tunnel(&server, Transport::UDP);
    let target = IpAddr::V4(reflector.internal_ipv4().unwrap());
    // The victim: eight UDP ports on the reflector's host, counting what reaches them.
    let victims: Vec<UdpSocket> = (0..8)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let candidates: Vec<SocketAddr> = victims.iter().map(|v| v.local_addr().unwrap()).collect();

    // The attacker: a raw tunnel over TCP.
    let mut s = TcpStream::connect(server.local_addrs().tcp[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut configure = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
    configure.tlvs.client_nonce = Some(*b"attacker's nonce");
    let (_, header, _, key) = exchange(&mut s, &configure, None);
    let tunnel_id = header.tunnel_id;
    assert_ne!(tunnel_id, 0, "the attacker has a tunnel");
    // An admitted client keys its control messages like any other.
    let key = tscf_core::wire::ControlKey::new(&key.expect("a control key")).client_to_director();

    let (mut forwarded_bytes, mut forwarded, mut sent_bytes) = (0usize, 0u32, 0usize);
    for n in 0..REQUESTS {
        let mut request = Message::new(MessageType::CLIENT_SERVICE_REQUEST, 100 + n, tunnel_id);
        request.tlvs.service_type = Some(ServiceType::PEER);
        request.tlvs.service_action = Some(ServiceAction::ESTABLISH);
        request.tlvs.peer_internal_address = Some(target);
        request.tlvs.connection_info = Some(ConnectionInfo {
            transport: Transport::UDP,
            addr: candidates[0],
        });
        for &addr in &candidates {
            request.tlvs.candidates.push(Candidate {
                kind: CandidateKind::HOST,
                transport: Transport::UDP,
                addr,
            });
        }
        let (len, answer, result, _) = exchange(&mut s, &request, Some(&key));
        sent_bytes += len;
        // Answered Available (from the reflector's announcement): the director forwarded it.
        if answer.message_type == MessageType::CLIENT_SERVICE_RESPONSE
            && result == Some(PeerServiceResult::AVAILABLE)
        {
            forwarded += 1;
            forwarded_bytes += len;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(forwarded >= 1, "the director forwarded some requests");
    assert_eq!(
        u64::from(forwarded),
        server.stats().director.peer.requests_forwarded
    );

    // Every negotiation the attack started ends (the establishment bound); then the victim's
    // sockets hold everything that was ever sent to them.
    let deadline = Instant::now() + Duration::from_secs(20);
    while reflector
        .peer_tunnels()
        .iter()
        .any(|t| t.state != tscf_core::client::PeerTunnelState::Fallback)
    {
        assert!(Instant::now() < deadline, "{:?}", reflector.peer_tunnels());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut victim_bytes = 0usize;
    let mut buf = [0u8; 2048];
    for v in &victims {
        v.set_nonblocking(true).unwrap();
        while let Ok(n) = v.recv(&mut buf) {
            victim_bytes += n;
        }
    }
    let probes = reflector.stats().client.peer.probes_sent;
    eprintln!(
        "{REQUESTS} requests ({sent_bytes} octets), {forwarded} forwarded ({forwarded_bytes} \
         octets); the victim got {victim_bytes} octets ({probes} probes sent): \
         {:.2} per forwarded octet",
        victim_bytes as f64 / forwarded_bytes as f64
    );
    assert!(
        victim_bytes <= 3 * forwarded_bytes,
        "amplification {:.1}",
        victim_bytes as f64 / forwarded_bytes as f64
    );
    reflector.close();
    server.shutdown();
}
