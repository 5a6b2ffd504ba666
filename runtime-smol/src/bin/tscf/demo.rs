//! `tscf demo`: a server and two clients in one process on loopback. Client A pings an echo
//! socket on client B, first over the relay (sockets opted out of peer tunneling), then over
//! the peer tunnel (opted in), and sends a bulk transfer of 1,200-octet datagrams on each path;
//! B counts what it receives.
//!
//! The bulk sender keeps at most [`WINDOW`] datagrams in flight, as a transport with flow
//! control would: B's receive task hands a credit back for every datagram it gets. Sent back to
//! back instead, the datagrams would overrun a 208 KiB socket receive buffer somewhere on the
//! way within microseconds, and the table would show the kernel's buffer size, not the path's
//! throughput.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::future;
use serde_json::json;
use tscf_runtime_smol::core::client::{PeerPath, ServerEndpoint};
use tscf_runtime_smol::core::wire::Transport;
use tscf_runtime_smol::{Notification, Server, ServerConfig, Tunnel, TunnelConfig};

use crate::exit;

/// Pings per path.
const PINGS: u32 = 50;
/// Datagrams in a bulk transfer, and their size.
const BULK: u32 = 20_000;
const BULK_SIZE: usize = 1_200;
/// Bulk datagrams in flight at most: 77 KB, well inside any socket buffer on the way.
const WINDOW: u32 = 64;
/// With no credit back for this long, the datagrams in flight are counted lost.
const STALL: Duration = Duration::from_millis(100);

/// What was measured on one path.
struct PathResult {
    name: &'static str,
    rtt_us: Vec<f64>,
    lost: u32,
    received: u64,
    bulk_secs: f64,
}

impl PathResult {
    fn rtt(&self) -> (f64, f64, f64) {
        let mut v = self.rtt_us.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => (f64::NAN, f64::NAN, f64::NAN),
            n => (v[0], v[n / 2], v[n - 1]),
        }
    }

    fn packets_per_sec(&self) -> f64 {
        self.received as f64 / self.bulk_secs.max(1e-9)
    }

    fn mbit_per_sec(&self) -> f64 {
        self.packets_per_sec() * (BULK_SIZE * 8) as f64 / 1e6
    }
}

/// Runs `tscf demo`.
pub(crate) fn run(as_json: bool) -> ExitCode {
    match smol::block_on(demo(as_json)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tscf demo: {e}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

async fn demo(as_json: bool) -> Result<(), String> {
    let say = |event: &str, text: String, fields: serde_json::Value| {
        if as_json {
            let mut fields = fields;
            if let Some(m) = fields.as_object_mut() {
                m.insert("event".into(), event.into());
            }
            crate::stamp::stamp(&mut fields);
            println!("{fields}");
        } else {
            println!("{text}");
        }
    };
    let server = Server::start(ServerConfig {
        udp: vec![loopback()],
        ..ServerConfig::default()
    })
    .await
    .map_err(|e| format!("server: {e}"))?;
    let addr = server.local_addrs().udp[0];
    say(
        "server",
        format!("server on udp {addr}"),
        json!({ "udp": addr.to_string() }),
    );
    let config = TunnelConfig::new(vec![ServerEndpoint {
        addr,
        transport: Transport::UDP,
    }]);
    let a = Tunnel::connect(config.clone())
        .await
        .map_err(|e| format!("client A: {e}"))?;
    let b = Tunnel::connect(config)
        .await
        .map_err(|e| format!("client B: {e}"))?;
    let (ia, ib) = match (a.internal_ipv4(), b.internal_ipv4()) {
        (Some(ia), Some(ib)) => (ia, ib),
        _ => return Err("no internal IPv4 address".into()),
    };
    for (name, t, ip) in [("A", &a, ia), ("B", &b, ib)] {
        let seen = t.observed_address().map(|s| s.to_string());
        say(
            "client",
            format!(
                "client {name}: internal {ip}, seen as {}",
                seen.as_deref().unwrap_or("?")
            ),
            json!({ "name": name, "ipv4": ip.to_string(), "observed": seen }),
        );
    }

    let relay = measure(&a, &b, "relay", 7001, false).await?;
    let frames = server.stats().director.frames_relayed;
    say(
        "relay",
        format!("relay path measured ({frames} frames relayed by the server)"),
        json!({ "frames_relayed": frames }),
    );

    let setup = form_peer_tunnel(&a, &b).await?;
    let path = match a.peer_path(IpAddr::V4(ib)) {
        PeerPath::Peer(p) => p.to_string(),
        PeerPath::Session { addr, transport } => format!("{addr} ({transport})"),
        other => format!("{other:?}"),
    };
    say(
        "peer_tunnel_up",
        format!(
            "peer tunnel up: A -> B via {path}, set up in {:.1} ms",
            setup.as_secs_f64() * 1e3
        ),
        json!({ "path": path, "setup_ms": setup.as_secs_f64() * 1e3 }),
    );
    let before = server.stats().director.frames_relayed;
    let peer = measure(&a, &b, "peer", 7002, true).await?;
    let through_server = server.stats().director.frames_relayed - before;
    let peer_sent = a.stats().client.peer.data_sent;
    say(
        "peer",
        format!(
            "peer path measured ({peer_sent} packets sent on the peer tunnel, \
             {through_server} frames through the server meanwhile)"
        ),
        json!({ "peer_data_sent": peer_sent, "frames_relayed_meanwhile": through_server }),
    );

    if !as_json {
        println!();
        println!(
            "{:<6} {:>9} {:>9} {:>9} {:>10} {:>12} {:>10} {:>9}",
            "path", "rtt min", "median", "max", "pings lost", "bulk recv", "packets/s", "Mbit/s"
        );
    }
    for r in [&relay, &peer] {
        let (min, median, max) = r.rtt();
        say(
            "result",
            format!(
                "{:<6} {:>7.0}us {:>7.0}us {:>7.0}us {:>10} {:>12} {:>10.0} {:>9.1}",
                r.name,
                min,
                median,
                max,
                r.lost,
                format!("{}/{BULK}", r.received),
                r.packets_per_sec(),
                r.mbit_per_sec()
            ),
            json!({
                "path": r.name,
                "rtt_us": { "min": min, "median": median, "max": max },
                "pings": PINGS,
                "lost": r.lost,
                "bulk": { "sent": BULK, "received": r.received, "size": BULK_SIZE,
                           "window": WINDOW, "seconds": r.bulk_secs },
                "packets_per_sec": r.packets_per_sec(),
                "mbit_per_sec": r.mbit_per_sec(),
            }),
        );
    }
    if !as_json {
        println!(
            "\nrtt: {PINGS} echoed pings of 5 octets (lost: no echo within 500 ms); bulk: \
             {BULK} datagrams of {BULK_SIZE} octets, at most {WINDOW} in flight, how many \
             arrived and how fast"
        );
    }
    a.close().await;
    b.close().await;
    server.shutdown().await;
    Ok(())
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Sends opted-in pings from A to B until A reports the peer tunnel up (at most 5 s).
async fn form_peer_tunnel(a: &Tunnel, b: &Tunnel) -> Result<Duration, String> {
    let ib = b.internal_ipv4().ok_or("no address")?;
    let sink = b.bind(7000).map_err(|e| e.to_string())?;
    sink.set_peer_tunneling(true);
    let tx = a.bind(0).map_err(|e| e.to_string())?;
    tx.set_peer_tunneling(true);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let _ = tx.send_to(b"hello", SocketAddr::new(ib.into(), 7000)).await;
        let wait = async {
            smol::Timer::after(Duration::from_millis(50)).await;
            None
        };
        let up = async {
            loop {
                match a.notifications().recv().await {
                    Ok(Notification::PeerTunnelUp { setup, .. }) => return Some(setup),
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            }
        };
        if let Some(setup) = future::or(up, wait).await {
            return Ok(setup);
        }
    }
    Err("the peer tunnel did not form within 5 s".into())
}

/// Pings and a bulk transfer from A to an echo socket on B's `port`.
async fn measure(
    a: &Tunnel,
    b: &Tunnel,
    name: &'static str,
    port: u16,
    peer: bool,
) -> Result<PathResult, String> {
    let ib = b.internal_ipv4().ok_or("no address")?;
    let dst = SocketAddr::new(ib.into(), port);
    let echo = b.bind(port).map_err(|e| e.to_string())?;
    echo.set_peer_tunneling(peer);
    let tx = a.bind(0).map_err(|e| e.to_string())?;
    tx.set_peer_tunneling(peer);
    tx.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let received = Arc::new(AtomicU64::new(0));
    let last = Arc::new(Mutex::new(None::<Instant>));
    let (credit_tx, credits) = smol::channel::unbounded::<()>();
    let echo_task = {
        let (received, last) = (received.clone(), last.clone());
        smol::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                if buf[0] == b'P' {
                    let _ = echo.send_to(&buf[..n], from).await;
                } else {
                    received.fetch_add(1, Ordering::Relaxed);
                    *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                    let _ = credit_tx.try_send(());
                }
            }
        })
    };

    let mut rtt_us = Vec::new();
    let mut lost = 0;
    let mut buf = vec![0u8; 2048];
    for seq in 0..PINGS {
        let mut ping = [b'P', 0, 0, 0, 0];
        ping[1..].copy_from_slice(&seq.to_be_bytes());
        let sent = Instant::now();
        let _ = tx.send_to(&ping, dst).await;
        loop {
            match tx.recv_from(&mut buf).await {
                Ok((5, _)) if buf[..5] == ping => {
                    rtt_us.push(sent.elapsed().as_secs_f64() * 1e6);
                    break;
                }
                Ok(_) => continue,
                Err(_) => {
                    lost += 1;
                    break;
                }
            }
        }
    }

    let mut datagram = vec![b'B'; BULK_SIZE];
    let start = Instant::now();
    let mut in_flight = 0;
    for seq in 0..BULK {
        // A late arrival's credit, after its datagram was counted lost, is ignored.
        while credits.try_recv().is_ok() {
            in_flight = u32::saturating_sub(in_flight, 1);
        }
        while in_flight >= WINDOW {
            let credit = async { credits.recv().await.is_ok() };
            let stall = async {
                smol::Timer::after(STALL).await;
                false
            };
            in_flight = match future::or(credit, stall).await {
                true => in_flight - 1,
                // Lost on the way.
                false => 0,
            };
        }
        datagram[1..5].copy_from_slice(&seq.to_be_bytes());
        let _ = tx.send_to(&datagram, dst).await;
        in_flight += 1;
    }
    // Wait until nothing has come for 200 ms (or 3 s in all).
    let give_up = Instant::now() + Duration::from_secs(3);
    let mut seen = 0;
    loop {
        smol::Timer::after(Duration::from_millis(200)).await;
        let now = received.load(Ordering::Relaxed);
        if now == seen || Instant::now() > give_up {
            break;
        }
        seen = now;
    }
    let got = received.load(Ordering::Relaxed);
    let end = last
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or(start);
    echo_task.cancel().await;
    Ok(PathResult {
        name,
        rtt_us,
        lost,
        received: got,
        bulk_secs: end.saturating_duration_since(start).as_secs_f64(),
    })
}
