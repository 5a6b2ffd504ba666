//! Pings one tunnel from another through a server on loopback and prints the round-trip time
//! and the path of each echo reply.
//!
//! `cargo run -p tscf-runtime-std --example ping [tcp|tls|udp] [count]`

use std::error::Error;
use std::fmt;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use tscf_runtime_std::core::client::ServerEndpoint;
use tscf_runtime_std::core::wire::Transport;
use tscf_runtime_std::{
    ClientTlsConfig, Server, ServerConfig, ServerIdentity, ServerTlsConfig, Tunnel, TunnelConfig,
};

const ECHO_PORT: u16 = 7;

/// The way a reply came. Only the relay exists for now; a direct peer path will be another.
#[derive(Clone, Copy, Debug)]
enum Path {
    Relay(Transport),
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Relay(t) => write!(f, "relay via server ({t})"),
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
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let server = Server::start(ServerConfig {
        tcp: vec![any],
        tls: vec![any],
        udp: vec![any],
        tls_config: Some(ServerTlsConfig {
            identity: ServerIdentity::SelfSigned {
                names: vec!["127.0.0.1".into()],
            },
            client_ca: None,
        }),
        ..ServerConfig::default()
    })?;
    let addrs = server.local_addrs();
    let addr = match transport {
        Transport::TCP => addrs.tcp[0],
        Transport::TLS => addrs.tls[0],
        _ => addrs.udp[0],
    };
    let mut config = TunnelConfig::new(vec![ServerEndpoint { addr, transport }]);
    config.tls = server.tls_fingerprint().map(ClientTlsConfig::pinned);

    let responder = Tunnel::connect(config.clone())?;
    let target = SocketAddr::new(
        responder.internal_ipv4().ok_or("no address")?.into(),
        ECHO_PORT,
    );
    let echo = responder.bind(ECHO_PORT)?;
    echo.set_read_timeout(Some(Duration::from_secs(2)))?;
    let echoer = thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });

    let pinger = Tunnel::connect(config)?;
    let socket = pinger.bind(0)?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    println!("PING {target} from {}", socket.local_addr()?);
    let mut buf = [0u8; 1500];
    for seq in 0..count {
        let sent = Instant::now();
        socket.send_to(&seq.to_be_bytes(), target)?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) if n == 4 && buf[..4] == seq.to_be_bytes() => {
                let rtt = sent.elapsed();
                let path = Path::Relay(transport);
                println!("reply from {from}: seq={seq} time={rtt:.2?} path={path}");
            }
            Ok(_) => println!("seq={seq}: unexpected reply"),
            Err(e) => println!("seq={seq}: {e}"),
        }
        thread::sleep(Duration::from_millis(200));
    }
    pinger.close();
    responder.close();
    let _ = echoer.join();
    server.shutdown();
    Ok(())
}
