//! Sans-IO core of tscf, a Rust implementation of TSC tunnels with server-assisted peer tunneling.
//!
//! Nothing in this crate touches a socket, a clock, a thread or a global random number generator:
//! time is an argument, randomness comes from a seed in the configuration, and every output is
//! data drained by the caller. The runtimes (`tscf-runtime-std`, `tscf-runtime-smol`) own the I/O.
//! (The TLS and DTLS libraries behind the `tls` and `dtls` features draw each handshake's
//! randoms and ephemeral keys from ring themselves; files and long-lived keys come from the
//! caller, see the `tls` module.)
//!
//! # One shape for every state machine
//!
//! [`SessionDirector`](director::SessionDirector), [`TunnelClient`](client::TunnelClient) and
//! [`NatDiscovery`](stun::NatDiscovery) are driven the same way:
//!
//! - **Inputs** are `handle_*` methods that take the current time, `now`, first: what the
//!   network and the runtime report (grouped as `handle_input(now, Input)` where a family
//!   grew: [`TunnelClient::handle_input`](client::TunnelClient::handle_input) with a
//!   [`client::Input`]), and `handle_timeout(now)` once `poll_timeout` is reached. The
//!   application's commands (`send_ip`, `release`, `close_tunnel`, …) are inputs too.
//! - **Outputs** are polled: `poll_transmit(now, &mut buf)` writes the next datagram or
//!   envelope into a buffer the caller owns and reuses, and says where it goes;
//!   `poll_event()` returns the next event of a `#[non_exhaustive]` enum; `poll_timeout()`
//!   says when `handle_timeout` is next due.
//! - **After any input, drain `poll_transmit` and `poll_event` until both return `None`**,
//!   transmits first (a transmit polled before an event that closes its transport belongs to
//!   that transport), then arm a timer for `poll_timeout`.
//!
//! Randomness follows one convention: a `rng_seed: [u8; 32]` in the configuration
//! ([`DirectorConfig::rng_seed`](director::DirectorConfig::rng_seed),
//! [`ClientConfig::rng_seed`](client::ClientConfig::rng_seed), the seed of
//! [`NatDiscovery::new`](stun::NatDiscovery::new)) keys a ChaCha20 generator, and everything
//! the machine draws derives from those 32 octets. The runtimes fill them from the operating
//! system's secure source; tests fix them, so that every run is reproducible.
//!
//! # Modules
//!
//! - [`wire`]: the tscf wire protocol of `docs/PROTOCOL.md` (envelopes, control messages, TLVs,
//!   the stream deframer, inner IP packet checks).
//! - [`director`]: the session director (tunnel server) state machine.
//! - [`cluster`]: what directors of a cluster share through their registry.
//! - [`stun`]: the NAT discovery codec (STUN Binding, RFC 8489).
//! - [`client`]: the tunnel client state machine (configuration, keepalive, re-attach,
//!   release, inner packets).
//! - [`inner`]: the client's inner stack (UDP packets and the table of inner sockets, IPv4
//!   fragmentation and reassembly, and with the feature `host` inner TCP on smoltcp).
//! - [`histogram`]: durations counted in fixed buckets, for the runtimes' metrics.
#![cfg_attr(
    feature = "tls",
    doc = "- [`tls`]: rustls configurations with the ring provider: pinned fingerprints, CA files, \
           mutual TLS, self-signed certificates."
)]
#![cfg_attr(
    feature = "dtls",
    doc = "- [`dtls`]: DTLS 1.2 associations with many addresses over one UDP socket (rtc-dtls), \
           their configurations, and DTLS peer sessions."
)]
#![cfg_attr(
    feature = "host",
    doc = "- [`io`], [`server`], [`tunnel`]: the hosts a runtime drives, a director or a client \
           behind its sockets, and what they ask of the runtime."
)]
#![cfg_attr(
    feature = "sim",
    doc = "- [`sim`]: the deterministic network simulator."
)]
#![cfg_attr(
    feature = "fuzzing",
    doc = "- [`fuzzing`]: property checks shared by the fuzz targets and the corpus replay test."
)]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(clippy::print_stdout)]

pub mod client;
pub mod cluster;
pub mod director;
pub mod histogram;
pub mod inner;
mod rate;
pub mod stun;
pub mod wire;

#[cfg(feature = "host")]
pub mod io;
#[cfg(feature = "host")]
pub mod server;
#[cfg(feature = "host")]
pub mod tunnel;

/// The names both runtimes offer at their root (configuration, statistics, notifications,
/// errors, TLS settings), so that an embedder switches runtime by changing an import.
#[cfg(feature = "host")]
pub mod runtime {
    pub use crate::inner::RecvMeta;
    pub use crate::server::{
        LocalAddrs, ServerConfig, ServerControl, ServerStats, StartError, TransportCounters,
    };
    pub use crate::tls::{
        self, ClientTlsConfig, Fingerprint, PeerIdentity, ServerIdentity, ServerTlsConfig,
        ServerVerification, TlsConfigError,
    };
    pub use crate::tunnel::{
        ConnectError, Notification, PeerStreamListen, TunnelConfig, TunnelControl, TunnelStats,
    };
}

#[cfg(feature = "dtls")]
pub mod dtls;
#[cfg(feature = "tls")]
pub mod tls;

#[cfg(feature = "sim")]
pub mod sim;

/// Property checks on arbitrary input, for the fuzz targets in `fuzz/` and the corpus replay
/// test.
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
