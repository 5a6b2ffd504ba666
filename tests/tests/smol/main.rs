//! Integration tests of `tscf-runtime-smol` over real loopback sockets, alone and against
//! `tscf-runtime-std`.
#![allow(missing_docs, clippy::unwrap_used, unreachable_pub)]

#[path = "../common/pki.rs"]
mod pki;

mod attacks;
mod bad_input;
mod cross;
mod dtls;
mod flow;
mod peer;
mod quic;
mod quic_hostile;
mod reattach;
mod tcp;
mod util;
