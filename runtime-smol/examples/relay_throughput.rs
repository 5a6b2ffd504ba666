//! How fast one smol server relays inner packets between two tunnels on loopback, per server
//! transport (UDP, TCP, TLS, DTLS, QUIC), and the CPU time each relayed packet costs.
//!
//! ```sh
//! cargo run --release -p tscf-runtime-smol --example relay_throughput
//! cargo run --release -p tscf-runtime-smol --example relay_throughput -- --count 5000 --transport tls --size 100
//! SMOL_THREADS=2 cargo run --release -p tscf-runtime-smol --example relay_throughput
//! ```
//!
//! One server listens on all five transports; for each transport two clients, A and B,
//! connect over it (TLS, DTLS and QUIC pinning the server's certificate fingerprint). Their
//! inner UDP sockets are opted out of peer tunneling, so every packet goes A → server → B.
//! For each payload size (100 and 1,200 octets; `--size N`, repeatable) A sends `--count`
//! datagrams (default 50,000) with at most 64 in flight: B hands back a credit for each one
//! it receives, and when no credit comes back for 100 ms the datagrams in flight are counted
//! lost. A size is 5 to 1,372 octets: the director relays inner IP packets of at most 1,400
//! octets (`DirectorConfig::max_packet_len`), and IPv4 and UDP headers take 28.
//! `--transport` (repeatable: udp, tcp, tls, dtls, quic) picks transports.
//!
//! It prints one row per transport and size: datagrams received of those sent, packets/s and
//! Mbit/s of inner UDP payload (from the first send to the last arrival), and the CPU time
//! per received packet: user + system time of this process from `/proc/self/stat` (units of
//! `USER_HZ`, 10 ms), over the transfer. The server, both clients and the sender and receiver
//! loops all run in this process, so that time is the whole path's: two client tunnels and
//! the server, not the server alone. The server's and the tunnels' tasks run on smol's global
//! executor (one thread, or `SMOL_THREADS`); the sender and receiver loops run on the main
//! thread. For QUIC the last column says how many relayed envelopes the server sent as QUIC
//! datagrams rather than on the stream. Linux only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::cell::Cell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_lite::future;
use tscf_runtime_smol::core::client::ServerEndpoint;
use tscf_runtime_smol::core::wire::Transport;
use tscf_runtime_smol::{
    ClientTlsConfig, Server, ServerConfig, ServerHandle, ServerIdentity, ServerTlsConfig, Tunnel,
    TunnelConfig,
};

/// Datagrams in flight at most.
const WINDOW: u32 = 64;
/// With no credit back for this long, the datagrams in flight are counted lost.
const STALL: Duration = Duration::from_millis(100);
/// IPv4 and UDP headers of an inner packet.
const HEADERS: usize = 28;
/// The inner port B receives on.
const PORT: u16 = 9000;

/// What one transfer measured.
struct Row {
    transport: Transport,
    size: usize,
    sent: u64,
    received: u64,
    secs: f64,
    cpu_secs: f64,
    /// Relayed envelopes the server sent as QUIC datagrams, of all it relayed (QUIC only).
    quic_datagrams: Option<(u64, u64)>,
}

fn main() {
    let mut count: u32 = 50_000;
    let mut transports = Vec::new();
    let mut sizes = Vec::new();
    let max_size = server_config().director.max_packet_len - HEADERS;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--count" => count = value().parse().unwrap_or_else(|_| usage("--count N")),
            "--size" => sizes.push(
                value()
                    .parse::<usize>()
                    .ok()
                    .filter(|s| (5..=max_size).contains(s))
                    .unwrap_or_else(|| usage(&format!("--size takes 5 to {max_size} octets"))),
            ),
            "--transport" => transports.push(match value().as_str() {
                "udp" => Transport::UDP,
                "tcp" => Transport::TCP,
                "tls" => Transport::TLS,
                "dtls" => Transport::DTLS,
                "quic" => Transport::QUIC,
                other => usage(&format!("unknown transport {other}")),
            }),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if transports.is_empty() {
        transports = vec![
            Transport::UDP,
            Transport::TCP,
            Transport::TLS,
            Transport::DTLS,
            Transport::QUIC,
        ];
    }
    if sizes.is_empty() {
        sizes = vec![100, 1200];
    }
    let threads = std::env::var("SMOL_THREADS").unwrap_or_else(|_| "1".into());
    smol::block_on(run(count, &transports, &sizes, &threads));
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "relay_throughput: {problem}\nusage: relay_throughput [--count N] \
         [--transport udp|tcp|tls|dtls|quic]... [--size OCTETS]..."
    );
    std::process::exit(2);
}

async fn run(count: u32, transports: &[Transport], sizes: &[usize], threads: &str) {
    let server = Server::start(server_config()).await.expect("server starts");
    println!(
        "server and clients in one process on loopback; smol executor threads: {threads}; \
         {count} datagrams per row, at most {WINDOW} in flight"
    );
    println!();
    println!(
        "{:<9} {:>5} {:>13} {:>10} {:>8} {:>11}  note",
        "transport", "size", "received/sent", "packets/s", "Mbit/s", "CPU/packet"
    );
    for &transport in transports {
        let config = tunnel_config(&server, transport);
        let a = Tunnel::connect(config.clone()).await.expect("client A");
        let b = Tunnel::connect(config).await.expect("client B");
        for &size in sizes {
            let row = measure(&server, &a, &b, transport, size, count).await;
            print_row(&row);
        }
        a.close().await;
        b.close().await;
    }
    println!();
    println!("size: inner UDP payload in octets; Mbit/s: payload only, first send to last arrival");
    println!(
        "CPU/packet: user + system CPU time of this whole process over the transfer (the \
         server, both\n  client tunnels and the sender and receiver loops all run in it), \
         divided by the datagrams\n  received; from /proc/self/stat, 10 ms resolution"
    );
    server.shutdown().await;
}

/// 127.0.0.1 with ephemeral ports for every transport, and a self-signed certificate.
fn server_config() -> ServerConfig {
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

/// A client of `server`'s listener for `transport`, pinning its certificate.
fn tunnel_config(server: &ServerHandle, transport: Transport) -> TunnelConfig {
    let addrs = server.local_addrs();
    let addr = match transport {
        Transport::TCP => addrs.tcp[0],
        Transport::TLS => addrs.tls[0],
        Transport::DTLS => addrs.dtls[0],
        Transport::QUIC => addrs.quic[0],
        _ => addrs.udp[0],
    };
    let mut config = TunnelConfig::new(vec![ServerEndpoint { addr, transport }]);
    config.tls = server.tls_fingerprint().map(ClientTlsConfig::pinned);
    config.connect_timeout = Duration::from_secs(5);
    config
}

/// Sends `count` datagrams of `size` octets from A to B through the server, at most
/// [`WINDOW`] in flight, and measures how many arrive, how fast, and the CPU time spent.
async fn measure(
    server: &ServerHandle,
    a: &Tunnel,
    b: &Tunnel,
    transport: Transport,
    size: usize,
    count: u32,
) -> Row {
    let rx = b.bind(PORT).expect("B binds");
    rx.set_peer_tunneling(false);
    let tx = a.bind(0).expect("A binds");
    tx.set_peer_tunneling(false);
    let dst = SocketAddr::new(b.internal_ipv4().expect("B's address").into(), PORT);
    let (credit_tx, credits) = smol::channel::unbounded::<()>();
    let before = server.stats();
    let cpu0 = common::cpu_seconds();
    let start = Instant::now();

    let sent = Cell::new(0u64);
    let received = Cell::new(0u64);
    let last = Cell::new(start);
    // B counts what arrives and hands back a credit for each, until all of it arrived.
    let receive = async {
        let mut buf = vec![0u8; 2048];
        while received.get() < u64::from(count) {
            if rx.recv_from(&mut buf).await.is_err() {
                break;
            }
            received.set(received.get() + 1);
            last.set(Instant::now());
            let _ = credit_tx.try_send(());
        }
    };
    // A sends; when some datagrams were lost it ends first, once no credit came back for
    // STALL, and takes the receiver down with it.
    let send = async {
        let mut datagram = vec![b'B'; size];
        let mut in_flight = 0;
        for seq in 0..count {
            // A late arrival's credit, after its datagram was counted lost, is ignored.
            while credits.try_recv().is_ok() {
                in_flight = u32::saturating_sub(in_flight, 1);
            }
            while in_flight >= WINDOW {
                in_flight = match credit_or_stall(&credits).await {
                    true => in_flight - 1,
                    // Lost on the way.
                    false => 0,
                };
            }
            datagram[1..5].copy_from_slice(&seq.to_be_bytes());
            if tx.send_to(&datagram, dst).await.is_ok() {
                sent.set(sent.get() + 1);
                in_flight += 1;
            }
        }
        while in_flight > 0 && credit_or_stall(&credits).await {
            in_flight -= 1;
        }
    };
    future::or(receive, send).await;
    let cpu = common::cpu_seconds() - cpu0;
    let after = server.stats();
    let quic_datagrams = (transport == Transport::QUIC).then(|| {
        (
            after.transport.quic_datagrams_sent - before.transport.quic_datagrams_sent,
            after.director.frames_relayed - before.director.frames_relayed,
        )
    });
    Row {
        transport,
        size,
        sent: sent.get(),
        received: received.get(),
        secs: last.get().saturating_duration_since(start).as_secs_f64(),
        cpu_secs: cpu,
        quic_datagrams,
    }
}

/// Waits for a credit (true), or for [`STALL`] without one (false).
async fn credit_or_stall(credits: &smol::channel::Receiver<()>) -> bool {
    future::or(async { credits.recv().await.is_ok() }, async {
        smol::Timer::after(STALL).await;
        false
    })
    .await
}

fn print_row(row: &Row) {
    let rate = row.received as f64 / row.secs.max(1e-9);
    let mbit = rate * (row.size * 8) as f64 / 1e6;
    let cpu = match row.received {
        0 => "-".to_string(),
        n => format!("{:.1} us", row.cpu_secs * 1e6 / n as f64),
    };
    let note = match row.quic_datagrams {
        Some((datagrams, relayed)) => format!(
            "{:.0}% as QUIC datagrams",
            datagrams as f64 * 100.0 / relayed.max(1) as f64
        ),
        None => String::new(),
    };
    let line = format!(
        "{:<9} {:>5} {:>13} {:>10.0} {:>8.1} {cpu:>11}  {note}",
        row.transport.to_string(),
        row.size,
        format!("{}/{}", row.received, row.sent),
        rate,
        mbit,
    );
    println!("{}", line.trim_end());
}
