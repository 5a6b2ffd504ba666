//! Hostile input against a live smol server: the runtime's counters move as in the blocking
//! runtime, connections are closed, and a tunnel next to them keeps working.

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use tscf_core::wire::Transport;
use tscf_runtime_smol::{Server, ServerHandle};

use crate::util::{server_config, smol_flow, smol_tunnel, tunnel_config};

pub fn hostile_server() -> ServerHandle {
    let mut config = server_config();
    config.director.pending_timeout = Duration::from_secs(1);
    smol::block_on(Server::start(config)).unwrap()
}

/// Waits up to 3 s for `check` to hold.
pub fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The server closed `s` (a read returns end of stream or an error, not a timeout).
fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }
}

#[test]
fn garbage_tls_framing_loss_and_udp_noise() {
    let server = hostile_server();
    let addrs = server.local_addrs().clone();

    let mut tls = TcpStream::connect(addrs.tls[0]).unwrap();
    tls.write_all(&[0x42; 64]).unwrap();
    assert!(closed(&mut tls), "garbage instead of a ClientHello");
    eventually("tls_handshake_failures", || {
        server.stats().transport.tls_handshake_failures == 1
    });

    let mut tcp = TcpStream::connect(addrs.tcp[0]).unwrap();
    tcp.write_all(&[5, 0, 1, 9, 9]).unwrap();
    assert!(closed(&mut tcp), "length below 3 loses framing");
    eventually("framing_errors", || {
        server.stats().transport.framing_errors == 1
    });

    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.send_to(&[0xff; 40], addrs.udp[0]).unwrap();
    eventually("udp_dropped", || server.stats().transport.udp_dropped == 1);

    let mut slow = TcpStream::connect(addrs.tcp[0]).unwrap();
    slow.write_all(&[5]).unwrap();
    assert!(closed(&mut slow), "closed at the pending timeout");

    // Two tunnels still relay a flow.
    let config = tunnel_config(&addrs, server.tls_fingerprint(), Transport::UDP);
    smol::block_on(async {
        let a = smol_tunnel(config.clone()).await;
        let b = smol_tunnel(config).await;
        let got = smol_flow(&a, &b, 20, false).await;
        assert_eq!(got, (0..20).collect::<Vec<_>>());
    });
    eventually("no stream connection left", || {
        server.stats().stream_connections == 0
    });
}
