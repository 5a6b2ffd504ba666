//! Pings one tunnel from another through a server on loopback and prints the round-trip time
//! and the path of each echo request and reply: the relay through the server first, then the
//! direct peer tunnel once the two clients have set it up (both sockets are opted in).
//!
//! `cargo run -p tscf-runtime-std --example ping [tcp|tls|udp] [count]`

use std::error::Error;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tscf_runtime_std::core::client::{PeerPath, ServerEndpoint};
use tscf_runtime_std::core::wire::Transport;
use tscf_runtime_std::{ClientTlsConfig, Notification, Server, ServerConfig, Tunnel, TunnelConfig};

const ECHO_PORT: u16 = 7;
/// Between two pings.
const INTERVAL: Duration = Duration::from_millis(200);

/// The way a datagram went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Relay(Transport),
    Peer,
}

impl Path {
    /// The path `tunnel` sends to `peer` on now.
    fn of(tunnel: &Tunnel, peer: IpAddr, transport: Transport) -> Self {
        match tunnel.peer_path(peer) {
            PeerPath::Relay => Self::Relay(transport),
            // Plain, inside a DTLS or QUIC session (the default), or on a peer stream.
            _ => Self::Peer,
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Relay(t) => write!(f, "relay via server ({t})"),
            Self::Peer => f.write_str("peer tunnel"),
        }
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let transport = match args.next().as_deref() {
        Some("tcp") => Transport::TCP,
        Some("tls") => Transport::TLS,
        _ => Transport::UDP,
    };
    let count: u32 = args.next().and_then(|c| c.parse().ok()).unwrap_or(5);
    let server = Server::start(ServerConfig::loopback())?;
    let addrs = server.local_addrs();
    let addr = match transport {
        Transport::TCP => addrs.tcp[0],
        Transport::TLS => addrs.tls[0],
        _ => addrs.udp[0],
    };
    let mut config = TunnelConfig::new(vec![ServerEndpoint { addr, transport }]);
    config.tls = server.tls_fingerprint().map(ClientTlsConfig::pinned);

    let responder = Tunnel::connect(config.clone())?;
    let pinger = Tunnel::connect(config)?;
    let target = SocketAddr::new(
        responder.internal_ipv4().ok_or("no address")?.into(),
        ECHO_PORT,
    );
    let echo = responder.bind(ECHO_PORT)?;
    echo.set_peer_tunneling(true);
    echo.set_read_timeout(Some(Duration::from_secs(1)))?;
    let socket = pinger.bind(0)?;
    socket.set_peer_tunneling(true);
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    let me = socket.local_addr()?;
    println!("PING {target} from {me} (server over {transport})");

    // Both ends run on this thread, so that the path of each send can be read just before it.
    let mut buf = [0u8; 1500];
    for seq in 0..count {
        print_peer_notifications(&pinger);
        let sent = Instant::now();
        let out = Path::of(&pinger, target.ip(), transport);
        socket.send_to(&seq.to_be_bytes(), target)?;
        let back = match echo.recv_from(&mut buf) {
            Ok((n, from)) => {
                let back = Path::of(&responder, from.ip(), transport);
                echo.send_to(&buf[..n], from)?;
                back
            }
            Err(e) => {
                println!("seq={seq}: request lost: {e}");
                continue;
            }
        };
        match socket.recv_from(&mut buf) {
            Ok((4, from)) if buf[..4] == seq.to_be_bytes() => {
                let rtt = sent.elapsed();
                if out == back {
                    println!("reply from {from}: seq={seq} time={rtt:.2?} path={out}");
                } else {
                    println!("reply from {from}: seq={seq} time={rtt:.2?} out={out} back={back}");
                }
            }
            Ok(_) => println!("seq={seq}: unexpected reply"),
            Err(e) => println!("seq={seq}: {e}"),
        }
        print_peer_notifications(&pinger);
        std::thread::sleep(INTERVAL);
    }
    drop((socket, echo));
    pinger.close();
    responder.close();
    server.shutdown();
    Ok(())
}

fn print_peer_notifications(tunnel: &Tunnel) {
    for note in tunnel.notifications().try_iter() {
        match note {
            Notification::PeerTunnelUp {
                peer, path, setup, ..
            } => {
                println!("peer tunnel to {peer} up, direct to {path} (set up in {setup:.2?})");
            }
            Notification::PeerTunnelDown { peer, reason } => {
                println!("peer tunnel to {peer} down: {reason:?}");
            }
            _ => {}
        }
    }
}
