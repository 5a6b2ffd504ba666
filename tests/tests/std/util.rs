//! Shared helpers: servers on ephemeral loopback ports, tunnels, RTP-like flows.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tscf_core::client::ServerEndpoint;
use tscf_core::wire::Transport;
use tscf_runtime_std::{
    ClientTlsConfig, InnerUdpSocket, Notification, Server, ServerConfig, ServerHandle, Tunnel,
    TunnelConfig,
};

pub const TRANSPORTS: [Transport; 3] = [Transport::TCP, Transport::TLS, Transport::UDP];

/// A server on 127.0.0.1 (ephemeral ports) for every transport, with a self-signed certificate.
pub fn server(tweak: impl FnOnce(&mut ServerConfig)) -> ServerHandle {
    let mut config = ServerConfig::loopback();
    tweak(&mut config);
    Server::start(config).expect("server starts")
}

pub fn endpoint(server: &ServerHandle, transport: Transport) -> ServerEndpoint {
    let a = server.local_addrs();
    let addr = match transport {
        Transport::TCP => a.tcp[0],
        Transport::TLS => a.tls[0],
        _ => a.udp[0],
    };
    ServerEndpoint { addr, transport }
}

/// A tunnel config for `server` over `transport`, pinning the server's certificate.
pub fn tunnel_config(server: &ServerHandle, transport: Transport) -> TunnelConfig {
    let mut c = TunnelConfig::new(vec![endpoint(server, transport)]);
    c.tls = server.tls_fingerprint().map(ClientTlsConfig::pinned);
    c.connect_timeout = Duration::from_secs(5);
    c
}

pub fn tunnel(server: &ServerHandle, transport: Transport) -> Tunnel {
    Tunnel::connect(tunnel_config(server, transport)).expect("tunnel connects")
}

/// `config` offering plain UDP peer tunnels, asked for by name: by default peer tunnels run
/// inside DTLS sessions.
pub fn plain_peers(mut config: TunnelConfig) -> TunnelConfig {
    if let Some(peer) = &mut config.client.peer {
        peer.transport = Transport::UDP;
        peer.require_secure = false;
    }
    config
}

/// The sequence numbers of the 160-octet datagrams of a flow of `count` that `sock` receives,
/// in order, until the last one or 3 s without a packet (long enough for a re-attach); `sock`
/// has a read timeout.
pub fn receive_flow(sock: &InnerUdpSocket, count: u32) -> Vec<u32> {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    let mut idle_since = Instant::now();
    while idle_since.elapsed() < Duration::from_secs(3) {
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            assert_eq!(n, 160);
            got.push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
            idle_since = Instant::now();
            if got.last() == Some(&(count - 1)) {
                break;
            }
        }
    }
    got
}

/// Sends `count` datagrams of 160 octets (sequence number first) at 50 per second from `from`
/// to `to`'s port 5004, and returns the sequence numbers `to` received, in order. `at_packet`
/// runs on the calling thread before each packet is sent.
pub fn rtp_flow(from: &Tunnel, to: &Tunnel, count: u32, at_packet: impl FnMut(u32)) -> Vec<u32> {
    rtp_flow_opted(from, to, count, false, at_packet)
}

/// [`rtp_flow`] from a sending socket opted in to peer tunneling when `peer` is true.
pub fn rtp_flow_opted(
    from: &Tunnel,
    to: &Tunnel,
    count: u32,
    peer: bool,
    mut at_packet: impl FnMut(u32),
) -> Vec<u32> {
    let rx = to.bind(5004).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let tx = from.bind(0).unwrap();
    tx.set_peer_tunneling(peer);
    let dst = SocketAddr::new(to.internal_ipv4().unwrap().into(), 5004);
    thread::scope(|s| {
        let receiver = s.spawn(|| receive_flow(&rx, count));
        let start = Instant::now();
        let mut payload = [0x5au8; 160];
        for seq in 0..count {
            at_packet(seq);
            let due = start + Duration::from_millis(20) * seq;
            thread::sleep(due.saturating_duration_since(Instant::now()));
            payload[..4].copy_from_slice(&seq.to_be_bytes());
            // While re-attaching the client queues; a refusal here would be a lost packet.
            let _ = tx.send_to(&payload, dst);
        }
        receiver.join().unwrap()
    })
}

/// A fresh directory for files of one test, removed with what it holds when the test is
/// done with it.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh directory for files of one test.
pub fn temp_dir(name: &str) -> TempDir {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tscf-std-{}-{name}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// Waits (up to 15 s, looking every 10 ms) until `done` holds; fails naming `what`.
pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Reads `tunnel`'s notifications until one that `last` accepts (up to 15 s), and returns
/// them all, that one included.
pub fn wait_for_notification(
    tunnel: &Tunnel,
    mut last: impl FnMut(&Notification) -> bool,
) -> Vec<Notification> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut notes = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tunnel.notifications().recv_timeout(left) {
            Ok(note) => {
                let done = last(&note);
                notes.push(note);
                if done {
                    return notes;
                }
            }
            Err(_) => panic!("no such notification; got {notes:?}"),
        }
    }
}
