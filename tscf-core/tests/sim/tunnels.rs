//! Server tunnels: configuration at scale and under loss, director restart, re-attach,
//! persistence, anti-spoofing, and invariants over many random seeds.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use tscf_core::client::{ClientConfig, ClientEvent};
use tscf_core::cluster::{ClusterConfig, DirectorName};
use tscf_core::director::{DirectorConfig, DirectorEvent, Ipv4Pool};
use tscf_core::sim::world::{udp_packet, udp_payload, World, DIRECTOR_IP};
use tscf_core::sim::{
    for_each_seed, LinkConfig, LinkId, NatConfig, NatKind, SeedGuard, SiteConfig,
};
use tscf_core::wire::{Envelope, EnvelopeType, Message, MessageType, ResultCode, Transport};

use super::*;

fn transport_of(i: usize) -> Transport {
    if i.is_multiple_of(2) {
        Transport::TLS
    } else {
        Transport::UDP
    }
}

#[test]
fn hundred_clients_configure_and_two_exchange_frames() {
    let _guard = SeedGuard(1);
    let mut w = World::new(1, DirectorConfig::default(), ms(10));
    for i in 0..100 {
        add_client(&mut w, i, transport_of(i), LinkConfig::with_latency(ms(5)));
    }
    let deadline = w.now() + Duration::from_secs(5);
    assert!(
        w.run_until_cond(deadline, |w| (0..100).all(|i| w.connected(i))),
        "all configure"
    );
    let addrs: BTreeSet<_> = (0..100)
        .map(|i| w.nodes[i].client.internal_ipv4())
        .collect();
    assert_eq!(addrs.len(), 100, "every client has its own address");
    assert_eq!(w.director.stats().active_tunnels, 100);

    let (a, b) = (
        w.nodes[0].client.internal_ipv4().expect("v4"),
        w.nodes[1].client.internal_ipv4().expect("v4"),
    );
    for n in 0..50u32 {
        assert!(w.send_udp(0, b, &n.to_be_bytes()));
        assert!(w.send_udp(1, a, &(1000 + n).to_be_bytes()));
        w.run_for(ms(20));
    }
    w.run_for(ms(200));
    let got = |w: &World, i: usize| -> Vec<u32> {
        w.nodes[i]
            .received
            .iter()
            .map(|p| u32::from_be_bytes(udp_payload(p).try_into().expect("4 octets")))
            .collect()
    };
    assert_eq!(
        got(&w, 1),
        (0..50).collect::<Vec<_>>(),
        "TLS -> UDP, complete and in order"
    );
    assert_eq!(
        got(&w, 0),
        (1000..1050).collect::<Vec<_>>(),
        "UDP -> TLS, complete and in order"
    );
    assert!(
        w.nodes[2..].iter().all(|n| n.received.is_empty()),
        "nobody else got anything"
    );
}

#[test]
fn configuration_completes_under_30_percent_loss() {
    let mut times = Vec::new();
    for seed in 0..40 {
        let _guard = SeedGuard(seed);
        let mut w = World::new(seed, DirectorConfig::default(), ms(10));
        let lossy = LinkConfig {
            loss: 0.3,
            ..LinkConfig::with_latency(ms(20))
        };
        for i in 0..5 {
            add_client(&mut w, i, Transport::UDP, lossy.clone());
        }
        let start = w.now();
        for i in 0..5 {
            let deadline = start + Duration::from_secs(45);
            assert!(
                w.run_until_cond(deadline, |w| w.connected(i)),
                "client {i} configures within 45 s"
            );
            times.push(w.now() - start);
        }
    }
    times.sort();
    let p50 = times[times.len() / 2];
    let max = *times.last().expect("some");
    eprintln!("configuration over UDP with 30 % loss each way: median {p50:?}, max {max:?} over {} clients", times.len());
    assert!(
        p50 < Duration::from_secs(2),
        "most configure within a few retransmissions"
    );
}

#[test]
fn director_restart_gives_clients_fresh_tunnels() {
    let _guard = SeedGuard(3);
    let mut w = World::new(3, DirectorConfig::default(), ms(10));
    for i in 0..4 {
        add_client(&mut w, i, transport_of(i), LinkConfig::with_latency(ms(5)));
    }
    w.run_for(Duration::from_secs(2));
    let before: Vec<_> = (0..4).map(|i| w.nodes[i].client.tunnel_id()).collect();
    w.restart_director(99);
    let deadline = w.now() + Duration::from_secs(200);
    let fresh = |w: &World| (0..4).all(|i| connected_events(w, i).len() == 2 && w.connected(i));
    assert!(
        w.run_until_cond(deadline, fresh),
        "every client notices and gets a fresh tunnel"
    );
    for (i, before) in before.iter().enumerate() {
        assert_ne!(
            w.nodes[i].client.tunnel_id(),
            *before,
            "client {i} has a new tunnel"
        );
        assert!(w.nodes[i]
            .events
            .iter()
            .any(|e| matches!(e, ClientEvent::TunnelClosed { .. })));
    }
    assert_eq!(w.director.stats().active_tunnels, 4);
    let dst = w.nodes[1].client.internal_ipv4().expect("v4");
    assert!(w.send_udp(0, dst, b"after restart"));
    w.run_for(ms(100));
    assert_eq!(w.nodes[1].received.len(), 1);
}

#[test]
fn director_of_a_cluster_restarts_and_its_clients_keep_their_tunnels() {
    let _guard = SeedGuard(5);
    // The same director, started again with nothing but the registry: its clients re-attach,
    // and it adopts their tunnels from the records (keys derived from the cluster secret).
    let mesh = "192.0.2.1:4450".parse().expect("an address");
    let name = DirectorName::new("dir-a").expect("a name");
    let config = DirectorConfig {
        cluster: Some(ClusterConfig::new(name, [0x5e; 32], mesh)),
        ..DirectorConfig::default()
    };
    let mut w = World::new(5, config, ms(10));
    for i in 0..4 {
        add_client(&mut w, i, transport_of(i), LinkConfig::with_latency(ms(5)));
    }
    let deadline = w.now() + Duration::from_secs(10);
    assert!(w.run_until_cond(deadline, |w| (0..4).all(|i| w.connected(i))));
    w.run_for(Duration::from_secs(2));
    let before: Vec<_> = (0..4)
        .map(|i| {
            (
                w.nodes[i].client.tunnel_id(),
                w.nodes[i].client.internal_ipv4(),
            )
        })
        .collect();
    w.restart_director(99);
    let deadline = w.now() + Duration::from_secs(200);
    let back = |w: &World| w.director.stats().cluster.adoptions == 4;
    assert!(w.run_until_cond(deadline, back), "every tunnel adopted");
    for (i, before) in before.iter().enumerate() {
        let now = (
            w.nodes[i].client.tunnel_id(),
            w.nodes[i].client.internal_ipv4(),
        );
        assert_eq!(now, *before, "client {i} kept its tunnel");
        assert!(!w.nodes[i]
            .events
            .iter()
            .any(|e| matches!(e, ClientEvent::TunnelClosed { .. })));
    }
    let dst = before[1].1.expect("v4");
    assert!(w.send_udp(0, dst, b"after restart"));
    w.run_for(ms(100));
    assert_eq!(w.nodes[1].received.len(), 1);
}

#[test]
fn transport_loss_reattach_keeps_address_and_tunnel_id() {
    let _guard = SeedGuard(4);
    let mut w = World::new(4, DirectorConfig::default(), ms(10));
    add_client(&mut w, 0, Transport::TLS, LinkConfig::with_latency(ms(5)));
    add_client(&mut w, 1, Transport::UDP, LinkConfig::with_latency(ms(5)));
    w.run_for(Duration::from_secs(1));
    let (id, addr) = (
        w.nodes[0].client.tunnel_id(),
        w.nodes[0].client.internal_ipv4().expect("v4"),
    );
    // An RTP-like flow from client 1 to client 0 at 50 packets/s for 4 s, with client 0's
    // transport cut for 1.5 s in the middle.
    for n in 0..200u32 {
        if n == 50 {
            w.net.block(client_ip(0), DIRECTOR_IP);
        }
        if n == 125 {
            w.net.unblock(client_ip(0), DIRECTOR_IP);
        }
        assert!(w.send_udp(1, addr, &n.to_be_bytes()));
        w.run_for(ms(20));
    }
    w.run_for(Duration::from_secs(2));
    assert!(w.nodes[0]
        .events
        .iter()
        .any(|e| matches!(e, ClientEvent::Reattached(info) if Some(info.tunnel_id) == id)));
    assert_eq!(w.nodes[0].client.tunnel_id(), id);
    assert_eq!(w.nodes[0].client.internal_ipv4(), Some(addr));
    assert_eq!(
        connected_events(&w, 0).len(),
        1,
        "no fresh tunnel was needed"
    );
    let got: Vec<u32> = w.nodes[0]
        .received
        .iter()
        .map(|p| u32::from_be_bytes(udp_payload(p).try_into().expect("4")))
        .collect();
    let unique: BTreeSet<_> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "nothing duplicated");
    assert!(
        got.contains(&0) && got.contains(&199),
        "the flow continues after the re-attach"
    );
    eprintln!(
        "re-attach: {} of 200 frames arrived across a 1.5 s transport cut",
        got.len()
    );
    // The director holds the freshest frames for a persistent tunnel (64 by default) and
    // delivers them after the re-attach.
    let held = DirectorConfig::default().max_held_frames;
    assert!(
        got.len() >= 49 + held,
        "frames held at the director while persistent are delivered"
    );
    assert!(got.ends_with(&(200 - held as u32..200).collect::<Vec<_>>()));

    // A re-attach without the client's Message Integrity (with a guessed secret, as before
    // control messages were keyed) is refused and leaves the tunnel alone.
    let rogue = RawHost::new(&mut w, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 66)));
    let mut req = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
    req.tlvs.tunnel_id = id;
    req.tlvs.client_nonce = Some([0x66; 16]);
    req.tlvs.reattach_secret = Some([0x42; 16]);
    rogue.send(&mut w, &req);
    w.run_for(ms(100));
    let replies = rogue.received(&mut w);
    assert_eq!(
        control(&replies[0]).tlvs.result_code,
        Some(ResultCode::UNAUTHORIZED)
    );
    assert_eq!(w.director.stats().refused.bad_reattach_secret, 1);
    assert!(w.connected(0));
    assert!(w.send_udp(1, addr, b"still mine"));
    w.run_for(ms(100));
    assert_eq!(
        udp_payload(w.nodes[0].received.last().expect("one more")),
        b"still mine"
    );
}

#[test]
fn persistence_timeout_closes_the_tunnel_and_the_address_is_reused() {
    let _guard = SeedGuard(5);
    let pool = DirectorConfig {
        ipv4_pool: Some(Ipv4Pool::new(Ipv4Addr::new(10, 9, 0, 0), 29)),
        ipv6_pool: None,
        ..DirectorConfig::default()
    };
    let mut w = World::new(5, pool, ms(10));
    for i in 0..5 {
        add_client(&mut w, i, Transport::UDP, LinkConfig::with_latency(ms(5)));
    }
    w.run_for(Duration::from_secs(1));
    let lost = w.nodes[0].client.internal_ipv4().expect("v4");
    let id = w.nodes[0].client.tunnel_id().expect("id");
    let host = w.nodes[0].host;
    w.net.set_link_up(LinkId::Access(host), false);
    // Idle for 3 × 20 s (the keepalive interval a UDP client proposes), then persistent for
    // 330 s.
    w.run_for(Duration::from_secs(59));
    assert_eq!(w.director.stats().persistent_tunnels, 0);
    w.run_for(Duration::from_secs(2));
    assert_eq!(w.director.stats().persistent_tunnels, 1);
    w.run_for(Duration::from_secs(330));
    assert!(w.director_events.contains(&DirectorEvent::TunnelClosed {
        tunnel_id: id,
        reason: ResultCode::TIMEOUT
    }));
    let late = add_client(&mut w, 5, Transport::UDP, LinkConfig::with_latency(ms(5)));
    w.run_for(Duration::from_secs(1));
    assert_eq!(
        w.nodes[late].client.internal_ipv4(),
        Some(lost),
        "the freed address is reused"
    );
}

#[test]
fn spoofed_inner_source_is_dropped_and_counted() {
    let _guard = SeedGuard(6);
    let mut w = World::new(6, DirectorConfig::default(), ms(10));
    add_client(&mut w, 0, Transport::TLS, LinkConfig::with_latency(ms(5)));
    add_client(&mut w, 1, Transport::UDP, LinkConfig::with_latency(ms(5)));
    w.run_for(Duration::from_secs(1));
    let victim = w.nodes[0].client.internal_ipv4().expect("v4");
    let other = w.nodes[1].client.internal_ipv4().expect("v4");
    let rogue = RawHost::new(&mut w, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 66)));
    let mut request = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
    request.tlvs.client_nonce = Some([0x66; 16]);
    rogue.send(&mut w, &request);
    w.run_for(ms(100));
    let replies = rogue.received(&mut w);
    let own = control(&replies[0])
        .tlvs
        .internal_ipv4
        .expect("configured")
        .addr;
    let mut frame = Vec::new();
    Envelope::encode(
        EnvelopeType::DATA,
        &udp_packet(other, victim, b"spoofed"),
        &mut frame,
    )
    .expect("fits");
    rogue.send_bytes(&mut w, &frame);
    frame.clear();
    Envelope::encode(
        EnvelopeType::DATA,
        &udp_packet(own, victim, b"honest"),
        &mut frame,
    )
    .expect("fits");
    rogue.send_bytes(&mut w, &frame);
    w.run_for(ms(100));
    assert_eq!(w.director.stats().dropped.spoofed_source, 1);
    let got: Vec<_> = w.nodes[0]
        .received
        .iter()
        .map(|p| udp_payload(p).to_vec())
        .collect();
    assert_eq!(
        got,
        vec![b"honest".to_vec()],
        "only the honest frame arrives"
    );
}

/// A frame's tag: sender, sequence, and the address it was sent to.
fn tag(sender: usize, seq: u32, dst: Ipv4Addr) -> Vec<u8> {
    let mut t = (sender as u32).to_be_bytes().to_vec();
    t.extend(seq.to_be_bytes());
    t.extend(dst.octets());
    t
}

#[test]
fn random_seeds_keep_the_invariants() {
    let seeds = 1000;
    let delivered = std::sync::atomic::AtomicU64::new(0);
    for_each_seed(0..seeds, |seed| {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let config = DirectorConfig {
            ipv4_pool: Some(Ipv4Pool::new(Ipv4Addr::new(10, 9, 0, 0), 28)),
            ipv6_pool: None,
            max_queued_frames: 16,
            max_held_frames: 16,
            persistence_timeout: Duration::from_secs(3),
            ..DirectorConfig::default()
        };
        let mut w = World::new(seed, config, ms(5));
        let n = 5;
        for i in 0..n {
            let link = LinkConfig {
                loss: (rng.next_u32() % 10) as f64 / 100.0,
                jitter: ms(u64::from(rng.next_u32() % 5)),
                reorder: 0.05,
                ..LinkConfig::with_latency(ms(u64::from(1 + rng.next_u32() % 20)))
            };
            add_client(
                &mut w,
                i,
                if rng.next_u32() % 2 == 0 {
                    Transport::TLS
                } else {
                    Transport::UDP
                },
                link,
            );
        }
        let mut sent = 0u32;
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        for step in 0..400u32 {
            w.run_for(ms(25));
            let r = rng.next_u32();
            match r % 200 {
                0 => w.net.block(client_ip((r as usize / 200) % n), DIRECTOR_IP),
                1 | 2 => w
                    .net
                    .unblock(client_ip((r as usize / 200) % n), DIRECTOR_IP),
                3 => {
                    if let Some(id) = w.nodes[(r as usize / 200) % n].client.tunnel_id() {
                        let now = w.now();
                        let _ = w.director.close_tunnel(now, id, ResultCode::ADMINISTRATIVE);
                    }
                }
                _ => {}
            }
            let from = (r as usize / 7) % n;
            let to = (r as usize / 11) % n;
            if let Some(dst) = w.nodes[to].client.internal_ipv4() {
                sent += 1;
                w.send_udp(from, dst, &tag(from, sent, dst));
            }
            // Invariants, checked as the run goes.
            let mut held = BTreeMap::new();
            for t in w.director.tunnels() {
                if let Some(a) = t.ipv4 {
                    assert!(
                        held.insert(a, t.tunnel_id).is_none(),
                        "address {a} held twice"
                    );
                }
                assert!(t.queued_frames <= 16, "queue bound");
            }
            let mut claimed = BTreeSet::new();
            for i in 0..n {
                if w.connected(i) {
                    let a = w.nodes[i].client.internal_ipv4().expect("connected");
                    assert!(claimed.insert(a), "step {step}: two clients claim {a}");
                }
            }
            for i in 0..n {
                let own = w.nodes[i].client.internal_ipv4();
                for p in w.nodes[i].received.drain(..) {
                    let payload = udp_payload(&p).to_vec();
                    let dst = Ipv4Addr::new(payload[8], payload[9], payload[10], payload[11]);
                    assert_eq!(own, Some(dst), "frame delivered to its destination only");
                    assert!(seen.insert(payload), "frame delivered at most once");
                    delivered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            assert!(w.net.in_flight() < 10_000, "network queue bounded");
        }
    });
    eprintln!(
        "{seeds} seeds: {} tagged frames delivered, none twice, none astray",
        delivered.load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// A client behind a NAT that gives it a new public port mid-call (its mappings flushed, as
/// when conntrack forgets them): its next packets come from an address the director has never
/// seen, and the first authenticated request from there moves the tunnel. Same tunnel, same
/// address, no re-attach, and the media resumes both ways.
#[test]
fn a_nat_rebinding_moves_the_tunnel_and_the_media_resumes() {
    for_each_seed(0..8, |seed| {
        let mut w = World::new(seed, DirectorConfig::default(), ms(10));
        let site = w.net.add_site(SiteConfig {
            nat: Some(NatConfig::new(
                NatKind::Symmetric,
                IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1)),
            )),
            uplink: LinkConfig::default(),
        });
        let config = ClientConfig::new(vec![World::endpoint(Transport::UDP)]);
        let a = w.add_client(
            Some(site),
            client_ip(0),
            LinkConfig::with_latency(ms(5)),
            config,
        );
        let b = add_client(&mut w, 1, Transport::UDP, LinkConfig::with_latency(ms(5)));
        w.run_for(Duration::from_secs(1));
        assert!(w.connected(a) && w.connected(b));
        let id = w.nodes[a].client.tunnel_id();
        let (ia, ib) = (
            w.nodes[a].client.internal_ipv4().expect("v4"),
            w.nodes[b].client.internal_ipv4().expect("v4"),
        );
        for n in 0..150u32 {
            if n == 50 {
                w.net.flush_nat(site);
            }
            assert!(w.send_udp(a, ib, &n.to_be_bytes()));
            assert!(w.send_udp(b, ia, &n.to_be_bytes()));
            w.run_for(ms(20));
        }
        w.run_for(ms(500));
        let got = |w: &World, i: usize| -> Vec<u32> {
            w.nodes[i]
                .received
                .iter()
                .map(|p| u32::from_be_bytes(udp_payload(p).try_into().expect("4 octets")))
                .collect()
        };
        for (what, at) in [("to a", a), ("to b", b)] {
            let got = got(&w, at);
            assert!(got.contains(&149), "{what}: the media resumes: {got:?}");
            assert!(got.len() >= 110, "{what}: {} of 150", got.len());
        }
        assert_eq!(w.nodes[a].client.tunnel_id(), id);
        assert_eq!(connected_events(&w, a).len(), 1, "no fresh tunnel");
        let stats = w.director.stats();
        assert_eq!((stats.moves, stats.reattaches), (1, 0));
        assert!(w.nodes[a].client.stats().roaming_probes >= 1);
    });
}
