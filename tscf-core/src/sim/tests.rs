use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn link(latency_ms: u64) -> LinkConfig {
    LinkConfig::with_latency(ms(latency_ms))
}

/// A received datagram: (time since start, receiving host, from, to, payload).
type Rx = (Duration, HostId, SocketAddr, SocketAddr, Vec<u8>);

fn run_for(net: &mut Network, d: Duration) -> Vec<Delivery> {
    let until = net.now() + d;
    net.advance(until)
}

fn datagrams(net: &mut Network, d: Duration) -> Vec<Rx> {
    let start = net.start();
    run_for(net, d)
        .into_iter()
        .filter_map(|del| match del.event {
            NetEvent::Datagram { from, to, payload } => {
                Some((del.at - start, del.host, from, to, payload))
            }
            _ => None,
        })
        .collect()
}

/// One datagram from `from` to `to`, run until quiet, and what arrived.
fn exchange(net: &mut Network, from: SocketAddr, to: SocketAddr) -> Vec<Rx> {
    net.send_datagram(from, to, b"x");
    datagrams(net, Duration::from_secs(2))
}

fn seq_of(payload: &[u8]) -> u32 {
    u32::from_be_bytes(payload[..4].try_into().expect("4-byte sequence"))
}

/// Two public hosts, `a` with `access` and `b` with an ideal link.
fn pair(seed: u64, access: LinkConfig) -> (Network, SocketAddr, SocketAddr) {
    let mut net = Network::new(seed);
    let (a, b) = (sa("203.0.113.1:1000"), sa("203.0.113.2:2000"));
    net.add_host(None, a.ip(), access);
    net.add_host(None, b.ip(), LinkConfig::default());
    (net, a, b)
}

/// Sends `n` numbered datagrams from `a` to `b`, one per millisecond, and collects arrivals.
fn stream_of(net: &mut Network, a: SocketAddr, b: SocketAddr, n: u32) -> Vec<Rx> {
    let mut rx = Vec::new();
    for i in 0..n {
        net.send_datagram(a, b, &i.to_be_bytes());
        rx.extend(datagrams(net, ms(1)));
    }
    rx.extend(datagrams(net, Duration::from_secs(5)));
    rx
}

#[test]
fn latency_adds_up_along_the_path() {
    let mut net = Network::new(1);
    let nat = NatConfig::new(NatKind::EndpointIndependent, ip("198.51.100.1"));
    let site_a = net.add_site(SiteConfig {
        nat: Some(nat),
        uplink: link(20),
    });
    let site_b = net.add_site(SiteConfig {
        nat: None,
        uplink: link(30),
    });
    let (a, b, s) = (
        sa("10.0.0.2:5000"),
        sa("192.0.2.7:6000"),
        sa("203.0.113.9:7000"),
    );
    let ha = net.add_host(Some(site_a), a.ip(), link(5));
    let hb = net.add_host(Some(site_b), b.ip(), link(7));
    let hs = net.add_host(None, s.ip(), link(3));

    let rx = exchange(&mut net, a, b);
    let mapped = sa("198.51.100.1:5000");
    assert_eq!(rx, vec![(ms(62), hb, mapped, b, b"x".to_vec())]);
    // The reply crosses the same four links and the NAT back to the private address.
    let t0 = net.elapsed();
    let rx = exchange(&mut net, b, mapped);
    assert_eq!(rx, vec![(t0 + ms(62), ha, b, a, b"x".to_vec())]);
    // A host directly on the internet: access, uplink, access.
    let t0 = net.elapsed();
    let rx = exchange(&mut net, a, s);
    assert_eq!(rx, vec![(t0 + ms(28), hs, mapped, s, b"x".to_vec())]);
}

#[test]
fn jitter_stays_within_bounds_and_never_reorders() {
    let access = LinkConfig {
        latency: ms(10),
        jitter: ms(5),
        ..LinkConfig::default()
    };
    let (mut net, a, b) = pair(2, access);
    let mut delays = Vec::new();
    let mut last_seq = None;
    for i in 0..1000u32 {
        net.send_datagram(a, b, &i.to_be_bytes());
        for (at, _, _, _, payload) in datagrams(&mut net, ms(1)) {
            let seq = seq_of(&payload);
            assert!(
                last_seq < Some(seq),
                "jitter reordered {seq} after {last_seq:?}"
            );
            last_seq = Some(seq);
            // Datagram `seq` was sent at `seq` ms.
            delays.push(at - ms(u64::from(seq)));
        }
    }
    for (_, _, _, _, payload) in datagrams(&mut net, ms(100)) {
        let seq = seq_of(&payload);
        assert!(last_seq < Some(seq));
        last_seq = Some(seq);
    }
    assert_eq!(net.stats().delivered, 1000);
    let (min, max) = (delays.iter().min(), delays.iter().max());
    assert!(
        min >= Some(&ms(10)) && max <= Some(&ms(15)),
        "{min:?}..{max:?}"
    );
    assert!(max > min, "jitter had no effect");
}

#[test]
fn loss_rate_matches_configuration() {
    let access = LinkConfig {
        loss: 0.3,
        ..LinkConfig::default()
    };
    let (mut net, a, b) = pair(3, access);
    let rx = stream_of(&mut net, a, b, 10_000);
    let delivered = rx.len() as f64 / 10_000.0;
    assert!((delivered - 0.7).abs() < 0.03, "delivered {delivered}");
    let stats = net.stats();
    assert_eq!(stats.dropped_loss + stats.delivered, 10_000);
    assert_eq!(stats.dropped(DropReason::Loss), stats.total_dropped());
}

fn count_out_of_order(rx: &[Rx]) -> usize {
    rx.windows(2)
        .filter(|w| seq_of(&w[1].4) < seq_of(&w[0].4))
        .count()
}

#[test]
fn duplication_and_reordering_happen_only_when_configured() {
    let dup = LinkConfig {
        latency: ms(5),
        duplicate: 0.1,
        ..LinkConfig::default()
    };
    let (mut net, a, b) = pair(4, dup);
    let rx = stream_of(&mut net, a, b, 2000);
    let dups = net.stats().duplicated;
    assert!((100..300).contains(&dups), "duplicated {dups}");
    assert_eq!(rx.len() as u64, 2000 + dups);
    assert_eq!(count_out_of_order(&rx), 0);

    let reorder = LinkConfig {
        latency: ms(5),
        reorder: 0.1,
        reorder_delay: ms(3),
        ..LinkConfig::default()
    };
    let (mut net, a, b) = pair(4, reorder);
    let rx = stream_of(&mut net, a, b, 2000);
    assert_eq!(rx.len(), 2000);
    assert!(count_out_of_order(&rx) > 100, "no reordering");
    assert_eq!(net.stats().duplicated, 0);

    let plain = LinkConfig {
        latency: ms(5),
        jitter: ms(4),
        ..LinkConfig::default()
    };
    let (mut net, a, b) = pair(4, plain);
    let rx = stream_of(&mut net, a, b, 2000);
    assert_eq!(rx.len(), 2000);
    assert_eq!(count_out_of_order(&rx), 0);
    assert_eq!(net.stats().duplicated, 0);
}

#[test]
fn mtu_drops_are_counted() {
    let (mut net, a, b) = pair(5, LinkConfig::default());
    net.send_datagram(a, b, &[0; 1472]);
    net.send_datagram(a, b, &[0; 1473]);
    let rx = datagrams(&mut net, ms(10));
    assert_eq!(rx.len(), 1);
    assert_eq!(rx[0].4.len(), 1472);
    assert_eq!(net.stats().dropped_mtu, 1);

    // IPv6 headers are 20 bytes larger.
    let (a6, b6) = (sa("[2001:db8::1]:1"), sa("[2001:db8::2]:2"));
    net.add_host(None, a6.ip(), LinkConfig::default());
    net.add_host(None, b6.ip(), LinkConfig::default());
    net.send_datagram(a6, b6, &[0; 1452]);
    net.send_datagram(a6, b6, &[0; 1453]);
    assert_eq!(datagrams(&mut net, ms(10)).len(), 1);
    assert_eq!(net.stats().dropped_mtu, 2);
}

/// An impaired scenario through symmetric NATs (random ports) with every random feature on.
fn scenario(seed: u64) -> Vec<Rx> {
    let _guard = SeedGuard(seed);
    let mut net = Network::new(seed);
    let bad = LinkConfig {
        latency: ms(10),
        jitter: ms(10),
        loss: 0.2,
        duplicate: 0.05,
        reorder: 0.1,
        ..LinkConfig::default()
    };
    let mut hosts = Vec::new();
    for i in 0..3u8 {
        let nat = NatConfig::new(NatKind::Symmetric, IpAddr::from([198, 51, 100, i + 1]));
        let site = net.add_site(SiteConfig {
            nat: Some(nat),
            uplink: bad.clone(),
        });
        let h = SocketAddr::from(([10, 0, i, 2], 4000));
        net.add_host(Some(site), h.ip(), bad.clone());
        hosts.push(h);
    }
    let server = sa("203.0.113.1:3478");
    net.add_host(None, server.ip(), bad);
    let mut all = Vec::new();
    for round in 0..200u32 {
        for h in &hosts {
            net.send_datagram(*h, server, &round.to_be_bytes());
        }
        for rx in datagrams(&mut net, ms(3)) {
            if rx.3 == server {
                // The server echoes to whatever mapping it saw.
                net.send_datagram(server, rx.2, &rx.4);
            }
            all.push(rx);
        }
    }
    all.extend(datagrams(&mut net, Duration::from_secs(1)));
    all
}

#[test]
fn same_seed_same_run_different_seed_different_run() {
    let a = scenario(42);
    assert!(a.len() > 100);
    assert_eq!(a, scenario(42));
    assert_ne!(a, scenario(43));
}

/// A host behind a NAT of `kind` and three public endpoints: `s1`, `s1` on another port, `s2`.
struct NatFixture {
    net: Network,
    site: SiteId,
    host: SocketAddr,
    s1: SocketAddr,
    s1_other_port: SocketAddr,
    s2: SocketAddr,
}

fn nat_fixture(kind: NatKind, configure: impl FnOnce(&mut NatConfig)) -> NatFixture {
    let mut net = Network::new(6);
    let mut nat = NatConfig::new(kind, ip("198.51.100.1"));
    configure(&mut nat);
    let site = net.add_site(SiteConfig {
        nat: Some(nat),
        uplink: link(10),
    });
    let host = sa("10.0.0.2:5000");
    net.add_host(Some(site), host.ip(), link(1));
    let (s1, s2) = (sa("203.0.113.1:3478"), sa("203.0.113.2:3478"));
    net.add_host(None, s1.ip(), link(1));
    net.add_host(None, s2.ip(), link(1));
    NatFixture {
        net,
        site,
        host,
        s1,
        s1_other_port: sa("203.0.113.1:3479"),
        s2,
    }
}

/// Sends from the NATed host to `to` and returns the public source seen there.
fn mapped_source(f: &mut NatFixture, to: SocketAddr) -> SocketAddr {
    let rx = exchange(&mut f.net, f.host, to);
    assert_eq!(rx.len(), 1, "outbound datagram lost");
    rx[0].2
}

/// Whether a datagram from `from` to the public mapping reaches the host.
fn passes(f: &mut NatFixture, from: SocketAddr, mapping: SocketAddr) -> bool {
    let rx = exchange(&mut f.net, from, mapping);
    assert!(rx.len() <= 1);
    rx.first()
        .map(|(_, _, src, dst, _)| {
            assert_eq!((*src, *dst), (from, f.host));
        })
        .is_some()
}

#[test]
fn nat_kinds_map_and_filter_as_rfc4787_prescribes() {
    // (kind, from the contacted endpoint, same IP other port, other IP)
    let table = [
        (NatKind::EndpointIndependent, true, true, true),
        (NatKind::AddressDependentFiltering, true, true, false),
        (NatKind::AddressPortDependentFiltering, true, false, false),
        (NatKind::Symmetric, true, false, false),
    ];
    for (kind, reply, other_port, other_ip) in table {
        let mut f = nat_fixture(kind, |_| {});
        assert_eq!(f.net.nat_mapping_count(f.site), 0);
        let (s1, s1b, s2) = (f.s1, f.s1_other_port, f.s2);
        let m1 = mapped_source(&mut f, s1);
        assert_eq!(m1.ip(), ip("198.51.100.1"));
        assert_eq!(f.net.nat_mapping_count(f.site), 1, "{kind:?}");
        assert_eq!(f.net.nat_mapping(f.site, f.host, s1), Some(m1));

        assert_eq!(passes(&mut f, s1, m1), reply, "{kind:?} reply");
        assert_eq!(passes(&mut f, s1b, m1), other_port, "{kind:?} other port");
        assert_eq!(passes(&mut f, s2, m1), other_ip, "{kind:?} other address");
        let filtered = [reply, other_port, other_ip]
            .iter()
            .filter(|p| !**p)
            .count();
        assert_eq!(
            f.net.stats().dropped_nat_filtered,
            filtered as u64,
            "{kind:?}"
        );
        // Nobody's mapping: always filtered.
        let unused = SocketAddr::new(m1.ip(), m1.port().wrapping_add(1));
        assert!(!passes(&mut f, s1, unused), "{kind:?} unmapped port");

        let m2 = mapped_source(&mut f, s2);
        if kind.endpoint_independent_mapping() {
            assert_eq!(m2, m1, "{kind:?} must reuse the mapping");
            assert_eq!(m1.port(), f.host.port(), "{kind:?} must preserve the port");
            assert_eq!(f.net.nat_mapping_count(f.site), 1);
            // Having sent to s2, s2 may now reply on the shared mapping.
            assert!(passes(&mut f, s2, m1), "{kind:?}");
        } else {
            assert_ne!(m2.port(), m1.port(), "symmetric NAT reused a mapping");
            assert_eq!(f.net.nat_mapping_count(f.site), 2);
            assert!(passes(&mut f, s2, m2));
            assert!(
                !passes(&mut f, s2, m1),
                "symmetric mapping open to another endpoint"
            );
        }
    }
}

#[test]
fn nat_mappings_expire_without_outbound_traffic() {
    for kind in NatKind::ALL {
        let mut f = nat_fixture(kind, |n| n.mapping_timeout = Duration::from_secs(30));
        let s1 = f.s1;
        let m = mapped_source(&mut f, s1);
        // Inbound traffic does not refresh; outbound does.
        f.net.advance_to(f.net.now() + Duration::from_secs(20));
        assert!(passes(&mut f, s1, m), "{kind:?}");
        assert_eq!(
            mapped_source(&mut f, s1),
            m,
            "{kind:?} refresh kept the mapping"
        );
        f.net.advance_to(f.net.now() + Duration::from_secs(25));
        assert!(passes(&mut f, s1, m), "{kind:?} refreshed mapping expired");
        f.net.advance_to(f.net.now() + Duration::from_secs(10));
        assert_eq!(f.net.nat_mapping_count(f.site), 0, "{kind:?}");
        assert!(!passes(&mut f, s1, m), "{kind:?} expired mapping passed");
    }
}

#[test]
fn flush_nat_removes_mappings_mid_call() {
    let mut f = nat_fixture(NatKind::AddressPortDependentFiltering, |_| {});
    let s1 = f.s1;
    let m = mapped_source(&mut f, s1);
    assert!(passes(&mut f, s1, m));
    f.net.flush_nat(f.site);
    assert_eq!(f.net.nat_mapping_count(f.site), 0);
    assert!(!passes(&mut f, s1, m));
    // The next outbound datagram creates a fresh mapping.
    assert_eq!(mapped_source(&mut f, s1), m);
    assert!(passes(&mut f, s1, m));
}

#[test]
fn hairpinning_is_configurable() {
    for hairpin in [false, true] {
        let mut f = nat_fixture(NatKind::AddressPortDependentFiltering, |n| {
            n.hairpin = hairpin
        });
        let peer = sa("10.0.0.3:6000");
        let h_peer = f.net.add_host(Some(f.site), peer.ip(), link(1));
        let s1 = f.s1;
        let m_host = mapped_source(&mut f, s1);
        let rx = exchange(&mut f.net, peer, s1);
        let m_peer = rx[0].2;
        // The host opens its filter towards the peer's mapping, then the peer sends to it.
        let host = f.host;
        exchange(&mut f.net, host, m_peer);
        let t0 = f.net.elapsed();
        let rx = exchange(&mut f.net, peer, m_host);
        if hairpin {
            assert_eq!(rx.len(), 1);
            assert_eq!((rx[0].2, rx[0].3), (m_peer, host));
            assert_ne!(rx[0].1, h_peer);
            // It turned around at the NAT: two access links, no uplink.
            assert_eq!(rx[0].0 - t0, ms(2));
        } else {
            assert!(rx.is_empty());
            assert!(f.net.stats().dropped_nat_filtered >= 2);
        }
    }
}

/// Two hosts behind NATs of `kind`, which learn their mappings from a server and then send
/// to each other's mapping at the same time, five times. Returns what each received from the
/// other.
fn punch(kind: NatKind, seed: u64) -> (usize, usize, Network) {
    let mut net = Network::new(seed);
    let mut hosts = Vec::new();
    for (i, uplink) in [(1u8, 12), (2, 31)] {
        let nat = NatConfig::new(kind, IpAddr::from([198, 51, 100, i]));
        let site = net.add_site(SiteConfig {
            nat: Some(nat),
            uplink: link(uplink),
        });
        let h = SocketAddr::from(([192, 168, 1, i], 40000));
        net.add_host(Some(site), h.ip(), link(2));
        hosts.push(h);
    }
    let server = sa("203.0.113.1:3478");
    net.add_host(None, server.ip(), link(5));
    let (a, b) = (hosts[0], hosts[1]);
    net.send_datagram(a, server, b"binding");
    net.send_datagram(b, server, b"binding");
    let seen: Vec<SocketAddr> = datagrams(&mut net, Duration::from_secs(1))
        .iter()
        .map(|rx| rx.2)
        .collect();
    assert_eq!(seen.len(), 2);
    let (ma, mb) = if seen[0].ip() == ip("198.51.100.1") {
        (seen[0], seen[1])
    } else {
        (seen[1], seen[0])
    };
    let mut rx = Vec::new();
    for _ in 0..5 {
        net.send_datagram(a, mb, b"punch");
        net.send_datagram(b, ma, b"punch");
        rx.extend(datagrams(&mut net, ms(20)));
    }
    rx.extend(datagrams(&mut net, Duration::from_secs(1)));
    let at_a = rx
        .iter()
        .filter(|r| r.3 == a && r.2.ip() == mb.ip())
        .count();
    let at_b = rx
        .iter()
        .filter(|r| r.3 == b && r.2.ip() == ma.ip())
        .count();
    assert_eq!(at_a + at_b, rx.len());
    (at_a, at_b, net)
}

#[test]
fn hole_punching_works_through_cone_nats_and_not_through_symmetric_ones() {
    for_each_seed(0..4, |seed| {
        for kind in [
            NatKind::EndpointIndependent,
            NatKind::AddressDependentFiltering,
            NatKind::AddressPortDependentFiltering,
        ] {
            let (at_a, at_b, _) = punch(kind, seed);
            assert_eq!((at_a, at_b), (5, 5), "{kind:?}");
        }
        let (at_a, at_b, net) = punch(NatKind::Symmetric, seed);
        assert_eq!((at_a, at_b), (0, 0));
        assert_eq!(net.stats().dropped_nat_filtered, 10);
    });
}

#[test]
fn same_site_hosts_talk_directly_over_the_lan() {
    let mut net = Network::new(7);
    let nat = NatConfig::new(NatKind::Symmetric, ip("198.51.100.1"));
    let site = net.add_site(SiteConfig {
        nat: Some(nat),
        uplink: link(50),
    });
    let (a, b) = (sa("10.0.0.2:1"), sa("10.0.0.3:2"));
    net.add_host(Some(site), a.ip(), link(1));
    let hb = net.add_host(Some(site), b.ip(), link(2));
    let rx = exchange(&mut net, a, b);
    assert_eq!(rx, vec![(ms(3), hb, a, b, b"x".to_vec())]);
    assert_eq!(net.nat_mapping_count(site), 0);
}

#[test]
fn unroutable_destinations_are_dropped_and_counted() {
    let mut net = Network::new(8);
    let sites: Vec<SiteId> = (1..=2u8)
        .map(|i| {
            let nat = NatConfig::new(
                NatKind::EndpointIndependent,
                IpAddr::from([198, 51, 100, i]),
            );
            net.add_site(SiteConfig {
                nat: Some(nat),
                uplink: LinkConfig::default(),
            })
        })
        .collect();
    let (a, b) = (sa("10.0.0.2:1"), sa("10.1.0.2:1"));
    net.add_host(Some(sites[0]), a.ip(), LinkConfig::default());
    net.add_host(Some(sites[1]), b.ip(), LinkConfig::default());
    // Nobody owns it; and another site's private address is not routed on the internet.
    assert!(exchange(&mut net, a, sa("203.0.113.200:1")).is_empty());
    assert!(exchange(&mut net, a, b).is_empty());
    assert_eq!(net.stats().dropped_no_route, 2);
}

#[test]
fn in_flight_datagrams_are_bounded() {
    let (mut net, a, b) = pair(9, link(10));
    net.set_max_in_flight(10);
    for _ in 0..25 {
        net.send_datagram(a, b, b"x");
    }
    assert_eq!(net.in_flight(), 10);
    assert_eq!(datagrams(&mut net, ms(100)).len(), 10);
    assert_eq!(net.stats().dropped_queue_full, 15);
    assert_eq!(net.in_flight(), 0);
}

#[test]
fn advance_to_keeps_deliveries_due_on_the_way() {
    let (mut net, a, b) = pair(10, link(10));
    net.send_datagram(a, b, b"x");
    assert_eq!(net.poll_timeout(), Some(net.start() + ms(10)));
    net.advance_to(net.start() + ms(50));
    assert_eq!(net.now(), net.start() + ms(50));
    assert_eq!(net.poll_timeout(), Some(net.now()));
    let d = net.next_delivery(net.now()).expect("held delivery");
    assert_eq!(d.at, net.start() + ms(10));
    assert_eq!(net.poll_timeout(), None);
}

#[test]
fn for_each_seed_runs_every_seed() {
    let seen = Cell::new(Vec::new());
    for_each_seed(3..7, |s| {
        let mut v = seen.take();
        v.push(s);
        seen.set(v);
    });
    assert_eq!(seen.take(), vec![3, 4, 5, 6]);
}

#[test]
fn seed_guard_reports_on_panic() {
    let r = std::panic::catch_unwind(|| {
        let _guard = SeedGuard(99);
        panic!("expected test panic");
    });
    assert!(r.is_err());
}

/// A client behind a port-restricted NAT and a public server listening on `server`.
fn stream_fixture() -> (Network, SiteId, SocketAddr, SocketAddr, HostId, HostId) {
    let mut net = Network::new(11);
    let nat = NatConfig::new(NatKind::AddressPortDependentFiltering, ip("198.51.100.1"));
    let site = net.add_site(SiteConfig {
        nat: Some(nat),
        uplink: LinkConfig {
            latency: ms(10),
            jitter: ms(5),
            ..LinkConfig::default()
        },
    });
    let (client, server) = (sa("10.0.0.2:50000"), sa("203.0.113.1:443"));
    let hc = net.add_host(Some(site), client.ip(), link(1));
    let hs = net.add_host(None, server.ip(), link(4));
    net.listen_stream(server);
    (net, site, client, server, hc, hs)
}

fn stream_events(net: &mut Network, d: Duration) -> Vec<(HostId, NetEvent)> {
    run_for(net, d)
        .into_iter()
        .map(|d| (d.host, d.event))
        .collect()
}

#[test]
fn stream_data_arrives_complete_and_in_order() {
    let (mut net, _, client, server, hc, hs) = stream_fixture();
    let c = net.connect_stream(client, server);
    let mut sent = Vec::new();
    for i in 0..200u32 {
        let chunk = vec![i as u8; 1 + (i as usize * 37) % 3000];
        net.stream_send(c, &chunk)
            .expect("send before connect is queued");
        sent.extend_from_slice(&chunk);
    }

    let start = net.now();
    let deadline = start + Duration::from_secs(1);
    let mut received = Vec::new();
    let (mut accepted, mut connected, mut closed) = (None, false, false);
    while let Some(d) = net.next_delivery(deadline) {
        match (d.host, d.event) {
            (
                h,
                NetEvent::StreamAccepted {
                    stream,
                    local,
                    remote,
                },
            ) => {
                assert_eq!(h, hs);
                assert_eq!(local, server);
                assert_eq!(remote.ip(), ip("198.51.100.1"));
                // One way is 1 + 10..=15 + 4 ms.
                let t = d.at - start;
                assert!(t >= ms(15) && t <= ms(20), "{t:?}");
                accepted = Some(stream);
            }
            (
                h,
                NetEvent::StreamConnected {
                    stream,
                    local,
                    remote,
                },
            ) => {
                assert_eq!((h, stream, local, remote), (hc, c, client, server));
                connected = true;
                // Data sent before the close still arrives before the close.
                net.stream_send(c, b"last").expect("open stream");
                sent.extend_from_slice(b"last");
                net.close_stream(c).expect("close");
                assert_eq!(net.stream_send(c, b"late"), Err(StreamError::Closed));
            }
            (h, NetEvent::StreamData { stream, data }) => {
                assert_eq!((h, Some(stream)), (hs, accepted));
                assert!(!closed);
                received.extend_from_slice(&data);
            }
            (h, NetEvent::StreamClosed { stream }) => {
                assert_eq!((h, Some(stream)), (hs, accepted));
                closed = true;
            }
            (_, e) => panic!("unexpected {e:?}"),
        }
    }
    assert!(connected && closed);
    assert_eq!(received, sent);
    let s = accepted.expect("accepted");
    assert_eq!(net.stream_send(s, b"too late"), Err(StreamError::Closed));
    assert_eq!(net.stats().streams_opened, 1);
}

#[test]
fn streams_are_refused_into_a_nat_or_without_a_listener() {
    let (mut net, site, client, server, hc, hs) = stream_fixture();
    let nat_ip = net.nat_public_ip(site).expect("NAT site");
    net.listen_stream(client);
    let s = net.connect_stream(server, SocketAddr::new(nat_ip, client.port()));
    assert_eq!(
        stream_events(&mut net, ms(100)),
        vec![(hs, NetEvent::StreamReset { stream: s })]
    );
    assert_eq!(net.stream_send(s, b"x"), Err(StreamError::Reset));

    let not_listening = SocketAddr::new(server.ip(), 80);
    let c = net.connect_stream(client, not_listening);
    let start = net.now();
    let events = run_for(&mut net, ms(100));
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].host, &events[0].event),
        (hc, &NetEvent::StreamReset { stream: c })
    );
    // The reset comes back after a round trip.
    assert!(events[0].at - start >= ms(30));
    assert_eq!(net.stats().streams_refused, 2);
}

#[test]
fn block_cuts_streams_and_datagrams() {
    let (mut net, site, client, server, hc, hs) = stream_fixture();
    let c = net.connect_stream(client, server);
    let events = stream_events(&mut net, ms(200));
    let Some((_, NetEvent::StreamAccepted { stream: s, .. })) = events.first().cloned() else {
        panic!("not accepted: {events:?}");
    };
    net.stream_send(c, b"ping").expect("open stream");
    let nat_ip = net.nat_public_ip(site).expect("NAT site");
    net.block(nat_ip, server.ip());
    let mut events = stream_events(&mut net, ms(200));
    events.sort_by_key(|e| e.0);
    assert_eq!(
        events,
        vec![
            (hc, NetEvent::StreamReset { stream: c }),
            (hs, NetEvent::StreamReset { stream: s }),
        ]
    );
    assert_eq!(net.stream_send(c, b"x"), Err(StreamError::Reset));
    assert_eq!(net.stats().streams_reset, 1);

    assert!(exchange(&mut net, client, server).is_empty());
    assert_eq!(net.stats().dropped_blocked, 1);
    // New streams are refused while blocked, and everything works again once unblocked.
    net.connect_stream(client, server);
    assert!(matches!(
        stream_events(&mut net, ms(200))[..],
        [(_, NetEvent::StreamReset { .. })]
    ));
    net.unblock(nat_ip, server.ip());
    assert_eq!(exchange(&mut net, client, server).len(), 1);
}

#[test]
fn link_down_drops_datagrams_and_resets_streams() {
    let (mut net, site, client, server, _, _) = stream_fixture();
    let c = net.connect_stream(client, server);
    assert_eq!(stream_events(&mut net, ms(200)).len(), 2);
    net.set_link_up(LinkId::Uplink(site), false);
    assert_eq!(
        stream_events(&mut net, ms(200)).len(),
        2,
        "both ends get a reset"
    );
    assert_eq!(net.stream_send(c, b"x"), Err(StreamError::Reset));
    assert!(exchange(&mut net, client, server).is_empty());
    assert_eq!(net.stats().dropped_link_down, 1);
    net.set_link_up(LinkId::Uplink(site), true);
    assert_eq!(exchange(&mut net, client, server).len(), 1);
}

#[test]
fn instants_are_virtual() {
    let mut net = Network::new(12);
    let start: Instant = net.start();
    net.advance_to(start + Duration::from_secs(3600));
    assert_eq!(net.elapsed(), Duration::from_secs(3600));
}
