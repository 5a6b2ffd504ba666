//! Across runtimes, over each transport they share: blocking clients on a smol server, smol
//! clients on a blocking server, blocking clients on a blocking DTLS server (configuration,
//! relay and a short flow), and peer tunnels between a blocking and a smol client.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tscf_core::client::{ClientState, PeerPath};
use tscf_core::wire::Transport;
use tscf_runtime_smol::Notification;

use crate::util::{
    config_for, smol_flow, smol_server, smol_tunnel, std_flow, std_server, tunnel_config,
    TRANSPORTS,
};

/// 1 s at 50 packets/s.
const PACKETS: u32 = 50;

fn std_clients_on_smol_server(transport: Transport) {
    let server = smol_server();
    let config = config_for(&server, transport);
    let a = tscf_runtime_std::Tunnel::connect(config.clone()).expect("std tunnel");
    let b = tscf_runtime_std::Tunnel::connect(config).expect("std tunnel");
    assert_eq!(a.state(), ClientState::Connected);
    assert_ne!(a.internal_ipv4(), b.internal_ipv4());
    let got = std_flow(&a, &b, PACKETS);
    assert_eq!(got, (0..PACKETS).collect::<Vec<_>>(), "{transport}");
    assert!(server.stats().director.frames_relayed >= u64::from(PACKETS));
    a.close();
    b.close();
    smol::block_on(server.shutdown());
}

fn smol_clients_on_std_server(transport: Transport) {
    let server = std_server();
    let config = tunnel_config(server.local_addrs(), server.tls_fingerprint(), transport);
    smol::block_on(async {
        let a = smol_tunnel(config.clone()).await;
        let b = smol_tunnel(config).await;
        assert_eq!(a.state(), ClientState::Connected);
        assert_ne!(a.internal_ipv4(), b.internal_ipv4());
        let got = smol_flow(&a, &b, PACKETS, false).await;
        assert_eq!(got, (0..PACKETS).collect::<Vec<_>>(), "{transport}");
        a.close().await;
        b.close().await;
    });
    assert!(server.stats().director.frames_relayed >= u64::from(PACKETS));
    server.shutdown();
}

#[test]
fn std_clients_on_smol_server_tcp() {
    std_clients_on_smol_server(TRANSPORTS[0]);
}

#[test]
fn std_clients_on_smol_server_tls() {
    std_clients_on_smol_server(TRANSPORTS[1]);
}

#[test]
fn std_clients_on_smol_server_udp() {
    std_clients_on_smol_server(TRANSPORTS[2]);
}

#[test]
fn smol_clients_on_std_server_tcp() {
    smol_clients_on_std_server(TRANSPORTS[0]);
}

#[test]
fn smol_clients_on_std_server_tls() {
    smol_clients_on_std_server(TRANSPORTS[1]);
}

#[test]
fn smol_clients_on_std_server_udp() {
    smol_clients_on_std_server(TRANSPORTS[2]);
}

#[test]
fn std_clients_on_smol_server_dtls() {
    std_clients_on_smol_server(TRANSPORTS[3]);
}

#[test]
fn smol_clients_on_std_server_dtls() {
    smol_clients_on_std_server(TRANSPORTS[3]);
}

/// A DTLS server tunnel entirely in the blocking runtime: its listener and its client.
#[test]
fn std_clients_on_std_server_dtls() {
    let server = std_server();
    let config = tunnel_config(
        server.local_addrs(),
        server.tls_fingerprint(),
        Transport::DTLS,
    );
    let a = tscf_runtime_std::Tunnel::connect(config.clone()).expect("std tunnel");
    let b = tscf_runtime_std::Tunnel::connect(config).expect("std tunnel");
    assert_eq!(a.info().map(|i| i.server.transport), Some(Transport::DTLS));
    let got = std_flow(&a, &b, PACKETS);
    assert_eq!(got, (0..PACKETS).collect::<Vec<_>>());
    let stats = server.stats();
    assert!(stats.director.frames_relayed >= u64::from(PACKETS));
    assert_eq!(stats.dtls_associations, 2);
    assert!(a.stats().dtls_records_sent >= u64::from(PACKETS));
    a.close();
    b.close();
    server.shutdown();
}

/// A blocking client and a smol client on a smol server, both offering `peer` as their peer
/// transport: an opted-in flow each way moves onto a peer tunnel between the runtimes, and
/// the server relays nothing more once it is up.
fn peer_tunnel_across_runtimes(peer: Transport) {
    const COUNT: u32 = 100;
    let server = smol_server();
    let mut config = config_for(&server, Transport::UDP);
    let offer = config.client.peer.as_mut().expect("peer tunneling on");
    offer.transport = peer;
    // Plain UDP only when asked for by name.
    offer.require_secure = peer != Transport::UDP;
    let a = tscf_runtime_std::Tunnel::connect(config.clone()).expect("std tunnel");
    let b = smol::block_on(smol_tunnel(config));
    let (ia, ib): (IpAddr, IpAddr) = (
        a.internal_ipv4().unwrap().into(),
        b.internal_ipv4().unwrap().into(),
    );
    let tx = a.bind(5004).unwrap();
    tx.set_peer_tunneling(true);
    let rx = b.bind(5004).unwrap();
    rx.set_peer_tunneling(true);
    let on_peer_path = |path: PeerPath| match (peer, path) {
        (Transport::UDP, PeerPath::Peer(_)) => true,
        (_, PeerPath::Session { transport, .. }) => transport == peer,
        _ => false,
    };
    // The first opted-in packet starts the negotiation; both sides report the tunnel up.
    let dst = SocketAddr::new(ib, 5004);
    tx.send_to(b"setup", dst).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let up = |note: &Notification| matches!(note, Notification::PeerTunnelUp { .. });
    while !a
        .notifications()
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .is_ok_and(|n| up(&n))
    {
        assert!(
            Instant::now() < deadline,
            "{peer}: A's peer tunnel is not up"
        );
    }
    smol::block_on(async {
        while !futures_lite::future::or(async { b.notifications().recv().await.ok() }, async {
            smol::Timer::at(deadline).await;
            None
        })
        .await
        .is_some_and(|n| up(&n))
        {
            assert!(
                Instant::now() < deadline,
                "{peer}: B's peer tunnel is not up"
            );
        }
    });
    assert!(
        on_peer_path(a.peer_path(ib)),
        "{peer}: {:?}",
        a.peer_path(ib)
    );
    assert!(
        on_peer_path(b.peer_path(ia)),
        "{peer}: {:?}",
        b.peer_path(ia)
    );
    let relayed = server.stats().director.frames_relayed;
    let mut got = Vec::new();
    smol::block_on(async {
        let mut buf = [0u8; 64];
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        for seq in 0..COUNT {
            tx.send_to(&seq.to_be_bytes(), dst).unwrap();
            // The setup datagram (5 octets) may still be ahead of the flow.
            while let Ok((n, _)) = rx.recv_from(&mut buf).await {
                if n == 4 {
                    got.push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
                    break;
                }
            }
        }
    });
    assert_eq!(got, (0..COUNT).collect::<Vec<_>>(), "{peer}");
    assert_eq!(
        server.stats().director.frames_relayed,
        relayed,
        "{peer}: nothing relayed once the peer tunnel is up"
    );
    a.close();
    smol::block_on(b.close());
    smol::block_on(server.shutdown());
}

#[test]
fn a_udp_peer_tunnel_joins_a_blocking_and_a_smol_client() {
    peer_tunnel_across_runtimes(Transport::UDP);
}

#[test]
fn a_dtls_peer_tunnel_joins_a_blocking_and_a_smol_client() {
    peer_tunnel_across_runtimes(Transport::DTLS);
}
