//! Async runtime for tscf on [smol](https://docs.rs/smol): drives the hosts of [`tscf_core`]
//! over async sockets and tasks. It owns the sockets, the TLS and QUIC sessions, the timers
//! and the tasks, and moves bytes; every decision about them is the core's
//! ([`tscf_core::server::ServerHost`], [`tscf_core::tunnel::ClientHost`]).
//!
//! It offers the same nouns, names and configuration types as `tscf-runtime-std`, so an
//! embedder switches runtime by changing an import (and adding `.await`), and both
//! interoperate on every transport they share:
//!
//! - [`Server`] / [`ServerHandle`]: [`Server::start`]`(`[`ServerConfig`]`).await`; TCP, TLS,
//!   UDP (which also answers STUN Binding requests), DTLS and QUIC listeners. The host sits
//!   behind a lock held only for its synchronous calls, never across an `.await`. One task per
//!   stream or QUIC connection, one per UDP or DTLS listener, one timer task.
//! - A director of a cluster (feature `cluster`, `docs/CLUSTER.md`):
//!   [`Server::start_cluster`]`(`[`ServerConfig`]`, `[`ClusterEndpoints`]`)` runs the registry
//!   task ([`RedisRegistry`], Redis or Valkey) and the mesh listeners beside the others.
//! - [`Tunnel`]: [`Tunnel::connect`]`(`[`TunnelConfig`]`).await`; server transports over TCP,
//!   TLS, UDP, DTLS and QUIC; peer tunnels over plain UDP, inside DTLS or QUIC peer sessions on
//!   the peer socket (`client.peer.transport`), and over peer streams (TCP or TLS) when
//!   [`TunnelConfig::peer_streams`] names a listener. [`Tunnel::notifications`] is an async
//!   channel of [`Notification`]s.
//! - [`InnerUdpSocket`] ([`Tunnel::bind`]): async `send_to` / `recv_from` (and `send_many` /
//!   `recv_many`, several datagrams at once),
//!   [`set_peer_tunneling`][opt-in]; [`Tunnel::peer_path`][path] says
//!   whether packets to a peer take the relay or a peer tunnel.
//! - [`InnerTcpStream`] and [`InnerTcpListener`] ([`Tunnel::tcp_connect`],
//!   [`Tunnel::tcp_listen`]): TCP between internal addresses over the core's user-space TCP
//!   stack, [`AsyncRead`](futures_lite::AsyncRead) and
//!   [`AsyncWrite`](futures_lite::AsyncWrite).
//! - The `tscf` program (`src/bin/tscf/`, feature `cli`, on by default): `tscf server` with an
//!   embedded default configuration or a TOML file and a loopback admin endpoint,
//!   `tscf client`, `tscf status`, `tscf ping`, `tscf demo` and `tscf netcheck`, with
//!   Prometheus metrics and packet captures. Its dependencies (clap, toml, serde, serde_json,
//!   tracing-subscriber, async-signal, prometheus-client, pcap-file, etherparse) are optional:
//!   an embedder turns them off with `default-features = false`.
//!
//! Tasks run on smol's global executor (`smol::spawn`); set `SMOL_THREADS` to give it more
//! threads.
//!
//! # QUIC
//!
//! [`ServerConfig::quic`] lists QUIC listeners (quinn with rustls and the ring provider, ALPN
//! `tscf`); they present the certificate of [`ServerConfig::tls_config`], so a client verifies
//! them with the same [`ClientTlsConfig`] as TLS. Each QUIC connection is one stream of the
//! host: the client opens one bidirectional stream that carries control envelopes back to
//! back like TCP, and data envelopes go as QUIC datagrams (RFC 9221) whenever the connection
//! takes one that large (else on the stream). A client's QUIC transport uses a UDP socket of
//! its own, a new one per attempt.
//!
//! With `client.peer.transport` set to [`Transport::QUIC`](tscf_core::wire::Transport), a
//! [`Tunnel`] runs QUIC peer sessions (ALPN `tscf-peer`) through one quinn endpoint on the
//! peer socket itself: the host hands it QUIC datagrams from authorised addresses only (the
//! rest is counted in [`TunnelStats::peer_quic_unauthorised`]), incoming connections are
//! accepted only from an address the host authorised and with the initiator's certificate,
//! and the initiator pins the destination's certificate.
//!
//! What the server does with hostile input is the core's; [`tscf_core::server`] has the
//! table.
//!
//! # Example
//!
//! ```no_run
//! use tscf_runtime_smol::core::client::ServerEndpoint;
//! use tscf_runtime_smol::core::wire::Transport;
//! use tscf_runtime_smol::{Server, ServerConfig, Tunnel, TunnelConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! smol::block_on(async {
//!     let server = Server::start(ServerConfig {
//!         udp: vec!["127.0.0.1:0".parse()?],
//!         ..ServerConfig::default()
//!     })
//!     .await?;
//!     let addr = server.local_addrs().udp[0];
//!     let tunnel = Tunnel::connect(TunnelConfig::new(vec![ServerEndpoint {
//!         addr,
//!         transport: Transport::UDP,
//!     }]))
//!     .await?;
//!     let socket = tunnel.bind(5004)?;
//!     socket.send_to(b"hello", "10.77.0.3:5004".parse()?).await?;
//!     Ok(())
//! })
//! # }
//! ```
//!
//! [opt-in]: tscf_core::inner::SocketControl::set_peer_tunneling
//! [path]: tscf_core::tunnel::TunnelControl::peer_path
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod client;
#[cfg(feature = "cluster")]
mod cluster;
mod drive;
mod net;
mod quic;
#[cfg(feature = "cluster")]
mod registry;
mod server;
mod socket;
mod tcp;
mod tunnel;
mod udp;

#[cfg(feature = "cluster")]
pub use cluster::ClusterEndpoints;
#[cfg(feature = "cluster")]
pub use registry::{BadRegistryUrl, RedisRegistry};
pub use server::{Server, ServerHandle};
pub use socket::InnerUdpSocket;
pub use tcp::{InnerTcpListener, InnerTcpStream};
pub use tscf_core as core;
pub use tscf_core::runtime::*;
pub use tunnel::{PacketTap, Tunnel};

/// What this runtime gives the core: files read with `std::fs::read`, keys for self-signed
/// certificates from rcgen, and seeds from the operating system's secure source.
pub const OS: tls::Os = tls::Os {
    read_file: |path| std::fs::read(path),
    generate_key: rcgen::KeyPair::generate,
    fill_random: |buf| getrandom::fill(buf).map_err(std::io::Error::other),
};
