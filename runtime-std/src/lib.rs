//! Blocking runtime for tscf: drives the sans-IO state machines of [`tscf_core`] over std
//! sockets (TCP, TLS, UDP). It owns sockets, TLS sessions, timers and threads; every protocol
//! decision stays in the core.
//!
//! - [`Server`] / [`ServerHandle`]: a [`SessionDirector`](tscf_core::director::SessionDirector)
//!   behind a mutex, with TCP, TLS and UDP listeners. The UDP listeners also answer STUN
//!   Binding requests.
//! - [`Tunnel`]: a [`TunnelClient`](tscf_core::client::TunnelClient) run by background
//!   threads; [`Tunnel::connect`] blocks until the first tunnel is up. Re-attach after a lost
//!   transport is the core's: this runtime reports the loss and opens what the core asks for.
//! - [`InnerUdpSocket`]: UDP sockets on the tunnel's internal address ([`Tunnel::bind`]).
//! - Peer tunnels (`docs/PROTOCOL.md` §7), on by default: the tunnel's UDP socket is its peer
//!   socket, the server's UDP listener its STUN server. Sockets opted in with
//!   [`InnerUdpSocket::set_peer_tunneling`] move to a direct UDP path to the other client once
//!   the core has set one up ([`Notification::PeerTunnelUp`], [`Tunnel::peer_path`]) and back
//!   to the relay when it fails ([`Notification::PeerTunnelDown`]). Only UDP peer paths exist.
//! - [`tls`]: the core's [`tscf_core::tls`] (rustls with the ring provider; pinned
//!   fingerprints, CA files, mutual TLS), re-exported; its builders read files and generate
//!   keys through [`OS`]. [`os_seed`] and these configuration, statistics and notification
//!   types are shared with `tscf-runtime-smol`.
//! - [`inner`] and [`udp`]: the parts of an inner socket and of a server's UDP listener that
//!   do not depend on how a runtime waits (packet building and parsing; STUN or envelope, and
//!   which director connection a UDP remote is), shared with `tscf-runtime-smol`.
//!
//! # Threads and limits
//!
//! This runtime is simple, not scalable: the server runs **two threads per stream connection**
//! (a reader and a writer with a bounded queue), one per UDP listener, one acceptor per stream
//! listener and one timer thread. [`ServerConfig::max_stream_connections`] (default 1024)
//! bounds the stream connections, TLS handshakes included; beyond it new connections are
//! closed at accept. The director is behind one mutex, so the server uses about one core. A
//! TLS handshake must finish within the director's `pending_timeout`. A tunnel runs a timer
//! thread, a UDP thread on its one UDP socket, and a reader thread per open stream transport;
//! it writes to a stream transport under its lock, so a stalled server stalls the sender.
//! For many connections use `tscf-runtime-smol`.
//!
//! Logging goes through [`tracing`] (events only, no subscriber is installed): it is the
//! facade `tscf-runtime-smol` and most async code already use, so one subscriber sees both
//! runtimes, and its structured fields (`?event`, `fingerprint`) cost nothing when disabled.
//!
//! # Hostile input
//!
//! Nothing a peer sends panics the server, ends another tunnel, or grows memory without bound.
//! What happens to each kind of bad input (the tests in `tests/tests/std/bad_input.rs` check
//! every row against a live server):
//!
//! | Input | Outcome |
//! |---|---|
//! | Random bytes on a stream | Loss of framing (Length below 3): closed at once, counted in `framing_errors`. Otherwise the pending timeout closes it. |
//! | Random bytes on UDP | First octet not 0–5: dropped, `udp_dropped`; a bad envelope: dropped, `dropped.bad_envelope`. |
//! | Truncated envelope | Buffered (at most two maximal envelopes) until the pending timeout closes the connection. |
//! | Oversized control message (over 2,048 octets) | Answered Malformed (2). |
//! | Wrong version | A Configuration Request is answered in version 1 with Version Not Supported (1); anything else is dropped. |
//! | Unknown message type | An odd (request) type is answered with type + 1 and Unknown Message (3). |
//! | Unknown critical TLV | Answered Unknown Critical TLV (4). |
//! | Duplicate TLV | Answered Malformed (2) (a response is dropped instead). |
//! | Data before configuration | Dropped, `dropped.not_configured`; no answer. |
//! | Spoofed inner source | Dropped, `dropped.spoofed_source`; the tunnel stays up. |
//! | Garbage instead of a TLS ClientHello | Handshake fails: alert sent, closed, `tls_handshake_failures`. |
//! | One byte per second | Closed at the director's `pending_timeout` (TLS: the handshake deadline is the same). |
//! | Many connections that never configure | Beyond `max_pending_connections` the oldest is closed; all are closed at `pending_timeout`; beyond `max_stream_connections` new ones are closed at accept. |
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
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod batch;
pub mod inner;
mod peer_stream;
mod server;
mod socket;
mod stream;
mod timer;
mod tunnel;
pub mod udp;

pub use peer_stream::PeerStreamListen;
#[doc(hidden)]
pub use server::ServerCounters;
pub use server::{
    LocalAddrs, RuntimeCounters, Server, ServerConfig, ServerHandle, ServerStats, StartError,
};
pub use socket::InnerUdpSocket;
#[doc(hidden)]
pub use timer::Timed;
pub use tls::{
    ClientTlsConfig, Fingerprint, PeerIdentity, ServerIdentity, ServerTlsConfig,
    ServerVerification, TlsConfigError,
};
pub use tscf_core as core;
pub use tscf_core::tls;
pub use tunnel::{
    host_candidates, notification_for, udp_bind_addr, ConnectError, Notification, Tunnel,
    TunnelConfig, TunnelStats,
};

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, going on with the data if a thread panicked while holding it: every critical
/// section leaves the state machines consistent between inputs.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What this runtime gives [`tls`]'s builders: files read with `std::fs::read`, keys for
/// self-signed certificates from `rcgen::KeyPair::generate` (ECDSA P-256, the operating
/// system's secure source through ring).
pub const OS: tls::Os = tls::Os {
    read_file: |path| std::fs::read(path),
    generate_key: rcgen::KeyPair::generate,
};

/// 32 octets from the operating system's secure source. There is no fallback: tunnel ids,
/// re-attach secrets and peer tokens drawn from a guessable seed would let anyone hijack a
/// tunnel, so without a secure source nothing starts. Shared with `tscf-runtime-smol`.
pub fn os_seed() -> std::io::Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| {
        std::io::Error::other(format!(
            "no secure randomness from the operating system: {e}"
        ))
    })?;
    Ok(seed)
}
