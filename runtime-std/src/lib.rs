//! Blocking runtime for tscf: drives the sans-IO state machines of [`tscf_core`] over std sockets.
//!
//! This crate currently only re-exports the core; its transports arrive with the blocking server
//! and client.

pub use tscf_core as core;
