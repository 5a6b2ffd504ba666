//! Control messages: the header, typed TLV values, decoding with the receiver rules, encoding
//! (`docs/PROTOCOL.md` §3–§6).

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arrayvec::ArrayVec;
use bytes::BufMut;

use super::codes::{
    CandidateKind, EnvelopeType, MessageType, PeerServiceResult, ResultCode, ServiceAction,
    ServiceType, TlvType, Transport,
};
use super::envelope::{Envelope, ENVELOPE_HEADER_LEN};
use super::reader::Reader;
use super::tlv::{
    self, RawTlv, CLIENT_NONCE_LEN, CONTROL_KEY_LEN, MAX_AUTH_TOKEN_LEN, MAX_TEXT_LEN, REGISTRY,
};

/// The protocol version this implementation speaks.
pub const VERSION: u8 = 1;
/// Octets in the control header: version (1), type (1), sequence (4), tunnel id (8).
pub const HEADER_LEN: usize = 14;
/// The largest control message (header and TLVs) a receiver accepts.
pub const MAX_CONTROL_LEN: usize = 2048;
/// The most TLVs one control message may carry.
pub const MAX_TLVS: usize = 32;
/// The most Candidate TLVs one message may carry.
pub const MAX_CANDIDATES: usize = 8;
/// The most DNS Server TLVs one message may carry.
pub const MAX_DNS_SERVERS: usize = 4;
/// Octets of a Message Integrity TLV on the wire (short form, 32-octet HMAC).
pub const MESSAGE_INTEGRITY_TLV_LEN: usize = 2 + 32;
/// Allowed Keepalive Interval values, in milliseconds (100 ms to one day).
pub const KEEPALIVE_INTERVAL_RANGE_MS: core::ops::RangeInclusive<u32> = 100..=86_400_000;
/// The smallest legal Maximum Packet Size: the minimum IPv4 MTU (RFC 791).
pub const MIN_MAX_PACKET_SIZE: u16 = 68;

/// The fixed part of every control message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Header {
    /// Protocol version of this message.
    pub version: u8,
    /// What the message is.
    pub message_type: MessageType,
    /// Chosen by the sender of a request; echoed in its response.
    pub sequence: u32,
    /// The tunnel the message belongs to; 0 before one is assigned.
    pub tunnel_id: u64,
}

impl Header {
    /// A header of the current version.
    pub fn new(message_type: MessageType, sequence: u32, tunnel_id: u64) -> Self {
        Self {
            version: VERSION,
            message_type,
            sequence,
            tunnel_id,
        }
    }

    fn read(r: &mut Reader<'_>) -> Option<Self> {
        Some(Self {
            version: r.u8()?,
            message_type: MessageType(r.u8()?),
            sequence: r.u32()?,
            tunnel_id: r.u64()?,
        })
    }

    fn write(&self, out: &mut impl BufMut) {
        out.put_u8(self.version);
        out.put_u8(self.message_type.0);
        out.put_u32(self.sequence);
        out.put_u64(self.tunnel_id);
    }
}

/// An internal address with its prefix length (Internal IPv4/IPv6 Address TLVs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct InternalAddress<A> {
    /// The address assigned to the tunnel.
    pub addr: A,
    /// Length of the inner network's prefix.
    pub prefix_len: u8,
}

/// Where a tunnel endpoint can be reached (Connection Info TLV).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ConnectionInfo {
    /// The transport it listens on.
    pub transport: Transport,
    /// Its address and port.
    pub addr: SocketAddr,
}

/// A peer tunnel candidate (Candidate TLV).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Candidate {
    /// How the address was learned.
    pub kind: CandidateKind,
    /// The transport the candidate speaks.
    pub transport: Transport,
    /// The candidate's address and port.
    pub addr: SocketAddr,
}

/// Credentials the director issues for one peer pair (Peer Credentials TLV).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct PeerCredentials {
    /// One-time secret shared by the two peers; keys their Message Integrity.
    pub token: [u8; 16],
    /// SHA-256 fingerprint of the other peer's certificate, for DTLS and QUIC peer tunnels.
    pub fingerprint: Option<[u8; 32]>,
}

/// Capability bits a client announces (Client Capabilities TLV).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Capabilities(pub u32);

impl Capabilities {
    /// The client can answer peer service requests and build peer tunnels.
    pub const PEER_TUNNELING: Capabilities = Capabilities(1);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Capabilities) -> bool {
        self.0 & other.0 == other.0
    }
}

/// The TLVs of a control message, typed. Absent TLVs are `None` or empty.
///
/// Byte-string and text values borrow from the decoded input. Encoding writes the TLVs in
/// registry order, so a message has exactly one encoding.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tlvs<'a> {
    /// Supported Version: versions the sender speaks, one octet each.
    pub supported_versions: Option<&'a [u8]>,
    /// Tunnel Id: the tunnel a Configuration Request re-attaches.
    pub tunnel_id: Option<u64>,
    /// Re-attach Secret (retired: decoded, never sent, `docs/PROTOCOL.md` §3.4).
    pub reattach_secret: Option<[u8; 16]>,
    /// Internal IPv4 Address.
    pub internal_ipv4: Option<InternalAddress<Ipv4Addr>>,
    /// Internal IPv6 Address.
    pub internal_ipv6: Option<InternalAddress<Ipv6Addr>>,
    /// DNS Server (up to [`MAX_DNS_SERVERS`]).
    pub dns_servers: ArrayVec<IpAddr, MAX_DNS_SERVERS>,
    /// Keepalive Interval in milliseconds.
    pub keepalive_interval_ms: Option<u32>,
    /// Result Code.
    pub result_code: Option<ResultCode>,
    /// Service Type.
    pub service_type: Option<ServiceType>,
    /// Connection Info.
    pub connection_info: Option<ConnectionInfo>,
    /// Peer Service Result.
    pub peer_service_result: Option<PeerServiceResult>,
    /// Candidate (up to [`MAX_CANDIDATES`]).
    pub candidates: ArrayVec<Candidate, MAX_CANDIDATES>,
    /// Peer Credentials.
    pub peer_credentials: Option<PeerCredentials>,
    /// Client Capabilities.
    pub client_capabilities: Option<Capabilities>,
    /// Peer Internal Address.
    pub peer_internal_address: Option<IpAddr>,
    /// Auth Token (admission credential).
    pub auth_token: Option<&'a [u8]>,
    /// Service Action.
    pub service_action: Option<ServiceAction>,
    /// Certificate Fingerprint (SHA-256).
    pub certificate_fingerprint: Option<[u8; 32]>,
    /// Observed Address.
    pub observed_address: Option<SocketAddr>,
    /// Message Integrity (HMAC-SHA-256); always encoded last.
    pub message_integrity: Option<[u8; 32]>,
    /// Client Nonce: a Configuration Request's random octets, echoed in its response.
    pub client_nonce: Option<[u8; CLIENT_NONCE_LEN]>,
    /// Control Key: the tunnel's key of Message Integrity on the server tunnel.
    pub control_key: Option<[u8; CONTROL_KEY_LEN]>,
    /// Software.
    pub software: Option<&'a str>,
    /// Diagnostic.
    pub diagnostic: Option<&'a str>,
    /// Maximum Packet Size in octets (at least [`MIN_MAX_PACKET_SIZE`]).
    pub max_packet_size: Option<u16>,
    /// STUN Port (never 0).
    pub stun_port: Option<u16>,
}

/// A control message: header and typed TLVs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    /// The fixed header.
    pub header: Header,
    /// The TLVs.
    pub tlvs: Tlvs<'a>,
}

/// Why a control message was not accepted, with the header when it could be read so that the
/// receiver can answer (see [`DecodeError::response`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind}")]
pub struct DecodeError {
    /// The header, if the message was long enough to hold one.
    pub header: Option<Header>,
    /// What was wrong.
    pub kind: DecodeErrorKind,
}

/// What was wrong with a control message (`docs/PROTOCOL.md` §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeErrorKind {
    /// Shorter than the header.
    #[error("control message shorter than its {HEADER_LEN}-octet header")]
    Truncated,
    /// Longer than [`MAX_CONTROL_LEN`].
    #[error("control message of {0} octets exceeds {MAX_CONTROL_LEN}")]
    TooLong(usize),
    /// The header's version is not [`VERSION`].
    #[error("protocol version {0} not supported")]
    UnsupportedVersion(u8),
    /// The message type is not one this version knows.
    #[error("unknown message type {0}")]
    UnknownMessage(MessageType),
    /// The encoding rules were broken; the reason names the rule.
    #[error("malformed control message: {0}")]
    Malformed(&'static str),
    /// A comprehension-required TLV is unknown.
    #[error("unknown comprehension-required TLV {0}")]
    UnknownCriticalTlv(TlvType),
    /// A well-formed TLV holds a value the protocol forbids.
    #[error("illegal value: {0}")]
    IllegalValue(&'static str),
}

impl DecodeError {
    fn new(header: Option<Header>, kind: DecodeErrorKind) -> Self {
        Self { header, kind }
    }

    /// The result code that describes this error.
    pub fn result_code(&self) -> ResultCode {
        match self.kind {
            DecodeErrorKind::Truncated
            | DecodeErrorKind::TooLong(_)
            | DecodeErrorKind::Malformed(_) => ResultCode::MALFORMED,
            DecodeErrorKind::UnsupportedVersion(_) => ResultCode::VERSION_NOT_SUPPORTED,
            DecodeErrorKind::UnknownMessage(_) => ResultCode::UNKNOWN_MESSAGE,
            DecodeErrorKind::UnknownCriticalTlv(_) => ResultCode::UNKNOWN_CRITICAL_TLV,
            DecodeErrorKind::IllegalValue(_) => ResultCode::ILLEGAL_VALUE,
        }
    }

    /// The error response the receiver rules (`docs/PROTOCOL.md` §6) require, or `None` when
    /// the message must be dropped silently: it had no readable header, it was not a request,
    /// or it was a request of another version that is not a Configuration Request.
    pub fn response(&self) -> Option<Message<'static>> {
        let header = self.header?;
        if let DecodeErrorKind::UnsupportedVersion(_) = self.kind {
            if header.message_type != MessageType::CONFIGURATION_REQUEST {
                return None;
            }
        }
        header.message_type.response()?;
        // A reply always speaks this implementation's version, whatever the request spoke.
        let mut reply = Message::response_to(
            &Header::new(header.message_type, header.sequence, header.tunnel_id),
            self.result_code(),
        );
        if self.kind == DecodeErrorKind::UnsupportedVersion(header.version) {
            reply.tlvs.supported_versions = Some(&[VERSION]);
        }
        Some(reply)
    }
}

/// A message could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The message would exceed [`MAX_CONTROL_LEN`].
    #[error("control message of {0} octets exceeds {MAX_CONTROL_LEN}")]
    TooLong(usize),
    /// A variable-length value is longer than the registry allows.
    #[error("value of {0} is longer than allowed")]
    ValueTooLong(TlvType),
    /// The output buffer has no room for the message.
    #[error("output buffer too small for {0} octets")]
    BufferTooSmall(usize),
}

impl<'a> Message<'a> {
    /// A message with no TLVs.
    pub fn new(message_type: MessageType, sequence: u32, tunnel_id: u64) -> Self {
        Self {
            header: Header::new(message_type, sequence, tunnel_id),
            tlvs: Tlvs::default(),
        }
    }

    /// The response to `request` carrying `result`, with the same sequence and tunnel id.
    /// For a header that is not a request, the type is left as it is.
    pub fn response_to(request: &Header, result: ResultCode) -> Self {
        let message_type = request
            .message_type
            .response()
            .unwrap_or(request.message_type);
        let mut msg = Self::new(message_type, request.sequence, request.tunnel_id);
        msg.tlvs.result_code = Some(result);
        msg
    }

    /// Decodes a control message (the payload of a control envelope), applying the syntax
    /// rules of §4 and the semantic rules of §5 of `docs/PROTOCOL.md`.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let header = Header::read(&mut r)
            .ok_or_else(|| DecodeError::new(None, DecodeErrorKind::Truncated))?;
        let fail = |kind| DecodeError::new(Some(header), kind);
        if header.version != VERSION {
            return Err(fail(DecodeErrorKind::UnsupportedVersion(header.version)));
        }
        if bytes.len() > MAX_CONTROL_LEN {
            return Err(fail(DecodeErrorKind::TooLong(bytes.len())));
        }
        if !header.message_type.is_known() {
            return Err(fail(DecodeErrorKind::UnknownMessage(header.message_type)));
        }
        let tlvs = Tlvs::decode(header.message_type, r).map_err(fail)?;
        if !header.message_type.is_request() && tlvs.result_code.is_none() {
            return Err(fail(DecodeErrorKind::Malformed(
                "response without Result Code",
            )));
        }
        if header.message_type == MessageType::CLIENT_SERVICE_REQUEST && tlvs.service_type.is_none()
        {
            return Err(fail(DecodeErrorKind::Malformed(
                "Client Service Request without Service Type",
            )));
        }
        Ok(Self { header, tlvs })
    }

    /// Octets [`encode`](Self::encode) writes.
    pub fn encoded_len(&self) -> usize {
        let mut len = HEADER_LEN;
        self.tlvs
            .for_each_value(&mut |_, value| len += RawTlv::encoded_len(value.len()));
        len
    }

    /// Encodes the control message (without envelope).
    pub fn encode(&self, out: &mut impl BufMut) -> Result<(), EncodeError> {
        let len = self.check_encodable()?;
        if out.remaining_mut() < len {
            return Err(EncodeError::BufferTooSmall(len));
        }
        self.header.write(out);
        self.tlvs
            .for_each_value(&mut |ty, value| RawTlv::write(ty, value, out));
        Ok(())
    }

    /// Encodes the control message inside a control envelope.
    pub fn encode_envelope(&self, out: &mut impl BufMut) -> Result<(), EncodeError> {
        let len = self.check_encodable()?;
        if out.remaining_mut() < len + ENVELOPE_HEADER_LEN {
            return Err(EncodeError::BufferTooSmall(len + ENVELOPE_HEADER_LEN));
        }
        // check_encodable bounds len by MAX_CONTROL_LEN, far below the envelope maximum.
        let header = Envelope::header_bytes(EnvelopeType::CONTROL, len)
            .map_err(|_| EncodeError::TooLong(len))?;
        out.put_slice(&header);
        self.encode(out)
    }

    /// The octets a Message Integrity TLV covers in an encoded message that ends with one:
    /// everything before that TLV (`docs/PROTOCOL.md` §4.4). `None` if `encoded` is too short.
    pub fn integrity_input(encoded: &[u8]) -> Option<&[u8]> {
        let covered = encoded.len().checked_sub(MESSAGE_INTEGRITY_TLV_LEN)?;
        (covered >= HEADER_LEN).then(|| &encoded[..covered])
    }

    fn check_encodable(&self) -> Result<usize, EncodeError> {
        let t = &self.tlvs;
        let too_long = |v: Option<usize>, max: usize| v.is_some_and(|len| len > max);
        if too_long(t.supported_versions.map(<[u8]>::len), 16) {
            return Err(EncodeError::ValueTooLong(TlvType::SUPPORTED_VERSION));
        }
        if too_long(t.auth_token.map(<[u8]>::len), MAX_AUTH_TOKEN_LEN) {
            return Err(EncodeError::ValueTooLong(TlvType::AUTH_TOKEN));
        }
        if too_long(t.software.map(str::len), MAX_TEXT_LEN) {
            return Err(EncodeError::ValueTooLong(TlvType::SOFTWARE));
        }
        if too_long(t.diagnostic.map(str::len), MAX_TEXT_LEN) {
            return Err(EncodeError::ValueTooLong(TlvType::DIAGNOSTIC));
        }
        let len = self.encoded_len();
        if len > MAX_CONTROL_LEN {
            return Err(EncodeError::TooLong(len));
        }
        Ok(len)
    }
}

impl<'a> Tlvs<'a> {
    /// Walks the TLV area. Malformed input stops the walk at once; unknown critical TLVs and
    /// illegal values are remembered and reported once the whole area is known to be
    /// well-formed, so that a malformed message is always reported as malformed.
    fn decode(message_type: MessageType, mut r: Reader<'a>) -> Result<Self, DecodeErrorKind> {
        let mut tlvs = Tlvs::default();
        let mut counts = [0u8; REGISTRY.len()];
        let mut total = 0usize;
        let mut unknown_critical: Option<TlvType> = None;
        let mut illegal: Option<&'static str> = None;
        while !r.is_empty() {
            let raw = RawTlv::read(&mut r).map_err(DecodeErrorKind::Malformed)?;
            total += 1;
            if total > MAX_TLVS {
                return Err(DecodeErrorKind::Malformed("too many TLVs"));
            }
            if tlvs.message_integrity.is_some() {
                return Err(DecodeErrorKind::Malformed("TLV after Message Integrity"));
            }
            let Some((index, rule)) = tlv::lookup(raw.ty) else {
                if !raw.ty.is_optional() {
                    unknown_critical.get_or_insert(raw.ty);
                }
                continue;
            };
            if !rule.lengths.allows(raw.value.len()) {
                return Err(DecodeErrorKind::Malformed(
                    "TLV length not allowed for its type",
                ));
            }
            counts[index] += 1;
            if counts[index] > rule.max_count {
                return Err(DecodeErrorKind::Malformed("TLV repeated more than allowed"));
            }
            if !rule.allowed_in(message_type) {
                return Err(DecodeErrorKind::Malformed(
                    "TLV not allowed in this message",
                ));
            }
            if let Err(reason) = tlvs.set(raw) {
                illegal.get_or_insert(reason);
            }
        }
        // §4.3 step 6: not understanding the message outranks disliking a value in it.
        match (unknown_critical, illegal) {
            (Some(ty), _) => Err(DecodeErrorKind::UnknownCriticalTlv(ty)),
            (None, Some(reason)) => Err(DecodeErrorKind::IllegalValue(reason)),
            (None, None) => Ok(tlvs),
        }
    }

    /// Stores one TLV whose type, length and count the registry has already checked.
    fn set(&mut self, raw: RawTlv<'a>) -> Result<(), &'static str> {
        let v = raw.value;
        let mut r = Reader::new(v);
        match raw.ty {
            TlvType::SUPPORTED_VERSION => self.supported_versions = Some(v),
            TlvType::TUNNEL_ID => self.tunnel_id = r.u64(),
            TlvType::REATTACH_SECRET => self.reattach_secret = r.array(),
            TlvType::INTERNAL_IPV4 => {
                let addr = Ipv4Addr::from(r.array::<4>().unwrap_or_default());
                self.internal_ipv4 = Some(InternalAddress {
                    addr,
                    prefix_len: prefix(&mut r, 32)?,
                });
            }
            TlvType::INTERNAL_IPV6 => {
                let addr = Ipv6Addr::from(r.array::<16>().unwrap_or_default());
                self.internal_ipv6 = Some(InternalAddress {
                    addr,
                    prefix_len: prefix(&mut r, 128)?,
                });
            }
            TlvType::DNS_SERVER => {
                // The registry caps the count at the list's capacity.
                let _ = self.dns_servers.try_push(ip(v));
            }
            TlvType::KEEPALIVE_INTERVAL => {
                let ms = r.u32().unwrap_or_default();
                if !KEEPALIVE_INTERVAL_RANGE_MS.contains(&ms) {
                    return Err("Keepalive Interval out of range");
                }
                self.keepalive_interval_ms = Some(ms);
            }
            TlvType::RESULT_CODE => self.result_code = r.u16().map(ResultCode),
            TlvType::SERVICE_TYPE => self.service_type = r.u8().map(ServiceType),
            TlvType::CONNECTION_INFO => {
                let transport = Transport(r.u8().unwrap_or_default());
                self.connection_info = Some(ConnectionInfo {
                    transport,
                    addr: socket(r.rest())?,
                });
            }
            TlvType::PEER_SERVICE_RESULT => {
                self.peer_service_result = r.u8().map(PeerServiceResult);
            }
            TlvType::CANDIDATE => {
                let kind = CandidateKind(r.u8().unwrap_or_default());
                let transport = Transport(r.u8().unwrap_or_default());
                let candidate = Candidate {
                    kind,
                    transport,
                    addr: socket(r.rest())?,
                };
                // The registry caps the count at the list's capacity.
                let _ = self.candidates.try_push(candidate);
            }
            TlvType::PEER_CREDENTIALS => {
                let token = r.array().unwrap_or_default();
                self.peer_credentials = Some(PeerCredentials {
                    token,
                    fingerprint: r.array(),
                });
            }
            TlvType::CLIENT_CAPABILITIES => {
                self.client_capabilities = r.u32().map(Capabilities);
            }
            TlvType::PEER_INTERNAL_ADDRESS => self.peer_internal_address = Some(ip(v)),
            TlvType::AUTH_TOKEN => self.auth_token = Some(v),
            TlvType::SERVICE_ACTION => self.service_action = r.u8().map(ServiceAction),
            TlvType::CERTIFICATE_FINGERPRINT => self.certificate_fingerprint = r.array(),
            TlvType::OBSERVED_ADDRESS => self.observed_address = Some(socket(v)?),
            TlvType::MESSAGE_INTEGRITY => self.message_integrity = r.array(),
            TlvType::CLIENT_NONCE => self.client_nonce = r.array(),
            TlvType::CONTROL_KEY => self.control_key = r.array(),
            TlvType::SOFTWARE => self.software = Some(text(v)?),
            TlvType::DIAGNOSTIC => self.diagnostic = Some(text(v)?),
            TlvType::MAX_PACKET_SIZE => {
                let size = r.u16().unwrap_or_default();
                if size < MIN_MAX_PACKET_SIZE {
                    return Err("Maximum Packet Size below 68");
                }
                self.max_packet_size = Some(size);
            }
            TlvType::STUN_PORT => match r.u16() {
                Some(0) | None => return Err("port 0"),
                port => self.stun_port = port,
            },
            _ => {}
        }
        Ok(())
    }

    /// Calls `f` with every present TLV's type and encoded value, in registry order.
    fn for_each_value(&self, f: &mut dyn FnMut(TlvType, &[u8])) {
        let mut buf = [0u8; 48];
        if let Some(v) = self.supported_versions {
            f(TlvType::SUPPORTED_VERSION, v);
        }
        if let Some(id) = self.tunnel_id {
            f(TlvType::TUNNEL_ID, &id.to_be_bytes());
        }
        if let Some(secret) = &self.reattach_secret {
            f(TlvType::REATTACH_SECRET, secret);
        }
        if let Some(a) = self.internal_ipv4 {
            buf[..4].copy_from_slice(&a.addr.octets());
            buf[4] = a.prefix_len;
            f(TlvType::INTERNAL_IPV4, &buf[..5]);
        }
        if let Some(a) = self.internal_ipv6 {
            buf[..16].copy_from_slice(&a.addr.octets());
            buf[16] = a.prefix_len;
            f(TlvType::INTERNAL_IPV6, &buf[..17]);
        }
        for dns in &self.dns_servers {
            let n = put_ip(&mut buf, *dns);
            f(TlvType::DNS_SERVER, &buf[..n]);
        }
        if let Some(ms) = self.keepalive_interval_ms {
            f(TlvType::KEEPALIVE_INTERVAL, &ms.to_be_bytes());
        }
        if let Some(code) = self.result_code {
            f(TlvType::RESULT_CODE, &code.0.to_be_bytes());
        }
        if let Some(service) = self.service_type {
            f(TlvType::SERVICE_TYPE, &[service.0]);
        }
        if let Some(info) = self.connection_info {
            buf[0] = info.transport.0;
            let n = put_socket(&mut buf[1..], info.addr);
            f(TlvType::CONNECTION_INFO, &buf[..1 + n]);
        }
        if let Some(result) = self.peer_service_result {
            f(TlvType::PEER_SERVICE_RESULT, &[result.0]);
        }
        for c in &self.candidates {
            buf[0] = c.kind.0;
            buf[1] = c.transport.0;
            let n = put_socket(&mut buf[2..], c.addr);
            f(TlvType::CANDIDATE, &buf[..2 + n]);
        }
        if let Some(cred) = &self.peer_credentials {
            buf[..16].copy_from_slice(&cred.token);
            let n = match &cred.fingerprint {
                Some(fp) => {
                    buf[16..48].copy_from_slice(fp);
                    48
                }
                None => 16,
            };
            f(TlvType::PEER_CREDENTIALS, &buf[..n]);
        }
        if let Some(caps) = self.client_capabilities {
            f(TlvType::CLIENT_CAPABILITIES, &caps.0.to_be_bytes());
        }
        if let Some(addr) = self.peer_internal_address {
            let n = put_ip(&mut buf, addr);
            f(TlvType::PEER_INTERNAL_ADDRESS, &buf[..n]);
        }
        if let Some(token) = self.auth_token {
            f(TlvType::AUTH_TOKEN, token);
        }
        if let Some(action) = self.service_action {
            f(TlvType::SERVICE_ACTION, &[action.0]);
        }
        if let Some(fp) = &self.certificate_fingerprint {
            f(TlvType::CERTIFICATE_FINGERPRINT, fp);
        }
        if let Some(addr) = self.observed_address {
            let n = put_socket(&mut buf, addr);
            f(TlvType::OBSERVED_ADDRESS, &buf[..n]);
        }
        // Message Integrity (0x14) comes between these in code order, and last on the wire.
        if let Some(nonce) = &self.client_nonce {
            f(TlvType::CLIENT_NONCE, nonce);
        }
        if let Some(key) = &self.control_key {
            f(TlvType::CONTROL_KEY, key);
        }
        if let Some(software) = self.software {
            f(TlvType::SOFTWARE, software.as_bytes());
        }
        if let Some(diagnostic) = self.diagnostic {
            f(TlvType::DIAGNOSTIC, diagnostic.as_bytes());
        }
        if let Some(size) = self.max_packet_size {
            f(TlvType::MAX_PACKET_SIZE, &size.to_be_bytes());
        }
        if let Some(port) = self.stun_port {
            f(TlvType::STUN_PORT, &port.to_be_bytes());
        }
        // Last, so that it can cover everything before it.
        if let Some(mac) = &self.message_integrity {
            f(TlvType::MESSAGE_INTEGRITY, mac);
        }
    }
}

/// An address of 4 or 16 octets; the registry has already checked the length.
fn ip(v: &[u8]) -> IpAddr {
    match <[u8; 4]>::try_from(v) {
        Ok(v4) => IpAddr::from(v4),
        Err(_) => IpAddr::from(<[u8; 16]>::try_from(v).unwrap_or_default()),
    }
}

/// Port (2) then an address of 4 or 16 octets; port 0 is not a reachable endpoint.
fn socket(v: &[u8]) -> Result<SocketAddr, &'static str> {
    let mut r = Reader::new(v);
    let port = r.u16().unwrap_or_default();
    if port == 0 {
        return Err("port 0");
    }
    Ok(SocketAddr::new(ip(r.rest()), port))
}

fn prefix(r: &mut Reader<'_>, max: u8) -> Result<u8, &'static str> {
    match r.u8() {
        Some(len) if len <= max => Ok(len),
        _ => Err("prefix length longer than the address"),
    }
}

fn text(v: &[u8]) -> Result<&str, &'static str> {
    core::str::from_utf8(v).map_err(|_| "text is not UTF-8")
}

fn put_ip(buf: &mut [u8], addr: IpAddr) -> usize {
    match addr {
        IpAddr::V4(a) => {
            buf[..4].copy_from_slice(&a.octets());
            4
        }
        IpAddr::V6(a) => {
            buf[..16].copy_from_slice(&a.octets());
            16
        }
    }
}

fn put_socket(buf: &mut [u8], addr: SocketAddr) -> usize {
    buf[..2].copy_from_slice(&addr.port().to_be_bytes());
    2 + put_ip(&mut buf[2..], addr.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(m: &Message<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        m.encode(&mut out).expect("encodable");
        out
    }

    fn with_tlvs(t: MessageType, tlvs: &[u8]) -> Vec<u8> {
        let mut out = encoded(&Message::new(t, 1, 2));
        out.extend_from_slice(tlvs);
        out
    }

    fn kind(bytes: &[u8]) -> DecodeErrorKind {
        Message::decode(bytes).expect_err("must be rejected").kind
    }

    #[test]
    fn truncated_header_has_no_reply() {
        let err = Message::decode(&[1, 7, 0, 0]).expect_err("short");
        assert_eq!(err.kind, DecodeErrorKind::Truncated);
        assert_eq!(err.response(), None);
    }

    #[test]
    fn unknown_optional_tlvs_are_skipped_and_required_ones_reported() {
        let bytes = with_tlvs(MessageType::KEEPALIVE, &[0x9f, 2, 1, 2]);
        let m = Message::decode(&bytes).expect("optional TLV skipped");
        assert_eq!(m.tlvs, Tlvs::default());
        assert_eq!(
            kind(&with_tlvs(MessageType::KEEPALIVE, &[0x3f, 0])),
            DecodeErrorKind::UnknownCriticalTlv(TlvType(0x3f))
        );
        // Reserved type 0 is unknown and required.
        assert_eq!(
            kind(&with_tlvs(MessageType::KEEPALIVE, &[0x00, 0])),
            DecodeErrorKind::UnknownCriticalTlv(TlvType(0))
        );
    }

    #[test]
    fn malformed_wins_over_unknown_and_illegal() {
        // Unknown critical TLV, then an illegal keepalive, then a TLV that overruns.
        let bytes = with_tlvs(
            MessageType::CONFIGURATION_REQUEST,
            &[0x3f, 0, 0x07, 4, 0, 0, 0, 1, 0x10, 9],
        );
        assert!(matches!(kind(&bytes), DecodeErrorKind::Malformed(_)));
        // Without the overrun, the unknown critical TLV is reported first.
        let bytes = with_tlvs(
            MessageType::CONFIGURATION_REQUEST,
            &[0x07, 4, 0, 0, 0, 1, 0x3f, 0],
        );
        assert_eq!(
            kind(&bytes),
            DecodeErrorKind::UnknownCriticalTlv(TlvType(0x3f))
        );
        let bytes = with_tlvs(MessageType::CONFIGURATION_REQUEST, &[0x07, 4, 0, 0, 0, 1]);
        assert_eq!(
            kind(&bytes),
            DecodeErrorKind::IllegalValue("Keepalive Interval out of range")
        );
    }

    #[test]
    fn maximum_packet_size_is_checked_and_kept() {
        let with_size = |size: u16| {
            let mut tlvs = vec![0x08, 2, 0, 0, 0x82, 2];
            tlvs.extend(size.to_be_bytes());
            with_tlvs(MessageType::CONFIGURATION_RESPONSE, &tlvs)
        };
        let bytes = with_size(1400);
        let m = Message::decode(&bytes).expect("decodes");
        assert_eq!(m.tlvs.max_packet_size, Some(1400));
        assert_eq!(
            Message::decode(&with_size(MIN_MAX_PACKET_SIZE))
                .expect("the smallest legal size")
                .tlvs
                .max_packet_size,
            Some(68)
        );
        assert_eq!(
            kind(&with_size(67)),
            DecodeErrorKind::IllegalValue("Maximum Packet Size below 68")
        );
        // STUN Port beside it; port 0 is no responder.
        let bytes = with_tlvs(
            MessageType::CONFIGURATION_RESPONSE,
            &[0x08, 2, 0, 0, 0x82, 2, 5, 0x78, 0x83, 2, 0x11, 0x58],
        );
        let m = Message::decode(&bytes).expect("decodes");
        assert_eq!(
            (m.tlvs.max_packet_size, m.tlvs.stun_port),
            (Some(1400), Some(4440))
        );
        let bytes = with_tlvs(
            MessageType::CONFIGURATION_RESPONSE,
            &[0x08, 2, 0, 0, 0x83, 2, 0, 0],
        );
        assert_eq!(kind(&bytes), DecodeErrorKind::IllegalValue("port 0"));
        // Only a Configuration Response carries them.
        let bytes = with_tlvs(MessageType::KEEPALIVE, &[0x82, 2, 5, 0x78]);
        assert_eq!(
            kind(&bytes),
            DecodeErrorKind::Malformed("TLV not allowed in this message")
        );
    }

    #[test]
    fn registry_rules_are_enforced() {
        // Wrong fixed length.
        let bytes = with_tlvs(MessageType::CONFIGURATION_REQUEST, &[0x07, 3, 0, 0, 1]);
        assert!(matches!(kind(&bytes), DecodeErrorKind::Malformed(_)));
        // A TLV the message may not carry.
        let bytes = with_tlvs(MessageType::KEEPALIVE, &[0x10, 1, 0x61]);
        assert_eq!(
            kind(&bytes),
            DecodeErrorKind::Malformed("TLV not allowed in this message")
        );
        // Nothing after Message Integrity.
        let mut tlvs = vec![0x14, 32];
        tlvs.extend([0u8; 32]);
        tlvs.extend([0x80, 0]);
        let bytes = with_tlvs(MessageType::KEEPALIVE, &tlvs);
        assert_eq!(
            kind(&bytes),
            DecodeErrorKind::Malformed("TLV after Message Integrity")
        );
        // Too many TLVs, even optional ones.
        let bytes = with_tlvs(MessageType::KEEPALIVE, &[0x90, 0].repeat(MAX_TLVS + 1));
        assert_eq!(kind(&bytes), DecodeErrorKind::Malformed("too many TLVs"));
        // Nine candidates where eight are allowed.
        let candidate = [0x0c, 8, 1, 1, 0x13, 0x88, 192, 0, 2, 1];
        let bytes = with_tlvs(MessageType::CLIENT_SERVICE_REQUEST, &candidate.repeat(9));
        assert_eq!(
            kind(&bytes),
            DecodeErrorKind::Malformed("TLV repeated more than allowed")
        );
    }

    #[test]
    fn semantic_requirements() {
        let bytes = encoded(&Message::new(MessageType::KEEPALIVE_RESPONSE, 1, 2));
        assert_eq!(
            kind(&bytes),
            DecodeErrorKind::Malformed("response without Result Code")
        );
        let bytes = encoded(&Message::new(MessageType::CLIENT_SERVICE_REQUEST, 1, 2));
        assert!(matches!(kind(&bytes), DecodeErrorKind::Malformed(_)));
        let reply = Message::decode(&bytes)
            .expect_err("no service type")
            .response();
        let reply = reply.expect("a request is answered");
        assert_eq!(
            reply.header.message_type,
            MessageType::CLIENT_SERVICE_RESPONSE
        );
        assert_eq!(reply.tlvs.result_code, Some(ResultCode::MALFORMED));
    }

    #[test]
    fn oversized_messages_are_refused_both_ways() {
        let bytes = with_tlvs(MessageType::KEEPALIVE, &vec![0x90; MAX_CONTROL_LEN]);
        assert_eq!(kind(&bytes), DecodeErrorKind::TooLong(bytes.len()));
        let mut m = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
        let token = [0u8; MAX_AUTH_TOKEN_LEN + 1];
        m.tlvs.auth_token = Some(&token);
        assert_eq!(
            m.encode(&mut Vec::new()),
            Err(EncodeError::ValueTooLong(TlvType::AUTH_TOKEN))
        );
        let mut small = [0u8; 10];
        let m = Message::new(MessageType::KEEPALIVE, 1, 0);
        assert_eq!(
            m.encode(&mut &mut small[..]),
            Err(EncodeError::BufferTooSmall(HEADER_LEN))
        );
    }

    #[test]
    fn responses_and_version_rules() {
        // Responses to responses do not exist.
        let bytes = with_tlvs(MessageType::KEEPALIVE_RESPONSE, &[0x3f, 0]);
        assert_eq!(
            Message::decode(&bytes).expect_err("unknown TLV").response(),
            None
        );
        // Another version: only a Configuration Request gets an answer.
        let mut bytes = encoded(&Message::new(MessageType::KEEPALIVE, 1, 2));
        bytes[0] = 9;
        assert_eq!(Message::decode(&bytes).expect_err("v9").response(), None);
        bytes[1] = MessageType::CONFIGURATION_REQUEST.0;
        let reply = Message::decode(&bytes)
            .expect_err("v9")
            .response()
            .expect("answered");
        assert_eq!(reply.header.version, VERSION);
        assert_eq!(reply.tlvs.supported_versions, Some(&[VERSION][..]));
        // Unknown request type 0xff has no response type.
        let mut bytes = encoded(&Message::new(MessageType::KEEPALIVE, 1, 2));
        bytes[1] = 0xff;
        assert_eq!(
            Message::decode(&bytes).expect_err("unknown").response(),
            None
        );
    }
}
