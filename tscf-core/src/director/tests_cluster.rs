//! Three directors of one cluster, wired to one [`MemoryRegistry`] and to each other by
//! in-memory mesh links, with scripted clients that speak the wire format.

use super::tests::t0;
use super::*;
use crate::cluster::{
    ClusterConfig, MemoryRegistry, MeshMessage, RegistryRequest, RegistryResponse,
};
use crate::wire::{
    Candidate, CandidateKind, Capabilities, ControlKey, Message, PeerServiceResult, ResultCode,
    ServiceAction, ServiceType,
};

const SECRET: [u8; 32] = [0x5e; 32];
const NONCE: [u8; 16] = *b"a client's nonce";

fn name(n: &str) -> DirectorName {
    DirectorName::new(n).expect("a name")
}

struct Node {
    d: SessionDirector,
    alive: bool,
}

/// Both ends of a mesh link: (node, handle) each.
#[derive(Clone, Copy)]
struct Link {
    a: (usize, ConnectionHandle),
    b: (usize, ConnectionHandle),
}

/// A scripted client: where it is connected, its tunnel, key and address.
#[derive(Clone)]
struct Client {
    node: usize,
    connection: ConnectionHandle,
    id: u64,
    key: ControlKey,
    ip: Ipv4Addr,
    seq: u32,
}

struct Net {
    nodes: Vec<Node>,
    registry: MemoryRegistry,
    links: Vec<Link>,
    now: Instant,
    next_handle: u64,
    /// What directors sent to clients: (node, connection, envelope).
    inbox: Vec<(usize, ConnectionHandle, Vec<u8>)>,
    events: Vec<(usize, DirectorEvent)>,
    /// While set, registry requests wait (the runtime has not executed them yet).
    hold_registry: bool,
}

fn config(n: &str, stock: usize) -> DirectorConfig {
    config_with(n, stock, |_| {})
}

fn config_with(n: &str, stock: usize, tune: impl Fn(&mut ClusterConfig)) -> DirectorConfig {
    let mesh: SocketAddr = format!("192.0.2.{}:4450", n.len()).parse().expect("addr");
    let mut cluster = ClusterConfig::new(name(n), SECRET, mesh);
    cluster.address_stock = stock;
    tune(&mut cluster);
    let mut seed = [0u8; 32];
    seed[..n.len()].copy_from_slice(n.as_bytes());
    DirectorConfig {
        ipv6_pool: None,
        cluster: Some(cluster),
        rng_seed: seed,
        ..DirectorConfig::default()
    }
}

impl Net {
    fn new(stock: usize) -> Self {
        Self::with(stock, |_| {})
    }

    fn with(stock: usize, tune: impl Fn(&mut ClusterConfig)) -> Self {
        let names = ["dir-a", "dir-b", "dir-c"];
        let nodes = names
            .iter()
            .map(|n| Node {
                d: SessionDirector::new(config_with(n, stock, &tune)).expect("valid config"),
                alive: true,
            })
            .collect();
        let mut net = Self {
            nodes,
            registry: MemoryRegistry::new(),
            links: Vec::new(),
            now: t0(),
            next_handle: 10_000,
            inbox: Vec::new(),
            events: Vec::new(),
            hold_registry: false,
        };
        net.pump();
        // Two heartbeats: every director lists the others and the links are dialed.
        net.advance(Duration::from_millis(2500));
        net
    }

    fn link_of(&self, node: usize, h: ConnectionHandle) -> Option<(usize, ConnectionHandle)> {
        self.links.iter().find_map(|l| {
            if l.a == (node, h) {
                Some(l.b)
            } else if l.b == (node, h) {
                Some(l.a)
            } else {
                None
            }
        })
    }

    /// Runs every director until none has anything more to say.
    fn pump(&mut self) {
        loop {
            let mut busy = false;
            for i in 0..self.nodes.len() {
                if !self.nodes[i].alive {
                    continue;
                }
                while let Some((id, request)) = (!self.hold_registry)
                    .then(|| self.nodes[i].d.poll_registry())
                    .flatten()
                {
                    busy = true;
                    let response = self.registry.execute(self.now, &request);
                    self.nodes[i].d.handle_registry(self.now, id, response);
                }
                let mut buf = Vec::new();
                while let Some(t) = self.nodes[i].d.poll_transmit(self.now, &mut buf) {
                    busy = true;
                    match self.link_of(i, t.connection) {
                        Some((j, h)) if self.nodes[j].alive => {
                            self.nodes[j].d.handle_datagram(self.now, h, &buf);
                        }
                        Some(_) => {}
                        None => self.inbox.push((i, t.connection, buf.clone())),
                    }
                }
                while let Some(event) = self.nodes[i].d.poll_event() {
                    busy = true;
                    self.on_event(i, event);
                }
            }
            if !busy {
                return;
            }
        }
    }

    fn on_event(&mut self, i: usize, event: DirectorEvent) {
        match &event {
            DirectorEvent::DialMesh { name, .. } => {
                let j = ["dir-a", "dir-b", "dir-c"]
                    .iter()
                    .position(|n| *n == name.as_str())
                    .expect("a known director");
                if self.nodes[j].alive {
                    let (ha, hb) = (self.fresh(), self.fresh());
                    self.links.push(Link {
                        a: (i, ha),
                        b: (j, hb),
                    });
                    let now = self.now;
                    let dialed = Some(name.clone());
                    self.nodes[i]
                        .d
                        .handle_mesh_connect(now, ha, dialed)
                        .expect("fresh");
                    self.nodes[j]
                        .d
                        .handle_mesh_connect(now, hb, None)
                        .expect("fresh");
                }
            }
            DirectorEvent::CloseConnection { connection } => {
                if let Some((j, h)) = self.link_of(i, *connection) {
                    self.links
                        .retain(|l| l.a != (i, *connection) && l.b != (i, *connection));
                    self.nodes[j].d.handle_disconnect(self.now, h);
                }
            }
            _ => {}
        }
        self.events.push((i, event));
    }

    fn fresh(&mut self) -> ConnectionHandle {
        self.next_handle += 1;
        ConnectionHandle(self.next_handle)
    }

    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        loop {
            let next = self
                .nodes
                .iter()
                .filter(|n| n.alive)
                .filter_map(|n| n.d.poll_timeout())
                .filter(|at| *at <= until)
                .min();
            let Some(at) = next else {
                break;
            };
            self.now = self.now.max(at);
            for n in self.nodes.iter_mut().filter(|n| n.alive) {
                n.d.handle_timeout(self.now);
            }
            self.pump();
        }
        self.now = until;
        self.pump();
    }

    /// The director dies: it says nothing more, and its mesh links drop.
    fn kill(&mut self, i: usize) {
        self.nodes[i].alive = false;
        let links: Vec<Link> = self.links.clone();
        for l in links {
            for (mine, theirs) in [(l.a, l.b), (l.b, l.a)] {
                if mine.0 == i {
                    self.nodes[theirs.0].d.handle_disconnect(self.now, theirs.1);
                }
            }
        }
        self.links.retain(|l| l.a.0 != i && l.b.0 != i);
        self.pump();
    }

    fn take_inbox(&mut self, node: usize, c: ConnectionHandle) -> Vec<Vec<u8>> {
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.inbox)
            .into_iter()
            .partition(|(n, h, _)| *n == node && *h == c);
        self.inbox = rest;
        mine.into_iter().map(|(_, _, b)| b).collect()
    }

    fn control_for(&mut self, node: usize, c: ConnectionHandle) -> Vec<Message<'static>> {
        self.take_inbox(node, c)
            .into_iter()
            .filter(|b| b.first() == Some(&EnvelopeType::CONTROL.0))
            .map(|b| {
                // Leaked so that the decoded messages borrow for the test's length.
                let b: &'static [u8] = Box::leak(b.into_boxed_slice());
                Message::decode(&b[3..]).expect("valid message")
            })
            .collect()
    }

    fn connect(&mut self, node: usize, remote: u8) -> ConnectionHandle {
        let h = self.fresh();
        let info = ConnectionInfo {
            transport: Transport::TLS,
            remote: SocketAddr::from(([198, 51, 100, remote], 40000)),
            verified_identity: false,
        };
        self.nodes[node]
            .d
            .handle_connect(self.now, h, info)
            .expect("fresh");
        h
    }

    /// A new tunnel on `node`, peer-capable; the request is retransmitted while the stock
    /// refills.
    fn client(&mut self, node: usize, remote: u8) -> Client {
        let connection = self.connect(node, remote);
        let mut req = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
        req.tlvs.client_nonce = Some(NONCE);
        req.tlvs.client_capabilities = Some(Capabilities::PEER_TUNNELING);
        for _ in 0..3 {
            let mut bytes = Vec::new();
            req.encode_envelope(&mut bytes).expect("encodable");
            self.nodes[node]
                .d
                .handle_datagram(self.now, connection, &bytes);
            self.pump();
            let answers = self.control_for(node, connection);
            if let Some(m) = answers.first() {
                assert_eq!(m.tlvs.result_code, Some(ResultCode::SUCCESS));
                return Client {
                    node,
                    connection,
                    id: m.header.tunnel_id,
                    key: ControlKey::new(&m.tlvs.control_key.expect("a key")),
                    ip: m.tlvs.internal_ipv4.expect("an address").addr,
                    seq: 1,
                };
            }
        }
        panic!("no answer to a Configuration Request on node {node}");
    }

    /// Sends `m` for `client`, signed with `key`.
    fn send_signed(&mut self, client: &Client, m: &Message<'_>, key: &ControlKey) {
        let mut bytes = Vec::new();
        m.encode_envelope_with_integrity(&key.client_to_director(), &mut bytes)
            .expect("encodable");
        let d = &mut self.nodes[client.node].d;
        d.handle_datagram(self.now, client.connection, &bytes);
        self.pump();
    }

    /// `client` re-attaches on a new connection to `node`, signing with `key`.
    fn reattach(&mut self, client: &mut Client, node: usize, key: &ControlKey) -> Message<'static> {
        client.node = node;
        client.connection = self.connect(node, 99);
        client.seq += 1;
        let mut req = Message::new(MessageType::CONFIGURATION_REQUEST, client.seq, 0);
        req.tlvs.client_nonce = Some(NONCE);
        req.tlvs.tunnel_id = Some(client.id);
        self.send_signed(client, &req, key);
        let answers = self.control_for(node, client.connection);
        answers.into_iter().next().expect("an answer")
    }

    fn send_packet(&mut self, from: &Client, to: Ipv4Addr, payload: &[u8]) {
        let mut bytes = Vec::new();
        Envelope::encode(
            EnvelopeType::DATA,
            &udp_packet(from.ip, to, payload),
            &mut bytes,
        )
        .expect("fits");
        self.nodes[from.node]
            .d
            .handle_datagram(self.now, from.connection, &bytes);
        self.pump();
    }

    fn packets_for(&mut self, client: &Client) -> Vec<Vec<u8>> {
        self.take_inbox(client.node, client.connection)
            .into_iter()
            .filter(|b| b.first() == Some(&EnvelopeType::DATA.0))
            .map(|b| b[3..].to_vec())
            .collect()
    }

    /// The director the registry's record of tunnel `id` names, if it holds one.
    fn record_owner(&mut self, id: u64) -> Option<DirectorName> {
        match self
            .registry
            .execute(self.now, &RegistryRequest::GetTunnel { id })
        {
            RegistryResponse::Tunnel(record) => record.map(|r| r.owner),
            other => panic!("a tunnel lookup answered {other:?}"),
        }
    }

    /// The director the registry says holds address `ip`, if one does.
    fn address_owner(&mut self, ip: Ipv4Addr) -> Option<DirectorName> {
        let request = RegistryRequest::GetAddress {
            addr: IpAddr::V4(ip),
        };
        match self.registry.execute(self.now, &request) {
            RegistryResponse::Address(holder) => holder.map(|h| h.owner),
            other => panic!("an address lookup answered {other:?}"),
        }
    }

    fn stats(&self, node: usize) -> DirectorStats {
        self.nodes[node].d.stats()
    }

    fn mesh_handle(&self, from: usize, to: usize) -> ConnectionHandle {
        self.links
            .iter()
            .find_map(|l| match (l.a, l.b) {
                ((i, _), (j, h)) if i == from && j == to => Some(h),
                ((j, h), (i, _)) if i == from && j == to => Some(h),
                _ => None,
            })
            .expect("a link")
    }
}

/// A peer Establish of `client` for `peer`, with the client's next sequence number.
fn establish(client: &mut Client, peer: Ipv4Addr) -> Message<'static> {
    client.seq += 1;
    let mut req = Message::new(MessageType::CLIENT_SERVICE_REQUEST, client.seq, client.id);
    req.tlvs.service_type = Some(ServiceType::PEER);
    req.tlvs.service_action = Some(ServiceAction::ESTABLISH);
    req.tlvs.peer_internal_address = Some(IpAddr::V4(peer));
    req
}

fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64).udp(5004, 5004);
    let mut packet = Vec::new();
    builder
        .write(&mut packet, payload)
        .expect("writing to a Vec cannot fail");
    packet
}

/// Sends until a packet gets through (the first waits for the route) and returns it.
fn deliver(net: &mut Net, from: &Client, to: &Client, payload: &[u8]) -> Vec<Vec<u8>> {
    for _ in 0..2 {
        net.send_packet(from, to.ip, payload);
        let got = net.packets_for(to);
        if !got.is_empty() {
            return got;
        }
    }
    Vec::new()
}

#[test]
fn every_pair_of_directors_has_one_mesh_link() {
    let net = Net::new(8);
    assert_eq!(net.links.len(), 3);
    for (a, b) in [(0, 1), (0, 2), (1, 2)] {
        net.mesh_handle(a, b);
        net.mesh_handle(b, a);
    }
    assert!(net.stats(0).cluster.addresses_claimed >= 8);
}

#[test]
fn clients_of_two_directors_exchange_packets_through_the_mesh() {
    let mut net = Net::new(8);
    let a = net.client(0, 1);
    let b = net.client(1, 2);
    let got = deliver(&mut net, &a, &b, b"over the mesh");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0], udp_packet(a.ip, b.ip, b"over the mesh"));
    assert_eq!(net.stats(0).cluster.mesh_dropped.awaiting_route, 1);
    assert_eq!(net.stats(0).cluster.route_lookups, 1);
    // The answer needs no lookup: the way back was learned.
    net.send_packet(&b, a.ip, b"and back");
    assert_eq!(
        net.packets_for(&a),
        vec![udp_packet(b.ip, a.ip, b"and back")]
    );
    assert_eq!(net.stats(1).cluster.route_lookups, 0);
    assert!(net.stats(1).cluster.mesh_frames_in >= 1);
}

#[test]
fn addresses_granted_across_directors_never_collide() {
    let mut net = Net::new(4);
    let mut seen = std::collections::BTreeSet::new();
    for k in 0..30u8 {
        for node in 0..3 {
            let c = net.client(node, k);
            assert!(seen.insert(c.ip), "{} given twice", c.ip);
        }
    }
    assert_eq!(seen.len(), 90);
    assert!(net.stats(1).cluster.addresses_refused > 0);
}

#[test]
fn a_client_of_a_dead_director_reattaches_elsewhere_with_its_tunnel() {
    let mut net = Net::new(8);
    let mut a = net.client(0, 1);
    let b = net.client(1, 2);
    assert_eq!(deliver(&mut net, &b, &a, b"before").len(), 1);
    let (id, ip, key) = (a.id, a.ip, a.key.clone());
    net.kill(0);
    net.advance(Duration::from_secs(4));

    let answer = net.reattach(&mut a, 2, &key);
    assert_eq!(answer.tlvs.result_code, Some(ResultCode::SUCCESS));
    assert_eq!(answer.header.tunnel_id, id);
    assert_eq!(answer.tlvs.internal_ipv4.map(|a| a.addr), Some(ip));
    assert!(
        answer.tlvs.control_key.is_none(),
        "the key stays the client's"
    );
    assert!(key.verify_from_director(&{
        let mut b = Vec::new();
        answer.encode(&mut b).expect("encodable");
        b
    }));
    assert_eq!(net.stats(2).cluster.adoptions, 1);
    assert_eq!(net.nodes[2].d.tunnel_by_address(IpAddr::V4(ip)), Some(id));
    assert_eq!(
        net.record_owner(id),
        Some(name("dir-c")),
        "the record stays"
    );

    // The other client's packets find it at its new director.
    let got = deliver(&mut net, &b, &a, b"after");
    assert_eq!(got, vec![udp_packet(b.ip, a.ip, b"after")]);
    net.send_packet(&a, b.ip, b"reply");
    assert_eq!(net.packets_for(&b), vec![udp_packet(a.ip, b.ip, b"reply")]);
}

#[test]
fn a_director_whose_tunnel_was_adopted_drops_it() {
    let mut net = Net::new(8);
    let mut a = net.client(0, 1);
    let key = a.key.clone();
    let answer = net.reattach(&mut a, 1, &key);
    assert_eq!(answer.tlvs.result_code, Some(ResultCode::SUCCESS));
    assert_eq!(net.nodes[0].d.tunnels().count(), 0);
    assert_eq!(net.stats(0).cluster.moved_away, 1);
    let moved = net.events.iter().any(|(n, e)| {
        *n == 0
            && matches!(e, DirectorEvent::TunnelMovedAway { tunnel_id, .. } if *tunnel_id == a.id)
    });
    assert!(moved);
    // No Remove: the record is the adopter's.
    assert_eq!(net.record_owner(a.id), Some(name("dir-b")));
}

#[test]
fn forged_reattach_to_another_director_is_refused_and_adopts_nothing() {
    let mut net = Net::new(8);
    let mut a = net.client(0, 1);
    let forged = ControlKey::new(&[0x66; 32]);
    let answer = net.reattach(&mut a, 1, &forged);
    assert_eq!(answer.tlvs.result_code, Some(ResultCode::UNAUTHORIZED));
    assert_eq!(net.stats(1).cluster.adoptions, 0);
    assert_eq!(net.stats(1).refused.bad_reattach_secret, 1);
    assert_eq!(net.nodes[1].d.tunnels().count(), 0);
    assert_eq!(net.nodes[0].d.tunnels().count(), 1, "its director keeps it");
}

#[test]
fn reattach_of_a_tunnel_nobody_holds_is_tunnel_not_found() {
    let mut net = Net::new(8);
    let mut ghost = net.client(0, 1);
    ghost.id ^= 0xdead_beef;
    let key = ghost.key.clone();
    let answer = net.reattach(&mut ghost, 1, &key);
    assert_eq!(answer.tlvs.result_code, Some(ResultCode::TUNNEL_NOT_FOUND));
}

#[test]
fn spoofed_source_over_a_mesh_link_is_dropped() {
    let mut net = Net::new(8);
    let a = net.client(0, 1);
    let b = net.client(1, 2);
    let link = net.mesh_handle(0, 1);
    // A local tunnel's own address, and one outside the pools.
    for src in [b.ip, Ipv4Addr::new(192, 0, 2, 66)] {
        let mut bytes = Vec::new();
        Envelope::encode(EnvelopeType::DATA, &udp_packet(src, b.ip, b"x"), &mut bytes)
            .expect("fits");
        net.nodes[1].d.handle_datagram(net.now, link, &bytes);
        net.pump();
    }
    assert_eq!(net.stats(1).cluster.mesh_dropped.spoofed_source, 2);
    assert!(net.packets_for(&b).is_empty());
    // A packet for nobody here is refused back, so that its sender drops the route.
    let mut bytes = Vec::new();
    let stray = udp_packet(a.ip, Ipv4Addr::new(10, 77, 200, 1), b"x");
    Envelope::encode(EnvelopeType::DATA, &stray, &mut bytes).expect("fits");
    net.nodes[1].d.handle_datagram(net.now, link, &bytes);
    net.pump();
    assert_eq!(net.stats(1).cluster.mesh_dropped.not_here, 1);
}

#[test]
fn malformed_mesh_messages_are_counted() {
    let mut net = Net::new(8);
    let link = net.mesh_handle(0, 1);
    for bad in [
        &[0x06, 0, 4, 0x77][..],
        &[0x05, 0, 4, 0x01],
        &[0x06, 0, 5, 0x02, 9],
    ] {
        net.nodes[1].d.handle_datagram(net.now, link, bad);
    }
    net.pump();
    assert_eq!(net.stats(1).cluster.mesh_dropped.bad_message, 3);
    // A Hello naming another director closes the link.
    let mut hello = Vec::new();
    MeshMessage::Hello(name("dir-c"))
        .encode_envelope(&mut hello)
        .expect("fits");
    net.nodes[1].d.handle_datagram(net.now, link, &hello);
    net.pump();
    assert!(net
        .links
        .iter()
        .all(|l| l.b != (1, link) && l.a != (1, link)));
}

#[test]
fn peer_introduction_across_two_directors_gives_each_the_others_candidates() {
    let mut net = Net::new(8);
    let mut a = net.client(0, 1);
    let b = net.client(1, 2);
    assert_eq!(deliver(&mut net, &a, &b, b"route").len(), 1);

    let mut req = establish(&mut a, b.ip);
    req.tlvs.candidates.push(Candidate {
        kind: CandidateKind::HOST,
        transport: Transport::UDP,
        addr: "192.168.1.10:50000".parse().expect("addr"),
    });
    req.tlvs.certificate_fingerprint = Some([0xa1; 32]);
    let key = a.key.clone();
    net.send_signed(&a, &req, &key);

    let forwarded = net.control_for(1, b.connection);
    assert_eq!(forwarded.len(), 1);
    let fwd = &forwarded[0];
    assert_eq!(fwd.header.message_type, MessageType::CLIENT_SERVICE_REQUEST);
    assert_eq!(fwd.header.tunnel_id, b.id);
    assert_eq!(fwd.tlvs.peer_internal_address, Some(IpAddr::V4(a.ip)));
    assert_eq!(fwd.tlvs.candidates, req.tlvs.candidates);
    let token = fwd.tlvs.peer_credentials.expect("credentials").token;
    let mut signed = Vec::new();
    fwd.encode(&mut signed).expect("encodable");
    assert!(b.key.verify_from_director(&signed), "signed with b's key");

    let mut answer = Message::response_to(&fwd.header, ResultCode::SUCCESS);
    answer.tlvs.service_type = Some(ServiceType::PEER);
    answer.tlvs.peer_service_result = Some(PeerServiceResult::AVAILABLE);
    answer.tlvs.candidates.push(Candidate {
        kind: CandidateKind::SERVER_REFLEXIVE,
        transport: Transport::UDP,
        addr: "198.51.100.9:61000".parse().expect("addr"),
    });
    answer.tlvs.certificate_fingerprint = Some([0xb2; 32]);
    let b_key = b.key.clone();
    net.send_signed(&b, &answer, &b_key);

    let replies = net.control_for(0, a.connection);
    assert_eq!(replies.len(), 1);
    let reply = &replies[0];
    assert_eq!(reply.header.sequence, a.seq);
    assert_eq!(reply.tlvs.result_code, Some(ResultCode::SUCCESS));
    assert_eq!(
        reply.tlvs.peer_service_result,
        Some(PeerServiceResult::AVAILABLE)
    );
    assert_eq!(reply.tlvs.candidates, answer.tlvs.candidates);
    assert_eq!(reply.tlvs.peer_internal_address, Some(IpAddr::V4(b.ip)));
    let creds = reply.tlvs.peer_credentials.expect("credentials");
    assert_eq!(creds.token, token, "one token for both");
    assert_eq!(creds.fingerprint, Some([0xb2; 32]));
}

#[test]
fn a_peer_request_for_an_address_not_yet_routed_waits_for_the_registry() {
    let mut net = Net::new(8);
    let mut a = net.client(0, 1);
    let b = net.client(1, 2);
    // No packet went from A to B: director 0 has no route to B yet.
    let req = establish(&mut a, b.ip);
    let key = a.key.clone();
    net.send_signed(&a, &req, &key);
    let forwarded = net.control_for(1, b.connection);
    assert_eq!(forwarded.len(), 1, "forwarded once the registry answered");
    assert_eq!(
        forwarded[0].tlvs.peer_internal_address,
        Some(IpAddr::V4(a.ip))
    );
    assert!(
        net.control_for(0, a.connection)
            .iter()
            .all(|m| m.tlvs.result_code != Some(ResultCode::PEER_UNAVAILABLE)),
        "not refused while the route was looked up"
    );

    // An address nobody holds is refused once the registry says so.
    let nobody = Ipv4Addr::new(10, 77, 3, 3);
    let req = establish(&mut a, nobody);
    net.send_signed(&a, &req, &key);
    let replies = net.control_for(0, a.connection);
    let reply = replies
        .iter()
        .find(|m| m.header.sequence == a.seq)
        .expect("an answer");
    assert_eq!(reply.tlvs.result_code, Some(ResultCode::PEER_UNAVAILABLE));
}

#[test]
fn a_peer_request_across_that_gets_no_answer_times_out() {
    let mut net = Net::new(8);
    let mut a = net.client(0, 1);
    let b = net.client(1, 2);
    assert_eq!(deliver(&mut net, &a, &b, b"route").len(), 1);
    let req = establish(&mut a, b.ip);
    let key = a.key.clone();
    net.send_signed(&a, &req, &key);
    net.advance(Duration::from_secs(2));
    let replies = net.control_for(0, a.connection);
    let reply = replies
        .iter()
        .find(|m| m.header.message_type == MessageType::CLIENT_SERVICE_RESPONSE)
        .expect("an answer");
    assert_eq!(reply.tlvs.result_code, Some(ResultCode::PEER_TIMEOUT));
}

#[test]
fn a_registry_outage_keeps_relaying_and_the_director_puts_its_records_back() {
    let mut net = Net::new(8);
    let a = net.client(0, 1);
    let b = net.client(1, 2);
    assert_eq!(deliver(&mut net, &a, &b, b"before").len(), 1);
    net.send_packet(&b, a.ip, b"back");
    assert_eq!(net.packets_for(&a).len(), 1);

    net.registry.set_down(true, false);
    net.advance(Duration::from_secs(3));
    assert!(net.stats(0).cluster.registry_failures > 0);
    net.send_packet(&a, b.ip, b"during");
    assert_eq!(net.packets_for(&b).len(), 1, "known routes still relay");
    net.send_packet(&b, a.ip, b"during");
    assert_eq!(net.packets_for(&a).len(), 1);

    // It comes back empty: every director puts what it holds again.
    net.registry.set_down(false, true);
    net.advance(Duration::from_millis(1500));
    assert!(net.stats(0).cluster.registry_recoveries >= 1);
    for c in [&a, &b] {
        assert!(net.record_owner(c.id).is_some(), "{:#x}", c.id);
    }
    assert_eq!(net.address_owner(a.ip), Some(name("dir-a")));
    // And a new tunnel still gets an address nobody else has.
    let c = net.client(2, 3);
    assert!(c.ip != a.ip && c.ip != b.ip);
}

#[test]
fn a_director_outside_a_cluster_asks_nothing_of_a_registry() {
    let mut d = SessionDirector::new(DirectorConfig::default()).expect("valid config");
    assert!(d.poll_registry().is_none());
    assert!(d.poll_timeout().is_none());
    d.handle_registry(t0(), crate::cluster::RequestId(1), RegistryResponse::Done);
    assert_eq!(d.stats().cluster.registry_unexpected, 1);
}

#[test]
fn an_unknown_or_failed_registry_answer_is_counted() {
    let mut net = Net::new(8);
    let d = &mut net.nodes[0].d;
    d.handle_registry(
        net.now,
        crate::cluster::RequestId(999_999),
        RegistryResponse::Done,
    );
    assert_eq!(d.stats().cluster.registry_unexpected, 1);
    net.registry.set_down(true, false);
    net.advance(Duration::from_secs(1));
    assert!(net.stats(0).cluster.registry_failures >= 1);
}

#[test]
fn a_configuration_request_finding_the_stock_empty_is_answered_on_its_retransmission() {
    let mut net = Net::new(1);
    net.hold_registry = true;
    let first = net.client(0, 1);
    let connection = net.connect(0, 2);
    let mut req = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
    req.tlvs.client_nonce = Some(NONCE);
    let mut bytes = Vec::new();
    req.encode_envelope(&mut bytes).expect("encodable");
    net.nodes[0].d.handle_datagram(net.now, connection, &bytes);
    net.pump();
    assert!(
        net.control_for(0, connection).is_empty(),
        "dropped unanswered"
    );
    assert_eq!(net.stats(0).cluster.stock_empty, 1);
    // The refill was asked for; once the registry answers, the retransmission gets a tunnel.
    net.hold_registry = false;
    net.pump();
    net.nodes[0].d.handle_datagram(net.now, connection, &bytes);
    net.pump();
    let answers = net.control_for(0, connection);
    assert_eq!(answers[0].tlvs.result_code, Some(ResultCode::SUCCESS));
    assert_ne!(
        answers[0].tlvs.internal_ipv4.map(|a| a.addr),
        Some(first.ip)
    );
}

#[test]
fn a_route_to_a_director_that_no_longer_holds_the_address_is_dropped() {
    let mut net = Net::new(8);
    let a = net.client(0, 1);
    let mut b = net.client(1, 2);
    assert_eq!(deliver(&mut net, &a, &b, b"hello").len(), 1);
    b.seq += 1;
    let release = Message::new(MessageType::CONFIGURATION_RELEASE_REQUEST, b.seq, b.id);
    let key = b.key.clone();
    net.send_signed(&b, &release, &key);
    // The route still says dir-b: the packet goes, and dir-b says Not Here.
    net.send_packet(&a, b.ip, b"anyone?");
    assert_eq!(net.stats(1).cluster.mesh_dropped.not_here, 1);
    // From then on dir-a knows nobody holds it.
    let sent = net.stats(0).cluster.mesh_frames_out;
    net.send_packet(&a, b.ip, b"anyone?");
    assert_eq!(net.stats(0).cluster.mesh_frames_out, sent);
    assert!(net.stats(0).dropped.unknown_destination >= 1);
}

#[test]
fn a_dropped_mesh_link_takes_its_routes_and_is_dialed_again() {
    let mut net = Net::new(8);
    let a = net.client(0, 1);
    let b = net.client(1, 2);
    assert_eq!(deliver(&mut net, &a, &b, b"hello").len(), 1);
    let dials = net.stats(0).cluster.mesh_dials;
    // The link between dir-a and dir-b breaks.
    let link = net.mesh_handle(1, 0);
    let theirs = net.mesh_handle(0, 1);
    net.links.retain(|l| l.a != (0, link) && l.b != (0, link));
    net.nodes[0].d.handle_disconnect(net.now, link);
    net.nodes[1].d.handle_disconnect(net.now, theirs);
    net.send_packet(&a, b.ip, b"lost");
    assert!(net.packets_for(&b).is_empty());
    assert_eq!(net.stats(0).cluster.mesh_dropped.awaiting_route, 2);
    // The next heartbeat dials it again, and the way is found again.
    net.advance(Duration::from_millis(1100));
    assert_eq!(net.stats(0).cluster.mesh_dials, dials + 1);
    assert_eq!(deliver(&mut net, &a, &b, b"again").len(), 1);
}

#[test]
fn a_registry_that_lost_its_data_silently_gets_every_record_back() {
    let mut net = Net::new(8);
    let a = net.client(0, 1);
    // Wiped between two requests, none failing.
    net.registry.set_down(false, true);
    net.advance(Duration::from_secs(61));
    assert_eq!(net.record_owner(a.id), Some(name("dir-a")));
}

#[test]
fn records_outlive_their_lease_while_their_director_lives_renewed_in_rounds() {
    // A round is a quarter of the lease: 2 s, two heartbeats, each renewing half the tunnels.
    let mut net = Net::with(256, |c| c.tunnel_lease = Duration::from_secs(8));
    let clients: Vec<Client> = (0..40).map(|k| net.client(0, 1 + k)).collect();
    net.advance(Duration::from_secs(30));
    for c in &clients {
        assert!(net.record_owner(c.id).is_some(), "{:#x}", c.id);
        assert!(net.address_owner(c.ip).is_some(), "{}", c.ip);
    }
}

/// Re-attach requests naming guessed tunnel ids, each from `remote` or from a source of its
/// own; the registry lookups they caused.
fn guess_tunnel_ids(net: &mut Net, node: usize, guesses: u8, remote: Option<u8>) -> u64 {
    let before = net.registry.lookups();
    let key = ControlKey::new(&[0x66; crate::wire::CONTROL_KEY_LEN]);
    for k in 0..guesses {
        let connection = net.connect(node, remote.unwrap_or(k));
        let mut req = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
        req.tlvs.client_nonce = Some(NONCE);
        req.tlvs.tunnel_id = Some(0x5eed_0000 + u64::from(k));
        let mut bytes = Vec::new();
        req.encode_envelope_with_integrity(&key.client_to_director(), &mut bytes)
            .expect("encodable");
        net.nodes[node]
            .d
            .handle_datagram(net.now, connection, &bytes);
        net.pump();
    }
    net.registry.lookups() - before
}

#[test]
fn reattach_flood_with_guessed_tunnel_ids_is_bounded_in_registry_lookups() {
    // From many sources at once: the director's lookup rate bounds the registry's work.
    let mut net = Net::with(8, |c| c.max_lookup_rate = 50);
    let lookups = guess_tunnel_ids(&mut net, 1, 200, None);
    assert_eq!(lookups, 50, "one lookup a token");
    assert_eq!(net.stats(1).cluster.lookups_limited, 150);
    // From one source: each guess the registry denies is a failed admission, and the source
    // is soon refused without a lookup.
    net.advance(Duration::from_secs(2));
    let lookups = guess_tunnel_ids(&mut net, 1, 40, Some(77));
    let limit = u64::from(Admission::default().failure_limit);
    assert_eq!(lookups, limit, "lookups until the source is rate limited");
    assert!(net.stats(1).refused.rate_limited >= 40 - limit);
}

#[test]
fn registry_requests_beyond_max_in_flight_are_not_issued() {
    let mut cfg = config("dir-a", 64);
    if let Some(c) = cfg.cluster.as_mut() {
        c.max_in_flight = 10;
    }
    let mut d = SessionDirector::new(cfg).expect("valid config");
    let issued = std::iter::from_fn(|| d.poll_registry()).count();
    assert_eq!(issued, 10);
    assert!(d.stats().cluster.registry_saturated >= 1);
}

#[test]
fn a_director_not_told_of_an_adoption_learns_it_from_the_registry() {
    let mut net = Net::new(8);
    let mut a = net.client(0, 1);
    // dir-a is cut off from the mesh while its client re-attaches to dir-b.
    for (from, to) in [(0, 1), (0, 2)] {
        let (mine, theirs) = (net.mesh_handle(to, from), net.mesh_handle(from, to));
        net.links.retain(|l| l.a != (0, mine) && l.b != (0, mine));
        net.nodes[0].d.handle_disconnect(net.now, mine);
        net.nodes[to].d.handle_disconnect(net.now, theirs);
    }
    let key = a.key.clone();
    let answer = net.reattach(&mut a, 1, &key);
    assert_eq!(answer.tlvs.result_code, Some(ResultCode::SUCCESS));
    assert_eq!(net.nodes[0].d.tunnels().count(), 1, "not told");
    // Its resync reads the record, which dir-b owns now, and does not take it back.
    net.advance(Duration::from_secs(61));
    assert_eq!(net.nodes[0].d.tunnels().count(), 0);
    assert_eq!(net.stats(0).cluster.moved_away, 1);
    assert_eq!(net.record_owner(a.id), Some(name("dir-b")));
}

// ---- release notices across directors ----

/// Introduces `a` (initiator) to `b`, a client of another director, which answers Available.
fn introduce(net: &mut Net, a: &mut Client, b: &Client) {
    let req = establish(a, b.ip);
    let key = a.key.clone();
    net.send_signed(a, &req, &key);
    let forwarded = net.control_for(b.node, b.connection);
    let fwd = forwarded
        .iter()
        .find(|m| m.header.message_type == MessageType::CLIENT_SERVICE_REQUEST)
        .expect("the request forwarded to the destination");
    let mut answer = Message::response_to(&fwd.header, ResultCode::SUCCESS);
    answer.tlvs.service_type = Some(ServiceType::PEER);
    answer.tlvs.peer_service_result = Some(PeerServiceResult::AVAILABLE);
    let b_key = b.key.clone();
    net.send_signed(b, &answer, &b_key);
    let replies = net.control_for(a.node, a.connection);
    assert!(
        replies.iter().any(|m| m.header.sequence == a.seq
            && m.tlvs.peer_service_result == Some(PeerServiceResult::AVAILABLE)),
        "introduced"
    );
}

/// `client` closes its server tunnel with a Configuration Release Request.
fn release_tunnel(net: &mut Net, client: &mut Client) {
    client.seq += 1;
    let release = Message::new(
        MessageType::CONFIGURATION_RELEASE_REQUEST,
        client.seq,
        client.id,
    );
    let key = client.key.clone();
    net.send_signed(client, &release, &key);
    assert!(net.nodes[client.node]
        .d
        .tunnels()
        .all(|t| t.tunnel_id != client.id));
}

/// The release notices `client` got: the departed addresses they name, each checked to be
/// signed with the client's key.
fn release_notices(net: &mut Net, client: &Client) -> Vec<IpAddr> {
    net.control_for(client.node, client.connection)
        .iter()
        .filter(|m| {
            m.header.message_type == MessageType::CLIENT_SERVICE_REQUEST
                && m.tlvs.service_action == Some(ServiceAction::RELEASE)
        })
        .map(|m| {
            let mut signed = Vec::new();
            m.encode(&mut signed).expect("encodable");
            assert!(client.key.verify_from_director(&signed), "signed for it");
            assert_eq!(m.header.tunnel_id, client.id);
            m.tlvs.peer_internal_address.expect("the departed client")
        })
        .collect()
}

#[test]
fn closing_the_initiators_tunnel_tells_the_destination_across_directors() {
    let mut net = Net::new(8);
    let mut a = net.client(0, 1);
    let b = net.client(1, 2);
    introduce(&mut net, &mut a, &b);
    assert_eq!(net.nodes[0].d.remote_peers(a.id), vec![IpAddr::V4(b.ip)]);
    assert_eq!(net.nodes[1].d.remote_peers(b.id), vec![IpAddr::V4(a.ip)]);

    release_tunnel(&mut net, &mut a);
    assert_eq!(net.stats(0).cluster.peer_gone_sent, 1);
    assert_eq!(release_notices(&mut net, &b), vec![IpAddr::V4(a.ip)]);
    assert_eq!(net.stats(1).peer.release_notices, 1);
    assert!(net.nodes[1].d.remote_peers(b.id).is_empty(), "told once");
    assert_eq!(net.stats(1).cluster.mesh_dropped, Default::default());
}

#[test]
fn closing_the_destinations_tunnel_tells_the_initiator_across_directors() {
    let mut net = Net::new(8);
    let mut a = net.client(0, 1);
    let mut b = net.client(1, 2);
    introduce(&mut net, &mut a, &b);

    release_tunnel(&mut net, &mut b);
    assert_eq!(net.stats(1).cluster.peer_gone_sent, 1);
    assert_eq!(release_notices(&mut net, &a), vec![IpAddr::V4(b.ip)]);
    assert!(net.nodes[0].d.remote_peers(a.id).is_empty());
    // And the initiator leaving now tells nobody: its partner is gone.
    release_tunnel(&mut net, &mut a);
    assert_eq!(net.stats(0).cluster.peer_gone_sent, 0);
}

#[test]
fn a_release_notice_across_directors_waits_for_a_persistent_partner() {
    let mut net = Net::new(8);
    let mut a = net.client(0, 1);
    let mut b = net.client(1, 2);
    introduce(&mut net, &mut a, &b);
    // B's stream breaks: its tunnel is persistent when A leaves.
    let now = net.now;
    net.nodes[1].d.handle_disconnect(now, b.connection);
    net.pump();
    release_tunnel(&mut net, &mut a);
    assert_eq!(net.stats(1).peer.release_notices_held, 1);

    b.connection = net.connect(1, 98);
    b.seq += 1;
    let mut req = Message::new(MessageType::CONFIGURATION_REQUEST, b.seq, 0);
    req.tlvs.client_nonce = Some(NONCE);
    req.tlvs.tunnel_id = Some(b.id);
    let key = b.key.clone();
    let mut bytes = Vec::new();
    req.encode_envelope_with_integrity(&key.client_to_director(), &mut bytes)
        .expect("encodable");
    net.nodes[1]
        .d
        .handle_datagram(net.now, b.connection, &bytes);
    net.pump();
    let inbox = net.take_inbox(1, b.connection);
    net.inbox
        .extend(inbox[1..].iter().map(|m| (1, b.connection, m.clone())));
    let first = Message::decode(&inbox[0][3..]).expect("a message");
    assert_eq!(
        first.header.message_type,
        MessageType::CONFIGURATION_RESPONSE
    );
    assert_eq!(release_notices(&mut net, &b), vec![IpAddr::V4(a.ip)]);
}

#[test]
fn a_client_that_releases_its_peer_across_directors_is_not_told_it_left() {
    let mut net = Net::new(8);
    let mut a = net.client(0, 1);
    let mut b = net.client(1, 2);
    introduce(&mut net, &mut a, &b);

    // A drops its peer tunnel with B and says so to its director.
    a.seq += 1;
    let mut release = Message::new(MessageType::CLIENT_SERVICE_REQUEST, a.seq, a.id);
    release.tlvs.service_type = Some(ServiceType::PEER);
    release.tlvs.service_action = Some(ServiceAction::RELEASE);
    release.tlvs.peer_internal_address = Some(IpAddr::V4(b.ip));
    let key = a.key.clone();
    net.send_signed(&a, &release, &key);
    assert!(net.nodes[0].d.remote_peers(a.id).is_empty());

    // B's director still remembers; its notice finds no introduction on A's side.
    release_tunnel(&mut net, &mut b);
    assert_eq!(net.stats(1).cluster.peer_gone_sent, 1);
    assert!(release_notices(&mut net, &a).is_empty());
    assert_eq!(net.stats(0).cluster.mesh_dropped.not_introduced, 1);
}

#[test]
fn a_tunnel_that_moves_to_another_director_forgets_its_introductions_and_tells_nobody() {
    let mut net = Net::new(8);
    let mut a = net.client(0, 1);
    let mut b = net.client(1, 2);
    introduce(&mut net, &mut a, &b);

    let key = b.key.clone();
    let answer = net.reattach(&mut b, 2, &key);
    assert_eq!(answer.tlvs.result_code, Some(ResultCode::SUCCESS));
    assert_eq!(net.stats(1).cluster.moved_away, 1);
    assert!(net.nodes[1].d.remote_peers(b.id).is_empty());
    assert!(net.nodes[2].d.remote_peers(b.id).is_empty());
    assert_eq!(net.stats(1).cluster.peer_gone_sent, 0);
    assert!(release_notices(&mut net, &a).is_empty(), "B is still there");
}

#[test]
fn forged_peer_gone_over_a_mesh_link_is_dropped_and_tells_no_client() {
    let mut net = Net::new(8);
    let mut a = net.client(0, 1);
    let b = net.client(1, 2);
    let c = net.client(1, 3);
    let stranger = net.client(2, 4);
    introduce(&mut net, &mut a, &b);
    let from_a = net.mesh_handle(0, 1);
    let from_c = net.mesh_handle(2, 1);
    let v4 = IpAddr::V4;
    let forge = |net: &mut Net, link, departed, partner| {
        let mut bytes = Vec::new();
        MeshMessage::PeerGone {
            departed,
            partners: vec![partner],
        }
        .encode_envelope(&mut bytes)
        .expect("fits");
        net.nodes[1].d.handle_datagram(net.now, link, &bytes);
        net.pump();
    };
    // A partner never introduced to the departed client.
    forge(&mut net, from_a, v4(a.ip), v4(c.ip));
    // A partner that is no client of the receiver.
    forge(&mut net, from_a, v4(a.ip), v4(stranger.ip));
    // The introduction is real, but another director speaks for the departed client.
    forge(&mut net, from_c, v4(a.ip), v4(b.ip));
    // A departed client that is the receiver's own, or outside the pools.
    forge(&mut net, from_a, v4(c.ip), v4(b.ip));
    forge(&mut net, from_a, v4(Ipv4Addr::new(192, 0, 2, 66)), v4(b.ip));

    let dropped = net.stats(1).cluster.mesh_dropped;
    assert_eq!(dropped.not_introduced, 3);
    assert_eq!(dropped.spoofed_source, 2);
    assert_eq!(net.stats(1).peer.release_notices, 0);
    assert!(release_notices(&mut net, &b).is_empty());
    assert!(release_notices(&mut net, &c).is_empty());
    assert_eq!(net.nodes[1].d.remote_peers(b.id), vec![v4(a.ip)], "kept");

    // The real one still gets through, once: a replay finds nothing.
    forge(&mut net, from_a, v4(a.ip), v4(b.ip));
    assert_eq!(release_notices(&mut net, &b), vec![v4(a.ip)]);
    forge(&mut net, from_a, v4(a.ip), v4(b.ip));
    assert!(release_notices(&mut net, &b).is_empty());
    assert_eq!(net.stats(1).cluster.mesh_dropped.not_introduced, 4);
}

#[test]
fn introductions_across_directors_are_bounded_per_tunnel() {
    let extra = 3;
    let n = super::peer::MAX_PEERS_PER_TUNNEL + extra;
    let mut net = Net::new(n + 8);
    let x = net.client(0, 1);
    // Initiators on the two other directors, each introduced to X.
    let mut initiators = Vec::new();
    for i in 0..n {
        let remote = u8::try_from(10 + i).expect("fits");
        let mut c = net.client(1 + i % 2, remote);
        introduce(&mut net, &mut c, &x);
        initiators.push(c);
    }
    let remembered = net.nodes[0].d.remote_peers(x.id);
    assert_eq!(remembered.len(), super::peer::MAX_PEERS_PER_TUNNEL);
    let expected: Vec<IpAddr> = initiators[extra..]
        .iter()
        .map(|c| IpAddr::V4(c.ip))
        .collect();
    assert_eq!(remembered, expected, "the oldest forgotten");

    let mut x = x;
    release_tunnel(&mut net, &mut x);
    // One Peer Gone to each director, naming its clients among the ones remembered.
    assert_eq!(net.stats(0).cluster.peer_gone_sent, 2);
    for (k, c) in initiators.iter().enumerate() {
        let got = release_notices(&mut net, c);
        if k < extra {
            assert!(got.is_empty(), "forgotten: not told");
        } else {
            assert_eq!(got, vec![IpAddr::V4(x.ip)]);
        }
    }
    for node in [1, 2] {
        assert_eq!(net.stats(node).cluster.mesh_dropped.not_introduced, 0);
    }
}

#[test]
fn peer_request_over_a_mesh_link_naming_a_local_client_as_initiator_is_refused() {
    let mut net = Net::new(8);
    let b = net.client(1, 2);
    let c = net.client(1, 3);
    let mut forward = Message::new(MessageType::CLIENT_SERVICE_REQUEST, 0, 0);
    forward.tlvs.service_type = Some(ServiceType::PEER);
    forward.tlvs.service_action = Some(ServiceAction::ESTABLISH);
    forward.tlvs.peer_internal_address = Some(IpAddr::V4(c.ip));
    forward.tlvs.peer_credentials = Some(crate::wire::PeerCredentials {
        token: [7; 16],
        fingerprint: None,
    });
    let mut request = Vec::new();
    forward.encode(&mut request).expect("encodable");
    let mut bytes = Vec::new();
    MeshMessage::PeerRequest {
        exchange: 1,
        destination: IpAddr::V4(b.ip),
        request: &request,
    }
    .encode_envelope(&mut bytes)
    .expect("fits");
    let link = net.mesh_handle(0, 1);
    net.nodes[1].d.handle_datagram(net.now, link, &bytes);
    net.pump();
    assert!(net.control_for(1, b.connection).is_empty(), "not forwarded");
    // The same request for a client of another director goes through.
    let a_ip = net.client(0, 1).ip;
    forward.tlvs.peer_internal_address = Some(IpAddr::V4(a_ip));
    request.clear();
    forward.encode(&mut request).expect("encodable");
    bytes.clear();
    MeshMessage::PeerRequest {
        exchange: 2,
        destination: IpAddr::V4(b.ip),
        request: &request,
    }
    .encode_envelope(&mut bytes)
    .expect("fits");
    net.nodes[1].d.handle_datagram(net.now, link, &bytes);
    net.pump();
    assert_eq!(net.control_for(1, b.connection).len(), 1);
}
