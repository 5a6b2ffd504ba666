//! Unit tests of the client host: against a server host in memory, and against scripted
//! hostile datagrams.

use std::sync::Mutex;

use super::*;
use crate::inner::Datagrams;
use crate::io::Connect;
use crate::server::{LocalAddrs, ServerConfig, ServerEvent, ServerHost};
use crate::tls::{ClientTlsConfig, Os, PeerIdentity, ServerVerification};

#[allow(clippy::disallowed_methods)] // The base instant only anchors virtual time.
fn t0() -> Instant {
    Instant::now()
}

const SERVER_UDP: &str = "192.0.2.1:4440";
const SERVER_TCP: &str = "192.0.2.1:4441";

/// An inner socket's queue behind a plain mutex.
#[derive(Debug)]
struct Queue(Mutex<Datagrams>);

impl DatagramQueue for Queue {
    fn push(&self, payload: &[u8], from: SocketAddr) -> bool {
        self.0.lock().expect("not poisoned").push(payload, from)
    }
    fn wake(&self, _pushed: usize) {}
    fn close(&self) {
        self.0.lock().expect("not poisoned").close();
    }
}

impl Queue {
    fn pop(&self) -> Option<(Vec<u8>, SocketAddr)> {
        let mut buf = [0u8; 2048];
        let got = self.0.lock().expect("not poisoned").pop(&mut buf);
        got.expect("open")
            .map(|(n, from)| (buf[..n].to_vec(), from))
    }
}

fn no_files() -> Os {
    Os {
        read_file: |_| Err(io::Error::other("no files here")),
        generate_key: rcgen::KeyPair::generate,
        fill_random: |_| Err(io::ErrorKind::Unsupported.into()),
    }
}

/// What a runtime sets up: the peer socket, and the certificate of secured peer paths.
fn setup(peer_socket: &str) -> Setup {
    Setup {
        peer_socket: peer_socket.parse().expect("addr"),
        route_source: None,
        stream_listener: None,
        peer_identity: Some(PeerIdentity::generate(no_files()).expect("a certificate")),
        dtls: None,
        server_tls: None,
        quic: false,
    }
}

fn config(server: &str, transport: Transport) -> TunnelConfig {
    TunnelConfig::new(vec![ServerEndpoint {
        addr: server.parse().expect("addr"),
        transport,
    }])
}

/// Clients and a server host wired together in memory: datagrams go straight to their
/// destination, streams are pipes whose bytes are delivered on the next pump.
struct Net {
    server: ServerHost,
    clients: Vec<Client>,
    now: Instant,
    buf: Vec<u8>,
    /// Client stream id ↔ server stream id, with the client's index.
    pipes: Vec<(usize, StreamId, StreamId)>,
}

struct Client {
    host: ClientHost<Queue>,
    addr: SocketAddr,
    notes: Vec<Notification>,
}

impl Net {
    fn new(server: ServerConfig) -> Self {
        let local = LocalAddrs {
            udp: vec![SERVER_UDP.parse().expect("addr")],
            tcp: vec![SERVER_TCP.parse().expect("addr")],
            ..LocalAddrs::default()
        };
        let now = t0();
        Self {
            server: ServerHost::new(server, &local, None, now).expect("server"),
            clients: Vec::new(),
            now,
            buf: Vec::new(),
            pipes: Vec::new(),
        }
    }

    fn add(&mut self, config: TunnelConfig, addr: &str) -> usize {
        let host = ClientHost::new(config, setup(addr), self.now).expect("client");
        self.clients.push(Client {
            host,
            addr: addr.parse().expect("addr"),
            notes: Vec::new(),
        });
        self.clients.len() - 1
    }

    /// Moves everything until nothing moves.
    fn pump(&mut self) {
        for _ in 0..100 {
            let mut moved = false;
            for i in 0..self.clients.len() {
                moved |= self.pump_client(i);
            }
            moved |= self.pump_server();
            if !moved {
                return;
            }
        }
        panic!("the hosts never settle");
    }

    /// Moves virtual time on by `by`, firing every host's timers on the way.
    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        self.pump();
        loop {
            let next = self
                .clients
                .iter()
                .filter_map(|c| c.host.poll_timeout())
                .chain(self.server.poll_timeout())
                .min()
                .filter(|at| *at <= until);
            let Some(at) = next else {
                break;
            };
            self.now = self.now.max(at);
            let now = self.now;
            for c in &mut self.clients {
                if c.host.poll_timeout().is_some_and(|t| t <= now) {
                    c.host.handle_timeout(now);
                }
            }
            if self.server.poll_timeout().is_some_and(|t| t <= now) {
                self.server.handle_timeout(now);
            }
            self.pump();
        }
        self.now = until;
    }

    fn pump_client(&mut self, i: usize) -> bool {
        let mut moved = false;
        let now = self.now;
        loop {
            let mut direct = Vec::new();
            let client = &mut self.clients[i];
            while let Some(t) = client.host.poll_transmit(now, &mut self.buf) {
                moved = true;
                match t {
                    Transmit::Datagram { socket, to } => {
                        assert_eq!(socket, PEER_SOCKET);
                        let from = client.addr;
                        let data = self.buf.clone();
                        if to == SERVER_UDP.parse::<SocketAddr>().expect("addr") {
                            self.server.handle_input(
                                now,
                                Input::Datagram {
                                    socket: SocketId(0),
                                    from,
                                    data: &data,
                                },
                            );
                        } else {
                            // The direct path between two clients.
                            direct.push((to, from, data));
                        }
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            for (to, from, data) in direct {
                if let Some(peer) = self.clients.iter_mut().find(|c| c.addr == to) {
                    peer.host.handle_input(
                        now,
                        Input::Datagram {
                            socket: PEER_SOCKET,
                            from,
                            data: &data,
                        },
                    );
                }
            }
            let client = &mut self.clients[i];
            let Some(event) = client.host.poll_event() else {
                return moved;
            };
            moved = true;
            match event {
                TunnelEvent::Io(IoEvent::Connect(Connect { stream, to, .. })) => {
                    assert_eq!(to, SERVER_TCP.parse::<SocketAddr>().expect("addr"));
                    let server_stream = self
                        .server
                        .accept_stream(now, Transport::TCP, client.addr)
                        .expect("admitted");
                    self.server.handle_input(
                        now,
                        Input::StreamOpen {
                            stream: server_stream,
                            verified_identity: false,
                        },
                    );
                    client.host.handle_input(
                        now,
                        Input::StreamOpen {
                            stream,
                            verified_identity: false,
                        },
                    );
                    self.pipes.push((i, stream, server_stream));
                }
                TunnelEvent::Io(IoEvent::StreamReady { stream }) => {
                    let mut bytes = Vec::new();
                    while client.host.take_output(stream, &mut bytes) {
                        let to = self
                            .pipes
                            .iter()
                            .find(|p| p.0 == i && p.1 == stream)
                            .expect("a pipe")
                            .2;
                        self.server.handle_input(
                            now,
                            Input::StreamData {
                                stream: to,
                                data: &bytes,
                            },
                        );
                    }
                }
                TunnelEvent::Io(IoEvent::CloseStream { stream, .. }) => {
                    if let Some(p) = self.pipes.iter().position(|p| p.0 == i && p.1 == stream) {
                        let (_, c, s) = self.pipes.remove(p);
                        self.server.handle_input(
                            now,
                            Input::StreamClosed {
                                stream: s,
                                error: None,
                                detail: None,
                            },
                        );
                        client.host.handle_input(
                            now,
                            Input::StreamClosed {
                                stream: c,
                                error: None,
                                detail: None,
                            },
                        );
                    }
                }
                TunnelEvent::Notification(note) => client.notes.push(note),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn pump_server(&mut self) -> bool {
        let mut moved = false;
        let now = self.now;
        loop {
            while let Some(t) = self.server.poll_transmit(now, &mut self.buf) {
                moved = true;
                let Transmit::Datagram { to, .. } = t else {
                    panic!("unexpected {t:?}");
                };
                let Some(client) = self.clients.iter_mut().find(|c| c.addr == to) else {
                    continue;
                };
                let from = SERVER_UDP.parse().expect("addr");
                let data = self.buf.clone();
                client.host.handle_input(
                    now,
                    Input::Datagram {
                        socket: PEER_SOCKET,
                        from,
                        data: &data,
                    },
                );
            }
            let Some(event) = self.server.poll_event() else {
                return moved;
            };
            moved = true;
            match event {
                ServerEvent::Io(IoEvent::StreamReady { stream }) => {
                    let mut bytes = Vec::new();
                    while self.server.take_output(now, stream, &mut bytes) {
                        let (i, to, _) =
                            *self.pipes.iter().find(|p| p.2 == stream).expect("a pipe");
                        self.clients[i].host.handle_input(
                            now,
                            Input::StreamData {
                                stream: to,
                                data: &bytes,
                            },
                        );
                    }
                }
                ServerEvent::Io(other) => panic!("unexpected {other:?}"),
                // No cluster here.
                ServerEvent::Director(_) | ServerEvent::Registry { .. } => {}
            }
        }
    }

    fn socket(&mut self, i: usize, port: u16) -> Arc<Queue> {
        let (_, queue) = self.clients[i]
            .host
            .bind(port, |len| Queue(Mutex::new(Datagrams::new(len))))
            .expect("bind");
        queue
    }

    fn ipv4(&self, i: usize) -> Ipv4Addr {
        self.clients[i]
            .host
            .client()
            .internal_ipv4()
            .expect("a tunnel")
    }
}

#[test]
fn clients_on_udp_and_tcp_get_tunnels_and_exchange_datagrams_through_the_server() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.add(config(SERVER_UDP, Transport::UDP), "198.51.100.1:5000");
    let b = net.add(config(SERVER_TCP, Transport::TCP), "198.51.100.2:5000");
    net.pump();
    for i in [a, b] {
        assert_eq!(net.clients[i].host.state(), ClientState::Connected);
        assert!(matches!(
            net.clients[i].notes.first(),
            Some(Notification::Connected(_))
        ));
    }
    let qa = net.socket(a, 5004);
    let qb = net.socket(b, 6000);
    let (ipa, ipb) = (net.ipv4(a), net.ipv4(b));
    let now = net.now;
    net.clients[a]
        .host
        .send_to(now, 5004, SocketAddr::from((ipb, 6000)), b"over udp")
        .expect("sent");
    net.pump();
    assert_eq!(
        qb.pop(),
        Some((b"over udp".to_vec(), SocketAddr::from((ipa, 5004))))
    );
    net.clients[b]
        .host
        .send_to(now, 6000, SocketAddr::from((ipa, 5004)), b"over tcp")
        .expect("sent");
    net.pump();
    assert_eq!(
        qa.pop(),
        Some((b"over tcp".to_vec(), SocketAddr::from((ipb, 6000))))
    );
    // A datagram for a port nobody bound is counted, not lost silently.
    net.clients[a]
        .host
        .send_to(now, 5004, SocketAddr::from((ipb, 7000)), b"nobody")
        .expect("sent");
    net.pump();
    assert_eq!(net.clients[b].host.stats().unbound_port, 1);
}

#[test]
fn a_lost_stream_transport_is_reported_and_the_client_reattaches_on_a_new_one() {
    let mut net = Net::new(ServerConfig::default());
    let b = net.add(config(SERVER_TCP, Transport::TCP), "198.51.100.2:5000");
    net.pump();
    let id = net.clients[b].host.client().tunnel_id();
    let (_, stream, server_stream) = net.pipes.pop().expect("a pipe");
    let now = net.now;
    net.server.handle_input(
        now,
        Input::StreamClosed {
            stream: server_stream,
            error: Some(StreamError::Io),
            detail: None,
        },
    );
    net.clients[b].host.handle_input(
        now,
        Input::StreamClosed {
            stream,
            error: Some(StreamError::Io),
            detail: None,
        },
    );
    net.pump();
    let notes = &net.clients[b].notes;
    assert!(notes.contains(&Notification::TransportLost), "{notes:?}");
    let lost = notes
        .iter()
        .position(|n| *n == Notification::TransportLost)
        .expect("lost");
    assert!(
        notes[lost..]
            .iter()
            .any(|n| matches!(n, Notification::Reattached(info) if Some(info.tunnel_id) == id)),
        "{notes:?}"
    );
    assert_eq!(
        net.clients[b].host.last_failure(),
        Some("192.0.2.1:4441: connection lost")
    );
}

#[test]
fn the_peer_socket_counts_what_no_session_layer_may_see() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.add(config(SERVER_UDP, Transport::UDP), "198.51.100.1:5000");
    net.pump();
    let stranger: SocketAddr = "203.0.113.9:1234".parse().expect("addr");
    let now = net.now;
    let host = &mut net.clients[a].host;
    // No QUIC or DTLS peer sessions: such datagrams go to the peer agent, which drops them.
    host.handle_input(
        now,
        Input::Datagram {
            socket: PEER_SOCKET,
            from: stranger,
            data: &[0xc0, 0, 0, 0, 1],
        },
    );
    // With the peer socket blocked, nothing reaches anything, and it is counted.
    host.set_peer_blocked(true);
    host.handle_input(
        now,
        Input::Datagram {
            socket: PEER_SOCKET,
            from: stranger,
            data: &[4, 0, 3],
        },
    );
    assert_eq!(host.stats().peer_blocked, 1);
    // The server's own datagrams still get through a blocked peer socket.
    host.set_peer_blocked(false);
    assert_eq!(host.state(), ClientState::Connected);
    // An inbound QUIC session from an address nobody authorised is refused and counted.
    assert_eq!(host.accept_quic_session(stranger), None);
    assert_eq!(host.stats().peer_sessions_refused, 0, "no QUIC here at all");
}

#[test]
fn quic_peer_datagrams_reach_the_runtime_only_from_authorised_addresses() {
    let mut peer_config = config(SERVER_UDP, Transport::UDP);
    if let Some(peer) = &mut peer_config.client.peer {
        peer.transport = Transport::QUIC;
        peer.certificate_fingerprint = Some([1; 32]);
    }
    let mut s = setup("198.51.100.1:5000");
    s.quic = true;
    let now = t0();
    let mut host: ClientHost<Queue> = ClientHost::new(peer_config, s, now).expect("client");
    let stranger: SocketAddr = "203.0.113.9:1234".parse().expect("addr");
    let initial = [0xc0u8, 0, 0, 0, 1, 2, 3];
    host.handle_input(
        now,
        Input::Datagram {
            socket: PEER_SOCKET,
            from: stranger,
            data: &initial,
        },
    );
    assert_eq!(host.stats().peer_quic_unauthorised, 1);
    assert_eq!(host.take_quic_datagram(&mut [0; 64]), None);
    assert_eq!(host.accept_quic_session(stranger), None);
    assert_eq!(host.stats().peer_sessions_refused, 1);
    // Authorised (as the core does after a verified probe): datagrams queue, and one
    // handshake is accepted with the pinned fingerprint; a second from the same address
    // (a replayed Initial) is refused.
    host.authorise_session(now, stranger, Transport::QUIC, [7; 32]);
    host.handle_input(
        now,
        Input::Datagram {
            socket: PEER_SOCKET,
            from: stranger,
            data: &initial,
        },
    );
    let mut buf = [0u8; 64];
    assert_eq!(
        host.take_quic_datagram(&mut buf),
        Some((initial.len(), stranger))
    );
    assert_eq!(host.poll_event(), Some(TunnelEvent::QuicReadable));
    assert_eq!(host.accept_quic_session(stranger), Some([7; 32]));
    assert_eq!(host.accept_quic_session(stranger), None);
    assert_eq!(host.stats().peer_sessions_refused, 2);
}

#[test]
fn a_dtls_transport_binds_a_socket_of_its_own_and_handshakes_on_it() {
    let tls = ClientTlsConfig {
        verification: ServerVerification::Insecure,
        server_name: None,
        client_identity: None,
    };
    let mut c = config("192.0.2.1:4445", Transport::DTLS);
    c.tls = Some(tls.clone());
    let mut s = setup("198.51.100.1:5000");
    s.dtls = Some(dtls::ClientSettings::new(&tls, no_files()).expect("settings"));
    let now = t0();
    let mut host: ClientHost<Queue> = ClientHost::new(c, s, now).expect("client");
    let mut buf = Vec::new();
    assert_eq!(host.poll_transmit(now, &mut buf), None);
    let Some(TunnelEvent::Io(IoEvent::BindSocket { socket, remote })) = host.poll_event() else {
        panic!("a socket first");
    };
    assert_ne!(socket, PEER_SOCKET);
    assert_eq!(
        remote,
        "192.0.2.1:4445".parse::<SocketAddr>().expect("addr")
    );
    host.handle_input(
        now,
        Input::SocketBound {
            socket,
            local: "0.0.0.0:6000".parse().expect("addr"),
        },
    );
    let t = host.poll_transmit(now, &mut buf).expect("a ClientHello");
    assert_eq!(t, Transmit::Datagram { socket, to: remote });
    assert_eq!(DatagramKind::of(&buf), DatagramKind::Dtls);
    // Giving up the attempt closes that socket.
    assert!(host.lose_server_transport(now));
    let mut closed = false;
    while let Some(event) = host.poll_event() {
        closed |= event == TunnelEvent::Io(IoEvent::CloseSocket { socket });
    }
    assert!(closed);
}

/// An off-path attacker who knows the direct path between two clients sends one of them a data
/// envelope as if from the other. With the defaults a peer tunnel runs inside a DTLS session
/// (plain peer tunnels are off unless asked for), so the plain datagram never reaches an inner
/// socket. (On loopback, sending from another client's address takes raw sockets; in memory it
/// is one input, and the decision is the core's.)
#[test]
fn forged_data_on_plain_peer_tunnel_is_dropped() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.add(config(SERVER_UDP, Transport::UDP), "198.51.100.1:5000");
    let b = net.add(config(SERVER_UDP, Transport::UDP), "198.51.100.2:5000");
    net.pump();
    let (qa, _qb) = (net.socket(a, 5004), net.socket(b, 5004));
    let (ipa, ipb) = (net.ipv4(a), net.ipv4(b));
    for i in [a, b] {
        net.clients[i].host.set_peer_tunneling(5004, true);
    }
    // B's media to A: the peer tunnel comes up on the way.
    for _ in 0..100 {
        let now = net.now;
        net.clients[b]
            .host
            .send_to(now, 5004, SocketAddr::from((ipa, 5004)), b"media")
            .expect("sent");
        net.advance(Duration::from_millis(20));
        if net.clients[a].host.peer_path(IpAddr::V4(ipb)) != PeerPath::Relay
            && net.clients[b].host.peer_path(IpAddr::V4(ipa)) != PeerPath::Relay
        {
            break;
        }
    }
    let path = net.clients[a].host.peer_path(IpAddr::V4(ipb));
    assert_ne!(path, PeerPath::Relay, "the peer tunnel is up");
    while qa.pop().is_some() {}

    let mut packet = Vec::new();
    etherparse::PacketBuilder::ipv4(ipb.octets(), ipa.octets(), 64)
        .udp(5004, 5004)
        .write(&mut packet, b"forged")
        .expect("a packet");
    let mut forged = Vec::new();
    crate::wire::Envelope::encode(EnvelopeType::DATA, &packet, &mut forged).expect("fits");
    let b_addr = net.clients[b].addr;
    let now = net.now;
    net.clients[a].host.handle_input(
        now,
        Input::Datagram {
            socket: PEER_SOCKET,
            from: b_addr,
            data: &forged,
        },
    );
    net.pump();
    while let Some((payload, from)) = qa.pop() {
        assert_ne!(
            payload, b"forged",
            "forged data from {from} delivered on {path:?}"
        );
    }
    assert!(
        matches!(
            path,
            PeerPath::Session {
                transport: Transport::DTLS,
                ..
            }
        ),
        "{path:?}"
    );
    assert!(
        net.clients[a]
            .host
            .stats()
            .client
            .peer
            .dropped_plain_on_secure
            >= 1
    );
}

#[test]
fn inner_tcp_crosses_the_server_and_the_tap_takes_what_nothing_claims() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.add(config(SERVER_UDP, Transport::UDP), "198.51.100.1:5000");
    let b = net.add(config(SERVER_UDP, Transport::UDP), "198.51.100.2:5000");
    net.pump();
    let (ipa, ipb) = (net.ipv4(a), net.ipv4(b));
    let ready: Arc<dyn inner::Ready> = Arc::new(());
    let listening = net.clients[b].host.tcp.listen(7000, ready.clone());
    assert_eq!(listening.expect("listens"), 7000);
    let now = net.now;
    let host = &mut net.clients[a].host;
    let dst = SocketAddr::from((ipb, 7000));
    let id = host.tcp.connect(now, &host.client, dst, ready.clone());
    let id = id.expect("connecting");
    net.pump();
    assert_eq!(
        net.clients[a].host.tcp.connected(id).expect("made"),
        Some(())
    );
    let accepted = net.clients[b].host.tcp.accept(7000, ready.clone());
    let accepted = accepted.expect("listening").expect("a connection");
    let addrs = net.clients[b].host.tcp.addrs(accepted).expect("addresses");
    assert_eq!(addrs.0, dst);
    assert_eq!(addrs.1.ip(), IpAddr::V4(ipa));

    // 300 kB, more than the windows hold, in order and whole.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (mut sent, mut got, mut buf) = (0, Vec::new(), vec![0u8; 65_536]);
    for _ in 0..1000 {
        if got.len() == data.len() {
            break;
        }
        let tcp = &mut net.clients[a].host.tcp;
        if let Some(n) = tcp.send(id, &data[sent..]).expect("open") {
            sent += n;
        }
        net.pump();
        let tcp = &mut net.clients[b].host.tcp;
        while let Some(n @ 1..) = tcp.recv(accepted, &mut buf).expect("open") {
            got.extend_from_slice(&buf[..n]);
        }
        net.pump();
    }
    assert!(got == data, "{} of {} octets", got.len(), data.len());

    // With a tap, what no socket, stream or listener claims goes to it whole.
    let tap = net.clients[b]
        .host
        .tap(|len| Queue(Mutex::new(Datagrams::new(len))))
        .expect("one tap");
    assert!(net.clients[b]
        .host
        .tap(|len| Queue(Mutex::new(Datagrams::new(len))))
        .is_err());
    let bound = net.socket(b, 6000);
    let qa = net.socket(a, 5004);
    for port in [6000, 9999] {
        let to = SocketAddr::from((ipb, port));
        net.clients[a]
            .host
            .send_to(now, 5004, to, b"x")
            .expect("sent");
    }
    let host = &mut net.clients[a].host;
    let unclaimed = SocketAddr::from((ipb, 7001));
    host.tcp
        .connect(now, &host.client, unclaimed, ready)
        .expect("a SYN");
    net.pump();
    assert_eq!(bound.pop().map(|(d, _)| d), Some(b"x".to_vec()));
    let (packet, _) = tap.pop().expect("the unbound datagram");
    assert_eq!(inner::parse_udp(&packet).expect("UDP").port, 9999);
    let (packet, _) = tap.pop().expect("the SYN");
    let syn = crate::wire::InnerPacket::parse(&packet).expect("a packet");
    assert_eq!(syn.ports().map(|p| p.1), Some(7001));
    assert!(tap.pop().is_none(), "the stream on 7000 stays the stack's");

    // And the tap's side sends whole packets.
    let mut packet = Vec::new();
    etherparse::PacketBuilder::ipv4(ipb.octets(), ipa.octets(), 64)
        .udp(9999, 5004)
        .write(&mut packet, b"from the kernel")
        .expect("a packet");
    net.clients[b].host.send_packet(now, &packet).expect("sent");
    net.pump();
    assert_eq!(
        qa.pop(),
        Some((b"from the kernel".to_vec(), SocketAddr::from((ipb, 9999))))
    );
}

#[test]
fn a_tunnel_that_never_comes_up_says_what_it_tried_and_that_nothing_came_back() {
    let mut net = Net::new(ServerConfig::default());
    // Nobody is at that address: every datagram to it is lost.
    let a = net.add(
        config("192.0.2.99:4440", Transport::UDP),
        "198.51.100.1:5000",
    );
    net.advance(Duration::from_secs(10));
    let host = &net.clients[a].host;
    let sent = host.stats().client.configuration_requests_sent;
    assert!(sent > 1, "retransmitted: {sent}");
    let error = host
        .connect_result(Duration::from_secs(10), true)
        .expect("timed out")
        .expect_err("no tunnel");
    let text = error.to_string();
    assert_eq!(
        text,
        format!(
            "no tunnel after 10s: sent {sent} Configuration Requests to 192.0.2.99:4440 over \
             UDP, no answer: is the server running, and can its answers reach this host?"
        )
    );
}

#[test]
fn an_inner_socket_returns_and_counts_every_send_it_cannot_make() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.add(config(SERVER_UDP, Transport::UDP), "198.51.100.1:5000");
    let _qa = net.socket(a, 5004);
    let now = net.now;
    let to: SocketAddr = "10.77.0.9:6000".parse().expect("addr");
    // Before the tunnel is up there is no source address.
    let e = net.clients[a]
        .host
        .send_to(now, 5004, to, b"early")
        .expect_err("no tunnel");
    assert_eq!(e.kind(), io::ErrorKind::NotConnected);
    assert_eq!(
        net.clients[a]
            .host
            .stats()
            .client
            .send_refused_not_connected,
        1
    );
    net.pump();
    let host = &mut net.clients[a].host;
    let max = host.client.tunnel_info().expect("connected").max_packet_len;
    let big = vec![7; max + 100];
    // IPv4: fragmented, nothing refused.
    host.send_to(now, 5004, to, &big).expect("fragmented");
    // IPv6 is not fragmented: refused with an error that says why, and counted.
    assert!(
        host.client.internal_ipv6().is_some(),
        "the default pools give IPv6 too"
    );
    let to6 = SocketAddr::from((std::net::Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 9), 6000));
    let e = host.send_to(now, 5004, to6, &big).expect_err("too large");
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert!(
        e.to_string().contains("exceeds the tunnel's maximum"),
        "{e}"
    );
    assert!(e.to_string().contains("not fragmented"), "{e}");
    assert_eq!(host.stats().client.send_refused_too_large, 1);
    // Past what one UDP datagram holds.
    let e = host
        .send_to(now, 5004, to, &vec![0; 70_000])
        .expect_err("no such datagram");
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(host.stats().client.send_refused_too_large, 2);
}

/// A batch from the tap's side with a packet the tunnel refuses in the middle (not from the
/// tunnel's address): the packets after it still go.
#[test]
fn a_refused_packet_does_not_take_the_rest_of_its_batch_down() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.add(config(SERVER_UDP, Transport::UDP), "198.51.100.1:5000");
    let b = net.add(config(SERVER_UDP, Transport::UDP), "198.51.100.2:5000");
    net.pump();
    let (ipa, ipb) = (net.ipv4(a), net.ipv4(b));
    let at_b = net.socket(b, 6000);
    let packet = |src: Ipv4Addr, payload: &[u8]| {
        let mut packet = Vec::new();
        etherparse::PacketBuilder::ipv4(src.octets(), ipb.octets(), 64)
            .udp(5004, 6000)
            .write(&mut packet, payload)
            .expect("a packet");
        packet
    };
    let batch = [
        packet(ipa, b"first"),
        packet(Ipv4Addr::new(169, 254, 0, 1), b"refused"),
        packet(ipa, b"third"),
    ];
    let now = net.now;
    let sent = net.clients[a]
        .host
        .send_packets(now, batch.iter().map(Vec::as_slice));
    assert_eq!(sent.expect("two of three sent"), 2);
    assert_eq!(net.clients[a].host.stats().client.send_refused_invalid, 1);
    net.pump();
    let got: Vec<_> = std::iter::from_fn(|| at_b.pop().map(|(d, _)| d)).collect();
    assert_eq!(got, [b"first".to_vec(), b"third".to_vec()]);
}
