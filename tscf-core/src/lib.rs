//! Sans-IO core of tscf, a Rust implementation of TSC tunnels with server-assisted peer tunneling.
//!
//! Nothing in this crate touches a socket, a clock, a thread or a global random number generator:
//! time is an argument, randomness comes from a seed in the configuration, and every output is
//! data drained by the caller. The runtimes (`tscf-runtime-std`, `tscf-runtime-smol`) own the I/O.
//! (The TLS and DTLS libraries behind the `tls` and `dtls` features draw each handshake's
//! randoms and ephemeral keys from ring themselves; files and long-lived keys come from the
//! caller, see the `tls` module.)
//!
//! - [`wire`]: the tscf wire protocol of `docs/PROTOCOL.md` (envelopes, control messages, TLVs,
//!   the stream deframer, inner IP packet checks).
//! - [`director`]: the session director (tunnel server) state machine.
//! - [`stun`]: the NAT discovery codec (STUN Binding, RFC 8489).
//! - [`client`]: the tunnel client state machine (configuration, keepalive, re-attach,
//!   release, inner packets).
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
pub mod director;
pub mod stun;
pub mod wire;

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
