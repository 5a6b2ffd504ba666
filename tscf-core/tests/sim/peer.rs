//! Peer tunnels: formation over every NAT pairing, the switch from the relay without loss,
//! fallback, simultaneous initiation, path loss, removal, forged credentials, invariants over
//! many seeds, and the measured setup time.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tscf_core::client::{ClientConfig, ClientEvent, PeerConfig, PeerDownReason, PeerPath};
use tscf_core::director::DirectorConfig;
use tscf_core::sim::world::{udp_packet_ports, World, PEER_PORT};
use tscf_core::sim::{for_each_seed, LinkConfig, NatConfig, NatKind, SeedGuard, SiteConfig};
use tscf_core::wire::{
    Envelope, EnvelopeType, InnerPacket, Message, MessageType, ResultCode, Transport,
};

use super::ms;

/// The inner UDP port of the media flow (opted in on both sides).
const MEDIA: u16 = 6000;
/// An inner UDP port never opted in.
const SIGNALLING: u16 = 7000;

/// Where a client sits.
#[derive(Clone, Copy, Debug)]
enum Site {
    /// Directly on the internet.
    Public,
    /// Behind a NAT of this kind, alone on its site.
    Nat(NatKind),
}

/// A two-client scenario: a and b, each on its own site, or both on one LAN.
#[derive(Clone, Copy, Debug)]
struct Scenario {
    /// Client ↔ server round trip.
    server_rtt: Duration,
    /// Client ↔ client round trip on the direct path.
    peer_rtt: Duration,
    a: Site,
    b: Site,
    /// Both on one LAN (behind `a`'s NAT, if any).
    same_lan: bool,
    loss: f64,
    transport: Transport,
    director: fn() -> DirectorConfig,
    peer_b: bool,
    /// Adjusts a's peer configuration.
    peer_a: fn(&mut PeerConfig),
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            server_rtt: ms(100),
            peer_rtt: ms(10),
            a: Site::Public,
            b: Site::Public,
            same_lan: false,
            loss: 0.0,
            transport: Transport::UDP,
            director: DirectorConfig::default,
            peer_b: true,
            peer_a: |_| {},
        }
    }
}

fn lossy(latency: Duration, loss: f64) -> LinkConfig {
    LinkConfig {
        latency,
        loss,
        ..LinkConfig::default()
    }
}

/// Builds the world; returns it and the indexes of a and b (connected, discovery done).
fn build(seed: u64, s: Scenario) -> (World, usize, usize) {
    build_with(seed, s, true)
}

/// [`build`], with b announcing its candidates to the director or not.
fn build_with(seed: u64, s: Scenario, announce_b: bool) -> (World, usize, usize) {
    // Each access link is a quarter of the peer RTT one way; the director's link makes up
    // the rest of the server RTT.
    let access = s.peer_rtt / 4;
    let director = (s.server_rtt / 2).saturating_sub(access);
    let mut w = World::new(seed, (s.director)(), director);
    let site_of = |w: &mut World, site: Site, n: u8| match site {
        Site::Public => None,
        Site::Nat(kind) => Some(w.add_site(SiteConfig {
            nat: Some(NatConfig::new(
                kind,
                IpAddr::V4(Ipv4Addr::new(100, 64, 0, n)),
            )),
            uplink: LinkConfig::default(),
        })),
    };
    let site_a = site_of(&mut w, s.a, 1);
    let site_b = if s.same_lan {
        site_a
    } else {
        site_of(&mut w, s.b, 2)
    };
    let ip = |site: Option<_>, n: u8| match site {
        Some(_) => IpAddr::V4(Ipv4Addr::new(192, 168, 1, n)),
        None => IpAddr::V4(Ipv4Addr::new(198, 18, 0, n)),
    };
    let config = || ClientConfig::new(vec![World::endpoint(s.transport)]);
    let peer = || PeerConfig::new(Vec::new(), Vec::new());
    let (ip_a, ip_b) = (ip(site_a, 10), ip(site_b, 11));
    let link = lossy(access, s.loss);
    let mut peer_a = peer();
    (s.peer_a)(&mut peer_a);
    let a = w.add_peer_client(site_a, ip_a, link.clone(), config(), peer_a);
    let peer_b = s.peer_b.then(|| PeerConfig {
        announce: announce_b,
        ..peer()
    });
    let b = w.add_client_with(site_b, ip_b, link, config(), peer_b);
    let deadline = w.now() + Duration::from_secs(30);
    let ready = |w: &World, i: usize| {
        w.connected(i)
            && (w.nodes[i].peer_socket.is_none()
                || w.nodes[i]
                    .events
                    .iter()
                    .any(|e| matches!(e, ClientEvent::NatDiscovered { .. })))
    };
    assert!(
        w.run_until_cond(deadline, |w| ready(w, a) && ready(w, b)),
        "both connect"
    );
    // Let the Announce reach the director.
    w.run_for(s.server_rtt);
    for i in [a, b] {
        w.nodes[i].client.set_peer_tunneling(MEDIA, true);
    }
    (w, a, b)
}

fn v4(w: &World, i: usize) -> Ipv4Addr {
    w.nodes[i].client.internal_ipv4().expect("an IPv4 address")
}

fn ipv4(w: &World, i: usize) -> IpAddr {
    IpAddr::V4(v4(w, i))
}

/// Payload tag: kind ('A' forward, 'E' echo, 'S' signalling), sequence.
fn tag(kind: u8, seq: u32) -> [u8; 5] {
    let s = seq.to_be_bytes();
    [kind, s[0], s[1], s[2], s[3]]
}

fn untag(packet: &[u8]) -> Option<(u8, u32)> {
    let p = InnerPacket::parse(packet).ok()?;
    let payload = &packet[28..];
    if p.protocol() != 17 || payload.len() != 5 {
        return None;
    }
    Some((
        payload[0],
        u32::from_be_bytes(payload[1..5].try_into().ok()?),
    ))
}

/// An echo call from a to b: a sends tagged frames every `interval`, b echoes each.
struct Call {
    a: usize,
    b: usize,
    interval: Duration,
    next_send: Instant,
    sent_at: Vec<Instant>,
    /// How many packets of a and b have been looked at.
    seen: (usize, usize),
    /// (sequence, rtt) of every echo received by a.
    rtts: Vec<(u32, Duration)>,
    forward: BTreeMap<u32, u32>,
    echoes: BTreeMap<u32, u32>,
    astray: u32,
    /// Also send an opted-out frame with every frame.
    signalling: bool,
}

impl Call {
    fn new(w: &World, a: usize, b: usize, interval: Duration) -> Self {
        Self {
            a,
            b,
            interval,
            next_send: w.now(),
            sent_at: Vec::new(),
            seen: (w.nodes[a].received.len(), w.nodes[b].received.len()),
            rtts: Vec::new(),
            forward: BTreeMap::new(),
            echoes: BTreeMap::new(),
            astray: 0,
            signalling: false,
        }
    }

    /// Runs the call for `d`, in steps of 1 ms.
    fn run(&mut self, w: &mut World, d: Duration) {
        let end = w.now() + d;
        while w.now() < end {
            if w.now() >= self.next_send {
                let seq = self.sent_at.len() as u32;
                let to = v4(w, self.b);
                if w.send_udp_ports(self.a, MEDIA, to, MEDIA, &tag(b'A', seq)) {
                    self.sent_at.push(w.now());
                }
                if self.signalling {
                    w.send_udp_ports(self.a, SIGNALLING, to, SIGNALLING, &tag(b'S', seq));
                }
                self.next_send += self.interval;
            }
            w.run_for(ms(1));
            self.collect(w);
        }
    }

    fn collect(&mut self, w: &mut World) {
        let (a_ip, b_ip) = (v4(w, self.a), v4(w, self.b));
        let new_b: Vec<Vec<u8>> = w.nodes[self.b].received[self.seen.1..].to_vec();
        self.seen.1 = w.nodes[self.b].received.len();
        for p in new_b {
            let ok = InnerPacket::parse(&p).is_ok_and(|q| {
                q.source() == IpAddr::V4(a_ip) && q.destination() == IpAddr::V4(b_ip)
            });
            match untag(&p) {
                Some((b'A', seq)) if ok => {
                    *self.forward.entry(seq).or_default() += 1;
                    w.send_udp_ports(self.b, MEDIA, a_ip, MEDIA, &tag(b'E', seq));
                }
                Some((b'S', _)) if ok => {}
                _ => self.astray += 1,
            }
        }
        let start = self.seen.0;
        self.seen.0 = w.nodes[self.a].received.len();
        for k in start..self.seen.0 {
            let p = &w.nodes[self.a].received[k];
            let ok = InnerPacket::parse(p).is_ok_and(|q| {
                q.source() == IpAddr::V4(b_ip) && q.destination() == IpAddr::V4(a_ip)
            });
            match untag(p) {
                Some((b'E', seq)) if ok && (seq as usize) < self.sent_at.len() => {
                    *self.echoes.entry(seq).or_default() += 1;
                    let at = w.nodes[self.a].received_at[k];
                    self.rtts.push((seq, at - self.sent_at[seq as usize]));
                }
                _ => self.astray += 1,
            }
        }
    }

    /// Lets the last frames arrive without sending more.
    fn drain(&mut self, w: &mut World, d: Duration) {
        let end = w.now() + d;
        while w.now() < end {
            w.run_for(ms(1));
            self.collect(w);
        }
    }

    fn duplicates(&self) -> usize {
        self.forward
            .values()
            .chain(self.echoes.values())
            .filter(|n| **n > 1)
            .count()
    }

    fn lost(&self) -> usize {
        let n = self.sent_at.len();
        (n - self.forward.len()) + (n - self.echoes.len())
    }

    fn median_rtt(&self, seqs: std::ops::Range<u32>) -> Duration {
        let mut r: Vec<Duration> = self
            .rtts
            .iter()
            .filter(|(s, _)| seqs.contains(s))
            .map(|(_, d)| *d)
            .collect();
        r.sort();
        r.get(r.len() / 2).copied().unwrap_or(Duration::MAX)
    }
}

fn up_events(w: &World, i: usize) -> Vec<(IpAddr, bool)> {
    w.nodes[i]
        .events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::PeerTunnelUp {
                peer, initiator, ..
            } => Some((*peer, *initiator)),
            _ => None,
        })
        .collect()
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

/// Prints both clients' peer state when `ok` is false, before the assertion fails.
fn dump_unless(ok: bool, w: &World, a: usize, b: usize) {
    if ok {
        return;
    }
    for i in [a, b] {
        let n = &w.nodes[i];
        eprintln!("client {i}: {:?}", n.events);
        eprintln!("  {:?}", n.client.stats().peer);
        eprintln!("  {:?}", n.client.peer_tunnels());
    }
    eprintln!("director: {:?}", w.director.stats().peer);
}

fn is_peer(p: PeerPath) -> bool {
    matches!(p, PeerPath::Peer(_))
}

/// Whether a and b both use a peer tunnel to each other.
fn both_up(w: &World, a: usize, b: usize) -> bool {
    is_peer(w.nodes[a].client.peer_path(ipv4(w, b)))
        && is_peer(w.nodes[b].client.peer_path(ipv4(w, a)))
}

#[test]
fn co_located_clients_switch_to_the_peer_path_without_loss() {
    for (name, site) in [
        ("no NAT", Site::Public),
        ("one NAT", Site::Nat(NatKind::AddressPortDependentFiltering)),
    ] {
        let _guard = SeedGuard(11);
        let s = Scenario {
            server_rtt: ms(100),
            peer_rtt: ms(2),
            a: site,
            b: site,
            same_lan: true,
            ..Scenario::default()
        };
        let (mut w, a, b) = build(11, s);
        let mut call = Call::new(&w, a, b, ms(20));
        call.run(&mut w, Duration::from_secs(3));
        call.drain(&mut w, ms(500));
        dump_unless(both_up(&w, a, b), &w, a, b);
        assert!(both_up(&w, a, b), "{name}: the peer tunnel forms");
        let (relay, direct) = (call.median_rtt(0..3), call.median_rtt(100..150));
        eprintln!("{name}: media RTT {relay:?} on the relay, {direct:?} on the peer tunnel");
        assert!(
            relay >= ms(100),
            "{name}: first frames take the server path"
        );
        assert!(direct <= ms(4), "{name}: later frames take the peer path");
        assert_eq!(call.lost(), 0, "{name}: nothing lost across the switch");
        assert_eq!(call.duplicates(), 0, "{name}: nothing duplicated");
        assert_eq!(call.astray, 0);
        assert!(w.nodes[a].client.stats().peer.data_sent > 100);
        assert!(
            w.nodes[b].client.stats().peer.data_sent > 100,
            "echoes go direct too"
        );
    }
}

fn site_name(s: Site) -> &'static str {
    match s {
        Site::Public => "none",
        Site::Nat(NatKind::EndpointIndependent) => "EI",
        Site::Nat(NatKind::AddressDependentFiltering) => "AD",
        Site::Nat(NatKind::AddressPortDependentFiltering) => "APD",
        Site::Nat(NatKind::Symmetric) => "sym",
    }
}

const SITES: [Site; 5] = [
    Site::Public,
    Site::Nat(NatKind::EndpointIndependent),
    Site::Nat(NatKind::AddressDependentFiltering),
    Site::Nat(NatKind::AddressPortDependentFiltering),
    Site::Nat(NatKind::Symmetric),
];

/// Whether a direct path needs port prediction (which tscf does not do).
fn needs_prediction(a: Site, b: Site) -> bool {
    let sym = |s| matches!(s, Site::Nat(NatKind::Symmetric));
    let strict = |s| {
        matches!(
            s,
            Site::Nat(NatKind::Symmetric | NatKind::AddressPortDependentFiltering)
        )
    };
    (sym(a) && strict(b)) || (sym(b) && strict(a))
}

fn setup_time(w: &World, i: usize) -> Option<Duration> {
    w.nodes[i].events.iter().find_map(|e| match e {
        ClientEvent::PeerTunnelUp { setup, .. } => Some(*setup),
        _ => None,
    })
}

#[test]
fn nat_matrix() {
    let mut table = String::from("a \\ b ");
    for b in SITES {
        table += &format!("| {:>14} ", site_name(b));
    }
    table.push('\n');
    for a in SITES {
        table += &format!("{:>5} ", site_name(a));
        for b in SITES {
            let _guard = SeedGuard(21);
            let s = Scenario {
                a,
                b,
                ..Scenario::default()
            };
            let (mut w, ia, ib) = build(21, s);
            let mut call = Call::new(&w, ia, ib, ms(20));
            call.run(&mut w, Duration::from_secs(4));
            call.drain(&mut w, ms(500));
            let direct = both_up(&w, ia, ib);
            let cell = match (direct, setup_time(&w, ia)) {
                (true, Some(t)) => format!("direct {:>4} ms", t.as_millis()),
                _ => "relay".to_owned(),
            };
            table += &format!("| {cell:>14} ");
            let (na, nb) = (site_name(a), site_name(b));
            dump_unless(direct != needs_prediction(a, b), &w, ia, ib);
            assert_eq!(
                direct,
                !needs_prediction(a, b),
                "{na} ↔ {nb}: direct exactly when no port prediction is needed"
            );
            assert_eq!(call.lost(), 0, "{na} ↔ {nb}: media keeps flowing");
            assert_eq!(call.duplicates() + call.astray as usize, 0, "{na} ↔ {nb}");
        }
        table.push('\n');
    }
    eprintln!("NAT matrix (server RTT 100 ms, peer RTT 10 ms; setup time as seen by a):\n{table}");
}

/// Runs a call from a to b and checks that every frame arrives though no peer tunnel forms.
fn assert_fallback(w: &mut World, a: usize, b: usize, what: &str) {
    let mut call = Call::new(w, a, b, ms(20));
    call.run(w, Duration::from_secs(6));
    call.drain(w, ms(500));
    assert!(!both_up(w, a, b), "{what}: no peer tunnel");
    assert_eq!(call.lost(), 0, "{what}: frames keep flowing on the relay");
    assert_eq!(call.duplicates(), 0, "{what}");
    assert!(
        !down_reasons(w, a).is_empty(),
        "{what}: the failure is reported"
    );
    // Retries follow the doubling backoff (2 s, 4 s): at most three requests in 6 s.
    let requests = w.nodes[a].client.stats().peer.requests_sent;
    assert!((1..=3).contains(&requests), "{what}: {requests} requests");
}

#[test]
fn fallback_when_the_destination_cannot_take_part() {
    let _guard = SeedGuard(31);
    // The destination did not announce the capability: Peer Unavailable from the director.
    let (mut w, a, b) = build(
        31,
        Scenario {
            peer_b: false,
            ..Scenario::default()
        },
    );
    assert_fallback(&mut w, a, b, "no capability");
    assert!(
        down_reasons(&w, a).contains(&PeerDownReason::Unavailable(ResultCode::PEER_UNAVAILABLE))
    );

    // The director does not offer the service.
    let (mut w, a, b) = build(
        32,
        Scenario {
            director: || DirectorConfig {
                peer_tunneling: false,
                ..DirectorConfig::default()
            },
            ..Scenario::default()
        },
    );
    assert_fallback(&mut w, a, b, "service off");
    assert!(down_reasons(&w, a).contains(&PeerDownReason::Unavailable(
        ResultCode::SERVICE_NOT_ENABLED
    )));

    // The destination answers but its peer socket is dead: the setup times out.
    let (mut w, a, b) = build(33, Scenario::default());
    w.nodes[b].peer_blocked = true;
    assert_fallback(&mut w, a, b, "silent destination");
    assert!(down_reasons(&w, a).contains(&PeerDownReason::EstablishTimeout));

    // The destination is offline: nobody holds that address.
    let (mut w, a, _) = build(34, Scenario::default());
    let nobody = Ipv4Addr::new(10, 77, 3, 3);
    for _ in 0..10 {
        w.send_udp_ports(a, MEDIA, nobody, MEDIA, b"x");
        w.run_for(ms(100));
    }
    assert!(
        down_reasons(&w, a).contains(&PeerDownReason::Unavailable(ResultCode::PEER_UNAVAILABLE))
    );
    assert_eq!(w.nodes[a].client.stats().peer.requests_sent, 1);
}

#[test]
fn simultaneous_initiation_yields_one_peer_tunnel() {
    for seed in 41..46 {
        let _guard = SeedGuard(seed);
        let (mut w, a, b) = build(seed, Scenario::default());
        let (ia, ib) = (v4(&w, a), v4(&w, b));
        for n in 0..150u32 {
            w.send_udp_ports(a, MEDIA, ib, MEDIA, &tag(b'A', n));
            w.send_udp_ports(b, MEDIA, ia, MEDIA, &tag(b'A', n));
            w.run_for(ms(20));
        }
        dump_unless(both_up(&w, a, b), &w, a, b);
        assert!(both_up(&w, a, b));
        assert_eq!(
            w.director.stats().peer.requests_forwarded,
            1,
            "one negotiation"
        );
        let (ua, ub) = (up_events(&w, a), up_events(&w, b));
        assert_eq!(
            (ua.len(), ub.len()),
            (1, 1),
            "one tunnel, up once on each side"
        );
        assert_ne!(ua[0].1, ub[0].1, "one initiator, one destination");
        let path = |i: usize, j: usize| match w.nodes[i].client.peer_path(ipv4(&w, j)) {
            PeerPath::Peer(p) => p,
            other => panic!("{other:?}"),
        };
        assert_eq!(path(a, b), w.nodes[b].peer_socket.expect("socket"));
        assert_eq!(path(b, a), w.nodes[a].peer_socket.expect("socket"));
    }
}

#[test]
fn a_cut_peer_path_falls_back_to_the_relay() {
    let _guard = SeedGuard(51);
    let (mut w, a, b) = build(51, Scenario::default());
    let mut call = Call::new(&w, a, b, ms(20));
    call.run(&mut w, Duration::from_secs(2));
    assert!(both_up(&w, a, b));
    let (ha, hb) = (w.nodes[a].ip, w.nodes[b].ip);
    w.net.block(ha, hb);
    let cut = w.now();
    let mut back = None;
    while w.now() < cut + Duration::from_secs(3) {
        call.run(&mut w, ms(10));
        if back.is_none() && !is_peer(w.nodes[a].client.peer_path(ipv4(&w, b))) {
            back = Some(w.now());
        }
    }
    let back = back.expect("back on the relay");
    // The last packet was heard just before the cut.
    assert!(
        back - cut <= ms(1550),
        "back on relay after {:?}",
        back - cut
    );
    assert!(down_reasons(&w, a).contains(&PeerDownReason::Silence));
    // The histograms: one setup each, and one silence of the silence timeout (1.5 s, its
    // timer running on time in the simulator) up to the last packet heard before the cut.
    let peer = w.nodes[a].client.stats().peer;
    assert_eq!(peer.setup_times.count(), 1);
    assert_eq!(peer.silence_to_relay.count(), 1);
    let silent = peer.silence_to_relay.sum();
    assert!(
        (ms(1500)..=ms(1550)).contains(&silent),
        "silent for {silent:?}"
    );
    // Frames sent once both sides are back on the relay all arrive.
    let first_after = call
        .sent_at
        .iter()
        .position(|t| *t >= back + ms(200))
        .expect("sent");
    call.drain(&mut w, ms(500));
    let n = call.sent_at.len() as u32;
    for seq in first_after as u32..n {
        assert_eq!(call.forward.get(&seq), Some(&1), "frame {seq} delivered");
        assert_eq!(call.echoes.get(&seq), Some(&1), "echo {seq} delivered");
    }
}

#[test]
fn losing_either_server_tunnel_removes_the_peer_tunnel() {
    for (seed, by_director) in [(61, false), (62, true)] {
        let _guard = SeedGuard(seed);
        let (mut w, a, b) = build(seed, Scenario::default());
        let mut call = Call::new(&w, a, b, ms(20));
        call.run(&mut w, Duration::from_secs(2));
        assert!(both_up(&w, a, b));
        let now = w.now();
        if by_director {
            let id = w.nodes[a].client.tunnel_id().expect("tunnel");
            w.director
                .close_tunnel(now, id, ResultCode::ADMINISTRATIVE)
                .expect("known tunnel");
        } else {
            w.nodes[b].client.release(now);
        }
        w.run_for(ms(500));
        let (gone, stays) = if by_director { (a, b) } else { (b, a) };
        assert!(down_reasons(&w, gone).contains(&PeerDownReason::ServerTunnelLost));
        assert!(
            down_reasons(&w, stays).contains(&PeerDownReason::PeerServerTunnelGone),
            "the director told the other side"
        );
        assert!(w.nodes[stays]
            .client
            .peer_tunnels()
            .iter()
            .all(|t| t.path.is_none()));
        assert!(w.nodes[gone].client.peer_tunnels().is_empty());
    }
}

#[test]
fn release_by_the_application_removes_the_tunnel_on_both_sides() {
    let _guard = SeedGuard(65);
    let (mut w, a, b) = build(65, Scenario::default());
    let mut call = Call::new(&w, a, b, ms(20));
    call.run(&mut w, Duration::from_secs(2));
    assert!(both_up(&w, a, b));
    let (now, peer) = (w.now(), ipv4(&w, b));
    w.nodes[a].client.release_peer_tunnel(now, peer);
    call.run(&mut w, ms(100));
    assert!(!is_peer(w.nodes[a].client.peer_path(peer)));
    assert!(!is_peer(w.nodes[b].client.peer_path(ipv4(&w, a))));
    assert!(down_reasons(&w, b).contains(&PeerDownReason::Released));
    call.drain(&mut w, ms(300));
    assert_eq!(call.lost(), 0);
}

/// The message type of a control envelope.
fn control_type(envelope: &[u8]) -> Option<MessageType> {
    let env = Envelope::decode_datagram(envelope).ok()?;
    (env.kind == EnvelopeType::CONTROL)
        .then(|| {
            Message::decode(env.payload)
                .ok()
                .map(|m| m.header.message_type)
        })
        .flatten()
}

/// Drops the first `n` datagrams of type `kind` that node `i`'s peer socket sends; returns
/// how many it dropped so far.
fn drop_first(w: &mut World, i: usize, kind: MessageType, n: u32) -> Rc<Cell<u32>> {
    let dropped = Rc::new(Cell::new(0));
    let count = dropped.clone();
    w.nodes[i].peer_drop = Some(Box::new(move |_, bytes| {
        let hit = control_type(bytes) == Some(kind) && count.get() < n;
        if hit {
            count.set(count.get() + 1);
        }
        hit
    }));
    dropped
}

/// The destination answers the initiator's Configuration Request and starts sending on the
/// peer path; its answer is lost. The initiator takes that data all the same (it nominated the
/// path), so nothing is lost while it retransmits its request.
#[test]
fn lost_configuration_response_loses_no_data() {
    for seed in [91, 92, 93] {
        let _guard = SeedGuard(seed);
        let (mut w, a, b) = build(seed, Scenario::default());
        let dropped = drop_first(&mut w, b, MessageType::CONFIGURATION_RESPONSE, 1);
        let mut call = Call::new(&w, a, b, ms(20));
        call.run(&mut w, Duration::from_secs(3));
        call.drain(&mut w, ms(500));
        dump_unless(both_up(&w, a, b), &w, a, b);
        assert!(both_up(&w, a, b));
        assert_eq!(dropped.get(), 1, "the first answer was lost");
        assert!(
            w.nodes[a].client.stats().peer.data_received > 0,
            "echoes came on the peer path"
        );
        assert_eq!(call.lost(), 0, "every frame and echo delivered");
        assert_eq!(call.duplicates() + call.astray as usize, 0);
    }
}

/// A peer tunnel that one side tears down alone: the other side hears it on the path at
/// once (and again if that is lost) and moves to the relay, and what it sent meanwhile on the
/// path is still delivered.
#[test]
fn one_sided_teardown_moves_other_side_to_relay_at_once() {
    // a is evicted from b's peer table (b keeps one peer) when b starts talking to another.
    let _guard = SeedGuard(95);
    let (mut w, a, b) = build(
        95,
        Scenario {
            peer_a: |p| p.max_peers = 1,
            ..Scenario::default()
        },
    );
    let (ia, ib) = (v4(&w, a), v4(&w, b));
    // b → a on the opted-in port; a answers nothing on it, so only b's side asks.
    let (mut sent, mut got) = (0u32, Vec::new());
    let mut step = |w: &mut World, d: Duration| {
        let end = w.now() + d;
        while w.now() < end {
            w.send_udp_ports(b, MEDIA, ia, MEDIA, &tag(b'A', sent));
            sent += 1;
            w.run_for(ms(20));
        }
    };
    step(&mut w, Duration::from_secs(2));
    assert!(is_peer(w.nodes[b].client.peer_path(IpAddr::V4(ia))));
    assert!(is_peer(w.nodes[a].client.peer_path(IpAddr::V4(ib))));
    // a sends one opted-in packet to a third address: b's state is evicted.
    let evicted = w.now();
    w.send_udp_ports(a, MEDIA, Ipv4Addr::new(10, 77, 3, 3), MEDIA, b"x");
    let mut back = None;
    while w.now() < evicted + Duration::from_secs(1) {
        step(&mut w, ms(20));
        if back.is_none() && !is_peer(w.nodes[b].client.peer_path(IpAddr::V4(ia))) {
            back = Some(w.now() - evicted);
        }
    }
    // The last packets, on the relay, arrive.
    w.run_for(ms(500));
    for p in &w.nodes[a].received {
        if let Some((b'A', seq)) = untag(p) {
            got.push(seq);
        }
    }
    let back = back.expect("b back on the relay");
    eprintln!("evicted: b on the relay {back:?} later");
    assert!(
        back <= ms(50),
        "b told at once, not at its silence timeout: {back:?}"
    );
    assert!(down_reasons(&w, b).contains(&PeerDownReason::Released));
    got.sort_unstable();
    got.dedup();
    let missing: Vec<u32> = (0..sent)
        .filter(|s| got.binary_search(s).is_err())
        .collect();
    dump_unless(missing.is_empty(), &w, a, b);
    assert!(
        missing.is_empty(),
        "nothing lost across the teardown: {missing:?} of {sent}"
    );

    // a releases the tunnel; its first Configuration Release Request is lost.
    let _guard = SeedGuard(96);
    let (mut w, a, b) = build(96, Scenario::default());
    let mut call = Call::new(&w, a, b, ms(20));
    call.run(&mut w, Duration::from_secs(2));
    assert!(both_up(&w, a, b));
    let dropped = drop_first(&mut w, a, MessageType::CONFIGURATION_RELEASE_REQUEST, 1);
    let (now, peer) = (w.now(), ipv4(&w, b));
    w.nodes[a].client.release_peer_tunnel(now, peer);
    let mut back = None;
    while w.now() < now + Duration::from_secs(1) {
        call.run(&mut w, ms(10));
        if back.is_none() && !is_peer(w.nodes[b].client.peer_path(ipv4(&w, a))) {
            back = Some(w.now() - now);
        }
    }
    call.drain(&mut w, ms(500));
    let back = back.expect("b back on the relay");
    eprintln!("released, first request lost: b on the relay {back:?} later");
    assert_eq!(dropped.get(), 1);
    assert!(back <= ms(150), "the release is sent again: {back:?}");
    assert_eq!(call.lost(), 0, "nothing lost across the teardown");
    assert_eq!(call.duplicates() + call.astray as usize, 0);
}

/// The probe reflection attack of the loopback test in `tests/` (a client asks again and
/// again for a peer tunnel to an innocent one, naming a victim's addresses as its
/// candidates), for a whole minute of virtual time and at several request rates: the victim
/// gets at most three octets of probes per octet of the requests the director forwarded, in
/// any minute, however the attacker paces them.
#[test]
fn probe_reflection_amplification_is_bounded_over_a_minute() {
    use super::{control, RawHost};
    use tscf_core::wire::{
        Candidate, CandidateKind, ConnectionInfo, PeerServiceResult, ServiceAction, ServiceType,
    };
    for (seed, every) in [(98, ms(50)), (99, ms(1000)), (100, ms(7000))] {
        let _guard = SeedGuard(seed);
        let (mut w, _, b) = build(seed, Scenario::default());
        let target = ipv4(&w, b);
        let victim_ip = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 99));
        w.add_raw_host(None, victim_ip, LinkConfig::with_latency(ms(5)));
        let attacker = RawHost::new(&mut w, IpAddr::V4(Ipv4Addr::new(198, 18, 0, 66)));
        // An admitted client: it keys its control messages like any other.
        let mut configure = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
        configure.tlvs.client_nonce = Some(*b"attacker's nonce");
        attacker.send(&mut w, &configure);
        w.run_for(ms(200));
        let replies = attacker.received(&mut w);
        let answer = control(&replies[0]);
        let tunnel_id = answer.header.tunnel_id;
        let key = tscf_core::wire::ControlKey::new(&answer.tlvs.control_key.expect("a key"))
            .client_to_director();

        let (start, mut n) = (w.now(), 0u32);
        let mut requests: Vec<(u32, usize)> = Vec::new();
        let mut forwarded_bytes = 0;
        while w.now() < start + Duration::from_secs(60) {
            let mut request = Message::new(MessageType::CLIENT_SERVICE_REQUEST, 100 + n, tunnel_id);
            request.tlvs.service_type = Some(ServiceType::PEER);
            request.tlvs.service_action = Some(ServiceAction::ESTABLISH);
            request.tlvs.peer_internal_address = Some(target);
            request.tlvs.connection_info = Some(ConnectionInfo {
                transport: Transport::UDP,
                addr: std::net::SocketAddr::new(victim_ip, 1000),
            });
            for port in 1000..1008 {
                request.tlvs.candidates.push(Candidate {
                    kind: CandidateKind::HOST,
                    transport: Transport::UDP,
                    addr: std::net::SocketAddr::new(victim_ip, port),
                });
            }
            let mut bytes = Vec::new();
            request
                .encode_envelope_with_integrity(&key, &mut bytes)
                .expect("encodable");
            attacker.send_bytes(&mut w, &bytes);
            requests.push((100 + n, bytes.len()));
            n += 1;
            w.run_for(every);
            for reply in attacker.received(&mut w) {
                let m = control(&reply);
                let available = m.tlvs.peer_service_result == Some(PeerServiceResult::AVAILABLE);
                if let Some(k) = requests.iter().position(|(s, _)| *s == m.header.sequence) {
                    let (_, len) = requests.swap_remove(k);
                    forwarded_bytes += if available { len } else { 0 };
                }
            }
        }
        // The last negotiations end (the establishment bound).
        w.run_for(Duration::from_secs(5));
        let victim_bytes: usize = w
            .unclaimed
            .iter()
            .filter_map(|d| match &d.event {
                tscf_core::sim::NetEvent::Datagram { to, payload, .. } if to.ip() == victim_ip => {
                    Some(payload.len())
                }
                _ => None,
            })
            .sum();
        let stats = w.nodes[b].client.stats().peer;
        eprintln!(
            "a request every {every:?}: {n} sent, {} forwarded ({forwarded_bytes} octets); the \
             victim got {victim_bytes} octets ({} probes, {} held back): {:.2} per octet",
            w.director.stats().peer.requests_forwarded,
            stats.probes_sent,
            stats.probes_limited,
            victim_bytes as f64 / forwarded_bytes.max(1) as f64,
        );
        assert!(forwarded_bytes > 0);
        assert!(
            victim_bytes <= 3 * forwarded_bytes,
            "{victim_bytes} > 3 × {forwarded_bytes}"
        );
    }
}

/// Anyone may send a peer socket a Configuration Request without Message Integrity, from any
/// (spoofed) source: it is dropped and counted, never answered, so the socket reflects
/// nothing to a victim.
#[test]
fn unsigned_configuration_requests_on_the_peer_socket_get_no_answer() {
    let _guard = SeedGuard(97);
    let (mut w, a, b) = build(97, Scenario::default());
    let victim_ip = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 77));
    w.add_raw_host(None, victim_ip, LinkConfig::with_latency(ms(5)));
    let victim = std::net::SocketAddr::new(victim_ip, 53);
    let target = w.nodes[a].peer_socket.expect("socket");
    let before = w.nodes[a].client.stats().peer;
    for (n, pia) in [
        None,
        Some(ipv4(&w, b)),
        Some(IpAddr::V4(Ipv4Addr::new(10, 77, 9, 9))),
    ]
    .into_iter()
    .cycle()
    .take(30)
    .enumerate()
    {
        let mut config = Message::new(MessageType::CONFIGURATION_REQUEST, n as u32, 0);
        config.tlvs.peer_internal_address = pia;
        let mut bytes = Vec::new();
        config.encode_envelope(&mut bytes).expect("encodable");
        w.net.send_datagram(victim, target, &bytes);
        w.run_for(ms(10));
    }
    w.run_for(ms(200));
    assert!(
        !w.unclaimed
            .iter()
            .any(|d| matches!(d.event, tscf_core::sim::NetEvent::Datagram { .. })),
        "the victim hears nothing"
    );
    let after = w.nodes[a].client.stats().peer;
    let dropped = (after.dropped_unknown_peer - before.dropped_unknown_peer)
        + (after.integrity_failures - before.integrity_failures);
    assert_eq!(dropped, 30, "each one counted");
}

#[test]
fn forged_credentials_cannot_form_or_inject() {
    let _guard = SeedGuard(71);
    let (mut w, a, b) = build(71, Scenario::default());
    let mut call = Call::new(&w, a, b, ms(20));
    call.run(&mut w, Duration::from_secs(2));
    assert!(both_up(&w, a, b));
    let before = w.nodes[a].client.stats().peer;
    let path_before = w.nodes[a].client.peer_path(ipv4(&w, b));
    let tunnel_id = 0; // unknown to the attacker; guessing it changes nothing either
    let mallory_ip = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 66));
    w.add_raw_host(None, mallory_ip, LinkConfig::with_latency(ms(5)));
    let mallory = std::net::SocketAddr::new(mallory_ip, PEER_PORT);
    let target = w.nodes[a].peer_socket.expect("socket");
    let (ia, ib) = (ipv4(&w, a), ipv4(&w, b));
    let forged_key = [0x42u8; 16];
    let signed = |msg: &Message<'_>| {
        let mut out = Vec::new();
        msg.encode_envelope_with_integrity(&forged_key, &mut out)
            .expect("encodable");
        out
    };
    // Probes and a Configuration Request claiming to be b, under a guessed token.
    let mut probe = Message::new(MessageType::PEER_PROBE, 1, 0);
    probe.tlvs.peer_internal_address = Some(ib);
    let mut config = Message::new(MessageType::CONFIGURATION_REQUEST, 2, 0);
    config.tlvs.peer_internal_address = Some(ib);
    let mut keepalive = Message::new(MessageType::KEEPALIVE, 3, tunnel_id);
    keepalive.tlvs.peer_internal_address = None;
    let mut release = Message::new(MessageType::CONFIGURATION_RELEASE_REQUEST, 4, tunnel_id);
    release.tlvs.result_code = Some(ResultCode::SUCCESS);
    let injected = {
        let packet = udp_packet_ports(v4(&w, b), MEDIA, v4(&w, a), MEDIA, &tag(b'A', 999_999));
        let mut out = Vec::new();
        Envelope::encode(EnvelopeType::DATA, &packet, &mut out).expect("fits");
        out
    };
    for _ in 0..5 {
        for bytes in [
            signed(&probe),
            signed(&config),
            signed(&keepalive),
            signed(&release),
            injected.clone(),
        ] {
            w.net.send_datagram(mallory, target, &bytes);
        }
        call.run(&mut w, ms(50));
    }
    call.run(&mut w, ms(500));
    let after = w.nodes[a].client.stats().peer;
    assert!(
        after.integrity_failures >= before.integrity_failures + 10,
        "probes, requests"
    );
    assert!(
        after.dropped_unknown_peer >= before.dropped_unknown_peer + 10,
        "keepalive, release"
    );
    assert_eq!(
        after.dropped_bad_data,
        before.dropped_bad_data + 5,
        "injected data"
    );
    assert_eq!(
        after.probes_answered - before.probes_answered,
        0,
        "no answer to forgeries"
    );
    assert_eq!(
        w.nodes[a].client.peer_path(ib),
        path_before,
        "the tunnel is untouched"
    );
    assert!(is_peer(w.nodes[b].client.peer_path(ia)));
    assert_eq!(call.astray, 0, "nothing injected reached the application");
    // Mallory hears nothing.
    assert!(
        !w.unclaimed
            .iter()
            .any(|d| matches!(d.event, tscf_core::sim::NetEvent::Datagram { .. })),
        "no answer to forgeries"
    );
}

#[test]
fn invariants_hold_over_many_seeds_with_loss() {
    for_each_seed(1000..1500, |seed| {
        let mut r = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut next = |n: u64| {
            r ^= r >> 29;
            r = r.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            r ^= r >> 32;
            r % n
        };
        let s = Scenario {
            server_rtt: ms(20 + next(180)),
            peer_rtt: ms(2 + next(40)),
            a: SITES[next(5) as usize],
            b: SITES[next(5) as usize],
            loss: next(21) as f64 / 100.0,
            transport: if next(2) == 0 {
                Transport::UDP
            } else {
                Transport::TLS
            },
            ..Scenario::default()
        };
        let (mut w, a, b) = build(seed, s);
        let mut call = Call::new(&w, a, b, ms(20));
        call.signalling = true;
        let mut max_up = 0;
        for _ in 0..30 {
            call.run(&mut w, ms(100));
            let up = |i: usize, j: usize| is_peer(w.nodes[i].client.peer_path(ipv4(&w, j)));
            let tunnels = |i: usize| {
                w.nodes[i]
                    .client
                    .peer_tunnels()
                    .iter()
                    .filter(|t| t.path.is_some() && t.peer == ipv4(&w, 1 - i))
                    .count()
            };
            assert!(
                tunnels(a) <= 1 && tunnels(b) <= 1,
                "one tunnel per pair, {s:?}"
            );
            max_up = max_up.max(usize::from(up(a, b)) + usize::from(up(b, a)));
        }
        call.drain(&mut w, ms(1000));
        assert_eq!(call.duplicates(), 0, "no frame twice, {s:?}");
        assert_eq!(call.astray, 0, "no frame astray, {s:?}");
        for i in [a, b] {
            let ports = &w.nodes[i].peer_data_ports;
            assert!(
                ports.iter().all(|p| *p == MEDIA),
                "opted-out flows stay on the relay: {ports:?}"
            );
            // Ups and downs alternate: never two up tunnels at once.
            let mut level = 0i32;
            for e in &w.nodes[i].events {
                match e {
                    ClientEvent::PeerTunnelUp { .. } => level += 1,
                    ClientEvent::PeerTunnelDown { .. } if level > 0 => level -= 1,
                    _ => {}
                }
                assert!(level <= 1, "at most one up tunnel per pair, {s:?}");
            }
        }
        let _ = max_up;
    });
}

/// Time from the first opted-in frame of a to the first frame a sends on the peer tunnel.
fn measure_setup(seed: u64, server_rtt: Duration, peer_rtt: Duration, announce: bool) -> Duration {
    let s = Scenario {
        server_rtt,
        peer_rtt,
        ..Scenario::default()
    };
    let (mut w, a, b) = build_with(seed, s, announce);
    let to = v4(&w, b);
    let start = w.now();
    let mut n = 0u32;
    while w.now() < start + Duration::from_secs(3) {
        w.send_udp_ports(a, MEDIA, to, MEDIA, &tag(b'A', n));
        n += 1;
        if w.nodes[a].client.stats().peer.data_sent > 0 {
            return w.now() - start;
        }
        w.run_for(ms(1));
    }
    panic!("no peer tunnel in 3 s");
}

#[test]
fn measure_setup_time() {
    let mut table = String::from(
        "| server RTT | peer RTT | destination announced | setup | in server RTTs | goal (1 server + 2 peer RTT) |\n|---|---|---|---|---|---|\n",
    );
    for (server, peer) in [(100, 2), (40, 10), (200, 20)] {
        for announce in [true, false] {
            let _guard = SeedGuard(81);
            let (sr, pr) = (ms(server), ms(peer));
            let t = measure_setup(81, sr, pr, announce);
            let goal = sr + 2 * pr;
            table += &format!(
                "| {server} ms | {peer} ms | {} | {} ms | {:.2} | {} ms |\n",
                if announce { "yes" } else { "no" },
                t.as_millis(),
                t.as_secs_f64() / sr.as_secs_f64(),
                goal.as_millis(),
            );
            if announce {
                assert!(
                    t <= goal + ms(2),
                    "fast path within the goal: {t:?} > {goal:?}"
                );
            } else {
                assert!(t <= 2 * sr + 2 * pr + ms(2), "{t:?}");
            }
        }
    }
    eprintln!("Time from the first opted-in frame to the first frame on the peer tunnel:\n{table}");
}
