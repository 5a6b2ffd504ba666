//! The processes one measurement runs: the server, a sink (the receiver, which echoes pings
//! and hands back credits) and a source (the sender, which measures).

use std::io::{BufRead, Write};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use async_io::Async;
use futures_lite::future;
use serde_json::json;
use tscf_runtime_smol::core::client::{PeerPath, ServerEndpoint};
use tscf_runtime_smol::core::wire::Transport;
use tscf_runtime_smol::{
    ClientTlsConfig, Fingerprint, InnerUdpSocket, Notification, RecvMeta, Server, ServerConfig,
    ServerIdentity, ServerTlsConfig, Tunnel, TunnelConfig,
};

/// Datagrams in flight at most.
pub(crate) const WINDOW: u32 = 64;
/// With no credit back for this long, the datagrams in flight are counted lost.
const STALL: Duration = Duration::from_millis(100);
/// The inner port the sink receives on.
const PORT: u16 = 9000;
/// Credits for datagrams that arrived together go back in one message, at most this many.
const CREDIT_BATCH: u32 = 16;
/// Echoed pings per run, and how long one waits for its echo.
pub(crate) const PINGS: usize = 500;
const PING_WAIT: Duration = Duration::from_millis(500);
/// Tunnels connecting at once in the connect-rate run.
const CONNECTING: usize = 8;

/// Where a measured datagram goes: straight over a socket pair, or through tunnels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    /// A plain UDP socket pair: the baseline.
    Raw,
    /// A peer tunnel over this peer transport (UDP, DTLS, QUIC), both clients on UDP to the
    /// server.
    Peer(Transport),
    /// The server's relay, both clients on this server transport.
    Relay(Transport),
}

impl Path {
    pub(crate) fn name(self) -> String {
        match self {
            Self::Raw => "raw UDP".into(),
            Self::Peer(t) => format!("peer {}", t.to_string().to_lowercase()),
            Self::Relay(t) => format!("relay {}", t.to_string().to_lowercase()),
        }
    }

    pub(crate) fn arg(self) -> String {
        match self {
            Self::Raw => "raw".into(),
            Self::Peer(t) => format!("peer-{}", t.to_string().to_lowercase()),
            Self::Relay(t) => format!("relay-{}", t.to_string().to_lowercase()),
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        if s == "raw" {
            return Some(Self::Raw);
        }
        let (kind, t) = s.split_once('-')?;
        let t = transport(t)?;
        match kind {
            "peer" => Some(Self::Peer(t)),
            "relay" => Some(Self::Relay(t)),
            _ => None,
        }
    }
}

pub(crate) fn transport(s: &str) -> Option<Transport> {
    Some(match s {
        "udp" => Transport::UDP,
        "tcp" => Transport::TCP,
        "tls" => Transport::TLS,
        "dtls" => Transport::DTLS,
        "quic" => Transport::QUIC,
        _ => return None,
    })
}

/// Pins this process (its threads so far and every thread it starts later) to `cpu`.
pub(crate) fn pin(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        eprintln!("bench: cannot pin to CPU {cpu}: {e}");
    }
}

/// Runs `work` as a task of smol's executor, as an application on it would, until it ends:
/// the tunnel's socket tasks and the application then share a thread, and hand datagrams to
/// each other without waking another one.
fn on_executor<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    smol::block_on(smol::spawn(work))
}

/// The server's addresses, as the server role prints them.
#[derive(Clone, Debug)]
pub(crate) struct ServerInfo {
    pub(crate) addrs: serde_json::Value,
    pub(crate) fingerprint: String,
}

impl ServerInfo {
    pub(crate) fn args(&self) -> [String; 2] {
        [self.addrs.to_string(), self.fingerprint.clone()]
    }

    pub(crate) fn from_args(addrs: &str, fingerprint: &str) -> Self {
        Self {
            addrs: serde_json::from_str(addrs).expect("server addresses"),
            fingerprint: fingerprint.to_owned(),
        }
    }

    fn addr(&self, t: Transport) -> SocketAddr {
        let key = t.to_string().to_lowercase();
        self.addrs[key.as_str()]
            .as_str()
            .and_then(|a| a.parse().ok())
            .expect("the server listens on every transport")
    }

    /// A tunnel to the server over `t`, pinning its certificate, offering `peer` peer tunnels
    /// (none: no peer tunneling).
    fn tunnel_config(&self, t: Transport, peer: Option<Transport>) -> TunnelConfig {
        let mut config = TunnelConfig::new(vec![ServerEndpoint {
            addr: self.addr(t),
            transport: t,
        }]);
        config.tls = Some(ClientTlsConfig::pinned(
            Fingerprint::from_hex(&self.fingerprint).expect("fingerprint"),
        ));
        config.connect_timeout = Duration::from_secs(10);
        match (peer, config.client.peer.as_mut()) {
            (Some(transport), Some(p)) => {
                p.transport = transport;
                // The plain peer tunnel is measured by asking for it by name.
                p.require_secure = transport != Transport::UDP;
            }
            _ => config.client.peer = None,
        }
        config
    }
}

/// The server role: every transport on loopback; prints its addresses and fingerprint as one
/// JSON line, then serves until standard input closes.
pub(crate) fn server() {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let mut config = ServerConfig {
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
    };
    config.max_stream_connections = 4096;
    let server = smol::block_on(Server::start(config)).expect("server starts");
    let a = server.local_addrs();
    let line = json!({
        "addrs": {
            "udp": a.udp[0].to_string(), "tcp": a.tcp[0].to_string(),
            "tls": a.tls[0].to_string(), "dtls": a.dtls[0].to_string(),
            "quic": a.quic[0].to_string(),
        },
        "fingerprint": server.tls_fingerprint().expect("a certificate").to_string(),
    });
    println!("{line}");
    std::io::stdout().flush().expect("stdout");
    let _ = std::io::stdin().lock().read_line(&mut String::new());
    smol::block_on(server.shutdown());
}

/// What the sink receives on.
enum SinkSocket {
    Raw(Async<UdpSocket>),
    Inner(InnerUdpSocket),
}

/// Where the sink reads datagrams into: a buffer each, and each one's length and sender.
struct Received {
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
}

impl SinkSocket {
    /// Reads what waits, at least one datagram, into `into`; how many. The raw socket reads
    /// one a system call (the baseline's per-datagram `recvfrom`); an inner socket takes as
    /// many as wait (`recv_many`), as the source hands them over (`send_many`).
    async fn recv(&self, into: &mut Received) -> std::io::Result<usize> {
        match self {
            Self::Raw(s) => {
                let (len, from) = s.recv_from(&mut into.bufs[0]).await?;
                into.meta[0] = RecvMeta { len, from };
                Ok(1)
            }
            Self::Inner(s) => s.recv_many(&mut into.bufs, &mut into.meta).await,
        }
    }

    async fn send(&self, buf: &[u8], to: SocketAddr) -> std::io::Result<usize> {
        match self {
            Self::Raw(s) => s.send_to(buf, to).await,
            Self::Inner(s) => s.send_to(buf, to).await,
        }
    }
}

/// The sink role: receives on a raw socket or an inner socket of a tunnel over `path`, prints
/// `ready ADDR`, then echoes pings and credits bulk datagrams until it is killed.
pub(crate) fn sink(path: Path, server: Option<ServerInfo>) {
    on_executor(async move {
        let (socket, addr, tunnel) = match path {
            Path::Raw => {
                let s = Async::<UdpSocket>::bind(([127, 0, 0, 1], 0)).expect("bind");
                let addr = s.get_ref().local_addr().expect("address");
                (SinkSocket::Raw(s), addr, None)
            }
            Path::Peer(_) | Path::Relay(_) => {
                let server = server.expect("a server");
                let tunnel = connect(&server, path).await;
                let s = tunnel.bind(PORT).expect("bind");
                s.set_peer_tunneling(matches!(path, Path::Peer(_)));
                let ip = tunnel.internal_ipv4().expect("an internal address");
                (
                    SinkSocket::Inner(s),
                    SocketAddr::new(ip.into(), PORT),
                    Some(tunnel),
                )
            }
        };
        println!("ready {addr}");
        std::io::stdout().flush().expect("stdout");
        let credits = UdpSocket::bind(("127.0.0.1", 0)).expect("bind");
        let serve = async {
            let mut received = Received {
                bufs: vec![vec![0u8; 2048]; WINDOW as usize],
                meta: vec![RecvMeta::default(); WINDOW as usize],
            };
            let mut owed = 0u32;
            let mut credit_to = None;
            loop {
                // Credits for what arrived together go back together: before waiting, and every
                // CREDIT_BATCH datagrams.
                let got = match future::poll_once(socket.recv(&mut received)).await {
                    Some(got) => got,
                    None => {
                        flush(&credits, credit_to, &mut owed);
                        socket.recv(&mut received).await
                    }
                };
                let Ok(n) = got else { continue };
                for (buf, meta) in received.bufs.iter().zip(&received.meta).take(n) {
                    let buf = &buf[..meta.len];
                    match buf.first() {
                        Some(b'P') => {
                            let _ = socket.send(buf, meta.from).await;
                        }
                        Some(b'B') if buf.len() >= 7 => {
                            credit_to = Some(u16::from_be_bytes([buf[5], buf[6]]));
                            owed += 1;
                            if owed >= CREDIT_BATCH {
                                flush(&credits, credit_to, &mut owed);
                            }
                        }
                        _ => {}
                    }
                }
            }
        };
        // Until standard input closes; then the tunnel is released, so that the server does
        // not hold it (and its address, which a later tunnel's socket may be given).
        let closed = smol::unblock(|| {
            let _ = std::io::stdin().lock().read_line(&mut String::new());
        });
        future::or(serve, closed).await;
        if let Some(tunnel) = tunnel {
            tunnel.close().await;
        }
    });
}

fn flush(credits: &UdpSocket, port: Option<u16>, owed: &mut u32) {
    if let (Some(port), 1..) = (port, *owed) {
        let _ = credits.send_to(&owed.to_be_bytes(), ("127.0.0.1", port));
        *owed = 0;
    }
}

async fn connect(server: &ServerInfo, path: Path) -> Tunnel {
    let config = match path {
        Path::Peer(t) => server.tunnel_config(Transport::UDP, Some(t)),
        Path::Relay(t) => server.tunnel_config(t, None),
        Path::Raw => unreachable!("a raw path has no tunnel"),
    };
    Tunnel::connect(config).await.expect("tunnel")
}

/// What the source sends from.
enum SourceSocket {
    Raw(UdpSocket),
    Inner(InnerUdpSocket),
}

impl SourceSocket {
    /// Sends every datagram in `batch` to `to`: one system call each on a raw socket (the
    /// baseline), all at once into a tunnel; how many went.
    async fn send(&self, batch: &[Vec<u8>], to: SocketAddr) -> usize {
        match self {
            Self::Raw(s) => batch.iter().filter(|d| s.send_to(d, to).is_ok()).count(),
            Self::Inner(s) => s.send_many(batch, to).await.unwrap_or(0),
        }
    }

    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Raw(s) => s.recv(buf),
            Self::Inner(s) => s.recv_from(buf).await.map(|(n, _)| n),
        }
    }
}

/// The source role: sends to the sink at `to` over `path`, and prints what it measured as
/// one JSON line: the peer tunnel's setup time, the pings' round trips, and for each size
/// how many of `count` datagrams arrived and how fast.
pub(crate) fn source(
    path: Path,
    server: Option<ServerInfo>,
    to: SocketAddr,
    sizes: Vec<usize>,
    count: u32,
) {
    on_executor(async move {
        let mut setup_ms = None;
        let (socket, _tunnel) = match path {
            Path::Raw => {
                let s = UdpSocket::bind(("127.0.0.1", 0)).expect("bind");
                s.set_read_timeout(Some(PING_WAIT)).expect("timeout");
                (SourceSocket::Raw(s), None)
            }
            Path::Peer(_) | Path::Relay(_) => {
                let server = server.expect("a server");
                let tunnel = connect(&server, path).await;
                let s = tunnel.bind(0).expect("bind");
                s.set_read_timeout(Some(PING_WAIT)).expect("timeout");
                if let Path::Peer(transport) = path {
                    s.set_peer_tunneling(true);
                    let setup = form_peer_tunnel(&tunnel, &s, to, transport).await;
                    setup_ms = Some(setup.as_secs_f64() * 1e3);
                } else {
                    s.set_peer_tunneling(false);
                }
                (SourceSocket::Inner(s), Some(tunnel))
            }
        };
        let rtt_us = pings(&socket, to).await;
        let mut rates = serde_json::Map::new();
        for &size in &sizes {
            let (sent, received, secs) = bulk(&socket, to, size, count).await;
            rates.insert(
                size.to_string(),
                json!({ "sent": sent, "received": received, "seconds": secs,
                        "packets_per_sec": received as f64 / secs.max(1e-9) }),
            );
        }
        let cpu_s = crate::cpu_seconds(std::process::id());
        let line = json!({ "setup_ms": setup_ms, "rtt_us": rtt_us, "bulk": rates, "cpu_s": cpu_s });
        println!("{line}");
    });
}

/// Sends opted-in datagrams to the sink until the peer tunnel is up (at most 5 s); its setup
/// time as the tunnel reports it.
async fn form_peer_tunnel(
    tunnel: &Tunnel,
    socket: &InnerUdpSocket,
    to: SocketAddr,
    transport: Transport,
) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let _ = socket.send_to(b"hello", to).await;
        let up = async {
            loop {
                match tunnel.notifications().recv().await {
                    Ok(Notification::PeerTunnelUp { setup, .. }) => return Some(setup),
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            }
        };
        let wait = async {
            smol::Timer::after(Duration::from_millis(20)).await;
            None
        };
        if let Some(setup) = future::or(up, wait).await {
            let path = tunnel.peer_path(to.ip());
            let on_it = match path {
                PeerPath::Peer(_) => transport == Transport::UDP,
                PeerPath::Session { transport: t, .. } => t == transport,
                _ => false,
            };
            assert!(
                on_it,
                "the flow runs on a {transport} peer tunnel: {path:?}"
            );
            return setup;
        }
    }
    panic!("the peer tunnel did not form within 5 s");
}

/// Round trips of [`PINGS`] 5-octet pings, in microseconds, sorted (lost ones left out).
async fn pings(socket: &SourceSocket, to: SocketAddr) -> Vec<f64> {
    let mut rtt = Vec::with_capacity(PINGS);
    let mut buf = vec![0u8; 2048];
    for seq in 0..PINGS as u32 {
        let mut ping = [b'P', 0, 0, 0, 0];
        ping[1..].copy_from_slice(&seq.to_be_bytes());
        let sent = Instant::now();
        socket.send(&[ping.to_vec()], to).await;
        while let Ok(n) = socket.recv(&mut buf).await {
            if buf[..n] == ping {
                rtt.push(sent.elapsed().as_secs_f64() * 1e6);
                break;
            }
        }
    }
    rtt.sort_by(f64::total_cmp);
    rtt
}

/// Sends `count` datagrams of `size` octets with at most [`WINDOW`] in flight; how many were
/// sent and credited, and the seconds from the first send to the last credit.
async fn bulk(socket: &SourceSocket, to: SocketAddr, size: usize, count: u32) -> (u64, u64, f64) {
    let credits = Async::<UdpSocket>::bind(([127, 0, 0, 1], 0)).expect("bind");
    let port = credits.get_ref().local_addr().expect("address").port();
    let mut batch = vec![vec![b'B'; size]; WINDOW as usize];
    let (mut sent, mut received, mut in_flight) = (0u64, 0u64, 0u32);
    let mut next = 0u32;
    let mut credit = [0u8; 4];
    let start = Instant::now();
    let mut last = start;
    while next < count || in_flight > 0 {
        // What the credits allow goes out at once.
        let n = (WINDOW - in_flight).min(count - next) as usize;
        for datagram in &mut batch[..n] {
            datagram[1..5].copy_from_slice(&next.to_be_bytes());
            datagram[5..7].copy_from_slice(&port.to_be_bytes());
            next += 1;
        }
        let went = socket.send(&batch[..n], to).await as u32;
        sent += u64::from(went);
        in_flight += went;
        // Then wait for at least one credit, or count what is in flight lost.
        let got = future::or(async { credits.recv(&mut credit).await.ok() }, async {
            smol::Timer::after(STALL).await;
            None
        })
        .await;
        match got {
            Some(4) => {
                let n = u32::from_be_bytes(credit);
                in_flight = in_flight.saturating_sub(n);
                received += u64::from(n);
                last = Instant::now();
                while let Ok(4) = credits.get_ref().recv(&mut credit) {
                    let n = u32::from_be_bytes(credit);
                    in_flight = in_flight.saturating_sub(n);
                    received += u64::from(n);
                    last = Instant::now();
                }
            }
            _ => in_flight = 0,
        }
    }
    (sent, received, last.duration_since(start).as_secs_f64())
}

/// The connect-rate role: tunnels over `t` connected, configured and closed, [`CONNECTING`]
/// at a time, for `secs`; prints how many per second.
pub(crate) fn connects(server: ServerInfo, t: Transport, secs: f64) {
    let config = server.tunnel_config(t, None);
    let done = smol::block_on(async {
        let until = Instant::now() + Duration::from_secs_f64(secs);
        let start = Instant::now();
        let workers: Vec<_> = (0..CONNECTING)
            .map(|_| {
                let config = config.clone();
                smol::spawn(async move {
                    let mut n = 0u64;
                    while Instant::now() < until {
                        let tunnel = Tunnel::connect(config.clone()).await.expect("tunnel");
                        tunnel.close().await;
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let mut n = 0;
        for w in workers {
            n += w.await;
        }
        n as f64 / start.elapsed().as_secs_f64()
    });
    println!("{}", json!({ "per_sec": done }));
}

/// The local address a sink printed in its `ready` line.
pub(crate) fn ready_addr(line: &str) -> Option<SocketAddr> {
    line.trim().strip_prefix("ready ")?.parse().ok()
}
