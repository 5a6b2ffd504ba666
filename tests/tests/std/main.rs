//! Integration tests of `tscf-runtime-std` over real loopback sockets.
#![allow(missing_docs, clippy::unwrap_used, unreachable_pub)]

#[path = "../common/pki.rs"]
mod pki;

mod attacks;
mod bad_input;
mod flow;
mod lifecycle;
mod peer;
mod reattach;
mod relay;
mod roaming;
mod tcp;
mod tls;
mod util;
