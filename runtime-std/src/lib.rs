//! Blocking runtime for tscf: drives the sans-IO state machines of [`tscf_core`] over std
//! sockets (TCP, TLS, UDP).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod server;
mod socket;
mod stream;
mod timer;
pub mod tls;
mod tunnel;

pub use server::{
    LocalAddrs, RuntimeCounters, Server, ServerConfig, ServerHandle, ServerStats, StartError,
};
pub use socket::InnerUdpSocket;
pub use tls::{
    ClientTlsConfig, Fingerprint, ServerIdentity, ServerTlsConfig, ServerVerification,
    TlsConfigError,
};
pub use tscf_core as core;
pub use tunnel::{ConnectError, Notification, Tunnel, TunnelConfig, TunnelStats};

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, going on with the data if a thread panicked while holding it: every critical
/// section leaves the state machines consistent between inputs.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// 32 octets from the operating system's secure source.
pub(crate) fn os_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    if getrandom::fill(&mut seed).is_err() {
        // No secure source: fall back to the clock, and say so.
        tracing::warn!("no OS randomness; seeding from the clock");
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        seed[..16].copy_from_slice(&t.to_le_bytes());
    }
    seed
}
