//! Shared helpers: servers of either runtime on ephemeral loopback ports (smol also on QUIC and DTLS), tunnel
//! configurations, and 50 packet/s flows over smol and std tunnels.

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use futures_lite::future;
use tscf_core::client::ServerEndpoint;
use tscf_core::wire::Transport;
use tscf_runtime_smol::{
    ClientTlsConfig, Fingerprint, LocalAddrs, ServerConfig, ServerIdentity, ServerTlsConfig,
    TunnelConfig,
};

/// The server transports both runtimes run.
pub const TRANSPORTS: [Transport; 4] = [
    Transport::TCP,
    Transport::TLS,
    Transport::UDP,
    Transport::DTLS,
];

/// 127.0.0.1 with ephemeral ports for every transport, and a self-signed certificate.
pub fn server_config() -> ServerConfig {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    ServerConfig {
        tcp: vec![any],
        tls: vec![any],
        udp: vec![any],
        quic: vec![any],
        dtls: vec![any],
        tls_config: Some(ServerTlsConfig {
            identity: ServerIdentity::SelfSigned {
                names: vec!["127.0.0.1".into()],
            },
            client_ca: None,
        }),
        ..ServerConfig::default()
    }
}

pub fn smol_server() -> tscf_runtime_smol::ServerHandle {
    smol::block_on(tscf_runtime_smol::Server::start(server_config())).expect("smol server")
}

pub fn std_server() -> tscf_runtime_std::ServerHandle {
    let mut config = server_config();
    // The blocking runtime has no QUIC listeners.
    config.quic.clear();
    tscf_runtime_std::Server::start(config).expect("std server")
}

/// A tunnel config for the server at `addrs` over `transport`, pinning its certificate.
pub fn tunnel_config(
    addrs: &LocalAddrs,
    fingerprint: Option<Fingerprint>,
    transport: Transport,
) -> TunnelConfig {
    let addr = match transport {
        Transport::TCP => addrs.tcp[0],
        Transport::TLS => addrs.tls[0],
        Transport::QUIC => addrs.quic[0],
        Transport::DTLS => addrs.dtls[0],
        _ => addrs.udp[0],
    };
    let mut c = TunnelConfig::new(vec![ServerEndpoint { addr, transport }]);
    c.tls = fingerprint.map(ClientTlsConfig::pinned);
    c.connect_timeout = Duration::from_secs(5);
    c
}

pub async fn smol_tunnel(config: TunnelConfig) -> tscf_runtime_smol::Tunnel {
    tscf_runtime_smol::Tunnel::connect(config)
        .await
        .expect("smol tunnel connects")
}

/// Sends `count` datagrams of 160 octets (sequence number first) at 50 per second from `from`
/// to `to`'s port 5004 (opted in to peer tunneling when `peer`), and returns the sequence
/// numbers `to` received, in order.
pub async fn smol_flow(
    from: &tscf_runtime_smol::Tunnel,
    to: &tscf_runtime_smol::Tunnel,
    count: u32,
    peer: bool,
) -> Vec<u32> {
    let rx = to.bind(5004).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let tx = from.bind(0).unwrap();
    tx.set_peer_tunneling(peer);
    let dst = SocketAddr::new(to.internal_ipv4().unwrap().into(), 5004);
    let receive = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        let mut idle_since = Instant::now();
        while idle_since.elapsed() < Duration::from_secs(2) {
            if let Ok((n, _)) = rx.recv_from(&mut buf).await {
                assert_eq!(n, 160);
                got.push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
                idle_since = Instant::now();
                if got.last() == Some(&(count - 1)) {
                    break;
                }
            }
        }
        got
    };
    let send = async {
        let start = Instant::now();
        let mut payload = [0x5au8; 160];
        for seq in 0..count {
            async_io_timer(start + Duration::from_millis(20) * seq).await;
            payload[..4].copy_from_slice(&seq.to_be_bytes());
            let _ = tx.send_to(&payload, dst).await;
        }
    };
    future::zip(receive, send).await.0
}

async fn async_io_timer(at: Instant) {
    smol::Timer::at(at).await;
}

/// [`smol_flow`] between two blocking tunnels, over the relay.
pub fn std_flow(
    from: &tscf_runtime_std::Tunnel,
    to: &tscf_runtime_std::Tunnel,
    count: u32,
) -> Vec<u32> {
    let rx = to.bind(5004).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let tx = from.bind(0).unwrap();
    let dst = SocketAddr::new(to.internal_ipv4().unwrap().into(), 5004);
    thread::scope(|s| {
        let receiver = s.spawn(|| {
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            let mut idle_since = Instant::now();
            while idle_since.elapsed() < Duration::from_secs(2) {
                if let Ok((n, _)) = rx.recv_from(&mut buf) {
                    assert_eq!(n, 160);
                    got.push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
                    idle_since = Instant::now();
                    if got.last() == Some(&(count - 1)) {
                        break;
                    }
                }
            }
            got
        });
        let start = Instant::now();
        let mut payload = [0x5au8; 160];
        for seq in 0..count {
            let due = start + Duration::from_millis(20) * seq;
            thread::sleep(due.saturating_duration_since(Instant::now()));
            payload[..4].copy_from_slice(&seq.to_be_bytes());
            let _ = tx.send_to(&payload, dst);
        }
        receiver.join().unwrap()
    })
}

/// A tunnel config for `server`'s listener of `transport`, pinning its certificate.
pub fn config_for(server: &tscf_runtime_smol::ServerHandle, transport: Transport) -> TunnelConfig {
    tunnel_config(server.local_addrs(), server.tls_fingerprint(), transport)
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

/// Connects to `server` over `transport` pinning a fingerprint that is not the server's, and
/// returns the error (after 1.5 s at most); it must be a time-out naming the failure.
pub fn connect_with_a_wrong_pin(
    server: &tscf_runtime_smol::ServerHandle,
    transport: Transport,
) -> String {
    let mut config = config_for(server, transport);
    config.tls = Some(ClientTlsConfig::pinned(Fingerprint([0xab; 32])));
    config.connect_timeout = Duration::from_millis(1500);
    let err = smol::block_on(tscf_runtime_smol::Tunnel::connect(config)).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, tscf_runtime_smol::ConnectError::TimedOut { .. }),
        "{text}"
    );
    text
}
