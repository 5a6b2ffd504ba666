//! Per transport, a smol server and two smol clients: configuration, relay, a 50 packet/s
//! flow for 2 s complete and in order, then a peer tunnel between the clients carrying a flow.

use std::net::{IpAddr, SocketAddr};

use tscf_core::client::{ClientState, PeerPath};
use tscf_core::wire::Transport;
use tscf_runtime_smol::{Notification, PeerStreamListen, RecvMeta};

use crate::util::{
    config_for, plain_peers, smol_flow, smol_server, smol_tunnel, tunnel_config, TRANSPORTS,
};

/// 2 s at 50 packets/s.
const PACKETS: u32 = 100;

fn relay_then_peer_tunnel(transport: Transport) {
    let server = smol_server();
    let config = plain_peers(config_for(&server, transport));
    smol::block_on(async {
        let a = smol_tunnel(config.clone()).await;
        let b = smol_tunnel(config).await;
        assert_eq!(a.state(), ClientState::Connected);
        let (ia, ib) = (a.internal_ipv4().unwrap(), b.internal_ipv4().unwrap());
        assert_ne!(ia, ib, "{transport}: distinct internal addresses");
        assert_ne!(a.tunnel_id(), b.tunnel_id());
        assert!(a.observed_address().unwrap().ip().is_loopback());
        assert_eq!(a.info().unwrap().server.transport, transport);
        assert!(matches!(
            a.notifications().try_recv(),
            Ok(Notification::Connected(_))
        ));

        // Relay: opted out, every packet goes through the server.
        let got = smol_flow(&a, &b, PACKETS, false).await;
        assert_eq!(got, (0..PACKETS).collect::<Vec<_>>(), "{transport}: relay");
        let stats = server.stats();
        assert_eq!(stats.director.active_tunnels, 2, "{transport}");
        assert!(stats.director.frames_relayed >= u64::from(PACKETS));

        // Peer tunnel: opted in, the flow moves to the direct UDP path.
        let got = smol_flow(&a, &b, PACKETS, true).await;
        assert_eq!(got, (0..PACKETS).collect::<Vec<_>>(), "{transport}: peer");
        let notes: Vec<Notification> =
            std::iter::from_fn(|| a.notifications().try_recv().ok()).collect();
        assert!(
            notes.iter().any(|n| matches!(
                n,
                Notification::PeerTunnelUp { peer, .. } if *peer == IpAddr::V4(ib)
            )),
            "{transport}: {notes:?}"
        );
        assert!(matches!(a.peer_path(IpAddr::V4(ib)), PeerPath::Peer(_)));
        assert!(matches!(b.peer_path(IpAddr::V4(ia)), PeerPath::Peer(_)));
        let peer = a.stats().client.peer;
        assert!(peer.data_sent > 0, "{transport}: {peer:?}");
        assert!(b.stats().client.peer.data_received > 0, "{transport}");

        a.close().await;
        b.close().await;
    });
    smol::block_on(server.shutdown());
}

#[test]
fn tcp_relay_flow_and_peer_tunnel() {
    relay_then_peer_tunnel(TRANSPORTS[0]);
}

#[test]
fn tls_relay_flow_and_peer_tunnel() {
    relay_then_peer_tunnel(TRANSPORTS[1]);
}

#[test]
fn udp_relay_flow_and_peer_tunnel() {
    relay_then_peer_tunnel(TRANSPORTS[2]);
}

#[test]
fn server_shutdown_notifies_tunnels() {
    let server = smol_server();
    let config = tunnel_config(server.local_addrs(), None, Transport::TCP);
    smol::block_on(async {
        let a = smol_tunnel(config).await;
        server.shutdown().await;
        loop {
            match a.notifications().recv().await.unwrap() {
                Notification::TunnelClosed { .. } => break,
                _ => continue,
            }
        }
    });
}

#[test]
fn stun_binding_is_answered_on_the_udp_listener() {
    let server = smol_server();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let mut request = Vec::new();
    tscf_core::stun::encode_binding_request(tscf_core::stun::TransactionId([7; 12]), &mut request);
    sock.send_to(&request, server.local_addrs().udp[0]).unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    let answer = tscf_core::stun::decode_binding_response(&buf[..n]).unwrap();
    assert_eq!(answer.mapped, sock.local_addr().unwrap());
    assert_eq!(server.stats().transport.stun_answered, 1);
}

/// Two smol tunnels whose UDP peer traffic is blocked, B listening for peer streams with
/// `listen`: an opted-in flow moves onto a peer stream (TCP or TLS) and the relay carries
/// nothing more once it is up.
fn peer_stream_between_smol_clients(listen: fn(SocketAddr) -> PeerStreamListen) {
    const COUNT: u32 = 100;
    let server = smol_server();
    smol::block_on(async {
        let a = smol_tunnel(plain_peers(config_for(&server, Transport::UDP))).await;
        let mut config = plain_peers(config_for(&server, Transport::UDP));
        config.peer_streams = listen("127.0.0.1:0".parse().expect("addr"));
        let b = smol_tunnel(config).await;
        a.block_peer_traffic(true);
        b.block_peer_traffic(true);
        // The first opted-in datagram starts the negotiation; both sides report it up.
        let ib = IpAddr::V4(b.internal_ipv4().unwrap());
        let tx = a.bind(0).unwrap();
        tx.set_peer_tunneling(true);
        tx.send_to(b"start", SocketAddr::new(ib, 9)).await.unwrap();
        for t in [&a, &b] {
            let up = futures_lite::future::or(
                async {
                    while let Ok(note) = t.notifications().recv().await {
                        if matches!(note, Notification::PeerTunnelUp { .. }) {
                            return true;
                        }
                    }
                    false
                },
                async {
                    smol::Timer::after(std::time::Duration::from_secs(5)).await;
                    false
                },
            )
            .await;
            assert!(up, "the peer tunnel is not up");
        }
        assert!(
            matches!(a.peer_path(ib), PeerPath::Stream { .. }),
            "{:?}",
            a.peer_path(ib)
        );
        let relayed = server.stats().director.frames_relayed;
        let got = smol_flow(&a, &b, COUNT, true).await;
        assert_eq!(got, (0..COUNT).collect::<Vec<_>>(), "complete, in order");
        assert_eq!(
            server.stats().director.frames_relayed,
            relayed,
            "nothing relayed once the stream is up"
        );
        let (pa, pb) = (a.stats().client.peer, b.stats().client.peer);
        assert!(
            pa.streams_opened >= 1 && pb.streams_accepted >= 1,
            "{pa:?} {pb:?}"
        );
        a.close().await;
        b.close().await;
    });
    smol::block_on(server.shutdown());
}

#[test]
fn a_tcp_peer_stream_joins_two_smol_clients() {
    peer_stream_between_smol_clients(PeerStreamListen::Tcp);
}

#[test]
fn a_tls_peer_stream_joins_two_smol_clients() {
    peer_stream_between_smol_clients(PeerStreamListen::Tls);
}

/// The director announces its packet limit (1400 by default). Both runtimes' inner sockets
/// send a larger IPv4 datagram as IPv4 fragments, which the other end reassembles, and refuse
/// a larger IPv6 one with an error, instead of the director dropping it silently.
#[test]
fn an_inner_datagram_beyond_the_servers_maximum_is_fragmented_or_refused() {
    // 1400 octets of IP packet: 28 of IPv4 and UDP headers, 1372 of payload.
    const FITS: usize = 1372;
    let server = smol_server();
    let config = config_for(&server, Transport::UDP);
    let refused = |e: std::io::Error| {
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("maximum of 1400"), "{e}");
    };
    smol::block_on(async {
        let a = smol_tunnel(config.clone()).await;
        let b = smol_tunnel(config.clone()).await;
        assert_eq!(a.info().unwrap().max_packet_len, 1400);
        let rx = b.bind(7).unwrap();
        let tx = a.bind(0).unwrap();
        let dst = std::net::SocketAddr::new(b.internal_ipv4().unwrap().into(), 7);
        let dst6 = std::net::SocketAddr::new(b.internal_ipv6().unwrap().into(), 7);
        let mut buf = [0u8; 4096];
        for len in [FITS, FITS + 1, 3000] {
            tx.send_to(&vec![1; len], dst).await.expect("sent");
            let (n, _) = rx.recv_from(&mut buf).await.unwrap();
            assert_eq!(n, len);
        }
        // IPv6 leaves fragmentation to the ends (RFC 8200): past the limit is refused.
        refused(tx.send_to(&[2; FITS], dst6).await.unwrap_err());

        // The blocking runtime's client, against the same server.
        let c = tscf_runtime_std::Tunnel::connect(config).expect("std tunnel");
        let tx = c.bind(0).unwrap();
        refused(tx.send_to(&[3; FITS], dst6).unwrap_err());
        tx.send_to(&[4; FITS + 1], dst).expect("fragmented");
        let (n, _) = rx.recv_from(&mut buf).await.unwrap();
        assert_eq!(
            (n, buf[0]),
            (FITS + 1, 4),
            "the refused datagrams never arrived"
        );
    });
    assert_eq!(server.stats().director.dropped.oversized, 0);
}

/// A client on a transport other than UDP, configured with no STUN server, learns its
/// server-reflexive candidate from the STUN responder the server announces (STUN Port) on its
/// UDP listener. Without it, NAT discovery on TLS, TCP, QUIC and DTLS had nobody to ask.
#[test]
fn clients_on_every_transport_discover_their_mapping_from_the_announced_responder() {
    let server = smol_server();
    let udp_port = server.local_addrs().udp[0].port();
    let transports = [
        Transport::TCP,
        Transport::TLS,
        Transport::QUIC,
        Transport::DTLS,
    ];
    smol::block_on(async {
        for transport in transports {
            let config = config_for(&server, transport);
            assert!(config.client.peer.as_ref().unwrap().stun_servers.is_empty());
            let t = smol_tunnel(config).await;
            let info = t.info().unwrap();
            assert_eq!(info.stun_server.map(|s| s.port()), Some(udp_port));
            let public = loop {
                let wait = async {
                    smol::Timer::after(std::time::Duration::from_secs(3)).await;
                    None
                };
                match futures_lite::future::or(async { t.notifications().recv().await.ok() }, wait)
                    .await
                {
                    Some(Notification::NatDiscovered { public, .. }) => break public,
                    Some(_) => continue,
                    None => panic!("{transport}: no NAT discovery"),
                }
            };
            assert!(
                public.is_some_and(|p| p.ip().is_loopback()),
                "{transport}: {public:?}"
            );
            t.close().await;
        }
    });
    // The blocking runtime's client is told the same.
    let config = config_for(&server, Transport::TLS);
    let t = tscf_runtime_std::Tunnel::connect(config).expect("std tunnel");
    assert_eq!(
        t.info().unwrap().stun_server.map(|s| s.port()),
        Some(udp_port)
    );
}

/// Datagrams handed over together with `send_many` leave together (UDP GSO where the system
/// has it) and arrive whole and in order, over the relay and over a peer tunnel (the
/// receiving socket reads them with GRO or `recvmmsg`, its application with `recv_many`).
#[test]
fn datagrams_sent_together_arrive_whole_and_in_order() {
    let server = smol_server();
    let config = config_for(&server, Transport::UDP);
    smol::block_on(async {
        let a = smol_tunnel(config.clone()).await;
        let b = smol_tunnel(config).await;
        let dst = SocketAddr::new(b.internal_ipv4().unwrap().into(), 5006);
        let rx = b.bind(5006).unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let tx = a.bind(0).unwrap();
        for peer in [false, true] {
            rx.set_peer_tunneling(peer);
            tx.set_peer_tunneling(peer);
            if peer {
                form_peer_tunnel(&a, &tx, dst).await;
            }
            // 40 datagrams of 1,200 octets and a shorter last one: one GSO send holds them.
            let batch: Vec<Vec<u8>> = (0..41u8)
                .map(|i| vec![i; if i == 40 { 300 } else { 1200 }])
                .collect();
            assert_eq!(tx.send_many(&batch, dst).await.unwrap(), batch.len());
            // Read in batches of up to 16, as `recvmmsg` does.
            let mut bufs = vec![[0u8; 2048]; 16];
            let mut meta = [RecvMeta::default(); 16];
            let mut got = Vec::new();
            while got.len() < batch.len() {
                let n = rx.recv_many(&mut bufs, &mut meta).await.expect("datagrams");
                assert!(n >= 1);
                for (buf, meta) in bufs.iter().zip(&meta).take(n) {
                    assert_eq!(meta.from.ip(), a.internal_ipv4().unwrap());
                    if buf[..meta.len] != *b"hello" {
                        got.push(buf[..meta.len].to_vec());
                    }
                }
            }
            assert_eq!(got, batch, "peer tunnel: {peer}");
        }
        assert!(matches!(
            a.peer_path(dst.ip()),
            PeerPath::Peer(_) | PeerPath::Session { .. }
        ));
    });
}

/// Sends opted-in datagrams until `tunnel` reports its peer tunnel up.
async fn form_peer_tunnel(
    tunnel: &tscf_runtime_smol::Tunnel,
    tx: &tscf_runtime_smol::InnerUdpSocket,
    dst: SocketAddr,
) {
    for _ in 0..100 {
        let _ = tx.send_to(b"hello", dst).await;
        let up = async {
            while let Ok(note) = tunnel.notifications().recv().await {
                if let Notification::PeerTunnelUp { .. } = note {
                    return true;
                }
            }
            false
        };
        let wait = async {
            smol::Timer::after(std::time::Duration::from_millis(50)).await;
            false
        };
        if futures_lite::future::or(up, wait).await {
            return;
        }
    }
    panic!("no peer tunnel");
}
