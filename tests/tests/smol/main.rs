//! Integration tests of `tscf-runtime-smol` over real loopback sockets, alone and against
//! `tscf-runtime-std`.
#![allow(missing_docs, clippy::unwrap_used, unreachable_pub)]

mod bad_input;
mod cross;
mod dtls;
mod flow;
mod quic;
mod util;
