//! How fast inner TCP (the core's smoltcp stack) carries a bulk transfer between two tunnels
//! of one smol server on loopback, over the relay and over a peer tunnel, next to plain
//! loopback TCP measured in the same run.
//!
//! ```sh
//! cargo run --release -p tscf-runtime-smol --example inner_tcp_throughput
//! cargo run --release -p tscf-runtime-smol --example inner_tcp_throughput -- --mb 256 --buffer-kib 64
//! ```
//!
//! One server listens on UDP; two clients, A and B, connect over it. For each path, A writes
//! `--mb` MiB (default 64) in 64 KiB writes to a listener of B, which reads them to the end
//! of the stream; the time runs from the connect to the last octet read. The relay row has
//! both ends opted out of peer tunneling; the peer row has both opted in and starts once the
//! peer tunnel is up (the server's relayed frame count during the transfer is printed). The
//! loopback row is the same transfer over a kernel TCP connection on 127.0.0.1. Everything
//! runs in this process on smol's global executor (one thread, or `SMOL_THREADS`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use futures_lite::{future, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use smol::Async;
use tscf_runtime_smol::core::client::{PeerPath, ServerEndpoint};
use tscf_runtime_smol::core::wire::Transport;
use tscf_runtime_smol::{Server, ServerConfig, Tunnel, TunnelConfig};

const CHUNK: usize = 64 * 1024;

fn main() {
    let (mut mb, mut buffer_kib) = (64, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--mb", Some(n)) if n > 0 => mb = n,
            ("--buffer-kib", Some(n)) if n > 0 => buffer_kib = Some(n),
            _ => {
                eprintln!("usage: inner_tcp_throughput [--mb MIB] [--buffer-kib KIB]");
                std::process::exit(2);
            }
        }
    }
    smol::block_on(run(mb * 1024 * 1024, buffer_kib));
}

async fn run(total: usize, buffer_kib: Option<usize>) {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = Server::start(ServerConfig {
        udp: vec![any],
        ..ServerConfig::default()
    })
    .await
    .expect("server starts");
    let endpoint = ServerEndpoint {
        addr: server.local_addrs().udp[0],
        transport: Transport::UDP,
    };
    let mut config = TunnelConfig::new(vec![endpoint]);
    if let Some(kib) = buffer_kib {
        config.tcp_buffer_bytes = kib * 1024;
    }
    let a = Tunnel::connect(config.clone()).await.unwrap();
    let b = Tunnel::connect(config.clone()).await.unwrap();
    let threads = std::env::var("SMOL_THREADS").unwrap_or_else(|_| "1".into());
    println!(
        "inner TCP, {} MiB per transfer, {} KiB stream buffers, one smol server and two \
         tunnels on loopback (SMOL_THREADS={threads})",
        total / (1024 * 1024),
        config.tcp_buffer_bytes / 1024
    );
    println!("{:<22} {:>10} {:>12}", "path", "seconds", "Mbit/s");

    // Plain loopback TCP, for reference.
    let listener = Async::<TcpListener>::bind(any).unwrap();
    let to = listener.get_ref().local_addr().unwrap();
    let secs = transfer(
        async { listener.accept().await.unwrap().0 },
        async { Async::<TcpStream>::connect(to).await.unwrap() },
        total,
    )
    .await;
    row("loopback TCP (kernel)", total, secs, None);

    for (label, peer, port) in [
        ("inner TCP, relay", false, 7001),
        ("inner TCP, peer", true, 7002),
    ] {
        let listener = b.tcp_listen(port).unwrap();
        listener.set_peer_tunneling(peer);
        let to = SocketAddr::new(b.internal_ipv4().unwrap().into(), port);
        if peer {
            wait_for_peer(&a, &b, port).await;
        }
        let relayed = server.stats().director.frames_relayed;
        let secs = transfer(
            async { listener.accept().await.unwrap().0 },
            async {
                let stream = a.tcp_connect(to).await.unwrap();
                stream.set_peer_tunneling(peer);
                stream
            },
            total,
        )
        .await;
        let relayed = server.stats().director.frames_relayed - relayed;
        row(label, total, secs, Some(relayed));
        let (sa, sb) = (a.stats(), b.stats());
        println!(
            "    A: {:?} send errors {}; B: {:?} send errors {}",
            sa.tcp, sa.peer_send_errors, sb.tcp, sb.peer_send_errors
        );
    }
    a.close().await;
    b.close().await;
    server.shutdown().await;
}

/// Opens a peer tunnel between `a` and `b` with a short opted-in exchange on `port`, and
/// waits until both send on it.
async fn wait_for_peer(a: &Tunnel, b: &Tunnel, port: u16) {
    let (ia, ib) = (
        IpAddr::V4(a.internal_ipv4().unwrap()),
        IpAddr::V4(b.internal_ipv4().unwrap()),
    );
    let probe = a.bind(port).unwrap();
    probe.set_peer_tunneling(true);
    let deadline = Instant::now() + Duration::from_secs(10);
    // A plain or a DTLS peer tunnel, whichever the tunnels' configuration offers.
    while a.peer_path(ib) == PeerPath::Relay || b.peer_path(ia) == PeerPath::Relay {
        assert!(Instant::now() < deadline, "no peer tunnel");
        // Opted-in packets start the negotiation; B's answers come from its opted-in port.
        let _ = probe.send_to(b"probe", SocketAddr::new(ib, port)).await;
        let _ = future::or(
            async {
                let _ = a.notifications().recv().await;
            },
            async {
                smol::Timer::after(Duration::from_millis(50)).await;
            },
        )
        .await;
    }
}

/// Writes `total` octets from the stream `connect` gives to the one `accept` gives and reads
/// them to the end; the seconds from the connect to the last octet read.
async fn transfer<R, W>(
    accept: impl std::future::Future<Output = R>,
    connect: impl std::future::Future<Output = W>,
    total: usize,
) -> f64
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let started = Instant::now();
    let reader = async {
        let mut stream = accept.await;
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0;
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        assert_eq!(got, total);
    };
    let writer = async {
        let mut stream = connect.await;
        let buf = vec![0x5au8; CHUNK];
        let mut sent = 0;
        while sent < total {
            let n = CHUNK.min(total - sent);
            stream.write_all(&buf[..n]).await.unwrap();
            sent += n;
        }
        stream.close().await.unwrap();
    };
    future::zip(reader, writer).await;
    started.elapsed().as_secs_f64()
}

fn row(label: &str, total: usize, secs: f64, relayed: Option<u64>) {
    let mbps = total as f64 * 8.0 / secs / 1e6;
    let relayed = relayed.map_or(String::new(), |n| format!("  ({n} frames relayed)"));
    println!("{label:<22} {secs:>10.2} {mbps:>12.1}{relayed}");
}
