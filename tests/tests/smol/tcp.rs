//! Inner TCP between two smol tunnels of one server: 10 MB verified byte for byte over the
//! relay, over a peer tunnel, and across a switch from the relay to a peer tunnel and a
//! fallback to the relay when the direct path is cut mid-transfer; and a connection from a
//! blocking tunnel to a smol one.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use tscf_core::client::PeerPath;
use tscf_core::wire::Transport;
use tscf_runtime_smol::{InnerTcpStream, Notification, Tunnel};

use crate::util::{config_for, smol_server, smol_tunnel, std_server, tunnel_config};

const TOTAL: usize = 10 * 1024 * 1024;
const PORT: u16 = 7000;

/// The octet at `offset` of the transfer: no period a lost or repeated segment could hide in.
fn octet(offset: usize) -> u8 {
    let x = (offset as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8 ^ (offset >> 20) as u8
}

/// Reads to the end and checks every octet; how many came.
async fn read_all(mut stream: InnerTcpStream) -> usize {
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = 0;
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            return offset;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, octet(offset + i), "octet {}", offset + i);
        }
        offset += n;
    }
}

/// Connects `a` to a listener of `b` (both ends opted in to peer tunneling when `peer`), and
/// transfers [`TOTAL`] octets from `a` to `b` in 64 KiB writes, `at` running before each
/// with the offset.
async fn transfer(a: &Tunnel, b: &Tunnel, peer: bool, mut at: impl AsyncFnMut(usize)) {
    let listener = b.tcp_listen(PORT).unwrap();
    listener.set_peer_tunneling(peer);
    let dst = SocketAddr::new(b.internal_ipv4().unwrap().into(), PORT);
    let reader = async {
        let (stream, from) = listener.accept().await.unwrap();
        assert_eq!(from.ip(), IpAddr::V4(a.internal_ipv4().unwrap()));
        read_all(stream).await
    };
    let writer = async {
        let mut stream = a.tcp_connect(dst).await.unwrap();
        stream.set_peer_tunneling(peer);
        let mut buf = vec![0u8; 64 * 1024];
        let mut offset = 0;
        while offset < TOTAL {
            at(offset).await;
            let n = buf.len().min(TOTAL - offset);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = octet(offset + i);
            }
            stream.write_all(&buf[..n]).await.unwrap();
            offset += n;
        }
        stream.close().await.unwrap();
    };
    let (got, ()) = future::zip(reader, writer).await;
    assert_eq!(got, TOTAL);
}

/// Waits until both tunnels send to each other on a peer tunnel.
async fn wait_for_peer(a: &Tunnel, b: &Tunnel) {
    let (ia, ib) = (
        IpAddr::V4(a.internal_ipv4().unwrap()),
        IpAddr::V4(b.internal_ipv4().unwrap()),
    );
    let wait = async {
        while !(a.peer_path(ib) != PeerPath::Relay && b.peer_path(ia) != PeerPath::Relay) {
            // The next notification of either is when the paths may have changed.
            future::or(a.notifications().recv(), b.notifications().recv())
                .await
                .unwrap();
        }
    };
    let limit = async {
        smol::Timer::after(Duration::from_secs(10)).await;
        panic!("no peer tunnel");
    };
    future::or(wait, limit).await;
}

async fn pair(server: &tscf_runtime_smol::ServerHandle) -> (Tunnel, Tunnel) {
    let a = smol_tunnel(config_for(server, Transport::UDP)).await;
    let b = smol_tunnel(config_for(server, Transport::UDP)).await;
    (a, b)
}

#[test]
fn ten_megabytes_over_the_relay() {
    let server = smol_server();
    smol::block_on(async {
        let (a, b) = pair(&server).await;
        transfer(&a, &b, false, async |_| {}).await;
        assert!(server.stats().director.frames_relayed > (TOTAL / 1500) as u64);
        assert_eq!(a.stats().client.peer.data_sent, 0);
        a.close().await;
        b.close().await;
        server.shutdown().await;
    });
}

#[test]
fn ten_megabytes_over_a_peer_tunnel() {
    let server = smol_server();
    smol::block_on(async {
        let (a, b) = pair(&server).await;
        let mut relayed_at_start = None;
        transfer(&a, &b, true, async |offset| {
            if offset == 0 {
                // The handshake opened the peer tunnel: the data takes it from the start.
                wait_for_peer(&a, &b).await;
                relayed_at_start = Some(server.stats().director.frames_relayed);
            }
        })
        .await;
        let relayed = server.stats().director.frames_relayed - relayed_at_start.unwrap();
        assert!(relayed < 16, "{relayed} frames relayed during the transfer");
        assert!(a.stats().client.peer.data_sent > (TOTAL / 1500) as u64);
        a.close().await;
        b.close().await;
        server.shutdown().await;
    });
}

#[test]
fn a_transfer_goes_on_across_a_switch_to_a_peer_tunnel_and_back() {
    let server = smol_server();
    smol::block_on(async {
        let (a, b) = pair(&server).await;
        let ib = IpAddr::V4(b.internal_ipv4().unwrap());
        let (mut on_peer, mut cut) = (false, false);
        transfer(&a, &b, true, async |offset| {
            if !on_peer && offset >= TOTAL / 10 {
                wait_for_peer(&a, &b).await;
                on_peer = true;
            }
            if !cut && offset >= TOTAL / 2 {
                assert!(a.peer_path(ib) != PeerPath::Relay);
                a.block_peer_traffic(true);
                b.block_peer_traffic(true);
                cut = true;
            }
        })
        .await;
        assert!(cut);
        assert_eq!(a.peer_path(ib), PeerPath::Relay, "back on the relay");
        assert!(a.stats().client.peer.data_sent > 0);
        assert!(a.stats().peer_blocked > 0);
        // Both sides said so.
        let down = std::iter::from_fn(|| a.notifications().try_recv().ok())
            .any(|n| matches!(n, Notification::PeerTunnelDown { .. }));
        assert!(down);
        a.close().await;
        b.close().await;
        server.shutdown().await;
    });
}

#[test]
fn a_blocking_tunnel_connects_to_a_smol_listener_over_ipv6() {
    let server = std_server();
    let config = tunnel_config(
        server.local_addrs(),
        server.tls_fingerprint(),
        Transport::UDP,
    );
    let a = tscf_runtime_std::Tunnel::connect(config.clone()).unwrap();
    smol::block_on(async {
        let b = smol_tunnel(config).await;
        let v6 = b.internal_ipv6().expect("the default pools hold IPv6");
        let listener = b.tcp_listen(0).unwrap();
        let port = listener.port();
        let client = smol::unblock({
            let a_v6 = a.internal_ipv6();
            let dst = SocketAddr::new(v6.into(), port);
            move || {
                let mut stream = a.tcp_connect(dst).unwrap();
                assert_eq!(
                    stream.local_addr().unwrap().ip(),
                    IpAddr::from(a_v6.unwrap())
                );
                stream.write_all(b"ping").unwrap();
                let mut pong = [0u8; 4];
                stream.read_exact(&mut pong).unwrap();
                assert_eq!(&pong, b"pong");
                a.close();
            }
        });
        let (mut stream, from) = listener.accept().await.unwrap();
        assert!(from.is_ipv6());
        let mut ping = [0u8; 4];
        stream.read_exact(&mut ping).await.unwrap();
        assert_eq!(&ping, b"ping");
        stream.write_all(b"pong").await.unwrap();
        client.await;
        b.close().await;
    });
    server.shutdown();
}
