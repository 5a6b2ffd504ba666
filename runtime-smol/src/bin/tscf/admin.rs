//! The admin endpoint of `tscf server` and the `tscf status` command.
//!
//! The server listens on a loopback TCP address (127.0.0.1:4449 by default). The protocol is
//! one line each way: the client sends `status`, the server answers one JSON object on one
//! line and closes. Only loopback addresses are accepted: the endpoint has no authentication,
//! so it must not be reachable from elsewhere.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use futures_lite::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use serde::Serialize;
use serde_json::Value;
use smol::Async;
use tscf_runtime_smol::ServerHandle;

use crate::exit;

/// Where the admin endpoint listens unless configured otherwise.
pub(crate) const DEFAULT_ADDR: &str = "127.0.0.1:4449";

/// How long one admin client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Refuses an admin address beyond loopback.
pub(crate) fn check(addr: SocketAddr) -> Result<SocketAddr, String> {
    if addr.ip().is_loopback() {
        Ok(addr)
    } else {
        Err(format!(
            "admin address {addr} is not a loopback address; the admin endpoint has no \
             authentication and listens on loopback only"
        ))
    }
}

/// Binds the admin listener.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<Async<TcpListener>> {
    Async::<TcpListener>::bind(addr)
}

/// The longest request line read, newline included; a client that sends more is refused.
const MAX_REQUEST: u64 = 256;
/// Admin clients served at once; beyond, new connections wait in the listener's backlog.
const MAX_CLIENTS: usize = 8;

/// Answers admin clients, up to [`MAX_CLIENTS`] at once, forever. Each has
/// [`REQUEST_TIMEOUT`] to send a request of at most [`MAX_REQUEST`] octets.
pub(crate) async fn serve(listener: &Async<TcpListener>, server: &ServerHandle) {
    let slots = smol::lock::Semaphore::new(MAX_CLIENTS);
    let clients = smol::LocalExecutor::new();
    clients
        .run(async {
            loop {
                let slot = slots.acquire().await;
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let answer = futures_lite::future::or(answer(stream, server), async {
                    smol::Timer::after(REQUEST_TIMEOUT).await;
                });
                clients
                    .spawn(async move {
                        answer.await;
                        drop(slot);
                    })
                    .detach();
            }
        })
        .await;
}

/// Reads one request from `stream` and answers it.
async fn answer(stream: Async<TcpStream>, server: &ServerHandle) {
    let mut reader = futures_lite::io::BufReader::new(stream);
    let mut line = String::new();
    let read = (&mut reader).take(MAX_REQUEST).read_line(&mut line).await;
    let reply = match (read, line.trim()) {
        (Err(_), _) => return,
        (Ok(_), _) if !line.ends_with('\n') && line.len() as u64 == MAX_REQUEST => {
            serde_json::to_string(&Refusal {
                error: format!("request longer than {MAX_REQUEST} octets"),
            })
        }
        (Ok(_), "status") => serde_json::to_string(&Status::of(server)),
        (Ok(_), other) => serde_json::to_string(&Refusal {
            error: format!("unknown request {other:?}"),
        }),
    };
    // Neither type holds anything serde_json cannot write.
    let Ok(mut text) = reply else {
        return;
    };
    text.push('\n');
    let mut stream = reader.into_inner();
    let _ = stream.write_all(text.as_bytes()).await;
    let _ = stream.flush().await;
}

/// The answer to `status`: the server's listeners, tunnels, peer service and counters, one
/// JSON object.
#[derive(Serialize)]
struct Status<'a> {
    state: &'static str,
    listeners: Listeners<'a>,
    tls_fingerprint: Option<String>,
    tunnels: Vec<TunnelEntry>,
    director: DirectorCounters,
    peer: PeerCounters,
    runtime: RuntimeCounters,
}

/// The addresses the server listens on, by transport.
#[derive(Serialize)]
struct Listeners<'a> {
    tcp: &'a [SocketAddr],
    tls: &'a [SocketAddr],
    udp: &'a [SocketAddr],
    quic: &'a [SocketAddr],
    dtls: &'a [SocketAddr],
}

/// One tunnel the director holds.
#[derive(Serialize)]
struct TunnelEntry {
    tunnel_id: u64,
    ipv4: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
    transport: String,
    connected: bool,
    queued_frames: usize,
}

/// The director's tunnels and relay.
#[derive(Serialize)]
struct DirectorCounters {
    active_tunnels: usize,
    persistent_tunnels: usize,
    pending_connections: usize,
    tunnels_opened: u64,
    tunnels_closed: u64,
    reattaches: u64,
    frames_relayed: u64,
    bytes_relayed: u64,
    control_answered: u64,
}

/// The director's peer service.
#[derive(Serialize)]
struct PeerCounters {
    requests_forwarded: u64,
    introductions: u64,
    refused_by_destination: u64,
    timeouts: u64,
}

/// The runtime's connections and what it accepted, refused and dropped.
#[derive(Serialize)]
struct RuntimeCounters {
    stream_connections: usize,
    udp_connections: usize,
    streams_accepted: u64,
    streams_refused: u64,
    tls_handshake_failures: u64,
    framing_errors: u64,
    stun_answered: u64,
    udp_dropped: u64,
    quic_handshake_failures: u64,
    quic_retries: u64,
    dtls_associations: usize,
    dtls_half_open: usize,
    dtls_handshakes: u64,
    dtls_handshake_failures: u64,
    dtls_unknown_source: u64,
    dtls_bad_records: u64,
    dtls_half_open_evicted: u64,
    dtls_hello_verify_sent: u64,
}

/// The answer to a request the endpoint does not know.
#[derive(Serialize)]
struct Refusal {
    error: String,
}

impl<'a> Status<'a> {
    fn of(server: &'a ServerHandle) -> Self {
        let addrs = server.local_addrs();
        let stats = server.stats();
        let d = &stats.director;
        let r = &stats.transport;
        Status {
            state: "listening",
            listeners: Listeners {
                tcp: &addrs.tcp,
                tls: &addrs.tls,
                udp: &addrs.udp,
                quic: &addrs.quic,
                dtls: &addrs.dtls,
            },
            tls_fingerprint: server.tls_fingerprint().map(|f| f.to_string()),
            tunnels: server
                .tunnels()
                .into_iter()
                .map(|t| TunnelEntry {
                    tunnel_id: t.tunnel_id,
                    ipv4: t.ipv4,
                    ipv6: t.ipv6,
                    transport: t.transport.to_string(),
                    connected: t.connection.is_some(),
                    queued_frames: t.queued_frames,
                })
                .collect(),
            director: DirectorCounters {
                active_tunnels: d.active_tunnels,
                persistent_tunnels: d.persistent_tunnels,
                pending_connections: d.pending_connections,
                tunnels_opened: d.tunnels_opened,
                tunnels_closed: d.tunnels_closed,
                reattaches: d.reattaches,
                frames_relayed: d.frames_relayed,
                bytes_relayed: d.bytes_relayed,
                control_answered: d.control_answered,
            },
            peer: PeerCounters {
                requests_forwarded: d.peer.requests_forwarded,
                introductions: d.peer.introductions,
                refused_by_destination: d.peer.refused_by_destination,
                timeouts: d.peer.timeouts,
            },
            runtime: RuntimeCounters {
                stream_connections: stats.stream_connections,
                udp_connections: stats.udp_connections,
                streams_accepted: r.streams_accepted,
                streams_refused: r.streams_refused,
                tls_handshake_failures: r.tls_handshake_failures,
                framing_errors: r.framing_errors,
                stun_answered: r.stun_answered,
                udp_dropped: r.udp_dropped,
                quic_handshake_failures: r.quic_handshake_failures,
                quic_retries: r.quic_retries,
                dtls_associations: stats.dtls_associations,
                dtls_half_open: stats.dtls_half_open,
                dtls_handshakes: r.dtls_handshakes,
                dtls_handshake_failures: r.dtls_handshake_failures,
                dtls_unknown_source: r.dtls_unknown_source,
                dtls_bad_records: r.dtls_bad_records,
                dtls_half_open_evicted: r.dtls_half_open_evicted,
                dtls_hello_verify_sent: r.dtls_hello_verify_sent,
            },
        }
    }
}

/// `tscf status`: asks the server at `admin` and prints its answer. Exit 1 if unreachable.
pub(crate) fn status(admin: SocketAddr, as_json: bool) -> ExitCode {
    let value = match ask(admin) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("tscf: cannot reach the server's admin endpoint at {admin}: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    if as_json {
        println!("{value}");
        return ExitCode::SUCCESS;
    }
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    println!("tscf server {}", value["state"].as_str().unwrap_or("?"));
    for kind in ["tcp", "tls", "udp", "quic", "dtls"] {
        for a in value["listeners"][kind].as_array().into_iter().flatten() {
            println!("  {kind} {}", a.as_str().unwrap_or("?"));
        }
    }
    let d = &value["director"];
    println!(
        "tunnels: {} active, {} persistent, {} opened, {} closed",
        n(&d["active_tunnels"]),
        n(&d["persistent_tunnels"]),
        n(&d["tunnels_opened"]),
        n(&d["tunnels_closed"]),
    );
    for t in value["tunnels"].as_array().into_iter().flatten() {
        println!(
            "  {:016x} {} {}",
            n(&t["tunnel_id"]),
            t["ipv4"].as_str().unwrap_or("-"),
            t["transport"].as_str().unwrap_or("?"),
        );
    }
    let p = &value["peer"];
    println!(
        "peer tunnels: {} introduced, {} requests forwarded",
        n(&p["introductions"]),
        n(&p["requests_forwarded"]),
    );
    println!(
        "relayed: {} frames, {} octets",
        n(&d["frames_relayed"]),
        n(&d["bytes_relayed"]),
    );
    let r = &value["runtime"];
    if !value["listeners"]["dtls"]
        .as_array()
        .is_none_or(|a| a.is_empty())
    {
        println!(
            "dtls: {} associations, {} half-open; dropped: {} unknown source, {} bad records, \
             {} failed handshakes, {} evicted half-open",
            n(&r["dtls_associations"]),
            n(&r["dtls_half_open"]),
            n(&r["dtls_unknown_source"]),
            n(&r["dtls_bad_records"]),
            n(&r["dtls_handshake_failures"]),
            n(&r["dtls_half_open_evicted"]),
        );
    }
    ExitCode::SUCCESS
}

fn ask(admin: SocketAddr) -> std::io::Result<Value> {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"status\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let value: Value = serde_json::from_str(&line).map_err(std::io::Error::other)?;
    if let Some(e) = value.get("error") {
        return Err(std::io::Error::other(e.to_string()));
    }
    Ok(value)
}
