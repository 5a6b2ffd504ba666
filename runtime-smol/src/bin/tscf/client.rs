//! `tscf client`: opens a tunnel, prints what the server assigned, forwards local UDP ports
//! into the tunnel and reports path changes until `--for` elapses or a signal comes.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, ValueEnum};
use futures_lite::future;
use serde_json::json;
use smol::Async;
use tscf_runtime_smol::core::client::{PeerConfig, PeerTunnelState, ServerEndpoint};
use tscf_runtime_smol::core::wire::Transport;
use tscf_runtime_smol::{
    ClientTlsConfig, ConnectError, Fingerprint, InnerUdpSocket, Notification, ServerVerification,
    Tunnel, TunnelConfig,
};

use crate::capture::{self, CaptureArgs, Capturing};
use crate::config::{parse_forward, ClientFile, TransportArg};
use crate::metrics::{self, peer_state_label, transport_label, ClientSnapshot, PeerOutcomes};
use crate::{admin, exit, http, ping};

/// The options of `tscf client`.
#[derive(Debug, Args)]
pub(crate) struct ClientArgs {
    #[command(flatten)]
    tunnel: TunnelArgs,
    /// Forward a local UDP socket into the tunnel: LOCAL=INTERNAL, e.g.
    /// `127.0.0.1:5004=10.77.0.3:5004`. Datagrams to LOCAL go from the inner socket on
    /// INTERNAL's port to INTERNAL; the answers go back to the last local sender. Repeatable.
    #[arg(long, value_name = "LOCAL=INTERNAL", value_parser = parse_forward)]
    forward: Vec<(SocketAddr, SocketAddr)>,
    /// Opt the forwarded sockets (and the echo port) in to peer tunneling.
    #[arg(long)]
    peer: bool,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
    /// Stop after this many seconds (default: run until killed).
    #[arg(long = "for", value_name = "SECONDS")]
    run_for: Option<u64>,
    /// Serve Prometheus metrics on http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// An admin endpoint for `tscf ping --admin ADDR` (loopback only).
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    #[command(flatten)]
    capture: CaptureArgs,
}

/// How to reach the server: what `tscf client` and `tscf ping` share.
#[derive(Clone, Debug, Args)]
pub(crate) struct TunnelArgs {
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
    /// The admission token, if the server wants one. Other local users can read a command
    /// line: prefer the TSCF_TOKEN environment variable or the `token` key of --config.
    #[arg(long, env = "TSCF_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The peer transport offered to other clients: DTLS or QUIC with a self-signed
    /// certificate pinned through the server (`docs/PROTOCOL.md` §7.5.1), or, when asked for,
    /// plain UDP, whose data anyone who knows the path can forge. A peer tunnel runs over DTLS
    /// or QUIC only when both clients offer the same one; with `dtls` or `quic` a peer tunnel
    /// that would not be secured is refused and its flows stay on the relay.
    #[arg(long, value_enum, default_value_t = PeerTransportArg::Dtls)]
    peer_transport: PeerTransportArg,
    /// Refuse peer tunnels that would not be secured: the default with `--peer-transport
    /// dtls` or `quic`, and not possible with `udp`.
    #[arg(long)]
    peer_require_secure: bool,
    /// A STUN server for NAT discovery of the peer socket (at most 8). Repeatable; without
    /// one, the server's own STUN responder (its UDP listener) is asked.
    #[arg(long, value_name = "ADDR")]
    stun: Vec<SocketAddr>,
    /// How long to wait for the first tunnel before giving up (exit 1).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    connect_timeout: u64,
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
pub(crate) fn run(mut args: ClientArgs) -> ExitCode {
    match args.tunnel.with_file() {
        Ok((forward, peer)) => {
            args.forward.splice(0..0, forward);
            args.peer |= peer;
        }
        Err(e) => {
            eprintln!("tscf: configuration error: {e}");
            return ExitCode::from(exit::USAGE);
        }
    }
    let config = args
        .tunnel
        .tunnel_config()
        .and_then(|c| args.admin.map(admin::check).transpose().map(|_| c));
    let mut config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tscf: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let capturing = match Capturing::start(&args.capture, Box::new(capture::client_local)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tscf: cannot write the packet capture: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    config.capture = capturing.as_ref().map(Capturing::capture);
    let code = run_tunnel(&args, config);
    if let Some(c) = capturing {
        c.finish();
    }
    code
}

/// Runs the tunnel until a signal, `--for` or its end.
fn run_tunnel(args: &ClientArgs, config: TunnelConfig) -> ExitCode {
    if args.tunnel.insecure {
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
        let out = Arc::new(Printer {
            json: args.json,
            paths: Mutex::default(),
            drops: Mutex::default(),
            outcomes: Mutex::default(),
        });
        out.connected(&tunnel);
        let metrics = match args.metrics.map(http::bind).transpose() {
            Ok(m) => m,
            Err(e) => {
                eprintln!("tscf: cannot listen for metrics scrapers: {e}");
                return ExitCode::from(exit::FAILURE);
            }
        };
        if let Some(a) = metrics.as_ref().and_then(|l| l.get_ref().local_addr().ok()) {
            out.line("metrics", json!({ "url": format!("http://{a}/metrics") }));
        }
        let admin = match args.admin.map(admin::bind).transpose() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("tscf: cannot listen for admin clients: {e}");
                return ExitCode::from(exit::FAILURE);
            }
        };
        if let Some(a) = admin.as_ref().and_then(|l| l.get_ref().local_addr().ok()) {
            out.line("admin", json!({ "addr": a.to_string() }));
        }
        let mut forwards = Vec::new();
        for &(local, internal) in &args.forward {
            match forward(&tunnel, local, internal, args.peer) {
                Ok(f) => {
                    // The bound address, with the port the system chose for port 0.
                    let local = f.0.get_ref().local_addr().unwrap_or(local);
                    out.forward(local, internal, args.peer);
                    forwards.push(f);
                }
                Err(e) => {
                    eprintln!("tscf: cannot forward {local}: {e}");
                    return ExitCode::from(exit::FAILURE);
                }
            }
        }
        // The echo port `tscf ping` asks (a tscf convention, see ping.rs).
        let echo = match tunnel.bind(ping::ECHO_PORT) {
            Ok(socket) => {
                socket.set_peer_tunneling(args.peer);
                Some(smol::spawn(ping::echo(socket)))
            }
            Err(e) => {
                tracing::warn!(port = ping::ECHO_PORT, error = %e, "no echo port for tscf ping");
                None
            }
        };
        let forwarding = async {
            let tasks: Vec<_> = forwards
                .into_iter()
                .map(|(sock, inner, internal)| {
                    let out = out.clone();
                    smol::spawn(async move { relay(sock, inner, internal, &out).await })
                })
                .collect();
            future::pending::<()>().await;
            drop(tasks);
        };
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
        let answer_metrics = async {
            match &metrics {
                Some(listener) => {
                    http::serve(listener, || {
                        metrics::client(snapshot(&tunnel, &out.outcomes))
                    })
                    .await
                }
                None => future::pending::<()>().await,
            }
        };
        let answer_admin = async {
            match &admin {
                Some(listener) => ping::serve_admin(listener, &tunnel).await,
                None => future::pending::<()>().await,
            }
        };
        let endpoints = async {
            future::or(answer_metrics, answer_admin).await;
            ExitCode::SUCCESS
        };
        let code = future::or(
            future::or(stop, endpoints),
            future::or(notes, async {
                forwarding.await;
                ExitCode::SUCCESS
            }),
        )
        .await;
        drop(echo);
        tunnel.close().await;
        let drops = std::mem::take(&mut *out.drops.lock().unwrap_or_else(|e| e.into_inner()));
        if !drops.is_empty() {
            out.line("forward_drops", json!(drops));
        }
        out.line("stopped", json!({}));
        code
    })
}

/// The forwards and the peer flag of a `--config` file.
type FileForwards = (Vec<(SocketAddr, SocketAddr)>, bool);

impl TunnelArgs {
    /// Merges the `--config` file into the command line's options; what the file says of
    /// forwards, for `tscf client`.
    fn with_file(&mut self) -> Result<FileForwards, String> {
        let Some(path) = &self.config else {
            return Ok((Vec::new(), false));
        };
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file = ClientFile::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        self.server = self.server.or(file.server);
        self.transport = self.transport.or(file.transport);
        // --insecure on the command line wins over a pinned fingerprint in the file.
        if !self.insecure {
            self.fingerprint = self.fingerprint.take().or(file.fingerprint);
        }
        self.token = self.token.take().or(file.token);
        self.stun.splice(0..0, file.stun);
        let forward = file.forward.into_iter().map(|f| f.0).collect();
        Ok((forward, file.peer.unwrap_or(false)))
    }

    /// The tunnel's configuration, with the `--config` file merged in.
    pub(crate) fn config(&self) -> Result<TunnelConfig, String> {
        let mut args = self.clone();
        args.with_file()
            .map_err(|e| format!("configuration error: {e}"))?;
        if args.insecure {
            eprintln!(
                "tscf: warning: --insecure accepts any TLS certificate; anyone on the path can \
                 read and change the traffic"
            );
        }
        args.tunnel_config()
    }

    fn tunnel_config(&self) -> Result<TunnelConfig, String> {
        let args = self;
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
            return Err(
                "--fingerprint and --insecure are for --transport tls, dtls or quic".into(),
            );
        }
        if args.peer_require_secure && args.peer_transport == PeerTransportArg::Udp {
            return Err("--peer-require-secure needs --peer-transport dtls or quic".into());
        }
        if let Some(peer) = &mut config.client.peer {
            peer.transport = args.peer_transport.transport();
            // Plain peer tunnels only when asked for by name.
            peer.require_secure = args.peer_transport != PeerTransportArg::Udp;
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
}

type Forward = (Async<UdpSocket>, InnerUdpSocket, SocketAddr);

fn forward(
    tunnel: &Tunnel,
    local: SocketAddr,
    internal: SocketAddr,
    peer: bool,
) -> std::io::Result<Forward> {
    let sock = Async::<UdpSocket>::bind(local)?;
    let inner = tunnel.bind(internal.port())?;
    inner.set_peer_tunneling(peer);
    Ok((sock, inner, internal))
}

/// Copies datagrams between the local socket and the inner socket until either fails.
///
/// Only datagrams from `internal` come back out, and they go to the last local sender; local
/// senders must share the address of the first one (an application may restart on another
/// port, another host may not take over the replies). Every datagram dropped is counted by
/// reason, and the first of each reason is reported.
async fn relay(sock: Async<UdpSocket>, inner: InnerUdpSocket, internal: SocketAddr, out: &Printer) {
    let last_sender: Mutex<Option<SocketAddr>> = Mutex::new(None);
    let local = sock.get_ref().local_addr().ok();
    let drop = |reason: &str, error: Option<String>| {
        out.dropped(local, internal, reason, error);
    };
    let outbound = async {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            {
                let mut last = last_sender.lock().unwrap_or_else(|e| e.into_inner());
                if last.is_some_and(|l| l.ip() != from.ip()) {
                    drop("foreign_local_sender", Some(from.to_string()));
                    continue;
                }
                *last = Some(from);
            }
            if let Err(e) = inner.send_to(&buf[..n], internal).await {
                drop("send_failed", Some(format!("{n} octets: {e}")));
            }
        }
    };
    let inbound = async {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = inner.recv_from(&mut buf).await {
            if from != internal {
                drop("foreign_inner_source", Some(from.to_string()));
                continue;
            }
            let to = *last_sender.lock().unwrap_or_else(|e| e.into_inner());
            match to {
                Some(to) => {
                    if let Err(e) = sock.send_to(&buf[..n], to).await {
                        drop("local_send_failed", Some(e.to_string()));
                    }
                }
                None => drop("no_local_sender_yet", None),
            }
        }
    };
    future::or(outbound, inbound).await;
}

/// Prints text or JSON lines.
struct Printer {
    json: bool,
    /// Datagrams the forwarders dropped, by reason.
    drops: Mutex<BTreeMap<String, u64>>,
    /// The path of each peer tunnel that is up, to say which one went down.
    paths: Mutex<HashMap<IpAddr, SocketAddr>>,
    /// How negotiations ended and why tunnels went down, for the metrics.
    outcomes: Mutex<PeerOutcomes>,
}

impl Printer {
    /// Counts a datagram a forwarder dropped; the first of each reason is reported at once.
    fn dropped(
        &self,
        local: Option<SocketAddr>,
        internal: SocketAddr,
        reason: &str,
        detail: Option<String>,
    ) {
        let first = {
            let mut drops = self.drops.lock().unwrap_or_else(|e| e.into_inner());
            let count = drops.entry(reason.to_owned()).or_default();
            *count += 1;
            *count == 1
        };
        if !first {
            return;
        }
        let local = local.map(|a| a.to_string());
        tracing::warn!(?local, %internal, reason, ?detail, "forwarded datagram dropped (first of its kind)");
        self.line(
            "forward_dropped",
            json!({
                "local": local,
                "internal": internal.to_string(),
                "reason": reason,
                "detail": detail,
            }),
        );
    }

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

    fn forward(&self, local: SocketAddr, internal: SocketAddr, peer: bool) {
        if self.json {
            self.line(
                "forward",
                json!({
                    "local": local.to_string(),
                    "internal": internal.to_string(),
                    "peer_tunneling": peer,
                }),
            );
        } else {
            let how = if peer {
                "peer tunneling on"
            } else {
                "relay only"
            };
            println!("  forward {local} <-> {internal} ({how})");
        }
    }

    fn notification(&self, note: &Notification, tunnel: &Tunnel) {
        if let Notification::PeerTunnelUp { peer, .. } | Notification::PeerTunnelDown { peer, .. } =
            note
        {
            let was_up = self
                .paths
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(peer);
            self.outcomes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .note(note, was_up);
        }
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

/// What one scrape of the client's metrics shows.
fn snapshot(tunnel: &Tunnel, outcomes: &Mutex<PeerOutcomes>) -> ClientSnapshot {
    let mut peer_tunnels = std::collections::BTreeMap::new();
    let mut peers = std::collections::BTreeMap::new();
    for p in tunnel.peer_tunnels() {
        *peers.entry(peer_state_label(p.state)).or_default() += 1;
        if p.state == PeerTunnelState::Up {
            let over = match (p.session, p.stream) {
                (Some(transport), _) => transport_label(transport),
                (None, Some(_)) => "stream",
                (None, None) => "udp",
            };
            *peer_tunnels.entry(over).or_default() += 1;
        }
    }
    ClientSnapshot {
        state: tunnel.state(),
        stats: tunnel.stats(),
        peer_tunnels,
        peers,
        outcomes: outcomes.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    }
}
