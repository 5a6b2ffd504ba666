//! Inner TCP between two tunnels of one server: 10 MB verified byte for byte over the relay,
//! over a peer tunnel, and across a switch from the relay to a peer tunnel and a fallback to
//! the relay when the direct path is cut mid-transfer.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use tscf_core::client::PeerPath;
use tscf_core::wire::Transport;
use tscf_runtime_std::{InnerTcpStream, Tunnel};

use crate::util::{server, tunnel};

const TOTAL: usize = 10 * 1024 * 1024;
const PORT: u16 = 7000;

/// The octet at `offset` of the transfer: no period a lost or repeated segment could hide in.
fn octet(offset: usize) -> u8 {
    let x = (offset as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8 ^ (offset >> 20) as u8
}

/// Writes the transfer in 64 KiB writes; `at` runs before each write with the offset.
fn write_all(stream: &mut InnerTcpStream, mut at: impl FnMut(usize)) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = 0;
    while offset < TOTAL {
        at(offset);
        let n = buf.len().min(TOTAL - offset);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = octet(offset + i);
        }
        stream.write_all(&buf[..n]).unwrap();
        offset += n;
    }
    stream.shutdown(Shutdown::Write).unwrap();
}

/// Reads to the end and checks every octet; how many came.
fn read_all(mut stream: InnerTcpStream) -> usize {
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = 0;
    loop {
        let n = stream.read(&mut buf).unwrap();
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
/// transfers [`TOTAL`] octets from `a` to `b`, `at` running before each write.
fn transfer(a: &Tunnel, b: &Tunnel, peer: bool, at: impl FnMut(usize)) {
    let listener = b.tcp_listen(PORT).unwrap();
    listener.set_peer_tunneling(peer);
    let dst = SocketAddr::new(b.internal_ipv4().unwrap().into(), PORT);
    let from_a = IpAddr::V4(a.internal_ipv4().unwrap());
    thread::scope(|s| {
        let reader = s.spawn(|| {
            let (stream, from) = listener.accept().unwrap();
            assert_eq!(from.ip(), from_a);
            read_all(stream)
        });
        let mut stream = a.tcp_connect(dst).unwrap();
        stream.set_peer_tunneling(peer);
        assert_eq!(stream.peer_addr().unwrap(), dst);
        write_all(&mut stream, at);
        assert_eq!(reader.join().unwrap(), TOTAL);
    });
}

/// Waits until both tunnels send to each other on a peer tunnel.
fn wait_for_peer(a: &Tunnel, b: &Tunnel) {
    let (ia, ib) = (
        IpAddr::V4(a.internal_ipv4().unwrap()),
        IpAddr::V4(b.internal_ipv4().unwrap()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(a.peer_path(ib) != PeerPath::Relay && b.peer_path(ia) != PeerPath::Relay) {
        assert!(Instant::now() < deadline, "no peer tunnel");
        // Notifications say when; reading them is waiting for the next one.
        let _ = a.notifications().recv_timeout(Duration::from_millis(100));
    }
}

#[test]
fn ten_megabytes_over_the_relay() {
    let server = server(|_| {});
    let a = tunnel(&server, Transport::UDP);
    let b = tunnel(&server, Transport::UDP);
    transfer(&a, &b, false, |_| {});
    assert!(server.stats().director.frames_relayed > (TOTAL / 1500) as u64);
    assert_eq!(a.stats().client.peer.data_sent, 0);
    a.close();
    b.close();
    server.shutdown();
}

#[test]
fn ten_megabytes_over_a_peer_tunnel() {
    let server = server(|_| {});
    let a = tunnel(&server, Transport::UDP);
    let b = tunnel(&server, Transport::UDP);
    let mut relayed_at_start = None;
    transfer(&a, &b, true, |offset| {
        if offset == 0 {
            // The handshake opened the peer tunnel: the data takes it from the start.
            wait_for_peer(&a, &b);
            relayed_at_start = Some(server.stats().director.frames_relayed);
        }
    });
    let relayed = server.stats().director.frames_relayed - relayed_at_start.unwrap();
    assert!(relayed < 16, "{relayed} frames relayed during the transfer");
    assert!(a.stats().client.peer.data_sent > (TOTAL / 1500) as u64);
    a.close();
    b.close();
    server.shutdown();
}

#[test]
fn a_transfer_goes_on_across_a_switch_to_a_peer_tunnel_and_back() {
    let server = server(|_| {});
    let a = tunnel(&server, Transport::UDP);
    let b = tunnel(&server, Transport::UDP);
    let ib = IpAddr::V4(b.internal_ipv4().unwrap());
    let (mut on_peer, mut cut) = (false, false);
    transfer(&a, &b, true, |offset| {
        if !on_peer && offset >= TOTAL / 10 {
            wait_for_peer(&a, &b);
            on_peer = true;
        }
        if !cut && offset >= TOTAL / 2 {
            assert!(a.peer_path(ib) != PeerPath::Relay);
            a.block_peer_traffic(true);
            b.block_peer_traffic(true);
            cut = true;
        }
    });
    assert!(cut);
    assert_eq!(a.peer_path(ib), PeerPath::Relay, "back on the relay");
    assert!(a.stats().client.peer.data_sent > 0);
    assert!(a.stats().peer_blocked > 0);
    a.close();
    b.close();
    server.shutdown();
}

#[test]
fn udp_datagrams_larger_than_the_tunnel_carries_arrive_whole() {
    let server = server(|_| {});
    let a = tunnel(&server, Transport::UDP);
    let b = tunnel(&server, Transport::UDP);
    let max = a.info().unwrap().max_packet_len;
    let rx = b.bind(5004).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let tx = a.bind(0).unwrap();
    let dst = SocketAddr::new(b.internal_ipv4().unwrap().into(), 5004);
    let mut buf = [0u8; 4096];
    // An RTP packet at GStreamer's default mtu, and one of more than twice the limit.
    for (i, len) in [1400, 2 * max + 100].into_iter().enumerate() {
        let payload: Vec<u8> = (0..len).map(|j| (i + j) as u8).collect();
        assert_eq!(tx.send_to(&payload, dst).unwrap(), len);
        let (n, _) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &payload[..], "{len} octets");
    }
    assert_eq!(b.stats().fragments_dropped, 0);
    a.close();
    b.close();
    server.shutdown();
}

#[test]
fn a_connection_to_a_port_nobody_listens_on_is_refused_and_a_clean_end_reads_as_eof() {
    let server = server(|_| {});
    let a = tunnel(&server, Transport::UDP);
    let b = tunnel(&server, Transport::UDP);
    let ip = b.internal_ipv4().unwrap();
    let err = a.tcp_connect(SocketAddr::new(ip.into(), 7999)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    let listener = b.tcp_listen(0).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut client = a.tcp_connect(SocketAddr::new(ip.into(), port)).unwrap();
    let (mut accepted, _) = listener.accept().unwrap();
    client.write_all(b"bye").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    accepted.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye");
    accepted.shutdown(Shutdown::Write).unwrap();
    let mut rest = [0u8; 8];
    // Both ends closed: reads at either end keep seeing the end, not an error.
    assert_eq!(client.read(&mut rest).unwrap(), 0);
    assert_eq!(accepted.read(&mut rest).unwrap(), 0);
    a.close();
    b.close();
    server.shutdown();
}
