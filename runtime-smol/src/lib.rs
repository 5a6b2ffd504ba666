//! Async runtime for tscf on smol: drives the sans-IO state machines of [`tscf_core`].
//!
//! This crate currently only re-exports the core; its transports arrive with the async server
//! and client.

pub use tscf_core as core;
