//! A world of one session director and many tunnel clients on the simulated network.
//!
//! [`World`] plays the runtimes' part: it opens and closes transports, deframes streams, and
//! carries transmits between the state machines and the [`Network`]. Tests, benches and the demo
//! build scenarios on it; any test failure prints the seed through the caller's
//! [`SeedGuard`](super::SeedGuard).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::{Delivery, HostId, LinkConfig, NetEvent, Network, SiteConfig, SiteId, StreamId};
use crate::client::{
    ClientConfig, ClientEvent, Destination, Input, PeerConfig, ServerEndpoint, TunnelClient,
};
use crate::cluster::MemoryRegistry;
use crate::director::{
    ConnectionHandle, ConnectionInfo, DirectorConfig, DirectorEvent, SessionDirector,
};
use crate::stun;
use crate::wire::{Envelope, EnvelopeType, StreamDeframer, Transport};

/// The director's public address.
pub const DIRECTOR_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));
/// Where the director listens for stream transports (TLS in the simulation: a reliable stream).
pub const STREAM_PORT: u16 = 4443;
/// Where the director listens for UDP (and answers STUN).
pub const UDP_PORT: u16 = 4444;
/// The port of every client's peer UDP socket.
pub const PEER_PORT: u16 = 5000;

/// How a connection of the director reaches its client.
#[derive(Clone, Copy, Debug)]
enum Route {
    Stream(StreamId),
    Udp(SocketAddr),
}

/// A client's current transport to the director.
enum ClientTransport {
    Stream {
        id: StreamId,
        open: bool,
        deframer: StreamDeframer,
    },
    Udp {
        local: SocketAddr,
        server: SocketAddr,
    },
}

/// A filter of a peer socket's outgoing datagrams: true drops the datagram (its destination
/// and bytes are given).
pub type PeerDrop = Box<dyn FnMut(SocketAddr, &[u8]) -> bool>;

/// One client host and its state machine.
pub struct Node {
    /// The host in the network.
    pub host: HostId,
    /// Its address.
    pub ip: IpAddr,
    /// Its tunnel client.
    pub client: TunnelClient,
    transport: Option<ClientTransport>,
    /// Every event the client emitted, in order.
    pub events: Vec<ClientEvent>,
    /// When each event of `events` was emitted.
    pub event_times: Vec<Instant>,
    /// Inner packets received, in order.
    pub received: Vec<Vec<u8>>,
    /// When each packet of `received` was read.
    pub received_at: Vec<Instant>,
    /// The peer UDP socket, when peer tunneling is on.
    pub peer_socket: Option<SocketAddr>,
    /// Drops everything the peer socket sends or receives (a firewalled or dead socket).
    pub peer_blocked: bool,
    /// Drops the peer socket's outgoing datagrams (plain, not in a session) for which it
    /// returns true, given their destination and bytes: a test's way to lose one message.
    pub peer_drop: Option<PeerDrop>,
    /// Inner UDP source ports of the data packets sent on peer paths.
    pub peer_data_ports: std::collections::BTreeSet<u16>,
    /// The certificate fingerprint this node presents in peer session handshakes: its
    /// configured one unless a test changes it (to present another certificate).
    pub session_cert: Option<[u8; 32]>,
    /// Peer sessions by remote address: the fingerprint pinned and whether it is open.
    pub sessions: BTreeMap<SocketAddr, SimSession>,
    /// Addresses authorised for a session handshake, with the fingerprint to expect.
    pub authorised: BTreeMap<SocketAddr, [u8; 32]>,
    /// Session datagrams dropped: a handshake from an address not authorised, or data
    /// outside an open session.
    pub session_dropped: u64,
    next_port: u16,
}

/// A simulated peer session: a pass-through "handshake" that exchanges the certificate
/// fingerprints each side presents and checks them against the pinned ones, then carries
/// envelopes as datagrams. Its datagrams start with an octet of the QUIC range
/// (`docs/PROTOCOL.md` §2.4), as a real session's would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimSession {
    /// The fingerprint the other side must present.
    pub expected: [u8; 32],
    /// Whether the handshake finished.
    pub open: bool,
    /// Whether this side opened it.
    pub initiator: bool,
}

/// First octets of the simulated session's datagrams.
pub mod session_wire {
    /// Client hello: the initiator's certificate fingerprint follows.
    pub const HELLO: u8 = 0x60;
    /// Server answer: the destination's certificate fingerprint follows.
    pub const ACCEPT: u8 = 0x61;
    /// The destination refused the initiator's certificate.
    pub const REFUSE: u8 = 0x62;
    /// One envelope follows.
    pub const DATA: u8 = 0x63;

    /// Whether `datagram` belongs to a simulated session.
    pub fn is_session(datagram: &[u8]) -> bool {
        matches!(datagram.first(), Some(&(HELLO..=DATA)))
    }
}

/// The director, its runtime glue, the clients and the network.
pub struct World {
    /// The network.
    pub net: Network,
    /// The session director.
    pub director: SessionDirector,
    /// Every event the director emitted, in order.
    pub director_events: Vec<DirectorEvent>,
    /// The registry of a director in a cluster ([`DirectorConfig::cluster`]): it answers at
    /// once, and outlives [`restart_director`](Self::restart_director).
    pub registry: MemoryRegistry,
    director_config: DirectorConfig,
    routes: HashMap<ConnectionHandle, Route>,
    streams: HashMap<StreamId, (ConnectionHandle, StreamDeframer)>,
    udp_peers: HashMap<SocketAddr, ConnectionHandle>,
    next_handle: u64,
    /// The clients, in the order they were added.
    pub nodes: Vec<Node>,
    /// Deliveries to hosts that run no client (raw hosts a test drives by hand).
    pub unclaimed: Vec<Delivery>,
    by_host: BTreeMap<HostId, usize>,
    buf: Vec<u8>,
}

impl World {
    /// A world whose director sits directly on the internet behind a link of `latency`.
    pub fn new(seed: u64, director_config: DirectorConfig, latency: Duration) -> Self {
        let mut net = Network::new(seed);
        net.add_host(None, DIRECTOR_IP, LinkConfig::with_latency(latency));
        net.listen_stream(SocketAddr::new(DIRECTOR_IP, STREAM_PORT));
        let mut config = director_config.clone();
        config.rng_seed = seeded(seed);
        Self {
            net,
            director: SessionDirector::new(config).expect("valid director config"),
            director_events: Vec::new(),
            registry: MemoryRegistry::new(),
            director_config,
            routes: HashMap::new(),
            streams: HashMap::new(),
            udp_peers: HashMap::new(),
            next_handle: 1,
            nodes: Vec::new(),
            unclaimed: Vec::new(),
            by_host: BTreeMap::new(),
            buf: Vec::new(),
        }
    }

    /// The director's endpoint for `transport` (stream transports share the stream port).
    pub fn endpoint(transport: Transport) -> ServerEndpoint {
        let port = if transport.is_datagram() {
            UDP_PORT
        } else {
            STREAM_PORT
        };
        ServerEndpoint {
            addr: SocketAddr::new(DIRECTOR_IP, port),
            transport,
        }
    }

    /// Adds a site (a LAN, optionally behind a NAT).
    pub fn add_site(&mut self, config: SiteConfig) -> SiteId {
        self.net.add_site(config)
    }

    /// Adds a client host at `ip` whose client connects with `config`.
    pub fn add_client(
        &mut self,
        site: Option<SiteId>,
        ip: IpAddr,
        access: LinkConfig,
        config: ClientConfig,
    ) -> usize {
        self.add_client_with(site, ip, access, config, None)
    }

    /// Adds a client with peer tunneling on: its peer socket is port [`PEER_PORT`] of `ip`,
    /// filled in as the only local address when `peer.local_addresses` is empty, and the
    /// director's UDP endpoint is its STUN server when `peer.stun_servers` is empty.
    pub fn add_peer_client(
        &mut self,
        site: Option<SiteId>,
        ip: IpAddr,
        access: LinkConfig,
        config: ClientConfig,
        peer: PeerConfig,
    ) -> usize {
        self.add_client_with(site, ip, access, config, Some(peer))
    }

    /// [`add_client`](Self::add_client), with peer tunneling when `peer` is given (see
    /// [`add_peer_client`](Self::add_peer_client)).
    pub fn add_client_with(
        &mut self,
        site: Option<SiteId>,
        ip: IpAddr,
        access: LinkConfig,
        mut config: ClientConfig,
        peer: Option<PeerConfig>,
    ) -> usize {
        let peer_socket = peer.as_ref().map(|_| SocketAddr::new(ip, PEER_PORT));
        let session_cert = peer.as_ref().and_then(|p| p.certificate_fingerprint);
        if let Some(mut peer) = peer {
            if peer.local_addresses.is_empty() {
                peer.local_addresses = vec![SocketAddr::new(ip, PEER_PORT)];
            }
            if peer.stun_servers.is_empty() {
                peer.stun_servers = vec![SocketAddr::new(DIRECTOR_IP, UDP_PORT)];
            }
            config.peer = Some(peer);
        }
        let host = self.net.add_host(site, ip, access);
        config.rng_seed =
            seeded(self.net.seed() ^ (self.nodes.len() as u64 + 1).wrapping_mul(0x9e37_79b9));
        let client = TunnelClient::new(config, self.net.now()).expect("valid client config");
        self.nodes.push(Node {
            host,
            ip,
            client,
            transport: None,
            events: Vec::new(),
            event_times: Vec::new(),
            received: Vec::new(),
            received_at: Vec::new(),
            peer_socket,
            peer_blocked: false,
            peer_drop: None,
            peer_data_ports: Default::default(),
            session_cert: None,
            sessions: BTreeMap::new(),
            authorised: BTreeMap::new(),
            session_dropped: 0,
            next_port: 40_000,
        });
        let i = self.nodes.len() - 1;
        self.nodes[i].session_cert = session_cert;
        self.by_host.insert(host, i);
        i
    }

    /// Adds a host that runs no client; a test sends from it with [`Network::send_datagram`]
    /// and reads what reaches it from [`World::unclaimed`].
    pub fn add_raw_host(&mut self, site: Option<SiteId>, ip: IpAddr, access: LinkConfig) -> HostId {
        self.net.add_host(site, ip, access)
    }

    /// Whether client `i` holds a tunnel now.
    pub fn connected(&self, i: usize) -> bool {
        self.nodes[i].client.state() == crate::client::ClientState::Connected
    }

    /// The virtual time.
    pub fn now(&self) -> Instant {
        self.net.now()
    }

    /// Runs the world for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.net.now() + d;
        self.run_until(until);
    }

    /// Runs until `until`, or until `done` holds (checked after every step); returns whether
    /// `done` held.
    pub fn run_until_cond(&mut self, until: Instant, mut done: impl FnMut(&World) -> bool) -> bool {
        let mut steps = 0u64;
        loop {
            self.flush();
            if done(self) {
                return true;
            }
            steps += 1;
            assert!(steps < 50_000_000, "the world does not settle");
            let deadline = self.machine_deadline();
            let step = deadline.map_or(until, |d| d.min(until)).max(self.net.now());
            match self.net.next_delivery(step) {
                Some(d) => self.deliver(d),
                None => {
                    let now = self.net.now();
                    if deadline.is_some_and(|d| d <= now) {
                        self.fire_timeouts(now);
                    } else if now >= until {
                        return false;
                    }
                }
            }
        }
    }

    /// Runs until `until`.
    pub fn run_until(&mut self, until: Instant) {
        self.run_until_cond(until, |_| false);
    }

    /// Restarts the director: all its state is lost and its transports are reset.
    pub fn restart_director(&mut self, seed: u64) {
        for (&stream, _) in self.streams.iter() {
            let _ = self.net.close_stream(stream);
        }
        self.streams.clear();
        self.routes.clear();
        self.udp_peers.clear();
        let mut config = self.director_config.clone();
        config.rng_seed = seeded(seed);
        self.director = SessionDirector::new(config).expect("valid director config");
    }

    fn machine_deadline(&self) -> Option<Instant> {
        let clients = self.nodes.iter().filter_map(|n| n.client.poll_timeout());
        clients.chain(self.director.poll_timeout()).min()
    }

    fn fire_timeouts(&mut self, now: Instant) {
        if self.director.poll_timeout().is_some_and(|t| t <= now) {
            self.director.handle_timeout(now);
        }
        for node in &mut self.nodes {
            if node.client.poll_timeout().is_some_and(|t| t <= now) {
                node.client.handle_timeout(now);
            }
        }
    }

    /// Carries every pending output of every machine into the network.
    fn flush(&mut self) {
        let now = self.net.now();
        loop {
            let mut moved = false;
            while let Some((id, request)) = self.director.poll_registry() {
                moved = true;
                let response = self.registry.execute(now, &request);
                self.director.handle_registry(now, id, response);
            }
            while let Some(t) = self.director.poll_transmit(now, &mut self.buf) {
                moved = true;
                match self.routes.get(&t.connection) {
                    Some(Route::Stream(id)) => {
                        let _ = self.net.stream_send(*id, &self.buf);
                    }
                    Some(Route::Udp(peer)) => self.net.send_datagram(
                        SocketAddr::new(DIRECTOR_IP, UDP_PORT),
                        *peer,
                        &self.buf,
                    ),
                    None => {}
                }
            }
            while let Some(e) = self.director.poll_event() {
                moved = true;
                if let DirectorEvent::CloseConnection { connection } = e {
                    match self.routes.remove(&connection) {
                        Some(Route::Stream(id)) => {
                            self.streams.remove(&id);
                            let _ = self.net.close_stream(id);
                        }
                        Some(Route::Udp(peer)) => {
                            self.udp_peers.remove(&peer);
                        }
                        None => {}
                    }
                }
                self.director_events.push(e);
            }
            for i in 0..self.nodes.len() {
                moved |= self.flush_node(i, now);
            }
            if !moved {
                return;
            }
        }
    }

    fn flush_node(&mut self, i: usize, now: Instant) -> bool {
        let mut moved = false;
        let node = &mut self.nodes[i];
        while let Some(t) = node.client.poll_transmit(now, &mut self.buf) {
            moved = true;
            match (t.destination, &node.transport) {
                (Destination::Server, Some(ClientTransport::Stream { id, open: true, .. })) => {
                    let _ = self.net.stream_send(*id, &self.buf);
                }
                (Destination::Server, Some(ClientTransport::Udp { local, server })) => {
                    self.net.send_datagram(*local, *server, &self.buf);
                }
                (Destination::Peer(to), _) => {
                    let Some(local) = node.peer_socket.filter(|_| !node.peer_blocked) else {
                        continue;
                    };
                    if node
                        .peer_drop
                        .as_mut()
                        .is_some_and(|drop| drop(to, &self.buf))
                    {
                        continue;
                    }
                    if self.buf.first() == Some(&EnvelopeType::DATA.0) {
                        if let Some(port) = crate::wire::InnerPacket::parse(&self.buf[3..])
                            .ok()
                            .and_then(|p| p.udp_ports())
                        {
                            node.peer_data_ports.insert(port.0);
                        }
                    }
                    self.net.send_datagram(local, to, &self.buf);
                }
                (Destination::PeerSession(to), _) => {
                    let open = node.sessions.get(&to).is_some_and(|s| s.open);
                    let Some(local) = node.peer_socket.filter(|_| !node.peer_blocked && open)
                    else {
                        continue;
                    };
                    if self.buf.first() == Some(&EnvelopeType::DATA.0) {
                        if let Some(port) = crate::wire::InnerPacket::parse(&self.buf[3..])
                            .ok()
                            .and_then(|p| p.udp_ports())
                        {
                            node.peer_data_ports.insert(port.0);
                        }
                    }
                    let mut datagram = vec![session_wire::DATA];
                    datagram.extend_from_slice(&self.buf);
                    self.net.send_datagram(local, to, &datagram);
                }
                _ => {}
            }
        }
        while let Some(e) = node.client.poll_event() {
            moved = true;
            match &e {
                ClientEvent::OpenTransport { server } => {
                    node.next_port = node.next_port.wrapping_add(1).max(40_000);
                    let local = SocketAddr::new(node.ip, node.next_port);
                    if server.transport.is_datagram() {
                        node.transport = Some(ClientTransport::Udp {
                            local,
                            server: server.addr,
                        });
                        node.client.handle_input(now, Input::TransportOpen);
                    } else {
                        let id = self.net.connect_stream(local, server.addr);
                        node.transport = Some(ClientTransport::Stream {
                            id,
                            open: false,
                            deframer: StreamDeframer::new(),
                        });
                    }
                }
                ClientEvent::CloseTransport => {
                    if let Some(ClientTransport::Stream { id, .. }) = node.transport.take() {
                        let _ = self.net.close_stream(id);
                    }
                }
                ClientEvent::OpenPeerSession {
                    path, fingerprint, ..
                } => {
                    node.sessions.insert(
                        *path,
                        SimSession {
                            expected: *fingerprint,
                            open: false,
                            initiator: true,
                        },
                    );
                    if let Some(local) = node.peer_socket.filter(|_| !node.peer_blocked) {
                        let mut hello = vec![session_wire::HELLO];
                        hello.extend_from_slice(&node.session_cert.unwrap_or_default());
                        self.net.send_datagram(local, *path, &hello);
                    }
                }
                ClientEvent::AcceptPeerSession {
                    path, fingerprint, ..
                } => {
                    node.authorised.insert(*path, *fingerprint);
                }
                ClientEvent::ClosePeerSession { path } => {
                    node.sessions.remove(path);
                    node.authorised.remove(path);
                }
                _ => {}
            }
            node.events.push(e);
            node.event_times.push(now);
        }
        let mut packet = Vec::new();
        while node.client.recv_ip(&mut packet) {
            moved = true;
            node.received.push(std::mem::take(&mut packet));
            node.received_at.push(now);
        }
        moved
    }

    fn deliver(&mut self, d: Delivery) {
        let now = d.at;
        if self.net.host_by_ip(DIRECTOR_IP) == Some(d.host) {
            return self.deliver_to_director(now, d.event);
        }
        let Some(&i) = self.by_host.get(&d.host) else {
            self.unclaimed.push(d);
            return;
        };
        let node = &mut self.nodes[i];
        match d.event {
            NetEvent::StreamConnected { stream, .. } => {
                if let Some(ClientTransport::Stream { id, open, .. }) = &mut node.transport {
                    if *id == stream {
                        *open = true;
                        node.client.handle_input(now, Input::TransportOpen);
                    }
                }
            }
            NetEvent::StreamData { stream, data } => {
                let Some(ClientTransport::Stream { id, deframer, .. }) = &mut node.transport else {
                    return;
                };
                if *id != stream || deframer.push(&data).is_err() {
                    return;
                }
                while let Ok(Some(envelope)) = deframer.next_raw() {
                    node.client.handle_input(now, Input::Envelope(envelope));
                }
            }
            NetEvent::StreamClosed { stream } | NetEvent::StreamReset { stream } => {
                if let Some(ClientTransport::Stream { id, open, .. }) = &node.transport {
                    if *id == stream {
                        let was_open = *open;
                        node.transport = None;
                        if was_open {
                            node.client.handle_input(now, Input::TransportLost);
                        } else {
                            node.client.handle_input(now, Input::TransportFailed);
                        }
                    }
                }
            }
            NetEvent::Datagram { from, to, payload } => {
                if node.peer_socket == Some(to) {
                    if node.peer_blocked {
                        return;
                    }
                    if session_wire::is_session(&payload) {
                        return session_input(node, &mut self.net, now, from, to, &payload);
                    }
                    node.client.handle_input(
                        now,
                        Input::PeerDatagram {
                            from,
                            datagram: &payload,
                        },
                    );
                    return;
                }
                if let Some(ClientTransport::Udp { local, server }) = &node.transport {
                    if *server == from && local.port() == to.port() {
                        node.client.handle_input(now, Input::Envelope(&payload));
                    }
                }
            }
            NetEvent::StreamAccepted { .. } => {}
        }
    }

    fn deliver_to_director(&mut self, now: Instant, event: NetEvent) {
        match event {
            NetEvent::StreamAccepted { stream, remote, .. } => {
                let h = self.handle();
                self.routes.insert(h, Route::Stream(stream));
                self.streams.insert(stream, (h, StreamDeframer::new()));
                let info = ConnectionInfo {
                    transport: Transport::TLS,
                    remote,
                    verified_identity: false,
                };
                self.director
                    .handle_connect(now, h, info)
                    .expect("fresh handle");
            }
            NetEvent::StreamData { stream, data } => {
                let Some((h, deframer)) = self.streams.get_mut(&stream) else {
                    return;
                };
                let h = *h;
                if deframer.push(&data).is_err() {
                    return self.director_lost_stream(now, stream);
                }
                loop {
                    match deframer.next_envelope() {
                        Ok(Some(env)) => self.director.handle_envelope(now, h, env),
                        Ok(None) => break,
                        Err(_) => return self.director_lost_stream(now, stream),
                    }
                }
            }
            NetEvent::StreamClosed { stream } | NetEvent::StreamReset { stream } => {
                self.director_lost_stream(now, stream);
            }
            NetEvent::Datagram { from, to, payload } => {
                if stun::is_stun(&payload) {
                    // The director's STUN responder shares its UDP port (§2.4, §7.2).
                    if stun::answer_binding_request(&payload, from, &mut self.buf).is_ok() {
                        self.net.send_datagram(to, from, &self.buf);
                    }
                    return;
                }
                let h = match self.udp_peers.get(&from) {
                    Some(h) => *h,
                    None => {
                        let h = self.handle();
                        self.udp_peers.insert(from, h);
                        self.routes.insert(h, Route::Udp(from));
                        let info = ConnectionInfo {
                            transport: Transport::UDP,
                            remote: from,
                            verified_identity: false,
                        };
                        self.director
                            .handle_connect(now, h, info)
                            .expect("fresh handle");
                        h
                    }
                };
                self.director.handle_datagram(now, h, &payload);
            }
            NetEvent::StreamConnected { .. } => {}
        }
    }

    fn director_lost_stream(&mut self, now: Instant, stream: StreamId) {
        if let Some((h, _)) = self.streams.remove(&stream) {
            self.routes.remove(&h);
            let _ = self.net.close_stream(stream);
            self.director.handle_disconnect(now, h);
        }
    }

    fn handle(&mut self) -> ConnectionHandle {
        self.next_handle += 1;
        ConnectionHandle(self.next_handle)
    }

    /// Sends `payload` in a UDP/IPv4 packet from port `src_port` of node `from` to port
    /// `dst_port` of internal address `to`.
    pub fn send_udp_ports(
        &mut self,
        from: usize,
        src_port: u16,
        to: Ipv4Addr,
        dst_port: u16,
        payload: &[u8],
    ) -> bool {
        let Some(src) = self.nodes[from].client.internal_ipv4() else {
            return false;
        };
        let packet = udp_packet_ports(src, src_port, to, dst_port, payload);
        let now = self.now();
        self.nodes[from].client.send_ip(now, &packet).is_ok()
    }

    /// Sends `payload` in a UDP/IPv4 packet from node `from` to internal address `to`.
    pub fn send_udp(&mut self, from: usize, to: Ipv4Addr, payload: &[u8]) -> bool {
        let Some(src) = self.nodes[from].client.internal_ipv4() else {
            return false;
        };
        let packet = udp_packet(src, to, payload);
        let now = self.now();
        self.nodes[from].client.send_ip(now, &packet).is_ok()
    }
}

/// One datagram of a simulated peer session reaching `node`'s peer socket `local` from `from`.
fn session_input(
    node: &mut Node,
    net: &mut Network,
    now: Instant,
    from: SocketAddr,
    local: SocketAddr,
    payload: &[u8],
) {
    let cert = |body: &[u8]| <[u8; 32]>::try_from(body).ok();
    match (payload[0], &payload[1..]) {
        (session_wire::HELLO, body) => match (node.authorised.get(&from), cert(body)) {
            (Some(expected), Some(got)) if *expected == got => {
                node.sessions.insert(
                    from,
                    SimSession {
                        expected: *expected,
                        open: true,
                        initiator: false,
                    },
                );
                let mut accept = vec![session_wire::ACCEPT];
                accept.extend_from_slice(&node.session_cert.unwrap_or_default());
                net.send_datagram(local, from, &accept);
                node.client.handle_input(now, Input::PeerSessionOpen(from));
            }
            (Some(_), _) => {
                net.send_datagram(local, from, &[session_wire::REFUSE]);
                node.client
                    .handle_input(now, Input::PeerSessionFailed(from));
            }
            (None, _) => node.session_dropped += 1,
        },
        (session_wire::ACCEPT, body) => {
            let Some(s) = node
                .sessions
                .get_mut(&from)
                .filter(|s| s.initiator && !s.open)
            else {
                node.session_dropped += 1;
                return;
            };
            if cert(body) == Some(s.expected) {
                s.open = true;
                node.client.handle_input(now, Input::PeerSessionOpen(from));
            } else {
                node.sessions.remove(&from);
                node.client
                    .handle_input(now, Input::PeerSessionFailed(from));
            }
        }
        (session_wire::REFUSE, _) => {
            if node
                .sessions
                .get(&from)
                .is_some_and(|s| s.initiator && !s.open)
            {
                node.sessions.remove(&from);
                node.client
                    .handle_input(now, Input::PeerSessionFailed(from));
            }
        }
        (_, envelope) => {
            if node.sessions.get(&from).is_some_and(|s| s.open) {
                node.client.handle_input(
                    now,
                    Input::PeerSessionDatagram {
                        path: from,
                        datagram: envelope,
                    },
                );
            } else {
                node.session_dropped += 1;
            }
        }
    }
}

/// A 32-octet seed derived from `seed`.
pub fn seeded(seed: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[..8].copy_from_slice(&seed.to_le_bytes());
    out[8..16].copy_from_slice(&(!seed).to_le_bytes());
    out
}

/// An IPv4/UDP packet from port 5004 to port 5004 (checksums zero: tscf does not check inner
/// checksums).
pub fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    udp_packet_ports(src, 5004, dst, 5004, payload)
}

/// An IPv4/UDP packet between the given ports.
pub fn udp_packet_ports(
    src: Ipv4Addr,
    src_port: u16,
    dst: Ipv4Addr,
    dst_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let udp_len = 8 + payload.len();
    p.extend_from_slice(&[
        (src_port >> 8) as u8,
        src_port as u8,
        (dst_port >> 8) as u8,
        dst_port as u8,
        (udp_len >> 8) as u8,
        udp_len as u8,
        0,
        0,
    ]);
    p.extend_from_slice(payload);
    p
}

/// The UDP payload of an IPv4/UDP packet built by [`udp_packet`].
pub fn udp_payload(packet: &[u8]) -> &[u8] {
    &packet[28..]
}

/// Wraps a payload in a data envelope.
pub fn data_envelope(packet: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Envelope::encode(EnvelopeType::DATA, packet, &mut out).expect("fits");
    out
}
