//! The program's exit codes besides 0 (see the program's documentation in `main.rs`).

/// A runtime failure: a listener cannot be bound, no randomness, the server unreachable.
pub(crate) const FAILURE: u8 = 1;
/// A usage or configuration error.
pub(crate) const USAGE: u8 = 2;
/// The server refused the tunnel (`tscf client`).
pub(crate) const REFUSED: u8 = 3;
