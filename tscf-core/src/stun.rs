//! STUN Binding (RFC 8489) for NAT discovery.
//!
//! Three layers, all sans-IO:
//!
//! - [`is_stun`]: the cheap demultiplexing test (RFC 7983, RFC 9443). tscf puts STUN, its own
//!   envelopes (first byte 4 or 5), DTLS and QUIC on one UDP socket; run this first.
//! - A stateless codec: [`encode_binding_request`], [`decode_binding_response`] for the client
//!   and [`answer_binding_request`] for the tunnel server's responder.
//! - [`NatDiscovery`]: a state machine that asks a few STUN servers for this endpoint's
//!   server-reflexive address, retransmits on its own timers, and reports whether the mapping
//!   depends on the destination (a symmetric NAT, which defeats direct peer tunnels).
//!
//! Parsing and writing of messages and attributes is delegated to `stun-types`; this module adds
//! what a Binding client and server must check on top (exact length, class and method,
//! FINGERPRINT, unknown comprehension-required attributes).
//!
//! No input makes any function in this module panic.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use stun_types::attribute::{
    Attribute, AttributeStaticType, AttributeType, ErrorCode, MappedSocketAddr, MessageIntegrity,
    MessageIntegritySha256, UnknownAttributes, XorMappedAddress,
};
use stun_types::message::{
    Message, MessageClass, MessageType, MessageWrite, MessageWriteExt, MessageWriteMutSlice,
    StunParseError, BINDING, MAGIC_COOKIE,
};

/// Length of the fixed STUN message header.
const HEADER_LEN: usize = 20;

/// Unknown attributes listed in a 420 answer, at most.
const MAX_UNKNOWN_LISTED: usize = 8;

/// MAPPED-ADDRESS (RFC 8489 §14.1); `stun-types` parses its value but names no attribute type.
const MAPPED_ADDRESS: AttributeType = AttributeType::new(0x0001);
/// SOURCE-ADDRESS (RFC 3489), still sent by older servers next to XOR-MAPPED-ADDRESS.
const SOURCE_ADDRESS: AttributeType = AttributeType::new(0x0004);
/// CHANGED-ADDRESS (RFC 3489), still sent by older servers next to XOR-MAPPED-ADDRESS.
const CHANGED_ADDRESS: AttributeType = AttributeType::new(0x0005);

/// Comprehension-required attributes a Binding success response may carry without being
/// discarded (RFC 8489 §6.3.3). The legacy RFC 3489 ones are known and ignored, so that older
/// servers keep working. MESSAGE-INTEGRITY is ignored too: our requests carry no credentials.
const RESPONSE_ATTRIBUTES: [AttributeType; 8] = [
    MAPPED_ADDRESS,
    SOURCE_ADDRESS,
    CHANGED_ADDRESS,
    XorMappedAddress::TYPE,
    MessageIntegrity::TYPE,
    MessageIntegritySha256::TYPE,
    ErrorCode::TYPE,
    UnknownAttributes::TYPE,
];

/// Comprehension-required attributes the responder understands in a Binding request: none. It is
/// an unauthenticated reflector, so USERNAME/MESSAGE-INTEGRITY (ICE checks), CHANGE-REQUEST
/// (RFC 5780) and the like are all unknown to it.
const REQUEST_ATTRIBUTES: [AttributeType; 0] = [];

/// Largest message this module writes: header, XOR-MAPPED-ADDRESS of an IPv6 address (4 + 20),
/// FINGERPRINT (4 + 4).
const MAX_MESSAGE_LEN: usize = HEADER_LEN + 24 + 8;

/// Why a datagram was not accepted as the expected STUN message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StunError {
    /// The datagram fails [`is_stun`]; it may belong to another protocol on the socket.
    #[error("not a STUN message")]
    NotStun,
    /// The header looks like STUN but the attributes do not parse.
    #[error("malformed STUN message: {reason}")]
    Malformed {
        /// What was wrong, for logs.
        reason: &'static str,
    },
    /// A well-formed STUN message of a class or method other than the one expected.
    #[error("unexpected STUN message type {message_type:#06x}")]
    WrongMessageType {
        /// The 14-bit message type field (class and method) as received.
        message_type: u16,
    },
    /// The FINGERPRINT attribute does not match the message.
    #[error("STUN FINGERPRINT does not match")]
    BadFingerprint,
    /// A Binding error response: the transaction failed at the server.
    #[error("STUN error response (code {code:?})")]
    ErrorResponse {
        /// The ERROR-CODE attribute's code (300..=699), if one was present and well-formed.
        code: Option<u16>,
    },
    /// The message carries a comprehension-required attribute we do not understand, so it
    /// must not be acted on (RFC 8489 §6.3.1, §6.3.3).
    #[error("unknown comprehension-required STUN attribute {attribute:#06x}")]
    UnknownComprehensionRequired {
        /// The first such attribute type.
        attribute: u16,
    },
    /// A Binding success response with neither XOR-MAPPED-ADDRESS nor MAPPED-ADDRESS.
    #[error("STUN Binding response has no mapped address")]
    NoMappedAddress,
}

impl StunError {
    fn from_parse(error: StunParseError) -> Self {
        match error {
            StunParseError::NotStun => StunError::NotStun,
            StunParseError::FingerprintMismatch => StunError::BadFingerprint,
            StunParseError::Truncated { .. } => StunError::Malformed {
                reason: "attribute extends past the end of the message",
            },
            _ => StunError::Malformed {
                reason: "invalid attribute",
            },
        }
    }
}

/// A STUN transaction ID: the 96 bits after the magic cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransactionId(pub [u8; 12]);

impl TransactionId {
    /// Draws a fresh transaction ID. It must be unpredictable to off-path attackers
    /// (RFC 8489 §5), so `rng` should be seeded from a secure source.
    pub fn from_rng<R: RngCore + ?Sized>(rng: &mut R) -> Self {
        let mut id = [0; 12];
        rng.fill_bytes(&mut id);
        Self(id)
    }

    fn to_stun(self) -> stun_types::message::TransactionId {
        let mut bytes = [0; 16];
        bytes[4..].copy_from_slice(&self.0);
        u128::from_be_bytes(bytes).into()
    }

    fn from_stun(id: stun_types::message::TransactionId) -> Self {
        let bytes = u128::from(id).to_be_bytes();
        let mut id = [0; 12];
        id.copy_from_slice(&bytes[4..]);
        Self(id)
    }
}

/// A decoded Binding success response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingResponse {
    /// The transaction this response answers.
    pub transaction_id: TransactionId,
    /// Our transport address as the server saw it (the server-reflexive address).
    pub mapped: SocketAddr,
}

/// Whether `datagram` is a STUN message, by the header alone (RFC 7983 §7, RFC 9443).
///
/// True when the first byte is 0..=3, the datagram holds at least a header, the magic cookie
/// is present, and the declared length is a multiple of 4 that accounts for exactly the rest of
/// the datagram. Nothing beyond the header is looked at.
#[must_use]
pub fn is_stun(datagram: &[u8]) -> bool {
    let Some(header) = datagram.get(..HEADER_LEN) else {
        return false;
    };
    let declared = usize::from(u16::from_be_bytes([header[2], header[3]]));
    header[0] <= 3
        && header[4..8] == MAGIC_COOKIE.to_be_bytes()
        && declared % 4 == 0
        && declared + HEADER_LEN == datagram.len()
}

/// Writes a Binding request with FINGERPRINT and no other attribute into `out`, replacing its
/// contents.
pub fn encode_binding_request(transaction_id: TransactionId, out: &mut Vec<u8>) {
    write_binding(MessageClass::Request, transaction_id, None, out);
}

/// Decodes a Binding success response.
///
/// The mapped address comes from XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS from servers that send
/// only that. FINGERPRINT is checked when present. Error responses, other classes and methods,
/// and responses with unknown comprehension-required attributes are rejected (RFC 8489 §6.3.3).
/// A mapped address with an unspecified IP or port 0 is rejected as malformed: no NAT maps to it.
/// Matching the transaction ID against an outstanding request is the caller's job.
pub fn decode_binding_response(datagram: &[u8]) -> Result<BindingResponse, StunError> {
    let message = parse(datagram)?;
    let message_type = message.get_type();
    if !message_type.has_method(BINDING) {
        return Err(wrong_type(datagram));
    }
    match message_type.class() {
        MessageClass::Success => {}
        MessageClass::Error => {
            let code = message.attribute::<ErrorCode>().ok().map(|e| e.code());
            return Err(StunError::ErrorResponse { code });
        }
        MessageClass::Request | MessageClass::Indication => return Err(wrong_type(datagram)),
    }
    check_comprehension_required(&message, &RESPONSE_ATTRIBUTES)?;
    let stun_transaction_id = message.transaction_id();
    let mapped = match message.attribute::<XorMappedAddress>() {
        Ok(xor_mapped) => xor_mapped.addr(stun_transaction_id),
        Err(StunParseError::MissingAttribute(_)) => match message.raw_attribute(MAPPED_ADDRESS) {
            Some(raw) => MappedSocketAddr::from_raw(&raw)
                .map_err(|_| StunError::Malformed {
                    reason: "invalid MAPPED-ADDRESS",
                })?
                .addr(),
            None => return Err(StunError::NoMappedAddress),
        },
        Err(_) => {
            return Err(StunError::Malformed {
                reason: "invalid XOR-MAPPED-ADDRESS",
            })
        }
    };
    if mapped.ip().is_unspecified() || mapped.port() == 0 {
        return Err(StunError::Malformed {
            reason: "unspecified mapped address",
        });
    }
    Ok(BindingResponse {
        transaction_id: TransactionId::from_stun(stun_transaction_id),
        mapped,
    })
}

/// The server-side Binding responder (RFC 8489 §6.3.1), stateless, so retransmitted requests
/// get identical answers.
///
/// For a valid Binding request from `source`, writes a success response with
/// XOR-MAPPED-ADDRESS = `source` (IPv4-mapped IPv6 reported as IPv4) and FINGERPRINT into `out` (replacing its contents) and returns
/// the request's transaction ID. Anything else is an error and leaves `out` empty: the datagram
/// must then be dropped, not answered. FINGERPRINT is checked when present but not required.
///
/// A request with comprehension-required attributes the responder does not know (an ICE
/// check with PRIORITY, say) is answered with a 420 (Unknown Attribute) error response
/// listing them (RFC 8489 §6.3.1), with FINGERPRINT, when that answer is no larger than the
/// request: the responder never sends more octets than it received, so it is no amplifier.
/// Otherwise the request is dropped ([`StunError::UnknownComprehensionRequired`]).
pub fn answer_binding_request(
    request: &[u8],
    source: SocketAddr,
    out: &mut Vec<u8>,
) -> Result<TransactionId, StunError> {
    out.clear();
    let message = parse(request)?;
    let message_type = message.get_type();
    if !message_type.has_method(BINDING) || !message_type.has_class(MessageClass::Request) {
        return Err(wrong_type(request));
    }
    let transaction_id = TransactionId::from_stun(message.transaction_id());
    if let Err(unknown) = check_comprehension_required(&message, &REQUEST_ATTRIBUTES) {
        let mut attributes = UnknownAttributes::new(&[]);
        let unknown_types = message
            .iter_attributes()
            .map(|(_offset, attribute)| attribute.get_type())
            .filter(|t| t.comprehension_required() && !REQUEST_ATTRIBUTES.contains(t));
        for t in unknown_types.take(MAX_UNKNOWN_LISTED) {
            attributes.add_attribute(t);
        }
        write_unknown_attributes(transaction_id, &attributes, out);
        if out.is_empty() || out.len() > request.len() {
            out.clear();
            return Err(unknown);
        }
        return Ok(transaction_id);
    }
    // A dual-stack socket reports IPv4 peers as IPv4-mapped IPv6; on the wire they are IPv4.
    write_binding(
        MessageClass::Success,
        transaction_id,
        Some(canonical(source)),
        out,
    );
    Ok(transaction_id)
}

/// Header check, then full parse (which verifies FINGERPRINT when present).
fn parse(datagram: &[u8]) -> Result<Message<'_>, StunError> {
    if !is_stun(datagram) {
        return Err(StunError::NotStun);
    }
    Message::from_bytes(datagram).map_err(StunError::from_parse)
}

fn wrong_type(datagram: &[u8]) -> StunError {
    let message_type = match datagram {
        [first, second, ..] => u16::from_be_bytes([*first, *second]),
        _ => 0,
    };
    StunError::WrongMessageType { message_type }
}

/// Rejects messages with comprehension-required attributes outside `understood`. Attributes
/// after MESSAGE-INTEGRITY or FINGERPRINT are not iterated: RFC 8489 says to ignore them.
fn check_comprehension_required(
    message: &Message<'_>,
    understood: &[AttributeType],
) -> Result<(), StunError> {
    match message
        .iter_attributes()
        .map(|(_offset, attribute)| attribute.get_type())
        .find(|t| t.comprehension_required() && !understood.contains(t))
    {
        Some(attribute) => Err(StunError::UnknownComprehensionRequired {
            attribute: attribute.value(),
        }),
        None => Ok(()),
    }
}

/// Writes a Binding message of `class` with an optional XOR-MAPPED-ADDRESS and FINGERPRINT.
fn write_binding(
    class: MessageClass,
    transaction_id: TransactionId,
    xor_mapped: Option<SocketAddr>,
    out: &mut Vec<u8>,
) {
    out.clear();
    let stun_transaction_id = transaction_id.to_stun();
    let mut buf = [0; MAX_MESSAGE_LEN];
    let mut writer = Message::builder(
        MessageType::from_class_method(class, BINDING),
        stun_transaction_id,
        MessageWriteMutSlice::new(&mut buf),
    );
    if let Some(addr) = xor_mapped {
        writer
            .add_attribute(&XorMappedAddress::new(addr, stun_transaction_id))
            // Invariant: MAX_MESSAGE_LEN fits the header and the longest (IPv6) address, and
            // neither MESSAGE-INTEGRITY nor FINGERPRINT has been added yet.
            .expect("XOR-MAPPED-ADDRESS fits and comes first");
    }
    writer
        .add_fingerprint()
        // Invariant: MAX_MESSAGE_LEN leaves room for FINGERPRINT, which is added only here.
        .expect("FINGERPRINT fits and is added once");
    let len = writer.finish();
    // `finish` returns bytes written into `buf`, never more than its length.
    out.extend_from_slice(buf.get(..len).unwrap_or_default());
}

/// Writes a Binding error response 420 (Unknown Attribute) listing `unknown`, with
/// FINGERPRINT.
fn write_unknown_attributes(
    transaction_id: TransactionId,
    unknown: &UnknownAttributes,
    out: &mut Vec<u8>,
) {
    out.clear();
    let stun_transaction_id = transaction_id.to_stun();
    // Header, ERROR-CODE with its reason, MAX_UNKNOWN_LISTED types, FINGERPRINT.
    let mut buf = [0; HEADER_LEN + 28 + 4 + 2 * MAX_UNKNOWN_LISTED + 8];
    let mut writer = Message::builder(
        MessageType::from_class_method(MessageClass::Error, BINDING),
        stun_transaction_id,
        MessageWriteMutSlice::new(&mut buf),
    );
    let written = ErrorCode::new(ErrorCode::UNKNOWN_ATTRIBUTE, "Unknown Attribute")
        .map_err(drop)
        .and_then(|code| writer.add_attribute(&code).map_err(drop))
        .and_then(|()| writer.add_attribute(unknown).map_err(drop))
        .and_then(|()| writer.add_fingerprint().map_err(drop));
    if written.is_ok() {
        let len = writer.finish();
        out.extend_from_slice(buf.get(..len).unwrap_or_default());
    }
}

/// Maps IPv4-mapped IPv6 addresses (from dual-stack sockets) to IPv4 so that they compare
/// equal to the configured server address.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Configuration of a [`NatDiscovery`] run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatDiscoveryConfig {
    /// STUN servers to ask, in order of preference. Only the first
    /// [`MAX_SERVERS`](Self::MAX_SERVERS) distinct addresses are used. To detect a mapping that
    /// depends on the destination, give at least two servers with different IP addresses.
    pub servers: Vec<SocketAddr>,
    /// Retransmission timeout after the first request to a server; it doubles after each
    /// retransmission (RFC 8489 §6.2.1). Clamped to 1 ms..=60 s.
    pub initial_rto: Duration,
    /// Cap on the doubled retransmission timeout. Clamped to `initial_rto`..=60 s.
    pub max_rto: Duration,
    /// Requests sent to one server (first one included) before it is given up on, one RTO after
    /// the last. Clamped to 1..=16.
    pub max_transmissions: u32,
}

impl NatDiscoveryConfig {
    /// Most servers one run asks.
    pub const MAX_SERVERS: usize = 8;
    /// Default [`initial_rto`](Self::initial_rto).
    pub const DEFAULT_INITIAL_RTO: Duration = Duration::from_millis(250);
    /// Default [`max_rto`](Self::max_rto).
    pub const DEFAULT_MAX_RTO: Duration = Duration::from_secs(2);
    /// Default [`max_transmissions`](Self::max_transmissions).
    pub const DEFAULT_MAX_TRANSMISSIONS: u32 = 5;

    const MIN_RTO: Duration = Duration::from_millis(1);
    const MAX_RTO_LIMIT: Duration = Duration::from_secs(60);
    const MAX_TRANSMISSIONS_LIMIT: u32 = 16;

    /// Default timers for the given servers.
    pub fn new(servers: Vec<SocketAddr>) -> Self {
        Self {
            servers,
            initial_rto: Self::DEFAULT_INITIAL_RTO,
            max_rto: Self::DEFAULT_MAX_RTO,
            max_transmissions: Self::DEFAULT_MAX_TRANSMISSIONS,
        }
    }
}

impl Default for NatDiscoveryConfig {
    /// No servers and default timers.
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

/// A datagram [`NatDiscovery::poll_transmit`] wrote into the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StunTransmit {
    /// Where to send it: the server address as configured.
    pub destination: SocketAddr,
}

/// Outcome of a [`NatDiscovery`] run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatReport {
    /// `(server, mapped)` for every server that answered, in configuration order.
    pub mappings: Vec<(SocketAddr, SocketAddr)>,
}

impl NatReport {
    /// Our server-reflexive address: the mapping most servers agree on, ties going to the
    /// server configured first. `None` if no server answered.
    #[must_use]
    pub fn public_address(&self) -> Option<SocketAddr> {
        let mut best: Option<(usize, SocketAddr)> = None;
        for (_, mapped) in &self.mappings {
            let votes = self.mappings.iter().filter(|(_, m)| m == mapped).count();
            if best.is_none_or(|(best_votes, _)| votes > best_votes) {
                best = Some((votes, *mapped));
            }
        }
        best.map(|(_, mapped)| mapped)
    }

    /// Whether servers saw different mappings, i.e. the NAT's mapping depends on the
    /// destination (RFC 4787 "address and port-dependent mapping", a symmetric NAT).
    ///
    /// Only servers of the same address family are compared (an IPv6 server cannot see our
    /// IPv4 mapping). `None` when no two such servers answered.
    #[must_use]
    pub fn mapping_varies_by_destination(&self) -> Option<bool> {
        let mut compared = false;
        for (i, (server_a, mapped_a)) in self.mappings.iter().enumerate() {
            for (server_b, mapped_b) in self.mappings.iter().skip(i + 1) {
                if server_a.is_ipv4() == server_b.is_ipv4() {
                    if mapped_a != mapped_b {
                        return Some(true);
                    }
                    compared = true;
                }
            }
        }
        compared.then_some(false)
    }
}

/// What [`NatDiscovery::poll_event`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NatEvent {
    /// `server` saw us at `mapped`.
    Mapped {
        /// The STUN server, as configured.
        server: SocketAddr,
        /// Our address as that server saw it.
        mapped: SocketAddr,
    },
    /// `server` answered with a Binding error response; it is not asked again.
    ServerFailed {
        /// The STUN server, as configured.
        server: SocketAddr,
        /// The ERROR-CODE, if the response carried a well-formed one.
        error_code: Option<u16>,
    },
    /// `server` did not answer any of the transmissions.
    ServerTimedOut {
        /// The STUN server, as configured.
        server: SocketAddr,
    },
    /// Every server has answered, failed or timed out; emitted once, last.
    Finished(NatReport),
}

/// Counters of a [`NatDiscovery`] run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatDiscoveryStats {
    /// Binding requests written by `poll_transmit`, retransmissions included.
    pub requests_sent: u64,
    /// Of `requests_sent`, retransmissions.
    pub retransmissions: u64,
    /// Success responses that produced a mapping.
    pub responses_accepted: u64,
    /// Error responses that ended a server's transaction.
    pub error_responses: u64,
    /// Valid responses to a transaction that had already ended (answers to retransmissions,
    /// answers after the timeout); consumed and ignored.
    pub late_responses: u64,
    /// Inputs dropped because no request with that transaction ID went to that address.
    pub dropped_unsolicited: u64,
    /// Inputs dropped because they are not a valid Binding response.
    pub dropped_invalid: u64,
}

#[derive(Debug, Clone, Copy)]
enum ProbeState {
    /// A (re)transmission waits for the next `poll_transmit`.
    TransmitDue,
    /// Sent; retransmit or give up at `deadline`.
    AwaitingResponse {
        deadline: Instant,
    },
    Mapped(SocketAddr),
    Failed,
    TimedOut,
}

/// One Binding transaction with one server; retransmissions reuse its transaction ID.
#[derive(Debug)]
struct Probe {
    server: SocketAddr,
    transaction_id: TransactionId,
    transmissions: u32,
    state: ProbeState,
}

impl Probe {
    fn is_done(&self) -> bool {
        matches!(
            self.state,
            ProbeState::Mapped(_) | ProbeState::Failed | ProbeState::TimedOut
        )
    }
}

/// Sans-IO NAT discovery: asks each configured STUN server for our mapped address, once and in
/// parallel, with retransmissions.
///
/// It has the shape of every state machine of the crate (see [the crate docs](crate)). Call
/// order: after construction and after any input
/// ([`handle_input`](Self::handle_input), [`handle_timeout`](Self::handle_timeout)), drain the
/// polls until [`poll_transmit`](Self::poll_transmit) and [`poll_event`](Self::poll_event)
/// return `None`, then arm a timer for [`poll_timeout`](Self::poll_timeout) and call
/// `handle_timeout` when it fires. The run ends with [`NatEvent::Finished`].
///
/// Every server gets up to `max_transmissions` requests, `initial_rto` apart and doubling up to
/// `max_rto` (defaults: sends at 0, 250, 750, 1750, 3750 ms; gives up at 5750 ms).
#[derive(Debug)]
pub struct NatDiscovery {
    config: NatDiscoveryConfig,
    probes: Vec<Probe>,
    events: VecDeque<NatEvent>,
    report: Option<NatReport>,
    stats: NatDiscoveryStats,
    /// Latest time seen; a caller's clock going backwards does not move deadlines back.
    now: Instant,
}

impl NatDiscovery {
    /// Starts a run. Transaction IDs come from a ChaCha20 generator seeded with `rng_seed`,
    /// which should itself be random so that off-path attackers cannot forge responses.
    pub fn new(config: NatDiscoveryConfig, rng_seed: [u8; 32], now: Instant) -> Self {
        let mut rng = ChaCha20Rng::from_seed(rng_seed);
        let initial_rto = config.initial_rto.clamp(
            NatDiscoveryConfig::MIN_RTO,
            NatDiscoveryConfig::MAX_RTO_LIMIT,
        );
        let config = NatDiscoveryConfig {
            initial_rto,
            max_rto: config
                .max_rto
                .clamp(initial_rto, NatDiscoveryConfig::MAX_RTO_LIMIT),
            max_transmissions: config
                .max_transmissions
                .clamp(1, NatDiscoveryConfig::MAX_TRANSMISSIONS_LIMIT),
            servers: config.servers,
        };
        let mut probes: Vec<Probe> = Vec::new();
        for &server in &config.servers {
            if probes.len() == NatDiscoveryConfig::MAX_SERVERS {
                break;
            }
            // Responses are matched by source address, so each server is asked once.
            if probes
                .iter()
                .any(|p| canonical(p.server) == canonical(server))
            {
                continue;
            }
            probes.push(Probe {
                server,
                transaction_id: TransactionId::from_rng(&mut rng),
                transmissions: 0,
                state: ProbeState::TransmitDue,
            });
        }
        let mut discovery = Self {
            config,
            probes,
            events: VecDeque::new(),
            report: None,
            stats: NatDiscoveryStats::default(),
            now,
        };
        discovery.finish_if_done();
        discovery
    }

    /// Feeds a datagram received from `from`. Returns true if it was a response to one of this
    /// run's transactions and has been consumed (including late duplicates); false if it was
    /// dropped, so the caller may try it as something else.
    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> bool {
        self.advance_clock(now);
        // Cheap matching first, so that unsolicited traffic is not fully parsed.
        let Some(received_id) = datagram
            .get(8..HEADER_LEN)
            .filter(|_| is_stun(datagram))
            .and_then(|id| <[u8; 12]>::try_from(id).ok())
        else {
            self.stats.dropped_invalid += 1;
            return false;
        };
        let from = canonical(from);
        let Some(index) = self.probes.iter().position(|p| {
            p.transmissions > 0 && p.transaction_id.0 == received_id && canonical(p.server) == from
        }) else {
            self.stats.dropped_unsolicited += 1;
            return false;
        };
        let outcome = decode_binding_response(datagram);
        let probe = &mut self.probes[index];
        if probe.is_done() {
            if matches!(outcome, Ok(_) | Err(StunError::ErrorResponse { .. })) {
                self.stats.late_responses += 1;
                return true;
            }
            self.stats.dropped_invalid += 1;
            return false;
        }
        match outcome {
            Ok(response) => {
                probe.state = ProbeState::Mapped(response.mapped);
                self.stats.responses_accepted += 1;
                self.events.push_back(NatEvent::Mapped {
                    server: probe.server,
                    mapped: response.mapped,
                });
            }
            Err(StunError::ErrorResponse { code }) => {
                probe.state = ProbeState::Failed;
                self.stats.error_responses += 1;
                self.events.push_back(NatEvent::ServerFailed {
                    server: probe.server,
                    error_code: code,
                });
            }
            Err(_) => {
                // RFC 8489 §6.3: invalid messages are discarded; the transaction goes on.
                self.stats.dropped_invalid += 1;
                return false;
            }
        }
        self.finish_if_done();
        true
    }

    /// Advances timers: schedules due retransmissions and gives up on servers that used all of
    /// theirs.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance_clock(now);
        let max_transmissions = self.config.max_transmissions;
        for probe in &mut self.probes {
            let ProbeState::AwaitingResponse { deadline } = probe.state else {
                continue;
            };
            if deadline > self.now {
                continue;
            }
            if probe.transmissions < max_transmissions {
                probe.state = ProbeState::TransmitDue;
            } else {
                probe.state = ProbeState::TimedOut;
                self.events.push_back(NatEvent::ServerTimedOut {
                    server: probe.server,
                });
            }
        }
        self.finish_if_done();
    }

    /// Writes the next due Binding request into `buf` (cleared first) and returns where to send
    /// it; `None` (with `buf` untouched) when nothing is due.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<StunTransmit> {
        self.advance_clock(now);
        let now = self.now;
        let probe = self
            .probes
            .iter_mut()
            .find(|p| matches!(p.state, ProbeState::TransmitDue))?;
        encode_binding_request(probe.transaction_id, buf);
        probe.transmissions += 1;
        let rto = rto(&self.config, probe.transmissions);
        // Overflow only for an Instant near the end of time; then give up at once.
        let deadline = now.checked_add(rto).unwrap_or(now);
        probe.state = ProbeState::AwaitingResponse { deadline };
        self.stats.requests_sent += 1;
        if probe.transmissions > 1 {
            self.stats.retransmissions += 1;
        }
        Some(StunTransmit {
            destination: probe.server,
        })
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called; `None` when no
    /// timer is running.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.probes
            .iter()
            .filter_map(|p| match p.state {
                ProbeState::AwaitingResponse { deadline } => Some(deadline),
                _ => None,
            })
            .min()
    }

    /// The next event, in the order they happened.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<NatEvent> {
        self.events.pop_front()
    }

    /// Whether every server has answered, failed or timed out.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.report.is_some()
    }

    /// The final report, once [finished](Self::is_finished).
    #[must_use]
    pub fn report(&self) -> Option<&NatReport> {
        self.report.as_ref()
    }

    /// Counters so far.
    #[must_use]
    pub fn stats(&self) -> NatDiscoveryStats {
        self.stats
    }

    fn advance_clock(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    fn finish_if_done(&mut self) {
        if self.report.is_some() || !self.probes.iter().all(Probe::is_done) {
            return;
        }
        let mappings = self
            .probes
            .iter()
            .filter_map(|p| match p.state {
                ProbeState::Mapped(mapped) => Some((p.server, mapped)),
                _ => None,
            })
            .collect();
        let report = NatReport { mappings };
        self.events.push_back(NatEvent::Finished(report.clone()));
        self.report = Some(report);
    }
}

/// Timeout after the `transmissions`-th request: `initial_rto` doubled per retransmission,
/// capped at `max_rto`.
fn rto(config: &NatDiscoveryConfig, transmissions: u32) -> Duration {
    let doublings = transmissions.saturating_sub(1).min(31);
    config
        .initial_rto
        .saturating_mul(1 << doublings)
        .min(config.max_rto)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun_types::attribute::{AttributeWrite, RawAttribute, Software};
    use stun_types::message::{
        IntegrityAlgorithm, MessageIntegrityCredentials, MessageWriteVec, ShortTermCredentials,
    };

    const RFC5769_TRANSACTION_ID: TransactionId = TransactionId([
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ]);
    const RFC5769_PASSWORD: &str = "VOkJxbRl1RmTxUk/WvJxBt";

    /// RFC 5769 §2.1 sample request.
    #[rustfmt::skip]
    const RFC5769_REQUEST: [u8; 108] = [
        0x00, 0x01, 0x00, 0x58, // Request type and message length
        0x21, 0x12, 0xa4, 0x42, // Magic cookie
        0xb7, 0xe7, 0xa7, 0x01, // }
        0xbc, 0x34, 0xd6, 0x86, // }  Transaction ID
        0xfa, 0x87, 0xdf, 0xae, // }
        0x80, 0x22, 0x00, 0x10, // SOFTWARE attribute header
        0x53, 0x54, 0x55, 0x4e, // }
        0x20, 0x74, 0x65, 0x73, // }  User-agent...
        0x74, 0x20, 0x63, 0x6c, // }  ...name
        0x69, 0x65, 0x6e, 0x74, // }
        0x00, 0x24, 0x00, 0x04, // PRIORITY attribute header
        0x6e, 0x00, 0x01, 0xff, // ICE priority value
        0x80, 0x29, 0x00, 0x08, // ICE-CONTROLLED attribute header
        0x93, 0x2f, 0xf9, 0xb1, // }  Pseudo-random tie breaker...
        0x51, 0x26, 0x3b, 0x36, // }   ...for ICE control
        0x00, 0x06, 0x00, 0x09, // USERNAME attribute header
        0x65, 0x76, 0x74, 0x6a, // }
        0x3a, 0x68, 0x36, 0x76, // }  Username (9 bytes) and padding (3 bytes)
        0x59, 0x20, 0x20, 0x20, // }
        0x00, 0x08, 0x00, 0x14, // MESSAGE-INTEGRITY attribute header
        0x9a, 0xea, 0xa7, 0x0c, // }
        0xbf, 0xd8, 0xcb, 0x56, // }
        0x78, 0x1e, 0xf2, 0xb5, // }  HMAC-SHA1 fingerprint
        0xb2, 0xd3, 0xf2, 0x49, // }
        0xc1, 0xb5, 0x71, 0xa2, // }
        0x80, 0x28, 0x00, 0x04, // FINGERPRINT attribute header
        0xe5, 0x7a, 0x3b, 0xcf, // CRC32 fingerprint
    ];

    /// RFC 5769 §2.2 sample IPv4 response.
    #[rustfmt::skip]
    const RFC5769_RESPONSE_IPV4: [u8; 80] = [
        0x01, 0x01, 0x00, 0x3c, // Response type and message length
        0x21, 0x12, 0xa4, 0x42, // Magic cookie
        0xb7, 0xe7, 0xa7, 0x01, // }
        0xbc, 0x34, 0xd6, 0x86, // }  Transaction ID
        0xfa, 0x87, 0xdf, 0xae, // }
        0x80, 0x22, 0x00, 0x0b, // SOFTWARE attribute header
        0x74, 0x65, 0x73, 0x74, // }
        0x20, 0x76, 0x65, 0x63, // }  UTF-8 server name
        0x74, 0x6f, 0x72, 0x20, // }
        0x00, 0x20, 0x00, 0x08, // XOR-MAPPED-ADDRESS attribute header
        0x00, 0x01, 0xa1, 0x47, // Address family (IPv4) and xor'd mapped port number
        0xe1, 0x12, 0xa6, 0x43, // Xor'd mapped IPv4 address
        0x00, 0x08, 0x00, 0x14, // MESSAGE-INTEGRITY attribute header
        0x2b, 0x91, 0xf5, 0x99, // }
        0xfd, 0x9e, 0x90, 0xc3, // }
        0x8c, 0x74, 0x89, 0xf9, // }  HMAC-SHA1 fingerprint
        0x2a, 0xf9, 0xba, 0x53, // }
        0xf0, 0x6b, 0xe7, 0xd7, // }
        0x80, 0x28, 0x00, 0x04, // FINGERPRINT attribute header
        0xc0, 0x7d, 0x4c, 0x96, // CRC32 fingerprint
    ];

    /// RFC 5769 §2.3 sample IPv6 response.
    #[rustfmt::skip]
    const RFC5769_RESPONSE_IPV6: [u8; 92] = [
        0x01, 0x01, 0x00, 0x48, // Response type and message length
        0x21, 0x12, 0xa4, 0x42, // Magic cookie
        0xb7, 0xe7, 0xa7, 0x01, // }
        0xbc, 0x34, 0xd6, 0x86, // }  Transaction ID
        0xfa, 0x87, 0xdf, 0xae, // }
        0x80, 0x22, 0x00, 0x0b, // SOFTWARE attribute header
        0x74, 0x65, 0x73, 0x74, // }
        0x20, 0x76, 0x65, 0x63, // }  UTF-8 server name
        0x74, 0x6f, 0x72, 0x20, // }
        0x00, 0x20, 0x00, 0x14, // XOR-MAPPED-ADDRESS attribute header
        0x00, 0x02, 0xa1, 0x47, // Address family (IPv6) and xor'd mapped port number
        0x01, 0x13, 0xa9, 0xfa, // }
        0xa5, 0xd3, 0xf1, 0x79, // }  Xor'd mapped IPv6 address
        0xbc, 0x25, 0xf4, 0xb5, // }
        0xbe, 0xd2, 0xb9, 0xd9, // }
        0x00, 0x08, 0x00, 0x14, // MESSAGE-INTEGRITY attribute header
        0xa3, 0x82, 0x95, 0x4e, // }
        0x4b, 0xe6, 0x7b, 0xf1, // }
        0x17, 0x84, 0xc9, 0x7c, // }  HMAC-SHA1 fingerprint
        0x82, 0x92, 0xc2, 0x75, // }
        0xbf, 0xe3, 0xed, 0x41, // }
        0x80, 0x28, 0x00, 0x04, // FINGERPRINT attribute header
        0xc8, 0xfb, 0x0b, 0x4c, // CRC32 fingerprint
    ];

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address parses")
    }

    fn short_term_credentials(password: &str) -> MessageIntegrityCredentials {
        MessageIntegrityCredentials::ShortTerm(ShortTermCredentials::new(password.to_owned()))
    }

    /// Builds a Binding message with the given class and raw attributes (and FINGERPRINT if
    /// asked), for inputs the module itself never writes.
    fn build(
        class: MessageClass,
        id: TransactionId,
        attributes: &[RawAttribute<'_>],
        fingerprint: bool,
    ) -> Vec<u8> {
        let mut writer = Message::builder(
            MessageType::from_class_method(class, BINDING),
            id.to_stun(),
            MessageWriteVec::new(),
        );
        for attribute in attributes {
            writer
                .add_attribute(attribute)
                .expect("test attribute fits");
        }
        if fingerprint {
            writer.add_fingerprint().expect("test fingerprint fits");
        }
        writer.finish()
    }

    #[test]
    fn rfc5769_request_is_a_binding_request_with_valid_integrity() {
        assert!(is_stun(&RFC5769_REQUEST));
        let message = Message::from_bytes(&RFC5769_REQUEST).expect("FINGERPRINT verifies");
        assert!(message.has_class(MessageClass::Request));
        assert!(message.has_method(BINDING));
        assert_eq!(
            TransactionId::from_stun(message.transaction_id()),
            RFC5769_TRANSACTION_ID
        );
        assert!(matches!(
            message.validate_integrity(&short_term_credentials(RFC5769_PASSWORD)),
            Ok(IntegrityAlgorithm::Sha1)
        ));
        assert!(message
            .validate_integrity(&short_term_credentials("wrong password"))
            .is_err());

        // It is an ICE check: PRIORITY is comprehension-required and unknown to the responder.
        // It gets a 420 (RFC 8489 §6.3.1) naming PRIORITY, no larger than the request.
        let mut out = vec![0xff];
        assert_eq!(
            answer_binding_request(&RFC5769_REQUEST, addr("192.0.2.1:32853"), &mut out),
            Ok(RFC5769_TRANSACTION_ID)
        );
        assert!(out.len() <= RFC5769_REQUEST.len());
        let answer = Message::from_bytes(&out).expect("FINGERPRINT verifies");
        assert!(answer.has_class(MessageClass::Error) && answer.has_method(BINDING));
        let code = answer.attribute::<ErrorCode>().expect("ERROR-CODE");
        assert_eq!(code.code(), ErrorCode::UNKNOWN_ATTRIBUTE);
        let unknown = answer
            .attribute::<UnknownAttributes>()
            .expect("UNKNOWN-ATTRIBUTES");
        assert!(unknown.has_attribute(AttributeType::new(0x0024)));
        assert_eq!(
            decode_binding_response(&out),
            Err(StunError::ErrorResponse { code: Some(420) })
        );
        assert_eq!(
            decode_binding_response(&RFC5769_REQUEST),
            Err(StunError::WrongMessageType {
                message_type: 0x0001
            })
        );
    }

    #[test]
    fn rfc5769_responses_decode_to_the_sample_addresses() {
        for (datagram, mapped) in [
            (&RFC5769_RESPONSE_IPV4[..], addr("192.0.2.1:32853")),
            (
                &RFC5769_RESPONSE_IPV6[..],
                addr("[2001:db8:1234:5678:11:2233:4455:6677]:32853"),
            ),
        ] {
            assert!(is_stun(datagram));
            assert_eq!(
                decode_binding_response(datagram),
                Ok(BindingResponse {
                    transaction_id: RFC5769_TRANSACTION_ID,
                    mapped
                })
            );
            let message = Message::from_bytes(datagram).expect("sample parses");
            assert!(message
                .validate_integrity(&short_term_credentials(RFC5769_PASSWORD))
                .is_ok());

            // FINGERPRINT covers everything before it, and is itself checked.
            let last = datagram.len() - 1;
            for index in [21, 40, 60, last] {
                let mut corrupted = datagram.to_vec();
                corrupted[index] ^= 0x01;
                assert_eq!(
                    decode_binding_response(&corrupted),
                    Err(StunError::BadFingerprint),
                    "flip at {index}"
                );
            }
        }
    }

    #[test]
    fn encoded_request_is_a_fingerprinted_binding_request() {
        let id = TransactionId([7; 12]);
        let mut out = vec![0xaa; 100];
        encode_binding_request(id, &mut out);
        assert_eq!(out.len(), HEADER_LEN + 8, "header and FINGERPRINT only");
        assert!(is_stun(&out));
        let message = Message::from_bytes(&out).expect("own request parses");
        assert!(message.has_class(MessageClass::Request));
        assert!(message.has_method(BINDING));
        assert!(message.has_attribute(stun_types::attribute::Fingerprint::TYPE));
        assert_eq!(TransactionId::from_stun(message.transaction_id()), id);
    }

    #[test]
    fn answered_request_decodes_to_the_source_address() {
        for source in [addr("198.51.100.7:40000"), addr("[2001:db8::42]:1")] {
            let id = TransactionId(*b"tscf-stun-01");
            let mut request = Vec::new();
            encode_binding_request(id, &mut request);
            let mut response = vec![1, 2, 3];
            assert_eq!(
                answer_binding_request(&request, source, &mut response),
                Ok(id)
            );
            assert!(is_stun(&response));
            let message = Message::from_bytes(&response).expect("own response parses");
            assert!(message.has_attribute(stun_types::attribute::Fingerprint::TYPE));
            assert!(!message.has_attribute(MAPPED_ADDRESS));
            assert_eq!(
                decode_binding_response(&response),
                Ok(BindingResponse {
                    transaction_id: id,
                    mapped: source
                })
            );
        }
    }

    #[test]
    fn responder_rejects_everything_but_binding_requests() {
        let id = TransactionId([3; 12]);
        let source = addr("203.0.113.5:5000");
        let mut out = Vec::new();

        // Without FINGERPRINT, with a comprehension-optional attribute: answered.
        let dual_stack_source = addr("[::ffff:203.0.113.5]:5000");
        let mut request = Vec::new();
        encode_binding_request(id, &mut request);
        assert_eq!(
            answer_binding_request(&request, dual_stack_source, &mut out),
            Ok(id)
        );
        assert_eq!(decode_binding_response(&out).map(|r| r.mapped), Ok(source));

        let software = Software::new("client").expect("short SOFTWARE");
        let plain = build(
            MessageClass::Request,
            id,
            &[RawAttribute::from(&software)],
            false,
        );
        assert_eq!(answer_binding_request(&plain, source, &mut out), Ok(id));

        for class in [
            MessageClass::Indication,
            MessageClass::Success,
            MessageClass::Error,
        ] {
            let message = build(class, id, &[], true);
            assert!(matches!(
                answer_binding_request(&message, source, &mut out),
                Err(StunError::WrongMessageType { .. })
            ));
            assert!(out.is_empty());
        }

        // Allocate (TURN, method 0x003) request.
        let mut allocate = build(MessageClass::Request, id, &[], false);
        allocate[1] = 0x03;
        assert_eq!(
            answer_binding_request(&allocate, source, &mut out),
            Err(StunError::WrongMessageType {
                message_type: 0x0003
            })
        );

        // CHANGE-REQUEST (RFC 5780) is comprehension-required and not supported; this request
        // is shorter than a 420 would be, so it is dropped rather than answered.
        let change_request = RawAttribute::new(AttributeType::new(0x0003), &[0, 0, 0, 6]);
        let message = build(MessageClass::Request, id, &[change_request], true);
        assert_eq!(
            answer_binding_request(&message, source, &mut out),
            Err(StunError::UnknownComprehensionRequired { attribute: 0x0003 })
        );

        let last = request.len() - 1;
        request[last] ^= 0x80;
        assert_eq!(
            answer_binding_request(&request, source, &mut out),
            Err(StunError::BadFingerprint)
        );
        assert_eq!(
            answer_binding_request(b"\x04not stun at all, an envelope", source, &mut out),
            Err(StunError::NotStun)
        );
        assert!(out.is_empty());
    }

    #[test]
    fn decoder_falls_back_to_mapped_address_and_reports_failures() {
        let id = TransactionId([9; 12]);
        let mapped = addr("192.0.2.77:6000");
        let legacy = MappedSocketAddr::new(mapped);
        let message = build(
            MessageClass::Success,
            id,
            &[legacy.to_raw(MAPPED_ADDRESS)],
            false,
        );
        assert_eq!(
            decode_binding_response(&message),
            Ok(BindingResponse {
                transaction_id: id,
                mapped
            })
        );

        // XOR-MAPPED-ADDRESS wins over MAPPED-ADDRESS.
        let xor_mapped = XorMappedAddress::new(addr("192.0.2.78:6001"), id.to_stun());
        let message = build(
            MessageClass::Success,
            id,
            &[legacy.to_raw(MAPPED_ADDRESS), xor_mapped.to_raw()],
            true,
        );
        assert_eq!(
            decode_binding_response(&message).map(|r| r.mapped),
            Ok(addr("192.0.2.78:6001"))
        );

        let software = Software::new("server").expect("short SOFTWARE");
        let message = build(MessageClass::Success, id, &[software.to_raw()], true);
        assert_eq!(
            decode_binding_response(&message),
            Err(StunError::NoMappedAddress)
        );

        let error = ErrorCode::new(420, "Unknown Attribute").expect("valid ERROR-CODE");
        let message = build(MessageClass::Error, id, &[error.to_raw()], true);
        assert_eq!(
            decode_binding_response(&message),
            Err(StunError::ErrorResponse { code: Some(420) })
        );

        // An unknown comprehension-required attribute voids a success response.
        let unknown = RawAttribute::new(AttributeType::new(0x7777), &[1, 2, 3, 4]);
        let message = build(
            MessageClass::Success,
            id,
            &[xor_mapped.to_raw(), unknown],
            true,
        );
        assert_eq!(
            decode_binding_response(&message),
            Err(StunError::UnknownComprehensionRequired { attribute: 0x7777 })
        );

        // Family 3 does not exist.
        let bad = RawAttribute::new(XorMappedAddress::TYPE, &[0, 3, 0, 1, 1, 2, 3, 4]);
        let message = build(MessageClass::Success, id, &[bad], true);
        assert!(matches!(
            decode_binding_response(&message),
            Err(StunError::Malformed { .. })
        ));

        let unspecified = MappedSocketAddr::new(addr("0.0.0.0:0"));
        let message = build(
            MessageClass::Success,
            id,
            &[unspecified.to_raw(MAPPED_ADDRESS)],
            true,
        );
        assert!(matches!(
            decode_binding_response(&message),
            Err(StunError::Malformed { .. })
        ));
    }

    #[test]
    fn is_stun_demultiplexes_the_shared_socket() {
        let mut request = Vec::new();
        encode_binding_request(TransactionId([1; 12]), &mut request);
        assert!(is_stun(&request));
        // tscf envelopes (4, 5), DTLS (20..=63), TURN channels (64..=79), QUIC (128..=191).
        for first in [4, 5, 20, 23, 64, 128, 0xc0] {
            let mut other = request.clone();
            other[0] = first;
            assert!(!is_stun(&other), "first byte {first}");
        }
        let mut wrong_cookie = request.clone();
        wrong_cookie[7] ^= 1;
        assert!(!is_stun(&wrong_cookie));
        assert_eq!(
            decode_binding_response(&wrong_cookie),
            Err(StunError::NotStun)
        );
        let mut longer = request.clone();
        longer.extend_from_slice(&[0; 4]);
        assert!(!is_stun(&longer), "declared length must cover exactly");
        let mut unaligned = request.clone();
        unaligned[3] += 1;
        unaligned.push(0);
        assert!(!is_stun(&unaligned), "length not a multiple of 4");
        assert!(!is_stun(&[]));
        assert!(!is_stun(&request[..HEADER_LEN - 1]));
    }

    #[test]
    fn truncated_messages_are_rejected() {
        for sample in [&RFC5769_RESPONSE_IPV4[..], &RFC5769_RESPONSE_IPV6[..]] {
            for len in 0..sample.len() {
                let truncated = &sample[..len];
                assert!(!is_stun(truncated));
                assert_eq!(decode_binding_response(truncated), Err(StunError::NotStun));
                // With the length field fixed up, a cut inside an attribute is malformed; a cut
                // between attributes drops the trailing ones (and with them FINGERPRINT).
                if len >= HEADER_LEN && len % 4 == 0 {
                    let fixed = with_body_length(truncated);
                    let result = decode_binding_response(&fixed);
                    assert!(
                        result.is_err() || result == decode_binding_response(sample),
                        "length {len}: {result:?}"
                    );
                }
            }
            // Inside XOR-MAPPED-ADDRESS, which starts at offset 36.
            for len in [40, 44] {
                assert!(matches!(
                    decode_binding_response(&with_body_length(&sample[..len])),
                    Err(StunError::Malformed { .. })
                ));
            }
            assert_eq!(
                decode_binding_response(&with_body_length(&sample[..36])),
                Err(StunError::NoMappedAddress)
            );
        }
    }

    fn with_body_length(message: &[u8]) -> Vec<u8> {
        let mut fixed = message.to_vec();
        let body = u16::try_from(message.len() - HEADER_LEN).expect("short sample");
        fixed[2..4].copy_from_slice(&body.to_be_bytes());
        fixed
    }

    #[test]
    fn random_and_mutated_input_never_yields_a_wrong_answer() {
        let mut rng = ChaCha20Rng::seed_from_u64(0x5eed);
        let source = addr("198.51.100.1:1234");
        let mut out = Vec::new();
        for _ in 0..2000 {
            let len = (rng.next_u32() % 128) as usize;
            let mut datagram = vec![0; len];
            rng.fill_bytes(&mut datagram);
            assert!(decode_binding_response(&datagram).is_err());
            assert!(answer_binding_request(&datagram, source, &mut out).is_err());

            // STUN-shaped: valid header, random attributes.
            let body = len & !3;
            let mut shaped = vec![0; HEADER_LEN + body];
            rng.fill_bytes(&mut shaped[HEADER_LEN..]);
            shaped[0] = (rng.next_u32() % 4) as u8;
            shaped[1] = 0x01;
            shaped[2..4].copy_from_slice(&(body as u16).to_be_bytes());
            shaped[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            let _ = decode_binding_response(&shaped);
            if answer_binding_request(&shaped, source, &mut out).is_ok() {
                assert_eq!(decode_binding_response(&out).map(|r| r.mapped), Ok(source));
            }
        }

        // Any single-byte change to a fingerprinted response is caught or harmless.
        let original = RFC5769_RESPONSE_IPV4;
        let expected = decode_binding_response(&original);
        for index in 0..original.len() {
            for _ in 0..8 {
                let mut mutated = original;
                mutated[index] ^= (rng.next_u32() % 255 + 1) as u8;
                let result = decode_binding_response(&mutated);
                assert!(
                    result.is_err() || result == expected,
                    "byte {index}: {result:?}"
                );
            }
        }
    }

    // --- NatDiscovery ---

    /// An arbitrary starting point: the state machine only ever compares and offsets instants.
    #[allow(clippy::disallowed_methods)]
    fn origin() -> Instant {
        Instant::now()
    }

    /// Answers every pending request of `discovery` as a STUN server at `server` would,
    /// seeing us at `mapped`. Returns how many it answered.
    fn serve(
        discovery: &mut NatDiscovery,
        now: Instant,
        answers: &[(SocketAddr, SocketAddr)],
    ) -> usize {
        let mut buf = Vec::new();
        let mut pending = Vec::new();
        while let Some(transmit) = discovery.poll_transmit(now, &mut buf) {
            pending.push((transmit.destination, buf.clone()));
        }
        let mut answered = 0;
        for (destination, request) in pending {
            if let Some((_, mapped)) = answers.iter().find(|(s, _)| *s == destination) {
                let mut response = Vec::new();
                answer_binding_request(&request, *mapped, &mut response)
                    .expect("own request is answered");
                assert!(discovery.handle_input(now, destination, &response));
                answered += 1;
            }
        }
        answered
    }

    fn events(discovery: &mut NatDiscovery) -> Vec<NatEvent> {
        std::iter::from_fn(|| discovery.poll_event()).collect()
    }

    const SERVER_A: &str = "192.0.2.10:3478";
    const SERVER_B: &str = "198.51.100.20:3478";

    #[test]
    fn same_mapping_from_two_servers_is_endpoint_independent() {
        let now = origin();
        let (a, b) = (addr(SERVER_A), addr(SERVER_B));
        let public = addr("203.0.113.9:50000");
        let mut discovery = NatDiscovery::new(NatDiscoveryConfig::new(vec![a, b]), [1; 32], now);
        assert_eq!(serve(&mut discovery, now, &[(a, public), (b, public)]), 2);
        let report = NatReport {
            mappings: vec![(a, public), (b, public)],
        };
        assert_eq!(
            events(&mut discovery),
            vec![
                NatEvent::Mapped {
                    server: a,
                    mapped: public
                },
                NatEvent::Mapped {
                    server: b,
                    mapped: public
                },
                NatEvent::Finished(report.clone()),
            ]
        );
        assert_eq!(report.mapping_varies_by_destination(), Some(false));
        assert_eq!(report.public_address(), Some(public));
        assert_eq!(discovery.report(), Some(&report));
        assert_eq!(discovery.poll_timeout(), None);
        let stats = discovery.stats();
        assert_eq!(stats.requests_sent, 2);
        assert_eq!(stats.responses_accepted, 2);
        assert_eq!(stats.retransmissions, 0);
    }

    #[test]
    fn different_ports_mean_a_symmetric_nat() {
        let now = origin();
        let (a, b) = (addr(SERVER_A), addr(SERVER_B));
        let c = addr("[2001:db8::3]:3478");
        let mut discovery = NatDiscovery::new(NatDiscoveryConfig::new(vec![a, b, c]), [2; 32], now);
        let answers = [
            (a, addr("203.0.113.9:50000")),
            (b, addr("203.0.113.9:50001")),
            (c, addr("[2001:db8::99]:50002")),
        ];
        assert_eq!(serve(&mut discovery, now, &answers), 3);
        let report = discovery.report().expect("all answered").clone();
        assert_eq!(report.mappings, answers.to_vec());
        assert_eq!(report.mapping_varies_by_destination(), Some(true));

        // The IPv6 mapping alone is not compared with the IPv4 ones.
        let mixed = NatReport {
            mappings: vec![answers[0], answers[2]],
        };
        assert_eq!(mixed.mapping_varies_by_destination(), None);
        assert_eq!(NatReport::default().public_address(), None);
        let majority = NatReport {
            mappings: vec![
                (a, addr("203.0.113.9:1")),
                (b, addr("203.0.113.9:2")),
                (c, addr("203.0.113.9:2")),
            ],
        };
        assert_eq!(majority.public_address(), Some(addr("203.0.113.9:2")));
    }

    #[test]
    fn silent_server_is_retransmitted_to_then_timed_out() {
        let start = origin();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let (a, b) = (addr(SERVER_A), addr(SERVER_B));
        let public = addr("203.0.113.9:50000");
        let mut discovery = NatDiscovery::new(NatDiscoveryConfig::new(vec![a, b]), [3; 32], start);
        assert_eq!(serve(&mut discovery, start, &[(b, public)]), 1);
        let mut buf = Vec::new();
        let mut first_request = None;
        // Sends at 0 (above), then 250, 750, 1750, 3750 ms; gives up at 5750 ms.
        for (deadline, retransmit) in [(250, true), (750, true), (1750, true), (3750, true)] {
            assert_eq!(discovery.poll_timeout(), Some(at(deadline)));
            discovery.handle_timeout(at(deadline - 1));
            assert!(discovery
                .poll_transmit(at(deadline - 1), &mut buf)
                .is_none());
            discovery.handle_timeout(at(deadline));
            assert_eq!(
                discovery.poll_transmit(at(deadline), &mut buf),
                Some(StunTransmit { destination: a }),
                "retransmission {retransmit} at {deadline} ms"
            );
            // Retransmissions repeat the transaction.
            assert_eq!(*first_request.get_or_insert_with(|| buf.clone()), buf);
            assert!(discovery.poll_transmit(at(deadline), &mut buf).is_none());
        }
        assert_eq!(discovery.poll_timeout(), Some(at(5750)));
        assert!(!discovery.is_finished());
        discovery.handle_timeout(at(5750));
        assert!(discovery.poll_transmit(at(5750), &mut buf).is_none());
        let report = NatReport {
            mappings: vec![(b, public)],
        };
        assert_eq!(
            events(&mut discovery),
            vec![
                NatEvent::Mapped {
                    server: b,
                    mapped: public
                },
                NatEvent::ServerTimedOut { server: a },
                NatEvent::Finished(report.clone()),
            ]
        );
        assert_eq!(report.mapping_varies_by_destination(), None);
        assert_eq!(report.public_address(), Some(public));
        assert_eq!(discovery.poll_timeout(), None);
        let stats = discovery.stats();
        assert_eq!(stats.requests_sent, 6);
        assert_eq!(stats.retransmissions, 4);

        // A late answer is recognised, counted and changes nothing.
        let mut response = Vec::new();
        answer_binding_request(
            first_request.as_deref().expect("sent"),
            public,
            &mut response,
        )
        .expect("own request");
        assert!(discovery.handle_input(at(6000), a, &response));
        assert_eq!(discovery.stats().late_responses, 1);
        assert_eq!(discovery.poll_event(), None);
    }

    #[test]
    fn unsolicited_responses_are_counted_and_ignored() {
        let now = origin();
        let (a, b) = (addr(SERVER_A), addr(SERVER_B));
        let mut discovery = NatDiscovery::new(NatDiscoveryConfig::new(vec![a]), [4; 32], now);
        let mut request = Vec::new();
        assert_eq!(
            discovery.poll_transmit(now, &mut request),
            Some(StunTransmit { destination: a })
        );
        let forged_mapping = addr("192.0.2.66:666");
        let mut response = Vec::new();
        answer_binding_request(&request, forged_mapping, &mut response).expect("own request");

        // Right transaction, wrong source.
        assert!(!discovery.handle_input(now, b, &response));
        // Right source, unknown transaction.
        let mut other_request = Vec::new();
        encode_binding_request(TransactionId([0x42; 12]), &mut other_request);
        let mut other = Vec::new();
        answer_binding_request(&other_request, forged_mapping, &mut other).expect("valid");
        assert!(!discovery.handle_input(now, a, &other));
        // Not STUN, and a corrupted response to the right transaction.
        assert!(!discovery.handle_input(now, a, b"\x05tscf envelope"));
        let mut corrupted = response.clone();
        corrupted[HEADER_LEN + 6] ^= 1;
        assert!(!discovery.handle_input(now, a, &corrupted));

        let stats = discovery.stats();
        assert_eq!(stats.dropped_unsolicited, 2);
        assert_eq!(stats.dropped_invalid, 2);
        assert_eq!(stats.responses_accepted, 0);
        assert_eq!(discovery.poll_event(), None);
        assert!(!discovery.is_finished());

        // The genuine response, via a dual-stack socket's IPv4-mapped source, still counts.
        let mapped_source = addr("[::ffff:192.0.2.10]:3478");
        assert!(discovery.handle_input(now, mapped_source, &response));
        assert_eq!(
            discovery.poll_event(),
            Some(NatEvent::Mapped {
                server: a,
                mapped: forged_mapping
            })
        );
        // A duplicate (answer to a retransmission) is consumed without a second event.
        assert!(discovery.handle_input(now, a, &response));
        assert_eq!(discovery.stats().late_responses, 1);
        assert!(matches!(
            discovery.poll_event(),
            Some(NatEvent::Finished(_))
        ));
        assert_eq!(discovery.poll_event(), None);
    }

    #[test]
    fn error_response_ends_the_server_transaction() {
        let now = origin();
        let a = addr(SERVER_A);
        let mut discovery = NatDiscovery::new(NatDiscoveryConfig::new(vec![a]), [5; 32], now);
        let mut request = Vec::new();
        assert!(discovery.poll_transmit(now, &mut request).is_some());
        let message = Message::from_bytes(&request).expect("own request");
        let error = Message::bad_request(&message, MessageWriteVec::new()).finish();
        assert!(discovery.handle_input(now, a, &error));
        assert_eq!(
            events(&mut discovery),
            vec![
                NatEvent::ServerFailed {
                    server: a,
                    error_code: Some(400)
                },
                NatEvent::Finished(NatReport::default()),
            ]
        );
        assert_eq!(discovery.stats().error_responses, 1);
        assert_eq!(discovery.poll_timeout(), None);
    }

    #[test]
    fn config_is_bounded_and_deduplicated() {
        let now = origin();
        let empty = NatDiscovery::new(NatDiscoveryConfig::default(), [6; 32], now);
        assert!(empty.is_finished());
        assert_eq!(empty.report(), Some(&NatReport::default()));

        let mut servers: Vec<SocketAddr> = (1..=12)
            .map(|i| SocketAddr::new([192, 0, 2, i].into(), 3478))
            .collect();
        servers.insert(1, addr("[::ffff:192.0.2.1]:3478"));
        let config = NatDiscoveryConfig {
            initial_rto: Duration::ZERO,
            max_transmissions: 0,
            ..NatDiscoveryConfig::new(servers.clone())
        };
        let mut discovery = NatDiscovery::new(config, [6; 32], now);
        let mut buf = Vec::new();
        let destinations: Vec<SocketAddr> =
            std::iter::from_fn(|| discovery.poll_transmit(now, &mut buf))
                .map(|t| t.destination)
                .collect();
        let mut expected = servers.clone();
        expected.remove(1);
        expected.truncate(NatDiscoveryConfig::MAX_SERVERS);
        assert_eq!(destinations, expected);
        // Clamped: one transmission, 1 ms RTO.
        assert_eq!(
            discovery.poll_timeout(),
            Some(now + Duration::from_millis(1))
        );
        discovery.handle_timeout(now + Duration::from_millis(1));
        assert!(discovery.is_finished());
    }

    #[test]
    fn transaction_ids_follow_the_seed() {
        let now = origin();
        let request = |seed| {
            let config = NatDiscoveryConfig::new(vec![addr(SERVER_A)]);
            let mut discovery = NatDiscovery::new(config, seed, now);
            let mut buf = Vec::new();
            assert!(discovery.poll_transmit(now, &mut buf).is_some());
            buf
        };
        assert_eq!(request([7; 32]), request([7; 32]));
        assert_ne!(request([7; 32]), request([8; 32]));
    }
}
