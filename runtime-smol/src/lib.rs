//! Async runtime for tscf on [smol](https://docs.rs/smol): drives the sans-IO state machines
//! of [`tscf_core`] over async sockets (TCP, TLS, UDP, QUIC, DTLS). It owns sockets, TLS,
//! QUIC and DTLS sessions, timers and tasks; every protocol decision stays in the core.
//!
//! It offers the same nouns and names as `tscf-runtime-std`, so an embedder switches runtime
//! by changing an import (and adding `.await`):
//!
//! - [`Server`] / [`ServerHandle`]: [`Server::start`]`(`[`ServerConfig`]`).await`; a
//!   [`SessionDirector`](tscf_core::director::SessionDirector) behind a lock held only for its
//!   synchronous calls, never across an `.await`. One task per stream connection (TCP, TLS)
//!   or QUIC connection, one per UDP listener (which also answers STUN Binding requests), one
//!   timer task. [`ServerHandle::cut_connection`] cuts a tunnel's TCP, TLS or QUIC connection.
//! - [`Tunnel`]: [`Tunnel::connect`]`(`[`TunnelConfig`]`).await`; one task drives the
//!   [`TunnelClient`](tscf_core::client::TunnelClient)'s timer, one its UDP socket (server
//!   tunnel on UDP and peer socket), one each open stream or QUIC transport.
//!   [`Tunnel::notifications`] is an async channel of [`Notification`]s.
//! - The `tscf` program (`src/bin/tscf/`, feature `cli`, on by default): `tscf server` with an
//!   embedded default configuration or a TOML file and a loopback admin endpoint,
//!   `tscf client`, `tscf status`, `tscf demo` and `tscf netcheck`. Its dependencies (clap,
//!   toml, serde, serde_json, tracing-subscriber, async-signal) are optional: an embedder
//!   that wants the library only sets `default-features = false`.
//! - [`InnerUdpSocket`] ([`Tunnel::bind`]): async `send_to` / `recv_from`,
//!   [`set_peer_tunneling`](InnerUdpSocket::set_peer_tunneling); [`Tunnel::peer_path`] says
//!   whether packets to a peer take the relay or a peer tunnel.
//!
//! Configuration, statistics, notification and TLS types are those of `tscf-runtime-std`,
//! re-exported here, as are its TLS configuration builders (rustls with the ring provider);
//! they hold no I/O, so sharing them keeps both runtimes identical without copied code.
//!
//! Hostile input meets the same outcomes as in `tscf-runtime-std` (its crate documentation has
//! the table), counted in the same [`RuntimeCounters`]: a failed or slow TLS handshake and
//! lost framing close the connection, noise on UDP is dropped, and an unconfigured
//! connection is closed at the director's `pending_timeout`.
//!
//! Tasks run on smol's global executor (`smol::spawn`); set `SMOL_THREADS` to give it more
//! threads.
//!
//! # QUIC
//!
//! [`ServerConfig::quic`] lists QUIC listeners (quinn with rustls and the ring provider, ALPN
//! `tscf`); they present the certificate of [`ServerConfig::tls_config`], so a client verifies
//! them with the same [`ClientTlsConfig`] as TLS (CA file or pinned fingerprint). Each QUIC
//! connection is one director connection of transport QUIC (`docs/PROTOCOL.md` §2.1): the
//! client opens one bidirectional stream that carries control envelopes back to back like
//! TCP, and data envelopes go as QUIC datagrams (RFC 9221), one envelope each, whenever the
//! connection takes a datagram that large (else on the stream). The datagrams are counted in
//! [`RuntimeCounters::quic_datagrams_sent`] and [`TunnelStats::quic_datagrams_sent`] (and
//! `_received`). QUIC connections count against `max_stream_connections` and in
//! `ServerStats::stream_connections`.
//!
//! A [`Tunnel`] whose server endpoint is [`Transport::QUIC`](tscf_core::wire::Transport)
//! opens a quinn client endpoint on a UDP socket of its own, a new one per attempt; it does
//! not share the peer socket, so peer tunnels and NAT discovery still use the UDP socket.
//!
//! # QUIC and DTLS peer tunnels
//!
//! With `client.peer.transport` set to [`Transport::QUIC`](tscf_core::wire::Transport), a
//! [`Tunnel`] offers secured peer tunnels (`docs/PROTOCOL.md` §7.5.1). It presents a
//! certificate ([`TunnelConfig::peer_identity`], or a self-signed one generated at connect)
//! whose fingerprint it announces, and runs one quinn endpoint on the peer UDP socket itself:
//! the UDP task hands the endpoint only QUIC datagrams from addresses the client authorised or
//! connected to (the rest is counted in [`TunnelStats::peer_quic_unauthorised`]), incoming
//! connections are accepted only from authorised addresses with the initiator's certificate,
//! and the initiator pins the destination's certificate. Envelopes travel as QUIC datagrams
//! (ALPN `tscf-peer`).
//!
//! With [`Transport::DTLS`](tscf_core::wire::Transport) instead, the same certificate runs
//! DTLS 1.2 peer sessions (rtc-dtls, as for DTLS server tunnels) through the core's
//! [`PeerSessions`](tscf_core::dtls::PeerSessions) on the peer UDP socket, driven under the
//! client's lock: the UDP task feeds it only DTLS
//! datagrams (first octet 20–63) from addresses the client authorised or connected to (the
//! rest is counted in [`TunnelStats::peer_dtls_unauthorised`]), the initiator is the DTLS
//! client and pins the destination's certificate, the destination requires the initiator's
//! certificate, and each envelope travels as one application data record. Its handshake
//! retransmissions and timeouts run on the tunnel's timer.
//!
//! # DTLS
//!
//! [`ServerConfig::dtls`] lists DTLS 1.2 listeners (rtc-dtls, sans-IO, with ring). They
//! present the certificate of [`ServerConfig::tls_config`] (the same one as TLS and QUIC, so
//! one fingerprint pins all three) and, with a client CA, ask for a client certificate and
//! verify it if given. Each DTLS association is one director connection of transport DTLS,
//! and each application data record carries exactly one envelope (`docs/PROTOCOL.md` §2).
//! A listener answers a ClientHello without a cookie statelessly (RFC 6347 §4.2.1, an HMAC
//! cookie of its own) and keeps state only for associations it has and for at most
//! [`ServerConfig::dtls_max_half_open`] handshakes in progress of clients that returned a
//! cookie (a new one evicts the oldest), each given [`ServerConfig::dtls_handshake_timeout`];
//! every other datagram is dropped before any state is kept, and counted in the `dtls_*`
//! fields of [`RuntimeCounters`].
//! At most [`ServerConfig::max_stream_connections`] associations are established at once;
//! one beyond is closed when its handshake completes. [`ServerHandle::cut_connection`] drops a
//! tunnel's DTLS association after a `close_notify`.
//!
//! A [`Tunnel`] whose server endpoint is [`Transport::DTLS`](tscf_core::wire::Transport)
//! handshakes from a UDP socket of its own, a new one per attempt, and verifies the server as
//! its [`ClientTlsConfig`] says: a pinned fingerprint, a CA file and the server name, or
//! (with a warning) not at all; a client certificate is presented if configured. A
//! `close_notify` from the server, or a failed send, is a lost transport: the client
//! re-attaches as over QUIC.
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
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod peer_session;
mod quic;
mod server;
mod socket;
mod stream;
mod timer;
mod tunnel;

pub use server::{Server, ServerHandle};
pub use socket::InnerUdpSocket;
pub use tscf_core as core;
pub use tscf_core::tls;
pub use tscf_core::tls::{
    ClientTlsConfig, Fingerprint, PeerIdentity, ServerIdentity, ServerTlsConfig,
    ServerVerification, TlsConfigError,
};
pub use tscf_runtime_std::{
    ConnectError, LocalAddrs, Notification, RuntimeCounters, ServerConfig, ServerStats, StartError,
    TunnelConfig, TunnelStats,
};
pub use tunnel::Tunnel;

use std::sync::{Mutex, MutexGuard};

/// What this runtime gives [`tls`]'s builders: files read with `std::fs::read` (once, when a
/// server starts or a tunnel connects), keys for self-signed certificates from
/// `rcgen::KeyPair::generate` (ECDSA P-256, the operating system's secure source through ring).
pub const OS: tls::Os = tls::Os {
    read_file: |path| std::fs::read(path),
    generate_key: rcgen::KeyPair::generate,
};

/// Locks `m`, going on with the data if a task panicked while holding it: every critical
/// section leaves the state machines consistent between inputs.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
