//! `tscf client`: opens a tunnel, prints what the server assigned, forwards local UDP and TCP
//! ports into the tunnel and inner ports to local addresses ([`crate::forward`]), and reports
//! path changes until `--for` elapses or a signal comes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, ValueEnum};
use futures_lite::future;
use serde_json::json;
use tscf_runtime_smol::core::client::{PeerConfig, ServerEndpoint};
use tscf_runtime_smol::core::wire::Transport;
use tscf_runtime_smol::{
    ClientTlsConfig, ConnectError, Fingerprint, Notification, ServerVerification, Tunnel,
    TunnelConfig,
};

use crate::config::{ClientFile, TransportArg};
use crate::exit;
use crate::forward::{self, parse_forward, parse_listen, Forward, Listen};
use crate::tun;

/// The options of `tscf client`.
#[derive(Debug, Args)]
pub(crate) struct ClientArgs {
    /// A TOML file with the keys `server`, `transport`, `fingerprint`, `token`, `stun`,
    /// `forward` and `peer` (see below); options given on the command line win, lists are
    /// joined.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The server's address (default: the default server's listener for the transport).
    #[arg(long, value_name = "ADDR")]
    server: Option<SocketAddr>,
    /// The transport to the server (default udp).
    #[arg(long, value_enum)]
    transport: Option<TransportArg>,
    /// The SHA-256 fingerprint of the server's TLS certificate (64 hex digits), as
    /// `tscf server` prints it (for --transport tls, dtls or quic).
    #[arg(long, value_name = "HEX", conflicts_with = "insecure")]
    fingerprint: Option<String>,
    /// Accept any TLS certificate: anyone on the path can read and change the traffic.
    #[arg(long)]
    insecure: bool,
    /// The admission token, if the server wants one.
    #[arg(long)]
    token: Option<String>,
    /// Forward a local UDP or TCP port into the tunnel: [udp:|tcp:]LOCAL=INTERNAL, e.g.
    /// `127.0.0.1:5004=10.77.0.3:5004` (UDP) or `tcp:127.0.0.1:8080=10.77.0.3:80`. UDP
    /// datagrams to LOCAL go from the inner socket on INTERNAL's port to INTERNAL, and the
    /// answers back to the last local sender; each TCP connection to LOCAL gets an inner
    /// connection to INTERNAL. Repeatable.
    #[arg(long, value_name = "[udp:|tcp:]LOCAL=INTERNAL", value_parser = parse_forward)]
    forward: Vec<Forward>,
    /// Carry an inner port of this tunnel to a fixed local address, like `ssh -R`:
    /// [udp:|tcp:]PORT=LOCAL, e.g. `udp:5004=127.0.0.1:5004` for a receiver that never sends
    /// first. UDP datagrams to inner PORT go to LOCAL, and what LOCAL answers back to the last
    /// inner sender; each inner TCP connection to PORT gets a local connection to LOCAL.
    /// Repeatable.
    #[arg(long, value_name = "[udp:|tcp:]PORT=LOCAL", value_parser = parse_listen)]
    listen: Vec<Listen>,
    /// Opt the forwarded and listening ports in to peer tunneling; with --tun, every flow of
    /// the device.
    #[arg(long)]
    peer: bool,
    /// A TUN device joined to the tunnel (default name tscf0), for unmodified applications:
    /// it gets the tunnel's internal addresses and routes for the pools; every IP packet the
    /// kernel sends there goes into the tunnel, and inner packets for this client that no
    /// forward claims come out of it. Needs root (CAP_NET_ADMIN) and /dev/net/tun.
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = tun::DEFAULT_NAME)]
    tun: Option<String>,
    /// Opt these ports in to peer tunneling (comma-separated): packets from them and to them
    /// (on the other client) leave the relay, e.g. `5201` for iperf3 over --tun.
    #[arg(long, value_name = "PORTS", value_delimiter = ',')]
    peer_ports: Vec<u16>,
    /// The peer transport offered to other clients: plain signed UDP, or DTLS or QUIC with a
    /// self-signed certificate pinned through the server (`docs/PROTOCOL.md` §7.5.1). A peer
    /// tunnel runs over DTLS or QUIC only when both clients offer the same one.
    #[arg(long, value_enum, default_value_t = PeerTransportArg::Udp)]
    peer_transport: PeerTransportArg,
    /// Refuse peer tunnels that would not be secured (needs `--peer-transport dtls` or
    /// `quic`); their flows stay on the relay.
    #[arg(long)]
    peer_require_secure: bool,
    /// A STUN server for NAT discovery of the peer socket (at most 8). Repeatable; without
    /// one, the server's own STUN responder (its UDP listener) is asked.
    #[arg(long, value_name = "ADDR")]
    stun: Vec<SocketAddr>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
    /// How long to wait for the first tunnel before giving up (exit 1).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    connect_timeout: u64,
    /// Stop after this many seconds (default: run until killed).
    #[arg(long = "for", value_name = "SECONDS")]
    run_for: Option<u64>,
}

/// The peer transports `tscf client` can offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PeerTransportArg {
    Udp,
    Dtls,
    Quic,
}

impl PeerTransportArg {
    fn transport(self) -> Transport {
        match self {
            Self::Udp => Transport::UDP,
            Self::Dtls => Transport::DTLS,
            Self::Quic => Transport::QUIC,
        }
    }
}

/// Runs `tscf client`.
pub(crate) fn run(args: ClientArgs) -> ExitCode {
    let args = match with_file(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tscf: configuration error: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let config = match tunnel_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tscf: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    if args.insecure {
        eprintln!(
            "tscf: warning: --insecure accepts any TLS certificate; anyone on the path can \
             read and change the traffic"
        );
    }
    smol::block_on(async {
        let signals = match async_signal::Signals::new([
            async_signal::Signal::Int,
            async_signal::Signal::Term,
        ]) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("tscf: cannot handle signals: {e}");
                return ExitCode::from(exit::FAILURE);
            }
        };
        let tunnel = match Tunnel::connect(config).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("tscf: no tunnel: {e}");
                let code = match e {
                    ConnectError::Refused(_) => exit::REFUSED,
                    ConnectError::Config(_) | ConnectError::Tls(_) => exit::USAGE,
                    _ => exit::FAILURE,
                };
                return ExitCode::from(code);
            }
        };
        let out = Printer {
            json: args.json,
            paths: Mutex::default(),
        };
        out.connected(&tunnel);
        // Forwarding tasks hold the tunnel weakly, so that it can be closed at the end.
        let tunnel = Arc::new(tunnel);
        let mut tasks = Vec::new();
        for &f in &args.forward {
            match forward::start_forward(&tunnel, f, args.peer) {
                Ok((local, task)) => {
                    out.forward(f, local, args.peer);
                    tasks.push(task);
                }
                Err(e) => {
                    eprintln!("tscf: cannot forward {}: {e}", f.local);
                    return ExitCode::from(exit::FAILURE);
                }
            }
        }
        if let Some(name) = &args.tun {
            match tun::open(name, &tunnel) {
                Ok((device, tap, info)) => {
                    for &port in &args.peer_ports {
                        tap.set_peer_tunneling(port, true);
                    }
                    out.tun(&info, &tunnel, args.peer);
                    tasks.push(smol::spawn(tun::run(device, tap)));
                }
                Err(e) => {
                    eprintln!("tscf: {e}");
                    return ExitCode::from(exit::FAILURE);
                }
            }
        }
        for &l in &args.listen {
            match forward::start_listen(&tunnel, l, args.peer) {
                Ok(task) => {
                    out.listen(l, &tunnel, args.peer);
                    tasks.push(task);
                }
                Err(e) => {
                    eprintln!("tscf: cannot listen on inner port {}: {e}", l.port);
                    return ExitCode::from(exit::FAILURE);
                }
            }
        }
        // The first Connected notification is the one printed above.
        if let Ok(note) = tunnel.notifications().try_recv() {
            if !matches!(note, Notification::Connected(_)) {
                out.notification(&note, &tunnel);
            }
        }
        let notes = async {
            while let Ok(note) = tunnel.notifications().recv().await {
                if let Notification::Terminated { reason } = note {
                    out.line("terminated", json!({ "reason": format!("{reason:?}") }));
                    return ExitCode::from(exit::FAILURE);
                }
                out.notification(&note, &tunnel);
            }
            ExitCode::from(exit::FAILURE)
        };
        let stop = async {
            let elapsed = async {
                match args.run_for {
                    Some(secs) => {
                        smol::Timer::after(Duration::from_secs(secs)).await;
                    }
                    None => future::pending::<()>().await,
                }
            };
            future::or(elapsed, async {
                let mut signals = signals;
                let _ = futures_lite::StreamExt::next(&mut signals).await;
            })
            .await;
            ExitCode::SUCCESS
        };
        let code = future::or(stop, notes).await;
        for task in tasks {
            task.cancel().await;
        }
        match Arc::try_unwrap(tunnel) {
            Ok(tunnel) => tunnel.close().await,
            // A connection being set up still holds it: dropping it releases it too.
            Err(tunnel) => drop(tunnel),
        }
        out.line("stopped", json!({}));
        code
    })
}

/// Merges the `--config` file into the command line's options.
fn with_file(mut args: ClientArgs) -> Result<ClientArgs, String> {
    let Some(path) = &args.config else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file = ClientFile::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    args.server = args.server.or(file.server);
    args.transport = args.transport.or(file.transport);
    // --insecure on the command line wins over a pinned fingerprint in the file.
    if !args.insecure {
        args.fingerprint = args.fingerprint.take().or(file.fingerprint);
    }
    args.token = args.token.take().or(file.token);
    args.peer |= file.peer.unwrap_or(false);
    args.stun.splice(0..0, file.stun);
    args.forward
        .splice(0..0, file.forward.into_iter().map(|f| f.0));
    args.listen
        .splice(0..0, file.listen.into_iter().map(|l| l.0));
    Ok(args)
}

fn tunnel_config(args: &ClientArgs) -> Result<TunnelConfig, String> {
    let (transport, default) = match args.transport.unwrap_or(TransportArg::Udp) {
        TransportArg::Tcp => (Transport::TCP, "127.0.0.1:4440"),
        TransportArg::Tls => (Transport::TLS, "127.0.0.1:4443"),
        TransportArg::Udp => (Transport::UDP, "127.0.0.1:4440"),
        TransportArg::Dtls => (Transport::DTLS, "127.0.0.1:4445"),
        TransportArg::Quic => (Transport::QUIC, "127.0.0.1:4444"),
    };
    let addr = match args.server {
        Some(a) => a,
        None => default.parse().map_err(|_| "bad default address")?,
    };
    let mut config = TunnelConfig::new(vec![ServerEndpoint { addr, transport }]);
    if [Transport::TLS, Transport::DTLS, Transport::QUIC].contains(&transport) {
        let verification = match (&args.fingerprint, args.insecure) {
            (Some(hex), _) => ServerVerification::Pinned(
                Fingerprint::from_hex(hex).map_err(|e| format!("--fingerprint: {e}"))?,
            ),
            (None, true) => ServerVerification::Insecure,
            (None, false) => {
                return Err("TLS, DTLS and QUIC need --fingerprint HEX (as tscf server \
                     prints it) or --insecure"
                    .into())
            }
        };
        let mut tls = ClientTlsConfig::pinned(Fingerprint([0; 32]));
        tls.verification = verification;
        config.tls = Some(tls);
    } else if args.fingerprint.is_some() || args.insecure {
        return Err("--fingerprint and --insecure are for --transport tls, dtls or quic".into());
    }
    if let Some(peer) = &mut config.client.peer {
        peer.transport = args.peer_transport.transport();
        // Every flow of the device is one no socket of this program opts in.
        peer.default_opt_in = args.peer && args.tun.is_some();
        if args.peer_require_secure {
            if args.peer_transport == PeerTransportArg::Udp {
                return Err("--peer-require-secure needs --peer-transport dtls or quic".into());
            }
            peer.require_secure = true;
        }
    }
    config.connect_timeout = Duration::from_secs(args.connect_timeout);
    if let Some(token) = &args.token {
        config.client.auth_token = Some(token.clone().into_bytes());
    }
    if !args.stun.is_empty() {
        if args.stun.len() > PeerConfig::MAX_STUN_SERVERS {
            return Err(format!(
                "{} STUN servers, at most {} allowed",
                args.stun.len(),
                PeerConfig::MAX_STUN_SERVERS
            ));
        }
        if let Some(peer) = &mut config.client.peer {
            peer.stun_servers = args.stun.clone();
        }
    }
    Ok(config)
}

fn how(peer: bool) -> &'static str {
    match peer {
        true => "peer tunneling on",
        false => "relay only",
    }
}

/// Prints text or JSON lines.
struct Printer {
    json: bool,
    /// The path of each peer tunnel that is up, to say which one went down.
    paths: Mutex<HashMap<IpAddr, SocketAddr>>,
}

impl Printer {
    fn connected(&self, tunnel: &Tunnel) {
        let id = tunnel.tunnel_id().unwrap_or(0);
        let v4 = tunnel.internal_ipv4();
        let v6 = tunnel.internal_ipv6();
        let seen = tunnel.observed_address();
        let max_packet = tunnel.info().map(|i| i.max_packet_len);
        if self.json {
            self.line(
                "connected",
                json!({
                    "tunnel_id": id,
                    "ipv4": v4.map(|a| a.to_string()),
                    "ipv6": v6.map(|a| a.to_string()),
                    "observed": seen.map(|a| a.to_string()),
                    "max_packet": max_packet,
                }),
            );
            return;
        }
        println!("tscf client connected");
        println!("  tunnel id {id:016x}");
        if let Some(a) = v4 {
            println!("  internal {a}");
        }
        if let Some(a) = v6 {
            println!("  internal {a}");
        }
        if let Some(a) = seen {
            println!("  seen by the server as {a}");
        }
        if let Some(n) = max_packet {
            // IPv4 and UDP headers take 28 octets of the inner packet.
            println!(
                "  inner packets up to {n} octets (UDP payload up to {})",
                n.saturating_sub(28)
            );
        }
    }

    /// A forward, with the local address bound (the port the system chose for port 0).
    fn forward(&self, f: Forward, local: SocketAddr, peer: bool) {
        let protocol = f.protocol.name();
        if self.json {
            self.line(
                "forward",
                json!({
                    "protocol": protocol,
                    "local": local.to_string(),
                    "internal": f.internal.to_string(),
                    "peer_tunneling": peer,
                }),
            );
        } else {
            let internal = f.internal;
            println!(
                "  forward {protocol} {local} <-> {internal} ({})",
                how(peer)
            );
        }
    }

    fn tun(&self, info: &tun::TunInfo, tunnel: &Tunnel, peer: bool) {
        let v4 = tunnel.internal_ipv4().map(|a| a.to_string());
        let v6 = tunnel.internal_ipv6().map(|a| a.to_string());
        if self.json {
            self.line(
                "tun",
                json!({
                    "name": info.name,
                    "ipv4": v4,
                    "ipv6": v6,
                    "mtu": info.mtu,
                    "peer_tunneling": peer,
                }),
            );
        } else {
            let (name, mtu) = (&info.name, info.mtu);
            let addrs: Vec<String> = v4.into_iter().chain(v6).collect();
            println!("  tun {name} {} mtu {mtu} ({})", addrs.join(" "), how(peer));
        }
    }

    fn listen(&self, l: Listen, tunnel: &Tunnel, peer: bool) {
        let protocol = l.protocol.name();
        let internal = tunnel.internal_ipv4().map(IpAddr::V4);
        let internal = internal.or(tunnel.internal_ipv6().map(IpAddr::V6));
        let internal = internal.map(|ip| SocketAddr::new(ip, l.port).to_string());
        if self.json {
            self.line(
                "listen",
                json!({
                    "protocol": protocol,
                    "internal": internal,
                    "local": l.local.to_string(),
                    "peer_tunneling": peer,
                }),
            );
        } else {
            let (port, local) = (l.port, l.local);
            println!(
                "  listen {protocol} inner port {port} -> {local} ({})",
                how(peer)
            );
        }
    }

    fn notification(&self, note: &Notification, tunnel: &Tunnel) {
        match note {
            Notification::PeerTunnelUp { peer, path, setup } => {
                // What the tunnel runs over: plain UDP, or the session transport securing it.
                let over = tunnel
                    .peer_tunnels()
                    .iter()
                    .find(|p| p.peer == *peer)
                    .and_then(|p| p.session)
                    .unwrap_or(Transport::UDP);
                self.paths
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(*peer, *path);
                if self.json {
                    self.line(
                        "peer_tunnel_up",
                        json!({
                            "peer": peer.to_string(),
                            "path": path.to_string(),
                            "transport": over.to_string(),
                            "setup_ms": setup.as_secs_f64() * 1e3,
                        }),
                    );
                } else {
                    println!(
                        "peer tunnel up: {peer} via {path} over {over} (set up in {:.1} ms)",
                        setup.as_secs_f64() * 1e3
                    );
                }
            }
            Notification::PeerTunnelDown { peer, reason } => {
                // None when a setup failed: no tunnel was up.
                let path = self
                    .paths
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(peer);
                if self.json {
                    self.line(
                        "peer_tunnel_down",
                        json!({
                            "peer": peer.to_string(),
                            "path": path.map(|p| p.to_string()),
                            "reason": format!("{reason:?}"),
                        }),
                    );
                } else {
                    println!("peer tunnel down: {peer} ({reason:?}); back on the relay");
                }
            }
            Notification::NatDiscovered {
                public,
                varies_by_destination,
            } => self.line(
                "nat_discovered",
                json!({
                    "public": public.map(|a| a.to_string()),
                    "varies_by_destination": varies_by_destination,
                }),
            ),
            Notification::TransportLost => self.line("transport_lost", json!({})),
            Notification::Reattached(_) => self.line("reattached", json!({})),
            Notification::TunnelClosed { reason } => {
                self.line("tunnel_closed", json!({ "reason": format!("{reason:?}") }));
            }
            Notification::Connected(info) => self.line(
                "connected",
                json!({
                    "tunnel_id": info.tunnel_id,
                    "observed": info.observed_address.map(|a| a.to_string()),
                }),
            ),
            _ => {}
        }
    }

    /// One event: a JSON object with `event`, or its name and fields as text.
    fn line(&self, event: &str, fields: serde_json::Value) {
        let mut fields = fields;
        if self.json {
            if let Some(map) = fields.as_object_mut() {
                map.insert("event".into(), event.into());
            }
            println!("{fields}");
        } else {
            let rest: Vec<String> = fields
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let event = event.replace('_', " ");
            match rest.is_empty() {
                true => println!("{event}"),
                false => println!("{event} {}", rest.join(" ")),
            }
        }
    }
}
