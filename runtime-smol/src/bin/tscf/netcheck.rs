//! `tscf netcheck`: asks STUN servers for this host's public mapping, like `tailscale netcheck`.
//!
//! One UDP socket (bound as `tscf client` binds its own) runs the core's
//! [`NatDiscovery`] against every server given: the tunnel server's own STUN responder
//! (`--server`, its UDP listener) and any other STUN server (`--stun`). The report says what
//! each server saw, the public address, whether the mapping varies by destination (a
//! symmetric NAT, which defeats direct peer tunnels) and whether the host address is one a
//! peer on the same network can use.
//!
//! Exit codes: 0 when at least one server answered, 1 when none did (or the socket failed),
//! 2 on a usage error.

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;
use tscf_runtime_smol::core::client::ServerEndpoint;
use tscf_runtime_smol::core::stun::{NatDiscovery, NatDiscoveryConfig, NatEvent, NatReport};
use tscf_runtime_smol::core::wire::Transport;
use tscf_runtime_smol::TunnelConfig;

use crate::exit;

/// The default server's UDP listener, asked when no server is given.
const DEFAULT_SERVER: &str = "127.0.0.1:4440";

/// The options of `tscf netcheck`.
#[derive(Debug, Args)]
pub(crate) struct NetcheckArgs {
    /// A tunnel server's UDP listener, whose STUN responder is asked. Repeatable; without
    /// `--server` and `--stun`, 127.0.0.1:4440.
    #[arg(long, value_name = "ADDR")]
    server: Vec<SocketAddr>,
    /// Another STUN server to ask. Repeatable; give two with different IP addresses to tell
    /// whether the mapping varies by destination.
    #[arg(long, value_name = "ADDR")]
    stun: Vec<SocketAddr>,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// What one server said.
enum Answer {
    Mapped(SocketAddr),
    Failed(Option<u16>),
    TimedOut,
}

/// Runs `tscf netcheck`.
pub(crate) fn run(args: NetcheckArgs) -> ExitCode {
    let mut servers: Vec<SocketAddr> = args.server.iter().chain(&args.stun).copied().collect();
    if servers.is_empty() {
        // A constant that parses; the fallback keeps this free of a panic path.
        servers.push(
            DEFAULT_SERVER
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 4440))),
        );
    }
    servers.dedup();
    if servers.len() > NatDiscoveryConfig::MAX_SERVERS {
        eprintln!(
            "tscf: {} servers, at most {} allowed",
            servers.len(),
            NatDiscoveryConfig::MAX_SERVERS
        );
        return ExitCode::from(exit::USAGE);
    }
    match check(&servers) {
        Ok((host, answers, report)) => print(args.json, host, &servers, &answers, &report),
        Err(e) => {
            eprintln!("tscf: netcheck failed: {e}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// The address this host sends from on `socket`: its bound address, or when it is bound to
/// the unspecified address, the one the system routes to `probe` from (connecting a UDP socket
/// sends nothing).
fn host_address(
    socket: &UdpSocket,
    probe: Option<SocketAddr>,
) -> std::io::Result<Option<SocketAddr>> {
    let local = socket.local_addr()?;
    let (true, Some(probe)) = (local.ip().is_unspecified(), probe) else {
        return Ok(Some(local));
    };
    let route = UdpSocket::bind(SocketAddr::new(local.ip(), 0))?;
    route.connect(probe)?;
    Ok(Some(SocketAddr::new(
        route.local_addr()?.ip(),
        local.port(),
    )))
}

/// Runs one NAT discovery over a fresh socket: the host address and each server's answer.
fn check(servers: &[SocketAddr]) -> std::io::Result<(Option<SocketAddr>, Vec<Answer>, NatReport)> {
    let endpoints: Vec<ServerEndpoint> = servers
        .iter()
        .map(|&addr| ServerEndpoint {
            addr,
            transport: Transport::UDP,
        })
        .collect();
    let config = TunnelConfig::new(endpoints);
    let socket = UdpSocket::bind(config.udp_bind_addr())?;
    let host = host_address(&socket, config.route_probe())?;
    let seed = tscf_runtime_smol::OS.seed()?;
    let now = Instant::now();
    let mut discovery = NatDiscovery::new(NatDiscoveryConfig::new(servers.to_vec()), seed, now);
    let mut answers: Vec<Answer> = servers.iter().map(|_| Answer::TimedOut).collect();
    let mut buf = Vec::new();
    let mut datagram = vec![0u8; 2048];
    let report = loop {
        let now = Instant::now();
        while let Some(t) = discovery.poll_transmit(now, &mut buf) {
            // A send failure (no route) is the same as no answer: the server times out.
            let _ = socket.send_to(&buf, t.destination);
        }
        let mut finished = None;
        while let Some(event) = discovery.poll_event() {
            let (server, answer) = match event {
                NatEvent::Mapped { server, mapped } => (server, Answer::Mapped(mapped)),
                NatEvent::ServerFailed { server, error_code } => {
                    (server, Answer::Failed(error_code))
                }
                NatEvent::ServerTimedOut { server } => (server, Answer::TimedOut),
                NatEvent::Finished(report) => {
                    finished = Some(report);
                    continue;
                }
                _ => continue,
            };
            if let Some(i) = servers.iter().position(|s| *s == server) {
                answers[i] = answer;
            }
        }
        if let Some(report) = finished {
            break report;
        }
        let wait = discovery
            .poll_timeout()
            .map_or(Duration::from_millis(100), |at| {
                at.saturating_duration_since(Instant::now())
            })
            .max(Duration::from_millis(1));
        socket.set_read_timeout(Some(wait))?;
        match socket.recv_from(&mut datagram) {
            Ok((n, from)) => {
                discovery.handle_input(Instant::now(), from, &datagram[..n]);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => return Err(e),
        }
        discovery.handle_timeout(Instant::now());
    };
    Ok((host, answers, report))
}

fn print(
    as_json: bool,
    host: Option<SocketAddr>,
    servers: &[SocketAddr],
    answers: &[Answer],
    report: &NatReport,
) -> ExitCode {
    let public = report.public_address();
    let varies = report.mapping_varies_by_destination();
    // A peer on the same network reaches a host address unless it is loopback or unspecified.
    let host_usable = host.is_some_and(|h| !h.ip().is_loopback() && !h.ip().is_unspecified());
    let behind_nat = match (host, public) {
        (Some(h), Some(p)) => Some(h != p),
        _ => None,
    };
    if as_json {
        let list: Vec<serde_json::Value> = servers
            .iter()
            .zip(answers)
            .map(|(server, answer)| match answer {
                Answer::Mapped(m) => {
                    json!({ "server": server.to_string(), "mapped": m.to_string() })
                }
                Answer::Failed(code) => json!({ "server": server.to_string(), "error_code": code }),
                Answer::TimedOut => json!({ "server": server.to_string(), "timed_out": true }),
            })
            .collect();
        println!(
            "{}",
            json!({
                "servers": list,
                "public": public.map(|a| a.to_string()),
                "mapping_varies_by_destination": varies,
                "host": host.map(|a| a.to_string()),
                "host_usable": host_usable,
                "behind_nat": behind_nat,
            })
        );
    } else {
        println!("tscf netcheck");
        for (server, answer) in servers.iter().zip(answers) {
            match answer {
                Answer::Mapped(m) => println!("  {server}: sees us as {m}"),
                Answer::Failed(Some(code)) => println!("  {server}: error {code}"),
                Answer::Failed(None) => println!("  {server}: error response"),
                Answer::TimedOut => println!("  {server}: no answer"),
            }
        }
        match public {
            Some(p) => println!("  public address: {p}"),
            None => println!("  public address: unknown (no server answered)"),
        }
        let verdict = match varies {
            Some(true) => "yes (symmetric NAT: direct peer tunnels need a relay)",
            Some(false) => "no",
            None => "unknown (needs two servers with different IP addresses)",
        };
        println!("  mapping varies by destination: {verdict}");
        match host {
            Some(h) => println!(
                "  host address: {h} ({})",
                if host_usable {
                    "usable by peers on the same network"
                } else {
                    "not usable by other hosts"
                }
            ),
            None => println!("  host address: none"),
        }
        match behind_nat {
            Some(true) => println!("  behind a NAT: yes"),
            Some(false) => println!("  behind a NAT: no"),
            None => {}
        }
    }
    if public.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::FAILURE)
    }
}
