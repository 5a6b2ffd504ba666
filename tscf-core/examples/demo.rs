//! tscf in one screen: a session director and two clients on a simulated network.
//!
//! Alice and Bob sit on one LAN behind a NAT; the director is 50 ms away. Alice calls Bob: an
//! RTP-like echo flow of 50 packets per second, on an inner UDP socket opted in to peer
//! tunneling. The flow starts on the relay through the director; the clients discover their
//! NAT, the director introduces them, they probe each other and form a peer tunnel, and the
//! flow moves to it without losing a packet. Then the LAN path breaks and the flow falls back
//! to the relay.
//!
//! Everything runs in virtual time from a seed, so the output is the same every run:
//! `cargo run --release -p tscf-core --features sim --example demo [-- SEED]`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tscf_core::client::{ClientConfig, ClientEvent, PeerConfig, PeerPath};
use tscf_core::director::DirectorConfig;
use tscf_core::sim::world::{udp_payload, World};
use tscf_core::sim::{LinkConfig, NatConfig, NatKind, SiteConfig};
use tscf_core::wire::Transport;

const RTP_PORT: u16 = 5004;
const ALICE: usize = 0;
const BOB: usize = 1;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// One echo request Alice sent, and what became of it.
struct Ping {
    sent: Instant,
    path: &'static str,
    rtt: Option<Duration>,
}

fn main() {
    let seed = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let mut w = World::new(seed, DirectorConfig::default(), ms(29));
    let lan = w.add_site(SiteConfig {
        nat: Some(NatConfig::new(
            NatKind::AddressPortDependentFiltering,
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
        )),
        uplink: LinkConfig::with_latency(ms(20)),
    });
    // Empty lists: the world fills in the peer socket and the director as STUN server.
    let peer = PeerConfig::new(Vec::new(), Vec::new());
    for (name, ip, transport) in [
        ("alice", Ipv4Addr::new(192, 168, 1, 10), Transport::TLS),
        ("bob", Ipv4Addr::new(192, 168, 1, 11), Transport::UDP),
    ] {
        let config = ClientConfig::new(vec![World::endpoint(transport)]);
        let i = w.add_peer_client(
            Some(lan),
            IpAddr::V4(ip),
            LinkConfig::with_latency(ms(1)),
            config,
            peer.clone(),
        );
        w.nodes[i].client.set_peer_tunneling(RTP_PORT, true);
        println!("{name:>5}: {ip} on the LAN, tunnel over {transport:?}");
    }
    println!(
        "director: {} — 50 ms from the LAN each way; peers 2 ms apart\n",
        tscf_core::sim::world::DIRECTOR_IP
    );

    let start = w.now();
    let deadline = start + Duration::from_secs(5);
    if !w.run_until_cond(deadline, |w| w.connected(ALICE) && w.connected(BOB)) {
        println!("the tunnels did not come up");
        std::process::exit(1);
    }
    w.run_for(ms(500));
    let bob_addr = w.nodes[BOB].client.internal_ipv4().expect("connected");
    let alice_addr = w.nodes[ALICE].client.internal_ipv4().expect("connected");

    // The call: 10 s at 50 packets/s; the LAN path breaks at 6 s.
    let mut pings: Vec<Ping> = Vec::new();
    let mut seen = [0usize; 2];
    let call_start = w.now();
    let mut cut = false;
    for n in 0..500u32 {
        let now = w.now();
        if !cut && now - call_start >= Duration::from_secs(6) {
            cut = true;
            // The LAN drops the traffic between the two hosts only.
            w.net.block(w.nodes[ALICE].ip, w.nodes[BOB].ip);
            report_events(&w, &mut seen, start);
            println!(
                "[{:>7.3}s] the LAN path between alice and bob breaks",
                secs(now - start)
            );
        }
        let path = match w.nodes[ALICE].client.peer_path(IpAddr::V4(bob_addr)) {
            PeerPath::Peer(_) => "peer",
            _ => "relay",
        };
        pings.push(Ping {
            sent: now,
            path,
            rtt: None,
        });
        w.send_udp_ports(ALICE, RTP_PORT, bob_addr, RTP_PORT, &n.to_be_bytes());
        run_call(&mut w, now + ms(20), &mut pings, alice_addr);
    }
    // Let the last echoes come home.
    let end = w.now() + ms(500);
    run_call(&mut w, end, &mut pings, alice_addr);
    report_events(&w, &mut seen, start);

    println!(
        "\n{:<8}{:>9}{:>10}{:>10}{:>10}{:>8}",
        "path", "packets", "RTT min", "median", "max", "lost"
    );
    for path in ["relay", "peer"] {
        let sent: Vec<_> = pings.iter().filter(|p| p.path == path).collect();
        let mut rtts: Vec<_> = sent.iter().filter_map(|p| p.rtt).collect();
        rtts.sort();
        let lost = sent.len() - rtts.len();
        if let (Some(min), Some(max)) = (rtts.first(), rtts.last()) {
            let median = rtts[rtts.len() / 2];
            println!(
                "{path:<8}{:>9}{:>8.1}ms{:>8.1}ms{:>8.1}ms{lost:>8}",
                sent.len(),
                msf(*min),
                msf(median),
                msf(*max)
            );
        }
    }
    let s = w.director.stats();
    println!(
        "\n(echo RTT: on the relay both directions cross the director; packets lost on the peer path\n\
         were sent after the LAN broke, before 1.5 s of silence moved the flow back to the relay)"
    );
    println!(
        "\ndirector: {} frames relayed in all, {} peer introductions, {} tunnels active",
        s.frames_relayed, s.peer.introductions, s.active_tunnels
    );
    println!("(the simulated links have latency and loss but no bandwidth limit, so no throughput is shown)");
}

/// Runs the world until `until`, with Bob echoing what he receives and Alice matching the
/// echoes to her pings.
fn run_call(w: &mut World, until: Instant, pings: &mut [Ping], alice: Ipv4Addr) {
    while w.now() < until {
        w.run_until_cond(until, |w| {
            !w.nodes[BOB].received.is_empty() || !w.nodes[ALICE].received.is_empty()
        });
        for packet in std::mem::take(&mut w.nodes[BOB].received) {
            w.send_udp_ports(BOB, RTP_PORT, alice, RTP_PORT, udp_payload(&packet));
        }
        w.nodes[BOB].received_at.clear();
        let node = &mut w.nodes[ALICE];
        let arrivals: Vec<_> = node
            .received
            .drain(..)
            .zip(node.received_at.drain(..))
            .collect();
        for (packet, at) in arrivals {
            let Ok(seq) = <[u8; 4]>::try_from(udp_payload(&packet)) else {
                continue;
            };
            if let Some(p) = pings.get_mut(u32::from_be_bytes(seq) as usize) {
                p.rtt.get_or_insert(at - p.sent);
            }
        }
    }
}

/// Prints the clients' notable events not printed yet, in time order.
fn report_events(w: &World, seen: &mut [usize; 2], start: Instant) {
    let mut lines = Vec::new();
    for (i, name) in [(ALICE, "alice"), (BOB, "bob")] {
        let node = &w.nodes[i];
        let skip = std::mem::replace(&mut seen[i], node.events.len());
        for (event, at) in node.events.iter().zip(&node.event_times).skip(skip) {
            let line = match event {
                ClientEvent::Connected(info) => format!(
                    "tunnel up: internal {}, tunnel id {:#018x}",
                    info.ipv4.map_or("-".into(), |a| a.addr.to_string()),
                    info.tunnel_id
                ),
                ClientEvent::NatDiscovered { public, .. } => format!(
                    "NAT discovered: public address {}",
                    public.map_or("unknown".into(), |a: SocketAddr| a.to_string()),
                ),
                ClientEvent::PeerTunnelUp {
                    peer,
                    path,
                    setup,
                    initiator,
                    ..
                } => format!(
                    "peer tunnel to {peer} up via {path}, {:.0} ms after {}",
                    msf(*setup),
                    if *initiator {
                        "the first opted-in packet"
                    } else {
                        "the director's introduction"
                    }
                ),
                ClientEvent::PeerTunnelDown { peer, reason } => {
                    format!(
                        "peer tunnel to {peer} down ({reason:?}); the flow is back on the relay"
                    )
                }
                _ => continue,
            };
            lines.push((*at, name, line));
        }
    }
    lines.sort_by_key(|(at, name, _)| (*at, *name));
    for (at, name, line) in lines {
        println!("[{:>7.3}s] {name:>5}: {line}", secs(at - start));
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn msf(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
