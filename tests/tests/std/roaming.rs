//! Roaming: a UDP client whose address changes (a NAT rebinding), or whose tunnel the server
//! let go persistent, keeps its tunnel and its addresses; one told Tunnel Not Found re-attaches
//! before it gives them up, and says so when the server really lost the tunnel.

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use tscf_core::wire::{Message, MessageType, ResultCode, Transport};
use tscf_runtime_std::{InnerUdpSocket, Notification, Tunnel, TunnelConfig};

use crate::relay::{message, UdpRelay};
use crate::util::{receive_flow, server, tunnel, wait_for, wait_for_notification};

fn tunnel_via(relay: &UdpRelay, tweak: impl FnOnce(&mut TunnelConfig)) -> Tunnel {
    let mut config = TunnelConfig::new(vec![relay.endpoint()]);
    config.connect_timeout = Duration::from_secs(5);
    tweak(&mut config);
    Tunnel::connect(config).expect("tunnel connects")
}

/// Sends `count` datagrams of 160 octets (sequence number first) at 50 per second each way
/// between `a` and `b` (port 5004 on both), and returns the sequence numbers each received, in
/// order: (a to b, b to a). `at_packet` runs before each pair is sent.
fn two_way_flow(
    a: &Tunnel,
    b: &Tunnel,
    count: u32,
    mut at_packet: impl FnMut(u32),
) -> (Vec<u32>, Vec<u32>) {
    let (a_sock, b_sock) = (a.bind(5004).unwrap(), b.bind(5004).unwrap());
    let to_a = SocketAddr::new(a.internal_ipv4().unwrap().into(), 5004);
    let to_b = SocketAddr::new(b.internal_ipv4().unwrap().into(), 5004);
    let receive = |sock: &InnerUdpSocket| {
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        receive_flow(sock, count)
    };
    thread::scope(|s| {
        let at_b = s.spawn(|| receive(&b_sock));
        let at_a = s.spawn(|| receive(&a_sock));
        let start = Instant::now();
        let mut payload = [0x5au8; 160];
        for seq in 0..count {
            at_packet(seq);
            let due = start + Duration::from_millis(20) * seq;
            thread::sleep(due.saturating_duration_since(Instant::now()));
            payload[..4].copy_from_slice(&seq.to_be_bytes());
            let _ = a_sock.send_to(&payload, to_b);
            let _ = b_sock.send_to(&payload, to_a);
        }
        (at_b.join().unwrap(), at_a.join().unwrap())
    })
}

/// Notifications read so far, without waiting.
fn notes(tunnel: &Tunnel) -> Vec<Notification> {
    tunnel.notifications().try_iter().collect()
}

/// Media flows both ways between a client behind a NAT and another; the NAT gives the first a
/// new public port mid-flow. Its tunnel moves to the new address on its next authenticated
/// message: same tunnel, same address, no re-attach, and the flows resume.
#[test]
fn udp_client_rebinding_keeps_tunnel_and_addresses() {
    let server = server(|_| {});
    let relay = UdpRelay::new(server.local_addrs().udp[0]);
    let a = tunnel_via(&relay, |_| {});
    let b = tunnel(&server, Transport::UDP);
    let (id, addr) = (a.tunnel_id().unwrap(), a.internal_ipv4().unwrap());
    let client = relay.clients()[0];
    let before = relay.mapped(client).unwrap();
    notes(&a);

    const PACKETS: u32 = 200;
    let (a_to_b, b_to_a) = two_way_flow(&a, &b, PACKETS, |seq| {
        if seq == 50 {
            relay.rebind(client);
        }
    });
    let after = relay.mapped(client).unwrap();
    assert_ne!(before, after, "the relay rebound the client");
    for (what, got) in [("a to b", &a_to_b), ("b to a", &b_to_a)] {
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{what}: in order");
        assert!(got.contains(&(PACKETS - 1)), "{what}: resumes: {got:?}");
        eprintln!("{what}: {} of {PACKETS} lost", PACKETS as usize - got.len());
        assert!(got.len() >= 150, "{what}: {} of {PACKETS}", got.len());
    }
    assert_eq!(a.tunnel_id(), Some(id));
    assert_eq!(a.internal_ipv4(), Some(addr));
    let seen = notes(&a);
    assert!(
        seen.iter().all(|n| !matches!(
            n,
            Notification::TransportLost
                | Notification::TunnelClosed { .. }
                | Notification::Connected(_)
        )),
        "{seen:?}"
    );
    let stats = server.stats().director;
    assert_eq!((stats.reattaches, stats.tunnels_opened), (0, 2));
    assert_eq!(stats.moves, 1);
    relay.stop();
}

/// A client goes silent (its NAT drops what it sends) long enough that the server makes its
/// tunnel persistent and forgets the address. Its next keepalive from that address is not
/// answered Tunnel Not Found: it moves the tunnel back, with the same addresses.
#[test]
fn persistent_tunnel_keepalive_is_not_tunnel_not_found() {
    let server = server(|c| c.director.keepalive.min = Duration::from_secs(1));
    let relay = UdpRelay::new(server.local_addrs().udp[0]);
    let a = tunnel_via(&relay, |c| {
        c.client.keepalive_interval = Some(Duration::from_secs(1));
        c.client.silence_intervals = 100;
    });
    let (id, addr) = (a.tunnel_id().unwrap(), a.internal_ipv4().unwrap());
    let client = relay.clients()[0];
    notes(&a);
    relay.pause(client, true);
    wait_for("the tunnel is persistent", || {
        server.stats().director.persistent_tunnels == 1
    });
    relay.pause(client, false);
    wait_for("the tunnel is active again, or replaced", || {
        let stats = server.stats().director;
        stats.persistent_tunnels == 0 || stats.tunnels_opened > 1
    });
    assert_eq!(a.tunnel_id(), Some(id));
    assert_eq!(a.internal_ipv4(), Some(addr));
    let stats = server.stats().director;
    assert_eq!((stats.active_tunnels, stats.tunnels_opened), (1, 1));
    let seen = notes(&a);
    assert!(
        seen.iter()
            .all(|n| !matches!(n, Notification::TunnelClosed { .. })),
        "{seen:?}"
    );
    relay.stop();
}

/// Told Tunnel Not Found for the tunnel it holds (an answer no key vouches for), the client
/// re-attaches with its proof before anything else, and keeps its tunnel and addresses. When
/// the server really lost the tunnel (here: another server behind the same address), the
/// re-attach fails too, and the client reports it and gets a fresh tunnel.
#[test]
fn tunnel_not_found_reattaches_with_same_addresses_or_reports() {
    let server = server(|c| c.director.keepalive.min = Duration::from_secs(1));
    let relay = UdpRelay::new(server.local_addrs().udp[0]);
    let a = tunnel_via(&relay, |c| {
        c.client.keepalive_interval = Some(Duration::from_secs(1));
    });
    let (id, addr) = (a.tunnel_id().unwrap(), a.internal_ipv4().unwrap());
    let client = relay.clients()[0];
    notes(&a);

    // A keepalive is answered Tunnel Not Found (the real server never hears it).
    relay.pause(client, true);
    let before = relay.control_sent(Some(client)).len();
    let mut keepalive = None;
    wait_for("a keepalive after the pause", || {
        keepalive = relay
            .control_sent(Some(client))
            .into_iter()
            .skip(before)
            .find_map(|(_, d)| {
                let m = message(&d)?;
                (m.header.message_type == MessageType::KEEPALIVE).then_some(m.header)
            });
        keepalive.is_some()
    });
    let mut answer = Vec::new();
    Message::response_to(&keepalive.unwrap(), ResultCode::TUNNEL_NOT_FOUND)
        .encode_envelope(&mut answer)
        .unwrap();
    relay.send_to_client(client, &answer);
    relay.pause(client, false);
    let seen = wait_for_notification(&a, |n| {
        matches!(n, Notification::Reattached(_) | Notification::Connected(_))
    });
    assert!(
        matches!(seen.last(), Some(Notification::Reattached(info)) if info.tunnel_id == id),
        "{seen:?}"
    );
    assert_eq!(a.internal_ipv4(), Some(addr));
    assert_eq!(server.stats().director.tunnels_opened, 1);

    // Now the server behind the address really does not know the tunnel.
    let other = crate::util::server(|c| c.director.keepalive.min = Duration::from_secs(1));
    relay.set_server(other.local_addrs().udp[0]);
    let seen = wait_for_notification(&a, |n| matches!(n, Notification::Connected(_)));
    assert!(
        seen.contains(&Notification::TunnelClosed {
            reason: ResultCode::TUNNEL_NOT_FOUND
        }),
        "{seen:?}"
    );
    let Some(Notification::Connected(info)) = seen.last() else {
        unreachable!()
    };
    assert_ne!(info.tunnel_id, id, "a fresh tunnel from the other server");
    assert_eq!(other.stats().director.tunnels_opened, 1);
    relay.stop();
}
