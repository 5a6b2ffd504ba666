//! A server and two tunnels in one process on loopback: one tunnel echoes on an inner UDP
//! socket, the other sends to it and prints the replies.
//!
//! `cargo run -p tscf-runtime-std --example udp_echo [tcp|tls|udp]`

use std::error::Error;
use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use tscf_runtime_std::core::client::ServerEndpoint;
use tscf_runtime_std::core::wire::Transport;
use tscf_runtime_std::{ClientTlsConfig, Server, ServerConfig, Tunnel, TunnelConfig};

const ECHO_PORT: u16 = 7;

fn main() -> Result<(), Box<dyn Error>> {
    let transport = match std::env::args().nth(1).as_deref() {
        Some("tcp") => Transport::TCP,
        Some("tls") => Transport::TLS,
        _ => Transport::UDP,
    };
    let server = Server::start(ServerConfig::loopback())?;
    let addrs = server.local_addrs();
    let addr = match transport {
        Transport::TCP => addrs.tcp[0],
        Transport::TLS => addrs.tls[0],
        _ => addrs.udp[0],
    };
    let fingerprint = server.tls_fingerprint().ok_or("no TLS fingerprint")?;
    println!("server on {addr} ({transport}), certificate SHA-256 {fingerprint}");
    let config = || {
        let mut c = TunnelConfig::new(vec![ServerEndpoint { addr, transport }]);
        c.tls = Some(ClientTlsConfig::pinned(fingerprint));
        c
    };

    let echo = Tunnel::connect(config())?;
    let echo_addr = SocketAddr::new(echo.internal_ipv4().ok_or("no address")?.into(), ECHO_PORT);
    let echo_socket = echo.bind(ECHO_PORT)?;
    println!(
        "echo tunnel {:#x} at {echo_addr}",
        echo.tunnel_id().unwrap_or(0)
    );
    let echoer = thread::spawn(move || {
        let mut buf = [0u8; 1500];
        echo_socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        while let Ok((n, from)) = echo_socket.recv_from(&mut buf) {
            echo_socket.send_to(&buf[..n], from)?;
        }
        Ok::<_, std::io::Error>(())
    });

    let sender = Tunnel::connect(config())?;
    let socket = sender.bind(0)?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    println!(
        "sender tunnel {:#x} at {}, seen by the server as {:?}",
        sender.tunnel_id().unwrap_or(0),
        socket.local_addr()?,
        sender.observed_address()
    );
    let mut buf = [0u8; 1500];
    for i in 0..5 {
        let message = format!("hello #{i}");
        socket.send_to(message.as_bytes(), echo_addr)?;
        let (n, from) = socket.recv_from(&mut buf)?;
        println!("reply from {from}: {}", String::from_utf8_lossy(&buf[..n]));
    }
    sender.close();
    echo.close();
    let _ = echoer.join();
    let stats = server.stats();
    println!(
        "server relayed {} frames, {} tunnels opened",
        stats.director.frames_relayed, stats.director.tunnels_opened
    );
    server.shutdown();
    Ok(())
}
