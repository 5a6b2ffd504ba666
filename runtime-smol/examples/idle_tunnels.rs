//! Many idle TLS tunnels on one smol server on loopback: what they cost the server in memory
//! and CPU.
//!
//! ```sh
//! ulimit -n 20000
//! cargo run --release -p tscf-runtime-smol --example idle_tunnels -- 10000
//! ```
//!
//! The server runs in this process; the clients run in child processes (this program again,
//! at most 5,000 tunnels each, so that each stays within a 20,000 file-descriptor limit: a
//! client tunnel holds a TCP and a UDP socket). Clients connect in batches of 200 so that a
//! small machine is not flooded with handshakes. Memory is the server process's resident set
//! (`VmRSS` and its peak `VmHWM` in `/proc/self/status`) before and after; CPU time is user +
//! system time from `/proc/self/stat` (in units of `USER_HZ`, 100 per second on Linux), while
//! the tunnels were set up and then over 10 s of idleness. Linux only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tscf_runtime_smol::core::client::ServerEndpoint;
use tscf_runtime_smol::core::wire::Transport;
use tscf_runtime_smol::{
    ClientTlsConfig, Fingerprint, Server, ServerConfig, ServerIdentity, ServerTlsConfig, Tunnel,
    TunnelConfig,
};

/// Tunnels per client process.
const PER_CHILD: usize = 5_000;
/// Tunnels connecting at once.
const BATCH: usize = 200;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("clients") => clients(&args[2], &args[3], args[4].parse().expect("count")),
        count => server(count.map_or(10_000, |c| c.parse().expect("a number of tunnels"))),
    }
}

fn server(tunnels: usize) {
    let need = (tunnels + 200).max(tunnels.min(PER_CHILD) * 2 + 200);
    let limit = fd_soft_limit();
    if limit < need as u64 {
        println!(
            "skipped: the soft file-descriptor limit is {limit}, {need} are needed; \
             raise it with `ulimit -n 20000`"
        );
        return;
    }
    let (rss0, hwm0) = memory_kib();
    let cpu0 = common::cpu_seconds();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = ServerConfig {
        tls: vec![any],
        tls_config: Some(ServerTlsConfig {
            identity: ServerIdentity::SelfSigned {
                names: vec!["127.0.0.1".into()],
            },
            client_ca: None,
        }),
        ..ServerConfig::default()
    };
    config.max_stream_connections = tunnels + 100;
    // Every client process connects from 127.0.0.1, BATCH at a time: the bound on one
    // source's connections still in their handshake (a defence against one host holding
    // many) would turn most of them away, and they would come up only as fast as their
    // retries, or not within their connect timeout.
    config.max_unconfigured_per_source = tunnels.div_ceil(PER_CHILD) * BATCH;
    let server = smol::block_on(Server::start(config)).expect("server starts");
    let addr = server.local_addrs().tls[0];
    let fingerprint = server.tls_fingerprint().expect("a certificate").to_string();
    println!("server on tls {addr}; before: VmRSS {rss0} KiB (VmHWM {hwm0} KiB)");

    let started = Instant::now();
    let exe = std::env::current_exe().unwrap();
    let mut children = Vec::new();
    let mut left = tunnels;
    while left > 0 {
        let n = left.min(PER_CHILD);
        left -= n;
        let child = Command::new(&exe)
            .args(["clients", &addr.to_string(), &fingerprint, &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("client process");
        children.push(child);
    }
    for child in &mut children {
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        print!("  clients: {line}");
        assert!(line.starts_with("ready"), "a client process failed");
    }
    let setup = started.elapsed();
    let stats = server.stats();
    assert_eq!(stats.director.active_tunnels, tunnels, "{stats:?}");
    let (rss1, hwm1) = memory_kib();
    let cpu1 = common::cpu_seconds();
    std::thread::sleep(Duration::from_secs(10));
    let (rss2, _) = memory_kib();
    let cpu2 = common::cpu_seconds();

    println!(
        "{tunnels} TLS tunnels up in {:.1} s ({} stream connections)",
        setup.as_secs_f64(),
        stats.stream_connections
    );
    println!(
        "server memory: VmRSS {rss0} -> {rss1} KiB (+{} KiB, {:.1} KiB per tunnel); VmHWM {hwm1} KiB",
        rss1 - rss0,
        (rss1 - rss0) as f64 / tunnels as f64
    );
    println!(
        "server CPU: {:.2} s to accept and configure them ({:.0} us per tunnel)",
        cpu1 - cpu0,
        (cpu1 - cpu0) * 1e6 / tunnels as f64
    );
    println!("idle 10 s: {:.2} s CPU, VmRSS {rss2} KiB", cpu2 - cpu1);
    for mut child in children {
        drop(child.stdin.take());
        child.wait().unwrap();
    }
    smol::block_on(server.shutdown());
}

/// A client process: `count` tunnels to `addr`, then idle until standard input closes.
fn clients(addr: &str, fingerprint: &str, count: usize) {
    let mut config = TunnelConfig::new(vec![ServerEndpoint {
        addr: addr.parse().expect("address"),
        transport: Transport::TLS,
    }]);
    config.tls = Some(ClientTlsConfig::pinned(
        Fingerprint::from_hex(fingerprint).expect("fingerprint"),
    ));
    config.client.peer = None;
    config.connect_timeout = Duration::from_secs(60);
    let cpu0 = common::cpu_seconds();
    let tunnels = smol::block_on(async {
        let mut tunnels = Vec::with_capacity(count);
        while tunnels.len() < count {
            let n = BATCH.min(count - tunnels.len());
            let batch: Vec<_> = (0..n)
                .map(|_| smol::spawn(Tunnel::connect(config.clone())))
                .collect();
            for task in batch {
                tunnels.push(task.await.expect("tunnel"));
            }
        }
        tunnels
    });
    let (rss, _) = memory_kib();
    println!(
        "ready: {count} tunnels, client process VmRSS {rss} KiB, CPU {:.2} s",
        common::cpu_seconds() - cpu0
    );
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().read_line(&mut String::new());
    drop(tunnels);
}

/// `VmRSS` and `VmHWM` of this process, in KiB.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The soft limit on open files, from `/proc/self/limits`.
fn fd_soft_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
