//! `tscf`: the tscf program.
//!
//! `tscf server` runs a tunnel server on the smol runtime. Without `--config` it uses the
//! embedded default configuration ([`config::DEFAULT`]): loopback listeners for TCP
//! (127.0.0.1:4440), TLS with a self-signed certificate (127.0.0.1:4443), UDP
//! (127.0.0.1:4440), and QUIC (127.0.0.1:4444/UDP) and DTLS (127.0.0.1:4445/UDP) with the same
//! certificate, the pools `10.77.0.0/16` and `fd77::/48`, peer tunneling on. It prints
//! its listening addresses and the TLS fingerprint clients pin. Logging goes to standard
//! error, filtered by `RUST_LOG` (nothing below warnings by default).
//!
//! It stops at SIGINT (Ctrl-C) or SIGTERM, or when `--for` elapses: the tunnels are closed with
//! reason Shutdown, so clients learn it at once.
//!
//! It also answers `tscf status` on a loopback admin endpoint (127.0.0.1:4449 by default;
//! `admin` in the configuration, `--admin` on the command line).
//!
//! `tscf client` opens a tunnel, prints its addresses and forwards local UDP ports into it;
//! `tscf demo` runs a server and two clients in one process and measures the relay and the
//! peer tunnel; `tscf status` prints the state of a running server; `tscf netcheck` asks STUN
//! servers for the public mapping and tells whether it varies by destination; `tscf ping`
//! times round trips to another client's echo port and says which path they took.
//!
//! `tscf server` and `tscf client` serve Prometheus metrics with `--metrics ADDR`
//! (`metrics.rs`, `http.rs`) and write packet captures with `--pcap FILE` (`capture.rs`).
//!
//! Exit codes: 0 when it stopped normally (signal or `--for`), 1 on a runtime failure (a
//! listener cannot be bound, no randomness, the server unreachable), 2 on a usage or
//! configuration error, 3 when the server refused the tunnel (`tscf client`). `tscf netcheck`
//! exits 1 when no STUN server answered.
#![forbid(unsafe_code)]

mod admin;
mod capture;
mod client;
mod config;
mod demo;
mod exit;
mod forward;
mod http;
mod metrics;
mod netcheck;
mod ping;
mod stamp;
mod tun;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use clap::{Parser, Subcommand};
use tscf_runtime_smol::core::wire::Transport;
use tscf_runtime_smol::{ClusterEndpoints, LocalAddrs, Server, StartError};

use capture::{CaptureArgs, Capturing};

/// TSC tunnels with server-assisted peer tunneling.
#[derive(Debug, Parser)]
#[command(name = "tscf", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a tunnel server (TCP, TLS, UDP, QUIC and DTLS listeners).
    Server {
        /// A TOML configuration file; without it the embedded default configuration is used.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Stop after this many seconds (default: run until killed).
        #[arg(long = "for", value_name = "SECONDS")]
        run_for: Option<u64>,
        /// The admin endpoint for `tscf status` (loopback only; overrides the configuration).
        #[arg(long, value_name = "ADDR")]
        admin: Option<SocketAddr>,
        /// Serve Prometheus metrics on http://ADDR/metrics (overrides the configuration).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
        #[command(flatten)]
        capture: CaptureArgs,
        /// Allow plain TCP and UDP listeners on addresses beyond loopback (`allow_plain` in the
        /// configuration): anyone on the path reads their tunnels and can take them over.
        #[arg(long)]
        allow_plain: bool,
    },
    /// Open a tunnel, print its addresses and forward local UDP ports into it.
    Client(client::ClientArgs),
    /// A server and two clients in one process on loopback: relay and peer tunnel compared.
    Demo {
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Ask STUN servers for this host's public mapping: NAT kind and usable addresses.
    Netcheck(netcheck::NetcheckArgs),
    /// Ping a tunnel's internal address through `tscf client`'s echo port: the round trip and
    /// the path (relay, or peer tunnel), from a running client or a tunnel of its own.
    Ping(ping::PingArgs),
    /// Print the state of a running server, from its admin endpoint.
    Status {
        /// The server's admin endpoint.
        #[arg(long, value_name = "ADDR", default_value = admin::DEFAULT_ADDR)]
        admin: SocketAddr,
        /// Print the server's JSON answer as it is.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Server {
            config,
            run_for,
            admin,
            metrics,
            capture,
            allow_plain,
        } => server(config, run_for, admin, metrics, &capture, allow_plain),
        Command::Client(args) => client::run(args),
        Command::Demo { json } => demo::run(json),
        Command::Netcheck(args) => netcheck::run(args),
        Command::Ping(args) => ping::run(args),
        Command::Status { admin, json } => admin::status(admin, json),
    }
}

fn server(
    path: Option<PathBuf>,
    run_for: Option<u64>,
    admin: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
    capture: &CaptureArgs,
    allow_plain: bool,
) -> ExitCode {
    let file = match path {
        None => config::ServerFile::default_config(),
        Some(path) => match std::fs::read_to_string(&path) {
            Ok(text) => {
                config::ServerFile::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
            }
            Err(e) => Err(format!("{}: {e}", path.display())),
        },
    };
    let configured = file.and_then(|f| {
        let admin = match admin {
            Some(a) => admin::check(a).map(Some)?,
            None => f.admin_addr()?,
        };
        let metrics = match metrics {
            Some(a) => Some(a),
            None => f.metrics_addr()?,
        };
        let (mut config, cluster) = f.into_server_config()?;
        config.allow_plain_beyond_loopback |= allow_plain;
        Ok((config, cluster, admin, metrics))
    });
    let (mut config, cluster, admin, metrics) = match configured {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tscf: configuration error: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    // A stream's local address is its listener's, known once the server has bound them.
    let listeners: Arc<OnceLock<LocalAddrs>> = Arc::default();
    let local_of = {
        let listeners = listeners.clone();
        Box::new(move |transport: Transport, remote: SocketAddr| {
            let bound = listeners.get().and_then(|a| {
                let of = match transport {
                    Transport::TCP => &a.tcp,
                    Transport::TLS => &a.tls,
                    Transport::QUIC => &a.quic,
                    Transport::DTLS => &a.dtls,
                    _ => &a.udp,
                };
                of.first().copied()
            });
            bound.unwrap_or_else(|| capture::client_local(transport, remote))
        })
    };
    let capturing = match Capturing::start(capture, local_of) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tscf: cannot write the packet capture: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    config.capture = capturing.as_ref().map(Capturing::capture);
    let code = serve(config, cluster, admin, metrics, run_for, &listeners);
    if let Some(c) = capturing {
        c.finish();
    }
    code
}

/// Runs the server until a signal or `run_for` seconds; its admin and metrics endpoints beside.
fn serve(
    config: tscf_runtime_smol::ServerConfig,
    cluster: Option<ClusterEndpoints>,
    admin: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
    run_for: Option<u64>,
    listeners: &OnceLock<LocalAddrs>,
) -> ExitCode {
    smol::block_on(async {
        // Before anything is printed, so that a signal after the first line stops it cleanly.
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
        let started = match cluster {
            Some(cluster) => Server::start_cluster(config, cluster).await,
            None => Server::start(config).await,
        };
        let handle = match started {
            Ok(h) => h,
            Err(e) => {
                eprintln!("tscf: cannot start the server: {e}");
                let code = match e {
                    StartError::Bind { .. } | StartError::Io(_) | StartError::Randomness(_) => {
                        exit::FAILURE
                    }
                    _ => exit::USAGE,
                };
                return ExitCode::from(code);
            }
        };
        let _ = listeners.set(handle.local_addrs().clone());
        let admin = match admin.map(admin::bind).transpose() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("tscf: cannot listen for admin clients: {e}");
                return ExitCode::from(exit::FAILURE);
            }
        };
        let metrics = match metrics.map(http::bind).transpose() {
            Ok(m) => m,
            Err(e) => {
                eprintln!("tscf: cannot listen for metrics scrapers: {e}");
                return ExitCode::from(exit::FAILURE);
            }
        };
        let addrs = handle.local_addrs();
        println!("tscf server listening");
        for a in &addrs.tcp {
            println!("  tcp {a}");
        }
        for a in &addrs.tls {
            println!("  tls {a}");
        }
        for a in &addrs.udp {
            println!("  udp {a}");
        }
        for a in &addrs.quic {
            println!("  quic {a}");
        }
        for a in &addrs.dtls {
            println!("  dtls {a}");
        }
        for a in handle.mesh_addrs() {
            println!("  mesh {a}");
        }
        if let Some(f) = handle.tls_fingerprint() {
            println!("  tls fingerprint {f}");
        }
        if let Some(a) = metrics.as_ref().and_then(|l| l.get_ref().local_addr().ok()) {
            println!("  metrics http://{a}/metrics");
        }
        if let Some(a) = admin.as_ref().and_then(|l| l.get_ref().local_addr().ok()) {
            println!("  admin {a}");
        }
        let stop_at = async {
            match run_for {
                Some(secs) => {
                    async_io::Timer::after(Duration::from_secs(secs)).await;
                }
                None => futures_lite::future::pending::<()>().await,
            }
        };
        let answer_admin = async {
            match &admin {
                Some(listener) => admin::serve(listener, &handle).await,
                None => futures_lite::future::pending::<()>().await,
            }
        };
        let answer_metrics = async {
            match &metrics {
                Some(listener) => http::serve(listener, || metrics::server(handle.stats())).await,
                None => futures_lite::future::pending::<()>().await,
            }
        };
        let stop = futures_lite::future::or(stop_at, async {
            let mut signals = signals;
            let _ = futures_lite::StreamExt::next(&mut signals).await;
        });
        futures_lite::future::or(stop, futures_lite::future::or(answer_admin, answer_metrics))
            .await;
        handle.shutdown().await;
        println!("tscf server stopped");
        ExitCode::SUCCESS
    })
}
