//! `tscf client`: opens a tunnel, prints what the server assigned, forwards local UDP and TCP
//! ports into the tunnel and inner ports to local addresses ([`crate::forward`]), joins a TUN
//! device to it ([`crate::tun`]), and reports path changes until `--for` elapses or a signal
//! comes.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, ValueEnum};
use futures_lite::future;
use serde_json::json;
use tscf_runtime_smol::core::client::{PeerConfig, PeerTunnelState, ServerEndpoint, TunnelInfo};
use tscf_runtime_smol::core::wire::{CandidateKind, ResultCode, Transport};
use tscf_runtime_smol::{
    ClientTlsConfig, ConnectError, Fingerprint, Notification, ServerVerification, Tunnel,
    TunnelConfig,
};

use crate::capture::{self, CaptureArgs, Capturing};
use crate::config::{ClientFile, TransportArg};
use crate::forward::{self, parse_forward, parse_listen, Drops, Forward, Listen};
use crate::metrics::{self, peer_state_label, transport_label, ClientSnapshot, PeerOutcomes};
use crate::{admin, exit, http, ping, tun};

/// The options of `tscf client`.
#[derive(Debug, Args)]
pub(crate) struct ClientArgs {
    #[command(flatten)]
    tunnel: TunnelArgs,
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
    /// Opt the forwarded and listening ports (and the echo port) in to peer tunneling; with
    /// --tun, every flow of the device.
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
    /// A TOML file with the keys `server` or `servers`, `transport`, `fingerprint`, `token`,
    /// `stun`, `forward`, `listen`, `peer` and `keepalive` (see below); options given on the
    /// command line win (`--server` over the file's servers), other lists are joined.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The server's address (default: the default server's listener for the transport).
    /// Repeatable: the servers of one cluster, tried in order when a tunnel is opened or
    /// re-attached after its server is lost.
    #[arg(long, value_name = "ADDR")]
    server: Vec<SocketAddr>,
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
    /// Seconds between keepalives to the server when nothing else was sent, proposed to the
    /// server, which keeps it within its bounds (tscf's: 5 to 600). Default: 20 on UDP and
    /// DTLS, short enough for NATs that forget an idle mapping after 30 s; the server's choice
    /// on TCP, TLS and QUIC. Behind a NAT with a shorter UDP timeout, go below it.
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    keepalive: Option<u64>,
    /// With several --server, transmissions of a keepalive or a re-attach over UDP or DTLS
    /// before the server counts as gone and the next one is tried (default 3, 1.75 s).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=16))]
    failover_transmissions: Option<u32>,
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
        Ok(file) => {
            args.forward.splice(0..0, file.forward);
            args.listen.splice(0..0, file.listen);
            args.peer |= file.peer;
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
    if let Some(peer) = &mut config.client.peer {
        // Every flow of the device is one no socket of this program opts in.
        peer.default_opt_in = args.peer && args.tun.is_some();
    }
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
            addresses: Mutex::default(),
            closed: Mutex::default(),
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
        // Forwarding tasks hold the tunnel weakly, so that it can be closed at the end.
        let tunnel = Arc::new(tunnel);
        let mut tasks = Vec::new();
        for &f in &args.forward {
            match forward::start_forward(&tunnel, f, args.peer, out.clone()) {
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
                    tasks.push(smol::spawn(tun::run(device, tap, info.mtu)));
                }
                Err(e) => {
                    eprintln!("tscf: {e}");
                    return ExitCode::from(exit::FAILURE);
                }
            }
        }
        for &l in &args.listen {
            match forward::start_listen(&tunnel, l, args.peer, out.clone()) {
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
        let code = future::or(future::or(stop, endpoints), notes).await;
        if let Some(echo) = echo {
            echo.cancel().await;
        }
        for task in tasks {
            task.cancel().await;
        }
        match Arc::try_unwrap(tunnel) {
            Ok(tunnel) => tunnel.close().await,
            // A connection being set up still holds it: dropping it releases it too.
            Err(tunnel) => drop(tunnel),
        }
        let drops = std::mem::take(&mut *out.drops.lock().unwrap_or_else(|e| e.into_inner()));
        if !drops.is_empty() {
            out.line("forward_drops", json!(drops));
        }
        out.line("stopped", json!({}));
        code
    })
}

/// What a `--config` file says of forwards, for `tscf client`.
struct FileForwards {
    forward: Vec<Forward>,
    listen: Vec<Listen>,
    peer: bool,
}

impl TunnelArgs {
    /// Merges the `--config` file into the command line's options; what the file says of
    /// forwards, for `tscf client`.
    fn with_file(&mut self) -> Result<FileForwards, String> {
        let Some(path) = &self.config else {
            return Ok(FileForwards {
                forward: Vec::new(),
                listen: Vec::new(),
                peer: false,
            });
        };
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file = ClientFile::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if self.server.is_empty() {
            self.server = file.server.into_iter().chain(file.servers).collect();
        }
        self.transport = self.transport.or(file.transport);
        // --insecure on the command line wins over a pinned fingerprint in the file.
        if !self.insecure {
            self.fingerprint = self.fingerprint.take().or(file.fingerprint);
        }
        self.token = self.token.take().or(file.token);
        self.keepalive = self.keepalive.or(file.keepalive);
        self.stun.splice(0..0, file.stun);
        Ok(FileForwards {
            forward: file.forward.into_iter().map(|f| f.0).collect(),
            listen: file.listen.into_iter().map(|l| l.0).collect(),
            peer: file.peer.unwrap_or(false),
        })
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
        let addrs = match &args.server[..] {
            [] => vec![default.parse().map_err(|_| "bad default address")?],
            listed => listed.to_vec(),
        };
        let servers = addrs
            .into_iter()
            .map(|addr| ServerEndpoint { addr, transport })
            .collect();
        let mut config = TunnelConfig::new(servers);
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
        config.client.keepalive_interval = args.keepalive.map(Duration::from_secs);
        if let Some(n) = args.failover_transmissions {
            config.client.failover_transmissions = n;
        }
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

fn how(peer: bool) -> &'static str {
    match peer {
        true => "peer tunneling on",
        false => "relay only",
    }
}

/// Prints text or JSON lines.
struct Printer {
    json: bool,
    /// What the forwarders dropped, by reason.
    drops: Mutex<BTreeMap<String, u64>>,
    /// The path of each peer tunnel that is up, to say which one went down.
    paths: Mutex<HashMap<IpAddr, SocketAddr>>,
    /// How negotiations ended and why tunnels went down, for the metrics.
    outcomes: Mutex<PeerOutcomes>,
    /// The internal addresses of the tunnel last reported, to say what a fresh one changed.
    addresses: Mutex<Addresses>,
    /// Why the server closed the last tunnel, to say it when the new one comes.
    closed: Mutex<Option<ResultCode>>,
}

/// A tunnel's internal addresses, as printed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Addresses {
    ipv4: Option<String>,
    ipv6: Option<String>,
}

impl Addresses {
    fn of(info: &TunnelInfo) -> Self {
        Self {
            ipv4: info.ipv4.map(|a| a.addr.to_string()),
            ipv6: info.ipv6.map(|a| a.addr.to_string()),
        }
    }

    fn words(&self) -> String {
        let all: Vec<&str> = self
            .ipv4
            .iter()
            .chain(&self.ipv6)
            .map(String::as_str)
            .collect();
        match all.is_empty() {
            true => "none".to_owned(),
            false => all.join(" and "),
        }
    }
}

impl Printer {
    fn connected(&self, tunnel: &Tunnel) {
        let id = tunnel.tunnel_id().unwrap_or(0);
        let v4 = tunnel.internal_ipv4();
        let v6 = tunnel.internal_ipv6();
        let seen = tunnel.observed_address();
        let max_packet = tunnel.info().map(|i| i.max_packet_len);
        let keepalive = tunnel.info().map(|i| i.keepalive_interval.as_secs_f64());
        if let Some(info) = tunnel.info() {
            *self.addresses.lock().unwrap_or_else(|e| e.into_inner()) = Addresses::of(&info);
        }
        if self.json {
            self.line(
                "connected",
                json!({
                    "tunnel_id": id,
                    "ipv4": v4.map(|a| a.to_string()),
                    "ipv6": v6.map(|a| a.to_string()),
                    "observed": seen.map(|a| a.to_string()),
                    "max_packet": max_packet,
                    "keepalive_s": keepalive,
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
        let internal = forward::inner_addr(tunnel, l.port).map(|a| a.to_string());
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
            Notification::PeerTunnelUp {
                peer,
                path,
                setup,
                initiator,
                local_kind,
                remote_kind,
            } => {
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
                let (local, remote) = (kind_label(*local_kind), kind_label(*remote_kind));
                if self.json {
                    self.line(
                        "peer_tunnel_up",
                        json!({
                            "peer": peer.to_string(),
                            "path": path.to_string(),
                            "transport": over.to_string(),
                            "setup_ms": setup.as_secs_f64() * 1e3,
                            "initiator": if *initiator { "local" } else { "peer" },
                            "local_candidate": local,
                            "remote_candidate": remote,
                        }),
                    );
                } else {
                    let who = match initiator {
                        true => "we asked",
                        false => "the peer asked",
                    };
                    let kinds = match (local, remote) {
                        (Some(l), Some(r)) => format!(", {l} to {r}"),
                        (None, Some(r)) => format!(", to the peer's {r}"),
                        _ => String::new(),
                    };
                    println!(
                        "peer tunnel up: {peer} via {path} over {over} (set up in {:.1} ms, \
                         {who}{kinds})",
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
            } => {
                // Without a public address, only our host candidates are offered: a peer
                // tunnel forms only with peers that reach them (the same network, or no NAT).
                let hint = public.is_none().then_some(
                    "no STUN server answered: peer tunnels are limited to this host's local \
                     addresses (peers on the same network or without a NAT in between); \
                     other peers stay on the relay",
                );
                let mut fields = json!({
                    "public": public.map(|a| a.to_string()),
                    "varies_by_destination": varies_by_destination,
                });
                if let (Some(hint), Some(map)) = (hint, fields.as_object_mut()) {
                    map.insert("hint".into(), hint.into());
                }
                self.line("nat_discovered", fields);
            }
            Notification::TransportLost => self.line("transport_lost", json!({})),
            Notification::Reattached(info) => {
                *self.addresses.lock().unwrap_or_else(|e| e.into_inner()) = Addresses::of(info);
                self.line("reattached", tunnel_fields(info));
            }
            Notification::TunnelClosed { reason } => {
                *self.closed.lock().unwrap_or_else(|e| e.into_inner()) = Some(*reason);
                self.line("tunnel_closed", json!({ "reason": format!("{reason:?}") }));
            }
            Notification::Connected(info) => {
                // A fresh tunnel after the first: the server lost the old one (or shut down),
                // and the internal addresses other clients used for us may have changed.
                let new = Addresses::of(info);
                let old = std::mem::replace(
                    &mut *self.addresses.lock().unwrap_or_else(|e| e.into_inner()),
                    new.clone(),
                );
                let why = match self.closed.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    Some(ResultCode::SHUTDOWN) => "the server shut the tunnel down",
                    Some(ResultCode::UNAUTHORIZED) => "the server refused to re-attach the tunnel",
                    _ => "the server no longer held the tunnel",
                };
                let message = match old == new {
                    true => format!(
                        "{why}: a new one, tunnel id {:016x}, with the same internal addresses \
                         {}",
                        info.tunnel_id,
                        new.words()
                    ),
                    false => format!(
                        "{why}: a new one, tunnel id {:016x}; the internal addresses changed \
                         from {} to {}, and other clients must use the new ones",
                        info.tunnel_id,
                        old.words(),
                        new.words()
                    ),
                };
                if self.json {
                    self.line(
                        "new_tunnel",
                        json!({
                            "message": message,
                            "old_ipv4": old.ipv4,
                            "old_ipv6": old.ipv6,
                            "ipv4": new.ipv4,
                            "ipv6": new.ipv6,
                        }),
                    );
                } else {
                    println!("{message}");
                }
                self.line("connected", tunnel_fields(info));
            }
            _ => {}
        }
    }

    /// One event: a JSON object with `event` and `ts`, or its name and fields as text.
    fn line(&self, event: &str, fields: serde_json::Value) {
        let mut fields = fields;
        if self.json {
            if let Some(map) = fields.as_object_mut() {
                map.insert("event".into(), event.into());
            }
            crate::stamp::stamp(&mut fields);
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

/// The fields of `connected` and `reattached` after the first: the tunnel and its addresses.
fn tunnel_fields(info: &TunnelInfo) -> serde_json::Value {
    let addresses = Addresses::of(info);
    json!({
        "tunnel_id": info.tunnel_id,
        "ipv4": addresses.ipv4,
        "ipv6": addresses.ipv6,
        "observed": info.observed_address.map(|a| a.to_string()),
        "max_packet": info.max_packet_len,
        "keepalive_s": info.keepalive_interval.as_secs_f64(),
    })
}

/// A candidate kind as the events name it.
fn kind_label(kind: Option<CandidateKind>) -> Option<&'static str> {
    Some(match kind? {
        CandidateKind::HOST => "host",
        CandidateKind::SERVER_REFLEXIVE => "server-reflexive",
        CandidateKind::PEER_REFLEXIVE => "peer-reflexive",
        _ => "unknown",
    })
}

/// Every drop is counted by reason, and the first of each reason is reported.
impl Drops for Printer {
    fn dropped(
        &self,
        local: SocketAddr,
        internal: Option<SocketAddr>,
        reason: &'static str,
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
        let internal = internal.map(|a| a.to_string());
        tracing::warn!(%local, ?internal, reason, ?detail, "forwarded data dropped (first of its kind)");
        self.line(
            "forward_dropped",
            json!({
                "local": local.to_string(),
                "internal": internal,
                "reason": reason,
                "detail": detail,
            }),
        );
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Line {
        #[command(flatten)]
        tunnel: TunnelArgs,
    }

    fn servers(args: &[&str]) -> Vec<SocketAddr> {
        let line = Line::try_parse_from(std::iter::once("tscf").chain(args.iter().copied()))
            .expect("a command line");
        let config = line.tunnel.config().expect("a configuration");
        config.client.servers.iter().map(|s| s.addr).collect()
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn servers_come_from_the_command_line_or_the_file_in_order() {
        assert_eq!(servers(&[]), vec![addr("127.0.0.1:4440")]);
        assert_eq!(
            servers(&["--server", "192.0.2.1:4440"]),
            vec![addr("192.0.2.1:4440")]
        );
        assert_eq!(
            servers(&["--server", "192.0.2.2:4440", "--server", "192.0.2.1:4440"]),
            vec![addr("192.0.2.2:4440"), addr("192.0.2.1:4440")]
        );

        let path = std::env::temp_dir().join(format!("tscf-client-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "servers = [\"192.0.2.3:4440\", \"192.0.2.4:4440\"]\n",
        )
        .expect("written");
        let file = path.to_str().expect("a UTF-8 path");
        let from_file = servers(&["--config", file]);
        let overridden = servers(&["--config", file, "--server", "192.0.2.9:4440"]);
        std::fs::remove_file(&path).expect("removed");
        assert_eq!(
            from_file,
            vec![addr("192.0.2.3:4440"), addr("192.0.2.4:4440")]
        );
        assert_eq!(overridden, vec![addr("192.0.2.9:4440")]);
    }
}
