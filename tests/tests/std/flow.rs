//! Per transport: server and two clients, configuration, relay, and a 50 packet/s flow.

use std::thread;

use tscf_core::client::ClientState;
use tscf_core::wire::Transport;

use crate::util::{rtp_flow, server, tunnel, TRANSPORTS};

/// 5 s of a 50 packet/s flow per transport; the transports run in parallel.
const PACKETS: u32 = 250;

fn configuration_relay_and_flow(transport: Transport) {
    let server = server(|_| {});
    let a = tunnel(&server, transport);
    let b = tunnel(&server, transport);
    assert_eq!(a.state(), ClientState::Connected);
    let (ia, ib) = (a.internal_ipv4().unwrap(), b.internal_ipv4().unwrap());
    assert_ne!(ia, ib, "{transport}: distinct internal addresses");
    assert_ne!(a.tunnel_id(), b.tunnel_id());
    let observed = a.observed_address().expect("observed address");
    assert!(observed.ip().is_loopback(), "{transport}: {observed}");
    let info = a.info().unwrap();
    assert_eq!(info.server.transport, transport);

    let got = rtp_flow(&a, &b, PACKETS, |_| {});
    let expected: Vec<u32> = (0..PACKETS).collect();
    assert_eq!(got, expected, "{transport}: complete and in order");
    let stats = server.stats();
    assert_eq!(stats.director.active_tunnels, 2, "{transport}");
    assert!(stats.director.frames_relayed >= u64::from(PACKETS));
    a.close();
    b.close();
    server.shutdown();
}

#[test]
fn configuration_relay_and_flow_on_every_transport() {
    thread::scope(|s| {
        let runs: Vec<_> = TRANSPORTS
            .into_iter()
            .map(|t| s.spawn(move || configuration_relay_and_flow(t)))
            .collect();
        for run in runs {
            run.join().unwrap();
        }
    });
}

#[test]
fn server_shutdown_notifies_tunnels() {
    let server = server(|_| {});
    let a = tunnel(&server, tscf_core::wire::Transport::TCP);
    server.shutdown();
    let closed = a
        .notifications()
        .iter()
        .find(|n| matches!(n, tscf_runtime_std::Notification::TunnelClosed { .. }));
    assert!(closed.is_some());
}

#[test]
fn stun_binding_is_answered_on_the_udp_listener() {
    let server = server(|_| {});
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let mut request = Vec::new();
    let id = tscf_core::stun::TransactionId([7u8; 12]);
    tscf_core::stun::encode_binding_request(id, &mut request);
    sock.send_to(&request, server.local_addrs().udp[0]).unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    let answer = tscf_core::stun::decode_binding_response(&buf[..n]).unwrap();
    assert_eq!(answer.mapped, sock.local_addr().unwrap());
    assert_eq!(server.stats().transport.stun_answered, 1);
}

/// Datagrams handed over together with `send_many` leave the tunnel together (UDP GSO where
/// the system has it), and the server, reading them in batches, relays every one in order.
#[test]
fn datagrams_sent_together_are_relayed_whole_and_in_order() {
    let server = server(|_| {});
    let a = tunnel(&server, Transport::UDP);
    let b = tunnel(&server, Transport::UDP);
    let rx = b.bind(5006).unwrap();
    rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let tx = a.bind(0).unwrap();
    let dst = std::net::SocketAddr::new(b.internal_ipv4().unwrap().into(), 5006);
    // 40 datagrams of 1,200 octets and a shorter last one: one GSO send holds them.
    let batch: Vec<Vec<u8>> = (0..41u8)
        .map(|i| vec![i; if i == 40 { 300 } else { 1200 }])
        .collect();
    assert_eq!(tx.send_many(&batch, dst).unwrap(), batch.len());
    // The first half one at a time, the rest in batches of up to 8, as `recvmmsg` reads.
    let mut buf = [0u8; 2048];
    let mut got: Vec<Vec<u8>> = (0..20)
        .map(|_| {
            let (n, _) = rx.recv_from(&mut buf).expect("every datagram");
            buf[..n].to_vec()
        })
        .collect();
    let mut bufs = vec![vec![0u8; 2048]; 8];
    let mut meta = [tscf_runtime_std::RecvMeta::default(); 8];
    while got.len() < batch.len() {
        let n = rx.recv_many(&mut bufs, &mut meta).expect("datagrams");
        assert!(n >= 1);
        for (buf, meta) in bufs.iter().zip(&meta).take(n) {
            assert_eq!(meta.from.ip(), a.internal_ipv4().unwrap());
            got.push(buf[..meta.len].to_vec());
        }
    }
    assert_eq!(got, batch);
    assert!(server.stats().director.frames_relayed >= 41);
}
