//! `tscf ping`, the echo port every `tscf client` answers on, and the client's admin endpoint
//! that runs pings for `tscf ping --admin`.
//!
//! The echo port is a tscf convention, not part of the wire protocol: every `tscf client`
//! binds inner UDP port [`ECHO_PORT`] (7, the echo port of RFC 862) on its internal addresses
//! and sends each datagram that arrives there back to its source, unchanged. A ping is one
//! such datagram from an inner socket opted in to peer tunneling; its round trip is timed and
//! the path it took (the relay, or a peer tunnel with its address and transport) is the one
//! the pinging tunnel used for it (`Tunnel::peer_path` as it was sent). The answer takes the
//! other client's path: a peer tunnel too once its echo socket is opted in (`tscf client
//! --peer`), else the relay.
//!
//! The client's admin endpoint (`tscf client --admin ADDR`, loopback only) takes one line,
//! `ping ADDR COUNT UNTIL_DIRECT INTERVAL_MS TIMEOUT_MS`, and answers one JSON object per line:
//! each reply or timeout as it happens, then `{"event":"done",…}`; anything else gets
//! `{"error":…}`.

use std::cell::Cell;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use futures_lite::{future, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use serde_json::{json, Value};
use smol::{Async, LocalExecutor};
use tscf_runtime_smol::core::client::PeerPath;
use tscf_runtime_smol::core::wire::Transport;
use tscf_runtime_smol::{InnerUdpSocket, Tunnel};

use crate::client::TunnelArgs;
use crate::exit;
use crate::metrics::transport_label;

/// The inner UDP port every `tscf client` echoes on.
pub(crate) const ECHO_PORT: u16 = 7;
/// What a ping carries before its sequence number and nonce.
const MAGIC: &[u8; 9] = b"tscf-ping";
/// Pings in one run, at most.
const MAX_COUNT: u32 = 10_000;
/// Admin connections served at once, at most.
const MAX_ADMIN_CONNECTIONS: usize = 4;
/// Octets of an admin request line, at most.
const MAX_REQUEST: usize = 256;
/// How long an admin client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The options of `tscf ping`.
#[derive(Debug, Args)]
pub(crate) struct PingArgs {
    /// The internal address of the tunnel to ping (its `tscf client` answers on inner UDP port
    /// 7).
    target: IpAddr,
    /// How many pings to send.
    #[arg(short = 'c', long, default_value_t = 5)]
    count: u32,
    /// Stop at the first reply over a peer tunnel; fail (exit 1) if none comes.
    #[arg(long)]
    until_direct: bool,
    /// Seconds between pings.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    interval: f64,
    /// Seconds to wait for each reply.
    #[arg(long, value_name = "SECONDS", default_value_t = 2.0)]
    timeout: f64,
    /// Ping from the running `tscf client` with this admin endpoint (its `--admin`); without
    /// it, `tscf ping` opens a tunnel of its own with the options below.
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tunnel: TunnelArgs,
}

/// What to ping and how.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    target: IpAddr,
    count: u32,
    until_direct: bool,
    interval: Duration,
    timeout: Duration,
}

impl Plan {
    fn of(args: &PingArgs) -> Result<Self, String> {
        let seconds = |name: &str, v: f64| {
            Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| *d <= Duration::from_secs(60))
                .ok_or_else(|| format!("--{name}: {v} is not 0 to 60 seconds"))
        };
        if args.count == 0 || args.count > MAX_COUNT {
            return Err(format!("--count: 1 to {MAX_COUNT}"));
        }
        Ok(Self {
            target: args.target,
            count: args.count,
            until_direct: args.until_direct,
            interval: seconds("interval", args.interval)?,
            timeout: seconds("timeout", args.timeout)?,
        })
    }

    /// The admin request line.
    fn request(&self) -> String {
        format!(
            "ping {} {} {} {} {}\n",
            self.target,
            self.count,
            u8::from(self.until_direct),
            self.interval.as_millis(),
            self.timeout.as_millis()
        )
    }

    /// Reads an admin request line.
    fn parse(line: &str) -> Result<Self, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let ["ping", target, count, until_direct, interval, timeout] = words[..] else {
            return Err(format!("unknown request {line:?}"));
        };
        let bad = |what: &str| format!("bad {what} in {line:?}");
        let millis = |text: &str, what: &str| {
            text.parse::<u64>()
                .ok()
                .filter(|ms| *ms <= 60_000)
                .map(Duration::from_millis)
                .ok_or_else(|| bad(what))
        };
        Ok(Self {
            target: target.parse().map_err(|_| bad("address"))?,
            count: count
                .parse()
                .ok()
                .filter(|n| (1..=MAX_COUNT).contains(n))
                .ok_or_else(|| bad("count"))?,
            until_direct: until_direct == "1",
            interval: millis(interval, "interval")?,
            timeout: millis(timeout, "timeout")?,
        })
    }
}

/// Runs `tscf ping`.
pub(crate) fn run(args: PingArgs) -> ExitCode {
    let plan = match Plan::of(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tscf: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let mut summary = Summary::default();
    let mut show = |line: &Value| {
        summary.note(line);
        print_line(line, args.json);
    };
    let code = match args.admin {
        Some(admin) => ask(admin, &plan, &mut show),
        None => own_tunnel(&args.tunnel, &plan, &mut show),
    };
    if code != ExitCode::SUCCESS {
        return code;
    }
    summary.exit_code(&plan)
}

/// Pings through a running client's admin endpoint.
fn ask(admin: SocketAddr, plan: &Plan, show: &mut dyn FnMut(&Value)) -> ExitCode {
    let asked = (|| -> std::io::Result<()> {
        let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(plan.interval + plan.timeout + Duration::from_secs(5)))?;
        stream.write_all(plan.request().as_bytes())?;
        for line in BufReader::new(stream).lines() {
            let value: Value = serde_json::from_str(&line?).map_err(std::io::Error::other)?;
            if let Some(e) = value.get("error") {
                return Err(std::io::Error::other(e.to_string()));
            }
            let done = value["event"] == "done";
            show(&value);
            if done {
                return Ok(());
            }
        }
        Err(std::io::Error::other("the client closed the connection"))
    })();
    match asked {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tscf: cannot ping through the client's admin endpoint at {admin}: {e}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// Pings from a tunnel of its own, closed at the end.
fn own_tunnel(args: &TunnelArgs, plan: &Plan, show: &mut dyn FnMut(&Value)) -> ExitCode {
    let config = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tscf: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    smol::block_on(async {
        let tunnel = match Tunnel::connect(config).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("tscf: no tunnel: {e}");
                return ExitCode::from(exit::FAILURE);
            }
        };
        let result = pings(&tunnel, plan, |line| {
            show(&line);
            true
        })
        .await;
        tunnel.close().await;
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tscf: {e}");
                ExitCode::from(exit::FAILURE)
            }
        }
    })
}

/// Sends `plan`'s pings from a new inner socket of `tunnel`, and hands each reply or timeout,
/// then the summary, to `report` as one JSON object; stops early when `report` returns false.
pub(crate) async fn pings(
    tunnel: &Tunnel,
    plan: &Plan,
    mut report: impl FnMut(Value) -> bool,
) -> std::io::Result<()> {
    let socket = tunnel.bind(0)?;
    socket.set_peer_tunneling(true);
    let to = SocketAddr::new(plan.target, ECHO_PORT);
    let nonce: u64 = rand_nonce();
    let (mut sent, mut received, mut direct) = (0u32, 0u32, false);
    let mut buf = [0u8; 64];
    for seq in 1..=plan.count {
        let path = describe(tunnel, plan.target);
        let mut ping = MAGIC.to_vec();
        ping.extend_from_slice(&seq.to_be_bytes());
        ping.extend_from_slice(&nonce.to_be_bytes());
        let started = Instant::now();
        // A tunnel between transports refuses to send for a moment: that ping is lost, the
        // next one may go.
        if let Err(e) = socket.send_to(&ping, to).await {
            let mut line = json!({ "event": "error", "seq": seq, "error": e.to_string() });
            merge(&mut line, path);
            if !report(line) {
                break;
            }
            if seq < plan.count {
                smol::Timer::at(started + plan.interval).await;
            }
            continue;
        }
        sent += 1;
        let answer = async {
            loop {
                let (n, from) = socket.recv_from(&mut buf).await?;
                if from == to && buf[..n] == ping[..] {
                    return Ok::<_, std::io::Error>(Some(started.elapsed()));
                }
            }
        };
        let timeout = async {
            smol::Timer::after(plan.timeout).await;
            Ok(None)
        };
        match future::or(answer, timeout).await? {
            Some(rtt) => {
                received += 1;
                let is_direct = path["path"] != "relay";
                direct |= is_direct;
                let mut line = json!({
                    "event": "pong",
                    "from": plan.target.to_string(),
                    "seq": seq,
                    "rtt_ms": rtt.as_secs_f64() * 1e3,
                });
                merge(&mut line, path);
                if !report(line) || (plan.until_direct && is_direct) {
                    break;
                }
            }
            None => {
                let mut line = json!({ "event": "timeout", "seq": seq });
                merge(&mut line, path);
                if !report(line) {
                    break;
                }
            }
        }
        if seq < plan.count {
            smol::Timer::at(started + plan.interval).await;
        }
    }
    let _ = report(json!({
        "event": "done",
        "sent": sent,
        "received": received,
        "direct": direct,
    }));
    Ok(())
}

/// The path packets to `target` take now, as JSON fields.
fn describe(tunnel: &Tunnel, target: IpAddr) -> Value {
    let over = |session: Option<Transport>| transport_label(session.unwrap_or(Transport::UDP));
    match tunnel.peer_path(target) {
        PeerPath::Relay => json!({ "path": "relay" }),
        PeerPath::Peer(addr) => {
            let session = tunnel
                .peer_tunnels()
                .iter()
                .find(|p| p.peer == target)
                .and_then(|p| p.session);
            json!({ "path": "peer", "peer_addr": addr.to_string(), "transport": over(session) })
        }
        PeerPath::Session { addr, transport } => {
            json!({ "path": "peer", "peer_addr": addr.to_string(), "transport": over(Some(transport)) })
        }
        PeerPath::Stream { addr, .. } => {
            json!({ "path": "peer", "peer_addr": addr.to_string(), "transport": "stream" })
        }
        _ => json!({ "path": "unknown" }),
    }
}

fn merge(line: &mut Value, fields: Value) {
    if let (Some(line), Value::Object(fields)) = (line.as_object_mut(), fields) {
        line.extend(fields);
    }
}

/// A nonce that tells this run's pings from another's (not a secret).
fn rand_nonce() -> u64 {
    let mut octets = [0u8; 8];
    let _ = getrandom::fill(&mut octets);
    u64::from_be_bytes(octets)
}

/// Prints one ping line as text or JSON.
fn print_line(line: &Value, json: bool) {
    if json {
        let mut line = line.clone();
        crate::stamp::stamp(&mut line);
        println!("{line}");
        return;
    }
    let via = match line["path"].as_str() {
        Some("relay") => "via relay (the server)".to_owned(),
        Some("peer") => format!(
            "via peer tunnel {} over {}",
            line["peer_addr"].as_str().unwrap_or("?"),
            line["transport"].as_str().unwrap_or("?")
        ),
        _ => String::new(),
    };
    match line["event"].as_str() {
        Some("pong") => println!(
            "pong from {} {via} in {:.2} ms (seq {})",
            line["from"].as_str().unwrap_or("?"),
            line["rtt_ms"].as_f64().unwrap_or(0.0),
            line["seq"]
        ),
        Some("timeout") => println!("timeout (seq {}) {via}", line["seq"]),
        Some("error") => println!(
            "not sent (seq {}): {}",
            line["seq"],
            line["error"].as_str().unwrap_or("?")
        ),
        Some("done") => println!(
            "{} sent, {} received{}",
            line["sent"],
            line["received"],
            if line["direct"] == true {
                ", direct path seen"
            } else {
                ""
            }
        ),
        _ => println!("{line}"),
    }
}

/// What the replies add up to.
#[derive(Default)]
struct Summary {
    received: u64,
    direct: bool,
}

impl Summary {
    fn note(&mut self, line: &Value) {
        if line["event"] == "pong" {
            self.received += 1;
            self.direct |= line["path"] == "peer";
        }
    }

    /// 0 if a reply came (over a peer tunnel, with `--until-direct`), else 1.
    fn exit_code(&self, plan: &Plan) -> ExitCode {
        if self.received == 0 {
            eprintln!("tscf: no reply from {}", plan.target);
            return ExitCode::from(exit::FAILURE);
        }
        if plan.until_direct && !self.direct {
            eprintln!(
                "tscf: no direct path to {}: every reply came over the relay",
                plan.target
            );
            return ExitCode::from(exit::FAILURE);
        }
        ExitCode::SUCCESS
    }
}

/// Answers every datagram on the tunnel's echo port with itself, until the socket fails.
pub(crate) async fn echo(socket: InnerUdpSocket) {
    let mut buf = vec![0u8; 65_536];
    while let Ok((n, from)) = socket.recv_from(&mut buf).await {
        let _ = socket.send_to(&buf[..n], from).await;
    }
}

/// Answers `tscf ping --admin` requests on a client's admin endpoint, forever.
pub(crate) async fn serve_admin(listener: &Async<TcpListener>, tunnel: &Tunnel) {
    let open = Cell::new(0usize);
    let executor = LocalExecutor::new();
    executor
        .run(async {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    smol::Timer::after(Duration::from_millis(50)).await;
                    continue;
                };
                if open.get() >= MAX_ADMIN_CONNECTIONS {
                    continue;
                }
                open.set(open.get() + 1);
                let open = &open;
                executor
                    .spawn(async move {
                        answer(stream, tunnel).await;
                        open.set(open.get() - 1);
                    })
                    .detach();
            }
        })
        .await;
}

/// One admin client: its request, then the pings' lines.
async fn answer(stream: Async<TcpStream>, tunnel: &Tunnel) {
    let mut reader = futures_lite::io::BufReader::new(stream).take(MAX_REQUEST as u64);
    let mut line = String::new();
    let read = future::or(async { reader.read_line(&mut line).await.ok() }, async {
        smol::Timer::after(REQUEST_TIMEOUT).await;
        None
    });
    if read.await.is_none() {
        return;
    }
    let mut stream = reader.into_inner().into_inner();
    let plan = match Plan::parse(line.trim()) {
        Ok(p) => p,
        Err(e) => {
            let _ = stream
                .write_all(format!("{}\n", json!({ "error": e })).as_bytes())
                .await;
            return;
        }
    };
    // At most `count` lines and the last one wait; the writer takes them as they come.
    let (tx, rx) = async_channel::unbounded::<Value>();
    let run = async {
        if let Err(e) = pings(tunnel, &plan, |value| tx.try_send(value).is_ok()).await {
            let _ = tx.try_send(json!({ "error": e.to_string() }));
        }
        tx.close();
    };
    let write = async {
        while let Ok(value) = rx.recv().await {
            if stream
                .write_all(format!("{value}\n").as_bytes())
                .await
                .is_err()
            {
                // The client went away: the pings stop at the next report.
                rx.close();
                return;
            }
        }
    };
    future::zip(run, write).await;
}
