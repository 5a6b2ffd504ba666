//! Shared helpers for the tscf integration tests live here; the tests themselves are in `tests/`.
//!
//! [`lab`] builds NAT topologies in Linux network namespaces and runs the real `tscf` program
//! in them (the `lab` test target); [`program`] runs it on loopback for the tests that watch
//! it from outside (Prometheus, tshark).
#![deny(missing_docs)]

pub mod lab;
pub mod program;
