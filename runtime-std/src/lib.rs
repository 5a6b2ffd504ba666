//! Blocking runtime for tscf: drives the hosts of [`tscf_core`] over std sockets and threads.
//! It owns the sockets, the TLS sessions, the timers and the threads, and moves bytes; every
//! decision about them is the core's ([`tscf_core::server::ServerHost`],
//! [`tscf_core::tunnel::ClientHost`]).
//!
//! - [`Server`] / [`ServerHandle`]: TCP, TLS, UDP and DTLS listeners (the UDP listeners also
//!   answer STUN Binding requests). QUIC needs `tscf-runtime-smol`.
//! - [`Tunnel`]: a client with server transports over TCP, TLS, UDP and DTLS;
//!   [`Tunnel::connect`] blocks until the first tunnel is up. Re-attach after a lost transport
//!   is the core's: this runtime reports the loss and opens what the core asks for.
//! - [`InnerUdpSocket`]: UDP sockets on the tunnel's internal address ([`Tunnel::bind`]).
//! - [`InnerTcpStream`] and [`InnerTcpListener`]: TCP connections between internal addresses
//!   ([`Tunnel::tcp_connect`], [`Tunnel::tcp_listen`]), over the core's user-space TCP stack;
//!   blocking [`Read`](std::io::Read) and [`Write`](std::io::Write).
//! - Peer tunnels (`docs/PROTOCOL.md` §7), on by default: over the tunnel's UDP socket
//!   (plain, or inside DTLS peer sessions with `client.peer.transport = Transport::DTLS`), and
//!   over peer streams (TCP or TLS) when [`TunnelConfig::peer_streams`] names a listener.
//!   Sockets opted in with [`set_peer_tunneling`][opt-in] move to the peer tunnel once the core
//!   has one ([`Notification::PeerTunnelUp`], [`peer_path`][path]) and back to the
//!   relay when it fails ([`Notification::PeerTunnelDown`]).
//! - [`tls`]: the core's rustls configurations; this runtime gives them files, keys and seeds
//!   through [`OS`].
//!
//! It offers the same nouns, names and configuration types as `tscf-runtime-smol`, and both
//! interoperate on every transport they share.
//!
//! # Threads and limits
//!
//! This runtime is simple, not scalable: a server runs **two threads per stream connection**
//! (a reader and a writer), one per UDP or DTLS listener, one acceptor per stream listener and
//! one timer thread; a tunnel the same for its sockets and streams. The host is behind one
//! mutex, so a server uses about one core. [`ServerConfig::max_stream_connections`] (default
//! 1024) bounds the stream connections, and what the core closes (a stalled writer, a slow
//! handshake, a connection the director gave up) is shut down at once. For many connections
//! use `tscf-runtime-smol`.
//!
//! Logging goes through [`tracing`] (events only, no subscriber is installed).
//!
//! What the server does with hostile input is the core's; [`tscf_core::server`] has the table.
//!
//! # Example
//!
//! ```no_run
//! use tscf_runtime_std::core::client::ServerEndpoint;
//! use tscf_runtime_std::core::wire::Transport;
//! use tscf_runtime_std::{Server, ServerConfig, Tunnel, TunnelConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = Server::start(ServerConfig {
//!     udp: vec!["127.0.0.1:0".parse()?],
//!     ..ServerConfig::default()
//! })?;
//! let addr = server.local_addrs().udp[0];
//! let tunnel = Tunnel::connect(TunnelConfig::new(vec![ServerEndpoint {
//!     addr,
//!     transport: Transport::UDP,
//! }]))?;
//! let socket = tunnel.bind(5004)?;
//! socket.send_to(b"hello", "10.77.0.3:5004".parse()?)?;
//! # Ok(())
//! # }
//! ```
//!
//! [opt-in]: tscf_core::inner::SocketControl::set_peer_tunneling
//! [path]: tscf_core::tunnel::TunnelControl::peer_path
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod drive;
mod net;
mod server;
mod socket;
mod stream;
mod tcp;
mod tunnel;
mod udp;

pub use server::{Server, ServerHandle};
pub use socket::InnerUdpSocket;
pub use tcp::{InnerTcpListener, InnerTcpStream};
pub use tscf_core as core;
pub use tscf_core::runtime::*;
pub use tunnel::Tunnel;

use std::sync::{Mutex, MutexGuard};

/// What this runtime gives the core: files read with `std::fs::read`, keys for self-signed
/// certificates from rcgen, and seeds from the operating system's secure source.
pub const OS: tls::Os = tls::Os {
    read_file: |path| std::fs::read(path),
    generate_key: rcgen::KeyPair::generate,
    fill_random: |buf| getrandom::fill(buf).map_err(std::io::Error::other),
};

/// Locks `m`, going on with the data if a thread panicked while holding it: every critical
/// section leaves the host consistent between inputs.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
