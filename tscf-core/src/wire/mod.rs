//! The tscf wire protocol, as specified normatively in `docs/PROTOCOL.md`.
//!
//! **Panic contract: no input makes any function in this module panic.** Decoders return
//! errors for every malformed input and never read past the end of a slice (all reads go
//! through [`Reader`]); encoders check sizes before writing. The fuzz targets in `fuzz/` back
//! this, and their seed corpus is replayed by `cargo test`.
//!
//! Layers, outermost first:
//! - [`Envelope`]: type octet, 2-octet length of the whole envelope, payload. A datagram
//!   transport carries one envelope per datagram; a stream transport is cut into envelopes by a
//!   [`StreamDeframer`] that buffers at most [`MAX_BUFFERED`] octets.
//! - [`InnerPacket`]: the payload of a data envelope, one whole IPv4 or IPv6 packet.
//! - [`Message`]: the payload of a control envelope, a [`Header`] and typed [`Tlvs`]; on a
//!   server tunnel it carries Message Integrity under a [`ControlKey`], and a receiver keeps a
//!   [`ReplayWindow`] of the other side's requests.
//!
//! Codes ([`MessageType`], [`TlvType`], [`ResultCode`], …) are open newtypes: values unknown to
//! this version decode, round-trip and print in hex.

mod codes;
mod control_key;
mod deframer;
mod demux;
mod envelope;
mod integrity;
mod ip;
mod message;
mod reader;
mod tlv;

pub use codes::{
    CandidateKind, EnvelopeType, MessageType, PeerServiceResult, ResultCode, ServiceAction,
    ServiceType, TlvType, Transport,
};
pub use control_key::{ControlKey, Freshness, ReplayWindow};
pub use deframer::{DeframeError, StreamDeframer, MAX_BUFFERED};
pub use demux::DatagramKind;
pub use envelope::{
    Envelope, EnvelopeError, PayloadTooLarge, ENVELOPE_HEADER_LEN, MAX_ENVELOPE_LEN,
    MAX_PAYLOAD_LEN,
};
pub use integrity::{append_integrity, verify_envelope_integrity};
pub use ip::{InnerPacket, InnerPacketError};
pub use message::{
    Candidate, Capabilities, ConnectionInfo, DecodeError, DecodeErrorKind, EncodeError, Header,
    InternalAddress, Message, PeerCredentials, Tlvs, HEADER_LEN, KEEPALIVE_INTERVAL_RANGE_MS,
    MAX_CANDIDATES, MAX_CONTROL_LEN, MAX_DNS_SERVERS, MAX_TLVS, MESSAGE_INTEGRITY_TLV_LEN,
    MIN_MAX_PACKET_SIZE, VERSION,
};
pub use reader::Reader;
pub use tlv::{RawTlv, CLIENT_NONCE_LEN, CONTROL_KEY_LEN, MAX_AUTH_TOKEN_LEN, MAX_TEXT_LEN};
