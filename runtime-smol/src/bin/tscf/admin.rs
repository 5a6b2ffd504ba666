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
use tscf_runtime_smol::{ServerHandle, ServerStats};

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

/// The answer to `status`: the server's listeners, tunnels and every counter of its
/// [`ServerStats`], one JSON object. The counters are serialized from the core's statistics
/// types, so that a counter added there shows here without more code: `director` is the
/// director's statistics (with `refused`, `dropped` and `peer` inside), `runtime` the
/// transports' counters and connection gauges, `peer` the director's peer counters again.
#[derive(Serialize)]
struct Status<'a> {
    state: &'static str,
    listeners: Listeners<'a>,
    tls_fingerprint: Option<String>,
    tunnels: Vec<TunnelEntry>,
    director: Value,
    peer: Value,
    runtime: Value,
}

/// The addresses the server listens on, by transport.
#[derive(Serialize)]
struct Listeners<'a> {
    tcp: &'a [SocketAddr],
    tls: &'a [SocketAddr],
    udp: &'a [SocketAddr],
    quic: &'a [SocketAddr],
    dtls: &'a [SocketAddr],
    /// Where the other directors of a cluster link to this one.
    mesh: &'a [SocketAddr],
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

/// The answer to a request the endpoint does not know.
#[derive(Serialize)]
struct Refusal {
    error: String,
}

impl<'a> Status<'a> {
    fn of(server: &'a ServerHandle) -> Self {
        let addrs = server.local_addrs();
        let (director, runtime) = split(&server.stats());
        Status {
            state: "listening",
            listeners: Listeners {
                tcp: &addrs.tcp,
                tls: &addrs.tls,
                udp: &addrs.udp,
                quic: &addrs.quic,
                dtls: &addrs.dtls,
                mesh: server.mesh_addrs(),
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
            peer: director["peer"].clone(),
            director,
            runtime,
        }
    }
}

/// `stats` as the `director` and `runtime` objects of the status: the director's statistics,
/// and the rest of `stats` with the transports' counters lifted beside the gauges.
fn split(stats: &ServerStats) -> (Value, Value) {
    // Statistics are plain numbers and names: serde_json writes them.
    let Ok(Value::Object(mut all)) = serde_json::to_value(stats) else {
        return (Value::Null, Value::Null);
    };
    let director = all.remove("director").unwrap_or_default();
    if let Some(Value::Object(transport)) = all.remove("transport") {
        all.extend(transport);
    }
    (director, Value::Object(all))
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
    for kind in ["tcp", "tls", "udp", "quic", "dtls", "mesh"] {
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
    // Every drop and refusal that happened, by the counter's name.
    let nonzero = |v: &Value| -> Vec<String> {
        let fields = v.as_object().into_iter().flatten();
        fields
            .filter(|(_, n)| n.as_u64().is_some_and(|n| n > 0))
            .map(|(name, n)| format!("{n} {name}"))
            .collect()
    };
    let refused = nonzero(&d["refused"]);
    if !refused.is_empty() {
        println!("refused: {}", refused.join(", "));
    }
    let dropped = nonzero(&d["dropped"]);
    if !dropped.is_empty() {
        println!("dropped: {}", dropped.join(", "));
    }
    let c = &d["cluster"];
    let in_cluster = !value["listeners"]["mesh"]
        .as_array()
        .is_none_or(|a| a.is_empty());
    if in_cluster || n(&c["registry_requests"]) > 0 {
        println!(
            "cluster: {} registry requests, {} failed; {} mesh links opened, {} dialed; \
             {} tunnels adopted, {} moved away",
            n(&c["registry_requests"]),
            n(&c["registry_failures"]),
            n(&c["mesh_links"]),
            n(&c["mesh_dials"]),
            n(&c["adoptions"]),
            n(&c["moved_away"]),
        );
        let mesh_dropped = nonzero(&c["mesh_dropped"]);
        if !mesh_dropped.is_empty() {
            println!("mesh dropped: {}", mesh_dropped.join(", "));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The status shows every field of the server's statistics: the director's under
    /// `director`, the others under `runtime`.
    #[test]
    fn status_splits_every_statistic_between_director_and_runtime() {
        fn leaves(v: &Value) -> usize {
            match v {
                Value::Object(fields) => fields.values().map(leaves).sum(),
                _ => 1,
            }
        }
        let stats = ServerStats::default();
        let all = serde_json::to_value(&stats).expect("statistics serialize");
        let (director, runtime) = split(&stats);
        assert_eq!(director, all["director"]);
        assert_eq!(leaves(&director) + leaves(&runtime), leaves(&all));
        assert!(director["dropped"]["spoofed_source"].is_u64());
        assert!(director["refused"]["rate_limited"].is_u64());
        assert!(runtime["stream_queue_full"].is_u64());
        assert!(runtime["udp_connections"].is_u64());
    }
}
